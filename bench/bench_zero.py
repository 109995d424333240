"""Training throughput of one data-parallel ZeRO-2-like implementation: regrow, DeepSpeed or PyTorch FSDP2.

Launch one implementation per torchrun invocation (each gets fresh processes, so no allocator or NCCL state leaks
from one into the next)::

    torchrun --nproc_per_node=4 bench/bench_zero.py --impl deepspeed --json bench-out/zero.jsonl

Implementations (``--impl``):

- ``regrow8`` / ``regrow32``: :class:`regrow.trainer.zero.optimizer.ZeroOptimizer`, stage 2, 8-bit / fp32 Adam state,
  bf16 working parameters and gradients (reduce-scattered in bf16), fp32 master shard.
- ``deepspeed``: DeepSpeed ZeRO stage 2, bf16, ``overlap_comm`` and ``contiguous_gradients`` on, a fused
  ``torch.optim.AdamW`` passed in (DeepSpeed's own FusedAdam must not be built: its JIT build fails on the GPU host).
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every block and on the root, ``reshard_after_forward=False``
  (parameters stay gathered between forward and backward, which is ZeRO-2's memory profile), fp32 sharded
  parameters cast to bf16 for compute, fused ``torch.optim.AdamW`` on the DTensor shards.
- ``regrow8-zero3`` / ``fsdp2-reshard`` / ``deepspeed-zero3``: ZeRO-3: regrow at stage 3 (8-bit state; each block
  gathered before its forward and its backward, freed after), FSDP2 with ``reshard_after_forward=True`` on the
  blocks, DeepSpeed ZeRO stage 3 (fused torch AdamW passed in).

``--shape L,D,H`` overrides the preset's layers, width and heads and ``--seq-len`` its sequence length, and
``--activation-checkpointing`` recomputes every block in the backward (torch's composable ``checkpoint``, for every
implementation): ``run_gpu_capacity.sh`` climbs a ladder of shapes with them to find the largest model each
implementation trains. A run that runs out of GPU memory reports ``"status": "oom"`` with the parameter count.

Every implementation trains the same :class:`regrow.trainer.models.GPT` (built from the same seed on the CPU, then
moved), on the same random token batches (per rank, pre-generated so data generation is not timed), with the same
AdamW hyper-parameters (lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only) and global
gradient-norm clipping at 1.0. One micro-batch per optimizer step.

What is measured: after ``--warmup`` untimed steps, every rank waits for its device (``torch.cuda.synchronize``) and
then for the other ranks (a barrier); the wall clock runs from there over ``--steps`` steps to a second
synchronize + barrier. The reported ms/step is that window (the longest of the ranks') divided by ``--steps`` (no
per-step synchronisation, so overlap across step boundaries is kept as in real training); tokens/s counts the tokens
of all ranks. Peak memory is ``torch.cuda.max_memory_allocated`` of each rank in GB (1e9 bytes), the maximum over
ranks, both over the whole run (set-up included) and over the timed window only. The loss is the last step's,
averaged over ranks, as a sanity check that every implementation trains the same model the same way.

Rank 0 prints one line ``RESULT {json}`` and appends the JSON to ``--json`` if given.

On a machine without a GPU, ``--device cpu --preset tiny`` runs the same code paths over gloo as a smoke test
(DeepSpeed needs ``DS_ACCELERATOR=cpu`` in the environment for that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from regrow.trainer.models import GPT, GPTConfig

IMPLS = ("regrow8", "regrow32", "deepspeed", "fsdp2", "regrow8-zero3", "fsdp2-reshard", "deepspeed-zero3")
LR = 3e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Runner:
    """One implementation, ready to train: ``step(inputs, targets)`` runs forward, backward and the optimizer step
    and returns the loss as a tensor (not yet read back, so the step does not force a host synchronisation)."""

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    settings: dict[str, object]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True, choices=IMPLS)
    parser.add_argument("--preset", default="350m", help="GPTConfig preset: 350m on GPUs, tiny for the CPU smoke test")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed window")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--fsdp-reduce-dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="fsdp2 gradient reduce-scatter dtype; bfloat16 (default) moves as many bytes as DeepSpeed and regrow",
    )
    parser.add_argument("--grad-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="regrow's gradient shard dtype (ZeroConfig.grad_dtype); the other implementations keep "
                        "theirs")
    parser.add_argument("--shape", default=None, metavar="L,D,H",
                        help="layers, model width and heads instead of the preset's (the capacity ladder)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length instead of the preset's")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute every block in the backward (every implementation)")
    parser.add_argument("--init-on-device", action="store_true",
                        help="build the model on the device (fast for the largest models; the weights then come from "
                        "the device's generator, so they differ from a CPU build's)")
    parser.add_argument("--json", default=None, help="file to append the result line to (rank 0)")
    args = parser.parse_args(argv)
    if args.shape is not None:
        try:
            layers, width, heads = (int(x) for x in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape {args.shape!r}: give three whole numbers L,D,H, e.g. 32,2560,20")
        args.shape = (layers, width, heads)
    for name in ("micro_batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.grad_dtype != "float32" and not args.impl.startswith("regrow"):
        parser.error(f"--grad-dtype {args.grad_dtype} sets regrow's gradient shard; {args.impl} keeps its own")
    return args


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """Joins the torchrun world: ``"cpu:gloo,cuda:nccl"`` on GPU (as the DeepSpeed anchors were measured, and as
    regrow runs), plain gloo on CPU. Returns (rank, world size, this rank's device)."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False (use --device cpu for the smoke test)")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    return rank, world_size, device


def synchronize(device: torch.device) -> None:
    """Waits until this rank's queued device work is done, then until every rank got there."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def adamw_param_groups(model: nn.Module) -> list[dict[str, object]]:
    """Weight decay on parameters of two or more dimensions only, as regrow's ZeroOptimizer does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def fused_adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(adamw_param_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=True)


def build_regrow(model: nn.Module, device: torch.device, state_bits: int, stage: int = 2,
                 grad_dtype: str = "float32") -> Runner:
    from regrow.trainer.zero.config import ZeroConfig
    from regrow.trainer.zero.optimizer import ZeroOptimizer

    config = ZeroConfig(
        stage=stage,
        state_bits=state_bits,
        param_dtype="bfloat16",
        grad_dtype=grad_dtype,
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
    )
    model.to(device)
    optimizer = ZeroOptimizer(model, config)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    settings = {
        "stage": stage,
        "state_bits": state_bits,
        "param_dtype": "bfloat16",
        "reduce_dtype": "bfloat16",
        "grad_dtype": grad_dtype,
        "bucket_numel": config.bucket_numel,
    }
    return Runner(step, settings)


def build_deepspeed(model: nn.Module, device: torch.device, micro_batch: int, stage: int = 2) -> Runner:
    import deepspeed

    if device.type == "cpu":
        # The CPU accelerator would pick oneCCL; the gloo group made above is the one to use.
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed()
    model.to(device)
    # Passing a torch optimizer keeps DeepSpeed from building its FusedAdam (whose JIT build fails on the GPU host).
    optimizer = fused_adamw(model)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": MAX_GRAD_NORM,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    settings = {
        "deepspeed": deepspeed.__version__,
        "zero_optimization": config["zero_optimization"],
        "optimizer": "torch.optim.AdamW(fused=True)",
        "optimizer_wrapper": type(engine.optimizer).__name__,
    }
    return Runner(step, settings)


def build_fsdp2(model: nn.Module, device: torch.device, reduce_dtype: str, reshard: bool = False) -> Runner:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=DTYPES[reduce_dtype])
    # One FSDP unit per block lets each block's reduce-scatter overlap the backward of the blocks before it; the root
    # unit takes the rest (embeddings with the tied LM head, final norm).
    for block in model.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    optimizer = fused_adamw(model)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    settings = {
        "reshard_after_forward": reshard,
        "param_dtype": "bfloat16",
        "reduce_dtype": reduce_dtype,
        "sharded_param_dtype": "float32",
        "optimizer": "torch.optim.AdamW(fused=True)",
    }
    return Runner(step, settings)


def make_batches(
    *, count: int, micro_batch: int, config: GPTConfig, seed: int, rank: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (inputs, targets) pairs of uniformly random token ids, different per rank and step, the same for
    every implementation: targets are the inputs shifted by one token."""
    generator = torch.Generator().manual_seed(seed * 100_003 + rank)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, config.vocab_size, (micro_batch, config.seq_len + 1), generator=generator)
        tokens = tokens.to(device)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def max_over_ranks(value: float) -> float:
    # A CPU tensor: the default group reduces it over gloo, on the GPU host too ("cpu:gloo,cuda:nccl").
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def mean_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def variant(args: argparse.Namespace) -> str:
    """The implementation with the settings that change its memory: ``regrow8-zero3+bf16grad`` (the name the
    capacity runner takes too)."""
    return args.impl + ("+bf16grad" if args.grad_dtype == "bfloat16" else "")


def model_config(args: argparse.Namespace) -> GPTConfig:
    """The preset, with ``--shape`` and ``--seq-len`` applied."""
    overrides: dict[str, int] = {}
    if args.shape is not None:
        overrides.update(n_layer=args.shape[0], d_model=args.shape[1], n_head=args.shape[2])
    if args.seq_len is not None:
        overrides["seq_len"] = args.seq_len
    return GPTConfig.preset(args.preset, **overrides)


def run(args: argparse.Namespace) -> dict[str, object]:
    """One measured run; a run that exhausts the GPU's memory returns ``"status": "oom"`` instead."""
    rank, world_size, device = init_distributed(args.device)
    config = model_config(args)
    with torch.device("meta"):
        n_params = GPT(config).num_parameters()
    try:
        return _measure(args, rank, world_size, device, config, n_params)
    except torch.cuda.OutOfMemoryError as error:
        peak = peak_memory_gb(device)
        return {"impl": args.impl, "variant": variant(args), "status": "oom", "world_size": world_size,
                "params": n_params, "shape": [config.n_layer, config.d_model, config.n_head], "seq_len": config.seq_len,
                "micro_batch": args.micro_batch, "activation_checkpointing": args.activation_checkpointing,
                "peak_mem_gb": None if peak is None else round(peak, 3), "error": str(error).splitlines()[0][:300]}


def _measure(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, config: GPTConfig,
             n_params: int) -> dict[str, object]:
    # Built on the CPU from the CPU generator by default, so every rank and every implementation starts from identical
    # weights.
    torch.manual_seed(args.seed)
    with torch.device(device if args.init_on_device else "cpu"):
        model = GPT(config)
    if args.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.blocks:
            checkpoint(block)
    if args.impl in ("regrow8", "regrow32", "regrow8-zero3"):
        runner = build_regrow(model, device, 32 if args.impl == "regrow32" else 8, 3 if "zero3" in args.impl else 2,
                              args.grad_dtype)
    elif args.impl in ("deepspeed", "deepspeed-zero3"):
        runner = build_deepspeed(model, device, args.micro_batch, stage=3 if "zero3" in args.impl else 2)
    else:
        runner = build_fsdp2(model, device, args.fsdp_reduce_dtype, reshard=args.impl == "fsdp2-reshard")
    model.train()
    batches = make_batches(
        count=args.warmup + args.steps,
        micro_batch=args.micro_batch,
        config=config,
        seed=args.seed,
        rank=rank,
        device=device,
    )

    first_loss = None
    for inputs, targets in batches[: args.warmup]:
        loss = runner.step(inputs, targets)
        if first_loss is None:
            first_loss = loss.float().item()
    synchronize(device)
    peak_setup = peak_memory_gb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for inputs, targets in batches[args.warmup :]:
        loss = runner.step(inputs, targets)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak_window = peak_memory_gb(device)
    peak_all = None if peak_window is None or peak_setup is None else max(peak_window, peak_setup)

    last_loss = loss.float().item()
    if first_loss is None:
        first_loss = last_loss
    elapsed = max_over_ranks(elapsed)
    ms_per_step = elapsed / args.steps * 1e3
    tokens = args.micro_batch * config.seq_len * world_size * args.steps
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    result: dict[str, object] = {
        "impl": args.impl,
        "variant": variant(args),
        "status": "ok",
        "world_size": world_size,
        "device": device_name,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "preset": args.preset,
        "shape": [config.n_layer, config.d_model, config.n_head],
        "activation_checkpointing": args.activation_checkpointing,
        "params": n_params,
        "micro_batch": args.micro_batch,
        "seq_len": config.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "ms_per_step": round(ms_per_step, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "peak_mem_gb": None if peak_all is None else round(max_over_ranks(peak_all), 3),
        "peak_mem_timed_gb": None if peak_window is None else round(max_over_ranks(peak_window), 3),
        "first_loss": round(mean_over_ranks(first_loss), 5),
        "final_loss": round(mean_over_ranks(last_loss), 5),
        "settings": runner.settings,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not all(math.isfinite(float(result[key])) for key in ("first_loss", "final_loss")):
        result["status"] = "nan_loss"
    return result


def result_header(args: argparse.Namespace, world_size: int, device: torch.device) -> dict:
    """The fields every bench_*.py result line starts with: machine, software, model and batch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"status": "ok", "world_size": world_size, "device": name, "host": socket.gethostname(),
            "torch": torch.__version__, "preset": args.preset, "micro_batch": args.micro_batch}


def emit_result(result: dict, json_path: str | None) -> None:
    """Rank 0 prints ``RESULT {json}`` (the runners grep for it) and appends the line to ``json_path``; then every
    rank leaves the process group. Shared by the bench_*.py scripts."""
    if dist.get_rank() == 0:
        line = json.dumps(result)
        print(f"RESULT {line}", flush=True)
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path, "a", encoding="utf-8") as out:
                out.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    emit_result(result, args.json)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
