"""Gradient reduction of the ZeRO optimizer: every bucket's gradients reduce-scattered into the gradient shards.

Stage 1 (:class:`StepReducer`) lets autograd accumulate into flat gradient buffers and reduces every bucket at
``step()``; stage 2 (:class:`BackwardReducer`) reduces each bucket during backward as soon as its gradients exist and
frees the full gradients early. Both launch the buckets in :func:`reduction_order`, the same on every rank, because
collectives must match across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from regrow.trainer.zero.layout import FlatLayout, ParamSlot
from regrow.trainer.zero.shard import GroupShard
from regrow.trainer.zero.shard_comm import Reduction, ShardComm

BucketId = tuple[int, int]
"""(group index, bucket index) in the layout."""


class GradientReducer(Protocol):
    """What the optimizer needs of either stage's reducer."""

    def finish(self) -> None:
        """Completes this step's reductions: the gradient shards hold the mean gradients afterwards. Collective."""

    def discard(self) -> None:
        """Forgets reductions of an interrupted backward (their process group failed: never waited for)."""

    def zero_grad(self) -> None:
        """Clears the gradients this reducer accumulates into (the gradient shards included), for the next step."""

    def remove(self) -> None:
        """Removes the hooks this reducer put on the parameters (another optimizer takes the model over)."""


def reduction_order(layout: FlatLayout, registration: list[str]) -> list[BucketId]:
    """All (group, bucket) pairs in the order backward is expected to complete them: a bucket is complete when its
    earliest-registered parameter has its gradient, and backward runs roughly in reverse registration order."""
    position = {name: i for i, name in enumerate(registration)}
    earliest: dict[BucketId, int] = {}
    for group_index, group in enumerate(layout.groups):
        for slot in group.params:
            key = (group_index, slot.bucket)
            earliest[key] = min(earliest.get(key, len(position)), position[slot.name])
    return sorted(earliest, key=lambda key: (-earliest[key], key))


class StepReducer:
    """Stage 1: every ``param.grad`` is a view into one flat gradient buffer per group, so autograd accumulates
    micro-batches in place and the buckets are reduce-scattered at ``step()`` without a copy."""

    def __init__(
        self,
        shards: Sequence[GroupShard],
        params: dict[str, nn.Parameter],
        order: list[BucketId],
        comm: ShardComm,
        reduce_dtype: torch.dtype,
    ) -> None:
        self._shards, self._params, self._order, self._comm = shards, params, order, comm
        self._reduce_dtype = reduce_dtype
        self._flat_grads = [self._bind_gradients(shard) for shard in shards]

    def _bind_gradients(self, shard: GroupShard) -> torch.Tensor:
        flat = torch.zeros_like(shard.flat_params)
        for slot in shard.layout.params:
            self._params[slot.name].grad = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        return flat

    def finish(self) -> None:
        for shard, flat in zip(self._shards, self._flat_grads):
            for slot in shard.layout.params:
                self._rebind_gradient(slot, flat)
        inflight = []
        for group_index, bucket_index in self._order:
            bucket = self._shards[group_index].layout.buckets[bucket_index]
            staging = self._flat_grads[group_index][bucket.start : bucket.start + bucket.size]
            inflight.append(
                self._comm.reduce_scatter(self._shards[group_index], bucket_index, staging.to(self._reduce_dtype))
            )
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

    def discard(self) -> None:
        """Nothing is in flight outside :meth:`finish`; the flat buffers are cleared by :meth:`zero_grad`."""

    def remove(self) -> None:
        """No hooks: the gradients are views of the flat buffers, which the next optimizer's reducer rebinds."""

    def zero_grad(self) -> None:
        for flat in self._flat_grads:
            flat.zero_()
        for shard in self._shards:
            shard.grad.zero_()


class BackwardReducer:
    """Stage 2: reduce-scatters each bucket as soon as backward has produced all of its gradients.

    Buckets are launched in one fixed order on every rank (collectives must match across ranks); the order is the
    expected readiness order, so waiting for it rarely delays a bucket. Anything not launched when backward ends
    (unused parameters) is launched from a callback queued on the autograd engine. At most ``max_inflight``
    reduce-scatters are in flight before the oldest is waited for (bounds memory).
    """

    def __init__(
        self,
        shards: Sequence[GroupShard],
        params: dict[str, nn.Parameter],
        order: list[BucketId],
        comm: ShardComm,
        reduce_dtype: torch.dtype,
        max_inflight: int,
        on_launch: Callable[[BucketId], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        """``on_launch(bucket)`` is called as a bucket's reduce-scatter starts, ``on_end()`` when backward ends
        (stage 3 frees gathered parameters there)."""
        self._shards, self._order, self._comm = shards, order, comm
        self._on_launch, self._on_end = on_launch, on_end
        self._reduce_dtype, self._max_inflight = reduce_dtype, max_inflight
        self.inflight: list[Reduction] = []
        self.staging: dict[BucketId, torch.Tensor] = {}
        self.ready: set[BucketId] = set()
        self.remaining: dict[BucketId, int] = {}
        self.next_index = 0
        self.callback_queued = False
        self._local = LocalGradients(shards, reduce_dtype) if comm.world_size == 1 else None
        self._reset_counts()
        self._handles = [params[slot.name].register_post_accumulate_grad_hook(self._hook(group_index, slot))
                         for group_index, shard in enumerate(shards) for slot in shard.layout.params]

    def _reset_counts(self) -> None:
        self.remaining = {}
        for group_index, shard in enumerate(self._shards):
            for slot in shard.layout.params:
                key = (group_index, slot.bucket)
                self.remaining[key] = self.remaining.get(key, 0) + 1
        self.ready.clear()
        self.next_index = 0

    def _hook(self, group_index: int, slot: ParamSlot) -> Callable[[torch.Tensor], None]:
        def on_gradient(param: torch.Tensor) -> None:
            if not self.callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self.callback_queued = True
            key = (group_index, slot.bucket)
            if self._local is not None:
                self._local.take(slot.name, param.grad)
            else:
                bucket = self._shards[group_index].layout.buckets[slot.bucket]
                staging = self._staging(key, bucket.size)
                start = slot.offset - bucket.start
                staging[start : start + slot.numel].copy_(param.grad.reshape(-1))
            param.grad = None  # the full gradient is no longer needed: this is what saves stage 2's memory
            self.remaining[key] -= 1
            if self.remaining[key] == 0:
                self.ready.add(key)
                self._launch_ready()

        return on_gradient

    def _staging(self, key: BucketId, size: int) -> torch.Tensor:
        if key not in self.staging:
            device = self._shards[key[0]].grad.device
            self.staging[key] = torch.zeros(size, dtype=self._reduce_dtype, device=device)
        return self.staging[key]

    def _launch_ready(self, everything: bool = False) -> None:
        order = self._order
        while self.next_index < len(order) and (everything or order[self.next_index] in self.ready):
            key = order[self.next_index]
            if self._local is None:
                bucket = self._shards[key[0]].layout.buckets[key[1]]
                staging = self._staging(key, bucket.size)
                del self.staging[key]
                self.inflight.append(self._comm.reduce_scatter(self._shards[key[0]], key[1], staging))
            self.next_index += 1
            if self._on_launch is not None:
                self._on_launch(key)
            # Fold in finished reductions right away (frees their staging buffers), and never keep more than
            # max_inflight in flight.
            while self.inflight and (len(self.inflight) > self._max_inflight or self.inflight[0].done()):
                self.inflight.pop(0).accumulate()

    def _end_of_backward(self) -> None:
        self._launch_ready(everything=True)
        if self._local is not None:
            self._local.settle()
        self._reset_counts()
        self.callback_queued = False
        if self._on_end is not None:
            self._on_end()

    def discard(self) -> None:
        self.inflight.clear()
        self.staging.clear()
        self._reset_counts()
        self.callback_queued = False

    def finish(self) -> None:
        while self.inflight:
            self.inflight.pop(0).accumulate()
        if self._local is not None:
            self._local.settle()  # a step without any backward since zero_grad: the shards must read zero

    def remove(self) -> None:
        """Removes the gradient hooks: left in place, they would take each gradient (and set it to None) before the
        next optimizer's hooks see it."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def zero_grad(self) -> None:
        """Clears the gradient shards (full gradients are freed as they are staged). With one rank nothing is
        written: the next gradient of each parameter overwrites its place instead of being added to it."""
        if self._local is not None:
            self._local.reset()
            return
        for shard in self._shards:
            shard.grad.zero_()


class LocalGradients:
    """Stage 2 and 3 with one rank: nothing to reduce, so each parameter's gradient goes straight from autograd
    into its place in the gradient shard, with no staging bucket, no zeroing pass and no second pass to add the
    bucket in (the single-replica path).

    The first gradient of a parameter after :meth:`reset` is copied (cast to the reduction dtype first, as the
    staged path rounds it), later ones (gradient accumulation) are added, as the staged path adds each bucket into
    a zeroed shard; :meth:`settle` zeroes the places of parameters that got no gradient. The shard's padding is
    never written and stays zero.
    """

    def __init__(self, shards: Sequence[GroupShard], reduce_dtype: torch.dtype) -> None:
        self._reduce_dtype = reduce_dtype
        self._places: dict[str, torch.Tensor] = {}
        for shard in shards:
            for slot in shard.layout.params:
                ranges = list(shard.owned_ranges(slot))
                assert len(ranges) <= 1, "one rank holds every parameter whole"
                for in_shard, _ in ranges:
                    self._places[slot.name] = shard.grad[in_shard]
        self._unwritten = set(self._places)

    def take(self, name: str, grad: torch.Tensor) -> None:
        """Puts parameter ``name``'s gradient ``grad`` (its full tensor) into the gradient shard."""
        place = self._places.get(name)
        if place is None:  # a parameter without elements
            return
        flat = grad.reshape(-1)
        if flat.dtype != self._reduce_dtype:
            flat = flat.to(self._reduce_dtype)
        if name in self._unwritten:
            place.copy_(flat)
            self._unwritten.discard(name)
        else:
            place.add_(flat)

    def settle(self) -> None:
        """Zeroes the places of the parameters that got no gradient since :meth:`reset` (unused in this
        backward); they count as written from then on."""
        for name in self._unwritten:
            self._places[name].zero_()
        self._unwritten.clear()

    def reset(self) -> None:
        """Starts a step: every place is overwritten by its parameter's next gradient."""
        self._unwritten = set(self._places)
