"""The snapshot process of every node that runs ranks, each owned by a :class:`SnapshotHost` actor pinned to its
node (so it dies with the node). A node's place in the order of the nodes' first ranks is its erasure-coding index;
each erasure-coding group is told its members' addresses. A lost node's process moves to the node its ranks'
replacements landed on and is rebuilt there from its group; after an elastic shrink every process starts afresh."""

from __future__ import annotations

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import (
    ProtocolError,
    SnapshotProcessLost,
    ec_group_of,
    ec_group_request,
    request_once,
)
from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.placement import pinned_to
from regrow.recovery.ray.worker import WorkerSpec


class SnapshotHost:
    """A Ray actor pinned to one node that owns that node's snapshot process (it dies with the node)."""

    # Ray's worker imports this module to make the actor, and with it torch (through WorkerSpec): a host takes about
    # as long to start as a standby, started just before it. The coordinator does not wait for its standbys; that the
    # first generation forms only once the hosts answer is what has the standbys up before training begins (seen
    # with a lighter module: under load a rank failed at step 5 before its node's standby was ready).

    def __init__(self, token: str, job: str, erasure: ErasureCodingConfig) -> None:
        self.process: SnapshotProcess = start_snapshot_process(
            SnapshotProcessConfig(job=job, erasure=erasure), token=token)

    def address(self) -> str:
        return self.process.address

    def stop(self) -> int:
        return self.process.stop()


class SnapshotHosts:
    """The snapshot processes of one job; none when its workers do not snapshot (``spec.snapshot_every`` 0: every
    method but :meth:`stop` then does nothing). ``token``: the snapshot protocol's shared secret; ``job``: the name
    their segments are made under (``<job>-n<index>``)."""

    def __init__(self, *, config: CoordinatorConfig, spec: WorkerSpec, token: str, job: str, events: EventLog) -> None:
        import ray

        self._ray = ray
        self._config = config
        self._enabled = bool(spec.snapshot_every)
        self._token = token
        self._job = job
        self._events = events
        self._hosts: dict[str, object] = {}  # node id -> SnapshotHost handle
        self._order: list[str] = []  # erasure-coding node index -> node id
        self._addresses: dict[str, str] = {}  # node id -> its snapshot process's address

    @property
    def job(self) -> str:
        """The job name of the current snapshot processes: the coordinator's job id, with ``-w<world size>`` after
        an elastic shrink."""
        return self._job

    def address(self, node: str) -> str | None:
        """The address of ``node``'s snapshot process (None: it has none)."""
        return self._addresses.get(node)

    def place(self, nodes: list[str]) -> None:
        """One snapshot process per node of ``nodes`` (each rank's node, in rank order), in order of the nodes'
        first ranks. Raises :class:`CoordinatorError` when erasure coding is on and the nodes do not make whole
        groups."""
        if not self._enabled:
            return
        for node in nodes:
            if node not in self._order:
                self._order.append(node)
        if self._config.ec_group_size and len(self._order) % self._config.ec_group_size:
            raise CoordinatorError(f"the workers landed on {len(self._order)} nodes, not a multiple of "
                                   f"ec_group_size={self._config.ec_group_size}")
        self._start(self._order)
        self._announce(list(range(len(self._order))))

    def replace_lost(self, alive: set[str], nodes: list[str]) -> None:
        """Moves the snapshot process of every node not in ``alive`` to a node of ``nodes`` (each rank's node, now
        that the replacements are placed) that has none, and has it rebuilt from its erasure-coding group (the
        ``node_rebuilt`` or ``node_not_rebuilt`` event says how that went). Raises :class:`CoordinatorError` when
        the replacements landed on nodes that already have one."""
        if not self._enabled:
            return
        for node in [node for node in self._order if node not in alive]:
            index = self._order.index(node)
            target = next((candidate for candidate in nodes if candidate not in self._order), None)
            if target is None:
                raise CoordinatorError(f"node {node} was lost and its ranks' replacements landed on nodes that "
                                       f"already hold ranks: give the cluster a spare node (a snapshot process and "
                                       f"its erasure-coding slot belong to one node)")
            self._order[index] = target
            self._hosts.pop(node, None)
            self._addresses.pop(node, None)
            self._start([target])
            self._announce(ec_group_of(index, self._config.ec_group_size))
            if not self._config.ec_group_size:
                continue
            try:
                reply = self._request(self._addresses[target], {"op": "ec_rebuild"})
                self._events.event("node_rebuilt", node=target, index=index, step=reply["step"], ranks=reply["ranks"])
            except (ProtocolError, SnapshotProcessLost) as error:
                self._events.event("node_not_rebuilt", node=target, index=index, reason=str(error))

    def restart(self, world_size: int, nodes: list[str]) -> None:
        """After an elastic shrink to ``world_size`` ranks on ``nodes``: stops every snapshot process (their
        snapshots are of the old layout) and places new ones under another job name."""
        self.stop()
        self._hosts, self._addresses, self._order = {}, {}, []
        self._job = f"{self._job.split('-')[0]}-w{world_size}"
        self.place(nodes)

    def stop(self) -> None:
        """Stops every snapshot process (removing its segments) and its actor."""
        for host in self._hosts.values():
            try:
                self._ray.get(host.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (its node may be gone)
                pass
            self._ray.kill(host)

    def _start(self, nodes: list[str]) -> None:
        """Starts a snapshot process on each of ``nodes`` (all at once) and waits for their addresses."""
        erasure = ErasureCodingConfig(ec_group_size=self._config.ec_group_size, ec_parity=self._config.ec_parity)
        for node in nodes:
            self._hosts[node] = self._ray.remote(SnapshotHost).options(
                num_cpus=0, scheduling_strategy=pinned_to(node),
            ).remote(self._token, f"{self._job}-n{self._order.index(node)}", erasure)
        addresses = self._ray.get([self._hosts[node].address.remote() for node in nodes], timeout=120)
        for node, address in zip(nodes, addresses):
            self._addresses[node] = address
            self._events.event("snapshot_process_started", node=node, index=self._order.index(node), address=address)

    def _announce(self, indices: list[int]) -> None:
        """Sends each node of ``indices`` (erasure-coding indices) its group's addresses (coding off: nothing)."""
        if not self._config.ec_group_size:
            return
        for index in indices:
            self._request(self._addresses[self._order[index]],
                          ec_group_request(index, self._config.ec_group_size,
                                           lambda member: self._addresses[self._order[member]]))

    def _request(self, address: str, message: dict) -> dict:
        return request_once(address, message, token=self._token, timeout_s=120.0)
