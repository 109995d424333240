"""Starting and stopping the torch.distributed world of one training job.

A rank calls :func:`init_world` once, before building the optimizer, and :func:`destroy_world` once at the end.
On CPU the backend is gloo; on GPU it is ``"cpu:gloo,cuda:nccl"`` so that CPU-side work (asynchronous checkpoint
saves, small control messages) has a gloo backend while tensors on the GPU go through NCCL.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(kw_only=True)
class WorldConfig:
    """How a rank joins the job's process group."""

    backend: str = "auto"
    """"auto" (gloo on CPU, "cpu:gloo,cuda:nccl" on GPU), "gloo" (CPU only) or "nccl" (GPU, with gloo for CPU)."""
    timeout_s: float = 300.0
    """Seconds a collective may block before it is reported as failed."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"WorldConfig.backend={self.backend!r} is not one of {BACKENDS}")
        if self.timeout_s <= 0:
            raise ValueError(f"WorldConfig.timeout_s={self.timeout_s} must be > 0")


@dataclass(frozen=True)
class World:
    """What a rank knows about the job after :func:`init_world`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def device_for(local_rank: int, backend: str) -> torch.device:
    """The device a rank computes on: its local GPU when the backend includes NCCL, else the CPU."""
    if backend == "gloo" or (backend == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"backend={backend!r} needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def backend_string(device: torch.device) -> str:
    """The torch.distributed backend string for a device: gloo on CPU, gloo for CPU tensors plus NCCL on GPU."""
    return "gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl"


def init_world(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    store: dist.Store | None = None,
    config: WorldConfig | None = None,
) -> World:
    """Joins the default process group and returns this rank's :class:`World`.

    With ``store`` None, rendezvous follows the ``env://`` convention that torchrun sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); otherwise ``rank`` and ``world_size`` are required.
    """
    config = config or WorldConfig()
    if store is None:
        rank = int(os.environ["RANK"]) if rank is None else rank
        world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    if rank is None or world_size is None:
        raise ValueError("init_world: rank and world_size are required when a store is given")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = device_for(local_rank, config.backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_string(device)
    timeout = datetime.timedelta(seconds=config.timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def join_world(config: WorldConfig | None = None) -> World:
    """The world of this process, for a user's own training script under any launcher: the process group a
    launcher already started (``regrow run``, ``regrow ray --entry``), torchrun's ``env://`` variables (RANK set:
    :func:`init_world`), or a single process without a process group (``python script.py``). Idempotent."""
    config = config or WorldConfig()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if "nccl" in backend \
            else torch.device("cpu")
        return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                     backend=backend)
    if "RANK" in os.environ:
        return init_world(config=config)
    device = device_for(local_rank, config.backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return World(rank=0, world_size=1, local_rank=local_rank, device=device, backend=backend_string(device))


def destroy_world() -> None:
    """Leaves the default process group; a no-op when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
