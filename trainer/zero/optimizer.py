"""A ZeRO-style sharded AdamW (stages 1 and 2) with 8-bit or 32-bit optimizer state.

Use it like a ``torch.optim`` optimizer inside any loop, after the default process group is initialised (or in a
single process without one)::

    opt = ZeroOptimizer(model, ZeroConfig(stage=2, state_bits=8, lr=3e-4))
    loss.backward()
    opt.step()
    opt.zero_grad()

The model's parameters become views into flat, block-aligned buffers (see ``layout.py``). Each rank keeps an fp32
master copy and the optimizer state of its shard only. Gradients are reduce-scattered bucket by bucket: at
``step()`` for stage 1, during backward (from post-accumulate-grad hooks, overlapping the rest of backward) for
stage 2, which also frees each full gradient as soon as it has been copied into its bucket. After the update, each
rank's new parameters are all-gathered into every rank's flat buffer.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from regrow.comm import collectives
from regrow.trainer.zero import adamw, codes
from regrow.trainer.zero.layout import FlatLayout, GroupLayout, ParamSlot, StateKind, build_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP32_STATE_MODULES = (
    nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase
)


@dataclass(kw_only=True)
class ZeroConfig:
    """Settings of :class:`ZeroOptimizer`. Every field is validated; errors name the field and the allowed values."""

    stage: int = 2
    """1: gradients reduce-scattered at step(); 2: during backward, full gradients freed early."""
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
    bucket_numel: int = 2**25
    """Elements per reduce-scatter / all-gather bucket (before padding)."""
    min_8bit_numel: int = 4096
    """Parameters smaller than this keep fp32 state (as do embeddings and norms) even with state_bits=8."""
    max_inflight_buckets: int = 4
    """Stage 2: reduce-scatters in flight during backward before the oldest is waited for (bounds memory)."""
    timeout_s: float = 300.0
    """Seconds a collective may take before it is reported as failed."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"ZeroConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.stage not in (1, 2):
            raise bad("stage", "allowed values are 1 and 2 (stage 3 is not supported yet)")
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
        for name in ("bucket_numel", "min_8bit_numel", "max_inflight_buckets"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not self.timeout_s > 0:
            raise bad("timeout_s", "must be > 0")


class _GroupShard:
    """This rank's buffers for one group: the full flat parameters and its shard of master weights and state."""

    def __init__(self, layout: GroupLayout, rank: int, device: torch.device, param_dtype: torch.dtype) -> None:
        self.layout = layout
        self.pieces = layout.shard_pieces(rank)
        n = layout.shard_numel
        self.flat_params = torch.zeros(layout.numel, dtype=param_dtype, device=device)
        self.master = torch.zeros(n, dtype=torch.float32, device=device)
        self.grad = torch.zeros(n, dtype=torch.float32, device=device)
        self.state: dict[str, torch.Tensor] = {}
        if layout.kind.bits == 8:
            for moment in ("exp_avg", "exp_avg_sq"):
                self.state[f"{moment}_codes"] = torch.zeros(n, dtype=torch.uint8, device=device)
                self.state[f"{moment}_scales"] = torch.zeros(n // codes.BLOCK_SIZE, dtype=torch.float32, device=device)
        else:
            self.state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=device)
            self.state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=device)

    @property
    def name(self) -> str:
        return self.layout.kind.name

    def param_view(self, slot: ParamSlot) -> torch.Tensor:
        return self.flat_params[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def owned_params(self, flat_start: int, length: int) -> torch.Tensor:
        """This rank's slice of one bucket of the working parameters: the update writes it, the all-gather sends it
        in place (no separate low-precision shard buffer: it would cost 2 bytes per parameter / world size)."""
        return self.flat_params[flat_start : flat_start + length]

    def state_slices(self, local_start: int, length: int) -> list[torch.Tensor]:
        """The optimizer state of shard elements ``[local_start, local_start + length)``; block scales are sliced
        per 256-element block (pieces are block-aligned)."""
        out = []
        for key, tensor in self.state.items():
            per = codes.BLOCK_SIZE if key.endswith("_scales") else 1
            out.append(tensor[local_start // per : (local_start + length) // per])
        return out

    def write_owned_params(self) -> None:
        """Casts the master shard into this rank's slices of the working parameters."""
        for flat_start, local_start, length in self.pieces:
            self.owned_params(flat_start, length).copy_(self.master[local_start : local_start + length])

    def shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full flat tensor of the group, as a new contiguous tensor."""
        return torch.cat([flat[start : start + length] for start, _, length in self.pieces])


class ZeroOptimizer:
    """Sharded AdamW over the trainable parameters of ``model`` (ZeRO stage 1 or 2, 8-bit or 32-bit state).

    Contract: construct after the model is on its device and the process group (if any) is up; every rank of the
    group constructs it with the same model. Call ``backward`` on the loss, then ``step()`` once per optimizer step,
    then ``zero_grad()``; all ranks must call ``step()`` together (it runs collectives).

    ``group`` is the data-parallel group that shards the state. Pipeline parallelism adds two optional settings:
    ``norm_group`` sums the squared gradient norm over a second group after ``group`` (the pipeline's stages, so
    that clipping uses the global norm), and ``norm_skip`` names parameters left out of the norm (a replicated copy
    counted by another stage). ``last_group_grad_norm`` is the norm over ``group`` only; ``last_grad_norm`` the norm
    clipping used; ``last_clip_coefficient`` the factor applied to the gradients. Without them nothing changes.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ZeroConfig | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        norm_group: dist.ProcessGroup | None = None,
        norm_skip: Collection[str] = (),
        **overrides: object,
    ) -> None:
        if config is not None and overrides:
            raise TypeError("ZeroOptimizer: pass either a ZeroConfig or keyword settings, not both")
        if config is None:
            known = {f.name for f in fields(ZeroConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"ZeroOptimizer: unknown settings {unknown}; ZeroConfig has {sorted(known)}")
            config = ZeroConfig(**overrides)
        self.config = config
        self.lr = config.lr
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters (every requires_grad is False)")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"ZeroOptimizer: all trainable parameters must be on one device, found {devices}")
        self.device = devices.pop()
        self.param_dtype = DTYPES[config.param_dtype] if config.param_dtype else named[0][1].dtype
        self.reduce_dtype = DTYPES[config.reduce_dtype] if config.reduce_dtype else self.param_dtype
        self.layout: FlatLayout = build_layout(
            named, world_size=self.world_size, bucket_numel=config.bucket_numel, kind_of=_state_kind_rule(model, config)
        )
        self._params = dict(named)
        self._shards = [_GroupShard(g, self.rank, self.device, self.param_dtype) for g in self.layout.groups]
        unknown_skip = sorted(set(norm_skip) - set(self._params))
        if unknown_skip:
            raise ValueError(f"ZeroOptimizer: norm_skip names {unknown_skip}, which are not trainable parameters")
        self.norm_group = norm_group
        self._norm_ranges = [_counted_ranges(shard, frozenset(norm_skip)) for shard in self._shards]
        self._bind_parameters()
        self._order = _reduction_order(self.layout, [name for name, _ in named])
        self._reducer = _BucketReducer(self) if config.stage == 2 else None
        self._flat_grads = self._bind_gradients() if config.stage == 1 else None
        self.step_count = 0
        self.last_grad_norm = float("nan")
        self.last_group_grad_norm = float("nan")
        self.last_clip_coefficient = 1.0

    # ---------------------------------------------------------------- set-up
    def _bind_parameters(self) -> None:
        """Copies every parameter into its group's flat buffer, takes the fp32 master shard, and makes the
        parameter a view of the buffer (so the all-gather after each step updates the model in place)."""
        for shard in self._shards:
            full32 = torch.zeros(shard.layout.numel, dtype=torch.float32, device=self.device)
            for slot in shard.layout.params:
                full32[slot.offset : slot.offset + slot.numel] = self._params[slot.name].detach().reshape(-1)
            shard.master.copy_(shard.shard_of(full32))
            shard.flat_params.copy_(full32)
            for slot in shard.layout.params:
                self._params[slot.name].data = shard.param_view(slot)

    def _bind_gradients(self) -> list[torch.Tensor]:
        """Stage 1: every ``param.grad`` is a view into one flat gradient buffer per group, so autograd accumulates
        micro-batches in place and the buckets can be reduce-scattered without a copy."""
        flat_grads = []
        for shard in self._shards:
            flat = torch.zeros(shard.layout.numel, dtype=self.param_dtype, device=self.device)
            for slot in shard.layout.params:
                self._params[slot.name].grad = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            flat_grads.append(flat)
        return flat_grads

    def rebind_groups(self, group: dist.ProcessGroup | None, norm_group: dist.ProcessGroup | None = None) -> None:
        """Uses ``group`` (and ``norm_group``) from now on: the same ranks in a re-formed world, after a failure.
        The shards are untouched; call at a step boundary."""
        size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank(group) if size > 1 else 0
        if (size, rank) != (self.world_size, self.rank):
            raise ValueError(f"ZeroOptimizer.rebind_groups: the new group has this rank as {rank} of {size}, the "
                             f"shards were laid out for {self.rank} of {self.world_size}")
        self.group = group
        self.norm_group = norm_group

    def release_groups(self) -> None:
        """Drops the references to this optimizer's process groups (a failed generation's), so that destroying
        them closes their connections; call :meth:`rebind_groups` before the next step."""
        self.group = None
        self.norm_group = None

    # ---------------------------------------------------------------- the step
    def set_lr(self, lr: float) -> None:
        """Sets the learning rate used by the next ``step()``."""
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"set_lr: lr={lr} must be a finite number >= 0")
        self.lr = lr

    @torch.no_grad()
    def step(self) -> None:
        """Reduces the gradients (if not already), clips, updates this rank's shard and all-gathers parameters.

        Call once per optimizer step after the last backward of the step, on every rank of the group.
        """
        if self._reducer is not None:
            self._reducer.finish()
        else:
            self._reduce_stage1()
        coefficient = self._clip_coefficient()
        self.last_clip_coefficient = coefficient
        if coefficient != 1.0:
            # The gradient shard is this optimizer's scratch space: scaling it in place lets both update kernels
            # read it as is (no converted copy, one pass).
            for shard in self._shards:
                shard.grad.mul_(coefficient)
        self.step_count += 1
        beta1, beta2 = self.config.betas
        for shard in self._shards:
            decay = self.config.weight_decay if shard.layout.kind.decay else 0.0
            update = adamw.adamw8bit_step if shard.layout.kind.bits == 8 else adamw.adamw32bit_step
            # One call per bucket piece, so the new working parameters land directly in the flat buffer.
            for flat_start, local_start, length in shard.pieces:
                update(
                    shard.master[local_start : local_start + length],
                    shard.grad[local_start : local_start + length],
                    *shard.state_slices(local_start, length),
                    lr=self.lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=self.config.eps,
                    weight_decay=decay,
                    step=self.step_count,
                    param_out=shard.owned_params(flat_start, length),
                )
        self._gather_parameters()

    def discard_step(self) -> None:
        """Forgets a step interrupted by a failure: partial gradients, reductions in flight (stage 2) and their
        staging buffers. Call before restoring a shard; the next backward then starts from zero."""
        if self._reducer is not None:
            self._reducer.discard()
        for param in self._params.values():
            param.grad = None
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the next step (``set_to_none`` is accepted for torch.optim compatibility)."""
        for shard in self._shards:
            shard.grad.zero_()
        if self._flat_grads is not None:
            for flat in self._flat_grads:
                flat.zero_()

    def _reduce_stage1(self) -> None:
        assert self._flat_grads is not None
        for shard, flat in zip(self._shards, self._flat_grads):
            for slot in shard.layout.params:
                self._rebind_gradient(slot, flat)
        inflight = []
        for group_index, bucket_index in self._order:
            bucket = self._shards[group_index].layout.buckets[bucket_index]
            staging = self._flat_grads[group_index][bucket.start : bucket.start + bucket.size]
            inflight.append(self._launch_reduce(group_index, bucket_index, staging.to(self.reduce_dtype)))
        for reduction in inflight:
            reduction.accumulate()

    def _rebind_gradient(self, slot: ParamSlot, flat: torch.Tensor) -> None:
        """Repairs a gradient the user replaced (e.g. ``model.zero_grad(set_to_none=True)``): copy it into the
        flat buffer and make ``.grad`` a view again."""
        param = self._params[slot.name]
        view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        if param.grad is not None and param.grad.data_ptr() == view.data_ptr():
            return
        if param.grad is None:
            view.zero_()
        else:
            view.copy_(param.grad)
        param.grad = view

    def _launch_reduce(self, group_index: int, bucket_index: int, staging: torch.Tensor) -> "_Reduction":
        shard = self._shards[group_index]
        _, local_start, length = shard.pieces[bucket_index]
        if self.world_size == 1:
            return _Reduction(None, staging, shard.grad[local_start : local_start + length], 1)
        out = torch.empty(length, dtype=staging.dtype, device=staging.device)
        pending = collectives.reduce_scatter(
            out, staging, group=self.group, timeout_s=self.config.timeout_s, async_op=True
        )
        return _Reduction(pending, out, shard.grad[local_start : local_start + length], self.world_size)

    def _clip_coefficient(self) -> float:
        """The factor that scales gradients to the clipping norm (1.0 when clipping is off or not needed).

        A non-finite norm is recorded but not used for scaling: the update then handles NaN/Inf elements itself.
        """
        # Summed in fp64 so that the norm (and the clipping factor) barely depends on how the gradient is sharded.
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        for shard, ranges in zip(self._shards, self._norm_ranges):
            if ranges is None:
                squares += torch.linalg.vector_norm(shard.grad, dtype=torch.float64).square()
                continue
            for start, length in ranges:
                squares += torch.linalg.vector_norm(shard.grad[start : start + length], dtype=torch.float64).square()
        if self.world_size > 1:
            collectives.all_reduce(squares, group=self.group, timeout_s=self.config.timeout_s)
        self.last_group_grad_norm = math.sqrt(squares.item())
        if self.norm_group is not None:
            # Pipeline parallelism: every stage's optimizer holds a part of the model; the clipping norm is global.
            collectives.all_reduce(squares, group=self.norm_group, timeout_s=self.config.timeout_s)
        self.last_grad_norm = math.sqrt(squares.item())
        limit = self.config.max_grad_norm
        if limit == 0 or not math.isfinite(self.last_grad_norm):
            return 1.0
        return min(1.0, limit / (self.last_grad_norm + 1e-6))

    def _gather_parameters(self) -> None:
        if self.world_size == 1:
            return
        for shard in self._shards:
            pendings = [
                collectives.all_gather(
                    shard.flat_params[bucket.start : bucket.start + bucket.size],
                    shard.owned_params(flat_start, length),
                    group=self.group,
                    timeout_s=self.config.timeout_s,
                    async_op=True,
                )
                for bucket, (flat_start, _, length) in zip(shard.layout.buckets, shard.pieces)
            ]
            for pending in pendings:
                pending.wait()

    # ---------------------------------------------------------------- state
    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shard: fp32 master weights and optimizer state of every group, keyed ``"<group>/<what>"``.

        The tensors are the live buffers (copy them to keep a snapshot). Together with ``step_count`` and the layout
        they are everything the optimizer needs to resume bit-identically; the working parameters are derived.
        """
        tensors: dict[str, torch.Tensor] = {}
        for shard in self._shards:
            tensors[f"{shard.name}/master"] = shard.master
            for key, value in shard.state.items():
                tensors[f"{shard.name}/{key}"] = value
        return tensors

    @torch.no_grad()
    def load_shard_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Restores a shard saved by :meth:`shard_tensors` at the same layout, then re-gathers the parameters.

        Collective: every rank of the group calls it with its own shard.
        """
        own = self.shard_tensors()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise KeyError(f"load_shard_tensors: missing {missing}, unexpected {unexpected}")
        for key, target in own.items():
            source = tensors[key]
            if source.shape != target.shape or source.dtype != target.dtype:
                raise ValueError(
                    f"load_shard_tensors: {key} is {tuple(source.shape)} {source.dtype}, "
                    f"expected {tuple(target.shape)} {target.dtype} (saved at another layout?)"
                )
            target.copy_(source)
        for shard in self._shards:
            shard.write_owned_params()
        self.step_count = step_count
        self.zero_grad()
        self._gather_parameters()

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """All-gathers the working parameters from every rank's shard, as :meth:`load_shard_tensors` ends.
        Collective: a rank that keeps its state calls it while its restoring peers call :meth:`load_shard_tensors`
        (its own parameters come back unchanged; the peers get theirs)."""
        self._gather_parameters()

    def gather_full(self, key: str) -> torch.Tensor:
        """The full flat tensor of the group named by ``key`` (``"<group>/<what>"``), in layout order.

        Collective: every rank calls it; scale tensors come back with one element per 256-element block.
        """
        group_name = key.split("/", 1)[0]
        index = [s.name for s in self._shards].index(group_name)
        shard = self._shards[index]
        local = self.shard_tensors()[key]
        ratio = shard.layout.shard_numel // local.numel()  # 1 for per-element tensors, 256 for block scales
        everything = torch.empty(local.numel() * self.world_size, dtype=local.dtype, device=local.device)
        if self.world_size == 1:
            everything.copy_(local)
        else:
            collectives.all_gather(everything, local, group=self.group, timeout_s=self.config.timeout_s)
        full = torch.empty_like(everything)
        by_rank = everything.view(self.world_size, -1)
        for rank in range(self.world_size):
            for start, local_start, length in shard.layout.shard_pieces(rank):
                a, b, n = start // ratio, local_start // ratio, length // ratio
                full[a : a + n] = by_rank[rank, b : b + n]
        return full


class _Reduction:
    """One bucket's reduce-scatter in flight; :meth:`accumulate` waits and adds the mean into the gradient shard."""

    def __init__(
        self, pending: collectives.Pending | None, out: torch.Tensor, target: torch.Tensor, world_size: int
    ) -> None:
        self.pending, self.out, self.target, self.world_size = pending, out, target, world_size

    def done(self) -> bool:
        return self.pending is None or self.pending.done()

    def accumulate(self) -> None:
        if self.pending is not None:
            self.pending.wait()
        reduced = self.out.float()
        if self.world_size > 1:
            reduced.div_(self.world_size)
        self.target.add_(reduced)


class _BucketReducer:
    """Stage 2: reduce-scatters each bucket as soon as backward has produced all of its gradients.

    Buckets are launched in one fixed order on every rank (collectives must match across ranks); the order is the
    expected readiness order, so waiting for it rarely delays a bucket. Anything not launched when backward ends
    (unused parameters) is launched from a callback queued on the autograd engine.
    """

    def __init__(self, optimizer: ZeroOptimizer) -> None:
        self.optimizer = optimizer
        self.inflight: list[_Reduction] = []
        self.staging: dict[tuple[int, int], torch.Tensor] = {}
        self.ready: set[tuple[int, int]] = set()
        self.remaining: dict[tuple[int, int], int] = {}
        self.next_index = 0
        self.callback_queued = False
        self._reset_counts()
        for group_index, shard in enumerate(optimizer._shards):
            for slot in shard.layout.params:
                param = optimizer._params[slot.name]
                param.register_post_accumulate_grad_hook(self._hook(group_index, slot))

    def _reset_counts(self) -> None:
        self.remaining = {}
        for group_index, shard in enumerate(self.optimizer._shards):
            for slot in shard.layout.params:
                key = (group_index, slot.bucket)
                self.remaining[key] = self.remaining.get(key, 0) + 1
        self.ready.clear()
        self.next_index = 0

    def _hook(self, group_index: int, slot: ParamSlot):
        def on_gradient(param: torch.Tensor) -> None:
            if not self.callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self.callback_queued = True
            key = (group_index, slot.bucket)
            bucket = self.optimizer._shards[group_index].layout.buckets[slot.bucket]
            staging = self._staging(key, bucket.size)
            start = slot.offset - bucket.start
            staging[start : start + slot.numel].copy_(param.grad.reshape(-1))
            param.grad = None  # the full gradient is no longer needed: this is what saves stage 2's memory
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                self.ready.add(key)
                self._launch_ready()

        return on_gradient

    def _staging(self, key: tuple[int, int], size: int) -> torch.Tensor:
        if key not in self.staging:
            opt = self.optimizer
            self.staging[key] = torch.zeros(size, dtype=opt.reduce_dtype, device=opt.device)
        return self.staging[key]

    def _launch_ready(self, everything: bool = False) -> None:
        order = self.optimizer._order
        while self.next_index < len(order) and (everything or order[self.next_index] in self.ready):
            key = order[self.next_index]
            bucket = self.optimizer._shards[key[0]].layout.buckets[key[1]]
            staging = self._staging(key, bucket.size)
            del self.staging[key]
            self.inflight.append(self.optimizer._launch_reduce(key[0], key[1], staging))
            self.next_index += 1
            # Fold in finished reductions right away (frees their staging buffers), and never keep more than
            # max_inflight_buckets in flight.
            while self.inflight and (
                len(self.inflight) > self.optimizer.config.max_inflight_buckets or self.inflight[0].done()
            ):
                self.inflight.pop(0).accumulate()

    def _end_of_backward(self) -> None:
        self._launch_ready(everything=True)
        self._reset_counts()
        self.callback_queued = False

    def discard(self) -> None:
        """Drops what an interrupted backward left behind (the collectives in flight belong to a process group that
        failed, so they are never waited for)."""
        self.inflight.clear()
        self.staging.clear()
        self._reset_counts()
        self.callback_queued = False

    def finish(self) -> None:
        """Waits for every reduce-scatter of this step; the gradient shards are complete afterwards."""
        while self.inflight:
            self.inflight.pop(0).accumulate()


def _counted_ranges(shard: _GroupShard, skip: frozenset[str]) -> list[tuple[int, int]] | None:
    """The ``(local_start, length)`` ranges of this rank's gradient shard that count towards the clipping norm:
    everything but the elements of parameters in ``skip``; None (the whole shard) when nothing is skipped."""
    skipped = [(s.offset, s.offset + s.numel) for s in shard.layout.params if s.name in skip]
    if not skipped:
        return None
    ranges: list[tuple[int, int]] = []
    for flat_start, local_start, length in shard.pieces:
        cursor, end = flat_start, flat_start + length
        for lo, hi in sorted(skipped):
            lo, hi = max(lo, cursor), min(hi, end)
            if lo >= hi:
                continue
            if lo > cursor:
                ranges.append((local_start + cursor - flat_start, lo - cursor))
            cursor = hi
        if cursor < end:
            ranges.append((local_start + cursor - flat_start, end - cursor))
    return ranges


def _state_kind_rule(model: nn.Module, config: ZeroConfig):
    """Per original parameter: 8-bit state only for large parameters that are not embeddings or norms (their state
    quantizes badly and they are small or sparse); weight decay only for parameters of two or more dimensions."""
    fp32_only = {
        id(p) for module in model.modules() if isinstance(module, _FP32_STATE_MODULES) for p in module.parameters(False)
    }

    def kind_of(name: str, param: torch.Tensor) -> StateKind:
        eight = config.state_bits == 8 and param.numel() >= config.min_8bit_numel and id(param) not in fp32_only
        return StateKind(bits=8 if eight else 32, decay=param.ndim >= 2)

    return kind_of


def _reduction_order(layout: FlatLayout, registration: list[str]) -> list[tuple[int, int]]:
    """All (group, bucket) pairs in the order backward is expected to complete them: a bucket is complete when its
    earliest-registered parameter has its gradient, and backward runs roughly in reverse registration order."""
    position = {name: i for i, name in enumerate(registration)}
    earliest: dict[tuple[int, int], int] = {}
    for group_index, group in enumerate(layout.groups):
        for slot in group.params:
            key = (group_index, slot.bucket)
            earliest[key] = min(earliest.get(key, len(position)), position[slot.name])
    return sorted(earliest, key=lambda key: (-earliest[key], key))
