#!/usr/bin/env bash
# Screenshots of the `mmada-infer serve` page with headless Chromium: the chat tab mid-generation
# (the stream paused at a step: tokens coloured by the step that committed them, the rest still
# masked), the chat tab at the end, and text-to-image mid-generation and at the end.
#
#   bash scripts/serve_screenshot.sh [OUT_DIR]        # default OUT_DIR: docs
#
# CHECKPOINT=DIR uses your checkpoint (VQ=DIR|REPO for the image tab); by default a tiny random
# MMaDA-shaped model (the quickstart's character tokenizer, a head with the 8192 image codes of
# the tiny MAGVIT-v2 test weights in tests/fixtures) is made, so the text is noise but the
# denoising is real. CHROMIUM=path picks the browser (apt-get install chromium); python3 drives it
# over the DevTools protocol (scripts/cdp_screenshot.py, standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
mkdir -p "$out"
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$chromium" ] || { echo "no chromium: apt-get install -y chromium, or set CHROMIUM" >&2; exit 1; }
cargo build -q --workspace --bins
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
vq=${VQ:-tests/fixtures/magvitv2/weights}
if [ -z "${CHECKPOINT:-}" ]; then
  ./target/debug/mmada-train synth --out "$work/data" --n 10 2>/dev/null
  # the tiny preset with a head of 109 text ids (99 characters + 10 MMaDA tokens) + 8192 codes
  sed -e 's/"codebook_size": 64/"codebook_size": 8192/' \
      -e 's/"embedding_size": 384/"embedding_size": 8301/' \
      -e 's/"vocab_size": 384/"vocab_size": 8301/' \
      -e 's/"llm_vocab_size": 320/"llm_vocab_size": 109/' \
      -e 's/"mask_token_id": 300/"mask_token_id": 99/' \
      -e 's/"eos_token_id": 281/"eos_token_id": 1/' \
      -e 's/"pad_token_id": 281/"pad_token_id": 1/' \
      -e 's/"max_sequence_length": 128/"max_sequence_length": 1024/' \
      configs/tiny.json > "$work/config.json"
  ./target/debug/mmada-train init --config "$work/config.json" --out "$work/model" --dtype f32 --seed 3 2>/dev/null
  cp "$work/data/tokenizer.json" "$work/model/"
  CHECKPOINT=$work/model
fi
./target/debug/mmada-infer serve --checkpoint "$CHECKPOINT" --port 0 --vq-checkpoint "$vq" \
  --resolution 256 --t2i-text-len 64 --template mmada > "$work/serve.out" &
server=$!
for _ in $(seq 600); do grep -q listening "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$url" ] || { echo "the server did not start" >&2; exit 1; }
echo "server at $url"
shot() { # FILE QUERY: waits for the page to say the generation ended or paused
  python3 scripts/cdp_screenshot.py "$chromium" "$url/?$2" "$1"
}
chat="tab=chat&auto=1&prompt=Tell%20me%20about%20diffusion%20language%20models&gen_length=96&block_length=32&steps=48"
shot "$out/serve_chat_mid.png" "$chat&pause=20"
shot "$out/serve_chat_end.png" "$chat"
t2i="tab=t2i&auto=1&prompt=a%20red%20apple%20on%20a%20table&timesteps=12&guidance=0"
shot "$out/serve_t2i_mid.png" "$t2i&pause=5"
shot "$out/serve_t2i_end.png" "$t2i"
