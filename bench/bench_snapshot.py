"""What an in-memory snapshot every step costs a training job, and how fast a rank's state comes back from it.

One torchrun per measurement set (``bench/run_gpu_snapshot.sh`` runs it)::

    REGROW_SNAPSHOT_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))') \\
        torchrun --standalone --nproc_per_node=4 bench/bench_snapshot.py --preset 350m --json out.jsonl

The process with ``LOCAL_RANK`` 0 starts the node's snapshot process (``start_snapshot_process``, sized with
``launch.local.shm.snapshot_bytes``; the token comes from the environment, never argv) and shares its address
over the process group. regrow's ``Trainer`` trains the GPT (``--preset``) with ZeRO-2, 8-bit Adam state and bf16
working parameters, micro-batch ``--micro-batch`` per GPU, as in ``bench_checkpoint.py``.

Protocol: ``--warmup`` untimed steps; a ``SnapshotSink`` with ``every=1`` is attached and ``--warmup`` untimed
steps run (the first snapshot maps and registers the segments); then ``--windows`` pairs of windows of ``--window``
consecutive steps, one without snapshots (the sink flushed and detached) and one with a snapshot every step,
alternating so that the machine's drift falls on both; each window is preceded by one untimed step and the device
is synchronised only at its ends (maximum over ranks). ``overhead`` = median window with snapshots / median
without - 1.
Then, with the last snapshot sealed:

- ``d2h_gbps``: one synchronous copy of the whole shard into the newest sealed segment, over the bytes it already
  holds (pinned by cudaHostRegister when the sink registered it: ``registered``): the copy's floor, to set against
  the step time;
- ``verify_gbps``: ``checkpoint.snapshot.segment.verify`` of the newest segment on this rank, on the host: the
  WordSum-128 of the payload (numpy on ``crc.default_threads()`` threads) and the CRC32 of the metadata, which is
  what every restore pays per slot. The per-step seal does not do this: on CUDA with triton it digests the source
  tensors on the GPU (next figure), and it reads no payload byte on the host;
- ``digest_gpu_ms``: ``wordsum_triton.digest_cuda`` of every shard tensor, one after the other on the current
  stream, device synchronised before and after (slowest rank; Triton's launches included, which the seal pays on
  the training thread in ``after_step``), and ``digest_gpu_gbps_min`` the slowest rank's throughput: the seal's
  checksum cost on the copy's side stream. None on CPU or without triton (the seal then digests on the host);
- ``restore_s``: ``restore_from_node`` into the running trainer, barrier to barrier (LATEST, re-verify both slots,
  agree on the step, copy into the optimizer, all-gather the parameters);
- ``rebuild_s``: building a fresh ``Trainer`` (model, optimizer buffers), barrier to barrier: what a restarted
  rank does before it can restore (process start, CUDA and NCCL initialisation come on top).

Rank 0 prints ``RESULT {json}`` and appends it to ``--json``. ``--device cpu --preset tiny`` runs the same code
over gloo as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

# bench/ is this script's folder, which torchrun puts on sys.path.
from bench_checkpoint import barrier_timed, max_over_ranks, regrow_trainer, sync, timed
from bench_zero import emit_result, init_distributed, result_header
from numa_placement import bind_to_node, gpu_numa_node, numa_nodes

from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.launch.local.shm import snapshot_bytes
from regrow.recovery.from_snapshots import restore_from_node
from regrow.trainer.loop import Trainer

if TYPE_CHECKING:
    from regrow.checkpoint.snapshot.mapped import MappedSegment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m", help="GPTConfig preset: 350m on GPUs, tiny for the CPU smoke test")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each phase")
    parser.add_argument("--window", type=int, default=5, help="consecutive steps per timed window")
    parser.add_argument("--windows", type=int, default=6, help="timed windows per phase")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shm-dir", default="/dev/shm", help="tmpfs of the snapshot segments")
    parser.add_argument("--json", default=None, help="file to append the result line to (rank 0)")
    parser.add_argument("--numa-bind", default="off", choices=("off", "local", "remote"),
                        help="bind each rank's CPUs to its GPU's NUMA node (local), to another node (remote: a "
                             "diagnostic of the worst placement), or leave them to the scheduler (off)")
    parser.add_argument("--parts", default="state,copy,copy_bwd,copy_bwd_digest,snapshot",
                        help="bench_snapshot_parts.py: the phases to run, comma-separated")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="bench_snapshot_parts.py: profile this many more steps of each phase without and with "
                             "its sink (0: none)")
    parser.add_argument("--poll-hz", type=float, default=0.0,
                        help="bench_snapshot_parts.py: a thread in every rank that takes the GIL this often for "
                             "--poll-work-us of Python, as a Ray actor's control calls do (0: none)")
    parser.add_argument("--poll-work-us", type=float, default=200.0, help="Python work per poll, microseconds")
    parser.add_argument("--switch-interval-ms", type=float, default=0.0,
                        help="bench_snapshot_parts.py: sys.setswitchinterval for every rank (0: Python's 5 ms)")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1"
                for name in ("micro_batch", "warmup", "window", "windows") if getattr(args, name) < 1]
    problems += [f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0"
                 for name in ("poll_hz", "poll_work_us", "switch_interval_ms", "profile_steps")
                 if getattr(args, name) < 0]
    if not os.environ.get(TOKEN_ENV):
        problems.append(f"{TOKEN_ENV} is not set: export a token (python3 -c 'import secrets; "
                        "print(secrets.token_hex(32))') before torchrun")
    if problems:
        parser.error("\n  - ".join(["invalid arguments:", *problems]))
    return args


def numa_bind(args: argparse.Namespace, device: torch.device) -> str:
    """Applies ``--numa-bind`` to this rank's process (before its trainer allocates anything) and says what it did,
    e.g. ``"gpu 2 on node 1, bound to node 1 (32 CPUs)"``."""
    if device.type != "cuda":
        return "cpu run: not bound"
    local = gpu_numa_node(device.index)
    nodes = numa_nodes()
    where = f"gpu {device.index} on node {local}"
    if args.numa_bind == "off" or local is None or len(nodes) < 2:
        return f"{where}, not bound ({len(nodes)} node(s))"
    target = local if args.numa_bind == "local" else next(n for n in nodes if n != local)
    cpus = bind_to_node(target)
    return f"{where}, bound to node {target} ({len(cpus) if cpus else 0} CPUs)"


def windows(args: argparse.Namespace, trainer: Trainer, count: int | None = None) -> list[float]:
    """``count`` (default ``--windows``) timed windows of ``--window`` steps (seconds, slowest rank)."""
    def window() -> None:
        for _ in range(args.window):
            trainer.train_step()
    return [timed(trainer.device, window) for _ in range(count or args.windows)]


def paired_windows(args: argparse.Namespace, trainer: Trainer, sink) -> tuple[list[float], list[float]]:
    """``--windows`` pairs of timed windows, without and with ``sink`` (attached to ``trainer`` on entry and on
    return; it needs ``flush()``), alternating, so that drift of the machine (clocks, neighbours) falls on both
    alike; each window is preceded by one untimed step."""
    off, on = [], []
    for _ in range(args.windows):
        sink.flush()
        trainer.sinks.remove(sink)
        trainer.train_step()
        off += windows(args, trainer, 1)
        trainer.sinks.append(sink)
        trainer.train_step()
        on += windows(args, trainer, 1)
    return off, on


def start_node_process(args: argparse.Namespace, trainer: Trainer, local_ranks: int):
    """LOCAL_RANK 0 starts the node's snapshot process; every rank learns its address. Returns (process or None,
    address)."""
    process = None
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        expected = local_ranks * snapshot_bytes(trainer.config, trainer.world_size)
        process = start_snapshot_process(SnapshotProcessConfig(shm_dir=args.shm_dir, expected_bytes=expected),
                                         token=os.environ[TOKEN_ENV])
    holder = [process.address if process else None]
    dist.broadcast_object_list(holder, src=0)  # single node: rank 0 is LOCAL_RANK 0
    return process, holder[0]


def newest_sealed(sink: SnapshotSink, trainer: Trainer) -> MappedSegment:
    """The segment holding the sink's newest sealed snapshot: one the sink maps (it copies itself), else mapped
    here from the snapshot process's list (the rank's copier process writes them). The sink must still be
    attached: ``close()`` and ``detach()`` unmap the segments."""
    from regrow.checkpoint.snapshot.mapped import MappedSegment
    from regrow.checkpoint.snapshot.sink import tensor_table

    segments = sink.segments
    if not segments:
        entries, _ = seg.plan_tensors(tensor_table(trainer.optimizer.shard_tensors()))
        slots = sink.client.request({"op": "latest", "rank": sink.rank, "verify": False})["slots"]
        segments = [MappedSegment(s["path"], entries) for s in slots]
    best = None
    for segment in segments:
        header = seg.read_header(segment.buffer)
        if header.complete == seg.COMPLETE and (best is None or header.step > best[1]):
            best = (segment, header.step)
    assert best is not None, "no sealed snapshot in the sink's mapped segments"
    return best[0]


def d2h_gbps(sink: SnapshotSink, trainer: Trainer) -> tuple[float, bool]:
    """GB/s of one synchronous copy of the shard into the sink's segment views (what the side stream does), and
    whether the segment is cudaHostRegistered. The copy goes into the newest sealed segment, over the very bytes
    its snapshot holds (no step ran since it was taken), so that both slots still verify afterwards."""
    segment = newest_sealed(sink, trainer)
    sources = trainer.optimizer.shard_tensors()
    on_cuda = trainer.device.type == "cuda"
    targets = {name: segment.allocate(name, t.shape, t.dtype, on_cuda) for name, t in sources.items()}
    nbytes = sum(t.numel() * t.element_size() for t in sources.values())
    sync(trainer.device)
    start = time.perf_counter()
    for name, source in sources.items():
        targets[name].copy_(source, non_blocking=on_cuda)
    sync(trainer.device)
    gbps, registered = nbytes / (time.perf_counter() - start) / 1e9, bool(getattr(segment, "_pinned", False))
    if segment not in sink.segments:
        segment.unpin()  # mapped here for this measurement only
    return gbps, registered


def verify_gbps(sink: SnapshotSink, trainer: Trainer) -> tuple[float, int]:
    """GB/s of verifying (WordSum-128 of the payload, CRC32 of the metadata) this rank's newest sealed segment on the
    host, and its payload bytes."""
    segment = newest_sealed(sink, trainer)
    start = time.perf_counter()
    snapshot = seg.verify(segment.buffer, rank=sink.rank)
    seconds = time.perf_counter() - start
    snapshot.payload.release()
    return segment.payload_bytes / seconds / 1e9, segment.payload_bytes


def digest_gpu_s(trainer: Trainer) -> float | None:
    """Seconds of the GPU digest of the whole shard on this rank (None on CPU, or where triton is missing)."""
    if trainer.device.type != "cuda":
        return None
    try:
        from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda
    except ImportError:
        return None
    sources = list(trainer.optimizer.shard_tensors().values())
    for source in sources:  # compiles the kernel variants before timing
        digest_cuda(source)
    sync(trainer.device)
    start = time.perf_counter()
    for source in sources:
        digest_cuda(source)
    sync(trainer.device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    rank, world_size, device = init_distributed(args.device)
    placement = numa_bind(args, device)
    if args.numa_bind != "off":
        print(f"[numa] rank {rank}: {placement}", flush=True)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    trainer = regrow_trainer(args, rank, world_size, device)
    process, address = start_node_process(args, trainer, local_ranks)
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        sink = SnapshotSink(SnapshotSinkConfig(address=address, every=1, log=rank == 0), rank=rank)
        attach_s = barrier_timed(device, lambda: sink.attach(trainer.shard_state()))
        trainer.sinks.append(sink)
        for _ in range(args.warmup):  # the first snapshots map and register the segments
            trainer.train_step()
        off, on = paired_windows(args, trainer, sink)
        sink.flush()  # seals the last snapshot; the segments stay mapped for the two measurements below
        trainer.sinks.remove(sink)
        copy_gbps, registered = d2h_gbps(sink, trainer)
        host_gbps, payload = verify_gbps(sink, trainer)
        sink.close()  # unmaps the segments (and unregisters them from CUDA)
        gpu_s = digest_gpu_s(trainer)
        steps_before = trainer.step
        restored = {}
        restore_s = barrier_timed(device, lambda: restored.setdefault(
            "r", restore_from_node(trainer, address, log=rank == 0)))
        rebuild_s = barrier_timed(device, lambda: regrow_trainer(args, rank, world_size, device))
        trainer.train_step()  # the restored state trains
        step_off, step_on = statistics.median(off) / args.window, statistics.median(on) / args.window
        figures = {
            "step_ms_off": round(step_off * 1e3, 2), "step_ms_on": round(step_on * 1e3, 2),
            "overhead": round(step_on / step_off - 1, 4),
            "windows_ms_off": [round(w * 1e3, 1) for w in off], "windows_ms_on": [round(w * 1e3, 1) for w in on],
            "attach_s": round(attach_s, 3), "shard_bytes_per_rank": int(max_over_ranks(payload)),
            "registered": registered, "d2h_gbps_min": round(-max_over_ranks(-copy_gbps), 2),
            "verify_gbps_min": round(-max_over_ranks(-host_gbps), 2),
            "verify_s_per_gb": round(1 / max(-max_over_ranks(-host_gbps), 1e-9), 3),
            "payload_checksum": f"wordsum128 v{seg.FORMAT_VERSION}",
            "digest_gpu_ms": None if gpu_s is None else round(max_over_ranks(gpu_s) * 1e3, 3),
            "digest_gpu_gbps_min": None if gpu_s is None else round(-max_over_ranks(-payload / gpu_s / 1e9), 1),
            "restore_s": round(restore_s, 3), "restored_step": restored["r"].step, "trained_step": steps_before,
            "rebuild_s": round(rebuild_s, 3), "sealed_snapshots": sink.stats.sealed,
        }
    finally:
        dist.barrier()
        if process is not None:
            process.stop()
    job_left = list(Path(args.shm_dir).glob(f"regrow-snap-{process.job}-*")) if process else []
    figures["segments_left"] = int(max_over_ranks(len(job_left)))
    return {"bench": "snapshot", **result_header(args, world_size, device), "window": args.window,
            "numa_bind": args.numa_bind, **figures,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    emit_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
