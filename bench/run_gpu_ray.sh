#!/usr/bin/env bash
# What a failure costs a Ray-coordinated job on the GPU host: regrow (snapshot every step, a killed worker actor
# healed in place) against a DeepSpeed-style baseline (universal checkpoint every 100 steps, whole-job restart from
# disk), and the goodput computed from those measured costs (bench/bench_ray_recovery.py, one driver process that
# starts a one-node Ray instance with NGPU GPUs, default 4, one Worker actor per GPU, 350m GPT).
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_ray.sh                # GPU host, 350m preset, 4 GPUs (about 3-4 minutes with Ray's start)
#   bench/run_gpu_ray.sh --device cpu   # smoke test without a GPU: tiny preset, 2 CPU workers over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), RUN_TIMEOUT (seconds,
# default 330; each of the three jobs gives up by itself after --phase-timeout, 100 s), PRESET, MICRO_BATCH, EXTRA
# (more bench_ray_recovery.py arguments, e.g. "--kills 3 --warmup 30").
# Writes $OUT/ray_recovery.jsonl (one JSON line, or a failure line), $OUT/ray_recovery.md (the table, also
# printed), $OUT/logs/ray_recovery.log (the full output, the workers' included) and the coordinator's events of
# each job, $OUT/logs/ray_recovery_{regrow,baseline,restart}.events.jsonl. The checkpoints go to a temporary
# folder (removed at the end), never under $OUT.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/gpu_host_env.sh "$@"

echo "== $(date -u +%FT%TZ) device=$device workers=$nproc preset=$preset"
jsonl=$OUT/ray_recovery.jsonl
md=$OUT/ray_recovery.md
log=$OUT/logs/ray_recovery.log
: > "$jsonl"
rm -f "$md"
# Ray (carried as a wheel, installed with --no-deps) needs click, msgpack, protobuf, pyyaml, requests, filelock,
# jsonschema and packaging on the host: stop here, with the import error, rather than after minutes.
if ! "$PY" -c 'import ray; print("   ray", ray.__version__)' > "$log" 2>&1; then
  tail -n 5 "$log" | sed 's/^/   | /'
  "$PY" -c 'import json, sys; print(json.dumps({"bench": "ray_recovery", "status": "failed", "rc": 1,
"error": "ray does not import", "log": sys.argv[1]}))' "$log" >> "$jsonl"
  echo "ray_recovery bench not run: ray does not import (see $log)" | tee "$md"
  exit 1
fi
cat "$log"
start=$(date +%s)
# The full output goes to the log; the bench's own progress lines (and the result) are shown as they come.
# SIGTERM at the limit lets the driver stop its actors and Ray (ray.shutdown in a finally); SIGKILL 30 s later.
timeout -k 30 "${RUN_TIMEOUT:-330}" "$PY" bench/bench_ray_recovery.py --device "$device" --preset "$preset" \
  --workers "$nproc" --micro-batch "${MICRO_BATCH:-8}" --json "$jsonl" --markdown "$md" --events-dir "$OUT/logs" \
  ${EXTRA:-} 2>&1 | tee -a "$log" | grep --line-buffered -E '^\[bench\]|^\[coordinator\]|Traceback|Error' \
  | cut -c1-400
rc=${PIPESTATUS[0]}
echo "   rc=$rc in $(($(date +%s) - start)) s, log $log"
if ! grep -q '^RESULT ' "$log"; then
  tail -n 40 "$log" | sed 's/^/   | /'
  "$PY" -c 'import json, sys; print(json.dumps({"bench": "ray_recovery", "status": "failed", "rc": int(sys.argv[1]),
"log": sys.argv[2]}))' "$rc" "$log" >> "$jsonl"
fi
leftover=$(ls /dev/shm | grep -c '^regrow-snap-' || true)
echo "   /dev/shm regrow-snap-* segments left: $leftover"

echo
if [[ -s $md ]]; then
  cat "$md"
else
  echo "ray_recovery bench failed (rc $rc), see $log" | tee "$md"
fi
