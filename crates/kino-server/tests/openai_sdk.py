"""The official `openai` Python package against a running `kino serve`.

Run by tests/openai_sdk.rs, which starts the server and sets KINO_BASE_URL
(http://127.0.0.1:PORT/v1). Needs the pinned SDK and ffprobe:

    pip install openai==3.57.0        # and: apt-get install ffmpeg

Exits non-zero (with a message) on the first failed check.
"""

import json
import os
import subprocess
import sys
import tempfile
import warnings

# The SDK marks the Sora methods deprecated; Kino keeps them alive.
warnings.filterwarnings("ignore", category=DeprecationWarning)

PIP_LINE = "pip install openai==3.57.0"
PINNED = "3.57.0"

try:
    import openai
except ImportError:
    sys.exit(f"the `openai` package is missing for {sys.executable}; install it with: {PIP_LINE}")

if openai.__version__ != PINNED:
    print(f"warning: openai {openai.__version__} is installed; the tests pin {PINNED} ({PIP_LINE})", file=sys.stderr)

BASE_URL = os.environ.get("KINO_BASE_URL", "http://127.0.0.1:8000/v1")
client = openai.OpenAI(base_url=BASE_URL, api_key=os.environ.get("OPENAI_API_KEY", "kino-test"), max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_error(cls, status, param, fn):
    try:
        fn()
    except cls as e:
        check(e.status_code == status, f"status {e.status_code} != {status}: {e}")
        if param is not None:
            check(e.param == param, f"param {e.param!r} != {param!r}: {e}")
        check(isinstance(e.body, dict) and e.body.get("message"), f"OpenAI error body: {e.body}")
        return e
    raise AssertionError(f"expected {cls.__name__} ({status})")


def ffprobe(path):
    try:
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", path],
            check=True, capture_output=True, text=True,
        ).stdout
    except FileNotFoundError:
        sys.exit("ffprobe is missing; install it (Debian: apt-get install ffmpeg)")
    return json.loads(out)


# Webhooks: the Rust side starts the server with a webhook to 127.0.0.1:$KINO_WEBHOOK_PORT and
# the secret $KINO_WEBHOOK_SECRET; we receive them here and check them with the SDK.
import http.server
import queue
import threading

hooks = queue.Queue()
WEBHOOK_PORT = os.environ.get("KINO_WEBHOOK_PORT")
if WEBHOOK_PORT:
    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hooks.put((dict(self.headers.items()), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook_server = http.server.HTTPServer(("127.0.0.1", int(WEBHOOK_PORT)), Hook)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()

# Kino's own knobs go through extra_body; few steps keep the tiny model fast.
FAST = {"steps": 2, "seed": 7}

# 1. create_and_poll with OpenAI's parameters (the SDK sends multipart/form-data).
video = client.videos.create_and_poll(
    model="sora-2", prompt="a corgi surfing at sunset", seconds="4", size="720x1280", extra_body=FAST
)
check(video.status == "completed", f"status {video.status}: {video.error}")
check(video.progress == 100, f"progress {video.progress}")
check(video.object == "video", video.object)
check(video.model == "sora-2", video.model)
check(video.seconds == "4", video.seconds)
check(video.prompt == "a corgi surfing at sunset", video.prompt)
check(isinstance(video.created_at, int) and isinstance(video.completed_at, int), "unix-second timestamps")
check(video.error is None, video.error)
w, h = (int(x) for x in video.size.split("x"))
check(h > w, f"portrait size {video.size}")
print("create_and_poll:", video.id, video.size)

if WEBHOOK_PORT:
    headers, body = hooks.get(timeout=30)
    client.webhooks.verify_signature(body, headers, secret=os.environ["KINO_WEBHOOK_SECRET"])
    event = json.loads(body)
    check(event["type"] == "video.completed" and event["data"]["id"] == video.id, event)
    print("webhook: video.completed, signature verified by the SDK")

# 2. retrieve
got = client.videos.retrieve(video.id)
check(got.id == video.id and got.status == "completed", got)

# 3. download_content, all three variants
with tempfile.TemporaryDirectory() as tmp:
    mp4 = os.path.join(tmp, "video.mp4")
    client.videos.download_content(video.id, variant="video").write_to_file(mp4)
    info = ffprobe(mp4)
    vs = [s for s in info["streams"] if s["codec_type"] == "video"]
    check(len(vs) == 1, info)
    s = vs[0]
    check(s["codec_name"] == "h264", s["codec_name"])
    check((s["width"], s["height"]) == (w, h), (s["width"], s["height"], video.size))
    check(s["pix_fmt"] == "yuv420p", s["pix_fmt"])
    check(int(s["nb_read_frames"]) == 33, f"4 s × 8 fps → 33 frames, got {s['nb_read_frames']}")
    dur = float(info["format"]["duration"])
    check(abs(dur - 4.0) < 0.5, f"duration {dur}")
    default = client.videos.download_content(video.id).read()
    check(default == open(mp4, "rb").read(), "no variant means the MP4")
    for variant in ("thumbnail", "spritesheet"):
        data = client.videos.download_content(video.id, variant=variant).read()
        check(data[:3] == b"\xff\xd8\xff", f"{variant} is a JPEG")
print("download_content: video, thumbnail, spritesheet")

# 4. list with paging
more = [client.videos.create(model="sora-2", prompt=f"clip {i}", seconds="1", extra_body=FAST) for i in range(4)]
for v in more:
    check(v.status in ("queued", "in_progress", "completed"), v.status)
    client.videos.poll(v.id)
page = client.videos.list(limit=2)
check(len(page.data) == 2 and page.has_more, f"first page: {len(page.data)} has_more={page.has_more}")
check(page.data[0].id == more[-1].id, "newest first")
ids = [v.id for v in client.videos.list(limit=2)]  # auto-paging follows after=last_id
check(len(ids) == 5 and len(set(ids)) == 5, ids)
check(set(ids) == {video.id, *(v.id for v in more)}, ids)
asc = [v.id for v in client.videos.list(limit=3, order="asc")]
check(asc == list(reversed(ids)), (asc, ids))
second = page.get_next_page()
check([v.id for v in second.data] == ids[2:4], "second page")
print("list: 5 videos in pages of 2")

# 5. remix
remix = client.videos.remix(video.id, prompt="a corgi surfing at night")
check(remix.remixed_from_video_id == video.id, remix)
check(remix.size == video.size and remix.seconds == video.seconds, remix)
remix = client.videos.poll(remix.id)
check(remix.status == "completed", remix)
check(remix.prompt == "a corgi surfing at night", remix.prompt)
print("remix:", remix.id)

# 6. delete
d = client.videos.delete(remix.id)
check(d.id == remix.id and d.deleted is True and d.object == "video.deleted", d)
expect_error(openai.NotFoundError, 404, None, lambda: client.videos.retrieve(remix.id))
print("delete")

# 7. errors
expect_error(openai.BadRequestError, 400, "size", lambda: client.videos.create(prompt="x", size="huge"))
expect_error(openai.BadRequestError, 400, "model", lambda: client.videos.create(prompt="x", model="sora-9000"))
expect_error(openai.BadRequestError, 400, "prompt", lambda: client.videos.create(prompt=""))
expect_error(openai.BadRequestError, 400, "prompt",
             lambda: client.post("/videos", cast_to=object, body={"model": "sora-2"}))
unknown = "video_0123456789abcdef0123456789abcdef"
expect_error(openai.NotFoundError, 404, None, lambda: client.videos.retrieve(unknown))
expect_error(openai.NotFoundError, 404, None, lambda: client.videos.download_content(unknown).read())
expect_error(openai.NotFoundError, 404, None, lambda: client.videos.delete(unknown))
expect_error(openai.NotFoundError, 404, None, lambda: client.videos.remix(unknown, prompt="y"))
print("errors: bad size, unknown model, missing prompt, unknown id")
# 8. image-to-video. The server also runs `tiny-ti2v` (the Wan2.2 TI2V form, which takes a
#    first image). An upload goes through the typed `input_reference`; SDK 3.57 refuses a dict
#    there, so OpenAI's {"image_url": data URL} form goes through extra_body (it arrives as the
#    multipart field input_reference[image_url]).
import base64
import struct
import zlib


def png(w, h):
    """A w×h RGB PNG (a red square on blue), standard library only."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(
        b"\x00" + b"".join(b"\xe6\x14\x14" if x < w // 2 and y < h // 2 else b"\x14\x14\xc8" for x in range(w))
        for y in range(h)
    )
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def check_mp4(video_id, size):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        client.videos.download_content(video_id).write_to_file(path)
        s = [s for s in ffprobe(path)["streams"] if s["codec_type"] == "video"][0]
        check(f"{s['width']}x{s['height']}" == size, (s["width"], s["height"], size))
        check(s["codec_name"] == "h264", s["codec_name"])


start = png(100, 200)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "start.png")
    with open(path, "wb") as f:
        f.write(start)
    with open(path, "rb") as f:
        i2v = client.videos.create_and_poll(model="tiny-ti2v", prompt="a red square", seconds="1",
                                            input_reference=f, extra_body=FAST)
check(i2v.status == "completed", f"image upload: {i2v.status} {i2v.error}")
check(i2v.size == "96x224", f"no size: the image's aspect ratio, got {i2v.size}")
check_mp4(i2v.id, i2v.size)
print("create from an image upload:", i2v.id, i2v.size)

url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
i2v_url = client.videos.create_and_poll(model="tiny-ti2v", prompt="a red square", seconds="1", size="1280x720",
                                        input_reference=openai.omit,
                                        extra_body={**FAST, "input_reference": {"image_url": url}})
check(i2v_url.status == "completed", f"data URL: {i2v_url.status} {i2v_url.error}")
check_mp4(i2v_url.id, i2v_url.size)
print("create from a data URL:", i2v_url.id, i2v_url.size)

# A tuple upload (name, bytes, type) works too; errors come back as the SDK's exceptions.
e = expect_error(openai.BadRequestError, 400, "input_reference",
                 lambda: client.videos.create(model="sora-2", prompt="x", input_reference=("a.png", start, "image/png")))
check("tiny-ti2v" in e.body["message"], e.body)
e = expect_error(openai.BadRequestError, 400, "input_reference",
                 lambda: client.videos.create(model="tiny-ti2v", prompt="x", input_reference=openai.omit,
                                              extra_body={"input_reference": {"file_id": "file-123"}}))
check("Files API" in e.body["message"], e.body)
expect_error(openai.BadRequestError, 400, "input_reference",
             lambda: client.videos.create(model="tiny-ti2v", prompt="x", input_reference=("a.png", b"not a png", "image/png")))
print("input_reference errors: a text-only model, file_id, a broken image")

# 9. video-to-video: edit a completed video by id (SDK 3.57 refuses the {"id": …} dict in its
#    typed `video`, so it goes through extra_body and arrives as video[id]) and by upload.
edited = client.videos.edit(prompt="a corgi surfing at night", video=openai.omit,
                            extra_body={"video": {"id": video.id}, "strength": 0.5, "steps": 2})
check(edited.status in ("queued", "in_progress"), edited.status)
check(edited.size == video.size and edited.seconds == video.seconds, (edited.size, edited.seconds))
edited = client.videos.poll(edited.id)
check(edited.status == "completed", f"edit by id: {edited.status} {edited.error}")
check(edited.prompt == "a corgi surfing at night", edited.prompt)
check_mp4(edited.id, video.size)
print("edit by id:", edited.id)

source = client.videos.download_content(i2v_url.id).read()
up = client.videos.edit(prompt="a blue square", video=("clip.mp4", source, "video/mp4"),
                        extra_body={"steps": 2, "seed": 1})
up = client.videos.poll(up.id)
check(up.status == "completed", f"edit by upload: {up.status} {up.error}")
check(up.seconds == "1", up.seconds)
print("edit by upload:", up.id, up.size)

expect_error(openai.BadRequestError, 400, "strength",
             lambda: client.videos.edit(prompt="x", video=openai.omit, extra_body={"video": {"id": video.id}, "strength": 1.5}))
expect_error(openai.NotFoundError, 404, "video",
             lambda: client.videos.edit(prompt="x", video=openai.omit, extra_body={"video": {"id": unknown}}))
expect_error(openai.BadRequestError, 400, "video",
             lambda: client.videos.edit(prompt="x", video=("still.png", start, "image/png")))
print("edit errors: strength, unknown id, an image as the video")

# 10. extensions: continue a completed video by id (extra_body, arriving as video[id]) and by
#     upload. `seconds` is the new part; the result's `seconds` is the stitched total, and its
#     MP4 is the source's frames followed by the new ones (8 fps: 2 s = 16 frames, one more
#     17-frame segment of the tiny TI2V model; 4 s = two segments).
def frame_count(video_id):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        client.videos.download_content(video_id).write_to_file(path)
        s = [s for s in ffprobe(path)["streams"] if s["codec_type"] == "video"][0]
        return int(s["nb_read_frames"])


source_frames = frame_count(i2v_url.id)
ext = client.videos.extend(prompt="the red square drifts right", seconds="4", video=openai.omit,
                           extra_body={"video": {"id": i2v_url.id}, "steps": 2})
check(ext.status in ("queued", "in_progress"), ext.status)
check(ext.seconds == "5", f"1 s + 4 s, got {ext.seconds}")
check(ext.size == i2v_url.size, (ext.size, i2v_url.size))
ext = client.videos.poll(ext.id)
check(ext.status == "completed", f"extend by id: {ext.status} {ext.error}")
check(ext.progress == 100, ext.progress)
check(frame_count(ext.id) == source_frames + 32, (frame_count(ext.id), source_frames))
check_mp4(ext.id, i2v_url.size)
print("extend by id:", ext.id, ext.seconds)

ext_up = client.videos.extend(prompt="and on", seconds="2", video=("clip.mp4", source, "video/mp4"),
                              extra_body={"model": "tiny-ti2v", "steps": 2})
ext_up = client.videos.poll(ext_up.id)
check(ext_up.status == "completed", f"extend by upload: {ext_up.status} {ext_up.error}")
check(frame_count(ext_up.id) == source_frames + 16, frame_count(ext_up.id))
print("extend by upload:", ext_up.id, ext_up.seconds)

e = expect_error(openai.BadRequestError, 400, "model",
                 lambda: client.videos.extend(prompt="x", seconds="4", video=("clip.mp4", source, "video/mp4")))
check("tiny-ti2v" in e.body["message"], e.body)
expect_error(openai.NotFoundError, 404, "video",
             lambda: client.videos.extend(prompt="x", seconds="4", video=openai.omit, extra_body={"video": {"id": unknown}}))
expect_error(openai.BadRequestError, 400, "seconds",
             lambda: client.videos.extend(prompt="x", seconds="-4", video=openai.omit, extra_body={"video": {"id": i2v_url.id}}))
print("extend errors: a model that cannot continue, unknown id, bad seconds")
print("openai", openai.__version__, "OK")
