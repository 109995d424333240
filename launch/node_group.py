"""Erasure coding under torchrun: the node helpers' snapshot processes find their group through a shared directory,
and each helper replaces its node's snapshot process when it dies and has the group rebuild it.

Under the local launcher one process starts every node's snapshot process and tells each its group
(``launch/local/nodes.py``); under Ray the coordinator does. Under torchrun every node runs its own helper
(``python -m regrow.launch.torchrun node``) and no process sees every node, so the helpers meet in a directory all
nodes see (``--ec-dir``, on the shared filesystem of the checkpoints, say):

- each helper writes ``node_<R>.json`` there (:class:`GroupDirectory`): its node rank, its snapshot process's
  address and the incarnation of that process (0, then 1 after the first replacement, ...);
- :class:`NodeSupervisor` announces its own snapshot process's group (``ec_group``) once every member of the group
  has written its file, and again whenever a member's file changes (a member was replaced);
- when its snapshot process dies (the node's memory is lost: a ``kill-node`` fault, an OOM kill) while the
  command runs, it starts a replacement **on the same address** (the ranks torchrun restarts were given that
  address in their environment), which holds back the ranks' requests (``SnapshotProcessConfig.await_rebuild``),
  publishes its next incarnation, announces the group and has the replacement rebuild its ranks' snapshots from
  the group (``ec_rebuild``). torchrun meanwhile restarts every worker; they restore through the recovery order as
  after any restart (the rebuilt node's step, the survivors rolled back to it).

Every file is read as hostile input: a size cap, JSON, the fields' types and ranges, an address ``host:port``;
a bad file is reported naming it and waited past (a helper may be rewriting it), never trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig
from regrow.checkpoint.snapshot.protocol import (
    ProtocolError,
    SnapshotProcessLost,
    ec_group_of,
    ec_group_request,
    parse_address,
    request_once,
)
from regrow.trainer.checks import require_ints

MAX_MEMBER_BYTES = 4096
"""Largest ``node_<R>.json`` read (a member's file is about 100 bytes)."""
Starter = Callable[[SnapshotProcessConfig], SnapshotProcess]


def log(text: str) -> None:
    print(f"[node] {text}", flush=True)


@dataclass(kw_only=True)
class NodeGroupConfig:
    """This node's place among the job's nodes and its erasure-coding group (the helper's ``--node-rank``,
    ``--nnodes``, ``--ec-group-size``, ``--ec-parity``, ``--ec-dir``). Validated on construction; errors name the
    field."""

    node: int
    """This node's rank among the job's nodes, 0 to ``nodes - 1``: one helper per node rank."""
    nodes: int
    """Nodes of the job; a multiple of ``ec_group_size`` (groups of consecutive node ranks)."""
    ec_group_size: int
    """Nodes per erasure-coding group (>= 2)."""
    ec_parity: int = 1
    """Nodes of a group that may be lost at once."""
    directory: str
    """The directory every node's helper sees, where they publish their snapshot processes' addresses."""
    wait_s: float = 600.0
    """How long a helper waits for its group's members to publish before it gives up (the job's nodes start
    within this)."""
    poll_s: float = 0.2
    """How often the helper looks at its snapshot process and its group's files."""

    def __post_init__(self) -> None:
        require_ints(self, {"node": 0, "nodes": 1, "ec_group_size": 2, "ec_parity": 1})
        if self.node >= self.nodes:
            raise ValueError(f"NodeGroupConfig.node={self.node} must be below nodes={self.nodes}")
        if self.nodes % self.ec_group_size:
            raise ValueError(f"NodeGroupConfig.ec_group_size={self.ec_group_size} must divide nodes={self.nodes} "
                             "(nodes form whole groups of consecutive node ranks)")
        if self.ec_parity >= self.ec_group_size:
            raise ValueError(f"NodeGroupConfig.ec_parity={self.ec_parity} must be below ec_group_size="
                             f"{self.ec_group_size}")
        if not str(self.directory):
            raise ValueError("NodeGroupConfig.directory is empty: give the directory every node sees (--ec-dir)")
        for name in ("wait_s", "poll_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"NodeGroupConfig.{name}={getattr(self, name)!r} must be a finite number > 0")

    @property
    def group(self) -> list[int]:
        """The node ranks of this node's group, in order."""
        return ec_group_of(self.node, self.ec_group_size)


@dataclass(frozen=True)
class Member:
    """One node's entry in the directory."""

    node: int
    address: str
    incarnation: int


class GroupDirectory:
    """The members' files under ``root``: written whole (a temporary, then a rename), read as hostile input."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, node: int) -> Path:
        return self.root / f"node_{node:05d}.json"

    def publish(self, member: Member) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".node_{member.node:05d}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(dataclasses.asdict(member)))
        os.replace(temporary, self.path(member.node))

    def read(self, node: int) -> Member | None:
        """Node ``node``'s entry, or None while it has none. Raises ValueError naming the file when it is not a
        valid entry of that node."""
        path = self.path(node)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_MEMBER_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_MEMBER_BYTES:
            raise ValueError(f"{path}: larger than {MAX_MEMBER_BYTES} bytes, not a member's entry")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: not a JSON member entry") from None
        if not isinstance(data, dict) or set(data) != {"node", "address", "incarnation"}:
            raise ValueError(f"{path}: must hold exactly node, address and incarnation")
        if data["node"] != node or isinstance(data["incarnation"], bool) or not isinstance(data["incarnation"], int) \
                or data["incarnation"] < 0 or not isinstance(data["address"], str):
            raise ValueError(f"{path}: node must be {node}, incarnation an integer >= 0, address a string")
        parse_address(data["address"])  # ValueError naming what is wrong with it
        return Member(node=node, address=data["address"], incarnation=data["incarnation"])


class NodeSupervisor:
    """This node's snapshot process under the node helper, in its erasure-coding group (see the module docstring).

    Contract: :meth:`start` once (returns when the process listens and is published; the group is announced by
    the watch thread as soon as every member has published), then :meth:`stop` when the command has ended.
    ``start_process`` starts a process of a config (``start_snapshot_process`` with the job's ``token``, which
    every node's helper must share: the processes of a group authenticate each other with it)."""

    def __init__(self, group: NodeGroupConfig, config: SnapshotProcessConfig, *, token: str,
                 start_process: Starter) -> None:
        self.group = group
        self.config = config
        self._token = token
        self._start_process = start_process
        self._directory = GroupDirectory(Path(group.directory))
        self._stopping = threading.Event()
        self._announced: dict[int, Member] = {}
        self._incarnation = 0
        self._rebuild_pending = False
        self._complaints: set[str] = set()
        self._thread: threading.Thread | None = None
        self.process: SnapshotProcess | None = None

    @property
    def address(self) -> str:
        assert self.process is not None, "start() first"
        return self.process.address

    def start(self) -> SnapshotProcess:
        self.process = self._start_process(self.config)
        self._publish()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="regrow-node-group")
        self._thread.start()
        return self.process

    def stop(self) -> int:
        """Stops watching, then the snapshot process (removing its segments); returns its exit code."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        assert self.process is not None
        return self.process.stop()

    def wait_for_group(self, timeout_s: float | None = None) -> bool:
        """Whether the group was announced to this node's snapshot process within ``timeout_s`` (default
        ``wait_s``)."""
        deadline = time.monotonic() + (self.group.wait_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            if len(self._announced) == len(self.group.group):
                return True
            time.sleep(self.group.poll_s)
        return False

    # ------------------------------------------------------------------ the watch thread
    def _watch(self) -> None:
        started, waiting_said, failed_starts = time.monotonic(), False, 0
        while not self._stopping.wait(self.group.poll_s * (1 + min(failed_starts, 25))):  # slower after failures
            if self.process is not None and self.process.process.poll() is not None:
                try:
                    self._replace()
                    failed_starts = 0
                except (RuntimeError, ValueError, OSError) as error:  # tried again at the next poll
                    failed_starts += 1
                    if failed_starts in (1, 10) or failed_starts % 100 == 0:
                        log(f"node {self.group.node}: the replacement did not start (try {failed_starts}): {error}")
                    continue
            members = self._members()
            if members is None:
                if not waiting_said and time.monotonic() - started > 10:
                    log(f"node {self.group.node}: waiting for the nodes of group {self.group.group} to publish "
                        f"their snapshot processes under {self.group.directory}")
                    waiting_said = True
                continue
            if members != self._announced:
                self._announce(members)
            if self._rebuild_pending and members == self._announced:
                self._rebuild()

    def _members(self) -> dict[int, Member] | None:
        """Every member's current entry, or None while one is missing or unreadable."""
        members = {}
        for node in self.group.group:
            try:
                member = self._directory.read(node)
            except ValueError as error:
                if str(error) not in self._complaints:  # said once per problem: a helper may be rewriting it
                    self._complaints.add(str(error))
                    log(f"node {self.group.node}: passing over {error}")
                return None
            if member is None:
                return None
            members[node] = member
        return members

    def _announce(self, members: dict[int, Member]) -> None:
        request = ec_group_request(self.group.node, self.group.ec_group_size, lambda n: members[n].address)
        try:
            request_once(self.address, request, token=self._token, timeout_s=60.0)
        except (ProtocolError, SnapshotProcessLost, OSError) as error:
            log(f"node {self.group.node}: announcing the group failed ({error}); trying again")
            return
        changed = sorted(n for n in members if self._announced.get(n) != members[n])
        self._announced = members
        log(f"node {self.group.node}: group {self.group.group} announced to the snapshot process (members "
            f"{changed} new or moved)")

    def _replace(self) -> None:
        """Starts the replacement of a snapshot process that died, on its address, and publishes it; the rebuild
        follows once the group is announced to it."""
        assert self.process is not None
        code = self.process.process.returncode
        self.process.stop()  # removes what the dead process could not (as a fresh machine would hold nothing)
        log(f"node {self.group.node}: snapshot process gone (exit code {code}); its snapshots are lost with it, "
            f"starting a replacement at {self.process.address}")
        config = dataclasses.replace(self.config, address=self.process.address, await_rebuild=True)
        self.process = self._start_process(config)
        self._incarnation += 1
        self._announced = {}
        self._rebuild_pending = True
        self._publish()

    def _rebuild(self) -> None:
        self._rebuild_pending = False
        try:
            reply = request_once(self.address, {"op": "ec_rebuild"}, token=self._token, timeout_s=300.0)
        except (ProtocolError, SnapshotProcessLost, OSError) as error:
            log(f"node {self.group.node}: not rebuilt: {error}; its ranks fall back to the checkpoint")
            return
        log(f"node {self.group.node}: ranks {reply['ranks']} rebuilt at step {reply['step']} from group "
            f"{self.group.group} (lost nodes {reply['lost']})")

    def _publish(self) -> None:
        self._directory.publish(Member(node=self.group.node, address=self.address, incarnation=self._incarnation))



__all__ = ["GroupDirectory", "Member", "NodeGroupConfig", "NodeSupervisor"]
