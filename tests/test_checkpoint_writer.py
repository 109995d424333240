"""The writer as a Trainer sink: saves at ``save_every`` from a background thread that the step loop never waits
for, at most one save in flight, retention, kill -9 in the middle of a persist; and the host-copy buffers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from regrow.checkpoint.hostcopy import HostCopier, HostCopierConfig, default_allocate
from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.tests.fingerprint import assert_same_state, frozen
from regrow.trainer.loop import Trainer


def test_host_copier_snapshots_before_mutation_and_reuses_its_buffers() -> None:
    sources = {"master": torch.arange(4096, dtype=torch.float32), "codes": torch.full((4096,), 7, dtype=torch.uint8)}
    allocations: list[str] = []

    def allocate(name: str, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        allocations.append(name)
        return torch.empty(shape, dtype=dtype)

    copier = HostCopier(HostCopierConfig(slots=2), allocate=allocate)
    first = copier.start(sources)
    first.wait_before_mutation()
    sources["master"].add_(1)  # the optimizer step: must not reach the copy
    first.wait_host()
    assert torch.equal(first.buffers["master"], torch.arange(4096, dtype=torch.float32))
    assert torch.equal(first.buffers["codes"], sources["codes"])
    second = copier.start(sources)
    assert second is not None and second.slot == 1
    assert copier.start(sources) is None, "both slots are in use"
    second.wait_host()
    first.release()
    third = copier.start(sources)
    assert third is not None and third.slot == 0
    assert third.buffers["master"].data_ptr() == first.buffers["master"].data_ptr(), "slot buffers are reused"
    assert allocations == ["master", "codes", "master", "codes"], "one allocation per slot, none on reuse"
    with pytest.raises(ValueError, match="HostCopierConfig.slots=0"):
        HostCopierConfig(slots=0)
    second.release()
    fourth = copier.start({"a": torch.full((1000,), 2.0), "b": torch.arange(10)})
    assert fourth is not None
    fourth.wait_tensor("a", timeout_s=30)  # one tensor can be read before the whole copy is done
    assert torch.equal(fourth.buffers["a"], torch.full((1000,), 2.0))
    fourth.wait_host()
    assert torch.equal(fourth.buffers["b"], torch.arange(10))


def test_persist_runs_in_the_background_and_the_step_loop_never_waits(tmp_path, capsys) -> None:
    """Structure, not timing: the persist of step 2 is held at a gate while steps 3 and 4 run; the save step 4 is
    skipped (one save in flight) and says so; the checkpoint of step 2 holds step 2's state although the live
    buffers had moved on before it was written; retention keeps the last two."""
    trainer = Trainer(cw.config(1, steps=8))
    writer = cw.GatedWriter(WriterConfig(root=str(tmp_path), save_every=2, keep_last=2),
                            run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.train_step()
    trainer.train_step()
    at_step2 = cw.params_of(trainer)
    state2 = frozen(trainer.shard_state())
    trainer.train_step()  # returns although step 2's persist is blocked
    assert writer.busy() and writer.persist_threads and writer.persist_threads[0] != threading.get_ident()
    trainer.train_step()
    assert [(r.step, r.status) for r in writer.results] == [(4, "skipped")]
    assert "checkpoint at step 4 skipped: the save of step 2 is still persisting" in capsys.readouterr().out
    assert not (tmp_path / "step_00000002").exists(), "nothing is visible before the commit"
    writer.gate.set()
    assert writer.wait(60).status == "committed"
    restored = Trainer(cw.config(1, steps=8))
    restore_trainer(restored, tmp_path / "step_00000002")
    for name, value in at_step2.items():
        assert torch.equal(cw.params_of(restored)[name], value), name
    assert_same_state(restored.shard_state(), state2)  # the optimizer state, cursor and generators too
    for _ in range(2):  # steps 5..8: saves 6 and 8 (each waited for, so that none is skipped), purges 2
        trainer.train_step()
        trainer.train_step()
        writer.wait(60)
    assert [(r.step, r.status) for r in writer.results][1:] == [(2, "committed"), (6, "committed"), (8, "committed")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert storage.read_latest(tmp_path) == "step_00000008"


def test_when_busy_wait_never_misses_a_save(tmp_path) -> None:
    trainer = Trainer(cw.config(1, steps=6))
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=1, keep_last=3, when_busy="wait"),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.run()
    assert [r.status for r in writer.results] == ["committed"] * 6
    assert [step for step, _ in storage.committed(tmp_path)] == [4, 5, 6]


def test_purge_never_removes_the_checkpoint_latest_names(tmp_path) -> None:
    for step in (1, 2, 3, 4):
        folder = tmp_path / f"step_{step:08d}"
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
    storage.write_latest(tmp_path, "step_00000001")  # e.g. after a fall-back to an old checkpoint
    deleted = storage.purge(tmp_path, 2, protect=[tmp_path / "step_00000004"])
    assert [p.name for p in deleted] == ["step_00000002"]
    assert [step for step, _ in storage.committed(tmp_path)] == [1, 3, 4]


@pytest.mark.timeout(200)
def test_kill_9_during_a_persist_resumes_from_the_last_complete_checkpoint(tmp_path, capsys) -> None:
    root, flag = tmp_path / "ckpt", tmp_path / "persisting"
    process = mp.get_context("spawn").Process(target=cw.train_until_killed, args=(str(root), str(flag)), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 150
        while not flag.exists():
            assert process.is_alive() and time.monotonic() < deadline, "the worker never reached the slow persist"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
    assert process.exitcode == -signal.SIGKILL
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp_step_00000004.")]
    assert len(leftovers) == 1, "the interrupted save left its temporary directory"
    assert storage.read_latest(root) == "step_00000002"

    trainer = Trainer(cw.config(1, steps=4))
    assert restore_trainer(trainer, "latest", root=root).step == 2
    writer = CheckpointWriter(WriterConfig(root=str(root), save_every=2), run_config=trainer.config.to_dict())
    assert "removed 1 leftover temporaries" in capsys.readouterr().out
    trainer.sinks.append(writer)
    trainer.run()
    assert [p.name for p in sorted(root.iterdir())] == ["latest", "step_00000002", "step_00000004"]
    assert verify.verify(root / "step_00000004").ok


def test_prepare_allocates_the_first_saves_buffers_off_the_training_thread(tmp_path) -> None:
    """``CheckpointWriter.prepare`` (called at start-up by ``launch/rank.attach_writer``) allocates the host buffers
    on another thread; the first save then copies into those very buffers, allocating nothing."""
    threads: list[str] = []

    def allocate(name, shape, dtype, pin):
        threads.append(threading.current_thread().name)
        return default_allocate(name, shape, dtype, pin)

    trainer = Trainer(cw.config(1, steps=2))
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=1, keep_last=2, final_step=2), rank=0,
                              world_size=1, copier=HostCopier(allocate=allocate))
    state = trainer.shard_state()
    writer.prepare(state)
    copy = writer.copier.start(state.tensors)
    assert copy is not None
    prepared = len(state.tensors)
    assert threads == ["regrow-hostcopy-prepare"] * prepared  # every buffer, and none on the training thread
    copy.wait_host(30)
    assert all(torch.equal(copy.buffers[k], v) for k, v in state.tensors.items())
    copy.release()
    trainer.sinks.append(writer)
    trainer.run()
    assert threads == ["regrow-hostcopy-prepare"] * prepared  # the saves reused them
    assert storage.read_latest(tmp_path) == "step_00000002"
