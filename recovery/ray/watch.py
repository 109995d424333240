"""Watching a generation train until a failure. A failure is a worker's training call failing with an actor death
(Ray reports it at once: the process died, or its node was removed), a training call that reports a failed step (a
survivor that saw a peer's failure in a collective), or a heartbeat (``Worker.heartbeat``, on the control thread)
older than ``hang_timeout_s`` (a hung rank: it is killed and treated as dead), or a training call that names ranks
to replace (``recovery.eviction.RankEviction``: a failed state parity check, a straggler; they are killed once
every call is back). After the first failure the survivors' communicators are aborted out of band and their
training calls awaited; the watch returns the dead ranks."""

from __future__ import annotations

import time

from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.job import JobState, Outcome
from regrow.recovery.ray.stop import StopRequest
from regrow.recovery.ray.worker import WorkerSpec
from regrow.recovery.ray.workers import Workers


class Watch:
    """Runs and watches the training calls of ``job``'s ranks; ``workers`` launches a dead rank's replacement as
    soon as its death is known."""

    def __init__(self, *, config: CoordinatorConfig, spec: WorkerSpec, job: JobState, workers: Workers,
                 events: EventLog, stop: StopRequest) -> None:
        import ray

        self._ray = ray
        self._config = config
        self._spec = spec
        self._job = job
        self._workers = workers
        self._events = events
        self._stop = stop

    def train_until(self, steps: int, outcome: Outcome) -> list[int] | None:
        """Runs the training calls to step ``steps`` and watches them (polling every ``heartbeat_every_s``;
        rank 0's finished steps go to ``outcome.history``); returns None when every call finished, else the ranks
        whose workers died (empty when a call failed with every worker alive: the job is healed all the same)."""
        pending = {rank.train(steps): index for index, rank in enumerate(self._job.ranks)}
        while pending:
            self._stop.check()
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=self._config.heartbeat_every_s)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    result = self._ray.get(ref)
                except self._ray.exceptions.RayActorError as error:
                    self._events.event("failure_detected", rank=index, how="actor died",
                                       detail=str(error).splitlines()[0])
                    return self._collect_failed(pending, {index}, outcome)
                self._log_stragglers(result)
                if index == 0:
                    outcome.history += [tuple(item) for item in result["done"]]
                if result["error"] is not None:
                    evicted = result.get("evict") or []
                    how = f"ranks {evicted} named for replacement" if evicted else "its training step failed"
                    self._events.event("failure_detected", rank=index, how=how, detail=result["error"])
                    if result.get("fatal"):  # e.g. an entry point that does not import there: no rerun can help
                        raise CoordinatorError(f"rank {index}: {result['error']}")
                    return self._collect_failed(pending, set(), outcome, evict=set(evicted))
            hung = self._hung(pending)
            if hung:
                for index in hung:
                    self._events.event("failure_detected", rank=index,
                                       how=f"no step for {self._config.hang_timeout_s} s")
                    self._ray.kill(self._job.ranks[index].handle)
                return self._collect_failed(pending, set(hung), outcome)
        return None

    def _hung(self, pending: dict) -> list[int]:
        """Ranks still training whose last step is older than ``hang_timeout_s``."""
        if not pending:
            return []
        beats = {index: self._job.ranks[index].heartbeat() for index in pending.values()}
        hung = []
        for index, ref in beats.items():
            try:
                beat = self._ray.get(ref, timeout=5.0)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
                continue  # a dead actor shows in its training call; a busy control thread is not a hang
            self._log_stragglers(beat)
            if beat["seconds_since"] > self._config.hang_timeout_s:
                hung.append(index)
        return hung

    def _log_stragglers(self, report: dict) -> None:
        """An event for every straggler a worker's monitor named (``report``: its heartbeat or training result)."""
        for straggler in report.get("stragglers") or []:
            self._events.event("straggler", **straggler)

    def _collect_failed(self, pending: dict, dead: set[int], outcome: Outcome, evict: set[int] = frozenset()
                        ) -> list[int]:
        """After a first failure: aborts the survivors, waits for their training calls (keeping rank 0's finished
        steps in the history), kills the ranks named for replacement (``evict``, and any a training call names:
        they flushed their snapshot before returning) and returns every rank whose actor is dead."""
        evict = set(evict)
        started = time.monotonic()
        if not self._config.elastic_wait_s:  # elastic mode may go on without them: the healing decides
            self._workers.launch_early(dead)
        ranks = self._job.ranks
        for index in [index for index in range(len(ranks)) if index not in dead]:
            try:
                ranks[index].abort("a peer failed")
            except self._ray.exceptions.RayActorError:
                dead.add(index)
        unwind: dict[str, dict] = {}  # per survivor: how its training call came back (Worker.train)
        errors: dict[str, str] = {}  # and with what error: the first one read is not always the cause
        for ref, index in pending.items():
            try:
                result = self._ray.get(ref, timeout=self._spec.timeout_s)  # a survivor reports its failed step
                if index == 0:
                    outcome.history += [tuple(item) for item in result["done"]]
                if result.get("unwind"):
                    unwind[str(index)] = result["unwind"]
                if result["error"] is not None:
                    errors[str(index)] = result["error"]
                evict.update(result.get("evict") or [])
            except self._ray.exceptions.RayActorError:
                dead.add(index)
            except self._ray.exceptions.GetTimeoutError:
                pass  # still unwinding: its liveness is checked below
        for index in sorted(evict - dead):
            self._events.event("evicted", rank=index, node=ranks[index].node)
            self._ray.kill(ranks[index].handle)
            dead.add(index)
        for index in range(len(ranks)):
            if index not in dead and not ranks[index].alive():
                dead.add(index)
        self._events.event("survivors_aborted", dead=sorted(dead), seconds=round(time.monotonic() - started, 3),
                           unwind=unwind, errors=errors)
        return sorted(dead)
