"""The lazy asynchronous checkpoint writer: a ``StateSink`` that saves universal checkpoints without stalling training.

At a save step (``after_step`` of every ``save_every``-th step) the writer starts device-to-host copies of the shard
(``hostcopy.HostCopier``: a side stream on CUDA, a thread on CPU) and returns at once; the next forward and backward
run while the copies do. ``before_optimizer_step`` waits for the copies (on CUDA without blocking the CPU), because
the optimizer step is the only thing that mutates the shard. A background thread then writes this rank's byte ranges
of the per-parameter files, fsyncs them and drops a marker file; rank 0's thread waits for every rank's marker,
writes the manifest, renames the directory into place, flips ``latest`` and purges old checkpoints.

At most one save is in flight per rank. A save step that arrives while the previous save still persists is skipped
(``when_busy="skip"``, logged; the ranks agree on it with one tiny all-reduce from the training thread, so they all
skip the same steps) or waits for it (``when_busy="wait"``: a stall, but no save is ever missed).

Cross-rank coordination of a save happens on the filesystem only (markers under the temporary directory), never
with collectives from the background thread: those would interleave with the training thread's collectives on the
same process group. So ``root`` must be a directory every rank sees (one node's local disk, or a shared filesystem).

A failed write (disk full, I/O error, a directory that cannot be created, a rank that never writes its marker) fails
that save only: it is logged with the error as the OS reported it and recorded in ``results``, the temporary
directory is removed and ``latest`` keeps naming the last good checkpoint. A rank whose part fails says so in its
marker, and rank 0 gives the save up as soon as its own part failed or it reads such a marker (the only wait left is
for a rank that can write nothing at all, not even its marker, while rank 0 can: ``commit_timeout_s``). Training then
goes on, or stops with :class:`CheckpointWriteError` at the next step (``on_error``).

The file work needs no process group and is shared with the node's snapshot process, which persists the node's
snapshots in the same format (``checkpoint/node/persist.py``): ``part_writer.PartWriter`` writes one rank's part
(byte ranges, RNG files, marker) and ``commit.commit_save`` is the commit by the holder of rank 0 (wait for markers,
manifest, rename, ``latest``, purge). :class:`CheckpointWriter` adds the host copies, the session agreement and the
skip decisions, which use collectives.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from regrow.checkpoint.hostcopy import HostCopier, HostCopy
from regrow.checkpoint.universal import KEEP_LAST, storage
from regrow.checkpoint.universal.commit import (
    SaveResult,
    SaveTarget,
    build_manifest,
    commit_save,
    remove_older_temporaries,
)
from regrow.checkpoint.universal.format import Chunk, Manifest, RngEntry, step_dir_name, temp_dir_name
from regrow.checkpoint.universal.part_writer import Part, PartWriter, describe_part, write_user_of
from regrow.comm import collectives
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.checks import require_ints
from regrow.trainer.log import log_line
from regrow.trainer.state import RngState, ShardState

WHEN_BUSY = ("skip", "wait")
ON_ERROR = ("continue", "stop")
"""What training does after a save failed (``WriterConfig.on_error``, ``--ckpt-on-error``); the first is the
default."""


class CheckpointWriteError(RuntimeError):
    """A save failed and ``WriterConfig.on_error`` is "stop": raised in the training loop; names the checkpoint, the
    root, the error as the OS reported it, and what ``latest`` still names."""


@dataclass(kw_only=True)
class WriterConfig:
    """Settings of :class:`CheckpointWriter`. Validated on construction; errors name the field."""

    root: str
    """Directory that holds ``step_*`` checkpoints and ``latest``; must be visible to every rank. One job writes to
    a root at a time (a new writer removes the temporaries it finds there as leftovers of a crash)."""
    save_every: int = 100
    """Save after every this many optimizer steps (0: only when :meth:`CheckpointWriter.save` is called)."""
    keep_last: int = KEEP_LAST
    """Committed checkpoints to keep (>= 2, so a good one survives while the next is written); older are purged."""
    when_busy: str = "skip"
    """A save step while the previous save still persists: "skip" it (logged) or "wait" for the previous one."""
    final_step: int = 0
    """The run's last step (0: not known). It is saved too (when saving is on), and never skipped: it waits for
    the previous save, so that a finished run always ends with a checkpoint."""
    commit_timeout_s: float = 600.0
    """Seconds rank 0 waits for the other ranks' parts before giving the save up (and that close() waits). A rank
    whose part failed says so at once (its marker carries the error); only a rank that cannot write even its marker
    is waited for this long."""
    on_error: str = ON_ERROR[0]
    """After a save failed (on any rank; ``latest`` still names the last good checkpoint): "continue" training (the
    next save tries again) or "stop": the training loop raises :class:`CheckpointWriteError` at the first step
    after the failure is known on this rank (or at ``close()`` for the final save)."""
    chunk_bytes: int = 1 << 20
    """Largest byte range covered by one checksum. A corrupt byte is located to within it, and a loader at another
    layout reads at most one extra chunk at each end of its range (checksums cover whole chunks)."""
    fsync: bool = True
    """fsync files and directories before committing (off only for throwaway runs on slow disks)."""
    log: bool = True
    """Print ``[rank r, step s] checkpoint ...`` lines (commits and skips on rank 0, failures on any rank)."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"WriterConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not str(self.root):
            raise bad("root", "give the directory that holds the checkpoints")
        require_ints(self, {"save_every": 0, "keep_last": KEEP_LAST, "final_step": 0, "chunk_bytes": 1})
        if self.when_busy not in WHEN_BUSY:
            raise bad("when_busy", f"allowed values are {WHEN_BUSY}")
        if self.on_error not in ON_ERROR:
            raise bad("on_error", f"allowed values are {ON_ERROR}")
        if not self.commit_timeout_s > 0:
            raise bad("commit_timeout_s", "must be > 0")


@dataclass
class PendingSave:
    """One save in flight: the state's small values, the host copy of its tensors, the persist thread. Passed to
    the overridable ``write_*`` methods of :class:`CheckpointWriter`."""

    step: int
    layout: dict
    rng: RngState
    data_cursor: dict[str, int]
    tokens_seen: int
    copy: HostCopy
    started: float
    temp: Path
    view: CheckpointView
    """How the shard maps onto the checkpoint's files (the identity, or a pipeline stage's)."""
    user: dict | None = None
    """The user loop's JSON state (``ShardState.extra["user"]``); its tensors are in ``copy`` under ``user/``."""
    thread: threading.Thread | None = None
    mutation_pending: bool = True


class CheckpointWriter:
    """Saves universal checkpoints of the trainer's shard state in the background; satisfies ``StateSink``.

    Contract: every rank of the job constructs one (collective: the ranks agree on a session id) with the same
    config and passes it to its ``Trainer`` (or calls the three sink methods itself: ``before_optimizer_step()``
    before every optimizer step, ``after_step(state)`` after it, ``close()`` at the end). With ``on_error="stop"``,
    ``after_step`` and ``close`` raise :class:`CheckpointWriteError` once a save has failed (once per failure they
    see). ``run_config`` (e.g. ``TrainerConfig.to_dict()``) is stored in the manifest. The writer's own collectives
    (training thread only) use CPU tensors, so ``group`` needs a CPU backend (regrow's ``World`` has
    "cpu:gloo,cuda:nccl"). ``timeout_s`` bounds each of them and the wait for a host copy. ``copier`` makes the
    host copies and ``pwrite`` does every positional file write (tests pass failing ones). ``io_fault`` is called
    with the step before this rank writes its part of a save, in the persist thread; an exception it raises fails
    that save as a write error would (the fault injector's ``fail-ckpt``).
    """

    Config = WriterConfig

    def __init__(
        self,
        config: WriterConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        run_config: dict | None = None,
        group: dist.ProcessGroup | None = None,
        copier: HostCopier | None = None,
        pwrite: storage.PWrite = os.pwrite,
        timeout_s: float = 300.0,
        io_fault: Callable[[int], None] | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.config = config
        self.rank = rank if rank is not None else (dist.get_rank(group) if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size(group) if distributed else 1)
        self.group = group
        self.run_config = run_config or {}
        self.copier = copier or HostCopier()
        self.pwrite = pwrite
        self.timeout_s = timeout_s
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.results: list[SaveResult] = []
        """Every save step's outcome on this rank, in the order they were decided (a skip at once, a save when its
        persist ends)."""
        self._inflight: PendingSave | None = None
        self._io_fault = io_fault
        self._results_checked = 0  # results before this index were looked at for on_error="stop"
        self._last_step = 0
        self.session = _agree_session(self.rank, self.world_size, group, timeout_s)
        if self.rank == 0:
            removed = storage.clean_temporaries(self.root)
            if removed and config.log:
                log_line(0, 0, f"checkpoint: removed {len(removed)} leftover temporaries under {self.root} "
                               f"(saves interrupted by a crash)")

    def prepare(self, state: ShardState) -> None:
        """Allocates the host buffers (pinned on a GPU) for states like ``state`` now, off the training thread, so
        the first save of a run stalls training no more than later ones. Call once, at start-up."""
        self.copier.prepare(state.tensors)

    # ---------------------------------------------------------------- the StateSink protocol
    def before_optimizer_step(self) -> None:
        """Call right before every optimizer step: waits for the host copies of a save started after the previous
        step (on CUDA only the compute stream waits). A failed copy is reported by the persist thread."""
        save = self._inflight
        if save is not None and save.mutation_pending:
            save.mutation_pending = False
            try:
                save.copy.wait_before_mutation()
            except RuntimeError:
                pass  # the persist thread's wait_host raises the same error and records the failed save

    def after_step(self, state: ShardState) -> None:
        """Call after every optimizer step; saves at multiples of ``save_every`` and at the final step. With
        ``on_error="stop"`` it first raises :class:`CheckpointWriteError` if a save failed since the last call."""
        self._last_step = state.step
        self._stop_if_failed()
        every = self.config.save_every
        if every and state.step > 0 and (state.step % every == 0 or state.step == self.config.final_step):
            self.save(state, when_busy="wait" if state.step == self.config.final_step else None)

    def close(self) -> None:
        """Waits (up to ``commit_timeout_s``) for the save in flight; call once when training ends. With
        ``on_error="stop"`` it then raises :class:`CheckpointWriteError` if a save failed (the final one, say)."""
        self.before_optimizer_step()
        self.wait(self.config.commit_timeout_s + 60)
        self._stop_if_failed()

    # ---------------------------------------------------------------- saving
    def save(self, state: ShardState, *, when_busy: str | None = None) -> bool:
        """Starts a save of ``state`` now; returns False when it is skipped. Every rank must call it at the same
        step (it may run one small all-reduce to agree on skipping). ``when_busy`` overrides the config's."""
        when_busy = when_busy or self.config.when_busy
        busy = self.busy()
        if busy and when_busy == "wait":
            self._log(state.step, f"checkpoint: waiting for step {self._inflight.step}'s save to finish "
                                  f"(when_busy='wait')", everyone=False)
            self.wait(self.config.commit_timeout_s + self.timeout_s)
            busy = False
        if self.world_size > 1 and when_busy == "skip":
            busy = _any_rank(busy, self.group, self.timeout_s)
        copy = None if busy else self.copier.start(state.tensors)
        if copy is None:
            previous = self._inflight.step if self._inflight else "?"
            self.results.append(SaveResult(step=state.step, status="skipped",
                                           error=f"step {previous}'s save was still persisting"))
            self._log(state.step, f"checkpoint at step {state.step} skipped: the save of step {previous} is still "
                                  f"persisting (when_busy='skip'; save less often or use when_busy='wait')",
                      everyone=False)
            return False
        save = PendingSave(step=state.step, layout=state.layout, rng=state.rng, data_cursor=dict(state.data_cursor),
                     tokens_seen=state.tokens_seen, copy=copy, started=time.perf_counter(),
                     temp=self.root / temp_dir_name(state.step, self.session), user=state.extra.get("user"),
                     view=CheckpointView.of_state(state.extra, self.rank))
        save.thread = threading.Thread(target=self._persist, args=(save,), daemon=True,
                                       name=f"regrow-ckpt-persist-step{state.step}")
        self._inflight = save
        save.thread.start()
        return True

    def busy(self) -> bool:
        """True while this rank's previous save is still being copied or persisted."""
        save = self._inflight
        return save is not None and save.thread is not None and save.thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> SaveResult | None:
        """Blocks until the save in flight (if any) has finished on this rank; returns the latest result."""
        save = self._inflight
        if save is not None and save.thread is not None:
            save.thread.join(timeout_s)
            if save.thread.is_alive():
                raise TimeoutError(f"checkpoint of step {save.step} still persisting after {timeout_s} s")
        return self.results[-1] if self.results else None

    # ---------------------------------------------------------------- the persist thread
    def _persist(self, save: PendingSave) -> None:
        part, error = Part(), None
        try:
            save.copy.wait_host(self.timeout_s)
            if self._io_fault is not None:
                self._io_fault(save.step)
            describe_part(part, save.layout, save.view)
            part.chunks = self.write_shard(save)
            part.rng = self.write_rng(save)
            part.user = write_user_of(self._parts(), save.temp, self.rank, save.user, save.copy.buffers)
        except BaseException as caught:  # any failure is this save's failure, never the training's
            error = f"{type(caught).__name__}: {caught}"
        finally:
            save.copy.release()
        try:
            self.write_marker(save, part, error)
        except BaseException as caught:
            error = error or f"writing the marker failed: {type(caught).__name__}: {caught}"
        if self.rank == 0:
            result = self._commit(save, error)  # at once when error: rank 0's own marker may not even exist
        elif error is None:
            result = SaveResult(step=save.step, status="written", path=str(save.temp),
                                seconds=time.perf_counter() - save.started, nbytes=_part_bytes(part))
        else:
            result = SaveResult(step=save.step, status="failed", error=f"rank {self.rank}: {error}")
        if result.status == "failed":
            self._log(save.step, f"checkpoint {step_dir_name(save.step)} FAILED: {result.error}; "
                                 f"the last good checkpoint stays in place", everyone=True)
        self.results.append(result)

    # The write_* methods and build_manifest are this class's hooks (tests override them); the work is done by the
    # process-group-free PartWriter and build_manifest that the snapshot process shares.
    def _parts(self) -> PartWriter:
        return PartWriter(chunk_bytes=self.config.chunk_bytes, fsync=self.config.fsync, pwrite=self.pwrite)

    def _target(self, save: PendingSave) -> SaveTarget:
        return SaveTarget(root=self.root, step=save.step, session=self.session, world_size=self.world_size)

    def write_shard(self, save: PendingSave) -> dict[str, list[Chunk]]:
        """Writes this rank's byte ranges of every parameter file its shard covers; returns their checksums."""
        return self._parts().write_shard(save.temp, save.layout, self.rank, save.copy.buffers, self.write_range,
                                         save.view)

    def write_range(self, path: Path, source: torch.Tensor, offset: int) -> list[Chunk]:
        """Writes ``source``'s bytes at byte ``offset`` of ``path`` (created if needed, never truncated: other
        ranks write other ranges of the same file), fsyncs, and returns one checksummed chunk per ``chunk_bytes``."""
        return self._parts().write_range(path, source, offset)

    def write_rng(self, save: PendingSave) -> RngEntry:
        """Writes ``rng/rank_XXXXX.json`` and ``.bin`` (this rank's generators); returns their entry."""
        return self._parts().write_rng(save.temp, self.rank, save.rng)

    def write_marker(self, save: PendingSave, part: Part, error: str | None) -> None:
        """Drops ``parts/rank_XXXXX.json``: this rank is done with the save (``error`` None) or gave it up."""
        self._parts().write_marker(save.temp, rank=self.rank, step=save.step, session=self.session, part=part,
                                   error=error)

    # ---------------------------------------------------------------- rank 0: commit
    def _commit(self, save: PendingSave, own_error: str | None) -> SaveResult:
        """Rank 0: gives the save up at once when its own part failed (``own_error``); else waits for every rank's
        marker, and on success writes the manifest and commits, else cleans up. After a commit it removes this
        run's temporaries of earlier saves that failed (a rank may have written into one after it was removed)."""
        done = commit_save(self._target(save), lambda markers: self.build_manifest(save, markers),
                           keep_last=self.config.keep_last, timeout_s=self.config.commit_timeout_s,
                           fsync=self.config.fsync, started=save.started,
                           own_errors=[f"rank {self.rank}: {own_error}"] if own_error else ())
        if done.result.status == "committed":
            assert done.manifest is not None
            final = Path(done.result.path or "")
            remove_older_temporaries(self.root, save.step, lambda step: self.session)
            note = f"; purged {', '.join(p.name for p in done.purged)}" if done.purged else ""
            self._log(save.step, f"checkpoint {final.name} saved in {done.result.seconds:.2f} s "
                                 f"({_size(done.manifest.nbytes())}){note}", everyone=False)
        return done.result

    def build_manifest(self, save: PendingSave, markers: dict[int, dict]) -> Manifest:
        """The manifest of the save from the layout and every rank's chunks; raises if any byte of any file was
        written by no rank (or twice)."""
        return build_manifest(self._target(save), markers, layout=save.layout, data_cursor=save.data_cursor,
                              tokens_seen=save.tokens_seen, run_config=self.run_config)

    # ---------------------------------------------------------------- helpers
    def _stop_if_failed(self) -> None:
        """With ``on_error="stop"``: raises :class:`CheckpointWriteError` for the first failed save this rank has
        recorded since the last look (the persist thread appends results; the training thread reads them here)."""
        results = self.results[self._results_checked:]
        self._results_checked += len(results)
        failed = next((r for r in results if r.status == "failed"), None)
        if failed is None or self.config.on_error != "stop":
            return
        latest = storage.read_latest(self.root)
        kept = f"latest still names {latest}" if latest else "no checkpoint was committed yet"
        then = "resume from it (--resume latest)" if latest else "start the run again"
        raise CheckpointWriteError(
            f"checkpoint {step_dir_name(failed.step)} could not be written under {self.root}: {failed.error}; "
            f"training stops at step {self._last_step} (on_error='stop'); {kept}. Fix what the error names "
            f"(space, permissions, something in the way) and {then}, or set on_error='continue' "
            f"(--ckpt-on-error continue) to train on while the next save tries again")

    def _log(self, step: int, text: str, *, everyone: bool) -> None:
        """A ``[rank r, step s] checkpoint ...`` line when logging is on: on every rank, or on rank 0 only."""
        if self.config.log and (everyone or self.rank == 0):
            log_line(self.rank, step, text)


def _agree_session(rank: int, world_size: int, group: dist.ProcessGroup | None, timeout_s: float) -> str:
    """A random id shared by every rank of this run (one all-reduce at construction): it names this run's
    temporaries and markers, so leftovers of a crashed run are never mistaken for this run's."""
    value = secrets.randbits(62) if rank == 0 else 0
    if world_size > 1:
        tensor = torch.tensor([value], dtype=torch.int64)
        collectives.all_reduce(tensor, group=group, timeout_s=timeout_s)
        value = int(tensor.item())
    return f"{value:016x}"


def _any_rank(flag: bool, group: dist.ProcessGroup | None, timeout_s: float) -> bool:
    """True when ``flag`` is set on any rank (one small all-reduce on a CPU tensor, from the training thread)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    collectives.all_reduce(tensor, group=group, timeout_s=timeout_s, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _part_bytes(part: Part) -> int:
    return sum(c.length for chunks in part.chunks.values() for c in chunks)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
