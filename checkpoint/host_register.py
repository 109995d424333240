"""Page-locking host memory that CUDA did not allocate (``cudaHostRegister``): a snapshot segment's mapping.

A copy between the GPU and pageable memory goes through the driver's bounce buffers and faults the mapping in page
by page: a 2.4 GB slot read back for a restore took 1.2 s that way on an H100 host, against about 0.1 s to register
the mapping plus 0.05 s for the copy from it. The writers keep their segments registered for their lifetime
(``mapped.MappedSegment.pin``); a restore registers the slot it reads for the length of one copy (:func:`registered`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT = 0x00
"""``cudaHostRegisterDefault``: the memory is page-locked, readable and writable by the device."""
READ_ONLY = 0x08
"""``cudaHostRegisterReadOnly``: the device only reads it. Required for a mapping made without write access."""


def register(address: int, nbytes: int, *, read_only: bool = False) -> int:
    """Registers ``nbytes`` of host memory at ``address`` with CUDA; returns the CUDA error code (0: registered).
    Every registered range must be unregistered (:func:`unregister`) before its memory is unmapped."""
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, READ_ONLY if read_only else DEFAULT))


def unregister(address: int) -> None:
    """Unregisters the range that :func:`register` registered at ``address``."""
    torch.cuda.cudart().cudaHostUnregister(address)


@contextmanager
def registered(host: torch.Tensor, *, read_only: bool) -> Iterator[bool]:
    """Registers the (contiguous) CPU tensor ``host``'s bytes for the block; yields whether that worked. The caller
    copies either way: a failed registration (a driver without read-only registration, a locked-memory limit)
    leaves ``host`` pageable, which is only slower."""
    nbytes = host.numel() * host.element_size()
    address = host.data_ptr()
    ok = nbytes > 0 and torch.cuda.is_available() and register(address, nbytes, read_only=read_only) == 0
    try:
        yield ok
    finally:
        if ok:
            unregister(address)


__all__ = ["DEFAULT", "READ_ONLY", "register", "registered", "unregister"]
