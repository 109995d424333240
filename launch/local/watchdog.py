"""Per-rank progress heartbeats and the local launcher's hang watchdog (``regrow train --hang-timeout SECONDS``).

A dead rank is easy to see (its process exits); a hung one is not: it is alive, and the other ranks wait for it in
a collective until the collective's own timeout (minutes). So every rank reports its progress through a small file
(:class:`Heartbeat`, a ``StateSink``: one beat when it starts training, one when it reaches each optimizer step, one
after each step), and the launcher's :class:`Watchdog`, polled by ``run_local`` about twice a second, raises
:class:`RankHung` once a running rank's beat has not changed for ``timeout_s``: ``run_local`` then kills every rank
and the launcher restarts the job as after a crash.

The rank blamed is the one furthest behind: a rank hung before its optimizer step never writes that step's
"optimizer" beat, while the others have written theirs and wait in its collectives. Beats are compared by the
launcher's own clock (when it saw the content change), so a rank's clock never matters; the wall times written in
the files are for the report (``launch/chaos/report.py``).

Files, one per rank and attempt, in the launcher's run directory: ``heartbeat-a<attempt>-r<rank>.json`` with
``{"step", "phase", "time", "start_step", "start_time"}``; ``phase`` is "start", "optimizer" or "done".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from regrow.launch.local.spawn import WorkerFailed
from regrow.trainer.state import ShardState

PHASES = ("start", "optimizer", "done")
_RANK_OF_PHASE = {"start": 2, "optimizer": 1, "done": 2}
"""Progress order inside a step: reaching step s's optimizer step (1) comes before finishing step s (2); "start"
at step s is a finished step s (a restore point)."""


def heartbeat_path(directory: str | Path, attempt: int, rank: int) -> Path:
    return Path(directory) / f"heartbeat-a{attempt}-r{rank}.json"


def read_beat(path: Path) -> dict | None:
    """The beat in ``path`` (None: none yet, or caught mid-replace)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_beats(directory: str | Path) -> dict[int, dict[int, dict]]:
    """Attempt -> rank -> that rank's last beat, of every heartbeat file in ``directory``."""
    beats: dict[int, dict[int, dict]] = {}
    for path in Path(directory).glob("heartbeat-a*-r*.json"):
        _, attempt, rank = path.stem.split("-")
        beat = read_beat(path)
        if beat is not None:
            beats.setdefault(int(attempt[1:]), {})[int(rank[1:])] = beat
    return beats


class Heartbeat:
    """The rank side: writes this rank's progress (a ``StateSink``; list it LAST, so that its "optimizer" beat
    means every other sink, a fault injector included, let the step through). Construct it once the trainer is
    restored: the first beat records the step training starts from."""

    def __init__(self, directory: str, *, rank: int, attempt: int, step: int) -> None:
        self.path = heartbeat_path(directory, attempt, rank)
        self._temp = self.path.with_suffix(".tmp")
        self.step = step
        self.start = {"start_step": step, "start_time": time.time()}
        self._beat("start")

    def before_optimizer_step(self) -> None:
        self._beat("optimizer", self.step + 1)

    def after_step(self, state: ShardState) -> None:
        self.step = state.step
        self._beat("done")

    def close(self) -> None:
        pass

    def _beat(self, phase: str, step: int | None = None) -> None:
        record = {"step": self.step if step is None else step, "phase": phase, "time": time.time(), **self.start}
        self._temp.write_text(json.dumps(record))
        os.replace(self._temp, self.path)  # atomic: the launcher never reads half a beat


class RankHung(WorkerFailed):
    """A rank made no progress for the watchdog's timeout; ``ranks`` are the ones furthest behind."""

    def __init__(self, message: str, *, ranks: list[int], stalled_s: float, step: int) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.stalled_s = stalled_s
        self.step = step


@dataclass
class _Seen:
    content: str
    since: float


class Watchdog:
    """The launcher side, one per attempt: ``watchdog(pending_ranks)`` raises :class:`RankHung` when a running
    rank's beat is unchanged for ``timeout_s`` seconds. A rank that has not beaten yet (starting, restoring) is
    not watched: the run's deadline covers that."""

    def __init__(self, directory: str, *, attempt: int, world_size: int, timeout_s: float) -> None:
        self.paths = [heartbeat_path(directory, attempt, rank) for rank in range(world_size)]
        self.timeout_s = timeout_s
        self._seen: dict[int, _Seen] = {}

    def __call__(self, pending: list[int]) -> None:
        now = time.monotonic()
        beats: dict[int, dict] = {}
        for rank in pending:
            try:
                content = self.paths[rank].read_text()
            except OSError:
                continue
            seen = self._seen.get(rank)
            if seen is None or seen.content != content:
                self._seen[rank] = _Seen(content, now)
            try:
                beats[rank] = json.loads(content)
            except json.JSONDecodeError:
                continue
        stalled = {rank: now - self._seen[rank].since for rank in beats
                   if now - self._seen[rank].since > self.timeout_s}
        if not stalled:
            return
        progress = {rank: (beat["step"], _RANK_OF_PHASE.get(beat["phase"], 0)) for rank, beat in beats.items()}
        behind = min(progress.values())
        ranks = sorted(rank for rank, value in progress.items() if value == behind)
        step, phase = behind
        where = (f"after step {step}, before step {step + 1}'s optimizer step" if phase == 2
                 else f"in step {step}'s optimizer step")
        others = sorted(set(progress) - set(ranks))
        waiting = f"; ranks {others} are ahead, waiting in its collectives" if others else ""
        seconds = max(stalled.values())
        raise RankHung(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} made no progress for "
                       f"{seconds:.1f} s (--hang-timeout {self.timeout_s:g}), stuck {where}{waiting}",
                       ranks=ranks, stalled_s=seconds, step=step)
