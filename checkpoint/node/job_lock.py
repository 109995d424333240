"""One live snapshot process per job and node: an exclusive lock on ``<shm_dir>/regrow-snap-<job>.lock``.

The snapshot process takes the lock (``fcntl.flock``) before it touches any segment and holds it for its whole
life; the kernel drops it when the process dies, however it dies. A second process started with the same job while
the first lives fails at start-up with :class:`JobRunning`, naming the first one's pid (written into the lock file),
instead of removing the first one's live segments as its leftovers. Whoever removes a dead process's leftovers
(``SnapshotProcess.stop``) takes the lock first too (:meth:`JobLock.try_acquire`).

The file is removed when the lock is released cleanly; a killed process leaves it behind (a few bytes, reused by
the job's next process). A lock file replaced between its open and its lock (its holder released and removed it
meanwhile) is opened again, so two processes never both hold a lock on different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from regrow.checkpoint.node.shm import PREFIX


class JobRunning(RuntimeError):
    """Another snapshot process of the same job holds the job's lock on this node."""


def lock_path(shm_dir: str, job: str) -> str:
    """The lock file of job ``job`` (not a segment name: :func:`shm.parse_segment_name` never matches it)."""
    return str(Path(shm_dir) / f"{PREFIX}{job}.lock")


class JobLock:
    """The held lock of one job on this node; :meth:`release` once the job's segments are gone."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, shm_dir: str, job: str) -> JobLock:
        """Takes job ``job``'s lock and writes this process's pid into it; raises :class:`JobRunning` naming the
        holder when another process holds it, OSError (naming the file) when it cannot be opened as a regular
        file."""
        lock = cls.try_acquire(shm_dir, job)
        if lock is None:
            path = lock_path(shm_dir, job)
            pid = _holder_pid(path)
            raise JobRunning(f"snapshot process job {job} is already running on this node (pid {pid}; it holds "
                             f"{path}): stop it first (SHUTDOWN, or SIGTERM to pid {pid}), or start this one with "
                             f"another job id")
        os.ftruncate(lock._fd, 0)
        os.write(lock._fd, f"{os.getpid()}\n".encode())
        return lock

    @classmethod
    def try_acquire(cls, shm_dir: str, job: str) -> JobLock | None:
        """Job ``job``'s lock, or None while another process holds it."""
        path = lock_path(shm_dir, job)
        while True:
            fd = _open_regular(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                current = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                return cls(path, fd)
            os.close(fd)  # its holder removed the file between our open and our lock: that lock guards nothing

    def release(self) -> None:
        """Removes the lock file and drops the lock (removed first: a process waiting on the old file then sees it
        replaced and opens the new one). Idempotent."""
        if self._fd is None:
            return
        Path(self.path).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _open_regular(path: str, *, create: bool = True) -> int:
    """Opens (``create``: creating, mode 0600) the lock file ``path``; never follows a symlink, refuses anything
    but a regular file (OSError naming it)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as error:
        raise OSError(error.errno, f"cannot open the job lock {path}: {error.strerror} (remove it if it is not a "
                                   f"regular file left by a snapshot process)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"the job lock {path} is not a regular file: remove it")
    return fd


def _holder_pid(path: str) -> str:
    """The pid the lock's holder wrote into it ("unknown" if it has not yet, or the file cannot be read)."""
    try:
        fd = _open_regular(path, create=False)
    except OSError:
        return "unknown"
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return text if text.isdigit() else "unknown"
