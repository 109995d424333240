"""Functions that run inside spawned ranks (importable as ``regrow.tests.dist_workers`` by child processes)."""

from __future__ import annotations

import copy
import os
import sys

import torch

from regrow.comm.world import World
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.models import GPT, GPTConfig
from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.optimizer import ZeroOptimizer


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny")).to(dtype)


def fixed_batches(steps: int, global_batch: int, seq_len: int = 32, seed: int = 1) -> list[torch.Tensor]:
    """Token batches ``[global_batch, seq_len + 1]`` per step, identical in every process."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (global_batch, seq_len + 1), generator=gen) for _ in range(steps)]


def train_zero(world: World | None, config: ZeroConfig, steps: int, global_batch: int, micro_batch: int,
               same_data_on_every_rank: bool = False) -> dict[str, torch.Tensor]:
    """Trains the tiny GPT with :class:`ZeroOptimizer` on fixed batches; returns the final parameters and, keyed
    ``state:<group>/<what>``, the full (gathered) optimizer state."""
    rank, size = (world.rank, world.world_size) if world else (0, 1)
    model = tiny_model()
    opt = ZeroOptimizer(model, config)
    local = global_batch if same_data_on_every_rank else global_batch // size
    for batch in fixed_batches(steps, global_batch):
        mine = batch if same_data_on_every_rank else batch[rank * local : (rank + 1) * local]
        accum = local // micro_batch
        for chunk in mine.split(micro_batch):
            loss = model(chunk[:, :-1], chunk[:, 1:]) / accum
            loss.backward()
        opt.step()
        opt.zero_grad()
    with opt.gathered_parameters():  # stage 3: the parameters exist only while gathered
        result = {name: p.detach().clone() for name, p in model.named_parameters()}
    for key in opt.shard_tensors():
        result[f"state:{key}"] = opt.gather_full(key)
    result["layout"] = opt.layout.to_dict()
    return result


def stage3_memory(world: World | None, steps: int) -> dict:
    """Trains a four-block tiny GPT at stage 3 (8-bit state) and records the bytes of parameters gathered: between
    steps (nothing may be), when every block's forward starts, and after the forward."""
    from regrow.trainer.zero.stage3 import find_units

    rank, size = (world.rank, world.world_size) if world else (0, 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=4))  # four blocks: the root, the block and the one prefetched
    opt = ZeroOptimizer(model, ZeroConfig(stage=3, state_bits=8, lr=1e-2, min_8bit_numel=1024))
    shards = opt._shards  # noqa: SLF001 (the test looks at what is held, nothing else exposes it)
    held = lambda: sum(shard.sharded.gathered_bytes() for shard in shards)  # noqa: E731
    units = find_units(model, ())
    in_block: list[int] = []
    for name in units.names[1:]:
        # Registered after the optimizer's own pre-hook, so it runs once the block is gathered.
        model.get_submodule(name).register_forward_pre_hook(lambda module, args: in_block.append(held()))
    between, peak = [], 0
    local = 4 // size
    for batch in fixed_batches(steps, 4):
        between.append(held())
        mine = batch[rank * local : (rank + 1) * local]
        loss = model(mine[:, :-1], mine[:, 1:])
        peak = max(peak, held())
        loss.backward()
        opt.step()
        opt.zero_grad()
    between.append(held())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"between": between, "in_block": in_block, "peak_after_forward": peak, "full_bytes": full,
            "units": list(units.names), "master_bytes": sum(s.master.numel() * 4 for s in shards)}


def train_zero_configs(world: World | None, runs: list[dict]) -> list[dict]:
    """Several :func:`train_zero` runs in one spawn (spawning costs seconds)."""
    return [train_zero(world, **run) for run in runs]


def reference_adamw(config: ZeroConfig, steps: int, global_batch: int, micro_batch: int) -> dict[str, torch.Tensor]:
    """The same training with ``torch.optim.AdamW`` on one process (the ground truth for 32-bit state)."""
    model = tiny_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas, eps=config.eps, fused=True,
    )
    accum = global_batch // micro_batch
    for batch in fixed_batches(steps, global_batch):
        for chunk in batch.split(micro_batch):
            (model(chunk[:, :-1], chunk[:, 1:]) / accum).backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        opt.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trainer_losses(world: World | None, config: TrainerConfig) -> list[float]:
    return [r.loss for r in Trainer(config, world).run()]


def trainer_resume(world: World | None, config: TrainerConfig, split_at: int) -> dict:
    """Runs ``config.steps`` straight, and again as ``split_at`` steps + restore into a fresh Trainer + the rest;
    returns both loss lists and both final parameter sets."""
    straight = Trainer(config, world)
    straight_losses = [r.loss for r in straight.run()]
    first = Trainer(config, world)
    losses = []
    while first.step < split_at:
        losses.append(first.train_step().loss)
    state = first.shard_state()
    saved = copy.deepcopy(state)
    del first
    second = Trainer(config, world)
    second.restore(saved)
    while second.step < config.steps:
        losses.append(second.train_step().loss)
    params = lambda t: {n: p.detach().clone() for n, p in t.model.named_parameters()}
    return {"straight": straight_losses, "resumed": losses,
            "straight_params": params(straight), "resumed_params": params(second)}


def collectives_roundtrip(world: World) -> dict:
    """Reduce-scatter then all-gather a known buffer; returns what this rank saw."""
    from regrow.comm import collectives

    size = world.world_size
    full = torch.arange(4 * size, dtype=torch.float32) * (world.rank + 1)
    piece = torch.empty(4)
    collectives.reduce_scatter(piece, full, group=None, timeout_s=30)
    gathered = torch.empty(4 * size)
    collectives.all_gather(gathered, piece, group=None, timeout_s=30)
    return {"piece": piece, "gathered": gathered}


def collective_with_absent_peer(world: World) -> str:
    """Rank 1 never joins the all-reduce: rank 0 must get a CollectiveTimeout, not hang."""
    import time

    from regrow.comm import collectives

    if world.rank == 1:
        time.sleep(8)
        return "absent"
    try:
        collectives.all_reduce(torch.ones(1), group=None, timeout_s=2)
    except collectives.CollectiveTimeout as error:
        return f"timeout: {error.op}"
    return "no error"


def fail_on_rank_one(world: World) -> None:
    if world.rank == 1:
        raise RuntimeError("injected failure on rank 1")


def sleep_forever(world: World) -> None:
    import time

    time.sleep(3600)


def launcher_view(world: World, key: str) -> tuple[str | None, str, bool]:
    """What a rank sees of its launcher: environment variable ``key``, the working directory, whether the
    launcher's import path is its own; and a line on stdout and stderr."""
    print(f"rank {world.rank} writes to the launcher's stdout", flush=True)
    print(f"rank {world.rank} writes to the launcher's stderr", file=sys.stderr, flush=True)
    return os.environ.get(key), os.getcwd(), "launcher-only-path" in sys.path


def parity_after_restore(world: World) -> list[tuple[str, list[int]] | None]:
    """What the parity check after a restore names on three ranks: nothing for a clean state; rank 2 for a wrong
    copy of rank 0's slice of the parameters; rank 0 for its own slice no longer its master's cast; rank 1 for a
    different step. Each case is undone before the next."""
    import dataclasses

    from regrow.launch.chaos.injector import flip_bit
    from regrow.recovery.parity import ParityConfig, ParityMonitor, StateParityError
    from regrow.trainer.data import DataConfig

    config = TrainerConfig(model=GPTConfig.preset("tiny"), data=DataConfig(seq_len=32, micro_batch=2, global_batch=6),
                           optim=ZeroConfig(stage=2, state_bits=8, min_8bit_numel=1024), steps=4, log_every=0,
                           progress=False)
    trainer = Trainer(config, world)
    trainer.train_step()
    optimizer = trainer.optimizer

    def check(state) -> tuple[str, list[int]] | None:
        try:
            ParityMonitor(ParityConfig(every=100), optimizer=optimizer, state=state, timeout_s=60, after_restore=True)
        except StateParityError as error:
            return "; ".join(d.what for d in error.found), list(error.ranks)
        finally:
            optimizer.gather_parameters()  # every rank's copy from the owners again
        return None

    found = [check(trainer.shard_state())]
    if world.rank == 2:
        flip_bit(optimizer.working_parameters_of(0)[0], 5)
    found.append(check(trainer.shard_state()))
    if world.rank == 0:
        flip_bit(optimizer.working_parameters_of(0)[0], 5)
    found.append(check(trainer.shard_state()))
    if world.rank == 0:  # an owner's own slice is what the all-gather sends (the others now hold it too)
        flip_bit(optimizer.working_parameters_of(0)[0], 5)
    optimizer.gather_parameters()
    state = trainer.shard_state()
    found.append(check(dataclasses.replace(state, step=state.step + 1) if world.rank == 1 else state))
    return found
