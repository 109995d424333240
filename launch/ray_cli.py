"""``regrow ray``: train on a Ray cluster, one actor per rank, healed by the coordinator after failures.

    regrow ray --address local --workers 4 --preset tiny --steps 200          # a Ray instance on this machine
    regrow ray --address local --workers 4 --entry examples.own_loop_ray:train   # your own loop (ray_entry.py)
    regrow ray --address auto --workers 8 --gpus-per-worker 1 --ec-group-size 2 ...   # an existing cluster
    ray job submit -- python -m regrow.launch.ray_job --workers 8 --gpus-per-worker 1 ...

The coordinator (``recovery/ray/coordinator.py``) runs in this process: it starts the workers and a snapshot process
per node, forms the process group, watches, heals, and writes every event to ``--events`` (JSONL).
"""

from __future__ import annotations

import functools
import socket
import sys
import tempfile

from regrow.checkpoint.snapshot.protocol import ProtocolError
from regrow.launch import ray_entry
from regrow.launch.chaos.injector import FaultInjector
from regrow.launch.chaos.plan import plan_env
from regrow.launch.job import Job
from regrow.recovery.ray.coordinator import Coordinator, CoordinatorConfig, CoordinatorError
from regrow.recovery.ray.worker import WorkerSpec
from regrow.trainer.state import StateSink

DEFAULT_HANG_TIMEOUT_S = 120.0
"""A rank with no finished step for this long is declared hung (``--hang-timeout`` overrides it)."""


def job_sinks(rank: int, *, ckpt_dir: str | None, save_every: int, final_step: int,
              on_error: str) -> list[StateSink]:
    """Each worker's sinks after its snapshot sink (run inside the worker; Ray sends this function by reference): a
    ``CheckpointWriter`` saving every ``save_every`` steps and at ``final_step`` under ``ckpt_dir`` (its world size
    is the process group's, so it follows an elastic shrink; ``on_error``: ``--ckpt-on-error``), then the fault
    injector of the plan in ``REGROW_FAULTS``."""
    from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig

    injector = FaultInjector.from_env(rank)
    sinks: list[StateSink] = []
    if ckpt_dir and save_every:
        io_fault = injector.checkpoint_fault if injector is not None and injector.fails_checkpoints else None
        writer = CheckpointWriter(WriterConfig(root=ckpt_dir, save_every=save_every, final_step=final_step,
                                               on_error=on_error), rank=rank, io_fault=io_fault)
        if injector is not None:
            injector.watch_saves(writer)
        sinks.append(writer)
    return sinks + ([injector] if injector is not None else [])


def connect(address: str) -> None:
    """Connects to Ray; a clear error when the cluster cannot be reached."""
    import ray

    if address not in ("local", "auto"):
        _probe(address)
    try:
        if address == "local":
            ray.init(address="local", log_to_driver=False)  # a new instance: never a cluster already running here
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


def run(job: Job) -> int:
    """Runs the job; returns the exit code."""
    import ray

    options, config = job.options, job.config
    unsupported = sorted({fault.kind for fault in job.plan} - {"kill-rank", "hang-rank", "slow-rank", "corrupt-param",
                                                                  "corrupt-shard"})
    if unsupported:
        print(f"regrow ray: fault kinds {unsupported} run under the local launcher only; on Ray, lose a node by "
              f"stopping it (`ray stop` on that machine)", file=sys.stderr)
        return 2
    if options.launch.warm_restarts:
        print("regrow ray: --warm-restarts is the local launcher's; on Ray, --standby N keeps warm workers that take "
              "over a lost rank", file=sys.stderr)
        return 2
    cluster, checkpoint = options.ray, options.checkpoint
    try:
        connect(cluster.address)
        coordinator_config = CoordinatorConfig(
            workers=cluster.workers, cpus_per_worker=cluster.cpus_per_worker, gpus_per_worker=cluster.gpus_per_worker,
            ranks_per_node=cluster.ranks_per_node, ec_group_size=cluster.ec_group_size, ec_parity=cluster.ec_parity,
            hang_timeout_s=options.faults.hang_timeout_s or DEFAULT_HANG_TIMEOUT_S,
            resources_timeout_s=cluster.resources_timeout_s,
            max_restarts=max(options.launch.max_restarts, len(job.plan)), events_path=cluster.events,
            elastic_wait_s=cluster.elastic_wait_s, standby_per_node=cluster.standby)
        with tempfile.TemporaryDirectory(prefix="regrow-faults-") as fired:
            if config is None:  # --entry: the user's function trains
                return ray_entry.run_command(job, coordinator_config, plan_env(job.plan, fired))
            sinks = functools.partial(job_sinks, ckpt_dir=checkpoint.ckpt_dir, save_every=checkpoint.save_every,
                                      final_step=config.steps, on_error=checkpoint.on_error)
            # A straggler is replaced when a standby can take over at once; without one it is only named.
            stragglers = options.faults.stragglers()
            spec = WorkerSpec(config=config, world_size=cluster.workers,
                              device="cuda" if cluster.gpus_per_worker else "cpu",
                              snapshot_every=cluster.snapshot_every, ckpt_dir=checkpoint.ckpt_dir, extra_sinks=sinks,
                              ckpt_every=checkpoint.save_every if checkpoint.ckpt_dir else 0,
                              parity=options.faults.parity(), stragglers=stragglers,
                              replace_stragglers=stragglers is not None and cluster.standby > 0)
            outcome = Coordinator(coordinator_config, spec, env=plan_env(job.plan, fired)).run(config.steps)
    except (CoordinatorError, ProtocolError, ValueError) as error:
        print(f"regrow ray: {error}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    last = outcome.history[-1] if outcome.history else None
    print(f"regrow ray: trained to step {outcome.steps} with {outcome.failures} failure(s) healed"
          + (f"; last loss {last[1]:.4f}" if last else "") + resizes_text(outcome.resizes))
    return 0


def resizes_text(resizes: list[dict]) -> str:
    """``"; world size 3 -> 2 (from step 4) -> 3 (from step 6)"``: an elastic job's shrinks and growths, or ""."""
    if not resizes:
        return ""
    sizes = " -> ".join(f"{r['world_size']} (from step {r['step']})" for r in resizes)
    return f"; world size {resizes[0]['was']} -> {sizes}"
