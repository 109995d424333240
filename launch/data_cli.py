"""``regrow data prepare TEXTFILE... --out tokens.bin [--tokenizer DIR] [--dtype uint16|uint32]``: text files into
one token file that ``regrow train --data`` (``DataConfig.files``) reads.

* **Byte-level** by default: every byte of the files is a token (vocabulary 256, like the embedded corpus), uint16
  unless ``--dtype uint32``; the files are concatenated as they are.
* ``--tokenizer DIR``: a Hugging Face tokenizer saved in a local directory (``save_pretrained``; loaded with
  ``local_files_only=True``, never downloaded), with the tokenizer's EOS token between files when it has one. The
  text is read and tokenized in pieces of about :data:`TEXT_PIECE_BYTES` cut at line ends (memory stays bounded for
  any file size; a token never spans a cut). The dtype is uint16 when the vocabulary fits in it, else uint32; an
  explicit ``--dtype uint16`` that cannot hold the vocabulary is an error.

The ``.bin`` is written atomically (a temporary file in the same directory, renamed), then its sidecar
``<out>.json`` (``trainer/data/sidecar.py``), from which readers take the dtype. Large inputs report progress on
stderr. Bad input exits 2 with one line naming the file or flag and the fix.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from regrow.trainer.data.config import TOKEN_DTYPES
from regrow.trainer.data.sidecar import Sidecar, sidecar_path

T = TypeVar("T")
BYTE_VOCAB = 256
READ_BYTES = 16 << 20
"""Bytes read at once from an input file (byte-level)."""
TEXT_PIECE_BYTES = 1 << 20
"""About how much text a tokenizer is given at once (cut at a line end)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What ``save_pretrained`` writes for a tokenizer; a directory with neither holds none."""
PROGRESS_EVERY_BYTES = 64 << 20
"""A progress line on stderr every this many input bytes (inputs smaller than this print none)."""


class PrepareError(ValueError):
    """An input, flag or tokenizer that ``regrow data prepare`` cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class Encoder:
    """Turns one piece of an input file into token ids."""

    vocab_size: int
    eos_id: int | None
    """Written between two files (None: nothing)."""
    encode: Callable[[bytes], list[int] | np.ndarray]
    name: str | None
    """The tokenizer directory, for the sidecar (None: byte-level)."""
    piece_bytes: int
    """How much of a file one ``encode`` call gets."""
    whole_lines: bool
    """Whether pieces must end at a line end (a tokenizer's pieces; bytes need not)."""


def byte_encoder() -> Encoder:
    return Encoder(vocab_size=BYTE_VOCAB, eos_id=None, encode=lambda piece: np.frombuffer(piece, dtype=np.uint8),
                   name=None, piece_bytes=READ_BYTES, whole_lines=False)


def tokenizer_encoder(directory: str) -> Encoder:
    """The Hugging Face tokenizer saved in ``directory`` (local files only)."""
    path = Path(directory)
    if not path.is_dir():
        raise PrepareError(f"--tokenizer {directory} is not a directory; pass the directory a tokenizer was saved "
                           "to with save_pretrained (tokenizer.json, tokenizer_config.json)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise PrepareError(f"--tokenizer {directory} holds none of {', '.join(TOKENIZER_FILES)}; pass the directory "
                           "a tokenizer was saved to with save_pretrained")
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise PrepareError("--tokenizer needs the transformers package: pip install -e '.[hf]'") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrepareError(f"--tokenizer {directory}: no tokenizer could be loaded from it ({first_line}); pass a "
                           "directory written by save_pretrained") from error

    def encode(piece: bytes) -> list[int]:
        return tokenizer.encode(piece.decode("utf-8"), add_special_tokens=False)

    return Encoder(vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, encode=encode,
                   name=str(path.resolve()), piece_bytes=TEXT_PIECE_BYTES, whole_lines=True)


def choose_dtype(vocab_size: int, requested: str | None) -> str:
    """``requested``, or the smallest token dtype that holds ids below ``vocab_size``."""
    fits = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested == "uint16" and fits != "uint16":
        raise PrepareError(f"--dtype uint16 cannot hold the tokenizer's {vocab_size} ids (at most 65536); use "
                           "--dtype uint32 or leave --dtype out")
    return requested or fits


def pieces(file: BinaryIO, size: int, whole_lines: bool) -> Iterator[bytes]:
    """The file in pieces of about ``size`` bytes; with ``whole_lines``, each ends at a line end (or the file's)."""
    rest = b""
    while chunk := file.read(size):
        if not whole_lines:
            yield chunk
            continue
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no line end yet: keep reading (a single line longer than a piece stays whole)
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut]
    if rest:
        yield rest


class Progress:
    """Progress lines on stderr, one every :data:`PROGRESS_EVERY_BYTES` of input, when the input is that large."""

    def __init__(self, total_bytes: int) -> None:
        self.total, self.read, self.next = total_bytes, 0, PROGRESS_EVERY_BYTES
        self.enabled = total_bytes >= PROGRESS_EVERY_BYTES

    def advance(self, nbytes: int, tokens: int) -> None:
        self.read += nbytes
        if self.enabled and self.read >= self.next:
            self.next = self.read + PROGRESS_EVERY_BYTES
            print(f"regrow data prepare: {self.read / 2**20:,.1f} of {self.total / 2**20:,.1f} MiB read, {tokens:,} "
                  "tokens", file=sys.stderr, flush=True)


def write_tokens(inputs: list[Path], out: BinaryIO, encoder: Encoder, dtype: str) -> int:
    """Encodes ``inputs`` in order into ``out`` as little-endian ``dtype``; returns the number of tokens."""
    target = np.dtype(dtype).newbyteorder("<")
    progress = Progress(sum(p.stat().st_size for p in inputs))
    tokens = 0
    for i, path in enumerate(inputs):
        with path.open("rb") as file:
            for piece in pieces(file, encoder.piece_bytes, encoder.whole_lines):
                try:
                    ids = np.asarray(encoder.encode(piece)).astype(target)
                except UnicodeDecodeError as error:
                    raise PrepareError(f"{path} is not UTF-8 text ({error}); a tokenizer reads UTF-8 (leave "
                                       "--tokenizer out to take its bytes as tokens)") from error
                out.write(ids.tobytes())
                tokens += len(ids)
                progress.advance(len(piece), tokens)
        if encoder.eos_id is not None and i < len(inputs) - 1:
            out.write(np.array([encoder.eos_id], dtype=target).tobytes())
            tokens += 1
    if tokens == 0:
        raise PrepareError("the inputs hold no text: an empty token file cannot be trained on")
    return tokens


def _atomic_write(target: Path, write: Callable[[BinaryIO], T]) -> T:
    """Writes ``target`` through a temporary file in its directory (created with the umask's permissions, like any
    new file), synced and renamed over it; returns what ``write`` returned. When ``write`` raises, ``target`` is left
    as it was."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return result


def _check_paths(inputs: list[Path], out: Path) -> None:
    for path in inputs:
        if not path.is_file():
            raise PrepareError(f"input {path} {'is not a regular file' if path.exists() else 'does not exist'}; "
                               "name text files to tokenize")
    if out.suffix != ".bin":
        raise PrepareError(f"--out {out} must end in .bin (regrow train --data reads .bin and .npy by suffix)")
    if not out.parent.is_dir():
        raise PrepareError(f"--out {out}: directory {out.parent} does not exist; create it first")
    if any(path.resolve() == out.resolve() for path in inputs):
        raise PrepareError(f"--out {out} is also an input; write the tokens to another file")


def prepare(inputs: list[Path], out: Path, tokenizer: str | None, dtype: str | None) -> Sidecar:
    """Writes ``out`` and its sidecar from ``inputs``; returns the sidecar. PrepareError on bad input."""
    _check_paths(inputs, out)
    encoder = tokenizer_encoder(tokenizer) if tokenizer else byte_encoder()
    chosen = choose_dtype(encoder.vocab_size, dtype)
    count = _atomic_write(out, lambda handle: write_tokens(inputs, handle, encoder, chosen))
    sidecar = Sidecar(dtype=chosen, vocab_size=encoder.vocab_size, tokens=count, tokenizer=encoder.name,
                      files=tuple(str(p.resolve()) for p in inputs))
    _atomic_write(sidecar_path(out), lambda handle: handle.write(sidecar.to_json().encode()))
    return sidecar


def run_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        sidecar = prepare([Path(p) for p in args.inputs], out, args.tokenizer, args.dtype)
    except PrepareError as error:
        print(f"regrow data prepare: {error}", file=sys.stderr)
        return 2
    kind = f"tokenizer {sidecar.tokenizer}" if sidecar.tokenizer else "byte-level"
    print(f"wrote {out}: {sidecar.tokens:,} {sidecar.dtype} tokens, vocabulary {sidecar.vocab_size:,} ({kind}), "
          f"from {len(sidecar.files)} file(s); sidecar {sidecar_path(out)}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``regrow data prepare``."""
    data = commands.add_parser("data", help="prepare token files for regrow train --data")
    sub = data.add_subparsers(dest="data_command", required=True)
    prepare_parser = sub.add_parser("prepare", help="text files -> one token file (.bin) and its JSON sidecar")
    prepare_parser.add_argument("inputs", nargs="+", metavar="TEXTFILE", help="text files, tokenized in this order")
    prepare_parser.add_argument("--out", required=True, metavar="TOKENS.bin", help="the token file to write")
    prepare_parser.add_argument("--tokenizer", metavar="DIR", default=None,
                                help="a local Hugging Face tokenizer directory (default: byte-level, vocabulary 256)")
    prepare_parser.add_argument("--dtype", choices=TOKEN_DTYPES, default=None,
                                help="token dtype (default: uint16 when the vocabulary fits, else uint32)")


def main(args: argparse.Namespace) -> int:
    return {"prepare": run_prepare}[args.data_command](args)
