"""Functions that run inside spawned ranks for the snapshot-persistence tests (importable as
``regrow.tests.persist_workers``)."""

from __future__ import annotations

import random
import time

import numpy as np

from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.comm.world import World
from regrow.recovery.restore import restore_job
from regrow.trainer.loop import Trainer, TrainerConfig


def seed_host_generators(rank: int) -> None:
    """The checkpoints record Python's and NumPy's global generators, which a process seeds from the OS unless
    someone seeds them: seeded here (whether or not the trainer seeds them too), the two runs' RNG files are
    comparable byte for byte."""
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)


def wait_persisted(client: SnapshotClient, step: int, timeout_s: float = 120.0) -> dict:
    """Polls the node's ``persisted`` op until it reports an outcome (any status) for ``step``; returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for result in client.request({"op": "persisted"})["results"]:
            if result["step"] == step:
                return result
        time.sleep(0.05)
    raise TimeoutError(f"the snapshot process reported nothing for step {step} within {timeout_s} s")


def train_on_nodes(world: World, config: TrainerConfig, addresses: list[str], ranks_per_node: int,
                   persist_every: int) -> dict:
    """Trains with a snapshot sink only (no checkpoint writer), rank r on node ``r // ranks_per_node``.

    After step s + 1 for each persist step s (the sink has then sealed and committed s), the rank waits until its
    node's snapshot process reports the persist of s: the slot holding s is reused at step s + 2, and the test wants
    every persist step on disk (the race itself is tested without timing in test_snapshot_persist)."""
    seed_host_generators(world.rank)
    address = addresses[world.rank // ranks_per_node]
    sink = SnapshotSink(SnapshotSinkConfig(address=address), rank=world.rank)
    trainer = Trainer(config, world, sinks=[sink])
    client = SnapshotClient(address, timeout_s=30)  # the token comes from REGROW_SNAPSHOT_TOKEN
    outcomes = {}
    try:
        while trainer.step < config.steps:
            trainer.train_step()
            if trainer.step > 1 and (trainer.step - 1) % persist_every == 0:
                outcomes[trainer.step - 1] = wait_persisted(client, trainer.step - 1)["status"]
        sink.close()
        if config.steps % persist_every == 0:
            outcomes[config.steps] = wait_persisted(client, config.steps)["status"]
    finally:
        client.close()
    return {"sinks": [type(s).__name__ for s in trainer.sinks], "outcomes": outcomes}


def train_with_writer(world: World, config: TrainerConfig, root: str, save_every: int) -> None:
    """The reference: the same run with the asynchronous CheckpointWriter (every save step saved, none skipped)."""
    seed_host_generators(world.rank)
    trainer = Trainer(config, world)
    writer = CheckpointWriter(WriterConfig(root=root, save_every=save_every, keep_last=10, when_busy="wait"),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.run()


def train_to_the_end(world: World, config: TrainerConfig, addresses: list[str]) -> None:
    """Trains every step with a snapshot sink only, rank r on node ``addresses[r]``."""
    seed_host_generators(world.rank)
    sink = SnapshotSink(SnapshotSinkConfig(address=addresses[world.rank]), rank=world.rank)
    trainer = Trainer(config, world, sinks=[sink])
    trainer.run()
    sink.close()


def restore_and_train_to_the_end(world: World, config: TrainerConfig, addresses: list[str]) -> dict:
    """The job restarted after a failure: restores from the nodes (``restore_job``), re-attaches its snapshot sink at
    the restored step (as the launchers do) and trains to the end; returns the step restored and the lineage."""
    trainer = Trainer(config, world, for_restore=True)
    restored = restore_job(trainer, addresses[world.rank], log=False)
    sink = SnapshotSink(SnapshotSinkConfig(address=addresses[world.rank]), rank=world.rank)
    sink.attach(trainer.shard_state(), restored_from=restored.detail)
    trainer.sinks.append(sink)
    trainer.run()
    sink.close()
    return {"step": restored.step, "lineage": restored.lineage, "trainer_lineage": trainer.lineage}
