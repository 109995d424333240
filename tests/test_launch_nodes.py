"""The local launcher's nodes (launch/local/nodes.py) between two attempts: real snapshot processes, real signals."""

from __future__ import annotations

import os
import signal

import pytest

from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.launch.local import nodes
from regrow.launch.local.nodes import LocalNodes, NodesConfig


@pytest.mark.timeout(120)
def test_heal_ends_and_replaces_a_snapshot_process_that_no_longer_answers(monkeypatch) -> None:
    """A killed node's snapshot process blocked in a disk write stays alive to ``poll()`` and answers nothing until
    the write is done; a stopped process is the same to the launcher. Healing must not keep it for the next
    attempt, whose ranks would find nothing at its address once it dies."""
    monkeypatch.setattr(nodes, "PROBE_TIMEOUT_S", 1.0)
    with LocalNodes(NodesConfig(ranks=2, nodes=2)) as local:
        stuck = local.processes[1]
        os.kill(stuck.process.pid, signal.SIGSTOP)
        try:
            report = local.heal()
        finally:
            if stuck.process.poll() is None:
                os.kill(stuck.process.pid, signal.SIGCONT)
        assert report.replaced == [1], report
        assert stuck.process.poll() is not None  # ended, not left to die under the next attempt
        assert local.processes[0] is not stuck and local.processes[1] is not stuck
        for process in local.processes:  # both answer: node 0 kept, node 1 replaced
            SnapshotClient(process.address, token=local.token, timeout_s=10).close()


@pytest.mark.timeout(120)
def test_heal_keeps_snapshot_processes_that_answer() -> None:
    with LocalNodes(NodesConfig(ranks=2, nodes=2)) as local:
        before = [process.process.pid for process in local.processes]
        report = local.heal()
        assert report.replaced == [] and [process.process.pid for process in local.processes] == before
