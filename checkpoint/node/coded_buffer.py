"""A node's erasure-coding buffer: its local ranks' sealed snapshot segments of one step, back to back.

The buffer is self-describing, so a node rebuilt from its peers learns from the decoded bytes alone which ranks it
held and how to recreate their segments::

    [0, 8)           magic b"RGECBUF1"
    [8, 16)          index length L (u64, little-endian)
    [16, 16 + L)     JSON index: {"step": s, "ranks": [{"rank", "slot", "tensors", "meta_capacity", "offset",
                     "nbytes"}, ...]} (offsets count from the start of the buffer)
    [...]            each rank's segment prefix: header, metadata area and payload (the bytes up to the payload's
                     end), exactly as in /dev/shm, so it carries its own CRCs and seal

Packing copies the segments (the sink overwrites a slot two snapshots later, while the copy must stay fixed for as
long as its parity is the newest) and checks the slots' headers before and after the copy, so a slot overwritten
during the copy is caught; unpacking verifies every segment's checksums.
"""

from __future__ import annotations

import functools
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from regrow.checkpoint.snapshot import segment as seg

MAGIC = b"RGECBUF1"
_PREFIX = struct.Struct("<8sQ")


class BufferError(ValueError):
    """A node buffer cannot be packed (a segment changed under the copy) or unpacked (corrupt bytes)."""


@dataclass(frozen=True, kw_only=True)
class SealedSegment:
    """One local rank's segment slot holding a sealed snapshot of the step being packed."""

    rank: int
    slot: int
    tensors: list[dict]
    meta_capacity: int
    path: str


@dataclass(frozen=True, kw_only=True)
class RebuiltSegment:
    """A segment recovered from a decoded buffer: ``data`` is its prefix, verified (seal and CRCs)."""

    rank: int
    slot: int
    tensors: list[dict]
    meta_capacity: int
    data: bytes


class NodeSegments(Protocol):
    """What the erasure coder needs from the snapshot process that owns the segments."""

    def sealed_segments(self, step: int) -> list[SealedSegment]:
        """Every local rank's slot holding a committed snapshot of ``step`` (raises KeyError if one lacks it)."""

    def hold(self, holder: str, step: int) -> str:
        """Keeps every local rank's slot of ``step`` from being overwritten by its sink until :meth:`release`;
        returns "held", "pending" (ranks that have not committed ``step`` yet get their slot held at that COMMIT)
        or "past" (a rank already committed a newer step, so its slot of ``step`` may be being rewritten: nothing
        is held). A holder holds one step at a time: a new hold replaces its previous one."""

    def holds_ready(self, holder: str, step: int) -> bool:
        """True once every local rank's slot of ``step`` is held for ``holder``."""

    def release(self, holder: str, step: int) -> None:
        """Ends ``holder``'s hold of ``step`` (nothing if it holds another step by now)."""

    def install(self, segment: RebuiltSegment, step: int, *, replace: bool = False) -> None:
        """Creates the rank's segments (as ATTACH would) and writes ``segment`` into its slot, committed; with
        ``replace``, an attached rank's slot is overwritten instead (its tensor table must match)."""


def _used_bytes(data: bytes | memoryview) -> int:
    header = seg.read_header(data)
    return seg.payload_offset(header.meta_capacity) + header.payload_bytes


def pack(step: int, segments: list[SealedSegment], *, threads: int = 8) -> bytearray:
    """The buffer of ``step`` from ``segments``: each segment copied once, straight into the buffer, on ``threads``
    threads (the rank overwrites this slot two snapshots later, so the copy must be quick).

    A copy is checked like a seqlock rather than re-checksummed: the slot must be sealed at ``step`` before the copy
    and still after it. A sink clears ``complete`` before writing any byte of a new snapshot (``seg.begin``), so an
    unchanged header after the copy means no byte changed during it; raises :class:`BufferError` otherwise. The
    checksums travel inside the copied segments and are verified where the buffer is used (:func:`unpack`)."""
    mapped = [seg.open_segment(item.path, writable=False) for item in segments]
    try:
        sizes = []
        for item, buffer in zip(segments, mapped, strict=True):
            _require_sealed(buffer, item, step)
            sizes.append(_used_bytes(buffer))
        # offsets are relative to the segment area so the index does not depend on its own length
        index = {"step": step, "ranks": []}
        offset = 0
        for item, size in zip(segments, sizes, strict=True):
            index["ranks"].append({"rank": item.rank, "slot": item.slot, "tensors": item.tensors,
                                   "meta_capacity": item.meta_capacity, "offset": offset, "nbytes": size})
            offset += size
        encoded = json.dumps(index, separators=(",", ":")).encode()
        out = bytearray(_PREFIX.size + len(encoded) + offset)
        _PREFIX.pack_into(out, 0, MAGIC, len(encoded))
        out[_PREFIX.size: _PREFIX.size + len(encoded)] = encoded
        position = _PREFIX.size + len(encoded)
        target = np.frombuffer(out, dtype=np.uint8)
        for item, buffer, size in zip(segments, mapped, sizes, strict=True):
            _parallel_copy(target[position: position + size], np.frombuffer(buffer, dtype=np.uint8, count=size),
                           threads)
            _require_sealed(buffer, item, step)
            position += size
        del target  # releases the export of ``out``, which may then be resized by its owner
        return out
    finally:
        for buffer in mapped:
            buffer.close()


def _require_sealed(buffer, item: SealedSegment, step: int) -> None:
    header = seg.read_header(buffer)
    if header.complete != seg.COMPLETE or header.step != step:
        raise BufferError(f"rank {item.rank} slot {item.slot} no longer holds a sealed snapshot of step {step} (now "
                          f"step {header.step}, {'sealed' if header.complete == seg.COMPLETE else 'being written'})"
                          f": it was overwritten during the copy")


def _parallel_copy(target: np.ndarray, source: np.ndarray, threads: int, chunk: int = 16 << 20) -> None:
    """``target[:] = source`` in chunks on up to ``threads`` threads (numpy releases the GIL while copying)."""
    starts = range(0, source.size, chunk)
    if threads <= 1 or len(starts) <= 1:
        np.copyto(target, source)
        return
    list(_pool(threads).map(lambda at: np.copyto(target[at: at + chunk], source[at: at + chunk]), starts))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regrow-ec-pack")


def unpack(buffer: bytes | bytearray | memoryview, *, rank: int | None = None) -> tuple[int, list[RebuiltSegment]]:
    """The step and the verified segments of a (decoded) buffer, or only local rank ``rank``'s; raises
    :class:`BufferError` naming the rank."""
    view = memoryview(buffer).cast("B")
    if view.nbytes < _PREFIX.size:
        raise BufferError(f"node buffer of {view.nbytes} bytes is shorter than its prefix")
    magic, length = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC or _PREFIX.size + length > view.nbytes:
        raise BufferError("node buffer has a bad magic or index length (not a regrow erasure-coding buffer)")
    index = json.loads(bytes(view[_PREFIX.size: _PREFIX.size + length]))
    base = _PREFIX.size + length
    out: list[RebuiltSegment] = []
    for entry in index["ranks"]:
        if rank is not None and entry["rank"] != rank:
            continue
        data = bytes(view[base + entry["offset"]: base + entry["offset"] + entry["nbytes"]])
        try:
            snapshot = seg.verify(data, rank=entry["rank"])
        except seg.SegmentError as error:
            raise BufferError(f"rebuilt segment of rank {entry['rank']} is unusable: {error}") from None
        snapshot.payload.release()
        out.append(RebuiltSegment(rank=entry["rank"], slot=entry["slot"], tensors=entry["tensors"],
                                  meta_capacity=entry["meta_capacity"], data=data))
    return int(index["step"]), out
