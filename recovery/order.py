"""The recovery order: which sources can restore a job's lost state, best first, and one name for each.

Every restore in regrow walks this order (``restore.restore_job``: the local launcher's restarts, torchrun's
restarts, ``--resume snapshot``, the Ray workers; ``stage_heal`` for a pipeline's lost stage). The sources:

1. :attr:`Source.KEPT`: the survivors of a failure keep the state they hold in memory (they went back to the step
   boundary, ``trainer.boundary``); only the other ranks restore that step, from their node;
2. :attr:`Source.SNAPSHOT`: the newest step every rank holds in its node's snapshot process;
3. :attr:`Source.ERASURE`: a step rebuilt from the erasure-coded buffers of the node's group (after a node loss);
4. :attr:`Source.NEIGHBORS`: a pipeline stage no snapshot holds, rebuilt from its neighbour stages (CheckFree);
5. :attr:`Source.CHECKPOINT`: the newest universal checkpoint that verifies.

:func:`plan` is a pure function from what may serve (:class:`Availability`) to the sources worth trying, in that
order, each with the reason it was chosen and the reasons better ones were passed over; :func:`decide` is its
first entry. A source that is planned may still fail at run time (a corrupt slot, a step not every rank holds):
the restore then moves to the next planned one and records why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from regrow.recovery.neighbor import NeighborRecoveryError, RebuildPlan, plan_rebuild


class Source(enum.StrEnum):
    """Where a rank's restored state came from (the value is what logs, events and reports show)."""

    KEPT = "kept in memory"
    SNAPSHOT = "snapshot"
    ERASURE = "erasure-coded buffer"
    NEIGHBORS = "neighbour rebuild"
    CHECKPOINT = "checkpoint"


ORDER: tuple[Source, ...] = (Source.KEPT, Source.SNAPSHOT, Source.ERASURE, Source.NEIGHBORS, Source.CHECKPOINT)
"""Best first: the cheaper and newer a source's state, the earlier it is tried."""

FALLBACK = "recovery.from_checkpoint.restore_trainer (the universal checkpoint)"
"""What an error names when no in-memory snapshot serves."""


class RecoveryImpossible(RuntimeError):
    """No source can restore the lost state; the message lists why each one was passed over."""


class SnapshotRestoreError(RuntimeError):
    """No usable in-memory snapshot for this restore and no checkpoint to fall back to; the message names the
    sources tried and the fallback."""


@dataclass(frozen=True, kw_only=True)
class Availability:
    """What may serve a restore: the job's settings and what is known to be lost. What is not known counts as
    available (a source that then does not serve is passed over at run time, with the reason)."""

    survivors_keep_state: bool = False
    """Ranks that survived the failure may keep their in-memory state (only the others restore)."""
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
    erasure_parity: int | None = 0
    """Node losses the erasure-coding group tolerates (0: no erasure coding; None: not known here, the node says)."""
    lost_nodes_in_group: int = 0
    """Nodes of the lost rank's erasure-coding group that were lost."""
    checkpoint_available: bool = True
    """A universal checkpoint may exist (a checkpoint root is known)."""


@dataclass(frozen=True)
class Decision:
    """A source worth trying, why, and for a neighbour rebuild its plan."""

    source: Source
    reason: str
    plan: RebuildPlan | None = None


def plan(available: Availability) -> list[Decision]:
    """Every source that may serve, in :data:`ORDER`. A reason names, for the first source only, why the better
    ones were passed over. Raises :class:`RecoveryImpossible` when none may serve."""
    passed: list[str] = []
    chosen: list[Decision] = []
    for source in ORDER:
        decision = _consider(source, available, passed)
        if decision is not None:
            chosen.append(decision)
    if not chosen:
        raise RecoveryImpossible("no source can restore the lost state: " + "; ".join(passed + ["no checkpoint"]))
    return chosen


def decide(available: Availability) -> Decision:
    """The best source for the lost state (the first of :func:`plan`); raises :class:`RecoveryImpossible` if none."""
    return plan(available)[0]


def _consider(source: Source, available: Availability, passed: list[str]) -> Decision | None:
    """``source``'s decision when it may serve, else None with the reason appended to ``passed`` (sources that do
    not apply at all, such as survivors when there are none, add no reason)."""
    if source is Source.KEPT:
        # A pipeline without snapshots keeps its survivors' state through the neighbour rebuild instead.
        if available.survivors_keep_state and (available.snapshots_enabled or available.pp_size < 2):
            return Decision(source, "the survivors keep their state; the other ranks restore their step")
        return None
    if source is Source.SNAPSHOT:
        if not available.snapshots_enabled:
            passed.append("snapshots are disabled")
        elif available.snapshot_process_alive:
            return Decision(source, "the node's snapshot process holds the lost rank's last snapshot")
        return None
    if source is Source.ERASURE:
        return _consider_erasure(available, passed)
    if source is Source.NEIGHBORS:
        return _consider_neighbors(available, passed)
    if available.checkpoint_available:
        return Decision(Source.CHECKPOINT, "; ".join(passed))
    return None


def _consider_erasure(available: Availability, passed: list[str]) -> Decision | None:
    parity, lost = available.erasure_parity, available.lost_nodes_in_group
    if not available.snapshots_enabled:
        return None
    if parity is None:
        return Decision(Source.ERASURE, "the node's group may hold erasure-coded buffers of the step")
    if available.snapshot_process_alive:
        if parity > 0:
            return Decision(Source.ERASURE, f"the group's parity ({parity}) covers a snapshot that fails to read")
        return None
    if 0 < lost <= parity:
        return Decision(Source.ERASURE, f"snapshot process lost with its node; {lost} node(s) of the group lost, "
                                        f"parity covers {parity}")
    passed.append(f"snapshot process lost with its node and {lost} node(s) of the group lost, more than the "
                  f"erasure code's parity {parity}")
    return None


def _consider_neighbors(available: Availability, passed: list[str]) -> Decision | None:
    if available.lost_stage is None or available.pp_size < 2:
        passed.append("not a pipeline stage (no neighbours)")
        return None
    try:
        rebuild = plan_rebuild(available.lost_stage, available.pp_size, available.lost_stages,
                               available.checkfree_plus)
    except NeighborRecoveryError as error:
        passed.append(str(error))
        return None
    how = "average of stages" if rebuild.mode == "average" else "copy of stage"
    why_not_better = f"{'; '.join(passed)}: " if passed else ""
    reason = f"{why_not_better}stage {rebuild.lost} from the {how} {list(rebuild.sources)}"
    return Decision(Source.NEIGHBORS, reason, rebuild)


@dataclass
class JobRestore:
    """What a restore did on this rank."""

    source: Source
    step: int
    detail: str
    """The slot path or checkpoint directory used, or what was kept."""
    passed_over: list[str] = field(default_factory=list)
    """Why better sources or newer steps were not used."""
    seconds: float = 0.0
    read_seconds: float = 0.0
    """Of ``seconds``, the time spent reading and verifying snapshots (every step tried)."""
    load_seconds: float = 0.0
    """Of ``seconds``, the time spent loading the state into the training object (the rest: agreeing on the step)."""
    lineage: str = ""
    """The lineage the job goes on in from the restored step: the same on every rank."""
    planned: tuple[Source, ...] = ()
    """The sources the restore was ready to try, in order (:func:`plan`)."""


__all__ = ["Availability", "Decision", "FALLBACK", "JobRestore", "ORDER", "RecoveryImpossible", "Source",
           "SnapshotRestoreError", "decide", "plan"]
