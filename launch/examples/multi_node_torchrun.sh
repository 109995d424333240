#!/usr/bin/env bash
# Several nodes under torchrun, each with its own snapshot process; run this script once on every node.
# torchrun's --max-restarts restarts the workers after a failure (on every node: the agents meet in a new
# rendezvous round) and every rank restores one common step from its node's snapshot process.
#
#   # on each of the 2 nodes (same RDZV_ENDPOINT, a host:port of one of them that the others reach):
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0.example:29500 CKPT_DIR=/shared/runs/ckpt \
#       launch/examples/multi_node_torchrun.sh --device cuda --preset 350m --param-dtype bfloat16 --steps 5000
#
# Environment: NNODES (required), RDZV_ENDPOINT (required), CKPT_DIR (required: a directory every node sees),
# NPROC (ranks per node, default 8), MAX_RESTARTS (default 3), SNAPSHOT_EVERY (default 1), SAVE_EVERY (default
# 500), JOB (the rendezvous id and the snapshot segments' name, default regrow), PYTHON (default python),
# REGROW_SNAPSHOT_TOKEN (optional; each node may use its own: a rank only talks to its own node's process),
# PERSIST_EVERY (optional: the snapshot processes write the checkpoints under CKPT_DIR every PERSIST_EVERY steps
# instead of the ranks every SAVE_EVERY; needs the same REGROW_SNAPSHOT_TOKEN exported on every node).
#
# What restores what: a crashed rank (its node alive) restores from its node's snapshot process; a lost node has
# lost its snapshots with it, so the job falls back to the latest universal checkpoint under CKPT_DIR (every rank
# restores the same step: the ranks agree on it). Erasure coding across nodes needs the snapshot processes to be
# told their group's addresses, which only the local launcher does today; see docs/torchrun.md.
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"
: "${CKPT_DIR:?set CKPT_DIR, a checkpoint root every node sees (the fallback when a node is lost)}"
NPROC=${NPROC:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-1}
SAVE_EVERY=${SAVE_EVERY:-500}
JOB=${JOB:-regrow}
PYTHON=${PYTHON:-python}

# Who writes the checkpoints: the ranks (--save-every), or the snapshot processes (--persist-every), never both.
node_flags=() saving=(--save-every "$SAVE_EVERY")
if [[ -n ${PERSIST_EVERY:-} ]]; then
  : "${REGROW_SNAPSHOT_TOKEN:?PERSIST_EVERY needs the same REGROW_SNAPSHOT_TOKEN exported on every node}"
  node_flags=(--persist-every "$PERSIST_EVERY" --persist-dir "$CKPT_DIR") saving=()
fi

# The snapshot process listens on loopback: only this node's ranks connect to it.
"$PYTHON" -m regrow.launch.torchrun node --job "$JOB-$(hostname -s)" "${node_flags[@]}" -- \
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$JOB" --max-restarts "$MAX_RESTARTS" \
    -m regrow.launch.torchrun --snapshot-every "$SNAPSHOT_EVERY" --ckpt-dir "$CKPT_DIR" "${saving[@]}" "$@"
