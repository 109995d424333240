"""comm/ and launch/spawn on real gloo groups: topology, collectives, timeouts, failed and hung ranks."""

from __future__ import annotations

import time

import pytest
import torch

from regrow.comm.collectives import CollectiveTimeout, PeerLost, classify
from regrow.comm.topology import Topology
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.tests import dist_workers as w


def test_topology_grid_and_nodes() -> None:
    topo = Topology(world_size=8, pp_size=2, ranks_per_node=4)
    assert (topo.dp_size, topo.num_nodes) == (4, 2)
    c = topo.coord(5)
    assert (c.dp, c.pp, c.node, c.local_rank) == (2, 1, 1, 1)
    assert topo.rank_of(dp=2, pp=1) == 5
    assert topo.dp_group_ranks(1) == [1, 3, 5, 7]
    assert topo.pp_group_ranks(3) == [6, 7]
    assert topo.node_ranks(1) == [4, 5, 6, 7]
    assert all(topo.rank_of(dp=topo.coord(r).dp, pp=topo.coord(r).pp) == r for r in range(8))


def test_topology_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="Topology.pp_size=3 must divide world_size=8"):
        Topology(world_size=8, pp_size=3)
    with pytest.raises(ValueError, match="Topology.ranks_per_node=3"):
        Topology(world_size=8, ranks_per_node=3)
    with pytest.raises(ValueError, match="rank=8 is outside"):
        Topology(world_size=8).coord(8)


def test_error_classification() -> None:
    assert isinstance(classify("all_reduce", RuntimeError("Timed out waiting 2000ms")), CollectiveTimeout)
    assert isinstance(classify("all_reduce", RuntimeError("Connection closed by peer [127.0.0.1]")), PeerLost)


@pytest.mark.timeout(120)
def test_reduce_scatter_and_all_gather() -> None:
    results = run_local(w.collectives_roundtrip, 3, backend="gloo", timeout_s=60)
    full = torch.arange(12, dtype=torch.float32) * (1 + 2 + 3)
    for rank, seen in enumerate(results):
        assert torch.equal(seen["piece"], full[4 * rank : 4 * rank + 4])
        assert torch.equal(seen["gathered"], full)


@pytest.mark.timeout(120)
def test_absent_peer_gives_collective_timeout() -> None:
    results = run_local(w.collective_with_absent_peer, 2, backend="gloo", timeout_s=60)
    assert results == ["timeout: all_reduce", "absent"]


@pytest.mark.timeout(120)
def test_failed_rank_is_reported_with_its_traceback() -> None:
    with pytest.raises(WorkerFailed, match="rank 1 failed:(.|\n)*injected failure on rank 1"):
        run_local(w.fail_on_rank_one, 2, backend="gloo", timeout_s=60)


@pytest.mark.timeout(120)
def test_hung_ranks_are_killed_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="did not finish before the deadline"):
        run_local(w.sleep_forever, 2, backend="gloo", timeout_s=8)
    assert time.monotonic() - started < 30


@pytest.mark.timeout(120)
def test_a_rank_sees_the_launchers_environment_directory_and_output_as_they_are_when_it_starts(
        tmp_path, monkeypatch, capfd) -> None:
    """Ranks fork from a server started at the first launch: what changed in the launcher since (an environment
    variable, the directory, the import path, where stdout goes) must still reach them, as it reaches spawned ranks."""
    run_local(w.launcher_view, 2, "X", backend="gloo", timeout_s=60)  # the fork server is up from here on
    capfd.readouterr()
    monkeypatch.setenv("REGROW_TEST_LATE", "set after the first launch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("launcher-only-path")
    views = run_local(w.launcher_view, 2, "REGROW_TEST_LATE", backend="gloo", timeout_s=60)
    assert views == [("set after the first launch", str(tmp_path), True)] * 2
    captured = capfd.readouterr()
    for rank in range(2):
        assert f"rank {rank} writes to the launcher's stdout" in captured.out
        assert f"rank {rank} writes to the launcher's stderr" in captured.err
