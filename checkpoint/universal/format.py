"""The universal checkpoint format: names, tensor kinds, the JSON manifest and the encoding of RNG states.

A checkpoint is a directory ``CKPT_ROOT/step_00000123/`` holding

- ``manifest.json``: format version, step, tokens seen, data cursor, the layout that produced it, the trainer
  config, every parameter (name, shape, state bits) and every tensor file (parameter, kind, dtype, shape, byte size
  and the crc32 of each stored chunk), the RNG files, and (from version 2) its own ``checksum``
  (:func:`manifest_checksum`), so that a flipped digit of the step or the data cursor is caught like a flipped
  tensor byte;
- ``params/<parameter name>/<kind>.bin``: one raw little-endian array per parameter per state kind;
- ``rng/rank_00000.json`` (+ ``.bin`` for tensor-valued states such as torch's CPU generator), one pair per saving rank;
- optionally ``user/state.json`` and ``user/tensor_00000.bin``, ...: a user loop's own state (``launch/guard.py``),
  the same on every rank and written once, by rank 0 (``user_part.py``).

Files are named by the whole model's parameter names whatever layout wrote them: a pipeline stage writes under the
names its parameters have in the whole model (``trainer/checkpoint_view.py``), and a parameter several stages hold
a copy of (the tied embedding/head) is stored once.

Nothing is pickled: loading reads JSON and raw bytes only. ``docs/checkpoint-format.md`` is the prose version of
this module; keep the two in step (and bump :data:`FORMAT_VERSION` on any incompatible change).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from regrow.trainer.zero import shard as zero_shard
from regrow.trainer.zero.layout import BLOCK_SIZE, round_up

FORMAT_VERSION = 3
"""The newest manifest version this code writes and reads. Older versions stay readable; newer ones are refused.
2: the manifest records its own checksum (1 had none). 3: it may record the pipeline layout that wrote it
(``pipeline``: every stage's parameters, Adam step count and learning-rate scale)."""
PIPELINE_SINCE = 3
"""The first format version whose manifests may carry ``pipeline``."""
CHECKSUMMED_SINCE = 2
"""The first format version whose manifests carry ``checksum``; from it on, a manifest without one is corrupt."""
CHECKSUM_FIELD = "checksum"
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
STEP_PREFIX = "step_"
TEMP_PREFIX = ".tmp_"
"""Directories being written (``.tmp_step_00000123.<session>``); never loaded, removed by the next writer."""
PARTS_DIR = "parts"
RNG_DIR = "rng"
PARAMS_DIR = "params"
USER_DIR = "user"
USER_DTYPES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}
"""The dtypes a user loop's tensor may have in a checkpoint, with their item sizes (a snapshot segment's)."""
MAX_USER_JSON_BYTES = 16 << 20
"""Largest ``user/state.json`` (a schedule and counters take a few hundred bytes)."""

if sys.byteorder != "little":  # the files are little-endian and written straight from memory
    raise ImportError("regrow checkpoints are little-endian raw arrays; this big-endian host cannot write them as is")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint and what would fix it."""


class UnsupportedFormatVersion(CheckpointError):
    """The manifest was written by a newer regrow (a format version this code does not know)."""


class CorruptCheckpoint(CheckpointError):
    """Files are missing, truncated or fail their checksum; ``problems`` lists each, naming the file."""

    def __init__(self, where: str, problems: list[str]) -> None:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(f"checkpoint {where} is corrupt:\n  - " + "\n  - ".join(shown))
        self.where = where
        self.problems = problems


class CheckpointMismatch(CheckpointError):
    """The checkpoint holds a different model; ``problems`` lists every mismatched name and shape."""

    def __init__(self, where: str, problems: list[str]) -> None:
        super().__init__(
            f"checkpoint {where} was saved from a different model ({len(problems)} mismatches):\n  - "
            + "\n  - ".join(problems)
            + "\nload it into the model it was saved from, or convert it first"
        )
        self.where = where
        self.problems = problems


def step_dir_name(step: int) -> str:
    """``step_00000123``: zero-padded so that names sort like steps."""
    return f"{STEP_PREFIX}{step:08d}"


def parse_step_dir_name(name: str) -> int | None:
    """The step of a committed checkpoint directory name, or None for anything else (temporaries included, and
    names with more than 18 digits or digits other than ASCII 0-9)."""
    match = re.fullmatch(rf"{STEP_PREFIX}([0-9]{{1,18}})", name)
    return int(match.group(1)) if match else None


def temp_dir_name(step: int, session: str) -> str:
    return f"{TEMP_PREFIX}{step_dir_name(step)}.{session}"


def rank_file(rank: int, suffix: str) -> str:
    return f"rank_{rank:05d}{suffix}"


# ---------------------------------------------------------------------------------------------------- tensor kinds


@dataclass(frozen=True)
class KindSpec:
    """One stored state kind of a parameter: its file stem, dtype and how its elements map to the parameter's."""

    name: str
    """File stem, e.g. ``master`` or ``exp_avg.codes``."""
    dtype: str
    """``float32`` or ``uint8``."""
    per_block: bool
    """One value per 256-element block (the block scales of 8-bit state)."""
    padded: bool
    """Covers whole blocks (8-bit codes, including the padding codes of the last block) rather than exactly numel."""

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.uint8

    def count(self, numel: int) -> int:
        """Elements stored for a parameter of ``numel`` elements."""
        if self.per_block:
            return round_up(numel, BLOCK_SIZE) // BLOCK_SIZE
        return round_up(numel, BLOCK_SIZE) if self.padded else numel

    def shape(self, param_shape: tuple[int, ...]) -> list[int]:
        """Shape recorded in the manifest: the parameter's own for per-element fp32 kinds, 1-D otherwise."""
        numel = int(np.prod(param_shape, dtype=np.int64)) if param_shape else 1
        if self.per_block or self.padded:
            return [self.count(numel)]
        return list(param_shape)

    def span(self, start: int, stop: int, numel: int) -> tuple[int, int]:
        """The stored elements for the parameter's block-aligned element range ``[start, stop)``."""
        if self.per_block:
            return start // BLOCK_SIZE, stop // BLOCK_SIZE
        if self.padded:
            return start, stop
        return min(start, numel), min(stop, numel)


MASTER = KindSpec(name="master", dtype="float32", per_block=False, padded=False)
EXP_AVG = KindSpec(name="exp_avg", dtype="float32", per_block=False, padded=False)
EXP_AVG_SQ = KindSpec(name="exp_avg_sq", dtype="float32", per_block=False, padded=False)
EXP_AVG_CODES = KindSpec(name="exp_avg.codes", dtype="uint8", per_block=False, padded=True)
EXP_AVG_SCALES = KindSpec(name="exp_avg.scales", dtype="float32", per_block=True, padded=False)
EXP_AVG_SQ_CODES = KindSpec(name="exp_avg_sq.codes", dtype="uint8", per_block=False, padded=True)
EXP_AVG_SQ_SCALES = KindSpec(name="exp_avg_sq.scales", dtype="float32", per_block=True, padded=False)

KINDS_BY_BITS: dict[int, tuple[KindSpec, ...]] = {
    32: (MASTER, EXP_AVG, EXP_AVG_SQ),
    8: (MASTER, EXP_AVG_CODES, EXP_AVG_SCALES, EXP_AVG_SQ_CODES, EXP_AVG_SQ_SCALES),
}
KINDS = {k.name: k for kinds in KINDS_BY_BITS.values() for k in kinds}

# A file kind names the same tensor as the <what> of a shard key, with a dot for the schema's underscore.
_SHARD_NAME_OF_KIND = {k.name: k.name.replace(".", "_") for k in KINDS.values()}


def shard_key(group: str, kind: KindSpec) -> str:
    """The key of ``ZeroOptimizer.shard_tensors()`` holding ``kind`` of ``group`` (file kind ``exp_avg.codes`` is
    the shard's ``exp_avg_codes``)."""
    return zero_shard.shard_key(group, _SHARD_NAME_OF_KIND[kind.name])


def param_dir(name: str) -> str:
    """``params/<name>``; names that are not plain file names (``/``, ``..``, odd characters) are percent-encoded."""
    plain = re.fullmatch(r"[A-Za-z0-9_.\-]+", name) and name not in (".", "..")
    return f"{PARAMS_DIR}/{name if plain else urllib.parse.quote(name, safe='')}"


def tensor_file(name: str, kind: KindSpec) -> str:
    return f"{param_dir(name)}/{kind.name}.bin"


# ---------------------------------------------------------------------------------------------------- the manifest


@dataclass
class Chunk:
    """Bytes ``[offset, offset + length)`` of a tensor file and their zlib crc32."""

    offset: int
    length: int
    crc32: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class TensorEntry:
    """One tensor file: which parameter and kind, its dtype, shape, byte size and chunk checksums (sorted, tiling
    ``[0, nbytes)`` exactly)."""

    param: str
    kind: str
    file: str
    dtype: str
    shape: list[int]
    nbytes: int
    chunks: list[Chunk]


@dataclass
class ParamEntry:
    """One model parameter: its shape and how its optimizer state is kept."""

    name: str
    shape: list[int]
    state_bits: int
    weight_decay: bool

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class FileEntry:
    """A small file (an RNG state) with its size and crc32."""

    file: str
    nbytes: int
    crc32: int


@dataclass
class RngEntry:
    """The RNG state of one saving rank: a JSON file and a binary file for tensor-valued states."""

    rank: int
    json: FileEntry
    bin: FileEntry


@dataclass
class UserTensorEntry:
    """One tensor of a user loop's state: its key in ``ShardState.tensors`` (``user/...``), file, dtype, shape and
    chunk checksums (tiling ``[0, nbytes)``)."""

    key: str
    file: str
    dtype: str
    shape: list[int]
    nbytes: int
    chunks: list[Chunk]


@dataclass
class UserEntry:
    """A user loop's own state: its JSON part (``ShardState.extra["user"]``) in a small file, and its tensors."""

    state: FileEntry
    tensors: list[UserTensorEntry]


@dataclass
class StageEntry:
    """One stage of the pipeline that wrote the checkpoint: the parameters it wrote and its optimizer values."""

    stage: int
    optimizer_steps: int
    """Adam's step count of the stage (the checkpoint's step unless a neighbour rebuild restarted the stage)."""
    lr_scale: float
    """The stage's learning-rate factor (1.0 unless a neighbour rebuild set another)."""
    params: list[str]
    """The parameters whose files the stage wrote (a copy held by several stages is written by its owner)."""


@dataclass
class PipelineEntry:
    """The pipeline layout that wrote the checkpoint (``stages`` x ``dp_size`` ranks); any layout can load it."""

    stages: int
    dp_size: int
    stage_state: list[StageEntry]

    def stage_of(self) -> dict[str, StageEntry]:
        """Parameter name -> the stage that wrote it."""
        return {name: entry for entry in self.stage_state for name in entry.params}


@dataclass
class Manifest:
    """Everything about a checkpoint except the tensor bytes. See ``docs/checkpoint-format.md``; a manifest read
    from disk comes from ``manifest_parse.parse_manifest``, which checks every field and that the entries agree."""

    step: int
    tokens_seen: int
    data_cursor: dict[str, int]
    world_size: int
    layout: dict
    config: dict
    params: list[ParamEntry]
    tensors: list[TensorEntry]
    rng: list[RngEntry]
    code_map_version: str
    format_version: int = FORMAT_VERSION
    block_size: int = BLOCK_SIZE
    byte_order: str = "little"
    created: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    user: UserEntry | None = None
    """The user loop's state (None: the run had none; every ``Trainer`` run)."""
    pipeline: PipelineEntry | None = None
    """The pipeline layout that wrote it (None: a data-parallel run)."""

    def to_json(self) -> str:
        """The manifest as written: its fields and, from :data:`CHECKSUMMED_SINCE` on, their checksum."""
        data = asdict(self)
        for optional in ("user", "pipeline"):  # absent rather than null, as in the versions before them
            if data[optional] is None:
                del data[optional]
        return sealed_manifest_json(data) if self.format_version >= CHECKSUMMED_SINCE else json.dumps(data, indent=1)

    def param(self, name: str) -> ParamEntry:
        for entry in self.params:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def tensor(self, param: str, kind: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.param == param and entry.kind == kind:
                return entry
        raise KeyError(f"{param}:{kind}")

    def nbytes(self) -> int:
        """Bytes of tensor data (what the checkpoint costs on disk, give or take the small files)."""
        return sum(t.nbytes for t in self.tensors)


def manifest_checksum(data: dict[str, Any]) -> str:
    """The checksum of a manifest's fields (``data`` without :data:`CHECKSUM_FIELD`): the CRC32 of their canonical
    JSON (keys sorted, no spaces), as 8 hex digits. Independent of how the file is indented; any changed value,
    a flipped digit of the step included, changes it."""
    fields = {key: value for key, value in data.items() if key != CHECKSUM_FIELD}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{zlib.crc32(canonical.encode()):08x}"


def sealed_manifest_json(data: dict[str, Any]) -> str:
    """``data`` (a manifest's fields) as the text of ``manifest.json`` with its checksum, replacing any it had."""
    return json.dumps({**{k: v for k, v in data.items() if k != CHECKSUM_FIELD},
                       CHECKSUM_FIELD: manifest_checksum(data)}, indent=1)


# ---------------------------------------------------------------------------------------------------- RNG states


