"""The settings of the ZeRO optimizer and the rule that gives each parameter its kind of optimizer state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from regrow.trainer.zero.layout import StateKind

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names :class:`ZeroConfig` accepts for ``param_dtype`` and ``reduce_dtype``."""
GRAD_DTYPES = ("float32", "bfloat16")
"""The dtype names :class:`ZeroConfig` accepts for ``grad_dtype`` (fp16 would overflow without loss scaling)."""
_FP32_STATE_MODULES = (
    nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase
)
"""Modules whose parameters keep fp32 state, by type (subclasses included, e.g. a scaled word embedding)."""
_NORM_CLASS_SUFFIX = "Norm"
"""A module of another class counts as a norm when its class name ends with this (``LlamaRMSNorm``,
``T5LayerNorm``, ``MistralRMSNorm``: models define their own) and its own parameters are all 1-D."""


@dataclass(kw_only=True)
class ZeroConfig:
    """Settings of :class:`ZeroOptimizer`. Every field is validated; errors name the field and the allowed values."""

    stage: int = 2
    """1: gradients reduce-scattered at step(); 2: during backward, full gradients freed early; 3: the parameters
    are sharded too: each unit (``shard_units``) all-gathers its parameters right before its forward and again
    before its backward, and frees them after use (``stage3.py``)."""
    state_bits: int = 8
    """8: block-wise dynamic 8-bit Adam state for large matrices (others keep fp32 state); 32: fp32 state for all."""
    lr: float = 3e-4
    """Learning rate; change it between steps with ``set_lr``."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), applied to parameters of two or more dimensions only."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""
    param_dtype: str | None = None
    """dtype of the model's working parameters and gradients ("bfloat16", "float16", "float32"); None keeps the
    model's. The master copy is always fp32, taken from the parameters as given."""
    reduce_dtype: str | None = None
    """dtype in which gradients are reduce-scattered; None uses param_dtype."""
    grad_dtype: str = "float32"
    """dtype of this rank's gradient shard, where reduced gradients accumulate until the update: "float32" or
    "bfloat16". bfloat16 saves 2 bytes per parameter divided by the world size (what lets stage 3 train the largest
    models) and changes nothing when the reduction is in bfloat16 on one rank without gradient accumulation;
    otherwise each reduced micro-batch and the mean over ranks are rounded to bfloat16 before the update."""
    bucket_numel: int = 2**25
    """Elements per reduce-scatter / all-gather bucket (before padding)."""
    min_8bit_numel: int = 4096
    """Parameters smaller than this keep fp32 state (as do embeddings and norms) even with state_bits=8."""
    max_inflight_buckets: int = 4
    """Stage 2: reduce-scatters in flight during backward before the oldest is waited for (bounds memory)."""
    timeout_s: float = 300.0
    """Seconds a collective may take before it is reported as failed."""
    shard_units: tuple[str, ...] = ()
    """Stage 3: names of the modules (as ``model.named_modules()`` gives them) whose parameters are gathered and
    freed together. Empty: every child of the model's largest ``nn.ModuleList`` (the transformer blocks of regrow's
    GPT and of Hugging Face models). Parameters outside every unit (embeddings, final norm, a tied head), and any
    parameter that modules of two units use, form the root unit: gathered when the model's forward starts, freed
    once their gradients are reduced."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"ZeroConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.stage not in (1, 2, 3):
            raise bad("stage", "allowed values are 1, 2 and 3")
        if self.state_bits not in (8, 32):
            raise bad("state_bits", "allowed values are 8 and 32")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise bad("lr", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.eps > 0:
            raise bad("eps", "must be > 0")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "must be >= 0")
        if not self.max_grad_norm >= 0:
            raise bad("max_grad_norm", "must be >= 0 (0 disables clipping)")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in (None, *DTYPES):
                raise bad(name, f"allowed values are None and {sorted(DTYPES)}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise bad("grad_dtype", f"allowed values are {list(GRAD_DTYPES)}")
        for name in ("bucket_numel", "min_8bit_numel", "max_inflight_buckets"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not self.timeout_s > 0:
            raise bad("timeout_s", "must be > 0")
        self.shard_units = tuple(self.shard_units)
        if not all(isinstance(name, str) and name for name in self.shard_units):
            raise bad("shard_units", "must be module names (non-empty strings)")
        if self.shard_units and self.stage != 3:
            raise bad("shard_units", "only stage 3 gathers parameters by unit (set stage=3 or leave it empty)")


def state_kind_rule(model: nn.Module, config: ZeroConfig) -> Callable[[str, torch.Tensor], StateKind]:
    """The ``kind_of`` function of ``layout.build_layout`` that :class:`ZeroOptimizer` lays ``model`` out with.

    Per original parameter: 8-bit state only for large parameters that are not embeddings or norms (their state
    quantizes badly and they are small or sparse); weight decay only for parameters of two or more dimensions.
    Embeddings and norms are found by the module that owns the parameter, not by its name, so any model's are:
    torch's embedding and norm classes and their subclasses, and any class named ``...Norm`` that owns only 1-D
    parameters (the custom RMSNorms of Hugging Face models). A weight tied to an embedding (an LM head sharing the
    embedding's tensor) is one parameter, an embedding's. Public so that code predicting the optimizer's layout
    without building one (the launcher sizing snapshot segments from a model on the meta device) applies the same
    rule."""
    fp32_only = {id(p) for module in model.modules() if _keeps_fp32_state(module) for p in module.parameters(False)}

    def kind_of(name: str, param: torch.Tensor) -> StateKind:
        eight = config.state_bits == 8 and param.numel() >= config.min_8bit_numel and id(param) not in fp32_only
        return StateKind(bits=8 if eight else 32, decay=param.ndim >= 2)

    return kind_of


def _keeps_fp32_state(module: nn.Module) -> bool:
    """Whether ``module``'s own parameters are an embedding's or a norm's (see :func:`state_kind_rule`)."""
    if isinstance(module, _FP32_STATE_MODULES):
        return True
    own = list(module.parameters(recurse=False))
    return type(module).__name__.endswith(_NORM_CLASS_SUFFIX) and bool(own) and all(p.ndim == 1 for p in own)
