"""The parts of the restore contract (``state.Restorable``) that a trainer answers from its sharded optimizer; both
trainers mix :class:`OptimizerBackedRestore` in, and add what is their own (``restore``, the initial state, the run
config, the lineage)."""

from __future__ import annotations

from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.zero.layout import FlatLayout
from regrow.trainer.zero.optimizer import ZeroOptimizer


class OptimizerBackedRestore:
    """Mixed into a trainer that has ``step`` and ``optimizer`` (:class:`ZeroOptimizer`)."""

    step: int
    optimizer: ZeroOptimizer

    @property
    def layout(self) -> FlatLayout:
        """The flat layout of this rank's optimizer shard: a restored state must be of this layout."""
        return self.optimizer.layout

    def checkpoint_view(self) -> CheckpointView:
        """The identity: the shard names the model's parameters and is sharded over the optimizer's group."""
        return CheckpointView.identity(self.optimizer.rank)

    def at_initial_state(self) -> bool:
        """No optimizer update has begun since the trainer was built or reset at step 0."""
        return self.step == 0 and self.optimizer.step_count == 0

    def gather_parameters(self) -> None:
        """All-gathers the working parameters from the shards of the optimizer's data-parallel group (collective
        over that group, as ``restore`` is)."""
        self.optimizer.gather_parameters()


__all__ = ["OptimizerBackedRestore"]
