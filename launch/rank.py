"""One rank's whole run, the entry point of every process the local launcher spawns or torchrun starts:
:func:`train_rank` restores (from the node's snapshots, else a checkpoint), attaches the snapshot sink, the fault
injector, the checkpoint writer and the heartbeat, then trains.

The sinks run in this order after each step: the snapshot sink first, then the checkpoint writer, the state parity
monitor (its seal of a step's shard comes after every reader of that state and before any injected corruption), then
the fault injector (so that a fault fires while the snapshot of the previous step is still in flight), the straggler
monitor, and the heartbeat last (its beat before the optimizer step means every other sink let the step through).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from regrow.checkpoint.snapshot.copier_link import prestart_copier
from regrow.checkpoint.snapshot.protocol import request_once
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.universal import verify
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.comm.world import World
from regrow.launch.chaos.injector import FaultInjector
from regrow.launch.chaos.records import RestoreLog, write_parity, write_straggler
from regrow.launch.local.attempts import ATTEMPT_ENV, RUN_DIR_ENV
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.local.watchdog import Heartbeat
from regrow.launch.options import CheckpointOptions, SnapshotOptions
from regrow.recovery import gpu_warm_up
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.recovery.order import JobRestore, Source
from regrow.recovery.parity import ParityConfig, ParityMonitor
from regrow.recovery.restore import restore_job
from regrow.recovery.stragglers import StragglerConfig, StragglerMonitor
from regrow.trainer.log import log_line
from regrow.trainer.loop import StepResult, Trainer, TrainerConfig
from regrow.trainer.state import Restorable, ShardState, StateSink
from regrow.trainer.zero.optimizer import ZeroOptimizer


@dataclass(frozen=True, kw_only=True)
class RankWork:
    """What every rank of an attempt runs (picklable: the local launcher sends it to each spawned rank)."""

    config: TrainerConfig
    checkpoint: CheckpointOptions | None = None
    """The checkpoint side (None: the ranks neither save nor restore a checkpoint)."""
    snapshot: SnapshotOptions | None = None
    """The snapshot side (None: the ranks neither snapshot nor restore a snapshot)."""
    stragglers: StragglerConfig | None = None
    """The straggler monitor's settings (None: no straggler detection)."""
    parity: ParityConfig | None = None
    """The state parity checks' settings (None: no checks)."""

    @classmethod
    def of(cls, config: TrainerConfig, checkpoint: CheckpointOptions, snapshot: SnapshotOptions,
           stragglers: StragglerConfig | None = None, parity: ParityConfig | None = None) -> RankWork:
        """The work of a run's first attempt: each side that is active."""
        return cls(config=config, checkpoint=checkpoint if checkpoint.active else None,
                   snapshot=snapshot if snapshot.active else None, stragglers=stragglers, parity=parity)

    def warm_up(self, local_rank: int) -> None:
        """A standby rank's preparation (``--warm-restarts``): the trainer's imports, the CUDA context of the device
        this local rank will use, its snapshot copier, started with that device, and the kernels of a restore and a
        first step (``recovery.gpu_warm_up``)."""
        import torch

        from regrow.trainer import loop  # noqa: F401 (imported now: the model, optimizer and data modules)

        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)  # the context, made now
            if self.snapshot is not None and self.snapshot.every:
                prestart_copier(device)
            try:  # the checksum kernel the restore runs and the first step's kernels (0.5 s of that step, cold),
                # compiled as the trainer compiles them (this thread is the standby's only one)
                gpu_warm_up.warm_up_device(self.config, device, compiled=True)
            except Exception as error:  # noqa: BLE001 (best effort: the first step pays as before)
                print(f"[launcher] standby for rank {local_rank}: GPU kernel warm-up failed ({error})", flush=True)

    @property
    def restores(self) -> bool:
        """Whether the ranks restore a state before their first step (a resume from snapshots or a checkpoint)."""
        return bool((self.snapshot is not None and self.snapshot.resume)
                    or (self.checkpoint is not None and self.checkpoint.resume))

    def after_failure(self) -> RankWork:
        """The work of the attempt after a failure (once the nodes are healed): resume from the snapshots (which
        fall back to ``latest`` of the checkpoint root), or from ``latest`` when snapshots are off, or from step 0
        when nothing was saved."""
        if self.snapshot is not None and self.snapshot.every:
            return dataclasses.replace(self, snapshot=dataclasses.replace(self.snapshot, resume=True))
        checkpoint = self.checkpoint
        if checkpoint is not None and checkpoint.ckpt_dir and verify.newest_candidate(Path(checkpoint.ckpt_dir)):
            return dataclasses.replace(self, checkpoint=dataclasses.replace(checkpoint, resume="latest"))
        print("[launcher] no snapshot or checkpoint to resume from: the next attempt starts from step 0", flush=True)
        return self


class GuardedRun(Restorable, Protocol):
    """A training object the rank's sinks attach to: a ``Restorable`` with a list of sinks that it calls around
    every optimizer step, and its state at the current step boundary (regrow's ``Trainer`` and the own-loop
    ``launch.guard.Guard`` both satisfy it)."""

    sinks: list[StateSink]
    model: torch.nn.Module
    optimizer: ZeroOptimizer

    def shard_state(self) -> ShardState: ...


def train_rank(world: World, work: RankWork) -> list[StepResult]:
    """One rank's whole run (see the module docstring). Collective: every rank of the job calls it. The launcher's
    run directory and attempt come from the environment (``REGROW_RUN_DIR``, ``REGROW_ATTEMPT``): when given, the
    rank records its restores and heartbeats there."""
    started = time.perf_counter()
    if work.snapshot is not None and work.snapshot.every:
        prestart_copier(world.device)  # the snapshot copier's start overlaps the model build (CUDA only)
    # A rank that restores skips the seeded initialization, which it would overwrite: for the 350m preset that
    # initialization (on the CPU, then moved) was most of a restart's time after the restore itself.
    trainer = Trainer(work.config, world, for_restore=work.restores)
    built = time.perf_counter()
    attach_rank(trainer, checkpoint=work.checkpoint, snapshot=work.snapshot, final_step=work.config.steps,
                stragglers=work.stragglers, parity=work.parity)
    if work.restores:
        log_line(trainer.rank, trainer.step, f"ready to train in {time.perf_counter() - started:.2f} s (trainer "
                                             f"built in {built - started:.2f} s, then restored and attached)")
    return trainer.run()


def attach_rank(target: GuardedRun, *, checkpoint: CheckpointOptions | None, snapshot: SnapshotOptions | None,
                final_step: int, stragglers: StragglerConfig | None = None,
                parity: ParityConfig | None = None) -> None:
    """Restores ``target`` as ``snapshot`` and ``checkpoint`` say (``resume``), then attaches the rank's sinks in
    the module docstring's order: the snapshot sink, the checkpoint writer (its final save at ``final_step``), the
    state parity monitor (``parity``; after a restore it compares the ranks at once), the fault injector of
    ``REGROW_FAULTS``, the straggler monitor (``stragglers``; both monitors record what they find in the launcher's
    run directory), the heartbeat. Collective."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    attempt = int(os.environ.get(ATTEMPT_ENV, "0"))
    restores = RestoreLog(run_dir, attempt=attempt, rank=target.rank) if run_dir else None
    snapshot_sink = None
    if snapshot is not None:
        snapshot_sink = restore_and_attach_snapshots(target, snapshot,
                                                     restores.restored if restores is not None else None)
    if checkpoint is not None and checkpoint.resume:
        restore_trainer(target, checkpoint.resume, root=checkpoint.ckpt_dir)
        if restores is not None:
            restores.restored_checkpoint(target.step, checkpoint.resume)
    # Built before the injector is armed: its first seal must hold the state as restored, before any planned
    # corruption of the first step strikes.
    monitor = None
    if parity is not None:
        record_parity = ((lambda error: write_parity(run_dir, attempt, error.to_dict()))
                         if run_dir and target.rank == 0 else None)
        monitor = ParityMonitor(parity, optimizer=target.optimizer, state=target.shard_state(),
                                timeout_s=target.timeout_s, after_restore=target.step > 0, on_mismatch=record_parity)
    injector = FaultInjector.from_env(target.rank, snapshot_sink=snapshot_sink, step=target.step)
    if injector is not None and injector.needs_training_hooks:
        injector.arm(target.model, target.optimizer)
    writer = None
    if checkpoint is not None:
        io_fault = injector.checkpoint_fault if injector is not None and injector.fails_checkpoints else None
        writer = attach_writer(target, checkpoint, final_step=final_step, io_fault=io_fault)
    if monitor is not None:
        target.sinks.append(monitor)
    if injector is not None:
        if writer is not None:
            injector.watch_saves(writer)
        target.sinks.append(injector)
    if stragglers is not None and target.world_size > 1:
        record = ((lambda found: write_straggler(run_dir, attempt, found.to_dict()))
                  if run_dir and target.rank == 0 else None)
        target.sinks.append(StragglerMonitor(stragglers, rank=target.rank, world_size=target.world_size,
                                             device=target.device, timeout_s=target.timeout_s,
                                             start_step=target.step, on_straggler=record))
    if run_dir:
        target.sinks.append(Heartbeat(run_dir, rank=target.rank, attempt=attempt, step=target.step))


def restore_and_attach_snapshots(trainer: GuardedRun, options: SnapshotOptions,
                                 on_restore: Callable[[JobRestore], None] | None = None) -> SnapshotSink | None:
    """Restores ``trainer`` if ``options.resume``, then attaches a :class:`SnapshotSink` if snapshots are on
    (attaching now, so a full ``/dev/shm`` fails before the first step). Collective. The address comes from the
    launcher (``REGROW_SNAPSHOT_ADDRESS``) or ``--snapshot-address``; the token from ``REGROW_SNAPSHOT_TOKEN``.
    ``on_restore`` is given the restore's result (source, step, what was passed over), e.g. for the fault report."""
    address = options.address or os.environ.get(ADDRESS_ENV)
    if address is None:
        raise RuntimeError(f"{ADDRESS_ENV} is not set: the launcher sets it when --snapshot-every or --resume "
                           "snapshot is given (under torchrun, pass --snapshot-address)")
    restored = restore_job(trainer, address, ckpt_root=options.ckpt_dir, timeout_s=options.timeout_s) \
        if options.resume else None
    if restored is not None and on_restore is not None:
        on_restore(restored)
    if not options.every:
        return None
    sink = SnapshotSink(SnapshotSinkConfig(address=address, every=options.every, timeout_s=options.timeout_s),
                        rank=trainer.rank)
    from_slot = restored.detail if restored is not None and restored.source is not Source.CHECKPOINT else None
    sink.attach(trainer.shard_state(), restored_from=from_slot)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and persists(address, options.timeout_s):
        # What the persisted manifests record as the run's config (the snapshot process cannot know it).
        request_once(address, {"op": "run_config", "config": trainer.run_config()}, timeout_s=options.timeout_s)
    trainer.sinks.append(sink)
    return sink


def persists(address: str, timeout_s: float) -> bool:
    """Whether the snapshot process at ``address`` persists checkpoints (``--persist-every`` of the local launcher,
    or of the torchrun node helper that started it)."""
    return bool(request_once(address, {"op": "persisted"}, timeout_s=timeout_s).get("enabled"))


def attach_writer(trainer: GuardedRun, options: CheckpointOptions, *, final_step: int,
                  io_fault: Callable[[int], None] | None = None) -> CheckpointWriter | None:
    """Attaches a :class:`CheckpointWriter` when saving is on (``final_step``: the run's last step, always saved;
    ``io_fault``: its fault-injection hook). Collective (the ranks agree on the writer's session)."""
    if not options.save_every:
        return None
    assert options.ckpt_dir is not None
    writer = CheckpointWriter(
        WriterConfig(root=options.ckpt_dir, save_every=options.save_every, keep_last=options.keep_last,
                     final_step=final_step, on_error=options.on_error),
        rank=trainer.rank, world_size=trainer.world_size, run_config=trainer.run_config(),
        timeout_s=trainer.timeout_s, io_fault=io_fault,
    )
    writer.prepare(trainer.shard_state())  # the first save's host buffers, allocated now off the training thread
    trainer.sinks.append(writer)
    return writer
