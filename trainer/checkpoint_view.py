"""How one rank's optimizer shard maps onto a universal checkpoint's per-parameter files (:class:`CheckpointView`).

A universal checkpoint stores one file per parameter of the *whole model* and state kind, under the model's own
parameter names, whatever layout wrote it. A data-parallel rank's shard names its parameters as the model does and
is sharded over the whole world, so its view is the identity (:meth:`CheckpointView.identity`). A pipeline stage is
not: its parameters carry role-based local names (``blocks.0...`` on every stage), its shard is split over the
stage's data-parallel group only, and the tied embedding/head (and CheckFree+'s replicas) live on several stages.
Its view says

- ``names``: local name -> the whole model's name (``blocks.0.attn...`` of stage 2 of 4 with 8 blocks is
  ``blocks.4.attn...``; the head's ``lm_head.weight`` is the tied ``wte.weight``);
- ``shard_rank``: the rank's index among the ranks its layout is sharded over (its stage's data-parallel group);
- ``copies``: local names this rank holds a copy of but does not write (the parameter's owner stage writes it;
  every holder reads it back);
- ``stage``: the stage's own record (:class:`StageRecord`: its Adam step count and learning-rate scale, which a
  neighbour rebuild resets), stored per stage in the manifest's ``pipeline`` section.

The view travels in ``ShardState.extra["checkpoint_view"]`` (so the checkpoint writer and the node's snapshot process,
which persists snapshots in the same format, write a stage's part alike); the loader gets the restoring object's view
from ``Restorable.checkpoint_view()``. The checkpoint tier reads views, only trainers make them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

VIEW_KEY = "checkpoint_view"
"""The key of ``ShardState.extra`` holding :meth:`CheckpointView.to_dict` (absent: the identity view)."""


@dataclass(frozen=True)
class StageRecord:
    """What a pipeline stage keeps besides its shard: where it sits and the per-stage optimizer values."""

    stage: int
    """This stage's index in the pipeline."""
    stages: int
    """Pipeline stages S of the job that wrote it."""
    dp_size: int
    """Data-parallel replicas D of that job (S x D ranks)."""
    optimizer_steps: int
    """Adam's step count (the bias correction): the job's step, unless a neighbour rebuild restarted the stage."""
    lr_scale: float
    """Factor on the learning rate (1.0, unless a neighbour rebuild set another)."""

    def __post_init__(self) -> None:
        if not 0 <= self.stage < self.stages or self.dp_size < 1 or self.optimizer_steps < 0:
            raise ValueError(f"StageRecord: stage {self.stage} of {self.stages} stages, dp_size {self.dp_size}, "
                             f"optimizer_steps {self.optimizer_steps} is not a valid stage")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ValueError(f"StageRecord.lr_scale={self.lr_scale!r} must be a finite number > 0")


@dataclass(frozen=True)
class CheckpointView:
    """The map between one rank's shard and a universal checkpoint (see the module docstring)."""

    shard_rank: int
    """This rank's index in the shard's layout (its rank in the group that shards the optimizer state)."""
    names: dict[str, str] = field(default_factory=dict)
    """Local parameter name -> checkpoint name, for the names that differ (a name not listed is its own)."""
    copies: frozenset[str] = frozenset()
    """Local names of copies whose owner (another stage, or another local name) writes the checkpoint file."""
    stage: StageRecord | None = None
    """The pipeline stage's record; None for a data-parallel rank."""
    model: dict[str, tuple[int, ...]] | None = None
    """Loading only: every checkpoint name of the whole model and its shape, so that a stage (which holds part of
    the model) can still check that the checkpoint is of this model. None: the shard's layout is the whole model.
    Not part of :meth:`to_dict`."""

    @classmethod
    def identity(cls, shard_rank: int) -> CheckpointView:
        """A rank whose layout names the model's parameters and is sharded over the whole world."""
        return cls(shard_rank=shard_rank)

    def name(self, local: str) -> str:
        """The checkpoint name of local parameter ``local``."""
        return self.names.get(local, local)

    def writes(self, local: str) -> bool:
        """Whether this rank writes its pieces of ``local`` (False for a copy another holder writes)."""
        return local not in self.copies

    def to_dict(self) -> dict:
        """JSON-able form for ``ShardState.extra`` (without :attr:`model`)."""
        data: dict = {"shard_rank": self.shard_rank, "names": dict(self.names), "copies": sorted(self.copies)}
        if self.stage is not None:
            data["stage"] = asdict(self.stage)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointView:
        stage = data.get("stage")
        return cls(shard_rank=int(data["shard_rank"]), names=dict(data.get("names", {})),
                   copies=frozenset(data.get("copies", ())),
                   stage=StageRecord(**stage) if stage is not None else None)

    @classmethod
    def of_state(cls, extra: dict, rank: int) -> CheckpointView:
        """The view a state was saved with: ``extra[VIEW_KEY]``, or the identity view of ``rank`` without one."""
        data = extra.get(VIEW_KEY)
        return cls.from_dict(data) if data is not None else cls.identity(rank)


__all__ = ["VIEW_KEY", "CheckpointView", "StageRecord"]
