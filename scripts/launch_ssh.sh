#!/usr/bin/env bash
# Multi-node data-parallel training over plain SSH: starts one mmada-train process per host
# (node rank = position in HOSTS), the first host also runs burn-collective's global
# orchestrator. Ctrl-C stops every node.
#
#   HOSTS="gpu-a gpu-b" scripts/launch_ssh.sh sft --recipe recipes/mixed_cot.yaml \
#       --set train.device=cuda:0,1,2,3,4,5,6,7
#
# Requirements: password-less ssh to every host, the same checkout at the same path (WORKDIR,
# default: this directory) with the binary built, and a run directory every host sees (shared
# file system) for checkpoints and --resume.
#
# Environment: HOSTS (required, space separated), WORKDIR, MMADA_TRAIN (binary relative to
# WORKDIR, default target/release/mmada-train), MASTER_PORT (default 29500; node r serves tensors
# on MASTER_PORT+1+r), COLLECTIVE_TIMEOUT (seconds, default 600), LOG_DIR (default logs/).
set -euo pipefail

read -r -a hosts <<< "${HOSTS:?set HOSTS to the space-separated host names, first = node rank 0}"
WORKDIR=${WORKDIR:-$(pwd)}
BIN=${MMADA_TRAIN:-target/release/mmada-train}
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
args=$(printf ' %q' "$@")

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup INT TERM

for rank in "${!hosts[@]}"; do
    host=${hosts[$rank]}
    ssh -tt "$host" "cd $(printf %q "$WORKDIR") && exec $(printf %q "$BIN") $args \
        --nodes ${#hosts[@]} --node-rank $rank --coordinator $MASTER_ADDR:$MASTER_PORT \
        --node-host $host --collective-timeout ${COLLECTIVE_TIMEOUT:-600}" \
        > "$LOG_DIR/node$rank.log" 2>&1 &
    pids+=($!)
    echo "node $rank on $host: log $LOG_DIR/node$rank.log"
done

status=0
for _ in "${pids[@]}"; do
    if ! wait -n; then
        status=1
        cleanup   # one node failed: stop the others instead of waiting for their timeout
    fi
done
exit $status
