#!/usr/bin/env bash
# Multi-node data-parallel training under Slurm: one mmada-train process per node, one worker
# thread per GPU of `train.device` (e.g. cuda:0,1,2,3,4,5,6,7). Node rank 0 hosts
# burn-collective's global orchestrator at MASTER_ADDR:MASTER_PORT.
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_slurm.sh \
#       sft --recipe recipes/mixed_cot.yaml --set train.device=cuda:0,1,2,3,4,5,6,7
#
# Everything after the script name is passed to `mmada-train` (sft ... or unigrpo ...; both take
# the same flags, and `train.device=cuda:all` uses every GPU of a node). The run directory
# (run.output_dir) must be on a file system every node sees: rank 0 writes the checkpoints
# and every rank resumes from them (--resume latest).
#
# Environment: MMADA_TRAIN (binary, default target/release/mmada-train), MASTER_PORT (default
# 29500; node r serves tensors on MASTER_PORT+1+r), COLLECTIVE_TIMEOUT (seconds, default 600).
#SBATCH --job-name=mmada-train
#SBATCH --ntasks-per-node=1
set -euo pipefail

if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "launch_slurm.sh: not inside a Slurm allocation (run it with sbatch or srun)" >&2
    exit 2
fi
BIN=${MMADA_TRAIN:-target/release/mmada-train}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${SLURM_NNODES:-1}
export MASTER_ADDR MASTER_PORT NNODES

# srun starts one task per node; each task reads its node rank from SLURM_NODEID.
srun --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
    exec "$0" "$@" \
        --nodes "$NNODES" --node-rank "$SLURM_NODEID" \
        --coordinator "$MASTER_ADDR:$MASTER_PORT" \
        --node-host "$(hostname)" \
        --collective-timeout "${COLLECTIVE_TIMEOUT:-600}"
' "$BIN" "$@"
