"""The Ray coordinator: runs one job on a Ray cluster, one ``Worker`` actor per rank and a snapshot process per Ray
node, and heals it after failures. :class:`Coordinator` is the entry point; its parts, each in its own module:

- ``placement.py``: where the actors go (a placement group with ``ranks_per_node``, node affinities, live nodes);
- ``workers.py``: the ranks' workers started, replaced (early, as soon as a death is known) and stopped;
  ``standbys.py``: standby workers that take over a lost rank on their node, and the placeholders that hold its
  resources meanwhile;
- ``snapshot_hosts.py``: the snapshot process per node, its erasure-coding group, its rebuild after a node loss;
- ``generation.py``: a process-group generation formed, and the job restored in it;
- ``watch.py``: the training calls watched (actor deaths, failed steps, hung ranks) and the survivors aborted;
- ``heal.py``: the dead ranks replaced and the next generation formed, or in elastic mode the job shrunk;
- ``job.py``: the state those parts share; ``events.py``: the event log; ``stop.py``: ending a run early;
  ``config.py``: :class:`CoordinatorConfig` and :class:`CoordinatorError`.

Healing, in order:

1. abort the survivors' communicators out of band (``Worker.abort`` on their control thread; NCCL needs it, gloo
   fails by itself once the dead peer's sockets close) and wait for their training calls to return;
2. start a replacement for every dead rank: on the same node while that node is alive, else anywhere;
3. replace the snapshot process of every lost node (a ``SnapshotHost`` actor pinned to the replacement's node),
   tell its erasure-coding group the new addresses and have it rebuild its ranks' snapshots from the group;
4. form the next process-group generation among survivors and replacements (a fresh store prefix);
5. the survivors keep their state (each goes back to the boundary of the step the failure interrupted) and only
   the replacements restore that step from their node's snapshot process; when that is impossible every rank
   restores the step the job agrees on (``restore_job``: snapshot slots, else erasure-coded buffers, else the
   universal checkpoint). In a pipeline job without snapshots the lost stage is rebuilt from its neighbours
   (``recovery.stage_heal``). Training resumes.

Elastic mode (``elastic_wait_s``): a replacement that finds no resources in time is not waited for; the job goes
on with fewer ranks, resharded from the latest universal checkpoint. While it runs short, it trains to each
checkpoint step (``WorkerSpec.ckpt_every``) and there looks for room for the missing ranks: once resources return
(a node rejoins the cluster) it grows back to ``workers`` ranks, every rank restoring that step's checkpoint
resharded, without a whole-job restart.

Entry-point mode (``WorkerSpec.entry``, :meth:`Coordinator.run_entry`): the workers run the user's function
(``entry_worker.py``) instead of regrow's trainer. Healing is the same up to step 4; then every rank, survivors
included, calls the function again from the top, and its Guard restores. The run ends when the function has
returned on every rank of one generation.

Everything that happens is appended to an events JSONL file (``events_path``), one object per line with the time
since start, the event and its details.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.entry_worker import EntryWorker
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.generation import Generations
from regrow.recovery.ray.heal import Healer
from regrow.recovery.ray.job import JobState, Outcome
from regrow.recovery.ray.placement import Placement
from regrow.recovery.ray.snapshot_hosts import SnapshotHost, SnapshotHosts
from regrow.recovery.ray.standbys import Placeholder, Standbys
from regrow.recovery.ray.stop import Stopped, StopRequest
from regrow.recovery.ray.watch import Watch
from regrow.recovery.ray.worker import CONCURRENCY_GROUPS, TRAIN, Worker, WorkerSpec
from regrow.recovery.ray.workers import Workers


class Coordinator:
    """Runs one job on the Ray cluster ``ray`` is connected to; see the module docstring. Use :meth:`run`.

    It can run in the driver or inside a Ray actor (``ray.remote(Coordinator)``); it holds the process groups'
    TCP store, so the workers must be able to reach this process's address."""

    def __init__(self, config: CoordinatorConfig, spec: WorkerSpec, *, env: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None, on_event: Callable[[dict], None] | None = None) -> None:
        """``env``: added to every worker's environment; ``log`` receives each event as a line of text (default:
        printed); ``on_event`` each event's record (``t``, ``event`` and its details), from the thread running
        :meth:`run`."""
        import ray

        if not ray.is_initialized():
            raise CoordinatorError("Ray is not initialised: call ray.init(address=...) first")
        self._ray = ray
        self.config = config
        self.spec = spec
        self.token = secrets.token_hex(32)
        """The snapshot protocol's shared secret (the workers get it as ``TOKEN_ENV``)."""
        self._events = EventLog(path=config.events_path, log=log, on_event=on_event)
        self._stop = StopRequest()
        self._job = JobState(world_size=config.workers)
        worker_env = {**(env or {}), TOKEN_ENV: self.token}
        worker_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Worker if spec.entry is None else EntryWorker)
        job_id = secrets.token_hex(3)
        self._placement = Placement(config, self._events)
        self._hosts = SnapshotHosts(config=config, spec=spec, token=self.token, job=job_id, events=self._events)
        self._standbys = Standbys(config=config, spec=spec, env=worker_env, job=job_id, worker_class=worker_class,
                                  placement=self._placement, events=self._events)
        self._workers = Workers(config=config, spec=spec, env=worker_env, worker_class=worker_class, job=self._job,
                                placement=self._placement, standbys=self._standbys, events=self._events,
                                stop=self._stop)
        self._generations = Generations(spec=spec, job=self._job, hosts=self._hosts, events=self._events)
        self._watch = Watch(config=config, spec=spec, job=self._job, workers=self._workers, events=self._events,
                            stop=self._stop)
        self._healer = Healer(config=config, spec=spec, job=self._job, workers=self._workers, hosts=self._hosts,
                              generations=self._generations, events=self._events, stop=self._stop)

    # ------------------------------------------------------------------ the run
    def run(self, steps: int, *, resume: bool = False, collect_parameters: bool = False) -> Outcome:
        """Trains to step ``steps``, healing failures; returns the outcome (with rank 0's final parameters if
        ``collect_parameters``). With ``resume`` the first generation restores too (the job's snapshots, else the
        latest checkpoint under ``spec.ckpt_dir``): a whole-job restart. Stops every actor it started, however it
        ends. Raises :class:`CoordinatorError`."""
        if self.spec.entry is not None:
            raise CoordinatorError("WorkerSpec.entry is set: the workers run its function, so call run_entry()")
        if self.config.elastic_wait_s and not self.spec.ckpt_dir:
            raise CoordinatorError("elastic mode (CoordinatorConfig.elastic_wait_s > 0) reshards from the universal "
                                   "checkpoint: give WorkerSpec.ckpt_dir and a sink that saves there")
        return self._run(steps, resume=resume, collect=self._collect_parameters if collect_parameters else None)

    def run_entry(self) -> Outcome:
        """Entry-point mode (``spec.entry``): has every rank call the function, again in every generation formed
        after a failure, until it has returned on every rank of one generation. The outcome's ``returns`` holds
        each rank's return value, ``calls`` what each rank's last worker did (its calls, their errors and the
        records they left). ``steps`` and ``history`` stay empty: the function's steps are its own. Raises
        :class:`CoordinatorError` (also when a rank's function does not import there or returns something that is
        not JSON)."""
        if self.spec.entry is None:
            raise CoordinatorError("run_entry() needs WorkerSpec.entry (the function the workers call)")
        if self.config.elastic_wait_s:
            raise CoordinatorError("elastic mode (CoordinatorConfig.elastic_wait_s > 0) is not available with an "
                                   "entry point: the user's function sets its own batch and ranks")
        return self._run(None, resume=False, collect=self._collect_returns)

    def _run(self, steps: int | None, *, resume: bool, collect: Callable[[Outcome], None] | None) -> Outcome:
        """The loop of :meth:`run` (to step ``steps``) and :meth:`run_entry` (``steps`` None: until the function
        returns); ``collect`` fills the outcome in once every rank is done."""
        outcome = Outcome(steps=steps or 0, failures=0)
        goal = {"steps": steps} if steps is not None else {"entry": self.spec.entry.target if self.spec.entry else ""}
        self.event("start", workers=self.config.workers, **goal)
        try:
            self._generations.open()
            self._placement.reserve()
            self._job.start(self._workers.start({rank: None for rank in range(self.config.workers)}))
            self._standbys.start(sorted(set(self._job.nodes())) * self.config.standby_per_node)
            self._hosts.place(self._job.nodes())
            self._generations.form(resume=resume, outcome=outcome)
            while True:
                until = self._next_stop(steps or 0)
                failed = self._watch.train_until(until, outcome)
                if failed is not None:
                    self._job.count_failure(self.config.max_restarts)
                    self._healer.heal(failed, outcome)
                elif until >= (steps or 0):
                    break
                else:
                    self._healer.grow(outcome)
            reached = {"step": steps} if steps is not None else {}
            self.event("finished", **reached, failures=self.failures, seconds=round(self.elapsed(), 3))
            outcome.failures = self.failures
            if collect is not None:
                collect(outcome)
            return outcome
        except Stopped:
            outcome.failures, outcome.stopped = self.failures, self._stop.reason
            outcome.stopped_at = self._last_step()
            self.event("stopped", reason=self._stop.reason, step=outcome.stopped_at, failures=self.failures)
            return outcome
        finally:
            self._standbys.stop()
            self._workers.stop()
            self._hosts.stop()
            self._placement.release()
            self._generations.close()

    def _next_stop(self, steps: int) -> int:
        """Where the next training calls end: ``steps``, or while an elastic job runs short of ranks (and its
        checkpoint cadence is known) the next checkpoint step, where it may grow back."""
        every = self.spec.ckpt_every
        if not (self.config.elastic_wait_s and every and self._job.world_size < self.config.workers):
            return steps
        step = self._last_step() or 0
        return min(steps, (step // every + 1) * every)

    def stop(self, reason: str = "stopped") -> None:
        """Ends :meth:`run` early: at its next poll of the training calls (or before the next generation forms
        during a recovery) the workers are stopped where they are and :meth:`run` returns the outcome with
        ``stopped`` set. Thread-safe: call it from another thread while :meth:`run` runs."""
        self._stop.request(reason)

    def _collect_parameters(self, outcome: Outcome) -> None:
        # Every rank is asked at once: at ZeRO stage 3 reading the parameters gathers them, a collective.
        every = self._ray.get([rank.handle.parameters.options(concurrency_group=TRAIN).remote()
                               for rank in self._job.ranks])
        outcome.parameters = every[0]

    def _collect_returns(self, outcome: Outcome) -> None:
        results = self._ray.get([rank.handle.results.options(concurrency_group=TRAIN).remote()
                                 for rank in self._job.ranks])
        outcome.returns = [result["value"] for result in results]
        outcome.calls = [call for result in results for call in result["calls"]]

    def _last_step(self) -> int | None:
        """The last step rank 0 finished, from its heartbeat (None if it does not answer or cannot tell)."""
        try:
            beat = self._ray.get(self._job.ranks[0].heartbeat(), timeout=5.0)
        except (IndexError, self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError):
            return None
        return None if beat["step"] is None else int(beat["step"])

    # ------------------------------------------------------------------ what others may read
    @property
    def job(self) -> str:
        """The job's name: its snapshot processes' segments and its standbys' Ray names carry it."""
        return self._hosts.job

    @property
    def generation(self) -> int:
        """The process-group generation formed last."""
        return self._job.generation

    @property
    def failures(self) -> int:
        """Failures counted so far."""
        return self._job.failures

    @property
    def world_size(self) -> int:
        """Ranks of the current generation: ``config.workers``, fewer after an elastic shrink until it grows back."""
        return self._job.world_size

    def ranks_node(self, rank: int) -> str:
        """The Ray node id ``rank``'s worker runs on (e.g. to remove that node in a test)."""
        return self._job.ranks[rank].node

    def worker(self, rank: int) -> object:
        """The actor handle of ``rank``'s current worker (e.g. to kill it in a benchmark, or read its heartbeat on
        the ``control`` concurrency group). Raises IndexError until :meth:`run` has started every worker."""
        return self._job.ranks[rank].handle

    def elapsed(self) -> float:
        """Seconds since this coordinator was made: the clock of the events' ``t``."""
        return self._events.elapsed()

    def event(self, name: str, **details: object) -> None:
        """Logs an event and appends it to the events file (a benchmark adds its own this way)."""
        self._events.event(name, **details)


__all__ = ["Coordinator", "CoordinatorConfig", "CoordinatorError", "Outcome", "Placeholder", "SnapshotHost"]
