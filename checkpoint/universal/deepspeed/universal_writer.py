"""Writing DeepSpeed's universal layout, which a DeepSpeed engine of any data-parallel size and ZeRO stage 1 or 2
loads with ``"checkpoint": {"load_universal": true}``."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed.full_state import HYPER_KEYS, FullState
from regrow.checkpoint.universal.deepspeed.layout import (
    DS_LAYOUT_VERSION,
    MODEL_STATES,
    UNIVERSAL_STATE_FILES,
    checked_tag,
)


def export_deepspeed_universal(
    state: FullState,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    model_states: Mapping[str, Any] | None = None,
    write_hyper: bool = True,
) -> Path:
    """Writes ``state`` in DeepSpeed's universal layout under ``out_dir``; returns the tag folder.

    ``out_dir`` becomes a DeepSpeed load directory: ``engine.load_checkpoint(out_dir)`` with ``"checkpoint":
    {"load_universal": true}`` in the config restores masters, moments and step, at any data-parallel size and
    ZeRO stage 1 or 2. Written: ``<tag>/zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``,
    ``<tag>/zero/optimizer_state.pt``, ``<tag>/mp_rank_00_model_states.pt`` and ``latest_universal`` (``tag``
    defaults to ``global_step<step>_universal``). The folder is written under a temporary name and renamed into
    place, and ``latest_universal`` replaced atomically after it, so a reader never sees half a checkpoint.

    DeepSpeed pairs the checkpoint's optimizer groups with the engine's by position. With ``write_hyper`` (and
    hyper-parameters in ``state``), group i of the engine takes lr, betas, eps and weight_decay of the state's
    group i, as when DeepSpeed resumes its own checkpoints; otherwise the engine keeps its own. Whatever the
    grouping, every group's parameters are restored. ``model_states`` adds entries to the model-states file,
    e.g. ``lr_scheduler`` (required by an engine with a scheduler), ``global_samples`` or client state.
    """
    root = Path(out_dir)
    tag = checked_tag(tag or f"global_step{state.step}_universal", f"tag={tag!r}")
    final = root / tag
    if final.exists():
        raise FileExistsError(f"{final} already exists; pass another tag= or remove it first")
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{tag}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_universal(state, staging, model_states or {}, write_hyper)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pointer = root / f".latest_universal.partial-{os.getpid()}"
    pointer.write_text(tag)
    os.replace(pointer, root / "latest_universal")
    return final


def _write_universal(state: FullState, folder: Path, model_states: Mapping[str, Any], write_hyper: bool) -> None:
    """Writes every file of the universal layout of ``state`` into the new folder ``folder`` (the staging one)."""
    zero = folder / "zero"
    zero.mkdir(parents=True)
    # torch AdamW keeps the step as a float32 scalar tensor; DeepSpeed puts the loaded value into the optimizer
    # state as is, and AdamW would not advance a Python int.
    step = torch.tensor(float(state.step), dtype=torch.float32)
    for name, kinds in state.params.items():
        param_dir = zero / name
        param_dir.mkdir()
        for kind, file_name in UNIVERSAL_STATE_FILES.items():
            # A fresh contiguous copy: torch.save writes a view's whole storage, which may be a flat buffer.
            tensor = kinds[kind].detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
            torch.save({"param": tensor, "cat_dim": 0}, param_dir / file_name)
        torch.save(step, param_dir / "step.pt")

    groups = state.param_groups()
    known = state.hyper.get("param_groups") if write_hyper else None
    saved_groups: list[dict[str, Any]] = []
    for index in range(len(groups)):
        entry = known[index] if known else {}
        saved_groups.append({k: (tuple(entry[k]) if k == "betas" else entry[k]) for k in HYPER_KEYS if k in entry})
    # DeepSpeed walks zip(engine groups, checkpoint groups): a shorter list would skip the engine's later groups
    # entirely (their states never loaded). Empty entries change no hyper-parameter but keep every group loaded.
    saved_groups += [{} for _ in range(len(state.params) - len(saved_groups))]
    torch.save({"param_groups": saved_groups, "ds_version": DS_LAYOUT_VERSION}, zero / "optimizer_state.pt")

    shapes = [OrderedDict((n, torch.Size(state.params[n]["master"].shape)) for n in group) for group in groups]
    model = {
        "module": None,
        "param_shapes": shapes,
        "global_steps": state.step,
        "skipped_steps": 0,
        # The universal layout does not depend on the saving world; DeepSpeed records but does not use these here.
        "dp_world_size": 1,
        "mp_world_size": 1,
        "lr_scheduler": None,
        "ds_version": DS_LAYOUT_VERSION,
        "regrow_source": state.source,
    }
    model.update(model_states)
    torch.save(model, folder / MODEL_STATES)
