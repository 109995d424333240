"""Healing the job after the watch found dead ranks: a replacement for every dead rank (on the same node while that
node lives, else anywhere), the snapshot process of every lost node moved and rebuilt, the next process-group
generation formed among survivors and replacements, and the job restored (the survivors keep their state, only the
replacements restore, unless the job must go back further). In elastic mode a replacement that finds no resources
in time is not waited for: the job shrinks instead (:meth:`Healer._shrink`), and grows back to its size at a
checkpoint boundary once resources return (:meth:`Healer.grow`)."""

from __future__ import annotations

import time

from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.generation import Generations
from regrow.recovery.ray.job import JobState, Outcome
from regrow.recovery.ray.placement import alive_nodes
from regrow.recovery.ray.snapshot_hosts import SnapshotHosts
from regrow.recovery.ray.stop import StopRequest
from regrow.recovery.ray.worker import TRAIN, WorkerSpec
from regrow.recovery.ray.workers import Workers


class Healer:
    """Heals ``job`` with its ``workers``, snapshot ``hosts`` and ``generations``."""

    def __init__(self, *, config: CoordinatorConfig, spec: WorkerSpec, job: JobState, workers: Workers,
                 hosts: SnapshotHosts, generations: Generations, events: EventLog, stop: StopRequest) -> None:
        import ray

        self._ray = ray
        self._config = config
        self._spec = spec
        self._job = job
        self._workers = workers
        self._hosts = hosts
        self._generations = generations
        self._events = events
        self._stop = stop

    def heal(self, dead: list[int], outcome: Outcome) -> None:
        """Replaces ``dead`` ranks (and lost nodes' snapshot processes), forms the next generation and restores
        (the restores go to ``outcome.restores``). A rank that dies while this runs (a failure during recovery) is
        replaced in another round, counted as one more failure. Raises :class:`CoordinatorError` when the job
        cannot go on."""
        started = time.monotonic()
        lost = set(dead)
        reshard, was = False, self._job.world_size
        while True:
            self._stop.check()
            alive = alive_nodes()
            wanted = {index: self._job.ranks[index].node if self._job.ranks[index].node in alive else None
                      for index in dead}
            elastic = self._config.elastic_wait_s or None
            if not elastic:  # ranks found dead after detection: their replacements (a standby, if one is ready)
                self._workers.launch_early(set(dead))
            try:
                for index, started_rank in zip(wanted, self._workers.start(wanted, timeout_s=elastic)):
                    self._job.replace(index, started_rank)
                    self._events.event("replaced", rank=index, node=started_rank.node,
                                       same_node=wanted[index] is not None)
            except CoordinatorError as error:
                if not elastic:
                    raise
                self._shrink(sorted(wanted), reason=str(error))
                reshard = True
            self._hosts.replace_lost(alive, self._job.nodes())
            generation = self._job.next_generation()
            try:
                self._generations.form(resume=True, outcome=outcome, lost=tuple(sorted(lost)), reshard=reshard)
                if reshard:
                    _record_resize(outcome, "shrunk", was, self._job.world_size)
                break
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError,
                    self._ray.exceptions.RayTaskError) as error:
                dead = [index for index, rank in enumerate(self._job.ranks) if not rank.alive()]
                lost.update(dead)
                self._events.event("failure_during_recovery", generation=generation, dead=dead,
                                   detail=str(error).splitlines()[0])
                self._job.count_failure(self._config.max_restarts, cause=error)
                if not dead:  # the others must leave the half-formed generation: abort them and form it again
                    for rank in self._job.ranks:
                        rank.abort("recovery failed")
        self._events.event("resumed", generation=self._job.generation, seconds=round(time.monotonic() - started, 3))

    def grow(self, outcome: Outcome) -> bool:
        """Elastic mode, at a checkpoint boundary of a job that shrank: when the cluster has room for the missing
        ranks again, starts their workers, settles every rank (its checkpoint of this step committed), and forms a
        generation at the configured size in which every rank restores that checkpoint resharded. Returns whether
        the job grew (False: no room yet, nothing changed). Raises like :meth:`heal` when the new generation
        cannot form."""
        missing = self._config.workers - self._job.world_size
        if missing <= 0 or not self._room_for(missing):
            return False
        was = self._job.world_size
        try:
            started = self._workers.start({index: None for index in range(was, self._config.workers)},
                                          timeout_s=self._config.elastic_wait_s)
        except CoordinatorError:
            return False  # the room went to something else meanwhile: the next boundary tries again
        settled = self._ray.get([rank.handle.settle.options(concurrency_group=TRAIN).remote()
                                 for rank in self._job.ranks], timeout=self._spec.timeout_s * 4)
        self._job.grow(started)
        self._hosts.restart(self._job.world_size, self._job.nodes())
        generation = self._job.next_generation()
        self._generations.form(resume=True, outcome=outcome, reshard=True)
        step = _record_resize(outcome, "grown", was, self._job.world_size)  # the settled step, unless its save failed
        self._events.event("grown", world_size=self._job.world_size, was=was, step=step,
                           stopped_at=settled[0]["step"], generation=generation,
                           nodes=[rank.node for rank in started])
        return True

    def _room_for(self, missing: int) -> bool:
        """Whether the cluster's free resources could hold ``missing`` more workers (a cheap look before any actor
        is started: a worker that cannot be placed is a pending actor until the timeout)."""
        free = self._ray.available_resources()
        need = {"CPU": self._config.cpus_per_worker * missing, "GPU": self._config.gpus_per_worker * missing}
        return all(free.get(key, 0.0) >= value for key, value in need.items() if value)

    def _shrink(self, dead: list[int], reason: str) -> None:
        """Elastic mode: goes on without ``dead``, on the largest number of survivors that divides the global
        batch (the others are stopped), renumbered in their old order; the snapshot processes start afresh (the
        snapshots were taken at the old layout). Raises :class:`CoordinatorError` below ``min_workers``."""
        survivors = [rank for index, rank in enumerate(self._job.ranks) if index not in dead]
        data = self._spec.config.data
        size = next((n for n in range(len(survivors), 0, -1) if data.global_batch % (n * data.micro_batch) == 0), 0)
        if size < self._config.min_workers:
            raise CoordinatorError(f"elastic mode: {len(survivors)} ranks survive, no count from "
                                   f"min_workers={self._config.min_workers} up divides the global batch "
                                   f"{data.global_batch} into micro-batches of {data.micro_batch} ({reason})")
        for rank in survivors[size:]:
            self._ray.kill(rank.handle)
        self._events.event("shrunk", world_size=size, was=self._job.world_size, dead=dead, reason=reason)
        self._job.shrink(survivors[:size])
        self._hosts.restart(size, self._job.nodes())


def _record_resize(outcome: Outcome, change: str, was: int, world_size: int) -> int:
    """Appends an elastic resize to ``outcome.resizes`` with the step the resized generation just restored (the last
    restore's); returns that step."""
    step = outcome.restores[-1][0]["step"]
    outcome.resizes.append({"change": change, "was": was, "world_size": world_size, "step": step})
    return step
