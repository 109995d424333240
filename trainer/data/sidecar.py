"""The JSON sidecar of a ``.bin`` token file (``tokens.bin.json`` next to ``tokens.bin``): what ``regrow data
prepare`` wrote, so that a reader takes the dtype from it rather than from a guess.

Fields: ``dtype`` (uint16 or uint32), ``vocab_size`` (ids are below it), ``tokens`` (the file's length in tokens),
``tokenizer`` (the tokenizer directory, or null for byte-level), ``files`` (the text files it was made from).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from regrow.trainer.data.config import TOKEN_DTYPES, DataError

SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 1 << 20
"""A sidecar is a few hundred bytes; a larger one is not ours and is not parsed."""


def sidecar_path(token_file: str | Path) -> Path:
    """Where the sidecar of ``token_file`` lives: the same name with ``.json`` appended."""
    return Path(str(token_file) + SIDECAR_SUFFIX)


@dataclass(frozen=True, kw_only=True)
class Sidecar:
    """A token file's description. Built by the writer, or parsed (and checked) by :func:`read_sidecar`."""

    dtype: str
    vocab_size: int
    tokens: int
    tokenizer: str | None
    files: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "files": list(self.files)}, indent=1) + "\n"


def read_sidecar(token_file: str | Path) -> Sidecar | None:
    """The sidecar of ``token_file``, or None when it has none. DataError naming the sidecar when it is not valid
    JSON with the fields of :class:`Sidecar`."""
    path = sidecar_path(token_file)
    if not path.is_file():
        return None
    fix = f"re-create it with `regrow data prepare ... --out {token_file}`, or delete it"
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise DataError(f"sidecar {path} is over {MAX_SIDECAR_BYTES} bytes, not a token file's description; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"sidecar {path} is not valid JSON ({error}); {fix}") from error
    problem = _problem(data)
    if problem:
        raise DataError(f"sidecar {path}: {problem}; {fix}")
    return Sidecar(dtype=data["dtype"], vocab_size=data["vocab_size"], tokens=data["tokens"],
                   tokenizer=data["tokenizer"], files=tuple(data["files"]))


def _problem(data: object) -> str | None:
    """What is wrong with a parsed sidecar (None: nothing)."""
    keys = {"dtype", "vocab_size", "tokens", "tokenizer", "files"}
    if not isinstance(data, dict) or set(data) != keys:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        return f"must be an object with exactly the keys {sorted(keys)}, got {found}"
    if data["dtype"] not in TOKEN_DTYPES:
        return f"dtype={data['dtype']!r} is invalid: allowed values are {', '.join(TOKEN_DTYPES)}"
    for name, minimum in (("vocab_size", 1), ("tokens", 0)):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"{name}={value!r} must be an integer >= {minimum}"
    if data["tokenizer"] is not None and not isinstance(data["tokenizer"], str):
        return f"tokenizer={data['tokenizer']!r} must be a string or null"
    if not isinstance(data["files"], list) or not all(isinstance(f, str) for f in data["files"]):
        return "files must be a list of paths"
    return None
