"""CUDA IPC of device tensors and events between a rank and its snapshot copier, as plain data (no pickle).

A rank describes each shard tensor with :func:`export_tensor`: the IPC handle of the device allocation that holds
it (``cuIpcGetMemHandle`` of the allocation's base, found with ``cuMemGetAddressRange``), the tensor's byte offset
in that allocation, its dtype, shape and device. The copier opens each distinct allocation once
(:class:`ImportedTensors`, ``cuIpcOpenMemHandle``) and views the tensors in it without copying. Events travel as
``torch.cuda.Event(interprocess=True).ipc_handle()`` bytes. Everything is base64 text inside JSON frames.

The CUDA driver API is called through ``ctypes`` on ``libcuda.so.1`` because torch exposes no IPC call for
memory but its own pickling reductions, whose shutdown-time bookkeeping aborted a rank at exit in our
measurements (``CudaIPCTypes``: "driver shutting down"). Memory from the caching allocator's ``cudaMalloc``
blocks can be exported; memory mapped with the virtual memory API (``expandable_segments:True``) cannot, and
:func:`export_tensor` raises :class:`IpcUnavailable` naming the setting, so the sink falls back to copying from
the training process.
"""

from __future__ import annotations

import base64
import ctypes
import functools
from dataclasses import dataclass

import torch

IPC_HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 0x1


class IpcUnavailable(RuntimeError):
    """This tensor (or this process) cannot be shared over CUDA IPC; the message says why."""


class _Handle(ctypes.Structure):
    # Unsigned bytes, not c_char: a c_char array reads back as a string cut at its first zero byte.
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise IpcUnavailable(f"the CUDA driver library libcuda.so.1 cannot be loaded: {error}") from error
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]
    lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), ctypes.c_uint64]
    lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
    lib.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(code, ctypes.byref(text))
        reason = text.value.decode() if text.value else "unknown error"
        raise IpcUnavailable(f"{what} failed with CUDA error {code} ({reason})")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, size: int, field: str) -> bytes:
    data = base64.b64decode(text, validate=True)
    if len(data) != size:
        raise ValueError(f"{field}: {len(data)} bytes, expected {size}")
    return data


def export_tensor(tensor: torch.Tensor) -> dict:
    """The JSON description of a contiguous CUDA tensor for :class:`ImportedTensors` in another process. The
    tensor's memory must stay allocated while the other process uses it (shard tensors live as long as the
    optimizer). Raises :class:`IpcUnavailable` when its memory cannot be exported."""
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise IpcUnavailable(f"only contiguous CUDA tensors are shared, not a {tensor.device} tensor "
                             f"(contiguous={tensor.is_contiguous()})")
    lib = _driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    pointer = tensor.data_ptr()
    with torch.cuda.device(tensor.device):
        _check(lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer),
               "cuMemGetAddressRange")
        handle = _Handle()
        code = lib.cuIpcGetMemHandle(ctypes.byref(handle), base.value)
    if code != 0:
        try:
            _check(code, "cuIpcGetMemHandle")
        except IpcUnavailable as error:
            raise IpcUnavailable(f"{error}: memory mapped by the caching allocator's expandable segments "
                                 f"(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) cannot be shared") from None
    return {"handle": _b64(bytes(handle.reserved)), "offset": pointer - base.value,
            "allocation_bytes": size.value, "device": tensor.device.index,
            "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def export_event(event: torch.cuda.Event) -> str:
    """An interprocess event's handle as text (:func:`import_event` opens it)."""
    return _b64(bytes(event.ipc_handle()))


def import_event(text: str, device: int) -> torch.cuda.Event:
    return torch.cuda.Event.from_ipc_handle(device, _unb64(text, IPC_HANDLE_BYTES, "event handle"))


@dataclass
class _Allocation:
    pointer: int
    size: int


class _DeviceBytes:
    """A ``__cuda_array_interface__`` over an opened allocation, so that ``torch.as_tensor`` views it."""

    def __init__(self, pointer: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3, "strides": None}


class ImportedTensors:
    """The tensors described by :func:`export_tensor`, opened in this process (each allocation once).

    Contract: call :meth:`close` (or let the process exit) once no stream uses the tensors any more."""

    def __init__(self, described: dict[str, dict]) -> None:
        self._allocations: dict[bytes, _Allocation] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        try:
            for name, item in described.items():
                self.tensors[name] = self._open(name, item)
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, item: dict) -> torch.Tensor:
        handle = _unb64(item["handle"], IPC_HANDLE_BYTES, f"tensor {name!r} handle")
        dtype = getattr(torch, item["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {name!r}: unknown dtype {item['dtype']!r}")
        shape = [int(d) for d in item["shape"]]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        offset, size = int(item["offset"]), int(item["allocation_bytes"])
        if offset < 0 or offset + nbytes > size:
            raise ValueError(f"tensor {name!r}: bytes [{offset}, {offset + nbytes}) lie outside its allocation of "
                             f"{size} bytes")
        device = torch.device("cuda", int(item["device"]))
        allocation = self._allocations.get(handle)
        if allocation is None:
            pointer = ctypes.c_uint64()
            with torch.cuda.device(device):
                _check(_driver().cuIpcOpenMemHandle_v2(ctypes.byref(pointer), _Handle.from_buffer_copy(handle),
                                                       _LAZY_ENABLE_PEER_ACCESS), f"cuIpcOpenMemHandle of {name!r}")
            allocation = self._allocations[handle] = _Allocation(pointer.value, size)
        if not nbytes:
            return torch.empty(shape, dtype=dtype, device=device)
        raw = torch.as_tensor(_DeviceBytes(allocation.pointer + offset, nbytes), device=device)
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        """Closes every opened allocation (the tensors must not be used afterwards)."""
        self.tensors = {}
        for allocation in self._allocations.values():
            _driver().cuIpcCloseMemHandle(allocation.pointer)
        self._allocations = {}
