"""Reading a manifest: bytes in, a checked :class:`~regrow.checkpoint.universal.format.Manifest` out, or one error.

This is the one place a manifest's fields are checked, and every reader relies on what it guarantees:

- the text: at most :data:`MAX_MANIFEST_BYTES` (checked by the caller before reading), UTF-8, JSON, objects and
  lists nested at most :data:`MAX_DEPTH` deep, every object key printable;
- every field: present (or defaulted where the format gives a default), of its type (an integer is never a
  boolean, a string holds printable characters only), in its range (sizes and offsets at most :data:`MAX_NBYTES`, a parameter at most :data:`MAX_NUMEL`
  elements, RNG files at most :data:`MAX_RNG_BYTES`, counters at most :data:`MAX_COUNT`), and no field the
  format does not have;
- every file name is a plain relative path (``confined.is_plain_path``): no ``..``, not absolute, no NUL;
- the entries agree with each other (:func:`consistency_problems`): one entry per parameter; exactly one tensor
  entry per parameter and state kind of its state bits; each entry's dtype, shape and byte size are what the
  parameter's shape needs (8-bit codes fill whole 256-element blocks, one scale per block); chunks sorted,
  non-empty and tiling ``[0, nbytes)``; no file named twice; RNG entries for ranks 0, 1, ... in order; a
  ``pipeline`` section (format 3 on) of ``stages`` x ``dp_size`` = ``world_size`` ranks, its stages 0, 1, ... in
  order, naming every parameter exactly once.

A field of the wrong type or range raises :class:`CorruptCheckpoint` with one problem that names the field
(``manifest.json: tensors[3].chunks[0].offset=-1 must be an integer >= 0``); disagreeing entries raise it with
every disagreement listed. A newer format version raises :class:`UnsupportedFormatVersion`.
"""

from __future__ import annotations

import json
from typing import Any

from regrow.checkpoint.universal.confined import MAX_NAME_BYTES, is_plain_path
from regrow.checkpoint.universal.format import (
    CHECKSUM_FIELD,
    CHECKSUMMED_SINCE,
    FORMAT_VERSION,
    KINDS,
    KINDS_BY_BITS,
    MANIFEST_NAME,
    MAX_USER_JSON_BYTES,
    PIPELINE_SINCE,
    USER_DIR,
    USER_DTYPES,
    Chunk,
    CorruptCheckpoint,
    FileEntry,
    Manifest,
    ParamEntry,
    PipelineEntry,
    RngEntry,
    StageEntry,
    TensorEntry,
    UnsupportedFormatVersion,
    UserEntry,
    UserTensorEntry,
    manifest_checksum,
)
from regrow.trainer.zero.layout import BLOCK_SIZE

MAX_MANIFEST_BYTES = 256 << 20
"""Largest manifest read (about 3 million chunks: a checkpoint of several TB at the default 1 MiB chunks)."""
MAX_DEPTH = 64
"""Deepest nesting of JSON objects and lists in a manifest (regrow writes about 8)."""
MAX_NBYTES = 1 << 46
"""Largest tensor file, chunk offset or chunk length (64 TiB)."""
MAX_NUMEL = 1 << 44
"""Most elements one parameter may have (its fp32 file is then at :data:`MAX_NBYTES`)."""
MAX_RNG_BYTES = 16 << 20
"""Largest RNG file (a rank's states take a few kB)."""
MAX_COUNT = 1 << 62
"""Largest step, token count or data cursor value."""
_CRC_LIMIT = (1 << 32) - 1
_DTYPES = ("float32", "uint8")
_REQUIRED = object()


class _FieldError(Exception):
    """One field of the manifest is missing, of the wrong type or out of range (the message names it)."""


def _show(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile manifest may hold huge values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _integer(value: object, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _FieldError(f"{name}={_show(value)} must be an integer >= {minimum}")
    if value > maximum:
        raise _FieldError(f"{name}={_show(value)} must be an integer <= {maximum}")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_BYTES or not value.isprintable():
        raise _FieldError(f"{name}={_show(value)} must be a string of at most {MAX_NAME_BYTES} printable characters")
    return value


class _Object:
    """Typed access to one JSON object of the manifest; every error names the field's path."""

    def __init__(self, data: object, path: str, fields: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise _FieldError(f"{path or 'the top level'} must be an object")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise _FieldError(f"{path or 'the top level'} has a field {_show(unknown[0])} that format version "
                              f"{FORMAT_VERSION} does not have")
        self.data, self.path = data, path

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def name(self, key: str) -> str:
        return self._join(self.path, key)

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise _FieldError(f"{self.name(key)} is missing")
        return default

    def integer(self, key: str, *, minimum: int = 0, maximum: int = MAX_NBYTES, default: Any = _REQUIRED) -> int:
        return _integer(self.get(key, default), self.name(key), minimum, maximum)

    def text(self, key: str, *, default: Any = _REQUIRED) -> str:
        """A string of printable characters (names are printed in reports and by ``regrow ckpt inspect``)."""
        return _text(self.get(key, default), self.name(key))

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise _FieldError(f"{self.name(key)}={_show(value)} must be true or false")
        return value

    def mapping(self, key: str, *, default: Any = _REQUIRED) -> dict:
        value = self.get(key, default)
        if not isinstance(value, dict):
            raise _FieldError(f"{self.name(key)} must be an object")
        return value

    def items(self, key: str) -> list:
        value = self.get(key)
        if not isinstance(value, list):
            raise _FieldError(f"{self.name(key)} must be a list")
        return value

    def file(self, key: str) -> str:
        value = self.get(key)
        if not is_plain_path(value):
            raise _FieldError(f"{self.name(key)}={_show(value, 300)} is not a plain relative path inside the checkpoint "
                              "(no '..', not absolute, no NUL)")
        return value

    def choice(self, key: str, allowed: tuple, *, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if isinstance(value, bool) or value not in allowed:
            raise _FieldError(f"{self.name(key)}={_show(value)} is invalid: allowed values are "
                              + ", ".join(map(repr, allowed)))
        return value


# ---------------------------------------------------------------------------------------------------- fields


def _shape(entry: _Object, key: str) -> list[int]:
    dims = [_integer(d, f"{entry.name(key)}[{i}]", 0, MAX_NUMEL) for i, d in enumerate(entry.items(key))]
    numel = 1
    for dim in dims:
        numel *= dim
        if numel > MAX_NUMEL:
            raise _FieldError(f"{entry.name(key)}={_show(dims)} has more than {MAX_NUMEL} elements")
    return dims


def _param(data: object, path: str) -> ParamEntry:
    entry = _Object(data, path, ("name", "shape", "state_bits", "weight_decay"))
    name = entry.text("name")
    if not name:
        raise _FieldError(f"{entry.name('name')} must not be empty")
    return ParamEntry(name=name, shape=_shape(entry, "shape"),
                      state_bits=entry.choice("state_bits", tuple(KINDS_BY_BITS)),
                      weight_decay=entry.flag("weight_decay"))


def _chunk(data: object, path: str) -> Chunk:
    entry = _Object(data, path, ("offset", "length", "crc32"))
    return Chunk(offset=entry.integer("offset"), length=entry.integer("length", minimum=1),
                 crc32=entry.integer("crc32", maximum=_CRC_LIMIT))


def _tensor(data: object, path: str) -> TensorEntry:
    entry = _Object(data, path, ("param", "kind", "file", "dtype", "shape", "nbytes", "chunks"))
    return TensorEntry(param=entry.text("param"), kind=entry.choice("kind", tuple(KINDS)), file=entry.file("file"),
                       dtype=entry.choice("dtype", _DTYPES), shape=_shape(entry, "shape"),
                       nbytes=entry.integer("nbytes"),
                       chunks=[_chunk(c, f"{path}.chunks[{i}]") for i, c in enumerate(entry.items("chunks"))])


def _small_file(data: object, path: str) -> FileEntry:
    entry = _Object(data, path, ("file", "nbytes", "crc32"))
    return FileEntry(file=entry.file("file"), nbytes=entry.integer("nbytes", maximum=MAX_RNG_BYTES),
                     crc32=entry.integer("crc32", maximum=_CRC_LIMIT))


def _rng(data: object, path: str, index: int) -> RngEntry:
    entry = _Object(data, path, ("rank", "json", "bin"))
    rank = entry.integer("rank")
    if rank != index:
        raise _FieldError(f"{entry.name('rank')}={rank} must be {index} (one entry per saving rank, in order)")
    return RngEntry(rank=rank, json=_small_file(entry.get("json"), entry.name("json")),
                    bin=_small_file(entry.get("bin"), entry.name("bin")))


def _user_tensor(data: object, path: str) -> UserTensorEntry:
    entry = _Object(data, path, ("key", "file", "dtype", "shape", "nbytes", "chunks"))
    key = entry.text("key")
    if not key.startswith(f"{USER_DIR}/") or len(key.encode()) > MAX_NAME_BYTES:
        raise _FieldError(f"{entry.name('key')}={_show(key)} must start with '{USER_DIR}/' and be at most "
                          f"{MAX_NAME_BYTES} bytes")
    file = entry.file("file")
    if not file.startswith(f"{USER_DIR}/"):
        raise _FieldError(f"{entry.name('file')}={_show(file)} must lie under {USER_DIR}/")
    dtype, shape = entry.choice("dtype", tuple(USER_DTYPES)), _shape(entry, "shape")
    nbytes = entry.integer("nbytes")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * USER_DTYPES[dtype] != nbytes:
        raise _FieldError(f"{entry.name('nbytes')}={nbytes}, but shape {shape} of {dtype} needs "
                          f"{numel * USER_DTYPES[dtype]}")
    chunks = [_chunk(c, f"{path}.chunks[{i}]") for i, c in enumerate(entry.items("chunks"))]
    position = 0
    for chunk in chunks:
        position = chunk.end if chunk.offset == position else -1
    if position != nbytes:
        raise _FieldError(f"{entry.name('chunks')} do not tile the {nbytes} bytes of {file} (sorted, without gaps "
                          "or overlaps)")
    return UserTensorEntry(key=key, file=file, dtype=dtype, shape=shape, nbytes=nbytes, chunks=chunks)


def _user(data: object) -> UserEntry | None:
    """The optional user-state entry (``user_part.py``); None when the manifest has none."""
    if data is None:
        return None
    entry = _Object(data, "user", ("state", "tensors"))
    state = _Object(entry.get("state"), entry.name("state"), ("file", "nbytes", "crc32"))
    file = state.file("file")
    if not file.startswith(f"{USER_DIR}/"):
        raise _FieldError(f"{state.name('file')}={_show(file)} must lie under {USER_DIR}/")
    small = FileEntry(file=file, nbytes=state.integer("nbytes", maximum=MAX_USER_JSON_BYTES),
                      crc32=state.integer("crc32", maximum=_CRC_LIMIT))
    tensors = [_user_tensor(t, f"user.tensors[{i}]") for i, t in enumerate(entry.items("tensors"))]
    keys = [t.key for t in tensors]
    if len(set(keys)) != len(keys):
        raise _FieldError("user.tensors names one key twice")
    return UserEntry(state=small, tensors=tensors)


def _counters(value: dict, name: str) -> dict[str, int]:
    return {key: _integer(count, f"{name}.{key}", 0, MAX_COUNT) for key, count in value.items()}


_TOP = ("format_version", "step", "tokens_seen", "data_cursor", "world_size", "layout", "config", "params", "tensors",
        "rng", "code_map_version", "block_size", "byte_order", "created", "writer", "user", "pipeline")


def _stage(data: object, path: str) -> StageEntry:
    entry = _Object(data, path, ("stage", "optimizer_steps", "lr_scale", "params"))
    scale = entry.get("lr_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise _FieldError(f"{entry.name('lr_scale')}={_show(scale)} must be a finite number > 0")
    names = entry.items("params")
    return StageEntry(stage=entry.integer("stage", maximum=MAX_COUNT),
                      optimizer_steps=entry.integer("optimizer_steps", maximum=MAX_COUNT), lr_scale=float(scale),
                      params=[_text(n, f"{entry.name('params')}[{i}]") for i, n in enumerate(names)])


def _pipeline(data: object, version: int) -> PipelineEntry | None:
    if data is None:
        return None
    if version < PIPELINE_SINCE:
        raise _FieldError(f"pipeline is recorded, but format version {version} has no such field (it came with "
                          f"version {PIPELINE_SINCE})")
    entry = _Object(data, "pipeline", ("stages", "dp_size", "stage_state"))
    return PipelineEntry(stages=entry.integer("stages", minimum=1, maximum=MAX_COUNT),
                         dp_size=entry.integer("dp_size", minimum=1, maximum=MAX_COUNT),
                         stage_state=[_stage(s, f"pipeline.stage_state[{i}]")
                                      for i, s in enumerate(entry.items("stage_state"))])


def _manifest(data: object) -> Manifest:
    top = _Object(data, "", _TOP)  # top-level fields are named bare: "step", "tensors[3].file"
    rng = [_rng(r, f"rng[{i}]", i) for i, r in enumerate(top.items("rng"))]
    if not rng:
        raise _FieldError("rng must list the RNG files of at least one rank")
    return Manifest(
        format_version=top.integer("format_version", minimum=1), step=top.integer("step", maximum=MAX_COUNT),
        tokens_seen=top.integer("tokens_seen", maximum=MAX_COUNT), data_cursor=_counters(top.mapping("data_cursor"), "data_cursor"),
        world_size=top.integer("world_size", minimum=1), layout=top.mapping("layout"), config=top.mapping("config"),
        params=[_param(p, f"params[{i}]") for i, p in enumerate(top.items("params"))],
        tensors=[_tensor(t, f"tensors[{i}]") for i, t in enumerate(top.items("tensors"))], rng=rng,
        code_map_version=top.text("code_map_version"),
        block_size=top.choice("block_size", (BLOCK_SIZE,), default=BLOCK_SIZE),
        byte_order=top.choice("byte_order", ("little",), default="little"), created=top.text("created", default=""),
        writer=top.mapping("writer", default={}), user=_user(top.get("user", None)),
        pipeline=_pipeline(top.get("pipeline", None), top.integer("format_version", minimum=1)),
    )


# ---------------------------------------------------------------------------------------------------- agreement

_SIZE_RULE = {(True, False): " (one scale per 256-element block)", (False, True): " (codes fill whole 256-element blocks)"}


def _entry_problems(tensor: TensorEntry, param: ParamEntry) -> list[str]:
    kind = KINDS[tensor.kind]
    if kind not in KINDS_BY_BITS[param.state_bits]:
        return [f"{tensor.file}: kind {tensor.kind} is not stored for {param.name} ({param.state_bits}-bit state)"]
    problems = []
    if tensor.dtype != kind.dtype:
        problems.append(f"{tensor.file}: dtype {tensor.dtype}, but {kind.name} is {kind.dtype}")
    expected_shape = kind.shape(tuple(param.shape))
    if tensor.shape != expected_shape:
        problems.append(f"{tensor.file}: shape {tensor.shape}, but {kind.name} of a parameter of shape {param.shape} "
                        f"has shape {expected_shape}")
    need = kind.count(param.numel) * kind.itemsize
    if tensor.nbytes != need:
        problems.append(f"{tensor.file}: the manifest records {tensor.nbytes} bytes, but shape {param.shape} of "
                        f"{kind.dtype} needs {need}{_SIZE_RULE.get((kind.per_block, kind.padded), '')}")
    position = 0
    for chunk in tensor.chunks:
        position = chunk.end if chunk.offset == position else -1
    if position != tensor.nbytes:
        problems.append(f"{tensor.file}: its chunks do not tile its {tensor.nbytes} bytes (they must be sorted, "
                        "without gaps or overlaps)")
    return problems


def consistency_problems(manifest: Manifest) -> list[str]:
    """Every way the entries of ``manifest`` disagree with each other (see the module docstring); empty when
    they agree."""
    problems: list[str] = []
    params: dict[str, ParamEntry] = {}
    for param in manifest.params:
        if param.name in params:
            problems.append(f"{MANIFEST_NAME}: two parameter entries for {param.name}")
        params[param.name] = param
    kinds: dict[str, set[str]] = {}
    files: set[str] = set()
    named = [t.file for t in manifest.tensors] + [f.file for r in manifest.rng for f in (r.json, r.bin)]
    if manifest.user is not None:
        named += [manifest.user.state.file] + [t.file for t in manifest.user.tensors]
    for name in named:
        if name in files:
            problems.append(f"{MANIFEST_NAME}: {name} is named by two entries")
        files.add(name)
    for tensor in manifest.tensors:
        param = params.get(tensor.param)
        if param is None:
            problems.append(f"{MANIFEST_NAME}: {tensor.file} belongs to no parameter (param {tensor.param!r})")
        elif tensor.kind in kinds.setdefault(tensor.param, set()):
            problems.append(f"{MANIFEST_NAME}: two tensor entries for {tensor.param} {tensor.kind}")
        else:
            kinds[tensor.param].add(tensor.kind)
            problems += _entry_problems(tensor, param)
    for param in params.values():
        problems += [f"{MANIFEST_NAME}: {param.name} ({param.state_bits}-bit state) has no {kind.name} entry"
                     for kind in KINDS_BY_BITS[param.state_bits] if kind.name not in kinds.get(param.name, ())]
    if manifest.pipeline is not None:
        problems += _pipeline_problems(manifest.pipeline, manifest.world_size, set(params))
    return problems


def _pipeline_problems(pipeline: PipelineEntry, world_size: int, params: set[str]) -> list[str]:
    """How the ``pipeline`` section disagrees with the rest: its shape, its stage order, the parameters it names."""
    problems = []
    if pipeline.stages * pipeline.dp_size != world_size:
        problems.append(f"{MANIFEST_NAME}: pipeline.stages={pipeline.stages} x pipeline.dp_size={pipeline.dp_size} "
                        f"is not world_size={world_size}")
    order = [entry.stage for entry in pipeline.stage_state]
    if order != list(range(pipeline.stages)):
        problems.append(f"{MANIFEST_NAME}: pipeline.stage_state lists stages {_show(order)}, not 0 to "
                        f"{pipeline.stages - 1} in order")
    seen: set[str] = set()
    for entry in pipeline.stage_state:
        for name in entry.params:
            if name in seen or name not in params:
                problems.append(f"{MANIFEST_NAME}: pipeline stage {entry.stage} names {name!r}, "
                                + ("which another stage names too" if name in seen else "which is no parameter"))
            seen.add(name)
    problems += [f"{MANIFEST_NAME}: parameter {name} belongs to no pipeline stage" for name in sorted(params - seen)]
    return problems


# ---------------------------------------------------------------------------------------------------- the text


def _shape_problem(data: object) -> str | None:
    """What is wrong with the shape of JSON document ``data`` as a whole: objects and lists nested more than
    :data:`MAX_DEPTH` deep, or an object key that is not printable (keys of the free-form ``config`` are printed
    when a resume reports what changed). Iterative: a deep document cannot exhaust the stack."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > MAX_DEPTH:
            return f"nested too deeply: more than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            if not all(key.isprintable() for key in value):
                return "an object key holds unprintable characters"
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def _decode(raw: bytes, where: str) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME} is not UTF-8 text"]) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME} is not valid JSON (nested too deeply)"]) from None
    except ValueError as error:  # JSONDecodeError, or an integer literal of thousands of digits
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME} is not valid JSON ({error})"]) from None
    problem = _shape_problem(data)
    if problem:
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME} is not valid JSON ({problem})"])
    return data


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The checked manifest in ``raw`` (the bytes of ``manifest.json`` of checkpoint ``where``); raises
    :class:`UnsupportedFormatVersion` for a newer format and :class:`CorruptCheckpoint` for anything else wrong."""
    data = _decode(raw, where)
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME} has no valid format_version (got {_show(version)})"])
    if version > FORMAT_VERSION:
        raise UnsupportedFormatVersion(
            f"checkpoint {where} has format version {version}, but this regrow reads versions up to "
            f"{FORMAT_VERSION}: upgrade regrow to load it"
        )
    recorded = data.pop(CHECKSUM_FIELD, None)
    try:
        manifest = _manifest(data)
    except _FieldError as error:
        raise CorruptCheckpoint(where, [f"{MANIFEST_NAME}: {error}"]) from None
    problems = consistency_problems(manifest)
    if problems:
        raise CorruptCheckpoint(where, problems)
    # Checked last: a field that is wrong on its own is named by what is wrong with it; the checksum catches the
    # changes that still read as a valid manifest (a flipped digit of the step, the data cursor, a chunk's CRC).
    problem = _checksum_problem(data, recorded, version)
    if problem:
        raise CorruptCheckpoint(where, [problem])
    return manifest


def _checksum_problem(data: dict, recorded: object, version: int) -> str | None:
    """Why the manifest's fields ``data`` do not match its ``recorded`` checksum (None: they do, or the format
    predates checksums)."""
    if recorded is None:
        if version < CHECKSUMMED_SINCE:
            return None
        return (f"{MANIFEST_NAME}: {CHECKSUM_FIELD} is missing (format version {version} records one): the file was "
                f"rewritten by something other than regrow")
    found = manifest_checksum(data)
    if recorded != found:
        return (f"{MANIFEST_NAME}: {CHECKSUM_FIELD} mismatch (the fields sum to {found}, the file records "
                f"{_show(recorded)}): the manifest changed after it was written (a flipped byte, or an edit)")
    return None


__all__ = ["MAX_COUNT", "MAX_DEPTH", "MAX_MANIFEST_BYTES", "MAX_NBYTES", "MAX_NUMEL", "MAX_RNG_BYTES", "consistency_problems",
           "parse_manifest"]
