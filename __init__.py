"""regrow: fault-tolerant distributed training for PyTorch.

The names a user needs are here, imported on first use (``import regrow`` alone loads no torch, so the node's
snapshot process starts without it)::

    import regrow
    world = regrow.join_world()
    optimizer = regrow.ZeroOptimizer(model, stage=2, state_bits=8)
    guard = regrow.Guard(model, optimizer, sampler=sampler, state={"schedule": schedule})

Everything else stays importable from its module. Subpackages: ``regrow.comm`` (process groups, topology,
collectives), ``regrow.trainer`` (8-bit ZeRO optimizer, models, data, training loop), ``regrow.checkpoint``
(snapshots and universal checkpoints), ``regrow.recovery`` (failure handling), ``regrow.launch`` (CLI, launchers
and the own-loop ``Guard``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ZeroOptimizer": "regrow.trainer.zero.optimizer",
    "ZeroConfig": "regrow.trainer.zero.config",
    "Trainer": "regrow.trainer.loop",
    "TrainerConfig": "regrow.trainer.loop",
    "GPTConfig": "regrow.trainer.models",
    "ModelFactory": "regrow.trainer.model_factory",
    "DataConfig": "regrow.trainer.data",
    "DataCursor": "regrow.trainer.data",
    "Sampler": "regrow.trainer.data",
    "Guard": "regrow.launch.guard",
    "GuardConfig": "regrow.launch.guard",
    "Stateful": "regrow.trainer.user_state",
    "World": "regrow.comm.world",
    "join_world": "regrow.comm.world",
    "init_world": "regrow.comm.world",
    "destroy_world": "regrow.comm.world",
}
"""Public name -> the module that defines it."""

__all__ = ["DataConfig", "DataCursor", "GPTConfig", "Guard", "GuardConfig", "ModelFactory", "Sampler", "Stateful",
           "Trainer", "TrainerConfig", "World", "ZeroConfig", "ZeroOptimizer", "destroy_world", "init_world",
           "join_world"]

if TYPE_CHECKING:
    from regrow.comm.world import World, destroy_world, init_world, join_world
    from regrow.launch.guard import Guard, GuardConfig
    from regrow.trainer.data import DataConfig, DataCursor, Sampler
    from regrow.trainer.loop import Trainer, TrainerConfig
    from regrow.trainer.model_factory import ModelFactory
    from regrow.trainer.models import GPTConfig
    from regrow.trainer.user_state import Stateful
    from regrow.trainer.zero.config import ZeroConfig
    from regrow.trainer.zero.optimizer import ZeroOptimizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'regrow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
