"""The recovery order of ``restore_job`` when snapshots are found corrupt: the other slot, then the node's
erasure-coded buffer, then the universal checkpoint; each restore bit-identical to an uninterrupted run."""

from __future__ import annotations

import secrets

import pytest
import torch

from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, SnapshotClient
from regrow.launch.chaos.injector import corrupt_segment
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.recovery.order import Source
from regrow.tests import recovery_workers as rw
from regrow.tests import snapshot_workers as w
from regrow.tests.test_snapshot_ec import Group
from regrow.tests.test_trainer import tiny_config


@pytest.fixture
def group():
    made = Group(2, 1, secrets.token_hex(32))
    yield made
    made.close()


def corrupt_slots(group: Group, rank: int) -> list[int]:
    """Flips one payload byte in every slot of ``rank`` on its node; returns the steps the slots held."""
    client = SnapshotClient(group.nodes[rank].address, token=group.token)
    try:
        slots = client.request({"op": "latest", "rank": rank})["slots"]
    finally:
        client.close()
    for slot in slots:
        corrupt_segment(slot["path"])
    return sorted(slot["step"] for slot in slots)


def assert_bit_identical(result: dict, step: int) -> None:
    assert result["step"] == step
    assert result["resumed"] == result["straight"][step:]
    for name, value in result["straight_params"].items():
        assert torch.equal(value, result["resumed_params"][name]), name


@pytest.mark.timeout(240)
def test_corrupt_slots_fall_back_to_the_erasure_coded_buffer(group: Group) -> None:
    """2 nodes of one rank, p=1: both slots of rank 0 are corrupt, so the ranks restore the newest step every one
    holds in a slot or a coded buffer; rank 0 gets it back from its node's coded buffer, rank 1 from its slot."""
    config = tiny_config(steps=6)
    env = {TOKEN_ENV: group.token}
    run_local(w.train_on_node, 2, config, group.addresses, 3, backend="gloo", timeout_s=120, env=env)
    group.wait_encoded(3)
    assert corrupt_slots(group, 0) == [2, 3]
    results = run_local(rw.straight_and_job_restored, 2, config, group.addresses, backend="gloo", timeout_s=180,
                        env=env)
    assert [r["source"] for r in results] == [Source.ERASURE, Source.SNAPSHOT]
    assert any("payload checksum mismatch" in reason for reason in results[0]["passed_over"])
    for result in results:
        assert_bit_identical(result, 3)


@pytest.mark.timeout(240)
def test_without_any_snapshot_the_checkpoint_is_used_and_its_absence_is_named(group: Group, tmp_path) -> None:
    """Both slots of rank 0 corrupt and node 0's coded buffers gone (its process replaced): the ranks restore the
    universal checkpoint; with no checkpoint root, the error names the fallback."""
    config = tiny_config(steps=6)
    env = {TOKEN_ENV: group.token}
    run_local(w.train_on_node, 2, config, group.addresses, 3, backend="gloo", timeout_s=120, env=env)
    group.kill(0)
    group.replace(0)
    with pytest.raises(WorkerFailed, match="no in-memory snapshot to restore .*give a checkpoint root"):
        run_local(rw.straight_and_job_restored, 2, config, group.addresses, backend="gloo", timeout_s=180, env=env)
    run_local(rw.save_at, 2, config, str(tmp_path), 2, backend="gloo", timeout_s=120)
    results = run_local(rw.straight_and_job_restored, 2, config, group.addresses, str(tmp_path), backend="gloo",
                        timeout_s=180, env=env)
    assert [r["source"] for r in results] == [Source.CHECKPOINT, Source.CHECKPOINT]
    for result in results:
        assert_bit_identical(result, 2)
