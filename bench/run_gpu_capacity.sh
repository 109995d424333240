#!/usr/bin/env bash
# The largest GPT each ZeRO-3 implementation trains in the same GPU memory: for each implementation, a ladder of
# model shapes, smallest first, each one its own torchrun of bench/bench_zero.py (micro-batch 1 x 2048 tokens,
# activation checkpointing on, bf16 compute), climbed until a shape runs out of memory (or fails); the last shape
# that trained is the implementation's capacity. regrow runs at stage 3 with 8-bit state, FSDP2 and DeepSpeed
# ZeRO-3 with fused fp32 torch AdamW.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_capacity.sh                # GPU host, NGPU GPUs (default 1)
#   bench/run_gpu_capacity.sh --device cpu   # smoke test without a GPU: tiny shapes, 2 processes over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), IMPLS (default
# "regrow8-zero3 fsdp2-reshard deepspeed-zero3"), LADDER (shapes "L,D,H" separated by spaces, ascending), SEQ_LEN
# (default 2048), STEPS (timed steps per shape, default 2), RUN_TIMEOUT (seconds per shape, default 240).
# Writes $OUT/capacity.jsonl (one JSON line per attempt), $OUT/capacity.md (the table, also printed) and
# $OUT/logs/capacity-*.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NGPU=${NGPU:-1}
source bench/gpu_host_env.sh "$@"
if [[ $device == cpu ]]; then
  nproc=2 ladder=${LADDER:-"2,64,2 3,64,2"} seq_len=${SEQ_LEN:-64}
  export DS_ACCELERATOR=cpu
else
  # About 1.3, 2.6, 3.8, 4.7, 6.4, 7.6 and 9.9 billion parameters (vocabulary 50304).
  ladder=${LADDER:-"24,2048,16 32,2560,20 32,3072,24 40,3072,24 40,3584,28 48,3584,28 48,4096,32"}
  seq_len=${SEQ_LEN:-2048}
fi
jsonl=$OUT/capacity.jsonl
: > "$jsonl"

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc seq_len=$seq_len ladder: $ladder"
for impl in ${IMPLS:-regrow8-zero3 fsdp2-reshard deepspeed-zero3}; do
  for shape in $ladder; do
    log=$OUT/logs/capacity-$impl-${shape//,/x}.log
    start=$(date +%s)
    timeout -k 15 "${RUN_TIMEOUT:-240}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
      bench/bench_zero.py --impl "$impl" --device "$device" --preset "$preset" --shape "$shape" \
      --seq-len "$seq_len" --micro-batch 1 --warmup 1 --steps "${STEPS:-2}" --activation-checkpointing \
      --json "$jsonl" > "$log" 2>&1
    rc=$?
    if ! grep -q '^RESULT ' "$log"; then
      "$PY" -c 'import json, sys; print(json.dumps({"impl": sys.argv[1], "status": "failed", "rc": int(sys.argv[2]),
"shape": [int(x) for x in sys.argv[3].split(",")], "log": sys.argv[4]}))' "$impl" "$rc" "$shape" "$log" >> "$jsonl"
    fi
    status=$(tail -n 1 "$jsonl" | "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read())["status"])')
    echo "   $impl $shape: $status in $(($(date +%s) - start)) s"
    [[ $status == ok ]] || break
  done
done

"$PY" - "$jsonl" <<'PY' | tee "$OUT/capacity.md"
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| impl | largest shape trained | parameters | peak GB | tokens/s | first shape that did not |")
print("|---|---|---:|---:|---:|---|")
best = {}
for impl in dict.fromkeys(r["impl"] for r in runs):
    mine = [r for r in runs if r["impl"] == impl]
    ok = [r for r in mine if r["status"] == "ok"]
    top = max(ok, key=lambda r: r["params"]) if ok else None
    stop = next((r for r in mine if r["status"] != "ok"), None)
    best[impl] = top["params"] if top else 0
    print(f"| {impl} | {top['shape'] if top else '-'} | {top['params'] / 1e9:.2f}B | "
          f"{top['peak_mem_gb'] if top else '-'} | {top['tokens_per_s'] if top else '-'} | "
          f"{(stop['shape'], stop['status']) if stop else 'none (the ladder ended)'} |" if top else
          f"| {impl} | - | - | - | - | {(stop['shape'], stop['status']) if stop else '-'} |")
ours = best.get("regrow8-zero3", 0)
for impl, params in best.items():
    if impl != "regrow8-zero3" and params:
        print(f"\nregrow8-zero3 / {impl}: {ours / params:.2f}x the parameters")
PY
