"""The memory a DeepSpeed file may cost: checked from the zip's central directory before torch inflates anything, and
on the tensors it loaded before a reader copies them.

A torch checkpoint (``torch.save``'s format since torch 1.6, the only one DeepSpeed writes) is a zip archive. torch
inflates a member whole, into a buffer of the size the zip declares for it: the pickle ``data.pkl``, then one
``data/<key>`` record per storage. Deflate shrinks zeros about a thousandfold, so a 1 MB file can declare 1 GiB.
:func:`check_archive` reads only the central directory and refuses a member that declares more than
:data:`MAX_INFLATION` times its compressed size, or whose data would lie past the end of the file. Loading a file of
S bytes then inflates at most ``MAX_INFLATION x S`` bytes (torch.save stores members uncompressed: 1 x S).

A loaded tensor is a view of its storage, and a view may declare any shape over a 4-byte storage with stride 0: it
costs nothing until a reader reshapes or concatenates it. :func:`check_tensors` refuses every tensor with more bytes
than its storage holds, and every tensor that is not a dense CPU tensor, so each copy a reader makes is bounded by
the file's own bytes.
"""

from __future__ import annotations

import reprlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from regrow.checkpoint.universal.deepspeed.errors import DeepSpeedCheckpointError

MAX_INFLATION = 10
"""The most a zip member of a torch file may declare, as a multiple of its compressed size. torch.save stores
members uncompressed (ratio 1); a file re-compressed by hand stays under it unless it is mostly zeros."""
ZIP_MAGIC = b"PK\x03\x04"
"""How torch recognises its zip format (any other file is read as the legacy format, which inflates nothing)."""

_REGENERATE = ("torch.save stores its members uncompressed, so the file was not written by DeepSpeed's "
               "save_checkpoint() or was altered since; regenerate it")


def is_torch_zip(path: Path) -> bool:
    """Whether torch will read ``path`` as a zip archive (it starts with a zip entry, as torch checks)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError as error:
        raise DeepSpeedCheckpointError(f"{path} cannot be read: {error}") from None


def check_archive(path: Path) -> None:
    """Refuses, before anything is inflated, the torch zip file ``path`` when a member declares more than
    :data:`MAX_INFLATION` times its compressed size, uses a compression torch does not read, or lies beyond the end
    of the file; also when the archive's directory cannot be read. Reads the central directory only (its size is
    bounded by the file's). Raises :class:`DeepSpeedCheckpointError` naming the file, the member and the limit."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise DeepSpeedCheckpointError(f"{path} is not a readable torch checkpoint: its zip directory is damaged "
                                       f"({error})") from None
    for member in members:
        problem = _member_problem(member, size)
        if problem:
            raise DeepSpeedCheckpointError(f"{path}: zip member {member.filename!r} {problem}; {_REGENERATE}")


def _member_problem(member: zipfile.ZipInfo, file_size: int) -> str | None:
    """Why ``member`` of a file of ``file_size`` bytes may not be inflated (None: it may)."""
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"uses compression method {member.compress_type}, which torch does not read"
    if member.file_size > MAX_INFLATION * member.compress_size or (
            member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size):
        return (f"declares {member.file_size} bytes from {member.compress_size} compressed bytes, over the limit of "
                f"{MAX_INFLATION} times its compressed size")
    if member.header_offset + member.compress_size > file_size:
        return (f"declares {member.compress_size} compressed bytes at offset {member.header_offset}, past the end "
                f"of the file ({file_size} bytes)")
    return None


_Place = tuple | None
"""Where a value sits in a loaded file, as a chain ``(parent place, key or index)``: built for every value without
formatting anything (a key's repr could be large), spelled out by :func:`_spell` only for an error."""
_KEY = object()
"""The step of a chain that leads to a dict's tensor key rather than to a value."""


def check_tensors(loaded: Any, path: Path) -> None:
    """Refuses what torch loaded from ``path`` when a tensor in it, at any depth, holds more bytes than its storage
    (an overlapping view, e.g. stride 0, that a copy would blow up), or is not a dense CPU tensor. Walks dicts (keys
    too), lists, tuples, sets and the attributes of the allow-listed stand-in objects without recursion, each object
    once (a pickle may nest deeply or refer to itself); where a tensor sits is spelled out only for the error.
    Raises :class:`DeepSpeedCheckpointError` naming the file and that place
    (``optimizer_state_dict.single_partition_of_fp32_groups[0]``)."""
    seen: set[int] = set()
    stack: list[tuple[_Place, Any]] = [(None, loaded)]
    while stack:
        place, value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if torch.is_tensor(value):
            problem = _tensor_problem(value)
            if problem:
                raise DeepSpeedCheckpointError(f"{path}: {_spell(place)} {problem}; DeepSpeed writes no such "
                                               "tensor (the file is crafted or damaged: regenerate it)")
        elif isinstance(value, dict):
            stack.extend(((place, key), item) for key, item in value.items())
            stack.extend(((place, _KEY), key) for key in value if torch.is_tensor(key))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(((place, index), item) for index, item in enumerate(value))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            stack.extend(((place, key), item) for key, item in vars(value).items())


def _spell(place: _Place) -> str:
    """``optimizer_state_dict.groups[0]`` for the chain ``place`` ('the file' for the top level)."""
    steps = []
    while place is not None:
        place, step = place
        steps.append(step)
    text = ""
    for step in reversed(steps):
        if step is _KEY:
            text += "[a tensor key]"
        elif isinstance(step, str):
            name = step if len(step) <= 100 else reprlib.repr(step)
            text += f".{name}" if text else name
        else:
            text += f"[{reprlib.repr(step)}]"
    return text or "the file"


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why a reader may not copy ``tensor`` (None: it may; its bytes are within its storage's)."""
    if tensor.layout != torch.strided:
        return f"is a {tensor.layout} tensor (DeepSpeed's files hold dense tensors)"
    if tensor.device.type != "cpu":
        return f"is a tensor on {tensor.device} (the files are loaded to the CPU)"
    nbytes = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if nbytes > held:
        return f"is a tensor of {tensor.numel()} elements ({nbytes} bytes) over a storage of {held} bytes"
    return None
