"""Reduce-scatter and all-gather of flat buffers, with explicit timeouts and classified errors.

Every collective here either completes or raises one of :class:`CollectiveTimeout` or :class:`PeerLost` (both
:class:`CollectiveError`) naming the operation, so callers (the optimizer, later the recovery coordinator) can act
on one kind of error in one place. On CPU (gloo) the timeout is enforced by ``Work.wait(timeout)``. On GPU (NCCL)
``wait`` only orders the current CUDA stream after the collective (blocking the CPU would destroy the overlap of
communication with compute), and the process group's own timeout and watchdog bound a collective instead.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives; older releases (e.g. 2.11 on GPU hosts) have only the old names.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_PEER_LOST_MARKERS = (
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "aborted",
    "socket closed",
    "ncclremoteerror",
)


_blocked_s = 0.0


def blocked_seconds() -> float:
    """Seconds this process has spent blocked waiting for collectives (and in :func:`waiting` blocks) since it
    started. A rank that waits less than its peers is the one they wait for: the straggler detector
    (``recovery/stragglers.py``) compares the time outside these waits."""
    return _blocked_s


@contextmanager
def waiting() -> Iterator[None]:
    """Counts the time inside the block as waiting for peers (:func:`blocked_seconds`): for a host wait that is not
    a collective's ``wait``, such as reading a reduced loss back from the GPU."""
    global _blocked_s
    started = time.perf_counter()
    try:
        yield
    finally:
        _blocked_s += time.perf_counter() - started


class CollectiveError(RuntimeError):
    """A collective failed; ``op`` names it."""

    def __init__(self, op: str, message: str) -> None:
        super().__init__(f"{op}: {message}")
        self.op = op


class CollectiveTimeout(CollectiveError):
    """A collective did not finish within its timeout (a hung or very slow peer)."""


class PeerLost(CollectiveError):
    """A peer of the collective went away (its process died or its communicator was aborted)."""


def classify(op: str, error: BaseException) -> CollectiveError:
    """Turns a backend's exception into a :class:`CollectiveError` subclass."""
    text = str(error)
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return CollectiveTimeout(op, text)
    if any(marker in lowered for marker in _PEER_LOST_MARKERS):
        return PeerLost(op, text)
    return CollectiveError(op, text)


@dataclass
class Pending:
    """An asynchronous collective in flight. Call :meth:`wait` exactly once before reading its output."""

    op: str
    work: dist.Work
    timeout_s: float
    on_cpu: bool

    def done(self) -> bool:
        """True once the collective has finished (never blocks); :meth:`wait` must still be called."""
        return self.work.is_completed()

    def wait(self) -> None:
        try:
            with waiting():
                if self.on_cpu:
                    self.work.wait(datetime.timedelta(seconds=self.timeout_s))
                else:
                    self.work.wait()
        except Exception as error:  # the backends raise plain RuntimeError/DistBackendError
            raise classify(self.op, error) from error


def _run(op: str, start, on_cpu: bool, timeout_s: float, async_op: bool) -> Pending | None:
    try:
        work = start()
    except Exception as error:
        raise classify(op, error) from error
    pending = Pending(op=op, work=work, timeout_s=timeout_s, on_cpu=on_cpu)
    if async_op:
        return pending
    pending.wait()
    return None


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    timeout_s: float,
    async_op: bool = False,
) -> Pending | None:
    """Sums ``input`` (world_size equal, contiguous pieces) over the group; rank r receives piece r in ``output``.

    ``input.numel()`` must be ``output.numel() * group size``. Returns a :class:`Pending` when ``async_op``.
    """
    size = dist.get_world_size(group)
    if input.numel() != output.numel() * size:
        raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected {output.numel()} x {size}")
    start = lambda: _reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _run("reduce_scatter", start, input.device.type == "cpu", timeout_s, async_op)


def all_gather(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    timeout_s: float,
    async_op: bool = False,
) -> Pending | None:
    """Concatenates every rank's ``input`` into ``output`` in rank order (``output.numel() = input.numel() * size``)."""
    size = dist.get_world_size(group)
    if output.numel() != input.numel() * size:
        raise ValueError(f"all_gather: output has {output.numel()} elements, expected {input.numel()} x {size}")
    start = lambda: _all_gather_single(output, input, group=group, async_op=True)
    return _run("all_gather", start, input.device.type == "cpu", timeout_s, async_op)


def all_reduce(
    tensor: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    timeout_s: float,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> None:
    """All-reduces ``tensor`` in place and waits for it."""
    start = lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True)
    _run("all_reduce", start, tensor.device.type == "cpu", timeout_s, async_op=False)
