"""Open a checkpoint written by mmada-rs with Hugging Face transformers, offline.

    HF_HUB_OFFLINE=1 python scripts/transformers_load_check.py CHECKPOINT_DIR [--peer DIR]

Loads CHECKPOINT_DIR with `AutoModel.from_pretrained(trust_remote_code=True,
local_files_only=True)` (the modeling code named by `config.json`'s `auto_map`, which the
trainer copies from its source checkpoint) and `AutoTokenizer.from_pretrained`, runs one
forward pass over a tokenised prompt followed by masked positions, and prints the logits'
shape, the argmax ids at the masked positions and their decoded text. With `--peer
../shared/bench/torch_peer`, the logits are compared with the independent PyTorch reference
(which the fixtures tie to mmada-rs) on the same weights.

Needs `pip install torch "transformers>=4.46,<5" safetensors` (not used by tests or CI): the
upstream LLaDA remote code (`modeling_llada.py`) does not run under transformers 5 (it lacks
`all_tied_weights_keys`), a limit of that code, not of the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import AutoModel, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompt", default="What is 47 + 8?")
    ap.add_argument("--masked", type=int, default=4, help="masked positions after the prompt")
    ap.add_argument("--peer", help="folder of mdm_ref.py (../shared/bench/torch_peer)")
    a = ap.parse_args()

    cfg = json.load(open(os.path.join(a.checkpoint, "config.json")))
    print("files:", sorted(os.listdir(a.checkpoint)))
    print("auto_map:", cfg.get("auto_map"))
    tok = AutoTokenizer.from_pretrained(a.checkpoint, local_files_only=True)
    model = AutoModel.from_pretrained(
        a.checkpoint, trust_remote_code=True, local_files_only=True, torch_dtype=torch.float32
    ).eval()
    print("loaded:", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")

    bos = cfg.get("bos_token_id")
    ids = tok(a.prompt, add_special_tokens=False)["input_ids"]
    if bos is not None:
        ids = [bos] + ids
    ids = ids + [cfg["mask_token_id"]] * a.masked
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits.float()
    print("logits:", tuple(logits.shape))
    pred = logits[0, -a.masked :].argmax(-1).tolist()
    print("argmax at the masked positions:", pred, repr(tok.decode(pred)))

    if a.peer:
        sys.path.insert(0, a.peer)
        from mdm_ref import MDM  # noqa: E402

        ref = MDM.from_dir(a.checkpoint).eval()
        with torch.no_grad():
            want = ref(x).float()
        diff = (logits - want).abs().max().item()
        print(f"max |transformers - torch_peer| = {diff:.3e}")
        if diff > 1e-3:
            print("MISMATCH", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
