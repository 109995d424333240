"""Functions that run inside spawned ranks for the pipeline and neighbour-recovery tests
(importable as ``regrow.tests.pipeline_workers`` by child processes), and the single-process references."""

from __future__ import annotations

import torch

from regrow.comm import collectives
from regrow.comm.world import World
from regrow.trainer.data import DataConfig, Sampler
from regrow.trainer.loop import learning_rate
from regrow.trainer.models import GPT
from regrow.trainer.pipeline.trainer import PipelineTrainer, PipelineTrainerConfig


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
    return {"stage": trainer.stage, "dp": trainer.dp, "losses": losses, "grads": grads, "params": params}


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
