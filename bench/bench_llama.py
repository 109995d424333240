"""A Hugging Face Llama (TinyLlama's shape, 1.10B parameters, random init, bf16) on one GPU, three ways, one per
process (``torchrun --nproc_per_node 1 bench/bench_llama.py --mode M``):

- ``trainer``: ``regrow train --model bench.llama_model:tinyllama`` (the CLI, in this process: torchrun made it the
  rank), ZeRO-2, 8-bit state, bf16 working parameters; tokens/s from its ``--metrics``.
- ``guard``: a hand-written loop with ``ZeroOptimizer(stage=2, state_bits=8, param_dtype="bfloat16")`` and a
  ``regrow.Guard`` without snapshots (what fault tolerance costs when no snapshot is taken).
- ``deepspeed``: DeepSpeed ZeRO-2, bf16, fused ``torch.optim.AdamW`` (DeepSpeed's FusedAdam does not build on the
  GPU host), the same loop.

All three read the embedded corpus through regrow's sampler (micro-batch 4 x 2048, no accumulation), compute the
loss as cross entropy of the logits in fp32, clip at 1.0, and report the median tokens/s of the steps after the
warm-up and ``torch.cuda.max_memory_allocated``. Prints ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.llama_model` for --model, from anywhere

MODES = ("trainer", "guard", "deepspeed")
LR = 3e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the median")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default=None, help="append the result line here")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    return args


def size_of(device: str) -> str:
    return "1.1b" if device == "cuda" else "tiny"


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def run_trainer(args: argparse.Namespace) -> dict:
    """``regrow train --model ...`` in this process (torchrun started it: it is the rank)."""
    from regrow.launch import cli

    with tempfile.TemporaryDirectory() as scratch:
        metrics = Path(scratch) / "metrics.jsonl"
        kwargs = json.dumps({"size": size_of(args.device), "seq_len": args.seq_len})
        flags = ["train", "--model", "bench.llama_model:tinyllama", "--model-kwargs", kwargs, "--device", args.device,
                 "--steps", str(args.steps), "--warmup-steps", "2", "--lr", str(LR), "--seq-len", str(args.seq_len),
                 "--global-batch", str(args.micro_batch), "--micro-batch", str(args.micro_batch), "--stage", "2",
                 "--state-bits", "8", "--log-every", "10", "--metrics", str(metrics)]
        if args.device == "cuda":
            flags += ["--param-dtype", "bfloat16"]
        code = cli.main(flags)
        if code != 0:
            raise SystemExit(f"regrow train exited with {code}")
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["step"] > args.warmup]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    return {"tokens_per_s": statistics.median(rates), "peak_memory_gb": peak_gb(device),
            "final_loss": records[-1]["loss"], "command": "regrow " + " ".join(flags[:1] + flags[1:])}


def run_loop(args: argparse.Namespace) -> dict:
    """The hand-written loop, with regrow's optimizer and Guard or with DeepSpeed."""
    import regrow
    from bench.llama_model import tinyllama

    world = regrow.join_world()
    torch.manual_seed(0)
    model = tinyllama(size_of(args.device), seq_len=args.seq_len).to(world.device)
    sampler = regrow.Sampler(regrow.DataConfig(seq_len=args.seq_len, micro_batch=args.micro_batch,
                                               global_batch=args.micro_batch * world.world_size),
                             dp_rank=world.rank, dp_size=world.world_size)
    if args.mode == "guard":
        bf16 = "bfloat16" if args.device == "cuda" else None
        optimizer = regrow.ZeroOptimizer(model, stage=2, state_bits=8, lr=LR, param_dtype=bf16)
        guard = regrow.Guard(model, optimizer, sampler=sampler, config=regrow.GuardConfig())
        guard.resume(total_steps=args.steps)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            guard.step_done()
            return loss.detach()
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1,
                                      fused=args.device == "cuda")
        config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 1.0, "bf16": {"enabled": args.device == "cuda"},
                  "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            logits = engine(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            engine.backward(loss)
            engine.step()
            return loss.detach()

    tokens = args.micro_batch * args.seq_len * world.world_size
    rates, loss = [], None
    for index in range(args.steps):
        x, y = sampler.next_micro_batch()
        x, y = x.to(world.device), y.to(world.device)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step(x, y)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            rates.append(tokens / (time.perf_counter() - started))
    return {"tokens_per_s": statistics.median(rates), "peak_memory_gb": peak_gb(world.device),
            "final_loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_trainer(args) if args.mode == "trainer" else run_loop(args)
    from bench.llama_model import tinyllama

    with torch.device("meta"):  # counted, not allocated
        params = sum(p.numel() for p in tinyllama(size_of(args.device), seq_len=args.seq_len).parameters())
    result = {"bench": "llama", "mode": args.mode, "device": args.device, "parameters": params,
              "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, **result}
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
