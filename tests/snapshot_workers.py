"""Functions that run inside spawned processes for the snapshot tests (importable as
``regrow.tests.snapshot_workers``)."""

from __future__ import annotations

import os
import signal

import torch

from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.comm.world import World
from regrow.recovery.from_snapshots import restore_from_node
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.state import ShardState


class KillAt:
    """A sink that SIGKILLs its own process in step ``step``, right before the optimizer step (after the snapshot
    sink listed before it started sealing the previous step: the seal may or may not have finished)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.last = 0

    def before_optimizer_step(self) -> None:
        if self.last + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, state: ShardState) -> None:
        self.last = state.step

    def close(self) -> None:
        pass


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def snapshot_then_sigkill(config: TrainerConfig, address: str, token: str, steps: int,
                          copier: str = "auto") -> None:
    """Trains ``steps`` steps alone with a snapshot sink, seals the last snapshot, then kills itself (kill -9)."""
    sink = SnapshotSink(SnapshotSinkConfig(address=address, token=token, copier=copier), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(steps):
        trainer.train_step()
    sink.flush()  # sealed, so the test knows which step must survive
    os.kill(os.getpid(), signal.SIGKILL)


def train_until_killed(world: World, config: TrainerConfig, address: str, kill_at: int) -> None:
    """Trains with a snapshot sink and SIGKILLs this rank inside step ``kill_at``."""
    sink = SnapshotSink(SnapshotSinkConfig(address=address), rank=world.rank)
    Trainer(config, world, sinks=[sink, KillAt(kill_at)]).run()


def straight_and_restored(world: World, config: TrainerConfig, address: str) -> dict:
    """An uninterrupted run, then a fresh Trainer restored from the node's snapshots that runs to the end (with
    snapshots on again); returns both runs' losses and parameters and the restored step."""
    straight = Trainer(config, world)
    straight_losses = [r.loss for r in straight.run()]
    resumed = Trainer(config, world, sinks=[SnapshotSink(SnapshotSinkConfig(address=address), rank=world.rank)])
    restored = restore_from_node(resumed, address)
    resumed_losses = [r.loss for r in resumed.run()]
    return {"straight": straight_losses, "resumed": resumed_losses, "restored_step": restored.step,
            "straight_params": params(straight), "resumed_params": params(resumed)}


def train_on_node(world: World, config: TrainerConfig, addresses: list[str], steps: int) -> None:
    """Trains ``steps`` steps with a snapshot sink on this rank's node (``addresses[rank]``: one snapshot process
    per rank, as with one rank per node) and seals the last snapshot before returning."""
    sink = SnapshotSink(SnapshotSinkConfig(address=addresses[world.rank]), rank=world.rank)
    trainer = Trainer(config, world, sinks=[sink])
    for _ in range(steps):
        trainer.train_step()
    sink.close()


def straight_and_restored_on_nodes(world: World, config: TrainerConfig, addresses: list[str]) -> dict:
    """:func:`straight_and_restored` with one snapshot process per rank (``addresses[rank]``)."""
    return straight_and_restored(world, config, addresses[world.rank])
