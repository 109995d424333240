"""One rank's shard of the ZeRO optimizer: the names of its tensors, and the buffers of each group.

The shard schema, used by every module that stores or rebuilds a shard (snapshots, universal checkpoints, the
launcher sizing snapshot segments): a rank's tensors are keyed ``"<group>/<what>"`` (:func:`shard_key`), where
``<group>`` is the group's ``StateKind.name`` and ``<what>`` is :data:`MASTER` (the fp32 master weights) followed by
the group's optimizer state, :data:`STATE_NAMES` of its state bits. :func:`shard_table` gives the dtype and shape of
every tensor of a layout in that order (the order of ``ZeroOptimizer.shard_tensors()``); :func:`empty_shard` builds
them as zeros.

:class:`GroupShard` holds this rank's buffers of one group and runs the AdamW update over them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from regrow.trainer.zero.adamw import adamw8bit_step, adamw32bit_step
from regrow.trainer.zero.codes import BLOCK_SIZE, zero_code
from regrow.trainer.zero.layout import FlatLayout, GroupLayout, ParamSlot, round_up
from regrow.trainer.zero.sharded_params import ShardedParams

MASTER = "master"
"""The fp32 master weights of a group's shard."""

STATE_NAMES: dict[int, tuple[str, ...]] = {
    32: ("exp_avg", "exp_avg_sq"),
    8: ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"),
}
"""The optimizer state of a group per state bits, in the order the AdamW updates take it: Adam's first moment, then
its second; 8-bit state as uint8 codes (one per element, names ending ``_codes``) and fp32 block scales (one per
256-element block, names ending ``_scales``); fp32 state as one value per element."""

_CODE_MAP_SIGNED = {"exp_avg_codes": True, "exp_avg_sq_codes": False}
"""Which code map each codes tensor indexes (``codes.dynamic_code_map(signed)``)."""


class TensorSpec(NamedTuple):
    """The dtype and shape of one shard tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def shard_key(group: str, what: str) -> str:
    """The key of tensor ``what`` (:data:`MASTER` or a name of :data:`STATE_NAMES`) of group ``group``."""
    return f"{group}/{what}"


def split_shard_key(key: str) -> tuple[str, str]:
    """``(group, what)`` of a key made by :func:`shard_key`."""
    group, _, what = key.partition("/")
    return group, what


def elements_per_value(what: str) -> int:
    """How many shard elements one value of tensor ``what`` stands for: 256 for block scales, else 1."""
    return BLOCK_SIZE if what.endswith("_scales") else 1


def group_table(group: GroupLayout) -> dict[str, TensorSpec]:
    """``what`` -> dtype and shape of one rank's shard of ``group`` (the same on every rank), master first."""
    n = group.shard_numel
    table = {MASTER: TensorSpec(torch.float32, (n,))}
    for what in STATE_NAMES[group.kind.bits]:
        dtype = torch.uint8 if what.endswith("_codes") else torch.float32
        table[what] = TensorSpec(dtype, (n // elements_per_value(what),))
    return table


def shard_table(layout: FlatLayout) -> dict[str, TensorSpec]:
    """Key -> dtype and shape of every tensor of one rank's shard of ``layout``, in ``shard_tensors()`` order."""
    return {
        shard_key(group.kind.name, what): spec for group in layout.groups for what, spec in group_table(group).items()
    }


def empty_shard(layout: FlatLayout, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zero shard tensors of one rank of ``layout``, keyed as :func:`shard_table`; 8-bit codes hold the zero code of
    their map, so every value reads back as exactly zero (as after any step)."""
    tensors = {}
    for key, spec in shard_table(layout).items():
        what = split_shard_key(key)[1]
        fill = zero_code(_CODE_MAP_SIGNED[what]) if what in _CODE_MAP_SIGNED else 0
        tensors[key] = torch.full(spec.shape, fill, dtype=spec.dtype, device=device)
    return tensors


class GroupShard:
    """This rank's buffers for one group: the working parameters, and its shard of the fp32 master weights, the fp32
    gradient (reduced into by the optimizer's reducer) and the optimizer state.

    The working parameters are the full flat buffer ``flat_params`` at stages 1 and 2; with ``shard_params``
    (stage 3) they are ``sharded`` (``sharded_params.ShardedParams``: each bucket's full parameters only while
    gathered, cast from the master shard as they are gathered) and ``flat_params`` is None. ``norm_skip`` names
    parameters whose gradients do not count towards the clipping norm (see :meth:`add_grad_squares`).

    Construction takes the group's parameters over (``params``, by name): their values become the master shard
    and each parameter a view of the working buffers. The master shard is made first, the parameters adopted, and
    only then the gradient shard and the state: the model's own (fp32) parameters are released as they are
    adopted, so that a model built on the GPU never coexists with the whole shard (the peak of adopting the largest
    models at stage 3 is the model plus its master shard).
    """

    def __init__(
        self,
        layout: GroupLayout,
        rank: int,
        device: torch.device,
        param_dtype: torch.dtype,
        params: dict[str, torch.nn.Parameter],
        norm_skip: frozenset[str] = frozenset(),
        shard_params: bool = False,
        grad_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layout = layout
        self.pieces = layout.shard_pieces(rank)
        self.device = device
        self.sharded = ShardedParams(layout, param_dtype, device) if shard_params else None
        self.flat_params = None if shard_params else torch.zeros(layout.numel, dtype=param_dtype, device=device)
        table = group_table(layout)
        self.master = torch.zeros(table[MASTER].shape, dtype=torch.float32, device=device)
        self._adopt_parameters(params)
        self.grad = torch.zeros(layout.shard_numel, dtype=grad_dtype, device=device)
        # Codes start as byte 0 rather than the zero code: with a scale of 0 every code reads back as zero.
        self.state: dict[str, torch.Tensor] = {
            what: torch.zeros(spec.shape, dtype=spec.dtype, device=device)
            for what, spec in table.items()
            if what != MASTER
        }
        self._norm_ranges = _counted_ranges(layout, self.pieces, norm_skip)

    @property
    def name(self) -> str:
        return self.layout.kind.name

    def _adopt_parameters(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Takes the fp32 master shard from the group's parameters, copies them into the working buffers and makes
        each parameter a view of them (so the all-gather after each step updates the model in place). At stage 3
        this goes bucket by bucket, each freed once its parameters are views of it (they are gathered when used),
        so that adopting a model never holds more than one bucket of full parameters beside the model itself."""
        for slot in self.layout.params:
            self._copy_into_master(slot, params[slot.name].detach().reshape(-1))
        if self.sharded is None:
            assert self.flat_params is not None
            for slot in self.layout.params:
                self.flat_params[slot.offset : slot.offset + slot.numel].copy_(params[slot.name].detach().reshape(-1))
                params[slot.name].data = self.param_view(slot)
            return
        by_bucket: dict[int, list[ParamSlot]] = {}
        for slot in self.layout.params:
            by_bucket.setdefault(slot.bucket, []).append(slot)
        for index, slots in by_bucket.items():
            self.sharded.target(index)  # allocated
            for slot in slots:
                view = self.param_view(slot)
                view.copy_(params[slot.name].detach())
                params[slot.name].data = view
            self.sharded.free(index)

    def _copy_into_master(self, slot: ParamSlot, flat: torch.Tensor) -> None:
        """Copies the elements of parameter ``slot`` (``flat``, its values in order) that lie in this rank's pieces
        into the master shard (the rest of the shard is padding and stays zero)."""
        for in_shard, in_param in self.owned_ranges(slot):
            self.master[in_shard].copy_(flat[in_param])

    @torch.no_grad()
    def grad_elements(self, slot: ParamSlot) -> torch.Tensor:
        """Parameter ``slot``'s whole flattened gradient in fp32, zero except for the elements this shard holds."""
        full = torch.zeros(slot.numel, dtype=torch.float32, device=self.device)
        for in_shard, in_param in self.owned_ranges(slot):
            full[in_param].copy_(self.grad[in_shard])
        return full

    @torch.no_grad()
    def set_grad_elements(self, slot: ParamSlot, value: torch.Tensor) -> None:
        """Writes the elements of ``value`` (parameter ``slot``'s whole gradient) this shard holds into it."""
        flat = value.reshape(-1)
        for in_shard, in_param in self.owned_ranges(slot):
            self.grad[in_shard].copy_(flat[in_param])

    def flat_params_of(self, rank: int) -> list[torch.Tensor]:
        """The slices of ``flat_params`` that rank ``rank`` owns (its update writes them, its all-gather sends them),
        one per bucket; empty at stage 3."""
        if self.flat_params is None:
            return []
        return [self.flat_params[start : start + length] for start, _, length in self.layout.shard_pieces(rank)]

    @torch.no_grad()
    def owned_params_match_master(self) -> bool:
        """Whether this rank's slices of ``flat_params`` still hold its master shard cast to their dtype, as the
        update and the all-gather left them (True at stage 3, where the gathers cast the master shard itself). Casts
        one piece at a time."""
        if self.flat_params is None:
            return True
        return all(torch.equal(self.owned_params(start, local, length),
                               self.master[local : local + length].to(self.flat_params.dtype))
                   for start, local, length in self.pieces)

    def owned_ranges(self, slot: ParamSlot) -> Iterator[tuple[slice, slice]]:
        """For each of this rank's pieces that holds elements of parameter ``slot``: where they are in the shard,
        and which elements of the flattened parameter they are."""
        for flat_start, local_start, length in self.pieces:
            lo, hi = max(slot.offset, flat_start), min(slot.offset + slot.numel, flat_start + length)
            if lo < hi:
                yield (slice(local_start + lo - flat_start, local_start + hi - flat_start),
                       slice(lo - slot.offset, hi - slot.offset))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The master weights and optimizer state, keyed by :func:`shard_key` (the live buffers)."""
        named = {MASTER: self.master, **self.state}
        return {shard_key(self.name, what): tensor for what, tensor in named.items()}

    def param_view(self, slot: ParamSlot) -> torch.Tensor:
        if self.sharded is not None:
            return self.sharded.view(slot)
        assert self.flat_params is not None
        return self.flat_params[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def owned_params(self, flat_start: int, local_start: int, length: int) -> torch.Tensor:
        """This rank's slice of one bucket of the working parameters (the piece ``(flat_start, local_start,
        length)``) at stages 1 and 2: a slice of ``flat_params``, which the update writes and the all-gather sends
        in place (a separate shard buffer would cost 2 bytes per parameter / world size)."""
        assert self.flat_params is not None, "stage 3 gathers from the master shard (params_to_gather)"
        return self.flat_params[flat_start : flat_start + length]

    def params_to_gather(self, index: int) -> torch.Tensor:
        """Stage 3: this rank's slice of bucket ``index``'s working parameters, cast from the master shard (what
        the update of stages 1 and 2 writes into ``flat_params``: the same values). A temporary of the slice's size,
        so that no second copy of the parameters is kept between steps."""
        assert self.sharded is not None
        return self.master_piece(index).to(self.sharded.dtype)

    def master_piece(self, index: int) -> torch.Tensor:
        """This rank's slice of bucket ``index`` of the fp32 master shard."""
        _, local_start, length = self.pieces[index]
        return self.master[local_start : local_start + length]

    def state_slices(self, local_start: int, length: int) -> list[torch.Tensor]:
        """The optimizer state of shard elements ``[local_start, local_start + length)``; block scales are sliced
        per 256-element block (pieces are block-aligned)."""
        out = []
        for what, tensor in self.state.items():
            per = elements_per_value(what)
            out.append(tensor[local_start // per : (local_start + length) // per])
        return out

    def write_owned_params(self) -> None:
        """Casts the master shard into this rank's slices of the working parameters (stages 1 and 2; at stage 3 the
        gathers cast it)."""
        if self.flat_params is None:
            return
        for flat_start, local_start, length in self.pieces:
            self.owned_params(flat_start, local_start, length).copy_(self.master[local_start : local_start + length])

    def add_grad_squares(self, squares: torch.Tensor) -> None:
        """Adds the squared L2 norm of the gradient shard into ``squares`` (one fp64 element), leaving out the
        parameters of ``norm_skip``.

        Each 256-element block's norm is taken in fp32 and the blocks' squares are summed in fp64. A block holds one
        parameter's elements (and zero padding) whatever the layout, so the blocks' values do not depend on the
        sharding or the stage, only the order of the fp64 sum does; and the pass over the shard reads it at fp32
        speed (an fp64 reduction of every element costs twice as much on a GPU)."""
        for start, length in self._norm_ranges:
            blocks = self.grad[start : start + length].view(-1, BLOCK_SIZE)
            squares += torch.linalg.vector_norm(blocks, dim=1, dtype=torch.float32).double().square().sum()

    def adamw_step(self, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                   grad_scale: float = 1.0) -> None:
        """One AdamW update of the master shard from the gradient shard (already reduced) times ``grad_scale`` (the
        clipping coefficient), writing the new working parameters into this rank's slices of ``flat_params`` (stages
        1 and 2). Weight decay applies only to a group of decayed parameters.

        The 8-bit update, and any update of a bf16 gradient shard (which would round scaled values a second time),
        multiplies each element by ``grad_scale`` as it reads it. The fp32 update (torch's) would scale a converted
        copy, so an fp32 shard of a 32-bit group, scratch space, is scaled in place first: the same fp32 product."""
        eight_bit = self.layout.kind.bits == 8
        if not eight_bit and self.grad.dtype == torch.float32 and grad_scale != 1.0:
            self.grad.mul_(grad_scale)
            grad_scale = 1.0
        update = adamw8bit_step if eight_bit else adamw32bit_step
        decay = weight_decay if self.layout.kind.decay else 0.0
        # One call per bucket piece, so the new working parameters land directly in the flat buffer.
        for flat_start, local_start, length in self.pieces:
            update(
                self.master[local_start : local_start + length],
                self.grad[local_start : local_start + length],
                *self.state_slices(local_start, length),
                lr=lr,
                beta1=betas[0],
                beta2=betas[1],
                eps=eps,
                weight_decay=decay,
                step=step,
                grad_scale=grad_scale,
                param_out=None if self.flat_params is None else self.owned_params(flat_start, local_start, length),
            )


def _counted_ranges(
    layout: GroupLayout, pieces: list[tuple[int, int, int]], skip: frozenset[str]
) -> list[tuple[int, int]]:
    """The ``(local_start, length)`` ranges of a gradient shard that count towards the clipping norm: everything
    but the elements of parameters in ``skip``, in whole 256-element blocks (a skipped parameter is followed by zero
    padding up to the next block, where the next parameter starts)."""
    skipped = [(s.offset, round_up(s.offset + s.numel, BLOCK_SIZE)) for s in layout.params if s.name in skip]
    if not skipped:
        return [(0, layout.shard_numel)]
    ranges: list[tuple[int, int]] = []
    for flat_start, local_start, length in pieces:
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
