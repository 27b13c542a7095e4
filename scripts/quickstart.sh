#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU): SFT → UniGRPO → evaluation, with plots.
#  1. generates an addition Q&A dataset ("What is 47 + 8?", 800 training questions, 200
#     held-out ones) and a character-level tokenizer (mmada-train synth);
#  2. fine-tunes a small MMaDA-shaped model on it with the masked-diffusion SFT loss
#     (recipes/quickstart.yaml);
#  3. runs a short UniGRPO stage from that checkpoint with an exact-match reward
#     (recipes/quickstart_unigrpo.yaml), sampling at temperature 1.5;
#  4. scores the 200 held-out questions (mmada-infer eval, GSM8K answer extraction) with an
#     untrained model of the same shape, after SFT and after UniGRPO;
#  5. prints the run directories' plots (loss / lr / grad norm; reward / KL / clip ratio).
# The build is `cargo build --workspace --bins`: the same feature set as `cargo test
# --workspace`, so whichever of the two runs second compiles nothing the first compiled.
# Re-running starts over: it deletes runs/quickstart and runs/quickstart-unigrpo.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
cargo build -q --workspace --bins
t_build=$(date +%s)
rm -rf runs/quickstart runs/quickstart-unigrpo
./target/debug/mmada-train synth --out runs/quickstart-data
./target/debug/mmada-train sft --recipe recipes/quickstart.yaml "$@"
t_sft=$(date +%s)
model="runs/quickstart/checkpoints/$(cat runs/quickstart/checkpoints/latest)/model"
# Held-out exact match: the prompt is the raw question after <BOS> (the recipe's empty
# template), 4 new tokens decoded greedily in 4 steps: the answer and its <EOS> padding fill
# the 20-token rows of the recipe.
evaluate() {
  ./target/debug/mmada-infer eval --task gsm8k --data runs/quickstart-data/arith_test.jsonl \
    --template none --prompt-template '{question}' --gen-length 4 --steps 4 --block-length 4 \
    --batch-size 100 --out "$2" "${@:3}" --checkpoint "$1" | tail -n 1
}
./target/debug/mmada-train init --config "$model/config.json" --out runs/quickstart/untrained \
  --dtype f32 --overwrite
before=$(evaluate runs/quickstart/untrained runs/quickstart/eval_untrained.jsonl --tokenizer "$model/tokenizer.json")
after_sft=$(evaluate "$model" runs/quickstart/eval_trained.jsonl)
t_eval=$(date +%s)
./target/debug/mmada-train unigrpo --recipe recipes/quickstart_unigrpo.yaml --set "model.checkpoint=$model"
t_rl=$(date +%s)
rl="runs/quickstart-unigrpo/checkpoints/$(cat runs/quickstart-unigrpo/checkpoints/latest)/model"
after_rl=$(evaluate "$rl" runs/quickstart-unigrpo/eval_trained.jsonl)
./target/debug/mmada-infer inspect --checkpoint "$rl"
# mean correctness reward (0 or 1 per completion, temperature 1.5) of the first and last 5 UniGRPO steps
rewards=$(grep -o '"rewards/math_correctness/mean":[-0-9.e]*' runs/quickstart-unigrpo/metrics.jsonl | cut -d: -f2)
first5=$(echo "$rewards" | head -n 5 | awk '{s += $1} END {printf "%.3f", s / NR}')
last5=$(echo "$rewards" | tail -n 5 | awk '{s += $1} END {printf "%.3f", s / NR}')
t_end=$(date +%s)
echo
echo "held-out exact match (runs/quickstart-data/arith_test.jsonl, never trained on):"
echo "  untrained model: $before"
echo "  after SFT:       $after_sft   (per question: runs/quickstart/eval_trained.jsonl)"
echo "  after UniGRPO:   $after_rl   (per question: runs/quickstart-unigrpo/eval_trained.jsonl)"
echo "UniGRPO correctness reward (temperature 1.5): mean of the first 5 steps $first5, of the last 5 $last5"
echo "plots:"
echo "  runs/quickstart/plots/metrics.png          (SFT: loss, eval loss, lr, grad norm)"
echo "  runs/quickstart-unigrpo/plots/metrics.png  (UniGRPO: reward, per-reward means, KL, clip ratio, length)"
echo "times: build $((t_build - t0)) s, SFT $((t_sft - t_build)) s, eval $((t_eval - t_sft)) s, UniGRPO $((t_rl - t_eval)) s, eval + inspect $((t_end - t_rl)) s"
