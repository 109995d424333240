"""The snapshot segment files a snapshot process owns in shared memory (``shm_dir``, a tmpfs such as /dev/shm).

A segment is named ``regrow-snap-<job>-r<rank>-s<slot>``, created with mode 0600 (the snapshots are the job's
training state: only the job's user may map them) and its pages reserved at once. Space is checked before anything
is created (``os.statvfs``) and reserved with ``posix_fallocate``, so a ``/dev/shm`` that is too small fails at
start-up (``expected_bytes``) or at ATTACH, never in the middle of a run. The segments of a killed process are
orphaned; the next snapshot process of the same job removes them (:func:`remove_segments`).

Segments are found per job exactly: a file name is parsed (:func:`parse_segment_name`) and its job compared whole,
never matched by prefix, so job ``X`` never takes job ``X-r5``'s segments for its own (a glob of
``regrow-snap-X-r*-s*`` matched both). Job ids are checked (:func:`check_job`): letters, digits, ``-`` and ``_``,
starting with a letter or digit, at most :data:`MAX_JOB` characters, not ending in what looks like a segment
suffix (``-r<digits>-s<digits>``), so every name parses one way only and reads one way only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from regrow.checkpoint.snapshot import segment as seg

PREFIX = "regrow-snap-"
MAX_JOB = 64
"""Longest job id, in characters (segment names stay far below the 255 bytes of a file name)."""
_JOB = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_JOB - 1}}}")
_SUFFIX = re.compile(r"-r(0|[1-9][0-9]*)-s(0|[1-9][0-9]*)")
_SEGMENT = re.compile(rf"{PREFIX}(?P<job>.+){_SUFFIX.pattern}")
_LOOKS_LIKE_SUFFIX = re.compile(r"-r[0-9]+-s[0-9]+$")


class ShmSpaceError(RuntimeError):
    """The shared-memory filesystem cannot hold the requested snapshots."""


def check_job(job: str) -> None:
    """Raises ValueError unless ``job`` is a valid job id (the module docstring says which)."""
    if not isinstance(job, str) or not _JOB.fullmatch(job) or _LOOKS_LIKE_SUFFIX.search(job):
        raise ValueError(f"job id {job!r} must be 1 to {MAX_JOB} letters, digits, '-' and '_', start with a letter or "
                         f"digit, and not end in -r<digits>-s<digits> (a segment name's suffix)")


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
    return str(Path(shm_dir) / f"{PREFIX}{job}-r{rank}-s{slot}")


def parse_segment_name(name: str) -> tuple[str, int, int] | None:
    """``(job, rank, slot)`` of a segment file name, or None for a name that is not one. The split is unique: the
    name ends in exactly one ``-r<rank>-s<slot>`` (no leading zeros), and the job is all that precedes it."""
    found = _SEGMENT.fullmatch(name)
    if found is None:
        return None
    return found["job"], int(found[2]), int(found[3])


def job_segments(shm_dir: str, job: str) -> list[Path]:
    """Every segment file of exactly job ``job`` under ``shm_dir`` (never one of a job whose id ``job`` prefixes)."""
    found = []
    for path in Path(shm_dir).glob(f"{PREFIX}{job}-r*-s*"):
        parsed = parse_segment_name(path.name)
        if parsed is not None and parsed[0] == job:
            found.append(path)
    return sorted(found)


def create_segment(shm_dir: str, job: str, *, rank: int, slot: int, size: int, meta_capacity: int) -> str:
    """Creates ``rank``'s segment ``slot`` (it must not exist) of ``size`` bytes, its space reserved, formatted
    empty (no snapshot); returns its path. The header fields are checked before the file exists (ValueError naming
    the field), and a file whose reservation or formatting fails is removed again. Raises :class:`ShmSpaceError`
    when the space cannot be reserved."""
    seg.check_header_fields(rank=rank, slot=slot, meta_capacity=meta_capacity)
    path = segment_path(shm_dir, job, rank, slot)
    # 0600: the snapshots are the job's training state; only the job's user may map them.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            # Reserves the pages now: a full tmpfs fails here with ENOSPC instead of SIGBUS in a rank later.
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        buffer = seg.open_segment(path, writable=True)
        try:
            seg.format_empty(buffer, rank=rank, slot=slot, meta_capacity=meta_capacity)
        finally:
            buffer.close()
    except OSError as error:
        os.unlink(path)
        raise ShmSpaceError(f"cannot reserve {size} bytes in {shm_dir}: {error}") from error
    except BaseException:
        os.unlink(path)
        raise
    return path


def write_segment(path: str, data: bytes) -> None:
    """Writes ``data`` (a segment prefix: header, metadata and payload) at the start of the segment ``path``."""
    buffer = seg.open_segment(path, writable=True)
    try:
        buffer[: len(data)] = data
    finally:
        buffer.close()


def remove_segments(shm_dir: str, job: str) -> int:
    """Removes every segment of exactly snapshot process job ``job`` under ``shm_dir`` (:func:`job_segments`);
    returns how many there were. Call it only while holding the job's lock (``job_lock.JobLock``): a live process
    of the job owns them otherwise."""
    found = job_segments(shm_dir, job)
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)
