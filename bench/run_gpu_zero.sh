#!/usr/bin/env bash
# Side-by-side ZeRO-2 training throughput on the GPU host: DeepSpeed, FSDP2, regrow (fp32 state), regrow (8-bit
# state), then DeepSpeed again (the spread between the two DeepSpeed runs is the drift of the machine). Each
# implementation runs in its own torchrun (bench/bench_zero.py); a failure is recorded and the next one still runs.
# Then the single-GPU optimizer benchmark (bench/bench_optimizer.py --device cuda) if it exists.
#
# Usage (from anywhere; it works in the repository root):
#   bench/run_gpu_zero.sh                 # GPU host, NGPU GPUs (default 4), 350m preset
#   bench/run_gpu_zero.sh --device cpu    # smoke test without a GPU: tiny preset, 2 processes over gloo
#   IMPLS="fsdp2-reshard regrow8-zero3 fsdp2-reshard" SKIP_OPTIMIZER=1 bench/run_gpu_zero.sh   # the ZeRO-3 pair
# Environment: OUT (results folder, default ./bench-out), NGPU, PYTHON (default python3), IMPL_TIMEOUT (seconds per
# implementation, default 150), OPT_TIMEOUT (optimizer benchmark, default 150), PRESET, MICRO_BATCH, WARMUP, STEPS,
# IMPLS (the runs, in order; a regrow name ending "+bf16grad" keeps its gradient shard in bf16), SKIP_OPTIMIZER=1, FSDP_REDUCE_DTYPE (bfloat16, the default, like DeepSpeed's and regrow's gradient reduction; or float32).
# Writes $OUT/zero.jsonl (one JSON line per run, failures included), $OUT/zero.md (the table, also printed),
# $OUT/logs/*.log (each run's full output) and $OUT/optimizer.txt.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/gpu_host_env.sh "$@"

pyver=$("$PY" -c 'import sys; print(sys.version.split()[0])')
echo "== $(date -u +%FT%TZ) device=$device nproc=$nproc preset=$preset python=$pyver"
"$PY" - <<'PY' 2>&1 | sed 's/^/   /'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("regrow", "deepspeed", "triton", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:
        print(name, "NOT importable:", type(error).__name__, error)
PY
if [[ $device == cuda ]]; then
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader | sed 's/^/   /'
fi

jsonl=$OUT/zero.jsonl
: > "$jsonl"
run=0
for impl in ${IMPLS:-deepspeed fsdp2 regrow32 regrow8 deepspeed}; do
  run=$((run + 1))
  log=$OUT/logs/$run-$impl.log
  echo "== run $run: $impl on $nproc process(es)"
  start=$(date +%s)
  flags=()
  [[ $impl == *+bf16grad ]] && flags=(--grad-dtype bfloat16)
  timeout -k 15 "${IMPL_TIMEOUT:-150}" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    bench/bench_zero.py --impl "${impl%+bf16grad}" "${flags[@]}" --device "$device" --preset "$preset" \
    --micro-batch "${MICRO_BATCH:-8}" --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --json "$jsonl" \
    --fsdp-reduce-dtype "${FSDP_REDUCE_DTYPE:-bfloat16}" \
    > "$log" 2>&1
  rc=$?
  echo "   rc=$rc in $(($(date +%s) - start)) s, log $log"
  if grep -q '^RESULT ' "$log"; then
    grep '^RESULT ' "$log" | sed 's/^/   /'
  else
    # bench_zero.py wrote nothing: record the failure with the end of its log, so the table shows it.
    tail -n 25 "$log" | sed 's/^/   | /'
    "$PY" - "$jsonl" "$impl" "$rc" "$nproc" "$log" "${IMPL_TIMEOUT:-150}" "$preset" <<'PY'
import json, re, sys
path, impl, rc, nproc, log, limit, preset = sys.argv[1:]
with open(log, errors="replace") as f:
    lines = [line.rstrip() for line in f if line.strip()]
# The root cause is the first exception a rank raised; torchrun's own ChildFailedError/SignalException come after.
exception = re.compile(r"^(\[rank\d+\]:)?\s*[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(:.*)?$")
launcher = ("ChildFailedError", "SignalException")
raised = [line.strip() for line in lines if exception.match(line) and not any(w in line for w in launcher)]
if rc == "124":
    error = f"timed out after {limit} s" + (f"; first exception: {raised[0]}" if raised else "")
else:
    error = raised[0] if raised else (lines[-1] if lines else "(empty log)")
status = "timeout" if rc == "124" else "failed"
record = {"impl": impl, "status": status, "rc": int(rc), "world_size": int(nproc), "preset": preset,
          "error": error[:400], "log": log}
with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
PY
  fi
done

echo "== results ($jsonl)"
"$PY" - "$jsonl" <<'PY' | tee "$OUT/zero.md"
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
seen: dict[str, int] = {}
ok = [r for r in rows if r.get("status") == "ok"]
base = next((r for r in ok if r["impl"] == "deepspeed"), None)


def fmt(value, pattern):
    return "-" if value is None else pattern.format(value)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


first = ok[0] if ok else (rows[0] if rows else {})
print(f"ZeRO-2 training throughput, {first.get('world_size', '?')} x {first.get('device', '?')}, preset "
      f"{first.get('preset', '?')} ({fmt(first.get('params'), '{:,}')} params), micro-batch "
      f"{first.get('micro_batch', '?')} x {first.get('seq_len', '?')} per GPU, mean of {first.get('steps', '?')} steps "
      f"after {first.get('warmup', '?')} warm-up; ratios vs the first DeepSpeed run\n")
print("| run | impl | status | ms/step | tokens/s | tokens/s vs DS | peak GB/GPU | peak vs DS "
      "| peak GB (timed steps) | final loss |")
print("|---|---|---|---|---|---|---|---|---|---|")
for index, r in enumerate(rows, 1):
    impl = r.get("variant", r["impl"])
    seen[impl] = seen.get(impl, 0) + 1
    name = impl + (" (again)" if seen[impl] > 1 else "")
    if r.get("status") != "ok":
        error = str(r.get("error", "")).replace("|", "/")[:200]
        print(f"| {index} | {name} | {r.get('status')} (rc {r.get('rc', '-')}): {error} | | | | | | | |")
        continue
    tok_ratio = ratio(r["tokens_per_s"], base and base["tokens_per_s"])
    mem_ratio = ratio(r["peak_mem_gb"], base and base["peak_mem_gb"])
    print(f"| {index} | {name} | ok | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{fmt(tok_ratio, '{:.3f}x')} | {fmt(r['peak_mem_gb'], '{:.2f}')} | {fmt(mem_ratio, '{:.3f}x')} | "
          f"{fmt(r['peak_mem_timed_gb'], '{:.2f}')} | {r['final_loss']:.4f} |")
ds = [r for r in ok if r["impl"] == "deepspeed"]
if len(ds) >= 2:
    drift = ds[-1]["tokens_per_s"] / ds[0]["tokens_per_s"] - 1
    print(f"\nDrift: the last DeepSpeed run is {drift:+.1%} in tokens/s vs the first.")
fsdp = next((r for r in ok if r["impl"] == "fsdp2"), None)
if fsdp:
    settings = fsdp["settings"]
    print(f"FSDP2 reduce dtype: {settings.get('reduce_dtype')}; sharded params {settings.get('sharded_param_dtype')}.")
PY

if [[ -f bench/bench_optimizer.py && ${SKIP_OPTIMIZER:-0} != 1 ]]; then
  echo "== optimizer benchmark (bench/bench_optimizer.py --device $device) -> $OUT/optimizer.txt"
  timeout -k 15 "${OPT_TIMEOUT:-150}" "$PY" bench/bench_optimizer.py --device "$device" > "$OUT/optimizer.txt" 2>&1
  rc=$?
  echo "   rc=$rc"
  tail -n 40 "$OUT/optimizer.txt" | sed 's/^/   /'
else
  echo "== optimizer benchmark skipped (SKIP_OPTIMIZER=1 or bench/bench_optimizer.py missing)" | tee "$OUT/optimizer.txt"
fi
