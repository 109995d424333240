"""Whole-model fp32 views of a universal checkpoint: export (8-bit state dequantized) and import (a checkpoint
written from whole tensors). This is the bridge for converters (``regrow ckpt convert`` with
``checkpoint/universal/deepspeed/``'s ``FullState``) and for inspecting state outside regrow.

Both run in one process and read or write whole files; for loading into a training job use ``reshard.py``, which
reads only each rank's ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from regrow.checkpoint.universal import KEEP_LAST, verify
from regrow.checkpoint.universal.format import EXP_AVG, EXP_AVG_SQ, MASTER, Manifest, shard_key, step_dir_name
from regrow.checkpoint.universal.pieces import ParamPiece
from regrow.checkpoint.universal.reshard import MOMENTS, ParamReader
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.trainer.state import RngState, ShardState
from regrow.trainer.zero.codes import dequantize_blockwise, dynamic_code_map
from regrow.trainer.zero.layout import BLOCK_SIZE, StateKind, build_layout, round_up
from regrow.trainer.zero.shard import empty_shard

WHOLE_KINDS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class WholeState:
    """The Adam training state of a whole model: per parameter name, fp32 ``master``, ``exp_avg`` and
    ``exp_avg_sq`` tensors shaped like the parameter."""

    step: int
    params: dict[str, dict[str, torch.Tensor]]
    tokens_seen: int = 0
    data_cursor: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    config: dict = field(default_factory=dict)


def read_whole(ckpt: str | Path) -> WholeState:
    """Every parameter's fp32 master and moments from checkpoint ``ckpt`` (8-bit moments dequantized), with every
    byte read checked against its checksum."""
    ckpt = Path(ckpt)
    manifest = verify.require_structure(ckpt)
    loader = ParamReader(ckpt, manifest)
    params = {}
    for param in manifest.params:
        piece = ParamPiece(group="", param=param.name, numel=param.numel, shard_start=0, param_start=0,
                           length=round_up(param.numel, BLOCK_SIZE))
        kinds = {"master": loader.read(piece, MASTER)}
        for fp32, codes, scales, signed in MOMENTS:
            if param.state_bits == 8:
                values = dequantize_blockwise(loader.read(piece, codes), loader.read(piece, scales),
                                              dynamic_code_map(signed))
                kinds[fp32.name] = values[: param.numel]
            else:
                kinds[fp32.name] = loader.read(piece, fp32)
        params[param.name] = {kind: value.view(param.shape) for kind, value in kinds.items()}
    return WholeState(step=manifest.step, params=params, tokens_seen=manifest.tokens_seen,
                      data_cursor=dict(manifest.data_cursor), config=manifest.config)


def read_masters(ckpt: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest of checkpoint ``ckpt`` and every parameter's fp32 master, shaped like the parameter and in the
    manifest's order (the model's ``named_parameters()`` order, a tied weight once): the consolidated model weights,
    without the moments :func:`read_whole` also reads. Every byte read is checked against its checksum, and only
    files inside ``ckpt`` are opened (``confined.py``)."""
    ckpt = Path(ckpt)
    manifest = verify.require_structure(ckpt)
    loader = ParamReader(ckpt, manifest)
    masters = {}
    for param in manifest.params:
        piece = ParamPiece(group="", param=param.name, numel=param.numel, shard_start=0, param_start=0,
                           length=round_up(param.numel, BLOCK_SIZE))
        masters[param.name] = loader.read(piece, MASTER)[: param.numel].view(param.shape)
    return manifest, masters


def write_whole(root: str | Path, state: WholeState, *, keep_last: int = KEEP_LAST) -> Path:
    """Writes ``state`` as a committed checkpoint ``root/step_<step>`` (fp32 state for every parameter: a job with
    8-bit state quantizes it per parameter when it loads) and points ``latest`` at it. The RNG state stored is this
    process's (the source has none); the layout recorded is a one-rank layout of the parameters. ``root`` must not be
    in use by a running job (the writer removes temporaries it finds there)."""
    problems = [f"{name}: kinds {sorted(kinds)}, expected {list(WHOLE_KINDS)}"
                for name, kinds in state.params.items() if set(kinds) != set(WHOLE_KINDS)]
    if problems:
        raise ValueError("write_whole: " + "; ".join(problems))
    masters = [(name, kinds["master"]) for name, kinds in state.params.items()]
    layout = build_layout(masters, world_size=1, bucket_numel=2**62,
                          kind_of=lambda name, tensor: StateKind(bits=32, decay=tensor.ndim >= 2))
    tensors = empty_shard(layout)
    for group in layout.groups:
        for slot in group.params:
            for kind in (MASTER, EXP_AVG, EXP_AVG_SQ):
                source = state.params[slot.name][kind.name].detach().to(torch.float32).reshape(-1)
                tensors[shard_key(group.kind.name, kind)][slot.offset : slot.offset + slot.numel] = source
    writer = CheckpointWriter(WriterConfig(root=str(root), keep_last=keep_last, log=False), rank=0, world_size=1,
                              run_config=state.config)
    writer.save(ShardState(step=state.step, tensors=tensors, layout=layout.to_dict(), rank=0, rng=RngState.capture(),
                           data_cursor=dict(state.data_cursor), tokens_seen=state.tokens_seen))
    result = writer.wait()
    if result is None or result.status != "committed":
        raise OSError(f"write_whole: writing {Path(root) / step_dir_name(state.step)} failed: "
                      f"{result.error if result else 'no result'}")
    return Path(result.path)
