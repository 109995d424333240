"""Snapshots persisted as universal checkpoints by the snapshot process: the files equal the CheckpointWriter's,
they load at another world size, a slot reused during the copy is never persisted, failures leave ``latest``."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.node.persist import PersistConfig, persist_session
from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.node.server import SnapshotServer
from regrow.checkpoint.node.slot_copy import SlotOverwritten, copy_sealed
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, SnapshotClient
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.format import MANIFEST_NAME, PARTS_DIR, rank_file, temp_dir_name
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.launch.chaos.injector import corrupt_newest_snapshot
from regrow.launch.chaos.report import MANIFEST_VOLATILE
from regrow.launch.local.spawn import run_local
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.tests import persist_workers as pw
from regrow.trainer.loop import Trainer

SHM = Path("/dev/shm")


@pytest.fixture
def token() -> str:
    return secrets.token_hex(32)


def wait_for_output(capfd: pytest.CaptureFixture, line: str, timeout_s: float = 60.0) -> str:
    """Everything printed (by this process's threads too) until ``line`` appears; raises after ``timeout_s``."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    while line not in seen:
        assert time.monotonic() < deadline, f"{line!r} never printed; printed:\n{seen}"
        seen += capfd.readouterr().out
        time.sleep(0.01)
    return seen


class InProcessNode:
    """A SnapshotServer served on a thread of the test process, so a test can reach its persister (hooks);
    shut down and its segments removed by :meth:`close`."""

    def __init__(self, persist: PersistConfig, token: str) -> None:
        self.job = f"persist-{secrets.token_hex(3)}"
        self.server = SnapshotServer(SnapshotProcessConfig(job=self.job, persist=persist), token)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.client = SnapshotClient(self.server.address, token=token, timeout_s=30)

    def outcomes(self, step: int) -> list[dict]:
        """The persister's outcomes for ``step`` so far, oldest first."""
        return [r for r in self.client.request({"op": "persisted"})["results"] if r["step"] == step]

    def wait_for(self, step: int, timeout_s: float = 60.0, nth: int = 1) -> dict:
        """The ``nth`` outcome for ``step`` (a step re-run after a rollback has a second), once there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.outcomes(step)
            if len(found) >= nth:
                return found[nth - 1]
            time.sleep(0.02)
        raise TimeoutError(f"no persist outcome {nth} for step {step} within {timeout_s} s")

    def stall_copy_of(self, stalled: int) -> tuple[threading.Event, threading.Event]:
        """Makes the persister's copy of step ``stalled`` wait: returns (copying: set once it waits, proceed: set
        it to let the copy finish)."""
        copying, proceed = threading.Event(), threading.Event()

        def hook(rank: int, step: int) -> None:
            if step == stalled:
                copying.set()
                assert proceed.wait(120), "the test never released the copy"

        self.server.persister.copy_hook = hook
        return copying, proceed

    def trainer(self, config, token: str) -> tuple[Trainer, SnapshotSink]:
        """A trainer of ``config`` with a snapshot sink attached to this node (which is told the run config)."""
        self.client.request({"op": "run_config", "config": config.to_dict()})
        sink = SnapshotSink(SnapshotSinkConfig(address=self.server.address, token=token), rank=0)
        return Trainer(config, sinks=[sink]), sink

    def close(self) -> None:
        self.client.close()
        self.server.shutdown()
        self.thread.join(30)
        for leftover in SHM.glob(f"regrow-snap-{self.job}-*"):
            leftover.unlink()


def tensor_files(ckpt: Path) -> dict[str, bytes]:
    """Every file of a committed checkpoint but the manifest, by relative path."""
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def assert_same_checkpoint(persisted: Path, reference: Path) -> None:
    """File for file the same bytes; the same manifest except the time and the writer's session."""
    ours, theirs = (json.loads((d / MANIFEST_NAME).read_text()) for d in (persisted, reference))
    for manifest in (ours, theirs):
        for volatile in MANIFEST_VOLATILE:
            manifest.pop(volatile)
    assert ours == theirs
    assert tensor_files(persisted) == tensor_files(reference)
    assert verify.verify(persisted).ok


def assert_same_restore(persisted: Path, reference: Path, world_size: int) -> None:
    """Restored into fresh trainers at ``world_size`` (this process: 1), both give the same tensors."""
    a, b = Trainer(cw.config(world_size)), Trainer(cw.config(world_size))
    restore_trainer(a, persisted)
    restore_trainer(b, reference)
    assert a.step == b.step
    for (name, x), y in zip(a.optimizer.shard_tensors().items(), b.optimizer.shard_tensors().values()):
        assert torch.equal(x, y), name
    for (name, x), y in zip(cw.params_of(a).items(), cw.params_of(b).values()):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------------ configuration
def test_bad_persist_config_gives_clear_errors(tmp_path, token) -> None:
    with pytest.raises(ValueError, match=r"PersistConfig.persist_every=-1 must be an integer >= 0"):
        PersistConfig(persist_every=-1)
    with pytest.raises(ValueError, match=r"PersistConfig.persist_dir is empty but persist_every=2"):
        PersistConfig(persist_every=2)
    with pytest.raises(ValueError, match=r"PersistConfig.keep_last=1 must be an integer >= 2"):
        PersistConfig(persist_every=2, persist_dir=str(tmp_path), keep_last=1)
    with pytest.raises(ValueError, match=r"PersistConfig.commit_timeout_s=0"):
        PersistConfig(persist_every=2, persist_dir=str(tmp_path), commit_timeout_s=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"PersistConfig.persist_dir=.* is not a directory"):
        PersistConfig(persist_every=2, persist_dir=str(tmp_path / "file"))
    assert not PersistConfig().enabled and SnapshotProcessConfig().persist == PersistConfig()

    env = dict(os.environ, **{TOKEN_ENV: token})
    command = [sys.executable, "-m", "regrow.checkpoint.node", "--persist-every", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "PersistConfig.persist_dir is empty" in done.stderr
    with pytest.raises(RuntimeError, match="did not start"):  # a persist_dir that cannot be created
        start_snapshot_process(SnapshotProcessConfig(persist=PersistConfig(
            persist_every=2, persist_dir=str(tmp_path / "file" / "ckpt"))), token=token, timeout_s=60)


def test_session_is_shared_by_the_job_and_differs_by_step_and_job(token) -> None:
    assert persist_session(token, 4) == persist_session(token, 4)
    assert persist_session(token, 4) != persist_session(token, 6)
    assert persist_session(token, 4) != persist_session(secrets.token_hex(32), 4)
    assert len(persist_session(token, 4)) == 16 and token[:16] not in persist_session(token, 4)


# ------------------------------------------------------------------------ the race with the ranks
@pytest.mark.timeout(240)
def test_slot_held_during_the_copy_is_not_reused(tmp_path, token, capsys) -> None:
    """The copy of step 2 is slowed (a hook) while the rank trains on: the snapshot process holds step 2's slot, so
    the sink rewrites its other slot for steps 3 to 5 and step 2 is persisted intact; step 4 arrives while busy and
    is skipped; step 6 is persisted. Steps 2 and 6 equal the CheckpointWriter's byte for byte."""
    root = tmp_path / "persisted"
    node = InProcessNode(PersistConfig(persist_every=2, persist_dir=str(root), keep_last=2, commit_timeout_s=30),
                         token)
    try:
        copied, proceed = node.stall_copy_of(2)
        config = cw.config(1, steps=6)
        trainer, sink = node.trainer(config, token)
        trainer.train_step()
        trainer.train_step()
        assert copied.wait(60), "step 2 was never offered for persisting"
        held_slot = next(s["slot"] for s in node.client.request({"op": "latest", "rank": 0})["slots"]
                         if s["step"] == 2)
        for _ in range(3):
            trainer.train_step()
            slots = {s["slot"]: s["step"] for s in node.client.request({"op": "latest", "rank": 0})["slots"]}
            assert slots[held_slot] == 2, "the held slot was overwritten"
        proceed.set()
        assert node.wait_for(2)["status"] == "committed"
        trainer.train_step()
        sink.close()
        assert list(sink.stats.skipped_steps) == []
        assert node.wait_for(6)["status"] == "committed"
        statuses = [(r["step"], r["status"]) for r in node.client.request({"op": "persisted"})["results"]]
        assert statuses == [(4, "skipped"), (2, "committed"), (6, "committed")]
        out = capsys.readouterr().out
        assert "persist of step 4 skipped: the persist of step 2 is still running" in out
        assert f"persisted step 6 to {root / 'step_00000006'} in" in out
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000006"]

        # The same slot again, read directly: it now holds step 4, so a copy of step 2 is refused up front.
        slots = {s["step"]: s["path"] for s in node.client.request({"op": "latest", "rank": 0})["slots"]}
        buffer = seg.open_segment(slots[6], writable=False)
        try:
            with pytest.raises(SlotOverwritten, match="not a sealed snapshot of step 2"):
                copy_sealed(buffer, rank=0, step=2)
            snapshot = copy_sealed(buffer, rank=0, step=6, threads=3)
            assert snapshot.step == 6
            snapshot.payload.release()
        finally:
            buffer.close()
    finally:
        node.close()

    reference = tmp_path / "reference"
    writer_trainer = Trainer(config)
    # "wait": the reference must hold every even step; with "skip" a slow machine skips 4 and 6 (steps take ms).
    writer = CheckpointWriter(WriterConfig(root=str(reference), save_every=2, keep_last=3, when_busy="wait"),
                              run_config=config.to_dict())
    writer_trainer.sinks.append(writer)
    writer_trainer.run()
    for step in ("step_00000002", "step_00000006"):
        assert_same_checkpoint(root / step, reference / step)


@pytest.mark.timeout(240)
def test_the_runs_last_step_is_persisted_even_while_busy(tmp_path, token, capsys) -> None:
    """Persist every 4 in a 6-step run: step 6 is not a multiple of 4 but is the run's last, and it arrives while
    step 4's copy is still running (slowed by a hook). It is queued, not skipped, so the run ends with a
    checkpoint of its final state, equal to the CheckpointWriter's byte for byte."""
    root = tmp_path / "persisted"
    node = InProcessNode(PersistConfig(persist_every=4, persist_dir=str(root), commit_timeout_s=30), token)
    try:
        copying, proceed = node.stall_copy_of(4)
        config = cw.config(1, steps=6)
        trainer, sink = node.trainer(config, token)
        for _ in range(6):
            trainer.train_step()
        sink.close()
        assert copying.wait(60)
        assert node.client.request({"op": "persisted"})["in_flight"] == 4
        proceed.set()
        assert node.wait_for(6)["status"] == "committed"
        statuses = [(r["step"], r["status"]) for r in node.client.request({"op": "persisted"})["results"]]
        assert statuses == [(4, "committed"), (6, "committed")]
        assert "persist of step 6, the run's last, waits for the persist of step 4" in capsys.readouterr().out
        assert storage.read_latest(root) == "step_00000006"
    finally:
        node.close()
    reference = tmp_path / "reference"
    writer = CheckpointWriter(WriterConfig(root=str(reference), save_every=4, final_step=6, when_busy="wait"),
                              run_config=config.to_dict())
    Trainer(config, sinks=[writer]).run()
    assert_same_checkpoint(root / "step_00000006", reference / "step_00000006")


@pytest.mark.timeout(240)
def test_failed_persist_fails_at_once_with_the_os_error_and_leaves_latest(tmp_path, token, capsys) -> None:
    """Step 4's temporary directory cannot be created (a regular file is in the way: ENOTDIR, which stops root
    too): the holder of rank 0, whose own part failed, gives the step up at once with the OS's error instead of
    waiting its 30-s commit timeout for its own marker; ``latest`` stays on step 2, and training never noticed."""
    root = tmp_path / "persisted"
    root.mkdir()
    (root / temp_dir_name(4, persist_session(token, 4))).write_text("in the way")
    node = InProcessNode(PersistConfig(persist_every=2, persist_dir=str(root), commit_timeout_s=30), token)
    try:
        trainer = Trainer(cw.config(1, steps=4), sinks=[SnapshotSink(SnapshotSinkConfig(
            address=node.server.address, token=token), rank=0)])
        for _ in range(3):  # step 3's after_step waits for step 2's seal and COMMIT
            trainer.train_step()
        assert node.wait_for(2)["status"] == "committed"  # so that step 4 does not find it busy
        trainer.run()
        ended = time.monotonic()
        failed = node.wait_for(4, timeout_s=60)
        assert time.monotonic() - ended < 10, "the holder of rank 0 waited for its commit timeout"
        assert failed["status"] == "failed"
        assert failed["error"].startswith("rank 0: NotADirectoryError: [Errno 20] Not a directory")
        assert storage.read_latest(root) == "step_00000002"
        assert [step for step, _ in storage.committed(root)] == [2]
        assert "persist of step 4 FAILED: rank 0: NotADirectoryError" in capsys.readouterr().out
    finally:
        node.close()


# ------------------------------------------------------------------------ two nodes, real processes
@pytest.mark.timeout(480)
def test_two_nodes_persist_what_the_checkpoint_writer_saves(tmp_path, token) -> None:
    """Two snapshot processes (two simulated nodes of two ranks each) persist steps 2, 4 and 6 of a 4-rank run
    whose ranks have no checkpoint writer; every checkpoint equals the CheckpointWriter's of a reference run, file
    for file, and loads at world size 1."""
    root, reference = tmp_path / "persisted", tmp_path / "reference"
    config = cw.config(4, steps=6)
    persist = PersistConfig(persist_every=2, persist_dir=str(root), keep_last=3, commit_timeout_s=60)
    base = secrets.token_hex(3)
    nodes = []
    try:
        for i in range(2):
            nodes.append(start_snapshot_process(SnapshotProcessConfig(job=f"{base}-n{i}", persist=persist),
                                                token=token))
        for node in nodes:
            client = SnapshotClient(node.address, token=token)
            client.request({"op": "run_config", "config": config.to_dict()})
            client.close()
        results = run_local(pw.train_on_nodes, 4, config, [n.address for n in nodes], 2, 2, backend="gloo",
                            timeout_s=300, env={TOKEN_ENV: token})
        statuses = []
        for node in nodes:
            client = SnapshotClient(node.address, token=token)
            statuses.append({r["step"]: r["status"] for r in client.request({"op": "persisted"})["results"]})
            client.close()
    finally:
        for node in nodes:
            node.stop()
        for leftover in SHM.glob(f"regrow-snap-{base}-*"):
            leftover.unlink()
    assert all(r["sinks"] == ["SnapshotSink"] for r in results), "the ranks wrote no checkpoint themselves"
    assert statuses == [{2: "committed", 4: "committed", 6: "committed"}, {2: "written", 4: "written", 6: "written"}]
    assert [step for step, _ in storage.committed(root)] == [2, 4, 6]
    assert storage.read_latest(root) == "step_00000006"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")]

    run_local(pw.train_with_writer, 4, config, str(reference), 2, backend="gloo", timeout_s=300)
    for step in (2, 4, 6):
        name = f"step_{step:08d}"
        assert_same_checkpoint(root / name, reference / name)
    assert_same_restore(root / "step_00000004", reference / "step_00000004", world_size=1)


# ------------------------------------------------------------------------ a step re-run after a rollback
@pytest.mark.timeout(300)
def test_a_step_re_run_after_a_rollback_is_persisted_from_its_own_lineage_only(tmp_path, token, capfd) -> None:
    """Two nodes of one rank. Node 1 persisted its part of step 4, node 0 did not (its copy failed), then rank 0's
    snapshot of step 4 turns out corrupt: the job restores step 3 and re-runs step 4 in a new lineage. Node 0 must
    not commit step 4 with node 1's part of the abandoned run: it waits for node 1's part of the re-run (held back
    here), then commits files equal to the CheckpointWriter's of an uninterrupted run."""
    root, reference = tmp_path / "persisted", tmp_path / "reference"
    config = cw.config(2, steps=4)
    persist = PersistConfig(persist_every=4, persist_dir=str(root), commit_timeout_s=60)
    env = {TOKEN_ENV: token}
    nodes: list[InProcessNode] = []
    proceed = threading.Event()
    try:
        nodes = [InProcessNode(persist, token) for _ in range(2)]
        addresses = [node.server.address for node in nodes]
        for node in nodes:
            node.client.request({"op": "run_config", "config": config.to_dict()})

        stale = root / temp_dir_name(4, persist_session(token, 4)) / PARTS_DIR / rank_file(1, ".json")

        def lose_step_4(rank: int, step: int) -> None:
            if step == 4:
                raise OSError("test: node 0 loses its copy of step 4")

        def after_node_0_gave_up(rank: int, step: int) -> None:
            """Node 1 writes its part once node 0 has given step 4 up: node 0, holding rank 0, gives up by removing
            the temporary directory, which would take node 1's marker with it had it come first (the abandoned
            run then leaves nothing behind: not the case of this test)."""
            deadline = time.monotonic() + 60
            while not nodes[0].server.persister.status()["results"] and time.monotonic() < deadline:
                time.sleep(0.01)

        nodes[0].server.persister.copy_hook = lose_step_4
        nodes[1].server.persister.copy_hook = after_node_0_gave_up
        run_local(pw.train_to_the_end, 2, config, addresses, backend="gloo", timeout_s=120, env=env)
        assert nodes[0].wait_for(4)["status"] == "failed"
        assert nodes[1].wait_for(4)["status"] == "written"
        assert stale.is_file()  # node 1's marker of the abandoned run's step 4 stays behind
        assert corrupt_newest_snapshot(nodes[0].client, 0)["step"] == 4

        nodes[0].server.persister.copy_hook = None
        copying, proceed = nodes[1].stall_copy_of(4)  # replaces node 1's hook
        results = run_local(pw.restore_and_train_to_the_end, 2, config, addresses, backend="gloo", timeout_s=120,
                            env=env)
        assert [r["step"] for r in results] == [3, 3]
        lineages = {r["lineage"] for r in results} | {r["trainer_lineage"] for r in results}
        assert len(lineages) == 1 and "" not in lineages
        assert copying.wait(60), "node 1 never persisted the re-run step 4"
        # Node 0 has written rank 0's part of the re-run and passed over node 1's part of the abandoned run: an
        # order the log shows, not a time.
        wait_for_output(capfd, "persist of step 4: the part of rank 1 on disk is from another run of the step")
        assert len(nodes[0].outcomes(4)) == 1, "node 0 committed without node 1's part of the re-run"
        assert not (root / "step_00000004").exists()
        proceed.set()
        nodes[0].wait_for(4, nth=2)
        assert [r["status"] for r in nodes[0].outcomes(4)] == ["failed", "committed"]
    finally:
        proceed.set()
        for node in nodes:
            node.close()
    run_local(pw.train_with_writer, 2, config, str(reference), 4, backend="gloo", timeout_s=120)
    assert_same_checkpoint(root / "step_00000004", reference / "step_00000004")


@pytest.mark.timeout(300)
def test_a_step_skipped_on_one_node_fails_at_once_on_the_holder_of_rank_0(tmp_path, token) -> None:
    """Node 1 is still writing step 2 when step 4 comes (node 0 persists every 4 steps, node 1 every 2, whose write of
    step 2 is held back here): node 1 skips step 4 and says so with an error marker, so node 0 gives step 4 up at
    once rather than after its 60-s commit timeout; the run's last step, 6, is then persisted by both."""
    root = tmp_path / "persisted"
    config = cw.config(2, steps=6)
    env = {TOKEN_ENV: token}
    nodes: list[InProcessNode] = []
    writing, proceed = threading.Event(), threading.Event()
    try:
        nodes = [InProcessNode(PersistConfig(persist_every=every, persist_dir=str(root), commit_timeout_s=60), token)
                 for every in (4, 2)]
        for node in nodes:
            node.client.request({"op": "run_config", "config": config.to_dict()})
        slow, write = nodes[1].server.persister, nodes[1].server.persister._write

        def held_write(step: int, *args):
            if step == 2:
                writing.set()
                assert proceed.wait(120), "the test never released the write"
            return write(step, *args)

        slow._write = held_write  # the copy is done by then: the ranks' slots are free, training goes on
        run_local(pw.train_to_the_end, 2, config, [node.server.address for node in nodes], backend="gloo",
                  timeout_s=120, env=env)
        assert writing.is_set()
        assert nodes[1].wait_for(4)["status"] == "skipped"
        given_up = time.monotonic()
        failed = nodes[0].wait_for(4, timeout_s=30)
        assert time.monotonic() - given_up < 20, "node 0 waited for its commit timeout"
        assert failed["status"] == "failed" and "skipped on this rank's node" in failed["error"]
        proceed.set()
        assert nodes[0].wait_for(6)["status"] == "committed"
        assert nodes[1].wait_for(6)["status"] == "written"
    finally:
        proceed.set()
        for node in nodes:
            node.close()
    assert storage.read_latest(root) == "step_00000006"
    assert verify.verify(root / "step_00000006").ok
