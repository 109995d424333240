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
long as its parity is the newest) and verifies the copy, so a slot overwritten during the copy is caught.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Protocol

from regrow.checkpoint import snapshot_segment as seg

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

    def install(self, segment: RebuiltSegment, step: int) -> None:
        """Creates the rank's segments (as ATTACH would) and writes ``segment`` into its slot, committed."""


def _used_bytes(data: bytes | memoryview) -> int:
    header = seg.read_header(data)
    return seg.payload_offset(header.meta_capacity) + header.payload_bytes


def pack(step: int, segments: list[SealedSegment]) -> bytearray:
    """The buffer of ``step`` from ``segments`` (copied, then each copy verified to be ``step``, sealed, intact)."""
    copies: list[bytes] = []
    for item in segments:
        mapped = seg.open_segment(item.path, writable=False)
        try:
            copy = bytes(mapped[: _used_bytes(mapped)])
        finally:
            mapped.close()
        try:
            snapshot = seg.verify(copy, rank=item.rank)
        except seg.SegmentError as error:
            raise BufferError(f"rank {item.rank} slot {item.slot} changed while it was copied: {error}") from None
        snapshot.payload.release()
        if snapshot.step != step:
            raise BufferError(f"rank {item.rank} slot {item.slot} now holds step {snapshot.step}, not {step}")
        copies.append(copy)
    # offsets are relative to the segment area so the index does not depend on its own length
    index = {"step": step, "ranks": []}
    offset = 0
    for item, copy in zip(segments, copies, strict=True):
        index["ranks"].append({"rank": item.rank, "slot": item.slot, "tensors": item.tensors,
                               "meta_capacity": item.meta_capacity, "offset": offset, "nbytes": len(copy)})
        offset += len(copy)
    encoded = json.dumps(index, separators=(",", ":")).encode()
    out = bytearray(_PREFIX.size + len(encoded) + offset)
    _PREFIX.pack_into(out, 0, MAGIC, len(encoded))
    out[_PREFIX.size: _PREFIX.size + len(encoded)] = encoded
    position = _PREFIX.size + len(encoded)
    for copy in copies:
        out[position: position + len(copy)] = copy
        position += len(copy)
    return out


def unpack(buffer: bytes | bytearray | memoryview) -> tuple[int, list[RebuiltSegment]]:
    """The step and the verified segments of a (decoded) buffer; raises :class:`BufferError` naming the rank."""
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
        data = bytes(view[base + entry["offset"]: base + entry["offset"] + entry["nbytes"]])
        try:
            snapshot = seg.verify(data, rank=entry["rank"])
        except seg.SegmentError as error:
            raise BufferError(f"rebuilt segment of rank {entry['rank']} is unusable: {error}") from None
        snapshot.payload.release()
        out.append(RebuiltSegment(rank=entry["rank"], slot=entry["slot"], tensors=entry["tensors"],
                                  meta_capacity=entry["meta_capacity"], data=data))
    return int(index["step"]), out
