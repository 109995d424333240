#!/usr/bin/env bash
# One node, NPROC ranks under torchrun; torchrun's --max-restarts restarts the ranks after a failure and the
# restarted ranks restore from the node's snapshot process, which outlives them.
#
#   launch/examples/single_node.sh [regrow train flags...]
#   NPROC=4 MAX_RESTARTS=3 launch/examples/single_node.sh --preset small --steps 500 --ckpt-dir runs/ckpt --save-every 100
#   FAULT=kill-rank:1@20 launch/examples/single_node.sh --preset tiny --steps 40    # see a restart happen
#
# Environment: NPROC (ranks, default 2), MAX_RESTARTS (default 3), SNAPSHOT_EVERY (default 1), JOB (names the
# snapshot segments, default single-<pid>), PYTHON (default python), FAULT (optional KIND:TARGET@STEP, as
# `regrow train --fault`), REGROW_SNAPSHOT_TOKEN (optional; default: a fresh secrets.token_hex(32)).
#
# `python -m regrow.launch.torchrun node` starts the snapshot process before torchrun (torchrun kills a restarted
# worker's whole session, so the ranks cannot own it), exports its token and address to torchrun and the ranks,
# and stops it (removing its /dev/shm segments) when torchrun exits, however it exits.
set -euo pipefail

NPROC=${NPROC:-2}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-1}
JOB=${JOB:-single-$$}
PYTHON=${PYTHON:-python}

if [[ -n "${FAULT:-}" ]]; then
    # The fault plan travels to the ranks in the environment; the directory records a fired fault so that it fires
    # once, not again in the restarted ranks. It must outlive them, so it is this script's and removed on exit.
    REGROW_FAULTS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/regrow-faults.XXXXXX")
    trap 'rm -rf "$REGROW_FAULTS_DIR"' EXIT
    REGROW_FAULTS=$("$PYTHON" -c 'import sys; from regrow.launch import faults
print(faults.plan_env([faults.Fault.parse(sys.argv[1])], "")[faults.FAULTS_ENV])' "$FAULT")
    export REGROW_FAULTS REGROW_FAULTS_DIR
fi

"$PYTHON" -m regrow.launch.torchrun node --job "$JOB" -- \
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    -m regrow.launch.torchrun --snapshot-every "$SNAPSHOT_EVERY" "$@"
