"""Pipeline-parallel training: the GPT cut into S stages, scheduled 1F1B over micro-batches, on a DP x PP grid.

Rank ``r`` of ``world_size`` holds stage ``pp = r % S`` of data-parallel replica ``dp = r // S``
(``comm.topology``). Each stage is a :class:`~regrow.trainer.models.GPTStage` (its blocks; the embedding on the first
stage, the final norm and LM head on the last) with its own :class:`ZeroOptimizer` sharded over the stage's
data-parallel group. Activations and their gradients travel point-to-point between neighbouring stages of a replica
(``p2p.py``) in the order ``schedule.py`` computes. Gradient clipping uses the global norm (each
stage's squared norm summed over the pipeline); the tied embedding/head copies are summed as in
``shared.py`` (at ZeRO stage 2, after the reduction). See docs/pipeline.md.

One step, top to bottom (:meth:`PipelineTrainer.train_step`): every rank draws its replica's micro-batches, runs its
schedule (forward: receive or embed, blocks, send or loss; backward: receive or loss, backward, send), waits for
its sends, sums shared gradients, then the mean loss is all-reduced and the ZeRO step (with the global norm) runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from typing import Sequence

import numpy as np
import torch

from regrow.comm import collectives
from regrow.comm.topology import Topology
from regrow.comm.world import World
from regrow.trainer import sink_calls
from regrow.trainer.boundary import RewindableStep
from regrow.trainer.checkpoint_view import VIEW_KEY, CheckpointView, StageRecord
from regrow.trainer.compile import backend_for
from regrow.trainer.data import DataCursor, Sampler
from regrow.trainer.log import log_line
from regrow.trainer.loop import NonFiniteLossError, StepResult, agree_lineage, learning_rate
from regrow.trainer.models import GPT, GPTStage, stage_blocks
from regrow.trainer.pipeline.config import PipelineConfig, PipelineTrainerConfig
from regrow.trainer.pipeline.groups import PipelineGroups, create_groups
from regrow.trainer.pipeline.p2p import Transfers, activation_tag, gradient_tag
from regrow.trainer.pipeline.schedule import FORWARD, build_schedule, routes
from regrow.trainer.pipeline.shared import (
    norm_skip,
    shared_params,
    stage_roles,
    sum_shared_grads,
    sum_shared_reduced_grads,
)
from regrow.trainer.pipeline.view import stage_view, whole_model_shapes
from regrow.trainer.restorable import OptimizerBackedRestore
from regrow.trainer.state import RngState, ShardState, StateSink, optimizer_tensors
from regrow.trainer.zero.optimizer import ZeroOptimizer
from regrow.trainer.zero.shard import MASTER, shard_key

__all__ = ["PipelineConfig", "PipelineTrainer", "PipelineTrainerConfig"]


class PipelineTrainer(RewindableStep, OptimizerBackedRestore):
    """Trains one stage of one data-parallel replica; every rank of the world constructs one with the same config.

    Contract: construct on every rank after :func:`~regrow.comm.world.init_world` (it creates process groups, a
    collective); call :meth:`train_step` (or :meth:`run`) the same number of times on every rank. For recovery it
    exposes :meth:`stage_weights` (collective over the stage's DP group), :attr:`stage_grad_norm` (this stage's
    gradient norm after clipping, of the last step) and :meth:`rebuild` (fresh optimizer from given weights).
    """

    Config = PipelineTrainerConfig

    def __init__(self, config: PipelineTrainerConfig, world: World, sinks: Sequence[StateSink] = ()) -> None:
        self.config = config
        self.n_stages = config.pipeline.stages
        self.n_micro = config.micro_batches(world.world_size)
        self.topology = Topology(world.world_size, pp_size=self.n_stages)
        coord = self.topology.coord(world.rank)
        self.rank, self.stage, self.dp = world.rank, coord.pp, coord.dp
        self.world_size = world.world_size
        self.initialized = True  # a stage is always built from the seed (see Trainer.initialized)
        self.dp_size = self.topology.dp_size
        self.device = world.device
        self.sinks = list(sinks)
        self.timeout_s = config.pipeline.timeout_s
        self.shared = shared_params(self.n_stages, config.pipeline.checkfree_plus)
        self.groups = self._create_groups()
        self.paths = routes(self.n_stages, self.n_micro, swap_odd=config.pipeline.checkfree_plus)
        self.actions = build_schedule(self.paths)[self.stage]
        self.sampler = Sampler(config.train.data, dp_rank=self.dp, dp_size=self.dp_size)
        self.module = self.build_stage()
        self.optimizer = self._new_optimizer()
        self.lr_scale = 1.0
        self.step = 0
        self.tokens_seen = 0
        self.stage_grad_norm = float("nan")
        self.history: list[StepResult] = []
        self.lineage = ""
        """As ``Trainer.lineage``: which history of training states this stage's states belong to."""

    # ---------------------------------------------------------------- set-up
    def build_stage(self) -> GPTStage:
        """This rank's stage cut from the GPT built from ``train.seed`` (every stage starts where the whole model
        does), blocks compiled per ``train.compile``; per-rank Python and NumPy seeds as ``Trainer.build_model``."""
        train = self.config.train
        torch.manual_seed(train.seed)
        per_rank = train.seed * 1_000_003 + self.rank
        random.seed(per_rank)
        np.random.seed(per_rank % 2**32)
        embed, head = stage_roles(self.n_stages, self.stage, self.config.pipeline.checkfree_plus)
        blocks = stage_blocks(train.model.n_layer, self.n_stages, self.stage)
        stage = GPTStage.from_gpt(GPT(train.model), blocks, embed=embed, head=head).to(self.device)
        return stage.compiled(backend_for(train.compile, self.device, zero_stage=train.optim.stage))

    def _create_groups(self) -> PipelineGroups:
        group_timeout = max(self.timeout_s, self.config.train.optim.timeout_s)
        return create_groups(self.topology, self.rank, self.shared, group_timeout)

    def rejoin(self, world: World) -> None:
        """Takes this stage, its state untouched, into a re-formed world (the next process-group generation after
        a peer's failure): the same rank and grid, new groups. Collective over the world, like the constructor,
        which the replacements run meanwhile."""
        if (world.rank, world.world_size) != (self.rank, self.topology.world_size):
            raise ValueError(f"PipelineTrainer.rejoin: the world is rank {world.rank} of {world.world_size}, this "
                             f"stage was built as rank {self.rank} of {self.topology.world_size}")
        self.groups = self._create_groups()
        self.optimizer.rebind_groups(self.groups.dp, self.groups.pp if self.n_stages > 1 else None)

    def release_groups(self) -> None:
        """Drops this stage's references to its process groups after a failure, so that destroying the failed
        generation closes their connections at once (gloo: a peer blocked in a collective with this rank then
        fails too, instead of at its timeout). :meth:`rejoin` makes new ones."""
        self.groups = None
        self.optimizer.release_groups()

    def _new_optimizer(self) -> ZeroOptimizer:
        optimizer = ZeroOptimizer(self.module, self.config.train.optim, group=self.groups.dp,
                                  norm_group=self.groups.pp if self.n_stages > 1 else None,
                                  norm_skip=norm_skip(self.shared, self.stage))
        if self._sums_after_reduction:
            optimizer.register_reduced_hook(lambda: sum_shared_reduced_grads(
                optimizer, self.stage, self.shared, self.groups.shared, self.timeout_s))
        sink_calls.hook_sinks(optimizer, lambda: self.sinks)
        return optimizer

    @property
    def _sums_after_reduction(self) -> bool:
        """ZeRO stage 2 reduces gradients during the backward: the tied copies are summed after the reduction."""
        return self.config.train.optim.stage >= 2

    def _rank_of(self, stage: int) -> int:
        return self.topology.rank_of(dp=self.dp, pp=stage)

    # ---------------------------------------------------------------- one step
    def train_step(self) -> StepResult:
        """One optimizer step: the schedule over this replica's micro-batches, the NaN check, the update, the sinks."""
        started = time.perf_counter()
        self._begin_step()
        loss_sum = self.forward_backward()
        return self.apply_step(loss_sum, started)

    def forward_backward(self) -> torch.Tensor:
        """Runs this stage's 1F1B actions for one step and sums the shared copies' gradients.

        Returns this stage's part of the loss (the sum of ``loss / n_micro`` over the micro-batches it ended; zero on
        stages that end none). Call once per step on every rank, then :meth:`apply_step`.
        """
        batches = [self.sampler.next_micro_batch() for _ in range(self.n_micro)]
        transfers = Transfers(self.groups.pp, self.timeout_s)
        live: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for action in self.actions:
            if action.kind == FORWARD:
                live[action.micro] = self._forward(action.micro, batches[action.micro], transfers)
                if self._position(action.micro) == self.n_stages - 1:
                    loss_sum += live[action.micro][1].detach()
            else:
                self._backward(action.micro, *live.pop(action.micro), transfers)
        transfers.wait_sends()
        if not self._sums_after_reduction:
            sum_shared_grads(self.module, self.stage, self.shared, self.groups.shared, self.timeout_s)
        return loss_sum

    def _position(self, micro: int) -> int:
        return self.paths[micro].index(self.stage)

    def _forward(
        self, micro: int, batch: tuple[torch.Tensor, torch.Tensor], transfers: Transfers
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(input that needs a gradient or None, output or scaled loss)`` for the backward."""
        path, p = self.paths[micro], self._position(micro)
        x, y = batch
        if p == 0:
            h_in, h = None, self.module.embed_tokens(x.to(self.device))
        else:
            shape = (x.shape[0], x.shape[1], self.config.train.model.d_model)
            buffer = torch.empty(shape, dtype=self.optimizer.param_dtype, device=self.device)
            h_in = transfers.recv(buffer, self._rank_of(path[p - 1]), activation_tag(micro)).requires_grad_()
            h = h_in
        out = self.module.run_blocks(h)
        if p == self.n_stages - 1:
            return h_in, self.module.head_loss(out, y.to(self.device)) / self.n_micro
        transfers.send(out.detach(), self._rank_of(path[p + 1]), activation_tag(micro))
        return h_in, out

    def _backward(self, micro: int, h_in: torch.Tensor | None, out: torch.Tensor, transfers: Transfers) -> None:
        path, p = self.paths[micro], self._position(micro)
        if p == self.n_stages - 1:
            out.backward()
        else:
            grad = transfers.recv(torch.empty_like(out), self._rank_of(path[p + 1]), gradient_tag(micro))
            out.backward(grad)
        if h_in is not None:
            transfers.send(h_in.grad, self._rank_of(path[p - 1]), gradient_tag(micro))

    def apply_step(self, loss_sum: torch.Tensor, started: float | None = None) -> StepResult:
        """The mean loss over the pipeline and replicas (all ranks get it), the NaN check, the optimizer step."""
        started = time.perf_counter() if started is None else started
        step = self.step + 1
        # Stages that ended no micro-batch contribute 0, so one sum over the world is every replica's loss, summed.
        total = loss_sum.clone()
        collectives.all_reduce(total, group=None, timeout_s=self.timeout_s)
        loss = total.item() / self.dp_size
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, loss)
        lr = learning_rate(self.config.train, step) * self.lr_scale
        self.optimizer.set_lr(lr)
        self.optimizer.step()  # the sinks are called from its hooks (sink_calls.hook_sinks)
        self.optimizer.zero_grad()
        self.stage_grad_norm = self.optimizer.last_group_grad_norm * self.optimizer.last_clip_coefficient
        self.step = step
        tokens = self.config.train.data.global_batch * self.config.train.data.seq_len
        self.tokens_seen += tokens
        sink_calls.after_step(self.sinks, self.shard_state)
        return StepResult(step, loss, lr, self.optimizer.last_grad_norm, tokens / (time.perf_counter() - started))

    def run(self) -> list[StepResult]:
        """Trains until ``train.steps``; rank 0 logs every ``train.log_every`` steps. Returns (and keeps) results."""
        every = self.config.train.log_every
        try:
            while self.step < self.config.train.steps:
                result = self.train_step()
                self.history.append(result)
                if self.rank == 0 and every and (result.step % every == 0 or result.step == self.config.train.steps):
                    log_line(self.rank, result.step, f"loss {result.loss:.4f} lr {result.lr:.2e} "
                             f"grad_norm {result.grad_norm:.3f} tokens/s {result.tokens_per_s:,.0f}")
        finally:
            sink_calls.close(self.sinks)
        return self.history

    # ---------------------------------------------------------------- state and recovery
    def checkpoint_view(self, *, whole_model: bool = True) -> CheckpointView:
        """This stage's map onto a universal checkpoint (``pipeline/view.py``); ``whole_model``: the GPT's shapes too."""
        record = StageRecord(stage=self.stage, stages=self.n_stages, dp_size=self.dp_size,
                             optimizer_steps=self.optimizer.step_count, lr_scale=self.lr_scale)
        return stage_view(self.module, self.shared, record, shard_rank=self.optimizer.rank,
                          model=whole_model_shapes(self.config.train.model) if whole_model else None)

    def shard_state(self) -> ShardState:
        """This rank's shard at the current step boundary; ``extra`` records the stage, its learning-rate scale, the
        optimizer's step count (which a neighbour rebuild resets) and the stage's :meth:`checkpoint_view`."""
        return ShardState(
            step=self.step, tensors=self.optimizer.shard_tensors(), layout=self.optimizer.layout.to_dict(),
            rank=self.rank, rng=RngState.capture(), data_cursor=self.sampler.state().to_dict(),
            tokens_seen=self.tokens_seen,
            extra={"pp_stage": self.stage, "pp_size": self.n_stages, "lr_scale": self.lr_scale,
                   "optimizer_steps": self.optimizer.step_count, "lineage": self.lineage,
                   VIEW_KEY: self.checkpoint_view(whole_model=False).to_dict()},
        )

    def run_config(self) -> dict:
        """The config as a dict (``state.Restorable``)."""
        return dataclasses.asdict(self.config)

    def reset_to_initial_state(self) -> None:
        """This stage's seeded initial state, a new optimizer, step 0 of the data (``state.Restorable``)."""
        self.module = self.build_stage()
        self.optimizer = self._new_optimizer()
        self.sampler.load_state(DataCursor(epoch=0, index=0))
        self.step, self.tokens_seen, self.lr_scale, self._boundary = 0, 0, 1.0, None
        self.stage_grad_norm = float("nan")

    def start_lineage(self) -> str:
        """As ``Trainer.start_lineage``: a new lineage id agreed by every rank of every stage. Collective over the
        whole world; call on every rank once the job has restored, before the next step."""
        self.lineage = agree_lineage(self.world_size, self.timeout_s)
        return self.lineage

    def restore(self, state: ShardState) -> None:
        """Resumes this stage from ``state`` (a :meth:`shard_state` of this rank's stage at the same layout, e.g. a
        snapshot, or this stage's part of a universal checkpoint of any layout, read through
        :meth:`checkpoint_view`): masters and optimizer state, step, data cursor, RNG, learning-rate scale.

        Collective over the stage's data-parallel group (every rank of it restores its own shard together); the
        other stages are not involved. ``extra["optimizer_steps"]`` (Adam's step, which a neighbour rebuild resets)
        defaults to ``state.step`` for states saved without it.
        """
        if state.layout != self.optimizer.layout.to_dict():
            raise ValueError("PipelineTrainer.restore: the state was saved at another layout (another stage or grid)")
        if state.extra.get("pp_stage", self.stage) != self.stage:
            raise ValueError(f"PipelineTrainer.restore: the state is stage {state.extra['pp_stage']}'s, "
                             f"this rank holds stage {self.stage}")
        self.optimizer.discard_step()
        self._boundary = None
        self.optimizer.load_shard_tensors(optimizer_tensors(state.tensors), int(state.extra.get("optimizer_steps", state.step)))
        self.sampler.load_state(DataCursor.from_dict(state.data_cursor))
        state.rng.restore()
        self.step = state.step
        self.tokens_seen = state.tokens_seen
        self.lr_scale = float(state.extra.get("lr_scale", 1.0))
        self.lineage = str(state.extra.get("lineage", ""))
        self.stage_grad_norm = float("nan")

    def stage_weights(self) -> dict[str, torch.Tensor]:
        """This stage's fp32 master weights by local name (new tensors). Collective over the stage's DP group."""
        weights = {}
        for group in self.optimizer.layout.groups:
            full = self.optimizer.gather_full(shard_key(group.kind.name, MASTER))
            for slot in group.params:
                weights[slot.name] = full[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
        return weights

    def progress(self) -> tuple[int, DataCursor, int]:
        """``(step, data cursor, tokens seen)`` at the step boundary: what a replacement stage must resume at."""
        return self.step, self.sampler.state(), self.tokens_seen

    @torch.no_grad()
    def forget(self) -> None:
        """Simulates losing this stage: every weight, master and optimizer state becomes NaN or zero, the gradient
        norm unknown. Only :meth:`rebuild` makes the stage usable again."""
        for param in self.module.parameters():
            param.fill_(float("nan"))
        for tensor in self.optimizer.shard_tensors().values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else 0)
        self.stage_grad_norm = float("nan")

    @torch.no_grad()
    def rebuild(self, weights: dict[str, torch.Tensor], lr_scale: float, progress: tuple[int, DataCursor, int]) -> None:
        """Restarts this stage from ``weights`` (every local name) with a fresh optimizer (zero moments, step 0) and
        its learning rate scaled by ``lr_scale`` from now on; resumes the data stream at ``progress``.

        Call on every rank of the stage's DP group with the same weights (no collective inside).
        """
        own = dict(self.module.named_parameters())
        if set(weights) != set(own):
            raise KeyError(f"rebuild: weights for {sorted(set(weights) ^ set(own))} missing or unexpected")
        for name, param in own.items():
            param.grad = None
            # An fp32 copy: the new optimizer takes its master weights from the parameters as given.
            param.data = weights[name].to(device=self.device, dtype=torch.float32).reshape(param.shape).clone()
        self.optimizer.detach()  # its gradient hooks (ZeRO-2) would take the new optimizer's gradients
        self.optimizer = self._new_optimizer()
        self._boundary = None
        self.lr_scale = lr_scale
        self.stage_grad_norm = float("nan")
        self.step, cursor, self.tokens_seen = progress
        self.sampler.load_state(cursor)
