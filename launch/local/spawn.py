"""Runs a function on N local processes that form one torch.distributed world.

The parent owns the rendezvous: it starts a ``TCPStore`` on port 0 (so no port is ever hard-coded or raced for)
and passes its port to the children, which join as clients. Every child is started with the ``spawn`` method, so
``entry`` must be importable by module path. The parent waits with a deadline; when one child fails or the deadline
passes, it kills all of them and raises with the failing child's traceback. No process outlives the call.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from regrow.comm.world import WorldConfig, destroy_world, init_world
from regrow.launch.local.warm import WarmPool


class WorkerFailed(RuntimeError):
    """A spawned rank raised or died; the message holds its traceback or exit code. ``exitcodes`` (set by
    :func:`run_local`) are the exit codes of the ranks that had already exited when the failure was seen (a
    negative code is the signal that killed the rank), before the launcher killed the rest."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.exitcodes: dict[int, int] = {}


@dataclass(frozen=True)
class _Job:
    entry: Callable[..., Any]
    args: tuple
    world_size: int
    port: int
    backend: str
    timeout_s: float
    threads: int
    env: dict[str, str]
    rank_envs: tuple[dict[str, str], ...]


def rank_child(rank: int, job: _Job, results: Connection) -> None:
    """One rank of ``job``: its environment, the process group, ``job.entry``, the result sent to the launcher."""
    # What torchrun would set: code that sizes its thread pools per rank (e.g. checkpoint.crc) reads it.
    os.environ.update({"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(job.world_size), **job.env,
                       **(job.rank_envs[rank] if job.rank_envs else {})})
    torch.set_num_threads(job.threads)
    try:
        timeout = datetime.timedelta(seconds=job.timeout_s)
        store = dist.TCPStore("127.0.0.1", job.port, job.world_size, is_master=False, timeout=timeout)
        world = init_world(rank=rank, world_size=job.world_size, local_rank=rank, store=store,
                           config=WorldConfig(backend=job.backend, timeout_s=job.timeout_s))
        try:
            value = job.entry(world, *job.args)
        finally:
            destroy_world()
        # Plain pickle copies tensors by value; the default (torch's shared-memory reduction) would need this
        # process alive until the parent has read the result.
        results.send_bytes(pickle.dumps((True, value)))
    except BaseException:
        results.send_bytes(pickle.dumps((False, traceback.format_exc())))
        raise SystemExit(1)


def run_local(
    entry: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "auto",
    timeout_s: float = 600.0,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
    rank_envs: Sequence[dict[str, str]] | None = None,
    watchdog: Callable[[list[int]], None] | None = None,
    standby: WarmPool | None = None,
) -> list[Any]:
    """Calls ``entry(world, *args)`` on ``world_size`` new processes; returns their results in rank order.

    ``entry`` must be a module-level function and its result picklable. ``env`` is added to every rank's
    environment and ``rank_envs[r]`` (if given) to rank r's, after it (e.g. each simulated node's snapshot process).
    Raises :class:`WorkerFailed` if any rank fails or the whole run exceeds ``timeout_s`` seconds. ``watchdog``
    (e.g. ``launch.watchdog.Watchdog``) is called about twice a second with the ranks still running; the
    :class:`WorkerFailed` it raises (a hung rank) stops the run like a failed rank does. ``standby``: warm processes
    (``warm.WarmPool``, one per rank) that take the ranks instead of new ones, when all of them are alive.
    """
    if world_size < 1:
        raise ValueError(f"run_local: world_size={world_size} must be >= 1")
    if rank_envs is not None and len(rank_envs) != world_size:
        raise ValueError(f"run_local: {len(rank_envs)} rank_envs for world_size={world_size}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    job = _Job(entry, args, world_size, store.port, backend, timeout_s, threads, env or {}, tuple(rank_envs or ()))
    if standby is not None and standby.world_size == world_size and standby.alive():
        procs, receivers = standby.take(job)
        print(f"[launcher] {world_size} warm standby rank(s) take over", flush=True)
    else:
        if standby is not None:
            standby.close()
            print("[launcher] a standby rank is gone: this attempt starts cold", flush=True)
        procs, receivers = _spawn(job)
    try:
        return _collect(procs, receivers, time.monotonic() + timeout_s, watchdog)
    except WorkerFailed as error:
        error.exitcodes = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode is not None}
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        for receiver in receivers:
            receiver.close()
        del store


def _spawn(job: _Job) -> tuple[list, list[Connection]]:
    """New processes for every rank of ``job``, and the connections their results arrive on."""
    ctx = mp.get_context("spawn")
    # One pipe per rank, not a multiprocessing.Queue: a Queue's named semaphores stay in /dev/shm when this process
    # is killed together with its resource tracker (a test killing a whole run's process group did exactly that).
    pipes = [ctx.Pipe(duplex=False) for _ in range(job.world_size)]
    procs = [ctx.Process(target=rank_child, args=(rank, job, pipes[rank][1]), daemon=True)
             for rank in range(job.world_size)]
    for p in procs:
        p.start()
    for _, sender in pipes:
        sender.close()  # the children hold the sending ends; EOF then means a child is gone
    return procs, [receiver for receiver, _ in pipes]


def _collect(procs: list, receivers: list[Connection], deadline: float,
             watchdog: Callable[[list[int]], None] | None = None) -> list[Any]:
    values: dict[int, Any] = {}
    pending = dict(enumerate(receivers))
    while pending:
        ready = wait(list(pending.values()), timeout=0.5)
        for receiver in ready:
            rank = next(r for r, c in pending.items() if c is receiver)
            del pending[rank]
            try:
                ok, value = pickle.loads(receiver.recv_bytes())
            except EOFError:
                procs[rank].join(timeout=5)
                raise WorkerFailed(f"rank {rank} exited with code {procs[rank].exitcode} without a result") from None
            if not ok:
                raise WorkerFailed(f"rank {rank} failed:\n{value}")
            values[rank] = value
        if pending and not ready and time.monotonic() > deadline:
            raise WorkerFailed(f"ranks {sorted(pending)} did not finish before the deadline")
        if pending and watchdog is not None:
            watchdog(sorted(pending))
    return [values[r] for r in range(len(receivers))]
