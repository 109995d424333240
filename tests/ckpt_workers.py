"""Functions that run inside spawned ranks for the checkpoint tests (importable as ``regrow.tests.ckpt_workers``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch

from regrow.checkpoint.universal.format import Chunk, temp_dir_name
from regrow.checkpoint.universal.writer import CheckpointWriter, PendingSave, WriterConfig
from regrow.comm.world import World
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.layout import BLOCK_SIZE, FlatLayout, round_up
from regrow.trainer.zero.optimizer import ZeroOptimizer

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4: one micro-batch per rank at every world size the tests use


def config(world_size: int, *, stage: int = 2, state_bits: int = 8, steps: int = 6, lr: float = 1e-3) -> TrainerConfig:
    """The tiny GPT with one micro-batch of ``GLOBAL_BATCH / world_size`` sequences per rank per step."""
    return TrainerConfig(
        model=GPTConfig.preset("tiny"),
        data=DataConfig(seq_len=64, micro_batch=GLOBAL_BATCH // world_size, global_batch=GLOBAL_BATCH),
        optim=ZeroConfig(stage=stage, state_bits=state_bits, lr=lr, min_8bit_numel=1024),
        steps=steps, warmup_steps=2, log_every=0, progress=False,
    )


def write_steps_2_and_4(root: Path) -> None:
    """Good checkpoints of steps 2 and 4 under ``root``, written by one process (what the damage tests copy)."""
    trainer = Trainer(config(1, steps=4))
    writer = CheckpointWriter(WriterConfig(root=str(root), save_every=2, keep_last=3, when_busy="wait"),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.run()
    assert [r.status for r in writer.results] == ["committed", "committed"]


def per_param_state(optimizer: ZeroOptimizer) -> dict[str, torch.Tensor]:
    """Every parameter's master weights and optimizer state, cut out of the gathered flat tensors, keyed
    ``"<param>:<what>"`` (codes include the padding codes of the last block). Collective."""
    layout: FlatLayout = optimizer.layout
    out = {}
    for key in optimizer.shard_tensors():
        group_name, what = key.split("/", 1)
        full = optimizer.gather_full(key)
        for slot in layout.group(group_name).params:
            if what.endswith("_scales"):
                piece = full[slot.offset // BLOCK_SIZE : (slot.offset + round_up(slot.numel, BLOCK_SIZE)) // BLOCK_SIZE]
            elif what.endswith("_codes"):
                piece = full[slot.offset : slot.offset + round_up(slot.numel, BLOCK_SIZE)]
            else:
                piece = full[slot.offset : slot.offset + slot.numel]
            out[f"{slot.name}:{what}"] = piece.clone()
    return out


def params_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    with trainer.optimizer.gathered_parameters():  # stage 3: the parameters exist only while gathered
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def save_runs(world: World, runs: list[dict]) -> list[dict]:
    """For each run (``root``, ``state_bits``, ``stage``): trains ``steps`` with a writer saving every
    ``save_every`` steps; returns the losses, the final parameters and the per-parameter state at the first save."""
    results = []
    for run in runs:
        trainer = Trainer(config(world.world_size, stage=run["stage"], state_bits=run["state_bits"]), world)
        # when_busy="wait": every save step must produce a checkpoint here, however slow the disk is.
        # chunk_bytes=4096: files of several chunks, so that loads at other layouts read parts of chunks.
        settings = WriterConfig(root=run["root"], save_every=run["save_every"], keep_last=3, when_busy="wait",
                                chunk_bytes=4096)
        writer = CheckpointWriter(settings, run_config=trainer.config.to_dict())
        trainer.sinks.append(writer)
        losses, saved_state = [], None
        while trainer.step < trainer.config.steps:
            losses.append(trainer.train_step().loss)
            if trainer.step == run["save_every"]:
                saved_state = per_param_state(trainer.optimizer)
        writer.close()
        results.append({"losses": losses, "params": params_of(trainer), "saved_state": saved_state,
                        "results": [r.status for r in writer.results]})
    return results


def load_runs(world: World, runs: list[dict]) -> list[dict]:
    """For each run (``path``, ``stage``, ``state_bits``): restores into a fresh Trainer at this world size and
    continues to ``steps``; returns the per-parameter state right after the load, the losses, the final parameters
    and the bytes this rank read (rank 0's results; ``bytes_read`` of every rank)."""
    results = []
    for run in runs:
        trainer = Trainer(config(world.world_size, stage=run["stage"], state_bits=run["state_bits"]), world)
        report = restore_trainer(trainer, run["path"])
        loaded = per_param_state(trainer.optimizer)
        losses = [trainer.train_step().loss for _ in range(trainer.config.steps - trainer.step)]
        results.append({"loaded_state": loaded, "losses": losses, "params": params_of(trainer),
                        "step": report.step, "cursor": trainer.sampler.state().to_dict(),
                        "bytes_read": report.bytes_read})
    return results


def save_then_fail_on_rank1(world: World, root: str) -> list[str]:
    """Saves at step 2 normally; then rank 1 gets a file-size limit (``RLIMIT_FSIZE``, which any process may lower
    on itself, no root needed) so its writes of step 4 fail with EFBIG like on a full disk. Returns the statuses."""
    import resource

    trainer = Trainer(config(world.world_size, steps=4), world)
    writer = CheckpointWriter(WriterConfig(root=root, save_every=2, keep_last=2, commit_timeout_s=60),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.train_step()
    trainer.train_step()
    writer.wait(60)
    if world.rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    trainer.train_step()
    trainer.train_step()
    writer.close()
    return [f"{r.step}:{r.status}:{r.error}" for r in writer.results]


def save_into_a_blocked_root(world: World, root: str, on_error: str | None) -> dict:
    """Saves step 2; then rank 0 puts a regular file where the saves of steps 4 and 6 must create their temporary
    directory, so that every rank's writes of them fail with ENOTDIR (a path lookup the kernel refuses for root too,
    unlike a ``chmod``: the tests run as root). Trains to step 6 (saving every 2 steps, ``commit_timeout_s`` 20,
    ``on_error`` as given, the default when None). Returns every save's ``step:status:error``, the seconds from the
    start of step 4 until its save had ended on this rank, and the step training reached."""
    settings = {"on_error": on_error} if on_error else {}
    trainer = Trainer(config(world.world_size, steps=6), world)
    writer = CheckpointWriter(WriterConfig(root=root, save_every=2, final_step=6, commit_timeout_s=20, **settings),
                              run_config=trainer.config.to_dict())
    trainer.sinks.append(writer)
    trainer.train_step()
    trainer.train_step()
    writer.wait(60)
    if world.rank == 0:  # before step 3's all-reduce of the loss, which every rank must pass to reach step 4
        for step in (4, 6):
            Path(root, temp_dir_name(step, writer.session)).write_text("in the way")
    trainer.train_step()
    started = time.monotonic()
    trainer.train_step()
    writer.wait(120)
    seconds = time.monotonic() - started
    trainer.run()  # steps 5 and 6
    return {"results": [f"{r.step}:{r.status}:{r.error}" for r in writer.results], "seconds": seconds,
            "step": trainer.step}


class SlowWriter(CheckpointWriter):
    """A writer whose persist of step ``slow_step`` announces itself (``flag`` file) after its first file and then
    crawls, so the parent can kill -9 the process in the middle of it."""

    slow_step = 4
    flag = ""

    def write_range(self, path: Path, source: torch.Tensor, offset: int) -> list[Chunk]:
        chunks = super().write_range(path, source, offset)
        if self._slow:
            Path(self.flag).write_text(str(os.getpid()))
            time.sleep(5)
        return chunks

    def write_shard(self, save: PendingSave) -> dict[str, list[Chunk]]:
        self._slow = save.step == self.slow_step
        return super().write_shard(save)


def train_until_killed(root: str, flag: str) -> None:
    """Single process: saves step 2 completely, then starts the slow save of step 4 and waits to be killed."""
    torch.set_num_threads(1)
    trainer = Trainer(config(1, steps=4))
    writer = SlowWriter(WriterConfig(root=root, save_every=2, keep_last=2), run_config=trainer.config.to_dict())
    writer.flag = flag
    trainer.sinks.append(writer)
    trainer.train_step()
    trainer.train_step()
    writer.wait(60)
    trainer.train_step()
    trainer.train_step()
    time.sleep(120)  # the parent kills this process long before


class GatedWriter(CheckpointWriter):
    """A writer whose persist blocks until ``gate`` is set, recording the thread it ran on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.persist_threads: list[int] = []

    def write_shard(self, save: PendingSave) -> dict[str, list[Chunk]]:
        self.persist_threads.append(threading.get_ident())
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return super().write_shard(save)


def load_damaged(world: World, paths: list[str]) -> list[dict]:
    """Tries to restore each (damaged) checkpoint step directory into a fresh trainer at this world size; returns,
    per path, the error this rank saw (``None``: it loaded) and whether the trainer's state was left as built (no
    tensor of a failed restore reached it)."""
    results = []
    for path in paths:
        trainer = Trainer(config(world.world_size), world)
        before = {k: v.clone() for k, v in trainer.optimizer.shard_tensors().items()}
        error = None
        try:
            restore_trainer(trainer, path)
        except Exception as failure:  # noqa: BLE001 (what each rank saw is the result)
            error = f"{type(failure).__name__}: {failure}"
        untouched = trainer.step == 0 and all(torch.equal(before[k], v)
                                              for k, v in trainer.optimizer.shard_tensors().items())
        results.append({"error": error, "untouched": untouched})
    return results
