"""In-memory snapshots: segment format, the snapshot process and its protocol, the sink, restores after kill -9."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import (
    TOKEN_ENV,
    ProtocolError,
    SnapshotClient,
    SnapshotProcessLost,
    parse_address,
)
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.recovery.from_snapshots import restore_from_node
from regrow.recovery.order import SnapshotRestoreError
from regrow.tests import snapshot_workers as w
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer

TABLE = [{"name": "g/master", "dtype": "float32", "shape": [300]}, {"name": "g/codes", "dtype": "uint8",
                                                                       "shape": [7, 3]}]


@pytest.fixture
def token() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def node(token: str) -> Iterator[SnapshotProcess]:
    process = start_snapshot_process(SnapshotProcessConfig(), token=token)
    try:
        yield process
    finally:
        process.stop()
        for leftover in Path("/dev/shm").glob(f"regrow-snap-{process.job}-*"):
            leftover.unlink()


def attach(node: SnapshotProcess, token: str, rank: int = 0) -> tuple[SnapshotClient, list[str]]:
    client = SnapshotClient(node.address, token=token)
    reply = client.request({"op": "attach", "rank": rank, "tensors": TABLE, "meta_capacity": 4096})
    return client, reply["paths"]


def write_snapshot(path: str, step: int, fill: int, *, seal: bool = True) -> None:
    buffer = seg.open_segment(path, writable=True)
    entries, payload = seg.plan_tensors(TABLE)
    seg.begin(buffer, {"step": step, "tensors": [e.to_dict() for e in entries]})
    start = seg.payload_offset(seg.read_header(buffer).meta_capacity)
    buffer[start : start + payload] = bytes([fill]) * payload
    if seal:
        seg.seal(buffer, step=step, payload_bytes=payload)
    buffer.close()


# ------------------------------------------------------------------------ the segment format
def test_segment_header_round_trip(tmp_path) -> None:
    path = tmp_path / "segment"
    entries, payload = seg.plan_tensors(TABLE)
    assert [e.offset for e in entries] == [0, 1216] and payload == 1216 + 21
    path.write_bytes(bytes(seg.segment_bytes(4096, payload)))
    buffer = seg.open_segment(str(path), writable=True)
    seg.format_empty(buffer, rank=3, slot=1, meta_capacity=4096)
    buffer.close()
    assert "incomplete" in seg.inspect(str(path))["status"]
    write_snapshot(str(path), step=7, fill=5)
    buffer = seg.open_segment(str(path), writable=False)
    snapshot = seg.verify(buffer, rank=3)
    assert (snapshot.step, snapshot.slot, snapshot.meta["step"]) == (7, 1, 7)
    assert bytes(snapshot.payload) == bytes([5]) * payload
    header = seg.read_header(buffer)
    assert (header.magic, header.version, header.rank, header.complete) == (seg.MAGIC, seg.FORMAT_VERSION, 3, seg.COMPLETE)
    snapshot.payload.release()
    buffer.close()
    assert seg.inspect(str(path), rank=2)["status"] == "segment belongs to rank 3, not 2"


SEGMENT_DAMAGE = {  # case: the byte to flip, from the sealed header (offsets of segment._FIXED)
    "magic": lambda h: 0,
    "format version": lambda h: 8,
    "rank": lambda h: 12,
    "slot": lambda h: 16,
    "metadata room": lambda h: 20,
    "header step": lambda h: 24,
    "payload size": lambda h: 32,
    "metadata size": lambda h: 40,
    "metadata checksum": lambda h: 44,
    "payload checksum": lambda h: 48,
    "complete flag": lambda h: 64,
    "header checksum": lambda h: 68,
    "metadata, first byte": lambda h: seg.HEADER_BYTES,
    "metadata, middle": lambda h: seg.HEADER_BYTES + h.meta_bytes // 2,
    "metadata, last byte": lambda h: seg.HEADER_BYTES + h.meta_bytes - 1,
    "payload, first byte": lambda h: seg.payload_offset(h.meta_capacity),
    "payload, middle": lambda h: seg.payload_offset(h.meta_capacity) + h.payload_bytes // 2,
    "payload, last byte": lambda h: seg.payload_offset(h.meta_capacity) + h.payload_bytes - 1,
}


@pytest.mark.parametrize("case", sorted(SEGMENT_DAMAGE))
def test_one_flipped_byte_anywhere_in_a_sealed_snapshot_is_detected(tmp_path, case: str) -> None:
    """The snapshot side of the corruption matrix: one byte flipped in any header field, the metadata or the
    payload of a sealed segment, and the segment is never read as a snapshot (what the snapshot process lists
    for a restore: ``inspect``)."""
    path = tmp_path / "segment"
    _, payload = seg.plan_tensors(TABLE)
    path.write_bytes(bytes(seg.segment_bytes(4096, payload)))
    buffer = seg.open_segment(str(path), writable=True)
    seg.format_empty(buffer, rank=1, slot=0, meta_capacity=4096)
    buffer.close()
    write_snapshot(str(path), step=7, fill=5)
    assert seg.inspect(str(path), rank=1)["status"] == "ok"
    data = bytearray(path.read_bytes())
    data[SEGMENT_DAMAGE[case](seg.read_header(bytes(data)))] ^= 0x04
    path.write_bytes(bytes(data))
    assert seg.inspect(str(path), rank=1)["status"] != "ok"


# ------------------------------------------------------------------------ the snapshot process
def test_interrupted_snapshot_is_not_latest_and_segments_are_private(node, token) -> None:
    client, paths = attach(node, token)
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert client.request({"op": "latest", "rank": 0})["latest"] is None
    write_snapshot(paths[0], step=1, fill=1)
    write_snapshot(paths[1], step=2, fill=2, seal=False)  # the writer "dies" before the complete flag
    reply = client.request({"op": "latest", "rank": 0})
    assert (reply["latest"]["slot"], reply["latest"]["step"]) == (0, 1)
    assert "incomplete" in reply["slots"][1]["status"]
    write_snapshot(paths[1], step=2, fill=2)
    assert client.request({"op": "latest", "rank": 0})["latest"]["step"] == 2
    with pytest.raises(ProtocolError, match="another tensor table"):
        client.request({"op": "attach", "rank": 0, "tensors": TABLE[:1], "meta_capacity": 4096})
    client.close()


def test_reattach_keeps_segments_whatever_metadata_room_is_asked(node, token) -> None:
    """A rank resumed at a later step asks for a slightly different metadata room (its step and data cursor have
    more digits): it must get its own segments back, snapshots intact; another tensor table is refused."""
    client, paths = attach(node, token)
    write_snapshot(paths[0], step=7, fill=3)
    client.close()
    again = SnapshotClient(node.address, token=token)
    reply = again.request({"op": "attach", "rank": 0, "tensors": TABLE, "meta_capacity": 4100})
    assert reply["reused"] and reply["paths"] == paths
    assert again.request({"op": "latest", "rank": 0})["latest"]["step"] == 7
    other = [{"name": "g/master", "dtype": "float32", "shape": [301]}]
    with pytest.raises(ProtocolError, match="another tensor table"):
        again.request({"op": "attach", "rank": 0, "tensors": other, "meta_capacity": 4096})
    again.close()


def test_wrong_token_is_refused_and_a_silent_client_blocks_nobody(node, token) -> None:
    silent = socket.create_connection(parse_address(node.address), timeout=10)
    try:
        with pytest.raises(ProtocolError, match="wrong token"):
            SnapshotClient(node.address, token="not-" + token)
        client, _ = attach(node, token)  # served while the silent connection still waits
        client.close()
    finally:
        silent.close()


def test_token_comes_from_the_environment(node, token, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        SnapshotClient(node.address)
    monkeypatch.setenv(TOKEN_ENV, token)
    SnapshotClient(node.address).close()


def test_too_small_shm_fails_at_start_up_and_at_attach(node, token) -> None:
    with pytest.raises(RuntimeError, match=r"/dev/shm has .* GiB free but the snapshots need"):
        start_snapshot_process(SnapshotProcessConfig(expected_bytes=1 << 60), token=token)
    client = SnapshotClient(node.address, token=token)
    huge = [{"name": "g/master", "dtype": "float32", "shape": [1 << 50]}]
    with pytest.raises(ProtocolError, match="ShmSpaceError"):
        client.request({"op": "attach", "rank": 5, "tensors": huge, "meta_capacity": 4096})
    client.close()


def test_clean_shutdown_removes_the_segments(node, token) -> None:
    client, paths = attach(node, token)
    assert all(Path(p).exists() for p in paths)
    client.request({"op": "shutdown"})
    assert node.process.wait(10) == 0
    assert not any(Path(p).exists() for p in paths)


def test_stopping_a_killed_process_removes_what_it_left(node, token, capsys) -> None:
    """A SIGKILLed snapshot process cannot remove its segments; stopping it does (a failed job leaves no /dev/shm
    behind)."""
    client, paths = attach(node, token)
    client.close()
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)
    assert all(Path(p).exists() for p in paths), "a killed process leaves its segments"
    assert node.stop() == -signal.SIGKILL
    assert not any(Path(p).exists() for p in paths)
    assert f"removed 2 segments of job {node.job}, whose snapshot process ended with exit code -9" in \
        capsys.readouterr().out


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"SnapshotSinkConfig.every=0"):
        SnapshotSinkConfig(address="127.0.0.1:1", every=0)
    with pytest.raises(ValueError, match=r"SnapshotProcessConfig.shm_dir"):
        SnapshotProcessConfig(shm_dir="/no/such/dir")


# ------------------------------------------------------------------------ the sink and restores
def test_sink_alternates_and_corrupt_newest_falls_back(node, token, capsys) -> None:
    config = tiny_config(steps=6)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=2), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(6):
        trainer.train_step()
    sink.close()
    assert list(sink.stats.sealed_steps) == [2, 4, 6]
    client = SnapshotClient(node.address, token=token)
    slots = {s["step"]: s for s in client.request({"op": "latest", "rank": 0})["slots"]}
    assert sorted(slots) == [4, 6]
    newest = slots[6]["path"]
    buffer = seg.open_segment(newest, writable=True)
    start = seg.payload_offset(seg.read_header(buffer).meta_capacity)
    buffer[start + 10] ^= 0xFF
    buffer.close()

    # The generators are the process's: the reference runs its steps 5-6 before the restore sets them to step 4's.
    reference = Trainer(config)
    for _ in range(4):
        reference.train_step()
    expected = [reference.train_step().loss for _ in range(2)]
    fresh = Trainer(config)
    report = restore_from_node(fresh, node.address, token=token)
    assert (report.step, report.slot) == (4, slots[4]["slot"])
    assert "payload checksum mismatch" in report.skipped[0]
    assert "restored step 4 from slot" in capsys.readouterr().out
    assert [fresh.train_step().loss for _ in range(2)] == expected

    buffer = seg.open_segment(slots[4]["path"], writable=True)
    buffer[start + 10] ^= 0xFF
    buffer.close()
    with pytest.raises(SnapshotRestoreError, match="restore_trainer"):
        restore_from_node(Trainer(config), node.address, token=token)
    client.close()


@pytest.mark.timeout(120)
def test_sink_reattach_after_a_restore_keeps_its_mappings(node, token) -> None:
    """A worker that restores re-attaches its sink: the same segments stay mapped (on CUDA they are registered with
    the driver, and mapping them again at a reused address would fail), and snapshots go on after the restored one."""
    config = tiny_config(steps=6)
    sink = SnapshotSink(SnapshotSinkConfig(address=node.address, token=token, every=1), rank=0)
    trainer = Trainer(config, sinks=[sink])
    for _ in range(3):
        trainer.train_step()
    sink.flush()
    mapped = list(sink.segments)
    restored = restore_from_node(trainer, node.address, token=token)
    assert restored.step == 3
    sink.attach(trainer.shard_state(), restored_from=restored.path)
    assert sink.segments == mapped and all(a is b for a, b in zip(sink.segments, mapped))
    for _ in range(3):
        trainer.train_step()
    sink.close()
    assert list(sink.stats.sealed_steps) == [1, 2, 3, 4, 5, 6]
    sink.detach()
    assert sink.segments == []


@pytest.mark.timeout(120)
def test_snapshot_survives_kill_9_of_its_rank(node, token) -> None:
    config = tiny_config(steps=6)
    rank = mp.get_context("spawn").Process(target=w.snapshot_then_sigkill, args=(config, node.address, token, 3))
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
    for a, b in zip(reference.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("copier", ["thread", "process"])
def test_lost_snapshot_process_is_reported_and_a_restart_drops_its_memory(token, capsys, copier: str) -> None:
    first = start_snapshot_process(SnapshotProcessConfig(), token=token)
    config = tiny_config(steps=4)
    sink = SnapshotSink(SnapshotSinkConfig(address=first.address, token=token, timeout_s=5, copier=copier), rank=0)
    trainer = Trainer(config, sinks=[sink])
    trainer.train_step()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    with pytest.raises(SnapshotProcessLost, match="restart it"):
        trainer.train_step()
        trainer.train_step()
    with contextlib.suppress(SnapshotProcessLost):  # ends the copier process (its rank's end of the socket)
        sink.close()
    assert list(Path("/dev/shm").glob(f"regrow-snap-{first.job}-*")), "a killed process leaves its segments"
    second = start_snapshot_process(SnapshotProcessConfig(job=first.job), token=token)
    try:
        assert not list(Path("/dev/shm").glob(f"regrow-snap-{first.job}-*"))
        with pytest.raises(SnapshotRestoreError, match="no snapshot was ever sealed.*restore_trainer"):
            restore_from_node(Trainer(config), second.address, token=token)
    finally:
        second.stop()
    assert "the snapshots it held are lost" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_two_ranks_killed_mid_run_resume_bit_identically(node, token) -> None:
    """Both ranks SIGKILL themselves inside step 4; new ranks restore from the node's snapshot process (step 3, or
    step 2 if a rank died before sealing 3) and finish with the same losses and parameters as an uninterrupted run."""
    config = tiny_config(steps=6)
    env = {TOKEN_ENV: token}
    with pytest.raises(WorkerFailed, match="exited with code -9"):
        run_local(w.train_until_killed, 2, config, node.address, 4, backend="gloo", timeout_s=120, env=env)
    results = run_local(w.straight_and_restored, 2, config, node.address, backend="gloo", timeout_s=180, env=env)
    for result in results:
        step = result["restored_step"]
        assert step in (2, 3)
        assert result["resumed"] == result["straight"][step:]
        for name, value in result["straight_params"].items():
            assert torch.equal(value, result["resumed_params"][name]), name
