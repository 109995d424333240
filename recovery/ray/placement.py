"""Where the coordinator's actors go on the Ray cluster: the placement group that fixes which ranks share a node
(with ``ranks_per_node``), the resources and scheduling of a rank's worker and of an actor pinned to one node, and
which nodes are alive."""

from __future__ import annotations

import time

from regrow.recovery.ray.config import CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.events import EventLog


def alive_nodes() -> set[str]:
    """The ids of the Ray nodes alive now."""
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def pinned_to(node: str, *, soft: bool = False) -> object:
    """The scheduling strategy that puts an actor on ``node`` (``soft``: elsewhere when that node is gone)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node, soft=soft)


class Placement:
    """Places the ranks' workers. With ``ranks_per_node``: a STRICT_SPREAD placement group of one bundle per node
    (:meth:`reserve`), rank r's worker in bundle ``r // ranks_per_node``; Ray moves a lost node's bundle to another
    node, and the replacements of its ranks follow it. Otherwise a worker goes where Ray puts it, or on the node
    asked for while that node lives."""

    def __init__(self, config: CoordinatorConfig, events: EventLog) -> None:
        self._config = config
        self._events = events
        self._group: object | None = None  # the placement group, once reserved

    def reserve(self) -> None:
        """With ``ranks_per_node``: reserves one bundle per node, all on distinct nodes, and waits for them (up to
        ``resources_timeout_s``, with a message every 10 s; then :class:`CoordinatorError`). Without: nothing."""
        if not self._config.ranks_per_node:
            return
        import ray
        from ray.util.placement_group import placement_group

        per_node = self._config.ranks_per_node
        bundle = {"CPU": self._config.cpus_per_worker * per_node, "GPU": self._config.gpus_per_worker * per_node}
        bundle = {key: value for key, value in bundle.items() if value}
        self._group = placement_group([bundle] * (self._config.workers // per_node), strategy="STRICT_SPREAD")
        deadline = time.monotonic() + self._config.resources_timeout_s
        while not ray.wait([self._group.ready()], timeout=10.0)[0]:
            if time.monotonic() > deadline:
                raise CoordinatorError(f"no {self._config.workers // per_node} distinct nodes with room for "
                                       f"{per_node} workers each appeared within {self._config.resources_timeout_s}"
                                       f" s (add nodes, or lower --workers)")
            self._events.message("waiting for nodes for the placement group")

    def release(self) -> None:
        """Removes the placement group, if one was reserved."""
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)

    def worker_options(self, rank: int, node: str | None) -> dict:
        """The Ray actor options of a worker for ``rank``: its bundle when there is a placement group, else on
        ``node`` while it lives (None: anywhere)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = {"num_cpus": self._config.cpus_per_worker, "num_gpus": self._config.gpus_per_worker,
                   "max_concurrency": 2}
        if self._group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._group, placement_group_bundle_index=rank // self._config.ranks_per_node)
        elif node is not None:
            options["scheduling_strategy"] = pinned_to(node, soft=True)
        return options

    def holder_options(self, node: str) -> dict:
        """The options of an actor that claims a worker's CPUs and GPUs on ``node`` and nothing else."""
        return {"num_cpus": self._config.cpus_per_worker, "num_gpus": self._config.gpus_per_worker,
                "scheduling_strategy": pinned_to(node)}
