"""The official `openai` Python package against `kino serve` running a VACE model: characters
and masked edits.

Run by tests/characters.rs, which starts the server on the tiny VACE model
(fixtures/data/pipeline-vace/model: 48x32, 9 frames at 8 fps) and sets KINO_BASE_URL and
KINO_OUT (a folder where this script leaves `character.json` for the restart check). Needs the
pinned SDK and ffmpeg/ffprobe:

    pip install openai==3.57.0        # and: apt-get install ffmpeg

Exits non-zero (with a message) on the first failed check.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import warnings

# The SDK marks the Sora methods deprecated; Kino keeps them alive.
warnings.filterwarnings("ignore", category=DeprecationWarning)

PIP_LINE = "pip install openai==3.57.0"

try:
    import openai
except ImportError:
    sys.exit(f"the `openai` package is missing for {sys.executable}; install it with: {PIP_LINE}")

BASE_URL = os.environ.get("KINO_BASE_URL", "http://127.0.0.1:8000/v1")
OUT = os.environ.get("KINO_OUT") or tempfile.mkdtemp()
client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("OPENAI_API_KEY", "kino-test"), max_retries=0, timeout=300)

# Kino's own knobs go through extra_body; few steps keep the tiny model fast.
FAST = {"steps": 2, "seed": 7}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def run(*args):
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit(f"{args[0]} is missing; install ffmpeg (Debian: apt-get install ffmpeg)")


def ffprobe(path):
    return json.loads(run("ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", path))


def ffmpeg(*args):
    run("ffmpeg", "-v", "error", "-y", *args)


def expect_error(cls, status, param, code, fn):
    try:
        fn()
    except cls as e:
        check(e.status_code == status, f"status {e.status_code} != {status}: {e}")
        check(e.param == param, f"param {e.param!r} != {param!r}: {e}")
        check(e.code == code, f"code {e.code!r} != {code!r}: {e}")
        check(isinstance(e.body, dict) and e.body.get("message"), f"OpenAI error body: {e.body}")
        return e.body["message"]
    raise AssertionError(f"expected {cls.__name__} ({status}, {code})")


def all_ids():
    return sorted(v.id for v in client.videos.list(limit=100).data)


def check_mp4(path, frames, size):
    info = ffprobe(path)
    vs = [s for s in info["streams"] if s["codec_type"] == "video"]
    check(len(vs) == 1, info)
    s = vs[0]
    check(s["codec_name"] == "h264", s["codec_name"])
    check((s["width"], s["height"]) == size, (s["width"], s["height"], size))
    check(int(s["nb_read_frames"]) == frames, f"{frames} frames expected, got {s['nb_read_frames']}")


def data_url(path, mime):
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


tmp = tempfile.mkdtemp()
# A 12-frame clip in which only frame 7 is sharp (the rest box-blurred): the character is
# the clearest frame, so it must be frame 7.
clip = os.path.join(tmp, "subject.mp4")
ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=8", "-frames:v", "12",
       "-vf", "boxblur=4:2:enable='not(eq(n,7))'", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "10", clip)
# The video to edit (2 s, 96x64: the model's 3:2) and masks for it.
source = os.path.join(tmp, "source.mp4")
ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=8", "-frames:v", "16", "-pix_fmt", "yuv420p", source)
mask = os.path.join(tmp, "mask.png")  # white right half = regenerate
ffmpeg("-f", "lavfi", "-i", "color=black:size=96x64", "-vf", "drawbox=x=48:y=0:w=48:h=64:color=white:t=fill",
       "-frames:v", "1", mask)
black = os.path.join(tmp, "black.png")
ffmpeg("-f", "lavfi", "-i", "color=black:size=96x64", "-frames:v", "1", black)
square = os.path.join(tmp, "square.png")
ffmpeg("-f", "lavfi", "-i", "color=white:size=64x64", "-frames:v", "1", square)

# 1. create_character from an uploaded video.
with open(clip, "rb") as f:
    char = client.videos.create_character(name="Test card", video=f)
check(isinstance(char.id, str) and char.id.startswith("char_"), char)
check(char.name == "Test card", char.name)
check(isinstance(char.created_at, int) and char.created_at > 1_600_000_000, char.created_at)
extra = char.model_extra or {}
check(extra.get("source_frame") == 7, f"the clearest frame is 7 (the only sharp one): {extra}")
check((extra.get("width"), extra.get("height")) == (96, 64), extra)
print("create_character:", char.id, "frame", extra.get("source_frame"))

# 2. get_character reads it back.
got = client.videos.get_character(char.id)
check((got.id, got.name, got.created_at) == (char.id, char.name, char.created_at), got)
print("get_character:", got.id, got.name)
with open(os.path.join(OUT, "character.json"), "w") as f:
    json.dump({"id": char.id, "name": char.name, "created_at": char.created_at}, f)

# 3. A create that uses it (the extension field through extra_body; the SDK sends multipart,
# so the list arrives as characters[] fields).
video = client.videos.create_and_poll(
    prompt="the test card, floating", seconds="1", extra_body={"characters": [char.id], **FAST}
)
check(video.status == "completed", f"status {video.status}: {video.error}")
out = os.path.join(tmp, "with_character.mp4")
client.videos.download_content(video.id).write_to_file(out)
check_mp4(out, 9, (48, 32))
meta = json.loads(run("ffprobe", "-v", "error", "-show_entries", "format_tags", "-of", "json", out))
print("create with characters:", video.id, video.size)

# 4. edit with a mask (Kino extension, a data URL through extra_body; the SDK uploads `video`).
with open(source, "rb") as f:
    edit = client.videos.edit(prompt="a red ball on the right", video=f,
                              extra_body={"mask": data_url(mask, "image/png"), "seconds": "1", **FAST})
check(edit.status in ("queued", "in_progress", "completed"), edit.status)
edit = client.videos.poll(edit.id)
check(edit.status == "completed", f"status {edit.status}: {edit.error}")
out = os.path.join(tmp, "edited.mp4")
client.videos.download_content(edit.id).write_to_file(out)
check_mp4(out, 9, (48, 32))
print("edit with a mask:", edit.id, edit.size)

# 5. Bad inputs: one clear error each, and nothing queued.
before = all_ids()


def edit_with(mask_path):
    with open(source, "rb") as f:
        return client.videos.edit(prompt="x", video=f, extra_body={"mask": data_url(mask_path, "image/png"), "seconds": "1"})


msg = expect_error(openai.BadRequestError, 400, "mask", "empty_mask", lambda: edit_with(black))
check("all black" in msg, msg)
msg = expect_error(openai.BadRequestError, 400, "mask", "mask_size_mismatch", lambda: edit_with(square))
check("64x64" in msg and "96x64" in msg, msg)
missing = "char_" + "0" * 32
msg = expect_error(openai.NotFoundError, 404, "characters", "character_not_found",
                   lambda: client.videos.create(prompt="x", seconds="1", extra_body={"characters": [missing]}))
check(missing in msg, msg)
expect_error(openai.NotFoundError, 404, "character_id", "character_not_found", lambda: client.videos.get_character(missing))
after = all_ids()
check(after == before, f"nothing queued by the bad requests: {before} -> {after}")
print("bad mask / bad size / unknown character: one error each, job list unchanged")

print("OK")
