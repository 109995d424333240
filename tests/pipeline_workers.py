"""Functions that run inside spawned ranks for the pipeline and neighbour-recovery tests
(importable as ``regrow.tests.pipeline_workers`` by child processes), and the single-process references."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.comm import collectives
from regrow.comm.world import World
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.trainer.data import DataConfig, Sampler
from regrow.trainer.loop import Trainer, learning_rate
from regrow.trainer.models import GPT
from regrow.trainer.pipeline.trainer import PipelineTrainer, PipelineTrainerConfig
from regrow.trainer.zero.shard import MASTER, shard_key


def _global(trainer: PipelineTrainer, local: str) -> str:
    """The full model's name of a local parameter; the head's copy of the tied embedding is told apart."""
    return "wte.weight@head" if local == "lm_head.weight" else trainer.module.global_names()[local]


def pipeline_equivalence(world: World, config: PipelineTrainerConfig) -> dict:
    """Trains ``config.train.steps`` steps; returns every step's loss, the first step's data-parallel mean gradients
    (after the tied copies are summed, before clipping) and the final parameters, by full-model name."""
    trainer = PipelineTrainer(config, world)
    losses, grads = [], {}
    names = [local for local, _ in trainer.module.named_parameters()]

    def reduced() -> None:  # ZeRO-2: no full gradient is kept; read the first step's from the reduced shards
        if not grads:
            grads.update({_global(trainer, local): trainer.optimizer.reduced_gradient(local) for local in names})

    if config.train.optim.stage == 2:
        trainer.optimizer.register_reduced_hook(reduced)  # after the tied copies' sum, registered first
    for step in range(config.train.steps):
        loss_sum = trainer.forward_backward()
        if step == 0 and config.train.optim.stage == 1:
            for local, param in trainer.module.named_parameters():
                mean = param.grad.detach().clone()
                collectives.all_reduce(mean, group=trainer.groups.dp, timeout_s=60)
                grads[_global(trainer, local)] = mean / trainer.dp_size
        losses.append(trainer.apply_step(loss_sum).loss)
    params = {_global(trainer, n): p.detach().clone() for n, p in trainer.module.named_parameters()}
    return {"stage": trainer.stage, "dp": trainer.dp, "losses": losses, "grads": grads, "params": params,
            "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def reference_run(config: PipelineTrainerConfig) -> dict:
    """The same training on one process: the whole GPT, the whole global batch, ``torch.optim.AdamW``, clipping by
    ``clip_grad_norm_``. Returns the losses, the first step's gradients and the final parameters."""
    train = config.train
    torch.manual_seed(train.seed)
    model = GPT(train.model)
    optim = train.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=optim.lr, betas=optim.betas, eps=optim.eps)
    data = train.data
    whole = DataConfig(seq_len=data.seq_len, micro_batch=data.global_batch, global_batch=data.global_batch,
                       seed=data.seed, val_fraction=data.val_fraction)
    sampler = Sampler(whole, dp_rank=0, dp_size=1)
    losses, grads = [], {}
    for step in range(1, train.steps + 1):
        x, y = sampler.next_micro_batch()
        loss = model(x, y)
        loss.backward()
        if step == 1:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = learning_rate(train, step)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def neighbor_recovery_run(world: World, config: PipelineTrainerConfig, failures: dict[int, int],
                          baseline: bool) -> dict:
    """Trains ``config.train.steps`` steps; after step ``k`` in ``failures`` stage ``failures[k]`` is lost (its
    weights and optimizer state wiped in place) and rebuilt through :func:`recover_stage` with snapshots off.

    Returns this rank's losses (and, with ``baseline``, those of the same run without failures), and per failure the
    weights and gradient norm every surviving stage had at that step and the lost stage's rebuilt weights."""
    from regrow.recovery.order import Availability
    from regrow.recovery.stage_heal import recover_stage

    baseline_losses = [r.loss for r in PipelineTrainer(config, world).run()] if baseline else []
    trainer = PipelineTrainer(config, world)
    losses, events = [], []
    while trainer.step < config.train.steps:
        if trainer.step in failures:
            lost = failures[trainer.step]
            event = {"step": trainer.step, "lost": lost, "norm": trainer.stage_grad_norm,
                     "weights": trainer.stage_weights() if trainer.stage != lost else None}
            if trainer.stage == lost:
                trainer.forget()
            available = Availability(lost_stage=lost, pp_size=trainer.n_stages, lost_stages=frozenset({lost}),
                                     checkfree_plus=config.pipeline.checkfree_plus, snapshots_enabled=False)
            event["source"] = recover_stage(trainer, available).source.value
            if trainer.stage == lost:
                event["rebuilt"] = trainer.stage_weights()
                event["lr_scale"] = trainer.lr_scale
            events.append(event)
        losses.append(trainer.train_step().loss)
    params = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    return {"stage": trainer.stage, "dp": trainer.dp, "losses": losses, "baseline": baseline_losses,
            "events": events, "optimizer_steps": trainer.optimizer.step_count, "params": params}


def _at_layout(world: World, config: PipelineTrainerConfig, stages: int, zero: int) -> PipelineTrainer | Trainer:
    """A trainer of ``config``'s run at ``stages`` pipeline stages (1: the data-parallel ``Trainer``, no pipeline)
    and ZeRO stage ``zero``."""
    train = dataclasses.replace(config.train, optim=dataclasses.replace(config.train.optim, stage=zero))
    if stages == 1:
        return Trainer(train, world)
    return PipelineTrainer(dataclasses.replace(config, train=train,
                                               pipeline=dataclasses.replace(config.pipeline, stages=stages)), world)


def _masters_of(trainer: PipelineTrainer | Trainer) -> dict[str, torch.Tensor]:
    """The fp32 master weights of this rank's model or stage, by full-model name (the head's copy of the tie told
    apart); at ZeRO-3 too, where no rank holds whole working parameters. Collective over the optimizer's group."""
    optimizer = trainer.optimizer
    name = (lambda local: local) if isinstance(trainer, Trainer) else (lambda local: _global(trainer, local))
    masters = {}
    for group in optimizer.layout.groups:
        full = optimizer.gather_full(shard_key(group.kind.name, MASTER))
        for slot in group.params:
            masters[name(slot.name)] = full[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
    return masters


def _save_now(trainer: PipelineTrainer | Trainer, world: World, root: Path) -> None:
    """Saves a universal checkpoint of ``trainer``'s current state under ``root`` and waits until it is committed
    (a barrier after the writer's close: rank 0 commits after the other ranks' parts are written)."""
    writer = CheckpointWriter(WriterConfig(root=str(root), save_every=0, fsync=False, log=False), rank=world.rank,
                              world_size=world.world_size, run_config=trainer.run_config(), timeout_s=60)
    writer.save(trainer.shard_state())
    writer.close()
    torch.distributed.barrier()


def universal_moves(world: World, config: PipelineTrainerConfig, root: str, layouts: list[tuple[int, int]],
                    steps_after: int) -> dict:
    """Trains ``config.train.steps`` steps at ``layouts[0]`` (pipeline stages, ZeRO stage), saves a universal
    checkpoint under ``root/0`` and trains ``steps_after`` more (the uninterrupted run). Then for each next layout:
    a new trainer restores the previous layout's checkpoint, saves it again at once under ``root/<i>`` (so the
    next layout loads what this one wrote) and trains ``steps_after`` steps. Returns the losses and this rank's
    final master weights of the uninterrupted run and of every move."""
    first = _at_layout(world, config, *layouts[0])
    for _ in range(config.train.steps):
        first.train_step()
    _save_now(first, world, Path(root) / "0")
    runs = [{"layout": layouts[0], "losses": [first.train_step().loss for _ in range(steps_after)],
             "masters": _masters_of(first)}]
    for index, layout in enumerate(layouts[1:], 1):
        trainer = _at_layout(world, config, *layout)
        report = restore_trainer(trainer, "latest", root=Path(root) / str(index - 1))
        _save_now(trainer, world, Path(root) / str(index))
        runs.append({"layout": layout, "step": report.step, "losses": [trainer.train_step().loss
                                                                        for _ in range(steps_after)],
                     "masters": _masters_of(trainer)})
    return {"rank": world.rank, "runs": runs}


def save_pipeline_checkpoint(world: World, config: PipelineTrainerConfig, root: str) -> int:
    """Trains ``config.train.steps`` steps of the pipeline and saves a universal checkpoint under ``root``; returns
    the step saved."""
    trainer = PipelineTrainer(config, world)
    for _ in range(config.train.steps):
        trainer.train_step()
    _save_now(trainer, world, Path(root))
    return trainer.step
