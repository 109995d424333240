"""What a checkpoint costs a training job: regrow's lazy asynchronous writer vs DeepSpeed ``save_checkpoint`` vs
FSDP2 + ``torch.distributed.checkpoint.async_save``; and how fast regrow loads a checkpoint saved at another world size.

One implementation per torchrun invocation (fresh processes, so no allocator or NCCL state leaks between them)::

    torchrun --nproc_per_node=4 bench/bench_checkpoint.py --impl regrow --ckpt-dir /tmp/bench-ckpt --json out.jsonl
    torchrun --nproc_per_node=4 bench/bench_checkpoint.py --impl deepspeed --ckpt-dir /tmp/bench-ckpt --json out.jsonl
    torchrun --nproc_per_node=4 bench/bench_checkpoint.py --impl fsdp2 --ckpt-dir /tmp/bench-ckpt --json out.jsonl
    torchrun --nproc_per_node=2 bench/bench_checkpoint.py --impl regrow-load --ckpt-dir /tmp/bench-ckpt --json out.jsonl

(``bench/run_gpu_checkpoint.sh`` runs all four.) Every implementation trains the 350m GPT (``--preset``) with bf16
working parameters, micro-batch ``--micro-batch`` x seq_len per GPU, ZeRO-2-like sharding; regrow with 8-bit Adam
state (its product configuration), DeepSpeed ZeRO-2 and FSDP2 with ``torch.optim.AdamW(fused=True)`` as in
``bench_zero.py``. regrow trains through its ``Trainer`` (embedded corpus); the others on random tokens.

Protocol (``regrow``, ``deepspeed``, ``fsdp2``): ``--warmup`` untimed steps; ``--baseline-steps`` steps each timed
alone (device synchronised before and after, maximum over ranks): their median is reported as ``baseline_ms``.
Then ``--saves`` saves (the first is "cold" for the others, which create their files then; regrow allocates its
pinned host buffers at start-up, off the training thread, as ``launch/rank.attach_writer`` does). Every save is measured with windows of ``--window`` consecutive steps, the device synchronised only at the
ends of a window (a per-step synchronisation would force the wait that regrow's lazy copy avoids, and is not what a
training loop does):

- ``stall_s``: the time of a window in which the save starts after its first step, minus the median of three
  windows without a save measured just before; ``stall_vs_step``: that as a fraction of one step. For regrow the
  device-to-host copies overlap the next forward/backward and the next optimizer step waits for them; for DeepSpeed
  the blocking ``save_checkpoint`` sits inside the window; for FSDP2 the blocking part of ``async_save`` does.
- ``persist_s``: from the start of the save until it is on disk and committed (regrow: rank 0's commit; FSDP2: the
  future's completion; DeepSpeed: its blocking time).
- ``during_ms`` / ``during_vs_baseline``: mean step time over the windows that ran while the save was persisting
  (at most ``--max-steps-during`` steps), and its ratio to the window baseline; ``bytes``: size on disk.

Then the load at the same world size (``load_same_world_s``, barrier to barrier).

``regrow-load`` (a second torchrun, e.g. 2 GPUs after a save on 4): builds the same model at this world size and
times ``restore_trainer`` of ``--ckpt-dir``'s latest regrow checkpoint (barrier to barrier), i.e. reading only each
rank's byte ranges, verifying their checksums and resharding. It then measures the disk's read speed on rank 0 by
reading every file of that checkpoint twice: with ``O_DIRECT`` (bypasses the page cache: the device's speed, where
the filesystem supports it) and buffered (mostly served from the page cache, which is warm after the load). The page
cache cannot be dropped without root privileges, so the load itself may be served partly from memory: compare it
with both figures.

Rank 0 prints ``RESULT {json}`` and appends it to ``--json``. ``--device cpu --preset tiny`` runs the same code over
gloo as a smoke test (DeepSpeed needs ``DS_ACCELERATOR=cpu`` then).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import mmap
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# bench/ is this script's folder, which torchrun puts on sys.path: share bench_zero's settings and helpers.
from bench_zero import (
    BETAS,
    EPS,
    LR,
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    emit_result,
    fused_adamw,
    init_distributed,
    make_batches,
    result_header,
)

from regrow.checkpoint.universal import verify
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.comm.world import World, backend_string
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.models import GPT, GPTConfig
from regrow.trainer.zero.config import ZeroConfig

IMPLS = ("regrow", "deepspeed", "fsdp2", "regrow-load")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True, choices=IMPLS)
    parser.add_argument("--preset", default="350m", help="GPTConfig preset: 350m on GPUs, tiny for the CPU smoke test")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--baseline-steps", type=int, default=8, help="steps timed without any save")
    parser.add_argument("--saves", type=int, default=2, help="saves measured (the first is cold)")
    parser.add_argument("--max-steps-during", type=int, default=60, help="most steps run while one save persists")
    parser.add_argument("--window", type=int, default=5, help="consecutive steps per timed window")
    parser.add_argument("--ckpt-dir", required=True, help="checkpoint root; each impl writes its own sub-folder")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-fsync", action="store_true", help="regrow: skip fsync (DeepSpeed and DCP do not fsync)")
    parser.add_argument("--chunk-mib", type=int, default=None,
                        help="regrow: WriterConfig.chunk_bytes in MiB (bytes per checksum and per write; default the "
                             "writer's)")
    parser.add_argument("--cold-first-save", action="store_true",
                        help="regrow: no start-up allocation of the host buffers (the first save allocates them on "
                             "the training thread, as before CheckpointWriter.prepare): the anchor of the first save")
    parser.add_argument("--json", default=None, help="file to append the result line to (rank 0)")
    args = parser.parse_args(argv)
    for name in ("micro_batch", "baseline_steps", "saves", "max_steps_during", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)  # CPU: reduced over gloo on the GPU host too
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    return max_over_ranks(float(flag)) > 0


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds ``work`` takes on this rank, device work included, as the slowest rank saw it."""
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return max_over_ranks(time.perf_counter() - start)


def barrier_timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds from a barrier before ``work`` to a barrier after it (how DeepSpeed's save figures are taken)."""
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    work()
    sync(device)
    dist.barrier()
    return time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class Job:
    """One implementation ready to train and save: ``step()`` runs one optimizer step; ``start_save(i)`` begins
    save number ``i`` and returns a function telling whether it still persists; ``finish_save()`` blocks until it is
    done and returns (persist seconds, bytes on disk); ``load()`` loads the last save at the same world size."""

    step: Callable[[], object]
    start_save: Callable[[int], Callable[[], bool]]
    finish_save: Callable[[], tuple[float, int]]
    load: Callable[[], object]
    settings: dict


# ---------------------------------------------------------------------------------------------------- regrow


def regrow_trainer(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Trainer:
    model = GPTConfig.preset(args.preset)
    config = TrainerConfig(
        model=model,
        data=DataConfig(seq_len=model.seq_len, micro_batch=args.micro_batch,
                        global_batch=args.micro_batch * world_size),
        optim=ZeroConfig(stage=2, state_bits=8, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                         max_grad_norm=MAX_GRAD_NORM, param_dtype="bfloat16"),
        steps=10**6, warmup_steps=10, seed=args.seed, log_every=0, progress=False,
    )
    world = World(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                  device=device, backend=backend_string(device))
    return Trainer(config, world)


def build_regrow(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Job:
    trainer = regrow_trainer(args, rank, world_size, device)
    root = Path(args.ckpt_dir) / "regrow"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    chunk = {"chunk_bytes": args.chunk_mib << 20} if args.chunk_mib else {}
    writer = CheckpointWriter(WriterConfig(root=str(root), save_every=0, keep_last=2, fsync=not args.no_fsync,
                                           **chunk),
                              rank=rank, world_size=world_size, run_config=trainer.config.to_dict())
    if not args.cold_first_save:
        writer.prepare(trainer.shard_state())  # as launch/rank.attach_writer does: the first save's buffers, now
    trainer.sinks.append(writer)  # before_optimizer_step() waits for the host copies of a save in flight

    def start_save(index: int) -> Callable[[], bool]:
        writer.save(trainer.shard_state())  # what after_step does at a save step
        return writer.busy

    def finish_save() -> tuple[float, int]:
        result = writer.wait(600)
        ok = result is not None and result.status in ("committed", "written")
        if not any_rank(not ok):
            seconds = max_over_ranks(result.seconds if rank == 0 else 0.0)
            path = Path(result.path) if rank == 0 else None
            return seconds, folder_bytes(path) if path else 0
        raise RuntimeError(f"regrow save failed: {result}")

    def load() -> None:
        restore_trainer(trainer, "latest", root=root)

    settings = {"stage": 2, "state_bits": 8, "param_dtype": "bfloat16", "fsync": not args.no_fsync,
                "buffers_at_start_up": not args.cold_first_save,
                "when_busy": writer.config.when_busy}
    return Job(step=trainer.train_step, start_save=start_save, finish_save=finish_save, load=load, settings=settings)


# ---------------------------------------------------------------------------------------------------- DeepSpeed


def build_deepspeed(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Job:
    import deepspeed

    model, batches = _model_and_batches(args, rank, device)
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else None)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # A torch optimizer keeps DeepSpeed from JIT-building its FusedAdam (which fails on the GPU host).
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=fused_adamw(model), config=config)
    root = Path(args.ckpt_dir) / "deepspeed"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    last: dict[str, float] = {}

    def step() -> None:
        inputs, targets = next(batches)
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()

    def start_save(index: int) -> Callable[[], bool]:
        last["seconds"] = barrier_timed(device, lambda: engine.save_checkpoint(str(root), tag=f"save{index}"))
        last["tag"] = index
        return lambda: False  # synchronous: done when it returns

    def finish_save() -> tuple[float, int]:
        nbytes = folder_bytes(root / f"save{last['tag']}") if rank == 0 else 0
        _drop_older_saves(root, last["tag"], rank)
        return last["seconds"], nbytes

    def load() -> None:
        engine.load_checkpoint(str(root), tag=f"save{last['tag']}")

    return Job(step=step, start_save=start_save, finish_save=finish_save, load=load,
               settings={"deepspeed": deepspeed.__version__, "zero_optimization": config["zero_optimization"]})


# ---------------------------------------------------------------------------------------------------- FSDP2 + DCP


def build_fsdp2(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Job:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, batches = _model_and_batches(args, rank, device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    optimizer = fused_adamw(model)
    # async_save finishes its save with collectives from a background thread: on the default group they would
    # interleave with the training's (and this script's) collectives, so DCP gets a gloo group of its own.
    dcp_group = dist.new_group(backend="gloo")
    root = Path(args.ckpt_dir) / "fsdp2"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    pending: dict[str, object] = {}

    def step() -> None:
        inputs, targets = next(batches)
        loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def start_save(index: int) -> Callable[[], bool]:
        model_state, optim_state = get_state_dict(model, optimizer)
        pending["path"] = root / f"save{index}"
        pending["started"] = time.perf_counter()
        pending["future"] = dcp.async_save({"model": model_state, "optim": optim_state},
                                           checkpoint_id=str(pending["path"]), process_group=dcp_group)
        return lambda: not pending["future"].done()

    def finish_save() -> tuple[float, int]:
        pending["future"].result()
        seconds = max_over_ranks(time.perf_counter() - pending["started"])
        nbytes = folder_bytes(pending["path"]) if rank == 0 else 0
        _drop_older_saves(root, int(pending["path"].name[len("save"):]), rank)
        return seconds, nbytes

    def load() -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(pending["path"]), process_group=dcp_group)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return Job(step=step, start_save=start_save, finish_save=finish_save, load=load,
               settings={"reshard_after_forward": False, "save": "dcp.async_save (thread)"})


def _drop_older_saves(root: Path, index: int, rank: int) -> None:
    """Keeps only the newest save on disk (as regrow's keep_last does), outside every timed region."""
    dist.barrier()
    if rank == 0:
        for older in range(index):
            shutil.rmtree(root / f"save{older}", ignore_errors=True)
    dist.barrier()


def _model_and_batches(args: argparse.Namespace, rank: int, device: torch.device):
    config = GPTConfig.preset(args.preset)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    batches = make_batches(count=steps_drawn(args), micro_batch=args.micro_batch, config=config, seed=args.seed,
                           rank=rank, device=device)
    return model, iter(batches)


# ---------------------------------------------------------------------------------------------------- protocol


def steps_drawn(args: argparse.Namespace) -> int:
    """The most training steps :func:`measure_training` runs, hence the batches a job on random tokens needs: the
    warm-up, the steps timed alone, then per save three windows without it, the window it starts in, and the
    windows run while it persists (whole windows, up to ``--max-steps-during`` steps rounded up to one)."""
    during = -(-args.max_steps_during // args.window) * args.window
    return args.warmup + args.baseline_steps + args.saves * (4 * args.window + during)


def _window(job: Job, steps: int, save_index: int | None, busy: list[Callable[[], bool]]) -> None:
    """``steps`` consecutive training steps; with ``save_index``, that save starts after the first of them."""
    for i in range(steps):
        job.step()
        if i == 0 and save_index is not None:
            busy.append(job.start_save(save_index))


def measure_training(args: argparse.Namespace, job: Job, device: torch.device) -> dict:
    """Times windows of ``--window`` consecutive steps, with the device synchronised only at the window's ends (as
    in real training, where nothing waits for a copy that the next forward/backward can overlap). The stall of a
    save is the extra time of a window in which the save starts after its first step, against the median window
    without a save measured just before it."""
    for _ in range(args.warmup):
        job.step()
    per_step = statistics.median(timed(device, job.step) for _ in range(args.baseline_steps))
    saves = []
    for index in range(args.saves):
        baseline = statistics.median(timed(device, functools.partial(_window, job, args.window, None, []))
                                     for _ in range(3))
        busy: list[Callable[[], bool]] = []
        with_save = timed(device, functools.partial(_window, job, args.window, index, busy))
        during_s, during_steps = 0.0, 0
        while any_rank(busy[0]()) and during_steps < args.max_steps_during:
            during_s += timed(device, functools.partial(_window, job, args.window, None, []))
            during_steps += args.window
        persist_s, nbytes = job.finish_save()
        saves.append({
            "window_steps": args.window,
            "window_ms": round(baseline * 1e3, 2),
            "window_with_save_ms": round(with_save * 1e3, 2),
            "stall_s": round(with_save - baseline, 4),
            "stall_vs_step": round((with_save - baseline) / (baseline / args.window), 4),
            "persist_s": round(persist_s, 3),
            "during_steps": during_steps,
            "during_ms": round(during_s / during_steps * 1e3, 2) if during_steps else None,
            "during_vs_baseline": round((during_s / during_steps) / (baseline / args.window), 4) if during_steps
            else None,
            "bytes": int(max_over_ranks(nbytes)),
        })
    load_s = barrier_timed(device, job.load)
    return {"baseline_ms": round(per_step * 1e3, 2), "saves": saves, "load_same_world_s": round(load_s, 3)}


def measure_load(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> dict:
    root = Path(args.ckpt_dir) / "regrow"
    trainer = regrow_trainer(args, rank, world_size, device)
    report = {}
    seconds = barrier_timed(device, lambda: report.setdefault("r", restore_trainer(trainer, "latest", root=root)))
    path = report["r"].path
    manifest = verify.read_manifest(path)
    result = {"load_s": round(seconds, 3), "saved_world_size": manifest.world_size, "loaded_world_size": world_size,
              "step": manifest.step, "bytes": manifest.nbytes(),
              "bytes_read_busiest_rank": int(max_over_ranks(report["r"].bytes_read)),
              "load_gbps": round(manifest.nbytes() / seconds / 1e9, 3)}
    if rank == 0:
        files = sorted(path.rglob("*.bin"))
        result["read_direct_gbps"] = read_speed(files, direct=True)
        result["read_buffered_gbps"] = read_speed(files, direct=False)
    dist.barrier()
    trainer.train_step()  # the loaded state trains
    return result


def read_speed(files: list[Path], *, direct: bool) -> float | None:
    """GB/s reading ``files`` once in 16 MiB requests; None when ``O_DIRECT`` is not supported here."""
    block = 16 << 20
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    try:
        for path in files:
            flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
            try:
                fd = os.open(path, flags)
            except OSError:
                return None
            try:
                offset = 0
                while True:
                    try:
                        got = os.preadv(fd, [view], offset)
                    except OSError:
                        return None  # EINVAL: this filesystem does not do O_DIRECT
                    total += max(got, 0)
                    offset += max(got, 0)
                    if got < len(view):  # end of file (an O_DIRECT read must not restart at an unaligned offset)
                        break
            finally:
                os.close(fd)
    finally:
        view.release()
        buffer.close()
    return round(total / (time.perf_counter() - start) / 1e9, 3)


def run(args: argparse.Namespace) -> dict:
    rank, world_size, device = init_distributed(args.device)
    if args.impl == "regrow-load":
        figures = measure_load(args, rank, world_size, device)
    else:
        build = {"regrow": build_regrow, "deepspeed": build_deepspeed, "fsdp2": build_fsdp2}[args.impl]
        job = build(args, rank, world_size, device)
        figures = {**measure_training(args, job, device), "settings": job.settings}
    return {"impl": args.impl, **result_header(args, world_size, device), "ckpt_dir": args.ckpt_dir, **figures,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    emit_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
