#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU, ~5 minutes the first time, mostly compiling):
# creates a tiny MMaDA-shaped model as a Hugging Face checkpoint under runs/quickstart/,
# then inspects and verifies it as you would a downloaded LLaDA / MMaDA checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/quickstart/model
cargo run -q -p mmada-train -- init --preset tiny --seed 0 --out "$out" --overwrite
cargo run -q -p mmada-infer -- inspect --checkpoint "$out"
