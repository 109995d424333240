"""Warms a rank's GPU before it is needed: the kernels of the first training step are loaded before that step (a
Ray worker while its job forms, a standby rank of the local launcher while it waits).

A process's first step on a GPU loads every kernel it launches (CUDA loads modules lazily) and creates the cuBLAS
handles and workspaces; a replacement's restore also loads the snapshot checksum kernel (its first launch in a
new process cost about 0.8 s on the 4-GPU host, against 0.15 s for a survivor's whole read). On 2 x H200 the first step
after a restore took 0.61 s against 59 ms for a warm one (bench/RESULTS.md), the other ranks waiting in its
collectives. A worker has little else to do meanwhile: a standby adopting a lost rank waits for the survivors'
abort (about 0.7 s) and for the new process group (about 0.55 s). :func:`start` runs, on a background thread, the
checksum kernel on a small buffer, then one forward and backward of a one-block copy of the job's model at the
job's micro-batch shape and working dtype (every block has the same matrix shapes, so the same cuBLAS kernels).

Contract: best effort (an error ends it quietly and the first step pays as before); it draws from no random
generator (zero weights, a range for tokens, dropout off), so the generator state a restore sets is never
disturbed, and it touches no tensor of the trainer. The optimizer's kernels are not warmed (Triton specializes
them on the shard's size).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import torch

from regrow.checkpoint.snapshot import wordsum
from regrow.trainer.compile import backend_for, compiled_forward
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPT, GPTConfig
from regrow.trainer.pipeline.config import PipelineTrainerConfig
from regrow.trainer.zero.config import DTYPES


def start(config: TrainerConfig | PipelineTrainerConfig) -> threading.Thread:
    """Starts the warm-up of this process's GPU (``LOCAL_RANK``'s) on a daemon thread and returns it. Call once CUDA
    may start (CUDA_VISIBLE_DEVICES final), before joining the process group."""
    thread = threading.Thread(target=_warm_up, args=(config,), daemon=True, name="regrow-gpu-warm-up")
    thread.start()
    return thread


def _warm_up(config: TrainerConfig | PipelineTrainerConfig) -> None:
    try:
        warm_up_device(config, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    except Exception:  # noqa: BLE001 (CUDA not ready, memory short: nothing is lost but the head start)
        pass


def warm_up_device(config: TrainerConfig | PipelineTrainerConfig, device: torch.device, *,
                   compiled: bool = False) -> None:
    """The whole warm-up, on the calling thread: the checksum kernel, then (regrow's GPT only) one step's kernels,
    through ``torch.compile`` as the trainer will run them when ``compiled`` (see :func:`warm_up_step`). Raises
    what fails (the callers treat it as best effort)."""
    warm_up_checksum(device)
    # A pipeline stage's shapes are its own, and a factory's model is the user's (built seeded, it would draw):
    # neither is warmed.
    if isinstance(config, TrainerConfig) and isinstance(config.model, GPTConfig):
        warm_up_step(config, device, compiled=compiled)


def warm_up_checksum(device: torch.device) -> None:
    """Loads the GPU checksum kernel (a replacement's restore verifies its snapshot with it); nothing without
    triton."""
    kernels = wordsum.gpu_kernels()
    if kernels is not None:
        kernels.to_digest(kernels.digest_cuda(torch.zeros(4096, dtype=torch.uint8, device=device)))


def warm_up_step(config: TrainerConfig, device: torch.device, *, compiled: bool = False) -> None:
    """One forward and backward of ``config.model`` cut to one block, on ``device``, at the training's micro-batch,
    sequence length and working dtype (``config.optim.param_dtype``). Draws no random number.

    ``compiled``: through ``torch.compile`` per ``config.compile`` (nothing more where that compiles nothing on
    ``device``): the compiler stack is imported and the block's generated kernels land in inductor's caches, so
    that the trainer's own compile of the whole model reuses them. Only on a thread that nothing else compiles on
    at the same time (``torch.compile`` is not thread-safe): the local launcher's standby, not the background
    warm-up of :func:`start`."""
    model_config = replace(config.model, n_layer=1, dropout=0.0)
    dtype = DTYPES[config.optim.param_dtype] if config.optim.param_dtype else torch.float32
    model = GPT.uninitialized(model_config, device).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()  # uninitialized memory may hold NaNs; zeros keep every kernel on its usual path
    micro, seq = config.data.micro_batch, config.data.seq_len
    tokens = (torch.arange(micro * seq, device=device) % model_config.vocab_size).view(micro, seq)
    backend = backend_for(config.compile, device, zero_stage=config.optim.stage) if compiled else None
    forward = compiled_forward(model, backend)
    forward(tokens, tokens).backward()


__all__ = ["start", "warm_up_checksum", "warm_up_device", "warm_up_step"]
