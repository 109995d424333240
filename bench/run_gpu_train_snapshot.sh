#!/usr/bin/env bash
# The cost of a snapshot every step as a user sees it: `regrow train` without and with `--snapshot-every 1`, in
# alternating pairs of runs (so that drift of the machine falls on both), each run's median tokens/s over its steps
# FROM..STEPS read from its --metrics file; the overhead is the median of the "on" runs against the median of the
# "off" runs.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_train_snapshot.sh                # GPU host, 350m preset, 1 GPU
#   bench/run_gpu_train_snapshot.sh --device cpu   # smoke test without a GPU: tiny preset, 1 process over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU (default 1), PYTHON (default python3), PAIRS (default
# 2), STEPS (default 160), FROM (first counted step, default 21), PRESET, MICRO_BATCH (sequences per GPU, default 8),
# SEQ_LEN (default 1024), RUN_TIMEOUT (seconds per run, default 300), EXTRA (more `regrow train` arguments, both
# runs), EXTRA_ON (more arguments of the snapshot runs only).
# Writes $OUT/train_snapshot.jsonl (one JSON line per run), $OUT/train_snapshot.md (the table and the change, also
# printed), $OUT/train_snapshot_summary.json and $OUT/logs/train-*.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NGPU=${NGPU:-1}
source bench/gpu_host_env.sh "$@"
pairs=${PAIRS:-2}
steps=${STEPS:-160}
first=${FROM:-21}
seq_len=${SEQ_LEN:-1024}
if [[ $device == cpu ]]; then
  nproc=1 steps=${STEPS:-6} first=${FROM:-2} seq_len=${SEQ_LEN:-64}
  dtype_flag=()
else
  dtype_flag=(--param-dtype bfloat16)
fi
micro=${MICRO_BATCH:-8}
jsonl=$OUT/train_snapshot.jsonl
: > "$jsonl"

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc preset=$preset pairs=$pairs steps=$steps (counted from $first)"
run=0
for ((pair = 1; pair <= pairs; pair++)); do
  for mode in off on; do
    run=$((run + 1))
    work=$OUT/train-$run-$mode
    rm -rf "$work" && mkdir -p "$work"
    flags=()
    [[ $mode == on ]] && flags=(--snapshot-every 1 ${EXTRA_ON:-})
    log=$OUT/logs/train-$run-$mode.log
    start=$(date +%s)
    timeout -k 15 "${RUN_TIMEOUT:-300}" "$PY" -m regrow.launch.cli train --device "$device" --nproc "$nproc" \
      --preset "$preset" --steps "$steps" --global-batch $((micro * nproc)) --seq-len "$seq_len" "${dtype_flag[@]}" \
      --metrics "$work/metrics.jsonl" --ckpt-dir "$work/ckpt" "${flags[@]}" ${EXTRA:-} > "$log" 2>&1
    rc=$?
    echo "   run $run ($mode): rc=$rc in $(($(date +%s) - start)) s, log $log"
    "$PY" - "$work/metrics.jsonl" "$mode" "$rc" "$first" "$steps" "$log" >> "$jsonl" <<'PY'
import json, re, statistics, sys

path, mode, rc, first, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    rows = {r["step"]: r for r in map(json.loads, open(path)) if "tokens_per_s" in r}
except OSError:
    rows = {}
counted = [rows[s]["tokens_per_s"] for s in range(first, steps + 1) if s in rows]
ok = rc == 0 and len(counted) == steps - first + 1
# The sink's closing line: the copy's GPU time and how long the optimizer steps waited for it (medians).
times = {}
for line in open(sys.argv[6], errors="replace"):
    for key, pattern in (("copy_ms", r"copy ([0-9.]+) ms median"), ("wait_ms", r"waited ([0-9.]+) ms median")):
        if (found := re.search(pattern, line)) and "snapshot:" in line:
            times[key] = float(found.group(1))
print(json.dumps({"mode": mode, "rc": rc, "status": "ok" if ok else "failed", "steps_counted": len(counted),
                  "median_tokens_per_s": round(statistics.median(counted), 1) if counted else None, **times}))
PY
    tail -n 1 "$jsonl" | sed 's/^/   /'
  done
done

"$PY" - "$jsonl" "$device" "$nproc" "$preset" "$OUT/train_snapshot_summary.json" $((micro * nproc * seq_len)) \
  <<'PY' | tee "$OUT/train_snapshot.md"
import json, statistics, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
good = {mode: [r["median_tokens_per_s"] for r in runs if r["mode"] == mode and r["status"] == "ok"]
        for mode in ("off", "on")}
print("| run | median tokens/s per run |")
print("|---|---:|")
for mode, label in (("off", "no snapshots"), ("on", "`--snapshot-every 1`")):
    print(f"| {label} | {' / '.join(f'{v:,.0f}' for v in good[mode]) or 'failed'} |")
if good["off"] and good["on"]:
    change = statistics.median(good["on"]) / statistics.median(good["off"]) - 1
    print(f"\n{sys.argv[3]} x {sys.argv[2]}, preset {sys.argv[4]}: snapshot every step changes tokens/s by {change:+.2%}")
    summary = {"device": sys.argv[2], "nproc": int(sys.argv[3]), "preset": sys.argv[4],
               "off": good["off"], "on": good["on"], "change": round(change, 4)}
    timed = [r for r in runs if r["mode"] == "on" and r["status"] == "ok" and "wait_ms" in r]
    if timed:
        # The floor: the copy time no forward and backward hid (the optimizer steps' wait for it), against a step
        # without snapshots: the change a snapshot every step cannot beat with this copy on this machine.
        step_ms = int(sys.argv[6]) / statistics.median(good["off"]) * 1e3
        wait_ms = statistics.median(r["wait_ms"] for r in timed)
        copy_ms = statistics.median(r["copy_ms"] for r in timed if "copy_ms" in r)
        floor = -wait_ms / (step_ms + wait_ms)
        print(f"step without snapshots {step_ms:.2f} ms; the copy {copy_ms:.2f} ms on the GPU; optimizer steps waited "
              f"{wait_ms:.2f} ms for it (floor {floor:+.2%}; the change is {(change - floor) * 100:+.2f} points "
              f"from it)")
        summary.update(step_ms=round(step_ms, 3), copy_ms=copy_ms, wait_ms=wait_ms, floor=round(floor, 4))
    with open(sys.argv[5], "w") as f:
        f.write(json.dumps(summary) + "\n")
PY
