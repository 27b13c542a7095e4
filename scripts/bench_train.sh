#!/usr/bin/env bash
# Training step side by side with the PyTorch peer (issue 18): forward + backward + AdamW of
# the d_model 256 / 4-block / vocab 58 560 model at batch 4 × 256, 2 threads on both sides:
#   * ours: benches/model.rs, built as `cargo test` builds it (the dev/test profile: the
#     dependencies and mmada-host at opt-level 3, our other crates at 1 — what `cargo build`
#     and the quickstart run), criterion's estimate over 10 samples (the slope of its linear
#     sampling, or the mean); `forward_backward_adamw_sft_head_chunked` is the peer's step (its
#     SFT loss, prompt = seq/4, answer tokens masked with probability t ~ U(0, 1), a new draw
#     each step), our head in chunks at the masked rows only; `..._head_chunked` and
#     `..._full_logits` take the pretraining loss on one seeded draw (744 of 1 024 tokens
#     masked: about twice the head rows of the SFT step; the peer computes the head at all
#     1 024 positions either way);
#   * the peer: ../shared/bench/torch_peer/bench.py (median of 5 steps; full logits).
# Needs python3 with torch (PEER_PYTHON=…/python). Run on an idle machine.
# ROUNDS=N (default 1): N rounds of peer then ours, alternating, so that the machine's drift
# (10–40 % between minutes on shared 2-core VMs) is spread over both sides; each round's rows
# print as it ends, then the median / min / max ratio per case. Logs: $BENCH_LOG_DIR
# (default target/bench_train), printed when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PEER_PYTHON:-python3}
PEER=${PEER_DIR:-../shared/bench/torch_peer}
LOGS=${BENCH_LOG_DIR:-target/bench_train}
mkdir -p "$LOGS"
# the same threads on both sides (the peer gets --threads 2)
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
# FEATURES=mmada-rs/openblas: Flex's large f32 matmuls on the system OpenBLAS (libopenblas-dev)
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}
fail() { echo "bench_train.sh: $1 failed; its output:" >&2; tail -n 40 "$2" >&2; exit 1; }
cargo test --workspace ${FEATURES:+--features "$FEATURES"} --bench model --no-run \
  >"$LOGS/build.log" 2>&1 || fail "cargo test --bench model --no-run" "$LOGS/build.log"
bin=$(sed -n 's/.*Executable .*(\(.*\)).*/\1/p' "$LOGS/build.log" | tail -n 1)
[ -n "$bin" ] || fail "finding the bench executable" "$LOGS/build.log"
ROUNDS=${ROUNDS:-1}
: >"$LOGS/rounds.jsonl"
for ((r = 1; r <= ROUNDS; r++)); do
  "$PY" "$PEER/bench.py" --threads 2 --train-steps 5 --gen-length 32 --gen-steps 2 \
    --block-length 32 >"$LOGS/peer.log" 2>&1 || fail "the peer ($PY $PEER/bench.py)" "$LOGS/peer.log"
  "$bin" --bench 'forward_backward_adamw_(sft_head_chunked|head_chunked|full_logits)$' \
    --warm-up-time 1 --measurement-time 20 >"$LOGS/ours.log" 2>&1 || fail "$bin" "$LOGS/ours.log"
  python3 - "$r" "$LOGS/peer.log" "$LOGS/ours.log" "$LOGS/rounds.jsonl" <<'PYEOF'
import json, re, sys
r, peer_log, ours_log, out = sys.argv[1:]
peer = json.loads(open(peer_log).read().strip().splitlines()[-1])["train"]
tokens = peer["batch"] * peer["seq"]
rows = [("PyTorch peer (fp32, eager)", peer["median_step_s"])]
name = None
for line in open(ours_log):
    if line.startswith("llada"):
        name = line.split("/")[-1].strip()
    elif "time:" in line and "%" not in line and name:
        mid = re.findall(r"([0-9.]+) (ms|s)", line)[1]
        rows.append((f"mmada-rs {name}", float(mid[0]) / (1000 if mid[1] == "ms" else 1)))
        name = None
if len(rows) != 4:
    sys.exit(f"round {r}: expected 3 timings of ours in {ours_log}, found {len(rows) - 1}")
if r == "1":
    print("| round | implementation | step s | tokens/s | vs peer |\n|---|---|---|---|---|")
with open(out, "a") as f:
    for n, s in rows:
        ratio = peer["median_step_s"] / s
        print(f"| {r} | {n} | {s:.2f} | {tokens / s:.0f} | {ratio:.2f}× |", flush=True)
        f.write(json.dumps({"round": int(r), "name": n, "step_s": s, "ratio": ratio}) + "\n")
PYEOF
done
if ((ROUNDS > 1)); then
  python3 - "$LOGS/rounds.jsonl" <<'PYEOF'
import json, statistics, sys
ratios = {}
for line in open(sys.argv[1]):
    row = json.loads(line)
    if not row["name"].startswith("PyTorch"):
        ratios.setdefault(row["name"], []).append(row["ratio"])
print("\n| implementation | median ratio over rounds | min | max |\n|---|---|---|---|")
for n, v in ratios.items():
    print(f"| {n} | {statistics.median(v):.2f}× | {min(v):.2f}× | {max(v):.2f}× |")
PYEOF
fi
