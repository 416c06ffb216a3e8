"""The official `openai` package sends Kino's adapter extension (run by tests/adapters.rs).

KINO_BASE_URL: the server (started with --lora-dir holding `peft.safetensors`).
Prints the finished video object as JSON on the last line.
"""

import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import openai  # noqa: E402

client = openai.OpenAI(base_url=os.environ["KINO_BASE_URL"], api_key="kino-test", max_retries=0, timeout=120)

# An unknown adapter: one 400 naming the parameter and what is available.
try:
    client.videos.create(prompt="a red square", seconds="1", extra_body={"lora": ["nope"]})
    sys.exit("an unknown adapter was accepted")
except openai.BadRequestError as e:
    if e.param != "lora" or "peft" not in str(e):
        sys.exit(f"unexpected error for an unknown adapter: {e}")

v = client.videos.create(
    prompt="a red square", seconds="1", extra_body={"lora": ["peft:0.5"], "seed": 7}
)
deadline = time.time() + 300
while v.status in ("queued", "in_progress"):
    if time.time() > deadline:
        sys.exit(f"video {v.id} still {v.status}")
    time.sleep(0.1)
    v = client.videos.retrieve(v.id)
if v.status != "completed":
    sys.exit(f"video {v.id} {v.status}: {v.error}")
print(json.dumps(v.model_dump()))
