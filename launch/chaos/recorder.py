"""The launcher's record of a run under a fault plan: each attempt, how it failed, what healing the nodes did, and,
at the end, what the ranks left in the run directory (fired faults, heartbeats, restore results).

:class:`Recorder` is the observer the local launcher's attempt loop (``launch/local/attempts.py``) is given; the
report (``report.py``) reads it.
"""

from __future__ import annotations

import dataclasses
import signal
import time

from regrow.launch.chaos import records
from regrow.launch.chaos.plan import Fault
from regrow.launch.local.nodes import HealReport
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.local.watchdog import RankHung, read_beats


@dataclasses.dataclass
class Attempt:
    """One attempt of the local launcher, as it saw it."""

    index: int
    started: float
    ended: float = 0.0
    failure: dict | None = None
    """``{"reason", "last_line", "detected_by", "exitcodes", "time"}`` when the attempt failed."""
    heal: dict | None = None
    """What healing the nodes before the next attempt did (``HealReport`` as a dict)."""


class Recorder:
    """The launcher's record of one run under ``plan`` (attempts are numbered from 0 here, from 1 in the report
    and the launcher's log). Satisfies ``launch.local.attempts.AttemptObserver``: the attempt loop calls
    :meth:`begin`, :meth:`failed`, :meth:`healed` and :meth:`finished` around the attempts and :meth:`collect`
    before its run directory is removed."""

    def __init__(self, plan: list[Fault]) -> None:
        self.plan = plan
        self.attempts: list[Attempt] = []
        self.fired: dict[int, dict] = {}
        self.details: dict[int, dict] = {}
        self.beats: dict[int, dict[int, dict]] = {}
        self.restores: dict[int, dict[int, dict]] = {}
        self.stragglers: list[dict] = []
        self.parity_failures: list[dict] = []
        self.started = time.time()
        self.ended = 0.0

    def begin(self, attempt: int) -> None:
        self.attempts.append(Attempt(index=attempt, started=time.time()))

    def finished(self, attempt: int) -> None:
        self.attempts[-1].ended = time.time()

    def failed(self, attempt: int, error: WorkerFailed) -> None:
        now = time.time()
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        self.attempts[-1].ended = now
        self.attempts[-1].failure = {"reason": lines[0] if lines else type(error).__name__,
                                     "last_line": lines[-1] if len(lines) > 1 else "",
                                     "detected_by": detection(error), "exitcodes": dict(error.exitcodes),
                                     "time": now}

    def healed(self, attempt: int, report: HealReport | None) -> None:
        if report is not None:
            self.attempts[-1].heal = dataclasses.asdict(report)

    def collect(self, run_dir: str) -> None:
        """Reads what the ranks wrote (call before ``run_dir`` is removed; it is also the fired-records
        directory of the plan)."""
        self.ended = time.time()
        self.fired = records.fired_records(run_dir)
        self.details = records.details(run_dir)
        self.beats = read_beats(run_dir)
        self.restores = records.restores(run_dir)
        self.stragglers = records.stragglers(run_dir)
        self.parity_failures = records.parity_failures(run_dir)
        for record in self.fired.values():
            if "attempt" not in record and "time" in record:  # a snapshot process's: it outlives the attempts
                record["attempt"] = self.attempt_at(record["time"])

    def attempt_at(self, when: float) -> int | None:
        """The attempt that was running at wall time ``when`` (the last one started by then; None: before the
        first)."""
        started = [attempt.index for attempt in self.attempts if attempt.started <= when]
        return started[-1] if started else None


def detection(error: WorkerFailed) -> str:
    """How the launcher noticed the failure, in words."""
    if isinstance(error, RankHung):
        return f"no progress for {error.stalled_s:.1f} s (watchdog, --hang-timeout): rank(s) {error.ranks}"
    killed = {rank: code for rank, code in error.exitcodes.items() if code < 0}
    if killed:
        parts = []
        for rank, code in sorted(killed.items()):
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            parts.append(f"rank {rank} killed by {name} (exit code {code})")
        return "process exit: " + ", ".join(parts)
    failed = {rank: code for rank, code in error.exitcodes.items() if code}
    if failed:
        return "process exit: " + ", ".join(f"rank {r} exit code {c}" for r, c in sorted(failed.items()))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return f"rank error: {lines[0].rstrip(':')}" + (f" {lines[-1]}" if len(lines) > 1 else "")
