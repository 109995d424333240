"""The byte layout of one snapshot segment (a file under ``/dev/shm``) and its write and verify steps.

A segment holds at most one shard snapshot of one rank::

    [0, 128)                    fixed header (little-endian, see ``_FIXED``; ``complete`` at 64, the header's own
                                CRC32 at 68)
    [128, 128 + meta_capacity)  the snapshot's JSON metadata (tensor table, step, RNG, data cursor, layout)
    [payload_offset, end)       the payload: every shard tensor's raw bytes at the offsets of the tensor table,
                                the gaps between tensors zero

The fixed header holds the magic, the format version, rank, slot, the metadata capacity, the step, the payload and
metadata sizes, a CRC32 of the metadata, the WordSum-128 of the payload (``wordsum.py``: the rank computes it on the
GPU from the source tensors, so it never reads the payload back), the ``complete`` word, alone on the header's
second cache line, and a CRC32 of the first 64 bytes (every field above), written by :func:`seal` with them: a
flipped bit in a field the two checksums do not cover (the slot, the metadata room) is caught too. A writer clears ``complete`` first, writes the payload and metadata, then the sizes and
checksums, and sets ``complete`` LAST (:func:`begin` and :func:`seal`), so a writer killed anywhere in between
leaves a segment that :func:`inspect` reports as incomplete, never as a snapshot. ``complete`` is a distinctive word
rather than 1, so stray bytes are not mistaken for it.

This module does not import torch: the snapshot process uses it too, and starts in well under a second.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from regrow.checkpoint.snapshot import wordsum

MAGIC = b"RGSNAP\x00\x01"
FORMAT_VERSION = 3
"""3: the header's own CRC32. 2 (WordSum-128 payload checksum, 128-byte header) and 1 (CRC32 of the payload, 64-byte
header) are not read: segments live in /dev/shm only, never across an upgrade."""
COMPLETE = 0x600DF00D
"""The value of the ``complete`` word of a sealed snapshot."""

_FIXED = struct.Struct("<8sIIIIqQIIQQ")
"""magic, version, rank, slot, meta_capacity, step, payload_bytes, meta_bytes, meta_crc, payload_sum_a,
payload_sum_b: 64 bytes, every field naturally aligned."""
_VERSION = struct.Struct("<8sI")
"""The fields every format version shares (magic, version): read first, to refuse other versions by name."""
_META_BYTES_AT = 40
"""Byte offset of ``meta_bytes`` in ``_FIXED`` (:func:`begin` writes it with the metadata)."""
_COMPLETE_AT = 64
"""Byte offset of the ``complete`` word (after ``_FIXED``, written on its own)."""
_HEADER_CRC_AT = 68
"""Byte offset of the CRC32 of ``_FIXED``'s 64 bytes (written by :func:`seal`, before ``complete``)."""
HEADER_BYTES = 128
PAGE = 4096
TENSOR_ALIGN = 64
"""Every tensor starts on a multiple of this (any dtype's alignment, and cache lines for the copy)."""

ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1}
"""Bytes per element of the dtypes a shard may hold (names as ``str(torch.dtype)`` without ``torch.``)."""


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of the shard lives in the payload (``offset`` counts from the payload start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, entry: dict) -> TensorEntry:
        return cls(name=entry["name"], dtype=entry["dtype"], shape=tuple(entry["shape"]), offset=entry["offset"],
                   nbytes=entry["nbytes"])


def plan_tensors(table: list[dict]) -> tuple[list[TensorEntry], int]:
    """Offsets for ``table`` (``[{"name", "dtype", "shape"}]``, in order); returns the entries and payload bytes.

    Deterministic, so the rank and the snapshot process compute the same plan from the same table."""
    entries, offset = [], 0
    for item in table:
        dtype = item["dtype"]
        if dtype not in ITEMSIZE:
            raise ValueError(f"tensor {item['name']!r}: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
        numel = 1
        for dim in item["shape"]:
            numel *= int(dim)
        nbytes = numel * ITEMSIZE[dtype]
        offset = _align(offset, TENSOR_ALIGN)
        entries.append(TensorEntry(name=item["name"], dtype=dtype, shape=tuple(int(d) for d in item["shape"]),
                                   offset=offset, nbytes=nbytes))
        offset += nbytes
    return entries, offset


def payload_offset(meta_capacity: int) -> int:
    return _align(HEADER_BYTES + meta_capacity, PAGE)


def segment_bytes(meta_capacity: int, payload_bytes: int) -> int:
    """Total size of a segment with room for ``meta_capacity`` bytes of JSON and ``payload_bytes`` of tensors."""
    return _align(payload_offset(meta_capacity) + payload_bytes, PAGE)


U32_MAX = (1 << 32) - 1
"""Largest rank, slot and metadata capacity the header can hold (unsigned 32-bit fields)."""


def check_header_fields(*, rank: int, slot: int, meta_capacity: int) -> None:
    """Raises ValueError naming the first of ``rank``, ``slot`` and ``meta_capacity`` that does not fit its header
    field (an int in [0, 2^32 - 1]): the snapshot process checks them before it creates a segment file."""
    for name, value in (("rank", rank), ("slot", slot), ("meta_capacity", meta_capacity)):
        if type(value) is not int or not 0 <= value <= U32_MAX:
            raise ValueError(f"segment header field {name}={value!r} must be an int in [0, {U32_MAX}]")


def format_empty(buffer: mmap.mmap, *, rank: int, slot: int, meta_capacity: int) -> None:
    """Writes the header of a fresh segment (no snapshot yet: ``complete`` is 0); the fields are checked first
    (:func:`check_header_fields`), so a bad one leaves the buffer untouched."""
    check_header_fields(rank=rank, slot=slot, meta_capacity=meta_capacity)
    buffer[:HEADER_BYTES] = bytes(HEADER_BYTES)
    _FIXED.pack_into(buffer, 0, MAGIC, FORMAT_VERSION, rank, slot, meta_capacity, -1, 0, 0, 0, 0, 0)


def open_segment(path: str, *, writable: bool) -> mmap.mmap:
    """Maps the segment file at ``path`` (plain ``open`` + ``mmap``: unlike ``multiprocessing.shared_memory``, no
    resource tracker learns of it, so this process exiting, even by SIGKILL, never unlinks the segment)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)  # the mapping keeps the memory; the descriptor is not needed


@dataclass(frozen=True)
class Header:
    """The fixed header of a segment, as read. Only ``magic`` and ``version`` mean anything when ``version`` is not
    :data:`FORMAT_VERSION` (the other fields are then read at this version's offsets)."""

    magic: bytes
    version: int
    rank: int
    slot: int
    meta_capacity: int
    step: int
    payload_bytes: int
    meta_bytes: int
    meta_crc: int
    payload_digest: wordsum.Digest
    complete: int


def read_header(buffer: mmap.mmap | bytes | memoryview) -> Header:
    (magic, version, rank, slot, meta_capacity, step, payload_bytes, meta_bytes, meta_crc, sum_a,
     sum_b) = _FIXED.unpack_from(buffer, 0)
    (complete,) = struct.unpack_from("<I", buffer, _COMPLETE_AT)
    return Header(magic=magic, version=version, rank=rank, slot=slot, meta_capacity=meta_capacity, step=step,
                  payload_bytes=payload_bytes, meta_bytes=meta_bytes, meta_crc=meta_crc,
                  payload_digest=wordsum.Digest(sum_a, sum_b), complete=complete)


def begin(buffer: mmap.mmap, meta: dict) -> None:
    """Starts a snapshot in this segment: clears ``complete`` FIRST (the old snapshot here is void from now on),
    then writes ``meta`` (JSON). The caller then fills the payload and calls :func:`seal`."""
    invalidate(buffer)
    write_meta(buffer, meta)


def invalidate(buffer: mmap.mmap) -> None:
    """Clears ``complete``: the snapshot here is void from now on (before anything of a new one is written)."""
    struct.pack_into("<I", buffer, _COMPLETE_AT, 0)


def write_meta(buffer: mmap.mmap, meta: dict) -> None:
    """Writes a new snapshot's ``meta`` (JSON) into a segment :func:`invalidate` voided; the payload may be being
    written meanwhile (it lies past the metadata's room)."""
    header = read_header(buffer)
    data = json.dumps(meta, separators=(",", ":")).encode()
    if len(data) > header.meta_capacity:
        raise ValueError(f"snapshot metadata is {len(data)} bytes but the segment has room for "
                         f"{header.meta_capacity}; attach again with a larger meta_capacity")
    buffer[HEADER_BYTES : HEADER_BYTES + len(data)] = data
    # The size goes in now so that seal() checksums exactly these bytes.
    struct.pack_into("<I", buffer, _META_BYTES_AT, len(data))


def seal(buffer: mmap.mmap, *, step: int, payload_bytes: int, payload_digest: wordsum.Digest | None = None) -> None:
    """Finishes the snapshot :func:`begin` started once the payload is written: step, sizes, both checksums, and
    ``complete`` LAST. ``payload_digest``, when the writer already computed it (on the GPU from the source tensors,
    or tensor by tensor as their copies landed), must be the WordSum-128 of the payload's ``payload_bytes`` as they
    are in the segment (gaps included: zeros digest to nothing, see ``wordsum.assemble``); None digests the payload
    here, on the host."""
    header = read_header(buffer)
    start = payload_offset(header.meta_capacity)
    view = memoryview(buffer)
    try:
        if payload_digest is None:
            payload_digest = wordsum.digest(view[start : start + payload_bytes])
        meta_crc = zlib.crc32(view[HEADER_BYTES : HEADER_BYTES + header.meta_bytes])
    finally:
        view.release()
    _FIXED.pack_into(buffer, 0, MAGIC, FORMAT_VERSION, header.rank, header.slot, header.meta_capacity, step,
                     payload_bytes, header.meta_bytes, meta_crc, payload_digest.a, payload_digest.b)
    struct.pack_into("<I", buffer, _HEADER_CRC_AT, zlib.crc32(buffer[: _FIXED.size]))
    struct.pack_into("<I", buffer, _COMPLETE_AT, COMPLETE)


@dataclass
class Snapshot:
    """A sealed, checksum-verified snapshot read from a segment: its metadata and a view of its payload."""

    step: int
    slot: int
    meta: dict
    payload: memoryview
    payload_digest: wordsum.Digest
    """The digest the snapshot was sealed with (already checked unless ``verify`` was told otherwise)."""


class SegmentError(ValueError):
    """A segment holds no usable snapshot (never written, interrupted, or corrupt); the message says which."""


def verify(buffer: mmap.mmap | bytes, *, rank: int | None = None,
           payload_check: Callable[[memoryview], wordsum.Digest] | None = wordsum.digest) -> Snapshot:
    """Checks a segment and returns its snapshot; raises :class:`SegmentError` saying what is wrong.

    ``payload_check`` computes the payload's digest (default: on the host); None checks everything but the
    payload, whose sealed digest the caller must then check itself (``Snapshot.payload_digest``; e.g. on the GPU
    after copying it there, or not at all to list slots by their headers)."""
    if len(buffer) < _VERSION.size:
        raise SegmentError(f"segment is {len(buffer)} bytes, smaller than its header")
    magic, version = _VERSION.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise SegmentError(f"bad magic {magic!r} (not a regrow snapshot segment)")
    if version != FORMAT_VERSION:
        raise SegmentError(f"unsupported snapshot segment format version {version}: this regrow reads only version "
                           f"{FORMAT_VERSION}; the segment was written by another regrow version (segments do not "
                           f"survive upgrades: restart the snapshot process and restore from the disk checkpoint)")
    if len(buffer) < HEADER_BYTES:
        raise SegmentError(f"segment is {len(buffer)} bytes, smaller than its {HEADER_BYTES}-byte header")
    header = read_header(buffer)
    if rank is not None and header.rank != rank:
        raise SegmentError(f"segment belongs to rank {header.rank}, not {rank}")
    if header.complete != COMPLETE:
        raise SegmentError("incomplete (no snapshot sealed, or its writer stopped before the complete flag)")
    (header_crc,) = struct.unpack_from("<I", buffer, _HEADER_CRC_AT)
    if zlib.crc32(bytes(buffer[: _FIXED.size])) != header_crc:
        raise SegmentError(f"corrupt: header checksum mismatch (step {header.step} as read; a header field changed "
                           f"after the seal)")
    start = payload_offset(header.meta_capacity)
    if header.meta_bytes > header.meta_capacity or start + header.payload_bytes > len(buffer):
        raise SegmentError("corrupt: sizes in the header exceed the segment")
    view = memoryview(buffer)
    meta_bytes = bytes(view[HEADER_BYTES : HEADER_BYTES + header.meta_bytes])
    payload = view[start : start + header.payload_bytes]
    view.release()  # the payload slice keeps its own export of the buffer
    problem = None
    if zlib.crc32(meta_bytes) != header.meta_crc:
        problem = f"step {header.step}: metadata checksum mismatch"
    elif payload_check is not None and (found := payload_check(payload)) != header.payload_digest:
        problem = (f"step {header.step}: payload checksum mismatch (WordSum-128 {found.hex()}, sealed with "
                   f"{header.payload_digest.hex()})")
    elif (meta := json.loads(meta_bytes)).get("step") != header.step:
        problem = f"corrupt: metadata step {meta.get('step')} != header step {header.step}"
    if problem is not None:
        payload.release()  # so the caller can close the mapping
        raise SegmentError(problem)
    return Snapshot(step=header.step, slot=header.slot, meta=meta, payload=payload,
                    payload_digest=header.payload_digest)


def inspect(path: str, *, rank: int | None = None, payload: bool = True) -> dict:
    """The status of the segment at ``path`` as a JSON-able dict: ``{"path", "slot", "step", "status"}`` where
    ``status`` is "ok" or the reason it holds no usable snapshot (the snapshot process answers LATEST with it).
    ``payload=False`` checks the header and metadata only (microseconds, against a second for a 0.6 GB payload):
    "ok" then means sealed, and whoever reads the snapshot verifies its payload."""
    try:
        buffer = open_segment(path, writable=False)
    except OSError as error:
        return {"path": path, "slot": None, "step": None, "status": f"unreadable: {error}"}
    try:
        header = read_header(buffer)
        try:
            snapshot = verify(buffer, rank=rank, payload_check=wordsum.digest if payload else None)
            status, step = "ok", snapshot.step
            snapshot.payload.release()
        except SegmentError as error:
            status, step = str(error), (header.step if header.step >= 0 else None)
        return {"path": path, "slot": header.slot, "step": step, "status": status}
    finally:
        buffer.close()
