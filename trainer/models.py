"""A small GPT (nanoGPT-like) that scales from a test-sized toy to ~1.3B parameters.

Layout: token embedding ``wte`` (tied with the LM head) + learned positions ``wpe`` -> ``blocks`` of pre-LayerNorm
causal self-attention and a 4x GELU MLP -> final LayerNorm -> logits. No biases anywhere, so every parameter is a
weight matrix, an embedding or a norm scale (this keeps the flat-buffer layout and the per-parameter 8-bit/fp32
decision simple). ``blocks`` is a plain ``nn.ModuleList`` so pipeline parallelism can cut it into stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from regrow.trainer.checks import require_ints

_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, d_model=64, n_head=2, seq_len=64, vocab_size=256),
    "small": dict(n_layer=4, d_model=128, n_head=4, seq_len=128, vocab_size=256),
    "350m": dict(n_layer=24, d_model=1024, n_head=16, seq_len=1024, vocab_size=50304),
    "1.3b": dict(n_layer=24, d_model=2048, n_head=16, seq_len=1024, vocab_size=50304),
}


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a :class:`GPT`. Validated on construction; every error names the field and what is allowed."""

    vocab_size: int = 256
    """Number of token ids: 256 = raw bytes (embedded corpus); 50304 (GPT-2 vocab rounded up to 64) in benchmarks."""

    seq_len: int = 128
    """Maximum sequence length (size of the learned position embedding)."""

    n_layer: int = 4
    """Number of transformer blocks (the units a pipeline split moves between stages)."""

    n_head: int = 4
    """Attention heads per block; must divide ``d_model``."""

    d_model: int = 128
    """Residual stream width; the MLP hidden width is ``4 * d_model``."""

    dropout: float = 0.0
    """Dropout probability in [0, 1). Default 0 so that training is bit-for-bit deterministic."""

    def __post_init__(self) -> None:
        require_ints(self, dict.fromkeys(("vocab_size", "seq_len", "n_layer", "n_head", "d_model"), 1))
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}; "
                f"choose a d_model that is a multiple of {self.n_head} or an n_head that divides {self.d_model}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} must be a float in [0, 1)")

    @classmethod
    def preset(cls, name: str, **overrides: int | float) -> GPTConfig:
        """Return a named configuration ("tiny", "small", "350m", "1.3b"), with ``overrides`` applied on top.

        "tiny" is for unit tests, "small" for the CPU demo (learns visibly in ~2 minutes on 2 processes),
        "350m" and "1.3b" are GPT-2-medium/-XL-like shapes for GPU benchmarks.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown GPTConfig preset {name!r}; choose one of {sorted(_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"GPTConfig.preset({name!r}) got unknown fields {unknown}; known fields: {sorted(known)}")
        return replace(cls(**_PRESETS[name]), **overrides)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the fused SDPA kernel applies the causal mask."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        # [B, T, 3, H, D] -> three [B, H, T, D] tensors, the layout SDPA expects.
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> 4*d_model -> GELU -> d_model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class _SkipInitialization(TorchFunctionMode):
    """Turns the initializers that modules' constructors call into no-ops: every ``torch.nn.init`` function (a
    mode's handler runs with the mode off, so the tensor methods they call inside are not seen) and the in-place
    tensor methods ``normal_``, ``uniform_``, ``fill_``, ``zero_``. The draws cost seconds on the CPU for a 350M
    model, and on ``meta`` tensors they run through torch's Python references, whose first use imports the
    compiler stack (1.6 s in a fresh process: a replacement worker)."""

    _METHODS = frozenset({"normal_", "uniform_", "fill_", "zero_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        if getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", None) in self._METHODS:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


class GPT(nn.Module):
    """Decoder-only language model.

    Initialization draws only from torch's global RNG, in a fixed module order, so two models built after the same
    ``torch.manual_seed`` are identical (on any device that uses the CPU generator; on ``meta`` nothing is drawn).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=False)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, counted and optimized once
        self._init_weights()

    @classmethod
    def uninitialized(cls, config: GPTConfig, device: torch.device | str) -> "GPT":
        """A GPT whose weights are whatever memory held (nothing drawn, no random generator touched), for a model
        every weight of which is about to be restored: 0.02 s against 3.1 s for the seeded init of the 350m preset
        on one CPU thread. The embedding and the LM head stay tied."""
        with torch.device(device), _SkipInitialization():  # not meta: its to_empty imports sympy (0.5 s)
            return cls(config)

    def _init_weights(self) -> None:
        """nanoGPT init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2*n_layer).

        The scaling keeps the residual stream's variance from growing with depth (two residual adds per block).
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():  # tied weight appears once, so it is drawn once
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif "ln_" in name:
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameter elements (the tied embedding/LM head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``[B, T, vocab_size]`` for ``idx`` ``[B, T]``, or the mean cross-entropy if ``targets`` given.

        The loss is computed in fp32 even for a bf16 model, so its value does not depend on the compute dtype's
        rounding of the softmax.
        """
        seq = idx.shape[1]
        if seq > self.config.seq_len:
            raise ValueError(f"input length {seq} exceeds GPTConfig.seq_len={self.config.seq_len}; truncate the input")
        pos = torch.arange(seq, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------- pipeline stages
def stage_blocks(n_layer: int, n_stages: int, stage: int) -> range:
    """The global block indices of ``stage`` when ``n_layer`` blocks are cut into ``n_stages`` equal stages.

    Equal stages are required: neighbour-averaging recovery pairs block j of a stage with block j of its neighbour.
    """
    if n_stages < 1 or n_layer % n_stages:
        raise ValueError(f"n_stages={n_stages} must divide n_layer={n_layer} (every stage holds as many blocks)")
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage={stage} is outside [0, {n_stages})")
    per = n_layer // n_stages
    return range(stage * per, (stage + 1) * per)


class TiedHead(nn.Embedding):
    """The LM head of a pipeline stage: its own copy of the (tied) token embedding matrix, used as ``x @ W.T``.

    An ``nn.Embedding`` on purpose: the optimizer keeps fp32 state and applies weight decay to embeddings exactly as
    it does to the single model's tied ``wte.weight``, so this copy and the embedding stage's copy, given the same
    (summed) gradient, receive bit-identical updates.
    """

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`GPT`: some consecutive blocks, plus the input embedding (``embed``) and/or
    the final norm and LM head (``head``).

    Local parameter names are role-based and identical across stages: ``wte.weight``, ``wpe.weight``,
    ``blocks.<j>.<...>`` (j counts from 0 inside the stage), ``ln_f.weight``, ``lm_head.weight``. :meth:`global_names`
    maps them to the full model's names (``lm_head.weight`` -> ``wte.weight``: the tie, handled by the pipeline).
    """

    def __init__(self, config: GPTConfig, blocks: range, *, embed: bool, head: bool) -> None:
        super().__init__()
        self.config = config
        self.block_ids = blocks
        self.has_embed, self.has_head = embed, head
        if embed:
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            self.wpe = nn.Embedding(config.seq_len, config.d_model)
            self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in blocks)
        if head:
            self.ln_f = nn.LayerNorm(config.d_model, bias=False)
            self.lm_head = TiedHead(config.vocab_size, config.d_model)
        self._blocks_forward: Callable[[torch.Tensor], torch.Tensor] = self._run_blocks

    @classmethod
    def from_gpt(cls, gpt: GPT, blocks: range, *, embed: bool, head: bool) -> GPTStage:
        """A stage whose parameters are copies of ``gpt``'s (same values, new tensors)."""
        stage = cls(gpt.config, blocks, embed=embed, head=head)
        full = dict(gpt.named_parameters(remove_duplicate=False))
        own = dict(stage.named_parameters())
        with torch.no_grad():
            for local, name in stage.global_names().items():
                own[local].copy_(full[name])
        return stage.to(next(gpt.parameters()).device)

    def global_names(self) -> dict[str, str]:
        """Local parameter name -> the full :class:`GPT`'s parameter name (the explicit mapping between stages)."""
        mapping = {}
        for local, _ in self.named_parameters():
            if local.startswith("blocks."):
                _, j, rest = local.split(".", 2)
                mapping[local] = f"blocks.{self.block_ids[int(j)]}.{rest}"
            else:
                mapping[local] = "wte.weight" if local == "lm_head.weight" else local
        return mapping

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Token plus position embedding of ``idx`` ``[B, T]`` (stages built with ``embed=True`` only)."""
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(f"input length {idx.shape[1]} exceeds GPTConfig.seq_len={self.config.seq_len}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def compiled(self, backend: str | None) -> GPTStage:
        """Runs :meth:`run_blocks` (the stage's compute) through ``torch.compile`` with ``backend`` from now on
        (None: eagerly); returns this stage. The compiled graphs read the stage's own parameters, so a restore or a
        neighbour rebuild that copies into them needs no recompile."""
        self._blocks_forward = self._run_blocks if backend is None else torch.compile(self._run_blocks,
                                                                                      backend=backend)
        return self

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """This stage's blocks applied in order to the residual stream ``x`` ``[B, T, d_model]``."""
        return self._blocks_forward(x)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (in fp32, as :meth:`GPT.forward`) of the logits of ``x`` (``head=True`` only)."""
        logits = self.lm_head.project(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
