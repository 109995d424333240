"""Standby workers: ``Worker`` actors started ahead of need on every node that runs ranks, claiming none of its CPUs
or GPUs, each ready to take over a rank lost on its node (``Worker.adopt``, on the lost worker's GPUs) sooner than a
new actor could start; and the :class:`Placeholder` actors that hold such a rank's resources in Ray's accounting
while its standby trains on them."""

from __future__ import annotations

from dataclasses import dataclass

from regrow.recovery.ray.config import CoordinatorConfig
from regrow.recovery.ray.events import EventLog
from regrow.recovery.ray.placement import Placement, pinned_to
from regrow.recovery.ray.worker import CONTROL, TRAIN, WorkerSpec


class Placeholder:
    """An idle Ray actor that holds a lost worker's CPUs and GPUs in Ray's accounting while a standby, which claimed
    none, trains on them. It has nothing to do: the coordinator only creates and kills it."""


@dataclass
class _Standby:
    handle: object
    node: str
    placed: object  # the ObjectRef of its placement() call: ready once the standby is up


class Standbys:
    """The standbys of one job, named ``regrow-standby-<job>-<n>`` in Ray (its dashboard and state API show them as
    such), and the placeholders of the ranks they took over. ``worker_class``: the ``Worker`` actor class, made
    with ``ray.remote``; ``env``: the workers' environment."""

    def __init__(self, *, config: CoordinatorConfig, spec: WorkerSpec, env: dict[str, str], job: str,
                 worker_class: object, placement: Placement, events: EventLog) -> None:
        import ray

        self._ray = ray
        self._spec = spec
        self._env = env
        self._job = job
        self._worker_class = worker_class
        self._placement = placement
        self._events = events
        self._standbys: list[_Standby] = []
        self._placeholders: dict[int, object] = {}  # rank -> the actor holding its lost worker's resources
        self._adopting: dict[int, object] = {}  # rank -> the ObjectRef of the adopt() call of its standby
        self._started = 0  # standbys started so far: the <n> of their names

    def start(self, nodes: list[str]) -> None:
        """Starts a standby on each of ``nodes`` (not waited for)."""
        for node in nodes:
            self._started += 1
            handle = self._worker_class.options(
                name=f"regrow-standby-{self._job}-{self._started}", num_cpus=0, num_gpus=0, max_concurrency=2,
                scheduling_strategy=pinned_to(node),
            ).remote(self._spec, -1, self._env, standby=True)
            self._standbys.append(_Standby(handle=handle, node=node,
                                           placed=handle.placement.options(concurrency_group=CONTROL).remote()))

    def any_started(self) -> bool:
        """Whether any standby is up or starting."""
        return bool(self._standbys)

    def take_over(self, rank: int, node: str, gpus: tuple[str, ...]) -> object | None:
        """Has a standby ready on ``node`` adopt ``rank`` on ``gpus`` (the lost worker's) and returns its handle;
        a placeholder then holds those GPUs in Ray's accounting and a new standby starts on ``node``. None when no
        standby is ready there. The adoption is confirmed by :meth:`adopted`."""
        standby = next((s for s in self._standbys if s.node == node and self._ray.wait([s.placed], timeout=0)[0]),
                       None)
        if standby is None:
            return None
        self._standbys.remove(standby)
        self._adopting[rank] = standby.handle.adopt.options(concurrency_group=TRAIN).remote(rank, list(gpus))
        self._events.event("standby_adopted", rank=rank, node=node, gpus=list(gpus))
        if rank not in self._placeholders:  # else the placeholder of its earlier loss still holds them
            self._placeholders[rank] = self._ray.remote(Placeholder).options(
                **self._placement.holder_options(node)).remote()
        self.start([node])
        return standby.handle

    def adopted(self, rank: int, handle: object) -> bool:
        """Whether the standby given ``rank`` took it (True when ``handle`` is no standby); a standby that failed
        to is killed."""
        adopting = self._adopting.pop(rank, None)
        if adopting is None:
            return True
        try:
            self._ray.get(adopting, timeout=60)
            return True
        except Exception as error:  # noqa: BLE001 (its reason goes to the events; a new worker takes the rank)
            self._events.event("standby_failed", rank=rank, error=str(error).splitlines()[0])
            self._ray.kill(handle)
            return False

    def free(self, rank: int) -> None:
        """Kills the placeholder holding ``rank``'s resources, if any: a new worker for ``rank`` is to claim them."""
        holder = self._placeholders.pop(rank, None)
        if holder is not None:
            self._ray.kill(holder)

    def stop(self) -> None:
        """Kills every standby and placeholder."""
        for handle in [*(s.handle for s in self._standbys), *self._placeholders.values()]:
            self._ray.kill(handle)
        self._standbys.clear()
        self._placeholders.clear()
        self._adopting.clear()
