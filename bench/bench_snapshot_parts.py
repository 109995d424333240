"""Where the cost of a snapshot every step goes: the same training windows with sinks that do more and more of
what ``SnapshotSink`` does.

One torchrun (``bench/run_gpu_snapshot.sh`` runs it after ``bench_snapshot.py`` when ``PARTS=1``)::

    REGROW_SNAPSHOT_TOKEN=... torchrun --standalone --nproc_per_node=4 bench/bench_snapshot_parts.py --json out.jsonl

Phases, each ``--windows`` windows of ``--window`` steps after ``--warmup`` untimed steps (median window, slowest
rank), in this order:

- ``off``: no sink;
- ``state``: a sink that only receives the ``ShardState`` (the trainer builds it when any sink is attached: the
  live shard tensors and the RNG states);
- ``copy``: ``HostCopier`` copies of the shard into two alternating pinned host buffers of this process, waited for
  before the optimizer step, nothing else (the device-to-host floor);
- ``copy_shm``: the same copies into the snapshot segments (``/dev/shm``, ``cudaHostRegister``), without metadata,
  digest or seal;
- ``snapshot``: the full ``SnapshotSink`` (metadata, GPU digest, seal on a thread, COMMIT).

Rank 0 prints ``RESULT {json}`` with each phase's step time and its overhead over ``off``.
"""

from __future__ import annotations

import datetime
import statistics
import sys

# bench/ is this script's folder, which torchrun puts on sys.path.
from bench_checkpoint import regrow_trainer
from bench_snapshot import parse_args, start_node_process, windows
from bench_zero import emit_result, init_distributed, result_header
from regrow.checkpoint.hostcopy import HostCopier, HostCopierConfig, HostCopy
from regrow.checkpoint.snapshot_sink import SnapshotSink, SnapshotSinkConfig
from regrow.trainer.state import ShardState


class StateOnly:
    """Receives the state and does nothing with it."""

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, state: ShardState) -> None:
        pass

    def close(self) -> None:
        pass


class CopyOnly:
    """Copies the shard into alternating host buffers (``allocate`` of one or two ``HostCopier`` slots)."""

    def __init__(self, allocates: list | None = None) -> None:
        self.copiers = ([HostCopier(HostCopierConfig(slots=1), allocate=a) for a in allocates] if allocates
                        else [HostCopier(HostCopierConfig(slots=1)) for _ in range(2)])
        self.turn = 0
        self.pending: HostCopy | None = None

    def before_optimizer_step(self) -> None:
        if self.pending is not None:
            self.pending.wait_before_mutation()

    def after_step(self, state: ShardState) -> None:
        if self.pending is not None:
            self.pending.wait_host()
            self.pending.release()
        self.turn = 1 - self.turn
        self.pending = self.copiers[self.turn].start(state.tensors)

    def close(self) -> None:
        if self.pending is not None:
            self.pending.wait_host()
            self.pending.release()
            self.pending = None


def run() -> dict:
    args = parse_args()
    rank, world_size, device = init_distributed(args.device)
    trainer = regrow_trainer(args, rank, world_size, device)
    process, address = start_node_process(args, trainer, world_size)
    phases: dict[str, list[float]] = {}

    def phase(name: str, sink: object | None) -> None:
        if sink is not None:
            trainer.sinks.append(sink)
        for _ in range(args.warmup):
            trainer.train_step()
        phases[name] = windows(args, trainer)
        if sink is not None:
            sink.close()
            trainer.sinks.remove(sink)

    try:
        phase("off", None)
        phase("state", StateOnly())
        phase("copy", CopyOnly())
        snapshot = SnapshotSink(SnapshotSinkConfig(address=address, every=1, log=False), rank=rank)
        snapshot.attach(trainer.shard_state())
        phase("copy_shm", CopyOnly([segment.allocate for segment in snapshot.segments]))
        phase("snapshot", snapshot)
    finally:
        if process is not None:
            process.stop()
    step_ms = {name: statistics.median(w) / args.window * 1e3 for name, w in phases.items()}
    figures = {f"step_ms_{name}": round(ms, 2) for name, ms in step_ms.items()}
    figures |= {f"overhead_{name}": round(ms / step_ms["off"] - 1, 4) for name, ms in step_ms.items() if name != "off"}
    figures["windows_ms"] = {name: [round(x * 1e3, 1) for x in w] for name, w in phases.items()}
    return {"bench": "snapshot_parts", **result_header(args, world_size, device), "window": args.window, **figures,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main() -> int:
    result = run()
    emit_result(result, parse_args().json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
