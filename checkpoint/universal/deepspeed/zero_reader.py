"""Reading DeepSpeed ZeRO stage 1 or 2 checkpoints: every parameter reassembled from its fragments in the ranks'
flat fp32 partitions (``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt``, one per data-parallel rank), with
the shapes and the data-parallel size from ``mp_rank_00_model_states.pt``. A ZeRO-3 save (per-rank model states)
is handed to ``zero3_reader.py``."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError, UnsupportedCheckpointError
from regrow.checkpoint.universal.deepspeed.full_state import KINDS, FullState, adam_partition, hyper_of
from regrow.checkpoint.universal.deepspeed.layout import (
    MODEL_STATES,
    OPTIM_STATES,
    PIPELINE_LAYER,
    ZERO3_MODEL_STATES,
    model_layout,
    optim_files,
)
from regrow.checkpoint.universal.deepspeed.unpickling import safe_load
from regrow.checkpoint.universal.deepspeed.zero3_reader import read_zero3


def read_zero(folder: Path) -> FullState:
    """The :class:`FullState` of the ZeRO tag folder ``folder``: every parameter reassembled from its fragments in
    each rank's flat partition (ZeRO-3: ``zero3_reader.read_zero3``). Raises :class:`UnsupportedCheckpointError`
    for pipeline- or model-parallel files, :class:`DeepSpeedCheckpointError` for missing, partial or inconsistent
    ones."""
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        if PIPELINE_LAYER.match(name):
            raise UnsupportedCheckpointError(f"{folder / name} is a pipeline-parallel layer file; pipeline-parallel "
                                             "DeepSpeed checkpoints are not supported yet")
    if any(ZERO3_MODEL_STATES.match(name) for name in names):  # per-rank model states: written only by ZeRO-3
        return read_zero3(folder)
    model_files = [n for n in names if n.startswith("mp_rank_") and n.endswith("_model_states.pt")]
    if model_files and model_files != [MODEL_STATES]:
        raise UnsupportedCheckpointError(f"{folder} holds {model_files}: model-parallel (tensor or pipeline) "
                                         "DeepSpeed checkpoints are not supported yet; only mp_rank_00 is read")
    if not model_files:
        found = [folder / n for n in names if OPTIM_STATES.match(n)]
        if found:  # the optimizer file may tell why (e.g. ZeRO-3 writes no mp_rank_00 file)
            _optimizer_dict(safe_load(found[0]), found[0])
        raise DeepSpeedCheckpointError(f"{folder / MODEL_STATES} is missing; it names the parameters, their shapes "
                                       "and the data-parallel size (copy it from the saving run)")
    model_path = folder / MODEL_STATES
    model = safe_load(model_path)
    shapes, dp_size = model_layout(model, model_path)
    optim_paths = optim_files(folder, dp_size, model_path)
    optims = [_optimizer_dict(safe_load(p), p) for p in optim_paths]

    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[int, set[str]] = {}
    for osd, optim_path in zip(optims, optim_paths):  # in rank order: see the reassembly below
        where = str(optim_path)
        groups = _partition_groups(osd, where, len(shapes), dp_size)
        for index, (group_shapes, (fp32, moments, step, mapping)) in enumerate(zip(shapes, groups)):
            steps.setdefault(step, set()).add(optim_path.name)
            for name, (start, numel) in _fragments(mapping, where, index, fp32.numel()).items():
                if name not in group_shapes:
                    raise DeepSpeedCheckpointError(f"{where}: param_slice_mappings[{index}] has {name!r}, which "
                                                   f"param_shapes[{index}] of {model_path} does not list")
                slot = pieces.setdefault(name, {kind: [] for kind in KINDS})
                slot["master"].append(fp32.narrow(0, start, numel))
                for kind in ("exp_avg", "exp_avg_sq"):
                    slot[kind].append(moments[kind].narrow(0, start, numel))
    if len(steps) != 1:
        detail = ", ".join(f"{s} in {sorted(files)}" for s, files in sorted(steps.items()))
        raise DeepSpeedCheckpointError(f"the optimizer files of {folder} disagree on the Adam step: {detail}")

    params: dict[str, dict[str, torch.Tensor]] = {}
    for index, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            # A parameter occupies one contiguous range of the group's flat buffer, and rank r owns the r-th
            # contiguous partition of it, so the parameter's fragments in rank order are the parameter in order.
            slot = pieces.get(name)
            have = sum(t.numel() for t in slot["master"]) if slot else 0
            if have != math.prod(shape):
                raise DeepSpeedCheckpointError(
                    f"{folder}: the fragments of {name} (group {index}) cover {have} of its {math.prod(shape)} "
                    f"elements across {len(optim_paths)} optimizer files; the files come from different saves or "
                    "one is truncated")
            params[name] = {kind: torch.cat(slot[kind]).view(shape) for kind in KINDS}
    zero_stage = {int(o.get("zero_stage", 0)) for o in optims}
    precision = "bf16-" if optim_paths[0].name.startswith("bf16_") else ""
    source = f"deepspeed-{precision}zero{zero_stage.pop()}" if len(zero_stage) == 1 else "deepspeed-zero"
    hyper = hyper_of(_torch_param_groups(optims[0]), [list(s) for s in shapes])
    return FullState(step=next(iter(steps)), params=params, hyper=hyper, source=source)


def _fragments(mapping: Any, where: str, index: int, partition: int) -> dict[str, tuple[int, int]]:
    """``param_slice_mappings[index]`` of one rank's file as name -> (start, numel), checked to be disjoint pieces
    of the group's ``partition``-element flat buffer, as DeepSpeed lays them out. Fragments that overlap would make
    the reader copy the same elements once per parameter naming them (memory unbounded by the file's size)."""
    if not isinstance(mapping, Mapping):
        raise DeepSpeedCheckpointError(f"{where}: param_slice_mappings[{index}] is a {type(mapping).__name__}, not a "
                                       "mapping of parameter names to fragments")
    fragments = {}
    for name, address in mapping.items():
        try:
            start, numel = operator.index(address.start), operator.index(address.numel)
        except (AttributeError, TypeError):
            raise DeepSpeedCheckpointError(f"{where}: param_slice_mappings[{index}][{name!r}] is not a fragment "
                                           "address with integer start and numel") from None
        if start < 0 or numel < 0 or start + numel > partition:
            raise DeepSpeedCheckpointError(f"{where}: fragment of {name} [{start}, {start + numel}) lies "
                                           f"outside the {partition}-element partition of group {index}")
        fragments[str(name)] = (start, numel)
    placed = sorted((start, name, numel) for name, (start, numel) in fragments.items() if numel)
    for (start, name, numel), (next_start, next_name, next_numel) in zip(placed, placed[1:]):
        if start + numel > next_start:
            raise DeepSpeedCheckpointError(
                f"{where}: param_slice_mappings[{index}]: the fragments of {name!r} [{start}, {start + numel}) and "
                f"{next_name!r} [{next_start}, {next_start + next_numel}) overlap; DeepSpeed's partitions hold each "
                "parameter once (the file is crafted or damaged)")
    return fragments


def _optimizer_dict(data: Any, path: Path) -> dict:
    """The ``optimizer_state_dict`` of one rank's optimizer file, checked to be ZeRO stage 1 or 2 with the keys the
    reassembly reads (a ZeRO-3 file here means its model-states files are missing)."""
    osd = data.get("optimizer_state_dict") if isinstance(data, dict) else None
    if not isinstance(osd, dict):
        raise DeepSpeedCheckpointError(f"{path} has no optimizer_state_dict; not a DeepSpeed optimizer file")
    stage = osd.get("zero_stage")
    if stage is not None and int(stage) == 3:
        raise DeepSpeedCheckpointError(f"{path} says zero_stage=3, but the per-rank model states of a ZeRO-3 save "
                                       f"(zero_pp_rank_<r>_mp_rank_00_model_states.pt) are missing from "
                                       f"{path.parent}; copy every rank's files of the save")
    if stage is not None and int(stage) not in (1, 2):
        raise UnsupportedCheckpointError(f"{path} says zero_stage={int(stage)}: ZeRO stage {int(stage)} checkpoints "
                                         "are not supported (stages 1, 2 and 3 are)")
    for key in ("single_partition_of_fp32_groups", "base_optimizer_state", "param_slice_mappings"):
        if key not in osd:
            raise DeepSpeedCheckpointError(f"{path}: optimizer_state_dict lacks {key!r} (keys: {sorted(osd)}); "
                                           "it was written by a DeepSpeed without per-parameter slice mappings")
    return osd


def _partition_groups(osd: dict, where: str, n_groups: int, dp_size: int
                      ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], int, Mapping[str, Any]]]:
    """Per param group of one rank's file: (fp32 partition, {exp_avg, exp_avg_sq}, step, name -> fragment)."""
    fp32_groups = osd["single_partition_of_fp32_groups"]
    mappings = osd["param_slice_mappings"]
    base = osd["base_optimizer_state"]
    # Rigid checkpoints (the default) hold torch's optimizer.state_dict(), one flat "parameter" per group; elastic
    # ones (zero_optimization.elastic_checkpoint) hold a list of per-group states and the step separately.
    states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
    counts = osd.get("partition_count")
    if counts is not None and any(int(c) != dp_size for c in (counts if isinstance(counts, list) else [counts])):
        raise UnsupportedCheckpointError(f"{where}: partition_count={counts} differs from dp_world_size={dp_size}; "
                                         "hierarchical or expert partitioning is not supported yet")
    if not (len(fp32_groups) == len(mappings) == n_groups):
        raise DeepSpeedCheckpointError(f"{where}: {len(fp32_groups)} fp32 partitions and {len(mappings)} slice "
                                       f"mappings, but the model states list {n_groups} param groups")
    fallback_step = osd.get("base_optimizer_state_step")
    return [(*adam_partition(where, index, states.get(index), fp32_groups[index], fallback_step), mappings[index])
            for index in range(n_groups)]


def _torch_param_groups(osd: dict) -> list[dict] | None:
    """The optimizer's param groups (with their hyper-parameters) that one rank's optimizer file holds, if any."""
    base = osd.get("base_optimizer_state")
    if isinstance(base, dict) and isinstance(base.get("param_groups"), list):
        return base["param_groups"]
    return osd.get("param_groups")
