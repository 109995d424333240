"""A ZeRO-style sharded AdamW (stages 1 and 2) with 8-bit or 32-bit optimizer state.

Use it like a ``torch.optim`` optimizer inside any loop, after the default process group is initialised (or in a
single process without one)::

    opt = ZeroOptimizer(model, ZeroConfig(stage=2, state_bits=8, lr=3e-4))
    loss.backward()
    opt.step()
    opt.zero_grad()

The model's parameters become views into flat, block-aligned buffers (see ``layout.py``). Each rank keeps an fp32
master copy and the optimizer state of its shard only (``shard.py``). Gradients are reduce-scattered bucket by bucket
(``reducer.py``): at ``step()`` for stage 1, during backward (from post-accumulate-grad hooks, overlapping the rest of
backward) for stage 2, which also frees each full gradient as soon as it has been copied into its bucket. After the
update (``adamw.py``), each rank's new parameters are all-gathered into every rank's flat buffer (``shard_comm.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import fields

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from regrow.comm import collectives
from regrow.trainer.zero.config import DTYPES, ZeroConfig, state_kind_rule
from regrow.trainer.zero.layout import FlatLayout, build_layout
from regrow.trainer.zero.reducer import BackwardReducer, GradientReducer, StepReducer, reduction_order
from regrow.trainer.zero.shard import GroupShard, split_shard_key
from regrow.trainer.zero.shard_comm import ShardComm
from regrow.trainer.zero.stage3 import UnitGatherer, Units, find_units


class ZeroOptimizer:
    """Sharded AdamW over the trainable parameters of ``model`` (ZeRO stage 1, 2 or 3, 8-bit or 32-bit state).

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
        config = _resolve_config(config, overrides)
        self.config = config
        self.lr = config.lr
        self._comm = ShardComm(group, config.timeout_s)
        self.world_size, self.rank = self._comm.world_size, self._comm.rank
        self.norm_group = norm_group

        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer: the model has no trainable parameters (every requires_grad is False)")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"ZeroOptimizer: all trainable parameters must be on one device, found {devices}")
        self.device = devices.pop()
        self.param_dtype = DTYPES[config.param_dtype] if config.param_dtype else named[0][1].dtype
        self.reduce_dtype = DTYPES[config.reduce_dtype] if config.reduce_dtype else self.param_dtype
        self.grad_dtype = DTYPES[config.grad_dtype]
        units = find_units(model, config.shard_units) if config.stage == 3 else None
        self.layout: FlatLayout = plan_layout(model, config, self.world_size, units)
        self._params = dict(named)
        unknown_skip = sorted(set(norm_skip) - set(self._params))
        if unknown_skip:
            raise ValueError(f"ZeroOptimizer: norm_skip names {unknown_skip}, which are not trainable parameters")
        self._shards = [
            GroupShard(g, self.rank, self.device, self.param_dtype, self._params, frozenset(norm_skip),
                       shard_params=units is not None, grad_dtype=self.grad_dtype)
            for g in self.layout.groups
        ]
        self._slots = {slot.name: (shard, slot) for shard in self._shards for slot in shard.layout.params}
        self._gatherer: UnitGatherer | None = None
        if units is not None:
            self._gatherer = UnitGatherer(model, units, self.layout, self._shards, self._comm)
        order = reduction_order(self.layout, [name for name, _ in named])
        self._reducer: GradientReducer = (
            BackwardReducer(
                self._shards, self._params, order, self._comm, self.reduce_dtype, config.max_inflight_buckets,
                on_launch=None if self._gatherer is None else self._gatherer.bucket_reduced,
                on_end=None if self._gatherer is None else self._gatherer.free_all,
            )
            if config.stage >= 2
            else StepReducer(self._shards, self._params, order, self._comm, self.reduce_dtype)
        )
        self.step_count = 0
        self.last_grad_norm = float("nan")
        self.last_group_grad_norm = float("nan")
        self.last_clip_coefficient = 1.0
        # OrderedDicts, not dicts: torch's RemovableHandle keeps a weak reference to them.
        self._step_pre_hooks: OrderedDict[int, Callable[[], None]] = OrderedDict()
        self._reduced_hooks: OrderedDict[int, Callable[[], None]] = OrderedDict()
        self._update_pre_hooks: OrderedDict[int, Callable[[], None]] = OrderedDict()
        self._gather_pre_hooks: OrderedDict[int, Callable[[], None]] = OrderedDict()

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The data-parallel group the state is sharded over (None: the default group)."""
        return self._comm.group

    # ---------------------------------------------------------------- process groups
    def rebind_groups(self, group: dist.ProcessGroup | None, norm_group: dist.ProcessGroup | None = None) -> None:
        """Uses ``group`` (and ``norm_group``) from now on: the same ranks in a re-formed world, after a failure.
        The shards are untouched; call at a step boundary."""
        self._comm.rebind(group)
        self.norm_group = norm_group

    def release_groups(self) -> None:
        """Drops the references to this optimizer's process groups (a failed generation's), so that destroying
        them closes their connections; call :meth:`rebind_groups` before the next step."""
        self._comm.release()
        self.norm_group = None

    # ---------------------------------------------------------------- the step
    def register_step_pre_hook(self, hook: Callable[[], None]) -> RemovableHandle:
        """Calls ``hook()`` first thing in every :meth:`step`, before the shard changes (a snapshot or checkpoint
        copy of the previous state still in flight waits there). Returns a handle whose ``remove()`` unregisters
        it, as torch's optimizer hooks do."""
        return _register(self._step_pre_hooks, hook)

    def register_reduced_hook(self, hook: Callable[[], None]) -> RemovableHandle:
        """Calls ``hook()`` in every :meth:`step` right after the gradient shards hold the reduced gradients and
        before the clipping norm is taken (a pipeline sums the reduced gradients of a tied parameter's copies there,
        :meth:`reduced_gradient`). Returns a removable handle."""
        return _register(self._reduced_hooks, hook)

    def register_update_pre_hook(self, hook: Callable[[], None]) -> RemovableHandle:
        """Calls ``hook()`` in every :meth:`step` once the gradients are reduced and the clipping norm agreed, right
        before this rank updates its shard (fault injection kills a rank there). Returns a removable handle."""
        return _register(self._update_pre_hooks, hook)

    def register_gather_pre_hook(self, hook: Callable[[], None]) -> RemovableHandle:
        """Calls ``hook()`` in every :meth:`step` after this rank updated its shard, right before the parameter
        all-gather (the other ranks may already wait inside it). Returns a removable handle."""
        return _register(self._gather_pre_hooks, hook)

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
        for hook in list(self._step_pre_hooks.values()):
            hook()
        self._reducer.finish()
        for hook in list(self._reduced_hooks.values()):
            hook()
        if self._gatherer is not None:
            self._gatherer.free_all()  # e.g. a root gathered by an evaluation's forward: it would be stale
        coefficient = self._clip_coefficient()
        self.last_clip_coefficient = coefficient
        # Before the count moves: a hook that raises (a sink whose copy failed) leaves a step that can be rewound.
        for hook in list(self._update_pre_hooks.values()):
            hook()
        self.step_count += 1
        for shard in self._shards:
            shard.adamw_step(lr=self.lr, betas=self.config.betas, eps=self.config.eps,
                             weight_decay=self.config.weight_decay, step=self.step_count, grad_scale=coefficient)
        for hook in list(self._gather_pre_hooks.values()):
            hook()
        self._gather_parameters()

    def detach(self) -> None:
        """Removes the hooks this optimizer put on the model (stage 2's gradient hooks, stage 3's module hooks). Call
        before another optimizer takes the same model over: the old hooks would otherwise go on consuming its
        gradients. The optimizer is unusable afterwards."""
        self._reducer.remove()
        if self._gatherer is not None:
            self._gatherer.remove()

    def discard_step(self) -> None:
        """Forgets a step interrupted by a failure: partial gradients, reductions in flight (stage 2) and their
        staging buffers. Call before restoring a shard; the next backward then starts from zero."""
        self._reducer.discard()
        if self._gatherer is not None:
            self._gatherer.discard()  # the interrupted forward or backward left units gathered, or gathering
        for param in self._params.values():
            param.grad = None
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the next step (``set_to_none`` is accepted for torch.optim compatibility)."""
        self._reducer.zero_grad()

    def _clip_coefficient(self) -> float:
        """The factor that scales gradients to the clipping norm (1.0 when clipping is off or not needed).

        A non-finite norm is recorded but not used for scaling: the update then handles NaN/Inf elements itself.
        """
        # Summed in fp64 over blocks (GroupShard.add_grad_squares) so that the norm, and the clipping factor, barely
        # depend on how the gradient is sharded.
        squares = torch.zeros(1, dtype=torch.float64, device=self.device)
        for shard in self._shards:
            shard.add_grad_squares(squares)
        self._comm.all_reduce(squares)
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
        """Stages 1 and 2: every rank's new parameters into every rank's full buffers. Stage 3 gathers each unit
        when it is used (``stage3.UnitGatherer``): nothing to do here."""
        if self._gatherer is not None:
            return
        for shard in self._shards:
            self._comm.all_gather_params(shard)

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Makes every parameter of the model hold its full value inside the block (reading a state dict, comparing
        weights): at stage 3 every bucket is gathered (collective: every rank enters together) and freed on exit;
        at stages 1 and 2 they always are, and this does nothing."""
        if self._gatherer is None:
            yield
            return
        self._gatherer.gather_all()
        try:
            yield
        finally:
            self._gatherer.free_all()

    # ---------------------------------------------------------------- state
    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shard: fp32 master weights and optimizer state of every group, keyed ``"<group>/<what>"``
        (``shard.shard_key``; dtypes and shapes as ``shard.shard_table(self.layout)``).

        The tensors are the live buffers (copy them to keep a snapshot). Together with ``step_count`` and the layout
        they are everything the optimizer needs to resume bit-identically; the working parameters are derived.
        """
        tensors: dict[str, torch.Tensor] = {}
        for shard in self._shards:
            tensors.update(shard.tensors())
        return tensors

    @torch.no_grad()
    def load_shard_tensors(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Restores a shard saved by :meth:`shard_tensors` at the same layout, then re-gathers the parameters.

        Collective: every rank of the group calls it with its own shard.
        """
        own = self.shard_tensors()
        _check_same_shard(tensors, own)
        for key, target in own.items():
            target.copy_(tensors[key])
        if self._gatherer is not None:
            self._gatherer.free_all()  # anything gathered holds the old values
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

    def reduced_gradient(self, name: str) -> torch.Tensor:
        """The whole reduced (data-parallel mean) gradient of parameter ``name``, in fp32, inside a
        :meth:`register_reduced_hook` hook. Collective over the group (an all-reduce of the parameter's size)."""
        shard, slot = self._slots[name]
        full = shard.grad_elements(slot)
        self._comm.all_reduce(full)
        return full.view(slot.shape)

    def set_reduced_gradient(self, name: str, value: torch.Tensor) -> None:
        """Writes this rank's elements of ``value`` (parameter ``name``'s whole gradient) into its gradient shard,
        inside a :meth:`register_reduced_hook` hook; not collective."""
        shard, slot = self._slots[name]
        shard.set_grad_elements(slot, value)

    def working_parameters(self) -> list[torch.Tensor]:
        """The full flat working-parameter buffers (one per group) that the model's parameters are views of, at
        stages 1 and 2: the same on every rank after each all-gather. Empty at stage 3."""
        return [shard.flat_params for shard in self._shards if shard.flat_params is not None]

    def working_parameters_of(self, rank: int) -> list[torch.Tensor]:
        """The slices of :meth:`working_parameters` that rank ``rank`` owns, one per bucket. Empty at stage 3."""
        return [piece for shard in self._shards for piece in shard.flat_params_of(rank)]

    def owned_parameters_match_master(self) -> bool:
        """Whether this rank's own slices of the working parameters still hold its master shard's cast."""
        return all(shard.owned_params_match_master() for shard in self._shards)

    def gather_full(self, key: str) -> torch.Tensor:
        """The full flat tensor of the group named by ``key`` (``"<group>/<what>"``), in layout order.

        Collective: every rank calls it; scale tensors come back with one element per 256-element block.
        """
        group_name = split_shard_key(key)[0]
        index = [s.name for s in self._shards].index(group_name)
        return self._comm.all_gather_full(self._shards[index].layout, self.shard_tensors()[key])


def plan_layout(model: nn.Module, config: ZeroConfig, world_size: int, units: Units | None = None) -> FlatLayout:
    """The layout a :class:`ZeroOptimizer` of ``model`` under ``config`` gives its shards at ``world_size`` ranks
    (``units``: stage 3's, found from the model when not given). Needs no parameter data: the launcher sizes the
    snapshot segments with it from a model on the meta device."""
    if units is None and config.stage == 3:
        units = find_units(model, config.shard_units)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return build_layout(named, world_size=world_size, bucket_numel=config.bucket_numel,
                        kind_of=state_kind_rule(model, config), unit_of=None if units is None else units.unit_of)


def _register(hooks: OrderedDict[int, Callable[[], None]], hook: Callable[[], None]) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def _check_same_shard(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raises KeyError or ValueError unless ``tensors`` has exactly the keys, shapes and dtypes of ``own``."""
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


def _resolve_config(config: ZeroConfig | None, overrides: dict[str, object]) -> ZeroConfig:
    """``config``, or one built from keyword settings (never both: which would win is not obvious)."""
    if config is not None and overrides:
        raise TypeError("ZeroOptimizer: pass either a ZeroConfig or keyword settings, not both")
    if config is not None:
        return config
    known = {f.name for f in fields(ZeroConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"ZeroOptimizer: unknown settings {unknown}; ZeroConfig has {sorted(known)}")
    return ZeroConfig(**overrides)
