#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU; a few minutes of compiling, then a few minutes of
# training): generates an addition Q&A dataset ("What is 47 + 8?", a held-out test split and a
# character-level tokenizer), fine-tunes a small MMaDA-shaped model on it with the
# masked-diffusion SFT loss (recipes/quickstart.yaml), and prints the exact-match accuracy on
# the 200 held-out questions of an untrained model of the same shape and of the trained one
# (mmada-infer eval, GSM8K answer extraction). Finally inspects the checkpoint as you would a
# downloaded LLaDA / MMaDA checkpoint.
# Re-running starts over: it deletes runs/quickstart (this script's own run directory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --workspace --bins
rm -rf runs/quickstart
./target/debug/mmada-train synth --out runs/quickstart-data
./target/debug/mmada-train sft --recipe recipes/quickstart.yaml "$@"
model="runs/quickstart/checkpoints/$(cat runs/quickstart/checkpoints/latest)/model"
# Held-out exact match: the prompt is the raw question after <BOS> (the recipe's empty
# template), 4 new tokens decoded in 4 steps: the answer and its <EOS> padding fill the
# 20-token rows of the recipe.
evaluate() {
  ./target/debug/mmada-infer eval --task gsm8k --data runs/quickstart-data/arith_test.jsonl \
    --template none --prompt-template '{question}' --gen-length 4 --steps 4 --block-length 4 \
    --batch-size 100 --out "$2" "${@:3}" --checkpoint "$1" | tail -n 1
}
./target/debug/mmada-train init --config "$model/config.json" --out runs/quickstart/untrained \
  --dtype f32 --overwrite
before=$(evaluate runs/quickstart/untrained runs/quickstart/eval_untrained.jsonl --tokenizer "$model/tokenizer.json")
after=$(evaluate "$model" runs/quickstart/eval_trained.jsonl)
./target/debug/mmada-infer inspect --checkpoint "$model"
echo "held-out exact match (runs/quickstart-data/arith_test.jsonl, never trained on):"
echo "  untrained model: $before"
echo "  after SFT:       $after   (per question: runs/quickstart/eval_trained.jsonl)"
