"""Activation checkpointing per block: each block's activations are recomputed in the backward instead of kept.

:func:`checkpoint_blocks` applies torch's composable ``checkpoint`` (non-reentrant, random state preserved) to the
blocks in place. Unlike wrapping each block in a ``CheckpointWrapper``, it keeps every parameter's name, so the
optimizer's layout, snapshots and checkpoints do not change with the switch, and it keeps the modules' own hooks
(ZeRO stage 3 gathers a block's parameters in them; ``trainer/zero/stage3.py`` knows that a checkpointed block's
forward runs a second time inside the backward). Dropout draws the same masks in the recomputation, so a run is
bit-identical with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from regrow.trainer.zero.stage3 import default_unit_names


def checkpoint_blocks(model: nn.Module, names: Sequence[str] = ()) -> list[str]:
    """Checkpoints the modules ``names`` of ``model`` (default: the children of its largest ``nn.ModuleList``, its
    transformer blocks); returns the names checkpointed. Raises ValueError when there is nothing to checkpoint."""
    from torch.distributed._composable import checkpoint

    names = list(names) or list(default_unit_names(model))
    if not names:
        raise ValueError("activation checkpointing: the model has no nn.ModuleList of blocks; name the modules to "
                         "checkpoint (ZeroConfig.shard_units)")
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"activation checkpointing: {missing} are not modules of the model")
    for name in names:
        checkpoint(modules[name])
    return names
