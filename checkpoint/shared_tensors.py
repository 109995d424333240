"""CPU tensors shared with a helper process of the same rank, by file descriptor over a socket pair (no pickle).

:func:`describe_shared` moves each tensor's storage into shared memory in place (the rank's tensors keep working and
keep their values) and describes it: the index of its storage's descriptor in the list it returns, its byte offset
there, dtype and shape. The helper maps each descriptor read-only (:class:`MappedTensors`) and sees the rank's
writes as they land. The snapshot copier's CPU mode uses it (the protocol tested with real processes, no GPU).
"""

from __future__ import annotations

import mmap
import os
import warnings

import torch


def describe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[int]]:
    """``{name: {"fd", "offset", "dtype", "shape"}}`` and the descriptors to pass with it (see the module
    docstring). Tensors must be contiguous CPU tensors."""
    described: dict[str, dict] = {}
    fds: list[int] = []
    index_of: dict[int, int] = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor to be shared, not {tensor.device} "
                             f"{'contiguous' if tensor.is_contiguous() else 'strided'}")
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in index_of:
            fd, _ = storage._share_fd_cpu_()
            index_of[storage.data_ptr()] = len(fds)
            fds.append(fd)
        described[name] = {"fd": index_of[storage.data_ptr()],
                           "offset": tensor.storage_offset() * tensor.element_size(),
                           "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    return described, fds


class MappedTensors:
    """The tensors a :func:`describe_shared` description names, mapped read-only from the passed descriptors (which
    are closed here: the mappings keep the memory). Raises ``ValueError`` naming the tensor whose description does
    not fit its memory."""

    def __init__(self, described: dict, fds: list[int]) -> None:
        try:
            self._maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        self.tensors = {str(name): self._tensor(str(name), item) for name, item in described.items()}

    def _tensor(self, name: str, item: dict) -> torch.Tensor:
        dtype = getattr(torch, str(item["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {name!r}: unknown dtype {item['dtype']!r}")
        shape = [int(d) for d in item["shape"]]
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r}: negative dimension in {shape}")
        numel = 1
        for d in shape:
            numel *= d
        if not numel:
            return torch.empty(shape, dtype=dtype)
        index = int(item["fd"])
        if not 0 <= index < len(self._maps):
            raise ValueError(f"tensor {name!r}: descriptor {index} of {len(self._maps)} passed")
        mapping = self._maps[index]
        begin = int(item["offset"])
        end = begin + numel * dtype.itemsize
        if begin < 0 or end > len(mapping):
            raise ValueError(f"tensor {name!r}: bytes [{begin}, {end}) lie outside its shared memory of "
                             f"{len(mapping)} bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable": it is only read
            return torch.frombuffer(memoryview(mapping)[begin:end], dtype=dtype).view(shape)

    def close(self) -> None:
        """Drops the tensors; the mappings go with the last reference to them."""
        self.tensors = {}
