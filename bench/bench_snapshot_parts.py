"""Where the cost of a snapshot every step goes: the same training windows with sinks that do more and more of
what ``SnapshotSink`` does.

One torchrun (no wrapper script runs it)::

    REGROW_SNAPSHOT_TOKEN=... torchrun --standalone --nproc_per_node=4 bench/bench_snapshot_parts.py --json out.jsonl
    # the GIL diagnostic: the full sink alone, then with a Ray-like polling thread
    ... bench/bench_snapshot_parts.py --parts snapshot --windows 8 --poll-hz 50 --poll-work-us 300 --json out.jsonl

Phases, each measured as ``--windows`` pairs of windows of ``--window`` steps, one without any sink and one with
the phase's sink, alternating (so that the machine's drift falls on both), after ``--warmup`` untimed steps:

- ``state``: a sink that only receives the ``ShardState`` (the trainer builds it when any sink is attached: the
  live shard tensors and the RNG states);
- ``copy``: ``HostCopier`` copies of the shard into two alternating pinned host buffers of this process, started
  at ``after_step`` (overlapping the forward), waited for before the optimizer step, nothing else;
- ``copy_bwd``: the same copies started at ``after_forward`` (overlapping the backward only), as the sink does;
- ``copy_bwd_digest``: ``copy_bwd`` plus the per-tensor GPU digest on the copy's side stream;
- ``snapshot``: the full ``SnapshotSink`` (metadata, GPU digest, seal on a thread, COMMIT);
- ``ipc``: the copy issued by another process (CUDA only): a child process opens CUDA IPC handles of the shard
  tensors and of two interprocess events; after each optimizer step this rank records "ready" and sends one
  message; the child makes its stream wait for "ready", copies the shard into its own pinned buffers, records
  "done" and answers; before the next optimizer step this rank reads the answer and makes its stream wait for
  "done" (a GPU-side wait). The copy overlaps the whole next forward and backward;
- ``ipc_chunked``: ``ipc`` with each tensor copied in 32 MiB pieces (do the training process's own small
  device-to-host reads, such as the gradient norm's, queue behind a 29 ms copy of a whole 1.6 GB tensor? Measured
  on one H100, 2026-12-07: no, the pieces cost the same);
- ``ipc_bwd``: the same, the message sent once the forward is queued (overlapping the backward only);
- ``ipc_shm``: ``ipc`` into two mapped ``/dev/shm`` files registered with CUDA (``cudaHostRegister``), as the
  copier's segments are, instead of memory that CUDA allocated pinned;
- ``ipc_noop``: ``ipc`` without the copy: the child only waits for "ready" and records "done" (what the two
  processes' events and messages cost by themselves);
- ``ipc_digest``: ``ipc`` plus the GPU digest of each tensor, computed by this rank on a side stream;
- ``ipc_digest_child``: ``ipc`` with the digest computed by the child, on its stream, before its copy;
- ``stream``, ``stream_chunked``: the copy of ``ipc`` (whole tensors, or 32 MiB pieces) issued by this process
  on a side stream after the optimizer step, the next update waiting for it on the GPU (no host waits);
- ``copy_thread``: the copy of ``copy`` issued by another thread of this process, on its own stream, at
  ``after_step`` (is it the issuing thread or the issuing process that slows the forward?).

``--profile-steps N`` then profiles N more steps of each phase without and with its sink (``step_profile.py``):
per step, the GPU's busy and idle time and the kernels that grew, to tell slower kernels from idle time.
``--parts`` picks the phases (default all, in this order); ``--numa-bind local|remote`` binds each rank's CPUs to
its GPU's NUMA node or to another one first (``numa_placement.py``; a no-op on a host of one node).
``--poll-hz N --poll-work-us W`` adds a thread to every rank that takes the GIL N times a second for W us of
Python, as a Ray actor's control calls (heartbeats, the bench's progress polls) do, and ``--switch-interval-ms``
sets how soon a thread waiting for the GIL makes its holder give it up: a diagnostic of why a snapshot every step
costs more under Ray than under torchrun (the sink's seal thread competes for the GIL with the training thread).
Rank 0 prints ``RESULT {json}`` with each phase's median step time and its overhead over its paired windows without
a sink, and where each rank was placed; the ``ipc`` phases also report ``copy_ms_<phase>``, the median GPU time of
the child's copy (CUDA events around it on its stream): the copy is hidden while it is shorter than the time from
one optimizer step to the next.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import threading
import time

import torch.distributed as dist

# bench/ is this script's folder, which torchrun puts on sys.path.
from bench_checkpoint import regrow_trainer
from bench_snapshot import numa_bind, paired_windows, parse_args, start_node_process
from bench_zero import emit_result, init_distributed, result_header
from step_profile import compare, profile_steps

from regrow.checkpoint.hostcopy import HostCopier, HostCopierConfig, HostCopy
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.trainer.state import ShardState


class StateOnly:
    """Receives the state and does nothing with it."""

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, state: ShardState) -> None:
        pass

    def close(self) -> None:
        pass

    flush = close


class CopyOnly:
    """Copies the shard into two alternating pinned host buffers, at ``after_step`` or (``after_forward``) once
    the next forward is queued, optionally with the GPU digest of each tensor."""

    def __init__(self, *, after_forward: bool, digest: bool) -> None:
        self.copiers = [HostCopier(HostCopierConfig(slots=1)) for _ in range(2)]
        self.defer = after_forward
        self.summarize = _gpu_digest if digest else None
        self.turn = 0
        self.state: ShardState | None = None
        self.pending: HostCopy | None = None

    def before_optimizer_step(self) -> None:
        self.after_forward()
        if self.pending is not None:
            self.pending.wait_before_mutation()

    def after_step(self, state: ShardState) -> None:
        if self.pending is not None:
            self.pending.wait_host()
            self.pending.release()
            self.pending = None
        self.state = state
        if not self.defer:
            self.after_forward()

    def after_forward(self) -> None:
        if self.state is not None:
            self.turn = 1 - self.turn
            self.pending = self.copiers[self.turn].start(self.state.tensors, summarize=self.summarize)
            self.state = None

    def close(self) -> None:
        """Finishes the copy in flight; the sink stays usable."""
        self.after_forward()
        if self.pending is not None:
            self.pending.wait_host()
            self.pending.release()
            self.pending = None

    flush = close


class StreamCopy:
    """The copy of ``ipc`` (or ``ipc_chunked``) issued by this process on a side stream: started after the optimizer
    step, the next update's stream waits for it on the GPU; no host waits."""

    def __init__(self, state: ShardState, *, chunk_bytes: int) -> None:
        import torch

        self.torch = torch
        self.side = torch.cuda.Stream()
        self.buffers = [{name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in
                         state.tensors.items()} for _ in range(2)]
        self.chunk_bytes = chunk_bytes
        self.turn = 0
        self.done: object | None = None

    def after_step(self, state: ShardState) -> None:
        torch = self.torch
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for name, source in state.tensors.items():
                _copy(self.buffers[self.turn][name], source, self.chunk_bytes)
        self.done = torch.cuda.Event()
        self.done.record(self.side)
        self.turn = 1 - self.turn

    def before_optimizer_step(self) -> None:
        if self.done is not None:
            self.torch.cuda.current_stream().wait_event(self.done)
            self.done = None

    before_update = before_optimizer_step

    def close(self) -> None:
        self.side.synchronize()

    flush = close


def _copy(target, source, chunk_bytes: int) -> None:
    """Queues ``target.copy_(source)`` (non-blocking) on the current stream, in pieces of at most ``chunk_bytes``
    (0: one copy)."""
    if not chunk_bytes:
        target.copy_(source, non_blocking=True)
        return
    step = max(1, chunk_bytes // source.element_size())
    flat, into = source.view(-1), target.view(-1)
    for begin in range(0, flat.numel(), step):
        into[begin : begin + step].copy_(flat[begin : begin + step], non_blocking=True)


def _gpu_digest(name: str, source):
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda

    return digest_cuda(source)


class IpcCopy:
    """The copy made by a child process through CUDA IPC (see the module docstring's ``ipc`` phases)."""

    def __init__(self, state: ShardState, *, after_forward: bool, digest: bool, child_digest: bool = False,
                 copy: bool = True, shm: bool = False, chunk_bytes: int = 0) -> None:
        import torch
        import torch.multiprocessing as mp

        self.torch = torch
        self.ready = torch.cuda.Event(interprocess=True)
        self.done = torch.cuda.Event(interprocess=True)
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_ipc_copier, args=(child, dict(state.tensors), self.ready, self.done,
                                                                 child_digest, copy, shm, chunk_bytes),
                                       daemon=True)
        self.copy_ms: float | None = None
        self.process.start()
        assert self.conn.recv() == "up"
        self.defer = after_forward
        self.digest = digest
        self.side = torch.cuda.Stream() if digest else None
        self.queued: int | None = None  # a step whose "ready" is recorded, message not yet sent
        self.sent = False

    def after_step(self, state: ShardState) -> None:
        torch = self.torch
        self.ready.record(torch.cuda.current_stream())
        if self.digest:
            self.side.wait_event(self.ready)
            with torch.cuda.stream(self.side):
                for source in state.tensors.values():
                    result = _gpu_digest("", source)
                    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    host.copy_(result, non_blocking=True)
        self.queued = state.step
        if not self.defer:
            self.after_forward()

    def after_forward(self) -> None:
        if self.queued is not None:
            self.conn.send(self.queued)
            self.queued = None
            self.sent = True

    def before_optimizer_step(self) -> None:
        self.after_forward()
        if self.sent:
            assert self.conn.recv() == "recorded"
            self.torch.cuda.current_stream().wait_event(self.done)
            self.sent = False

    before_update = before_optimizer_step  # after the gradient norm, as SnapshotSink waits

    def flush(self) -> None:
        self.before_optimizer_step()

    def close(self) -> None:
        self.flush()
        self.conn.send(None)
        timings = self.conn.recv()
        self.copy_ms = statistics.median(timings) if timings else None
        self.process.join(30)


def _ipc_copier(conn, tensors: dict, ready, done, digest: bool, copy: bool, shm: bool, chunk_bytes: int) -> None:
    """The child of :class:`IpcCopy`: copies the shard into two alternating pinned buffers of its own (or mapped
    ``/dev/shm`` files registered with CUDA), timing each copy on its stream; sends the timings (ms) when told to
    stop. ``chunk_bytes``: copy each tensor in pieces of at most this many bytes (0: whole)."""
    import torch

    device = next(iter(tensors.values())).device
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device)
    if shm:
        buffers = [_registered_shm(tensors, turn) for turn in range(2)]
    else:
        buffers = [{name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in tensors.items()}
                   for _ in range(2)]
    conn.send("up")
    turn = 0
    timings: list[float] = []
    timed: tuple | None = None
    while conn.recv() is not None:
        stream.wait_event(ready)
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record(stream)
        with torch.cuda.stream(stream):
            for name, source in tensors.items():
                if digest:
                    result = _gpu_digest(name, source)
                    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    host.copy_(result, non_blocking=True)
                if copy:
                    _copy(buffers[turn][name], source, chunk_bytes)
        ended.record(stream)
        done.record(stream)
        conn.send("recorded")
        if timed is not None:  # the previous copy: long finished by the time the rank sends the next message
            timed[1].synchronize()
            timings.append(timed[0].elapsed_time(timed[1]))
        timed = (began, ended)
        turn = 1 - turn
    stream.synchronize()
    conn.send(timings)


def _registered_shm(tensors: dict, turn: int) -> dict:
    """Views of one ``/dev/shm`` file mapped and registered with CUDA, one per tensor at 64-byte aligned offsets
    (as a snapshot segment lays them out); the file is unlinked at once (the mapping keeps it)."""
    import mmap
    import os

    import torch

    from regrow.checkpoint import host_register

    offsets, total = {}, 0
    for name, tensor in tensors.items():
        offsets[name] = total
        total += -(-tensor.numel() * tensor.element_size() // 64) * 64
    path = f"/dev/shm/bench-parts-{os.getpid()}-{turn}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, total)
        mapping = mmap.mmap(fd, total)
    finally:
        os.close(fd)
        os.unlink(path)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    whole.fill_(0)  # faults every page in, as the snapshot process's segments are before use
    code = host_register.register(whole.data_ptr(), total)
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {path} failed with CUDA error {code}")
    views = {}
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        views[name] = whole[offsets[name] : offsets[name] + nbytes].view(tensor.dtype).view(tensor.shape)
    return views  # torch.frombuffer holds a reference to the mapping: the views keep it alive


class ThreadCopy:
    """The copy of ``copy`` issued by a thread of this process on its own stream (``copy_thread``)."""

    def __init__(self) -> None:
        import queue

        import torch

        self.torch = torch
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.ready = torch.cuda.Event()
        self.sent = False
        threading.Thread(target=self._serve, daemon=True, name="bench-copy-thread").start()

    def _serve(self) -> None:
        torch = self.torch
        stream = torch.cuda.Stream()
        buffers: list[dict] = [{}, {}]
        turn = 0
        while (tensors := self.requests.get()) is not None:
            stream.wait_event(self.ready)
            with torch.cuda.stream(stream):
                for name, source in tensors.items():
                    if name not in buffers[turn]:
                        buffers[turn][name] = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                    buffers[turn][name].copy_(source, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            self.replies.put(done)
            turn = 1 - turn

    def after_step(self, state: ShardState) -> None:
        self.ready.record()
        self.requests.put(dict(state.tensors))
        self.sent = True

    def before_optimizer_step(self) -> None:
        if self.sent:
            self.torch.cuda.current_stream().wait_event(self.replies.get())
            self.sent = False

    flush = before_optimizer_step

    def close(self) -> None:
        self.flush()
        self.requests.put(None)


PARTS = ("state", "copy", "copy_bwd", "copy_bwd_digest", "snapshot", "ipc", "ipc_chunked", "ipc_bwd", "ipc_shm",
         "ipc_noop", "ipc_digest", "ipc_digest_child", "copy_thread", "stream", "stream_chunked")


def start_poller(hz: float, work_us: float) -> threading.Event:
    """A daemon thread that, ``hz`` times a second, runs ``work_us`` microseconds of pure Python (it holds the GIL
    throughout, as deserializing and answering a small Ray call does); set the returned event to stop it."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0 / hz):
            until = time.perf_counter() + work_us * 1e-6
            while time.perf_counter() < until:
                pass

    threading.Thread(target=poll, daemon=True, name="bench-poller").start()
    return stop


def run() -> dict:
    args = parse_args()
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown phase(s) {unknown}; choose from {', '.join(PARTS)}")
    rank, world_size, device = init_distributed(args.device)
    placement = numa_bind(args, device)
    print(f"[numa] rank {rank}: {placement}", flush=True)
    placements: list[str | None] = [None] * world_size
    dist.all_gather_object(placements, placement)
    trainer = regrow_trainer(args, rank, world_size, device)
    process, address = start_node_process(args, trainer, world_size)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    poller = start_poller(args.poll_hz, args.poll_work_us) if args.poll_hz else None
    phases: dict[str, tuple[list[float], list[float]]] = {}
    copy_ms: dict[str, float] = {}

    profiles: dict[str, dict] = {}

    def phase(name: str, sink) -> None:
        trainer.sinks.append(sink)
        for _ in range(args.warmup):
            trainer.train_step()
        off, on = paired_windows(args, trainer, sink)
        if args.profile_steps:
            sink.flush()
            trainer.sinks.remove(sink)
            trainer.train_step()
            without = profile_steps(trainer.train_step, args.profile_steps, device)
            trainer.sinks.append(sink)
            trainer.train_step()
            profiles[f"profile_{name}"] = compare(without, profile_steps(trainer.train_step, args.profile_steps,
                                                                         device))
        sink.close()
        trainer.sinks.remove(sink)
        phases[name] = (off, on)
        if getattr(sink, "copy_ms", None) is not None:
            copy_ms[name] = sink.copy_ms

    def sink_of(name: str):
        if name == "state":
            return StateOnly()
        if name == "snapshot":
            snapshot = SnapshotSink(SnapshotSinkConfig(address=address, every=1, log=False), rank=rank)
            snapshot.attach(trainer.shard_state())
            return snapshot
        if name.startswith("ipc"):
            return IpcCopy(trainer.shard_state(), after_forward=name == "ipc_bwd", digest=name == "ipc_digest",
                           child_digest=name == "ipc_digest_child", copy=name != "ipc_noop", shm=name == "ipc_shm",
                           chunk_bytes=32 << 20 if name == "ipc_chunked" else 0)
        if name in ("stream", "stream_chunked"):
            return StreamCopy(trainer.shard_state(), chunk_bytes=32 << 20 if name == "stream_chunked" else 0)
        if name == "copy_thread":
            return ThreadCopy()
        return CopyOnly(after_forward=name != "copy", digest=name == "copy_bwd_digest" and args.device == "cuda")

    try:
        for _ in range(args.warmup):
            trainer.train_step()
        for name in parts:
            phase(name, sink_of(name))
    finally:
        if poller is not None:
            poller.set()
        if process is not None:
            process.stop()
    figures = {}
    for name, (off, on) in phases.items():
        ms_off, ms_on = (statistics.median(w) / args.window * 1e3 for w in (off, on))
        figures[f"step_ms_{name}"] = round(ms_on, 2)
        figures[f"step_ms_{name}_off"] = round(ms_off, 2)
        figures[f"overhead_{name}"] = round(ms_on / ms_off - 1, 4)
        if name in copy_ms:
            figures[f"copy_ms_{name}"] = round(copy_ms[name], 2)
    return {"bench": "snapshot_parts", **result_header(args, world_size, device), "window": args.window,
            "numa_bind": args.numa_bind, "placements": placements, "poll_hz": args.poll_hz,
            "poll_work_us": args.poll_work_us, "switch_interval_ms": args.switch_interval_ms, **figures, **profiles,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main() -> int:
    result = run()
    emit_result(result, parse_args().json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
