"""How fast the snapshot checksum (WordSum-128) runs, and what it takes from training kernels running beside it.

A snapshot every step digests the whole shard on the GPU (``wordsum_triton.digest_cuda``) on a side stream while
the next forward and backward run. The digest has until the next optimizer step; what it costs is what it takes
from the training kernels meanwhile. This bench measures, for each grid cap (``--programs``; ``full``: enough
programs to fill the GPU, the default of ``digest_cuda``):

- ``alone_gbps``: the digest of ``--gb`` GB alone on the device;
- ``beside_gbps`` and ``matmul_slowdown``: the same digest on a side stream while the current stream runs a loop
  of bf16 matmuls (a stand-in for the forward and backward) that lasts longer than the digest; the slowdown is the
  matmul loop's time with the digest beside it over its time alone, minus 1, and the digest's share of a step is
  about that slowdown times the loop's time over the step's.

Usage::

    python3 bench/bench_digest.py --gb 2.4 --programs full,132,33,16,8 --json out.jsonl   # GPU host
    python3 bench/bench_digest.py --device cpu                                            # smoke test

``--device cpu`` measures the host digest (``wordsum.digest``, numpy threads) of ``--gb`` GB instead: what a
restore's verification on the host costs per GB. It prints ``RESULT {json}`` and appends it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gb", type=float, default=None, help="bytes digested, GB (default 2.4 on CUDA, 0.05 on CPU)")
    parser.add_argument("--programs", default="full,132,33,16,8",
                        help="grid caps to measure, comma-separated (full: fill the GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median)")
    parser.add_argument("--matmul", type=int, default=8192, help="side of the square bf16 matmuls beside the digest")
    parser.add_argument("--json", default=None, help="file to append the result line to")
    args = parser.parse_args(argv)
    if args.gb is None:
        args.gb = 2.4 if args.device == "cuda" else 0.05
    if not args.gb > 0 or args.repeats < 1 or args.matmul < 64:
        parser.error("--gb must be > 0, --repeats >= 1, --matmul >= 64")
    try:
        args.caps = [None if p == "full" else int(p) for p in args.programs.split(",")]
    except ValueError:
        parser.error(f"--programs={args.programs!r}: give comma-separated integers >= 1 or 'full'")
    if any(cap is not None and cap < 1 for cap in args.caps):
        parser.error(f"--programs={args.programs!r}: every cap must be >= 1")
    return args


def host_result(args: argparse.Namespace) -> dict:
    from regrow.checkpoint.snapshot import wordsum

    data = bytes(int(args.gb * 1e9) // 4 * 4)
    wordsum.digest(data)  # the thread pool, started before timing
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        wordsum.digest(data)
        seconds.append(time.perf_counter() - started)
    return {"device": "cpu", "bytes": len(data), "host_gbps": round(len(data) / statistics.median(seconds) / 1e9, 2)}


def timed(device: torch.device, work) -> float:
    """Seconds of ``work()`` on the device, synchronised before and after."""
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def gpu_result(args: argparse.Namespace) -> dict:
    from regrow.checkpoint.snapshot.wordsum_triton import digest_cuda, sm_count

    device = torch.device("cuda", torch.cuda.current_device())
    source = torch.randint(-(2**31), 2**31 - 1, (int(args.gb * 1e9) // 4,), dtype=torch.int32, device=device)
    nbytes = source.numel() * 4
    a = torch.randn(args.matmul, args.matmul, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    side = torch.cuda.Stream(device)

    def digest(cap: int | None) -> None:
        digest_cuda(source, max_programs=cap)

    alone_digest = {cap: timed(device, lambda cap=cap: digest(cap)) for cap in args.caps}  # compiles, warms up
    matmul_s = timed(device, lambda: a @ b)
    # Enough matmuls to outlast the slowest digest measured alone, so that each digest runs wholly beside them.
    count = max(10, int(2 * max(alone_digest.values()) / matmul_s) + 1)

    def matmuls() -> None:
        for _ in range(count):
            a @ b

    rows = []
    for cap in args.caps:
        alone = statistics.median(timed(device, lambda cap=cap: digest(cap)) for _ in range(args.repeats))
        loop_alone, loop_beside, beside = [], [], []
        for _ in range(args.repeats):
            loop_alone.append(timed(device, matmuls))
            done = torch.cuda.Event(enable_timing=True)
            begun = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                begun.record(side)
                digest(cap)
                done.record(side)
            matmuls()
            torch.cuda.current_stream(device).synchronize()
            loop_beside.append(time.perf_counter() - started)
            torch.cuda.synchronize(device)
            beside.append(begun.elapsed_time(done) / 1e3)
        rows.append({"programs": "full" if cap is None else cap,
                     "alone_gbps": round(nbytes / alone / 1e9, 1),
                     "beside_gbps": round(nbytes / statistics.median(beside) / 1e9, 1),
                     "matmul_loop_s": round(statistics.median(loop_alone), 4),
                     "matmul_slowdown": round(statistics.median(loop_beside) / statistics.median(loop_alone) - 1, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(device), "sms": sm_count(device.index), "bytes": nbytes,
            "matmul": args.matmul, "matmuls_per_loop": count, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_digest: no CUDA device (use --device cpu for the smoke test)")
    result = gpu_result(args) if args.device == "cuda" else host_result(args)
    line = json.dumps(result)
    print(f"RESULT {line}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
