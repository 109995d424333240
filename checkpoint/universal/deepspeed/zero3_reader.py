"""Reading DeepSpeed ZeRO stage 3 checkpoints: every parameter reassembled from its partitions in the ranks' flat
fp32 groups (``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt``), with the shapes and the data-parallel size
from rank 0's ``zero_pp_rank_0_mp_rank_00_model_states.pt``.

ZeRO-3 partitions each parameter on its own (DeepSpeed's ``zero_to_fp32.py`` reassembles them the same way): a
parameter of ``n`` elements is padded to a multiple of the data-parallel size ``W`` and rank ``r`` holds its r-th
part of ``ceil(n / W)`` elements; a rank's flat group is its parts of the group's parameters, in ``param_shapes``
order. So each parameter is the concatenation, in rank order, of the same range of every rank's flat group, cut
back to ``n`` elements. The Adam moments are laid out like the fp32 partition.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError, UnsupportedCheckpointError
from regrow.checkpoint.universal.deepspeed.full_state import KINDS, FullState, adam_partition, hyper_of
from regrow.checkpoint.universal.deepspeed.layout import model_layout, optim_files
from regrow.checkpoint.universal.deepspeed.unpickling import safe_load

ZERO3_RANK0_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""Rank 0's model-states file of a ZeRO-3 save (every rank writes one; they record the same layout)."""


def read_zero3(folder: Path) -> FullState:
    """The :class:`FullState` of the ZeRO-3 tag folder ``folder``. Raises :class:`DeepSpeedCheckpointError` for
    missing, partial or inconsistent files."""
    model_path = folder / ZERO3_RANK0_MODEL_STATES
    if not model_path.is_file():
        raise DeepSpeedCheckpointError(f"{model_path} is missing; it names the parameters, their shapes and the "
                                       "data-parallel size (copy every rank's files of the save)")
    shapes, dp_size = model_layout(safe_load(model_path), model_path)
    paths = optim_files(folder, dp_size, model_path)
    seen: set[str] = set()
    for group in shapes:
        twice = seen.intersection(group)
        if twice:
            raise DeepSpeedCheckpointError(f"{model_path}: {sorted(twice)[0]!r} is listed in two param groups")
        seen.update(group)

    pieces: dict[str, dict[str, list[torch.Tensor]]] = {name: {kind: [] for kind in KINDS} for name in seen}
    steps: dict[int, set[str]] = {}
    optims = []
    for path in paths:  # in rank order: each parameter's parts concatenate in it
        osd = _optimizer_dict(safe_load(path), path, dp_size)
        optims.append(osd)
        for index, (group, (fp32, moments, step)) in enumerate(zip(shapes, _groups(osd, path, len(shapes)),
                                                                   strict=True)):
            steps.setdefault(step, set()).add(path.name)
            offset = 0
            for name, shape in group.items():
                part = math.ceil(math.prod(shape) / dp_size)
                if offset + part > fp32.numel():
                    raise DeepSpeedCheckpointError(
                        f"{path}: group {index} holds {fp32.numel()} elements, but its parameters' parts need "
                        f"more (at {name}, elements [{offset}, {offset + part})); the file is truncated or comes "
                        f"from another save than {model_path}")
                pieces[name]["master"].append(fp32.narrow(0, offset, part))
                for kind in ("exp_avg", "exp_avg_sq"):
                    pieces[name][kind].append(moments[kind].narrow(0, offset, part))
                offset += part
    if len(steps) != 1:
        detail = ", ".join(f"{s} in {sorted(files)}" for s, files in sorted(steps.items()))
        raise DeepSpeedCheckpointError(f"the optimizer files of {folder} disagree on the Adam step: {detail}")
    params = {}
    for group in shapes:
        for name, shape in group.items():
            params[name] = {kind: torch.cat(pieces[name][kind])[: math.prod(shape)].view(shape) for kind in KINDS}
    precision = "bf16-" if paths[0].name.startswith("bf16_") else ""
    hyper = hyper_of(optims[0]["optimizer_state_dict"].get("param_groups"), [list(s) for s in shapes])
    return FullState(step=next(iter(steps)), params=params, hyper=hyper, source=f"deepspeed-{precision}zero3")


def _optimizer_dict(data: Any, path: Path, dp_size: int) -> dict:
    """The ``optimizer_state_dict`` of one rank's ZeRO-3 optimizer file, checked to hold what the reassembly reads."""
    osd = data.get("optimizer_state_dict") if isinstance(data, dict) else None
    if not isinstance(osd, dict):
        raise DeepSpeedCheckpointError(f"{path} has no optimizer_state_dict; not a DeepSpeed optimizer file")
    stage = osd.get("zero_stage")
    if stage is None or int(stage) != 3:
        raise DeepSpeedCheckpointError(f"{path} says zero_stage={stage!r}, but the folder holds ZeRO-3 per-rank "
                                       "model states; the files come from different saves")
    for key in ("fp32_flat_groups", "optimizer_state_dict"):
        if key not in osd:
            raise DeepSpeedCheckpointError(f"{path}: optimizer_state_dict lacks {key!r} (keys: {sorted(osd)})")
    count = osd.get("partition_count")
    if count is not None and int(count) != dp_size:
        raise UnsupportedCheckpointError(f"{path}: partition_count={count} differs from dp_world_size={dp_size}; "
                                         "hierarchical partitioning (ZeRO++) is not supported yet")
    return osd


def _groups(osd: dict, path: Path, n_groups: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], int]]:
    """Per param group of one rank's file: (fp32 flat partition, {exp_avg, exp_avg_sq}, Adam step)."""
    flat = osd["fp32_flat_groups"]
    base = osd["optimizer_state_dict"]
    states = base.get("state") if isinstance(base, dict) else None
    if not isinstance(flat, list) or not isinstance(states, dict) or len(flat) != n_groups:
        raise DeepSpeedCheckpointError(f"{path}: expected {n_groups} fp32 flat groups and a torch optimizer state, "
                                       f"one per param group of the model states")
    bad = [index for index in range(n_groups) if not isinstance(flat[index], torch.Tensor)]
    if bad:
        raise DeepSpeedCheckpointError(f"{path}: fp32_flat_groups[{bad[0]}] is not a tensor")
    return [adam_partition(str(path), index, states.get(index), flat[index]) for index in range(n_groups)]
