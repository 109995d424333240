"""The training loop: ``Trainer`` runs forward, backward and the sharded optimizer step with gradient accumulation.

Extend it by overriding small methods (``build_model``, ``train_step``, ``evaluate``), not with callbacks; keep
training state in sinks (``state.StateSink``) that the launcher or the user passes in.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from regrow.comm import collectives
from regrow.comm.world import World
from regrow.trainer import sink_calls
from regrow.trainer.activation_checkpointing import checkpoint_blocks
from regrow.trainer.boundary import RewindableStep
from regrow.trainer.checks import require_ints
from regrow.trainer.compile import AUTO as COMPILE_AUTO
from regrow.trainer.compile import OFF as COMPILE_OFF
from regrow.trainer.compile import backend_for, check_compile, compiled_forward
from regrow.trainer.data import DataConfig, DataCursor, Sampler
from regrow.trainer.log import log_line
from regrow.trainer.losses import Loss, check_loss_name
from regrow.trainer.model_factory import ModelFactory, build_model, input_vocab_size, model_for_restore
from regrow.trainer.models import GPTConfig
from regrow.trainer.restorable import OptimizerBackedRestore
from regrow.trainer.state import RngState, ShardState, StateSink, optimizer_tensors
from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.optimizer import ZeroOptimizer


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or Inf; raised before that step's optimizer update, so the state is still good."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"loss is {loss} at step {step}; stopped before the optimizer step, so the parameters are those after "
            f"step {step - 1}. Lower the learning rate or check the data, then resume from the last good state."
        )
        self.step = step
        self.loss = loss


@dataclass(kw_only=True)
class TrainerConfig:
    """Everything that defines a training run. Validated on construction; errors name the field."""

    model: GPTConfig | ModelFactory = field(default_factory=lambda: GPTConfig.preset("small"))
    """The model: regrow's GPT of this shape, or the model a :class:`ModelFactory` builds (any ``nn.Module``)."""
    loss: str = "auto"
    """How a batch's loss is computed (``losses.py``): "model" (``model(x, y)`` returns it), "logits" (cross entropy
    of ``model(x)``), "hf" (a Hugging Face causal LM's ``.loss``), "pkg.module:function" (``function(model, x,
    y)``), or "auto": "model" for the GPT, "logits" for a factory's model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus split and batch sizes (``global_batch`` sequences per step over all ranks)."""
    optim: ZeroConfig = field(default_factory=ZeroConfig)
    """The sharded optimizer (stage, state bits, lr, betas, clipping, ...)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (``activation_checkpointing.py``;
    the blocks are ``optim.shard_units``, by default the children of the model's largest ``nn.ModuleList``): less
    memory for about one more forward per step. Results are bit-identical either way."""
    compile: str = "auto"
    """``torch.compile`` the model's forward (``trainer/compile.py``): "auto" (inductor on CUDA, off on the CPU),
    "off" or a backend name ("inductor", "aot_eager", ...). On one H100 inductor made regrow's step 1.19-1.27x
    faster with less memory (``bench/RESULTS.md``); its first steps include the compile (25-60 s, less with
    inductor's cache warm), and so does the first step of a replacement rank. Not with ZeRO stage 3, whose gathers
    run in module hooks ("auto" is then off)."""
    steps: int = 200
    """Optimizer steps to run (the run stops after this step)."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up from 0; then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    seed: int = 0
    """Seeds model initialisation; the data order has its own seed in ``data.seed``."""
    log_every: int = 10
    """Print a log line every this many steps on rank 0 (0 disables)."""
    eval_every: int = 0
    """Compute the validation loss every this many steps (0 disables; the last step is always evaluated if > 0)."""
    eval_batches: int = 4
    """Validation batches (of ``data.micro_batch`` sequences) per evaluation."""
    metrics_path: str | None = None
    """JSONL file that rank 0 appends one record per step to; None disables."""
    progress: bool = True
    """Show a progress bar on rank 0 when stderr is a terminal."""

    def __post_init__(self) -> None:
        require_ints(
            self, {"steps": 1, "warmup_steps": 0, "log_every": 0, "eval_every": 0, "eval_batches": 1, "seed": 0}
        )
        if self.seed >= 2**64:
            raise ValueError(f"TrainerConfig.seed={self.seed} must be < 2**64 (torch's generators take 64-bit seeds)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainerConfig.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not isinstance(self.model, (GPTConfig, ModelFactory)):
            raise TypeError(f"TrainerConfig.model is a {type(self.model).__name__}: give a GPTConfig (regrow's GPT) "
                            "or a ModelFactory (your own model)")
        check_loss_name(self.loss)
        check_compile(self.compile)
        if self.optim.stage == 3 and self.compile not in (COMPILE_OFF, COMPILE_AUTO):
            raise ValueError(f"TrainerConfig.compile={self.compile!r} is not supported at optim.stage=3 (its "
                             "parameters are gathered in module hooks around each block); use compile='off' or "
                             "ZeRO stage 1 or 2")
        if self.loss == "hf" and isinstance(self.model, GPTConfig):
            raise ValueError("TrainerConfig.loss='hf' needs a Hugging Face model (a ModelFactory's); regrow's GPT "
                             "takes loss 'model' or 'logits'")
        if isinstance(self.model, GPTConfig) and self.data.seq_len > self.model.seq_len:
            raise ValueError(
                f"TrainerConfig.data.seq_len={self.data.seq_len} exceeds model.seq_len={self.model.seq_len}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepResult:
    """What one optimizer step produced."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    val_loss: float | None = None


def learning_rate(config: TrainerConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine decay."""
    peak = config.optim.lr
    if step <= config.warmup_steps:
        return peak * step / max(1, config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def agree_lineage(world_size: int, timeout_s: float) -> str:
    """A new lineage id (16 hex digits) that every rank of the default process group returns. Collective: each rank
    draws 62 bits from the OS, never from a generator the training replays (a restore stays bit-identical), and an
    all-reduce keeps the largest draw, so no rank has to be told it."""
    draw = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    if world_size > 1:
        collectives.all_reduce(draw, group=None, timeout_s=timeout_s, op=torch.distributed.ReduceOp.MAX)
    return f"{int(draw.item()):016x}"


class Trainer(RewindableStep, OptimizerBackedRestore):
    """Trains the model of ``config.model`` (regrow's GPT or a factory's) with the sharded optimizer on this rank of
    ``world`` (or alone when ``world`` is None).

    Contract: every rank constructs it with the same config and calls :meth:`run` (or :meth:`train_step`) the same
    number of times. Sinks see ``before_optimizer_step()`` and ``after_step(state)`` around every optimizer step.
    It is a ``state.Restorable``: recovery restores it through that contract alone.
    """

    def __init__(self, config: TrainerConfig, world: World | None = None, sinks: Sequence[StateSink] = (), *,
                 for_restore: bool = False) -> None:
        """``for_restore``: the model's weights are left uninitialized (``GPT.uninitialized``; a factory's model is
        built seeded), for a rank that restores a state before its first step (a replacement);
        :meth:`reset_to_initial_state` initializes them. The loss (``config.loss``) is resolved here, a user's
        loss function imported."""
        self.config = config
        self.rank = world.rank if world else 0
        self.world_size = world.world_size if world else 1
        self.timeout_s = config.optim.timeout_s
        """Limit of this trainer's collectives outside the optimizer (the loss mean, a restore's agreement)."""
        self.device = world.device if world else torch.device("cpu")
        self.sinks = list(sinks)
        self.initialized = not for_restore
        """The weights hold a real state, the seeded initial one or a restored one (False only between a
        ``for_restore`` build and its restore)."""
        self.model = (self.build_model() if self.initialized
                      else model_for_restore(config.model, seed=config.seed, device=self.device))
        self._forward = self._compiled(self.model)
        self.loss = Loss(config.loss, is_gpt=isinstance(config.model, GPTConfig))
        # The token ids are checked against the model's vocabulary once, here (a scan of the token files per start).
        self.sampler = Sampler(config.data, dp_rank=self.rank, dp_size=self.world_size,
                               vocab_size=input_vocab_size(self.model))
        self.optimizer = self._optimizer_for(self.model)
        # Built once: every step's ShardState shares it (a sink taking a snapshot every step would otherwise pay
        # about a millisecond of CPU per step for it, on the path that launches the next forward).
        self._layout = self.optimizer.layout.to_dict()
        self.step = 0
        self.tokens_seen = 0
        self.history: list[StepResult] = []
        self.lineage = ""
        """Which history of training states this rank's states belong to: "" in a run that never restored, then a
        new id at every restore (:meth:`start_lineage`). A step re-run after a rollback is another state than the
        abandoned run's same step (on a GPU not bit for bit), so the snapshot processes persist a step only from
        parts of one lineage (``checkpoint/node/persist.py``); it travels in ``ShardState.extra``."""
        self._metrics = Path(config.metrics_path) if config.metrics_path and self.rank == 0 else None
        if self._metrics:
            self._metrics.parent.mkdir(parents=True, exist_ok=True)

    def build_model(self) -> torch.nn.Module:
        """Builds the model from ``config.seed`` (identical on every rank) on the CPU, moves it to this rank's device,
        and seeds Python's and NumPy's generators per rank, so that every generator a rank snapshots replays
        identically in a rerun (user code drawing from them included)."""
        model = build_model(self.config.model, seed=self.config.seed)
        per_rank = self.config.seed * 1_000_003 + self.rank
        random.seed(per_rank)
        np.random.seed(per_rank % 2**32)
        return model.to(self.device)

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the forward calls: ``model`` compiled per ``config.compile`` (sharing its parameters), or itself."""
        backend = backend_for(self.config.compile, self.device, zero_stage=self.config.optim.stage)
        if backend is not None and self.rank == 0:
            log_line(0, 0, f"model compiled with torch.compile (backend {backend}; the first steps include the "
                           f"compile)")
        return compiled_forward(model, backend)

    def _optimizer_for(self, model: torch.nn.Module) -> ZeroOptimizer:
        """The optimizer of a freshly built ``model``, its blocks checkpointed first when the config says so."""
        if self.config.activation_checkpointing:
            checkpoint_blocks(model, self.config.optim.shard_units)
        optimizer = ZeroOptimizer(model, self.config.optim)
        sink_calls.hook_sinks(optimizer, lambda: self.sinks)
        return optimizer

    def run_config(self) -> dict:
        """``config.to_dict()``: what a checkpoint records as the run's settings (``state.Restorable``)."""
        return self.config.to_dict()

    def reset_to_initial_state(self) -> None:
        """Builds the seeded initial model and a new optimizer (a replacement built ``for_restore`` that turns out
        to need step 0's state, which no snapshot holds). Not collective."""
        self.model = self.build_model()
        self._forward = self._compiled(self.model)
        self.optimizer = self._optimizer_for(self.model)
        self._layout = self.optimizer.layout.to_dict()
        self.sampler.load_state(DataCursor(epoch=0, index=0))
        self.step, self.tokens_seen, self._boundary, self.initialized = 0, 0, None, True

    # ---------------------------------------------------------------- one step
    def train_step(self) -> StepResult:
        """Runs one optimizer step: ``grad_accum`` forward/backward passes, the NaN check, the update, the sinks."""
        started = time.perf_counter()
        self._begin_step()
        step = self.step + 1
        accum = self.sampler.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(accum):
            x, y = self.sampler.next_micro_batch()
            loss = self.loss(self._forward, x.to(self.device), y.to(self.device)) / accum
            if micro == 0:
                sink_calls.after_forward(self.sinks)
            loss.backward()
            loss_sum += loss.detach().float()
        loss_value = self._mean_over_ranks(loss_sum)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(step, loss_value)
        lr = learning_rate(self.config, step)
        self.optimizer.set_lr(lr)
        self.optimizer.step()  # the sinks are called from its hooks (sink_calls.hook_sinks)
        self.optimizer.zero_grad()
        self.step = step
        tokens = self.config.data.global_batch * self.config.data.seq_len
        self.tokens_seen += tokens
        sink_calls.after_step(self.sinks, self.shard_state)
        elapsed = time.perf_counter() - started
        return StepResult(step, loss_value, lr, self.optimizer.last_grad_norm, tokens / elapsed)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            collectives.all_reduce(value, group=None, timeout_s=self.timeout_s)
            value = value / self.world_size
            # On a GPU the all-reduce returns at once and this read is where the host waits for its peers.
            with collectives.waiting():
                return value.item()
        return value.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` fixed batches (the same on every rank; no communication)."""
        self.model.eval()
        batches = self.sampler.validation_batches(self.config.eval_batches, self.config.data.micro_batch)
        losses = [self.loss(self._forward, x.to(self.device), y.to(self.device)).float().item() for x, y in batches]
        self.model.train()
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------- the run
    def run(self) -> list[StepResult]:
        """Trains until ``config.steps``; returns every step's result (also kept in ``history``)."""
        config = self.config
        progress = _ProgressBar(config.steps, self.step) if config.progress and self.rank == 0 else None
        try:
            while self.step < config.steps:
                result = self.train_step()
                if config.eval_every and (result.step % config.eval_every == 0 or result.step == config.steps):
                    result.val_loss = self.evaluate()
                self.history.append(result)
                self._report(result, progress)
        finally:
            if progress:
                progress.close()
            sink_calls.close(self.sinks)
        return self.history

    def _report(self, result: StepResult, progress: "_ProgressBar | None") -> None:
        if self.rank != 0:
            return
        if self._metrics:
            with self._metrics.open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
        if progress:
            progress.update(result)
        every = self.config.log_every
        if every and (result.step % every == 0 or result.step == self.config.steps):
            val = f" val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            log_line(
                self.rank,
                result.step,
                f"loss {result.loss:.4f}{val} lr {result.lr:.2e} grad_norm {result.grad_norm:.3f} "
                f"tokens/s {result.tokens_per_s:,.0f}",
            )

    # ---------------------------------------------------------------- state
    def shard_state(self) -> ShardState:
        """This rank's :class:`ShardState` at the current step boundary (tensors are live buffers)."""
        return ShardState(
            step=self.step,
            tensors=self.optimizer.shard_tensors(),
            layout=self._layout,
            rank=self.rank,
            rng=RngState.capture(),
            data_cursor=self.sampler.state().to_dict(),
            tokens_seen=self.tokens_seen,
            extra={"lineage": self.lineage},
        )

    def start_lineage(self) -> str:
        """Starts a new lineage (:attr:`lineage`) at the current step and returns its id. Collective: call on every
        rank once the job has restored (the survivors that kept their state too), before the next step."""
        self.lineage = agree_lineage(self.world_size, self.timeout_s)
        return self.lineage

    def restore(self, state: ShardState) -> None:
        """Resumes from ``state`` (same layout), its lineage included; collective: every rank restores its own
        shard together."""
        if state.layout != self._layout:
            raise ValueError("Trainer.restore: the state was saved at another layout; reshard it first")
        self.optimizer.discard_step()  # a step a failure interrupted may have left partial gradients
        self._boundary = None
        # A pipeline's checkpoint records Adam's step count (a stage rebuilt from its neighbours restarts it).
        self.optimizer.load_shard_tensors(optimizer_tensors(state.tensors),
                                          int(state.extra.get("optimizer_steps", state.step)))
        self.sampler.load_state(DataCursor.from_dict(state.data_cursor))
        state.rng.restore()
        self.step = state.step
        self.tokens_seen = state.tokens_seen
        self.lineage = str(state.extra.get("lineage", ""))
        self.initialized = True


class _ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (logs stay clean in files)."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.enabled = total, sys.stderr.isatty() and os.environ.get("CI") is None
        self.started = time.perf_counter()
        self.first = start

    def update(self, result: StepResult) -> None:
        if not self.enabled:
            return
        done = result.step / self.total
        bar = "#" * int(30 * done)
        rate = (result.step - self.first) / max(1e-9, time.perf_counter() - self.started)
        eta = (self.total - result.step) / max(rate, 1e-9)
        sys.stderr.write(f"\r[{bar:<30}] {result.step}/{self.total} loss {result.loss:.3f} eta {eta:.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
