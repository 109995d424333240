"""Loading a universal checkpoint at any layout: another world size, ZeRO stage or optimizer-state precision.

A checkpoint saved at world size W, stage S, state bits B loads at W', S', B'. Each rank computes the pieces of its
new shard (``pieces.rank_pieces`` of the new layout) and reads exactly those byte ranges of the per-parameter files
(``os.preadv`` at offsets, straight into the shard tensors where possible), never whole files. Per parameter:

- fp32 master and fp32 moments: copied bit for bit;
- 8-bit -> 8-bit: the codes (padding codes of the last block included) and block scales are copied bit for bit;
- 8-bit -> fp32: dequantized (``codes.dequantize_blockwise``, signed map for the first moment);
- fp32 -> 8-bit: quantized per parameter block (``codes.quantize_blockwise``): blocks start at the parameter's start
  at every layout, so a rank quantizing its range produces exactly the blocks a whole-parameter quantization would.

A pipeline stage reads through its ``CheckpointView`` (``trainer/checkpoint_view.py``): its pieces are named as in
the whole model, copies of a shared parameter included, so a checkpoint of any pipeline layout (or none) loads at any
other. The Adam step count and learning-rate scale come from the manifest's ``pipeline`` section when it has one:
every parameter a rank reads must have been saved by stages that agree on them.

The stage does not appear in the shard at all (stages 1 and 2 keep the same shard), so it is free to change. Elements
that belong to no parameter (padding) are zero, and 8-bit padding holds the zero code of its map, as after any step.

Verification before anything is used: every rank checks the manifest and every file's size, then the crc32 of every
stored chunk it reads. Which checkpoint the ranks load (and the fall back to an older one when ``latest`` does not
verify) is ``load.py``'s; this module reads one checkpoint into one rank's :class:`ShardState`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from regrow.checkpoint.rng import decode_checked
from regrow.checkpoint.universal import confined, verify
from regrow.checkpoint.universal.format import (
    EXP_AVG,
    EXP_AVG_CODES,
    EXP_AVG_SCALES,
    EXP_AVG_SQ,
    EXP_AVG_SQ_CODES,
    EXP_AVG_SQ_SCALES,
    KINDS_BY_BITS,
    MANIFEST_NAME,
    MASTER,
    CheckpointError,
    CheckpointMismatch,
    CorruptCheckpoint,
    KindSpec,
    Manifest,
    shard_key,
)
from regrow.checkpoint.universal.pieces import ParamPiece, view_pieces
from regrow.checkpoint.universal.user_part import load_user
from regrow.checkpoint.universal.verified_read import VerifiedFile
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.data import DataCursor
from regrow.trainer.state import RngState, ShardState
from regrow.trainer.zero.codes import CODE_MAP_VERSION, dequantize_blockwise, dynamic_code_map, quantize_blockwise
from regrow.trainer.zero.layout import FlatLayout
from regrow.trainer.zero.shard import empty_shard

# (fp32 kind, codes kind, scales kind, signed code map) per Adam moment.
MOMENTS = ((EXP_AVG, EXP_AVG_CODES, EXP_AVG_SCALES, True), (EXP_AVG_SQ, EXP_AVG_SQ_CODES, EXP_AVG_SQ_SCALES, False))


def check_model(manifest: Manifest, layout: FlatLayout, where: str, view: CheckpointView | None = None) -> None:
    """Raises :class:`CheckpointMismatch` listing every parameter missing, unexpected or of another shape: the
    checkpoint's against the whole model's (``view.model``, or the layout's slots by their checkpoint names)."""
    saved = {p.name: tuple(p.shape) for p in manifest.params}
    view = view or CheckpointView.identity(0)
    model = {view.name(slot.name): tuple(slot.shape) for group in layout.groups for slot in group.params}
    if view.model is not None:
        outside = sorted(name for name in model if name not in view.model)
        if outside:
            raise ValueError(f"check_model: the view's model lacks this shard's parameters {outside}")
        model = dict(view.model)
    problems = [f"{name}: in the model {list(shape)}, not in the checkpoint"
                for name, shape in model.items() if name not in saved]
    problems += [f"{name}: in the checkpoint {list(shape)}, not in the model"
                 for name, shape in saved.items() if name not in model]
    problems += [f"{name}: checkpoint shape {list(saved[name])}, model shape {list(shape)}"
                 for name, shape in model.items() if name in saved and saved[name] != shape]
    if problems:
        raise CheckpointMismatch(where, problems)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


class ParamReader:
    """Reads the pieces of parameters from a checkpoint, converting between 8-bit and fp32 state as the target
    layout needs (see the module docstring); every byte read is checked against its chunk's checksum."""

    def __init__(self, ckpt: Path, manifest: Manifest) -> None:
        self.ckpt, self.manifest = ckpt, manifest
        self.source_bits = {p.name: p.state_bits for p in manifest.params}
        self.entries = {(t.param, t.kind): t for t in manifest.tensors}
        self.bytes_read = 0
        """Bytes read from tensor files so far (what this rank cost the storage)."""

    def read(self, piece: ParamPiece, kind: KindSpec) -> torch.Tensor:
        """The stored elements of ``kind`` that ``piece`` covers, as a new tensor (checksums verified)."""
        first, last = piece.file_span(kind)
        out = torch.empty(last - first, dtype=kind.torch_dtype)
        entry = self.entries[(piece.param, kind.name)]
        self.bytes_read += VerifiedFile(self.ckpt, entry).read(first * kind.itemsize, last * kind.itemsize,
                                                                 _bytes_of(out))
        return out

    def read_into(self, piece: ParamPiece, kind: KindSpec, shard: torch.Tensor) -> None:
        """Like :meth:`read`, but straight into the rank's shard tensor (no copy)."""
        first, last = piece.file_span(kind)
        start, stop = piece.shard_span(kind)
        entry = self.entries[(piece.param, kind.name)]
        self.bytes_read += VerifiedFile(self.ckpt, entry).read(first * kind.itemsize, last * kind.itemsize,
                                                                 _bytes_of(shard[start:stop]))

    def fill(self, piece: ParamPiece, target_bits: int, tensors: dict[str, torch.Tensor]) -> None:
        def shard(kind: KindSpec) -> torch.Tensor:
            return tensors[shard_key(piece.group, kind)]

        self.read_into(piece, MASTER, shard(MASTER))
        source_bits = self.source_bits[piece.param]
        if source_bits == target_bits:
            for kind in KINDS_BY_BITS[target_bits][1:]:
                self.read_into(piece, kind, shard(kind))
            return
        for fp32, codes, scales, signed in MOMENTS:
            code_map = dynamic_code_map(signed)
            if source_bits == 8:  # 8-bit -> fp32: dequantize whole blocks, keep the parameter's elements
                values = dequantize_blockwise(self.read(piece, codes), self.read(piece, scales), code_map)
                start, stop = piece.shard_span(fp32)
                shard(fp32)[start:stop] = values[: stop - start]
            else:  # fp32 -> 8-bit: quantize whole blocks (zeros beyond the parameter's end, as in training)
                values = torch.zeros(piece.length, dtype=torch.float32)
                stored = self.read(piece, fp32)
                values[: stored.numel()] = stored
                new_codes, new_scales = quantize_blockwise(values, code_map)
                for kind, data in ((codes, new_codes), (scales, new_scales)):
                    start, stop = piece.shard_span(kind)
                    shard(kind)[start:stop] = data


def load_shard(ckpt: Path, manifest: Manifest, layout: FlatLayout, rank: int, view: CheckpointView | None = None
               ) -> tuple[dict[str, torch.Tensor], int]:
    """Rank ``rank``'s shard tensors of ``layout`` (on the CPU) from checkpoint ``ckpt``, reading only its ranges;
    returns them and the number of bytes read. ``view`` maps a pipeline stage's shard onto the files (default: the
    identity view of ``rank``).

    Raises :class:`CheckpointMismatch` for another model, :class:`CorruptCheckpoint` for a chunk that fails its
    checksum, :class:`CheckpointError` for 8-bit codes of an unknown code map.
    """
    view = view or CheckpointView.identity(rank)
    check_model(manifest, layout, str(ckpt), view)
    if any(p.state_bits == 8 for p in manifest.params) and manifest.code_map_version != CODE_MAP_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} stores 8-bit state of code map {manifest.code_map_version!r}, but this regrow uses "
            f"{CODE_MAP_VERSION!r}: load it with the regrow version that wrote it and convert it to fp32 state"
        )
    loader = ParamReader(ckpt, manifest)
    tensors = empty_shard(layout)
    bits = {group.kind.name: group.kind.bits for group in layout.groups}
    for piece in view_pieces(layout, view, writing=False):
        loader.fill(piece, bits[piece.group], tensors)
    return tensors, loader.bytes_read


def stage_values(ckpt: Path, manifest: Manifest, layout: FlatLayout, view: CheckpointView, step: int
                 ) -> tuple[int, float]:
    """``(Adam step count, learning-rate scale)`` for the rank of ``view``: from the pipeline stages that saved its
    parameters (they must agree), or ``(step, 1.0)`` for a checkpoint without a ``pipeline`` section. Raises
    :class:`CheckpointError` when they disagree, or when a rank that keeps no learning-rate scale (not a pipeline
    stage) would need one."""
    if manifest.pipeline is None:
        return step, 1.0
    stage_of = manifest.pipeline.stage_of()
    sources: dict[tuple[int, float], list[int]] = {}
    for group in layout.groups:
        for slot in group.params:
            entry = stage_of[view.name(slot.name)]
            stages = sources.setdefault((entry.optimizer_steps, entry.lr_scale), [])
            if entry.stage not in stages:
                stages.append(entry.stage)
    if len(sources) > 1:
        saved = "; ".join(f"stages {stages}: Adam step {steps}, lr_scale {scale}" for (steps, scale), stages
                          in sorted(sources.items(), key=lambda item: item[1]))
        raise CheckpointError(
            f"checkpoint {ckpt} was saved by pipeline stages whose optimizer values differ ({saved}; a stage rebuilt "
            f"from its neighbours restarts them), and this rank would hold parameters of several of them: load it at "
            f"its own pipeline layout ({manifest.pipeline.stages} stages), where each stage keeps its own values")
    values = next(iter(sources), (step, 1.0))
    if view.stage is None and values[1] != 1.0:
        raise CheckpointError(
            f"checkpoint {ckpt} holds pipeline stages trained at a learning-rate scale of {values[1]} (set by a "
            f"neighbour rebuild), which a data-parallel trainer does not keep: load it into a pipeline")
    return values


def load_rng(ckpt: Path, manifest: Manifest, rank: int) -> RngState:
    """The RNG state for ``rank``: the saving rank's own at the same world size; otherwise saving rank
    ``rank % saved world size`` (random streams cannot be split or merged across world sizes). CUDA generator
    states are restored only for devices that exist here. Raises :class:`CorruptCheckpoint` for files that fail
    their checksum or do not hold a valid state."""
    entry = manifest.rng[rank % len(manifest.rng)]  # the parser checked that entry i is saving rank i
    blobs = []
    for small in (entry.json, entry.bin):
        data = confined.read_small(ckpt, small.file, small.nbytes)
        if len(data) != small.nbytes or zlib.crc32(data) != small.crc32:
            raise CorruptCheckpoint(str(ckpt), [f"{small.file}: bytes 0-{small.nbytes} fail their checksum"])
        blobs.append(data)
    try:
        rng = decode_checked(json.loads(blobs[0]), blobs[1])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, RuntimeError) as error:
        raise CorruptCheckpoint(str(ckpt), [f"{entry.json.file}: not a valid RNG state ({type(error).__name__})"]
                                ) from None
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rng.torch_cuda = rng.torch_cuda[:devices]
    return rng


def load_state(ckpt: Path, layout: FlatLayout, rank: int, view: CheckpointView | None = None
               ) -> tuple[ShardState, Manifest]:
    """A :class:`ShardState` of ``layout`` for ``rank`` (in the job: its RNG state is this rank's) from checkpoint
    ``ckpt``, verified as it is read; ``view`` maps a pipeline stage's shard onto the files. ``extra`` holds
    ``bytes_read`` (bytes this rank read from tensor files), ``optimizer_steps`` and ``lr_scale``
    (:func:`stage_values`)."""
    manifest = verify.require_structure(ckpt)
    try:  # checked here, before the ranks agree on this checkpoint: a bad cursor is damage, so they fall back
        DataCursor.from_dict(manifest.data_cursor)
    except ValueError as error:
        raise CorruptCheckpoint(str(ckpt), [f"{MANIFEST_NAME}: data_cursor: {error}"]) from error
    view = view or CheckpointView.identity(rank)
    tensors, bytes_read = load_shard(ckpt, manifest, layout, rank, view)
    steps, lr_scale = stage_values(ckpt, manifest, layout, view, manifest.step)
    extra: dict = {"optimizer_steps": steps, "lr_scale": lr_scale}
    if manifest.user is not None:  # a user loop's own state, the same for every rank (``user_part.py``)
        extra["user"], user = load_user(ckpt, manifest)
        tensors.update(user)
        bytes_read += sum(t.nbytes for t in manifest.user.tensors)
    extra["bytes_read"] = bytes_read
    state = ShardState(step=manifest.step, tensors=tensors, layout=layout.to_dict(), rank=rank,
                       rng=load_rng(ckpt, manifest, rank), data_cursor=dict(manifest.data_cursor),
                       tokens_seen=manifest.tokens_seen, extra=extra)
    return state, manifest
