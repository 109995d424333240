"""The local launcher under injected faults: simulated nodes with their own snapshot processes, erasure coding
across them, restarts, and the recovery order (snapshot slots -> erasure-coded buffers -> disk checkpoint).

Every run here is a real ``regrow train`` (spawned gloo ranks, real snapshot processes, real SIGKILLs). A faulted
run must end in exactly the state of an uninterrupted run with the same seed: the final checkpoints' tensor files
are compared byte for byte, and the losses of the steps after the last restore equal the reference's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from regrow.launch import cli
from regrow.launch.chaos import plan as faults
from regrow.launch.chaos.recorder import Recorder
from regrow.launch.chaos.report import build_report
from regrow.launch.job import build_job
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.parser import parse_options
from regrow.launch.run import run_training
from regrow.tests.fingerprint import assert_same_checkpoint
from regrow.trainer.loop import StepResult


def train(tmp: Path, name: str, nproc: int, steps: int, *extra: str, fault: tuple[str, ...] = (),
          restarts: int = 0, recorder: Recorder | None = None) -> list[StepResult]:
    """``regrow train`` of the tiny GPT saving a checkpoint under ``tmp/name`` at the last step (and wherever
    ``extra`` says); returns the last attempt's history. ``recorder`` records the attempts for a fault report."""
    # Dropout draws from torch's generator every step: a restore that lost it would change the run.
    argv = ["train", "--nproc", str(nproc), "--preset", "tiny", "--dropout", "0.1", "--steps", str(steps),
            "--global-batch", str(2 * nproc), "--micro-batch", "2", "--lr", "1e-2", "--warmup-steps", "2",
            "--log-every", "1",
            "--ckpt-dir", str(tmp / name), "--timeout", "300", "--max-restarts", str(restarts), *extra]
    if "--save-every" not in extra:
        argv += ["--save-every", str(steps)]
    elif "--persist-every" in extra:  # the snapshot processes write the checkpoints; the ranks write none
        index = argv.index("--save-every")
        del argv[index: index + 2]
    for item in fault:
        argv += ["--fault", item]
    return run_training(build_job(parse_options(argv)), recorder=recorder)


def assert_resumed_from_a_scheduled_save(out: str, history: list[StepResult], scheduled: range, saved: str) -> None:
    """The restart restored one of the ``scheduled`` saves, none older than a save logged as done before it, and
    trained on from the step after it.

    Saves run in the background: one offered while the previous still runs is skipped, and a finished one may be
    logged only after the kill (or never, when its rank is killed first). On a slow or loaded machine the latest
    save is then older than the schedule's last, so the test holds the restore to what the log proves was written.
    ``saved`` is the pattern of a finished save's log line, with the step as its group."""
    restore = re.search(r"restore: source checkpoint \(.*?\), step (\d+),", out)
    assert restore, "no restore from a checkpoint was logged"
    written = [int(step) for step in re.findall(saved, out[:restore.start()])]
    restored = int(restore.group(1))
    assert restored in scheduled and restored >= max(written, default=0), (
        f"restored step {restored}; scheduled saves {list(scheduled)}, logged as done before the restore {written}")
    assert history[0].step == restored + 1


def assert_same_run(tmp: Path, faulted: list[StepResult], reference: list[StepResult], name: str,
                    reference_name: str = "reference") -> None:
    losses = {r.step: r.loss for r in reference}
    assert faulted and all(r.loss == losses[r.step] for r in faulted), "losses differ after the restore"
    assert faulted[-1].step == reference[-1].step
    assert_same_checkpoint(tmp / name, tmp / reference_name)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference4(tmp: Path) -> list[StepResult]:
    return train(tmp, "reference", 4, 12)


@pytest.mark.timeout(420)
def test_each_node_lost_in_turn_and_a_rank_killed_continue_bit_identically(tmp, reference4, capfd) -> None:
    """4 nodes of one rank, one erasure-coding group of 4 with p=1. Each node in turn is killed (its rank and its
    snapshot process, SIGKILL, while a snapshot is in flight), and one rank alone: the launcher replaces and
    rebuilds the node, every rank restores one common step, and the run ends bit-identical to the reference."""
    plan = ("kill-node:0@3", "kill-node:1@5", "kill-rank:3@6", "kill-node:2@8", "kill-node:3@10")
    history = train(tmp, "each-node", 4, 12, "--snapshot-every", "1", "--nodes", "4", "--ec-group-size", "4",
                    "--ec-parity", "1", fault=plan, restarts=len(plan))
    out = capfd.readouterr().out
    for node in range(4):
        assert f"node {node}: ranks [{node}] rebuilt at step" in out
    assert "kill-rank:3@6 fires" in out
    assert "restore: source checkpoint" not in out
    assert_same_run(tmp, history, reference4, "each-node")


@pytest.mark.timeout(420)
def test_ranks_killed_inside_a_stage3_forward_and_backward_continue_bit_identically(tmp, capfd) -> None:
    """ZeRO stage 3 gathers parameters inside the forward and the backward: a rank killed in the middle of either
    (its peer then waits inside a gather) is restored from the snapshots, and the run ends bit-identical to an
    uninterrupted stage-3 run."""
    reference = train(tmp, "stage3-reference", 2, 8, "--stage", "3")
    plan = ("kill-rank:1@3:forward", "kill-rank:0@6:backward")
    history = train(tmp, "stage3-killed", 2, 8, "--stage", "3", "--snapshot-every", "1", fault=plan,
                    restarts=len(plan))
    out = capfd.readouterr().out
    assert all(f"{item} fires" in out for item in plan), out[-3000:]
    assert "restore: source checkpoint" not in out
    assert_same_run(tmp, history, reference, "stage3-killed", "stage3-reference")


@pytest.mark.timeout(420)
def test_more_nodes_lost_than_parity_falls_back_to_the_disk_checkpoint(tmp, reference4, capfd) -> None:
    """Two nodes of a p=1 group lost at once: the rebuild says recovery needs the disk checkpoint, and every rank
    restores the latest checkpoint written before the kill and finishes bit-identically."""
    history = train(tmp, "two-lost", 4, 12, "--snapshot-every", "1", "--nodes", "4", "--ec-group-size", "4",
                    "--ec-parity", "1", "--save-every", "3", fault=("kill-node:1@10", "kill-node:2@10"), restarts=1)
    out = capfd.readouterr().out
    assert "more than 1 nodes of the group are lost, recovery needs the disk checkpoint" in out
    assert_resumed_from_a_scheduled_save(out, history, range(3, 10, 3), r"checkpoint step_0*(\d+) saved in")
    assert_same_run(tmp, history, reference4, "two-lost")


@pytest.mark.timeout(480)
def test_two_nodes_lost_at_once_with_parity_two(tmp, capfd) -> None:
    """6 nodes, one group with p=2: two nodes die in the same step; both are rebuilt from the other four."""
    reference = train(tmp, "reference6", 6, 8)
    history = train(tmp, "pair", 6, 8, "--snapshot-every", "1", "--nodes", "6", "--ec-group-size", "6",
                    "--ec-parity", "2", fault=("kill-node:1@5", "kill-node:4@5"), restarts=1)
    out = capfd.readouterr().out
    assert "node 1: ranks [1] rebuilt" in out and "node 4: ranks [4] rebuilt" in out
    assert_same_run(tmp, history, reference, "pair", "reference6")


@pytest.mark.timeout(300)
def test_snapshot_processes_persist_the_checkpoints_and_a_lost_group_resumes_from_them(tmp, reference4, capfd) -> None:
    """--persist-every: the ranks run no checkpoint writer, the snapshot processes write the universal
    checkpoints; two nodes of a p=1 group lost at once resume from the latest of them, bit-identically."""
    history = train(tmp, "persisted", 4, 12, "--snapshot-every", "1", "--nodes", "2", "--ec-group-size", "2",
                    "--ec-parity", "1", "--persist-every", "3", "--save-every", "0",
                    fault=("kill-node:0@11", "kill-node:1@11"), restarts=1)
    out = capfd.readouterr().out
    assert "persisted step 3 to" in out and "persisted step 12 to" in out
    assert "checkpoint step_" not in out, "no rank wrote a checkpoint"
    assert_resumed_from_a_scheduled_save(out, history, range(3, 10, 3), r"persisted step (\d+) to")
    assert_same_run(tmp, history, reference4, "persisted")


MOMENT_PLAN = ("kill-node:1@2:ec", "kill-rank:2@4:persist", "kill-rank:1@6:forward", "kill-rank:2@7:backward",
               "kill-rank:3@8:update", "kill-rank:0@9:all-gather", "kill-rank:1@10:snapshot-copy")
"""A kill at each moment of a step where state is half changed, one restart each: ``ec`` first (the ranks of the
lost node fail only at their next request to its snapshot process, a few steps later), ``persist`` at the first
save from step 4 on (--save-every 2; on a loaded machine a save still running makes the writer skip the next, so
it is kept far from the run's last save), the kills inside a step after them."""


def restorable_steps(fault: str, fired_step: int, out: str) -> set[int]:
    """The steps a restart after ``fault`` (fired at ``fired_step``) may restore, derived from what the moment
    interrupted, not from the restore code.

    - A kill inside step S (forward, backward, update, all-gather): the killed rank finished step S-1, but its
      snapshot of S-1 may not be sealed yet (the seal runs beside step S): S-2 or S-1.
    - ``snapshot-copy`` in step S: the killed rank's snapshot of S-1 was being copied, never sealed, and the newest
      step every rank holds is S-2.
    - ``persist``: fired as the save of step T (``fired_step``) starts its write, while step T+1 runs: T-1 or T
      (the half-written save is never loaded).
    - ``ec``: the node's snapshots are gone, the rebuild from its group restores the step the launcher logged."""
    moment = fault.rsplit(":", 1)[1]
    step = int(fault.split("@")[1].split(":")[0])
    if moment == "snapshot-copy":
        return {step - 2}
    if moment == "persist":
        return {fired_step - 1, fired_step}
    if moment == "ec":
        return {int(rebuilt) for rebuilt in re.findall(r"node 1: ranks \[2, 3\] rebuilt at step (\d+)", out)}
    return {step - 2, step - 1}


@pytest.mark.timeout(600)
def test_kills_at_every_dangerous_moment_of_a_step_continue_bit_identically(tmp, reference4, capfd) -> None:
    """A kill in the middle of the forward and of the backward (ZeRO-2 reductions in flight), between the
    gradient reduction and the update, before the parameter all-gather (the other ranks wait inside it), while a
    snapshot is copied, while a checkpoint is written, and a node lost inside an erasure-coding round: each fires
    once, each restart restores a step its moment allows, and the run ends bit-identical to the reference."""
    recorder = Recorder([faults.Fault.parse(text) for text in MOMENT_PLAN])
    history = train(tmp, "moments", 4, 12, "--snapshot-every", "1", "--nodes", "2", "--ec-group-size", "2",
                    "--ec-parity", "1", "--save-every", "2", fault=MOMENT_PLAN, restarts=len(MOMENT_PLAN),
                    recorder=recorder)
    out = capfd.readouterr().out
    report = build_report(recorder, history)
    fired = {item["fault"]: item for item in report["faults"]}
    assert sorted(fired) == sorted(MOMENT_PLAN) and all(item["fired"] for item in fired.values()), fired
    assert "fires in the erasure-coding round of step" in out and "node 1: ranks [2, 3] rebuilt at step" in out
    assert report["restarts"] == len(report["failures"]) <= len(MOMENT_PLAN)
    for failure in report["failures"]:
        # Two faults may end one attempt (the ec kill's ranks fail late on a loaded machine): the restore then
        # satisfies the one that allows the oldest step.
        allowed = [restorable_steps(f, fired[f]["step"], out) for f in failure["faults"]]
        assert allowed and all(allowed), failure
        restored = failure["restored_step"]
        assert restored in set.union(*allowed) and restored <= min(map(max, allowed)), (failure, allowed)
    assert_same_run(tmp, history, reference4, "moments")


def test_fault_plans_and_node_layouts_are_checked_before_anything_starts(capsys) -> None:
    code = cli.main(["train", "--nproc", "4", "--preset", "tiny", "--steps", "5", "--global-batch", "8",
                     "--micro-batch", "2", "--fault", "kill-rank:4@2", "--fault", "kill-node:1@9", "--fault",
                     "explode:1@1", "--snapshot-every", "1", "--nodes", "3", "--ec-group-size", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "kill-rank:4@2: there is no rank 4 (the job has 4 ranks, 0..3)" in err
    assert "kill-node:1@9: step 9 is outside the run (steps 1..5)" in err
    assert "'explode:1@1': expected KIND:TARGET@STEP" in err
    assert "--nodes=3 must divide --nproc=4" in err


def test_a_run_without_restarts_reports_the_failure(tmp) -> None:
    with pytest.raises(WorkerFailed, match="rank 1 exited with code -9"):
        train(tmp, "no-restart", 2, 4, fault=("kill-rank:1@2",), restarts=0)


def test_fault_parse_round_trips() -> None:
    fault = faults.Fault.parse(" kill-node:3@17 ")
    assert (fault.kind, fault.target, fault.step, str(fault)) == ("kill-node", 3, 17, "kill-node:3@17")
    assert json.loads(faults.plan_env([fault], "/x")[faults.FAULTS_ENV]) == [
        {"kind": "kill-node", "target": 3, "step": 17}]
    at_moment = faults.Fault.parse("kill-rank:1@5:all-gather")
    assert (at_moment.moment, str(at_moment)) == ("all-gather", "kill-rank:1@5:all-gather")
    assert faults.Fault.from_dict(at_moment.to_dict()) == at_moment


@pytest.mark.parametrize(("text", "error"), [
    ("kill-rank:1@5:sideways", "unknown moment 'sideways'; use one of snapshot-copy, forward, backward"),
    ("kill-rank:1@5:ec", "the moment ec belongs to kill-node"),
    ("slow-rank:1@5:forward", "a moment belongs to kill-rank and kill-node only, not slow-rank"),
])
def test_a_moment_is_checked_with_the_fault(text, error) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        faults.Fault.parse(text)


def test_a_kill_at_a_moment_the_run_never_reaches_is_refused_before_anything_starts(capsys) -> None:
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "6", "--global-batch", "4",
                     "--micro-batch", "2", "--snapshot-every", "2", "--fault", "kill-rank:0@4:snapshot-copy",
                     "--fault", "kill-rank:1@3:persist", "--fault", "kill-node:0@3:ec"])
    err = capsys.readouterr().err
    assert code == 2
    assert "kill-rank:0@4:snapshot-copy: no snapshot is copied during step 4 (--snapshot-every=2" in err
    assert "kill-rank:1@3:persist: no checkpoint is written; set --save-every and --ckpt-dir" in err
    assert "kill-node:0@3:ec: no erasure-coding round runs" in err
