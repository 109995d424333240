"""``regrow ray``: train on a Ray cluster, one actor per rank, healed by the coordinator after failures.

    regrow ray --address local --workers 4 --preset tiny --steps 200          # a Ray instance on this machine
    regrow ray --address auto --workers 8 --gpus-per-worker 1 --ec-group-size 2 ...   # an existing cluster
    ray job submit -- python -m regrow.launch.ray_job --workers 8 --gpus-per-worker 1 ...

The coordinator (``recovery/ray/coordinator.py``) runs in this process: it starts the workers and a snapshot process
per node, forms the process group, watches, heals, and writes every event to ``--events`` (JSONL).
"""

from __future__ import annotations

import argparse
import functools
import socket
import sys
import tempfile
from collections.abc import Callable

from regrow.checkpoint.snapshot.protocol import ProtocolError
from regrow.launch.chaos import faults
from regrow.recovery.ray.coordinator import Coordinator, CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.worker import WorkerSpec
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.state import StateSink

DEFAULT_HANG_TIMEOUT_S = 120.0
"""A rank with no finished step for this long is declared hung (``--hang-timeout`` overrides it)."""


def fault_sinks(rank: int) -> list[StateSink]:
    """The fault injector of the plan in ``REGROW_FAULTS`` (run inside each worker; Ray sends this function by
    reference)."""
    injector = faults.FaultInjector.from_env(rank)
    return [injector] if injector is not None else []


def job_sinks(rank: int, *, ckpt_dir: str | None, save_every: int, final_step: int) -> list[StateSink]:
    """A ``CheckpointWriter`` saving every ``save_every`` steps and at ``final_step`` under ``ckpt_dir`` (its world
    size is the process group's, so it follows an elastic shrink), then the fault injector."""
    from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig

    writer = ([CheckpointWriter(WriterConfig(root=ckpt_dir, save_every=save_every, final_step=final_step), rank=rank)]
              if ckpt_dir and save_every else [])
    return writer + fault_sinks(rank)


def add_parser(commands: argparse._SubParsersAction,
               add_training_arguments: Callable[..., None]) -> None:
    """The ``regrow ray`` sub-command (training flags as ``regrow train``'s)."""
    ray = commands.add_parser("ray", help="train on a Ray cluster with automatic recovery")
    add_training_arguments(ray, steps=200, nproc=2)
    ray.add_argument("--address", default="local",
                     help="'local' (start Ray on this machine), 'auto' (the cluster this machine belongs to), or "
                          "host:port of a Ray cluster")
    ray.add_argument("--workers", type=int, default=2, help="ranks, one Ray actor each")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0)
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="1 on GPU clusters (NCCL); 0: CPU (gloo)")
    ray.add_argument("--ranks-per-node", type=int, default=0,
                     help="place exactly N consecutive ranks per node (needed for --ec-group-size; 0: Ray decides)")
    ray.add_argument("--snapshot-every", type=int, default=1,
                     help="in-memory snapshot every N steps (0: off; 1: nothing re-done after a failure; a larger N "
                          "trades re-done steps for cheaper training: docs/architecture.md, 'How often to "
                          "snapshot')")
    ray.add_argument("--ec-group-size", type=int, default=0, help="erasure-code snapshots across N nodes (0: off)")
    ray.add_argument("--ec-parity", type=int, default=1)
    ray.add_argument("--ckpt-dir", default=None, help="universal checkpoints: the last restore source")
    ray.add_argument("--save-every", type=int, default=0, help="save a universal checkpoint every N steps (0: never)")
    ray.add_argument("--elastic-wait", type=float, default=0.0,
                     help="elastic mode: seconds to wait for a lost rank's replacement before going on with fewer "
                          "ranks, resharded from the last checkpoint of --ckpt-dir (0: off)")
    ray.add_argument("--standby", type=int, default=0,
                     help="standby workers per node, started ahead of need: a lost rank is taken over by its node's "
                          "standby (1.7 s to resume on 4 GPUs, against 5.5-7.3 s with a new actor; 0: off)")
    ray.add_argument("--resources-timeout", type=float, default=300.0,
                     help="seconds to wait for a worker's resources before giving up")
    ray.add_argument("--events", default=None, help="JSONL file of every event (failures, restores, ...)")


def connect(address: str) -> None:
    """Connects to Ray; a clear error when the cluster cannot be reached."""
    import ray

    if address not in ("local", "auto"):
        _probe(address)
    try:
        if address == "local":
            ray.init(log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise CoordinatorError(f"--address {address}: cannot reach a Ray cluster ({error}); start one with "
                               f"`ray start --head`, or use --address local") from error


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast when nothing listens at ``address`` (``ray.init`` itself retries for minutes before giving up)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise CoordinatorError(f"--address {address!r} is not 'local', 'auto' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise CoordinatorError(f"--address {address}: nothing answers there ({error}); start the cluster with "
                               f"`ray start --head` and pass its address, or use --address local") from error


def run(args: argparse.Namespace, config: TrainerConfig) -> int:
    """Runs the job; returns the exit code."""
    import ray

    plan, _ = faults.plan_from_args(args)
    unsupported = sorted({fault.kind for fault in plan} - {"kill-rank", "hang-rank", "slow-rank"})
    if unsupported:
        print(f"regrow ray: fault kinds {unsupported} run under the local launcher only; on Ray, lose a node by "
              f"stopping it (`ray stop` on that machine)", file=sys.stderr)
        return 2
    try:
        connect(args.address)
        coordinator_config = CoordinatorConfig(
            workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            ranks_per_node=args.ranks_per_node, ec_group_size=args.ec_group_size, ec_parity=args.ec_parity,
            hang_timeout_s=args.hang_timeout or DEFAULT_HANG_TIMEOUT_S, resources_timeout_s=args.resources_timeout,
            max_restarts=max(args.max_restarts, len(plan)), events_path=args.events,
            elastic_wait_s=args.elastic_wait, standby_per_node=args.standby)
        sinks = functools.partial(job_sinks, ckpt_dir=args.ckpt_dir, save_every=args.save_every,
                                  final_step=config.steps)
        spec = WorkerSpec(config=config, world_size=args.workers, device="cuda" if args.gpus_per_worker else "cpu",
                          snapshot_every=args.snapshot_every, ckpt_dir=args.ckpt_dir, extra_sinks=sinks)
        with tempfile.TemporaryDirectory(prefix="regrow-faults-") as fired:
            outcome = Coordinator(coordinator_config, spec, env=faults.plan_env(plan, fired)).run(config.steps)
    except (CoordinatorError, ProtocolError, ValueError) as error:
        print(f"regrow ray: {error}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    last = outcome.history[-1] if outcome.history else None
    print(f"regrow ray: trained to step {outcome.steps} with {outcome.failures} failure(s) healed"
          + (f"; last loss {last[1]:.4f}" if last else ""))
    return 0
