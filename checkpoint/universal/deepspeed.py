"""DeepSpeed checkpoint interop through a layout-free, in-memory :class:`FullState`.

A :class:`FullState` is the whole model's Adam training state with no sharding in it: per parameter name one fp32
master tensor and the two moments, each shaped like the parameter, plus the Adam step and hyper-parameters. It does
not depend on regrow's on-disk format; the universal-format code converts to and from it separately.

- :func:`import_deepspeed` reads what DeepSpeed's ``engine.save_checkpoint()`` writes for ZeRO stage 1 or 2 (the
  per-rank ``*zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` partitions plus ``mp_rank_00_model_states.pt``), or a
  DeepSpeed *universal* checkpoint (``zero/<param>/fp32.pt`` ...), and reassembles whole parameters.
- :func:`export_deepspeed_universal` writes the universal layout, which a DeepSpeed engine of any data-parallel size
  and ZeRO stage 1 or 2 loads with ``"checkpoint": {"load_universal": true}``.
- :func:`full_state_from_torch` turns a model plus a ``torch.optim.Adam``/``AdamW`` into a :class:`FullState`.

Security: DeepSpeed writes pickles. Every file is read with ``torch.load(weights_only=True)`` and an allow-list of
exactly the non-torch classes DeepSpeed puts in these files (:data:`ALLOWED_GLOBALS`). Each is mapped to a small
stand-in class defined here, so reading never imports or runs DeepSpeed code, and DeepSpeed need not be installed.
Anything else in a file is refused with :class:`UnsafeCheckpointError` naming the file and the global.
"""

from __future__ import annotations

import argparse
import enum
import io
import json
import math
import os
import pickle
import pickletools
import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KINDS: tuple[str, ...] = ("master", "exp_avg", "exp_avg_sq")
"""The state kinds a :class:`FullState` holds per parameter, in this order."""

HYPER_KEYS: tuple[str, ...] = ("lr", "betas", "eps", "weight_decay")
"""The Adam hyper-parameters carried between DeepSpeed and a :class:`FullState`."""

DS_LAYOUT_VERSION = "0.19.8"
"""The DeepSpeed release whose universal layout :func:`export_deepspeed_universal` writes (and was tested against).
DeepSpeed's loader requires a ``ds_version`` in ``zero/optimizer_state.pt`` and checks it against old ZeRO-1 formats."""

# The file names DeepSpeed uses (deepspeed/checkpoint/constants.py and engine.py of the release above).
_MODEL_STATES = "mp_rank_00_model_states.pt"
_OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_PIPELINE_LAYER = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$|^layer_\d+-model_states\.pt$")
_UNIVERSAL_STATE_FILES = {"master": "fp32.pt", "exp_avg": "exp_avg.pt", "exp_avg_sq": "exp_avg_sq.pt"}


class DeepSpeedCheckpointError(ValueError):
    """A DeepSpeed checkpoint that cannot be read or written: a file is missing, malformed or inconsistent."""


class UnsupportedCheckpointError(DeepSpeedCheckpointError, NotImplementedError):
    """A well-formed DeepSpeed checkpoint of a kind this module does not read yet (ZeRO-3, pipeline or tensor
    parallel, ZeRO disabled, a non-Adam optimizer)."""


class UnsafeCheckpointError(DeepSpeedCheckpointError):
    """A file refers to a Python global outside :data:`ALLOWED_GLOBALS`; it was not unpickled."""


@dataclass
class FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``: the piece ``[start, start + numel)`` of a
    rank's flat fp32 partition that holds part of one parameter (pickled into ``param_slice_mappings``)."""

    numel: int = 0
    start: int = 0


class ZeroStage(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (pickled as ``zero_stage`` in optimizer files)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScalerState:
    """Stand-in for DeepSpeed's ``LossScaler`` / ``DynamicLossScaler``: only the attributes that were pickled
    (``cur_scale``, ``dynamic``, ...), no behaviour."""

    def __repr__(self) -> str:
        return f"LossScalerState({vars(self)})"


ALLOWED_GLOBALS: tuple[tuple[type, str], ...] = (
    # param_slice_mappings: where each parameter's piece lies in a rank's partition (ZeRO-1/2, bf16 optimizer).
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    # optimizer_state_dict["zero_stage"] in every ZeRO optimizer file and in a universal zero/optimizer_state.pt.
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    # optimizer_state_dict["loss_scaler"]: LossScaler for fp32/bf16 and static fp16, DynamicLossScaler for dynamic fp16.
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    # Client state: training scripts (Megatron-DeepSpeed among them) save their parsed ``args`` into
    # mp_rank_00_model_states.pt. A Namespace is an attribute bag; its values pass this same allow-list.
    (argparse.Namespace, "argparse.Namespace"),
)
"""Every non-torch global a DeepSpeed checkpoint file may refer to, mapped to the class that stands in for it."""


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
            if not _is_path_component(name):
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


# ---------------------------------------------------------------------------------------------------------------------
# Reading files safely


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with exactly :data:`ALLOWED_GLOBALS` added to torch's defaults.

    Raises :class:`UnsafeCheckpointError` (naming the file and the globals) when the pickle refers to anything else
    or uses opcodes torch's restricted unpickler refuses, and :class:`DeepSpeedCheckpointError` when the file is
    missing or is not a torch file. Nothing in a refused file is executed.
    """
    if not path.is_file():
        raise DeepSpeedCheckpointError(f"{path} is missing")
    # The allow-list is torch's process-wide one, extended only for the duration of this call.
    with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
        # A static scan first, so that the error names every offending global, not only the first one reached.
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError):
            unsafe = []  # not torch's zip format, or opcodes torch's scanner skips: torch.load below decides
        if unsafe:
            raise UnsafeCheckpointError(_unsafe_message(path, sorted(unsafe)))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))) or _scan_globals(path))
            if names:
                raise UnsafeCheckpointError(_unsafe_message(path, names)) from None
            if "Unsupported operand" in str(error):
                raise UnsafeCheckpointError(f"refusing to unpickle {path}: it uses pickle opcodes that torch's "
                                            "weights-only loader refuses; DeepSpeed never writes such files "
                                            "(regenerate it with DeepSpeed's save_checkpoint())") from None
            raise DeepSpeedCheckpointError(f"{path} is not a readable torch checkpoint: {_first_line(error)}") from None
        except (RuntimeError, EOFError, OSError) as error:
            raise DeepSpeedCheckpointError(f"{path} is not a readable torch checkpoint: {_first_line(error)}") from None


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _scan_globals(path: Path) -> list[str]:
    """The globals a file's pickles name, outside torch and :data:`ALLOWED_GLOBALS`, found by parsing the opcodes
    only (``pickletools`` never executes anything). Used to name what a refused file wanted, for the error."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            records = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(records[0]) if records else b""
    else:
        data = path.read_bytes()
    allowed = {name for _, name in ALLOWED_GLOBALS}
    found: set[str] = set()
    stream = io.BytesIO(data)
    # A legacy torch file is several pickles in a row; a plain pickle.dump file is one.
    while stream.tell() < len(data):
        pushed: list[str | None] = []  # what recent opcodes pushed, when it was a string (else None)
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                elif op.name in _STRING_OPS:
                    pushed.append(str(arg))
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(int(arg)))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and pushed[-2] is not None and pushed[-1] is not None:
                        found.add(f"{pushed[-2]}.{pushed[-1]}")
                elif op.name not in ("FRAME", "PROTO"):
                    pushed.append(None)
        except ValueError:
            break  # raw tensor bytes after the pickles, or not a pickle at all
    return sorted(n for n in found if n not in allowed and not n.startswith("torch.") and n != "collections.OrderedDict")


def _unsafe_message(path: Path, names: list[str]) -> str:
    allowed = sorted({name for _, name in ALLOWED_GLOBALS})
    return (f"refusing to unpickle {path}: it refers to {', '.join(names)}, which DeepSpeed does not write into "
            f"checkpoints (allowed beyond torch's tensor types: {', '.join(allowed)}). The file may be tampered "
            "with or come from another program; regenerate it with DeepSpeed's save_checkpoint()")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Import


def import_deepspeed(path: str | Path, tag: str | None = None) -> FullState:
    """Reads a DeepSpeed checkpoint into a :class:`FullState`.

    ``path`` is the directory given to ``engine.save_checkpoint()`` (the tag is read from its ``latest`` file, or
    from ``latest_universal`` when there is no ``latest``, as DeepSpeed's loader does), or one tag folder inside it.
    ``tag`` names the folder explicitly. Two kinds are read:

    - ZeRO stage 1 or 2 (fp32, or bf16/fp16 mixed precision: the fp32 masters are read), with any data-parallel
      size: ``mp_rank_00_model_states.pt`` plus one ``[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` per rank.
    - DeepSpeed universal (``ds_to_universal`` output or :func:`export_deepspeed_universal`): ``zero/<name>/...``.

    Raises :class:`UnsupportedCheckpointError` for ZeRO-3, pipeline- or tensor-parallel checkpoints, checkpoints
    without ZeRO and non-Adam optimizers; :class:`DeepSpeedCheckpointError` for missing or inconsistent files;
    :class:`UnsafeCheckpointError` for a file with a global outside :data:`ALLOWED_GLOBALS`.
    """
    folder = _resolve_folder(Path(path), tag)
    if (folder / "zero").is_dir():
        return _import_universal(folder)
    return _import_zero(folder)


def _resolve_folder(root: Path, tag: str | None) -> Path:
    if not root.is_dir():
        raise DeepSpeedCheckpointError(f"{root} is not a directory; pass the directory given to DeepSpeed's "
                                       "save_checkpoint(), or one tag folder inside it")
    if tag is not None:
        folder = root / _checked_tag(tag, f"tag={tag!r}")
        if not folder.is_dir():
            raise DeepSpeedCheckpointError(f"{folder} does not exist; tags in {root}: {_subdirs(root)}")
        return folder
    if _is_tag_folder(root):
        return root
    for pointer in ("latest", "latest_universal"):
        pointer_file = root / pointer
        if pointer_file.is_file():
            name = _checked_tag(pointer_file.read_text().strip(), f"{pointer_file}")
            folder = root / name
            if not folder.is_dir():
                raise DeepSpeedCheckpointError(f"{pointer_file} names tag {name!r}, but {folder} does not exist; "
                                               f"pass tag= one of {_subdirs(root)}")
            return folder
    raise DeepSpeedCheckpointError(f"{root} holds no DeepSpeed checkpoint: no 'latest' or 'latest_universal' file "
                                   f"and no *_states.pt files or zero/ folder; pass tag= one of {_subdirs(root)}")


def _checked_tag(tag: str, what: str) -> str:
    if not _is_path_component(tag):
        raise DeepSpeedCheckpointError(f"{what}: {tag!r} is not a tag (a single folder name)")
    return tag


def _is_path_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _is_tag_folder(folder: Path) -> bool:
    return (folder / "zero").is_dir() or any(folder.glob("*_states.pt"))


def _subdirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _import_zero(folder: Path) -> FullState:
    """ZeRO-1/2: reassembles every parameter from its fragments in each rank's flat partition."""
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        if _PIPELINE_LAYER.match(name):
            raise UnsupportedCheckpointError(f"{folder / name} is a pipeline-parallel layer file; pipeline-parallel "
                                             "DeepSpeed checkpoints are not supported yet")
        if _ZERO3_MODEL_STATES.match(name):
            raise UnsupportedCheckpointError(f"{folder / name}: per-rank model states are written only by ZeRO "
                                             "stage 3; ZeRO-3 checkpoints are not supported yet (stages 1 and 2 are)")
    model_files = [n for n in names if n.startswith("mp_rank_") and n.endswith("_model_states.pt")]
    if model_files and model_files != [_MODEL_STATES]:
        raise UnsupportedCheckpointError(f"{folder} holds {model_files}: model-parallel (tensor or pipeline) "
                                         "DeepSpeed checkpoints are not supported yet; only mp_rank_00 is read")
    if not model_files:
        optim_files = [folder / n for n in names if _OPTIM_STATES.match(n)]
        if optim_files:  # the optimizer file may tell why (e.g. ZeRO-3 writes no mp_rank_00 file)
            _optimizer_dict(safe_load(optim_files[0]), optim_files[0])
        raise DeepSpeedCheckpointError(f"{folder / _MODEL_STATES} is missing; it names the parameters, their shapes "
                                       "and the data-parallel size (copy it from the saving run)")
    model_path = folder / _MODEL_STATES
    model = safe_load(model_path)
    shapes, dp_size = _model_layout(model, model_path)
    optim_paths = _optim_paths(folder, dp_size, model_path)
    optims = [_optimizer_dict(safe_load(p), p) for p in optim_paths]

    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[int, set[str]] = {}
    for osd, optim_path in zip(optims, optim_paths):  # in rank order: see the reassembly below
        where = str(optim_path)
        groups = _partition_groups(osd, where, len(shapes), dp_size)
        for index, (group_shapes, (fp32, moments, step, mapping)) in enumerate(zip(shapes, groups)):
            steps.setdefault(step, set()).add(optim_path.name)
            for name, address in mapping.items():
                if name not in group_shapes:
                    raise DeepSpeedCheckpointError(f"{where}: param_slice_mappings[{index}] has {name!r}, which "
                                                   f"param_shapes[{index}] of {model_path} does not list")
                start, numel = int(address.start), int(address.numel)
                if start < 0 or numel < 0 or start + numel > fp32.numel():
                    raise DeepSpeedCheckpointError(f"{where}: fragment of {name} [{start}, {start + numel}) lies "
                                                   f"outside the {fp32.numel()}-element partition of group {index}")
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
    hyper = _hyper(_torch_param_groups(optims[0]), [list(s) for s in shapes])
    return FullState(step=next(iter(steps)), params=params, hyper=hyper, source=source)


def _model_layout(model: Any, path: Path) -> tuple[list[OrderedDict[str, tuple[int, ...]]], int]:
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
    groups = [OrderedDict((str(n), tuple(int(d) for d in s)) for n, s in group.items()) for group in shapes]
    return groups, dp_size


def _optim_paths(folder: Path, dp_size: int, model_path: Path) -> list[Path]:
    found: dict[tuple[str, int], Path] = {}
    for p in folder.iterdir():
        match = _OPTIM_STATES.match(p.name)
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


def _optimizer_dict(data: Any, path: Path) -> dict:
    osd = data.get("optimizer_state_dict") if isinstance(data, dict) else None
    if not isinstance(osd, dict):
        raise DeepSpeedCheckpointError(f"{path} has no optimizer_state_dict; not a DeepSpeed optimizer file")
    stage = osd.get("zero_stage")
    if stage is not None and int(stage) not in (1, 2):
        raise UnsupportedCheckpointError(f"{path} says zero_stage={int(stage)}: ZeRO stage {int(stage)} checkpoints "
                                         "are not supported yet (stages 1 and 2 are)")
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
    groups = []
    for index in range(n_groups):
        state = states.get(index)
        if not isinstance(state, dict) or not {"exp_avg", "exp_avg_sq"} <= set(state):
            keys = sorted(state) if isinstance(state, dict) else state
            raise UnsupportedCheckpointError(f"{where}: optimizer state of group {index} has keys {keys}; only "
                                             "Adam/AdamW state (exp_avg, exp_avg_sq) is supported")
        fp32 = fp32_groups[index].detach().reshape(-1).float()
        moments = {kind: state[kind].detach().reshape(-1).float() for kind in ("exp_avg", "exp_avg_sq")}
        if any(m.numel() < fp32.numel() for m in moments.values()):
            raise DeepSpeedCheckpointError(f"{where}: the moments of group {index} are shorter than its fp32 "
                                           f"partition ({fp32.numel()} elements)")
        step = state.get("step", osd.get("base_optimizer_state_step"))
        if step is None:
            raise DeepSpeedCheckpointError(f"{where}: no Adam step in the optimizer state of group {index}")
        groups.append((fp32, moments, _as_int(step, where), mappings[index]))
    return groups


def _as_int(value: Any, where: str) -> int:
    number = float(value.item()) if torch.is_tensor(value) else float(value)
    if not number.is_integer() or number < 0:
        raise DeepSpeedCheckpointError(f"{where}: Adam step {number} is not a whole number >= 0")
    return int(number)


def _torch_param_groups(osd: dict) -> list[dict] | None:
    base = osd.get("base_optimizer_state")
    if isinstance(base, dict) and isinstance(base.get("param_groups"), list):
        return base["param_groups"]
    return osd.get("param_groups")


def _hyper(groups: list[dict] | None, names: list[list[str]]) -> dict:
    """The JSON-able hyper-parameters of the optimizer groups whose parameter names are ``names``."""
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


def _import_universal(folder: Path) -> FullState:
    """DeepSpeed universal: one file per parameter and kind under ``zero/``, already whole."""
    zero = folder / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = safe_load(optim_path)
    if not isinstance(optim, dict):
        raise DeepSpeedCheckpointError(f"{optim_path} holds a {type(optim).__name__}, not a dict")
    model_path = folder / _MODEL_STATES
    if not model_path.is_file():
        raise DeepSpeedCheckpointError(f"{model_path} is missing; a universal checkpoint keeps the source's "
                                       "model-states file (DeepSpeed's loader needs it too)")
    shapes, _ = _model_layout(safe_load(model_path), model_path)
    params: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[int, list[str]] = {}
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            if not _is_path_component(name):
                raise DeepSpeedCheckpointError(f"{model_path} lists parameter {name!r}, which is not a folder name")
            kinds = {}
            for kind, file_name in _UNIVERSAL_STATE_FILES.items():
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
            steps.setdefault(_as_int(safe_load(step_path), str(step_path)), []).append(name)
    if len(steps) != 1:
        detail = ", ".join(f"{s} for {len(n)} parameters" for s, n in sorted(steps.items()))
        raise DeepSpeedCheckpointError(f"the step.pt files under {zero} disagree on the Adam step: {detail}")
    # export_deepspeed_universal pads the group list with empty entries (see there); the model's groups come first.
    groups = optim.get("param_groups")
    groups = groups[: len(shapes)] if isinstance(groups, list) else None
    hyper = _hyper(groups, [list(s) for s in shapes])
    return FullState(step=next(iter(steps)), params=params, hyper=hyper, source="deepspeed-universal")


# ---------------------------------------------------------------------------------------------------------------------
# Export


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
    tag = _checked_tag(tag or f"global_step{state.step}_universal", f"tag={tag!r}")
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
    zero = folder / "zero"
    zero.mkdir(parents=True)
    # torch AdamW keeps the step as a float32 scalar tensor; DeepSpeed puts the loaded value into the optimizer
    # state as is, and AdamW would not advance a Python int.
    step = torch.tensor(float(state.step), dtype=torch.float32)
    for name, kinds in state.params.items():
        param_dir = zero / name
        param_dir.mkdir()
        for kind, file_name in _UNIVERSAL_STATE_FILES.items():
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
    torch.save(model, folder / _MODEL_STATES)


# ---------------------------------------------------------------------------------------------------------------------
# From a plain torch model + optimizer


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
            steps.add(_as_int(state["step"], name))
            params[name] = {"master": p.detach().float().clone(),
                            "exp_avg": state["exp_avg"].detach().float().clone(),
                            "exp_avg_sq": state["exp_avg_sq"].detach().float().clone()}
            group_names[-1].append(name)
    if len(steps) != 1:
        raise ValueError(f"the optimizer's parameters have taken different numbers of steps: {sorted(steps)}")
    return FullState(step=steps.pop(), params=params, hyper=_hyper(optimizer.param_groups, group_names),
                     source="torch")
