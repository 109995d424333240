"""Training under a real torchrun (``launch/torchrun.py``): torchrun's own ``--max-restarts`` restarts the ranks and
they restore from the node's snapshot process, which the node helper started before torchrun.

The runs are real subprocesses (the node helper, torchrun's agent, gloo workers, the snapshot process). Every
process a test started is killed on the way out, its whole tree (torchrun starts each worker in a session of its
own, so one killpg would miss them), and the job's ``/dev/shm`` segments are removed, even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, ProtocolError, request_once
from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.format import MANIFEST_NAME
from regrow.launch import holdings, node_helper, torchrun
from regrow.launch.chaos import plan as faults
from regrow.launch.chaos.report import MANIFEST_VOLATILE
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.node_group import GroupDirectory, Member
from regrow.launch.options import CheckpointOptions, SnapshotOptions
from regrow.tests.fingerprint import assert_same_checkpoint

STEPS = 8
KILL_STEP = 5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = ["-m", "regrow.launch.torchrun", "--preset", "tiny", "--dropout", "0.1", "--steps", str(STEPS),
          "--global-batch", "4",
          "--micro-batch", "2", "--lr", "1e-2", "--warmup-steps", "2", "--log-every", "1", "--timeout", "120",
          "--save-every", str(STEPS)]


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant still running (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def kill_tree(root: int) -> None:
    for pid in process_tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait(10)


@pytest.fixture
def job() -> Iterator[str]:
    """A fresh snapshot job name; its segments are removed afterwards whatever happened."""
    name = f"torchrun-test-{secrets.token_hex(4)}"
    yield name
    for leftover in Path("/dev/shm").glob(f"regrow-snap-{name}-*"):
        leftover.unlink(missing_ok=True)


def run(command: list[str], started: list[subprocess.Popen], env: dict[str, str], timeout_s: float = 120.0) -> str:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started.append(process)
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        out, _ = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... did not finish in {timeout_s} s:\n{out}")
    assert process.returncode == 0, out
    return out


def step_files(step: Path) -> dict[str, bytes]:
    """Every tensor file of one checkpoint step (the manifest differs in its creation time only)."""
    return {str(p.relative_to(step)): p.read_bytes() for p in sorted(step.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


@pytest.mark.timeout(240)
def test_torchrun_restarts_a_killed_rank_and_it_restores_from_the_snapshot_process(started, job, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, ADDRESS_ENV, faults.FAULTS_ENV)}
    run([*TORCHRUN, *WORKER, "--ckpt-dir", str(tmp_path / "reference")], started, env)

    fired = tmp_path / "fired"
    fired.mkdir()
    # The plan goes to torchrun's environment, which its agent hands to every worker (launch/torchrun.py).
    faulted_env = {**env, **faults.plan_env([faults.Fault("kill-rank", 1, KILL_STEP)], str(fired))}
    out = run([sys.executable, "-m", "regrow.launch.torchrun", "node", "--job", job, "--",
               *TORCHRUN, "--max-restarts", "1", *WORKER, "--snapshot-every", "1",
               "--ckpt-dir", str(tmp_path / "faulted")], started, faulted_env)

    assert "first start, TORCHELASTIC_RESTART_COUNT=0: nothing to restore; starting from step 0" in out, out
    assert f"[rank 1, step {KILL_STEP}] fault: kill-rank:1@{KILL_STEP} fires" in out, out
    assert "restart, TORCHELASTIC_RESTART_COUNT=1: the job holds a state" in out, out
    steps = {int(m.group(2)) for m in re.finditer(r"\[rank (\d), step (\d+)\] restore: source snapshot ", out)}
    assert len(re.findall(r"restore: source snapshot ", out)) == 2 and len(steps) == 1, out
    assert 1 <= steps.pop() < KILL_STEP
    assert "restore: source checkpoint" not in out
    assert "[node] snapshot process stopped (exit code 0)" in out, out
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job}-*"))

    assert_same_checkpoint(tmp_path / "faulted", tmp_path / "reference")


@pytest.mark.timeout(240)
def test_node_helper_persists_the_checkpoints_the_ranks_writer_would(started, job, tmp_path) -> None:
    """``node --persist-every 4``: the node's snapshot process writes universal checkpoints from the ranks'
    snapshots. Its latest (step 4 or 8: a persist that finds the previous one still running is skipped, and these
    steps are short) is the ranks' own save of that step (``--save-every 4``), byte for byte, manifest included but
    its time and writer session (so the run's config reached the snapshot process), and it verifies."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, ADDRESS_ENV, faults.FAULTS_ENV)}
    persisted, own = tmp_path / "persisted", tmp_path / "own"
    out = run([sys.executable, "-m", "regrow.launch.torchrun", "node", "--job", job, "--persist-every", "4",
               "--persist-dir", str(persisted), "--", *TORCHRUN, *WORKER, "--snapshot-every", "1",
               "--ckpt-dir", str(own), "--save-every", "4"], started, env)
    assert f"persisting every 4 steps to {persisted}" in out, out
    latest = storage.read_latest(persisted)
    assert latest in ("step_00000004", "step_00000008"), out
    ours, theirs = (json.loads((root / latest / MANIFEST_NAME).read_text()) for root in (persisted, own))
    for manifest in (ours, theirs):
        for volatile in MANIFEST_VOLATILE:
            manifest.pop(volatile)
    assert ours == theirs
    assert step_files(persisted / latest) == step_files(own / latest)
    assert verify.verify(persisted / latest).ok
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job}-*"))


EC_NODES = 3


def ec_node(node: int, job: str, ec_dir: Path, port: int, worker: list[str]) -> list[str]:
    """Node ``node`` of :data:`EC_NODES` simulated nodes: its helper (erasure coding, p = 1) running its torchrun
    agent, one rank per node, the agents meeting in a c10d rendezvous on this machine."""
    return [sys.executable, "-m", "regrow.launch.torchrun", "node", "--job", f"{job}-n{node}", "--node-rank", str(node),
            "--nnodes", str(EC_NODES), "--ec-group-size", str(EC_NODES), "--ec-parity", "1", "--ec-dir", str(ec_dir),
            "--", sys.executable, "-m", "torch.distributed.run", "--nnodes", str(EC_NODES), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job, "--max-restarts", "2",
            "--monitor-interval", "0.5", *worker]


@pytest.mark.timeout(300)
def test_a_node_lost_under_torchrun_is_rebuilt_from_its_erasure_coding_group(started, job, tmp_path) -> None:
    """Three simulated nodes, each a node helper with its own torchrun agent and one rank, their snapshot
    processes erasure-coding each other (p = 1) after meeting in ``--ec-dir``. ``kill-node:2@5`` kills node 2's rank
    and its snapshot process together; the helper starts a replacement on the same address and the group rebuilds
    it, torchrun restarts every rank, and they restore the rebuilt step: the final checkpoint is byte-identical to a
    fault-free run's."""
    worker = [arg if arg != "4" or prev != "--global-batch" else "6" for prev, arg in zip(["", *WORKER], WORKER)]
    # One thread per rank in both runs: torchrun sets it itself only for several ranks per node, and the thread
    # count changes the order of the sums inside a matmul.
    env = {**{k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, ADDRESS_ENV, faults.FAULTS_ENV)},
           "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(EC_NODES), *worker,
         "--ckpt-dir", str(tmp_path / "reference")], started, env)

    fired = tmp_path / "fired"
    fired.mkdir()
    env = {**env, TOKEN_ENV: secrets.token_hex(32),
           **faults.plan_env([faults.Fault("kill-node", 2, KILL_STEP)], str(fired))}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = [tmp_path / f"node{node}.log" for node in range(EC_NODES)]
    nodes = []
    for node, log in enumerate(logs):
        with log.open("w") as out:
            nodes.append(subprocess.Popen(ec_node(node, job, tmp_path / "ec", port,
                                                  [*worker, "--snapshot-every", "1", "--ckpt-dir",
                                                   str(tmp_path / "faulted")]),
                                          env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    started.extend(nodes)
    for process in nodes:
        try:
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail("a node did not finish in 240 s:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    outs = [log.read_text() for log in logs]
    assert [process.returncode for process in nodes] == [0] * EC_NODES, "\n".join(o[-3000:] for o in outs)
    assert all(f"erasure-coding group [0, 1, 2] (parity 1) meeting in {tmp_path / 'ec'}" in out for out in outs)
    assert f"fault: kill-node:2@{KILL_STEP} fires" in outs[2], outs[2]
    # c10d orders the agents its own way: node 2's rank need not be rank 2 (it stays the same across restarts).
    assert "snapshot process gone" in outs[2] and re.search(r"ranks \[\d\] rebuilt at step \d+ from group", outs[2]), \
        outs[2]
    restored = re.findall(r"restore: source (snapshot|erasure-coded buffer) .*?step (\d+)", "".join(outs))
    assert len({step for _, step in restored}) == 1 and "restore: source checkpoint" not in "".join(outs), restored
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job}-*"))
    assert_same_checkpoint(tmp_path / "faulted", tmp_path / "reference")


@pytest.mark.parametrize("flags, token, message", [
    (["--ec-group-size", "3"], True, "--ec-group-size 3 needs --node-rank, --nnodes, --ec-dir"),
    (["--ec-group-size", "3", "--node-rank", "0", "--nnodes", "3", "--ec-dir", "d"], False,
     f"--ec-group-size needs {TOKEN_ENV} exported, the same on every node"),
    (["--ec-group-size", "3", "--node-rank", "3", "--nnodes", "3", "--ec-dir", "d"], True,
     "--node-rank=3 must be below --nnodes=3"),
    (["--ec-group-size", "2", "--node-rank", "0", "--nnodes", "3", "--ec-dir", "d"], True,
     "--ec-group-size=2 must divide --nnodes=3"),
])
def test_node_helper_erasure_coding_flags_name_the_fix(job, monkeypatch, capfd, flags, token, message) -> None:
    if token:
        monkeypatch.setenv(TOKEN_ENV, secrets.token_hex(32))
    else:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit):
        torchrun.main(["node", "--job", job, *flags, "--", "true"])
    assert message in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_a_replacement_holds_the_ranks_requests_until_its_rebuild_ends(job) -> None:
    """A snapshot process started with ``await_rebuild`` (the helper's replacement) answers a rank's request only
    once ``ec_rebuild`` has ended, failed included (then the rank falls back further instead of waiting)."""
    token = secrets.token_hex(32)
    process = start_snapshot_process(SnapshotProcessConfig(job=job, await_rebuild=True, erasure=ErasureCodingConfig(
        ec_group_size=2, ec_parity=1)), token=token)
    try:
        answered: list[dict] = []
        rank = threading.Thread(target=lambda: answered.append(
            request_once(process.address, {"op": "latest", "rank": 0}, token=token, timeout_s=30)))
        rank.start()
        rank.join(1.5)
        assert not answered, "a rank's request was answered before the rebuild"
        with pytest.raises(ProtocolError, match="ec_rebuild before ec_group"):  # no group announced: it fails
            request_once(process.address, {"op": "ec_rebuild"}, token=token, timeout_s=30)
        rank.join(10)
        assert answered and answered[0]["ok"], answered
    finally:
        process.stop()


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a JSON member entry"),
    (b'{"node": 1, "address": "127.0.0.1:5", "incarnation": 0}', "node must be 0"),
    (b'{"node": 0, "address": "127.0.0.1:5", "incarnation": -1}', "incarnation an integer >= 0"),
    (b'{"node": 0, "address": "127.0.0.1:5", "incarnation": 0, "x": 1}', "must hold exactly node, address"),
    (b'{"node": 0, "address": "no port", "incarnation": 0}', "host:port"),
    (b" " * 5000, "larger than 4096 bytes"),
])
def test_a_bad_group_entry_is_refused_naming_the_file(tmp_path, content, message) -> None:
    directory = GroupDirectory(tmp_path)
    assert directory.read(0) is None
    directory.path(0).write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        directory.read(0)
    assert str(directory.path(0)) in str(caught.value) or "host:port" in message
    directory.publish(Member(node=0, address="127.0.0.1:5", incarnation=2))
    assert directory.read(0) == Member(node=0, address="127.0.0.1:5", incarnation=2)


def test_node_helper_refuses_persisting_without_a_directory(job, capfd) -> None:
    with pytest.raises(SystemExit):
        torchrun.main(["node", "--job", job, "--persist-every", "4", "--", "true"])
    assert "--persist-dir is empty but --persist-every=4 turns persistence on" in capfd.readouterr().err


def test_node_helper_hands_token_and_address_to_the_command_and_cleans_up(job, monkeypatch, capfd) -> None:
    token = secrets.token_hex(32)
    monkeypatch.setenv(TOKEN_ENV, token)
    check = (f"import os, sys; from regrow.checkpoint.snapshot.protocol import SnapshotClient\n"
             f"assert os.environ['{TOKEN_ENV}'] == {token!r} and os.environ['{node_helper.UNSHARED_STORE_ENV}'] == '1'\n"
             f"client = SnapshotClient(os.environ['{ADDRESS_ENV}'])\n"
             "client.request({'op': 'attach', 'rank': 0, 'tensors': [{'name': 'w', 'dtype': 'float32', "
             "'shape': [4]}], 'meta_capacity': 4096})\n"
             "sys.exit(3)")
    assert torchrun.main(["node", "--job", job, "--", sys.executable, "-c", check]) == 3
    out = capfd.readouterr().out
    assert f"job {job}" in out and "removed 2 segments" in out and "stopped (exit code 0)" in out, out
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job}-*"))


def test_node_helper_errors_name_the_fix(job, capfd) -> None:
    assert torchrun.main(["node", "--job", job, "--", "/nonexistent/torchrun"]) == 127
    assert "cannot run '/nonexistent/torchrun'" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        torchrun.main(["node", "--job", job])
    assert "give the command to run after --" in capfd.readouterr().err


def test_worker_outside_torchrun_names_the_fix(monkeypatch, capsys) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun.main(["--preset", "tiny", "--max-restarts", "2", "--snapshot-every", "-1"]) == 2
    err = capsys.readouterr().err
    for expected in ("is the worker torchrun starts", "--max-restarts=2 is the local launcher's flag",
                     "--snapshot-every=-1 must be >= 0"):
        assert expected in err, err


@pytest.mark.parametrize("holds, snapshots, start_from, expected", [
    (False, True, None, (None, False)),              # first start: nothing restores
    (True, True, None, (None, True)),                # snapshots on: restore_job (falls back to --ckpt-dir itself)
    (True, False, None, ("latest", None)),           # snapshots off: latest of --ckpt-dir
    (False, True, "/ckpt/step_5", ("/ckpt/step_5", False)),  # --resume DIR: where a job with no state starts
    (True, True, "/ckpt/step_5", (None, True)),      # ... never over the job's own state
])
def test_each_start_restores_from_exactly_one_source(holds, snapshots, start_from, expected) -> None:
    snapshotting = SnapshotOptions(every=1, address="127.0.0.1:1") if snapshots else None
    checkpointing, snapshotting = holdings.resumed_plans(
        holds, checkpointing=CheckpointOptions(ckpt_dir="/ckpt", save_every=4), snapshotting=snapshotting,
        start_from=start_from, ckpt_dir="/ckpt")
    assert checkpointing is not None and checkpointing.save_every == 4
    assert (checkpointing.resume, snapshotting.resume if snapshotting else None) == expected
