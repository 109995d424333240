"""Reading one snapshot slot back as a :class:`~regrow.trainer.state.ShardState`, verified by its checksum (on the
GPU when the rank is a CUDA one). Which slot a job restores, and handing the state to a training object, are the
recovery tier's (``recovery/from_snapshots.py``)."""

from __future__ import annotations

import warnings

import torch

from regrow.checkpoint import host_register
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot import wordsum
from regrow.checkpoint.snapshot.sink import state_from_snapshot
from regrow.trainer.state import ShardState


def read_slot(path: str, rank: int, passed_over: list[str], device: torch.device | None = None
              ) -> ShardState | None:
    """The state held by the segment at ``path``, verified by checksum; None (reason appended) if unusable.

    On a CUDA ``device`` (with triton) the payload is copied to the GPU in one piece and verified there, and the
    state's tensors are views of that copy: 0.6 GB took about 1.2 s to verify and copy out on the host (4 ranks
    of the 4-GPU host at once). The slot's mapping is registered with CUDA for that copy (read-only), so it crosses
    at the link's speed. Elsewhere the payload is verified and copied out on the host."""
    try:
        buffer = seg.open_segment(path, writable=False)
    except OSError as error:
        passed_over.append(f"{path}: {error}")
        return None
    on_gpu = device is not None and device.type == "cuda" and wordsum.gpu_kernels() is not None
    try:
        snapshot = seg.verify(buffer, rank=rank, payload_check=None if on_gpu else wordsum.digest)
        try:
            return state_from_snapshot(snapshot, _payload_on_gpu(snapshot, device) if on_gpu else None)
        finally:
            snapshot.payload.release()
    except seg.SegmentError as error:
        passed_over.append(f"{path}: {error}")
        return None
    finally:
        buffer.close()


def _payload_on_gpu(snapshot: seg.Snapshot, device: torch.device) -> dict[str, torch.Tensor]:
    """The snapshot's tensors as views of one device copy of its payload, whose digest is checked first (raises
    :class:`seg.SegmentError` like the host check)."""
    wordsum_triton = wordsum.gpu_kernels()
    with warnings.catch_warnings():  # the mapping is read-only; the tensor is only read from (copied)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        host = torch.frombuffer(snapshot.payload, dtype=torch.uint8) if len(snapshot.payload) else None
    payload = torch.empty(len(snapshot.payload), dtype=torch.uint8, device=device)
    if host is not None:
        # Registered, the slot crosses in one DMA at the link's speed; pageable, it took 8x longer (host_register).
        with host_register.registered(host, read_only=True) as pinned:
            payload.copy_(host, non_blocking=pinned)
            if pinned:
                torch.cuda.current_stream(device).synchronize()  # the copy ends before the registration does
    found = wordsum_triton.to_digest(wordsum_triton.digest_cuda(payload))
    if found != snapshot.payload_digest:
        raise seg.SegmentError(f"step {snapshot.step}: payload checksum mismatch (WordSum-128 {found.hex()} on the "
                               f"GPU, sealed with {snapshot.payload_digest.hex()})")
    tensors = {}
    for item in snapshot.meta["tensors"]:
        entry = seg.TensorEntry.from_dict(item)
        dtype = getattr(torch, entry.dtype)
        if not entry.nbytes:
            tensors[entry.name] = torch.empty(entry.shape, dtype=dtype, device=device)
            continue
        tensors[entry.name] = payload[entry.offset : entry.offset + entry.nbytes].view(dtype).view(entry.shape)
    return tensors


__all__ = ["read_slot"]
