"""Going back to the start of an optimizer step that a peer's failure interrupted ("survivors keep their state").

When a rank dies mid-step, the survivors' training calls fail inside a collective. Most of the step is then
undone for free: parameters and optimizer state change only in the optimizer's update, after every collective that
a failure usually interrupts (the gradient reduction, the loss and norm all-reduces). What the failed step did
consume is the data position, the random generators and partial gradients. :class:`StepBoundary` records the first
two when a step begins; :meth:`RewindableStep.rewind_interrupted_step` puts them back and drops the gradients, so a
survivor is exactly at the last step boundary again and need not restore anything. Only when the failure came
after the update had begun (the all-gather of the new parameters) is the survivor's state mixed, and it must
restore like a replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

from regrow.trainer.data import DataCursor, Sampler
from regrow.trainer.state import RngState
from regrow.trainer.zero.optimizer import ZeroOptimizer


@dataclass(frozen=True)
class StepBoundary:
    """The rank's position when optimizer step ``step + 1`` began."""

    step: int
    optimizer_steps: int
    """The optimizer's own step count then (a neighbour rebuild restarts it, so it may differ from ``step``)."""
    rng: RngState
    cursor: DataCursor
    tokens_seen: int


class RewindableStep:
    """Mixed into a trainer that has ``step``, ``optimizer`` (:class:`ZeroOptimizer`), ``sampler`` and
    ``tokens_seen``. The trainer calls :meth:`_begin_step` first thing in every ``train_step``."""

    step: int
    optimizer: ZeroOptimizer
    sampler: Sampler
    tokens_seen: int
    _boundary: StepBoundary | None = None

    def _begin_step(self) -> None:
        self._boundary = StepBoundary(step=self.step, optimizer_steps=self.optimizer.step_count,
                                      rng=RngState.capture(), cursor=self.sampler.state(),
                                      tokens_seen=self.tokens_seen)

    def rewind_interrupted_step(self) -> bool:
        """Call after ``train_step`` raised. Drops partial gradients; if the parameters and optimizer state are
        still those of ``self.step``, puts the data position, random generators and token count back to that step
        boundary and returns True (this rank keeps its state). Returns False when the update had already begun:
        the state is then a mix of two steps and must be restored."""
        self.optimizer.discard_step()
        boundary = self._boundary
        if boundary is None or boundary.step != self.step:
            return True  # no step began since the last boundary, or it finished and a sink failed after it
        if self.optimizer.step_count != boundary.optimizer_steps:
            return False
        self.sampler.load_state(boundary.cursor)
        boundary.rng.restore()
        self.tokens_seen = boundary.tokens_seen
        return True


__all__ = ["RewindableStep", "StepBoundary"]
