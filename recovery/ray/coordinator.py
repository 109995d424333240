"""The Ray coordinator: starts one ``Worker`` actor per rank and a snapshot process per Ray node, forms the process
group, runs training, watches it, and heals it after a failure.

What it watches: a worker's training call failing with an actor death (Ray reports it at once: the process died,
or its node was removed), and heartbeats (``Worker.heartbeat`` on the control thread) older than
``hang_timeout_s`` (a hung rank: it is killed and treated as dead). A training call that fails while its actor
lives is a survivor that saw a peer's failure in a collective.

Healing, in DESIGN.md's order ("Survivors keep their state"):

1. abort the survivors' communicators out of band (``Worker.abort`` on their control thread; NCCL needs it, gloo
   fails by itself once the dead peer's sockets close) and wait for their training calls to return;
2. start a replacement for every dead rank: on the same node while that node is alive, else anywhere;
3. replace the snapshot process of every lost node (a ``SnapshotHost`` actor pinned to the replacement's node),
   tell its erasure-coding group the new addresses and have it rebuild its ranks' snapshots from the group;
4. form the next process-group generation among survivors and replacements (a fresh store prefix);
5. the survivors keep their state (each goes back to the boundary of the step the failure interrupted) and only
   the replacements restore that step from their node's snapshot process; when that is impossible every rank
   restores the step the job agrees on (``restore_job``: snapshot slots, else erasure-coded buffers, else the
   universal checkpoint). In a pipeline job without snapshots the lost stage is rebuilt from its neighbours
   (``recovery.stage_heal``). Training resumes.

Elastic mode (``elastic_wait_s``): a replacement that finds no resources in time is not waited for; the job goes
on with fewer ranks, resharded from the latest universal checkpoint (:meth:`Coordinator._shrink`).

Everything that happens is appended to an events JSONL file (``events_path``), one object per line with the time
since start, the event and its details.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import (
    TOKEN_ENV,
    ProtocolError,
    SnapshotProcessLost,
    ec_group_of,
    ec_group_request,
    request_once,
)
from regrow.recovery.ray.worker import CONCURRENCY_GROUPS, CONTROL, TRAIN, Worker, WorkerSpec
from regrow.trainer.checks import require_ints


class CoordinatorError(RuntimeError):
    """The job cannot go on (resources never appeared, restarts exhausted); the message says what happened."""


@dataclass(kw_only=True)
class CoordinatorConfig:
    """Settings of :class:`Coordinator`. Validated on construction; errors name the field."""

    workers: int
    """Ranks, one Ray actor each."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    """1 on GPU clusters (the workers then use NCCL); 0: CPU workers over gloo."""
    ranks_per_node: int = 0
    """Place exactly this many consecutive ranks on each node (a STRICT_SPREAD placement group, one bundle per
    node; a lost node's bundle moves to another node and its ranks' replacements follow it). 0: wherever Ray puts
    them. Erasure coding needs it (a group's members are nodes)."""
    ec_group_size: int = 0
    """Erasure-code the snapshots across groups of this many Ray nodes (0: off)."""
    ec_parity: int = 1
    heartbeat_every_s: float = 0.5
    """How often the coordinator polls the workers' heartbeats and training calls."""
    hang_timeout_s: float = 60.0
    """A rank whose last finished step is older than this is hung: it is killed and replaced."""
    resources_timeout_s: float = 300.0
    """How long to wait for the resources of a worker (with a message every 10 s) before giving up."""
    max_restarts: int = 10
    """Failures healed before the coordinator gives up."""
    elastic_wait_s: float = 0.0
    """Elastic mode when > 0: a dead rank whose replacement finds no resources within this many seconds is not
    replaced; the job goes on with fewer ranks (the largest count that divides the global batch), every rank
    restoring the latest universal checkpoint resharded to the new world (``spec.ckpt_dir`` is required). 0: wait
    up to ``resources_timeout_s`` for the replacement, then fail."""
    min_workers: int = 1
    """Elastic mode never shrinks the job below this many ranks."""
    standby_per_node: int = 0
    """Workers started ahead of need on every node that runs ranks, claiming none of its CPUs or GPUs: each has
    started its process and imported torch and regrow, and waits. A rank lost on a node with a standby ready is
    taken over by that standby, on the lost worker's GPU (``Worker.adopt``), instead of by a new actor (whose start
    took 3.2-4.9 s on the 4-GPU host); a placeholder actor then holds the lost worker's resources in Ray's
    accounting, and a new standby starts for the next failure. Needs ``ranks_per_node=0`` and no elastic mode.
    Meant for nodes the job fills: on a node with other free GPUs, Ray may hand the placeholder another one than
    the one the standby took."""
    events_path: str | None = None
    """JSONL file of everything that happened (None: not written)."""

    def __post_init__(self) -> None:
        require_ints(self, {"workers": 1, "ranks_per_node": 0, "ec_group_size": 0, "ec_parity": 1,
                            "max_restarts": 0, "min_workers": 1, "standby_per_node": 0})
        if self.standby_per_node and (self.ranks_per_node or self.elastic_wait_s):
            raise ValueError("CoordinatorConfig.standby_per_node needs ranks_per_node=0 and elastic_wait_s=0 (a "
                             "standby takes a lost rank's place on its node, outside any placement group)")
        if self.elastic_wait_s < 0:
            raise ValueError(f"CoordinatorConfig.elastic_wait_s={self.elastic_wait_s!r} must be >= 0")
        if self.elastic_wait_s and self.ranks_per_node:
            raise ValueError("CoordinatorConfig.elastic_wait_s needs ranks_per_node=0 (a job placed node by node, "
                             "with erasure-coding groups, cannot lose a rank without its node)")
        if self.ranks_per_node and self.workers % self.ranks_per_node:
            raise ValueError(f"CoordinatorConfig.ranks_per_node={self.ranks_per_node} must divide workers="
                             f"{self.workers}")
        if self.ec_group_size and not self.ranks_per_node:
            raise ValueError("CoordinatorConfig.ec_group_size needs ranks_per_node > 0 (erasure-coding groups are "
                             "made of nodes, so the ranks' nodes must be fixed)")
        for name in ("heartbeat_every_s", "hang_timeout_s", "resources_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CoordinatorConfig.{name}={getattr(self, name)!r} must be > 0")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("CoordinatorConfig.cpus_per_worker and gpus_per_worker must be >= 0")


class SnapshotHost:
    """A Ray actor pinned to one node that owns that node's snapshot process (it dies with the node)."""

    def __init__(self, token: str, job: str, erasure: ErasureCodingConfig) -> None:
        self.process: SnapshotProcess = start_snapshot_process(
            SnapshotProcessConfig(job=job, erasure=erasure), token=token)

    def address(self) -> str:
        return self.process.address

    def stop(self) -> int:
        return self.process.stop()


class Placeholder:
    """An idle Ray actor that holds a lost worker's CPUs and GPUs in Ray's accounting while a standby, which claimed
    none, trains on them. It has nothing to do: the coordinator only creates and kills it."""


@dataclass
class _Rank:
    handle: object
    node: str
    gpus: tuple[str, ...] = ()  # the GPU ids its worker trains on
    call: object | None = None  # the ObjectRef of its running train() call


@dataclass
class _Standby:
    handle: object
    node: str
    placed: object  # the ObjectRef of its placement() call: ready once the standby is up


@dataclass
class Outcome:
    """What a coordinated run did."""

    steps: int
    failures: int
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of rank 0, the steps of the last attempt at each step."""
    restores: list[list[dict]] = field(default_factory=list)
    """Every rank's restore result, per healing."""
    parameters: dict | None = None
    """Rank 0's final model parameters (when :meth:`Coordinator.run` was asked for them)."""
    stopped: str | None = None
    """Why the run ended before ``steps`` when :meth:`Coordinator.stop` ended it (None: it reached ``steps``)."""
    stopped_at: int | None = None
    """The last step rank 0 finished when the run was stopped (``history`` lacks the steps of the training call
    the stop interrupted)."""


class _Stopped(Exception):
    """Raised inside :meth:`Coordinator.run` once :meth:`Coordinator.stop` was called."""


class Coordinator:
    """Runs one job on the Ray cluster ``ray`` is connected to; see the module docstring. Use :meth:`run`.

    It can run in the driver or inside a Ray actor (``ray.remote(Coordinator)``); it holds the process groups'
    TCP store, so the workers must be able to reach this process's address."""

    def __init__(self, config: CoordinatorConfig, spec: WorkerSpec, *, env: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None, on_event: Callable[[dict], None] | None = None) -> None:
        """``log`` receives each event as a line of text (default: printed); ``on_event`` each event's record
        (``t``, ``event`` and its details), from the thread running :meth:`run`."""
        import ray

        if not ray.is_initialized():
            raise CoordinatorError("Ray is not initialised: call ray.init(address=...) first")
        self.ray = ray
        self.config = config
        self.spec = spec
        self.env = dict(env or {})
        self.token = secrets.token_hex(32)
        self.job = secrets.token_hex(3)
        self.generation = 0
        self.failures = 0
        self.world_size = config.workers
        """Ranks of the current generation: ``config.workers`` until an elastic shrink."""
        self._log = log or (lambda text: print(f"[coordinator] {text}", flush=True))
        self._started = time.monotonic()
        self._on_event = on_event
        self._stop = threading.Event()
        self._stop_reason = ""
        self._events = Path(config.events_path) if config.events_path else None
        self._ranks: list[_Rank] = []
        self._hosts: dict[str, object] = {}  # node id -> SnapshotHost handle
        self._node_order: list[str] = []  # erasure-coding node index -> node id
        self._host_addresses: dict[str, str] = {}
        self._store_host = ray.util.get_node_ip_address()
        self._store: dist.TCPStore | None = None  # the generations' rendezvous, for the time of run()
        self._worker_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Worker)
        self._placement = None  # the placement group, when ranks_per_node is set
        self._launched: dict[int, object] = {}  # rank -> a replacement started at detection, not yet placed
        self._standbys: list[_Standby] = []
        self._placeholders: dict[int, object] = {}  # rank -> the actor holding its lost worker's resources
        self._adopting: dict[int, object] = {}  # rank -> the ObjectRef of the adopt() call of its standby
        self._standby_count = 0  # standbys started: their Ray actor names are regrow-standby-<job>-<n>

    # ------------------------------------------------------------------ the run
    def run(self, steps: int, *, resume: bool = False, collect_parameters: bool = False) -> Outcome:
        """Trains to step ``steps``, healing failures; returns the outcome (with rank 0's final parameters if
        ``collect_parameters``). With ``resume`` the first generation restores too (the job's snapshots, else the
        latest checkpoint under ``spec.ckpt_dir``): a whole-job restart. Stops every actor it started, however it
        ends. Raises :class:`CoordinatorError`."""
        outcome = Outcome(steps=steps, failures=0)
        self.event("start", workers=self.config.workers, steps=steps)
        if self.config.elastic_wait_s and not self.spec.ckpt_dir:
            raise CoordinatorError("elastic mode (CoordinatorConfig.elastic_wait_s > 0) reshards from the universal "
                                   "checkpoint: give WorkerSpec.ckpt_dir and a sink that saves there")
        try:
            self._store = dist.TCPStore(self._store_host, 0, is_master=True, wait_for_workers=False)
            self._reserve_nodes()
            self._ranks = self._start_workers({rank: None for rank in range(self.config.workers)})
            self._start_standbys(sorted({rank.node for rank in self._ranks}) * self.config.standby_per_node)
            self._place_snapshot_hosts()
            self._form_generation(resume=resume, outcome=outcome)
            while True:
                failed = self._train_until(steps, outcome)
                if not failed:
                    break
                self.failures += 1
                if self.failures > self.config.max_restarts:
                    raise CoordinatorError(f"{self.failures} failures, more than max_restarts="
                                           f"{self.config.max_restarts}: giving up")
                self._heal(failed, outcome)
            self.event("finished", step=steps, failures=self.failures,
                       seconds=round(time.monotonic() - self._started, 3))
            outcome.failures = self.failures
            if collect_parameters:
                outcome.parameters = self.ray.get(
                    self._ranks[0].handle.parameters.options(concurrency_group=TRAIN).remote())
            return outcome
        except _Stopped:
            outcome.failures, outcome.stopped = self.failures, self._stop_reason
            outcome.stopped_at = self._last_step()
            self.event("stopped", reason=self._stop_reason, step=outcome.stopped_at, failures=self.failures)
            return outcome
        finally:
            self._stop_all()
            self._store = None  # its server (a thread and a port) stops with its last reference

    def stop(self, reason: str = "stopped") -> None:
        """Ends :meth:`run` early: at its next poll of the training calls (or before the next generation forms
        during a recovery) the workers are stopped where they are and :meth:`run` returns the outcome with
        ``stopped`` set. Thread-safe: call it from another thread while :meth:`run` runs."""
        self._stop_reason = reason
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()

    def _last_step(self) -> int | None:
        """The last step rank 0 finished, from its heartbeat (None if it does not answer)."""
        try:
            beat = self.ray.get(self._ranks[0].handle.heartbeat.options(concurrency_group=CONTROL).remote(),
                                timeout=5.0)
        except (IndexError, self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return None
        return int(beat["step"])

    def ranks_node(self, rank: int) -> str:
        """The Ray node id ``rank``'s worker runs on (e.g. to remove that node in a test)."""
        return self._ranks[rank].node

    def worker(self, rank: int) -> object:
        """The actor handle of ``rank``'s current worker (e.g. to kill it in a benchmark, or read its heartbeat on
        the ``control`` concurrency group). Raises IndexError until :meth:`run` has started every worker."""
        return self._ranks[rank].handle

    def elapsed(self) -> float:
        """Seconds since this coordinator was made: the clock of the events' ``t``."""
        return time.monotonic() - self._started

    # ------------------------------------------------------------------ starting things
    def _reserve_nodes(self) -> None:
        """With ``ranks_per_node``: one bundle per node, all on distinct nodes (waits for them like a worker)."""
        if not self.config.ranks_per_node:
            return
        from ray.util.placement_group import placement_group

        per_node = self.config.ranks_per_node
        bundle = {"CPU": self.config.cpus_per_worker * per_node, "GPU": self.config.gpus_per_worker * per_node}
        bundle = {key: value for key, value in bundle.items() if value}
        self._placement = placement_group([bundle] * (self.config.workers // per_node), strategy="STRICT_SPREAD")
        self._wait_placement()

    def _wait_placement(self) -> None:
        deadline = time.monotonic() + self.config.resources_timeout_s
        while not self.ray.wait([self._placement.ready()], timeout=10.0)[0]:
            if time.monotonic() > deadline:
                raise CoordinatorError(f"no {self.config.workers // self.config.ranks_per_node} distinct nodes with "
                                       f"room for {self.config.ranks_per_node} workers each appeared within "
                                       f"{self.config.resources_timeout_s} s (add nodes, or lower --workers)")
            self._log("waiting for nodes for the placement group")

    def _start_workers(self, ranks: dict[int, str | None], *, timeout_s: float | None = None) -> list[_Rank]:
        """Starts a worker for each rank (on the node given, while it lives; None: anywhere), all at once, and
        waits until every one is placed (``timeout_s``, default ``resources_timeout_s``). In the order of
        ``ranks``. A rank whose replacement was launched when its failure was detected (:meth:`_launch_early`)
        takes that one. On a timeout the workers not placed are killed and :class:`CoordinatorError` raised."""
        handles = {rank: self._launched.pop(rank, None) or self._launch_worker(rank, node)
                   for rank, node in ranks.items()}
        started = []
        try:
            for rank, handle in handles.items():
                if not self._adopted(rank, handle):  # a standby that could not take the rank: a new worker
                    handle = handles[rank] = self._launch_worker(rank, ranks[rank])
                placed = self._wait_ready(handle, f"worker of rank {rank}", timeout_s)
                self.event("worker_started", rank=rank, node=placed["node"])
                # An adopting standby was given no GPU by Ray: it trains on its predecessor's.
                gpus = tuple(placed["gpus"]) or (self._ranks[rank].gpus if rank < len(self._ranks) else ())
                started.append(_Rank(handle=handle, node=placed["node"], gpus=gpus))
        except (CoordinatorError, _Stopped):
            for handle in handles.values():
                self.ray.kill(handle)
            raise
        return started

    def _adopted(self, rank: int, handle: object) -> bool:
        """Whether the standby given ``rank`` took it (True when ``handle`` is no standby); a standby that failed
        to is killed."""
        adopting = self._adopting.pop(rank, None)
        if adopting is None:
            return True
        try:
            self.ray.get(adopting, timeout=60)
            return True
        except Exception as error:  # noqa: BLE001 (its reason goes to the events; a new worker takes the rank)
            self.event("standby_failed", rank=rank, error=str(error).splitlines()[0])
            self.ray.kill(handle)
            return False

    def _launch_early(self, dead: set[int]) -> None:
        """Launches the replacements of ranks found dead, before the survivors are aborted: a new actor's process
        start and imports (seconds on a GPU host) then overlap the abort. Placed on the dead rank's node when it
        is alive (a soft affinity: elsewhere when it is gone); :meth:`_heal` waits for them."""
        alive = {node["NodeID"] for node in self.ray.nodes() if node["Alive"]} if self._standbys else set()
        for index in sorted(dead):
            if index not in self._launched:
                node = self._ranks[index].node
                self._launched[index] = (self._replacement(index, node) if node in alive
                                         else self._launch_worker(index, node))

    def _replacement(self, rank: int, node: str) -> object:
        """A standby ready on ``node`` taking over ``rank`` (its predecessor's resources then held by a placeholder,
        and a new standby started), else a new worker."""
        standby = next((s for s in self._standbys if s.node == node and self.ray.wait([s.placed], timeout=0)[0]),
                       None)
        if standby is None:
            return self._launch_worker(rank, node)
        self._standbys.remove(standby)
        self._adopting[rank] = standby.handle.adopt.options(concurrency_group=TRAIN).remote(
            rank, list(self._ranks[rank].gpus))
        self.event("standby_adopted", rank=rank, node=node, gpus=list(self._ranks[rank].gpus))
        if rank not in self._placeholders:  # else the placeholder of its earlier loss still holds them
            self._placeholders[rank] = self._placeholder(node)
        self._start_standbys([node])
        return standby.handle

    def _start_standbys(self, nodes: list[str]) -> None:
        """Starts a standby worker on each of ``nodes`` (not waited for), named ``regrow-standby-<job>-<n>`` in
        Ray (its dashboard and state API show them as such)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        env = {**self.env, TOKEN_ENV: self.token}
        for node in nodes:
            self._standby_count += 1
            handle = self._worker_class.options(
                name=f"regrow-standby-{self.job}-{self._standby_count}", num_cpus=0, num_gpus=0, max_concurrency=2,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(self.spec, -1, env, standby=True)
            self._standbys.append(_Standby(handle=handle, node=node,
                                           placed=handle.placement.options(concurrency_group=CONTROL).remote()))

    def _placeholder(self, node: str) -> object:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return self.ray.remote(Placeholder).options(
            num_cpus=self.config.cpus_per_worker, num_gpus=self.config.gpus_per_worker,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()

    def _launch_worker(self, rank: int, node: str | None) -> object:
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        options = {"num_cpus": self.config.cpus_per_worker, "num_gpus": self.config.gpus_per_worker,
                   "max_concurrency": 2}
        if self._placement is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._placement, placement_group_bundle_index=rank // self.config.ranks_per_node)
        elif node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        holder = self._placeholders.pop(rank, None)
        if holder is not None:  # the resources it holds are this new worker's to claim
            self.ray.kill(holder)
        env = {**self.env, TOKEN_ENV: self.token}
        return self._worker_class.options(**options).remote(self.spec, rank, env)

    def _wait_ready(self, handle: object, what: str, timeout_s: float | None = None) -> dict:
        """The placement of a new actor (``Worker.placement``), waiting for its resources (a message every 10 s, an
        error at the timeout)."""
        ref = handle.placement.options(concurrency_group=CONTROL).remote()
        limit = self.config.resources_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        next_message = time.monotonic() + 10.0
        while True:
            self._check_stop()
            ready, _ = self.ray.wait([ref], timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            if ready:
                return self.ray.get(ref)
            if time.monotonic() > deadline:
                raise CoordinatorError(f"{what}: no node offered {self.config.cpus_per_worker} CPUs and "
                                       f"{self.config.gpus_per_worker} GPUs within {limit} s (add nodes, or lower "
                                       f"--workers)")
            if time.monotonic() < next_message:
                continue
            next_message = time.monotonic() + 10.0
            self._log(f"{what}: waiting for resources ({self.config.cpus_per_worker} CPUs, "
                      f"{self.config.gpus_per_worker} GPUs)")

    def _place_snapshot_hosts(self) -> None:
        """One snapshot process per node that runs workers, in order of the nodes' first ranks."""
        if not self.spec.snapshot_every:
            return
        for rank in self._ranks:
            if rank.node not in self._node_order:
                self._node_order.append(rank.node)
        if self.config.ec_group_size and len(self._node_order) % self.config.ec_group_size:
            raise CoordinatorError(f"the workers landed on {len(self._node_order)} nodes, not a multiple of "
                                   f"ec_group_size={self.config.ec_group_size}")
        self._start_hosts(self._node_order)
        self._announce(list(range(len(self._node_order))))

    def _start_hosts(self, nodes: list[str]) -> None:
        """Starts a snapshot process on each of ``nodes`` (all at once) and waits for their addresses."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        erasure = ErasureCodingConfig(ec_group_size=self.config.ec_group_size, ec_parity=self.config.ec_parity)
        for node in nodes:
            self._hosts[node] = self.ray.remote(SnapshotHost).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(self.token, f"{self.job}-n{self._node_order.index(node)}", erasure)
        addresses = self.ray.get([self._hosts[node].address.remote() for node in nodes], timeout=120)
        for node, address in zip(nodes, addresses):
            self._host_addresses[node] = address
            self.event("snapshot_process_started", node=node, index=self._node_order.index(node), address=address)

    def _announce(self, indices: list[int]) -> None:
        """Sends each node of ``indices`` (erasure-coding indices) its group's addresses (coding off: nothing)."""
        if not self.config.ec_group_size:
            return
        for index in indices:
            self._request(self._host_addresses[self._node_order[index]],
                          ec_group_request(index, self.config.ec_group_size,
                                           lambda member: self._host_addresses[self._node_order[member]]))

    def _request(self, address: str, message: dict) -> dict:
        return request_once(address, message, token=self.token, timeout_s=120.0)

    # ------------------------------------------------------------------ one generation
    def _form_generation(self, *, resume: bool, outcome: Outcome, lost: tuple[int, ...] = (),
                         reshard: bool = False) -> None:
        """Every rank joins generation ``self.generation`` and prepares (restores when ``resume``; ``lost``: the
        ranks replaced since the last generation that trained; ``reshard``: the world shrank, every rank restores
        the universal checkpoint at its new rank). Raises :class:`CoordinatorError` when a rank reports that
        nothing can restore it."""
        if self._store is None:
            raise RuntimeError("a generation forms only within run()")
        port = self._store.port
        joins = [rank.handle.join.options(concurrency_group=TRAIN).remote(
            self.generation, self._store_host, port, self._host_addresses.get(rank.node), resume,
            index, self.world_size) for index, rank in enumerate(self._ranks)]
        joined = self.ray.get(joins, timeout=self.spec.timeout_s * 2)
        prepared = self.ray.get([rank.handle.prepare.options(concurrency_group=TRAIN).remote(resume, lost, reshard)
                                 for rank in self._ranks], timeout=self.spec.timeout_s * 4)
        errors = [p for p in prepared if p.get("error")]
        if errors:
            self.event("unrecoverable", generation=self.generation, error=errors[0]["error"])
            raise CoordinatorError(f"rank {errors[0]['rank']} cannot be restored: {errors[0]['error']}")
        if resume:
            outcome.restores.append(prepared)
            sources = sorted({str(p["source"]) for p in prepared})
            self.event("restored", generation=self.generation, step=prepared[0]["step"], sources=sources,
                       timings=_timings(joined, prepared, lost))
        self.event("generation_formed", generation=self.generation)

    def _train_until(self, steps: int, outcome: Outcome) -> list[int]:
        """Runs the training calls and watches them; returns the ranks that failed (empty when done)."""
        for rank in self._ranks:
            rank.call = rank.handle.train.options(concurrency_group=TRAIN).remote(steps)
        pending = {rank.call: index for index, rank in enumerate(self._ranks)}
        while pending:
            self._check_stop()
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=self.config.heartbeat_every_s)
            for ref in ready:
                index = pending.pop(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as error:
                    self.event("failure_detected", rank=index, how="actor died", detail=str(error).splitlines()[0])
                    return self._collect_failed(pending, {index}, outcome)
                if index == 0:
                    outcome.history += [tuple(item) for item in result["done"]]
                if result["error"] is not None:
                    self.event("failure_detected", rank=index, how="its training step failed",
                               detail=result["error"])
                    return self._collect_failed(pending, set(), outcome)
            hung = self._hung(pending)
            if hung:
                for index in hung:
                    self.event("failure_detected", rank=index, how=f"no step for {self.config.hang_timeout_s} s")
                    self.ray.kill(self._ranks[index].handle)
                return self._collect_failed(pending, set(hung), outcome)
        return []

    def _hung(self, pending: dict) -> list[int]:
        """Ranks still training whose last step is older than ``hang_timeout_s``."""
        if not pending:
            return []
        beats = {}
        for ref, index in pending.items():
            beats[index] = self._ranks[index].handle.heartbeat.options(concurrency_group=CONTROL).remote()
        hung = []
        for index, ref in beats.items():
            try:
                beat = self.ray.get(ref, timeout=5.0)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                continue  # a dead actor shows in its training call; a busy control thread is not a hang
            if beat["seconds_since"] > self.config.hang_timeout_s:
                hung.append(index)
        return hung

    def _collect_failed(self, pending: dict, dead: set[int], outcome: Outcome) -> list[int]:
        """After a first failure: aborts the survivors, waits for their training calls (keeping rank 0's finished
        steps in the history), and returns every rank whose actor is dead."""
        started = time.monotonic()
        if not self.config.elastic_wait_s:  # elastic mode may go on without them: decided in _heal
            self._launch_early(dead)
        alive = [index for index in range(len(self._ranks)) if index not in dead]
        for index in alive:
            try:
                self._ranks[index].handle.abort.options(concurrency_group=CONTROL).remote("a peer failed")
            except self.ray.exceptions.RayActorError:
                dead.add(index)
        unwind: dict[str, dict] = {}  # per survivor: how its training call came back (Worker.train)
        for ref, index in pending.items():
            try:
                result = self.ray.get(ref, timeout=self.spec.timeout_s)  # a survivor reports its failed step
                if index == 0:
                    outcome.history += [tuple(item) for item in result["done"]]
                if result.get("unwind"):
                    unwind[str(index)] = result["unwind"]
            except self.ray.exceptions.RayActorError:
                dead.add(index)
            except self.ray.exceptions.GetTimeoutError:
                pass  # still unwinding: its liveness is checked below
        for index in range(len(self._ranks)):
            if index not in dead and not self._alive(self._ranks[index].handle):
                dead.add(index)
        self.event("survivors_aborted", dead=sorted(dead), seconds=round(time.monotonic() - started, 3),
                   unwind=unwind)
        return sorted(dead)

    def _alive(self, handle: object) -> bool:
        try:
            self.ray.get(handle.heartbeat.options(concurrency_group=CONTROL).remote(), timeout=10.0)
            return True
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return False

    # ------------------------------------------------------------------ healing
    def _heal(self, dead: list[int], outcome: Outcome) -> None:
        """Replaces ``dead`` ranks (and lost nodes' snapshot processes), forms the next generation and restores.
        A rank that dies while this runs (a failure during recovery) is replaced in another round, counted as
        one more failure."""
        started = time.monotonic()
        lost = set(dead)
        reshard = False
        while True:
            self._check_stop()
            alive_nodes = {node["NodeID"] for node in self.ray.nodes() if node["Alive"]}
            wanted = {index: self._ranks[index].node if self._ranks[index].node in alive_nodes else None
                      for index in dead}
            elastic = self.config.elastic_wait_s or None
            if not elastic:  # ranks found dead after detection: their replacements (a standby, if one is ready)
                self._launch_early(set(dead))
            try:
                for index, started_rank in zip(wanted, self._start_workers(wanted, timeout_s=elastic)):
                    self._ranks[index] = started_rank
                    self.event("replaced", rank=index, node=started_rank.node, same_node=wanted[index] is not None)
            except CoordinatorError as error:
                if not elastic:
                    raise
                self._shrink(sorted(wanted), reason=str(error))
                reshard = True
            self._replace_lost_hosts(alive_nodes)
            self.generation += 1
            try:
                self._form_generation(resume=True, outcome=outcome, lost=tuple(sorted(lost)), reshard=reshard)
                break
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError,
                    self.ray.exceptions.RayTaskError) as error:
                dead = [index for index, rank in enumerate(self._ranks) if not self._alive(rank.handle)]
                lost.update(dead)
                self.failures += 1
                self.event("failure_during_recovery", generation=self.generation, dead=dead,
                           detail=str(error).splitlines()[0])
                if self.failures > self.config.max_restarts:
                    raise CoordinatorError(f"{self.failures} failures, more than max_restarts="
                                           f"{self.config.max_restarts}: giving up") from error
                if not dead:  # the others must leave the half-formed generation: abort them and form it again
                    for rank in self._ranks:
                        rank.handle.abort.options(concurrency_group=CONTROL).remote("recovery failed")
        self.event("resumed", generation=self.generation, seconds=round(time.monotonic() - started, 3))

    def _shrink(self, dead: list[int], reason: str) -> None:
        """Elastic mode: goes on without ``dead``, on the largest number of survivors that divides the global
        batch (the others are stopped), renumbered in their old order; the snapshot processes start afresh (the
        snapshots were taken at the old layout). Raises :class:`CoordinatorError` below ``min_workers``."""
        survivors = [rank for index, rank in enumerate(self._ranks) if index not in dead]
        data = self.spec.config.data
        size = next((n for n in range(len(survivors), 0, -1) if data.global_batch % (n * data.micro_batch) == 0), 0)
        if size < self.config.min_workers:
            raise CoordinatorError(f"elastic mode: {len(survivors)} ranks survive, no count from "
                                   f"min_workers={self.config.min_workers} up divides the global batch "
                                   f"{data.global_batch} into micro-batches of {data.micro_batch} ({reason})")
        for rank in survivors[size:]:
            self.ray.kill(rank.handle)
        self.event("shrunk", world_size=size, was=self.world_size, dead=dead, reason=reason)
        self._ranks, self.world_size = survivors[:size], size
        self._restart_hosts()

    def _restart_hosts(self) -> None:
        """Stops every snapshot process and starts a new one (another job name) on each node that runs ranks."""
        self._stop_hosts()
        self._hosts, self._host_addresses, self._node_order = {}, {}, []
        self.job = f"{self.job.split('-')[0]}-w{self.world_size}"
        self._place_snapshot_hosts()

    def _replace_lost_hosts(self, alive_nodes: set[str]) -> None:
        """Moves the snapshot process of every lost node to the node its ranks' replacements landed on, and has
        it rebuilt from its erasure-coding group."""
        if not self.spec.snapshot_every:
            return
        for node in [node for node in self._node_order if node not in alive_nodes]:
            index = self._node_order.index(node)
            target = next((rank.node for rank in self._ranks if rank.node not in self._node_order), None)
            if target is None:
                raise CoordinatorError(f"node {node} was lost and its ranks' replacements landed on nodes that "
                                       f"already hold ranks: give the cluster a spare node (a snapshot process and "
                                       f"its erasure-coding slot belong to one node)")
            self._node_order[index] = target
            self._hosts.pop(node, None)
            self._host_addresses.pop(node, None)
            self._start_hosts([target])
            self._announce(ec_group_of(index, self.config.ec_group_size))
            if not self.config.ec_group_size:
                continue
            try:
                reply = self._request(self._host_addresses[target], {"op": "ec_rebuild"})
                self.event("node_rebuilt", node=target, index=index, step=reply["step"], ranks=reply["ranks"])
            except (ProtocolError, SnapshotProcessLost) as error:
                self.event("node_not_rebuilt", node=target, index=index, reason=str(error))

    # ------------------------------------------------------------------ the end
    def _stop_all(self) -> None:
        self._stop_actors()
        if self._placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._placement)

    def _stop_actors(self) -> None:
        # Replacements launched but never used (the job gave up), standbys, placeholders.
        for handle in [*self._launched.values(), *(s.handle for s in self._standbys), *self._placeholders.values()]:
            self.ray.kill(handle)
        self._launched.clear()
        self._standbys.clear()
        self._placeholders.clear()
        self._adopting.clear()
        # All at once: closing a sink may be collective (a checkpoint writer agreeing on its last save), so a
        # rank asked alone would wait for the others. A worker still inside a training call (a stop, an error in
        # this process) is killed at once: its shutdown would queue behind that call.
        training = [rank.call for rank in self._ranks if rank.call is not None]
        busy = bool(training) and len(self.ray.wait(training, num_returns=len(training), timeout=0)[0]) < len(training)
        stops = [] if busy else [rank.handle.shutdown.options(concurrency_group=TRAIN).remote() for rank in self._ranks]
        for ref in stops:
            try:
                self.ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 (a dead or stuck worker: killed below anyway)
                pass
        for rank in self._ranks:
            self.ray.kill(rank.handle)
        self._stop_hosts()

    def _stop_hosts(self) -> None:
        """Stops every snapshot process (removing its segments) and its actor."""
        for host in self._hosts.values():
            try:
                self.ray.get(host.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 (its node may be gone)
                pass
            self.ray.kill(host)

    def event(self, name: str, **details: object) -> None:
        """Logs an event and appends it to the events file."""
        record = {"t": round(time.monotonic() - self._started, 3), "event": name, **details}
        self._log(f"{name} " + " ".join(f"{k}={v}" for k, v in details.items()))
        if self._on_event is not None:
            self._on_event(record)
        if self._events is not None:
            with self._events.open("a") as out:
                out.write(json.dumps(record) + "\n")


def _timings(joined: list[dict], prepared: list[dict], lost: tuple[int, ...]) -> dict[str, list[float]]:
    """Where a generation's forming went, per rank: [group_s, build_s, restore_s, attach_s], for the ranks in
    ``lost`` (keyed by rank, as text for JSON) and the slowest other rank (``"slowest other (<rank>)"``), in
    seconds rounded to ms."""
    rows = {}
    for join, prepare in zip(joined, prepared):
        rows[join["rank"]] = [round(join["group_s"], 3), round(join["build_s"], 3),
                              round(float(prepare.get("seconds", 0.0)), 3), round(prepare["attach_s"], 3)]
    kept = {rank: row for rank, row in rows.items() if rank not in lost}
    timings = {str(rank): rows[rank] for rank in lost if rank in rows}
    if kept:
        slowest = max(kept, key=lambda rank: sum(kept[rank]))
        timings[f"slowest other ({slowest})"] = kept[slowest]
    return timings


__all__ = ["Coordinator", "CoordinatorConfig", "CoordinatorError", "Outcome", "Placeholder", "SnapshotHost"]
