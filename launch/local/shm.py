"""How much shared memory the ranks' snapshots take: what the local launcher tells each node's snapshot process to
expect, so that a ``/dev/shm`` too small fails at start-up with the fix rather than in the middle of a run."""

from __future__ import annotations

from regrow.checkpoint.snapshot import segment as seg
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.model_factory import build_model
from regrow.trainer.zero.optimizer import plan_layout
from regrow.trainer.zero.shard import shard_table

META_ESTIMATE = 1 << 20
"""Metadata room assumed per segment when sizing ``/dev/shm`` before the ranks attach (the real room, twice the
metadata plus 64 KiB, is far smaller for any model regrow trains)."""


def snapshot_bytes(config: TrainerConfig, world_size: int) -> int:
    """Shared-memory bytes one rank's two snapshot segments take: the shard tensors (fp32 master, 8-bit codes and
    block scales or fp32 moments) as the optimizer lays them out for ``world_size`` ranks, plus metadata room.
    Built from the model on the meta device (regrow's GPT or a factory's), so nothing is allocated."""
    model = build_model(config.model, seed=config.seed, device="meta")
    layout = plan_layout(model, config.optim, world_size)
    table = [{"name": key, "dtype": str(spec.dtype).removeprefix("torch."), "shape": list(spec.shape)}
             for key, spec in shard_table(layout).items()]
    _, payload = seg.plan_tensors(table)
    return 2 * seg.segment_bytes(META_ESTIMATE, payload)
