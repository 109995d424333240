"""The goodput accounting of bench/ray_goodput.py on timelines whose costs are known: it decides figures recorded
in bench/RESULTS.md, so its arithmetic is checked here (no Ray, no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ray_goodput  # noqa: E402  (bench/ is not a package)

STEP_S, SNAPSHOT_COST_S, EVERY = 0.05, 0.02, 10


def timeline(first: int, last: int, start: float) -> list[tuple[int, float]]:
    """(step, completion) for steps first..last: 50 ms each, 20 ms more on the step after each snapshot step."""
    out, now = [], start
    for step in range(first, last + 1):
        now += STEP_S + (SNAPSHOT_COST_S if step % EVERY == 1 else 0.0)
        out.append((step, now))
    return out


def test_lost_time_adds_up_the_downtime_the_redone_steps_and_the_snapshot_steps_excess() -> None:
    before = timeline(1, 157, 0.0)  # killed after step 157, restored to step 150
    t0 = before[0][1]
    kill = before[-1][1] + 0.01
    formed, first_after = kill + 1.0, kill + 1.5
    # the restored step as the heartbeat reports it once the rank is ready, here just after the generation formed
    after = [(150, formed + 0.001), (151, first_after)] + timeline(152, 400, first_after)
    samples = [(done, step, done) for step, done in before + after]
    end = after[-1][1]
    fails = [{"kill_s": kill - t0, "formed_s": formed - kill, "downtime_s": first_after - kill,
              "redone_steps": 7, "restored_step": 150, "recovered_within_d": True}]
    acc = ray_goodput.lost_time(samples, t0=t0, end=end, fails=fails, every=EVERY)

    assert acc["step_ms_other"] == pytest.approx(STEP_S * 1e3)
    assert acc["lost_downtime_s"] == pytest.approx(1.5, abs=1e-3)
    assert acc["lost_redone_s"] == pytest.approx(7 * STEP_S, abs=1e-3)
    # counted: steps 2..157 (the first has no predecessor) and 152..400 (151 ends the downtime)
    costly = sum(1 for s in [*range(2, 158), *range(152, 401)] if s % EVERY == 1)
    assert acc["lost_cost_s"] == pytest.approx(costly * SNAPSHOT_COST_S, abs=1e-3)
    # The total from the known costs, not from the code's own parts: a cost left out of the sum must show.
    lost = 1.5 + 7 * STEP_S + costly * SNAPSHOT_COST_S
    assert acc["lost_s"] == pytest.approx(lost, abs=3e-3)
    assert acc["goodput"] == pytest.approx(1 - lost / (end - t0), abs=1e-4)
    assert acc["step_after_restore_vs_before"] == pytest.approx(1.0)


def test_a_recovery_that_d_falls_in_is_lost_up_to_d() -> None:
    before = timeline(1, 100, 0.0)
    t0, kill = before[0][1], before[-1][1] + 0.01
    end = kill + 0.7
    fails = [{"kill_s": kill - t0, "formed_s": None, "downtime_s": None, "redone_steps": 0,
              "recovered_within_d": False}]
    acc = ray_goodput.lost_time([(d, s, d) for s, d in before], t0=t0, end=end, fails=fails, every=EVERY)
    assert acc["lost_downtime_s"] == pytest.approx(0.7, abs=1e-3)
    assert "step_after_restore_vs_before" not in acc  # no history after it


def test_a_snapshot_every_step_gives_no_accounted_goodput() -> None:
    steps = timeline(1, 50, 0.0)
    acc = ray_goodput.lost_time([(d, s, d) for s, d in steps], t0=steps[0][1], end=steps[-1][1], fails=[], every=1)
    assert acc["cost_positions"] is None
    assert acc["goodput"] is None and "every 1 step" in acc["why_none"]  # not a figure that leaves the cost out
