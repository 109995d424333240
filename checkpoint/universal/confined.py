"""Opening the files of a checkpoint directory without ever leaving it: the only way the readers open anything there.

A checkpoint directory is trusted to hold its owner's files and nothing more: any file in it may be damaged or
hostile (docs/checkpoint-format.md, "Trust model"). So every name a reader opens

1. is a plain relative path (:func:`is_plain_path`: not absolute, no ``.`` or ``..`` component, no empty
   component, no NUL or other unprintable character, at most :data:`MAX_NAME_BYTES` bytes of UTF-8);
2. is opened one component at a time relative to the directory, each with ``O_NOFOLLOW``: a symbolic link
   anywhere on the way (a data file, a ``params/<name>`` folder) is refused, never followed out of the directory;
3. is opened with ``O_NONBLOCK`` (opening a FIFO returns at once instead of waiting for a writer) and kept only
   when ``fstat`` says it is a regular file: FIFOs, sockets, devices and directories are refused;
4. is read only up to a size the caller bounds first (:func:`read_small`), so a file cannot cost unbounded memory.

The directory itself is opened as given (the caller chose it; listing a root skips linked ``step_*`` entries).
Every refusal is a :class:`Refused`, a :class:`CorruptCheckpoint` that names the file and the reason, so a loader
treats it like any other damage: skip the checkpoint and fall back.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from regrow.checkpoint.universal.format import CorruptCheckpoint

MAX_NAME_BYTES = 4096
"""Longest file name (UTF-8 bytes, all components) a manifest may give."""

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
ONLY_REGULAR = "a checkpoint holds regular files only"

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


class Refused(CorruptCheckpoint):
    """A file of a checkpoint directory that is missing or must not be opened; ``name`` is the offending path
    (relative to the directory) and ``reason`` why."""

    def __init__(self, where: str, name: str, reason: str, *, missing: bool = False) -> None:
        super().__init__(where, [f"{name}: {reason}"])
        self.name, self.reason, self.missing = name, reason, missing


def is_plain_path(name: object) -> bool:
    """True for a relative path that stays inside its directory as written: ``a/b.bin`` yes; ``/a``, ``../a``,
    ``a/../b``, ``./a``, ``a//b``, ``a/`` and anything holding NUL, other unprintable characters (a name is
    printed in reports) or unencodable ones no."""
    if not isinstance(name, str) or not name or not name.isprintable():
        return False
    try:
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            return False
    except UnicodeEncodeError:  # a lone surrogate from JSON's "\ud800"
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def kind_of(mode: int) -> str:
    """What an ``st_mode`` is, in words: ``a symbolic link``, ``a FIFO``, ``a directory``, ..."""
    return next((text for test, text in _KINDS if test(mode)), "not a regular file")


def _refusal(where: str, name: str, error: OSError, parent: int, component: str) -> Refused:
    """The refusal for a failed open of ``component`` (under directory fd ``parent``), described by what it is."""
    if error.errno == errno.ENOENT:
        return Refused(where, name, "missing", missing=True)
    if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR):
        try:
            mode = os.stat(component, dir_fd=parent, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode):  # a file where the path needs a directory
            return Refused(where, name, "is a file, not a directory")
        if mode:
            return Refused(where, name, f"is {kind_of(mode)}; {ONLY_REGULAR}")
    return Refused(where, name, f"cannot be opened ({os.strerror(error.errno or 0)})")


@contextmanager
def open_regular(directory: Path, name: str) -> Iterator[tuple[int, int]]:
    """Opens ``directory/name`` under the rules of the module docstring; yields ``(fd, size in bytes)`` and closes
    the descriptor afterwards. Raises :class:`Refused` (missing, not plain, a link, not a regular file, unreadable)."""
    where = str(directory)
    if not is_plain_path(name):
        raise Refused(where, repr(name), "is not a plain relative path inside the checkpoint")
    try:
        current = os.open(directory, _OPEN_DIR)
    except OSError as error:
        missing = error.errno == errno.ENOENT
        reason = "missing" if missing else f"is in a directory that cannot be opened ({os.strerror(error.errno or 0)})"
        raise Refused(where, name, reason, missing=missing) from None
    parts = name.split("/")
    try:
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            shown = "/".join(parts[: depth + 1])
            try:
                fd = os.open(part, _OPEN_FILE if last else _OPEN_DIR | os.O_NOFOLLOW, dir_fd=current)
            except OSError as error:
                raise _refusal(where, shown, error, current, part) from None
            os.close(current)
            current = fd
        info = os.fstat(current)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(where, name, f"is {kind_of(info.st_mode)}; {ONLY_REGULAR}")
        yield current, info.st_size
    finally:
        os.close(current)


def pread_exact(fd: int, view: memoryview, offset: int) -> int:
    """Fills ``view`` from ``offset`` of ``fd``; returns the bytes read (fewer only where the file ends)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def read_small(directory: Path, name: str, limit: int) -> bytes:
    """All of the regular file ``directory/name``, refused (:class:`Refused`) when it is larger than ``limit``
    bytes: the size is checked before a byte is read, and no more than it is read."""
    with open_regular(directory, name) as (fd, size):
        if size > limit:
            raise Refused(str(directory), name, f"is {size} bytes, more than the {limit} bytes such a file may hold")
        data = bytearray(size)
        got = pread_exact(fd, memoryview(data), 0)
    if got != size:
        raise Refused(str(directory), name, f"shrank from {size} to {got} bytes while it was read")
    return bytes(data)


__all__ = ["MAX_NAME_BYTES", "Refused", "is_plain_path", "kind_of", "open_regular", "pread_exact", "read_small"]
