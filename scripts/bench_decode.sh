#!/usr/bin/env bash
# Fast decoding side by side (issue 17): the mmada-rs sampler without cache (full head, window
# head), with the prefix and the dual KV cache, each with and without threshold 0.9, then the
# PyTorch peer's no-cache sampler (../shared/bench/torch_peer/bench.py) at the same shapes, back
# to back in one run. Prints the JSON lines of both and the ratios.
#
#   scripts/bench_decode.sh [PYTHON]        # PYTHON defaults to ../venv-torch/bin/python
#
# Shapes: MMADA_BENCH_{VOCAB,PROMPT,GEN,STEPS,BLOCK,BATCH} (defaults 126464 / 256 / 256 / 64 /
# 32 / 4: the issue's bench config). Threads: 2 for both (RAYON_NUM_THREADS, torch --threads).
# MMADA_BENCH_ONLY="name|name" runs the named variants only (benches/decode.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-../venv-torch/bin/python}
PEER=../shared/bench/torch_peer/bench.py
VOCAB=${MMADA_BENCH_VOCAB:-126464}
PROMPT=${MMADA_BENCH_PROMPT:-256}
GEN=${MMADA_BENCH_GEN:-256}
STEPS=${MMADA_BENCH_STEPS:-64}
BLOCK=${MMADA_BENCH_BLOCK:-32}
BATCH=${MMADA_BENCH_BATCH:-4}
export MMADA_BENCH_VOCAB=$VOCAB MMADA_BENCH_PROMPT=$PROMPT MMADA_BENCH_GEN=$GEN \
  MMADA_BENCH_STEPS=$STEPS MMADA_BENCH_BLOCK=$BLOCK MMADA_BENCH_BATCH=$BATCH
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}
# FEATURES=mmada-rs/openblas: Flex's large f32 matmuls on the system OpenBLAS (libopenblas-dev)
BIN=$(cargo test --workspace ${FEATURES:+--features "$FEATURES"} --bench decode --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
OUT=$(mktemp)
# a criterion filter that matches no benchmark: only the side-by-side table runs
"$BIN" --bench side_by_side_only | tee "$OUT"
if [ -x "$PY" ] && [ -f "$PEER" ]; then
  "$PY" "$PEER" --threads 2 --vocab "$VOCAB" --train-steps 1 --warmup 0 --gen-batch "$BATCH" \
    --prompt-len "$PROMPT" --gen-length "$GEN" --gen-steps "$STEPS" --block-length "$BLOCK" | tee -a "$OUT"
else
  echo "no PyTorch peer ($PY, $PEER): skipped" >&2
fi
python3 - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
ours = [r for r in rows if r.get('impl') == 'mmada-rs']
peer = [r for r in rows if 'sampler' in r]
base = ours[0]['gen_tokens_per_s']
p = peer[0]['sampler']['gen_tokens_per_s'] if peer else None
print(f"{'variant':36s} {'nfe':>4s} {'hits':>4s} {'tok/s':>8s} {'vs none,full':>12s} {'vs torch':>9s}")
for r in ours:
    t = r['gen_tokens_per_s']
    print(f"{r['variant']:36s} {r['nfe']:4d} {r['cache_hits']:4d} {t:8.2f} {t/base:12.2f} {t/p if p else float('nan'):9.2f}")
if p:
    print(f"{'torch peer, no cache (full head)':36s} {peer[0]['sampler']['steps']:4d} {0:4d} {p:8.2f} {p/base:12.2f} {1.0:9.2f}")
PYEOF
