"""What every worker actor of a Ray-coordinated job does, whatever its rank runs (regrow's trainer: ``worker.py``;
a user's function: ``entry_worker.py``): it takes the job's environment, says where Ray placed it and how recently
it made progress, aborts its collectives on request (from its control thread), takes over a lost rank when it is a
standby, and joins and leaves the process-group generations the coordinator forms.

The subclasses add ``join``, ``prepare``, ``train`` and ``shutdown``, the calls the coordinator's parts make on every
worker (``generation.py``, ``watch.py``, ``workers.py``).
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from typing import Protocol

import torch
import torch.distributed as dist

from regrow.comm import abort
from regrow.comm.world import World, WorldConfig, destroy_world, init_world

TRAIN = "train"
CONTROL = "control"
CONCURRENCY_GROUPS = {TRAIN: 1, CONTROL: 1}


class MemberSpec(Protocol):
    """What a member reads of its job's spec (``worker.WorkerSpec``)."""

    world_size: int
    device: str
    timeout_s: float


class GroupMember:
    """One rank's actor; see the module docstring. ``env`` is added to the process's environment (the fault plan,
    the snapshot token; ``LOCAL_*`` as torchrun would set them)."""

    def __init__(self, spec: MemberSpec, rank: int, env: dict[str, str]) -> None:
        os.environ.update(env)
        self.spec = spec
        self.rank = rank
        self.world_size = spec.world_size
        self.address: str | None = None
        """The snapshot process of this worker's node, as of the generation it joined last (None: none)."""
        self._progress: tuple[int | None, float] = (0, time.monotonic())
        torch.set_num_threads(max(1, int(os.environ.get("REGROW_THREADS_PER_RANK", "1"))))
        # Everything imported so far (torch, Ray, regrow: most of the heap's objects) lives as long as the process:
        # frozen, the full collection that leaving a failed group needs (``_leave_group``) scans only what was made
        # since (the trainer, the groups), on the survivors' path to recovery.
        gc.freeze()

    # ------------------------------------------------------------------ control group
    def placement(self) -> dict:
        """Where Ray placed this actor: its node and the ids of the GPUs it was given (as text)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def heartbeat(self) -> dict:
        """The last step this rank finished (None when the worker cannot tell) and how many seconds ago."""
        step, at = self._progress
        return {"rank": self.rank, "step": step, "seconds_since": time.monotonic() - at}

    def abort(self, why: str) -> None:
        """Makes a collective blocked in the training thread return (NCCL) and records why."""
        abort.request_abort(why)

    # ------------------------------------------------------------------ train group
    def adopt(self, rank: int, gpus: list[str]) -> None:
        """A standby takes over ``rank``, on the GPUs its lost worker used (``gpus``: their ids on this node; the
        coordinator holds them in Ray's accounting). Call once, before ``join``."""
        if self.spec.device == "cuda":
            if torch.cuda.is_initialized():
                raise RuntimeError("adopt: CUDA already started in this standby; its GPU can no longer be chosen")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.rank = int(rank)

    # ------------------------------------------------------------------
    def _connect(self, generation: int, store_host: str, store_port: int) -> World:
        """Forms process-group generation ``generation`` with the other ranks, through the coordinator's store
        under the prefix ``generation-<g>`` (so a re-formed group never reads an older generation's keys), and
        clears any abort of the last one. Leave the last generation first (:meth:`_leave_group`)."""
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        store = dist.PrefixStore(f"generation-{generation}",
                                 dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout))
        world = init_world(rank=self.rank, world_size=self.world_size, store=store,
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                           config=WorldConfig(backend=self._backend(), timeout_s=self.spec.timeout_s))
        abort.clear()
        return world

    def _leave_group(self) -> None:
        """Leaves the failed generation at once. Its connections close, so that a peer blocked in a collective
        with this rank (not with the dead one) fails now too instead of at its timeout: with gloo in a ring, only
        the dead rank's neighbours see its sockets close."""
        gc.collect()  # a group's connections close only when nothing references it any more
        try:
            destroy_world()
        except (RuntimeError, ValueError):  # an aborted group may already be gone
            pass

    def _leave_after_failure(self, failed_at: float) -> dict[str, float]:
        """Leaves the failed generation (call it outside the ``except`` block that caught the failure, whose
        traceback would keep the groups alive); returns how the failure unwound: seconds from the abort request to
        the error (``error_after_abort_s``, negative when the error came first; ``failed_at`` is when it was
        caught, on the monotonic clock), of the NCCL abort call (``abort_call_s``) and of leaving (``leave_s``)."""
        leaving = time.monotonic()
        self._leave_group()
        unwind = {"leave_s": round(time.monotonic() - leaving, 3)}
        timing = abort.timing()
        if "requested_at" in timing:
            unwind["error_after_abort_s"] = round(failed_at - timing["requested_at"], 3)
        if "abort_call_s" in timing:
            unwind["abort_call_s"] = round(timing["abort_call_s"], 3)
        return unwind

    def _backend(self) -> str:
        return "gloo" if self.spec.device == "cpu" else "nccl"


def describe_failure(error: BaseException) -> str:
    """One line for a failed training call: the error's type and first line, and the abort's reason when the
    coordinator aborted this worker's collectives."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" + (f" (aborted: {abort.reason()})" if abort.requested() else "")


__all__ = ["CONCURRENCY_GROUPS", "CONTROL", "TRAIN", "GroupMember", "MemberSpec", "describe_failure"]
