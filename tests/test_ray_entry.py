"""``regrow ray --entry pkg.module:function``: the user's own loop under the Ray coordinator, on a real local Ray
cluster of several nodes (``ray.cluster_utils.Cluster``). Every rank calls the function once its process group is
up; a lost worker or node, or an error, makes every rank call it again from the top in the next generation; the
driver gets every rank's return value and what each failure cost. The checks of the entry point itself run before
Ray starts.

The plumbing is checked with functions that need no Guard (``tests/ray_entry_workers.py``); the user's loop of
``examples/own_loop_ray.py`` (a Hugging Face Llama, 8-bit ZeRO-2, a schedule, an EMA, counters, a ``regrow.Guard``)
then loses a node and ends bit-identical to a fault-free run."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from regrow.launch import cli  # noqa: E402
from regrow.launch.chaos import plan as faults  # noqa: E402
from regrow.launch.guard import GuardConfig  # noqa: E402
from regrow.launch.ray_entry import EntryJob  # noqa: E402
from regrow.recovery.order import Source  # noqa: E402
from regrow.recovery.ray.coordinator import CoordinatorConfig, CoordinatorError  # noqa: E402
from regrow.recovery.ray.entry import EntryError, EntryPoint  # noqa: E402
from regrow.tests.test_guard import STEPS, assert_same_run, regrow_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
PLUMBING = "regrow.tests.ray_entry_workers"
GUARD = GuardConfig(snapshot_every=1)


# ---------------------------------------------------------------------- checked at the driver, before Ray starts
@pytest.mark.parametrize(("arguments", "expected"), [
    (["--entry", "no_such_package.loop:train"],
     "--entry no_such_package.loop:train: module no_such_package.loop does not import (ModuleNotFoundError"),
    (["--entry", f"{PLUMBING}:NOT_CALLABLE"],
     f"--entry {PLUMBING}:NOT_CALLABLE is not callable (an object of type int): name the function that trains"),
    (["--entry", f"{PLUMBING}:trian"],
     f"--entry {PLUMBING}:trian: {PLUMBING} has no attribute 'trian' (it defines report_place, returns_a_set, "
     "takes_steps)"),
    (["--entry", "train.py"], "--entry 'train.py' must be MODULE:FUNCTION"),
    (["--entry", f"{PLUMBING}:takes_steps", "--entry-kwargs", "[8]"],
     "--entry-kwargs='[8]' must be a JSON object of keyword arguments"),
    (["--entry", f"{PLUMBING}:takes_steps", "--entry-kwargs", "{steps: 8}"], "--entry-kwargs='{steps: 8}' is not JSON"),
    (["--entry", f"{PLUMBING}:takes_steps", "--entry-kwargs", '{"step": 8}'],
     f"--entry {PLUMBING}:takes_steps: its keyword arguments ['step'] do not fit takes_steps(steps): it takes no "
     "argument 'step'; it needs 'steps'"),
    (["--entry", f"{PLUMBING}:takes_steps", "--entry-kwargs", '{"steps": 8}', "--steps", "8"], "--steps would be ignored; pass its arguments with "
     "--entry-kwargs"),
    (["--entry-kwargs", '{"steps": 8}'], "--entry-kwargs are the arguments of --entry's function"),
], ids=["does-not-import", "not-callable", "no-such-function", "not-module-function", "kwargs-not-an-object",
        "kwargs-not-json", "kwargs-do-not-fit", "training-flags", "kwargs-without-entry"])
def test_a_bad_entry_point_is_one_clear_error_before_ray_starts(arguments: list[str], expected: str,
                                                                capsys) -> None:
    assert cli.main(["ray", "--address", "127.0.0.1:9", *arguments]) == 2  # 2: refused before connecting
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("\n  - ") == 1, err  # one problem, one line


def test_the_entry_resolves_like_python_m_from_the_working_directory(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_loop_module.py").write_text("def train(steps=1):\n    return steps * 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    entry = EntryPoint.for_driver("my_loop_module:train", {"steps": 4})
    assert entry.path == (str(tmp_path),)
    assert entry.load()(**entry.kwargs) == 8
    with pytest.raises(EntryError, match="must be JSON values"):
        EntryPoint(target="my_loop_module:train", kwargs={"steps": {1, 2}})


# ---------------------------------------------------------------------- on a local Ray cluster
@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs (the driver only) and three nodes of two CPUs: two ranks of one CPU, or one rank per
    node and a spare node."""
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


def entry_job(tmp: Path, name: str, target: str, **kwargs) -> EntryJob:
    config = CoordinatorConfig(workers=WORKERS, events_path=str(tmp / f"{name}.jsonl"), resources_timeout_s=120)
    return EntryJob(EntryPoint.for_driver(target, kwargs), config, guard=GUARD)


def events(tmp: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_every_rank_calls_the_function_in_its_process_group_and_returns_its_value(cluster, tmp_path,
                                                                                 monkeypatch) -> None:
    """The function lives in a module of the driver's working directory (found there by the workers too); each rank
    runs it inside the formed process group, with its rank, the Guard's settings and its node's snapshot process in
    its environment, and the driver gets every rank's value."""
    (tmp_path / "user_loop.py").write_text(f"from {PLUMBING} import report_place as train\n")
    monkeypatch.chdir(tmp_path)
    job = entry_job(tmp_path, "plain", "user_loop:train", steps=3)
    result = job.run()
    assert result.failures == 0 and result.recoveries == []
    assert [value["rank"] for value in result.returns] == list(range(WORKERS))
    for rank, value in enumerate(result.returns):
        assert (value["env_rank"], value["world_size"], value["env_world_size"]) == (rank, WORKERS, WORKERS)
        assert value["generation"] == 0 and value["guard"] == dataclasses.asdict(GUARD)
        assert value["sum"] == sum(range(WORKERS)) * WORKERS ** 2  # three all-reduces of the ranks
    for call in result.outcome.calls:
        assert call["error"] is None and call["generation"] == 0
        assert f"heartbeat-a0-r{call['rank']}.json" in call["records"]
    # One snapshot process per node: ranks share an address exactly when they share a node.
    nodes = {job.coordinator.ranks_node(rank): value["snapshot_address"] for rank, value in enumerate(result.returns)}
    addresses = {value["snapshot_address"] for value in result.returns}
    assert None not in addresses and len(addresses) == len(nodes), (nodes, addresses)
    for rank, value in enumerate(result.returns):
        assert nodes[job.coordinator.ranks_node(rank)] == value["snapshot_address"]


@pytest.mark.timeout(300)
def test_a_lost_worker_makes_every_rank_call_the_function_again(cluster, tmp_path) -> None:
    """Rank 1's process exits after step 1 of generation 0; the survivor's next collective fails, rank 1 is
    replaced, and in generation 1 every rank calls the function again from the top; the report says what was
    restored and that no finished step was lost."""
    result = entry_job(tmp_path, "lost", f"{PLUMBING}:report_place", steps=3, die="1:0").run()
    assert result.failures == 1
    assert [(value["rank"], value["generation"]) for value in result.returns] == [(r, 1) for r in range(WORKERS)]
    assert result.recoveries == [{"generation": 1, "restored_step": 1, "sources": {"snapshot": [0, 1]},
                                  "failed_at_step": 1, "steps_lost": 0}]
    found = events(tmp_path, "lost")
    assert [e["rank"] for e in found if e["event"] == "replaced"] == [1]
    assert "restored" not in [e["event"] for e in found]  # the function's Guard restores, not the workers
    survivors = {call["rank"] for call in result.outcome.calls if call["generation"] == 0}
    assert survivors == {0}  # the replaced worker's calls went with it


@pytest.mark.timeout(300)
def test_an_error_raised_in_the_function_is_healed_by_calling_it_again(cluster, tmp_path) -> None:
    """Rank 1's function raises in generation 0: no worker dies, every rank leaves the generation and calls the
    function again in the next; the failure names the error and where the user's code raised it."""
    result = entry_job(tmp_path, "raised", f"{PLUMBING}:report_place", steps=2, raise_in="1:0").run()
    assert result.failures == 1
    assert {value["generation"] for value in result.returns} == {1}
    found = events(tmp_path, "raised")
    # The first failure read may be a peer's (its collective failed once rank 1 left); every rank's error is in
    # the events, and in the calls.
    (detected,) = [e for e in found if e["event"] == "failure_detected"]
    (aborted,) = [e for e in found if e["event"] == "survivors_aborted"]
    errors = {str(detected["rank"]): detected["detail"], **aborted["errors"]}
    assert sorted(errors) == ["0", "1"] and aborted["dead"] == [], found
    (call,) = [c for c in result.outcome.calls if (c["rank"], c["generation"]) == (1, 0)]
    assert errors["1"] == call["error"]
    assert call["error"].startswith("ValueError: rank 1 raises as asked (at "), call
    assert "ray_entry_workers.py:" in call["error"] and call["error"].endswith(" in report_place)"), call
    assert "raises as asked" not in errors["0"], errors  # rank 0's: the group broke
    assert "replaced" not in [e["event"] for e in found]


@pytest.mark.timeout(300)
def test_a_return_value_that_is_not_json_ends_the_run_with_the_reason(cluster, tmp_path) -> None:
    with pytest.raises(CoordinatorError, match=r"returned set on rank \d, which is not JSON"):
        entry_job(tmp_path, "set", f"{PLUMBING}:returns_a_set").run()
    assert "resumed" not in [e["event"] for e in events(tmp_path, "set")]  # no generation was tried again


# ---------------------------------------------------------------------- the user's own loop, a node removed
@pytest.mark.timeout(400)
def test_own_loop_with_a_node_removed_ends_bit_identical_to_the_fault_free_run(cluster, tmp_path,
                                                                                monkeypatch) -> None:
    """Two ranks, one per node, their snapshots erasure-coded across the two nodes (snapshots every step). Rank 1
    hangs before step 6's optimizer step (the Guard's fault injector; rank 0 waits for it in the step's gradient
    reduction); its node is then removed, with its worker and its snapshot process. The coordinator replaces both
    on the spare node, the new snapshot process is rebuilt from the group, and both ranks call ``train`` again and
    restore from their node's snapshots (rank 1's rebuilt from the coded buffer). The final state equals a fault-free
    run's bit for bit (the optimizer shard with its 8-bit codes and scales, the EMA, the schedule, the counters, the
    data cursor, the windows of every step), and so do the return values."""
    reference = tmp_path / "reference"
    regrow_run(reference)  # the same loop under the local launcher, no fault
    monkeypatch.chdir(ROOT)  # examples.own_loop_ray resolves from here, as python -m would
    fired = tmp_path / "fired"
    fired.mkdir()
    config = CoordinatorConfig(workers=2, ranks_per_node=1, ec_group_size=2, ec_parity=1, resources_timeout_s=120,
                               events_path=str(tmp_path / "node.jsonl"))
    job = EntryJob(EntryPoint.for_driver("examples.own_loop_ray:train", {"steps": STEPS, "out": str(tmp_path / "out")}),
                   config, guard=GuardConfig(snapshot_every=1),
                   env=faults.plan_env([faults.Fault("hang-rank", 1, 6)], str(fired)))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=job.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 200
        while not (fired / "fault-0.fired").exists():
            assert time.monotonic() < deadline and thread.is_alive(), result
            time.sleep(0.05)
        victim = job.coordinator.ranks_node(1)
        cluster.remove_node(next(node for node in cluster.worker_nodes if node.node_id == victim))
        thread.join(300)
    finally:
        cluster.add_node(num_cpus=2)  # the spare for a later test
        if thread.is_alive():
            job.coordinator.stop("the test failed")
            thread.join(60)
    outcome = result["value"]
    assert_same_run(tmp_path / "out", reference)
    assert outcome.failures == 1 and [value["step"] for value in outcome.returns] == [STEPS, STEPS]
    (recovery,) = outcome.recoveries
    # The lost node's snapshots were rebuilt into its new snapshot process's slots before the ranks restored; the
    # newest step every rank holds is the last one finished, or the one before if the group had not coded it yet.
    found = events(tmp_path, "node")
    (rebuilt,) = [e for e in found if e["event"] == "node_rebuilt"]
    assert rebuilt["ranks"] == [1] and rebuilt["step"] == recovery["restored_step"], (rebuilt, recovery)
    assert recovery["sources"] == {Source.SNAPSHOT.value: [0, 1]}, recovery
    assert recovery["failed_at_step"] == 5 and recovery["steps_lost"] == 5 - recovery["restored_step"] <= 1
    assert [e["rank"] for e in found if e["event"] == "replaced"] == [1]
