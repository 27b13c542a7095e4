#!/usr/bin/env python3
"""Reference reward server for `kind: http` image rewards: CLIP score and ImageReward.

MMaDA's UniGRPO rewards text-to-image with 0.1·CLIP(image, prompt) + 0.1·ImageReward(prompt,
image) (arXiv 2505.15809 §3.3, spec §5.1) and captioning with 0.1·CLIP(image, text). Those
need models; this server wraps them behind the `http` reward protocol of `mmada-rewards`
(crates/mmada-rewards/src/http.rs), so a training run only needs a URL:

    POST /clip          {"items": [RewardInput, ...]}  ->  {"rewards": [number | null, ...]}
    POST /imagereward   same

Each item carries `prompt`, `completion` (text), `fields` (the dataset row) and, when it has
one, `image`: {"width", "height", "png_base64"} — the decoded image of a t2i completion or the
prompt image of an understanding task. Items without an image score `null` (not applicable).

* /clip: CLIP score as torchmetrics defines it, 100·max(cos(E_img, E_txt), 0), divided by 100
  here so it lies in [0, 1] (weight it 0.1 in the recipe for the paper's 0.1·CLIP). The text is
  the prompt (t2i: the caption) or, with `?text=completion`, the completion (captioning).
* /imagereward: ImageReward-v1.0's score (`ImageReward.load("ImageReward-v1.0").score(prompt,
  image)`), a standardised human-preference score (roughly N(0, 1) over its training set).

Requirements (not installed by this repository; not run in CI):
    pip install torch transformers pillow            # /clip
    pip install image-reward                         # /imagereward (pulls its own BLIP)

Usage:
    python scripts/reward_server.py --port 8000 --clip openai/clip-vit-large-patch14 \
        [--imagereward ImageReward-v1.0] [--device cuda]

Recipe:
    reward_funcs:
      - {kind: http, name: clip, weight: 0.1, params: {url: "http://localhost:8000/clip"}}
      - {kind: http, name: imagereward, weight: 0.1,
         params: {url: "http://localhost:8000/imagereward", timeout_s: 120}}
"""

import argparse
import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def decode_image(item):
    """The item's image as a PIL RGB image, or None."""
    from PIL import Image

    img = item.get("image")
    if not img:
        return None
    data = base64.b64decode(img["png_base64"])
    return Image.open(io.BytesIO(data)).convert("RGB")


class Clip:
    """CLIP score in [0, 1]: max(cos(image, text), 0) (torchmetrics clip_score / 100)."""

    def __init__(self, name, device):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.torch = torch
        self.device = device
        self.model = CLIPModel.from_pretrained(name).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(name)

    def score(self, items, text_key):
        torch = self.torch
        out = [None] * len(items)
        idx, images, texts = [], [], []
        for i, it in enumerate(items):
            img = decode_image(it)
            if img is None:
                continue
            idx.append(i)
            images.append(img)
            texts.append(it.get(text_key) or "")
        if not idx:
            return out
        with torch.no_grad():
            inputs = self.processor(
                text=texts, images=images, return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            e_img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            e_txt = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
            e_img = e_img / e_img.norm(dim=-1, keepdim=True)
            e_txt = e_txt / e_txt.norm(dim=-1, keepdim=True)
            cos = (e_img * e_txt).sum(-1).clamp(min=0.0)
        for i, c in zip(idx, cos.tolist()):
            out[i] = float(c)
        return out


class ImageRewardScorer:
    """ImageReward-v1.0 human-preference score of (prompt, image)."""

    def __init__(self, name, device):
        import ImageReward as RM  # pip install image-reward

        self.model = RM.load(name, device=device)

    def score(self, items, text_key):
        out = [None] * len(items)
        for i, it in enumerate(items):
            img = decode_image(it)
            if img is None:
                continue
            out[i] = float(self.model.score(it.get(text_key) or "", img))
        return out


def make_handler(scorers, lock):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server API)
            url = urlparse(self.path)
            scorer = scorers.get(url.path.strip("/"))
            if scorer is None:
                self._reply(404, {"error": f"unknown endpoint {url.path}; have {sorted(scorers)}"})
                return
            text_key = parse_qs(url.query).get("text", ["prompt"])[0]
            if text_key not in ("prompt", "completion"):
                self._reply(400, {"error": "?text= must be prompt or completion"})
                return
            try:
                n = int(self.headers.get("content-length", "0"))
                items = json.loads(self.rfile.read(n))["items"]
            except (ValueError, KeyError) as e:
                self._reply(400, {"error": f"expected {{\"items\": [...]}}: {e}"})
                return
            try:
                with lock:  # one model call at a time on the device
                    rewards = scorer.score(items, text_key)
            except Exception as e:  # a 5xx is retried by the trainer
                self._reply(500, {"error": repr(e)})
                return
            self._reply(200, {"rewards": rewards})

        def log_message(self, fmt, *args):
            sys.stderr.write("reward_server: " + fmt % args + "\n")

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--clip", default="openai/clip-vit-large-patch14",
                    help="CLIP model (HF id or folder); empty to disable /clip")
    ap.add_argument("--imagereward", default="",
                    help="ImageReward model name or checkpoint (e.g. ImageReward-v1.0); empty to disable")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    scorers = {}
    if args.clip:
        scorers["clip"] = Clip(args.clip, args.device)
    if args.imagereward:
        scorers["imagereward"] = ImageRewardScorer(args.imagereward, args.device)
    if not scorers:
        ap.error("enable at least one of --clip / --imagereward")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(scorers, threading.Lock()))
    print(f"reward_server: http://{args.host}:{args.port}/ endpoints {sorted(scorers)}", file=sys.stderr)
    server.serve_forever()


if __name__ == "__main__":
    main()
