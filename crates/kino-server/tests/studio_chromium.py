"""Drives the web studio in headless Chromium over the DevTools protocol (through
--remote-debugging-pipe, so only the standard library is needed): type a prompt, submit, watch
the queue's progress, see the video play, delete it; then drop an image (image-to-video) and
the result's MP4 (video-to-video) on the form and see each result play; extend the
image-to-video result from its card and see the longer video play; start a long video (two
segments) and see "segment k of n" and the time left in the queue, then cancel it.

Run by tests/studio.rs with KINO_STUDIO_URL and KINO_CHROMIUM set. Exits non-zero on failure.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

URL = os.environ["KINO_STUDIO_URL"]
CHROMIUM = os.environ.get("KINO_CHROMIUM", "chromium")

# The test itself runs inside the page; it resolves to a summary or throws.
DRIVE = r"""
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (f, what, ms = 90000) => {
    const t = Date.now();
    for (;;) {
      const v = f();
      if (v) return v;
      if (Date.now() - t > ms) throw new Error("timed out waiting for " + what);
      await sleep(25);
    }
  };
  await until(() => document.querySelector("#model option"), "the model list");
  window.confirm = () => true;
  document.querySelector("#prompt").value = "a corgi surfing at sunset";
  document.querySelector("#seconds").value = "4";
  document.querySelector("#steps").value = "200";
  document.querySelector("#size").value = "1280x720";
  document.querySelector("#create button[type=submit]").click();
  const progress = [];
  const video = await until(() => {
    const j = document.querySelector("#queue .job");
    if (j) {
      const m = j.textContent.match(/(\d+)%/);
      if (m && progress[progress.length - 1] !== +m[1]) progress.push(+m[1]);
    }
    const v = document.querySelector("#gallery .card video");
    return v && v.readyState >= 2 && v.videoWidth > 0 && v;
  }, "the finished video in the gallery");
  await video.play();
  await until(() => video.currentTime > 0.2, "the video to play");
  const summary = {
    progress,
    width: video.videoWidth,
    height: video.videoHeight,
    duration: video.duration,
    playedTo: video.currentTime,
    prompt: document.querySelector("#gallery .card .prompt").textContent,
  };
  const del = [...document.querySelectorAll("#gallery .card button")].find((b) => b.textContent === "Delete");
  del.click();
  await until(() => document.querySelector("#gallery .empty"), "the gallery to be empty");
  const list = await (await fetch("/v1/videos")).json();
  summary.left = list.data.length;

  // Image-to-video: drop a PNG (drawn on a canvas) on the form.
  const failIfError = () => {
    const e = document.querySelector("#err").textContent;
    if (e) throw new Error("the studio shows an error: " + e);
  };
  const drop = (file) => {
    const dt = new DataTransfer();
    dt.items.add(file);
    document.querySelector("#drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  };
  const canvas = document.createElement("canvas");
  canvas.width = 100; canvas.height = 200;
  const g = canvas.getContext("2d");
  g.fillStyle = "#1414c8"; g.fillRect(0, 0, 100, 200);
  g.fillStyle = "#e61414"; g.fillRect(0, 0, 50, 100);
  const png = await new Promise((r) => canvas.toBlob(r, "image/png"));
  drop(new File([png], "start.png", { type: "image/png" }));
  await until(() => document.querySelector("#drop-preview img"), "the dropped image's preview");
  summary.modelForImage = document.querySelector("#model").value;
  document.querySelector("#prompt").value = "a red square";
  document.querySelector("#size").value = "";
  document.querySelector("#seconds").value = "1";
  document.querySelector("#steps").value = "2";
  document.querySelector("#create button[type=submit]").click();
  const playing = async (n, what) => {
    const v = await until(() => {
      failIfError();
      const vs = document.querySelectorAll("#gallery .card video");
      const v = vs.length === n && vs[0];
      return v && v.readyState >= 2 && v.videoWidth > 0 && v;
    }, what);
    await v.play();
    await until(() => v.currentTime > 0.1, what + " to play");
    const newest = (await (await fetch("/v1/videos")).json()).data[0];
    return { width: v.videoWidth, height: v.videoHeight, playedTo: v.currentTime, model: newest.model, size: newest.size, id: newest.id, status: newest.status };
  };
  summary.image = await playing(1, "the image-to-video result");
  // Provenance: the finished card gets a badge from /v1/content_provenance_checks.
  const badgeOf = () => document.querySelector('#gallery .card[data-id="' + summary.image.id + '"] .badge');
  await until(badgeOf, "the provenance badge");
  summary.image.badge = badgeOf().textContent;

  // Video-to-video: drop that result's MP4.
  const mp4 = await (await fetch("/v1/videos/" + summary.image.id + "/content")).blob();
  drop(new File([mp4], "clip.mp4", { type: "video/mp4" }));
  await until(() => document.querySelector("#drop-preview video"), "the dropped video's preview");
  summary.strengthShown = getComputedStyle(document.querySelector("#strength-box")).display !== "none";
  document.querySelector("#prompt").value = "a blue square";
  document.querySelector("#create button[type=submit]").click();
  summary.edit = await playing(2, "the video-to-video result");

  // Extend the image-to-video result by 2 s from its card: the whole, longer video plays.
  const card = () => document.querySelector('#gallery .card[data-id="' + summary.image.id + '"]');
  [...card().querySelectorAll(".actions button")].find((b) => b.textContent === "Extend").click();
  await until(() => getComputedStyle(card().querySelector(".extend")).display !== "none", "the extend form");
  card().querySelector(".extend input.p").value = "the red square drifts right";
  card().querySelector(".extend input.s").value = "2";
  card().querySelector(".extend button.go").click();
  summary.extended = await playing(3, "the extended video");
  const ext = (await (await fetch("/v1/videos/" + summary.extended.id)).json());
  summary.extended.seconds = ext.seconds;
  summary.extended.duration = document.querySelectorAll("#gallery .card video")[0].duration;
  summary.image.duration = card().querySelector("video").duration;

  // A long video (4 s of 17-frame clips: 2 segments) shows "segment k of n" and the time left
  // in the queue while it runs; then it is cancelled.
  document.querySelector("#clear-file").click();
  document.querySelector("#model").value = "tiny-ti2v";
  document.querySelector("#prompt").value = "a red square moving right";
  document.querySelector("#seconds").value = "4";
  document.querySelector("#steps").value = "200";
  document.querySelector("#create button[type=submit]").click();
  const seen = [];
  await until(() => {
    failIfError();
    const j = document.querySelector("#queue .job .live");
    const t = j ? j.textContent : "";
    if (t && seen[seen.length - 1] !== t) seen.push(t);
    return /segment 2 of 2/.test(t) && /left/.test(t);
  }, "segment 2 of 2 and the time left in the queue", 180000);
  summary.live = seen;
  [...document.querySelectorAll("#queue .job button")].find((b) => b.textContent === "Cancel").click();
  await until(() => document.querySelector("#queue .empty"), "the long video to be cancelled");
  return summary;
})()
"""

# KINO_STUDIO_DRIVE=adapters (a server with --lora-dir): pick an adapter and a step cache in the
# form, generate, and read the gallery card.
DRIVE_ADAPTERS = r"""
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (f, what, ms = 90000) => {
    const t = Date.now();
    for (;;) {
      const v = f();
      if (v) return v;
      if (Date.now() - t > ms) throw new Error("timed out waiting for " + what);
      await sleep(25);
    }
  };
  await until(() => document.querySelector("#lora option"), "the adapter list");
  const options = Array.from(document.querySelectorAll("#lora option")).map((o) => o.value);
  const boxShown = getComputedStyle(document.querySelector("#lora-box")).display !== "none";
  document.querySelector("#lora option[value=peft]").selected = true;
  document.querySelector("#cache").value = "first-block:0.9";
  document.querySelector("#prompt").value = "a red square";
  document.querySelector("#seconds").value = "1";
  document.querySelector("#create button[type=submit]").click();
  const video = await until(() => {
    const v = document.querySelector("#gallery .card video");
    return v && v.readyState >= 2 && v.videoWidth > 0 && v;
  }, "the finished video in the gallery");
  const params = document.querySelector("#gallery .card .params").textContent;
  // A preset none of the adapters names: the server's 400 shows under the form.
  document.querySelector("#preset").value = "turbo";
  document.querySelector("#create button[type=submit]").click();
  const presetError = await until(() => {
    const t = document.querySelector("#err").textContent;
    return t.includes("preset") && t;
  }, "the preset error");
  return { options, boxShown, params, width: video.videoWidth, presetError };
})()
"""
ADAPTERS = os.environ.get("KINO_STUDIO_DRIVE") == "adapters"


class Cdp:
    def __init__(self):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds():
            # Chromium reads commands on fd 3 and writes replies on fd 4. Copy first, so that
            # dup2 never gets the same fd twice (that would keep it close-on-exec).
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.profile = tempfile.TemporaryDirectory()
        try:
            self.proc = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                 "--autoplay-policy=no-user-gesture-required", "--user-data-dir=" + self.profile.name,
                 "about:blank"],
                preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            sys.exit(f"`{CHROMIUM}` is not installed; install Chromium (Debian: apt-get install chromium) or set KINO_CHROMIUM")
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id = 0
        self.buf = b""

    def call(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


cdp = Cdp()
try:
    target = cdp.call("Target.createTarget", {"url": URL})["targetId"]
    session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    # Wait for the page to load before running the test in it.
    loaded = "location.href.startsWith('http') && document.readyState === 'complete' && !!document.querySelector('#create')"
    for _ in range(400):
        try:
            r = cdp.call("Runtime.evaluate", {"expression": loaded, "returnByValue": True}, session)
        except RuntimeError:
            r = {"result": {}}  # the context changed while navigating; ask again
        if r["result"].get("value") is True:
            break
        time.sleep(0.05)
    else:
        sys.exit(f"the studio page {URL} did not load")
    drive = DRIVE_ADAPTERS if ADAPTERS else DRIVE
    r = cdp.call("Runtime.evaluate", {"expression": drive, "awaitPromise": True, "returnByValue": True}, session)
    if "exceptionDetails" in r:
        d = r["exceptionDetails"]
        sys.exit("studio test failed in the page: " + str(d.get("exception", {}).get("description", d)))
    s = r["result"]["value"]
    print(json.dumps(s))
    if ADAPTERS:
        assert s["options"] == ["peft", "wan"] and s["boxShown"], f"the adapters from GET /v1/models: {s}"
        assert "adapters peft" in s["params"], f"the card names the adapter: {s}"
        assert "cache first-block:0.9 (skipped " in s["params"], f"the card shows the cache and its count: {s}"
        assert "no preset `turbo`" in s["presetError"], f"the preset field is sent and its error shown: {s}"
        print("studio adapters OK")
        sys.exit(0)
    assert s["prompt"] == "a corgi surfing at sunset", s
    assert s["width"] > s["height"] > 0, s
    assert s["playedTo"] > 0.2, s
    assert s["progress"], f"the queue never showed progress: {s}"
    assert s["progress"] == sorted(s["progress"]), f"progress went backwards: {s}"
    assert s["left"] == 0, f"the video was not deleted: {s}"
    assert s["modelForImage"] == "tiny-ti2v", f"an image picks a model that takes one: {s}"
    im = s["image"]
    assert im["status"] == "completed" and im["model"] == "tiny-ti2v", s
    assert im["size"] == "96x224" and (im["width"], im["height"]) == (96, 224), f"the image's 1:2 shape: {s}"
    assert im["playedTo"] > 0.1, s
    assert im["badge"] == "\u2713 verified", f"a signed video shows the verified badge: {s}"
    assert s["strengthShown"], f"a dropped video shows the strength: {s}"
    ed = s["edit"]
    assert ed["status"] == "completed" and ed["id"] != im["id"] and ed["playedTo"] > 0.1, s
    ex = s["extended"]
    assert ex["status"] == "completed" and ex["model"] == "tiny-ti2v" and ex["size"] == im["size"], s
    assert ex["seconds"] == "3", f"1 s + 2 s: {s}"
    assert ex["duration"] > im["duration"] + 1.5 and ex["playedTo"] > 0.1, f"the long video plays: {s}"
    lv = s["live"]
    assert any("segment 2 of 2" in t for t in lv), f"the queue names the segment: {s}"
    assert any("left" in t for t in lv), f"the queue shows the time left: {s}"
    print("studio OK")
finally:
    cdp.close()
