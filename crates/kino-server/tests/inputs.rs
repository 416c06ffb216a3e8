//! Image-to-video (`input_reference`, `last_image`) and video-to-video (`POST /v1/videos/edits`)
//! against the tiny models: `tiny` (Wan2.1 form: text, video) and `tiny-ti2v` (Wan2.2 TI2V form:
//! text, first image, video).

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::*;
use kino_media::{Frame, ImageFormat};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);

/// A PNG of `w × h`: a red square on blue.
fn png(w: u32, h: u32) -> Vec<u8> {
    let f = Frame::from_fn(w, h, |x, y| {
        if x < w / 2 && y < h / 2 {
            [230, 20, 20]
        } else {
            [20, 20, 200]
        }
    })
    .unwrap();
    kino_media::encode_image(&f, ImageFormat::Png).unwrap()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let f = Frame::filled(w, h, [40, 200, 40]).unwrap();
    kino_media::encode_image(&f, ImageFormat::Jpeg { quality: 90 }).unwrap()
}

fn sha256(b: &[u8]) -> String {
    kino_server::inputs::sha256_hex(b)
}

fn data_url(b: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b)
    )
}

fn post_multipart(
    a: std::net::SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> Resp {
    let (ct, body) = multipart(fields, files);
    request(a, "POST", path, &[("Content-Type", &ct)], &body)
}

fn ok(r: Resp) -> Value {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_video_object(&v);
    v
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn meta(dir: &Path, id: &str) -> Value {
    kino_media::read_metadata(dir.join("videos").join(id).join("video.mp4"))
        .unwrap()
        .expect("metadata")
}

fn input_files(dir: &Path, id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("inputs").join(id))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn job_count(a: std::net::SocketAddr) -> usize {
    get(a, "/v1/videos?limit=100").json()["data"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn image_to_video_from_an_upload_a_data_url_and_a_multipart_data_url() {
    let dir = tempfile::tempdir().unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();

    // The model list says what each model takes.
    let models = get(a, "/v1/models").json();
    let caps: Vec<(String, Value)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("capabilities").is_some())
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["capabilities"].clone(),
            )
        })
        .collect();
    assert_eq!(caps.len(), 2, "{models}");
    assert_eq!(caps[0].1["image"], false);
    assert_eq!(caps[1].1["image"], true);

    // 1. A multipart upload; without a size the video keeps the image's aspect ratio (1:2 at
    //    the model's 192×128 budget, sides multiples of 32).
    let img = png(100, 200);
    let v = ok(post_multipart(
        a,
        "/v1/videos",
        &[
            ("prompt", "a red square"),
            ("model", "tiny-ti2v"),
            ("seconds", "1"),
            ("steps", "2"),
        ],
        &[("input_reference", "start.png", &img)],
    ));
    assert_eq!(v["size"], "96x224");
    let up = id_of(&v);
    assert_eq!(input_files(dir.path(), &up), ["image.png"]);

    // 2. JSON with OpenAI's {"image_url": data URL}, and a size.
    let img2 = png(64, 64);
    let v = ok(post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "a red square", "model": "tiny-ti2v", "seconds": 1, "steps": 2,
                "size": "1280x720", "input_reference": {"image_url": data_url(&img2)}}),
    ));
    assert_eq!(v["size"], "224x128");
    let du = id_of(&v);

    // 3. Multipart text fields: the SDK's `input_reference[image_url]`, and a bare data URL; a
    //    JPEG.
    let img3 = jpeg(50, 40);
    let url3 = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&img3)
    );
    let v = ok(post_multipart(
        a,
        "/v1/videos",
        &[
            ("prompt", "green"),
            ("model", "tiny-ti2v"),
            ("seconds", "1"),
            ("steps", "1"),
            ("input_reference[image_url]", &url3),
        ],
        &[],
    ));
    let md = id_of(&v);
    let v = ok(post_multipart(
        a,
        "/v1/videos",
        &[
            ("prompt", "green"),
            ("model", "tiny-ti2v"),
            ("seconds", "1"),
            ("steps", "1"),
            ("input_reference", &url3),
        ],
        &[],
    ));
    let bare = id_of(&v);

    for (id, name, bytes, file) in [
        (&up, "start.png", &img, "image.png"),
        (&du, "data URL", &img2, "image.png"),
        (&md, "data URL", &img3, "image.jpg"),
        (&bare, "data URL", &img3, "image.jpg"),
    ] {
        let done = wait_done(a, id, T);
        assert_eq!(done["status"], "completed", "{done}");
        let m = meta(dir.path(), id);
        let c = &m["conditioning"];
        assert_eq!(c["kind"], "image", "{m}");
        assert_eq!(c["image"]["name"], name, "{m}");
        assert_eq!(c["image"]["sha256"], sha256(bytes).as_str(), "{m}");
        assert!(c["image"]["fitted"].is_string(), "{m}");
        assert_eq!(m["model"], "tiny-ti2v");
        assert_eq!(input_files(dir.path(), id), [file]);
    }

    // A remix starts from the same image.
    let rm = ok(post_json(
        a,
        &format!("/v1/videos/{up}/remix"),
        &json!({"prompt": "a blue square"}),
    ));
    let rid = id_of(&rm);
    assert_eq!(wait_done(a, &rid, T)["status"], "completed");
    assert_eq!(
        meta(dir.path(), &rid)["conditioning"]["image"]["sha256"],
        sha256(&img).as_str()
    );

    // Deleting a video deletes its inputs.
    assert_eq!(
        delete(a, &format!("/v1/videos/{up}")).json()["deleted"],
        true
    );
    assert!(!dir.path().join("inputs").join(&up).exists());
    assert!(dir.path().join("inputs").join(&rid).exists());
}

#[test]
fn video_to_video_edits_from_an_id_a_multipart_id_and_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path());
    let a = srv.addr();
    let src = create(
        a,
        json!({"prompt": "a corgi", "seconds": "2", "steps": 2, "seed": 3}),
    );
    let src_id = id_of(&src);
    assert_eq!(wait_done(a, &src_id, T)["status"], "completed");
    let mp4 = std::fs::read(dir.path().join("videos").join(&src_id).join("video.mp4")).unwrap();

    // JSON {"video": {"id": …}} with Kino's strength.
    let e1 = ok(post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "a corgi at night", "video": {"id": src_id}, "strength": 0.5, "steps": 2}),
    ));
    assert_eq!(e1["size"], src["size"], "same size as the source");
    assert_eq!(e1["seconds"], "2", "as long as the source");
    // Multipart `video[id]`, as the openai SDK sends extra_body={"video": {"id": …}}.
    let e2 = ok(post_multipart(
        a,
        "/v1/videos/edits",
        &[
            ("prompt", "a corgi in snow"),
            ("video[id]", &src_id),
            ("steps", "2"),
        ],
        &[],
    ));
    // An uploaded file, shorter than the source.
    let e3 = ok(post_multipart(
        a,
        "/v1/videos/edits",
        &[
            ("prompt", "a corgi in rain"),
            ("seconds", "1"),
            ("steps", "2"),
        ],
        &[("video", "clip.mp4", &mp4)],
    ));
    assert_eq!(e3["seconds"], "1");

    for (v, name, strength) in [
        (&e1, src_id.as_str(), 0.5),
        (&e2, src_id.as_str(), 0.7),
        (&e3, "clip.mp4", 0.7),
    ] {
        let id = id_of(v);
        let done = wait_done(a, &id, T);
        assert_eq!(done["status"], "completed", "{done}");
        let m = meta(dir.path(), &id);
        let c = &m["conditioning"];
        assert_eq!(c["kind"], "video", "{m}");
        assert_eq!(c["video"]["name"], name, "{m}");
        assert_eq!(c["video"]["sha256"], sha256(&mp4).as_str(), "{m}");
        assert_eq!(c["strength"], strength, "{m}");
        assert_eq!(c["video"]["fps"], 8.0, "{m}");
        assert_eq!(input_files(dir.path(), &id), ["video.mp4"]);
    }
    let m1 = meta(dir.path(), &id_of(&e1));
    assert_eq!(m1["conditioning"]["source_video_id"], src_id.as_str());
    assert_eq!(m1["frames"], 17);
    assert_eq!(meta(dir.path(), &id_of(&e3))["frames"], 9);

    // The edit keeps its own copy: deleting the source does not break a later remix of it.
    delete(a, &format!("/v1/videos/{src_id}"));
    let rm = ok(post_json(
        a,
        &format!("/v1/videos/{}/remix", id_of(&e1)),
        &json!({"prompt": "again"}),
    ));
    assert_eq!(wait_done(a, &id_of(&rm), T)["status"], "completed");
}

#[test]
fn bad_inputs_get_one_clear_error_and_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config_two(dir.path());
    c.max_image_bytes = 4000;
    c.max_video_bytes = 200_000;
    let srv = kino_server::ServerHandle::start(c).unwrap();
    let a = srv.addr();
    let img = png(32, 32);
    let msg = |v: &Value| v["error"]["message"].as_str().unwrap().to_string();

    // A model that cannot take an image names the ones that can.
    let e = post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny")],
        &[("input_reference", "a.png", &img)],
    )
    .assert_error(400, Some("input_reference"));
    assert!(msg(&e).contains("tiny-ti2v"), "{e}");
    // sora-2 is the first model (tiny) here.
    post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "input_reference": {"image_url": data_url(&img)}}),
    )
    .assert_error(400, Some("input_reference"));
    // No Files API.
    let e = post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "model": "tiny-ti2v", "input_reference": {"file_id": "file-abc"}}),
    )
    .assert_error(400, Some("input_reference"));
    assert!(
        msg(&e).contains("Files API") && msg(&e).contains("data:"),
        "{e}"
    );
    let e = post_multipart(
        a,
        "/v1/videos",
        &[
            ("prompt", "x"),
            ("model", "tiny-ti2v"),
            ("input_reference[file_id]", "file-abc"),
        ],
        &[],
    )
    .assert_error(400, Some("input_reference"));
    assert!(msg(&e).contains("Files API"), "{e}");
    // Remote URLs are not fetched.
    let e = post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "model": "tiny-ti2v", "input_reference": {"image_url": "https://example.com/a.png"}}),
    )
    .assert_error(400, Some("input_reference"));
    assert!(msg(&e).contains("URL"), "{e}");
    // Malformed data URLs, broken images, a GIF, a video.
    for bad in [
        "data:image/png;base64,@@@@",
        "data:image/png,rawtext",
        "data:image/png;base64",
    ] {
        post_json(
            a,
            "/v1/videos",
            &json!({"prompt": "x", "model": "tiny-ti2v", "input_reference": {"image_url": bad}}),
        )
        .assert_error(400, Some("input_reference"));
    }
    let e = post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[("input_reference", "broken.png", &img[..img.len() / 2])],
    )
    .assert_error(400, Some("input_reference"));
    assert_eq!(e["error"]["code"], "invalid_image");
    assert!(msg(&e).contains("broken.png"), "{e}");
    post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[(
            "input_reference",
            "a.gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        )],
    )
    .assert_error(400, Some("input_reference"));
    let fake_mp4 = b"\0\0\0\x18ftypisom\0\0\0\0isomavc1\0\0\0\x08free";
    let e = post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[("input_reference", "clip.mp4", fake_mp4)],
    )
    .assert_error(400, Some("input_reference"));
    assert!(msg(&e).contains("/v1/videos/edits"), "{e}");
    // last_image: no served model takes one; and it needs a first image.
    let e = post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[
            ("input_reference", "a.png", &img),
            ("last_image", "b.png", &img),
        ],
    )
    .assert_error(400, Some("last_image"));
    assert!(msg(&e).contains("none of the models"), "{e}");
    post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[("last_image", "b.png", &img)],
    )
    .assert_error(400, Some("last_image"));
    // Over the image limit: an upload and a data URL.
    let noise = Frame::from_fn(64, 64, |x, y| {
        let v = (x * 7919 + y * 104_729) ^ (x * y * 31);
        [(v % 251) as u8, (v % 241) as u8, (v % 239) as u8]
    })
    .unwrap();
    let big = kino_media::encode_image(&noise, ImageFormat::Png).unwrap();
    assert!(big.len() > 4000);
    post_multipart(
        a,
        "/v1/videos",
        &[("prompt", "x"), ("model", "tiny-ti2v")],
        &[("input_reference", "big.png", &big)],
    )
    .assert_error(413, None);
    post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "model": "tiny-ti2v", "input_reference": {"image_url": data_url(&big)}}),
    )
    .assert_error(413, None);

    // Edits.
    let src = create(a, json!({"prompt": "src", "seconds": "1", "steps": 1}));
    let src_id = id_of(&src);
    assert_eq!(wait_done(a, &src_id, T)["status"], "completed");
    let mp4 = std::fs::read(dir.path().join("videos").join(&src_id).join("video.mp4")).unwrap();
    let e =
        post_json(a, "/v1/videos/edits", &json!({"prompt": "x"})).assert_error(400, Some("video"));
    assert!(msg(&e).contains("video[id]"), "{e}");
    post_json(a, "/v1/videos/edits", &json!({"video": {"id": src_id}}))
        .assert_error(400, Some("prompt"));
    let unknown = "video_0123456789abcdef0123456789abcdef";
    post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "x", "video": {"id": unknown}}),
    )
    .assert_error(404, Some("video"));
    post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "x", "video": {"id": "../kino.sqlite3"}}),
    )
    .assert_error(400, Some("video"));
    let e = post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "x", "video": {"id": src_id}, "strength": 0.3, "steps": 2}),
    )
    .assert_error(400, Some("strength"));
    assert!(msg(&e).contains("no denoising step"), "{e}");
    for s in [json!(0), json!(1.5), json!(-0.2), json!("abc")] {
        post_json(
            a,
            "/v1/videos/edits",
            &json!({"prompt": "x", "video": {"id": src_id}, "strength": s}),
        )
        .assert_error(400, Some("strength"));
    }
    let e = post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "x", "video": {"id": src_id}, "seconds": 8}),
    )
    .assert_error(400, Some("video"));
    assert_eq!(e["error"]["code"], "video_too_short");
    assert!(msg(&e).contains("s long"), "{e}");
    let e = post_multipart(
        a,
        "/v1/videos/edits",
        &[("prompt", "x")],
        &[("video", "still.png", &img)],
    )
    .assert_error(400, Some("video"));
    assert!(msg(&e).contains("input_reference"), "{e}");
    post_multipart(
        a,
        "/v1/videos/edits",
        &[("prompt", "x")],
        &[("video", "broken.mp4", &mp4[..200])],
    )
    .assert_error(400, Some("video"));
    post_multipart(
        a,
        "/v1/videos/edits",
        &[("prompt", "x")],
        &[("video", "big.mp4", &vec![0u8; 200_001])],
    )
    .assert_error(413, None);
    // A video that is not completed yet.
    let slow = create(a, json!({"prompt": "slow", "seconds": "8", "steps": 200}));
    let e = post_json(
        a,
        "/v1/videos/edits",
        &json!({"prompt": "x", "video": {"id": id_of(&slow)}}),
    )
    .assert_error(400, Some("video"));
    assert_eq!(e["error"]["code"], "video_not_ready");
    delete(a, &format!("/v1/videos/{}", id_of(&slow)));

    // Nothing was queued and no input was stored.
    assert_eq!(job_count(a), 1, "only the source video");
    assert!(kino_server::inputs::stored_ids(dir.path()).is_empty());
}

#[test]
fn inputs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = png(40, 40);
    let (slow, queued) = {
        let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
        let a = srv.addr();
        let slow = create(a, json!({"prompt": "slow", "seconds": "8", "steps": 200}));
        wait_until(a, &id_of(&slow), T, |v| v["status"] == "in_progress");
        let v = ok(post_multipart(
            a,
            "/v1/videos",
            &[
                ("prompt", "p"),
                ("model", "tiny-ti2v"),
                ("seconds", "1"),
                ("steps", "1"),
            ],
            &[("input_reference", "keep.png", &img)],
        ));
        assert_eq!(v["status"], "queued");
        srv.stop().unwrap();
        (id_of(&slow), id_of(&v))
    };
    // A stray inputs folder with no job (a crash between storing and queueing) is removed.
    let stray = "video_00000000000000000000000000000abc";
    std::fs::create_dir_all(dir.path().join("inputs").join(stray)).unwrap();
    let srv = kino_server::ServerHandle::start(config_two(dir.path())).unwrap();
    let a = srv.addr();
    assert!(!dir.path().join("inputs").join(stray).exists());
    delete(a, &format!("/v1/videos/{slow}"));
    let done = wait_done(a, &queued, T);
    assert_eq!(done["status"], "completed", "{done}");
    let m = meta(dir.path(), &queued);
    assert_eq!(m["conditioning"]["image"]["name"], "keep.png");
    assert_eq!(m["conditioning"]["image"]["sha256"], sha256(&img).as_str());
}
