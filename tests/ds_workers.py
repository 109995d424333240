"""DeepSpeed training runs inside spawned ranks (importable as ``regrow.tests.ds_workers`` by child processes).

Every function here runs on the ranks that :func:`regrow.launch.local.spawn.run_local` starts; pass :data:`DS_ENV` as its
``env`` so that DeepSpeed picks its CPU accelerator (gloo). The process group already exists when they run, and
``deepspeed.initialize`` adopts it instead of starting its own.

All runs train the tiny GPT (seed 0) with ``torch.optim.AdamW`` (weight decay on matrices only, so two param
groups) on the same fixed batches: step k always sees batch k of :func:`fixed_batches`, whatever the world size,
and rank r takes the r-th slice of it, so the gradient is the global-batch mean at any world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from regrow.comm.world import World
from regrow.tests.dist_workers import fixed_batches, tiny_model
from regrow.trainer.models import GPT, GPTConfig

DS_ENV: dict[str, str] = {"DS_ACCELERATOR": "cpu"}
"""Environment for ranks that import DeepSpeed: its CPU accelerator (gloo, no CUDA probing)."""

GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ_LEN = 32
LR = 3e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1


def ds_config(stage: int, world_size: int, load_universal: bool = False, bf16: bool = False,
              zero_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of every run here: ZeRO ``stage`` (plus ``zero_extra`` options), the client's AdamW, no
    clipping, fp32 or bf16."""
    config: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO_BATCH * world_size),
        "zero_optimization": {"stage": stage, **(zero_extra or {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embeddings, none on norm scales (what the tests expect)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def make_engine(world: World, stage: int, load_universal: bool = False, bf16: bool = False,
                zero_extra: dict[str, Any] | None = None, model_overrides: dict[str, int] | None = None) -> Any:
    """A DeepSpeed engine around the tiny GPT (with ``model_overrides`` of its config) and ``torch.optim.AdamW``."""
    import deepspeed

    # DeepSpeed asserts that the launcher's variables exist even when the process group is already up.
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", **(model_overrides or {})))
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, eps=EPS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=ds_config(stage, world.world_size, load_universal, bf16, zero_extra))
    return engine


def train(engine: Any, world: World, steps: int, first_step: int = 0) -> list[float]:
    """Runs optimizer steps ``first_step + 1 .. first_step + steps``; returns each step's global mean loss."""
    local = GLOBAL_BATCH // world.world_size
    losses = []
    for batch in fixed_batches(first_step + steps, GLOBAL_BATCH, SEQ_LEN)[first_step:]:
        chunks = batch[world.rank * local : (world.rank + 1) * local].split(MICRO_BATCH)
        total = torch.zeros((), dtype=torch.float64)
        for chunk in chunks:
            loss = engine(chunk[:, :-1], chunk[:, 1:])
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the gradient-accumulation boundary
            total += loss.detach().double()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / (world.world_size * len(chunks)))
    return losses


def full_state(engine: Any) -> dict[str, Any]:
    """DeepSpeed's own in-memory view of the whole model, gathered with its public ``safe_get_full_*`` API (a
    collective: every rank calls it): per parameter the fp32 master and both Adam moments, and the Adam steps."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # stages 1 and 2 (stage 3 has no such links)
        # DeepSpeed links each parameter to its slice of the optimizer state once, right after the first param
        # group's first step, when the later groups have no state yet: their moments would read as "not found".
        # Linking again, now that every group has stepped, makes the getters work for all parameters.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, param in engine.module.named_parameters():
        params[name] = {
            "master": safe_get_full_fp32_param(param).clone(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").clone(),
        }
    steps = sorted({int(torch.as_tensor(s["step"]).item()) for s in zero.optimizer.state.values()})
    hyper = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} for g in zero.optimizer.param_groups]
    return {"params": params, "steps": steps, "global_steps": engine.global_steps, "hyper": hyper}


def train_and_save(world: World, stage: int, steps: int, save_dir: str, bf16: bool = False,
                   zero_extra: dict[str, Any] | None = None, model_overrides: dict[str, int] | None = None,
                   client_state: dict | None = None, gather: bool = True) -> dict[str, Any]:
    """Trains ``steps`` steps, saves a DeepSpeed checkpoint into ``save_dir``; returns the losses and, with
    ``gather``, :func:`full_state`."""
    engine = make_engine(world, stage, bf16=bf16, zero_extra=zero_extra, model_overrides=model_overrides)
    losses = train(engine, world, steps)
    engine.save_checkpoint(save_dir, client_state=client_state or {})
    return {"losses": losses, **(full_state(engine) if gather else {})}


def load_and_train(world: World, stage: int, load_dir: str, load_universal: bool, first_step: int,
                   more_steps: int, zero_extra: dict[str, Any] | None = None,
                   model_overrides: dict[str, int] | None = None) -> dict[str, Any]:
    """A fresh engine loads the checkpoint in ``load_dir`` (DeepSpeed's own layout, or the universal one with
    ``load_universal``); returns :func:`full_state` right after the load, then the losses of ``more_steps`` further
    steps (continuing the batch sequence after ``first_step``) and the engine's step count at the end."""
    engine = make_engine(world, stage, load_universal, zero_extra=zero_extra, model_overrides=model_overrides)
    path, _ = engine.load_checkpoint(load_dir)
    if path is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {load_dir}")
    loaded = full_state(engine)
    losses = train(engine, world, more_steps, first_step)
    return {"loaded": loaded, "losses": losses, "global_steps": engine.global_steps}


def run_all(world: World, runs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several runs in one spawn (starting ranks and importing DeepSpeed costs seconds): each item is
    ``("train_and_save" | "load_and_train", kwargs)``; one fresh engine per run."""
    functions = {"train_and_save": train_and_save, "load_and_train": load_and_train}
    return [functions[name](world, **kwargs) for name, kwargs in runs]


def reference_adamw(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same training with plain ``torch.optim.AdamW`` on one process, no DeepSpeed (a semantic reference)."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, eps=EPS)
    accum = GLOBAL_BATCH // MICRO_BATCH
    for batch in fixed_batches(steps, GLOBAL_BATCH, SEQ_LEN):
        for chunk in batch.split(MICRO_BATCH):
            (model(chunk[:, :-1], chunk[:, 1:]) / accum).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer
