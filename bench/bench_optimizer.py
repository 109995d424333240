"""Benchmark of one optimizer step over a flat shard: regrow 8-bit AdamW vs bitsandbytes AdamW8bit vs torch AdamW.

CUDA (default 400M fp32 parameters): regrow's Triton kernel (bf16 gradient, bf16 copy of the parameters written),
bitsandbytes ``AdamW8bit`` (fp32 gradient: its kernel takes the parameter's dtype), torch ``AdamW(fused=True)``
on the same flat parameter as one tensor, and regrow's 32-bit step. 3 warm-ups, then the mean of 20 steps timed with
CUDA events. Then a correctness check of the Triton kernel against the CPU path on ~16M elements.

CPU (default a 10M-parameter shard, fp32 gradients): regrow 8-bit (chunked torch), torch AdamW foreach and fused,
regrow 32-bit, and bitsandbytes AdamW8bit on the CPU when it is installed.

    python bench/bench_optimizer.py --device cuda --json out.json
    python bench/bench_optimizer.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from regrow.trainer.zero import adamw, codes
from regrow.trainer.zero.codes import BLOCK_SIZE

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@dataclass(kw_only=True)
class Row:
    """One line of the results table."""

    name: str
    ms_per_step: float | None
    state_bytes_per_param: float
    traffic_bytes_per_param: float
    """Bytes each step must move through memory per parameter (each input read once, each output written once)."""
    note: str = ""

    def gparams_per_s(self, numel: int) -> float | None:
        return None if self.ms_per_step is None else numel / (self.ms_per_step * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------- timing


def _time_cuda(step: Callable[[int], None], warmup: int, iters: int) -> float:
    """Mean milliseconds per call of ``step(i)`` over ``iters`` calls after ``warmup`` calls, with CUDA events."""
    for i in range(warmup):
        step(i + 1)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        step(warmup + i + 1)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _time_cpu(step: Callable[[int], None], warmup: int, iters: int) -> float:
    """Mean milliseconds per call (wall clock) over ``iters`` calls after ``warmup`` calls."""
    for i in range(warmup):
        step(i + 1)
    start = time.perf_counter()
    for i in range(iters):
        step(warmup + i + 1)
    return (time.perf_counter() - start) * 1e3 / iters


# ---------------------------------------------------------------------------------------------------- the contenders


def _regrow_8bit(numel: int, device: str, grad_dtype: torch.dtype, with_out: bool) -> Callable[[int], None]:
    param = torch.randn(numel, device=device)
    grad = (torch.randn(numel, device=device) * 1e-3).to(grad_dtype)
    state = codes.new_state_8bit(numel, device)
    out = torch.empty(numel, dtype=torch.bfloat16, device=device) if with_out else None
    return lambda i: adamw.adamw8bit_step(param, grad, *state, step=i, param_out=out, **HYPER)


def _regrow_8bit_config(numel: int, rows: int, warps: int) -> Callable[[int], None]:
    """The Triton kernel launched directly with a given tile (for the sweep): bf16 gradient, bf16 copy."""
    from regrow.trainer.zero import adamw_triton

    device = torch.device("cuda")
    param = torch.randn(numel, device=device)
    grad = (torch.randn(numel, device=device) * 1e-3).to(torch.bfloat16)
    state = codes.new_state_8bit(numel, device)
    out = torch.empty(numel, dtype=torch.bfloat16, device=device)
    tables_m, tables_v = codes.state_tables(True, device), codes.state_tables(False, device)

    def step(i: int) -> None:
        k = adamw.adam_scalars(step=i, grad_scale=1.0, **HYPER)
        adamw_triton.adamw8bit_step_cuda(
            param, grad, *state, k, tables_m, tables_v, out, rows=rows, num_warps=warps
        )

    return step


def _regrow_32bit(numel: int, device: str) -> Callable[[int], None]:
    param = torch.randn(numel, device=device)
    grad = torch.randn(numel, device=device) * 1e-3
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    return lambda i: adamw.adamw32bit_step(param, grad, m, v, step=i, **HYPER)


def _torch_adamw(numel: int, device: str, *, fused: bool) -> Callable[[int], None]:
    param = torch.nn.Parameter(torch.randn(numel, device=device))
    param.grad = torch.randn(numel, device=device) * 1e-3
    optimizer = torch.optim.AdamW(
        [param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"], fused=fused, foreach=None if fused else True,
    )  # fmt: skip
    return lambda i: optimizer.step()


def _bnb_adamw8bit(numel: int, device: str) -> Callable[[int], None] | str:
    """bitsandbytes' AdamW8bit on one flat fp32 parameter, or why it cannot run."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "not installed"
    param = torch.nn.Parameter(torch.randn(numel, device=device))
    param.grad = torch.randn(numel, device=device) * 1e-3
    optimizer = bnb.optim.AdamW8bit(
        [param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )  # fmt: skip
    return lambda i: optimizer.step()


def _measure(make: Callable[[], Callable[[int], None] | str], timer: Callable[..., float], warmup: int, iters: int
             ) -> tuple[float | None, str]:  # fmt: skip
    """Builds a contender, times it, and frees its buffers before the next one (400M-element shards are large)."""
    try:
        step = make()
        if isinstance(step, str):
            return None, step
        return timer(step, warmup, iters), ""
    except Exception as error:  # a missing backend must not cost the other rows: record why and go on
        return None, f"failed: {type(error).__name__}: {error}"[:160]
    finally:
        step = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- CUDA


def _copy_bandwidth(numel: int, warmup: int, iters: int) -> float:
    """GB/s of a device-to-device fp32 copy (bytes read plus bytes written): the memory ceiling of this card."""
    ms = _copy_ms(numel, warmup, iters)
    torch.cuda.empty_cache()  # the copy's buffers went with _copy_ms's frame
    return 2 * 4 * numel / (ms * 1e-3) / 1e9


def _copy_ms(numel: int, warmup: int, iters: int) -> float:
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return _time_cuda(lambda i: dst.copy_(src), warmup, iters)


def _inspect_kernel(ptx_path: str | None) -> dict[str, object]:
    """Registers, spills and instruction counts of the compiled Triton kernel (default tile); optionally its PTX."""
    from regrow.trainer.zero import adamw_triton

    n = 64 * BLOCK_SIZE
    device = torch.device("cuda")
    state = codes.new_state_8bit(n, device)
    handle = adamw_triton.adamw8bit_step_cuda(
        torch.randn(n, device=device), torch.randn(n, device=device).bfloat16(), *state,
        adamw.adam_scalars(step=1, grad_scale=1.0, **HYPER), codes.state_tables(True, device),
        codes.state_tables(False, device), torch.empty(n, dtype=torch.bfloat16, device=device),
    )  # fmt: skip
    ptx = handle.asm.get("ptx", "")
    if ptx_path:
        with open(ptx_path, "w") as f:
            f.write(ptx)
    ops = (".ftz", "fma.", "mad.", "div.rn.f32", "sqrt.rn.f32", "ld.global", "st.global")
    counts = {op: ptx.count(op) for op in ops}
    return {"n_regs": getattr(handle, "n_regs", None), "n_spills": getattr(handle, "n_spills", None), "ptx": counts}


def _sweep(numel: int, warmup: int, iters: int) -> list[dict[str, float]]:
    """Times the Triton kernel for several (blocks per program, warps) tiles."""
    results = []
    for rows, warps in ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8)):
        ms, note = _measure(lambda: _regrow_8bit_config(numel, rows, warps), _time_cuda, warmup, iters)
        results.append({"rows": rows, "num_warps": warps, "ms": ms, "note": note})
        print(f"  sweep rows={rows:2d} warps={warps:2d}: {ms if ms is None else round(ms, 3)} ms {note}", flush=True)
    return results


def _agreement(numel: int) -> dict[str, float]:
    """Runs the same steps through the Triton kernel and the CPU path from identical inputs and compares.

    Two steps: the first from zero state, the second from the CPU's state after the first (copied to the GPU), so
    each comparison is one step from identical inputs. Gradients: bf16, ~9 decades of magnitude, some NaN/Inf.
    """
    g = torch.Generator().manual_seed(0)
    param = torch.randn(numel, generator=g)
    state = codes.new_state_8bit(numel)
    figures: dict[str, float] = {}
    for step in (1, 2):
        magnitude = torch.pow(10.0, torch.randint(-8, 1, (numel,), generator=g).float())
        grad = (torch.randn(numel, generator=g) * magnitude).to(torch.bfloat16)
        grad[torch.randint(0, numel, (64,), generator=g)] = float("nan")
        grad[torch.randint(0, numel, (64,), generator=g)] = float("inf")
        gpu = [t.cuda() for t in (param, grad, *state)]
        out_gpu = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
        out_cpu = torch.empty(numel, dtype=torch.bfloat16)
        hyper = {**HYPER, "grad_scale": 0.75 if step == 2 else 1.0}
        adamw.adamw8bit_step(gpu[0], gpu[1], *gpu[2:], step=step, param_out=out_gpu, **hyper)
        adamw.adamw8bit_step(param, grad, *state, step=step, param_out=out_cpu, **hyper)
        torch.cuda.synchronize()
        p_gpu, m_codes, m_scales, v_codes, v_scales = (t.cpu() for t in (gpu[0], *gpu[2:]))
        code_diff = torch.maximum(
            (m_codes.int() - state[0].int()).abs().max(), (v_codes.int() - state[2].int()).abs().max()
        )
        figures.update({
            f"step{step}_param_identical_fraction": float((p_gpu == param).float().mean()),
            f"step{step}_param_max_abs_diff": float((p_gpu - param).abs().max()),
            f"step{step}_param_out_identical_fraction": float((out_gpu.cpu() == out_cpu).float().mean()),
            f"step{step}_m_codes_identical_fraction": float((m_codes == state[0]).float().mean()),
            f"step{step}_v_codes_identical_fraction": float((v_codes == state[2]).float().mean()),
            f"step{step}_max_code_diff": float(code_diff),
            f"step{step}_scales_identical_fraction": float(
                torch.cat([m_scales == state[1], v_scales == state[3]]).float().mean()
            ),
        })  # fmt: skip
    return figures


def run_cuda(args: argparse.Namespace) -> dict[str, object]:
    numel = _blocks(args.numel or 400_000_000)
    print(f"# one AdamW step over {numel / 1e6:.1f}M fp32 parameters on {torch.cuda.get_device_name()}", flush=True)
    copy_gbs = _copy_bandwidth(numel, args.warmup, args.iters)
    print(f"  device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    kernel = _inspect_kernel(args.ptx)
    print(f"  Triton kernel: {kernel}", flush=True)
    sweep = _sweep(numel, args.warmup, args.iters) if args.sweep else []
    rows = [
        Row(name="regrow 8-bit (Triton, bf16 grad, bf16 param_out)", ms_per_step=None,
            state_bytes_per_param=2 + 8 / 256, traffic_bytes_per_param=2 + 8 + 2 + 4),
        Row(name="bitsandbytes AdamW8bit (fp32 grad)", ms_per_step=None, state_bytes_per_param=2 + 8 / 256,
            traffic_bytes_per_param=4 + 8 + 4),
        Row(name="torch AdamW fused (fp32 grad)", ms_per_step=None, state_bytes_per_param=8,
            traffic_bytes_per_param=4 + 8 + 16),
        Row(name="regrow 32-bit (torch._fused_adamw_)", ms_per_step=None, state_bytes_per_param=8,
            traffic_bytes_per_param=4 + 8 + 16),
    ]  # fmt: skip
    makers = [
        lambda: _regrow_8bit(numel, "cuda", torch.bfloat16, with_out=True),
        lambda: _bnb_adamw8bit(numel, "cuda"),
        lambda: _torch_adamw(numel, "cuda", fused=True),
        lambda: _regrow_32bit(numel, "cuda"),
    ]
    for row, make in zip(rows, makers):
        row.ms_per_step, row.note = _measure(make, _time_cuda, args.warmup, args.iters)
        print(f"  {row.name}: {row.ms_per_step} ms {row.note}", flush=True)
    agreement = _agreement(_blocks(args.check_numel))
    print(_table(rows, numel, baseline=1))
    print("\nTriton vs CPU path, one step from identical inputs each (bf16 grads over 9 decades, NaN/Inf, param_out):")
    for key, value in agreement.items():
        print(f"  {key}: {value:.7g}")
    print(f"\ncopy ceiling {copy_gbs:.0f} GB/s; Triton kernel {kernel}")
    return {"numel": numel, "device": torch.cuda.get_device_name(), "rows": [asdict(r) for r in rows],
            "sweep": sweep, "agreement": agreement, "copy_gbs": copy_gbs, "kernel": kernel}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- CPU


def run_cpu(args: argparse.Namespace) -> dict[str, object]:
    numel = _blocks(args.numel or 10_000_000)
    print(f"# one AdamW step over a {numel / 1e6:.1f}M-parameter shard on the CPU ({torch.get_num_threads()} threads,"
          f" {platform.processor() or platform.machine()})", flush=True)  # fmt: skip
    rows = [
        Row(name="regrow 8-bit (chunked torch)", ms_per_step=None, state_bytes_per_param=2 + 8 / 256,
            traffic_bytes_per_param=4 + 8 + 4),
        Row(name="bitsandbytes AdamW8bit", ms_per_step=None, state_bytes_per_param=2 + 8 / 256,
            traffic_bytes_per_param=4 + 8 + 4),
        Row(name="torch AdamW foreach", ms_per_step=None, state_bytes_per_param=8, traffic_bytes_per_param=28),
        Row(name="torch AdamW fused", ms_per_step=None, state_bytes_per_param=8, traffic_bytes_per_param=28),
        Row(name="regrow 32-bit (torch._fused_adamw_)", ms_per_step=None, state_bytes_per_param=8,
            traffic_bytes_per_param=28),
    ]  # fmt: skip
    makers = [
        lambda: _regrow_8bit(numel, "cpu", torch.float32, with_out=False),
        lambda: _bnb_adamw8bit(numel, "cpu"),
        lambda: _torch_adamw(numel, "cpu", fused=False),
        lambda: _torch_adamw(numel, "cpu", fused=True),
        lambda: _regrow_32bit(numel, "cpu"),
    ]
    for row, make in zip(rows, makers):
        row.ms_per_step, row.note = _measure(make, _time_cpu, args.cpu_warmup, args.cpu_iters)
        print(f"  {row.name}: {row.ms_per_step} ms {row.note}", flush=True)
    print(_table(rows, numel, baseline=1))
    return {"numel": numel, "device": "cpu", "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows]}


# ---------------------------------------------------------------------------------------------------- output


def _blocks(numel: int) -> int:
    """``numel`` rounded up to whole quantization blocks."""
    return -(-numel // BLOCK_SIZE) * BLOCK_SIZE


def _table(rows: list[Row], numel: int, baseline: int) -> str:
    """Markdown table; speed ratios are against ``rows[baseline]`` (bitsandbytes)."""
    base = rows[baseline].ms_per_step
    lines = [
        "",
        "| optimizer | ms/step | Gparam/s | GB/s moved | state bytes/param | speed vs bitsandbytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.ms_per_step is None:
            lines.append(f"| {row.name} | {row.note} | | | {row.state_bytes_per_param:.2f} | |")
            continue
        rate = row.gparams_per_s(numel)
        moved = rate * row.traffic_bytes_per_param
        ratio = f"{base / row.ms_per_step:.2f}x" if base else "n/a"
        lines.append(f"| {row.name} | {row.ms_per_step:.3f} | {rate:.3g} | {moved:.3g} | "
                     f"{row.state_bytes_per_param:.2f} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--numel", type=int, default=None, help="parameters (default 400M on cuda, 10M on cpu)")
    parser.add_argument("--warmup", type=int, default=3, help="CUDA warm-up steps")
    parser.add_argument("--iters", type=int, default=20, help="CUDA timed steps")
    parser.add_argument("--cpu-warmup", type=int, default=2)
    parser.add_argument("--cpu-iters", type=int, default=5)
    parser.add_argument("--check-numel", type=int, default=16 * 2**20, help="elements of the Triton-vs-CPU check")
    parser.add_argument("--sweep", action="store_true", help="also time several Triton tile shapes (cuda)")
    parser.add_argument("--json", default=None, help="write all numbers to this path")
    parser.add_argument("--ptx", default=None, help="write the Triton kernel's PTX to this path (cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (cpu; default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads: must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    results = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("triton", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    results["versions"] = versions
    print(f"\nversions: {versions}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
