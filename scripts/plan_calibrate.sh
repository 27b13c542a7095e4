#!/usr/bin/env bash
# Calibrate the memory planner (`mmada-train plan`, crates/mmada-train/src/plan.rs) against
# the peak resident memory of real CPU runs.
#
# For each case it writes an SFT recipe on generated data (`mmada-train synth`: the
# character-level arithmetic set; every lm row padded to the case's sequence length), runs
# `mmada-train sft` for STEPS steps as a child process under /usr/bin/time (maximum resident
# set size = VmHWM), and asks `mmada-train plan --json` for the planned total of the same
# recipe. The CPU has no separate device memory, so the process baseline (binary, allocator,
# tokenizer, data) is measured with a run of a minimal model (d_model 32, 1 block, 32
# positions) and subtracted: planned = plan total, measured = peak RSS − baseline RSS.
#
#   bash scripts/plan_calibrate.sh                 # the three default cases
#   CASES="512:8:8:1376:1024:2" STEPS=2 bash scripts/plan_calibrate.sh
#   PRECISION=bf16 bash scripts/plan_calibrate.sh  # train.mixed_precision: bf16 (slow on CPU)
#   CKPT=true bash scripts/plan_calibrate.sh       # train.activation_checkpointing: true
#   DTYPE=bf16 MASTER=true CHUNK=256 bash scripts/plan_calibrate.sh  # bf16 + f32 master, chunked head
#   DEVICE=cuda:0 bash scripts/plan_calibrate.sh   # peak device memory (nvidia-smi) instead of RSS
#   NODES=2 SHARDING=optimizer bash scripts/plan_calibrate.sh
#       # 2 processes on loopback (one rank each), train.sharding; measured = the larger peak
#       # RSS of the two, planned = the per-rank plan (`plan --nodes 2`)
#
# A case is d_model:n_layers:n_heads:mlp_hidden:seq:rows. Needs `cargo build --workspace`
# first (uses target/debug/mmada-train, or $MMADA_TRAIN). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${MMADA_TRAIN:-target/debug/mmada-train}
STEPS=${STEPS:-2}
PRECISION=${PRECISION:-no}
CKPT=${CKPT:-false}
NODES=${NODES:-1}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-f32}
MASTER=${MASTER:-false}
CHUNK=${CHUNK:-0}
SHARDING=${SHARDING:-none}
CASES=${CASES:-"256:4:4:688:256:8 384:6:6:1024:512:4 512:8:8:1376:1024:2"}
[ -x "$BIN" ] || { echo "build first: cargo build --workspace ($BIN missing)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time (GNU time) is needed for the peak RSS" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BIN" synth --out "$work/data" --n 2000 2>/dev/null

recipe() { # name d layers heads mlp seq rows
  cat > "$work/$1.yaml" <<EOF
run: {name: $1, output_dir: $work/runs, seed: 0}
model:
  preset: tiny
  overrides: {d_model: $2, n_layers: $3, n_heads: $4, n_kv_heads: $4, mlp_hidden_size: $5}
  dtype: $DTYPE
tokenizer: {path: $work/data/tokenizer.json}
data:
  layout:
    max_seq_length: 16
    max_lm_len: $6
    explicit_prompt: true
    template: {header: "", turn_end: "", trim: true, cot_instruction: "", cot_answer: "{answer}"}
  lm:
    batch_size: $7
    sources:
      - inline:
          name: arithmetic
          task: chat
          source: {path: $work/data/arith.jsonl}
          format: jsonl
          fields: {question: question, answer: answer}
          license: MIT
          split: train
optimizer: {lr: 1.0e-4, weight_decay: 0.01, max_grad_norm: 1.0, master_weights: $MASTER}
loss: {ce_chunk_rows: $CHUNK}
schedule: {kind: constant}
train: {max_steps: $STEPS, log_every: 1, device: "$DEVICE", mixed_precision: $PRECISION, activation_checkpointing: $CKPT, sharding: $SHARDING}
checkpoint: {every: 0, keep_last: 1, model_dtype: f32}
EOF
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

peak_kb() { # recipe [nodes] → peak memory in KiB of `mmada-train sft`, the larger over the
  # processes: RSS (VmHWM) on the CPU, used device memory (nvidia-smi, polled) on CUDA; wall
  # seconds in $work/wall.txt
  local nodes=${2:-1} coord pids=() r poller=
  coord=$(free_port)
  if [[ $DEVICE == cuda* ]]; then
    : >"$work/smi.txt"
    (while :; do
      nvidia-smi --query-compute-apps=used_memory --format=csv,noheader,nounits >>"$work/smi.txt" 2>/dev/null
      sleep 0.2
    done) &
    poller=$!
  fi
  for r in $(seq 0 $((nodes - 1))); do
    local dist=()
    [ "$nodes" = 1 ] || dist=(--nodes "$nodes" --node-rank "$r" --coordinator "127.0.0.1:$coord"
      --data-port "$(free_port)" --collective-timeout 600)
    /usr/bin/time -f "%M %e" -o "$work/time$r.txt" "$BIN" sft --recipe "$1" "${dist[@]}" \
      >/dev/null 2>"$work/log$r.txt" &
    pids+=($!)
  done
  for r in "${!pids[@]}"; do
    wait "${pids[$r]}" || { cat "$work/log$r.txt" >&2; exit 1; }
  done
  cat "$work"/time[0-9]*.txt | sort -n -k1 | tail -n 1 | cut -d' ' -f2 >"$work/wall.txt"
  if [ -n "$poller" ]; then
    kill "$poller"
    echo $(($(sort -n "$work/smi.txt" | tail -n 1) * 1024))
  else
    cat "$work"/time[0-9]*.txt | sort -n -k1 | tail -n 1 | cut -d' ' -f1
  fi
  rm -f "$work"/time[0-9]*.txt
}

planned() { # recipe [nodes] → planned total bytes per rank
  "$BIN" plan --recipe "$1" --nodes "${2:-1}" --gpu-mem 1TB --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])'
}

recipe base 32 1 2 64 32 1
base_kb=$(peak_kb "$work/base.yaml")
base_plan=$(planned "$work/base.yaml")
echo "baseline (d 32, 1 block, 1 × 32): peak RSS $((base_kb / 1024)) MiB (planned $((base_plan / 1048576)) MiB)"
echo
echo "device $DEVICE, model.dtype $DTYPE (master weights $MASTER), precision $PRECISION, activation checkpointing $CKPT, ce_chunk_rows $CHUNK, $NODES process(es), sharding $SHARDING, $STEPS steps"
echo
echo "| d_model | blocks | heads | mlp | rows × seq | params | planned MiB | measured MiB (peak − baseline) | error | wall s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
i=0
for c in $CASES; do
  IFS=: read -r d l h m s r <<<"$c"
  i=$((i + 1))
  recipe "case$i" "$d" "$l" "$h" "$m" "$s" "$r"
  kb=$(peak_kb "$work/case$i.yaml" "$NODES")
  p=$(planned "$work/case$i.yaml" "$NODES")
  params=$("$BIN" plan --recipe "$work/case$i.yaml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["params"])')
  python3 - "$d" "$l" "$h" "$m" "$r" "$s" "$params" "$p" "$kb" "$base_kb" "$base_plan" "$(cat "$work/wall.txt")" <<'EOF'
import sys
d, l, h, m, r, s, params, p, kb, base_kb, base_plan, wall = sys.argv[1:]
planned = (int(p) - int(base_plan)) / 2**20
measured = (int(kb) - int(base_kb)) / 1024
err = (planned - measured) / measured * 100
print(f"| {d} | {l} | {h} | {m} | {r} × {s} | {int(params)/1e6:.1f} M | {planned:.0f} | {measured:.0f} | {err:+.1f} % | {wall} |")
EOF
done
