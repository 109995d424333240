"""The layout-free, in-memory :class:`FullState` that DeepSpeed interop converts through, and its builders.

A :class:`FullState` is the whole model's Adam training state with no sharding in it: per parameter name one fp32
master tensor and the two moments, each shaped like the parameter, plus the Adam step and hyper-parameters. It does
not depend on regrow's on-disk format; the universal-format code converts to and from it separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError, UnsupportedCheckpointError

KINDS: tuple[str, ...] = ("master", "exp_avg", "exp_avg_sq")
"""The state kinds a :class:`FullState` holds per parameter, in this order."""

HYPER_KEYS: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay")
"""The Adam hyper-parameters carried between DeepSpeed and a :class:`FullState`."""


@dataclass
class FullState:
    """Model + Adam state of a whole model, one full fp32 tensor per parameter and kind (no sharding).

    Only what the optimizer trains: module buffers and frozen parameters are not part of it. Validated on
    construction: every parameter has exactly the kinds in :data:`KINDS`, all fp32 and shaped alike; names are
    usable as one path component (DeepSpeed's universal layout makes a directory per parameter); ``hyper``'s
    groups, when given, list every parameter once.
    """

    step: int
    """Adam steps taken (the bias correction of the next step uses ``step + 1``)."""
    params: dict[str, dict[str, torch.Tensor]]
    """Parameter name -> {"master": fp32, "exp_avg": fp32, "exp_avg_sq": fp32}, each shaped like the parameter.
    Names are those of ``model.named_parameters()`` (a tied weight appears once, under its first name)."""
    hyper: dict
    """JSON-able. ``param_groups``: list of {"params": [names], "lr", "betas", "eps", "weight_decay"} (keys only when
    known), in optimizer order; ``lr``, ``betas``, ``eps``, ``weight_decay`` at top level when every group agrees."""
    source: str
    """Where the state came from, e.g. "deepspeed-zero2", "deepspeed-universal", "torch"."""

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"FullState.step={self.step!r} must be an integer >= 0")
        if not self.params:
            raise ValueError("FullState.params is empty; a state needs at least one parameter")
        problems = []
        for name, kinds in self.params.items():
            if not is_path_component(name):
                problems.append(f"name {name!r} cannot be a directory name (empty, '.', '..' or has a slash)")
                continue
            if set(kinds) != set(KINDS):
                problems.append(f"{name} has kinds {sorted(kinds)}, expected {list(KINDS)}")
                continue
            shapes = {tuple(t.shape) for t in kinds.values()}
            dtypes = {t.dtype for t in kinds.values()}
            if len(shapes) != 1 or dtypes != {torch.float32}:
                problems.append(f"{name} has shapes {sorted(shapes)} and dtypes {sorted(map(str, dtypes))}; "
                                "all kinds must be fp32 and shaped like the parameter")
        try:
            json.dumps(self.hyper)
        except (TypeError, ValueError) as error:
            problems.append(f"hyper is not JSON-able ({error})")
        grouped = [n for group in self.hyper.get("param_groups") or [] for n in group.get("params", [])]
        if grouped and (len(grouped) != len(set(grouped)) or set(grouped) != set(self.params)):
            problems.append("hyper['param_groups'] must list every parameter name exactly once "
                            f"(missing {sorted(set(self.params) - set(grouped))}, "
                            f"unknown {sorted(set(grouped) - set(self.params))})")
        if problems:
            raise ValueError("invalid FullState: " + "; ".join(problems))

    def param_groups(self) -> list[list[str]]:
        """The parameter names of each optimizer group (one group of all parameters when the source had none)."""
        groups = self.hyper.get("param_groups")
        if not groups:
            return [list(self.params)]
        return [list(group["params"]) for group in groups]


def is_path_component(name: str) -> bool:
    """True when ``name`` can be one folder name: not empty, not ``.`` or ``..``, no separator or NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def adam_step(value: Any, where: str) -> int:
    """``value`` (a number or a scalar tensor, as optimizers keep it) as a whole Adam step; raises
    :class:`DeepSpeedCheckpointError` naming ``where`` when it is fractional or negative."""
    number = float(value.item()) if torch.is_tensor(value) else float(value)
    if not number.is_integer() or number < 0:
        raise DeepSpeedCheckpointError(f"{where}: Adam step {number} is not a whole number >= 0")
    return int(number)


def adam_partition(where: str, index: int, state: Any, flat: torch.Tensor, step: Any = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One param group of one rank's ZeRO file, checked: its fp32 partition ``flat``, its Adam moments from the
    torch optimizer ``state`` (at least as long as the partition) and its step (``state["step"]``, else ``step``).
    Raises :class:`UnsupportedCheckpointError` for a state that is not Adam's, :class:`DeepSpeedCheckpointError`
    naming ``where`` for short moments or no step."""
    if not isinstance(state, dict) or not {"exp_avg", "exp_avg_sq"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else state
        raise UnsupportedCheckpointError(f"{where}: optimizer state of group {index} has keys {keys}; only "
                                         "Adam/AdamW state (exp_avg, exp_avg_sq) is supported")
    fp32 = flat.detach().reshape(-1).float()
    moments = {kind: state[kind].detach().reshape(-1).float() for kind in ("exp_avg", "exp_avg_sq")}
    if any(m.numel() < fp32.numel() for m in moments.values()):
        raise DeepSpeedCheckpointError(f"{where}: the moments of group {index} are shorter than its fp32 "
                                       f"partition ({fp32.numel()} elements)")
    step = state.get("step", step)
    if step is None:
        raise DeepSpeedCheckpointError(f"{where}: no Adam step in the optimizer state of group {index}")
    return fp32, moments, adam_step(step, where)


def hyper_of(groups: list[dict] | None, names: list[list[str]]) -> dict:
    """The JSON-able :attr:`FullState.hyper` of the optimizer groups ``groups`` (torch's or DeepSpeed's
    ``param_groups``) whose parameter names are ``names``; empty when the counts differ or there are none."""
    if not groups or len(groups) != len(names):
        return {}
    out = []
    for group, group_names in zip(groups, names):
        entry: dict[str, Any] = {"params": list(group_names)}
        for key in HYPER_KEYS:
            value = group.get(key)
            if torch.is_tensor(value):
                value = value.tolist()
            if isinstance(value, (tuple, list)):
                value = [float(v) for v in value]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            else:
                continue
            entry[key] = value
        out.append(entry)
    hyper: dict[str, Any] = {"param_groups": out}
    for key in HYPER_KEYS:
        values = [entry.get(key) for entry in out]
        if values[0] is not None and all(v == values[0] for v in values):
            hyper[key] = values[0]
    return hyper


def full_state_from_torch(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> FullState:
    """The :class:`FullState` of ``model`` trained by a ``torch.optim.Adam``/``AdamW`` ``optimizer`` on one process.

    Masters are the parameters cast to fp32. Every parameter of ``optimizer`` must belong to ``model`` and have
    taken the same number of steps (at least one: before the first step there are no moments).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    params: dict[str, dict[str, torch.Tensor]] = {}
    group_names: list[list[str]] = []
    steps = set()
    for index, group in enumerate(optimizer.param_groups):
        group_names.append([])
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(f"optimizer group {index} holds a parameter that is not in the model")
            state = optimizer.state.get(p, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                raise ValueError(f"{name} has no Adam moments (keys {sorted(state)}); take an optimizer step first, "
                                 "and use Adam or AdamW")
            steps.add(adam_step(state["step"], name))
            params[name] = {"master": p.detach().float().clone(),
                            "exp_avg": state["exp_avg"].detach().float().clone(),
                            "exp_avg_sq": state["exp_avg_sq"].detach().float().clone()}
            group_names[-1].append(name)
    if len(steps) != 1:
        raise ValueError(f"the optimizer's parameters have taken different numbers of steps: {sorted(steps)}")
    return FullState(step=steps.pop(), params=params, hyper=hyper_of(optimizer.param_groups, group_names),
                     source="torch")
