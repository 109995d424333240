"""The checkpoint writer's part process (``checkpoint/universal/part_process.py``): a rank's part of a save written
by another process from host buffers shared with it, byte for byte what the rank's own thread writes; a part
process that dies fails that save only, and the next save starts a new one. On the CPU with
``persist_in="process"`` (a GPU run picks it by default; the buffers are then also page-locked)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket

import pytest
import torch

from regrow.checkpoint.frames import recv_message, send_message
from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.part_process import PartProcess, PartProcessLost
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.tests.fingerprint import assert_same_state, frozen
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.loop import Trainer


def files_of(folder) -> dict[str, bytes]:
    """Every parameter and RNG file of a checkpoint, by path (not the manifest or markers: they name the session)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".bin", ".json") and p.name != "manifest.json" and "parts" not in p.parts}


@pytest.mark.timeout(120)
def test_a_part_written_by_the_process_equals_the_one_the_thread_writes_and_restores(tmp_path) -> None:
    saved = {}  # persist_in: (the checkpoint, the state saved)
    for persist_in in ("thread", "process"):
        trainer = Trainer(cw.config(1, steps=3))
        writer = CheckpointWriter(WriterConfig(root=str(tmp_path / persist_in), save_every=3, persist_in=persist_in,
                                               chunk_bytes=4096), run_config=trainer.config.to_dict())
        trainer.sinks.append(writer)
        for _ in range(3):
            trainer.train_step()
        writer.wait(60)
        assert (writer._part_process is None) == (persist_in == "thread")
        writer.close()
        assert [r.status for r in writer.results] == ["committed"]
        saved[persist_in] = (tmp_path / persist_in / "step_00000003", frozen(trainer.shard_state()))
    (thread_dir, state), (process_dir, _) = saved["thread"], saved["process"]
    assert files_of(process_dir) == files_of(thread_dir) and len(files_of(thread_dir)) > 10
    assert verify.read_manifest(process_dir).tensors == verify.read_manifest(thread_dir).tensors
    assert verify.verify(process_dir).ok
    restored = Trainer(cw.config(1, steps=3))
    restore_trainer(restored, process_dir)
    assert_same_state(restored.shard_state(), state)


@pytest.mark.timeout(120)
def test_a_dead_part_process_is_started_again_for_the_next_save(tmp_path) -> None:
    trainer = Trainer(cw.config(1, steps=4))
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=2, persist_in="process"),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    for _ in range(2):
        trainer.train_step()
    assert writer.wait(60).status == "committed"
    first = writer._part_process
    assert first is not None and first.alive()
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    for _ in range(2):
        trainer.train_step()
    assert writer.wait(60).status == "committed"
    assert writer._part_process is not first and writer._part_process.alive()
    assert storage.read_latest(tmp_path) == "step_00000004" and verify.verify(tmp_path / "step_00000004").ok
    writer.close()
    assert writer._part_process is None


@pytest.mark.timeout(60)
def test_a_part_process_that_dies_under_a_request_is_reported_with_its_exit_code(tmp_path) -> None:
    """What the writer's persist thread then raises: the save fails with it (as any write error fails a save)."""
    process = PartProcess(timeout_s=30)
    try:
        os.kill(process.process.pid, signal.SIGKILL)
        process.process.wait(10)
        buffers = {"x": torch.arange(8, dtype=torch.float32)}
        with pytest.raises(PartProcessLost, match=r"checkpoint part process \(pid \d+, exited with code -9\)"):
            process.write_shard(tmp_path, {}, 0, buffers, CheckpointView.identity(0), chunk_bytes=64, fsync=False)
    finally:
        process.close()


def test_process_is_refused_where_the_writer_writes_its_own_way(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"persist_in='process' is impossible here \(a pwrite was passed in\)"):
        CheckpointWriter(WriterConfig(root=str(tmp_path), persist_in="process"), rank=0, world_size=1,
                         pwrite=lambda fd, data, offset: os.pwrite(fd, data, offset))
    with pytest.raises(ValueError, match=r"WriterConfig.persist_in='disk' is invalid"):
        WriterConfig(root=str(tmp_path), persist_in="disk")


@pytest.mark.timeout(60)
def test_the_part_process_answers_bad_requests_with_errors_and_keeps_serving(tmp_path) -> None:
    process = PartProcess(timeout_s=30)
    try:
        for message, expected in (({"op": "format_disk"}, "unknown op 'format_disk'"),
                                  ({"op": "write_shard", "temp": str(tmp_path)}, "write_shard before share"),
                                  ({"op": "share", "tensors": {"x": {"fd": 3, "offset": 0, "dtype": "float32",
                                                                     "shape": [4]}}}, "descriptor 3 of 0 passed")):
            send_message(process.sock, message)
            reply, _ = recv_message(process.sock, timeout_s=30)
            assert not reply["ok"] and expected in reply["error"], reply
        process.sock.shutdown(socket.SHUT_WR)
        assert process.process.wait(30) == 0
    finally:
        process.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
def test_a_gpu_shard_is_copied_into_page_locked_shared_buffers_and_written_by_the_process(tmp_path) -> None:
    trainer = Trainer(cw.config(1, steps=1))
    trainer.train_step()
    state = frozen(trainer.shard_state())
    on_gpu = dataclasses.replace(state, tensors={name: t.cuda() for name, t in state.tensors.items()})
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=0), rank=0, world_size=1,
                              run_config=trainer.config.to_dict())  # persist_in="auto": the process, on a GPU
    writer.prepare(on_gpu)
    assert writer.save(on_gpu) and writer.wait(60).status == "committed"
    assert writer._part_process is not None and writer._shared is not None and writer._shared.holds(
        writer.copier.start(on_gpu.tensors).buffers)
    writer.close()
    restored = Trainer(cw.config(1, steps=1))
    restore_trainer(restored, tmp_path / "step_00000001")
    assert_same_state(restored.shard_state(), state)
