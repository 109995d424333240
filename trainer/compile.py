"""Compiling the model's forward with ``torch.compile`` (``TrainerConfig.compile``, ``regrow train --compile``).

The trainer keeps the model itself (its parameters, their names and hooks are what the sharded optimizer, the
snapshots and the checkpoints see) and calls a compiled wrapper of it for the forward and the loss. The wrapper
shares the model's parameters, so a restore, which copies into them in place, needs no recompile; only a rebuilt
model (a replacement's seeded initial state) is wrapped again.

``auto`` compiles with inductor on CUDA and not on the CPU (there a compile costs more than it saves on the small
models trained on CPUs); a backend name compiles with that backend anywhere: ``aot_eager`` traces the forward and
its backward into graphs and runs them without generating code, which is what the CPU tests use.
"""

from __future__ import annotations

import torch
from torch import nn

OFF = "off"
AUTO = "auto"


def check_compile(value: object, field: str = "TrainerConfig.compile") -> None:
    """Raises ValueError naming ``field`` unless ``value`` is "off", "auto" or a backend ``torch.compile`` knows."""
    if value in (OFF, AUTO):
        return
    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(value, str) or value not in backends:
        raise ValueError(f"{field}={value!r} is invalid: use 'off', 'auto' (inductor on CUDA, off on the CPU) or a "
                         f"torch.compile backend: {', '.join(backends)}")


def backend_for(value: str, device: torch.device, *, zero_stage: int = 1) -> str | None:
    """The backend ``value`` compiles with on ``device``; None: the model runs eagerly. Nothing compiles at ZeRO
    stage 3 (``zero_stage``), whose gathers run in module hooks: "auto" is off there, and ``TrainerConfig`` refuses
    a backend named with it."""
    if value == OFF or zero_stage == 3:
        return None
    if value == AUTO:
        return "inductor" if device.type == "cuda" else None
    return value


def compiled_forward(model: nn.Module, backend: str | None) -> nn.Module:
    """What the trainer calls for the forward of ``model``: a compiled wrapper sharing its parameters, or the model
    itself when ``backend`` is None."""
    return model if backend is None else torch.compile(model, backend=backend)


__all__ = ["AUTO", "OFF", "backend_for", "check_compile", "compiled_forward"]
