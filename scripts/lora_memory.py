#!/usr/bin/env python3
"""LoRA vs full fine-tuning memory on the CPU (issue 16): the same SFT recipe (d_model 512,
8 blocks, MLP 1536, GPT-2 tokenizer + MMaDA tokens, batch 4 × 32 positions, 3 steps) run
twice as child processes of this script, once in full and once with `lora: {r: 8, alpha: 16}`
on every block projection. Prints one JSON line per run: peak RSS of the child (VmHWM, from
`getrusage(RUSAGE_CHILDREN)` after each child ends), the optimizer state on disk (AdamW m + v,
`optimizer.safetensors`, bytes of tensor data) and the loss row of the last step.

    python3 scripts/lora_memory.py [--bin target/debug/mmada-train] [--data ../shared/data]
"""

import argparse
import json
import os
import struct
import subprocess
import tempfile

RECIPE = """
run: {{name: {name}, output_dir: "{out}", seed: 0}}
model:
  preset: tiny
  overrides: {{d_model: 512, n_layers: 8, n_heads: 8, n_kv_heads: 8, mlp_hidden_size: 1536}}
tokenizer: {{path: "{tok}"}}
data:
  layout: {{max_seq_length: 32, max_lm_len: 32}}
  lm:
    batch_size: 4
    sources:
      - inline:
          name: arithmetic
          task: chat
          source: {{path: "{jsonl}"}}
          format: jsonl
          fields: {{question: question, answer: answer}}
          license: MIT
          split: train
optimizer: {{lr: 1.0e-3}}
schedule: {{kind: constant}}
train: {{max_steps: 3}}
checkpoint: {{every: 3, keep_last: 1, model_dtype: f32}}
{lora}
"""


def tensor_bytes(path: str) -> int:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(root, "target/debug/mmada-train"))
    ap.add_argument("--data", default=os.path.join(root, "../shared/data"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lora_memory_")
    subprocess.run([args.bin, "synth", "--out", os.path.join(tmp, "data"), "--n", "400"], check=True, capture_output=True)
    tok = os.path.join(args.data, "tokenizers/gpt2/tokenizer.json")
    for name, lora in [("full", ""), ("lora", "lora: {r: 8, alpha: 16}")]:
        path = os.path.join(tmp, name + ".yaml")
        with open(path, "w") as f:
            f.write(RECIPE.format(name=name, out=os.path.join(tmp, "runs"), tok=tok,
                                  jsonl=os.path.join(tmp, "data/arith.jsonl"), lora=lora))
        # a fresh wrapper per run: RUSAGE_CHILDREN keeps the max over every child waited for
        wrapper = ("import resource, subprocess, sys; "
                   "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run(["python3", "-c", wrapper, args.bin, "sft", "--recipe", path],
                             check=True, capture_output=True, text=True)
        peak = int(out.stdout.split()[-1]) * 1024
        ck = os.path.join(tmp, "runs", name, "checkpoints")
        latest = open(os.path.join(ck, "latest")).read().strip()
        rows = [json.loads(l) for l in open(os.path.join(tmp, "runs", name, "metrics.jsonl"))]
        print(json.dumps({
            "run": name,
            "peak_rss_bytes": peak,
            "optimizer_state_bytes": tensor_bytes(os.path.join(ck, latest, "optimizer.safetensors")),
            "last_loss": rows[-1].get("loss"),
        }))


if __name__ == "__main__":
    main()
