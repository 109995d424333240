"""The local launcher's nodes: one snapshot process per (simulated) node, their erasure-coding groups, and the
replacement and rebuild of a node's snapshot process after the node was lost.

``regrow train --nproc N --nodes M`` splits the N local ranks into M nodes of N/M consecutive ranks, as a real
cluster of M machines would hold them; each node gets its own snapshot process, so that killing a "node" (its ranks
and its snapshot process) loses exactly what losing a machine loses. With ``--ec-group-size n`` the nodes form
groups of n consecutive nodes whose snapshot processes erasure-code each other's snapshots (``--ec-parity p``
nodes of a group may be lost at once).

After a failed attempt, :meth:`LocalNodes.heal` finds the nodes whose snapshot process is gone, starts a
replacement for each (same job id: it removes the segments the dead one orphaned, as a fresh machine would hold
none), tells every member of the group the new addresses (``ec_group``) and has each replacement rebuild its ranks'
segments from the group (``ec_rebuild``). The ranks of the next attempt then restore through
``checkpoint.snapshot_recovery.restore_job``, which rolls the survivors back to the rebuilt step.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import (
    TOKEN_ENV,
    ProtocolError,
    SnapshotClient,
    SnapshotProcessLost,
    ec_group_of,
    ec_group_request,
    request_once,
)
from regrow.trainer.checks import require_ints

ADDRESS_ENV = "REGROW_SNAPSHOT_ADDRESS"
"""How the local launcher tells its ranks where their node's snapshot process listens (the token is TOKEN_ENV)."""
PID_ENV = "REGROW_SNAPSHOT_PID"
"""The pid of the rank's node's snapshot process (what the fault injector kills to lose a node)."""
NODE_ENV = "REGROW_NODE"
"""The rank's node index."""
ANNOUNCE_ATTEMPTS = 50
"""Tries at announcing the healed groups while more of their snapshot processes turn out lost (0.1 s apart)."""
PROBE_TIMEOUT_S = 10.0
"""How long a snapshot process that has not exited gets to answer a hello when healing, before it is taken for
dying, ended and replaced."""


def log(text: str) -> None:
    print(f"[launcher] {text}", flush=True)


@dataclass(kw_only=True)
class NodesConfig:
    """How the local launcher lays its ranks out on simulated nodes. Validated on construction; errors name the
    field."""

    ranks: int
    """Local ranks in all (``--nproc``)."""
    nodes: int = 1
    """Simulated nodes (``--nodes``); must divide ``ranks``."""
    ec_group_size: int = 0
    """Nodes per erasure-coding group (``--ec-group-size``); 0: off. Must divide ``nodes``."""
    ec_parity: int = 1
    """Nodes of a group that may be lost at once (``--ec-parity``)."""
    shm_dir: str = "/dev/shm"
    """Where the snapshot processes keep their segments."""
    bytes_per_rank: int = 0
    """Shared memory one rank's snapshots take (checked by each snapshot process at start-up)."""
    persist: PersistConfig = field(default_factory=PersistConfig)
    """Universal checkpoints written by the snapshot processes themselves (``--persist-every``; off by default)."""

    def __post_init__(self) -> None:
        require_ints(self, {"ranks": 1, "nodes": 1, "ec_group_size": 0, "ec_parity": 1, "bytes_per_rank": 0})
        if self.ranks % self.nodes:
            raise ValueError(f"NodesConfig.nodes={self.nodes} must divide ranks={self.ranks} (the same number of "
                             f"ranks on every node)")
        if self.ec_group_size:
            # The field check (group >= 2, 1 <= parity < group) lives with the snapshot processes' own config.
            ErasureCodingConfig(ec_group_size=self.ec_group_size, ec_parity=self.ec_parity)
            if self.nodes % self.ec_group_size:
                raise ValueError(f"NodesConfig.ec_group_size={self.ec_group_size} must divide nodes={self.nodes} "
                                 f"(nodes form whole groups)")

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def group_of(self, node: int) -> list[int]:
        """The nodes of ``node``'s erasure-coding group (just ``node`` when coding is off)."""
        return ec_group_of(node, self.ec_group_size)


@dataclass
class HealReport:
    """What :meth:`LocalNodes.heal` did."""

    replaced: list[int]
    """Nodes whose snapshot process was gone and was replaced."""
    rebuilt: dict[int, int]
    """Replaced node -> the step its ranks' snapshots were rebuilt at."""
    not_rebuilt: dict[int, str]
    """Replaced node -> why it could not be rebuilt (its ranks will restore from the checkpoint)."""
    seconds: float


class LocalNodes:
    """The snapshot processes of the local launcher's nodes; see the module docstring. Use as a context manager
    (every process it started is stopped on exit, removing its segments)."""

    def __init__(self, config: NodesConfig, *, module: str | None = None, env: Mapping[str, str] | None = None
                 ) -> None:
        """``module``: what runs each node's snapshot process instead of ``regrow.checkpoint.node`` (the same
        arguments; the fault injector's ``regrow.launch.chaos.node_faults``), with ``env`` added to its environment;
        every node's process also gets its node in ``REGROW_NODE``."""
        self.config = config
        self.module = module
        self.env = dict(env or {})
        self.token = secrets.token_hex(32)
        self.base = secrets.token_hex(3)
        self.processes: list[SnapshotProcess] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalNodes":
        try:
            for node in range(self.config.nodes):
                self.processes.append(self._start(node))
            self._announce(range(self.config.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for node, process in enumerate(self.processes):
            code = process.stop()
            log(f"node {node}: snapshot process stopped (exit code {code})")
        self.processes = []

    def _start(self, node: int) -> SnapshotProcess:
        erasure = ErasureCodingConfig(ec_group_size=self.config.ec_group_size, ec_parity=self.config.ec_parity)
        expected = self.config.ranks_per_node * self.config.bytes_per_rank
        process = start_snapshot_process(
            SnapshotProcessConfig(job=f"{self.base}-n{node}", shm_dir=self.config.shm_dir, expected_bytes=expected,
                                  erasure=erasure, persist=self.config.persist), token=self.token,
            **({"module": self.module} if self.module else {}), env={**self.env, NODE_ENV: str(node)})
        coding = (f", erasure-coding group {self.config.group_of(node)} with parity {self.config.ec_parity}"
                  if self.config.ec_group_size else "")
        log(f"node {node}: snapshot process at {process.address} (pid {process.process.pid}), "
            f"{expected / 2**20:.1f} MiB of {self.config.shm_dir} for {self.config.ranks_per_node} ranks{coding}")
        return process

    # ------------------------------------------------------------------ what the ranks get
    def rank_env(self, rank: int) -> dict[str, str]:
        """The environment of local rank ``rank``: its node's snapshot process, the token, and torchrun's
        LOCAL_RANK / LOCAL_WORLD_SIZE as a real node would set them."""
        node = self.config.node_of(rank)
        process = self.processes[node]
        return {ADDRESS_ENV: process.address, TOKEN_ENV: self.token, PID_ENV: str(process.process.pid),
                NODE_ENV: str(node), "LOCAL_RANK": str(rank % self.config.ranks_per_node),
                "LOCAL_WORLD_SIZE": str(self.config.ranks_per_node)}

    def rank_envs(self) -> list[dict[str, str]]:
        return [self.rank_env(rank) for rank in range(self.config.ranks)]

    # ------------------------------------------------------------------ after a failure
    def lost_nodes(self) -> list[int]:
        """Nodes whose snapshot process has exited."""
        return [node for node, process in enumerate(self.processes) if process.process.poll() is not None]

    def heal(self) -> HealReport:
        """Replaces every lost node's snapshot process and rebuilds it from its group (see the module docstring).
        Call between attempts, when no rank runs."""
        started = time.monotonic()
        self._end_unanswering()
        lost: list[int] = []
        for attempt in range(ANNOUNCE_ATTEMPTS):
            newly = self.lost_nodes()
            for node in newly:
                code = self.processes[node].process.returncode
                log(f"node {node}: snapshot process gone (exit code {code}); its snapshots are lost with it, "
                    f"starting a replacement")
                self.processes[node] = self._start(node)
            lost = sorted(set(lost) | set(newly))
            if not lost:
                break
            try:
                self._announce(sorted({member for node in lost for member in self.config.group_of(node)}))
                break
            except SnapshotProcessLost:
                # A group member is dying too (two nodes killed at the same moment; its exit is not seen yet):
                # replace it as well and announce again.
                if attempt == ANNOUNCE_ATTEMPTS - 1:
                    raise
                time.sleep(0.1)
        rebuilt: dict[int, int] = {}
        not_rebuilt: dict[int, str] = {}
        for node in lost:
            if not self.config.ec_group_size:
                not_rebuilt[node] = "erasure coding is off (--ec-group-size 0)"
                continue
            try:
                reply = self._request(node, {"op": "ec_rebuild"})
            except (ProtocolError, SnapshotProcessLost) as error:
                not_rebuilt[node] = str(error)
                log(f"node {node}: not rebuilt: {error}")
                continue
            rebuilt[node] = int(reply["step"])
            log(f"node {node}: ranks {reply['ranks']} rebuilt at step {reply['step']} from its group (lost nodes "
                f"{reply['lost']})")
        report = HealReport(replaced=lost, rebuilt=rebuilt, not_rebuilt=not_rebuilt,
                            seconds=time.monotonic() - started)
        if lost:
            log(f"healed in {report.seconds:.2f} s: replaced nodes {lost}, rebuilt {sorted(rebuilt)}"
                + (f", not rebuilt {sorted(not_rebuilt)} (their ranks need the disk checkpoint)" if not_rebuilt
                   else ""))
        return report

    def _end_unanswering(self) -> None:
        """Ends every snapshot process that has not exited but does not answer a hello, so that it counts as lost.
        A killed node's process can outlive its ranks: SIGKILL takes effect only once a thread of it blocked in a
        disk write (a persist) is done, and the fault injector waits for that 10 s at most. Kept, it would die
        under the next attempt, whose ranks would find nothing at its address (seen once in the test suite)."""
        for node, process in enumerate(self.processes):
            if process.process.poll() is not None:
                continue
            try:
                SnapshotClient(process.address, token=self.token, timeout_s=PROBE_TIMEOUT_S).close()
            except (SnapshotProcessLost, ProtocolError) as error:
                log(f"node {node}: snapshot process (pid {process.process.pid}) alive but not answering ({error}); "
                    f"ending it")
                process.process.kill()
                process.process.wait(timeout=120)

    def _announce(self, nodes: "range | list[int]") -> None:
        """Sends each of ``nodes`` its id and its group's addresses (coding off: nothing to say)."""
        if not self.config.ec_group_size:
            return
        for node in nodes:
            self._request(node, ec_group_request(node, self.config.ec_group_size,
                                                 lambda member: self.processes[member].address))

    def _request(self, node: int, message: dict) -> dict:
        return request_once(self.processes[node].address, message, token=self.token, timeout_s=120.0)
