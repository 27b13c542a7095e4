#!/usr/bin/env bash
# Training step side by side with the PyTorch peer (issue 18): forward + backward + AdamW of
# the d_model 256 / 4-block / vocab 58 560 model at batch 4 × 256, 2 threads, in one run:
#   * ours: benches/model.rs (criterion, median of 10 steps): `forward_backward_adamw_sft_head_chunked`
#     is the peer's step (its SFT loss, prompt = seq/4, answer tokens masked with probability
#     t ~ U(0, 1), a new draw each step), our head in chunks; `..._head_chunked` and
#     `..._full_logits` take the pretraining loss on one seeded draw (744 of 1 024 tokens
#     masked, so the chunked head does about twice the peer step's head work);
#   * the peer: ../shared/bench/torch_peer/bench.py (median of 5 steps; full logits).
# Prints tokens/s of each and the ratios. Needs python3 with torch (PEER_PYTHON=…/python).
# Run on an idle machine: both sides use the same 2 cores.
# ROUNDS=N (default 1): N rounds of peer then ours, alternating, so that the machine's drift
# (10–30 % between minutes on shared VMs) falls on both sides; prints every round's times and
# ratios, then the median ratio per case.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PEER_PYTHON:-python3}
PEER=${PEER_DIR:-../shared/bench/torch_peer}
# FEATURES=mmada-rs/openblas: Flex's large f32 matmuls on the system OpenBLAS (libopenblas-dev)
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}
bin=$(cargo test --workspace ${FEATURES:+--features "$FEATURES"} --bench model --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
ROUNDS=${ROUNDS:-1}
rounds=()
for ((r = 1; r <= ROUNDS; r++)); do
  peer=$("$PY" "$PEER/bench.py" --threads 2 --train-steps 5 --gen-length 32 --gen-steps 2 \
    --block-length 32 2>/dev/null | tail -n 1)
  ours=$("$bin" --bench 'forward_backward_adamw_(sft_head_chunked|head_chunked|full_logits)$' \
    --warm-up-time 1 --measurement-time 20 2>&1 | grep -E '^llada|time:' | grep -v '%')
  rounds+=("$(python3 -c 'import json,sys; print(json.dumps({"peer": json.loads(sys.argv[1]), "ours": sys.argv[2]}))' "$peer" "$ours")")
done
python3 - "${rounds[@]}" <<'PYEOF'
import json, re, statistics, sys
table, ratios = [], {}
for k, arg in enumerate(sys.argv[1:], 1):
    r = json.loads(arg)
    peer = r["peer"]["train"]
    tokens = peer["batch"] * peer["seq"]
    rows = [("PyTorch peer (fp32, eager)", peer["median_step_s"])]
    name = None
    for line in r["ours"].splitlines():
        if line.startswith("llada"):
            name = line.split("/")[-1].strip()
        elif "time:" in line and name:
            mid = re.findall(r"([0-9.]+) (ms|s)", line)[1]
            rows.append((f"mmada-rs {name}", float(mid[0]) / (1000 if mid[1] == "ms" else 1)))
    for n, s in rows:
        ratio = peer["median_step_s"] / s
        ratios.setdefault(n, []).append(ratio)
        table.append(f"| {k} | {n} | {s:.2f} | {tokens / s:.0f} | {ratio:.2f}× |")
print("| round | implementation | step s | tokens/s | vs peer |\n|---|---|---|---|---|")
print("\n".join(table))
if len(sys.argv) > 2:
    print("\n| implementation | median ratio over rounds | min | max |\n|---|---|---|---|")
    for n, v in ratios.items():
        if not n.startswith("PyTorch"):
            print(f"| {n} | {statistics.median(v):.2f}× | {min(v):.2f}× | {max(v):.2f}× |")
PYEOF
