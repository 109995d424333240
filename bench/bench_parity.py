"""What the state parity checks (``recovery/parity.py``) cost a training step, on one device.

One process trains regrow's GPT (``--preset``, ZeRO stage 2, 8-bit state, bf16 parameters on CUDA) and measures, side
by side in the same process:

- ``check_ms``: the monitor's own time per check, the seal after step ``C - 1`` and the check before step ``C``'s
  update (both synchronize: their digests are read on the host), and ``cost`` = ``check_ms`` over ``every`` steps'
  time: the share of training time the checks take at that interval;
- ``step_ms_off`` and ``step_ms_on``: the mean step time in alternating blocks of ``--block`` steps without and with
  the monitor (``every`` = ``--every``), and ``end_to_end`` = on / off - 1 (noisier than ``cost``: a block's time
  varies by about as much as the checks add).

Usage::

    python3 bench/bench_parity.py --preset 350m --every 100 --json out.jsonl     # GPU host
    python3 bench/bench_parity.py --device cpu                                   # smoke test (tiny preset)

It prints ``RESULT {json}`` and appends it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from regrow.recovery.parity import ParityConfig, ParityMonitor
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--preset", default=None, help="GPT preset (default 350m on CUDA, tiny on CPU)")
    parser.add_argument("--every", default="100,1", help="check intervals to measure, comma-separated")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 8 CUDA, 2 CPU)")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block (default 100 CUDA, 4 CPU)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per setting (default 3 CUDA, 1 CPU)")
    parser.add_argument("--json", default=None, help="file to append the result line to")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.preset = args.preset or ("350m" if cuda else "tiny")
    args.micro_batch = args.micro_batch or (8 if cuda else 2)
    args.block = args.block or (100 if cuda else 4)
    args.blocks = args.blocks or (3 if cuda else 1)
    try:
        args.intervals = [int(every) for every in args.every.split(",")]
    except ValueError:
        parser.error(f"--every={args.every!r}: give comma-separated whole numbers >= 1")
    if any(every < 1 for every in args.intervals) or args.block < 1 or args.blocks < 1 or args.micro_batch < 1:
        parser.error("--every, --block, --blocks and --micro-batch must be >= 1")
    return args


def build(args: argparse.Namespace) -> Trainer:
    model = GPTConfig.preset(args.preset)
    cuda = args.device == "cuda"
    steps = 10 + 2 * args.blocks * args.block * len(args.intervals) + 2 * max(args.intervals)
    config = TrainerConfig(model=model, data=DataConfig(seq_len=model.seq_len, micro_batch=args.micro_batch,
                                                        global_batch=args.micro_batch),
                           optim=ZeroConfig(stage=2, state_bits=8, param_dtype="bfloat16" if cuda else None),
                           steps=steps, warmup_steps=5, log_every=0, progress=False)
    if cuda:
        from regrow.comm.world import World

        torch.cuda.set_device(0)
        return Trainer(config, World(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0),
                                     backend="nccl"))
    return Trainer(config)


def timed_block(trainer: Trainer, steps: int) -> float:
    """Mean seconds per step over ``steps`` steps."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()  # reads the loss: each step ends synchronized
    return (time.perf_counter() - started) / steps


def measure(trainer: Trainer, every: int, args: argparse.Namespace) -> dict:
    monitor = ParityMonitor(ParityConfig(every=every), optimizer=trainer.optimizer, state=trainer.shard_state(),
                            timeout_s=60)
    off, on, check_s, checks = [], [], 0.0, 0
    for _ in range(args.blocks):
        off.append(timed_block(trainer, args.block))
        monitor.after_step(trainer.shard_state())  # the monitor's view of the step it is attached at
        monitor.check_seconds, monitor.checks = 0.0, 0
        trainer.sinks.append(monitor)
        on.append(timed_block(trainer, args.block))
        trainer.sinks.remove(monitor)
        check_s, checks = check_s + monitor.check_seconds, checks + monitor.checks
    step_off, step_on = statistics.median(off), statistics.median(on)
    check = check_s / checks if checks else float("nan")
    return {"every": every, "checks": checks, "check_ms": round(1e3 * check, 3),
            "step_ms_off": round(1e3 * step_off, 3), "step_ms_on": round(1e3 * step_on, 3),
            "cost": round(check / (every * step_off), 5), "end_to_end": round(step_on / step_off - 1, 5)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trainer = build(args)
    timed_block(trainer, 10)  # warm-up: kernels, allocator, the 8-bit state's first blocks
    shard_gb = sum(t.numel() * t.element_size() for t in trainer.optimizer.shard_tensors().values()) / 1e9
    params_gb = sum(t.numel() * t.element_size() for t in trainer.optimizer.working_parameters()) / 1e9
    result = {"bench": "parity", "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "preset": args.preset, "micro_batch": args.micro_batch, "block": args.block, "blocks": args.blocks,
              "shard_gb": round(shard_gb, 3), "params_gb": round(params_gb, 3),
              "intervals": [measure(trainer, every, args) for every in args.intervals]}
    print("RESULT " + json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as out:
            out.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
