"""The coordinator's settings (:class:`CoordinatorConfig`, read by every part of the coordinator) and the error
that ends a coordinated job (:class:`CoordinatorError`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from regrow.trainer.checks import require_ints


class CoordinatorError(RuntimeError):
    """The job cannot go on (resources never appeared, restarts exhausted); the message says what happened."""


@dataclass(kw_only=True)
class CoordinatorConfig:
    """Settings of :class:`~regrow.recovery.ray.coordinator.Coordinator`. Validated on construction; errors name the
    field."""

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
        if not self.elastic_wait_s >= 0 or math.isinf(self.elastic_wait_s):  # "not >=" also refuses NaN
            raise ValueError(f"CoordinatorConfig.elastic_wait_s={self.elastic_wait_s!r} must be >= 0 and finite")
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
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"CoordinatorConfig.{name}={getattr(self, name)!r} must be > 0 and finite")
        for name in ("cpus_per_worker", "gpus_per_worker"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"CoordinatorConfig.{name}={getattr(self, name)!r} must be >= 0 and finite")
