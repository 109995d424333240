"""Warm standby ranks for the local launcher: processes started ahead of need that take over the next attempt.

A restart of the local launcher used to start every rank from nothing: a new interpreter, ``import torch``,
the CUDA context, the snapshot copier (seconds before the restore even begins). :class:`WarmPool` starts one
process per rank while the current attempt runs; each runs the work's ``warm_up(local_rank)`` (imports, the CUDA
context of its device, its snapshot copier) and then waits. When an attempt fails, ``run_local`` hands the pool's
processes their rank and the new attempt's rendezvous instead of spawning, and they continue exactly as a
freshly spawned rank would (``spawn.rank_child``), only sooner.

A waiting process holds its CUDA context (and its copier's): about 1 GB of GPU memory per rank, which is the
price of ``--warm-restarts``. It exits when the launcher goes away (the end of its assignment pipe) or when the
pool is closed.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

WarmUp = Callable[[int], None]
"""``warm_up(local_rank)``: what a standby process does before it is needed (must be picklable)."""


def _standby(local_rank: int, warm_up: WarmUp | None, assignments: Connection, results: Connection) -> None:
    from regrow.launch.local.spawn import rank_child

    if warm_up is not None:
        started = time.monotonic()
        try:
            warm_up(local_rank)
            print(f"[launcher] standby for rank {local_rank} warm in {time.monotonic() - started:.1f} s", flush=True)
        except Exception as error:  # noqa: BLE001 (a standby that could not warm up still serves, cold)
            print(f"[launcher] standby for rank {local_rank}: warm-up failed ({type(error).__name__}: {error}); "
                  f"it will start cold", flush=True)
    try:
        rank, job = pickle.loads(assignments.recv_bytes())
    except (EOFError, OSError):
        return  # not needed: the run ended, or the launcher is gone
    finally:
        assignments.close()
    rank_child(rank, job, results)


class WarmPool:
    """One warm standby process per rank of the next attempt.

    Contract: construct it while an attempt runs (its processes warm up alongside); :meth:`take` gives each rank's
    process and the connection its result will arrive on, once, to ``run_local``; :meth:`close` stops processes
    never taken (always call it, e.g. when the run succeeds).
    """

    def __init__(self, world_size: int, warm_up: WarmUp | None) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._assign: list[Connection] = []
        self._results: list[Connection] = []
        self.processes = []
        for rank in range(world_size):
            assign_recv, assign_send = ctx.Pipe(duplex=False)
            result_recv, result_send = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_standby, args=(rank, warm_up, assign_recv, result_send), daemon=True,
                                  name=f"regrow-standby-{rank}")
            process.start()
            assign_recv.close()  # the standby holds these ends: EOF then means it is gone
            result_send.close()
            self._assign.append(assign_send)
            self._results.append(result_recv)
            self.processes.append(process)
        self._taken = False

    def alive(self) -> bool:
        """Every standby is still running (a dead one makes the pool unusable: the launcher spawns cold)."""
        return all(p.is_alive() for p in self.processes)

    def take(self, job) -> tuple[list, list[Connection]]:
        """Assigns rank r and ``job`` (``spawn._Job``) to standby r; returns the processes and their result
        connections, which the caller now owns (it kills and joins the processes, closes the connections)."""
        if self._taken:
            raise RuntimeError("WarmPool.take: this pool was already taken")
        self._taken = True
        for rank, assign in enumerate(self._assign):
            assign.send_bytes(pickle.dumps((rank, job)))
            assign.close()
        return self.processes, self._results

    def close(self) -> None:
        """Stops the standbys if they were never taken."""
        if self._taken:
            return
        self._taken = True
        for assign in self._assign:
            assign.close()  # a waiting standby sees EOF and exits
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for result in self._results:
            result.close()
