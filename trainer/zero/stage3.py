"""ZeRO stage 3: which parameters are gathered together (units), and the module hooks that gather and free them.

Units. A unit is a module whose parameters are gathered as one (``ZeroConfig.shard_units``; by default each child
of the model's largest ``nn.ModuleList``: the transformer blocks). Unit 0, the root, holds every other parameter,
and any parameter that modules of two units share (a tied embedding and head, say): such a parameter must be
present whenever either module runs. :func:`find_units` decides; the layout then keeps each unit's parameters in
buckets of their own (``layout.build_layout(unit_of=...)``).

When parameters exist (:class:`UnitGatherer`):

- the root's buckets are gathered when the model's forward starts and stay until their gradients are reduced;
- a unit's buckets are gathered right before its forward and freed right after it; when autograd reaches the
  unit's outputs in the backward, they are gathered again (a gradient hook on those outputs);
- a bucket is freed as soon as its reduce-scatter starts (every gradient of its parameters exists, so autograd no
  longer needs them), and whatever is still gathered when backward ends or the optimizer steps is freed then;
- with activation checkpointing the unit's forward runs again inside the backward, after that second gather: a
  unit whose backward has begun is not freed after such a forward (nor hooked again).

Prefetch: the first step records the order in which the forward runs the units; from its first backward on, a
unit's forward pre-hook also starts the gather of the unit after it, and its pre-backward hook the gather of the
unit before it, so that each gather (an asynchronous collective; on a GPU NCCL's own stream, which the compute
stream waits for only when the unit starts) overlaps the current unit's compute. At most two units and the root
are gathered at once. Every rank runs the same modules in the same order, so the gathers, like every collective,
match across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from regrow.comm.collectives import Pending
from regrow.trainer.zero.layout import FlatLayout
from regrow.trainer.zero.shard import GroupShard
from regrow.trainer.zero.shard_comm import ShardComm

BucketId = tuple[int, int]
"""(group index, bucket index) in the layout."""

ROOT = 0
"""The unit of every parameter outside the units, and of parameters two units share."""


@dataclass(frozen=True)
class Units:
    """The units of a model: their module names (index 0 is the root, ``""``) and each parameter's unit."""

    names: tuple[str, ...]
    of_param: dict[str, int]

    def unit_of(self, param_name: str) -> int:
        return self.of_param[param_name]


def default_unit_names(model: nn.Module) -> tuple[str, ...]:
    """The children of the model's largest ``nn.ModuleList`` by parameter count (its transformer blocks); none
    when it has no list (then everything is the root: gathered for the whole step, like stage 2 but with the
    memory of sharded parameters between steps)."""
    lists = [(sum(p.numel() for p in module.parameters()), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList)]
    if not lists:
        return ()
    _, name = max(lists)
    prefix = f"{name}." if name else ""
    return tuple(f"{prefix}{child}" for child, _ in model.get_submodule(name).named_children())


def find_units(model: nn.Module, names: Sequence[str]) -> Units:
    """Assigns every trainable parameter (by its first name, as ``named_parameters()`` lists it) to one of the
    units ``names`` (default: :func:`default_unit_names`) or to the root. Raises ValueError naming a unit that is
    not a module of ``model``, or units nested in one another."""
    names = tuple(names) or default_unit_names(model)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules or not name]
    if missing:
        raise ValueError(f"ZeroConfig.shard_units: {missing} are not modules of the model (see "
                         f"model.named_modules()); e.g. {list(default_unit_names(model))[:3]}")
    nested = [(a, b) for a in names for b in names if a != b and b.startswith(f"{a}.")]
    if nested:
        raise ValueError(f"ZeroConfig.shard_units: units must not contain one another, but {nested[0][1]!r} is "
                         f"inside {nested[0][0]!r}")
    # The units whose modules use each parameter (a shared one is listed under each unit that uses it).
    users: dict[int, set[int]] = {}
    for unit, name in enumerate(names, start=1):
        for param in modules[name].parameters():
            users.setdefault(id(param), set()).add(unit)
    outside = {id(p) for module_name, module in model.named_modules()
               if not any(module_name == n or module_name.startswith(f"{n}.") for n in names)
               for p in module.parameters(recurse=False)}
    of_param: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        units = users.get(id(param), set())
        of_param[name] = next(iter(units)) if len(units) == 1 and id(param) not in outside else ROOT
    return Units(names=("", *names), of_param=of_param)


class UnitGatherer:
    """Gathers and frees stage 3's buckets around each unit's forward and backward (module docstring).

    Contract: built once by the optimizer, after its shards adopted the parameters; :meth:`bucket_reduced` is the
    reducer's callback when a bucket's reduce-scatter starts; :meth:`free_all` at the end of backward and before an
    optimizer step or a restore; :meth:`gather_all` where every parameter must be present at once (a state dict,
    an evaluation outside the module hooks). Collective: every rank must run the same modules.
    """

    def __init__(self, model: nn.Module, units: Units, layout: FlatLayout, shards: Sequence[GroupShard],
                 comm: ShardComm) -> None:
        self._shards, self._comm = shards, comm
        # The layout never puts two units' parameters in one bucket, so each bucket has one unit.
        self._unit_of: dict[BucketId, int] = {
            (group_index, slot.bucket): units.unit_of(slot.name)
            for group_index, group in enumerate(layout.groups) for slot in group.params
        }
        self._buckets: list[list[BucketId]] = [[] for _ in units.names]
        for key, unit in self._unit_of.items():
            self._buckets[unit].append(key)
        modules = dict(model.named_modules())
        self._in_backward: set[int] = set()  # units gathered for their backward, not yet reduced
        self._pending: dict[BucketId, Pending] = {}  # gathers started and not waited for
        self._order: list[int] = []  # the units in the order the first forward ran them
        self._order_known = False  # set at the first backward: every unit of a forward has run by then
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(lambda module, args: self._before_root_forward())
        ]
        for unit, name in enumerate(units.names[1:], start=1):
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._before_forward(unit)))
            self._handles.append(module.register_forward_hook(self._after_forward(unit)))

    def _before_root_forward(self) -> None:
        self._gather(ROOT)
        if self._order_known and self._order:
            self._start(self._order[0])

    def _before_forward(self, unit: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not self._order_known and unit not in self._order:
                self._order.append(unit)
            self._gather(unit)
            if unit not in self._in_backward:  # not a recomputation inside the backward
                self._prefetch(unit, 1)

        return hook

    def _after_forward(self, unit: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if unit in self._in_backward:  # recomputed inside the backward (activation checkpointing): keep it
                return
            outputs = [t for t in _tensors(output) if t.requires_grad]
            if outputs and torch.is_grad_enabled():
                # Before autograd runs this unit's backward, it computes the gradient of one of its outputs.
                torch.autograd.graph.register_multi_grad_hook(outputs, lambda grads: self._before_backward(unit),
                                                              mode="any")
            self._free(unit)

        return hook

    def _before_backward(self, unit: int) -> None:
        self._order_known = True
        self._in_backward.add(unit)
        self._gather(unit)
        self._prefetch(unit, -1)

    def _prefetch(self, unit: int, direction: int) -> None:
        """Starts gathering the unit after ``unit`` in forward order (``direction`` 1) or before it (-1)."""
        if self._order_known and unit in self._order:
            index = self._order.index(unit) + direction
            if 0 <= index < len(self._order):
                self._start(self._order[index])

    def _start(self, unit: int) -> None:
        for key in self._buckets[unit]:
            if key not in self._pending and not self._sharded(key[0]).gathered[key[1]]:
                pending = self._comm.gather_bucket(self._shards[key[0]], key[1])
                if pending is not None:
                    self._pending[key] = pending

    def _gather(self, unit: int) -> None:
        self._start(unit)
        for key in self._buckets[unit]:
            self._wait(key)

    def _wait(self, key: BucketId) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.wait()

    def _release(self, key: BucketId) -> None:
        self._wait(key)  # never free memory a gather in flight writes into
        self._sharded(key[0]).free(key[1])

    def _free(self, unit: int) -> None:
        for key in self._buckets[unit]:
            self._release(key)

    def _sharded(self, group_index: int):
        sharded = self._shards[group_index].sharded
        assert sharded is not None, "UnitGatherer runs at stage 3 only"
        return sharded

    def bucket_reduced(self, key: BucketId) -> None:
        """Frees bucket ``key``: its reduce-scatter started, so every gradient of its parameters exists."""
        self._release(key)
        self._in_backward.discard(self._unit_of[key])

    def free_all(self) -> None:
        self._in_backward.clear()
        for key in list(self._pending):
            self._wait(key)
        for group_index in range(len(self._shards)):
            self._sharded(group_index).free_all()

    def discard(self) -> None:
        """Forgets gathers in flight of a step interrupted by a failure (their process group failed: never waited
        for) and frees every other bucket. A bucket whose gather was in flight keeps its memory, which the failed
        collective may still touch; its next gather writes into it again."""
        stuck, self._pending = set(self._pending), {}
        self._in_backward.clear()
        for group_index, shard in enumerate(self._shards):
            for bucket_index in range(len(shard.layout.buckets)):
                if (group_index, bucket_index) not in stuck:
                    self._sharded(group_index).free(bucket_index)

    def gather_all(self) -> None:
        for unit in range(len(self._buckets)):
            self._gather(unit)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _tensors(output: object) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists and dicts of them, e.g. a Hugging Face output)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _tensors(value)]
    return []
