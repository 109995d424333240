"""The neighbour-rebuild source of the recovery order (``order.py``): a pipeline stage that no snapshot holds is
rebuilt from its neighbour stages (CheckFree / CheckFree+, ``neighbor.py``) while the survivors keep their state.

:func:`recover_stage` logs the order's decision for a lost stage and applies it when it is a neighbour rebuild.
:func:`heal_lost_stage` is that source in a job's restore (``restore.restore_job``, after the coordinator replaced
the dead workers and formed the next process-group generation). It is collective and decides the same way on
every rank, from what all ranks report:

- every survivor went back to the same step boundary (``trainer.boundary``) and the dead ranks all held one stage:
  :func:`recover_stage` rebuilds that stage in every replica from its neighbours (the replacements receive the
  weights, the step and the data position; the neighbours only send);
- otherwise (survivors at different steps, one caught mid-update, or lost stages no neighbour can rebuild) it
  raises :class:`~regrow.recovery.order.RecoveryImpossible`, naming why: pipeline stages are not restored from a
  universal checkpoint here, so the coordinator stops with that error rather than train on a mixed state.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from regrow.comm import collectives
from regrow.recovery.neighbor import NeighborConfig, rebuild_from_neighbors
from regrow.recovery.order import Availability, Decision, JobRestore, RecoveryImpossible, Source, decide
from regrow.trainer.log import log_line
from regrow.trainer.pipeline.trainer import PipelineTrainer

NOT_KEPT = -1


def log_decision(rank: int, step: int, decision: Decision) -> None:
    """``[rank r, step s] recovery: <source>: <reason>``."""
    log_line(rank, step, f"recovery: {decision.source.value}: {decision.reason}")


def recover_stage(trainer: PipelineTrainer, available: Availability, config: NeighborConfig | None = None
                  ) -> Decision:
    """Decides how to restore ``available.lost_stage`` (``order.decide``), logs it, and applies a neighbour rebuild.

    Call on every rank at the same step boundary with the same ``available``. Other sources are returned for the
    caller to apply (``restore.restore_job`` walks them).
    """
    decision = decide(available)
    log_decision(trainer.rank, trainer.step, decision)
    if decision.source is Source.NEIGHBORS:
        assert decision.plan is not None
        rebuild_from_neighbors(trainer, decision.plan, config or NeighborConfig())
    return decision


def survivor_steps(trainer: PipelineTrainer, kept_step: int | None) -> list[int]:
    """Every rank's kept step (``NOT_KEPT`` for a replacement or a rank that must restore), in rank order."""
    mine = torch.tensor([NOT_KEPT if kept_step is None else kept_step], dtype=torch.int64, device=trainer.device)
    everyone = torch.empty(trainer.topology.world_size, dtype=torch.int64, device=trainer.device)
    collectives.all_gather(everyone, mine, group=None, timeout_s=trainer.timeout_s)
    return [int(step) for step in everyone.cpu()]


def heal_lost_stage(trainer: PipelineTrainer, *, kept_step: int | None, lost_ranks: Collection[int],
                    neighbor: NeighborConfig | None = None) -> JobRestore:
    """Rebuilds the stage of ``lost_ranks`` from its neighbours (see the module docstring). Collective: every rank
    calls it with the same ``lost_ranks``, a survivor with the step it kept its state at, a replacement with None.
    Returns :attr:`Source.NEIGHBORS` on the rebuilt stage's ranks, :attr:`Source.KEPT` on the others. Raises
    :class:`RecoveryImpossible` when the job cannot go on without a snapshot."""
    kept = survivor_steps(trainer, kept_step)
    lost = sorted(set(lost_ranks))
    unkept = [rank for rank, step in enumerate(kept) if step == NOT_KEPT and rank not in lost]
    steps = sorted({step for step in kept if step != NOT_KEPT})
    if unkept or len(steps) != 1:
        why = (f"surviving ranks {unkept} were caught mid-update" if unkept
               else f"the survivors are at different steps {steps}" if steps else "no rank survived")
        raise RecoveryImpossible(f"pipeline stage rebuild impossible: {why}; without snapshots nothing else can "
                                 f"restore the lost stage (enable snapshots, or restart from a checkpoint)")
    lost_stages = frozenset(trainer.topology.coord(rank).pp for rank in lost)
    if len(lost_stages) != 1:
        raise RecoveryImpossible(f"pipeline stage rebuild impossible: ranks {lost} held stages "
                                 f"{sorted(lost_stages)}; a neighbour rebuild restores one stage at a time")
    (stage,) = lost_stages
    available = Availability(lost_stage=stage, pp_size=trainer.n_stages, lost_stages=lost_stages,
                             checkfree_plus=trainer.config.pipeline.checkfree_plus, snapshots_enabled=False,
                             checkpoint_available=False)
    decision = recover_stage(trainer, available, neighbor)
    if decision.source is not Source.NEIGHBORS:
        raise RecoveryImpossible(f"pipeline stage rebuild impossible: {decision.reason}")
    if trainer.stage == stage:
        return JobRestore(source=Source.NEIGHBORS, step=trainer.step, detail=decision.reason)
    return JobRestore(source=Source.KEPT, step=trainer.step, detail="this rank's memory")


__all__ = ["heal_lost_stage", "log_decision", "recover_stage", "survivor_steps"]
