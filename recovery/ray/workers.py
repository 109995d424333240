"""The ranks' worker actors from start to end: started all at once and waited for until placed, a dead rank's
replacement launched as soon as its death is known (on its node while that node lives, taken over by the node's
standby when one is ready), and stopped with their sinks closed when the run ends."""

from __future__ import annotations

import time

from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.job import JobState, Rank
from regrow.recovery.ray.placement import Placement, alive_nodes
from regrow.recovery.ray.standbys import Standbys
from regrow.recovery.ray.stop import Stopped, StopRequest
from regrow.recovery.ray.worker import CONTROL, TRAIN, WorkerSpec


class Workers:
    """Starts and stops the workers of ``job``'s ranks. ``worker_class``: the ``Worker`` actor class, made with
    ``ray.remote``; ``env``: the workers' environment."""

    def __init__(self, *, config: CoordinatorConfig, spec: WorkerSpec, env: dict[str, str], worker_class: object,
                 job: JobState, placement: Placement, standbys: Standbys, events: EventLog,
                 stop: StopRequest) -> None:
        import ray

        self._ray = ray
        self._config = config
        self._spec = spec
        self._env = env
        self._worker_class = worker_class
        self._job = job
        self._placement = placement
        self._standbys = standbys
        self._events = events
        self._stop = stop
        self._launched: dict[int, object] = {}  # rank -> a replacement launched at detection, not yet placed

    def start(self, ranks: dict[int, str | None], *, timeout_s: float | None = None) -> list[Rank]:
        """Starts a worker for each rank (on the node given, while it lives; None: anywhere), all at once, and
        waits until every one is placed (``timeout_s``, default ``resources_timeout_s``). In the order of
        ``ranks``. A rank whose replacement was launched when its failure was detected (:meth:`launch_early`)
        takes that one. On a timeout the workers not placed are killed and :class:`CoordinatorError` raised."""
        handles = {rank: self._launched.pop(rank, None) or self._launch(rank, node) for rank, node in ranks.items()}
        previous, started = self._job.ranks, []
        try:
            for rank, handle in handles.items():
                if not self._standbys.adopted(rank, handle):  # a standby that could not take the rank: a new worker
                    handle = handles[rank] = self._launch(rank, ranks[rank])
                placed = self._wait_ready(handle, f"worker of rank {rank}", timeout_s)
                self._events.event("worker_started", rank=rank, node=placed["node"])
                # An adopting standby was given no GPU by Ray: it trains on its predecessor's.
                gpus = tuple(placed["gpus"]) or (previous[rank].gpus if rank < len(previous) else ())
                started.append(Rank(handle=handle, node=placed["node"], gpus=gpus))
        except (CoordinatorError, Stopped):
            for handle in handles.values():
                self._ray.kill(handle)
            raise
        return started

    def launch_early(self, dead: set[int]) -> None:
        """Launches the replacements of ranks found dead, before the survivors are aborted: a new actor's process
        start and imports (seconds on a GPU host) then overlap the abort. On the dead rank's node: its standby when
        one is ready there, else a new worker (a soft affinity: elsewhere when the node is gone); :meth:`start`
        waits for them."""
        alive = alive_nodes() if self._standbys.any_started() else set()
        for index in sorted(dead):
            if index not in self._launched:
                lost = self._job.ranks[index]
                handle = self._standbys.take_over(index, lost.node, lost.gpus) if lost.node in alive else None
                self._launched[index] = handle if handle is not None else self._launch(index, lost.node)

    def stop(self) -> None:
        """Kills the replacements launched but never used (the job gave up), then stops every rank's worker: all at
        once, since closing a sink may be collective (a checkpoint writer agreeing on its last save) and a rank
        asked alone would wait for the others. While a worker is still inside a training call (a stop, an error in
        the coordinator) every worker is killed at once: its shutdown would queue behind that call."""
        for handle in self._launched.values():
            self._ray.kill(handle)
        self._launched.clear()
        ranks = self._job.ranks
        training = [rank.call for rank in ranks if rank.call is not None]
        finished = self._ray.wait(training, num_returns=len(training), timeout=0)[0] if training else []
        busy = len(finished) < len(training)
        stops = [] if busy else [rank.handle.shutdown.options(concurrency_group=TRAIN).remote() for rank in ranks]
        for ref in stops:
            try:
                self._ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 (a dead or stuck worker: killed below anyway)
                pass
        for rank in ranks:
            self._ray.kill(rank.handle)

    def _launch(self, rank: int, node: str | None) -> object:
        """A new worker actor for ``rank`` (not waited for), claiming the resources a placeholder held for it."""
        options = self._placement.worker_options(rank, node)
        self._standbys.free(rank)
        return self._worker_class.options(**options).remote(self._spec, rank, self._env)

    def _wait_ready(self, handle: object, what: str, timeout_s: float | None = None) -> dict:
        """The placement of a new actor (``Worker.placement``), waiting for its resources (a message every 10 s, an
        error at the timeout)."""
        ref = handle.placement.options(concurrency_group=CONTROL).remote()
        limit = self._config.resources_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        next_message = time.monotonic() + 10.0
        while True:
            self._stop.check()
            ready, _ = self._ray.wait([ref], timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            if ready:
                return self._ray.get(ref)
            if time.monotonic() > deadline:
                raise CoordinatorError(f"{what}: no node offered {self._config.cpus_per_worker} CPUs and "
                                       f"{self._config.gpus_per_worker} GPUs within {limit} s (add nodes, or lower "
                                       f"--workers)")
            if time.monotonic() < next_message:
                continue
            next_message = time.monotonic() + 10.0
            self._events.message(f"{what}: waiting for resources ({self._config.cpus_per_worker} CPUs, "
                                 f"{self._config.gpus_per_worker} GPUs)")
