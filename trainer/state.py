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
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


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

    The trainer calls ``before_optimizer_step()`` right before every optimizer step (the only thing that mutates
    the shard: a sink copying the previous state must finish reading it now) and ``after_step(state)`` right after
    every step with the new state, whose tensors are live buffers: copy what must outlive the next step.
    ``close()`` is called once when training ends.

    Optional: a sink that defines ``after_forward()`` has it called once per step, after the forward of the step's
    first micro-batch and before its backward (the snapshot sink starts its device-to-host copy there: a copy that
    overlaps the forward slows the forward's kernel launches).
    """

    def before_optimizer_step(self) -> None: ...

    def after_step(self, state: ShardState) -> None: ...

    def close(self) -> None: ...
