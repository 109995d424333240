"""The coordinator's event log: each event goes out as a line of text, as a record to an ``on_event`` callback and
as a line of the events JSONL file, timed on one clock (seconds since the log was made, with the coordinator)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path


def _print(text: str) -> None:
    print(f"[coordinator] {text}", flush=True)


class EventLog:
    """Where a coordinator reports what happens. ``path``: the JSONL file every record is appended to (None: not
    written); ``log``: receives each event as a line of text, and the progress messages that are no events
    (default: printed with a ``[coordinator]`` prefix); ``on_event``: receives each event's record."""

    def __init__(self, *, path: str | None, log: Callable[[str], None] | None = None,
                 on_event: Callable[[dict], None] | None = None) -> None:
        self._started = time.monotonic()
        self._path = Path(path) if path else None
        self._log = log or _print
        self._on_event = on_event

    def elapsed(self) -> float:
        """Seconds since this log was made: the clock of the records' ``t``."""
        return time.monotonic() - self._started

    def event(self, name: str, **details: object) -> None:
        """Reports event ``name``: its record is ``{"t": seconds (ms), "event": name, **details}``."""
        record = {"t": round(time.monotonic() - self._started, 3), "event": name, **details}
        self._log(f"{name} " + " ".join(f"{k}={v}" for k, v in details.items()))
        if self._on_event is not None:
            self._on_event(record)
        if self._path is not None:
            with self._path.open("a") as out:
                out.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        """A progress message that is no event (e.g. still waiting for resources): to ``log`` only."""
        self._log(text)
