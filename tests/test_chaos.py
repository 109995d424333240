"""The fault-injection harness: hangs caught by the launcher's watchdog, corrupt snapshots passed over by checksum,
failed checkpoint writes, seeded random faults, the fault report, and plans rejected before anything starts.

Every run is a real ``regrow train`` of the tiny GPT on 2 spawned gloo ranks with real snapshot processes; a faulted
run must end in exactly the state of a fault-free run with the same seed (final checkpoints compared byte for byte).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from regrow.launch import cli
from regrow.launch.chaos import plan as faults
from regrow.launch.chaos import report as chaos
from regrow.launch.chaos.recorder import Recorder
from regrow.launch.job import build_job
from regrow.launch.parser import parse_options
from regrow.launch.run import run_training
from regrow.tests.fingerprint import assert_same_checkpoint
from regrow.trainer.loop import StepResult

STEPS = 12


def chaos_run(tmp: Path, name: str, *extra: str, fault: tuple[str, ...] = (), restarts: int = 0
              ) -> tuple[list[StepResult], dict]:
    """``regrow train`` of the tiny GPT on 2 ranks under ``fault`` (saving under ``tmp/name`` at the last step and
    wherever ``extra`` says); returns the last attempt's history and the fault report."""
    # Dropout draws from torch's generator every step: a restore that lost it would change the run.
    argv = ["train", "--nproc", "2", "--preset", "tiny", "--dropout", "0.1", "--steps", str(STEPS),
            "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-2", "--warmup-steps", "2", "--log-every", "4",
            "--ckpt-dir", str(tmp / name), "--timeout", "240", "--max-restarts", str(restarts), *extra]
    if "--save-every" not in extra:
        argv += ["--save-every", str(STEPS)]
    for item in fault:
        argv += ["--fault", item]
    job = build_job(parse_options(argv))
    recorder = Recorder(job.plan)
    history = run_training(job, recorder=recorder)
    return history, chaos.build_report(recorder, history)


SNAPSHOTS = ("--snapshot-every", "1", "--nodes", "2", "--ec-group-size", "2")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="module")
def reference(tmp: Path) -> list[StepResult]:
    history, _ = chaos_run(tmp, "reference")
    return history


def assert_same_run(tmp: Path, history: list[StepResult], reference: list[StepResult], name: str) -> None:
    losses = {r.step: r.loss for r in reference}
    assert history and history[-1].step == STEPS
    assert all(r.loss == losses[r.step] for r in history), "losses differ after the restore"
    assert chaos.same_checkpoint(str(tmp / name), str(tmp / "reference")) is True
    assert_same_checkpoint(tmp / name, tmp / "reference")


@pytest.mark.timeout(240)
def test_a_kill_and_a_hang_are_recovered_and_reported(tmp, reference, capfd) -> None:
    """A rank killed in step 3, then a rank hung in step 7: the kill is seen by its exit code, the hang by the
    watchdog only (no progress for --hang-timeout s), both restore from the snapshots with no step lost, and the
    run ends bit-identical to the fault-free one. The report says all of it."""
    history, report = chaos_run(tmp, "kill-hang", *SNAPSHOTS, "--hang-timeout", "4",
                                fault=("kill-rank:1@3", "hang-rank:0@7"), restarts=2)
    out = capfd.readouterr().out
    assert "rank 0 made no progress for" in out and "stuck after step 6, before step 7's optimizer step" in out
    assert_same_run(tmp, history, reference, "kill-hang")

    assert report["restarts"] == 2 and report["plan"] == ["kill-rank:1@3", "hang-rank:0@7"]
    kill, hang = report["failures"]
    assert kill["attempt"] == 1 and kill["faults"] == ["kill-rank:1@3"]
    assert kill["detected_by"] == ["process exit: rank 1 killed by SIGKILL (exit code -9)"]
    # the kill may land before step 2's snapshot is sealed on the killed rank: then step 1 is the newest common one
    assert kill["failed_at_step"] == 2 and kill["restored_step"] in (1, 2)
    assert kill["steps_lost"] == 2 - kill["restored_step"]
    assert kill["source"] == "snapshot (ranks [0, 1])"
    # Order, not wall-clock bounds (a loaded machine stretches every interval): detected after the fault fired,
    # and the recovery includes the restore.
    assert kill["detect_s"] >= 0 and kill["recover_s"] > kill["restore_s"] >= 0
    assert hang["attempt"] == 2 and hang["faults"] == ["hang-rank:0@7"]
    assert hang["detected_by"][0].startswith("no progress for") and "rank(s) [0]" in hang["detected_by"][0]
    assert hang["detect_s"] >= 4  # never before --hang-timeout: the watchdog must not call a live rank hung
    assert (hang["failed_at_step"], hang["restored_step"], hang["steps_lost"]) == (6, 6, 0)
    assert [item["fired"] for item in report["faults"]] == [True, True]
    assert report["faults"][1]["rank"] == 0 and report["faults"][1]["step"] == 7
    assert report["final"] == {"step": STEPS, "loss": reference[-1].loss}
    text = chaos.format_report(report)
    assert "2 restart(s)" in text and "restored step 6 from snapshot" in text


@pytest.mark.timeout(180)
def test_a_corrupt_snapshot_is_passed_over_by_checksum(tmp, reference) -> None:
    """Rank 1 flips a byte of its newest sealed snapshot (step 5) and dies: the restore finds the checksum
    mismatch and rank 1 gets step 5 back from its node's erasure-coded buffer when the encoding of step 5 had
    finished (nothing lost), else every rank restores step 4 from its other slot; the run ends bit-identically."""
    history, report = chaos_run(tmp, "corrupt", *SNAPSHOTS, fault=("corrupt-snapshot:1@6",), restarts=1)
    assert_same_run(tmp, history, reference, "corrupt")
    (failure,) = report["failures"]
    assert failure["detected_by"][0] == "process exit: rank 1 killed by SIGKILL (exit code -9)"
    assert "payload checksum mismatch" in failure["detected_by"][1]
    assert failure["failed_at_step"] == 5
    assert (failure["restored_step"], failure["steps_lost"]) in ((5, 0), (4, 1)), failure
    assert report["faults"][0]["corrupted"]["snapshot_step"] == 5


@pytest.mark.timeout(180)
def test_a_failed_checkpoint_write_keeps_latest_and_training_goes_on(tmp, reference, capfd) -> None:
    """Rank 1's write of step 6's checkpoint fails with an I/O error: the save is given up, latest stays on step
    3's checkpoint, nothing restarts, and the later saves are committed as usual."""
    history, report = chaos_run(tmp, "fail-ckpt", "--save-every", "3", "--keep-last", "4",
                                fault=("fail-ckpt:1@6",))
    out = capfd.readouterr().out
    (item,) = report["faults"]
    # A loaded machine may make the writer skip step 6's save (step 3's still persisting): step 9's fails then.
    failed = item["step"]
    assert failed in (6, 9)
    assert f"checkpoint step_{failed:08d} FAILED: rank 1: OSError: [Errno 5] injected I/O error" in out
    assert report["restarts"] == 0 and report["failures"] == []
    assert item["fired"] and "latest then: step_00000003" in item["outcome"]
    names = sorted(p.name for p in (tmp / "fail-ckpt").glob("step_*"))
    assert "step_00000003" in names and f"step_{failed:08d}" not in names and names[-1] == "step_00000012"
    assert_same_run(tmp, history, reference, "fail-ckpt")


@pytest.mark.timeout(300)
def test_a_straggler_is_named_within_its_window_and_changes_nothing(tmp, reference, capfd) -> None:
    """``slow-rank:1@4-9x3`` with a window of 3 steps: rank 1 is named at the end of steps 4-6, the first window it
    is slow in throughout, and the report says so; it is never named before it slows, nor rank 0 while rank 1
    sleeps. A straggler only costs time: the run ends bit-identical to the fault-free one."""
    history, report = chaos_run(tmp, "straggler", "--straggler-window", "3", fault=("slow-rank:1@4-9x3",))
    out = capfd.readouterr().out
    (item,) = report["faults"]
    assert item["fired"] and item["detected_at_step"] == 6 and item["detect_steps"] == 3, item
    assert "straggler monitor: busy" in item["detected_by"]
    named = report["stragglers"]
    assert [(r["rank"], r["first_step"], r["step"]) for r in named if r["rank"] == 1][:2] == [(1, 4, 6), (1, 7, 9)]
    assert all(r["rank"] == 1 for r in named if r["first_step"] >= 4 and r["step"] <= 9), named
    assert all(r["attempt"] == 0 for r in named)
    assert "[rank 0, step 6] straggler: rank 1 was busy" in out
    assert "detected by: straggler monitor" in chaos.format_report(report)
    # Slowed in steps 4-9 and named after step 6: half of the time it cost came after it was named.
    lost = report["time_lost"]
    assert lost["stragglers_s"] == item["lost_s"] > 0 and lost["failures_s"] == 0 == lost["steps_rolled_back"]
    assert lost["stragglers_after_detection_s"] == pytest.approx(item["lost_s"] / 2, abs=1e-3)
    assert "to stragglers" in chaos.format_report(report)
    assert [r.loss for r in history] == [r.loss for r in reference]
    assert_same_checkpoint(tmp / "straggler", tmp / "reference")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, what", [("corrupt-param:1@8", "parameters"), ("corrupt-shard:0@8", "shard")])
def test_silent_corruption_is_caught_by_parity_and_rolled_back(tmp, reference, fault, what, capfd) -> None:
    """A bit flipped at the start of step 8 in rank 1's working parameters, or in rank 0's Adam second moment
    (invisible in the parameters: its update would spread it to every rank alike), is named by the parity check of
    step 8 before that step's update; the job restarts from the snapshot of step 7 and ends bit-identical to the
    fault-free run."""
    name = f"corrupt-{what}"
    history, report = chaos_run(tmp, name, *SNAPSHOTS, "--parity-every", "4", fault=(fault,), restarts=1)
    (item,) = report["faults"]
    target = faults.Fault.parse(fault).target
    assert item["fired"] and item["detected_at_step"] == 8, item
    assert item["detected_by"].startswith(f"state parity check at step 8: rank(s) [{target}] ({what})"), item
    (failure,) = report["failures"]
    assert failure["detected_by"][0].startswith("state parity check at step 8 failed")
    assert failure["recovered"] and failure["restored_step"] == 7 and failure["source"].startswith("snapshot")
    (check,) = report["parity_failures"]
    assert check["found"] == [{"what": what, "ranks": [target]}] and check["attempt"] == 0
    # Caught before step 8's update: nothing trained is thrown away, only the time to restart.
    assert report["time_lost"]["steps_rolled_back"] == 0 and report["time_lost"]["failures_s"] > 0
    text = chaos.format_report(report)
    assert f"{fault}: silent corruption: a bit of element" in text and "detected by: state parity check" in text
    assert "[rank 0, step 7] parity: the restored state agrees on all 2 rank(s)" in capfd.readouterr().out
    assert_same_run(tmp, history, reference, name)


@pytest.mark.timeout(240)
def test_a_seeded_random_soak_loses_nothing(tmp, reference) -> None:
    """--fault-mtbf 4 --fault-seed 4 draws 4 kills of ranks and nodes; the run survives every one of them, within
    its restart budget and its deadline, and ends bit-identical to the fault-free run."""
    drawn = faults.random_plan(4, 4, step_s=1.0, ranks=2, nodes=2, steps=STEPS, node_faults=True)
    assert [f.kind for f in drawn].count("kill-node") >= 1 and len(drawn) >= 3
    history, report = chaos_run(tmp, "soak", *SNAPSHOTS, "--fault-mtbf", "4", "--fault-seed", "4",
                                restarts=len(drawn))
    assert report["plan"] == [str(f) for f in drawn]
    assert all(item["fired"] for item in report["faults"])
    assert all(failure.get("recovered") for failure in report["failures"])
    assert_same_run(tmp, history, reference, "soak")


def test_plans_are_checked_before_anything_starts(tmp, capsys) -> None:
    plan = tmp / "plan.json"
    plan.write_text(json.dumps(["hang-rank:1@3", {"kind": "corrupt-snapshot", "target": 0, "step": 2}]))
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "5", "--global-batch", "4",
                     "--micro-batch", "2", "--fault", "slow-rank:2@2-4x3", "--fault", "fail-ckpt:0@4",
                     "--fault", "kill-rank:1@0", "--fault-plan", str(plan), "--fault", "kill-rank:0@2x3",
                     "--fault-mtbf", "1", "--max-restarts", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "slow-rank:2@2-4x3: there is no rank 2 (the job has 2 ranks, 0..1)" in err
    assert "fail-ckpt:0@4: no checkpoint is saved at step 4" in err
    assert "kill-rank:1@0: step 0 is outside the run (steps 1..5)" in err
    assert "hang-rank:1@3: nothing would notice the hang; add --hang-timeout" in err
    assert "corrupt-snapshot:0@2: there is no snapshot to corrupt; add --snapshot-every 1" in err
    assert "a step range -E and a factor xF belong to slow-rank only" in err
    assert "--fault-mtbf 1 --fault-seed 0 draws" in err and "give --max-restarts" in err
    assert cli.main(["chaos", "--nproc", "2", "--preset", "tiny"]) == 2
    assert "regrow chaos needs a fault plan" in capsys.readouterr().err


def test_fault_syntax_plans_and_draws() -> None:
    slow = faults.Fault.parse("slow-rank:1@3-7x2.5")
    assert (slow.step, slow.last_step, slow.slow_factor, str(slow)) == (3, 7, 2.5, "slow-rank:1@3-7x2.5")
    assert faults.Fault.parse("slow-rank:0@4").last_step == 4 + faults.SLOW_STEPS - 1
    assert faults.Fault.from_dict(slow.to_dict()) == slow
    assert faults.Fault.parse("hang-rank:0@2").to_dict() == {"kind": "hang-rank", "target": 0, "step": 2}
    with pytest.raises(ValueError, match="unknown keys"):
        faults.Fault.from_dict({"kind": "kill-rank", "target": 0, "step": 1, "when": 3})
    one = faults.random_plan(10, 7, step_s=0.5, ranks=4, nodes=2, steps=200, node_faults=False)
    assert one == faults.random_plan(10, 7, step_s=0.5, ranks=4, nodes=2, steps=200, node_faults=False)
    assert one and {f.kind for f in one} == {"kill-rank"}
    assert all(b.step - a.step >= 2 for a, b in itertools.pairwise(one))


HOSTILE_PLAN_ITEMS = [
    ({"kind": "nuke", "target": 0, "step": 2}, "unknown kind 'nuke'; use one of kill-rank, kill-node, hang-rank"),
    ({"kind": "slow-rank", "target": 0, "step": 2, "factor": float("nan")},
     "the factor must be a finite number > 0 and <= 1000, not nan"),
    ({"kind": "slow-rank", "target": 0, "step": 2, "factor": "2"}, "the factor must be a finite number"),
    ({"kind": "kill-rank", "target": "1", "step": 2}, "target must be an integer >= 0 (a rank or node), not '1'"),
    ({"kind": "kill-rank", "target": True, "step": 2}, "target must be an integer >= 0 (a rank or node), not True"),
    ({"kind": "kill-rank", "target": 0, "step": 2.5}, "step must be an integer (a step of the run), not 2.5"),
    ({"kind": "kill-rank", "target": 0, "step": 2, "until": 3}, "belong to slow-rank only"),
    (7, "expected a fault string such as 'kill-rank:1@5' or an object with kind, target and step, not 7"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("item, problem", HOSTILE_PLAN_ITEMS, ids=lambda v: str(v)[:40])
def test_a_hostile_plan_file_is_refused_before_any_rank_starts(tmp, capsys, item, problem) -> None:
    """A plan file item the injector cannot act on as written is refused with the item and the fix, exit code 2,
    before any rank starts. ``{"kind": "nuke"}`` used to pass and make rank 0 SIGKILL itself; a NaN factor crashed
    the rank in ``time.sleep``; a target given as a string was a TypeError traceback; ``True`` hit rank 1."""
    plan = tmp / "hostile-plan.json"
    plan.write_text(json.dumps([item]))
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "4", "--global-batch", "4",
                     "--micro-batch", "2", "--fault-plan", str(plan), "--timeout", "60"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"--fault-plan {plan}, item 0: " in err and problem in err, err


@pytest.mark.timeout(120)
def test_bad_factors_on_the_command_line_are_refused_with_the_other_problems(tmp, capsys) -> None:
    """``x`` followed by 400 nines is a float of infinity (it crashed the rank); ``x0`` was silently the default
    factor 2. Both are refused, with the fault's text and the fix, in the same error as the other problems."""
    infinite = "slow-rank:0@2x" + "9" * 400
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "4", "--global-batch", "4",
                     "--micro-batch", "2", "--fault", infinite, "--fault", "slow-rank:1@2x0", "--fault",
                     "slow-rank:1@2-9", "--timeout", "60"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"--fault {infinite!r}: the factor must be a finite number > 0 and <= 1000, not inf" in err
    assert "--fault 'slow-rank:1@2x0': the factor must be a finite number > 0 and <= 1000, not 0.0" in err
    assert "slow-rank:1@2-9: the last slowed step 9 is outside the run (steps 1..4)" in err


@pytest.mark.timeout(60)
def test_the_injector_never_turns_an_unknown_kind_into_a_kill(tmp) -> None:
    """A rank given a plan by hand (``REGROW_FAULTS``, not through the launcher's checks) with an unknown kind
    stops with an error naming the variable and the kind; it used to SIGKILL itself at the planned step."""
    import os
    import subprocess
    import sys

    fired = tmp / "fired-unknown"
    fired.mkdir()
    env = {**os.environ, faults.FAULTS_ENV: json.dumps([{"kind": "nuke", "target": 0, "step": 1}]),
           faults.FAULTS_DIR_ENV: str(fired)}
    script = ("from regrow.launch.chaos.injector import FaultInjector\n"
              "injector = FaultInjector.from_env(0)\n"
              "injector.before_optimizer_step()\n"
              "print('went on')\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert f"{faults.FAULTS_ENV}: item 0: unknown kind 'nuke'" in done.stderr
    assert not list(fired.iterdir()), "nothing was recorded as fired"


@pytest.mark.timeout(30)
def test_a_plan_file_that_is_a_fifo_or_too_large_is_refused_without_waiting(tmp, capsys) -> None:
    """``--fault-plan`` naming a FIFO used to block the launcher forever in the read; a file over 1 MiB was read
    whole. Both are refused at once, naming the file."""
    import os

    fifo = tmp / "plan.fifo"
    os.mkfifo(fifo)
    large = tmp / "large-plan.json"
    large.write_text("[" + " " * faults.MAX_PLAN_BYTES + "]")
    argv = ["train", "--nproc", "2", "--preset", "tiny", "--steps", "4", "--global-batch", "4", "--micro-batch", "2"]
    assert cli.main([*argv, "--fault-plan", str(fifo)]) == 2
    assert f"--fault-plan {fifo}: cannot read it as JSON: {fifo} is not a regular file" in capsys.readouterr().err
    assert cli.main([*argv, "--fault-plan", str(large)]) == 2
    assert f"{large} is larger than {faults.MAX_PLAN_BYTES} bytes" in capsys.readouterr().err
