"""Ending a coordinated run early: :meth:`StopRequest.request` from any thread; the run's loops call
:meth:`StopRequest.check` at each poll, which raises :class:`Stopped` once a stop was requested."""

from __future__ import annotations

import threading


class Stopped(Exception):
    """Raised by :meth:`StopRequest.check` once a stop was requested; ``Coordinator.run`` ends on it."""


class StopRequest:
    """A request to stop a run, with its reason. Thread-safe."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._reason = ""

    @property
    def reason(self) -> str:
        """Why the stop was requested ("" until it was)."""
        return self._reason

    def request(self, reason: str) -> None:
        self._reason = reason
        self._requested.set()

    def check(self) -> None:
        """Raises :class:`Stopped` if a stop was requested."""
        if self._requested.is_set():
            raise Stopped()
