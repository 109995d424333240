"""Runs a function on N local processes that form one torch.distributed world.

The parent owns the rendezvous: it starts a ``TCPStore`` on port 0 (so no port is ever hard-coded or raced for)
and passes its port to the children, which join as clients. Every child is a fresh process that never touched CUDA
or a process group (:func:`rank_context`: forked from a server that has only imported torch and regrow's rank
code, or spawned), so ``entry`` must be importable by module path. The parent waits with a deadline; when one child
fails or the deadline passes, it kills all of them and raises with the failing child's traceback. No process
outlives the call.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import sys
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

PRELOAD = ("regrow.launch.local.spawn", "regrow.launch.rank")
"""What the fork server imports once for every rank it forks: torch, torch.distributed and the rank's code."""


def rank_context() -> mp.context.BaseContext:
    """How ranks start: ``forkserver`` where the platform has it, its server having imported :data:`PRELOAD` once,
    so a rank starts in milliseconds instead of paying its ~2 s of imports again (measured on 2 CPU cores: 4 ranks
    ready in 0.03 s against 3.0 s spawned); ``spawn`` elsewhere. The server imports modules only: it never
    initializes CUDA or creates a thread, so forking from it is as safe as spawning. A forked rank does not inherit
    the launcher's current environment, directory or import path (the server's are from its start):
    :func:`rank_child` sets all three from the job."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


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
    launcher_env: dict[str, str]
    """The launcher's whole environment when it started the ranks (a forked rank has the fork server's)."""
    cwd: str
    sys_path: tuple[str, ...]


class LauncherStdio:
    """The launcher's current stdout and stderr, for a rank to write to. A forked rank's own are the fork server's,
    opened when the server started (under pytest: some earlier test's capture file); unpickling this in the rank
    puts the launcher's in their place (a spawned rank already has them: the same descriptors again)."""

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        return _adopt_stdio, (reduction.DupFd(1), reduction.DupFd(2))


def _adopt_stdio(out: Any, err: Any) -> LauncherStdio:
    for target, handed in ((1, out), (2, err)):
        fd = handed.detach()
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    return LauncherStdio()


def rank_child(rank: int, job: _Job, results: Connection, stdio: LauncherStdio | None = None) -> None:
    """One rank of ``job``: the launcher's environment, directory and import path (and its stdout and stderr,
    ``stdio``, already in place), the process group, ``job.entry``, the result sent to the launcher."""
    os.environ.clear()
    # What torchrun would set: code that sizes its thread pools per rank (e.g. checkpoint.crc) reads it.
    os.environ.update({**job.launcher_env, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(job.world_size),
                       **job.env, **(job.rank_envs[rank] if job.rank_envs else {})})
    os.chdir(job.cwd)
    sys.path[:] = job.sys_path
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
    job = _Job(entry, args, world_size, store.port, backend, timeout_s, threads, env or {}, tuple(rank_envs or ()),
               launcher_env=dict(os.environ), cwd=os.getcwd(), sys_path=tuple(sys.path))
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
    ctx = rank_context()
    # One pipe per rank, not a multiprocessing.Queue: a Queue's named semaphores stay in /dev/shm when this process
    # is killed together with its resource tracker (a test killing a whole run's process group did exactly that).
    pipes = [ctx.Pipe(duplex=False) for _ in range(job.world_size)]
    procs = [ctx.Process(target=rank_child, args=(rank, job, pipes[rank][1], LauncherStdio()), daemon=True)
             for rank in range(job.world_size)]
    for p in procs:
        p.start()
    for _, sender in pipes:
        sender.close()  # the children hold the sending ends; EOF then means a child is gone
    return procs, [receiver for receiver, _ in pipes]


SETTLE_S = 2.0
"""After the first failure, how long the launcher lets the other ranks end on their own before naming the cause."""


def _root_cause(procs: list, failure: WorkerFailed) -> WorkerFailed:
    """The failure to report, once the other ranks have ended or :data:`SETTLE_S` passed: a rank killed by a signal
    when there is one (the peers that lost it fail as fast as it dies, and the first news to arrive may be theirs;
    a forked rank's exit code even comes through the fork server, a moment later), else ``failure``."""
    deadline = time.monotonic() + SETTLE_S
    while (alive := [p for p in procs if p.exitcode is None]) and (left := deadline - time.monotonic()) > 0:
        wait([p.sentinel for p in alive], timeout=left)
    killed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode is not None and p.exitcode < 0]
    if killed:
        rank, code = killed[0]
        return WorkerFailed(f"rank {rank} exited with code {code} without a result")
    return failure


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
                raise _root_cause(procs, WorkerFailed(f"rank {rank} exited with code {procs[rank].exitcode} "
                                                      f"without a result")) from None
            if not ok:
                raise _root_cause(procs, WorkerFailed(f"rank {rank} failed:\n{value}"))
            values[rank] = value
        if pending and not ready and time.monotonic() > deadline:
            raise WorkerFailed(f"ranks {sorted(pending)} did not finish before the deadline")
        if pending and watchdog is not None:
            watchdog(sorted(pending))
    return [values[r] for r in range(len(receivers))]
