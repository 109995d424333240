#!/usr/bin/env bash
# How fast a killed rank is back training under the local launcher: `regrow chaos` with a snapshot every step and
# one `kill-rank` fault, without and with `--warm-restarts`, in alternating pairs; from each run's fault report,
# the kill -> first step after the restore (detect_s + recover_s), the restore alone (restore_s) and the steps
# lost; from its metrics, how long that first step took (a compiled model compiles in it).
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_restart.sh                # GPU host, 350m preset, 1 GPU
#   bench/run_gpu_restart.sh --device cpu   # smoke test without a GPU: tiny preset, 2 processes over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU (default 1), PYTHON (default python3), PAIRS
# (default 2), STEPS (default 60), KILL_AT (default STEPS / 2), PRESET, MICRO_BATCH (default 8), SEQ_LEN (default
# 1024), RUN_TIMEOUT (seconds per run, default 300), EXTRA (more `regrow chaos` arguments, every run).
# Writes $OUT/restart.jsonl (one JSON line per run), $OUT/restart.md (the table, also printed) and
# $OUT/logs/restart-*.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NGPU=${NGPU:-1}
source bench/gpu_host_env.sh "$@"
pairs=${PAIRS:-2}
steps=${STEPS:-60}
seq_len=${SEQ_LEN:-1024}
micro=${MICRO_BATCH:-8}
if [[ $device == cpu ]]; then
  nproc=${NGPU:-2} steps=${STEPS:-6} seq_len=${SEQ_LEN:-64} micro=${MICRO_BATCH:-2}
  [[ $nproc -lt 2 ]] && nproc=2
  dtype_flag=()
else
  dtype_flag=(--param-dtype bfloat16)
fi
kill_at=${KILL_AT:-$((steps / 2))}
victim=$((nproc - 1))
jsonl=$OUT/restart.jsonl
: > "$jsonl"

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc preset=$preset pairs=$pairs steps=$steps kill-rank:$victim@$kill_at"
run=0
for ((pair = 1; pair <= pairs; pair++)); do
  for mode in cold warm; do
    run=$((run + 1))
    work=$OUT/restart-$run-$mode
    rm -rf "$work" && mkdir -p "$work"
    flags=()
    [[ $mode == warm ]] && flags=(--warm-restarts)
    log=$OUT/logs/restart-$run-$mode.log
    start=$(date +%s)
    timeout -k 15 "${RUN_TIMEOUT:-300}" "$PY" -m regrow.launch.cli chaos --device "$device" --nproc "$nproc" \
      --preset "$preset" --steps "$steps" --global-batch $((micro * nproc)) --micro-batch "$micro" \
      --seq-len "$seq_len" "${dtype_flag[@]}" --snapshot-every 1 --max-restarts 1 \
      --fault "kill-rank:$victim@$kill_at" --report "$work/report.json" --metrics "$work/metrics.jsonl" \
      "${flags[@]}" ${EXTRA:-} > "$log" 2>&1
    rc=$?
    echo "   run $run ($mode): rc=$rc in $(($(date +%s) - start)) s, log $log"
    "$PY" - "$work/report.json" "$work/metrics.jsonl" "$mode" "$rc" $((micro * nproc * seq_len)) >> "$jsonl" <<'PY'
import json, sys

path, metrics, mode, rc, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
try:
    report = json.load(open(path))
except (OSError, ValueError):
    report = {}
failures = report.get("failures") or [{}]
first = failures[0]
ok = rc == 0 and first.get("recovered") is True and first.get("detect_s") is not None
back = round(first["detect_s"] + first["recover_s"], 3) if ok else None
# The first step after the restore itself (a compiled model compiles there): rank 0's last record of that step,
# its duration from its tokens/s and the step's tokens.
step_s = None
try:
    records = [json.loads(line) for line in open(metrics) if line.strip()]
    after = [r for r in records if ok and r["step"] == first["restored_step"] + 1]
    if after and after[-1].get("tokens_per_s"):
        step_s = round(tokens / after[-1]["tokens_per_s"], 3)
except (OSError, ValueError, KeyError):
    pass
print(json.dumps({"mode": mode, "rc": rc, "status": "ok" if ok else "failed", "kill_to_first_step_s": back,
                  "first_step_after_restore_s": step_s,
                  "detect_s": first.get("detect_s"), "recover_s": first.get("recover_s"),
                  "restore_s": round(first["restore_s"], 3) if ok else None, "steps_lost": first.get("steps_lost"),
                  "source": first.get("source")}))
PY
    tail -n 1 "$jsonl" | sed 's/^/   /'
  done
done

"$PY" - "$jsonl" "$device" "$nproc" "$preset" <<'PY' | tee "$OUT/restart.md"
import json, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{sys.argv[3]} x {sys.argv[2]}, preset {sys.argv[4]}, a snapshot every step, one killed rank:\n")
print("| run | kill -> first step s | that step s | detect s | recover s | restore s | steps lost |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in runs:
    label = "--warm-restarts" if r["mode"] == "warm" else "cold restart"
    if r["status"] != "ok":
        print(f"| {label} | failed (rc {r['rc']}) | | | | | |")
        continue
    print(f"| {label} | {r['kill_to_first_step_s']} | {r.get('first_step_after_restore_s')} | {r['detect_s']} | "
          f"{r['recover_s']} | {r['restore_s']} | {r['steps_lost']} |")
PY
