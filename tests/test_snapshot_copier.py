"""The snapshot copier process (``checkpoint/snapshot/copier.py``), exercised on CPU with real processes: a real
snapshot process, a real copier child and a real ``Trainer``. On CPU the shard's storage moves into shared memory
and the copier copies from it; the protocol (ATTACH, SNAP, the answer the next optimizer step waits for, the seal
thread's COMMIT) is the one the CUDA path uses, where the waits are GPU events instead
(``tests/test_wordsum_cuda.py`` runs it on a GPU)."""

# ruff: noqa: F811 (the node and token fixtures are imported from test_snapshot and named as parameters)
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import signal
import socket
import time

import pytest
import torch

from regrow.checkpoint.node.process import SnapshotProcess
from regrow.checkpoint.snapshot.copier import DELAY_ENV
from regrow.checkpoint.snapshot.copier_link import CopierLink
from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.checkpoint.snapshot.read import read_slot
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.snapshot.stats import RECENT, SnapshotStats
from regrow.recovery.from_snapshots import restore_from_node
from regrow.tests import snapshot_workers as w
from regrow.tests.fingerprint import assert_same_state, frozen
from regrow.tests.test_snapshot import node, token  # noqa: F401 (fixtures)
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer
from regrow.trainer.state import ShardState


def reference_states(config, steps: int) -> dict[int, ShardState]:
    trainer = Trainer(config)
    states = {}
    for _ in range(steps):
        trainer.train_step()
        state = frozen(trainer.shard_state())
        states[state.step] = state
    return states


def slot_states(node: SnapshotProcess, token: str) -> dict[int, ShardState]:
    client = SnapshotClient(node.address, token=token)
    try:
        slots = client.request({"op": "latest", "rank": 0})["slots"]
    finally:
        client.close()
    states = {}
    for slot in slots:
        if slot["step"] is None:  # never written (one snapshot fills one of the two slots)
            continue
        passed_over: list[str] = []
        state = read_slot(slot["path"], 0, passed_over)
        assert state is not None, passed_over
        states[state.step] = state
    return states


@pytest.mark.timeout(180)
def test_copier_process_snapshots_equal_the_training_state_and_restore_bit_identically(node, token) -> None:
    config = tiny_config(steps=6)  # with dropout: a restore that lost the RNG state would diverge
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, copier="process", log=False), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(4):
        trainer.train_step()
    sink.flush()
    assert list(sink.stats.sealed_steps) == [1, 2, 3, 4] and list(sink.stats.skipped_steps) == []
    assert sink.segments == []  # the copier maps the segments, not the training process
    # On CPU the copier copies before it answers: nothing is timed on a GPU.
    assert sink.stats.to_dict() == {"sealed": 4, "skipped": 0, "copy_ms_median": None, "wait_ms_median": None,
                                    "timed": 0}
    reference = reference_states(config, 6)
    held = slot_states(node, token)
    assert sorted(held) == [3, 4]
    for step, state in held.items():
        assert_same_state(state, reference[step])

    fresh = Trainer(config)
    assert restore_from_node(fresh, node.address, token=token).step == 4
    for _ in range(2):
        fresh.train_step()
    assert_same_state(fresh.shard_state(), reference[6])
    sink.close()


@pytest.mark.timeout(180)
def test_the_next_update_waits_for_the_copy_and_no_snapshot_mixes_two_steps(node, token, monkeypatch) -> None:
    """The copier sleeps 0.1 s before each tensor's copy, so a whole copy takes far longer than a step of the tiny
    model: an optimizer step that did not wait for it would change tensors not yet copied, and the snapshot
    would hold some tensors of step N and some of step N+1. (At 0.05 s a tensor a wait after the update escaped
    once, with the whole suite running beside it on two cores; at 0.1 s it was caught beside two busy loops.)"""
    monkeypatch.setenv(DELAY_ENV, "0.1")
    config = tiny_config(steps=5)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, copier="process", log=False), rank=0)
    trainer = Trainer(config, sinks=[sink])
    assert len(trainer.shard_state().tensors) >= 4  # the delays add up to several steps' time
    for _ in range(5):
        trainer.train_step()
    sink.close()
    assert list(sink.stats.sealed_steps) == [1, 2, 3, 4, 5]
    reference = reference_states(config, 5)
    held = slot_states(node, token)
    assert sorted(held) == [4, 5]
    for step, state in held.items():
        assert_same_state(state, reference[step])


@pytest.mark.timeout(120)
def test_snapshot_of_a_copier_survives_kill_9_of_its_rank(node, token) -> None:
    config = tiny_config(steps=6)
    rank = mp.get_context("spawn").Process(target=w.snapshot_then_sigkill,
                                           args=(config, node.address, token, 3, "process"))
    rank.start()
    rank.join(90)
    if rank.is_alive():
        rank.kill()
    assert rank.exitcode == -signal.SIGKILL
    reference = Trainer(config)
    straight = [r.loss for r in reference.run()]
    restored = Trainer(config)
    assert restore_from_node(restored, node.address, token=token).step == 3
    assert [r.loss for r in restored.run()] == straight[3:]
    assert_same_state(restored.shard_state(), reference.shard_state())


@pytest.mark.timeout(60)
def test_copier_exits_when_its_rank_goes_away() -> None:
    events: list[dict] = []
    link = CopierLink(on_event=events.append, timeout_s=30)
    pid = link.process.pid
    link.sock.shutdown(socket.SHUT_RDWR)  # as the kernel does when the rank dies
    deadline = time.monotonic() + 30
    while link.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert link.process.returncode == 0, f"copier {pid} still running or failed"
    link.close()
    assert events == []


@pytest.mark.timeout(60)
def test_copier_refuses_a_snap_before_attach_a_meta_without_snap_and_an_unknown_op() -> None:
    link = CopierLink(on_event=lambda event: None, timeout_s=30)
    try:
        link.send({"op": "snap", "step": 1})  # not answered: the answer to its "meta" carries its error
        with pytest.raises(RuntimeError, match="snap before attach"):
            link.request({"op": "meta", "step": 1, "meta": {}})
        with pytest.raises(RuntimeError, match="meta of step 2 without its snap"):
            link.request({"op": "meta", "step": 2, "meta": {}})
        with pytest.raises(RuntimeError, match="unknown op 'format-disk'"):
            link.request({"op": "format-disk"})
        assert link.process.poll() is None  # it answered and serves on
    finally:
        link.close()
    assert link.process.returncode == 0


@pytest.mark.timeout(120)
def test_auto_falls_back_to_copying_in_the_training_process_when_the_copier_cannot_attach(node, token, capsys,
                                                                                         monkeypatch) -> None:
    """A copier that refuses the shard (here: its description names a shared-memory descriptor it was not
    given, as a driver refusing a CUDA IPC handle would) costs nothing but a log line under ``copier="auto"``."""
    from regrow.checkpoint.snapshot import copier_link
    from regrow.checkpoint.snapshot import sink as sink_module

    real = copier_link.describe_tensors

    def broken(tensors):
        described, fds = real(tensors)
        return {name: dict(item, fd=len(fds) + 5) for name, item in described.items()}, fds

    monkeypatch.setattr(copier_link, "describe_tensors", broken)
    monkeypatch.setattr(sink_module, "uses_copier", lambda config, on_cuda: True)  # as "auto" on CUDA
    config = tiny_config(steps=3)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, copier="auto"), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(3):
        trainer.train_step()
    sink.close()
    assert "the copier process cannot take the shard" in capsys.readouterr().out
    assert list(sink.stats.sealed_steps) == [1, 2, 3]
    reference = reference_states(config, 3)
    assert_same_state(slot_states(node, token)[3], reference[3])


@pytest.mark.timeout(60)
def test_a_prestarted_copier_is_adopted_by_the_next_writer() -> None:
    """``prestart_copier`` (CUDA devices only) leaves a running copier for the next writer, which takes it
    instead of starting one; a dead one is replaced."""
    from regrow.checkpoint.snapshot import copier_link

    copier_link.prestart_copier(torch.device("cpu"))
    assert copier_link._prestarted is None, "nothing to prestart for a CPU rank"
    waiting = copier_link._prestarted = CopierLink(on_event=lambda event: None)
    adopted = copier_link._adopt(print, 30.0)
    assert adopted is waiting and adopted.on_event is print and copier_link._prestarted is None
    adopted.close()
    copier_link._prestarted = adopted  # exited: not adopted
    fresh = copier_link._adopt(print, 30.0)
    assert fresh is not adopted and fresh.process.poll() is None
    fresh.close()


@pytest.mark.timeout(120)
def test_tensors_that_move_are_shared_again_then_copied_here(node, token, capsys) -> None:
    """The copier reads the memory shared at ATTACH. A state whose tensors are new objects every step (a user loop
    rebuilding its state) is shared again, and after MAX_RESHARES the sink copies from this process: every snapshot
    holds its own step's values either way."""
    from regrow.checkpoint.snapshot.sink import MAX_RESHARES

    base = Trainer(tiny_config(steps=1)).shard_state()
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, copier="process"), rank=0)
    steps = MAX_RESHARES + 3
    states = {}
    for step in range(1, steps + 1):
        tensors = {name: torch.full_like(t, step) for name, t in base.tensors.items()}  # new memory every step
        states[step] = dataclasses.replace(base, step=step, tensors=tensors)
        sink.after_step(states[step])
        sink.before_optimizer_step()
    sink.close()
    assert list(sink.stats.sealed_steps) == list(range(1, steps + 1))
    held = slot_states(node, token)
    assert sorted(held) == [steps - 1, steps]
    for step, state in held.items():
        for name, tensor in state.tensors.items():
            assert torch.equal(tensor, states[step].tensors[name]), (step, name)
    assert "copying from the training process instead" in capsys.readouterr().out


def test_snapshot_stats_stay_bounded_and_summarize_their_medians() -> None:
    stats = SnapshotStats()
    for step in range(1, RECENT + 11):
        stats.on_sealed(step, copy_ms=float(step % 3))
        stats.on_waited(0.0 if step % 2 else 2.0)
    stats.on_skipped(RECENT + 11)
    assert stats.sealed == RECENT + 10 and len(stats.sealed_steps) == RECENT == len(stats.copy_ms)
    assert stats.sealed_steps[0] == 11 and stats.sealed_steps[-1] == RECENT + 10
    assert stats.to_dict() == {"sealed": RECENT + 10, "skipped": 1, "copy_ms_median": 1.0, "wait_ms_median": 1.0,
                               "timed": RECENT}
    assert stats.summary() == (f"{RECENT + 10} sealed, 1 skipped (both slots held), copy 1.00 ms median on the GPU, "
                               f"optimizer steps waited 1.00 ms median for it")
