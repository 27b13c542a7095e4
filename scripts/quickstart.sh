#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU; a few minutes of compiling, then about two minutes of
# training): generates an arithmetic Q&A dataset and a character-level tokenizer, fine-tunes a
# small MMaDA-shaped model on it with the masked-diffusion SFT loss (recipes/quickstart.yaml),
# and inspects the final checkpoint as you would a downloaded LLaDA / MMaDA checkpoint.
# Re-running starts over: it deletes runs/quickstart (this script's own run directory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p mmada-train -p mmada-infer
rm -rf runs/quickstart
./target/debug/mmada-train synth --out runs/quickstart-data
./target/debug/mmada-train sft --recipe recipes/quickstart.yaml "$@"
./target/debug/mmada-infer inspect --checkpoint "runs/quickstart/checkpoints/$(cat runs/quickstart/checkpoints/latest)/model"
