"""Device-to-host copies of the shard that overlap the next forward and backward.

:class:`HostCopier` owns reusable host buffers (pinned when the sources are on a GPU) arranged in ``slots``: one slot
holds one complete copy of a set of tensors. ``start(tensors)`` takes a free slot and starts copying into it:

- on CUDA, on a side stream that first waits for everything already queued on the compute stream (so the copy sees
  the tensors as they are after the optimizer step), with ``non_blocking`` copies into pinned memory and an event
  recorded at the end;
- on CPU, on a thread (``Tensor.copy_`` releases the GIL, so it runs alongside forward and backward).

The returned :class:`HostCopy` has two waits with different costs. ``wait_before_mutation()`` is for the training
thread, right before the next optimizer step (the only thing that mutates the shard): on CUDA it only makes the
compute stream wait for the copy's event, so the CPU never blocks; on CPU it joins the copy thread.
``wait_host()`` is for whoever reads the buffers (the persist thread): it blocks until the bytes are in host memory.
``release()`` returns the slot once the reader is done.

``start(tensors, summarize=f)`` also computes ``f(name, source)`` for each tensor, on the copy's stream (CUDA) or
thread (CPU) right before that tensor's copy, and brings the (small) result to host memory with the copy: on CUDA
it lands in pinned memory under the copy's events, so :attr:`HostCopy.summaries` is readable after ``wait_host()``
(or ``wait_tensor(name)`` for one tensor) and the CPU never waits for the device to compute it. The snapshot sink
passes a GPU checksum of each source tensor (``wordsum_triton.digest_cuda``) so that it never reads the payload.

The checkpoint writer uses one slot (a save while the previous one persists is skipped or waited for); the in-memory
snapshot will use two alternating slots so one complete copy always exists, and can pass ``allocate`` to place the
buffers in shared memory it owns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from regrow.trainer.checks import require_ints

Allocate = Callable[[str, torch.Size, torch.dtype, bool], torch.Tensor]
"""``allocate(name, shape, dtype, pin)`` -> an empty host tensor for the copy of tensor ``name``."""
Summarize = Callable[[str, torch.Tensor], torch.Tensor]
"""``summarize(name, source)`` -> a small tensor on ``source``'s device computed from ``source``: called on the copy's
stream (CUDA: enqueue work, never synchronize) or thread (CPU), before ``source`` is copied."""


def default_allocate(name: str, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)


class HostCopy:
    """One copy in flight into one slot's buffers. See the module docstring for the two waits."""

    def __init__(self, copier: HostCopier, slot: int, buffers: dict[str, torch.Tensor]) -> None:
        self.copier = copier
        self.slot = slot
        self.buffers = buffers
        """The host tensors, keyed like the sources; valid to read after :meth:`wait_host`."""
        self.summaries: dict[str, torch.Tensor] = {}
        """Host copies of ``summarize(name, source)`` per tensor (empty without ``summarize``); valid to read after
        :meth:`wait_host`, or :meth:`wait_tensor` of that name."""
        self._sources: list[torch.Tensor] = []  # kept alive until the copy is done (see start_cuda)
        self._event: torch.cuda.Event | None = None
        # Per tensor: a CUDA event recorded after its copy, or (CPU) a flag set after it, for wait_tensor().
        self._tensor_events: dict[str, torch.cuda.Event] = {}
        self._tensor_done: dict[str, threading.Event] = {name: threading.Event() for name in buffers}
        self._device: torch.device | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._released = False

    # ------------------------------------------------------------------ started by HostCopier.start
    def start_cpu(self, sources: Mapping[str, torch.Tensor], summarize: Summarize | None = None) -> None:
        def copy_all() -> None:
            try:
                for name, source in sources.items():
                    if summarize is not None:
                        self.summaries[name] = summarize(name, source)
                    self.buffers[name].copy_(source)
                    self._tensor_done[name].set()
            except BaseException as error:  # noqa: BLE001 (reported by the waits, on the threads that act on it)
                self._error = error
            finally:
                for done in self._tensor_done.values():  # a failed copy must not leave wait_tensor() hanging
                    done.set()

        self._thread = threading.Thread(target=copy_all, name=f"regrow-hostcopy-slot{self.slot}", daemon=True)
        self._thread.start()

    def start_cuda(self, sources: Mapping[str, torch.Tensor], stream: torch.cuda.Stream,
                   summarize: Summarize | None = None) -> None:  # CUDA only
        self._device = device = next(iter(sources.values())).device
        compute = torch.cuda.current_stream(device)
        # The copy must see the tensors after everything already queued (the optimizer step, the all-gather).
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            for name, source in sources.items():
                if summarize is not None:
                    # Allocated on this stream, so the caching allocator reuses the device result only after the
                    # copy below has read it; the pinned host block is likewise held until the copy's event.
                    result = summarize(name, source)
                    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    host.copy_(result, non_blocking=True)
                    self.summaries[name] = host
                self.buffers[name].copy_(source, non_blocking=True)
                # The caching allocator must not hand this memory to someone else while the side stream still reads
                # it, should the owner free the tensor meanwhile.
                source.record_stream(stream)
                # Blocking-sync events: a reader thread waiting on them sleeps instead of spinning on a core the
                # training thread may need (the default events busy-wait).
                self._tensor_events[name] = torch.cuda.Event(blocking=True)
                self._tensor_events[name].record(stream)
            self._event = torch.cuda.Event(blocking=True)
            self._event.record(stream)
        self._sources = list(sources.values())

    # ------------------------------------------------------------------ waits
    def wait_before_mutation(self) -> None:
        """Call on the training thread before the sources are next modified (before the next optimizer step).
        CUDA: orders the compute stream after the copy, without blocking the CPU. CPU: joins the copy thread."""
        if self._event is not None:  # CUDA only
            torch.cuda.current_stream(self._device).wait_event(self._event)
            # The compute stream now runs after the copy, so whatever frees the sources later is ordered after it.
            self._sources = []
        elif self._thread is not None:
            self._thread.join()
        self._raise_if_failed()

    def wait_host(self, timeout_s: float | None = None) -> None:
        """Blocks until every byte is in the host buffers (call before reading :attr:`buffers`)."""
        if self._event is not None:  # CUDA only: cudaEventSynchronize, which releases the GIL
            self._event.synchronize()
        elif self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"host copy of slot {self.slot} did not finish within {timeout_s} s")
        self._raise_if_failed()

    def wait_tensor(self, name: str, timeout_s: float | None = None) -> None:
        """Blocks until tensor ``name``'s bytes are in host memory (the others may still be copying): lets a reader
        work on the first tensors while the later ones are in flight."""
        if self._event is not None:  # CUDA only
            self._tensor_events[name].synchronize()
        elif not self._tensor_done[name].wait(timeout_s):
            raise TimeoutError(f"host copy of {name} (slot {self.slot}) did not finish within {timeout_s} s")
        self._raise_if_failed()

    def done(self) -> bool:
        """True once the copy has finished (never blocks)."""
        if self._event is not None:  # CUDA only
            return self._event.query()
        return self._thread is None or not self._thread.is_alive()

    def release(self) -> None:
        """Gives the slot back for the next :meth:`HostCopier.start`; call once, after the last read of the buffers."""
        if not self._released:
            self._released = True
            self._sources = []
            self.copier._release(self.slot)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"device-to-host copy failed: {self._error!r}") from self._error


@dataclass(kw_only=True)
class HostCopierConfig:
    """Settings of :class:`HostCopier`."""

    slots: int = 1
    """Complete copies that can exist at once (1 for the checkpoint writer, 2 for double-buffered snapshots)."""
    pin_memory: bool | None = None
    """Pin the host buffers: None pins exactly when the sources are on a CUDA device (pinned memory is what makes
    copies asynchronous and fast there, and is pointless for CPU sources)."""

    def __post_init__(self) -> None:
        require_ints(self, {"slots": 1})


class HostCopier:
    """Copies sets of device tensors into reused host buffers; see the module docstring.

    Contract: call :meth:`start` on the thread that owns the tensors, right after they reach the state to copy; call
    ``wait_before_mutation()`` on that thread before changing them; release each copy when done reading it.
    Buffers are allocated at the first use of a slot (or ahead of it, off the training thread: :meth:`prepare`)
    and reused while names, shapes and dtypes stay the same.
    """

    Config = HostCopierConfig

    def __init__(self, config: HostCopierConfig | None = None, *, allocate: Allocate = default_allocate) -> None:
        self.config = config or HostCopierConfig()
        self.allocate = allocate
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(self.config.slots)]
        self._busy = [False] * self.config.slots
        self._lock = threading.Lock()
        self._stream: torch.cuda.Stream | None = None  # CUDA only: created on first use
        self._preparing: threading.Thread | None = None
        self._prepare_error: BaseException | None = None

    def prepare(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Allocates every slot's buffers for tensors of these names, shapes and dtypes now, on a background thread,
        so that the first :meth:`start` costs what later ones cost (pinning a shard's worth of host memory takes
        about a second per few GB, and would otherwise stall the first copy on the training thread). Not
        collective; :meth:`start` waits for it (long done by the first save of a run). A failed allocation is
        raised by that :meth:`start`, as its own allocation failing would be."""
        if not tensors or self._preparing is not None:
            return
        devices = {t.device for t in tensors.values()}
        on_cuda = len(devices) == 1 and next(iter(devices)).type == "cuda"
        pin = on_cuda if self.config.pin_memory is None else self.config.pin_memory
        specs = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}

        def allocate_all() -> None:
            try:
                for slot in range(self.config.slots):
                    self._slot_buffers(slot, specs, pin)
            except BaseException as error:  # noqa: BLE001 (raised by the next start, on the training thread)
                self._prepare_error = error

        self._preparing = threading.Thread(target=allocate_all, daemon=True, name="regrow-hostcopy-prepare")
        self._preparing.start()

    def _wait_prepared(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        if self._prepare_error is not None:
            error, self._prepare_error = self._prepare_error, None
            raise error

    def free_slots(self) -> int:
        with self._lock:
            return self._busy.count(False)

    def start(self, tensors: Mapping[str, torch.Tensor], *, summarize: Summarize | None = None) -> HostCopy | None:
        """Starts copying ``tensors`` into a free slot; returns None when every slot is still in use. With
        ``summarize``, also computes and brings to the host ``summarize(name, source)`` per tensor (see the module
        docstring and :attr:`HostCopy.summaries`)."""
        if not tensors:
            raise ValueError("HostCopier.start: no tensors to copy")
        self._wait_prepared()
        with self._lock:
            if all(self._busy):
                return None
            slot = self._busy.index(False)
            self._busy[slot] = True
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"HostCopier.start: tensors are on several devices {sorted(map(str, devices))}")
        device = devices.pop()
        on_cuda = device.type == "cuda"
        pin = on_cuda if self.config.pin_memory is None else self.config.pin_memory
        copy = HostCopy(self, slot, self._slot_buffers(slot, tensors, pin))
        try:
            if on_cuda:  # CUDA only
                if self._stream is None or self._stream.device != device:
                    self._stream = torch.cuda.Stream(device)
                copy.start_cuda(tensors, self._stream, summarize)
            else:
                copy.start_cpu(tensors, summarize)
        except BaseException:
            # Nothing will wait for or release this copy (e.g. ``summarize`` failed): the slot must not stay busy.
            # Work already queued on the side stream reads the sources only; later copies queue behind it.
            copy.release()
            raise
        return copy

    def _slot_buffers(self, slot: int, tensors: Mapping[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
        buffers = self._buffers[slot]
        for name, source in tensors.items():
            have = buffers.get(name)
            if have is None or have.shape != source.shape or have.dtype != source.dtype:
                buffers[name] = self.allocate(name, source.shape, source.dtype, pin)
        for name in set(buffers) - set(tensors):
            del buffers[name]
        return dict(buffers)

    def _release(self, slot: int) -> None:
        with self._lock:
            self._busy[slot] = False
