"""The snapshot process's persist thread (:class:`Persister`) and what feeds it steps (:class:`PersistFeed`).

persist.py describes the whole design: which step is persisted, the race with the ranks, coordination between
nodes. The persister copies each local rank's slot into private memory (``slot_copy.py``) and writes the copies
(``persist_write.py``); torch is imported only once a :class:`Persister` exists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from regrow.checkpoint.node.persist import (
    PERSIST_HOLDER,
    PersistConfig,
    PersistResult,
    persist_session,
)
from regrow.checkpoint.node.persist_write import StepWriter
from regrow.checkpoint.node.slot_copy import SlotOverwritten, copy_sealed
from regrow.checkpoint.node.slots import SlotTable
from regrow.checkpoint.snapshot import segment as seg

RESULTS_KEPT = 64
"""Persist results the process remembers for the ``persisted`` op."""


class Persister:
    """The snapshot process's persist thread. The server calls :meth:`offer` when a step becomes eligible,
    :meth:`status` for the ``persisted`` op and :meth:`close` at shutdown.

    Contract: ``offer`` never blocks (a COMMIT reply must stay fast); one persist at a time, offers while busy are
    skipped and recorded, but the run's last step is queued behind the running persist. A persist never raises:
    every outcome is a :class:`PersistResult` and a log line.
    ``copy_hook(rank, step)`` runs after each slot's copy, before its header is checked again (tests)."""

    def __init__(self, config: PersistConfig, token: str, *, log: Callable[[str], None],
                 copy_hook: Callable[[int, int], None] | None = None,
                 release: Callable[[int], None] | None = None) -> None:
        if not token:
            raise ValueError("the persist session needs the job's token")
        # Imported here, not at the top: torch (through the part writer) is needed only when persistence is on.
        from regrow.checkpoint.universal import commit, part_writer  # noqa: F401

        self.config = config
        self.root = Path(config.persist_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_config: dict = {}
        """Stored in every manifest (``TrainerConfig.to_dict()``; the ``run_config`` op sets it:
        :meth:`set_run_config`)."""
        self.copy_hook = copy_hook
        self._release = release or (lambda step: None)
        """Called with the step once its slots are copied (or not taken): the server then lets the sinks reuse
        the slots it held for this persist."""
        self._token = token
        self._log = log
        self._writer = StepWriter(config, token, log=log)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._pending: tuple[int, dict[int, str]] | None = None
        self._in_flight: int | None = None
        self._last_offered: int | None = None
        self._results: list[PersistResult] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="regrow-snapshot-persist")
        self._thread.start()

    # ---------------------------------------------------------------- called by the server
    def set_run_config(self, config: dict) -> None:
        """The run's config, recorded in the manifests of the steps persisted from now on."""
        self.run_config = config

    @property
    def last_step(self) -> int:
        """The run's last step, from the run config (0 while none was sent: then no step is treated as last)."""
        steps = self.run_config.get("steps", 0)
        return steps if isinstance(steps, int) and steps > 0 else 0

    def eligible(self, step: int) -> bool:
        """Whether ``step`` is persisted once every local rank has committed it."""
        return step > 0 and (step % self.config.persist_every == 0 or step == self.last_step)

    def offer(self, step: int, slots: dict[int, str]) -> None:
        """Step ``step`` is eligible: ``slots`` maps each local rank to the segment holding its snapshot of it."""
        with self._lock:
            if step == self._last_offered:
                return  # the last two COMMITs of a step may both find it complete
            self._last_offered = step
            busy = self._in_flight
            taken = busy is None or step == self.last_step  # the run's last step waits for a running persist
            if taken:
                self._in_flight = step if busy is None else busy
                self._pending = (step, dict(slots))
                self._wake.set()
            else:
                self._record(PersistResult(step=step, status="skipped",
                                           error=f"the persist of step {busy} was still running"))
        if not taken:
            self._release(step)
            self._log(f"persist of step {step} skipped: the persist of step {busy} is still running (persist less "
                      f"often: persist_every)")
            if 0 not in slots:  # the holder of rank 0 may persist the step: tell it not to wait for these ranks
                why = f"skipped on this rank's node: the persist of step {busy} was still running"
                threading.Thread(target=self._writer.error_markers, args=(step, sorted(slots), why), daemon=True,
                                 name="regrow-snapshot-persist-skip").start()
        elif busy is not None:  # no snapshot follows the last one, so its slots stay as they are while it waits
            self._log(f"persist of step {step}, the run's last, waits for the persist of step {busy}")

    def rolled_back(self, step: int) -> None:
        """A local rank went back to ``step`` (it restored): the steps after it are trained again, in a new lineage,
        and each is offered again once its COMMITs come (the abandoned run's offer of the same step number must not
        make the re-run's look like a repeat)."""
        with self._lock:
            if self._last_offered is not None and self._last_offered > step:
                self._last_offered = None

    @property
    def idle(self) -> bool:
        """No persist runs: a step offered now is taken."""
        with self._lock:
            return self._in_flight is None

    def status(self) -> dict:
        """The ``persisted`` op's reply fields."""
        with self._lock:
            results = [asdict(r) for r in self._results]
            in_flight = self._in_flight
        good = [r["step"] for r in results if r["status"] in ("committed", "written", "already")]
        return {"enabled": True, "every": self.config.persist_every, "dir": str(self.root), "in_flight": in_flight,
                "persisted": good, "results": results}

    def close(self, timeout_s: float | None = None) -> None:
        """Lets the persist in flight and a queued last step finish (up to ``timeout_s``, default
        ``commit_timeout_s`` for each) and stops."""
        with self._lock:
            self._stop = True
            self._wake.set()
            jobs = sorted({step for step in (self._in_flight, self._pending and self._pending[0]) if step})
        if jobs:
            self._log(f"shutting down once the persist of step{'s' if len(jobs) > 1 else ''} "
                      f"{' and '.join(map(str, jobs))} is done")
        self._thread.join(self.config.commit_timeout_s * max(1, len(jobs)) if timeout_s is None else timeout_s)
        if self._thread.is_alive():
            self._log(f"shutting down while the persist of step {self._in_flight} still runs: its temporary "
                      f"directory stays behind (never loaded; removed after a later commit)")

    # ---------------------------------------------------------------- the thread
    def _record(self, result: PersistResult) -> None:
        self._results = [*self._results[-(RESULTS_KEPT - 1):], result]

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                job, self._pending = self._pending, None
                if not self._stop:  # once stopping, the event stays set so the loop ends after this job
                    self._wake.clear()
                if job is None:
                    if self._stop:
                        return
                    continue
            step, slots = job
            try:
                result = self._persist(step, slots)
            except Exception as error:  # noqa: BLE001 (a bug here must not kill the thread: log and go on)
                result = PersistResult(step=step, status="failed", error=f"{type(error).__name__}: {error}")
                self._log(f"persist of step {step} FAILED: {result.error}; latest is unchanged")
            with self._lock:
                self._record(result)
                self._in_flight = self._pending[0] if self._pending else None

    def _persist(self, step: int, slots: dict[int, str]) -> PersistResult:
        started = time.perf_counter()
        session = persist_session(self._token, step)
        try:
            try:
                snapshots = self._copy_all(step, slots)
            finally:
                self._release(step)
        except (SlotOverwritten, seg.SegmentError, OSError) as error:
            status = "overwritten" if isinstance(error, SlotOverwritten) else "failed"
            self._writer.give_up(step, sorted(slots), f"{type(error).__name__}: {error}")
            self._log(f"persist of step {step} abandoned: {error}; nothing of it was written, the next eligible "
                      f"step is persisted instead")
            return PersistResult(step=step, status=status, error=str(error))
        return self._write(step, session, snapshots, started)

    def _copy_all(self, step: int, slots: dict[int, str]) -> dict[int, seg.Snapshot]:
        """Private, verified copies of every local rank's slot (all before any writing: the ranks reuse them)."""
        snapshots: dict[int, seg.Snapshot] = {}
        try:
            for rank in sorted(slots):
                buffer = seg.open_segment(slots[rank], writable=False)
                try:
                    hook = (lambda r=rank: self.copy_hook(r, step)) if self.copy_hook else None
                    snapshots[rank] = copy_sealed(buffer, rank=rank, step=step, threads=self.config.copy_threads,
                                                  on_copied=hook)
                finally:
                    buffer.close()
        except BaseException:
            for snapshot in snapshots.values():
                snapshot.payload.release()
            raise
        return snapshots

    def _write(self, step: int, session: str, snapshots: dict[int, seg.Snapshot], started: float) -> PersistResult:
        """Writes every local rank's part from its private copy; the holder of rank 0 then commits."""
        return self._writer.write(step, session, snapshots, started, run_config=self.run_config)


class PersistFeed:
    """Hands the persister its steps from the ranks' COMMITs: holds every local rank's slot of a persist step from
    its first COMMIT until the persister has copied it, and offers the step once every attached rank has committed
    it. Called on the COMMITs' connection threads."""

    def __init__(self, persister: Persister, slots: SlotTable) -> None:
        self._persister = persister
        self._slots = slots
        self._lock = threading.Lock()
        self._held_step: int | None = None  # the persist step whose slots were last held for the persister

    def hold_at_first_commit(self, step: int) -> None:
        """At the first COMMIT of a persist step, holds every rank's slot of it until the persister has copied it
        (the ranks that COMMIT it later are held at their COMMIT, whose reply tells their sink). Holding only once
        all ranks had committed lost the step whenever one rank's COMMIT came a step late (a loaded machine): by
        then another rank was past it and its slot could not be held any more. Not while a persist runs: its
        offer would be skipped, and taking the holder's holds would drop the ones its copy may still need."""
        if not self._persister.eligible(step) or not self._persister.idle:
            return
        with self._lock:  # the ranks' COMMITs arrive on their own threads: one of them takes the hold
            if step == self._held_step:
                return
            self._held_step = step
        self._slots.hold(PERSIST_HOLDER, step)

    def offer(self, step: int) -> None:
        """Hands ``step`` to the persister when it is a persist step and every attached rank has committed it.
        Offered even if a slot could not be held (a rank was already past the step at its first COMMIT): the
        persister's copy is checked seqlock style (``slot_copy.copy_sealed``), so a slot rewritten under it
        abandons the step and nothing torn is written."""
        if not self._persister.eligible(step):
            return
        slots = self._slots.committed_paths(step)
        if slots is not None:  # else a rank's COMMIT of the step comes later (and offers it then)
            self._persister.offer(step, slots)

    def rolled_back(self, step: int) -> None:
        """A local rank went back to ``step``: the steps after it are re-run, their slots held and offered again."""
        with self._lock:
            if self._held_step is not None and self._held_step > step:
                self._held_step = None  # the re-run step's slots are held again
        self._persister.rolled_back(step)
