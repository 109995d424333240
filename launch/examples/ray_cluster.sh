#!/usr/bin/env bash
# Train on a Ray cluster: one actor per rank, a snapshot process per node, automatic recovery.
#
# On the head node:      ray start --head --port 6379
# On every other node:   ray start --address HEAD_IP:6379
# Then, from any node of the cluster (this script), or as a Ray job:
#   ray job submit --address http://HEAD_IP:8265 -- python -m regrow.launch.ray_job --workers 8 --gpus-per-worker 1 ...
#
# WORKERS ranks (default 8), GPUS per worker (default 1: NCCL; 0: CPU workers over gloo), RANKS_PER_NODE (default
# 4: the ranks of one node, for erasure coding across nodes; must divide WORKERS), EC_GROUP (default 2 nodes),
# STEPS (default 1000). Extra arguments go to `regrow ray` (e.g. --preset 350m --ckpt-dir /shared/ckpt).
#
# Elastic instead (go on with fewer ranks when a lost rank's replacement finds no GPU within 60 s, resharded from
# the last checkpoint; no fixed placement, so no erasure coding):
#   RANKS_PER_NODE=0 EC_GROUP=0 launch/examples/ray_cluster.sh --elastic-wait 60 --save-every 200 \
#     --ckpt-dir /shared/ckpt
set -euo pipefail

WORKERS=${WORKERS:-8}
GPUS=${GPUS:-1}
RANKS_PER_NODE=${RANKS_PER_NODE:-4}
EC_GROUP=${EC_GROUP:-2}
STEPS=${STEPS:-1000}

exec regrow ray --address auto --workers "$WORKERS" --gpus-per-worker "$GPUS" --ranks-per-node "$RANKS_PER_NODE" \
  --ec-group-size "$EC_GROUP" --snapshot-every 1 --steps "$STEPS" \
  --events "ray-events-$(date +%Y%m%d-%H%M%S).jsonl" "$@"
