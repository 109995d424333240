"""``regrow ray --entry pkg.module:function``: the user's own loop under the Ray coordinator, on a real local Ray
cluster of several nodes (``ray.cluster_utils.Cluster``). Every rank calls the function once its process group is
up; a lost worker or an error makes every rank call it again from the top in the next generation; the driver gets
every rank's return value and what each failure cost. The checks of the entry point itself run before Ray starts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from regrow.launch import cli  # noqa: E402
from regrow.launch.ray_entry import EntryJob  # noqa: E402
from regrow.recovery.ray.coordinator import CoordinatorConfig, CoordinatorError  # noqa: E402
from regrow.recovery.ray.entry import EntryError, EntryPoint  # noqa: E402

WORKERS = 4
PLUMBING = "regrow.tests.ray_entry_workers"
GUARD = {"snapshot_every": 1, "save_every": 0, "ckpt_dir": None}


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
    """A head without CPUs (the driver only) and three nodes of two CPUs: four ranks fill two nodes."""
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
        assert value["generation"] == 0 and value["guard"] == GUARD
        assert value["sum"] == 6 * WORKERS ** 2  # three all-reduces of the ranks: 6, then 24, then 96
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
    """Rank 2's process exits after step 1 of generation 0; the survivors' next collective fails, rank 2 is
    replaced, and in generation 1 every rank calls the function again from the top; the report says what was
    restored and that no finished step was lost."""
    result = entry_job(tmp_path, "lost", f"{PLUMBING}:report_place", steps=3, die="2:0").run()
    assert result.failures == 1
    assert [(value["rank"], value["generation"]) for value in result.returns] == [(r, 1) for r in range(WORKERS)]
    assert result.recoveries == [{"generation": 1, "restored_step": 1, "sources": {"snapshot": [0, 1, 2, 3]},
                                  "failed_at_step": 1, "steps_lost": 0}]
    found = events(tmp_path, "lost")
    assert [e["rank"] for e in found if e["event"] == "replaced"] == [2]
    assert "restored" not in [e["event"] for e in found]  # the function's Guard restores, not the workers
    survivors = {call["rank"] for call in result.outcome.calls if call["generation"] == 0}
    assert survivors == {0, 1, 3}  # the replaced worker's calls went with it


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
    assert sorted(errors) == ["0", "1", "2", "3"] and aborted["dead"] == [], found
    (call,) = [c for c in result.outcome.calls if (c["rank"], c["generation"]) == (1, 0)]
    assert errors["1"] == call["error"]
    assert call["error"].startswith("ValueError: rank 1 raises as asked (at "), call
    assert "ray_entry_workers.py:" in call["error"] and call["error"].endswith(" in report_place)"), call
    assert all("raises as asked" not in errors[rank] for rank in "023"), errors  # theirs: the group broke
    assert "replaced" not in [e["event"] for e in found]


@pytest.mark.timeout(300)
def test_a_return_value_that_is_not_json_ends_the_run_with_the_reason(cluster, tmp_path) -> None:
    with pytest.raises(CoordinatorError, match=r"returned set on rank \d, which is not JSON"):
        entry_job(tmp_path, "set", f"{PLUMBING}:returns_a_set").run()
    assert "resumed" not in [e["event"] for e in events(tmp_path, "set")]  # no generation was tried again
