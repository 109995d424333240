"""Healing a pipeline-parallel job under the coordinator when no snapshot holds the lost stage: the survivors keep
their state and the lost stage is rebuilt from its neighbours (CheckFree / CheckFree+, ``recovery.neighbor``).

The coordinator replaces the dead workers and forms the next process-group generation; then every rank calls
:func:`heal_lost_stage`. It is collective and decides the same way on every rank, from what all ranks report:

- every survivor went back to the same step boundary (``trainer.boundary``) and the dead ranks all held one stage:
  :func:`~regrow.recovery.policy.recover_stage` rebuilds that stage in every replica from its neighbours (the
  replacements receive the weights, the step and the data position; the neighbours only send);
- otherwise (survivors at different steps, one caught mid-update, or lost stages no neighbour can rebuild) it
  raises :class:`~regrow.recovery.policy.RecoveryImpossible`, naming why: pipeline stages are not restored from a
  universal checkpoint here, so the coordinator stops with that error rather than train on a mixed state.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from regrow.comm import collectives
from regrow.recovery.neighbor import NeighborConfig
from regrow.recovery.policy import Availability, RecoveryImpossible, Source, recover_stage
from regrow.trainer.pipeline.trainer import PipelineTrainer

NOT_KEPT = -1


@dataclass
class StageHeal:
    """What :func:`heal_lost_stage` did on this rank."""

    source: str
    """``"kept in memory"`` (this rank's state was not touched) or ``"neighbour rebuild"`` (its stage was rebuilt)."""
    step: int
    detail: str


def survivor_steps(trainer: PipelineTrainer, kept_step: int | None) -> list[int]:
    """Every rank's kept step (``NOT_KEPT`` for a replacement or a rank that must restore), in rank order."""
    mine = torch.tensor([NOT_KEPT if kept_step is None else kept_step], dtype=torch.int64, device=trainer.device)
    everyone = torch.empty(trainer.topology.world_size, dtype=torch.int64, device=trainer.device)
    collectives.all_gather(everyone, mine, group=None, timeout_s=trainer.timeout_s)
    return [int(step) for step in everyone.cpu()]


def heal_lost_stage(trainer: PipelineTrainer, *, kept_step: int | None, lost_ranks: Collection[int],
                    neighbor: NeighborConfig | None = None) -> StageHeal:
    """Rebuilds the stage of ``lost_ranks`` from its neighbours (see the module docstring). Collective: every rank
    calls it with the same ``lost_ranks``, a survivor with the step it kept its state at, a replacement with None.
    Raises :class:`RecoveryImpossible` when the job cannot go on without a snapshot."""
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
        return StageHeal(source=Source.NEIGHBORS.value, step=trainer.step, detail=decision.reason)
    return StageHeal(source="kept in memory", step=trainer.step, detail="this rank's memory")


__all__ = ["StageHeal", "heal_lost_stage", "survivor_steps"]
