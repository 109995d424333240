#!/usr/bin/env bash
# In-memory snapshot cost on the GPU host: step time with a snapshot every step vs none, the device-to-host copy
# speed into the (cudaHostRegister'ed) /dev/shm segment, CRC verification speed, and restore_from_node time, on NGPU
# GPUs (default 4) with the 350m GPT (bench/bench_snapshot.py, one torchrun).
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_snapshot.sh                # GPU host, 350m preset
#   bench/run_gpu_snapshot.sh --device cpu   # smoke test without a GPU: tiny preset, 2 processes over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), RUN_TIMEOUT (seconds,
# default 480), PRESET, MICRO_BATCH, WINDOWS, EXTRA (more bench_snapshot.py arguments).
# Writes $OUT/snapshot.jsonl (one JSON line, or a failure line), $OUT/snapshot.md (the table, also printed) and
# $OUT/logs/snapshot.log (the full output).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/gpu_host_env.sh "$@"
# The job's snapshot token: in the environment (torchrun hands it to the ranks), never on a command line.
REGROW_SNAPSHOT_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export REGROW_SNAPSHOT_TOKEN

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc preset=$preset"
df -h /dev/shm | sed 's/^/   /'
jsonl=$OUT/snapshot.jsonl
log=$OUT/logs/snapshot.log
: > "$jsonl"
start=$(date +%s)
timeout -k 15 "${RUN_TIMEOUT:-480}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  bench/bench_snapshot.py --device "$device" --preset "$preset" --micro-batch "${MICRO_BATCH:-8}" \
  --windows "${WINDOWS:-6}" --json "$jsonl" ${EXTRA:-} > "$log" 2>&1
rc=$?
echo "   rc=$rc in $(($(date +%s) - start)) s, log $log"
if ! grep -q '^RESULT ' "$log"; then
  tail -n 30 "$log" | sed 's/^/   | /'
  "$PY" -c 'import json, sys; print(json.dumps({"bench": "snapshot", "status": "failed", "rc": int(sys.argv[1]),
"log": sys.argv[2]}))' "$rc" "$log" >> "$jsonl"
fi
leftover=$(ls /dev/shm | grep -c '^regrow-snap-' || true)
echo "   /dev/shm regrow-snap-* segments left: $leftover"

"$PY" - "$jsonl" <<'PY' | tee "$OUT/snapshot.md"
import json, sys

for r in (json.loads(line) for line in open(sys.argv[1]) if line.strip()):
    if r.get("status") != "ok":
        print(f"snapshot bench failed (rc {r.get('rc')}), see {r.get('log')}")
        continue
    print("| GPUs | step ms, no snapshot | step ms, snapshot every step | overhead | shard GB/rank | registered | "
          "D2H GB/s | CRC verify GB/s | restore_from_node s | rebuild Trainer s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['world_size']} x {r['device']} | {r['step_ms_off']} | {r['step_ms_on']} | {r['overhead']:+.2%} | "
          f"{r['shard_bytes_per_rank'] / 1e9:.3f} | {r['registered']} | {r['d2h_gbps_min']} | {r['verify_gbps_min']} | "
          f"{r['restore_s']} | {r['rebuild_s']} |")
PY
