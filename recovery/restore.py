"""The restore of every rank of a job after a failure: the sources of ``order.py``, tried in that order.

:func:`restore_job` is collective: every rank calls it after the job restarted (a rank crashed, a node was lost and
its replacement's snapshot process was rebuilt from its erasure-coding group, or the Ray coordinator replaced a
worker), and all ranks restore ONE common step from the best source that has it. It plans the sources from what
the job has (:func:`job_availability`: snapshots on or off, a checkpoint root, a pipeline's lost stage) and walks
them; each source is one collective attempt that every rank passes or fails together:

- kept in memory (``from_snapshots.keep_survivors``): a rank that passes ``kept_step`` survived with its state
  intact at that step boundary (``trainer.boundary.RewindableStep``); when every survivor kept the same step and
  every other rank can read it from its node, only those restore;
- the node snapshot and the erasure-coded rebuild (``from_snapshots.restore_from_slots`` /
  ``restore_from_coded``): the newest step every rank holds in a verified slot, else in a slot or its node's coded
  buffers (the path after a node loss);
- the neighbour rebuild of a pipeline's lost stage (``stage_heal.heal_lost_stage``);
- the universal checkpoint (``from_checkpoint.restore_latest``): ``latest`` under the checkpoint root; a
  pipeline's stages each read their own stage's shard, whatever layout saved it.

Each rank logs which source it used and why the better ones were passed over; the result says the same. Once
restored, the ranks start a new lineage together (``Restorable.start_lineage``): the steps the job trains from here
are told apart from the failed run's steps of the same numbers (the snapshot processes persist a step from parts
of one lineage only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from regrow.recovery.from_checkpoint import restore_latest
from regrow.recovery.from_snapshots import SnapshotSearch, keep_survivors, restore_from_coded, restore_from_slots
from regrow.recovery.order import Availability, JobRestore, RecoveryImpossible, Source, plan
from regrow.recovery.stage_heal import heal_lost_stage
from regrow.trainer.log import log_line
from regrow.trainer.pipeline.trainer import PipelineTrainer
from regrow.trainer.state import Restorable

Attempt = Callable[[], "JobRestore | None"]


def job_availability(target: Restorable, address: str | None, ckpt_root: str | None,
                     lost_ranks: Collection[int] = ()) -> Availability:
    """What may serve this job's restore, from its settings alone (the same on every rank): survivors may keep their
    state, snapshots are on when there is a node ``address`` (whether the node codes is the node's to say), a
    pipeline's ``lost_ranks`` name the lost stage, a checkpoint root may hold ``latest``."""
    pipeline = isinstance(target, PipelineTrainer)
    lost_stages = frozenset(target.topology.coord(rank).pp for rank in lost_ranks) if pipeline else frozenset()
    return Availability(survivors_keep_state=True, snapshots_enabled=address is not None, erasure_parity=None,
                        pp_size=target.n_stages if pipeline else 1,
                        lost_stage=min(lost_stages) if lost_stages else None, lost_stages=lost_stages,
                        checkfree_plus=pipeline and target.config.pipeline.checkfree_plus,
                        checkpoint_available=ckpt_root is not None)


def restore_job(target: Restorable, address: str | None, *, ckpt_root: str | None = None, token: str | None = None,
                timeout_s: float = 60.0, log: bool = True, kept_step: int | None = None,
                lost_ranks: Collection[int] = ()) -> JobRestore:
    """Restores ``target`` from the best source every rank shares (see the module docstring). Collective.

    ``address`` is this node's snapshot process (None: the job takes no snapshots, the same on every rank).
    ``kept_step``: this rank survived the failure with its state intact at this step (``target.step``); None for a
    replacement or a survivor that must restore. ``lost_ranks``: in a pipeline, the ranks whose stage is lost (the
    neighbour rebuild's input). Raises :class:`~regrow.recovery.order.SnapshotRestoreError` naming every source
    tried when none works, :class:`~regrow.recovery.order.RecoveryImpossible` when a pipeline's stage cannot be
    rebuilt either.
    """
    started = time.perf_counter()
    planned = [decision.source for decision in plan(job_availability(target, address, ckpt_root, lost_ranks))]
    search = SnapshotSearch.open(target, address, token, timeout_s)
    attempts: dict[Source, Attempt] = {
        Source.KEPT: lambda: keep_survivors(search, kept_step),
        Source.SNAPSHOT: lambda: restore_from_slots(search),
        Source.ERASURE: lambda: restore_from_coded(search),
        Source.NEIGHBORS: lambda: _rebuild_stage(target, search, kept_step, lost_ranks,
                                                 fallback=Source.CHECKPOINT in planned),
        Source.CHECKPOINT: lambda: restore_latest(target, ckpt_root, search.passed_over),
    }
    try:
        result = _first_that_serves(planned, attempts)
    finally:
        search.close()
    if result is None:
        result = _nothing_served(target, search)
    # What the job trains from here is a new history: the steps after this one that the failed run may have
    # snapshotted (or half persisted) on some node are not its steps, even where their numbers match.
    result.lineage = target.start_lineage()
    result.planned = tuple(planned)
    result.seconds, result.read_seconds = time.perf_counter() - started, search.read_seconds
    if log:
        skipped = f"; passed over: {'; '.join(result.passed_over)}" if result.passed_over else ""
        log_line(target.rank, result.step, f"restore: source {result.source} ({result.detail}), step "
                                           f"{result.step}, in {result.seconds:.2f} s (reading "
                                           f"{result.read_seconds:.2f} s, loading {result.load_seconds:.2f} s)"
                                           f"{skipped}")
    return result


def _first_that_serves(planned: list[Source], attempts: dict[Source, Attempt]) -> JobRestore | None:
    """The first planned source's restore that serves every rank (each attempt is collective)."""
    for source in planned:
        result = attempts[source]()
        if result is not None:
            return result
    return None


def _rebuild_stage(target: Restorable, search: SnapshotSearch, kept_step: int | None,
                   lost_ranks: Collection[int], *, fallback: bool) -> JobRestore | None:
    """The neighbour rebuild of a pipeline's lost stage. When it turns out impossible (the survivors at different
    steps, say: every rank finds so together) it returns None with the reason in ``search.passed_over`` if the
    checkpoint comes next (``fallback``), else raises :class:`RecoveryImpossible`."""
    assert isinstance(target, PipelineTrainer)  # planned for pipelines only (job_availability)
    if search.passed_over or search.slots or search.coded:
        log_line(target.rank, target.step, f"recovery: no snapshot serves every rank ({'; '.join(search.passed_over)})"
                                           f"; rebuilding the lost stage from its neighbours")
    try:
        result = heal_lost_stage(target, kept_step=kept_step, lost_ranks=lost_ranks)
    except RecoveryImpossible as error:
        if not fallback:
            raise
        search.passed_over.append(str(error))
        log_line(target.rank, target.step, f"recovery: {error}; restoring every stage from the checkpoint")
        return None
    result.passed_over = search.passed_over
    return result


def _nothing_served(target: Restorable, search: SnapshotSearch) -> JobRestore:
    """No planned source served: raises the error that names them all (a pipeline's, or the checkpoint
    fallback's)."""
    if isinstance(target, PipelineTrainer):
        reasons = "; ".join(search.passed_over) or "no snapshot"
        raise RecoveryImpossible(f"pipeline stage rebuild impossible: {reasons}; no neighbour rebuild serves either "
                                 f"(enable snapshots, or save universal checkpoints to fall back to)")
    return restore_latest(target, None, search.passed_over)  # raises: no checkpoint root to fall back to


__all__ = ["job_availability", "restore_job"]
