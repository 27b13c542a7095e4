#!/usr/bin/env bash
# The GPU checks of data parallelism (issue 9), for a machine with at least one NVIDIA GPU and
# its driver (no CUDA toolkit needed: burn loads the driver at run time):
#   1. SFT and UniGRPO on 2 workers sharing cuda:0 = 1 worker on cuda:0 (weights within 1e-5);
#   2. training-step throughput (tokens/s) of the d_model 1024 / 8-layer config at batch
#      8 × 512, f32 and bf16 mixed precision (benches/train_cuda.rs);
#   3. memory (issue 15): peak device memory of a ~1.1B-parameter config (d_model 2048, 18
#      blocks, 16 heads, mlp 5632, 4 × 1024 positions) per mode — f32; bf16 + f32 master
#      weights; + activation checkpointing; + the chunked LM head; and 2 processes sharing
#      cuda:0 with train.sharding none / optimizer / optimizer_and_gradients — each against the
#      planner's per-rank total (scripts/plan_calibrate.sh with DEVICE=cuda:0; nvidia-smi polled
#      every 0.2 s, the CUDA context of each process included in both the measurement and the
#      baseline run that is subtracted).
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

echo "== memory per mode, ~1.1B params, 4 x 1024 (planner vs nvidia-smi peak)"
cargo build --release --features cuda -p mmada-train -p mmada-infer 2>&1 | tail -n 2
export MMADA_TRAIN=target/release/mmada-train DEVICE=cuda:0 STEPS=2 CASES="2048:18:16:5632:1024:4"
{
  bash scripts/plan_calibrate.sh
  DTYPE=bf16 MASTER=true bash scripts/plan_calibrate.sh
  DTYPE=bf16 MASTER=true CKPT=true bash scripts/plan_calibrate.sh
  DTYPE=bf16 MASTER=true CKPT=true CHUNK=1024 bash scripts/plan_calibrate.sh
  for s in none optimizer optimizer_and_gradients; do
    DTYPE=bf16 MASTER=true CKPT=true NODES=2 SHARDING=$s bash scripts/plan_calibrate.sh
  done
} 2>&1 | tee "$out/memory.md"
