#!/usr/bin/env bash
# Snapshots every step with erasure coding across simulated nodes on the GPU host: step-time overhead while the
# snapshot processes encode, and the time from a node's loss to every rank's state restored
# (bench/bench_snapshot_ec.py, one torchrun; NODES simulated nodes, default 2, one erasure-coding group, p=1).
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_snapshot_ec.sh                # GPU host, 350m preset, 4 GPUs as 2 nodes of 2
#   bench/run_gpu_snapshot_ec.sh --device cpu   # smoke test without a GPU: tiny preset, 4 processes over gloo
# Environment: OUT (results folder, default ./bench-out), NGPU, NODES, PYTHON (default python3), RUN_TIMEOUT
# (seconds, default 480), PRESET, MICRO_BATCH, WINDOWS, EXTRA (more bench_snapshot_ec.py arguments).
# Writes $OUT/snapshot_ec.jsonl (one JSON line, or a failure line), $OUT/snapshot_ec.md (the table, also printed)
# and $OUT/logs/snapshot_ec.log (the full output, with every encode round's time).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ " $* " == *" cpu "* || " $* " == *"--device=cpu"* ]] && NGPU=${NGPU:-4}
source bench/gpu_host_env.sh "$@"
REGROW_SNAPSHOT_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export REGROW_SNAPSHOT_TOKEN

echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc nodes=${NODES:-2} preset=$preset"
jsonl=$OUT/snapshot_ec.jsonl
log=$OUT/logs/snapshot_ec.log
: > "$jsonl"
start=$(date +%s)
timeout -k 15 "${RUN_TIMEOUT:-480}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  bench/bench_snapshot_ec.py --device "$device" --preset "$preset" --micro-batch "${MICRO_BATCH:-8}" \
  --nodes "${NODES:-2}" --windows "${WINDOWS:-6}" --json "$jsonl" ${EXTRA:-} > "$log" 2>&1
rc=$?
echo "   rc=$rc in $(($(date +%s) - start)) s, log $log"
if ! grep -q '^RESULT ' "$log"; then
  tail -n 30 "$log" | sed 's/^/   | /'
  "$PY" -c 'import json, sys; print(json.dumps({"bench": "snapshot_ec", "status": "failed", "rc": int(sys.argv[1]),
"log": sys.argv[2]}))' "$rc" "$log" >> "$jsonl"
fi
leftover=$(ls /dev/shm | grep -c '^regrow-snap-' || true)
echo "   /dev/shm regrow-snap-* segments left: $leftover"

"$PY" - "$jsonl" "$log" <<'PY' | tee "$OUT/snapshot_ec.md"
import json, statistics, sys

for r in (json.loads(line) for line in open(sys.argv[1]) if line.strip()):
    if r.get("status") != "ok":
        print(f"snapshot_ec bench failed (rc {r.get('rc')}), see {r.get('log')}")
        continue
    print("| GPUs | nodes | step ms, off | step ms, snapshot + EC | overhead | encoded / timed steps | encode round s "
          "(median) | node GB | rebuild s | restore s | node loss to restored s | sources |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rounds = r.get("round_seconds") or []
    median = f"{statistics.median(rounds):.2f}" if rounds else "-"
    print(f"| {r['world_size']} x {r['device']} | {r['nodes']} x {r['ranks_per_node']} | {r['step_ms_off']} | "
          f"{r['step_ms_on']} | {r['overhead']:+.2%} | {r['encoded_steps']} / {r['timed_steps']} | {median} | "
          f"{r['node_snapshot_bytes'] / 1e9:.2f} | {r['rebuild_s']} | {r['restore_s']} | "
          f"{r['node_loss_to_restored_s']} | {','.join(sorted(set(r['restore_sources'])))} |")
PY
