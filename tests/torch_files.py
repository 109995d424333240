"""Hand-made torch checkpoint files for the refusal tests: the zip layout ``torch.save`` writes, with members and
tensors that ``torch.save`` itself would never produce (a member that inflates far beyond its compressed size, a
tensor whose declared size exceeds its storage), built without holding their declared sizes in memory."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHUNK = 1 << 20


class Storage:
    """A storage as ``torch.save`` refers to it: the key of its ``data/<key>`` record and its element count."""

    def __init__(self, key: str, numel: int) -> None:
        self.key = key
        self.numel = numel


class Tensor:
    """A float32 tensor over a :class:`Storage`, pickled as ``torch.save`` pickles one (``_rebuild_tensor_v2``)
    with any shape and stride, a stride 0 included."""

    def __init__(self, storage: Storage, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage = storage
        self.shape = shape
        self.stride = stride

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: Any) -> bytes:
    """``obj`` pickled as ``torch.save`` pickles ``data.pkl`` (protocol 2, storages as persistent ids)."""
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def write_torch_zip(path: Path, obj: Any, records: dict[str, bytes] | None = None, *,
                    inflating: tuple[str, int] | None = None) -> None:
    """Writes ``obj`` in torch's zip layout (``archive/data.pkl``, ``archive/data/<key>`` records, version and byte
    order) with ``records`` stored as they are. ``inflating=(name, nbytes)`` makes member ``archive/<name>`` deflated
    and ``nbytes`` long: zeros (after the pickle when ``name`` is ``data.pkl``), streamed so the writer never holds
    them: about 1 MB of file per GiB declared."""
    pickled = torch_pickle(obj)
    with zipfile.ZipFile(path, "w") as archive:
        if inflating is None or inflating[0] != "data.pkl":
            archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        if inflating is not None:
            name, nbytes = inflating
            info = zipfile.ZipInfo(f"archive/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                left = nbytes
                if name == "data.pkl":
                    member.write(pickled)
                    left -= len(pickled)
                zeros = bytes(CHUNK)
                while left > 0:
                    member.write(zeros[:left])
                    left -= CHUNK
