"""Which parts of which parameters a rank's shard holds: the bridge between a flat layout and per-parameter files.

A rank's shard of a group is its slice of every bucket (``GroupLayout.shard_pieces``). Each slice meets some
parameters; where it meets parameter ``p`` it holds a block-aligned range of ``p``'s *padded* elements (``p`` rounded
up to whole 256-element blocks). Both the writer (which bytes of ``params/p/<kind>.bin`` this rank writes) and the
loader (which bytes it reads, at another layout) work from these pieces, so resharding is only a matter of computing
the pieces of the new layout. A pipeline stage's pieces go through its :class:`CheckpointView` (:func:`view_pieces`):
its local names become the whole model's and a copy that another stage owns is read but not written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from regrow.checkpoint.universal.format import KindSpec
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.zero.layout import BLOCK_SIZE, FlatLayout, GroupLayout, round_up


@dataclass(frozen=True)
class ParamPiece:
    """Elements ``[param_start, param_start + length)`` of one parameter's padded range, held by one rank at
    ``[shard_start, shard_start + length)`` of its shard of ``group``. All four numbers are multiples of 256."""

    group: str
    param: str
    numel: int
    shard_start: int
    param_start: int
    length: int

    def file_span(self, kind: KindSpec) -> tuple[int, int]:
        """Stored elements of ``kind`` (in the parameter's file) that this piece covers."""
        return kind.span(self.param_start, self.param_start + self.length, self.numel)

    def shard_span(self, kind: KindSpec) -> tuple[int, int]:
        """Elements of the rank's shard tensor of ``kind`` that hold :meth:`file_span` (same length)."""
        first, last = self.file_span(kind)
        unit = BLOCK_SIZE if kind.per_block else 1
        start = self.shard_start // unit
        return start, start + (last - first)


def group_pieces(group: GroupLayout, rank: int) -> list[ParamPiece]:
    """Rank ``rank``'s pieces of ``group``, in shard order."""
    by_bucket: dict[int, list] = {}
    for slot in group.params:
        by_bucket.setdefault(slot.bucket, []).append(slot)
    pieces = []
    for bucket_index, (flat_start, local_start, length) in enumerate(group.shard_pieces(rank)):
        for slot in by_bucket.get(bucket_index, []):
            first = max(flat_start, slot.offset)
            last = min(flat_start + length, slot.offset + round_up(slot.numel, BLOCK_SIZE))
            if first < last:
                pieces.append(ParamPiece(
                    group=group.kind.name, param=slot.name, numel=slot.numel,
                    shard_start=local_start + first - flat_start, param_start=first - slot.offset,
                    length=last - first,
                ))
    return pieces


def rank_pieces(layout: FlatLayout, rank: int) -> list[ParamPiece]:
    """Every piece of rank ``rank`` over all groups of ``layout``."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank={rank} is outside the layout's world of {layout.world_size} ranks")
    return [piece for group in layout.groups for piece in group_pieces(group, rank)]


def view_pieces(layout: FlatLayout, view: CheckpointView, *, writing: bool) -> list[ParamPiece]:
    """The pieces of the rank that ``view`` describes, named as in the checkpoint: every piece when reading, only
    those of parameters it writes (not copies another holder writes) when ``writing``."""
    return [replace(piece, param=view.name(piece.param)) for piece in rank_pieces(layout, view.shard_rank)
            if not writing or view.writes(piece.param)]
