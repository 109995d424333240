#!/usr/bin/env bash
# The scale run (up to 8 GPUs of one host): one command for the figures of every GPU count, by calling the other
# runners with NGPU set.
#   scale  ZeRO-2 throughput and peak memory, regrow (8-bit state) vs DeepSpeed ZeRO-2, side by side for each GPU
#          count in GPU_COUNTS and each preset in PRESETS (bench/run_gpu_zero.sh, one torchrun per run);
#   ec     snapshots every step with erasure coding, NGPU/2 simulated nodes of 2 GPUs, p=1, at the largest count
#          (bench/run_gpu_snapshot_ec.sh);
#   ray    a killed Ray worker actor over NCCL at the largest count: time to resume, steps lost, against a
#          whole-job restart from disk (bench/run_gpu_ray.sh).
# Not covered yet: killing a "node" (2 workers and their snapshot process) on a single-host Ray cluster, and an
# 8-stage pipeline on GPUs (the pipeline recovery bench, bench/bench_checkfree.py, runs on the CPU).
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_scale.sh                  # every part, GPU counts 1 2 4 8 (those visible), presets 350m 1.3b
#   PARTS=scale GPU_COUNTS="1 2" bench/run_gpu_scale.sh
#   bench/run_gpu_scale.sh --device cpu     # smoke test: tiny preset, 1 and 2 CPU processes, part scale
# Environment: OUT (results folder, default ./bench-out), PARTS (default "scale ec ray"), GPU_COUNTS, PRESETS,
# IMPLS (default "deepspeed regrow8"), PYTHON, and each runner's own variables (IMPL_TIMEOUT, RUN_TIMEOUT, ...).
# Writes $OUT/scale.jsonl (every run's line, with world_size and preset), $OUT/scale.md (the table, also printed)
# and each part's files under $OUT/<part>-<count>[-<preset>]/.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
device=cuda
[[ " $* " == *" cpu "* || " $* " == *"--device=cpu"* ]] && device=cpu
PY=${PYTHON:-python3}
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ $device == cuda ]]; then
  visible=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  counts=${GPU_COUNTS:-1 2 4 8}
  presets=${PRESETS:-350m 1.3b}
  parts=${PARTS:-scale ec ray}
else
  visible=2
  counts=${GPU_COUNTS:-1 2}
  presets=${PRESETS:-tiny}
  parts=${PARTS:-scale}
fi
largest=0
for n in $counts; do
  if ((n > visible)); then
    echo "== $n GPUs: not run ($visible visible)"
  elif ((n > largest)); then
    largest=$n
  fi
done
echo "== $(date -u +%FT%TZ) device=$device visible=$visible counts='$counts' (largest run: $largest) presets='$presets'" \
     "parts='$parts' commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')"

: > "$OUT/scale.jsonl"
for part in $parts; do
  case $part in
    scale)
      for n in $counts; do
        ((n > visible)) && continue
        for preset in $presets; do
          dir=$OUT/scale-$n-$preset
          echo "== scale: $n x $device, preset $preset"
          NGPU=$n PRESET=$preset IMPLS=${IMPLS:-deepspeed regrow8} SKIP_OPTIMIZER=1 OUT=$dir \
            bash bench/run_gpu_zero.sh --device "$device" > "$dir.log" 2>&1
          grep -E '^\| [0-9]' "$dir/zero.md" 2>/dev/null | sed 's/^/   /'
          cat "$dir/zero.jsonl" >> "$OUT/scale.jsonl" 2>/dev/null
        done
      done ;;
    ec)
      echo "== ec: $largest x $device, $((largest / 2)) nodes of 2"
      NGPU=$largest NODES=$((largest / 2)) OUT=$OUT/ec-$largest bash bench/run_gpu_snapshot_ec.sh --device "$device" \
        > "$OUT/ec-$largest.log" 2>&1
      tail -n 12 "$OUT/ec-$largest.log" | sed 's/^/   /' ;;
    ray)
      echo "== ray: $largest x $device, a killed worker actor vs a whole-job restart"
      NGPU=$largest OUT=$OUT/ray-$largest bash bench/run_gpu_ray.sh --device "$device" > "$OUT/ray-$largest.log" 2>&1
      sed -n '/^Ray recovery/,$p' "$OUT/ray-$largest/ray_recovery.md" 2>/dev/null | sed 's/^/   /' ;;
    *) echo "unknown part $part (use scale, ec, ray)" >&2; exit 2 ;;
  esac
done

[[ -s $OUT/scale.jsonl ]] || exit 0
"$PY" - "$OUT/scale.jsonl" <<'PY' | tee "$OUT/scale.md"
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("ZeRO-2 scaling, regrow (8-bit state) vs DeepSpeed ZeRO-2, same lease; per GPU count and preset, the ratio "
      "is against DeepSpeed's run of that count and preset\n")
print("| preset | GPUs | impl | status | ms/step | tokens/s | tokens/s per GPU | vs DeepSpeed | peak GB/GPU "
      "| peak vs DeepSpeed | scaling efficiency vs 1 GPU |")
print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
ok = [r for r in rows if r.get("status") == "ok"]


def find(impl, preset, n):
    return next((r for r in ok if r["impl"] == impl and r.get("preset") == preset and r["world_size"] == n), None)


for r in sorted(rows, key=lambda r: (str(r.get("preset")), r.get("world_size", 0), r.get("impl", ""))):
    n, preset = r.get("world_size"), r.get("preset", "?")
    if r.get("status") != "ok":
        print(f"| {preset} | {n} | {r.get('impl')} | {r.get('status')}: {str(r.get('error', ''))[:120]} "
              f"| | | | | | | |")
        continue
    ds, one = find("deepspeed", preset, n), find(r["impl"], preset, 1)
    vs = f"{r['tokens_per_s'] / ds['tokens_per_s']:.3f}x" if ds else "-"
    peak = r.get("peak_mem_gb")  # None on the CPU
    mem = f"{peak / ds['peak_mem_gb']:.3f}x" if ds and peak and ds.get("peak_mem_gb") else "-"
    eff = f"{r['tokens_per_s'] / (n * one['tokens_per_s']):.1%}" if one else "-"
    print(f"| {preset} | {n} | {r['impl']} | ok | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{r['tokens_per_s'] / n:,.0f} | {vs} | {f'{peak:.2f}' if peak else '-'} | {mem} | {eff} |")
PY
