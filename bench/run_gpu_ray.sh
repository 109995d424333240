#!/usr/bin/env bash
# What a failure costs a Ray-coordinated job on the GPU host: regrow (snapshot every step, a killed worker actor
# healed in place) against a DeepSpeed-style baseline (universal checkpoint every 100 steps, whole-job restart from
# disk), and the goodput computed from those measured costs (bench/bench_ray_recovery.py, one driver process that
# starts a one-node Ray instance with NGPU GPUs, default 4, one Worker actor per GPU, 350m GPT). On request, the
# goodput MEASURED instead: each job trained for D seconds of wall clock with a worker killed every T seconds.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_ray.sh                # GPU host, 350m preset, 4 GPUs (about 3-4 minutes with Ray's start)
#   bench/run_gpu_ray.sh --device cpu   # smoke test without a GPU: tiny preset, 2 CPU workers over gloo
#   EXTRA="--standby 1 --phases regrow --kill-gap 100" bench/run_gpu_ray.sh
#                                       # a standby worker per node takes over the killed ranks (the kills 100 steps
#                                       # apart, so that the standby started after the first is up for the second)
# Goodput MEASURED (phases goodput-regrow: healed in place; goodput-baseline: a checkpoint every --save-every
# steps and a whole-job restart from it at each failure), each phase taking D + about 30 s:
#   EXTRA="--phases regrow,goodput-regrow,goodput-baseline --goodput-interval 120 --goodput-duration 360" \
#     RUN_TIMEOUT=1100 bench/run_gpu_ray.sh
# Where the GPU host stops a command after 10 minutes: there, run one goodput phase per call (about 7 minutes each
# with D = 360 s on 4 GPUs), then merge their goodput tables here (no device needed):
#   call 1: EXTRA="--phases goodput-regrow --goodput-interval 120 --goodput-duration 360" bench/run_gpu_ray.sh
#   call 2: EXTRA="--phases goodput-baseline --goodput-interval 120 --goodput-duration 360" bench/run_gpu_ray.sh
#   (copy each call's ray_recovery.jsonl back, e.g. to a.jsonl and b.jsonl, then)
#   python bench/bench_ray_recovery.py --combine a.jsonl b.jsonl
# (D = 2T = 240 s gives two failures per phase, one in the middle of each 120-s period, in about 5 minutes a call.)
# One failure in 9 minutes, the closest to one every 10 that a 10-minute command allows (about 580 s a call):
#   EXTRA="--standby 1 --phases goodput-regrow --goodput-interval 540 --goodput-duration 540" RUN_TIMEOUT=580
# A longer snapshot interval for goodput-regrow: add --snapshot-every N. The reference: phase goodput-clean (the
# same job for D s, no failure, no snapshot; its mean step over D is then every phase's reference step, so that the
# GPUs' drift over minutes is in the reference too), e.g. in a call of its own merged with --combine:
#   EXTRA="--phases goodput-clean --goodput-interval 540 --goodput-duration 540" RUN_TIMEOUT=580
# A reference step time measured in the same call without it: add the short baseline phase
# (--phases baseline,goodput-regrow).
# CPU check of the goodput phases (about 2 minutes):
#   EXTRA="--phases goodput-regrow,goodput-baseline --goodput-interval 15 --goodput-duration 45 --save-every 20" \
#     bench/run_gpu_ray.sh --device cpu
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), RUN_TIMEOUT (seconds;
# default 330 for the short phases, each of which gives up by itself after --phase-timeout, 100 s; with goodput
# phases in EXTRA, 30 + 110 per short phase + D + 120 per goodput phase, capped at 540 to stay under a GPU host
# command limit of 10 minutes with the set-up: set RUN_TIMEOUT to go beyond; at the limit the bench gets SIGTERM, stops the
# job in progress and still reports the phases done, the cut one as truncated), PRESET, MICRO_BATCH, EXTRA
# (more bench_ray_recovery.py arguments, e.g. "--kills 3 --warmup 30").
# Writes $OUT/ray_recovery.jsonl (one JSON line, or a failure line), $OUT/ray_recovery.md (the table, also
# printed), $OUT/logs/ray_recovery.log (the full output, the workers' included) and the coordinator's events of
# each job, $OUT/logs/ray_recovery_{regrow,baseline,restart,goodput-regrow,goodput-baseline,goodput-clean}.events.jsonl
# (goodput-baseline's holds every restarted job's events one after the other, each from its own "start"). The
# checkpoints go to a temporary folder (removed at the end), never under $OUT.
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
if [[ -z ${RUN_TIMEOUT:-} ]]; then
  RUN_TIMEOUT=$("$PY" - "${EXTRA:-}" <<'PYEOF'
import shlex
import sys

words = shlex.split(sys.argv[1])


def value(flag):
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


phases = [p for p in (value("--phases") or "regrow,baseline,restart").split(",") if p]
goodput = [p for p in phases if p.startswith("goodput-")]
if not goodput:
    print(330)
else:
    interval = float(value("--goodput-interval") or 120)
    duration = float(value("--goodput-duration") or 3 * interval)
    print(int(30 + 110 * (len(phases) - len(goodput)) + len(goodput) * (duration + 120)))
PYEOF
)
  if ((RUN_TIMEOUT > 540)); then
    echo "   WARNING: these phases may need ${RUN_TIMEOUT} s; RUN_TIMEOUT capped at 540 (the GPU host's 10" \
         "minutes a command): split --phases over several calls and merge with --combine, or set RUN_TIMEOUT"
    RUN_TIMEOUT=540
  fi
fi
echo "   RUN_TIMEOUT=$RUN_TIMEOUT s"
start=$(date +%s)
# The full output goes to the log; the bench's own progress lines (and the result) are shown as they come.
# SIGTERM at the limit lets the driver stop its actors and Ray (ray.shutdown in a finally); SIGKILL 30 s later.
timeout -k 30 "$RUN_TIMEOUT" "$PY" bench/bench_ray_recovery.py --device "$device" --preset "$preset" \
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
