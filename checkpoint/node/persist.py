"""Persisting in-memory snapshots as universal checkpoints from the node's snapshot process.

The ranks seal a snapshot of their shard every step into the node's shared memory (``snapshot_sink.py``); every
``persist_every`` steps the snapshot process turns the snapshots of that step into the node's ranks' parts of a
universal checkpoint (docs/checkpoint-format.md), so persistence costs the ranks nothing: no host copy, no thread,
no collective on their side. The writing is ``writer.PartWriter`` / ``writer.commit_save``, the very code of the
asynchronous ``CheckpointWriter``, so the files are the ones that writer would write at the same step.

**Which step.** A step s is eligible when every rank attached to this process has COMMITted s and
``s % persist_every == 0``, or s is the run's last step (``run_config["steps"]``) (the snapshot process checks at
each COMMIT). Every node's process sees the same steps become eligible, so all persist the same s without talking
to each other. At most one persist runs at a time; an eligible step that arrives while one runs is skipped and
logged (a node without rank 0 also writes error markers for its ranks, so that the holder of rank 0, which may be
persisting that step, gives it up at once), except the run's last step: it waits for the running persist (the
``CheckpointWriter``'s rule), so a finished run always ends with a checkpoint of its final state, and shutting
down waits for it.

**The race with the ranks.** A rank overwrites the slot holding step s when it snapshots step s + 2 (two slots,
alternating), possibly while this process still reads s. The snapshot process holds every rank's slot of s from
the first COMMIT of s until the copy is done (``SnapshotServer._hold_for_persist``), so normally no rank writes it;
a rank already past s at that first COMMIT cannot be held, and for that case :func:`copy_sealed` copies the whole
slot into private memory first (several threads: the window is about two training steps) and accepts the copy only
if the slot's header is unchanged and still sealed afterwards, seqlock style: the rank's ``begin`` clears ``complete``
before it writes any byte, so a header that still says "sealed, step s" after the copy means no write started in
between, and the copy's own checksums (``seg.verify`` on the copy) catch a torn copy even if a writer sealed an
identical header in between. A slot found overwritten abandons that step (logged; nothing torn is ever written) and
the next eligible step is persisted instead.

**Coordination between nodes** uses files only, like the writer: every node writes its ranks' parts and markers
into ``.tmp_step_<s>.<session>``; the process holding rank 0 waits (``commit_timeout_s``) for every rank's marker,
writes the manifest, renames, flips ``latest`` and purges. The session is derived from the step and the job's token
(an HMAC, so it names the job without revealing the token): every node computes the same one without talking, and
another job's leftovers never match. Markers also carry the step's data cursor and tokens seen, which every rank
shares, so a marker left by an earlier attempt at another point of training is never taken for this one, and the
state's lineage (``Trainer.lineage``, new at every restore), so that a step re-run after a rollback is never
committed with another node's part of the abandoned run's same step (a node that persisted that step before the
failure leaves its marker behind; the holder of rank 0 waits for the re-run's). A node removes its own ranks' old
markers before writing, and after a commit the holder of rank 0 removes this job's temporaries of older steps
(attempts that failed or were skipped on some node).

This module imports torch only when persistence is on (``Persister``): the snapshot process starts fast otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from regrow.checkpoint.snapshot import segment as seg
from regrow.trainer.checks import require_ints

COPY_PIECE = 4 << 20
"""Smallest piece of a slot one copy thread takes (fewer, larger pieces for small slots)."""
RESULTS_KEPT = 64
"""Persist results the process remembers for the ``persisted`` op."""


@dataclass(kw_only=True)
class PersistConfig:
    """Persistence of snapshots as universal checkpoints by the snapshot process (off when ``persist_every`` is 0).
    Validated on construction; errors name the field."""

    persist_every: int = 0
    """Persist every step s with ``s % persist_every == 0`` that every local rank has committed; 0: off. Make it a
    multiple of the ranks' snapshot interval (other steps are never snapshotted)."""
    persist_dir: str = ""
    """Checkpoint root (``step_*`` directories and ``latest``); every node's snapshot process must see the same
    directory (a shared filesystem), and no other job may write to it."""
    keep_last: int = 2
    """Committed checkpoints to keep (>= 2, as ``WriterConfig.keep_last``)."""
    commit_timeout_s: float = 600.0
    """Seconds the process holding rank 0 waits for every rank's part before giving the step up."""
    copy_threads: int = 4
    """Threads copying a slot into private memory (the copy must finish before the rank reuses the slot)."""
    chunk_bytes: int = 1 << 20
    """Largest byte range covered by one checksum (``WriterConfig.chunk_bytes``)."""
    fsync: bool = True
    """fsync files and directories before committing."""

    def __post_init__(self) -> None:
        require_ints(self, {"persist_every": 0, "keep_last": 2, "copy_threads": 1, "chunk_bytes": 1})
        if not isinstance(self.persist_dir, str):
            raise TypeError(f"PersistConfig.persist_dir={self.persist_dir!r} must be a path (str)")
        if self.persist_every and not self.persist_dir:
            raise ValueError(f"PersistConfig.persist_dir is empty but persist_every={self.persist_every} turns "
                             f"persistence on: give the checkpoint root every node's snapshot process sees")
        if self.persist_dir and Path(self.persist_dir).exists() and not Path(self.persist_dir).is_dir():
            raise ValueError(f"PersistConfig.persist_dir={self.persist_dir!r} exists and is not a directory")
        if not (isinstance(self.commit_timeout_s, int | float) and self.commit_timeout_s > 0):
            raise ValueError(f"PersistConfig.commit_timeout_s={self.commit_timeout_s!r} must be > 0")

    @property
    def enabled(self) -> bool:
        return self.persist_every > 0


def persist_session(token: str, step: int) -> str:
    """The session id of the persist of ``step`` (16 hex digits): the same on every node of the job, different
    for another job (another token); the token itself cannot be recovered from it."""
    return hmac.new(token.encode(), f"regrow persist step {step}".encode(), hashlib.sha256).hexdigest()[:16]


# -------------------------------------------------------------------- reading a slot safely
class SlotOverwritten(RuntimeError):
    """The slot no longer holds the sealed snapshot that was to be read (its rank reused it)."""


def _parallel_copy(source: memoryview, out: np.ndarray, threads: int) -> None:
    """``out[:] = source`` in pieces on ``threads`` threads (numpy releases the GIL while it copies). The numpy
    view of ``source`` dies with this call, so the caller can close the mapping afterwards."""
    src = np.frombuffer(source, dtype=np.uint8)
    size = len(src)
    piece = max(COPY_PIECE, -(-size // threads))
    bounds = [(start, min(size, start + piece)) for start in range(0, size, piece)]
    if len(bounds) <= 1:
        out[:] = src
        return
    with ThreadPoolExecutor(min(threads, len(bounds)), thread_name_prefix="regrow-persist-copy") as pool:
        list(pool.map(lambda b: np.copyto(out[b[0] : b[1]], src[b[0] : b[1]]), bounds))


def copy_sealed(buffer: mmap.mmap, *, rank: int, step: int, threads: int = 4,
                on_copied: Callable[[], None] | None = None) -> seg.Snapshot:
    """Copies the sealed snapshot of ``step`` from a mapped slot into private memory and returns it verified.

    Contract: raises :class:`SlotOverwritten` when the slot does not hold a sealed snapshot of ``step`` before the
    copy, or when its header changed during the copy (the rank began another snapshot in it: the copy may be torn);
    raises ``seg.SegmentError`` when the copy does not verify (checksums, rank). The returned snapshot's payload
    views the private copy, never the slot, so the rank may reuse the slot at once. ``on_copied`` runs after the
    copy and before the header is read again (a test seam: it may overwrite the slot)."""
    before = seg.read_header(buffer)
    if before.complete != seg.COMPLETE or before.step != step:
        state = "sealed" if before.complete == seg.COMPLETE else "being written"
        raise SlotOverwritten(f"rank {rank}'s slot {before.slot} holds step {before.step} ({state}), not a sealed "
                              f"snapshot of step {step}")
    private = np.empty(len(buffer), dtype=np.uint8)
    view = memoryview(buffer)
    try:
        _parallel_copy(view, private, threads)
    finally:
        view.release()
    if on_copied is not None:
        on_copied()
    after = seg.read_header(buffer)
    if after != before:
        now = "sealed" if after.complete == seg.COMPLETE else "being written"
        raise SlotOverwritten(f"rank {rank}'s slot {before.slot} was reused during the copy (it now holds step "
                              f"{after.step}, {now}): the copy of step {step} may be torn")
    snapshot = seg.verify(memoryview(private), rank=rank)
    if snapshot.step != step:  # cannot happen with an unchanged header; kept as the contract's last line
        snapshot.payload.release()
        raise SlotOverwritten(f"rank {rank}'s copy holds step {snapshot.step}, not {step}")
    return snapshot


# -------------------------------------------------------------------- the persist thread
@dataclass
class PersistResult:
    """What became of one eligible step on this node.

    ``status``: "committed" (this node holds rank 0: the checkpoint is in place and ``latest`` names it),
    "written" (this node's parts are on disk; the node holding rank 0 commits), "skipped" (a persist was still
    running), "overwritten" (a rank reused its slot before the copy finished: nothing written), "already" (this
    job had already committed this step) or "failed" (``error`` says why; ``latest`` is unchanged)."""

    step: int
    status: str
    path: str | None = None
    seconds: float = 0.0
    error: str | None = None


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
        # Imported here, not at the top: torch (through the writer) is needed only when persistence is on.
        from regrow.checkpoint.universal import commit, part_writer  # noqa: F401

        self.config = config
        self.root = Path(config.persist_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_config: dict = {}
        """Stored in every manifest (``TrainerConfig.to_dict()``; the ``run_config`` op sets it)."""
        self.copy_hook = copy_hook
        self._release = release or (lambda step: None)
        """Called with the step once its slots are copied (or not taken): the server then lets the sinks reuse
        the slots it held for this persist."""
        self._token = token
        self._log = log
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
                threading.Thread(target=self._error_markers, args=(step, sorted(slots), why), daemon=True,
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
            self._give_up(step, sorted(slots), f"{type(error).__name__}: {error}")
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

    def _give_up(self, step: int, ranks: list[int], error: str) -> None:
        """Error markers for this node's ranks (:meth:`_error_markers`); the holder of rank 0 itself just removes
        the temporary directory."""
        from regrow.checkpoint.universal.format import temp_dir_name

        if 0 in ranks:
            shutil.rmtree(self.root / temp_dir_name(step, persist_session(self._token, step)), ignore_errors=True)
            return
        self._error_markers(step, ranks, error)

    def _error_markers(self, step: int, ranks: list[int], error: str) -> None:
        """Writes an error marker for each of ``ranks`` into the temporary directory of ``step``, so that the holder
        of rank 0 stops waiting for their parts at once instead of at ``commit_timeout_s`` (it accepts any error
        marker of the session: a node that abandons or skips a step has no fingerprint to give)."""
        from regrow.checkpoint.universal.format import temp_dir_name
        from regrow.checkpoint.universal.part_writer import Part, PartWriter

        session = persist_session(self._token, step)
        temp = self.root / temp_dir_name(step, session)
        parts = PartWriter(chunk_bytes=self.config.chunk_bytes, fsync=self.config.fsync)
        for rank in ranks:
            try:
                parts.write_marker(temp, rank=rank, step=step, session=session, part=Part(), error=error)
            except OSError as failed:
                self._log(f"persist of step {step}: could not write rank {rank}'s error marker: {failed}")

    def _write(self, step: int, session: str, snapshots: dict[int, seg.Snapshot], started: float) -> PersistResult:
        """Writes every local rank's part from its private copy; the holder of rank 0 then commits."""
        # torch-side imports, see __init__.
        from regrow.checkpoint.snapshot.sink import state_from_snapshot
        from regrow.checkpoint.universal.commit import SaveTarget, build_manifest, commit_save
        from regrow.checkpoint.universal.format import (
            MANIFEST_NAME,
            PARTS_DIR,
            rank_file,
            step_dir_name,
            temp_dir_name,
        )
        from regrow.checkpoint.universal.part_writer import PartWriter, write_part

        final = self.root / step_dir_name(step)
        if _manifest_session(final / MANIFEST_NAME) == session:
            for snapshot in snapshots.values():
                snapshot.payload.release()
            self._log(f"step {step} was already persisted to {final} by this job; not written again")
            return PersistResult(step=step, status="already", path=str(final))
        temp = self.root / temp_dir_name(step, session)
        for rank in snapshots:  # an earlier attempt's markers (e.g. before a rank restart) must not count now
            try:
                (temp / PARTS_DIR / rank_file(rank, ".json")).unlink(missing_ok=True)
            except OSError:
                pass  # temp is unusable: the writes below fail and report why
        parts = PartWriter(chunk_bytes=self.config.chunk_bytes, fsync=self.config.fsync)
        errors, fingerprint, summary = [], None, None
        for rank in sorted(snapshots):
            snapshot = snapshots.pop(rank)
            try:
                state = state_from_snapshot(snapshot)
            finally:
                snapshot.payload.release()  # the private copy is freed once the state holds the tensors
            mark = {"tokens_seen": state.tokens_seen, "data_cursor": dict(state.data_cursor),
                    "world_size": state.layout["world_size"], "lineage": state.extra.get("lineage", "")}
            fingerprint = fingerprint or mark
            if rank == 0:
                summary = (state.layout, dict(state.data_cursor), state.tokens_seen, state.layout["world_size"])
            _, error = write_part(parts, temp, state, session=session, marker_extra={"persist": mark})
            if error is not None:
                errors.append(f"rank {rank}: {error}")
            del state
        if summary is None:
            return self._written(step, temp, errors, started)
        layout, cursor, tokens, world_size = summary
        target = SaveTarget(root=self.root, step=step, session=session, world_size=world_size)
        done = commit_save(
            target, lambda markers: build_manifest(target, markers, layout=layout, data_cursor=cursor,
                                                   tokens_seen=tokens, run_config=self.run_config),
            keep_last=self.config.keep_last, timeout_s=self.config.commit_timeout_s, fsync=self.config.fsync,
            started=started, accept=lambda marker: marker.get("persist") == fingerprint or bool(marker.get("error")))
        result = done.result
        if result.status != "committed":
            self._log(f"persist of step {step} FAILED: {result.error}; latest is unchanged")
            return PersistResult(step=step, status="failed", seconds=result.seconds, error=result.error)
        removed = self._remove_older_temporaries(step)
        purged = f"; purged {', '.join(p.name for p in done.purged)}" if done.purged else ""
        cleaned = f"; removed {len(removed)} abandoned temporaries" if removed else ""
        self._log(f"persisted step {step} to {result.path} in {result.seconds:.2f} s{purged}{cleaned}")
        return PersistResult(step=step, status="committed", path=result.path, seconds=result.seconds)

    def _written(self, step: int, temp: Path, errors: list[str], started: float) -> PersistResult:
        """The outcome on a node that does not hold rank 0 (its parts and markers are written; rank 0 commits)."""
        seconds = time.perf_counter() - started
        if errors:
            error = "; ".join(errors)
            self._log(f"persist of step {step} FAILED on this node: {error}; latest is unchanged")
            return PersistResult(step=step, status="failed", seconds=seconds, error=error)
        self._log(f"persisted this node's part of step {step} to {temp} in {seconds:.2f} s (the snapshot process "
                  f"holding rank 0 commits it)")
        return PersistResult(step=step, status="written", path=str(temp), seconds=seconds)

    def _remove_older_temporaries(self, step: int) -> list[Path]:
        """This job's temporaries of steps before ``step``: attempts that failed, were skipped or were abandoned on
        some node. Another job's temporaries (other sessions) are left alone."""
        from regrow.checkpoint.universal.format import TEMP_PREFIX, parse_step_dir_name

        removed = []
        for entry in self.root.iterdir():
            name, _, session = entry.name.removeprefix(TEMP_PREFIX).partition(".")
            older = parse_step_dir_name(name) if entry.name.startswith(TEMP_PREFIX) else None
            if older is not None and older < step and session == persist_session(self._token, older):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


def _manifest_session(path: Path) -> str | None:
    """The writer session recorded in a committed manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(path.read_text()).get("writer", {}).get("session")
    except (OSError, ValueError, AttributeError):
        return None


__all__ = ["PersistConfig", "PersistResult", "Persister", "SlotOverwritten", "copy_sealed", "persist_session"]
