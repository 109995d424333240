"""Reading DeepSpeed's pickles safely: ``torch.load(weights_only=True)`` plus an allow-list of stand-in classes.

DeepSpeed writes pickles. Every file is read with ``torch.load(weights_only=True)`` and an allow-list of exactly the
non-torch classes DeepSpeed puts in these files (:data:`ALLOWED_GLOBALS`). Each is mapped to a small stand-in class
defined here, so reading never imports or runs DeepSpeed code, and DeepSpeed need not be installed. Anything else in
a file is refused with :class:`UnsafeCheckpointError` naming the file and the global.
"""

from __future__ import annotations

import argparse
import enum
import io
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed import bounds
from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError, UnsafeCheckpointError


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


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with exactly :data:`ALLOWED_GLOBALS` added to torch's defaults.

    Raises :class:`UnsafeCheckpointError` (naming the file and the globals) when the pickle refers to anything else
    or uses opcodes torch's restricted unpickler refuses, and :class:`DeepSpeedCheckpointError` when the file is
    missing or is not a torch file. Nothing in a refused file is executed.

    Memory is bounded by the file's size (``bounds.py``): a zip member that declares more than
    ``bounds.MAX_INFLATION`` times its compressed size is refused before anything is inflated, and a loaded tensor
    with more bytes than its storage (an overlapping view a copy would blow up) is refused before a reader sees it.
    """
    if not path.is_file():
        raise DeepSpeedCheckpointError(f"{path} is missing or not a regular file")
    if bounds.is_torch_zip(path):
        bounds.check_archive(path)
    loaded = _load(path)
    bounds.check_tensors(loaded, path)
    return loaded


def _load(path: Path) -> Any:
    """:func:`safe_load`'s unpickling of ``path``, once its declared sizes passed (``bounds.check_archive``)."""
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
    return sorted(n for n in found
                  if n not in allowed and not n.startswith("torch.") and n != "collections.OrderedDict")


def _unsafe_message(path: Path, names: list[str]) -> str:
    allowed = sorted({name for _, name in ALLOWED_GLOBALS})
    return (f"refusing to unpickle {path}: it refers to {', '.join(names)}, which DeepSpeed does not write into "
            f"checkpoints (allowed beyond torch's tensor types: {', '.join(allowed)}). The file may be tampered "
            "with or come from another program; regenerate it with DeepSpeed's save_checkpoint()")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
