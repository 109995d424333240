"""The snapshot process's log lines: ``[rank r, step s] snapshot process: ...`` for a rank's events,
``[snapshot process] ...`` for the process's own (printed and flushed, so the launcher forwards them whole)."""

from __future__ import annotations

import threading
import time


def log(text: str, *, rank: int | None = None, step: int | None = None) -> None:
    """``[rank r, step s] snapshot process: ...`` for a rank's events, ``[snapshot process] ...`` otherwise."""
    prefix = f"[rank {rank}, step {step if step is not None else '-'}]" if rank is not None else "[snapshot process]"
    print(f"{prefix} snapshot process: {text}" if rank is not None else f"{prefix} {text}", flush=True)


def ec_log(text: str) -> None:
    """``[snapshot process] erasure coding: ...``: the lines of the coding thread, its ops and rebuilds."""
    log(f"erasure coding: {text}")


class Throttled:
    """Log lines of one kind, at most one per ``every_s`` seconds; the next line printed counts those dropped. For
    what an unauthenticated peer can cause (refused connections): it must not be able to flood the log.
    Thread-safe."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last = -every_s
        self._dropped = 0

    def log(self, text: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._dropped += 1
                return
            dropped, self._dropped, self._last = self._dropped, 0, now
        log(f"{text} ({dropped} more like it not logged)" if dropped else text)
