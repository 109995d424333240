"""The rank's end of its snapshot copier (``copier.py``): starts the process and exchanges its frames.

:class:`CopierLink` starts ``python -m regrow.checkpoint.snapshot.copier`` with one end of a socket pair (nothing
listens on any address) and reads what comes back: replies to its requests, in order, and two kinds of events the
copier sends on its own, ``sealed`` (a snapshot is sealed and committed) and ``error`` (sealing failed), which are
handed to the ``on_event`` callback as they are read. :func:`describe_tensors` turns the shard into the ATTACH
description: CUDA IPC handles on a GPU; on CPU shared-memory file descriptors, passed over the socket pair (the
storage is moved into shared memory in place, so the rank's tensors keep working).
"""

from __future__ import annotations

import collections
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from regrow.checkpoint.shared_tensors import describe_shared
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, SnapshotProcessLost, recv_message, send_message

EventHandler = Callable[[dict], None]


class CopierLost(RuntimeError):
    """The copier process exited or stopped answering; the message has its exit code."""


def describe_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[int]]:
    """Where each shard tensor lives, for the copier, and the file descriptors to pass with the description.
    CUDA tensors: ``cuda_ipc.export_tensor`` (no descriptors). CPU tensors: ``shared_tensors.describe_shared``
    (their storage moves into shared memory in place; the rank's tensors keep working). Raises
    ``cuda_ipc.IpcUnavailable`` when CUDA memory cannot be exported."""
    described: dict[str, dict] = {}
    on_cpu: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"shard tensor {name!r} is not contiguous")
        if tensor.is_cuda:
            from regrow.checkpoint.snapshot.cuda_ipc import export_tensor

            described[name] = export_tensor(tensor)
        else:
            on_cpu[name] = tensor
    shared, fds = describe_shared(on_cpu)
    return {**described, **shared}, fds


def _signature(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    return [(name, t.data_ptr(), t.dtype, tuple(t.shape)) for name, t in tensors.items()]


DIGESTS = "__digests__"
"""The name under which the per-tensor digests travel with the shard tensors at ATTACH (CUDA)."""


def gpu_digest_kernel():
    """``wordsum_triton.digest_cuda``, or None where triton does not import."""
    try:
        from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda
    except ImportError:
        return None
    return digest_cuda


def _package_parent() -> str:
    import regrow

    return str(Path(regrow.__file__).resolve().parent.parent)


class CopierLink:
    """A running copier process and the socket to it.

    Contract: :meth:`request` for ops answered at once (``attach``, ``flush``, ``detach``); :meth:`send` then
    :meth:`reply` for ``snap``, whose answer the rank reads later (before its next optimizer step); :meth:`poll`
    reads whatever has arrived without blocking. :meth:`close` ends the process.
    """

    def __init__(self, *, on_event: EventHandler, timeout_s: float = 60.0, device: int | None = None) -> None:
        """Starts the copier; ``device``: the rank's CUDA device, whose context the copier then makes at once."""
        self.on_event = on_event
        self.timeout_s = timeout_s
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The copier imports regrow from wherever this process did, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_parent(), env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "regrow.checkpoint.snapshot.copier", str(theirs.fileno())]
        if device is not None:
            argv.append(str(device))
        try:
            self.process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        self._replies: collections.deque[dict] = collections.deque()

    def send(self, message: dict) -> None:
        try:
            send_message(self.sock, message)
        except OSError as error:
            raise self._lost(f"sending {message.get('op')!r}: {error}") from error

    def request(self, message: dict, fds: list[int] | None = None) -> dict:
        """Sends ``message`` (and ``fds``, right after it, as ``message["fds"]`` announces) and returns the
        reply."""
        if fds:
            message = dict(message, fds=len(fds))
        self.send(message)
        if fds:
            try:
                socket.send_fds(self.sock, [b"F"], fds)
            except OSError as error:
                raise self._lost(f"passing {len(fds)} descriptors: {error}") from error
        return self.reply(message["op"])

    def reply(self, op: str) -> dict:
        """The next reply (events read meanwhile go to ``on_event``); raises the copier's error if it failed."""
        while not self._replies:
            self._read_one(self.timeout_s)
        reply = self._replies.popleft()
        if reply.get("re") != op:
            raise CopierLost(f"snapshot copier answered {reply.get('re')!r} where {op!r} was expected")
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", f"snapshot copier: {op} failed"))
        return reply

    def poll(self) -> None:
        """Reads every message already arrived, without blocking."""
        while select.select([self.sock], [], [], 0)[0]:
            self._read_one(self.timeout_s)

    def _read_one(self, timeout_s: float) -> None:
        try:
            message, _ = recv_message(self.sock, timeout_s=timeout_s)
        except (OSError, EOFError) as error:
            raise self._lost(str(error) or type(error).__name__) from error
        if "event" in message:
            self.on_event(message)
        else:
            self._replies.append(message)

    def _lost(self, what: str) -> CopierLost:
        code = self.process.poll()
        state = f"exited with code {code}" if code is not None else "still running"
        return CopierLost(f"snapshot copier (pid {self.process.pid}, {state}): {what}")

    def close(self) -> None:
        """Closes the socket (the copier exits on its end of file) and reaps the process."""
        try:
            self.sock.close()
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_prestarted: CopierLink | None = None


def prestart_copier(device: torch.device) -> None:
    """Starts this rank's copier process now, for the :class:`SnapshotSink` made later to adopt, so that the
    copier's start (importing torch, making its CUDA context: seconds) overlaps the rank's model build and restore
    instead of delaying its first snapshot. CUDA devices only; a no-op when one is already waiting."""
    global _prestarted
    if device.type == "cuda" and _prestarted is None:
        _prestarted = CopierLink(on_event=lambda event: None, device=device.index)


def _adopt(on_event: EventHandler, timeout_s: float) -> CopierLink:
    """The prestarted copier if one is waiting and alive, else a new one."""
    global _prestarted
    link, _prestarted = _prestarted, None
    if link is not None and link.process.poll() is None:
        link.on_event, link.timeout_s = on_event, timeout_s
        return link
    if link is not None:
        link.close()
    return CopierLink(on_event=on_event, timeout_s=timeout_s)


class CopierWriter:
    """The rank's side of snapshots written by its copier process: what :class:`SnapshotSink` delegates to when it
    does not copy itself.

    Contract (training thread only): :meth:`attach` after the sink's ATTACH; :meth:`start` right after an optimizer
    step (records "ready" on the current stream on CUDA and sends ``snap``); :meth:`hand_over` once the next
    forward is queued (the digest, and ``meta``); :meth:`wait_before_mutation` before the next update (reads the
    answer to ``meta``; on CUDA the current stream waits for "done", on CPU the answer means the copy is done);
    :meth:`flush` returns once the last snapshot is sealed. Sealed steps, skipped steps, the newest
    slot and the held slots are reported through ``on_sealed(step, slot, held, copy_ms)`` (``copy_ms``: the copy's
    GPU time, None on CPU) and ``on_skipped(step)``; on CUDA, how long each wait for "done" held the stream through
    ``on_waited(ms)``, a step or two later (timing events are read once complete, never waited for). A sealing error
    is raised by the next call.
    """

    def __init__(self, *, rank: int, address: str, token: str | None, timeout_s: float,
                 on_sealed: Callable[[int, int, frozenset[int], float | None], None],
                 on_skipped: Callable[[int], None], on_waited: Callable[[float], None] = lambda ms: None) -> None:
        self.rank = rank
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.on_sealed = on_sealed
        self.on_skipped = on_skipped
        self.on_waited = on_waited
        # CUDA: (before, after) timing events around each wait for "done", oldest first, not read yet.
        self._waits: collections.deque[tuple[torch.cuda.Event, torch.cuda.Event]] = collections.deque()
        self.link = _adopt(self._on_event, timeout_s)
        self._error: tuple[str, str] | None = None  # (kind, message) of a failed seal
        self._awaiting: int | None = None  # the step whose "meta" answer is not read yet
        self._handover: tuple[int, Callable[[], dict]] | None = None  # a step sent "snap", not yet "meta"
        self._cuda = False
        self._ready: torch.cuda.Event | None = None
        self._digested: torch.cuda.Event | None = None
        self._done: torch.cuda.Event | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._shared: list[tuple] = []
        self._digests: torch.Tensor | None = None  # CUDA: one WordSum-128 per shard tensor, shared with the copier
        self._digest_stream: torch.cuda.Stream | None = None
        self.attached = False

    def _on_event(self, event: dict) -> None:
        if event.get("event") == "sealed":
            copy_ms = event.get("copy_ms")
            self.on_sealed(int(event["step"]), int(event["slot"]), frozenset(event.get("held", ())),
                           float(copy_ms) if isinstance(copy_ms, int | float) else None)
        elif event.get("event") == "error":
            self._error = (str(event.get("kind")), str(event.get("error")))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            (kind, message), self._error = self._error, None
            # The recovery tier tells a lost snapshot process from other failures by its type.
            raise SnapshotProcessLost(message) if kind == SnapshotProcessLost.__name__ else RuntimeError(message)

    def attach(self, tensors: dict[str, torch.Tensor], *, paths: list[str], entries: list[dict],
               newest: int | None, held: frozenset[int]) -> None:
        """Hands the copier the segments and the shard (raises ``cuda_ipc.IpcUnavailable`` when the shard's
        memory cannot be shared: the sink then copies itself)."""
        self.flush()
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"shard tensors on several devices: {sorted(map(str, devices))}")
        device = devices.pop()
        self._cuda = device.type == "cuda"
        self._tensors = dict(tensors)
        self._shared = _signature(tensors)
        self._digests = self._digest_stream = None
        if self._cuda and gpu_digest_kernel() is not None:
            # Computed here, on a side stream, not by the copier: kernels of another process's CUDA context
            # time-slice the GPU with this one's (measured: +7.9% of the step against +1.5% without them).
            self._digests = torch.zeros((len(tensors), 2), dtype=torch.int64, device=device)
            self._digest_stream = torch.cuda.Stream(device)
            tensors = {**tensors, DIGESTS: self._digests}
        described, fds = describe_tensors(tensors)
        # Resolved here, not in the copier: a copier started ahead of need (a standby rank's) has the environment
        # of before the launcher gave this rank its token.
        token = self.token or os.environ.get(TOKEN_ENV)
        message = {"op": "attach", "rank": self.rank, "address": self.address, "token": token,
                   "timeout_s": self.timeout_s, "paths": paths, "entries": entries, "newest": newest,
                   "held": sorted(held), "device": device.type, "tensors": described}
        if self._cuda:
            from regrow.checkpoint.snapshot.cuda_ipc import export_event

            message["device_index"] = device.index
            if self._ready is None:
                self._ready = torch.cuda.Event(interprocess=True)
                self._digested = torch.cuda.Event(interprocess=True)
                self._done = torch.cuda.Event(interprocess=True)
            events = {"ready": self._ready, "done": self._done}
            if self._digests is not None:
                events["digested"] = self._digested
            message["events"] = {name: export_event(event) for name, event in events.items()}
        self.link.request(message, fds)
        self.attached = True

    def shares(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether ``tensors`` are the very memory shared at :meth:`attach` (same names, addresses, dtypes, shapes):
        the copier reads that memory, so a tensor that moved must be shared again first."""
        return _signature(tensors) == self._shared

    def start(self, step: int, meta_of: Callable[[], dict]) -> None:
        """Right after the optimizer step of ``step``: on CUDA records "ready" on the current stream; sends ``snap``
        (the copier starts copying at once). The rest, the digest and ``meta_of()``'s metadata, follows at
        :meth:`hand_over`, where the host has time."""
        self.link.poll()
        self._raise_if_failed()
        self.wait_before_mutation()  # two snapshots without an optimizer step in between
        if self._cuda:
            assert self._ready is not None
            self._ready.record(torch.cuda.current_stream())
        self.link.send({"op": "snap", "step": step})
        self._handover = (step, meta_of)

    def hand_over(self) -> None:
        """Completes the hand-over that :meth:`start` began (call once the next forward is queued; the next
        :meth:`wait_before_mutation` does it otherwise): on CUDA digests the state "ready" marks on a side stream,
        then sends ``meta``, whose answer :meth:`wait_before_mutation` reads."""
        if self._handover is None:
            return
        (step, meta_of), self._handover = self._handover, None
        if self._digests is not None and self._digest_stream is not None:
            assert self._ready is not None and self._digested is not None
            # The state "ready" marks stays until the next update, which waits for "done": the copier records it
            # after its copy and after "digested" (it reads the digests then). The digest fills the GPU: it ends in
            # about a millisecond (2.4 GB on an H100). Capped to a few SMs it ran longer beside the training kernels
            # and cost them more (bench_digest.py: matmuls 0.4% slower beside the full grid, 8-10% beside 8 or 16
            # programs; a snapshot every step 8.1% with 16 programs).
            digest_cuda = gpu_digest_kernel()
            self._digest_stream.wait_event(self._ready)
            with torch.cuda.stream(self._digest_stream):
                self._digests.zero_()
                for row, tensor in enumerate(self._tensors.values()):
                    digest_cuda(tensor, out=self._digests[row])
            self._digested.record(self._digest_stream)
        self.link.send({"op": "meta", "step": step, "meta": meta_of()})
        self._awaiting = step

    def wait_before_mutation(self) -> None:
        self._report_waits()
        self.hand_over()
        if self._awaiting is None:
            return
        step, self._awaiting = self._awaiting, None
        reply = self.link.reply("meta")
        if reply.get("skipped"):
            self.on_skipped(step)
        elif self._cuda:
            assert self._done is not None
            stream = torch.cuda.current_stream()
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            stream.wait_event(self._done)
            after.record(stream)
            self._waits.append((before, after))

    def _report_waits(self) -> None:
        """Hands ``on_waited`` every timed wait the GPU has passed (without waiting for the others)."""
        while self._waits and self._waits[0][1].query():
            before, after = self._waits.popleft()
            self.on_waited(before.elapsed_time(after))

    def flush(self) -> None:
        self.wait_before_mutation()
        if self.attached:
            self.link.request({"op": "flush"})
        self._raise_if_failed()

    def detach(self) -> None:
        """Unmaps the copier's segments (it stays running for a later :meth:`attach`)."""
        self.wait_before_mutation()
        if self.attached:
            self.attached = False
            self.link.request({"op": "detach"})

    def close(self) -> None:
        try:
            if self.link.process.poll() is None and self.attached:
                self.detach()
        finally:
            self.link.close()
