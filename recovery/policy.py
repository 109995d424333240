"""Which source restores a lost rank's state, in DESIGN.md's order, and applying the neighbour rebuild.

The order is: the node's local snapshot -> an erasure-coded rebuild from the group's peers -> neighbour averaging
(a pipeline stage that no snapshot can restore) -> the last universal checkpoint. :func:`decide` is a small pure
function over :class:`Availability` (what survived, as the coordinator sees it), so a coordinator can call it
before anything is restored; its :class:`Decision` carries the reason, including why better sources were passed
over. :func:`recover_stage` logs the decision on every rank (``[rank r, step s] recovery: ...``) and applies it
when it is a neighbour rebuild; the snapshot and checkpoint restores belong to ``checkpoint/``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from regrow.recovery.neighbor import (
    NeighborConfig,
    NeighborRecoveryError,
    RebuildPlan,
    plan_rebuild,
    rebuild_from_neighbors,
)
from regrow.trainer.log import log_line
from regrow.trainer.pipeline.trainer import PipelineTrainer


class Source(enum.Enum):
    SNAPSHOT = "local snapshot"
    ERASURE = "erasure-coded rebuild"
    NEIGHBORS = "neighbour rebuild"
    CHECKPOINT = "universal checkpoint"


class RecoveryImpossible(RuntimeError):
    """No source can restore the lost state; the message lists why each one was passed over."""


@dataclass(frozen=True, kw_only=True)
class Availability:
    """What survived a failure, as seen by whoever decides (a coordinator, a test)."""

    lost_stage: int | None = None
    """The pipeline stage whose state is lost (in every replica); None when the job has no pipeline."""
    pp_size: int = 1
    """Pipeline stages of the job."""
    lost_stages: frozenset[int] = field(default_factory=frozenset)
    """Every stage lost in this failure (``lost_stage`` included): its neighbours can only help if not in here."""
    checkfree_plus: bool = False
    """The job trains with CheckFree+ (edge stages can be copied from their neighbour)."""
    snapshots_enabled: bool = True
    """In-memory snapshots are taken at all."""
    snapshot_process_alive: bool = True
    """The lost rank's node snapshot process survived with its segments (a process crash, not a node loss)."""
    erasure_parity: int = 0
    """Node losses the erasure-coding group tolerates (0: no erasure coding)."""
    lost_nodes_in_group: int = 0
    """Nodes of the lost rank's erasure-coding group that were lost."""
    checkpoint_available: bool = True
    """A verified universal checkpoint exists."""


@dataclass(frozen=True)
class Decision:
    """The chosen source, why, and for a neighbour rebuild its plan."""

    source: Source
    reason: str
    plan: RebuildPlan | None = None


def decide(available: Availability) -> Decision:
    """The best source for the lost state, trying DESIGN.md's order; raises :class:`RecoveryImpossible` if none."""
    passed: list[str] = []
    if not available.snapshots_enabled:
        passed.append("snapshots are disabled")
    elif available.snapshot_process_alive:
        return Decision(Source.SNAPSHOT, "the node's snapshot process holds the lost rank's last snapshot")
    elif 0 < available.lost_nodes_in_group <= available.erasure_parity:
        return Decision(Source.ERASURE, f"snapshot process lost with its node; {available.lost_nodes_in_group} "
                        f"node(s) of the group lost, parity covers {available.erasure_parity}")
    else:
        passed.append(f"snapshot process lost with its node and {available.lost_nodes_in_group} node(s) of the "
                      f"group lost, more than the erasure code's parity {available.erasure_parity}")
    if available.lost_stage is None or available.pp_size < 2:
        passed.append("not a pipeline stage (no neighbours)")
    else:
        try:
            plan = plan_rebuild(available.lost_stage, available.pp_size, available.lost_stages,
                                available.checkfree_plus)
            how = "average of stages" if plan.mode == "average" else "copy of stage"
            reason = f"{'; '.join(passed)}: stage {plan.lost} from the {how} {list(plan.sources)}"
            return Decision(Source.NEIGHBORS, reason, plan)
        except NeighborRecoveryError as error:
            passed.append(str(error))
    if available.checkpoint_available:
        return Decision(Source.CHECKPOINT, "; ".join(passed))
    raise RecoveryImpossible("no source can restore the lost state: " + "; ".join(passed + ["no checkpoint"]))


def log_decision(rank: int, step: int, decision: Decision) -> None:
    """``[rank r, step s] recovery: <source>: <reason>``."""
    log_line(rank, step, f"recovery: {decision.source.value}: {decision.reason}")


def recover_stage(
    trainer: PipelineTrainer, available: Availability, config: NeighborConfig | None = None
) -> Decision:
    """Decides how to restore ``available.lost_stage``, logs it, and applies a neighbour rebuild.

    Call on every rank at the same step boundary with the same ``available``. Other sources are returned for the
    caller to apply (they restore from ``checkpoint/``, which the trainer layer does not import).
    """
    decision = decide(available)
    log_decision(trainer.rank, trainer.step, decision)
    if decision.source is Source.NEIGHBORS:
        assert decision.plan is not None
        rebuild_from_neighbors(trainer, decision.plan, config or NeighborConfig())
    return decision
