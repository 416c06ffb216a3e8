//! Long videos and extensions (`POST /v1/videos/extensions`) against the tiny models: `tiny`
//! (Wan2.1 form: text only, cannot continue) and `tiny-ti2v` (Wan2.2 TI2V form: continues from
//! a last frame; 17-frame clips at 8 fps). Segments survive a SIGKILL of the server.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(300);

fn ok(r: Resp) -> Value {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_video_object(&v);
    v
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn mp4(dir: &Path, id: &str) -> PathBuf {
    dir.join("videos").join(id).join("video.mp4")
}

fn frames_of(dir: &Path, id: &str) -> usize {
    kino_media::read_video(&mp4(dir, id)).unwrap().len()
}

fn job_count(a: SocketAddr) -> usize {
    get(a, "/v1/videos?limit=100").json()["data"]
        .as_array()
        .unwrap()
        .len()
}

fn post_multipart(
    a: SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> Resp {
    let (ct, body) = multipart(fields, files);
    request(a, "POST", path, &[("Content-Type", &ct)], &body)
}

#[test]
fn long_create_and_extensions_by_id_upload_and_json_stitch_the_source_first() {
    let dir = tempfile::tempdir().unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();

    // 4 s at 8 fps = 33 frames: beyond the 17-frame clip, so two segments (17 + 16).
    let long = create(
        a,
        json!({"model": "tiny-ti2v", "prompt": "a red square", "seconds": "4", "steps": 2, "seed": 3}),
    );
    let id = id_of(&long);
    // Progress is 0→100 over both segments, never going back.
    let mut last_progress = 0;
    let t0 = Instant::now();
    loop {
        let v = get(a, &format!("/v1/videos/{id}")).json();
        let p = v["progress"].as_u64().unwrap();
        assert!(
            p >= last_progress,
            "progress never goes back: {p} < {last_progress}"
        );
        last_progress = p;
        if v["status"] == "completed" || v["status"] == "failed" {
            assert_eq!(v["status"], "completed", "{v}");
            break;
        }
        assert!(t0.elapsed() < T, "timed out: {v}");
        std::thread::sleep(Duration::from_millis(30));
    }
    let v = get(a, &format!("/v1/videos/{id}")).json();
    assert_eq!(v["seconds"], "4");
    assert_eq!(v["progress"], 100);
    assert_eq!(frames_of(dir.path(), &id), 33);
    assert!(
        !dir.path()
            .join("videos")
            .join(&id)
            .join("segments")
            .exists(),
        "the kept segments are removed once the video is stitched"
    );
    let meta = kino_media::read_metadata(mp4(dir.path(), &id))
        .unwrap()
        .unwrap();
    assert_eq!(meta["frames"], 33, "{meta}");
    assert_eq!(meta["segments"]["count"], 2, "{meta}");

    // Extend it by id (JSON): 2 s more = 16 new frames after its 33.
    let ext = ok(post_json(
        a,
        "/v1/videos/extensions",
        &json!({"prompt": "the square goes on", "seconds": "2", "video": {"id": id}, "steps": 2}),
    ));
    assert_eq!(ext["seconds"], "6", "the stitched total: {ext}");
    assert_eq!(
        ext["size"], long["size"],
        "an extension of our own video keeps its size"
    );
    assert_eq!(
        ext["model"], "tiny-ti2v",
        "the source's model, named: {ext}"
    );
    let ext_id = id_of(&ext);
    let done = wait_done(a, &ext_id, T);
    assert_eq!(done["status"], "completed", "{done}");
    let got = kino_media::read_video(&mp4(dir.path(), &ext_id)).unwrap();
    assert_eq!(got.len(), 33 + 16);
    // The source comes first (re-encoded, so close, not equal).
    let src = kino_media::read_video(&mp4(dir.path(), &id)).unwrap();
    let psnr = kino_media::psnr(&src.frames()[32], &got.frames()[32]).unwrap();
    assert!(
        psnr > 30.0,
        "frame 32 is the source's last frame: PSNR {psnr}"
    );
    let meta = kino_media::read_metadata(mp4(dir.path(), &ext_id))
        .unwrap()
        .unwrap();
    assert_eq!(meta["conditioning"]["kind"], "continuation", "{meta}");
    assert_eq!(meta["conditioning"]["source_video_id"], json!(id), "{meta}");

    // By id as the SDK sends it (multipart video[id]), and by upload (multipart file).
    let by_field = ok(post_multipart(
        a,
        "/v1/videos/extensions",
        &[
            ("prompt", "more"),
            ("seconds", "1"),
            ("video[id]", &id),
            ("steps", "1"),
            ("color_match", "true"),
        ],
        &[],
    ));
    assert_eq!(by_field["seconds"], "5");
    let bytes = std::fs::read(mp4(dir.path(), &id)).unwrap();
    let up = ok(post_multipart(
        a,
        "/v1/videos/extensions",
        &[
            ("prompt", "more"),
            ("seconds", "1"),
            ("model", "tiny-ti2v"),
            ("steps", "1"),
        ],
        &[("video", "clip.mp4", &bytes)],
    ));
    // An outside file's duration is its frames / fps: 33 / 8 + 1.
    assert_eq!(up["seconds"], "5.125", "{up}");
    for v in [&by_field, &up] {
        let d = wait_done(a, &id_of(v), T);
        assert_eq!(d["status"], "completed", "{d}");
        assert_eq!(frames_of(dir.path(), &id_of(v)), 33 + 8);
    }
    // `color_match` (as `kino extend --color-match`) is recorded with the segments.
    for (v, want) in [(&by_field, true), (&up, false)] {
        let meta = kino_media::read_metadata(mp4(dir.path(), &id_of(v)))
            .unwrap()
            .unwrap();
        assert_eq!(meta["segments"]["color_match"], want, "{meta}");
    }
}

/// A diffusion-forcing model (SkyReels-V2 DF, `fixtures/data/pipeline-df`: 21-frame windows at
/// 24 fps continuing from the last 5 frames) makes a long create in one call, in its own
/// windows, and extends a completed video from its last frames.
#[test]
fn a_diffusion_forcing_model_goes_long_and_extends_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.models = vec![kino_server::worker::ModelSpec {
        id: "tiny-df".into(),
        path: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/pipeline-df/model"),
    }];
    let srv = kino_server::ServerHandle::start(c).unwrap();
    let a = srv.addr();
    let long = create(
        a,
        json!({"model": "tiny-df", "prompt": "a red square", "seconds": "3", "steps": 2, "seed": 1}),
    );
    let id = id_of(&long);
    let v = wait_done(a, &id, T);
    assert_eq!(v["status"], "completed", "{v}");
    // 3 s at 24 fps: 73 frames (4k+1), beyond one 21-frame window.
    assert_eq!(frames_of(dir.path(), &id), 73);
    let r = post_json(
        a,
        "/v1/videos/extensions",
        &json!({"video": {"id": id}, "prompt": "it goes on", "seconds": "1", "steps": 2}),
    );
    let ext = ok(r);
    let eid = id_of(&ext);
    let v = wait_done(a, &eid, T);
    assert_eq!(v["status"], "completed", "{v}");
    // The source's 73 frames, then 24 new ones continuing from its last frames.
    assert_eq!(frames_of(dir.path(), &eid), 73 + 24);
    let meta = kino_media::read_metadata(mp4(dir.path(), &eid))
        .unwrap()
        .unwrap();
    assert_eq!(meta["conditioning"]["kind"], "continuation", "{meta}");
}

#[test]
fn progress_events_name_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();
    let v = create(
        a,
        json!({"model": "tiny-ti2v", "prompt": "a red square", "seconds": "4", "steps": 20}),
    );
    let id = id_of(&v);
    // The stream ends with the video; read it all.
    let sse = request(a, "GET", &format!("/v1/videos/{id}/events"), &[], b"");
    let text = String::from_utf8_lossy(&sse.body).to_string();
    let segs: std::collections::BTreeSet<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|d| d["segments"] == 2)
        .filter_map(|d| d["segment"].as_u64())
        .collect();
    assert_eq!(
        segs.into_iter().collect::<Vec<_>>(),
        vec![1, 2],
        "segment 1 of 2, then 2 of 2:\n{text}"
    );
    assert!(text.contains("event: completed"), "{text}");
}

#[test]
fn cancelling_between_or_within_segments_stops_and_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();
    let v = create(
        a,
        json!({"model": "tiny-ti2v", "prompt": "a red square", "seconds": "8", "steps": 40}),
    );
    let id = id_of(&v);
    let seg0 = dir
        .path()
        .join("videos")
        .join(&id)
        .join("segments/segment_000.rgb");
    let t0 = Instant::now();
    while !seg0.is_file() {
        assert!(t0.elapsed() < T, "the first segment never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = request(a, "POST", &format!("/v1/videos/{id}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = wait_done(a, &id, T);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "cancelled");
    assert!(!dir
        .path()
        .join("videos")
        .join(&id)
        .join("segments")
        .exists());
}

#[test]
fn bad_extensions_each_get_one_clear_error_and_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();
    let done = create(
        a,
        json!({"model": "tiny", "prompt": "x", "seconds": "1", "steps": 1}),
    );
    let done_id = id_of(&done);
    assert_eq!(wait_done(a, &done_id, T)["status"], "completed");
    // A long-running one, still in progress or queued when asked about.
    let busy = create(
        a,
        json!({"model": "tiny", "prompt": "x", "seconds": "1", "steps": 200}),
    );
    let busy_id = id_of(&busy);
    let before = job_count(a);
    let ext = |body: Value| post_json(a, "/v1/videos/extensions", &body);

    // A model that cannot continue: one error naming the served model that can.
    let e = ext(json!({"prompt": "p", "seconds": "2", "video": {"id": done_id}, "model": "tiny"}))
        .assert_error(400, Some("model"));
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("tiny-ti2v") && m.contains("`tiny`"), "{m}");
    // Without a model, the source's (tiny) cannot continue, and sora-2 is tiny too.
    let e = ext(json!({"prompt": "p", "seconds": "2", "video": {"id": done_id}}))
        .assert_error(400, Some("model"));
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tiny-ti2v"));
    // No video; an unknown id; a malformed id; one not finished.
    let e = ext(json!({"prompt": "p", "seconds": "2", "model": "tiny-ti2v"}))
        .assert_error(400, Some("video"));
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("video[id]"));
    ext(json!({"prompt": "p", "video": {"id": "video_0123456789abcdef"}, "model": "tiny-ti2v"}))
        .assert_error(404, Some("video"));
    ext(json!({"prompt": "p", "video": {"id": "nope"}, "model": "tiny-ti2v"}))
        .assert_error(400, Some("video"));
    let e = ext(json!({"prompt": "p", "video": {"id": busy_id}, "model": "tiny-ti2v"}))
        .assert_error(400, Some("video"));
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("completed"));
    // Bad seconds; no prompt.
    for s in ["0", "-1", "abc", "1000"] {
        ext(json!({"prompt": "p", "seconds": s, "video": {"id": done_id}, "model": "tiny-ti2v"}))
            .assert_error(400, Some("seconds"));
    }
    ext(json!({"seconds": "2", "video": {"id": done_id}, "model": "tiny-ti2v"}))
        .assert_error(400, Some("prompt"));
    ext(
        json!({"prompt": "p", "seconds": "2", "video": {"id": done_id}, "model": "tiny-ti2v",
               "color_match": "maybe"}),
    )
    .assert_error(400, Some("color_match"));
    // Uploads that are not readable videos.
    post_multipart(
        a,
        "/v1/videos/extensions",
        &[("prompt", "p"), ("model", "tiny-ti2v")],
        &[("video", "clip.mp4", b"\0\0\0\x18ftypisom garbage")],
    )
    .assert_error(400, Some("video"));
    let png = kino_media::encode_image(
        &kino_media::Frame::filled(8, 8, [1, 2, 3]).unwrap(),
        kino_media::ImageFormat::Png,
    )
    .unwrap();
    let e = post_multipart(
        a,
        "/v1/videos/extensions",
        &[("prompt", "p"), ("model", "tiny-ti2v")],
        &[("video", "still.png", &png)],
    )
    .assert_error(400, Some("video"));
    assert!(e["error"]["message"].as_str().unwrap().contains("image"));
    assert_eq!(job_count(a), before, "nothing was queued");
    let inputs = dir.path().join("inputs");
    let stored: Vec<_> = std::fs::read_dir(&inputs)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "no input stored: {stored:?}");
    let _ = delete(a, &format!("/v1/videos/{busy_id}"));
}

/// The text of a log without its colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts the `kino-server` binary on `dir` serving the tiny TI2V model (as `model`, which
/// sora-2 also means); its stderr lines go to `log`.
fn spawn_server(dir: &Path, log: Arc<Mutex<Vec<String>>>) -> (std::process::Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kino-server"))
        .args(["--port", "0", "--cpu", "--poll-after-ms", "50", "--model"])
        .arg(ti2v_model_dir())
        .arg("--data-dir")
        .arg(dir)
        .env("KINO_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("kino-server starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Lines before the banner (the worker may already run a job) go to the log too.
    let addr: SocketAddr = loop {
        let line = lines.next().expect("a banner line").expect("stderr");
        if let Some(rest) = line.strip_prefix("kino serve: http://") {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
        log.lock().unwrap().push(line);
    };
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            log.lock().unwrap().push(l);
        }
    });
    (child, addr)
}

#[test]
fn a_server_killed_mid_way_resumes_without_redoing_finished_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log1 = Arc::new(Mutex::new(Vec::new()));
    let (mut child, a) = spawn_server(dir.path(), log1.clone());
    // 8 s = 65 frames: 4 segments (17 + 16 + 16 + 16).
    let v = create(
        a,
        json!({"prompt": "a red square", "seconds": "8", "steps": 30, "seed": 7}),
    );
    let id = id_of(&v);
    let seg0 = dir
        .path()
        .join("videos")
        .join(&id)
        .join("segments/segment_000.rgb");
    let t0 = Instant::now();
    while !seg0.is_file() {
        assert!(t0.elapsed() < T, "the first segment never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let progress = {
        let store = kino_server::store::Store::open(&dir.path().join("kino.sqlite3")).unwrap();
        store.get(&id).unwrap().unwrap().progress
    };
    assert!(progress >= 23, "one segment of four was done: {progress}%");
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&seg0).unwrap();
    let (ino, mtime) = (
        before.ino(),
        before.mtime_nsec() + before.mtime() * 1_000_000_000,
    );

    let log2 = Arc::new(Mutex::new(Vec::new()));
    let (mut child, a) = spawn_server(dir.path(), log2.clone());
    // Until the video is stitched (which removes the folder), segment 1's file stays the same.
    let t0 = Instant::now();
    let done = loop {
        if let Ok(m) = std::fs::metadata(&seg0) {
            assert_eq!(
                (m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000),
                (ino, mtime),
                "segment 1 was not made again"
            );
        }
        let v = get(a, &format!("/v1/videos/{id}")).json();
        if v["status"] != "queued" && v["status"] != "in_progress" {
            break v;
        }
        assert!(t0.elapsed() < T, "timed out: {v}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(frames_of(dir.path(), &id), 65);
    child.kill().ok();
    child.wait().ok();
    let log2 = strip_ansi(&log2.lock().unwrap().join("\n"));
    assert!(
        log2.contains("resuming at segment 2 of 4") || log2.contains("resuming at segment 3 of 4"),
        "{log2}"
    );
    // The restarted server never finished segment 1 itself.
    assert!(
        !log2
            .lines()
            .any(|l| l.contains("segment finished") && l.contains("segment=1 ")),
        "{log2}"
    );
    assert!(log2.contains("segment=4 "), "{log2}");
}
