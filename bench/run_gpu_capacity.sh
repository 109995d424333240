#!/usr/bin/env bash
# The largest GPT each ZeRO-3 implementation trains in the same GPU memory. Model shapes form a ladder (ascending
# parameter counts); each attempt is its own torchrun of bench/bench_zero.py (micro-batch 1 x 2048 tokens, activation
# checkpointing on, bf16 compute, the model built on the GPU). Per implementation the search starts at the largest
# shape its expected bytes per parameter fit in the GPU's memory, then climbs while shapes train, or descends until one
# does: the largest shape that trained is the implementation's capacity, and the next one up is shown failing. regrow
# runs at stage 3 with 8-bit state; an implementation named with "+bf16grad" (regrow8-zero3+bf16grad) also keeps its
# gradient shard in bf16 (--grad-dtype bfloat16). FSDP2 and DeepSpeed ZeRO-3 run fused fp32 torch AdamW.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_capacity.sh                # GPU host, NGPU GPUs (default 1)
#   bench/run_gpu_capacity.sh --device cpu   # smoke test without a GPU: tiny shapes, 2 processes over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), IMPLS (default
# "regrow8-zero3+bf16grad fsdp2-reshard deepspeed-zero3"), LADDER (shapes "L,D,H" separated by spaces, ascending;
# default: width 4096, 4 to 96 layers in steps of 2), SEQ_LEN (default 2048), STEPS (timed steps per shape, default
# 2), RUN_TIMEOUT (seconds per shape, default 240).
# Writes $OUT/capacity.jsonl (one JSON line per attempt), $OUT/capacity.md (the table, also printed) and
# $OUT/logs/capacity-*.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NGPU=${NGPU:-1}
source bench/gpu_host_env.sh "$@"
if [[ $device == cpu ]]; then
  nproc=2 ladder=${LADDER:-"2,64,2 3,64,2"} seq_len=${SEQ_LEN:-64}
  memory_gb=0  # every search starts at the bottom of the ladder
  export DS_ACCELERATOR=cpu
else
  # Width 4096 (32 heads of 128): each 2 layers add about 0.4B parameters, so neighbouring rungs differ by 4-16%.
  ladder=${LADDER:-$(for layers in $(seq 4 2 96); do printf '%s,4096,32 ' "$layers"; done)}
  seq_len=${SEQ_LEN:-2048}
  memory_gb=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 1e9)')
fi
read -r -a shapes <<< "$ladder"
jsonl=$OUT/capacity.jsonl
: > "$jsonl"

# Expected bytes per parameter at one GPU: only where each search starts, not what it finds.
bytes_per_param() {
  case $1 in
    regrow8-zero3+bf16grad) echo 8.5 ;;
    regrow8-zero3) echo 10.5 ;;
    *) echo 16.5 ;;
  esac
}

# The ladder index the search for implementation $1 starts at: the largest shape expected to fit.
start_index() {
  "$PY" - "$memory_gb" "$(bytes_per_param "$1")" "${shapes[@]}" <<'PY'
import sys

memory_gb, per_param, shapes = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
fits = [i for i, shape in enumerate(shapes)
        if (lambda L, D, H: (12 * L * D * D + 50304 * D) * per_param <= memory_gb * 1e9)(*map(int, shape.split(",")))]
print(fits[-1] if fits else 0)
PY
}

# Trains implementation $1 at ladder index $2; succeeds when the shape trained.
attempt() {
  local impl=$1 shape=${shapes[$2]} flags=() start rc status
  [[ $impl == *+bf16grad ]] && flags=(--grad-dtype bfloat16)
  local log=$OUT/logs/capacity-$impl-${shape//,/x}.log
  start=$(date +%s)
  timeout -k 15 "${RUN_TIMEOUT:-240}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    bench/bench_zero.py --impl "${impl%%+*}" "${flags[@]}" --device "$device" --preset "$preset" --shape "$shape" \
    --seq-len "$seq_len" --micro-batch 1 --warmup 1 --steps "${STEPS:-2}" --activation-checkpointing \
    --init-on-device --json "$jsonl" > "$log" 2>&1
  rc=$?
  if ! grep -q '^RESULT ' "$log"; then
    "$PY" -c 'import json, sys; print(json.dumps({"impl": sys.argv[1], "variant": sys.argv[1], "status": "failed",
"rc": int(sys.argv[2]), "shape": [int(x) for x in sys.argv[3].split(",")], "log": sys.argv[4]}))' \
      "$impl" "$rc" "$shape" "$log" >> "$jsonl"
  fi
  status=$(tail -n 1 "$jsonl" | "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read())["status"])')
  echo "   $impl $shape: $status in $(($(date +%s) - start)) s"
  [[ $status == ok ]]
}

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc seq_len=$seq_len memory=${memory_gb} GB ladder: $ladder"
for impl in ${IMPLS:-regrow8-zero3+bf16grad fsdp2-reshard deepspeed-zero3}; do
  i=$(start_index "$impl")
  if attempt "$impl" "$i"; then
    while ((i + 1 < ${#shapes[@]})) && attempt "$impl" $((i + 1)); do i=$((i + 1)); done
  else
    while ((i > 0)) && ! attempt "$impl" $((i - 1)); do i=$((i - 1)); done
  fi
done

"$PY" - "$jsonl" <<'PY' | tee "$OUT/capacity.md"
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| impl | largest shape trained | parameters | peak GB | tokens/s | smallest shape that did not |")
print("|---|---|---:|---:|---:|---|")
best = {}
for impl in dict.fromkeys(r.get("variant", r["impl"]) for r in runs):
    mine = [r for r in runs if r.get("variant", r["impl"]) == impl]
    ok = [r for r in mine if r["status"] == "ok"]
    top = max(ok, key=lambda r: r["params"]) if ok else None
    failed = [r for r in mine if r["status"] != "ok"]
    stop = min(failed, key=lambda r: r["shape"][0] * r["shape"][1] ** 2) if failed else None
    stopped = f"{stop['shape']} ({stop['status']})" if stop else "none (the ladder ended)"
    best[impl] = top["params"] if top else 0
    if top:
        print(f"| {impl} | {top['shape']} | {top['params'] / 1e9:.2f}B | {top['peak_mem_gb']} | "
              f"{top['tokens_per_s']} | {stopped} |")
    else:
        print(f"| {impl} | - | - | - | - | {stopped} |")
for ours in [impl for impl in best if impl.startswith("regrow") and best[impl]]:
    for impl, params in best.items():
        if not impl.startswith("regrow") and params:
            print(f"\n{ours} / {impl}: {best[ours] / params:.2f}x the parameters")
PY
