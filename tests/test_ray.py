"""The Ray coordinator on a real local Ray cluster of several nodes (``ray.cluster_utils.Cluster``): a worker
actor killed, a node removed, a rank hung; each healed, and the run ends with the parameters of a fault-free run.

Bit-identical is expected everywhere here: every heal restores from in-memory snapshots (slots, or the erasure-coded
rebuild of the lost node), which hold exact shards."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from regrow.launch.chaos import plan as faults  # noqa: E402
from regrow.launch.chaos import records  # noqa: E402
from regrow.launch.ray_cli import resizes_text  # noqa: E402
from regrow.recovery.parity import ParityConfig  # noqa: E402
from regrow.recovery.ray.coordinator import Coordinator, CoordinatorConfig, CoordinatorError  # noqa: E402
from regrow.recovery.ray.job import Outcome  # noqa: E402
from regrow.recovery.ray.worker import WorkerSpec  # noqa: E402
from regrow.recovery.stragglers import StragglerConfig  # noqa: E402
from regrow.tests import ray_workers  # noqa: E402
from regrow.tests.test_trainer import tiny_config  # noqa: E402
from regrow.trainer.data import DataConfig  # noqa: E402
from regrow.trainer.models import GPTConfig  # noqa: E402

STEPS = 10
WORKERS = 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs (the driver only) and three nodes of two CPUs: the four ranks fill two nodes, the third
    is the spare a lost node's ranks move to."""
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        made.add_node(num_cpus=2)
    ray.init(address=made.address, log_to_driver=False)
    made.wait_for_nodes()
    try:
        yield made
    finally:
        ray.shutdown()
        made.shutdown()


def coordinated(tmp: Path, name: str, *, env: dict[str, str] | None = None, ec: int = 0,
                hang_timeout_s: float = 60.0, sinks=ray_workers.worker_sinks, standby: int = 0,
                snapshot_every: int = 1, stage: int = 2, **monitors) -> tuple[Coordinator, CoordinatorConfig]:
    """A coordinator of the tiny run on :data:`WORKERS` workers; ``monitors``: WorkerSpec's ``parity``,
    ``stragglers`` and ``replace_stragglers``."""
    config = CoordinatorConfig(workers=WORKERS, ranks_per_node=2 if ec else 0, ec_group_size=ec, ec_parity=1,
                               hang_timeout_s=hang_timeout_s, standby_per_node=standby,
                               events_path=str(tmp / f"{name}.jsonl"), resources_timeout_s=120)
    train = tiny_config(steps=STEPS)
    train = dataclasses.replace(train, optim=dataclasses.replace(train.optim, stage=stage))
    spec = WorkerSpec(config=train, world_size=WORKERS, snapshot_every=snapshot_every, timeout_s=30,
                      extra_sinks=sinks, **monitors)
    return Coordinator(config, spec, env=env), config


def events(tmp: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()]


def run(coordinator: Coordinator) -> Outcome:
    return coordinator.run(STEPS, collect_parameters=True)


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    tmp = tmp_path_factory.mktemp("ray-reference")
    coordinator, _ = coordinated(tmp, "reference")
    return run(coordinator)


def assert_same(outcome: Outcome, reference: Outcome) -> None:
    """The same run: rank 0's loss at every step the outcome's last attempts trained, and its final parameters, bit
    for bit (the tiny GPT's dropout draws every step: a rank restored without its generators would differ)."""
    expected = dict(reference.history)
    assert outcome.history and all(loss == expected[step] for step, loss in outcome.history), outcome.history
    assert outcome.history[-1][0] == reference.history[-1][0] == outcome.steps
    params, wanted = outcome.parameters, reference.parameters
    assert params is not None and wanted is not None and params.keys() == wanted.keys()
    for name in params:
        assert torch.equal(params[name], wanted[name]), name


def remove_node_while_held(cluster: Cluster, coordinator: Coordinator, hold: Path, *, holders: int, rank: int,
                           run_job, ready=lambda: True, then=lambda: None, spare=lambda: True) -> dict:
    """Runs ``run_job()`` on a thread; once ``holders`` ranks hold (:data:`ray_workers.HOLD_ENV`) and ``ready()``,
    removes the node of ``rank``, releases them and calls ``then()`` (on this thread: Ray's cluster utilities need
    the main thread). Returns ``{"value": ...}`` or ``{"error": ...}``; the cluster gets a fresh spare node back
    however it ends (unless ``spare()`` says ``then`` added one itself)."""
    result: dict = {}

    def drive() -> None:
        try:
            result["value"] = run_job()
        except BaseException as error:  # noqa: BLE001 (re-raised in the test thread)
            result["error"] = error

    thread = threading.Thread(target=drive)
    thread.start()
    try:
        deadline = time.monotonic() + 200
        while len(list(hold.glob("holding-*"))) < holders or not ready():
            assert time.monotonic() < deadline and thread.is_alive(), result
            time.sleep(0.1)
        victim = coordinator.ranks_node(rank)
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == victim))
        (hold / "release").write_text("go\n")
        then()
        thread.join(300)
    finally:
        if spare():
            cluster.add_node(num_cpus=2)  # the spare for a later test: the cluster is as the fixture made it
            cluster.wait_for_nodes()
    return result


def run_with_a_kill(tmp: Path, name: str, reference: Outcome, *, rank: int, step: int, **options):
    """Runs a coordinated job (``coordinated`` options) whose ``rank`` is killed in ``step``; asserts that it ends
    with the reference's parameters and returns its outcome."""
    fired = tmp / "fired"
    fired.mkdir()
    coordinator, _ = coordinated(tmp, name, env=faults.plan_env([faults.Fault("kill-rank", rank, step)], str(fired)),
                                 **options)
    outcome = coordinator.run(STEPS, collect_parameters=True)
    assert_same(outcome, reference)
    return outcome


@pytest.mark.timeout(300)
def test_killed_worker_actor_is_replaced_and_the_run_matches(cluster, reference, tmp_path) -> None:
    outcome = run_with_a_kill(tmp_path, "kill", reference, rank=2, step=5)
    kinds = [e["event"] for e in events(tmp_path, "kill")]
    assert "failure_detected" in kinds and "replaced" in kinds and "restored" in kinds
    # How the survivors' training calls came back is reported (the first to fail may be read before the abort).
    (aborted,) = [e for e in events(tmp_path, "kill") if e["event"] == "survivors_aborted"]
    assert aborted["unwind"] and set(aborted["unwind"]) <= {"0", "1", "3"}, aborted
    assert all(u["leave_s"] >= 0 for u in aborted["unwind"].values()), aborted
    # Survivors keep their state; only the replacement of rank 2 restores, from its node's snapshot process.
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory"] * 2 + ["snapshot"] + ["kept in memory"], restores
    assert {r["step"] for r in restores} == {4}, restores


@pytest.mark.timeout(400)
def test_at_zero_stage3_survivors_keep_their_state_and_the_run_matches(cluster, tmp_path) -> None:
    """ZeRO stage 3 under the coordinator: the survivors of a killed rank keep their sharded state (a gather of
    the interrupted step left behind is freed), the replacement restores its snapshot, and the run ends with the
    parameters of a fault-free stage-3 run."""
    reference = run(coordinated(tmp_path, "stage3-reference", stage=3)[0])
    outcome = run_with_a_kill(tmp_path, "stage3-kill", reference, rank=2, step=5, stage=3)
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory"] * 2 + ["snapshot"] + ["kept in memory"], restores


@pytest.mark.timeout(300)
def test_with_a_snapshot_every_few_steps_every_rank_goes_back_to_the_last_one(cluster, reference, tmp_path) -> None:
    """Snapshots every 3 steps, rank 2 killed in step 5: the survivors, at step 4, cannot keep their state (the lost
    rank's newest snapshot is of step 3), so every rank restores step 3 from its node's snapshot process and step 4
    is trained again; the run still ends bit-identical."""
    outcome = run_with_a_kill(tmp_path, "every3", reference, rank=2, step=5, snapshot_every=3)
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["snapshot"] * WORKERS, restores
    assert {r["step"] for r in restores} == {3}, restores
    assert sorted(dict(outcome.history)) == list(range(1, STEPS + 1))


@pytest.mark.timeout(300)
def test_a_standby_takes_over_a_killed_rank_and_the_run_matches(cluster, reference, tmp_path) -> None:
    """With a standby on every node, the lost rank's replacement is the standby of its node (no new actor to
    start), its resources are held by a placeholder, a new standby is started, and the run still matches."""
    outcome = run_with_a_kill(tmp_path, "standby", reference, rank=1, step=5, standby=1)
    found = events(tmp_path, "standby")
    (adopted,) = [e for e in found if e["event"] == "standby_adopted"]
    (replaced,) = [e for e in found if e["event"] == "replaced"]
    assert adopted["rank"] == replaced["rank"] == 1 and adopted["node"] == replaced["node"], found
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory", "snapshot", "kept in memory", "kept in memory"]


def run_with_faults(tmp: Path, name: str, plan: list[str], **options) -> Outcome:
    """A coordinated job (``coordinated`` options) under ``plan``; returns its outcome with the parameters."""
    fired = tmp / "fired"
    fired.mkdir()
    env = faults.plan_env([faults.Fault.parse(text) for text in plan], str(fired))
    coordinator, _ = coordinated(tmp, name, env=env, **options)
    return coordinator.run(STEPS, collect_parameters=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, what", [("corrupt-param:1@6", "parameters"), ("corrupt-shard:2@6", "shard")])
def test_a_rank_the_parity_check_names_is_replaced_and_the_run_matches(cluster, reference, tmp_path, fault,
                                                                        what) -> None:
    """A bit flipped at the start of step 6 in one rank's parameters or optimizer shard is named by the parity
    check of step 6 (every 3 steps), before its update; the coordinator kills that rank's worker, a new worker
    restores its snapshot of step 5, the survivors keep their state at step 5, and the run ends with the reference's
    parameters, bit for bit."""
    rank = faults.Fault.parse(fault).target
    outcome = run_with_faults(tmp_path, "parity", [fault], parity=ParityConfig(every=3))
    assert_same(outcome, reference)
    found = events(tmp_path, "parity")
    detected = [e for e in found if e["event"] == "failure_detected"]
    assert detected and detected[0]["how"] == f"ranks [{rank}] named for replacement", detected
    assert "state parity check at step 6 failed" in detected[0]["detail"] and what in detected[0]["detail"]
    assert [e["rank"] for e in found if e["event"] == "evicted"] == [rank]
    assert [e["rank"] for e in found if e["event"] == "replaced"] == [rank]
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["snapshot" if r == rank else "kept in memory" for r in range(WORKERS)]
    assert {r["step"] for r in restores} == {5}, restores


@pytest.mark.timeout(300)
def test_a_straggler_is_replaced_by_a_standby_and_the_run_matches(cluster, reference, tmp_path) -> None:
    """``slow-rank:1@4-9x3`` with a straggler window of 3 steps: rank 1 is named at the end of steps 4-6 and, with
    ``replace_stragglers``, its worker is killed and the standby of its node takes over from its snapshot of step
    6 (the survivors keep theirs); the new rank 1 is not slow, and the run ends bit-identical to the reference."""
    outcome = run_with_faults(tmp_path, "straggler", ["slow-rank:1@4-9x3"], standby=1,
                              stragglers=StragglerConfig(window=3, margin=1.5), replace_stragglers=True)
    assert_same(outcome, reference)
    found = events(tmp_path, "straggler")
    detected = [e for e in found if e["event"] == "failure_detected"]
    assert detected[0]["how"] == "ranks [1] named for replacement" and "steps 4-6" in detected[0]["detail"], detected
    assert [e["rank"] for e in found if e["event"] == "evicted"] == [1]
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory", "snapshot", "kept in memory", "kept in memory"]
    assert {r["step"] for r in restores} == {6}, restores
    slept = json.loads((tmp_path / "fired" / "fault-0.detail").read_text())
    assert slept["steps"] == 3, slept  # slowed in steps 4-6 only: its replacement does not sleep


@pytest.mark.timeout(300)
def test_a_straggler_not_replaced_is_in_the_event_log(cluster, reference, tmp_path) -> None:
    """Without ``replace_stragglers`` the same straggler is only named: the coordinator's event log gets a
    ``straggler`` event for rank 1 (window 4-6), nothing fails, and the run ends bit-identical to the reference."""
    outcome = run_with_faults(tmp_path, "named", ["slow-rank:1@4-9x3"],
                              stragglers=StragglerConfig(window=3, margin=1.5))
    assert_same(outcome, reference)
    found = events(tmp_path, "named")
    named = [e for e in found if e["event"] == "straggler"]
    assert named and (named[0]["rank"], named[0]["first_step"], named[0]["step"]) == (1, 4, 6), named
    assert all(e["rank"] == 1 for e in named) and outcome.failures == 0
    assert not [e for e in found if e["event"] in ("evicted", "failure_detected")]


def alive_standby_on(node: str, job: str, most: int = 16):
    """The handle of a placed standby of ``job`` on ``node`` (by its Ray name, regrow-standby-<job>-<n>), or None."""
    import ray

    for number in range(1, most + 1):
        try:
            handle = ray.get_actor(f"regrow-standby-{job}-{number}")
        except ValueError:  # no such actor (not started, or gone)
            continue
        placed = ray.get(handle.placement.options(concurrency_group="control").remote(), timeout=30)
        if placed["node"] == node:
            return handle
    return None


@pytest.mark.timeout(300)
def test_a_standby_that_died_is_passed_over_for_a_new_worker(cluster, reference, tmp_path) -> None:
    """The standby of the lost rank's node has died by the time the rank fails: its adopt fails, and a new worker
    takes the rank; the run still matches."""
    import ray

    hold = tmp_path / "hold"
    hold.mkdir()
    coordinator, _ = coordinated(tmp_path, "dead-standby", standby=1, env={ray_workers.HOLD_ENV: f"6:{hold}"})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(outcome=coordinator.run(STEPS, collect_parameters=True)))
    thread.start()
    killed = False
    try:
        deadline = time.monotonic() + 200
        standby = None
        while standby is None or len(list(hold.glob("holding-*"))) < WORKERS:
            assert time.monotonic() < deadline and thread.is_alive(), result
            if standby is None and len(list(hold.glob("holding-*"))) == WORKERS:
                standby = alive_standby_on(coordinator.ranks_node(1), coordinator.job)
            time.sleep(0.1)
        ray.kill(standby)
        with pytest.raises(ray.exceptions.RayActorError):
            while True:  # until it is known dead, so that the coordinator's adopt() meets a dead actor
                ray.get(standby.placement.options(concurrency_group="control").remote(), timeout=30)
                time.sleep(0.1)
        ray.kill(coordinator.worker(1))
        killed = True
    finally:  # released whatever happened; a test failing before the kill ends its run (and snapshot processes)
        (hold / "release").write_text("go\n")
        if not killed:
            coordinator.stop("the test failed before the kill")
        thread.join(240)
    assert_same(result["outcome"], reference)
    found = events(tmp_path, "dead-standby")
    assert [e["rank"] for e in found if e["event"] == "standby_failed"] == [1], found
    assert [e["rank"] for e in found if e["event"] == "replaced"] == [1], found


def test_standby_workers_need_free_placement() -> None:
    with pytest.raises(ValueError, match="standby_per_node needs ranks_per_node=0"):
        CoordinatorConfig(workers=4, ranks_per_node=2, standby_per_node=1)


@pytest.mark.timeout(300)
def test_hung_rank_is_killed_replaced_and_the_run_matches(cluster, reference, tmp_path) -> None:
    marker = tmp_path / "hung"
    coordinator, _ = coordinated(tmp_path, "hang", env={ray_workers.HANG_ENV: f"1:4:{marker}"}, hang_timeout_s=4)
    assert_same(run(coordinator), reference)
    detected = [e for e in events(tmp_path, "hang") if e["event"] == "failure_detected"]
    assert any("no step for" in e["how"] for e in detected), detected


@pytest.mark.timeout(400)
def test_two_ranks_lost_at_once_and_one_more_during_recovery(cluster, reference, tmp_path) -> None:
    fired = tmp_path / "fired"
    fired.mkdir()
    plan = [faults.Fault("kill-rank", 1, 5), faults.Fault("kill-rank", 3, 5)]
    env = {**faults.plan_env(plan, str(fired)), ray_workers.DIE_IN_RECOVERY_ENV: f"2:{tmp_path / 'died'}"}
    coordinator, _ = coordinated(tmp_path, "double", env=env, sinks=ray_workers.sinks_dying_in_recovery)
    assert_same(run(coordinator), reference)
    kinds = [e["event"] for e in events(tmp_path, "double")]
    assert "failure_during_recovery" in kinds, kinds
    replaced = sorted(e["rank"] for e in events(tmp_path, "double") if e["event"] == "replaced")
    assert {1, 2, 3} <= set(replaced), replaced


@pytest.mark.timeout(400)
def test_seeded_random_fault_soak_loses_no_data(cluster, reference, tmp_path) -> None:
    """A short soak: rank crashes drawn with a mean time between failures (seeded, so the run is reproducible),
    bounded by the run's length; every failure is healed, nothing hangs, and the end state is the fault-free one."""
    fired = tmp_path / "fired"
    fired.mkdir()
    plan = faults.random_plan(3.0, 3, step_s=1.0, ranks=WORKERS, nodes=1, steps=STEPS, node_faults=False)
    assert 2 <= len(plan) <= 4, plan  # the draw this seed gives; a change of random_plan shows here
    coordinator, _ = coordinated(tmp_path, "soak", env=faults.plan_env(plan, str(fired)))
    assert_same(run(coordinator), reference)
    assert sorted(records.fired(str(fired))) == list(range(len(plan)))
    restored = [e for e in events(tmp_path, "soak") if e["event"] == "restored"]
    assert len(restored) >= 1 and all(set(e["sources"]) <= {"kept in memory", "snapshot"} for e in restored)


@pytest.mark.timeout(120)
def test_too_few_resources_is_a_clear_error_after_the_timeout(cluster, tmp_path) -> None:
    config = CoordinatorConfig(workers=40, resources_timeout_s=2)
    spec = WorkerSpec(config=tiny_config(steps=STEPS), world_size=40, snapshot_every=0)
    with pytest.raises(CoordinatorError, match="no node offered 1.0 CPUs and 0.0 GPUs within 2"):
        Coordinator(config, spec).run(STEPS)


@pytest.mark.timeout(400)
def test_removed_node_is_rebuilt_by_erasure_coding_and_the_run_matches(cluster, reference, tmp_path) -> None:
    """Every rank is held before step 6's optimizer step; the node of ranks 2 and 3 is removed; the ranks are
    released. The node's snapshot process goes with it and is rebuilt on the spare node from its group (p=1)."""
    hold = tmp_path / "hold"
    hold.mkdir()
    coordinator, _ = coordinated(tmp_path, "node", ec=2, env={ray_workers.HOLD_ENV: f"6:{hold}"})
    result = remove_node_while_held(cluster, coordinator, hold, holders=WORKERS, rank=3,
                                    run_job=lambda: run(coordinator))
    assert "error" not in result, result.get("error")
    assert_same(result["value"], reference)
    kinds = [e["event"] for e in events(tmp_path, "node")]
    assert "node_rebuilt" in kinds, kinds


def pipeline_spec(steps: int) -> WorkerSpec:
    """Four stages of one replica (one worker each), snapshots off: a lost stage can only come from its neighbours."""
    from regrow.tests.test_neighbor import _config

    return WorkerSpec(config=_config(stages=WORKERS, dp=1, checkfree_plus=False, steps=steps), world_size=WORKERS,
                      snapshot_every=0, timeout_s=30, extra_sinks=ray_workers.worker_sinks)


@pytest.mark.timeout(400)
def test_pipeline_stage_lost_without_snapshots_is_rebuilt_from_its_neighbours(cluster, tmp_path) -> None:
    """The worker of stage 1 (of 4) dies in step 6; the survivors keep their state (step 5) and the replacement's
    stage is the gradient-norm-weighted average of stages 0 and 2 (CheckFree); training goes on and its loss ends
    near the fault-free run's."""
    from regrow.tests.test_neighbor import LOSS_MARGIN

    steps = 16
    config = CoordinatorConfig(workers=WORKERS, events_path=str(tmp_path / "pipeline.jsonl"), resources_timeout_s=120)
    reference = Coordinator(config, pipeline_spec(steps)).run(steps)
    fired = tmp_path / "fired"
    fired.mkdir()
    env = faults.plan_env([faults.Fault("kill-rank", 1, 6)], str(fired))
    outcome = Coordinator(config, pipeline_spec(steps), env=env).run(steps)

    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory", "neighbour rebuild", "kept in memory",
                                               "kept in memory"], restores
    assert {r["step"] for r in restores} == {5}, restores
    assert "average of stages [0, 2]" in restores[1]["detail"]
    losses = dict(outcome.history)
    expected = dict(reference.history)
    assert sorted(losses) == list(range(1, steps + 1))
    assert [losses[s] for s in range(1, 6)] == [expected[s] for s in range(1, 6)], "the survivors' steps before it"
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[steps] <= expected[steps] + LOSS_MARGIN, (losses, expected)
    assert losses[steps] < losses[5] - LOSS_MARGIN, "training kept descending after the rebuild"


@pytest.mark.timeout(400)
def test_pipeline_stage_lost_with_snapshots_is_restored_from_its_snapshot(cluster, tmp_path) -> None:
    """Snapshots on: the worker of stage 2 dies in step 5; the other stages keep their state and the replacement
    restores its stage from the node's snapshot, so the run ends bit-identical to a fault-free one."""
    steps = 8
    config = CoordinatorConfig(workers=WORKERS, events_path=str(tmp_path / "pipe-snap.jsonl"), resources_timeout_s=120)
    spec = pipeline_spec(steps)
    # Dropout draws every step in every stage: a stage restored without its generators would differ.
    train = dataclasses.replace(spec.config.train, model=dataclasses.replace(spec.config.train.model, dropout=0.1))
    spec = dataclasses.replace(spec, snapshot_every=1, config=dataclasses.replace(spec.config, train=train))
    reference = Coordinator(config, spec).run(steps, collect_parameters=True)
    fired = tmp_path / "fired"
    fired.mkdir()
    env = faults.plan_env([faults.Fault("kill-rank", 2, 5)], str(fired))
    outcome = Coordinator(config, spec, env=env).run(steps, collect_parameters=True)
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["kept in memory", "kept in memory", "snapshot", "kept in memory"]
    assert {r["step"] for r in restores} == {4}, restores
    assert dict(outcome.history) == dict(reference.history)
    assert_same(outcome, reference)


@pytest.mark.timeout(400)
def test_pipeline_stage_and_both_neighbours_lost_restore_every_stage_from_the_checkpoint(cluster, tmp_path) -> None:
    """Snapshots off, a universal checkpoint every 2 steps: the workers of stages 1, 2 and 3 (of 4) die in step 7, so
    stage 2 has no live neighbour to be rebuilt from. Every stage, the surviving stage 0 too, restores step 6 from
    the checkpoint (each reading its own stage's shard) and the run ends bit-identical to a fault-free one."""
    steps, ckpt = 10, tmp_path / "ckpt"
    config = CoordinatorConfig(workers=WORKERS, events_path=str(tmp_path / "pipe-ckpt.jsonl"), resources_timeout_s=120)
    spec = dataclasses.replace(pipeline_spec(steps), ckpt_dir=str(ckpt), extra_sinks=ray_workers.checkpoint_sinks)
    train = dataclasses.replace(spec.config.train, model=dataclasses.replace(spec.config.train.model, dropout=0.1))
    spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, train=train))
    reference = Coordinator(config, spec, env={ray_workers.CKPT_ENV: str(tmp_path / "ref-ckpt")}).run(
        steps, collect_parameters=True)
    fired = tmp_path / "fired"
    fired.mkdir()
    env = {**faults.plan_env([faults.Fault("kill-rank", rank, 7) for rank in (1, 2, 3)], str(fired)),
           ray_workers.CKPT_ENV: str(ckpt)}
    outcome = Coordinator(config, spec, env=env).run(steps, collect_parameters=True)
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["checkpoint"] * WORKERS, restores
    assert {r["step"] for r in restores} == {6}, restores
    assert_same(outcome, reference)


@pytest.mark.timeout(400)
def test_elastic_mode_goes_on_with_fewer_ranks_resharded_from_the_checkpoint(cluster, tmp_path) -> None:
    """Three ranks of two CPUs fill the three nodes; the node of rank 2 is removed, so no replacement can be
    placed: after ``elastic_wait_s`` the job goes on with two ranks, every rank restoring the last universal
    checkpoint resharded from 3 ranks to 2, and ends where a fault-free run does (up to the summation order of
    two ranks' gradients instead of three)."""
    steps, hold = 8, tmp_path / "hold"
    hold.mkdir()
    # Dropout 0: the run continues at another world size, whose ranks draw other dropout masks than the reference's.
    config = tiny_config(steps=steps, data=DataConfig(seq_len=64, micro_batch=2, global_batch=12),
                         model=GPTConfig.preset("tiny"))
    ckpt = tmp_path / "ckpt"

    def spec(root: Path, env_sinks=ray_workers.checkpoint_sinks) -> WorkerSpec:
        return WorkerSpec(config=config, world_size=3, snapshot_every=1, timeout_s=30, ckpt_dir=str(root),
                          extra_sinks=env_sinks)

    coordinator_config = CoordinatorConfig(workers=3, cpus_per_worker=2, elastic_wait_s=3, resources_timeout_s=60,
                                           events_path=str(tmp_path / "elastic.jsonl"))
    reference = Coordinator(coordinator_config, spec(tmp_path / "ref-ckpt")).run(steps, collect_parameters=True)
    env = {ray_workers.HOLD_ENV: f"6:{hold}", ray_workers.CKPT_ENV: str(ckpt)}
    coordinator = Coordinator(coordinator_config, spec(ckpt), env=env)
    try:
        result = remove_node_while_held(cluster, coordinator, hold, holders=3, rank=2,
                                        run_job=lambda: coordinator.run(steps, collect_parameters=True),
                                        ready=(ckpt / "step_00000004").exists)
    finally:
        # The removed node's snapshot process died with it; on a real cluster its shared memory went with the
        # machine, here it is this machine's.
        for leftover in Path("/dev/shm").glob(f"regrow-snap-{coordinator.job.split('-')[0]}-*"):
            leftover.unlink()
    assert "error" not in result, result.get("error")
    outcome = result["value"]
    shrunk = [e for e in events(tmp_path, "elastic") if e["event"] == "shrunk"]
    assert [(e["was"], e["world_size"]) for e in shrunk] == [(3, 2)], shrunk
    (restores,) = outcome.restores
    assert [r["source"] for r in restores] == ["checkpoint", "checkpoint"], restores
    assert {r["step"] for r in restores} == {4}, restores  # saved every 2 steps; step 6 never finished
    losses, expected = dict(outcome.history), dict(reference.history)
    assert sorted(losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert losses[step] == pytest.approx(expected[step], abs=1e-3), step
    for name, value in outcome.parameters.items():
        torch.testing.assert_close(value, reference.parameters[name], atol=2e-3, rtol=0, msg=name)


@pytest.mark.timeout(60)
def test_elastic_mode_needs_a_checkpoint_and_no_fixed_placement() -> None:
    with pytest.raises(ValueError, match="elastic_wait_s needs ranks_per_node=0"):
        CoordinatorConfig(workers=4, ranks_per_node=2, elastic_wait_s=5)
    with pytest.raises(ValueError, match="elastic_wait_s=-1 must be >= 0"):
        CoordinatorConfig(workers=4, elastic_wait_s=-1)


@pytest.mark.timeout(300)
def test_a_rank_nothing_can_restore_stops_the_job_with_the_reason(cluster, tmp_path) -> None:
    """Snapshots off and no checkpoint: a killed rank's shard exists nowhere. The coordinator stops at once with
    the restore's reason (it does not retry recovery until max_restarts)."""
    fired = tmp_path / "fired"
    fired.mkdir()
    config = CoordinatorConfig(workers=WORKERS, events_path=str(tmp_path / "lost.jsonl"), resources_timeout_s=120)
    spec = WorkerSpec(config=tiny_config(steps=STEPS), world_size=WORKERS, snapshot_every=0, timeout_s=30,
                      extra_sinks=ray_workers.worker_sinks)
    env = faults.plan_env([faults.Fault("kill-rank", 1, 3)], str(fired))
    with pytest.raises(CoordinatorError, match="cannot be restored: .*no in-memory snapshot"):
        Coordinator(config, spec, env=env).run(STEPS)
    kinds = [e["event"] for e in events(tmp_path, "lost")]
    assert "unrecoverable" in kinds and "failure_during_recovery" not in kinds, kinds


@pytest.mark.timeout(300)
def test_stop_ends_the_run_early_and_events_reach_the_callback(cluster, tmp_path) -> None:
    """``Coordinator.stop`` from another thread ends ``run`` at its next poll with the outcome marked stopped;
    ``on_event`` sees every event record."""
    seen: list[dict] = []
    config = CoordinatorConfig(workers=2, events_path=str(tmp_path / "stop.jsonl"), resources_timeout_s=120)
    spec = WorkerSpec(config=tiny_config(steps=100_000), world_size=2, snapshot_every=1, timeout_s=30)
    coordinator = Coordinator(config, spec, on_event=seen.append)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(outcome=coordinator.run(100_000)))
    thread.start()
    deadline = time.monotonic() + 120
    while not any(e["event"] == "generation_formed" for e in seen):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.1)
    while ray.get(coordinator.worker(0).heartbeat.options(concurrency_group="control").remote())["step"] < 3:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.1)
    stopped_at = time.monotonic()
    coordinator.stop("enough")
    thread.join(60)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 30, "workers inside a training call are killed, not waited for"
    outcome = result["outcome"]
    assert outcome.stopped == "enough" and outcome.stopped_at is not None and 0 < outcome.stopped_at < 100_000
    assert [e["event"] for e in seen] == [e["event"] for e in events(tmp_path, "stop")]
    assert seen[-1]["event"] == "stopped" and seen[-1]["step"] == outcome.stopped_at


@pytest.mark.timeout(500)
def test_an_elastic_job_grows_back_when_a_node_rejoins(cluster, tmp_path) -> None:
    """Three ranks of two CPUs fill the three nodes; the node of rank 2 is removed in step 6, so the job goes on
    with two ranks from step 4's checkpoint; a node joins the cluster meanwhile, and at the next checkpoint step
    the job grows back to three ranks without a restart, every rank restoring that step's checkpoint resharded from
    2 ranks to 3. From there its losses and final parameters equal, bit for bit, a fault-free 3-rank run resumed
    from the same checkpoint; the event log shows the shrink and the growth."""
    steps, hold = 12, tmp_path / "hold"
    hold.mkdir()
    config = tiny_config(steps=steps, data=DataConfig(seq_len=64, micro_batch=2, global_batch=12),
                         model=GPTConfig.preset("tiny"))
    ckpt, grown_from = tmp_path / "ckpt", tmp_path / "grown-from"
    spec = WorkerSpec(config=config, world_size=3, snapshot_every=1, timeout_s=30, ckpt_dir=str(ckpt), ckpt_every=2,
                      extra_sinks=ray_workers.checkpoint_sinks)
    coordinator_config = CoordinatorConfig(workers=3, cpus_per_worker=2, elastic_wait_s=3, resources_timeout_s=60,
                                           events_path=str(tmp_path / "grow.jsonl"))
    rejoined: list[bool] = []
    shrunk, node_added = threading.Event(), threading.Event()

    def on_event(record: dict) -> None:  # on the coordinator's thread
        if record["event"] == "shrunk":  # the job waits here until the node is back: it then runs short from step 4
            shrunk.set()
            node_added.wait(120)
        elif record["event"] == "grown":  # kept for the reference before later saves purge it
            name = f"step_{record['step']:08d}"
            shutil.copytree(ckpt / name, grown_from / name)
            (grown_from / "latest").write_text(name + "\n")

    coordinator = Coordinator(coordinator_config, spec, env={ray_workers.HOLD_ENV: f"6:{hold}",
                                                             ray_workers.CKPT_ENV: str(ckpt)}, on_event=on_event)
    def rejoin() -> None:
        try:
            if shrunk.wait(120):
                cluster.add_node(num_cpus=2)
                cluster.wait_for_nodes()
                rejoined.append(True)
        finally:
            node_added.set()

    try:
        result = remove_node_while_held(cluster, coordinator, hold, holders=3, rank=2,
                                        run_job=lambda: coordinator.run(steps, collect_parameters=True),
                                        ready=(ckpt / "step_00000004").exists, then=rejoin, spare=lambda: not rejoined)
    finally:
        for leftover in Path("/dev/shm").glob(f"regrow-snap-{coordinator.job.split('-')[0]}-*"):
            leftover.unlink()
    assert "error" not in result, result.get("error")
    outcome = result["value"]
    changes = [(e["event"], e["was"], e["world_size"]) for e in events(tmp_path, "grow")
               if e["event"] in ("shrunk", "grown")]
    assert changes == [("shrunk", 3, 2), ("grown", 2, 3)], changes
    (grown,) = [e for e in events(tmp_path, "grow") if e["event"] == "grown"]
    shrink_restores, grow_restores = outcome.restores
    assert [(r["source"], r["step"]) for r in shrink_restores] == [("checkpoint", 4)] * 2, shrink_restores
    assert [(r["source"], r["step"]) for r in grow_restores] == [("checkpoint", grown["step"])] * 3, grow_restores
    assert resizes_text(outcome.resizes) == f"; world size 3 -> 2 (from step 4) -> 3 (from step {grown['step']})"

    reference = Coordinator(
        CoordinatorConfig(workers=3, cpus_per_worker=2, resources_timeout_s=60),
        dataclasses.replace(spec, ckpt_dir=str(grown_from), ckpt_every=0, extra_sinks=ray_workers.worker_sinks),
    ).run(steps, resume=True, collect_parameters=True)
    after = [(step, loss) for step, loss in outcome.history if step > grown["step"]]
    assert after == reference.history and after[-1][0] == steps, (after, reference.history)
    for name, value in outcome.parameters.items():
        assert torch.equal(value, reference.parameters[name]), name
