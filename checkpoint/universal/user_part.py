"""A user loop's own state in a universal checkpoint (``launch/guard.py``): ``user/state.json`` (the JSON part,
``ShardState.extra["user"]``) and one raw little-endian file per tensor (``user/tensor_00000.bin``, ...), written
once, by rank 0, whose manifest entry (:class:`~regrow.checkpoint.universal.format.UserEntry`) carries the crc32 of
every chunk. The state is the same on every rank by contract (like the model), so any world size loads it whole.

Names on disk are numbered, never derived from the user's keys: a key is data (checked, printable, bounded), a file
name is ours. Nothing is pickled: the JSON part is parsed as JSON, the tensors are raw bytes of a listed dtype.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from regrow.checkpoint.universal import confined, storage
from regrow.checkpoint.universal.format import (
    USER_DIR,
    USER_DTYPES,
    Chunk,
    CorruptCheckpoint,
    FileEntry,
    Manifest,
    UserEntry,
    UserTensorEntry,
)
from regrow.checkpoint.universal.verified_read import VerifiedFile

STATE_FILE = f"{USER_DIR}/state.json"


def tensor_file(index: int) -> str:
    return f"{USER_DIR}/tensor_{index:05d}.bin"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_user_part(temp: Path, tree: dict, tensors: Mapping[str, torch.Tensor],
                    write_range: Callable[[Path, torch.Tensor, int], list[Chunk]], *, fsync: bool) -> UserEntry:
    """Writes the user state (``tree`` and its host ``tensors``) under ``temp`` with the part writer's
    ``write_range`` (chunked, checksummed); returns its manifest entry. Raises ``ValueError`` for a tensor of a dtype
    the format does not store (the save then fails, naming it)."""
    (temp / USER_DIR).mkdir(parents=True, exist_ok=True)
    data = json.dumps(tree).encode()
    storage.write_file_atomic(temp / STATE_FILE, data, fsync=fsync)
    entries = []
    for index, (key, tensor) in enumerate(tensors.items()):
        name = dtype_name(tensor.dtype)
        if name not in USER_DTYPES:
            raise ValueError(f"user state tensor {key} is {name}; the checkpoint stores {sorted(USER_DTYPES)}")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, as bytes
        file = tensor_file(index)
        entries.append(UserTensorEntry(key=key, file=file, dtype=name, shape=list(tensor.shape), nbytes=raw.numel(),
                                       chunks=write_range(temp / file, raw, 0)))
    return UserEntry(state=FileEntry(file=STATE_FILE, nbytes=len(data), crc32=zlib.crc32(data)), tensors=entries)


def entry_from_marker(data: dict | None) -> UserEntry | None:
    """The :class:`UserEntry` that rank 0's marker holds (written by this code, read back before the commit)."""
    if not data:
        return None
    tensors = [UserTensorEntry(**{**t, "chunks": [Chunk(*c) for c in t["chunks"]]}) for t in data["tensors"]]
    return UserEntry(state=FileEntry(**data["state"]), tensors=tensors)


def marker_form(entry: UserEntry) -> dict:
    """:class:`UserEntry` as rank 0's marker stores it (chunks as ``[offset, length, crc32]``)."""
    return {"state": vars(entry.state),
            "tensors": [{**vars(t), "chunks": [[c.offset, c.length, c.crc32] for c in t.chunks]}
                        for t in entry.tensors]}


def load_user(ckpt: Path, manifest: Manifest) -> tuple[dict, dict[str, torch.Tensor]]:
    """The user state of checkpoint ``ckpt``: ``(tree, tensors)`` as ``ShardState`` carries them, every byte
    checked against its checksum; ``({}, {})`` when the run saved none. Raises :class:`CorruptCheckpoint`."""
    entry = manifest.user
    if entry is None:
        return {}, {}
    data = confined.read_small(ckpt, entry.state.file, entry.state.nbytes)
    if len(data) != entry.state.nbytes or zlib.crc32(data) != entry.state.crc32:
        raise CorruptCheckpoint(str(ckpt), [f"{entry.state.file}: bytes 0-{entry.state.nbytes} fail their checksum"])
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise CorruptCheckpoint(str(ckpt), [f"{entry.state.file}: not JSON ({type(error).__name__})"]) from None
    if not isinstance(tree, dict):
        raise CorruptCheckpoint(str(ckpt), [f"{entry.state.file}: must hold a JSON object"])
    tensors = {}
    for item in entry.tensors:
        tensor = torch.empty(item.shape, dtype=getattr(torch, item.dtype))
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        VerifiedFile(ckpt, item).read(0, item.nbytes, view)
        tensors[item.key] = tensor
    return tree, tensors


__all__ = ["entry_from_marker", "load_user", "marker_form", "write_user_part"]
