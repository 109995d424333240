"""Snapshots every step with erasure coding across simulated nodes: step-time overhead, and the time from a node's
loss to every rank's state restored.

One torchrun (``bench/run_gpu_snapshot_ec.sh`` runs it)::

    REGROW_SNAPSHOT_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))') \\
        torchrun --standalone --nproc_per_node=4 bench/bench_snapshot_ec.py --nodes 2 --json out.jsonl

The ranks are split into ``--nodes`` simulated nodes of consecutive ranks; the first rank of each node starts that
node's snapshot process (``start_snapshot_process`` with ``ec_group_size = --nodes``, ``ec_parity = 1``, one
erasure-coding group), and rank 0 tells every process its group (``ec_group``), as ``launch/local/nodes.py`` does.

Protocol: ``--warmup`` untimed steps; ``--windows`` windows of ``--window`` steps without snapshots (device
synchronised at the window ends, slowest rank); then a ``SnapshotSink`` per rank, ``every=1``, and the same windows
with a snapshot every step while the snapshot processes encode in the background (a round takes the newest
snapshot when it starts). ``overhead`` = median window on / median window off - 1. ``encoded_steps`` counts the
rounds node 0 completed during the timed phase.

Then the node loss: the sinks are closed and the newest step's encode awaited; the snapshot process of the last
node is SIGKILLed (t0), a replacement started by that node's first rank, the group told, ``ec_rebuild`` sent
(``rebuild_s``), and every rank runs ``recovery.restore.restore_job`` against its node (``restore_s``:
verify slots, agree on the step, roll back to the rebuilt step where a slot no longer holds it, load the state).
``node_loss_to_restored_s`` is t0 to the end of the restore on every rank. In a real node loss the lost node's
ranks also restart (process, CUDA, NCCL, ``Trainer``: ``rebuild_s`` of ``bench_snapshot.py``); the survivors keep
their processes. One training step after the restore checks that the restored state trains.

Rank 0 prints ``RESULT {json}`` and appends it to ``--json``. ``--device cpu --preset tiny`` is the smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import statistics
import sys
import time

import torch.distributed as dist

# bench/ is this script's folder, which torchrun puts on sys.path.
from bench_checkpoint import barrier_timed, max_over_ranks, regrow_trainer, sync
from bench_snapshot import windows
from bench_zero import emit_result, init_distributed, result_header

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, SnapshotClient
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.launch.local.shm import snapshot_bytes
from regrow.recovery.restore import restore_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m", help="GPTConfig preset: 350m on GPUs, tiny for the CPU smoke test")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (one erasure-coding group)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each phase")
    parser.add_argument("--window", type=int, default=5, help="consecutive steps per timed window")
    parser.add_argument("--windows", type=int, default=6, help="timed windows per phase")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shm-dir", default="/dev/shm", help="tmpfs of the snapshot segments")
    parser.add_argument("--ec-threads", type=int, default=0, help="coding threads per snapshot process (0: all)")
    parser.add_argument("--json", default=None, help="file to append the result line to (rank 0)")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1"
                for name in ("micro_batch", "warmup", "window", "windows") if getattr(args, name) < 1]
    if args.nodes < 2:
        problems.append(f"--nodes={args.nodes} must be >= 2 (erasure coding spans nodes)")
    if not os.environ.get(TOKEN_ENV):
        problems.append(f"{TOKEN_ENV} is not set: export a token before torchrun")
    if problems:
        parser.error("\n  - ".join(["invalid arguments:", *problems]))
    return args


class SimulatedNodes:
    """The snapshot processes of the simulated nodes, as seen from one rank."""

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, bytes_per_rank: int) -> None:
        if world_size % args.nodes:
            raise SystemExit(f"--nodes={args.nodes} must divide the world size {world_size}")
        self.args = args
        self.per_node = world_size // args.nodes
        self.node = rank // self.per_node
        self.owner = rank % self.per_node == 0
        self.base = secrets.token_hex(3) if rank == 0 else None
        holder = [self.base]
        dist.broadcast_object_list(holder, src=0)
        self.base = holder[0]
        self.expected = self.per_node * bytes_per_rank
        self.process: SnapshotProcess | None = self._start() if self.owner else None
        self.addresses: list[str] = []
        self.share_addresses()

    def _start(self) -> SnapshotProcess:
        erasure = ErasureCodingConfig(ec_group_size=self.args.nodes, ec_parity=1, threads=self.args.ec_threads)
        return start_snapshot_process(SnapshotProcessConfig(job=f"{self.base}-n{self.node}", shm_dir=self.args.shm_dir,
                                                            expected_bytes=self.expected, erasure=erasure),
                                      token=os.environ[TOKEN_ENV])

    def share_addresses(self) -> None:
        """Every rank learns every node's address; rank 0 tells each process its group."""
        mine = self.process.address if self.process else None
        gathered: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.addresses = [address for address in gathered if address is not None]
        if dist.get_rank() == 0:
            for node in range(self.args.nodes):
                self.request(node, {"op": "ec_group", "node": node, "peers": self.addresses})
        dist.barrier()

    @property
    def address(self) -> str:
        return self.addresses[self.node]

    def request(self, node: int, message: dict) -> dict:
        client = SnapshotClient(self.addresses[node], timeout_s=300)
        try:
            return client.request(message)
        finally:
            client.close()

    def complete(self, node: int) -> list[int]:
        return self.request(node, {"op": "ec_status"})["complete"]

    def rounds(self, node: int) -> int:
        return self.request(node, {"op": "ec_status"})["rounds_completed"]

    def wait_encoded(self, step: int, timeout_s: float = 300.0) -> float:
        """Seconds until every node holds ``step`` complete (rank 0 polls; the others wait at the barrier)."""
        start = time.perf_counter()
        if dist.get_rank() == 0:
            while not all(step in self.complete(node) for node in range(self.args.nodes)):
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"step {step} not encoded on every node within {timeout_s} s")
                time.sleep(0.01)
        dist.barrier()
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def sources_by_rank(source: str, world_size: int) -> list[str]:
    """Every rank's restore source, in rank order."""
    everyone: list[str | None] = [None] * world_size
    dist.all_gather_object(everyone, source)
    return [str(s) for s in everyone]


def run(args: argparse.Namespace) -> dict:
    rank, world_size, device = init_distributed(args.device)
    trainer = regrow_trainer(args, rank, world_size, device)
    nodes = SimulatedNodes(args, rank, world_size, snapshot_bytes(trainer.config, world_size))
    lost = args.nodes - 1
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        off = windows(args, trainer)
        sink = SnapshotSink(SnapshotSinkConfig(address=nodes.address, every=1, log=rank == 0), rank=rank)
        barrier_timed(device, lambda: sink.attach(trainer.shard_state()))
        trainer.sinks.append(sink)
        for _ in range(args.warmup):
            trainer.train_step()
        before = nodes.rounds(0) if rank == 0 else 0
        on = windows(args, trainer)
        encoded = nodes.rounds(0) - before if rank == 0 else 0
        sink.close()  # seals the last snapshot
        trainer.sinks.remove(sink)
        last_encode_wait_s = nodes.wait_encoded(trainer.step)

        # ---- node loss: the last node's snapshot process dies, is replaced and rebuilt; every rank restores.
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        if nodes.node == lost and nodes.owner:
            assert nodes.process is not None
            nodes.process.process.kill()
            nodes.process.process.wait()
            nodes.process = nodes._start()
        nodes.share_addresses()  # the replacement's address; rank 0 announces the group
        rebuild = {}
        if rank == 0:
            started = time.perf_counter()
            rebuild = nodes.request(lost, {"op": "ec_rebuild"})
            rebuild["seconds"] = time.perf_counter() - started
        holder = [rebuild]
        dist.broadcast_object_list(holder, src=0)
        rebuild = holder[0]
        restored = {}
        restore_s = barrier_timed(device, lambda: restored.setdefault(
            "r", restore_job(trainer, nodes.address, log=rank == 0)))
        node_loss_s = time.perf_counter() - t0
        trainer.train_step()  # the restored state trains
        step_off, step_on = statistics.median(off) / args.window, statistics.median(on) / args.window
        figures = {
            "nodes": args.nodes, "ranks_per_node": nodes.per_node,
            "step_ms_off": round(step_off * 1e3, 2), "step_ms_on": round(step_on * 1e3, 2),
            "overhead": round(step_on / step_off - 1, 4),
            "windows_ms_off": [round(w * 1e3, 1) for w in off], "windows_ms_on": [round(w * 1e3, 1) for w in on],
            "timed_steps": args.windows * args.window, "encoded_steps": encoded,
            "round_seconds": nodes.request(0, {"op": "ec_status"})["round_seconds"] if rank == 0 else [],
            "last_encode_wait_s": round(last_encode_wait_s, 3),
            "node_snapshot_bytes": nodes.expected // 2,
            "rebuild_s": round(rebuild["seconds"], 3), "rebuilt_step": rebuild["step"],
            "restore_s": round(restore_s, 3), "restored_step": restored["r"].step,
            "restore_sources": sources_by_rank(restored["r"].source, world_size),
            "node_loss_to_restored_s": round(max_over_ranks(node_loss_s), 3),
        }
    finally:
        dist.barrier()
        nodes.stop()
    return {"bench": "snapshot_ec", **result_header(args, world_size, device), "window": args.window, **figures,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    emit_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
