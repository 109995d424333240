"""Out-of-band abort of this process's collectives, so that a survivor is never stuck waiting for a dead or hung
peer.

A controller thread (the Ray worker's control thread, a watchdog) calls :func:`request_abort` when the job must stop
and re-form its process group. What that does depends on the backend:

- **NCCL**: ``torch.distributed.distributed_c10d._abort_process_group()`` aborts the communicators, and a collective
  blocked in the training thread returns with an error (measured on the GPU host: 0.55 s, CUDA stays usable, GPU
  tensors intact; docs/architecture.md, "Survivors keep their state").
- **gloo**: aborting does not wake a thread blocked in a gloo collective (measured here: the all-reduce stayed
  blocked after the abort returned), and gloo's reduce-scatter work never reports completion before ``wait``, so it
  cannot be polled either. It needs nothing: a gloo collective fails at once when a peer it exchanges data with
  closes its connections ("Connection closed by peer", measured: 0.02 s after the kill). In a ring only the dead
  rank's neighbours exchange data with it, so a survivor leaves its group as soon as its collective fails
  (``recovery.ray.worker``), and the failure spreads around the ring within milliseconds (measured with 4 Ray workers:
  the last survivor returned 0.03 s after the death, against its 30 s timeout before). The coordinator ends a hung
  peer by killing its process.

After the abort the process group is unusable; the caller re-forms it (``comm.world``) and calls :func:`clear`.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

_requested = threading.Event()
_reason: list[str] = [""]
_timing: dict[str, float] = {}  # when the abort was requested (monotonic) and how long aborting NCCL took


class Aborted(RuntimeError):
    """Raised by the training thread when its collective failed because :func:`request_abort` was called."""


def request_abort(why: str) -> None:
    """Records that this process's collectives are being abandoned (``why``) and aborts its NCCL communicators, if
    any, which makes a collective blocked in the training thread return with an error. Thread-safe; call from a
    thread other than the training thread."""
    _reason[0] = why
    _timing.clear()
    _timing["requested_at"] = time.monotonic()
    _requested.set()
    if dist.is_available() and dist.is_initialized() and _uses_nccl():
        started = time.monotonic()
        dist.distributed_c10d._abort_process_group()
        _timing["abort_call_s"] = time.monotonic() - started


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    """Why the abort was requested (empty when it was not)."""
    return _reason[0]


def timing() -> dict[str, float]:
    """``requested_at`` (``time.monotonic()`` of the last request) and, once the NCCL communicators are aborted,
    ``abort_call_s`` (how long that took); empty when no abort was requested since :func:`clear`."""
    return dict(_timing)


def clear() -> None:
    """Forgets the abort; call once the process group has been re-formed."""
    _requested.clear()
    _reason[0] = ""
    _timing.clear()


def _uses_nccl() -> bool:
    try:
        return "nccl" in str(dist.get_backend()).lower()
    except (RuntimeError, ValueError):
        return False
