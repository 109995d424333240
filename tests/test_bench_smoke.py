"""Every GPU-host benchmark runner (``bench/run_gpu_*.sh``) in its ``--device cpu`` smoke mode, at the smallest
settings its environment variables allow: the runner exits 0, each of its runs records ``"status": "ok"`` in the
runner's JSONL file, the figures that say the run did what it measures hold (a restore returns the step it was
taken at, a killed worker is healed, every implementation trains), and the runner prints its table.

Each runner is a subprocess in a session of its own; everything it starts (torchrun and its ranks, which torchrun
puts in sessions of their own, the snapshot processes, the Ray driver, which makes itself a process-group leader,
and Ray's processes) is found as that session's processes and their descendants, and stopped when it fails or
hangs. Snapshot segments the runner's jobs left in ``/dev/shm``
(their job ids are read from the runner's logs) are removed, and their presence fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
RUNNER_LIMIT_S = 300
"""Seconds one runner may take here (each takes 5 to 30 s on two CPU cores); then it is stopped and the test fails."""
STOP_GRACE_S = 15.0
"""Seconds a stopped runner's processes get after SIGTERM (the Ray bench shuts Ray down) before SIGKILL."""
SEGMENT_NAME = re.compile(r"(regrow-snap-[\w-]+?)(?:-n\d+)?-r\d+-s\d+")
"""A snapshot segment's name; group 1 is its job's prefix (the erasure-coded bench adds a node part)."""


@dataclass
class RunnerOutcome:
    """What a finished runner left: its exit status, its printed output and its OUT folder."""

    returncode: int
    stdout: str
    out: Path
    segments_left: list[str]
    """Names of segments of the runner's jobs found in /dev/shm after it ended (removed since)."""

    def records(self, name: str) -> list[dict]:
        """The JSON lines of ``name`` in the runner's OUT folder (the file must exist)."""
        path = self.out / name
        assert path.is_file(), f"{name} was not written; the runner printed:\n{self.stdout[-4000:]}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class _Proc:
    ppid: int
    session: int
    started: int
    """Start time in clock ticks since boot: with the pid, names one process (pids are reused)."""


def _process_table() -> dict[int, _Proc]:
    """Every live (not zombie) process, from /proc: after the command name come state, ppid, pgrp, session, and
    the start time is the 20th field after it."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table[int(entry)] = _Proc(ppid=int(fields[1]), session=int(fields[3]), started=int(fields[19]))
    return table


def _runner_processes(session: int, known: dict[int, int]) -> dict[int, int]:
    """pid -> start time of the runner's live processes: its session's, those ``known`` earlier (by pid and start
    time), and all their descendants. Descendants count because torchrun starts each rank in a session of its own
    (and a rank its snapshot process); ``known`` keeps those whose parent has gone."""
    table = _process_table()
    found = {pid: p.started for pid, p in table.items() if p.session == session}
    found.update({pid: started for pid, started in known.items() if pid in table and table[pid].started == started})
    grew = True
    while grew:
        children = {pid: p.started for pid, p in table.items() if p.ppid in found and pid not in found}
        found.update(children)
        grew = bool(children)
    return found


def _signal_all(processes: dict[int, int], signum: int) -> None:
    for pid in processes:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _snapshot_jobs(pids: list[int]) -> set[str]:
    """The ``--job`` of each snapshot process (``python -m regrow.checkpoint.node``) among ``pids``."""
    jobs = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "regrow.checkpoint.node" in argv and "--job" in argv[:-1]:
            jobs.add(argv[argv.index("--job") + 1])
    return jobs


def _stop_runner(process: subprocess.Popen) -> set[str]:
    """Ends every process the runner started: SIGTERM (a snapshot process then removes its segments; the Ray bench
    shuts Ray down), then SIGKILL to those left after STOP_GRACE_S. Returns the jobs of the snapshot processes it
    found."""
    session = process.pid  # start_new_session: the runner leads its own session
    known = _runner_processes(session, {})
    jobs = _snapshot_jobs(list(known))
    _signal_all(known, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while known and time.monotonic() < deadline:
        time.sleep(0.2)
        known = _runner_processes(session, known)
    _signal_all(_runner_processes(session, known), signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return jobs


def _remove_job_segments(out: Path, jobs: set[str]) -> list[str]:
    """Removes the /dev/shm segments of ``jobs`` and of every snapshot job named in the runner's files (only these:
    other tests on this host may hold segments of their own); returns their names."""
    prefixes = {f"regrow-snap-{job}" for job in jobs}
    for path in out.rglob("*") if out.exists() else ():
        if path.is_file():
            prefixes.update(m.group(1) for m in SEGMENT_NAME.finditer(path.read_text(errors="replace")))
    left = sorted({p.name for prefix in prefixes for p in SHM.glob(f"{prefix}-*")})
    for name in left:
        (SHM / name).unlink(missing_ok=True)
    return left


def run_runner(script: str, tmp_path: Path, **env: str) -> RunnerOutcome:
    """Runs ``bench/<script> --device cpu`` with ``env`` on top of this environment, its OUT, checkpoint and package
    link folders under ``tmp_path`` and this interpreter as its Python. Always stops whatever it left running."""
    out = tmp_path / "out"
    full_env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # Ray: a local instance
    full_env.update(PYTHON=sys.executable, OUT=str(out), CKPT_DIR=str(tmp_path / "ckpt"),
                    PKG_DIR=str(tmp_path / "pkg"), **env)  # PKG_DIR: not the shared /tmp/pkg link
    process = subprocess.Popen(["bash", str(REPO / "bench" / script), "--device", "cpu"], cwd=REPO, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    jobs: set[str] = set()
    try:
        stdout, _ = process.communicate(timeout=RUNNER_LIMIT_S)
    except subprocess.TimeoutExpired:
        jobs = _stop_runner(process)
        pytest.fail(f"bench/{script} --device cpu did not finish within {RUNNER_LIMIT_S} s")
    finally:
        jobs |= _stop_runner(process)
        left = _remove_job_segments(out, jobs)
    print(stdout)  # the runner's tables, shown with pytest -rP
    return RunnerOutcome(returncode=process.returncode, stdout=stdout, out=out, segments_left=left)


def assert_ran(outcome: RunnerOutcome, *headers: str) -> None:
    """Exit status 0, the table's header lines printed, and none of the runner's jobs left a segment."""
    assert outcome.returncode == 0, outcome.stdout[-4000:]
    for header in headers:
        assert header in outcome.stdout, f"{header!r} not printed:\n{outcome.stdout[-4000:]}"
    assert outcome.segments_left == [], f"segments left in {SHM}: {outcome.segments_left}"


def assert_all_ok(records: list[dict], expected: int) -> None:
    assert len(records) == expected, records
    failed = [r for r in records if r.get("status") != "ok"]
    assert not failed, failed


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_checkpoint_runner_trains_saves_and_reshards_with_every_implementation(tmp_path: Path) -> None:
    # The persist windows (--max-steps-during) are shorter than the four measurement windows of a save: the random
    # batches must cover both (too few of them raised StopIteration).
    outcome = run_runner("run_gpu_checkpoint.sh", tmp_path, SAVES="1", MICRO_BATCH="2", RUN_TIMEOUT="200",
                         EXTRA="--warmup 1 --baseline-steps 1 --window 2 --max-steps-during 1")
    assert_ran(outcome, "| impl | GPUs | step ms (alone) | save |", "regrow load with resharding 2 -> 1 GPUs")
    records = outcome.records("checkpoint.jsonl")
    assert_all_ok(records, 4)
    assert [r["impl"] for r in records] == ["regrow", "deepspeed", "fsdp2", "regrow-load"]
    for trained in records[:3]:
        assert trained["world_size"] == 2 and len(trained["saves"]) == 1 and trained["saves"][0]["bytes"] > 0
    load = records[3]
    assert (load["saved_world_size"], load["loaded_world_size"]) == (2, 1) and load["bytes"] > 0
    assert (outcome.out / "checkpoint.md").is_file()


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_snapshot_runner_restores_the_step_it_snapshotted(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_snapshot.sh", tmp_path, WINDOWS="1", MICRO_BATCH="2", RUN_TIMEOUT="200",
                         EXTRA="--warmup 1 --window 2")
    assert_ran(outcome, "| GPUs | step ms, no snapshot | step ms, snapshot every step |")
    [result] = outcome.records("snapshot.jsonl")
    assert_all_ok([result], 1)
    assert result["world_size"] == 2
    assert result["restored_step"] == result["trained_step"] > 0
    assert result["sealed_snapshots"] > 0 and result["segments_left"] == 0
    assert result["d2h_gbps_min"] > 0 and result["verify_gbps_min"] > 0


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_train_snapshot_runner_times_regrow_train_with_and_without_snapshots(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_train_snapshot.sh", tmp_path, PAIRS="1", STEPS="4", FROM="2", RUN_TIMEOUT="200")
    assert_ran(outcome, "| run | median tokens/s per run |")
    records = outcome.records("train_snapshot.jsonl")
    assert_all_ok(records, 2)
    assert [r["mode"] for r in records] == ["off", "on"]
    assert all(r["steps_counted"] == 3 and r["median_tokens_per_s"] > 0 for r in records)
    summary = json.loads((outcome.out / "train_snapshot_summary.json").read_text())
    assert summary["off"] == [records[0]["median_tokens_per_s"]] and "change" in summary


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_restart_runner_times_a_killed_rank_back_cold_and_warm(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_restart.sh", tmp_path, PAIRS="1", RUN_TIMEOUT="200")
    assert_ran(outcome, "| run | kill -> first step s | that step s | detect s | recover s | restore s | steps lost |")
    records = outcome.records("restart.jsonl")
    assert_all_ok(records, 2)
    assert [r["mode"] for r in records] == ["cold", "warm"]
    for record in records:  # every step is snapshotted: the killed rank's step is restored, nothing lost
        assert record["steps_lost"] == 0 and record["source"].startswith("snapshot")
        assert record["kill_to_first_step_s"] > 0 and record["first_step_after_restore_s"] > 0


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_snapshot_ec_runner_restores_a_lost_node_from_the_code(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_snapshot_ec.sh", tmp_path, WINDOWS="1", MICRO_BATCH="2", RUN_TIMEOUT="200",
                         EXTRA="--warmup 1 --window 2")
    assert_ran(outcome, "| GPUs | nodes | step ms, off | step ms, snapshot + EC |")
    [result] = outcome.records("snapshot_ec.jsonl")
    assert_all_ok([result], 1)
    assert (result["world_size"], result["nodes"], result["ranks_per_node"]) == (4, 2, 2)
    assert result["encoded_steps"] > 0
    assert result["restored_step"] == result["rebuilt_step"] > 0
    assert len(result["restore_sources"]) == 4


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_zero_runner_trains_every_implementation_and_the_optimizer_bench(tmp_path: Path) -> None:
    impls = ["deepspeed", "fsdp2", "regrow32", "regrow8", "regrow8-zero3", "fsdp2-reshard"]
    outcome = run_runner("run_gpu_zero.sh", tmp_path, IMPLS=" ".join(impls), WARMUP="1", STEPS="2",
                         MICRO_BATCH="2", IMPL_TIMEOUT="120", OPT_TIMEOUT="120")
    assert_ran(outcome, "| run | impl | status | ms/step | tokens/s |", "| optimizer | ms/step |")
    records = outcome.records("zero.jsonl")
    assert_all_ok(records, len(impls))
    assert [r["impl"] for r in records] == impls
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 for r in records)


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_ray_runner_heals_a_killed_worker_and_restarts_the_baseline(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_ray.sh", tmp_path, MICRO_BATCH="2", RUN_TIMEOUT="200",
                         EXTRA="--warmup 5 --window 5 --kills 1 --kill-gap 5 --tail 3 --save-every 11 "
                               "--save-tail 3 --resume-steps 1 --phase-timeout 60")
    assert_ran(outcome, "| # | rank killed | at step |",
               "| | regrow: snapshot every step, heal in place | baseline: checkpoint every 11 steps")
    [result] = outcome.records("ray_recovery.jsonl")
    assert_all_ok([result], 1)
    [failure] = result["regrow"]["failures"]
    # A snapshot every step, from memory: the step the job had reached when the worker died (the kill lands at or
    # just after kill_step) comes back, or the one before it when the kill caught the killed rank's newest snapshot
    # being sealed; at most that one step is trained again.
    assert failure["reached_step"] >= failure["kill_step"]
    assert failure["reached_step"] - 1 <= failure["restored_step"] <= failure["reached_step"]
    assert failure["redone_steps"] <= 1 and "snapshot" in failure["sources"]
    assert result["restart"]["restored_step"] == 11
    for phase in ("regrow", "baseline", "restart"):
        assert (outcome.out / "logs" / f"ray_recovery_{phase}.events.jsonl").is_file()


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_scale_runner_chains_the_zero_runner_at_a_process_count(tmp_path: Path) -> None:
    # The scale runner's CPU mode is the zero runner at each count in GPU_COUNTS (its other parts are the runners
    # tested above): one count and one implementation show the chaining; 2 processes ran in the zero runner's test.
    outcome = run_runner("run_gpu_scale.sh", tmp_path, GPU_COUNTS="1", IMPLS="regrow8", WARMUP="1", STEPS="2",
                         MICRO_BATCH="2", IMPL_TIMEOUT="120")
    assert_ran(outcome, "| preset | GPUs | impl | status | ms/step |")
    [record] = outcome.records("scale.jsonl")
    assert_all_ok([record], 1)
    assert (record["impl"], record["world_size"], record["preset"]) == ("regrow8", 1, "tiny")
    assert (outcome.out / "scale-1-tiny" / "zero.md").is_file()
    assert "| 100.0% |" in outcome.stdout  # the 1-process run is its own scaling reference


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_capacity_runner_climbs_the_ladder_for_every_zero3_implementation(tmp_path: Path) -> None:
    outcome = run_runner("run_gpu_capacity.sh", tmp_path, LADDER="2,64,2 3,64,2", STEPS="1", RUN_TIMEOUT="120")
    assert_ran(outcome, "| impl | largest shape trained | parameters |")
    records = outcome.records("capacity.jsonl")
    assert_all_ok(records, 6)
    variants = ("regrow8-zero3+bf16grad", "fsdp2-reshard", "deepspeed-zero3")
    assert [(r["variant"], r["shape"]) for r in records] == [
        (variant, shape) for variant in variants for shape in ([2, 64, 2], [3, 64, 2])]
    assert all(r["activation_checkpointing"] and r["micro_batch"] == 1 for r in records)
    assert {r["settings"].get("grad_dtype") for r in records if r["impl"] == "regrow8-zero3"} == {"bfloat16"}
    assert "regrow8-zero3+bf16grad / fsdp2-reshard: 1.00x the parameters" in outcome.stdout


@pytest.mark.timeout(RUNNER_LIMIT_S + 60)
def test_llama_runner_trains_the_llama_every_way(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    outcome = run_runner("run_gpu_llama.sh", tmp_path, ROUNDS="1", RUN_TIMEOUT="200")
    assert_ran(outcome, "| round | run | status | tokens/s | vs DeepSpeed | peak GB | final loss |")
    records = outcome.records("llama.jsonl")
    assert_all_ok(records, 3)
    assert [r["mode"] for r in records] == ["trainer", "guard", "deepspeed"]
    for record in records:
        assert record["tokens_per_s"] > 0 and record["parameters"] > 0 and record["final_loss"] > 0
    guard, deepspeed = records[1], records[2]
    # The same model, data, loss and learning rate from the same seed: 8-bit and fp32 Adam state give about the
    # same loss after a few steps.
    assert abs(guard["final_loss"] - deepspeed["final_loss"]) < 0.05


@pytest.mark.timeout(120)
def test_digest_bench_measures_the_host_digest(tmp_path: Path) -> None:
    """``bench/bench_digest.py`` has no runner: its CPU mode (the host digest's GB/s) is run directly."""
    out = tmp_path / "digest.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_digest.py"), "--device", "cpu", "--gb", "0.01",
                           "--repeats", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["device"] == "cpu" and result["bytes"] == 10**7 and result["host_gbps"] > 0
    assert f"RESULT {json.dumps(result)}" in done.stdout


@pytest.mark.timeout(120)
def test_parity_bench_times_the_checks_beside_training(tmp_path: Path) -> None:
    """``bench/bench_parity.py`` has no runner: its CPU mode (the tiny GPT) is run directly, at two intervals."""
    out = tmp_path / "parity.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_parity.py"), "--device", "cpu", "--every",
                           "2,1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["device"] == "cpu" and result["shard_gb"] > 0
    assert [(r["every"], r["checks"]) for r in result["intervals"]] == [(2, 2), (1, 4)]
    assert all(r["check_ms"] > 0 and r["step_ms_off"] > 0 for r in result["intervals"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_plain_bench_trains_plain_pytorch_and_regrow_on_the_same_batches(tmp_path: Path, model: str) -> None:
    """``bench/bench_plain.py`` has no runner: its CPU mode (the tiny GPT or Llama, the two eager recipes) is run
    directly. Both recipes start from the same seed and read the same batches: their losses agree closely after 4
    steps (fp32 AdamW against regrow's 8-bit state)."""
    out = tmp_path / "plain.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_plain.py"), "--device", "cpu", "--model", model,
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    plain, regrow = [json.loads(line) for line in out.read_text().splitlines()]
    assert (plain["recipe"], regrow["recipe"]) == ("plain", "regrow")
    assert plain["preset"] == regrow["preset"] == ("tiny" if model == "gpt" else "llama-tiny")
    assert plain["parameters"] == regrow["parameters"] > 0 and plain["tokens_per_s"] > 0 < regrow["tokens_per_s"]
    assert abs(plain["final_loss"] - regrow["final_loss"]) < 0.05, (plain, regrow)


@pytest.mark.timeout(120)
def test_rank_start_bench_times_spawned_and_forked_ranks(tmp_path: Path) -> None:
    """``bench/bench_rank_start.py`` has no runner either: it runs as is, on the CPU."""
    out = tmp_path / "start.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_rank_start.py"), "--ranks", "2", "--repeats",
                           "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["ranks"] == 2
    assert all(result[method]["median_s"] > 0 for method in ("spawn", "forkserver"))
