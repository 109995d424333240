"""WordSum-128: the payload checksum of snapshot segments, computable on the GPU in one pass and combinable.

Definition. A byte string of length L is zero-padded to a multiple of 4 bytes and read as little-endian uint32
words ``w_0 .. w_{n-1}``; its digest is the pair::

    A = sum(w_i)            mod 2^64
    B = sum((i + 1) * w_i)  mod 2^64

Combination. For ``X || Y`` where ``len(X)`` is a multiple of 4 (``nX`` words)::

    A = A_X + A_Y,   B = B_X + B_Y + nX * A_Y   (mod 2^64)

so chunks, threads or GPU programs may digest parts in any order and the parts combine exactly, and zeros digest to
(0, 0): a buffer that is zero except for some parts at 4-byte-aligned offsets digests to the parts' digests shifted
by their offsets (:func:`assemble`). Snapshot payloads are such buffers (tensors at 64-byte aligned offsets, zero
gaps), which is what lets the rank digest each source tensor on the GPU and never read the payload on the host.

What it detects. Every word value and every difference of two words is below 2^32, and every position below 2^32
for buffers under 16 GiB, so all products below stay under 2^64 in magnitude and reduce to themselves:

- one corrupted word (any number of its bytes): A changes by ``d = w' - w``, with ``0 < |d| < 2^32``;
- two corrupted words i != j: if A is unchanged then ``d_j = -d_i``, and B changes by ``d_i * (i - j)``, nonzero
  with ``|d_i * (i - j)| < 2^64``; a swap of two different words is that case;
- zeroing or truncating (zeros past the cut) non-zero data: the words only decrease, so A drops by their sum,
  which is nonzero and, below 2^32 words, less than 2^64.

It is NOT cryptographic: anyone can forge a payload with a given digest, and random corruption of many words goes
unnoticed with probability about 2^-64 at best. It guards against torn or stray writes, not against an adversary.
Checkpoint files keep CRC32 (``crc.py``).

This module does not import torch (the snapshot process imports ``segment.py``, which uses it, and must start
fast); the CUDA kernel is in ``wordsum_triton.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import NamedTuple

import numpy as np

from regrow.checkpoint.snapshot.crc import default_threads

MASK = (1 << 64) - 1
DEFAULT_CHUNK_BYTES = 8 * 2**20
"""Bytes per thread task (a multiple of 4, so every chunk but the last is whole words)."""
_BLOCK_WORDS = 1 << 18
"""Words widened to uint64 at a time inside a chunk: bounds the temporary memory (2 MiB) and keeps it in cache."""


class Digest(NamedTuple):
    """A WordSum-128 digest: ``a`` and ``b`` as unsigned 64-bit integers."""

    a: int
    b: int

    def hex(self) -> str:
        return f"{self.a:016x}{self.b:016x}"

    @classmethod
    def from_int64(cls, a: int, b: int) -> Digest:
        """The digest whose words have the bit patterns of the signed 64-bit integers ``a`` and ``b`` (how an int64
        tensor, e.g. the GPU kernel's result, holds them)."""
        return cls(a & MASK, b & MASK)


EMPTY = Digest(0, 0)
"""The digest of no bytes, and of any run of zero bytes."""


def gpu_kernels() -> ModuleType | None:
    """``wordsum_triton``, the same digest on the GPU, when triton imports (it is installed where CUDA is); else
    None."""
    try:
        from regrow.checkpoint.snapshot import wordsum_triton
    except ImportError:
        return None
    return wordsum_triton


def combine(first: Digest, second: Digest, *, first_bytes: int) -> Digest:
    """The digest of ``X || Y`` from ``digest(X)``, ``digest(Y)`` and ``len(X)``, a multiple of 4."""
    if first_bytes % 4:
        raise ValueError(f"wordsum.combine: first_bytes={first_bytes} is not a multiple of 4; only word-aligned "
                         f"parts combine (pad the first part to whole words)")
    return Digest((first.a + second.a) & MASK, (first.b + second.b + (first_bytes // 4) * second.a) & MASK)


def assemble(parts: Iterable[tuple[int, Digest]]) -> Digest:
    """The digest of a buffer that is zero except for non-overlapping parts ``(offset, digest)``, each offset a
    multiple of 4 bytes (a part's zero padding to whole words must also be zeros in the buffer)."""
    a = b = 0
    for offset, part in parts:
        if offset % 4:
            raise ValueError(f"wordsum.assemble: part offset {offset} is not a multiple of 4")
        a += part.a
        b += part.b + (offset // 4) * part.a
    return Digest(a & MASK, b & MASK)


@functools.cache
def _weights() -> np.ndarray:
    weights = np.arange(1, _BLOCK_WORDS + 1, dtype=np.uint64)
    weights.flags.writeable = False
    return weights


def _sum_words(view: memoryview, whole: int) -> tuple[int, int]:
    """(A, B) of the first ``whole`` words of ``view``, not yet reduced mod 2^64. Its arrays die on return, so the
    caller may release ``view`` afterwards."""
    words = np.frombuffer(view, dtype="<u4", count=whole)
    scratch = np.empty(min(whole, _BLOCK_WORDS), dtype=np.uint64)
    weights = _weights()
    a = b = 0
    for start in range(0, whole, _BLOCK_WORDS):
        block = words[start : start + _BLOCK_WORDS]
        wide = scratch[: len(block)]
        np.copyto(wide, block, casting="unsafe")  # zero-extends to uint64
        block_a = int(wide.sum())  # at most 2^18 words of < 2^32: no wrap
        np.multiply(wide, weights[: len(block)], out=wide)
        block_b = int(wide.sum())  # numpy's uint64 sum wraps mod 2^64, which is the definition
        a += block_a
        b += block_b + start * block_a
    return a, b


def _digest_one(view: memoryview) -> Digest:
    """Digest of ``view`` on this thread (numpy releases the GIL in its loops)."""
    whole = len(view) // 4
    a, b = _sum_words(view, whole) if whole else (0, 0)
    tail = bytes(view[4 * whole :])
    if tail:
        word = int.from_bytes(tail, "little")  # the zero padding is implicit
        a += word
        b += (whole + 1) * word
    return Digest(a & MASK, b & MASK)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regrow-wordsum")


def digest(data: memoryview | bytes | bytearray, *, threads: int | None = None,
           chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Digest:
    """WordSum-128 of ``data`` on ``threads`` threads (default :func:`crc.default_threads`) in chunks of
    ``chunk_bytes`` (a positive multiple of 4). The result does not depend on ``threads`` or ``chunk_bytes``."""
    if chunk_bytes <= 0 or chunk_bytes % 4:
        raise ValueError(f"wordsum.digest: chunk_bytes={chunk_bytes} must be a positive multiple of 4")
    view = memoryview(data).cast("B")
    try:
        threads = threads or default_threads()
        if threads == 1 or len(view) <= chunk_bytes:
            return _digest_one(view)
        starts = range(0, len(view), chunk_bytes)
        parts = _pool(threads).map(lambda start: _digest_one(view[start : start + chunk_bytes]), starts)
        return assemble(zip(starts, parts, strict=True))
    finally:
        view.release()
