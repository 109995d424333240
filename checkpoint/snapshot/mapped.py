"""A snapshot segment mapped by its writer: tensors that view its payload, CUDA registration, the zeroed gaps.

The segment's byte layout and its write steps (``begin``, ``seal``) are ``segment.py``'s; this is the writer's view
of one mapped segment, shared by the two writers of a rank's snapshots (the ``SnapshotSink`` copying from the
training process, and the rank's copier process, ``copier.py``).
"""

from __future__ import annotations

import ctypes
import itertools

import torch

from regrow.checkpoint import host_register
from regrow.checkpoint.snapshot import segment as seg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class MappedSegment:
    """One snapshot segment mapped writable, and the tensors that view its payload (what HostCopier's
    ``allocate`` hands out). Used by the writer of a rank's snapshots: the sink, or the rank's copier process."""

    def __init__(self, path: str, entries: list[seg.TensorEntry]) -> None:
        self.path = path
        self.buffer = seg.open_segment(path, writable=True)
        header = seg.read_header(self.buffer)
        self.slot = header.slot
        self.start = seg.payload_offset(header.meta_capacity)
        self.entries = {e.name: e for e in entries}
        self.payload_bytes = max((e.offset + e.nbytes for e in entries), default=0)
        ordered = sorted(entries, key=lambda e: e.offset)
        self._gaps = [(self.start + a.offset + a.nbytes, self.start + b.offset) for a, b in itertools.pairwise(ordered)
                      if a.offset + a.nbytes < b.offset]
        self._pinned = False

    def clear_gaps(self) -> None:
        """Zeroes the alignment gaps between tensors: the payload digest is assembled from the tensors' digests
        alone (``wordsum.assemble``), which is the digest of the payload only when the gaps are zero. They are
        zero in a segment the snapshot process created and nothing else writes them; a few bytes per tensor make
        that an invariant rather than an assumption."""
        for begin, end in self._gaps:
            self.buffer[begin:end] = bytes(end - begin)

    def allocate(self, name: str, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """HostCopier's ``allocate``: a tensor viewing this tensor's bytes in the segment."""
        entry = self.entries.get(name)
        if entry is None or tuple(shape) != entry.shape or _dtype_name(dtype) != entry.dtype:
            raise ValueError(f"snapshot segment {self.path} has no room for {name} {tuple(shape)} {dtype}: the "
                             f"shard changed since ATTACH")
        if pin:
            self.pin()
        numel = entry.nbytes // seg.ITEMSIZE[entry.dtype]
        if not numel:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.buffer, dtype=dtype, count=numel, offset=self.start + entry.offset).view(shape)

    def unpin(self) -> None:
        """Unregisters the mapping from CUDA. Required before the mapping goes: a later mapping of the same
        address would otherwise fail to register ("already registered") in this process."""
        if self._pinned:
            host_register.unregister(ctypes.addressof(ctypes.c_char.from_buffer(self.buffer)))
            self._pinned = False

    def pin(self) -> None:
        """Registers the mapping with CUDA (CUDA only): registered pinned memory makes the side-stream copies fast
        and asynchronous. Idempotent."""
        if not self._pinned:
            code = host_register.register(ctypes.addressof(ctypes.c_char.from_buffer(self.buffer)), len(self.buffer))
            if code != 0:
                raise RuntimeError(f"cudaHostRegister of snapshot segment {self.path} failed with error {code}")
            self._pinned = True
