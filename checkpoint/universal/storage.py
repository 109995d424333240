"""Durable file operations on a checkpoint root: atomic small files, the ``latest`` pointer, commit by rename,
listing, retention and clean-up of temporaries.

Durability rule used throughout: data is fsynced before the name that makes it visible is created (write a
temporary, fsync it, rename it, fsync the directory that holds the new name). A crash at any instant therefore
leaves either the old state or the new one, plus at worst a temporary that nothing reads and the next writer removes.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from regrow.checkpoint.universal import confined
from regrow.checkpoint.universal.format import LATEST_NAME, MANIFEST_NAME, TEMP_PREFIX, parse_step_dir_name

PWrite = Callable[[int, memoryview, int], int]
"""``os.pwrite``'s signature: (fd, data, offset) -> bytes written. The writer takes one so that tests (and exotic
storage) can substitute it."""


def fsync_dir(path: Path) -> None:
    """Makes the entries of directory ``path`` (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: memoryview, offset: int, pwrite: PWrite = os.pwrite) -> None:
    """Writes all of ``data`` at ``offset`` (``pwrite`` may write less than asked: loop until done)."""
    done = 0
    while done < len(data):
        written = pwrite(fd, data[done:], offset + done)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes at offset {offset + done}")
        done += written


def write_file_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replaces ``path`` with ``data`` atomically: readers see the old file or the new one, never a mix."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, memoryview(data), 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    if fsync:
        fsync_dir(path.parent)


def write_latest(root: Path, name: str, *, fsync: bool = True) -> None:
    """Points ``root/latest`` at checkpoint directory ``name`` (a small text file, replaced atomically)."""
    write_file_atomic(root / LATEST_NAME, (name + "\n").encode(), fsync=fsync)


MAX_LATEST_BYTES = 4096
"""Largest ``latest`` file read (it holds one directory name)."""


@dataclass(frozen=True)
class LatestPointer:
    """What ``root/latest`` says: the checkpoint directory it names (None when there is no usable pointer) and,
    when the file is there but cannot be used, why (a clause about it: ``it is a FIFO; ...``)."""

    name: str | None
    problem: str | None = None


def latest_pointer(root: Path) -> LatestPointer:
    """Reads ``root/latest`` without leaving ``root``: it must be a regular file (not a link, FIFO or device) of at
    most :data:`MAX_LATEST_BYTES` holding one ``step_*`` name (ASCII digits, no path separator, surrounding
    whitespace ignored) of a real directory of ``root`` (not a link). No file: no pointer and no problem."""
    try:
        raw = confined.read_small(root, LATEST_NAME, MAX_LATEST_BYTES)
    except confined.Refused as error:
        return LatestPointer(None, None if error.missing else f"it {error.reason}")
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if parse_step_dir_name(name) is None:
        return LatestPointer(None, "it does not name a step_* directory (it must hold one name such as "
                                   "step_00000123; rewrite it, or remove it to use the newest checkpoint)")
    try:
        mode = os.lstat(root / name).st_mode
    except FileNotFoundError:
        return LatestPointer(None, f"it names {name}, which does not exist")
    if not stat.S_ISDIR(mode):
        return LatestPointer(None, f"it names {name}, which is {confined.kind_of(mode)}, not a checkpoint "
                                   "directory of this root")
    return LatestPointer(name)


def read_latest(root: Path) -> str | None:
    """The directory name ``root/latest`` points at, or None when there is no usable pointer
    (:func:`latest_pointer` says why)."""
    return latest_pointer(root).name


def committed(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every committed checkpoint under ``root`` (a real ``step_*`` directory, not a link,
    holding a manifest entry), oldest first. Temporaries, links and anything else are ignored."""
    found = []
    if root.is_dir():
        with os.scandir(root) as entries:
            for entry in entries:
                step = parse_step_dir_name(entry.name)
                manifest = os.path.join(entry.path, MANIFEST_NAME)
                if step is not None and entry.is_dir(follow_symlinks=False) and os.path.lexists(manifest):
                    found.append((step, Path(entry.path)))
    return sorted(found)


def commit_dir(temp: Path, final: Path, *, fsync: bool = True) -> None:
    """Renames the finished ``temp`` to ``final`` (both in one root). An existing ``final`` (a checkpoint of the same
    step from an abandoned run) is moved aside first and removed after the rename."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{TEMP_PREFIX}replaced.{final.name}.{os.getpid()}")
        os.rename(final, aside)
    os.rename(temp, final)
    if fsync:
        fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clean_temporaries(root: Path, *, keep_suffix: str | None = None) -> list[Path]:
    """Removes leftover temporaries of ``root`` (from writers that crashed), except those ending in
    ``keep_suffix`` (the current session's). Returns what was removed."""
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and not (keep_suffix and entry.name.endswith(keep_suffix)):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def purge(root: Path, keep_last: int, *, protect: Iterable[Path] = ()) -> list[Path]:
    """Deletes committed checkpoints older than the newest ``keep_last``, never one in ``protect`` (the one just
    written, the one ``latest`` names). Returns what was deleted.

    Deletion renames the directory to a temporary first, so a crash mid-delete never leaves a half-deleted
    directory that still looks committed.
    """
    if keep_last < 1:
        raise ValueError(f"purge: keep_last={keep_last} must be >= 1")
    keep = {path.resolve() for path in protect}
    latest = read_latest(root)
    if latest:
        keep.add((root / latest).resolve())
    found = committed(root)
    deleted = []
    for _, path in found[: max(0, len(found) - keep_last)]:
        if path.resolve() in keep:
            continue
        doomed = path.with_name(f"{TEMP_PREFIX}purged.{path.name}.{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    return deleted
