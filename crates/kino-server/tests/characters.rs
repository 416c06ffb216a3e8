//! Characters and masked edits on a VACE model (issue 13): tests/characters_sdk.py drives the
//! official `openai` SDK (pinned 3.57.0, from $KINO_PYTHON) against a server on the tiny VACE
//! folder `fixtures/data/pipeline-vace/model` (48×32, 9 frames, random weights); the Rust tests
//! here check what the SDK cannot send (multipart mask files, mask videos, bad ids) and that a
//! character survives a restart. Needs ffmpeg.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{get, multipart, post_json, request, wait_done};
use kino_engine::device::DeviceChoice;
use kino_server::{ModelSpec, ServerConfig, ServerHandle};
use serde_json::{json, Value};

fn vace_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/pipeline-vace/model")
}

fn vace_config(data_dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(
        "127.0.0.1:0",
        data_dir,
        vec![ModelSpec {
            id: "tiny-vace".into(),
            path: vace_model_dir(),
        }],
    );
    c.devices = vec![DeviceChoice::Cpu];
    c.poll_after_ms = 50;
    c
}

fn ffmpeg(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .arg(&out)
        .status()
        .expect("ffmpeg runs (install ffmpeg)");
    assert!(st.success(), "ffmpeg {args:?}");
    std::fs::read(out).unwrap()
}

/// A 2 s 96×64 clip (the model's 3:2) and masks for it.
struct Media {
    source: Vec<u8>,
    /// White right half.
    mask_png: Vec<u8>,
    black_png: Vec<u8>,
    square_png: Vec<u8>,
    /// 16 frames of a white 32×32 box moving right 4 px a frame.
    mask_mp4: Vec<u8>,
    /// 3 frames only.
    short_mask_mp4: Vec<u8>,
    subject_png: Vec<u8>,
}

fn media(dir: &Path) -> Media {
    Media {
        source: ffmpeg(
            dir,
            "source.mp4",
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=96x64:rate=8",
                "-frames:v",
                "16",
                "-pix_fmt",
                "yuv420p",
            ],
        ),
        mask_png: ffmpeg(
            dir,
            "mask.png",
            &[
                "-f",
                "lavfi",
                "-i",
                "color=black:size=96x64",
                "-vf",
                "drawbox=x=48:y=0:w=48:h=64:color=white:t=fill",
                "-frames:v",
                "1",
            ],
        ),
        black_png: ffmpeg(
            dir,
            "black.png",
            &[
                "-f",
                "lavfi",
                "-i",
                "color=black:size=96x64",
                "-frames:v",
                "1",
            ],
        ),
        square_png: ffmpeg(
            dir,
            "square.png",
            &[
                "-f",
                "lavfi",
                "-i",
                "color=white:size=64x64",
                "-frames:v",
                "1",
            ],
        ),
        mask_mp4: ffmpeg(
            dir,
            "mask.mp4",
            &[
                "-f",
                "lavfi",
                "-i",
                "color=black:size=96x64:rate=8",
                "-f",
                "lavfi",
                "-i",
                "color=white:size=32x32:rate=8",
                "-filter_complex",
                "[0][1]overlay=x='4*n':y=16",
                "-frames:v",
                "16",
                "-pix_fmt",
                "yuv420p",
            ],
        ),
        short_mask_mp4: ffmpeg(
            dir,
            "short.mp4",
            &[
                "-f",
                "lavfi",
                "-i",
                "color=white:size=96x64:rate=8",
                "-frames:v",
                "3",
                "-pix_fmt",
                "yuv420p",
            ],
        ),
        subject_png: ffmpeg(
            dir,
            "subject.png",
            &["-f", "lavfi", "-i", "testsrc2=size=60x40", "-frames:v", "1"],
        ),
    }
}

fn post_multipart(
    addr: std::net::SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> common::Resp {
    let (ctype, body) = multipart(fields, files);
    request(addr, "POST", path, &[("Content-Type", &ctype)], &body)
}

fn video_ids(addr: std::net::SocketAddr) -> Vec<String> {
    let v = get(addr, "/v1/videos?limit=100").json();
    let mut ids: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// The `conditioning` the MP4 of a completed video records.
fn recorded_conditioning(data_dir: &Path, id: &str) -> Value {
    let mp4 = data_dir.join("videos").join(id).join("video.mp4");
    let v = kino_media::read_metadata(&mp4)
        .expect("read the MP4 metadata")
        .expect("the MP4 has metadata");
    v.get("conditioning")
        .cloned()
        .unwrap_or_else(|| panic!("no conditioning in {v}"))
}

fn ffprobe_frames(bytes: &[u8], dir: &Path) -> (u64, u64, u64) {
    let p = dir.join("probe.mp4");
    std::fs::write(&p, bytes).unwrap();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,nb_read_frames",
            "-of",
            "json",
        ])
        .arg(&p)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let n = |k: &str| {
        s[k].as_u64()
            .or_else(|| s[k].as_str().and_then(|t| t.parse().ok()))
            .unwrap()
    };
    (n("width"), n("height"), n("nb_read_frames"))
}

#[test]
fn official_sdk_characters_and_masked_edit_then_restart() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "the Python package `openai` is not available for `{python}`: run `{python} -m pip install openai==3.57.0` (or set KINO_PYTHON to an interpreter that has it)"
        ),
    }
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let srv = ServerHandle::start(vace_config(dir.path())).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/characters_sdk.py");
    let run = Command::new(&python)
        .arg(&script)
        .env("KINO_BASE_URL", format!("http://{}/v1", srv.addr()))
        .env("KINO_OUT", out.path())
        .env("OPENAI_API_KEY", "kino-test")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        run.status.success(),
        "characters_sdk.py failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains("OK"), "{stdout}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("character.json")).unwrap()).unwrap();
    let id = saved["id"].as_str().unwrap().to_string();
    let png = get(srv.addr(), &format!("/v1/videos/characters/{id}/content"));
    assert_eq!(png.status, 200);
    assert!(png.body.starts_with(b"\x89PNG"), "the character is a PNG");
    // The create that used the character recorded it.
    let videos = get(srv.addr(), "/v1/videos?limit=100").json();
    let with_char = videos["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["prompt"] == "the test card, floating")
        .expect("the create with a character")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = recorded_conditioning(dir.path(), &with_char);
    assert_eq!(c["kind"], "references", "{c}");
    assert_eq!(c["characters"][0]["id"], id.as_str(), "{c}");
    srv.stop().unwrap();

    // A new server on the same data directory still has the character.
    let srv = ServerHandle::start(vace_config(dir.path())).unwrap();
    let r = get(srv.addr(), &format!("/v1/videos/characters/{id}"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["id"], saved["id"]);
    assert_eq!(v["name"], saved["name"]);
    assert_eq!(v["created_at"], saved["created_at"]);
    let again = get(srv.addr(), &format!("/v1/videos/characters/{id}/content"));
    assert_eq!(again.body, png.body, "the same image after the restart");
}

#[test]
fn mask_files_mask_videos_and_characters_in_edits_and_remixes() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let m = media(tmp.path());
    let srv = ServerHandle::start(vace_config(dir.path())).unwrap();
    let addr = srv.addr();

    // A character from an image (Kino extension: an image in `video`).
    let r = post_multipart(
        addr,
        "/v1/videos/characters",
        &[("name", "Bars")],
        &[("video", "subject.png", &m.subject_png)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ch = r.json();
    let cid = ch["id"].as_str().unwrap().to_string();
    assert!(cid.starts_with("char_"));
    assert_eq!(
        (ch["width"].as_u64(), ch["height"].as_u64()),
        (Some(60), Some(40))
    );
    assert!(ch["source_frame"].is_null(), "an image has no frame: {ch}");

    // A PNG mask as a multipart file, with the character: a masked edit with references.
    let r = post_multipart(
        addr,
        "/v1/videos/edits",
        &[
            ("prompt", "a ball"),
            ("seconds", "1"),
            ("steps", "2"),
            ("characters[]", &cid),
        ],
        &[
            ("video", "source.mp4", &m.source),
            ("mask", "mask.png", &m.mask_png),
        ],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let edit = r.json()["id"].as_str().unwrap().to_string();
    // A mask video (one mask per frame).
    let r = post_multipart(
        addr,
        "/v1/videos/edits",
        &[("prompt", "a moving box"), ("seconds", "1"), ("steps", "2")],
        &[
            ("video", "source.mp4", &m.source),
            ("mask", "mask.mp4", &m.mask_mp4),
        ],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let edit_v = r.json()["id"].as_str().unwrap().to_string();
    // No mask: the whole video regenerated, guided by the source.
    let r = post_multipart(
        addr,
        "/v1/videos/edits",
        &[("prompt", "restyled"), ("seconds", "1"), ("steps", "2")],
        &[("video", "source.mp4", &m.source)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let guided = r.json()["id"].as_str().unwrap().to_string();
    // A JSON create with characters (a JSON array).
    let r = post_json(
        addr,
        "/v1/videos",
        &json!({"prompt": "bars", "seconds": "1", "steps": 2, "characters": [cid]}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let created = r.json()["id"].as_str().unwrap().to_string();

    for (id, kind) in [
        (&edit, "masked edit with references"),
        (&edit_v, "masked edit"),
        (&guided, "edit"),
        (&created, "references"),
    ] {
        let v = wait_done(addr, id, Duration::from_secs(600));
        assert_eq!(v["status"], "completed", "{v}");
        let body = get(addr, &format!("/v1/videos/{id}/content")).body;
        assert_eq!(ffprobe_frames(&body, tmp.path()), (48, 32, 9), "{id}");
        let c = recorded_conditioning(dir.path(), id);
        assert_eq!(c["kind"], kind, "{c}");
        if kind.starts_with("masked") {
            assert!(c["mask"]["sha256"].is_string(), "{c}");
        }
    }

    // A remix keeps the characters.
    let r = post_json(
        addr,
        &format!("/v1/videos/{created}/remix"),
        &json!({"prompt": "bars again"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let remix = r.json()["id"].as_str().unwrap().to_string();
    let v = wait_done(addr, &remix, Duration::from_secs(600));
    assert_eq!(v["status"], "completed", "{v}");
    let c = recorded_conditioning(dir.path(), &remix);
    assert_eq!(c["kind"], "references", "{c}");
    assert_eq!(c["characters"][0]["id"], cid.as_str(), "{c}");
}

#[test]
fn bad_masks_and_characters_get_one_error_each_and_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let m = media(tmp.path());
    let srv = ServerHandle::start(vace_config(dir.path())).unwrap();
    let addr = srv.addr();
    let before = video_ids(addr);
    let edit = |mask: (&str, &[u8]), extra: &[(&str, &str)]| {
        let mut fields = vec![("prompt", "x"), ("seconds", "1")];
        fields.extend_from_slice(extra);
        post_multipart(
            addr,
            "/v1/videos/edits",
            &fields,
            &[("video", "source.mp4", &m.source), ("mask", mask.0, mask.1)],
        )
    };
    let cases: Vec<(&str, common::Resp, u16, &str, &str)> = vec![
        (
            "all-black mask",
            edit(("black.png", &m.black_png), &[]),
            400,
            "mask",
            "all black",
        ),
        (
            "wrong aspect",
            edit(("square.png", &m.square_png), &[]),
            400,
            "mask",
            "64x64",
        ),
        (
            "undecodable mask",
            edit(("mask.png", b"\x89PNG\r\n\x1a\nnot really"), &[]),
            400,
            "mask",
            "not a readable",
        ),
        (
            "short mask video",
            edit(("short.mp4", &m.short_mask_mp4), &[]),
            400,
            "mask",
            "the edit needs 9",
        ),
        (
            "strength on a VACE model",
            edit(("mask.png", &m.mask_png), &[("strength", "0.5")]),
            400,
            "strength",
            "VACE",
        ),
        (
            "unknown character",
            post_json(
                addr,
                "/v1/videos",
                &json!({"prompt": "x", "seconds": "1", "characters": ["char_00000000000000000000000000000abc"]}),
            ),
            404,
            "characters",
            "char_00000000000000000000000000000abc",
        ),
        (
            "malformed character id",
            post_json(
                addr,
                "/v1/videos",
                &json!({"prompt": "x", "seconds": "1", "characters": ["bob"]}),
            ),
            400,
            "characters",
            "bob",
        ),
        (
            "characters as a number",
            post_json(addr, "/v1/videos", &json!({"prompt": "x", "characters": 3})),
            400,
            "characters",
            "list of character ids",
        ),
        (
            "a mask on create",
            post_json(
                addr,
                "/v1/videos",
                &json!({"prompt": "x", "mask": "data:image/png;base64,AAAA"}),
            ),
            400,
            "mask",
            "/v1/videos/edits",
        ),
        (
            "characters on an extension",
            post_multipart(
                addr,
                "/v1/videos/extensions",
                &[("prompt", "x"), ("characters[]", "char_0123")],
                &[("video", "source.mp4", &m.source)],
            ),
            400,
            "characters",
            "extension",
        ),
        (
            "character without a video",
            post_multipart(addr, "/v1/videos/characters", &[("name", "nobody")], &[]),
            400,
            "video",
            "required",
        ),
        (
            "character without a name",
            post_multipart(
                addr,
                "/v1/videos/characters",
                &[],
                &[("video", "subject.png", &m.subject_png)],
            ),
            400,
            "name",
            "required",
        ),
        (
            "character from a flat video",
            post_multipart(
                addr,
                "/v1/videos/characters",
                &[("name", "flat")],
                &[("video", "short.mp4", &m.short_mask_mp4)],
            ),
            400,
            "video",
            "flat",
        ),
        (
            "unknown character read",
            get(addr, "/v1/videos/characters/char_0123"),
            404,
            "character_id",
            "char_0123",
        ),
    ];
    for (what, r, status, param, needle) in cases {
        let v = r.assert_error(status, Some(param));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: `{needle}` not in: {msg}");
        eprintln!("{what}: {msg}");
    }
    // Characters within one clip only (9 frames at 8 fps here).
    let ok = post_multipart(
        addr,
        "/v1/videos/characters",
        &[("name", "Bars")],
        &[("video", "subject.png", &m.subject_png)],
    );
    let cid = ok.json()["id"].as_str().unwrap().to_string();
    let r = post_json(
        addr,
        "/v1/videos",
        &json!({"prompt": "x", "seconds": "4", "characters": [cid]}),
    );
    let v = r.assert_error(400, Some("seconds"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("9 frames"),
        "{v}"
    );
    assert_eq!(video_ids(addr), before, "nothing was queued");
    let stored = std::fs::read_dir(dir.path().join("inputs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "no inputs were stored");
}

#[test]
fn masks_and_characters_on_a_model_that_is_not_vace_name_the_vace_models() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let m = media(tmp.path());
    // `tiny`: a plain Wan2.1 text-to-video model.
    let srv = ServerHandle::start(common::config(dir.path())).unwrap();
    let addr = srv.addr();
    let before = video_ids(addr);
    let r = post_multipart(
        addr,
        "/v1/videos/edits",
        &[("prompt", "x"), ("seconds", "1")],
        &[
            ("video", "source.mp4", &m.source),
            ("mask", "mask.png", &m.mask_png),
        ],
    );
    let v = r.assert_error(400, Some("mask"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("VACE") && msg.contains("wan2.1-vace-1.3b"),
        "{msg}"
    );
    // A character can be stored anywhere, but only a VACE model uses it.
    let r = post_multipart(
        addr,
        "/v1/videos/characters",
        &[("name", "Bars")],
        &[("video", "subject.png", &m.subject_png)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let cid = r.json()["id"].as_str().unwrap().to_string();
    let r = post_json(
        addr,
        "/v1/videos",
        &json!({"prompt": "x", "characters": [cid]}),
    );
    let v = r.assert_error(400, Some("characters"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("VACE") && msg.contains("wan2.1-vace-1.3b"),
        "{msg}"
    );
    assert_eq!(video_ids(addr), before, "nothing was queued");
    // Plain video-to-video still works there.
    let r = post_multipart(
        addr,
        "/v1/videos/edits",
        &[("prompt", "x"), ("seconds", "1"), ("steps", "2")],
        &[("video", "source.mp4", &m.source)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
