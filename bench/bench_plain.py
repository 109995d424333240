"""regrow against plain PyTorch on one device: the same GPT, data and step, four recipes, side by side in one process.

- ``plain``: fp32 parameters, bf16 autocast on CUDA, ``torch.optim.AdamW`` (fused on CUDA), clipping at 1.0;
- ``plain-compiled``: the same with ``torch.compile(model)``;
- ``regrow``: regrow's ``Trainer`` (ZeRO-2, 8-bit state, bf16 working parameters on CUDA), world 1;
- ``regrow-compiled``: the same with ``TrainerConfig.compile`` (inductor on CUDA).

Every recipe trains the same model from the same seed on the same batches (regrow's sampler over the embedded
corpus, micro-batch ``--micro-batch`` x ``--seq-len``, no accumulation): regrow's GPT (``--preset``), or with
``--model llama`` a Hugging Face ``LlamaForCausalLM`` of TinyLlama's shape (1.10B parameters, sdpa attention;
``bench/llama_model.py``; tiny on the CPU) whose loss is the fp32 cross entropy of its logits. It reports the median
tokens/s of the steps after ``--warmup`` (the compile happens there), ``torch.cuda.max_memory_allocated`` and MFU:
tokens/s x FLOPs per token over the device's dense bf16 peak, FLOPs per token = 6 x parameters + 12 x layers x
width x seq_len (the attention's matmuls, forward and backward; PaLM's appendix B). Rounds alternate the recipes
(``--rounds``).

Usage::

    python3 bench/bench_plain.py --preset 1.3b --json out.jsonl        # GPU host
    python3 bench/bench_plain.py --model llama --micro-batch 4 --seq-len 2048
    python3 bench/bench_plain.py --device cpu                           # smoke test: tiny preset, eager only

Prints ``RESULT {json}`` per run and appends it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from regrow.comm.world import World
from regrow.trainer.data import DataConfig, Sampler
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.model_factory import ModelFactory, build_model
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.llama_model`, from anywhere

RECIPES = ("plain", "plain-compiled", "regrow", "regrow-compiled")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak of the GPUs we measure on (SXM parts), by a word of ``torch.cuda.get_device_name``."""
LR = 3e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="gpt", choices=("gpt", "llama"),
                        help="regrow's GPT (--preset) or a Hugging Face Llama of TinyLlama's shape")
    parser.add_argument("--preset", default=None, help="GPT preset (default 350m on CUDA, tiny on CPU)")
    parser.add_argument("--recipes", default=None, help="comma-separated, of " + ", ".join(RECIPES)
                        + " (default all on CUDA; the eager two on CPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 8 CUDA, 2 CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 CUDA, 64 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 30 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA, 1 CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="times each recipe runs, alternating")
    parser.add_argument("--json", default=None, help="file to append the result lines to")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the timed steps, profile 3 more with torch.profiler and write each recipe's "
                             "busiest operations to DIR/profile-<preset>-<recipe>.txt")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.preset = args.preset or ("350m" if cuda else "tiny")
    args.recipes = (args.recipes or (",".join(RECIPES) if cuda else "plain,regrow")).split(",")
    unknown = [recipe for recipe in args.recipes if recipe not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    args.micro_batch = args.micro_batch or (8 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 64)
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if min(args.micro_batch, args.seq_len, args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--micro-batch, --seq-len, --steps and --rounds must be >= 1, --warmup >= 0")
    return args


@dataclass(frozen=True)
class Workload:
    """The model every recipe trains: its name in the results, how the trainer builds it, and its depth and width
    (for the attention's FLOPs)."""

    name: str
    model: GPTConfig | ModelFactory
    layers: int
    width: int

    @property
    def is_gpt(self) -> bool:
        return isinstance(self.model, GPTConfig)

    def loss(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The plain recipes' loss: the GPT's own, the Llama's fp32 cross entropy of its logits (as regrow's
        ``"logits"`` loss computes it)."""
        if self.is_gpt:
            return forward(x, y)
        logits = forward(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def workload(args: argparse.Namespace) -> Workload:
    if args.model == "gpt":
        config = GPTConfig.preset(args.preset, seq_len=args.seq_len, dropout=0.0)
        return Workload(args.preset, config, config.n_layer, config.d_model)
    from bench.llama_model import TINY, TINYLLAMA

    size = "1.1b" if args.device == "cuda" else "tiny"
    shape = TINYLLAMA if size == "1.1b" else TINY
    factory = ModelFactory(target="bench.llama_model:tinyllama", kwargs={"size": size, "seq_len": args.seq_len})
    return Workload(f"llama-{size}", factory, shape["num_hidden_layers"], shape["hidden_size"])


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(seq_len=args.seq_len, micro_batch=args.micro_batch, global_batch=args.micro_batch)


def plain_steps(args: argparse.Namespace, device: torch.device, compiled: bool):
    """A step function of the plain recipe (and its parameter count)."""
    work = workload(args)
    model = build_model(work.model, seed=0).to(device)
    forward = torch.compile(model) if compiled else model
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    sampler = Sampler(data_config(args), dp_rank=0, dp_size=1)

    def step(index: int) -> float:
        x, y = (t.to(device) for t in sampler.next_micro_batch())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = work.loss(forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, sum(p.numel() for p in model.parameters())


def regrow_steps(args: argparse.Namespace, device: torch.device, compiled: bool):
    """A step function of regrow's Trainer at world 1 (and its parameter count)."""
    cuda = device.type == "cuda"
    config = TrainerConfig(
        model=workload(args).model, seed=0, steps=10**6, warmup_steps=0, log_every=0, progress=False,
        data=data_config(args),
        optim=ZeroConfig(stage=2, state_bits=8, lr=LR, param_dtype="bfloat16" if cuda else "float32"),
        compile=("inductor" if cuda else "aot_eager") if compiled else "off")
    world = World(rank=0, world_size=1, local_rank=0, device=device, backend="nccl") if cuda else None
    trainer = Trainer(config, world)

    def step(index: int) -> float:
        return trainer.train_step().loss

    return step, sum(p.numel() for p in trainer.model.parameters())


def write_profile(args: argparse.Namespace, recipe: str, step, device: torch.device) -> None:
    """Profiles 3 steps of ``step`` and writes the operations by their own device time (CPU time on the CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for index in range(3):
            step(index)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    # The same operations split by their inputs' shapes: which tensors the copies and additions move.
    shapes = profiler.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=30,
                                                                    max_name_column_width=40, max_shapes_column_width=80)
    out = Path(args.profile) / f"profile-{workload(args).name}-{recipe}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{recipe}, {workload(args).name}, 3 steps, micro-batch {args.micro_batch} x {args.seq_len}"
    out.write_text(f"{title}\n{table}\nby input shapes:\n{shapes}")


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for word, peak in PEAK_BF16_TFLOPS.items() if word in name), None)


def run(args: argparse.Namespace, recipe: str, round_index: int) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    builder = plain_steps if recipe.startswith("plain") else regrow_steps
    step, parameters = builder(args, device, recipe.endswith("compiled"))
    times, losses = [], []
    for index in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(float(step(index)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if args.profile:
        write_profile(args, recipe, step, device)
    work = workload(args)
    tokens_per_s = args.micro_batch * args.seq_len / statistics.median(times[args.warmup:])
    flops_per_token = 6 * parameters + 12 * work.layers * work.width * args.seq_len
    peak = peak_tflops(device)
    return {"recipe": recipe, "round": round_index, "preset": work.name, "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "parameters": parameters, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
            "tokens_per_s": round(tokens_per_s, 1),
            "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
            "mfu": round(tokens_per_s * flops_per_token / (peak * 1e12), 4) if peak else None,
            "first_step_s": round(times[0], 2), "final_loss": round(losses[-1], 4), "status": "ok"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for round_index in range(args.rounds):
        for recipe in args.recipes:
            result = run(args, recipe, round_index)
            print(f"RESULT {json.dumps(result)}", flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
