"""``regrow ray`` from the command line: a local Ray instance with a killed rank (regrow's trainer, and your own loop
with ``--entry``), and an unreachable cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from regrow.launch import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--workers", "2", "--preset", "tiny", "--steps", "6", "--global-batch", "4", "--micro-batch", "2",
         "--log-every", "0"]


def test_an_unreachable_cluster_is_a_clear_error(capsys) -> None:
    assert cli.main(["ray", "--address", "127.0.0.1:9", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "--address 127.0.0.1:9: nothing answers there" in err and "ray start --head" in err


def test_save_every_without_a_checkpoint_folder_is_refused(capsys) -> None:
    assert cli.main(["ray", "--address", "local", *SMALL, "--save-every", "2"]) == 2
    assert "--save-every=2 needs --ckpt-dir DIR" in capsys.readouterr().err


def test_fault_kinds_ray_cannot_inject_are_refused(capsys) -> None:
    assert cli.main(["ray", "--address", "local", *SMALL, "--fault", "kill-node:0@3"]) == 2
    assert "run under the local launcher only" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_standby_workers_with_a_fixed_placement_are_refused(capsys) -> None:
    assert cli.main(["ray", "--address", "local", *SMALL, "--standby", "1", "--ranks-per-node", "2"]) == 1
    assert "standby_per_node needs ranks_per_node=0" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_regrow_ray_on_a_local_instance_heals_a_killed_rank(tmp_path) -> None:
    events = tmp_path / "events.jsonl"
    ckpt = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, "-m", "regrow", "ray", "--address", "local", *SMALL, "--fault",
                           "kill-rank:1@3", "--events", str(events), "--ckpt-dir", str(ckpt), "--save-every", "2"],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained to step 6 with 1 failure(s) healed" in done.stdout
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds[0] == "start" and "failure_detected" in kinds and "restored" in kinds and kinds[-1] == "finished"


@pytest.mark.parametrize("flag", ["--elastic-wait", "--cpus-per-worker", "--gpus-per-worker", "--resources-timeout"])
def test_regrow_ray_refuses_nan_and_infinite_amounts_before_starting_ray(flag: str, capsys) -> None:
    """NaN passes a ``< 0`` check: every amount of ``regrow ray`` must be a finite number, refused with the other
    usage errors before Ray starts."""
    for value in ("nan", "inf"):
        assert cli.main(["ray", "--preset", "tiny", "--steps", "2", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag}={float(value)!r} must be a finite number" in err and "Ray instance" not in err


@pytest.mark.timeout(300)
def test_regrow_ray_entry_runs_the_own_loop_example_and_heals_a_killed_rank(tmp_path) -> None:
    """The example's command line: two workers on a local Ray instance run ``examples/own_loop_ray.py``'s loop; the
    fault plan reaches the Guard in the function, which kills rank 1 at step 3; every rank calls the loop again and
    restores from the snapshots; each rank's return value and the recovery are printed and reported."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "regrow", "ray", "--address", "local", "--workers", "2",
                           "--snapshot-every", "1", "--max-restarts", "1", "--fault", "kill-rank:1@3",
                           "--entry", "examples.own_loop_ray:train", "--entry-kwargs", '{"steps": 4}',
                           "--report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "examples.own_loop_ray:train returned on all 2 ranks with 1 failure(s) healed" in done.stdout
    written = json.loads(report.read_text())
    assert [value["step"] for value in written["returns"]] == [4, 4] and written["failures"] == 1
    (recovery,) = written["recoveries"]
    # The kill comes before step 3's update; step 2's snapshot is sealed by its finisher thread meanwhile, so under
    # load the newest sealed one may still be step 1's (one step trained again), as in every snapshot test.
    lost = recovery["steps_lost"]
    assert recovery["sources"] == {"snapshot": [0, 1]} and lost in (0, 1), recovery
    assert recovery["restored_step"] == recovery["failed_at_step"] - lost
    assert f"generation 1: restored step {recovery['restored_step']} (snapshot: ranks [0, 1]), {lost} step(s) " \
           "trained again" in done.stdout
