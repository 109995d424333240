"""Reading DeepSpeed's universal layout (``ds_to_universal`` output, or what ``universal_writer`` writes): one file
per parameter and kind under ``zero/<name>/``, each already the whole parameter."""

from __future__ import annotations

from pathlib import Path

import torch

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError
from regrow.checkpoint.universal.deepspeed.full_state import FullState, adam_step, hyper_of, is_path_component
from regrow.checkpoint.universal.deepspeed.layout import MODEL_STATES, UNIVERSAL_STATE_FILES, model_layout
from regrow.checkpoint.universal.deepspeed.unpickling import safe_load


def read_universal(folder: Path) -> FullState:
    """The :class:`FullState` of the DeepSpeed universal tag folder ``folder`` (one file per parameter and kind under
    ``zero/``, already whole; the names and shapes from its model-states file). Raises
    :class:`DeepSpeedCheckpointError` for a missing or mis-shaped file or step files that disagree."""
    zero = folder / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = safe_load(optim_path)
    if not isinstance(optim, dict):
        raise DeepSpeedCheckpointError(f"{optim_path} holds a {type(optim).__name__}, not a dict")
    model_path = folder / MODEL_STATES
    if not model_path.is_file():
        raise DeepSpeedCheckpointError(f"{model_path} is missing; a universal checkpoint keeps the source's "
                                       "model-states file (DeepSpeed's loader needs it too)")
    shapes, _ = model_layout(safe_load(model_path), model_path)
    params: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[int, list[str]] = {}
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            if not is_path_component(name):
                raise DeepSpeedCheckpointError(f"{model_path} lists parameter {name!r}, which is not a folder name")
            kinds = {}
            for kind, file_name in UNIVERSAL_STATE_FILES.items():
                path = zero / name / file_name
                data = safe_load(path)
                tensor = data.get("param") if isinstance(data, dict) else None
                if not torch.is_tensor(tensor):
                    raise DeepSpeedCheckpointError(f"{path} has no 'param' tensor")
                if tuple(tensor.shape) != shape:
                    raise DeepSpeedCheckpointError(f"{path} holds shape {tuple(tensor.shape)}, but {model_path} "
                                                   f"says {name} has shape {shape}")
                kinds[kind] = tensor.detach().float().contiguous()
            params[name] = kinds
            step_path = zero / name / "step.pt"
            steps.setdefault(adam_step(safe_load(step_path), str(step_path)), []).append(name)
    if len(steps) != 1:
        detail = ", ".join(f"{s} for {len(n)} parameters" for s, n in sorted(steps.items()))
        raise DeepSpeedCheckpointError(f"the step.pt files under {zero} disagree on the Adam step: {detail}")
    # export_deepspeed_universal pads the group list with empty entries (see there); the model's groups come first.
    groups = optim.get("param_groups")
    groups = groups[: len(shapes)] if isinstance(groups, list) else None
    hyper = hyper_of(groups, [list(s) for s in shapes])
    return FullState(step=next(iter(steps)), params=params, hyper=hyper, source="deepspeed-universal")
