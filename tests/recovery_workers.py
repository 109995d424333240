"""Functions that run inside spawned processes for the recovery-order tests (importable as
``regrow.tests.recovery_workers``)."""

from __future__ import annotations

from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.comm.world import World
from regrow.recovery.restore import restore_job
from regrow.tests.snapshot_workers import params
from regrow.trainer.loop import Trainer, TrainerConfig


def straight_and_job_restored(world: World, config: TrainerConfig, addresses: list[str],
                              ckpt_root: str | None = None) -> dict:
    """An uninterrupted run, then a fresh Trainer restored by ``restore_job`` from this rank's node
    (``addresses[rank]``) that runs to the end; returns both runs' losses and parameters and what was restored."""
    straight = Trainer(config, world)
    straight_losses = [r.loss for r in straight.run()]
    resumed = Trainer(config, world)
    restored = restore_job(resumed, addresses[world.rank], ckpt_root=ckpt_root)
    resumed_losses = [r.loss for r in resumed.run()]
    return {"straight": straight_losses, "resumed": resumed_losses, "step": restored.step,
            "source": restored.source, "passed_over": restored.passed_over,
            "straight_params": params(straight), "resumed_params": params(resumed)}


def save_at(world: World, config: TrainerConfig, root: str, step: int) -> None:
    """Trains ``step`` steps and saves a universal checkpoint of that step under ``root`` (waited for)."""
    writer = CheckpointWriter(WriterConfig(root=root, save_every=step, fsync=False, log=False), rank=world.rank,
                              world_size=world.world_size, run_config=config.to_dict())
    trainer = Trainer(config, world, sinks=[writer])
    for _ in range(step):
        trainer.train_step()
    writer.close()
