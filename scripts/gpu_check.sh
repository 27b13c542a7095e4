#!/usr/bin/env bash
# The GPU checks of data parallelism (issue 9), for a machine with at least one NVIDIA GPU and
# its driver (no CUDA toolkit needed: burn loads the driver at run time):
#   1. SFT and UniGRPO on 2 workers sharing cuda:0 = 1 worker on cuda:0 (weights within 1e-5);
#   2. training-step throughput (tokens/s) of the d_model 1024 / 8-layer config at batch
#      8 × 512, f32 and bf16 mixed precision (benches/train_cuda.rs).
# Usage: scripts/gpu_check.sh [OUT_DIR]   (logs go to OUT_DIR, default gpu_check/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

echo "== equivalence on cuda:0"
cargo test --release --features cuda -p mmada-train --test dp --test unigrpo cuda0 \
    -- --nocapture --test-threads 1 2>&1 | tee "$out/equivalence.log"

echo "== throughput d1024 / 8 layers, batch 8 x 512"
cargo bench --features cuda --bench train_cuda 2>&1 | tee "$out/throughput.log"
grep -E "^llada|time:|thrpt:" "$out/throughput.log" || true
