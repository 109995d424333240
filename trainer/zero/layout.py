"""Where every parameter lives in the flat, block-aligned buffers that the ZeRO optimizer shards.

Parameters are sorted into *groups* by how their optimizer state is kept (:class:`StateKind`: 8-bit or 32-bit
state, weight decay or not), so one fused update runs over a whole group. Inside a group every parameter starts
on a 256-element block boundary, so no quantization block straddles two parameters and a parameter's blocks and
scales do not depend on the world size. A group is cut into *buckets* (the unit of gradient reduce-scatter and
parameter all-gather), each padded to a multiple of ``world_size * 256``; rank r owns the r-th equal slice of every
bucket, so no block straddles two ranks. A rank's *shard* of a group is its slices of all buckets, concatenated.

Parameters are laid out in reverse registration order because backward produces their gradients roughly in that
order: the first bucket is complete first, and its reduce-scatter overlaps the rest of backward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from regrow.trainer.zero.codes import BLOCK_SIZE  # a parameter starts on a quantization block's boundary

LAYOUT_VERSION = 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class StateKind:
    """How a parameter's optimizer state is kept: 8 or 32 bits, with or without weight decay."""

    bits: int
    decay: bool

    @property
    def name(self) -> str:
        return f"{'q8' if self.bits == 8 else 'f32'}_{'decay' if self.decay else 'nodecay'}"


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in its group's flat buffer: elements ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    bucket: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Bucket:
    """Elements ``[start, start + size)`` of a group's flat buffer; ``size`` is a multiple of world_size * 256."""

    start: int
    size: int


@dataclass(frozen=True)
class GroupLayout:
    """The flat buffer of one :class:`StateKind` at one world size."""

    kind: StateKind
    world_size: int
    params: tuple[ParamSlot, ...]
    buckets: tuple[Bucket, ...]

    @property
    def numel(self) -> int:
        last = self.buckets[-1]
        return last.start + last.size

    @property
    def shard_numel(self) -> int:
        return self.numel // self.world_size

    def shard_pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """Rank ``rank``'s shard as ``(flat_start, local_start, length)`` pieces, one per bucket, in shard order."""
        pieces, local = [], 0
        for bucket in self.buckets:
            length = bucket.size // self.world_size
            pieces.append((bucket.start + rank * length, local, length))
            local += length
        return pieces


@dataclass(frozen=True)
class FlatLayout:
    """All groups of one model at one world size. Serialisable with :meth:`to_dict` / :meth:`from_dict`."""

    world_size: int
    groups: tuple[GroupLayout, ...]
    block_size: int = BLOCK_SIZE

    def group(self, name: str) -> GroupLayout:
        for group in self.groups:
            if group.kind.name == name:
                return group
        raise KeyError(f"no group {name!r}; groups are {[g.kind.name for g in self.groups]}")

    def slot(self, param_name: str) -> tuple[GroupLayout, ParamSlot]:
        for group in self.groups:
            for slot in group.params:
                if slot.name == param_name:
                    return group, slot
        raise KeyError(f"parameter {param_name!r} is not in the layout")

    def to_dict(self) -> dict:
        return {"version": LAYOUT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "FlatLayout":
        if data.get("version") != LAYOUT_VERSION:
            raise ValueError(f"layout version {data.get('version')} is not supported (expected {LAYOUT_VERSION})")
        groups = tuple(
            GroupLayout(
                kind=StateKind(**g["kind"]),
                world_size=g["world_size"],
                params=tuple(ParamSlot(p["name"], tuple(p["shape"]), p["offset"], p["bucket"]) for p in g["params"]),
                buckets=tuple(Bucket(**b) for b in g["buckets"]),
            )
            for g in data["groups"]
        )
        return cls(world_size=data["world_size"], groups=groups, block_size=data["block_size"])


def build_group(
    kind: StateKind, params: list[tuple[str, tuple[int, ...]]], world_size: int, bucket_numel: int,
    units: list[int] | None = None,
) -> GroupLayout:
    """Lays ``params`` (in the given order) into buckets of about ``bucket_numel`` elements. ``units`` (one per
    parameter; ZeRO stage 3): a bucket also ends where the unit changes, so no bucket holds two units' parameters."""
    align = world_size * BLOCK_SIZE
    slots: list[ParamSlot] = []
    buckets: list[Bucket] = []
    bucket_start, cursor = 0, 0
    for index, (name, shape) in enumerate(params):
        slot = ParamSlot(name, tuple(shape), cursor, len(buckets))
        slots.append(slot)
        cursor = round_up(cursor + slot.numel, BLOCK_SIZE)
        unit_ends = units is not None and index + 1 < len(params) and units[index + 1] != units[index]
        if cursor - bucket_start >= bucket_numel or (unit_ends and cursor > bucket_start):
            end = bucket_start + round_up(cursor - bucket_start, align)
            buckets.append(Bucket(bucket_start, end - bucket_start))
            bucket_start = cursor = end
    if cursor > bucket_start or not buckets:
        size = max(round_up(cursor - bucket_start, align), align)
        buckets.append(Bucket(bucket_start, size))
    return GroupLayout(kind=kind, world_size=world_size, params=tuple(slots), buckets=tuple(buckets))


def build_layout(
    named_params: Iterable[tuple[str, torch.Tensor]],
    *,
    world_size: int,
    bucket_numel: int,
    kind_of: Callable[[str, torch.Tensor], StateKind],
    unit_of: Callable[[str], int] | None = None,
) -> FlatLayout:
    """Builds the layout of ``named_params`` (registration order) for ``world_size`` ranks. ``unit_of`` (ZeRO stage
    3) names each parameter's unit: buckets never mix units (``build_group``)."""
    by_kind: dict[StateKind, list[tuple[str, tuple[int, ...]]]] = {}
    for name, param in reversed(list(named_params)):
        by_kind.setdefault(kind_of(name, param), []).append((name, tuple(param.shape)))
    order = sorted(by_kind, key=lambda k: (k.bits, not k.decay))
    groups = tuple(
        build_group(kind, by_kind[kind], world_size, bucket_numel,
                    None if unit_of is None else [unit_of(name) for name, _ in by_kind[kind]])
        for kind in order
    )
    return FlatLayout(world_size=world_size, groups=groups)
