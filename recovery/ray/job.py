"""The job in progress as the coordinator's parts share it: each rank's current worker (:class:`Rank`), the
process-group generation, the world size and the failures counted (:class:`JobState`), and what a run did
(:class:`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from regrow.recovery.ray.config import CoordinatorError
from regrow.recovery.ray.worker import CONTROL, TRAIN


@dataclass
class Rank:
    """The current worker actor of one rank."""

    handle: object
    node: str
    """The Ray node id it runs on."""
    gpus: tuple[str, ...] = ()
    """The GPU ids its worker trains on (an adopting standby's are those of the worker it replaced)."""
    call: object | None = None
    """The ObjectRef of its running ``train()`` call (None before the first)."""

    def train(self, steps: int) -> object:
        """Starts its training call to step ``steps``; returns the call's ObjectRef, also kept as :attr:`call`."""
        self.call = self.handle.train.options(concurrency_group=TRAIN).remote(steps)
        return self.call

    def heartbeat(self) -> object:
        """The ObjectRef of a ``heartbeat()`` call on its control thread (answered while it trains)."""
        return self.handle.heartbeat.options(concurrency_group=CONTROL).remote()

    def abort(self, why: str) -> None:
        """Asks it, on its control thread, to abort its communicators (not waited for)."""
        self.handle.abort.options(concurrency_group=CONTROL).remote(why)

    def alive(self) -> bool:
        """Whether it answers a heartbeat within 10 s."""
        import ray

        try:
            ray.get(self.heartbeat(), timeout=10.0)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False


@dataclass
class JobState:
    """The job as the coordinator's parts see it. The coordinator makes one and hands it to each part that reads or
    changes it; they change it through its methods."""

    world_size: int
    """Ranks of the current generation: ``CoordinatorConfig.workers``, fewer after an elastic shrink until the job
    grows back."""
    ranks: list[Rank] = field(default_factory=list)
    """Rank -> its current worker (empty until the run has started them)."""
    generation: int = 0
    """The process-group generation formed last (or forming)."""
    failures: int = 0
    """Failures counted so far, healed or being healed."""

    def nodes(self) -> list[str]:
        """The node of each rank's worker, in rank order."""
        return [rank.node for rank in self.ranks]

    def start(self, ranks: list[Rank]) -> None:
        """The first generation's workers."""
        self.ranks = ranks

    def replace(self, index: int, rank: Rank) -> None:
        """Rank ``index`` has a new worker."""
        self.ranks[index] = rank

    def shrink(self, ranks: list[Rank]) -> None:
        """The job goes on with ``ranks`` only, renumbered in their order."""
        self.ranks, self.world_size = ranks, len(ranks)

    def grow(self, ranks: list[Rank]) -> None:
        """The job goes on with ``ranks`` added after its current ones."""
        self.ranks = self.ranks + ranks
        self.world_size = len(self.ranks)

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def count_failure(self, max_restarts: int, cause: BaseException | None = None) -> None:
        """Counts one more failure; raises :class:`CoordinatorError` (from ``cause``) once more than
        ``max_restarts`` were counted."""
        self.failures += 1
        if self.failures > max_restarts:
            raise CoordinatorError(f"{self.failures} failures, more than max_restarts={max_restarts}: giving up"
                                   ) from cause


@dataclass
class Outcome:
    """What a coordinated run did."""

    steps: int
    """The step trained to (0 in entry-point mode: the function's steps are its own)."""
    failures: int
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of rank 0, the steps of the last attempt at each step."""
    restores: list[list[dict]] = field(default_factory=list)
    """Every rank's restore result, per healing."""
    resizes: list[dict] = field(default_factory=list)
    """Elastic mode: every change of the world size, in order: ``change`` ("shrunk" or "grown"), ``was``,
    ``world_size`` and ``step``, the checkpoint step the resized job restored."""
    parameters: dict | None = None
    """Rank 0's final model parameters (when :meth:`Coordinator.run` was asked for them)."""
    stopped: str | None = None
    """Why the run ended before ``steps`` when :meth:`Coordinator.stop` ended it (None: it reached ``steps``)."""
    stopped_at: int | None = None
    """The last step rank 0 finished when the run was stopped (``history`` lacks the steps of the training call
    the stop interrupted; None in entry-point mode)."""
    returns: list | None = None
    """Entry-point mode: each rank's return value (JSON values), from the generation in which the function returned
    on every rank."""
    calls: list[dict] = field(default_factory=list)
    """Entry-point mode: the calls of the function made by each rank's last worker (``EntryWorker.results``: rank,
    generation, error, seconds, and the JSON records the call left in its run directory); a worker lost on the way
    took its own with it."""
