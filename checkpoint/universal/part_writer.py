"""Writing one rank's part of a universal checkpoint save: its byte ranges of the per-parameter files, its RNG files,
and the marker that tells the committer it is done (docs/checkpoint-format.md, "Writing").

Files only, no process group: the asynchronous ``CheckpointWriter`` (one rank's persist thread, ``writer.py``) and
the node's snapshot process (several ranks of a node, from their sealed snapshots, ``checkpoint/node/persist.py``)
both write through :class:`PartWriter`, so their parts are byte-identical. The commit of a save by the holder of
rank 0 is ``commit.py``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from regrow.checkpoint.rng import encode_rng
from regrow.checkpoint.universal import storage
from regrow.checkpoint.universal.format import (
    KINDS_BY_BITS,
    PARTS_DIR,
    RNG_DIR,
    Chunk,
    FileEntry,
    RngEntry,
    UserEntry,
    rank_file,
    shard_key,
    tensor_file,
)
from regrow.checkpoint.universal.pieces import view_pieces
from regrow.checkpoint.universal.user_part import marker_form, write_user_part
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.state import RngState, ShardState, user_tensors
from regrow.trainer.zero.layout import FlatLayout


@dataclass
class Part:
    """What one rank wrote: chunk checksums per file and its RNG files (the content of its marker)."""

    chunks: dict[str, list[Chunk]] = field(default_factory=dict)
    rng: RngEntry | None = None
    user: UserEntry | None = None
    """Rank 0's only: the user loop's state (``user_part.py``), when the run has one."""
    params: list[dict] = field(default_factory=list)
    """The parameters whose files this rank writes its pieces of (``written_params``): the committer lists every
    rank's in the manifest, so that a pipeline's stages, each holding part of the model, list the whole model."""
    stage: dict | None = None
    """A pipeline stage's record (``CheckpointView.stage``), for the manifest's ``pipeline`` section."""


RangeWriter = Callable[[Path, torch.Tensor, int], list[Chunk]]
"""``(path, source, offset) -> chunks``: writes one byte range of a tensor file (``PartWriter.write_range``'s
signature, so a ``CheckpointWriter`` subclass can intercept every range)."""


@dataclass(frozen=True)
class PartWriter:
    """Writes one rank's part of a save into the save's temporary directory: tensor byte ranges, RNG files, the
    marker. Files only, no process group and no state of its own, so the checkpoint writer (one rank's thread) and
    the snapshot process (several ranks of a node, from their sealed snapshots) write byte-identical parts."""

    chunk_bytes: int = 1 << 20
    """Largest byte range covered by one checksum (``WriterConfig.chunk_bytes``)."""
    fsync: bool = True
    """fsync every file written (``WriterConfig.fsync``)."""
    pwrite: storage.PWrite = os.pwrite
    """The positional write used for every file (``os.pwrite``; tests pass one that fails)."""

    def write_shard(self, temp: Path, layout: dict, rank: int, tensors: Mapping[str, torch.Tensor],
                    write_range: RangeWriter | None = None, view: CheckpointView | None = None
                    ) -> dict[str, list[Chunk]]:
        """Writes ``rank``'s byte ranges of every parameter file its shard covers under ``temp``; returns their
        checksums. ``tensors`` are the rank's shard tensors keyed ``"<group>/<what>"`` (``ShardState.tensors``)
        at ``layout`` (``FlatLayout.to_dict()``); ``write_range`` defaults to :meth:`write_range`. ``view`` maps a
        pipeline stage's shard onto the whole model's files (default: the identity view of ``rank``)."""
        write_range = write_range or self.write_range
        flat = FlatLayout.from_dict(layout)
        bits = {group.kind.name: group.kind.bits for group in flat.groups}
        written: dict[str, list[Chunk]] = {}
        for piece in view_pieces(flat, view or CheckpointView.identity(rank), writing=True):
            for kind in KINDS_BY_BITS[bits[piece.group]]:
                name = tensor_file(piece.param, kind)
                start, stop = piece.shard_span(kind)
                source = tensors[shard_key(piece.group, kind)][start:stop]
                first, _ = piece.file_span(kind)
                written[name] = write_range(temp / name, source, first * kind.itemsize)
        return written

    def write_range(self, path: Path, source: torch.Tensor, offset: int) -> list[Chunk]:
        """Writes ``source``'s bytes at byte ``offset`` of ``path`` (created if needed, never truncated: other
        ranks write other ranges of the same file), fsyncs, and returns one checksummed chunk per ``chunk_bytes``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview(source.numpy()).cast("B")
        chunks = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with _naming(path):
                for begin in range(0, len(data), self.chunk_bytes):
                    piece = data[begin : begin + self.chunk_bytes]
                    storage.pwrite_all(fd, piece, offset + begin, self.pwrite)
                    chunks.append(Chunk(offset=offset + begin, length=len(piece), crc32=zlib.crc32(piece)))
                if self.fsync:
                    os.fdatasync(fd)  # data and the size needed to read it back; other metadata need not be durable
        finally:
            os.close(fd)
        return chunks

    def write_rng(self, temp: Path, rank: int, rng: RngState) -> RngEntry:
        """Writes ``rng/rank_XXXXX.json`` and ``.bin`` (``rank``'s generators) under ``temp``; returns their entry."""
        meta, blob = encode_rng(rng)
        entries = []
        for suffix, data in ((".json", json.dumps(meta).encode()), (".bin", blob)):
            name = f"{RNG_DIR}/{rank_file(rank, suffix)}"
            path = temp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with _naming(path):
                    storage.pwrite_all(fd, memoryview(data), 0, self.pwrite)
                    if self.fsync:
                        os.fsync(fd)
            finally:
                os.close(fd)
            entries.append(FileEntry(file=name, nbytes=len(data), crc32=zlib.crc32(data)))
        return RngEntry(rank=rank, json=entries[0], bin=entries[1])

    def write_user(self, temp: Path, tree: dict, tensors: Mapping[str, torch.Tensor]) -> UserEntry:
        """Writes the user loop's state under ``temp`` (rank 0's part only); returns its manifest entry."""
        return write_user_part(temp, tree, tensors, self.write_range, fsync=self.fsync)

    def write_marker(self, temp: Path, *, rank: int, step: int, session: str, part: Part, error: str | None,
                     extra: dict | None = None) -> None:
        """Drops ``parts/rank_XXXXX.json`` under ``temp``: ``rank`` is done with the save (``error`` None) or gave
        it up. ``extra`` adds keys the committer may check (never ones of the base marker)."""
        marker = {
            "rank": rank,
            "step": step,
            "session": session,
            "error": error,
            "chunks": {name: [[c.offset, c.length, c.crc32] for c in chunks] for name, chunks in part.chunks.items()},
            "rng": asdict(part.rng) if part.rng else None,
            "user": marker_form(part.user) if part.user else None,
            "params": part.params,
            "stage": part.stage,
            **(extra or {}),
        }
        folder = temp / PARTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        storage.write_file_atomic(folder / rank_file(rank, ".json"), json.dumps(marker).encode(), fsync=self.fsync)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Adds ``path`` to an OS error that names no file (a failed ``pwrite`` or ``fsync`` says only "File too
    large" or "No space left on device"), so the save's error says where; the error's class and errno are kept."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def write_user_of(parts: PartWriter, temp: Path, rank: int, tree: dict | None,
                  tensors: Mapping[str, torch.Tensor]) -> UserEntry | None:
    """Rank 0 writes the user loop's state of a save (``tree``: ``ShardState.extra["user"]``, its tensors under
    ``USER_PREFIX`` of ``tensors``); every other rank, or a run without user state, writes nothing."""
    own = user_tensors(dict(tensors))
    if rank != 0 or (tree is None and not own):
        return None
    return parts.write_user(temp, tree or {}, own)


def written_params(layout: dict, view: CheckpointView) -> list[dict]:
    """The manifest entries (name, shape, state bits, weight decay) of the parameters whose files the rank of
    ``view`` writes its pieces of, at ``layout`` (``FlatLayout.to_dict()``), in layout order."""
    flat = FlatLayout.from_dict(layout)
    return [{"name": view.name(slot.name), "shape": list(slot.shape), "state_bits": group.kind.bits,
             "weight_decay": group.kind.decay}
            for group in flat.groups for slot in group.params if view.writes(slot.name)]


def describe_part(part: Part, layout: dict, view: CheckpointView) -> None:
    """Fills in what the marker says about the rank's part besides its chunks: its parameters and stage record."""
    part.params = written_params(layout, view)
    part.stage = asdict(view.stage) if view.stage is not None else None


def write_part(parts: PartWriter, temp: Path, state: ShardState, *, session: str,
               write_range: RangeWriter | None = None, marker_extra: dict | None = None) -> tuple[Part, str | None]:
    """Writes ``state.rank``'s whole part of the save of ``state.step`` under ``temp`` and its marker (also when
    writing failed: the marker then carries the error, so the committer stops waiting). Returns the part and the
    error (None on success); never raises for a write failure."""
    part, error = Part(), None
    view = CheckpointView.of_state(state.extra, state.rank)
    try:
        describe_part(part, state.layout, view)
        part.chunks = parts.write_shard(temp, state.layout, state.rank, state.tensors, write_range, view)
        part.rng = parts.write_rng(temp, state.rank, state.rng)
        part.user = write_user_of(parts, temp, state.rank, state.extra.get("user"), state.tensors)
    except BaseException as caught:  # noqa: BLE001 (any failure is this save's failure, never the caller's)
        error = f"{type(caught).__name__}: {caught}"
    try:
        parts.write_marker(temp, rank=state.rank, step=state.step, session=session, part=part, error=error,
                           extra=marker_extra)
    except BaseException as caught:  # noqa: BLE001 (the committer then times out waiting for this rank)
        error = error or f"writing the marker failed: {type(caught).__name__}: {caught}"
    return part, error
