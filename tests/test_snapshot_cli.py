"""``regrow train`` with in-memory snapshots, end to end through the command line (real processes, CPU, gloo).

The training processes are ``python -m regrow train`` subprocesses, each in its own session so a test can kill a
whole run (launcher and ranks) with one SIGKILL, and every one of them is killed on the way out even when the test
fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.launch import cli

STEPS = 60
TINY = ["--nproc", "2", "--preset", "tiny", "--global-batch", "4", "--micro-batch", "2", "--log-every", "0",
        "--warmup-steps", "5", "--timeout", "120"]


def regrow_train(*extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regrow", "train", *TINY, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"regrow train did not finish in {timeout_s} s:\n{out}")
    return out


@pytest.fixture
def runs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture
def node() -> Iterator[tuple[SnapshotProcess, str]]:
    """A snapshot process started outside any run (as before torchrun), so it outlives a killed run."""
    token = secrets.token_hex(32)
    process = start_snapshot_process(SnapshotProcessConfig(), token=token)
    try:
        yield process, token
    finally:
        process.stop()
        for leftover in Path("/dev/shm").glob(f"regrow-snap-{process.job}-*"):
            leftover.unlink()


def losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


def tensor_bytes(root: Path) -> dict[str, bytes]:
    """The tensor files of ``root``'s latest checkpoint (the manifest holds a creation time, so it is left out)."""
    latest = root / (root / "latest").read_text().strip()
    return {str(p.relative_to(latest)): p.read_bytes() for p in sorted(latest.rglob("*.bin"))}


def test_snapshot_every_step_runs_and_leaves_no_segments(runs) -> None:
    runs.append(process := regrow_train("--steps", "4", "--snapshot-every", "1"))
    out = finish(process)
    assert process.returncode == 0, out
    job = re.search(r"READY \S+ job (\S+) pid", out)
    assert job, out
    assert "removed 4 segments" in out and "stopped (exit code 0)" in out, out
    assert not list(Path("/dev/shm").glob(f"regrow-snap-{job.group(1)}-*"))


def test_killed_run_resumes_from_the_node_snapshot_bit_identically(runs, node, tmp_path) -> None:
    process, token = node
    env = dict(os.environ, **{TOKEN_ENV: token})
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    save = ["--steps", str(STEPS), "--save-every", str(STEPS)]
    runs.append(straight := regrow_train(*save, "--ckpt-dir", str(straight_dir), "--metrics",
                                         str(tmp_path / "straight.jsonl")))
    out = finish(straight)
    assert straight.returncode == 0, out

    killed_metrics = tmp_path / "killed.jsonl"
    runs.append(killed := regrow_train("--steps", str(STEPS), "--snapshot-every", "1", "--snapshot-address",
                                       process.address, "--metrics", str(killed_metrics), env=env))
    deadline = time.monotonic() + 60
    while not (killed_metrics.exists() and len(killed_metrics.read_text().splitlines()) >= 5):
        assert killed.poll() is None and time.monotonic() < deadline, finish(killed)
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    finish(killed)
    done_before_kill = len(killed_metrics.read_text().splitlines())
    assert done_before_kill < STEPS, "the run finished before it was killed; nothing was resumed"

    runs.append(resumed := regrow_train(*save, "--ckpt-dir", str(resumed_dir), "--resume", "snapshot",
                                        "--snapshot-every", "1", "--snapshot-address", process.address,
                                        "--metrics", str(tmp_path / "resumed.jsonl"), env=env))
    out = finish(resumed)
    assert resumed.returncode == 0, out
    restored = re.search(r"\[rank 0, step (\d+)\] restore: source snapshot", out)
    assert restored, out
    step = int(restored.group(1))
    assert 1 <= step <= done_before_kill
    after = losses(tmp_path / "resumed.jsonl")
    assert sorted(after) == list(range(step + 1, STEPS + 1))
    reference = losses(tmp_path / "straight.jsonl")
    assert after == {s: reference[s] for s in after}
    assert tensor_bytes(resumed_dir) == tensor_bytes(straight_dir)

    # No snapshot to be had (a fresh launcher-owned process): the checkpoint is the fallback, and the log says so.
    runs.append(fallback := regrow_train("--steps", str(STEPS), "--resume", "snapshot", "--ckpt-dir",
                                         str(straight_dir)))
    out = finish(fallback)
    assert fallback.returncode == 0, out
    assert re.search(rf"restore: source checkpoint .*step_0*{STEPS}\b", out), out


def test_snapshot_argument_problems_are_reported_together(capsys, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--snapshot-every", "-1", "--snapshot-address",
                     "nowhere", "--keep-last", "1"])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("--snapshot-every=-1 must be >= 0", "--snapshot-address: snapshot process address 'nowhere'",
                     f"needs {TOKEN_ENV} in the environment", "--keep-last=1"):
        assert expected in err, err
