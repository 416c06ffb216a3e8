"""Provenance through the official `openai` SDK against `kino serve` (run by tests/provenance.rs):
a finished video is signed (C2PA detected, trusted by the server's own root) and watermarked; an
ffmpeg re-encode loses the manifest but keeps the watermark; the thumbnail is signed too; a
prompt the operator's policy blocks is refused with its reason. Needs openai==3.57.0 and ffmpeg.
"""

import os
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import openai  # noqa: E402

client = openai.OpenAI(base_url=os.environ["KINO_BASE_URL"], api_key="kino-test", max_retries=0, timeout=300)
BLOCKED = os.environ["KINO_BLOCKED_TERM"]
REASON = os.environ["KINO_BLOCKED_REASON"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def results(path):
    with open(path, "rb") as f:
        r = client.content_provenance_checks.create(file=f)
    check(r.object == "content_provenance_check", r)
    by_type = {x.type: x for x in r.results}
    check(set(by_type) == {"c2pa", "kino_watermark"}, r.results)
    return by_type["c2pa"], by_type["kino_watermark"]


tmp = tempfile.mkdtemp()
video = client.videos.create_and_poll(model="sora-2", prompt="a red ball bouncing", seconds="1")
check(video.status == "completed", video)
mp4 = os.path.join(tmp, "kino.mp4")
client.videos.download_content(video.id).write_to_file(mp4)

c2pa, wm = results(mp4)
print("kino video:", c2pa, wm)
check(c2pa.outcome == "detected", c2pa)
check(c2pa.validation_state == "trusted", c2pa)
check(c2pa.issuer, c2pa)
check(c2pa.model == os.environ["KINO_MODEL_ID"], c2pa)
check(c2pa.generated_at and c2pa.generated_at.endswith("Z"), c2pa)
check(wm.outcome == "detected", wm)
wm_id = wm.model_extra["id"]
check(isinstance(wm_id, str) and len(wm_id) == 12, wm)

# An ffmpeg re-encode (H.264, CRF 23): the manifest is gone, the watermark stays.
re = os.path.join(tmp, "reencoded.mp4")
subprocess.run(
    ["ffmpeg", "-v", "error", "-y", "-i", mp4, "-c:v", "libx264", "-crf", "23", "-pix_fmt", "yuv420p", re],
    check=True,
)
c2pa, wm = results(re)
print("ffmpeg re-encode:", c2pa, wm)
check(c2pa.outcome == "not_detected", c2pa)
check(c2pa.validation_state == "not_present", c2pa)
check(wm.outcome == "detected", wm)
check(wm.model_extra["id"] == wm_id, (wm, wm_id))

# The thumbnail is signed as derived from the video.
thumb = os.path.join(tmp, "thumb.jpg")
client.videos.download_content(video.id, variant="thumbnail").write_to_file(thumb)
c2pa, _ = results(thumb)
print("thumbnail:", c2pa)
check(c2pa.outcome == "detected" and c2pa.validation_state == "trusted", c2pa)

# A blocked prompt: 400 with the policy's reason.
try:
    client.videos.create(model="sora-2", prompt=f"a video of {BLOCKED} dancing")
    raise AssertionError("the blocked prompt was accepted")
except openai.BadRequestError as e:
    print("blocked:", e.status_code, e.code, e.message)
    check(e.code == "moderation_blocked", e)
    check(e.param == "prompt", e)
    check(REASON in e.message, e.message)

# Not a media file.
try:
    client.content_provenance_checks.create(file=("notes.txt", b"hello", "text/plain"))
    raise AssertionError("a text file was accepted")
except openai.BadRequestError as e:
    check(e.param == "file", e)

print("OK")
