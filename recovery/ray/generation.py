"""Forming a process-group generation: every rank's worker joins generation g through the coordinator's TCP store
(under the prefix ``generation-g``, so a re-formed group never reads an older generation's keys), then prepares
(restores, when the job resumes); the ``restored`` event says where each rank's state came from and where the time
went."""

from __future__ import annotations

import torch.distributed as dist

from regrow.recovery.ray.config import CoordinatorError
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.job import JobState, Outcome
from regrow.recovery.ray.snapshot_hosts import SnapshotHosts
from regrow.recovery.ray.worker import TRAIN, WorkerSpec


class Generations:
    """Forms ``job``'s generations over a TCP store that this process holds for the time of a run (:meth:`open`
    to :meth:`close`); the workers must be able to reach this process's address."""

    def __init__(self, *, spec: WorkerSpec, job: JobState, hosts: SnapshotHosts, events: EventLog) -> None:
        import ray

        self._ray = ray
        self._spec = spec
        self._job = job
        self._hosts = hosts
        self._events = events
        self._store_host = ray.util.get_node_ip_address()
        self._store: dist.TCPStore | None = None

    def open(self) -> None:
        """Starts the store's server, on a free port."""
        self._store = dist.TCPStore(self._store_host, 0, is_master=True, wait_for_workers=False)

    def close(self) -> None:
        """Drops the store: its server (a thread and a port) stops with its last reference."""
        self._store = None

    def form(self, *, resume: bool, outcome: Outcome, lost: tuple[int, ...] = (), reshard: bool = False) -> None:
        """Every rank joins generation ``job.generation`` and prepares (restores when ``resume``; ``lost``: the
        ranks replaced since the last generation that trained; ``reshard``: the world shrank, every rank restores
        the universal checkpoint at its new rank). Raises :class:`CoordinatorError` when a rank reports that
        nothing can restore it; a worker's death or a timeout raises Ray's error."""
        if self._store is None:
            raise RuntimeError("a generation forms only within run()")
        port, generation, ranks = self._store.port, self._job.generation, self._job.ranks
        joins = [rank.handle.join.options(concurrency_group=TRAIN).remote(
            generation, self._store_host, port, self._hosts.address(rank.node), resume, index, self._job.world_size)
            for index, rank in enumerate(ranks)]
        joined = self._ray.get(joins, timeout=self._spec.timeout_s * 2)
        prepared = self._ray.get([rank.handle.prepare.options(concurrency_group=TRAIN).remote(resume, lost, reshard)
                                  for rank in ranks], timeout=self._spec.timeout_s * 4)
        errors = [p for p in prepared if p.get("error")]
        if errors:
            self._events.event("unrecoverable", generation=generation, error=errors[0]["error"])
            raise CoordinatorError(f"rank {errors[0]['rank']} cannot be restored: {errors[0]['error']}")
        if resume and self._spec.entry is None:  # an entry point's Guard restores inside the function
            outcome.restores.append(prepared)
            sources = sorted({str(p["source"]) for p in prepared})
            self._events.event("restored", generation=generation, step=prepared[0]["step"], sources=sources,
                               timings=_timings(joined, prepared, lost))
        self._events.event("generation_formed", generation=generation)


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
