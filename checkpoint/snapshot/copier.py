"""The snapshot copier: a process per rank that copies the rank's shard into its snapshot segments.

Why a process. Measured on one H100 (GPT 350m, 2.45 GB shard, ``bench/bench_snapshot_parts.py``): the same
device-to-host copy costs the step 16% when the training process issues it and 1% when another process does
(the training process's kernel launches slow down while its own copy is in flight). So on CUDA the rank only
records an event after its optimizer step and sends one small message; this process does the rest.

The rank starts it (``copier_link.CopierLink``) with one end of a socket pair, and the two speak the frames of
``protocol.py`` (JSON, no pickle) over it:

- ``attach``: the snapshot process's address and the rank, its two segment paths and tensor table, which slot
  holds its newest sealed snapshot and which slots the snapshot process holds, and the shard tensors: on CUDA
  their IPC handles (``cuda_ipc.export_tensor``) and interprocess events, "ready", "digested" and "done"; on CPU the
  shared-memory file descriptors of their storages (passed over the socket pair) and each tensor's offset (the CPU mode exists so that the protocol is tested with real
  processes without a GPU; CPU training copies from the training process).
- ``snap`` (step), sent right after the rank's optimizer step, not answered: seal the previous snapshot first
  (its copy has finished on the device by now, or will shortly); pick the slot (never the one holding the newest
  sealed snapshot, nor one the snapshot process holds; none left: the step is skipped); void it
  (``segment.invalidate``); on CUDA make the copy stream wait for "ready" (recorded by the rank right after its
  optimizer step) and copy every tensor; on CPU copy them now.
- ``meta`` (step, metadata), sent once the rank's next forward is queued (where its host has time: the JSON of a
  step's metadata and the digest launches cost the host about a millisecond, which right after the optimizer step
  left the GPU idle): write the metadata (``segment.write_meta``); on CUDA wait for "digested" (recorded by the
  rank's side stream once it has computed each tensor's WordSum-128 of the state "ready" marks into a small shared
  tensor), copy those digests, record "done"; answer (``skipped`` when the step was). The rank's compute stream
  waits for "done" before its next update (a GPU-side wait). On CPU the copy ran before the answer, so the answer
  itself means "done".
- a seal thread waits for the copy on the host, writes the digest and the ``complete`` flag (``segment.seal``),
  sends COMMIT to the snapshot process, and tells the rank ``sealed`` with the slots now held.
- ``flush``: answers once the last snapshot is sealed. ``detach``: also unmaps the segments and closes the
  tensors.

When the rank goes away (end of file on the socket), the copier exits at once without sealing what is in flight:
a snapshot is sealed only while its rank lives, as when the rank copied itself. The copier never outlives its
rank's socket, holds no state of its own worth keeping, and imports torch and CUDA so that the node's snapshot
process, which holds every rank's snapshots, does not (a GPU fault cannot take the node's snapshots with it).

Run as ``python -m regrow.checkpoint.snapshot.copier FD [CUDA_DEVICE]`` (FD: the inherited socket; CUDA_DEVICE:
the rank's device, whose context is then made at start-up). ``REGROW_COPIER_DELAY_S``
(CPU mode, tests only) sleeps that long before each tensor's copy, so that a test can see an optimizer step that
did not wait.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from regrow.checkpoint.shared_tensors import MappedTensors
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot import wordsum
from regrow.checkpoint.snapshot.copier_link import DIGESTS, gpu_digest_kernel
from regrow.checkpoint.snapshot.mapped import MappedSegment
from regrow.checkpoint.snapshot.protocol import SnapshotClient, recv_message, send_message

DELAY_ENV = "REGROW_COPIER_DELAY_S"


@dataclass
class _InFlight:
    segment: MappedSegment
    step: int
    host_done: torch.cuda.Event | None
    """CUDA: a blocking event recorded after the copy (the seal thread sleeps on it); None on CPU (copied)."""
    digests: dict[str, torch.Tensor] = field(default_factory=dict)
    """CUDA: each tensor's WordSum-128, landing in pinned memory with the copy."""
    timed: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    """CUDA: timing events around the copy on the copy stream (its GPU time goes to the rank with ``sealed``)."""
    thread: threading.Thread | None = None


class _Sources:
    """The rank's shard tensors as this process sees them."""

    def __init__(self, message: dict, fds: list[int]) -> None:
        self.cuda = message["device"] == "cuda"
        self._imported = None
        self._mapped: MappedTensors | None = None
        self.digests: torch.Tensor | None = None
        """CUDA: the rank's per-tensor WordSum-128s of the state "ready" marks (rows in tensor order)."""
        self.digested = None
        """CUDA: the rank's event that says :attr:`digests` holds the digests of that state."""
        if self.cuda:
            from regrow.checkpoint.snapshot import cuda_ipc

            device = int(message["device_index"])
            torch.cuda.set_device(device)
            self._imported = cuda_ipc.ImportedTensors(message["tensors"])
            self.tensors = dict(self._imported.tensors)
            self.digests = self.tensors.pop(DIGESTS, None)
            if self.digests is not None and tuple(self.digests.shape) != (len(self.tensors), 2):
                raise ValueError(f"{DIGESTS}: shape {tuple(self.digests.shape)}, expected ({len(self.tensors)}, 2)")
            events = message["events"]
            if (self.digests is not None) != ("digested" in events):
                raise ValueError(f"attach: the {DIGESTS} tensor and the 'digested' event come together")
            self.ready = cuda_ipc.import_event(events["ready"], device)
            self.digested = cuda_ipc.import_event(events["digested"], device) if self.digests is not None else None
            self.done = cuda_ipc.import_event(events["done"], device)
            self.stream = torch.cuda.Stream(device)
        else:
            self._mapped = MappedTensors(message["tensors"], fds)
            self.tensors = dict(self._mapped.tensors)

    def close(self) -> None:
        if self._imported is not None:
            self._imported.close()
        if self._mapped is not None:
            self._mapped.close()
        self.tensors = {}


class Copier:
    """Serves one rank over ``sock`` until it goes away; see the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.segments: list[MappedSegment] = []
        self.sources: _Sources | None = None
        self.client: SnapshotClient | None = None
        self.client_address: str | None = None
        self.targets: dict[int, dict[str, torch.Tensor]] = {}
        self.rank = -1
        self.newest: int | None = None
        self.held: frozenset[int] = frozenset()
        self.in_flight: _InFlight | None = None
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.skipped: int | None = None  # a step whose "snap" found no slot (its "meta" answers "skipped")
        self.snap_error: dict | None = None  # the failure of the last "snap", answered to its "meta"
        self.timeout_s = 60.0

    # ---------------------------------------------------------------- the loop
    def serve(self) -> None:
        while True:
            try:
                message, _ = recv_message(self.sock, timeout_s=None)
            except (ConnectionError, EOFError, OSError):
                return  # the rank is gone: nothing in flight is sealed
            op = message.get("op")
            fds: list[int] = []
            if isinstance(message.get("fds"), int) and 0 < message["fds"] <= 1024:
                _, fds, _, _ = socket.recv_fds(self.sock, 1, message["fds"])
            try:
                reply = self._dispatch(op, message, fds)
            except Exception as error:  # noqa: BLE001 (answered to the rank, which raises it)
                reply = {"ok": False, "re": op, "error": f"snapshot copier: {type(error).__name__}: {error}",
                         "trace": traceback.format_exc(limit=5)}
                if op == "snap":  # not answered: the answer to its "meta" carries the error
                    self.snap_error, reply = reply, None
            if reply is not None:
                self._send(reply)

    def _send(self, message: dict) -> None:
        with self._send_lock:
            send_message(self.sock, message)

    def _dispatch(self, op: str | None, message: dict, fds: list[int]) -> dict | None:
        if op == "attach":
            return self._attach(message, fds)
        for fd in fds:  # passed with another op: not used
            os.close(fd)
        if op == "snap":
            self._snap(int(message["step"]))
            return None
        if op == "meta":
            return self._meta(int(message["step"]), message["meta"])
        if op == "flush":
            self._finish()
            return {"ok": True, "re": op, "newest": self.newest, "held": sorted(self.held)}
        if op == "detach":
            self._detach()
            return {"ok": True, "re": op}
        raise ValueError(f"unknown op {str(op)[:40]!r}")

    # ---------------------------------------------------------------- attach / detach
    def _attach(self, message: dict, fds: list[int]) -> dict:
        self._detach()
        self.rank = int(message["rank"])
        self.timeout_s = float(message.get("timeout_s", 60.0))
        entries = [seg.TensorEntry.from_dict(e) for e in message["entries"]]
        self.sources = _Sources(message, fds)
        self.segments = [MappedSegment(path, entries) for path in message["paths"]]
        if self.sources.cuda:
            for segment in self.segments:
                segment.pin()
        self.newest = message.get("newest")
        self.held = frozenset(message.get("held", ()))
        if self.client is None or self.client_address != message["address"]:
            if self.client is not None:
                self.client.close()
            self.client = SnapshotClient(message["address"], token=message.get("token"), timeout_s=self.timeout_s)
            self.client_address = message["address"]
        self.targets = {segment.slot: {name: segment.allocate(name, t.shape, t.dtype, pin=False)
                                       for name, t in self.sources.tensors.items()} for segment in self.segments}
        return {"ok": True, "re": "attach", "pid": os.getpid()}

    def _detach(self) -> None:
        self._finish(raise_error=False)
        if self.sources is not None and self.sources.cuda:
            torch.cuda.synchronize()
        for segment in self.segments:
            segment.unpin()
        self.segments, self.targets = [], {}
        if self.sources is not None:
            self.sources.close()
            self.sources = None

    # ---------------------------------------------------------------- one snapshot
    def _target(self) -> int | None:
        preferred = 1 - self.newest if self.newest is not None else 0
        for slot in (preferred, 1 - preferred):
            if slot not in self.held:
                return slot
        return None

    def _snap(self, step: int) -> None:
        if self.sources is None:
            raise RuntimeError("snap before attach")
        self._finish()
        self.skipped = self.snap_error = None
        slot = self._target()
        if slot is None:
            self.skipped = step
            return
        segment = next(s for s in self.segments if s.slot == slot)
        seg.invalidate(segment.buffer)
        segment.clear_gaps()
        targets = self.targets[slot]
        sources = self.sources
        in_flight = self.in_flight = _InFlight(segment=segment, step=step, host_done=None)
        if not sources.cuda:
            for name, source in sources.tensors.items():
                if self.delay_s:
                    time.sleep(self.delay_s)
                targets[name].copy_(source)
            return
        # The rank digests (its "digests" rows, handed over with "meta"); only where it cannot does this process,
        # at a price.
        digest_cuda = gpu_digest_kernel() if sources.digests is None else None
        in_flight.timed = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        sources.stream.wait_event(sources.ready)
        in_flight.timed[0].record(sources.stream)
        with torch.cuda.stream(sources.stream):
            for name, source in sources.tensors.items():
                if digest_cuda is not None:
                    result = digest_cuda(source)
                    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    host.copy_(result, non_blocking=True)
                    in_flight.digests[name] = host
                targets[name].copy_(source, non_blocking=True)
        in_flight.timed[1].record(sources.stream)

    def _meta(self, step: int, meta: dict) -> dict:
        if self.snap_error is not None:
            failed, self.snap_error = self.snap_error, None
            return dict(failed, re="meta")
        if self.skipped == step:
            self.skipped = None
            return {"ok": True, "re": "meta", "step": step, "skipped": True}
        in_flight = self.in_flight
        if in_flight is None or in_flight.step != step or in_flight.thread is not None:
            raise RuntimeError(f"meta of step {step} without its snap (in flight: "
                               f"{in_flight.step if in_flight else None})")
        seg.write_meta(in_flight.segment.buffer, meta)
        sources = self.sources
        assert sources is not None
        if sources.cuda:
            if sources.digests is not None:
                # The rank digested the state "ready" marks (its side stream recorded "digested" before sending
                # "meta"); its rows are read once that is done, and "done" (recorded after) keeps the rank from
                # starting the next digest before.
                assert sources.digested is not None
                sources.stream.wait_event(sources.digested)
                rows = torch.empty(sources.digests.shape, dtype=torch.int64, pin_memory=True)
                with torch.cuda.stream(sources.stream):
                    rows.copy_(sources.digests, non_blocking=True)
                in_flight.digests = dict(zip(sources.tensors, rows.unbind(0), strict=True))
            sources.done.record(sources.stream)
            in_flight.host_done = torch.cuda.Event(blocking=True)
            in_flight.host_done.record(sources.stream)
        in_flight.thread = threading.Thread(target=self._seal, args=(in_flight,), daemon=True,
                                            name=f"regrow-copier-seal-step{step}")
        in_flight.thread.start()
        return {"ok": True, "re": "meta", "step": step, "slot": in_flight.segment.slot}

    def _seal(self, in_flight: _InFlight) -> None:
        segment = in_flight.segment
        try:
            if in_flight.host_done is not None:
                in_flight.host_done.synchronize()
            if in_flight.digests:
                digest = wordsum.assemble((segment.entries[name].offset, wordsum.Digest.from_int64(*d.tolist()))
                                          for name, d in in_flight.digests.items())
            else:
                payload = memoryview(segment.buffer)[segment.start : segment.start + segment.payload_bytes]
                try:
                    digest = wordsum.assemble((e.offset, wordsum.digest(payload[e.offset : e.offset + e.nbytes]))
                                              for e in segment.entries.values() if e.nbytes)
                finally:
                    payload.release()
            seg.seal(segment.buffer, step=in_flight.step, payload_bytes=segment.payload_bytes,
                     payload_digest=digest)
            assert self.client is not None
            reply = self.client.request({"op": "commit", "rank": self.rank, "slot": segment.slot,
                                         "step": in_flight.step})
            self.held = frozenset(reply.get("held", ()))
            self.newest = segment.slot
            sealed = {"event": "sealed", "step": in_flight.step, "slot": segment.slot, "held": sorted(self.held)}
            if in_flight.timed is not None:
                sealed["copy_ms"] = round(in_flight.timed[0].elapsed_time(in_flight.timed[1]), 3)
            self._send(sealed)
        except BaseException as error:  # noqa: BLE001 (told to the rank, which raises it)
            try:
                self._send({"event": "error", "step": in_flight.step, "kind": type(error).__name__,
                            "error": f"snapshot copier: sealing step {in_flight.step}: {type(error).__name__}: "
                                     f"{error}"})
            except OSError:
                pass

    def _finish(self, *, raise_error: bool = True) -> None:
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None and in_flight.thread is None and raise_error:
            raise RuntimeError(f"the snapshot of step {in_flight.step} never got its meta")
        if in_flight is not None and in_flight.thread is not None:
            in_flight.thread.join(self.timeout_s)
            if in_flight.thread.is_alive() and raise_error:
                raise TimeoutError(f"the snapshot of step {in_flight.step} was not sealed within {self.timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or not all(a.isdigit() for a in argv):
        print("usage: python -m regrow.checkpoint.snapshot.copier FD [CUDA_DEVICE] (started by the rank's "
              "SnapshotSink)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    if len(argv) == 2:
        # The rank's device is known: its CUDA context is made now, while the rank builds its model, not at ATTACH.
        torch.cuda.set_device(int(argv[1]))
    Copier(sock).serve()
    # The rank is gone or detached: exit without running CUDA teardown that could wait on the GPU.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
