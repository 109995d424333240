"""DeepSpeed's on-disk names (deepspeed/checkpoint/constants.py and engine.py of :data:`DS_LAYOUT_VERSION`), tag
checks, and the parameter layout its model-states file records."""

from __future__ import annotations

import operator
import re
import reprlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError, UnsupportedCheckpointError
from regrow.checkpoint.universal.deepspeed.full_state import is_path_component

DS_LAYOUT_VERSION = "0.19.8"
"""The DeepSpeed release whose universal layout ``export_deepspeed_universal`` writes (and was tested against).
DeepSpeed's loader requires a ``ds_version`` in ``zero/optimizer_state.pt`` and checks it against old ZeRO-1 formats."""

MODEL_STATES = "mp_rank_00_model_states.pt"
"""The model-states file of data-parallel-only (model-parallel rank 00) checkpoints: parameter shapes, DP size."""
OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
"""One ZeRO-1/2 rank's optimizer partition; groups: the bf16 prefix, the data-parallel and the model-parallel rank."""
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
"""Per-rank model states, written only by ZeRO stage 3."""
PIPELINE_LAYER = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$|^layer_\d+-model_states\.pt$")
"""A pipeline-parallel layer file."""
UNIVERSAL_STATE_FILES = {"master": "fp32.pt", "exp_avg": "exp_avg.pt", "exp_avg_sq": "exp_avg_sq.pt"}
"""The file of each ``FullState`` kind in a universal checkpoint's ``zero/<param>/`` folder."""


def checked_tag(tag: str, what: str) -> str:
    """``tag`` when it is a single folder name; else :class:`DeepSpeedCheckpointError` naming ``what``."""
    if not is_path_component(tag):
        raise DeepSpeedCheckpointError(f"{what}: {tag!r} is not a tag (a single folder name)")
    return tag


def model_layout(model: Any, path: Path) -> tuple[list[OrderedDict[str, tuple[int, ...]]], int]:
    """The parameter shapes per optimizer group (in DeepSpeed's order) and the data-parallel size that the
    model-states dict ``model``, read from ``path``, records."""
    if not isinstance(model, dict):
        raise DeepSpeedCheckpointError(f"{path} holds a {type(model).__name__}, not DeepSpeed's model-states dict")
    shapes = model.get("param_shapes")
    if shapes is None:
        raise UnsupportedCheckpointError(f"{path} has no param_shapes: it was saved without ZeRO (its optimizer "
                                         "state is a plain state_dict in 'optimizer'); only ZeRO stage 1 and 2 "
                                         "checkpoints are supported")
    if isinstance(shapes, dict):
        shapes = [shapes]
    dp_size = model.get("dp_world_size")
    if not isinstance(dp_size, int) or dp_size < 1:
        raise DeepSpeedCheckpointError(f"{path}: dp_world_size={dp_size!r} is not a positive integer")
    if not isinstance(shapes, list) or not all(isinstance(group, dict) for group in shapes):
        raise DeepSpeedCheckpointError(f"{path}: param_shapes is not a list of {{name: shape}} dicts, one per group")
    groups = [OrderedDict((str(n), _shape(n, s, path)) for n, s in group.items()) for group in shapes]
    return groups, dp_size


def _shape(name: Any, dims: Any, path: Path) -> tuple[int, ...]:
    """The shape ``dims`` that ``path`` records for parameter ``name``: whole numbers >= 0 (a ``torch.Size``)."""
    try:
        shape = tuple(operator.index(d) for d in dims)
    except TypeError:
        shape = None
    if shape is None or any(d < 0 for d in shape):
        raise DeepSpeedCheckpointError(f"{path}: param_shapes gives {reprlib.repr(name)} the shape "
                                       f"{reprlib.repr(dims)}, not a list of whole numbers >= 0")
    return shape


def optim_files(folder: Path, dp_size: int, model_path: Path) -> list[Path]:
    """Every data-parallel rank's optimizer file in ``folder``, in rank order; exactly ``dp_size`` of one kind
    (plain or ``bf16_``), as ``model_path`` records."""
    found: dict[tuple[str, int], Path] = {}
    for p in folder.iterdir():
        match = OPTIM_STATES.match(p.name)
        if match:
            if match.group(3) != "00":
                raise UnsupportedCheckpointError(f"{p}: model-parallel rank {match.group(3)}; model-parallel "
                                                 "DeepSpeed checkpoints are not supported yet")
            found[(match.group(1) or "", int(match.group(2)))] = p
    prefixes = sorted({prefix for prefix, _ in found})
    if len(prefixes) > 1:
        raise DeepSpeedCheckpointError(f"{folder} mixes bf16_ and plain ZeRO optimizer files; keep one save's files")
    prefix = prefixes[0] if prefixes else ""
    missing = [folder / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp_size)
               if (prefix, r) not in found]
    if missing:
        raise DeepSpeedCheckpointError(
            f"missing optimizer state file(s) {', '.join(map(str, missing))}: {model_path} says the checkpoint "
            f"has dp_world_size={dp_size}, one optimizer file per data-parallel rank; copy every rank's file")
    extra = sorted(r for _, r in found if r >= dp_size)
    if extra:
        raise DeepSpeedCheckpointError(f"{folder} has optimizer files for ranks {extra}, but {model_path} says "
                                       f"dp_world_size={dp_size}; the files come from different saves")
    return [found[(prefix, r)] for r in range(dp_size)]
