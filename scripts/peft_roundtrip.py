#!/usr/bin/env python3
"""PEFT round trip of a LoRA adapter written by mmada-rs (issue 16).

Loads the tiny official checkpoint `tests/fixtures/weights` with the *official* modeling code
(Gen-Verse/MMaDA `models/modeling_llada.py` + `configuration_llada.py` at 3cdb870, passed with
--upstream; not vendored here), applies the adapter that mmada-rs saved in
`tests/fixtures/lora_peft/adapter` with `peft.PeftModel.from_pretrained`, and writes

* `tests/fixtures/lora_peft/peft_logits.safetensors`: `ids` (int64 [2, 16]), `logits`
  (adapter on, f32 [2, 16, 384]), `logits_merged` (after `merge_and_unload`), `logits_base`
  (adapters disabled);
* `tests/fixtures/lora_peft/peft_resaved/`: the adapter as PEFT itself saves it
  (`save_pretrained`), so the Rust test also loads PEFT-written files.

`tests/lora_peft.rs` compares these with the Rust forward; CI never runs Python. Regenerate:

    cargo test --test lora_peft -- --ignored write_adapter_fixture   # the adapter
    /work/venv-torch/bin/python scripts/peft_roundtrip.py --upstream DIR_WITH_MODELING_LLADA
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file


def load_upstream(upstream: str):
    """Import modeling_llada.py / configuration_llada.py from `upstream` as a package."""
    pkg = tempfile.mkdtemp(prefix="llada_upstream_")
    dst = os.path.join(pkg, "llada_upstream")
    os.makedirs(dst)
    for f in ("modeling_llada.py", "configuration_llada.py"):
        shutil.copy(os.path.join(upstream, f), dst)
    open(os.path.join(dst, "__init__.py"), "w").close()
    sys.path.insert(0, pkg)
    import llada_upstream.modeling_llada as m  # noqa: E402

    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, help="folder with modeling_llada.py + configuration_llada.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--base", default=os.path.join(root, "tests/fixtures/weights"))
    ap.add_argument("--fixture", default=os.path.join(root, "tests/fixtures/lora_peft"))
    args = ap.parse_args()

    import peft

    m = load_upstream(args.upstream)
    torch.manual_seed(0)
    cfg_json = json.load(open(os.path.join(args.base, "config.json")))
    cfg = m.LLaDAConfig(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")})
    cfg.use_cache = False  # transformers 5 no longer sets it on every config
    model = m.LLaDAModelLM(cfg, init_params=False)
    sd = load_file(os.path.join(args.base, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "rope" in k for k in missing), missing
    model = model.float().eval()

    ids = (torch.arange(32, dtype=torch.int64).reshape(2, 16) * 37 + 11) % cfg.vocab_size
    with torch.no_grad():
        base = model(input_ids=ids).logits.float()
    pm = peft.PeftModel.from_pretrained(model, os.path.join(args.fixture, "adapter"))
    pm.eval()
    with torch.no_grad():
        on = pm(input_ids=ids).logits.float()
        with pm.disable_adapter():
            off = pm(input_ids=ids).logits.float()
    assert torch.equal(off, base), "adapters off must give the base logits"
    resaved = os.path.join(args.fixture, "peft_resaved")
    if os.path.exists(resaved):
        shutil.rmtree(resaved)
    pm.save_pretrained(resaved)
    readme = os.path.join(resaved, "README.md")  # PEFT's model card stub
    if os.path.exists(readme):
        os.remove(readme)
    merged_model = pm.merge_and_unload()
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits.float()
    out = os.path.join(args.fixture, "peft_logits.safetensors")
    save_file(
        {"ids": ids.contiguous(), "logits": on.contiguous(), "logits_merged": merged.contiguous(), "logits_base": base.contiguous()},
        out,
        metadata={"peft": peft.__version__, "torch": torch.__version__, "upstream": "Gen-Verse/MMaDA models/modeling_llada.py @ 3cdb870"},
    )
    print(json.dumps({
        "peft": peft.__version__,
        "torch": torch.__version__,
        "adapter_vs_base_max_abs": float((on - base).abs().max()),
        "merged_vs_adapter_max_abs": float((merged - on).abs().max()),
        "wrote": out,
    }))


if __name__ == "__main__":
    main()
