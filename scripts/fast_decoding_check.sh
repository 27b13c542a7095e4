#!/usr/bin/env bash
# The fast-decoding accuracy and speed check on a trained checkpoint (issue 17), CPU:
# held-out exact match and new tokens/s of every decoding at prompt 64 / gen 64 / block 8.
#  1. the quickstart's SFT (`bash scripts/quickstart.sh`, skipped when its checkpoint exists):
#     addition questions, 20-token rows;
#  2. a curriculum to the check's shape, each stage from the previous checkpoint (a model trained
#     from scratch at 130-token rows does not learn the task: recipes/quickstart_long.yaml):
#     40-token rows (gen 24), 80-token rows (gen 64), then recipes/quickstart_long.yaml:
#     a 49-character instruction before the question (prompts of 64-65 tokens), 130-token rows;
#  3. `mmada-infer eval` on the 200 held-out questions with each decoding, one after another,
#     and a table of exact match, NFE, refreshes, cache hits, tokens per forward, new tokens/s.
# About 12 minutes of training on an idle 2-core machine, then about 3 minutes of evaluation.
# Pass `--eval-only` to rerun the evaluation on the existing checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --workspace --bins
train=./target/debug/mmada-train
ckpt() { echo "runs/$1/checkpoints/$(cat "runs/$1/checkpoints/latest")/model"; }
if [ "${1:-}" != "--eval-only" ]; then
  [ -f runs/quickstart/checkpoints/latest ] || bash scripts/quickstart.sh
  short=(--set 'data.layout.template.cot_instruction=""' --set train.max_steps=400 --set checkpoint.every=200)
  rm -rf runs/quickstart-40 runs/quickstart-80 runs/quickstart-long
  $train sft --recipe recipes/quickstart_long.yaml --set run.name=quickstart-40 \
    --set "model.checkpoint=$(ckpt quickstart)" \
    --set data.layout.max_seq_length=40 --set data.layout.max_lm_len=40 "${short[@]}"
  $train sft --recipe recipes/quickstart_long.yaml --set run.name=quickstart-80 \
    --set "model.checkpoint=$(ckpt quickstart-40)" \
    --set data.layout.max_seq_length=80 --set data.layout.max_lm_len=80 "${short[@]}"
  $train sft --recipe recipes/quickstart_long.yaml
fi
model=$(ckpt quickstart-long)
out=runs/quickstart-long/decoding
mkdir -p "$out"
variants=("none:--cache none" "prefix:--cache prefix" "dual:--cache dual"
  "threshold:--threshold 0.9" "fast:--preset fast" "fast-dual:--preset fast --cache dual")
for v in "${variants[@]}"; do
  name=${v%%:*}
  # shellcheck disable=SC2086
  ./target/debug/mmada-infer eval --task gsm8k --data runs/quickstart-data/arith_test.jsonl \
    --template none --prompt-template 'Add the two numbers and reply with the sum only. {question}' \
    --gen-length 64 --steps 64 --block-length 8 --batch-size 100 ${v#*:} \
    --checkpoint "$model" --out "$out/$name.jsonl" | tail -n 2 | head -n 1 > "$out/$name.summary.json"
done
echo "checkpoint $model (200 held-out questions, prompt 64-65 tokens, gen 64, block 8, 64 steps)"
echo "| decoding | exact match | NFE | refreshes | cache hits | tokens / forward | new tokens/s | vs none |"
echo "|---|---|---|---|---|---|---|---|"
base=$(jq .tokens_per_s "$out/none.summary.json")
for v in "${variants[@]}"; do
  name=${v%%:*}
  jq -r --arg n "$name" --argjson base "$base" \
    '"| \($n) | \(.correct) / \(.items) | \(.nfe) | \(.refreshes) | \(.cache_hits) | \(.tokens_per_forward * 100 | round / 100) | \(.tokens_per_s | round) | \(.tokens_per_s / $base * 100 | round / 100) |"' \
    "$out/$name.summary.json"
done
