"""The shard contract: exactly what one rank must keep to resume training bit-identically.

A :class:`ShardState` is produced by the trainer after an optimizer step and consumed by whatever keeps it
(snapshot process, checkpoint writer, recovery). Nothing else is needed to resume: the working (e.g. bf16)
parameters are the all-gathered cast of the fp32 master shards, gradients are zero at a step boundary, and the
learning rate is a function of the step.

- ``tensors``: this rank's shard (``ZeroOptimizer.shard_tensors()``), keyed ``"<group>/<what>"``: ``master``
  (fp32) and ``exp_avg``/``exp_avg_sq`` (fp32) or ``exp_avg_codes``/``exp_avg_scales``/``exp_avg_sq_codes``/
  ``exp_avg_sq_scales`` (uint8 codes, fp32 block scales) per group.
- ``step``: optimizer steps completed (Adam's bias correction and the schedule depend on it).
- ``layout``: ``FlatLayout.to_dict()`` of the run plus this rank: which parameter lives where in the shard.
- ``rng``: every random generator a rank draws from (torch CPU, each CUDA device, Python, NumPy).
- ``data_cursor``: the sampler's position (``DataCursor.to_dict()``), taken at the step boundary.
- ``tokens_seen``: tokens consumed by all ranks so far (for logs and throughput).
- ``extra``: small JSON values: the lineage, and ``"user"``, the JSON part of a user loop's own state (a scheduler,
  counters) whose tensors ride in ``tensors`` under keys starting :data:`USER_PREFIX` (``launch/guard.py``).

Both directions have a contract here. Saving flows one way: the trainer hands every new state to its
:class:`StateSink` objects. Restoring flows back one way too: the checkpoint tier only *produces* states (read
from a snapshot, resharded from a universal checkpoint), and the recovery tier hands the chosen one to a
:class:`Restorable`, the training object. Neither tier calls into a trainer class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from regrow.trainer.checkpoint_view import CheckpointView
    from regrow.trainer.zero.layout import FlatLayout

USER_PREFIX = "user/"
"""Keys of ``ShardState.tensors`` that hold a user loop's own tensors (an EMA copy, say), not the optimizer's shard.
Shard keys start with a state kind's name (``trainer/zero/shard.py``), never with this."""


def optimizer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer shard of ``tensors`` (every key not under :data:`USER_PREFIX`), in order."""
    return {key: value for key, value in tensors.items() if not key.startswith(USER_PREFIX)}


def user_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The user loop's tensors of ``tensors`` (keys under :data:`USER_PREFIX`), in order."""
    return {key: value for key, value in tensors.items() if key.startswith(USER_PREFIX)}


@dataclass
class RngState:
    """The state of every random generator a rank uses."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]
    python: tuple
    numpy: dict

    @classmethod
    def capture(cls) -> "RngState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(
            torch_cpu=torch.get_rng_state(),
            torch_cuda=list(cuda),
            python=random.getstate(),
            numpy=np.random.get_state(legacy=False),
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


@dataclass
class ShardState:
    """Everything one rank must save to resume bit-identically (see the module docstring for each field)."""

    step: int
    tensors: dict[str, torch.Tensor]
    layout: dict
    rank: int
    rng: RngState
    data_cursor: dict[str, int]
    tokens_seen: int
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensor data in the shard (what a snapshot must hold)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class StateSink(Protocol):
    """Something that keeps shard states: the in-memory snapshot manager, the checkpoint writer, ...

    The trainer calls ``before_optimizer_step()`` right before every optimizer step (whose update is the only thing
    that mutates the shard: a sink copying the previous state must finish reading it now, or make the device wait
    for that) and ``after_step(state)`` right after every step with the new state, whose tensors are live buffers:
    copy what must outlive the next step.
    ``close()`` is called once when training ends.

    Optional: a sink that defines ``after_forward()`` has it called once per step, after the forward of the step's
    first micro-batch and before its backward (the snapshot sink starts its device-to-host copy there: a copy that
    overlaps the forward slows the forward's kernel launches). A sink that defines ``before_update()`` has it called
    inside the optimizer step, after the gradient norm and right before the update, *instead of*
    ``before_optimizer_step()`` (``sink_calls.hook_sinks``): for waits that only protect the shard.
    """

    def before_optimizer_step(self) -> None: ...

    def after_step(self, state: ShardState) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Restorable(Protocol):
    """A training object that recovery can restore: regrow's ``Trainer`` and ``PipelineTrainer`` satisfy it.

    The recovery tier (``regrow.recovery``) is its only caller: it picks a source, has the checkpoint tier produce
    this rank's :class:`ShardState` at :attr:`layout`, and hands it over. Every rank of the job calls the collective
    methods together, in the same order; the attributes describe this rank at its current step boundary.
    """

    rank: int
    """This rank in the job's default process group."""
    world_size: int
    """Ranks in the job's default process group."""
    step: int
    """Optimizer steps completed at the current step boundary."""
    initialized: bool
    """The weights hold a real state (False only for an object built to be restored, before its restore)."""
    device: torch.device
    """Where the working parameters live (a snapshot read for a CUDA rank is verified on that GPU)."""
    timeout_s: float
    """Limit of the collectives a restore runs besides :meth:`restore` (the ranks' agreement on a source)."""

    @property
    def layout(self) -> FlatLayout:
        """The flat layout of this rank's optimizer shard: :meth:`restore` takes states of this layout only (a
        universal checkpoint is resharded to it while it is read)."""
        ...

    def checkpoint_view(self) -> CheckpointView:
        """How this rank's shard maps onto a universal checkpoint's per-parameter files (the identity for a
        data-parallel rank; a pipeline stage's names and copies)."""
        ...

    def restore(self, state: ShardState) -> None:
        """Resumes from ``state`` (this rank's shard at :attr:`layout`), its step, data cursor, generators and
        lineage included. Collective: it ends with the all-gather of the working parameters."""
        ...

    def gather_parameters(self) -> None:
        """The collective part of :meth:`restore` without a new state: a rank that keeps its state joins the
        all-gather of the working parameters that the restoring ranks' :meth:`restore` ends with."""
        ...

    def at_initial_state(self) -> bool:
        """True while no optimizer update has begun since the object was built (or reset) at step 0: it holds
        step 0's seeded state, or would once :meth:`reset_to_initial_state` builds it (when not ``initialized``)."""
        ...

    def reset_to_initial_state(self) -> None:
        """Builds the seeded initial state of step 0 (for an object built to be restored that turns out to need
        step 0's state, which no snapshot holds). Not collective."""
        ...

    def start_lineage(self) -> str:
        """Starts and returns a new lineage id, the same on every rank (collective): the states trained from a
        restored step on are told apart from the failed run's states of the same step numbers."""
        ...

    def run_config(self) -> dict:
        """The run's settings as a JSON-able dict (what a checkpoint records, and what a resume compares)."""
        ...
