"""One rank of a Ray-coordinated job: a Ray actor that hosts a ``Trainer`` and outlives its peers' failures.

The actor has two concurrency groups, one thread each: ``train`` (joining a process-group generation, restoring,
training, reading state) and ``control`` (heartbeat, abort). The coordinator can therefore reach a worker while
its training thread is blocked inside a collective: it aborts the communicators from the control thread
(``comm.abort``: NCCL needs it; a gloo collective fails by itself once the dead peer's sockets close), the
training call returns with an error, and the worker keeps its process, its CUDA context and its Trainer. After the
coordinator has formed the next generation, the survivors keep their state (a survivor goes back to the boundary
of the step the failure interrupted: ``trainer.boundary``), only the replacements restore that step from their
node's snapshot process (``recovery.restore.restore_job``, which falls back to every rank restoring
the newest common step when that is impossible), and training goes on. A rank that the state parity checks or the
straggler monitor name (``eviction.RankEviction``, raised on every rank) is killed by the coordinator and healed the
same way.

Contract: ``join`` before anything else and after every failure (it forms generation ``g`` of the process group
from the coordinator's store, under the prefix ``generation-g``); ``prepare`` once per generation (restore, sinks);
``train(until)`` runs steps until ``trainer.step == until`` or a failure. What every worker actor does whatever it
runs (its place, heartbeat and abort, adoption, joining and leaving a generation) is ``member.GroupMember``'s; the
actor of entry-point mode, which runs a user's function instead of a trainer, is ``entry_worker.EntryWorker``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from regrow.checkpoint.snapshot.copier_link import prestart_copier
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.checkpoint.universal.format import CheckpointError
from regrow.comm.world import destroy_world
from regrow.recovery import gpu_warm_up
from regrow.recovery.eviction import RankEviction
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.recovery.order import JobRestore, RecoveryImpossible, SnapshotRestoreError, Source
from regrow.recovery.parity import ParityConfig, ParityMonitor
from regrow.recovery.ray.entry import EntryPoint
from regrow.recovery.ray.member import CONCURRENCY_GROUPS, CONTROL, TRAIN, GroupMember, describe_failure
from regrow.recovery.restore import restore_job
from regrow.recovery.stragglers import Straggler, StragglerConfig, StragglerMonitor, evict
from regrow.trainer import sink_calls
from regrow.trainer.log import log_line
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.pipeline.config import PipelineTrainerConfig
from regrow.trainer.pipeline.trainer import PipelineTrainer
from regrow.trainer.state import StateSink


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What every worker of a job is given (the rank and the environment come separately)."""

    config: TrainerConfig | PipelineTrainerConfig | None = None
    """A ``PipelineTrainerConfig`` makes every worker one stage of a pipeline (``PipelineTrainer``): a lost stage is
    restored from its snapshot when snapshots are on and one serves, else rebuilt from its neighbours
    (``recovery.stage_heal``). None exactly when :attr:`entry` is given."""
    entry: EntryPoint | None = None
    """Entry-point mode: every worker runs the user's function (``entry_worker.EntryWorker``) instead of a
    trainer, again from the top in every generation; its Guard restores and snapshots (``snapshot_every`` and
    ``ckpt_dir`` here must be the Guard's, so that the coordinator starts the snapshot processes it uses)."""
    world_size: int
    device: str = "cpu"
    """``cpu`` (gloo) or ``cuda`` (NCCL, with gloo for CPU tensors)."""
    snapshot_every: int = 1
    """Snapshot into the node's snapshot process every this many steps (0: off)."""
    ckpt_dir: str | None = None
    """The universal-checkpoint root: the last restore source."""
    ckpt_every: int = 0
    """The steps between the universal checkpoints the sinks save under :attr:`ckpt_dir` (0: not known). An elastic
    job that shrank grows back to its size at one of these steps (``CoordinatorConfig.elastic_wait_s``)."""
    timeout_s: float = 60.0
    """Limit of process-group formation and snapshot-process requests."""
    survivors_keep_state: bool = True
    """After a failure, ranks that survived with intact state keep it and only replacements restore (False: every
    rank restores, e.g. to measure what keeping saves)."""
    extra_sinks: Callable[[int], list[StateSink]] | None = None
    """Builds more sinks for a rank (listed after the snapshot sink and the parity monitor), e.g. the launcher's
    fault injector; a module-level function, so that Ray sends it by reference (recovery never imports launch). A
    sink whose ``needs_training_hooks`` is true is given the model and the optimizer (``arm(model, optimizer)``)."""
    parity: ParityConfig | None = None
    """The state parity checks (None: off; ``recovery/parity.py``). A rank they name is replaced: its worker is
    killed and the job heals as after its death, from the step before the failed check."""
    stragglers: StragglerConfig | None = None
    """The straggler monitor (None: off; ``recovery/stragglers.py``)."""
    replace_stragglers: bool = False
    """Replace a straggler the monitor names as a dead rank is replaced (a standby takes over, see
    ``CoordinatorConfig.standby_per_node``; the survivors keep their state); False: it is only logged."""

    def __post_init__(self) -> None:
        if (self.config is None) == (self.entry is None):
            raise ValueError("WorkerSpec needs exactly one of config (regrow's trainer) and entry (the user's "
                             "function)")
        if isinstance(self.ckpt_every, bool) or not isinstance(self.ckpt_every, int) or self.ckpt_every < 0:
            raise ValueError(f"WorkerSpec.ckpt_every={self.ckpt_every!r} must be an integer >= 0")
        if self.ckpt_every and not self.ckpt_dir:
            raise ValueError("WorkerSpec.ckpt_every needs WorkerSpec.ckpt_dir (the root the checkpoints go to)")
        if self.replace_stragglers and self.stragglers is None:
            raise ValueError("WorkerSpec.replace_stragglers needs WorkerSpec.stragglers (the monitor that names them)")


class Worker(GroupMember):
    """One rank; see the module docstring. Created by the coordinator with ``ray.remote`` and the concurrency
    groups of :data:`CONCURRENCY_GROUPS` (methods are assigned to them there)."""

    def __init__(self, spec: WorkerSpec, rank: int, env: dict[str, str], *, standby: bool = False) -> None:
        """``standby``: a worker started ahead of need, with no rank and no GPU yet; :meth:`adopt` gives it both.
        It must not touch CUDA before then (CUDA_VISIBLE_DEVICES is read once, when CUDA starts)."""
        super().__init__(spec, rank, env)
        self.spec: WorkerSpec = spec
        self.trainer: Trainer | PipelineTrainer | None = None
        self.sink: SnapshotSink | None = None
        self._fresh = True  # the trainer has not trained nor restored yet (a replacement, or the first generation)
        self._named: list[dict] = []  # stragglers rank 0's monitor named, not yet handed to the coordinator
        if spec.device == "cuda" and not standby:
            gpu_warm_up.start(spec.config)

    # ------------------------------------------------------------------ train group
    def adopt(self, rank: int, gpus: list[str]) -> None:
        """:meth:`GroupMember.adopt`, then the GPU's warm-up starts."""
        super().adopt(rank, gpus)
        if self.spec.device == "cuda":
            gpu_warm_up.start(self.spec.config)

    def join(self, generation: int, store_host: str, store_port: int, snapshot_address: str | None,
             resume: bool = False, rank: int | None = None, world_size: int | None = None) -> dict:
        """Forms process-group generation ``generation`` with the other ranks, through the coordinator's store.
        ``resume``: the generation restores, so a trainer built now leaves its weights uninitialized (a 350M
        model's seeded init costs seconds on the CPU, and the restore overwrites it). ``rank``/``world_size``:
        this worker's place after an elastic shrink (its trainer is then rebuilt for the new world). Returns the
        seconds spent forming the group (``group_s``) and building the trainer (``build_s``, 0 when kept)."""
        started = time.monotonic()
        self._leave_group()
        if (rank, world_size) != (None, None) and (rank, world_size) != (self.rank, self.world_size):
            self.rank, self.world_size = int(rank), int(world_size)
            self._drop_sink()
            self.trainer, self._fresh = None, True
        world = self._connect(generation, store_host, store_port)
        self.address = snapshot_address
        formed = time.monotonic()
        if self.trainer is None:
            config = self.spec.config
            if self.spec.snapshot_every and self.sink is None:
                prestart_copier(world.device)  # its start overlaps the trainer's build
            self.trainer = (PipelineTrainer(config, world) if isinstance(config, PipelineTrainerConfig)
                            else Trainer(config, world, for_restore=resume))
        elif isinstance(self.trainer, PipelineTrainer):
            self.trainer.rejoin(world)  # its process groups belonged to the failed generation
        self._progress = (self.trainer.step, time.monotonic())
        return {"rank": self.rank, "group_s": formed - started, "build_s": time.monotonic() - formed}

    def prepare(self, resume: bool, lost_ranks: tuple[int, ...] = (), reshard: bool = False) -> dict:
        """Restores the job's common step when ``resume`` (collective; a survivor with intact state keeps it; in a
        pipeline without a usable snapshot, the stage of ``lost_ranks`` is rebuilt from its neighbours), then
        (re)attaches the snapshot sink and the fault injector. ``reshard``: the world shrank; every rank restores
        the latest universal checkpoint, resharded to it. Returns what was restored, or ``{"error": why}`` when
        nothing can restore it (the job cannot go on). ``attach_s``: the seconds spent attaching the sinks."""
        trainer = self._trainer()
        try:
            restored = self._restore(trainer, lost_ranks, reshard) if resume else None
        except (CheckpointError, SnapshotRestoreError, RecoveryImpossible) as error:  # every rank's verdict
            return {"rank": self.rank, "step": trainer.step, "source": None, "error": str(error)}
        self._fresh = False
        attaching = time.monotonic()
        trainer.sinks.clear()
        if restored is not None and restored.source is Source.KEPT and self.sink is not None \
                and self.sink.config.address == self.address:
            trainer.sinks.append(self.sink)  # flushed by _kept_step: it goes on from the kept step
        else:
            self._attach_new_sink(trainer, restored)
        self._attach_monitors(trainer, restored=restored is not None)
        self._progress = (trainer.step, time.monotonic())
        attach_s = time.monotonic() - attaching
        if restored is None:
            return {"rank": self.rank, "step": trainer.step, "source": None, "attach_s": attach_s}
        return {"rank": self.rank, "step": restored.step, "source": restored.source.value,
                "seconds": restored.seconds, "detail": restored.detail, "attach_s": attach_s}

    def settle(self) -> dict:
        """Closes this generation's sinks at the step boundary where the job changes size (an elastic job growing
        back), except the snapshot sink: a checkpoint writer waits for its save in flight, rank 0's until the save
        is committed, so the next generation finds it. Call on every rank at once (rank 0's commit waits for the
        other ranks' parts). Returns the rank and the step it stopped at."""
        trainer = self._trainer()
        try:
            sink_calls.close([sink for sink in trainer.sinks if sink is not self.sink])
        except Exception as error:  # noqa: BLE001 (a failed last save: the growth restores the newest good one)
            log_line(self.rank, trainer.step, f"settling before the job grows: {type(error).__name__}: {error}")
        trainer.sinks.clear()
        return {"rank": self.rank, "step": trainer.step}

    def _restore(self, trainer: Trainer | PipelineTrainer, lost_ranks: tuple[int, ...], reshard: bool) -> JobRestore:
        if reshard:
            loaded = restore_trainer(trainer, "latest", root=self.spec.ckpt_dir)
            return JobRestore(source=Source.CHECKPOINT, step=loaded.step, detail=str(loaded.path),
                              lineage=trainer.start_lineage())
        kept_step = self._kept_step()
        if isinstance(trainer, PipelineTrainer):
            # A pipeline: its snapshots (when on), else its lost stage rebuilt from the neighbours, else every stage
            # from the universal checkpoint (each reading its own stage's shard).
            address = self.address if self.spec.snapshot_every else None
            return restore_job(trainer, address, ckpt_root=self.spec.ckpt_dir, timeout_s=self.spec.timeout_s,
                               kept_step=kept_step, lost_ranks=lost_ranks)
        return restore_job(trainer, self.address, ckpt_root=self.spec.ckpt_dir, timeout_s=self.spec.timeout_s,
                           kept_step=kept_step)

    def _attach_monitors(self, trainer: Trainer | PipelineTrainer, *, restored: bool) -> None:
        """After the snapshot sink: the parity monitor (after a restore it compares the ranks at once, collective),
        the extra sinks (armed when they need the model), then the straggler monitor. A pipeline's stages hold
        different parameters: no parity there."""
        is_pipeline = isinstance(trainer, PipelineTrainer)
        if self.spec.parity is not None and not is_pipeline:
            trainer.sinks.append(ParityMonitor(self.spec.parity, optimizer=trainer.optimizer,
                                               state=trainer.shard_state(), timeout_s=self.spec.timeout_s,
                                               after_restore=restored))
        for sink in self.spec.extra_sinks(self.rank) if self.spec.extra_sinks is not None else []:
            if getattr(sink, "needs_training_hooks", False):
                sink.arm(trainer.model if not is_pipeline else trainer.module, trainer.optimizer)
            trainer.sinks.append(sink)
        if self.spec.stragglers is not None and trainer.world_size > 1 and not is_pipeline:
            trainer.sinks.append(StragglerMonitor(self.spec.stragglers, rank=self.rank,
                                                  world_size=trainer.world_size, device=trainer.device,
                                                  timeout_s=self.spec.timeout_s, start_step=trainer.step,
                                                  on_straggler=evict if self.spec.replace_stragglers
                                                  else self._note_straggler))

    def _note_straggler(self, straggler: Straggler) -> None:
        """Keeps a straggler named (not replaced) for the coordinator's event log; rank 0's only (every rank names
        the same)."""
        if self.rank == 0:
            self._named.append(straggler.to_dict())

    def named_stragglers(self) -> list[dict]:
        """The stragglers named since the last call (the heartbeat and each training call's result carry them)."""
        named, self._named = self._named, []
        return named

    def heartbeat(self) -> dict:
        """:meth:`GroupMember.heartbeat`, with the stragglers named since the last beat (``stragglers``)."""
        return {**super().heartbeat(), "stragglers": self.named_stragglers()}

    def _kept_step(self) -> int | None:
        """The step this survivor keeps its state at (None: it must restore). Rewinds the step the failure
        interrupted, and seals the snapshot its sink had in flight (the copy finished before any update began, so
        it holds the kept step exactly; the replacements may restore from its peers' equivalents)."""
        if self._fresh or not self.spec.survivors_keep_state:
            return None
        trainer = self._trainer()
        if self.sink is not None:
            try:
                self.sink.flush()
            except Exception as error:  # noqa: BLE001 (a lost snapshot process: a new sink is attached below)
                log_line(self.rank, trainer.step, f"snapshot: the snapshot in flight was not sealed: {error}")
                self._drop_sink()
        return trainer.step if trainer.rewind_interrupted_step() else None

    def _attach_new_sink(self, trainer: Trainer, restored: JobRestore | None) -> None:
        """Attaches the snapshot sink at the restored state: the same sink while its snapshot process is the same
        (its segments stay mapped and registered with CUDA), else a new one."""
        if self.sink is not None and self.sink.config.address != self.address:
            self._drop_sink()
        if not self.spec.snapshot_every or self.address is None:
            self._drop_sink()
            return
        if self.sink is None:
            self.sink = SnapshotSink(SnapshotSinkConfig(address=self.address, every=self.spec.snapshot_every,
                                                        timeout_s=self.spec.timeout_s), rank=self.rank)
        kept = restored.detail if restored is not None and restored.source is not Source.CHECKPOINT else None
        self.sink.attach(trainer.shard_state(), restored_from=kept)
        trainer.sinks.append(self.sink)

    def _drop_sink(self) -> None:
        if self.sink is not None:
            self.sink.detach()
            self.sink.client.close()
            self.sink = None

    def train(self, until: int) -> dict:
        """Trains until step ``until``; returns ``{"done": [(step, loss)...], "error": None}``, or with ``error``
        describing the failure that stopped it (a peer lost, an abort), reported rather than raised so that no
        exception has to cross Ray's serialisation, and ``unwind``: seconds from the abort request to the failed
        step's error (``error_after_abort_s``, negative when the error came first), of the NCCL abort call
        (``abort_call_s``) and of leaving the group (``leave_s``). The worker stays usable for the next generation."""
        trainer = self._trainer()
        done: list[tuple[int, float]] = []
        why = None
        evicted: list[int] = []
        try:
            while trainer.step < until:
                result = trainer.train_step()
                done.append((result.step, result.loss))
                self._progress = (result.step, time.monotonic())
            if self.sink is not None:
                self.sink.flush()
        except RankEviction as error:  # every rank raised it: the named ranks are to be replaced
            failed_at = time.monotonic()
            why, evicted = describe_failure(error), list(error.ranks)
            if self.rank in error.ranks and self.sink is not None:
                self.sink.flush()  # its replacement restores this rank's last snapshot: sealed before it goes
        except Exception as error:  # noqa: BLE001 (any failure of the step is the coordinator's to handle)
            failed_at = time.monotonic()
            why = describe_failure(error)
        if why is None:
            return {"done": done, "error": None, "stragglers": self.named_stragglers()}
        # Out of the except block: the traceback's frames no longer hold the groups.
        return {"done": done, "error": why, "evict": evicted, "unwind": self._leave_after_failure(failed_at),
                "stragglers": self.named_stragglers()}

    def parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters, on the CPU (what tests compare across runs). Collective at ZeRO stage 3 (they
        are gathered to be read): every rank is asked at once."""
        trainer = self._trainer()
        module = trainer.module if isinstance(trainer, PipelineTrainer) else trainer.model
        with trainer.optimizer.gathered_parameters():
            return {name: p.detach().cpu().clone() for name, p in module.named_parameters()}

    def step(self) -> int:
        return self._trainer().step

    def shutdown(self) -> None:
        """Closes the sinks (a checkpoint writer commits the save in flight) and leaves the process group."""
        for sink in self.trainer.sinks if self.trainer is not None else []:
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001 (shutting down: report and go on)
                log_line(self.rank, self.trainer.step, f"shutdown: {type(sink).__name__}.close failed: {error}")
        if self.sink is not None:
            self.sink.client.close()
        destroy_world()

    # ------------------------------------------------------------------
    def _leave_group(self) -> None:
        """:meth:`GroupMember._leave_group`, a pipeline's own groups released first."""
        if isinstance(self.trainer, PipelineTrainer):
            self.trainer.release_groups()
        super()._leave_group()

    def _trainer(self) -> Trainer | PipelineTrainer:
        if self.trainer is None:
            raise RuntimeError(f"rank {self.rank}: join() first")
        return self.trainer


__all__ = ["CONCURRENCY_GROUPS", "CONTROL", "TRAIN", "Worker", "WorkerSpec"]
