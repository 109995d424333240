"""Reading a sealed snapshot out of a slot its rank may reuse at any moment (the persister's copy).

The copy is checked seqlock style: the slot's header must say "sealed, step s" before the copy and be unchanged
after it. A sink clears ``complete`` before it writes any byte of a new snapshot (``seg.begin``), so an unchanged
sealed header means no snapshot started in between; and the copy's own checksums (``seg.verify`` on the copy) catch
a torn copy even if a writer sealed an identical header in between. This relies on the rank's stores becoming
visible in program order (x86-64; elsewhere the copy's checksum is the backstop).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from regrow.checkpoint.snapshot import segment as seg

COPY_PIECE = 4 << 20
"""Smallest piece of a slot one copy thread takes (fewer, larger pieces for small slots)."""


class SlotOverwritten(RuntimeError):
    """The slot no longer holds the sealed snapshot that was to be read (its rank reused it)."""


def _parallel_copy(source: memoryview, out: np.ndarray, threads: int) -> None:
    """``out[:] = source`` in pieces on ``threads`` threads (numpy releases the GIL while it copies). The numpy
    view of ``source`` dies with this call, so the caller can close the mapping afterwards."""
    src = np.frombuffer(source, dtype=np.uint8)
    size = len(src)
    piece = max(COPY_PIECE, -(-size // threads))
    bounds = [(start, min(size, start + piece)) for start in range(0, size, piece)]
    if len(bounds) <= 1:
        out[:] = src
        return
    with ThreadPoolExecutor(min(threads, len(bounds)), thread_name_prefix="regrow-persist-copy") as pool:
        list(pool.map(lambda b: np.copyto(out[b[0] : b[1]], src[b[0] : b[1]]), bounds))


def copy_sealed(buffer: mmap.mmap, *, rank: int, step: int, threads: int = 4,
                on_copied: Callable[[], None] | None = None) -> seg.Snapshot:
    """Copies the sealed snapshot of ``step`` from a mapped slot into private memory and returns it verified.

    Contract: raises :class:`SlotOverwritten` when the slot does not hold a sealed snapshot of ``step`` before the
    copy, or when its header changed during the copy (the rank began another snapshot in it: the copy may be torn);
    raises ``seg.SegmentError`` when the copy does not verify (checksums, rank). The returned snapshot's payload
    views the private copy, never the slot, so the rank may reuse the slot at once. ``on_copied`` runs after the
    copy and before the header is read again (a test seam: it may overwrite the slot)."""
    before = seg.read_header(buffer)
    if before.complete != seg.COMPLETE or before.step != step:
        state = "sealed" if before.complete == seg.COMPLETE else "being written"
        raise SlotOverwritten(f"rank {rank}'s slot {before.slot} holds step {before.step} ({state}), not a sealed "
                              f"snapshot of step {step}")
    private = np.empty(len(buffer), dtype=np.uint8)
    view = memoryview(buffer)
    try:
        _parallel_copy(view, private, threads)
    finally:
        view.release()
    if on_copied is not None:
        on_copied()
    after = seg.read_header(buffer)
    if after != before:
        now = "sealed" if after.complete == seg.COMPLETE else "being written"
        raise SlotOverwritten(f"rank {rank}'s slot {before.slot} was reused during the copy (it now holds step "
                              f"{after.step}, {now}): the copy of step {step} may be torn")
    snapshot = seg.verify(memoryview(private), rank=rank)
    if snapshot.step != step:  # cannot happen with an unchanged header; kept as the contract's last line
        snapshot.payload.release()
        raise SlotOverwritten(f"rank {rank}'s copy holds step {snapshot.step}, not {step}")
    return snapshot
