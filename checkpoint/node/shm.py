"""The snapshot segment files a snapshot process owns in shared memory (``shm_dir``, a tmpfs such as /dev/shm).

A segment is named ``regrow-snap-<job>-r<rank>-s<slot>``, created with mode 0600 (the snapshots are the job's
training state: only the job's user may map them) and its pages reserved at once. Space is checked before anything
is created (``os.statvfs``) and reserved with ``posix_fallocate``, so a ``/dev/shm`` that is too small fails at
start-up (``expected_bytes``) or at ATTACH, never in the middle of a run. The segments of a killed process are
orphaned; the next snapshot process of the same job removes them (:func:`remove_segments`).
"""

from __future__ import annotations

import os
from pathlib import Path

from regrow.checkpoint.snapshot import segment as seg


class ShmSpaceError(RuntimeError):
    """The shared-memory filesystem cannot hold the requested snapshots."""


def check_space(shm_dir: str, needed: int) -> None:
    """Raises :class:`ShmSpaceError` unless ``shm_dir`` has ``needed`` bytes free."""
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise ShmSpaceError(
            f"{shm_dir} has {free / 2**30:.2f} GiB free but the snapshots need {needed / 2**30:.2f} GiB "
            f"(2 buffers per local rank): enlarge it (e.g. `mount -o remount,size=<N>G {shm_dir}`, or docker "
            f"--shm-size), snapshot fewer ranks per node, or turn in-memory snapshots off")


def segment_path(shm_dir: str, job: str, rank: int, slot: int) -> str:
    """The file of ``rank``'s segment ``slot`` of snapshot process job ``job``."""
    return str(Path(shm_dir) / f"regrow-snap-{job}-r{rank}-s{slot}")


def create_segment(shm_dir: str, job: str, *, rank: int, slot: int, size: int, meta_capacity: int) -> str:
    """Creates ``rank``'s segment ``slot`` (it must not exist) of ``size`` bytes, its space reserved, formatted
    empty (no snapshot); returns its path. Raises :class:`ShmSpaceError` when the space cannot be reserved."""
    path = segment_path(shm_dir, job, rank, slot)
    # 0600: the snapshots are the job's training state; only the job's user may map them.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # independent of the umask
        try:
            # Reserves the pages now: a full tmpfs fails here with ENOSPC instead of SIGBUS in a rank later.
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            os.unlink(path)
            raise ShmSpaceError(f"cannot reserve {size} bytes in {shm_dir}: {error}") from error
    finally:
        os.close(fd)
    buffer = seg.open_segment(path, writable=True)
    try:
        seg.format_empty(buffer, rank=rank, slot=slot, meta_capacity=meta_capacity)
    finally:
        buffer.close()
    return path


def write_segment(path: str, data: bytes) -> None:
    """Writes ``data`` (a segment prefix: header, metadata and payload) at the start of the segment ``path``."""
    buffer = seg.open_segment(path, writable=True)
    try:
        buffer[: len(data)] = data
    finally:
        buffer.close()


def remove_segments(shm_dir: str, job: str) -> int:
    """Removes every segment of snapshot process job ``job`` under ``shm_dir``; returns how many there were."""
    found = sorted(Path(shm_dir).glob(f"regrow-snap-{job}-r*-s*"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)
