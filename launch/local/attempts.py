"""The local launcher's attempts: run the ranks, and after a failure heal the nodes and run them again, up to
``max_restarts`` times, as torchrun's agent would.

:func:`run_attempts` is given what it needs through its parameters: the rank entry function and the work every rank
runs (which says what the attempt after a failure runs: :class:`Restartable`), the nodes' snapshot processes to heal
between attempts, and an :class:`AttemptObserver` (the fault report's recorder) told about every attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

from regrow.comm.world import World
from regrow.launch.local.nodes import HealReport, LocalNodes
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.launch.local.warm import WarmPool
from regrow.launch.local.watchdog import Watchdog

ATTEMPT_ENV = "REGROW_ATTEMPT"
"""The launcher's attempt number (0 first, 1 after the first restart, ...), in every rank's environment."""
RUN_DIR_ENV = "REGROW_RUN_DIR"
"""The launcher's run directory, where ranks write heartbeats and restore results (set when they are wanted)."""


class Restartable(Protocol):
    """The work every rank of an attempt is given (picklable: it is sent to each spawned rank)."""

    def after_failure(self) -> Self:
        """The work of the attempt after a failed one (e.g. resuming from what the failed one saved); called once
        the nodes are healed, when no rank runs."""
        ...

    def warm_up(self, local_rank: int) -> None:
        """What a standby process for ``local_rank`` does before it is needed (``warm_restarts``): imports, its
        device's CUDA context, and the like. Runs alongside the attempt before it."""
        ...


class AttemptObserver(Protocol):
    """Told about every attempt (e.g. the fault report's recorder); attempts are numbered from 0."""

    def begin(self, attempt: int) -> None:
        """The attempt's ranks are about to start."""

    def finished(self, attempt: int) -> None:
        """Every rank of the attempt returned."""

    def failed(self, attempt: int, error: WorkerFailed) -> None:
        """The attempt failed with ``error`` (a rank died, raised, or hung: ``watchdog.RankHung``)."""

    def healed(self, attempt: int, report: HealReport | None) -> None:
        """What healing the nodes after failed ``attempt`` did (None: no nodes to heal)."""

    def collect(self, run_dir: str) -> None:
        """The run is over; read what the ranks wrote in ``run_dir`` before it is removed."""


@dataclass(kw_only=True)
class AttemptsConfig:
    """How the local launcher runs each attempt."""

    nproc: int
    """Ranks, one local process each."""
    backend: str
    """The process-group backend (``run_local``'s)."""
    timeout_s: float
    """Seconds an attempt may take before it is aborted."""
    max_restarts: int
    """Attempts after the first one failed (0: a failure ends the run)."""
    hang_timeout_s: float
    """Kill and restart the job when a running rank makes no progress for this long (0: no watchdog)."""
    warm_restarts: bool = False
    """Keep a warm standby process per rank (``warm.WarmPool``) for the next attempt, started while the current one
    runs, so a restart skips the interpreter's start, the imports and the CUDA context."""


W = TypeVar("W", bound=Restartable)
T = TypeVar("T")


def run_attempts(entry: Callable[[World, W], T], work: W, config: AttemptsConfig, *, run_dir: str,
                 env: dict[str, str], nodes: LocalNodes | None = None,
                 observer: AttemptObserver | None = None) -> T:
    """Calls ``entry(world, work)`` on ``config.nproc`` new processes until an attempt succeeds; returns rank 0's
    result. ``env`` goes to every rank, with :data:`ATTEMPT_ENV` and, when there is an ``observer`` or a
    watchdog, :data:`RUN_DIR_ENV` (the ranks write heartbeats and restore results into ``run_dir``; the
    ``observer`` reads them after the last attempt). Raises the last :class:`WorkerFailed` once ``max_restarts``
    restarts are spent."""
    env = dict(env)
    if observer is not None or config.hang_timeout_s > 0:
        env[RUN_DIR_ENV] = run_dir
    attempt = 0
    standby: WarmPool | None = None
    try:
        while True:
            watchdog = Watchdog(run_dir, attempt=attempt, world_size=config.nproc,
                                timeout_s=config.hang_timeout_s) if config.hang_timeout_s > 0 else None
            if observer is not None:
                observer.begin(attempt)
            current, standby = standby, None
            if config.warm_restarts and attempt < config.max_restarts:
                # Warmed up while this attempt runs; takes over the next one if this one fails.
                standby = WarmPool(config.nproc, getattr(work, "warm_up", None))
            try:
                result = run_local(entry, config.nproc, work, backend=config.backend, timeout_s=config.timeout_s,
                                   env={**env, ATTEMPT_ENV: str(attempt)},
                                   rank_envs=nodes.rank_envs() if nodes else None, watchdog=watchdog,
                                   standby=current)[0]
                if observer is not None:
                    observer.finished(attempt)
                return result
            except WorkerFailed as error:
                if observer is not None:
                    observer.failed(attempt, error)
                if attempt >= config.max_restarts:
                    raise
                attempt += 1
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
                print(f"[launcher] attempt {attempt} failed ({reason}); restart {attempt} of "
                      f"{config.max_restarts}", flush=True)
                heal = nodes.heal() if nodes is not None else None
                work = work.after_failure()
                if observer is not None:
                    observer.healed(attempt - 1, heal)
    finally:
        if standby is not None:
            standby.close()
        if observer is not None:
            observer.collect(run_dir)
