#!/usr/bin/env python3
"""The official `openai` Python client against `mmada-infer serve`: models, chat, streaming
chat, completions, image generation, and two errors. Prints a transcript.

    python scripts/openai_client_check.py http://127.0.0.1:8000/v1 [API_KEY] [MODEL]
"""
import base64, io, sys, time

import openai
from openai import OpenAI

base, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "none")
client = OpenAI(base_url=base, api_key=key)
print(f"openai {openai.__version__} -> {base}")
models = client.models.list()
model = sys.argv[3] if len(sys.argv) > 3 else models.data[0].id
print("models:", [m.id for m in models.data])
extra = {"gen_length": 32, "block_length": 16, "steps": 16}

t = time.time()
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                   extra_body=extra)
print(f"chat ({time.time() - t:.2f} s): {r.choices[0].message.content!r} finish={r.choices[0].finish_reason} "
      f"usage={r.usage.prompt_tokens}+{r.usage.completion_tokens}")

t, parts = time.time(), []
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                        stream=True, stream_options={"include_usage": True}, extra_body=extra)
chunks = 0
for c in stream:
    chunks += 1
    if c.choices and c.choices[0].delta.content:
        parts.append(c.choices[0].delta.content)
    if c.usage:
        print(f"  usage chunk: {c.usage.total_tokens} tokens")
print(f"streamed chat ({time.time() - t:.2f} s, {chunks} chunks, deltas {parts!r}): {''.join(parts)!r}")
print("  equals the non-streamed answer:", "".join(parts) == r.choices[0].message.content)

r = client.completions.create(model=model, prompt="2 + 3 =", max_tokens=8, extra_body={"block_length": 8})
print(f"completion: {r.choices[0].text!r} finish={r.choices[0].finish_reason}")

t = time.time()
try:
    img = client.images.generate(model=model, prompt="a red apple on a table", n=1, size="256x256",
                                 response_format="b64_json", extra_body={"timesteps": 8})
    png = base64.b64decode(img.data[0].b64_json)
    print(f"image ({time.time() - t:.2f} s): {len(png)} bytes of PNG, header {png[:8]!r}")
except openai.BadRequestError as e:
    print("image: 400", e.body)

for what, call in [
    ("unknown model", lambda: client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])),
    ("bad settings", lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                            extra_body={"steps": 3, "gen_length": 32, "block_length": 16})),
]:
    try:
        call()
        print(what, ": no error?!")
    except openai.APIStatusError as e:
        print(f"{what}: HTTP {e.status_code} {type(e).__name__}: {e.body}")
try:
    OpenAI(base_url=base, api_key="wrong").models.list()
    print("wrong key: accepted (server has no --api-key)")
except openai.AuthenticationError as e:
    print(f"wrong key: HTTP {e.status_code} {e.body}")
