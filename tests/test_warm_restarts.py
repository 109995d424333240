"""Warm standby ranks for the local launcher (``--warm-restarts``, ``launch/local/warm.py``): real ``regrow train``
runs with spawned gloo ranks, a real snapshot process and a real SIGKILL. The standbys start while an attempt runs,
take over the next one, and the run ends in exactly the state of an uninterrupted one."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from regrow.launch import cli
from regrow.launch.local.warm import WarmPool
from regrow.tests.test_launch_faults import assert_same_run, train


@pytest.mark.timeout(420)
def test_warm_standby_ranks_take_over_a_restart_and_the_run_ends_bit_identically(tmp_path: Path, capfd) -> None:
    reference = train(tmp_path, "reference", 2, 6)
    faulted = train(tmp_path, "warm", 2, 6, "--snapshot-every", "1", "--warm-restarts", fault=("kill-rank:1@3",),
                    restarts=1)
    out = capfd.readouterr().out
    assert "[launcher] 2 warm standby rank(s) take over" in out
    assert "[launcher] standby for rank 0 warm in" in out and "[launcher] standby for rank 1 warm in" in out
    assert_same_run(tmp_path, faulted, reference, "warm")


@pytest.mark.timeout(60)
def test_an_unused_pool_is_closed_and_its_standbys_exit() -> None:
    pool = WarmPool(2, None)
    assert pool.alive()
    pool.close()
    assert all(p.exitcode == 0 for p in pool.processes)
    assert not mp.active_children() or all(p not in mp.active_children() for p in pool.processes)


def test_warm_restarts_without_restarts_is_refused(capsys) -> None:
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "2", "--warm-restarts"])
    assert code == 2
    assert "--warm-restarts needs --max-restarts >= 1" in capsys.readouterr().err


def test_warm_restarts_is_refused_on_ray_which_has_standby_workers(capsys) -> None:
    code = cli.main(["ray", "--address", "local", "--workers", "2", "--preset", "tiny", "--steps", "2",
                     "--max-restarts", "1", "--warm-restarts"])
    assert code == 2
    assert "--warm-restarts is the local launcher's; on Ray, --standby N" in capsys.readouterr().err
