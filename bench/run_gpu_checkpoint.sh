#!/usr/bin/env bash
# Checkpoint cost during training on the GPU host: regrow's lazy async writer, DeepSpeed save_checkpoint and FSDP2 +
# DCP async_save on NGPU GPUs (default 4), then regrow loading its checkpoint on LOAD_NGPU GPUs (default NGPU/2:
# resharding 4 -> 2). Each run is its own torchrun (bench/bench_checkpoint.py); a failure is recorded and the next
# run still goes.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_checkpoint.sh                # GPU host, 350m preset
#   bench/run_gpu_checkpoint.sh --device cpu   # smoke test without a GPU: tiny preset, 2 processes over gloo
# Environment: OUT (results folder, default ./bench-out), CKPT_DIR (checkpoint root on the disk to measure, default
# /tmp/bench-ckpt; emptied first), NGPU, LOAD_NGPU, PYTHON (default python3), RUN_TIMEOUT (seconds per run, default
# 420), PRESET, MICRO_BATCH, SAVES, IMPLS (the training runs, in order), EXTRA (more bench_checkpoint.py arguments).
# Writes $OUT/checkpoint.jsonl (one JSON line per run, failures included), $OUT/checkpoint.md (the table, also
# printed) and $OUT/logs/ckpt-*.log (each run's full output).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/gpu_host_env.sh "$@"
CKPT_DIR=${CKPT_DIR:-/tmp/bench-ckpt}
rm -rf "$CKPT_DIR" && mkdir -p "$CKPT_DIR"
load_nproc=${LOAD_NGPU:-$(( nproc / 2 > 0 ? nproc / 2 : 1 ))}

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc load_nproc=$load_nproc preset=$preset ckpt_dir=$CKPT_DIR"
df -h "$CKPT_DIR" | sed 's/^/   /'

jsonl=$OUT/checkpoint.jsonl
: > "$jsonl"
run=0
launch() {  # launch IMPL NPROC
  local impl=$1 n=$2
  run=$((run + 1))
  local log=$OUT/logs/ckpt-$run-$impl.log
  echo "== run $run: $impl on $n process(es)"
  local start=$(date +%s)
  timeout -k 15 "${RUN_TIMEOUT:-420}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$n" \
    bench/bench_checkpoint.py --impl "$impl" --device "$device" --preset "$preset" \
    --micro-batch "${MICRO_BATCH:-8}" --saves "${SAVES:-3}" --ckpt-dir "$CKPT_DIR" --json "$jsonl" ${EXTRA:-} \
    > "$log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(($(date +%s) - start)) s, log $log"
  if grep -q '^RESULT ' "$log"; then
    grep '^RESULT ' "$log" | cut -c1-400 | sed 's/^/   /'
  else
    tail -n 25 "$log" | sed 's/^/   | /'
    "$PY" -c 'import json, sys; print(json.dumps({"impl": sys.argv[1], "status": "failed", "rc": int(sys.argv[2]),
"world_size": int(sys.argv[3]), "log": sys.argv[4]}))' "$impl" "$rc" "$n" "$log" >> "$jsonl"
  fi
}
for impl in ${IMPLS:-regrow deepspeed fsdp2}; do
  launch "$impl" "$nproc"
done
launch regrow-load "$load_nproc"

echo "== results ($jsonl)"
"$PY" - "$jsonl" <<'PY' | tee "$OUT/checkpoint.md"
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| impl | GPUs | step ms (alone) | save | window of 5 steps ms | with the save ms | stall s | stall / step | "
      "persist s | GB | steps during persist | step ms during | during / baseline | load same world s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("status") != "ok":
        print(f"| {r['impl']} | {r.get('world_size')} | failed (rc {r.get('rc')}), see {r.get('log')} |" + " |" * 11)
    elif r["impl"] == "regrow-load":
        continue
    else:
        for i, s in enumerate(r["saves"]):
            kind = "cold" if i == 0 else "warm"
            print(f"| {r['impl']} | {r['world_size']} | {r['baseline_ms']} | {i} ({kind}) | {s['window_ms']} | "
                  f"{s['window_with_save_ms']} | {s['stall_s']} | {s['stall_vs_step']} | {s['persist_s']} | "
                  f"{s['bytes'] / 1e9:.3f} | {s['during_steps']} | {s['during_ms']} | {s['during_vs_baseline']} | "
                  f"{r['load_same_world_s']} |")
for r in rows:
    if r["impl"] == "regrow-load" and r.get("status") == "ok":
        print(f"\nregrow load with resharding {r['saved_world_size']} -> {r['loaded_world_size']} GPUs: "
              f"{r['load_s']} s for {r['bytes'] / 1e9:.3f} GB ({r['load_gbps']} GB/s); disk read of the same files: "
              f"O_DIRECT {r['read_direct_gbps']} GB/s, buffered (page cache warm) {r['read_buffered_gbps']} GB/s. "
              "Page caches cannot be dropped without root: the load may be served partly from memory.")
PY
