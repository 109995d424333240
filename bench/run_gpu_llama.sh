#!/usr/bin/env bash
# A Hugging Face Llama of TinyLlama's shape (1.10B parameters, random init, bf16, micro-batch 4 x 2048) on ONE GPU,
# trained three ways side by side (bench/bench_llama.py): `regrow train --model`, a hand-written loop with regrow's
# ZeroOptimizer and Guard (no snapshots), and DeepSpeed ZeRO-2 with fused torch AdamW. ROUNDS rounds (default 2),
# the three modes alternating within each, one process per run.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_llama.sh                # GPU host: needs transformers among the carried wheels
#   bench/run_gpu_llama.sh --device cpu   # smoke test without a GPU: a tiny Llama, seq 64, a few steps
# Environment: OUT (results folder, default ./bench-out), PYTHON, ROUNDS, STEPS, WARMUP, RUN_TIMEOUT (seconds per
# run, default 300), MODES (default "trainer guard deepspeed").
# Writes $OUT/llama.jsonl (one JSON line per run, or a failure line), $OUT/llama.md (the table, also printed) and
# $OUT/logs/llama_<mode>_<round>.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
NGPU=1 source bench/gpu_host_env.sh "$@"
if [[ $device == cuda ]]; then
  sizes=(--steps "${STEPS:-30}" --warmup "${WARMUP:-8}" --micro-batch 4 --seq-len 2048)
else
  sizes=(--steps "${STEPS:-3}" --warmup "${WARMUP:-1}" --micro-batch 2 --seq-len 64)
fi
jsonl=$OUT/llama.jsonl
: > "$jsonl"
echo "== $(date -u +%FT%TZ) device=$device rounds=${ROUNDS:-2} modes=${MODES:-trainer guard deepspeed}"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for mode in ${MODES:-trainer guard deepspeed}; do
    log=$OUT/logs/llama_${mode}_${round}.log
    start=$(date +%s)
    timeout -k 15 "${RUN_TIMEOUT:-300}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
      bench/bench_llama.py --mode "$mode" --device "$device" "${sizes[@]}" > "$log" 2>&1
    rc=$?
    echo "   round $round $mode: rc=$rc in $(($(date +%s) - start)) s, log $log"
    if line=$(grep '^RESULT ' "$log" | tail -n 1); then
      "$PY" -c 'import json, sys; r = json.loads(sys.argv[1][7:]); r.update(status="ok", round=int(sys.argv[2]))
print(json.dumps(r))' "$line" "$round" >> "$jsonl"
    else
      tail -n 30 "$log" | sed 's/^/   | /'
      "$PY" -c 'import json, sys; print(json.dumps({"bench": "llama", "mode": sys.argv[1], "round": int(sys.argv[2]),
"status": "failed", "rc": int(sys.argv[3]), "log": sys.argv[4]}))' "$mode" "$round" "$rc" "$log" >> "$jsonl"
    fi
  done
done

"$PY" - "$jsonl" <<'PY' | tee "$OUT/llama.md"
import json, sys

records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| round | run | status | tokens/s | vs DeepSpeed | peak GB | final loss |")
print("|---|---|---|---|---|---|---|")
for r in records:
    if r.get("status") != "ok":
        print(f"| {r['round']} | {r['mode']} | failed (rc {r['rc']}, {r['log']}) | | | | |")
        continue
    ds = [d for d in records if d.get("status") == "ok" and d["mode"] == "deepspeed" and d["round"] == r["round"]]
    ratio = f"{r['tokens_per_s'] / ds[0]['tokens_per_s']:.2f}x" if ds else "-"
    peak = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
    print(f"| {r['round']} | {r['mode']} | ok | {r['tokens_per_s']:,.0f} | {ratio} | {peak} | {r['final_loss']:.4f} |")
PY
if grep -q '"status": "failed"' "$jsonl"; then exit 1; fi
