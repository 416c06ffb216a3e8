//! LoRA adapters (`--lora-dir`, `"lora"`) and step caches (`"cache"`) as request extensions:
//! real generations on the tiny fixture models, metadata read back from the MP4.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use kino_engine::device::DeviceChoice;
use kino_server::{ModelSpec, ServerConfig, ServerHandle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(300);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

/// A server on one fixture model (`id`), optionally with an adapter directory.
fn server(data: &Path, id: &str, model: PathBuf, lora_dir: Option<&Path>) -> ServerHandle {
    let mut c = ServerConfig::new(
        "127.0.0.1:0",
        data,
        vec![ModelSpec {
            id: id.into(),
            path: model,
        }],
    );
    c.devices = vec![DeviceChoice::Cpu];
    c.poll_after_ms = 50;
    c.lora_dir = lora_dir.map(Path::to_path_buf);
    ServerHandle::start(c).expect("server starts")
}

/// A temp directory holding copies of the fixture adapters (and a file that is not one).
fn lora_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["peft.safetensors", "wan.safetensors"] {
        std::fs::copy(fixtures().join("pipeline-lora").join(f), d.path().join(f)).unwrap();
    }
    std::fs::write(d.path().join("notes.txt"), "not an adapter").unwrap();
    d
}

fn video_count(a: std::net::SocketAddr) -> usize {
    let r = get(a, "/v1/videos?limit=100");
    assert_eq!(r.status, 200);
    r.json()["data"].as_array().map_or(0, Vec::len)
}

fn mp4(data: &Path, id: &str) -> PathBuf {
    data.join("videos").join(id).join("video.mp4")
}

fn frames(path: &Path) -> Vec<Vec<u8>> {
    kino_media::read_video(path)
        .unwrap()
        .into_frames()
        .into_iter()
        .map(kino_media::Frame::into_data)
        .collect()
}

fn sha256(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn completed(a: std::net::SocketAddr, v: &Value) -> Value {
    let id = v["id"].as_str().unwrap();
    let done = wait_done(a, id, T);
    assert_eq!(done["status"], "completed", "{done}");
    done
}

#[test]
fn adapters_listed_applied_recorded_and_kept_by_remix() {
    let data = tempfile::tempdir().unwrap();
    let loras = lora_dir();
    let model = fixtures().join("pipeline-lora/model");
    let srv = server(data.path(), "tiny-lora", model, Some(loras.path()));
    let a = srv.addr();

    // GET /v1/models lists the adapters (not the .txt).
    let m = get(a, "/v1/models").json();
    let ids: Vec<&str> = m["adapters"]
        .as_array()
        .expect("adapters listed")
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, ["peft", "wan"], "{m}");

    let base = completed(
        a,
        &create(
            a,
            json!({"prompt": "a red square", "seconds": "1", "seed": 3}),
        ),
    );
    assert!(
        base.get("lora").is_none(),
        "no extension fields unused: {base}"
    );
    let v = create(
        a,
        json!({"prompt": "a red square", "seconds": "1", "seed": 3,
               "lora": ["peft", "wan.safetensors:0.8"]}),
    );
    assert_eq!(v["lora"][0]["name"], "peft", "{v}");
    assert_eq!(v["lora"][1]["scale"], 0.8, "{v}");
    let done = completed(a, &v);
    let id = done["id"].as_str().unwrap();
    let path = mp4(data.path(), id);
    let meta = kino_media::read_metadata(&path).unwrap().expect("metadata");
    let adapters = meta["lora"]["adapters"].as_array().expect("lora metadata");
    assert_eq!(adapters.len(), 2, "{meta}");
    assert_eq!(adapters[0]["file"], "peft.safetensors");
    assert_eq!(adapters[0]["scale"], 1.0);
    assert_eq!(adapters[0]["expert"], "transformer");
    assert_eq!(
        adapters[0]["sha256"],
        sha256(&loras.path().join("peft.safetensors"))
    );
    assert_eq!(adapters[1]["file"], "wan.safetensors");
    assert_eq!(adapters[1]["scale"], 0.8);
    assert_eq!(meta["lora"]["fused"], false);
    // Same seed and prompt: the adapters changed the pixels.
    let base_frames = frames(&mp4(data.path(), base["id"].as_str().unwrap()));
    let lora_frames = frames(&path);
    assert_eq!(base_frames.len(), lora_frames.len());
    assert_ne!(base_frames, lora_frames, "the adapters changed nothing");

    // Multipart: repeated lora[] fields.
    let (ct, body) = multipart(
        &[
            ("prompt", "a blue circle"),
            ("seconds", "1"),
            ("lora[]", "wan:0.5"),
        ],
        &[],
    );
    let r = request(a, "POST", "/v1/videos", &[("Content-Type", &ct)], &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mv = r.json();
    assert_eq!(
        mv["lora"],
        json!([{"name": "wan", "file": "wan.safetensors", "scale": 0.5}])
    );

    // A remix keeps the adapters.
    let r = post_json(
        a,
        &format!("/v1/videos/{id}/remix"),
        &json!({"prompt": "a green square"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rv = r.json();
    assert_eq!(rv["lora"], done["lora"]);
    completed(a, &mv);
    let rdone = completed(a, &rv);
    let rmeta = kino_media::read_metadata(mp4(data.path(), rdone["id"].as_str().unwrap()))
        .unwrap()
        .unwrap();
    assert_eq!(rmeta["lora"]["adapters"], meta["lora"]["adapters"]);
}

#[test]
fn bad_adapter_names_and_cache_strings_queue_nothing() {
    let data = tempfile::tempdir().unwrap();
    let loras = lora_dir();
    let model = fixtures().join("pipeline-lora/model");
    let srv = server(data.path(), "tiny-lora", model.clone(), Some(loras.path()));
    let a = srv.addr();
    // One finished video, so a remix can be tried.
    let done = completed(a, &create(a, json!({"prompt": "x", "seconds": "1"})));
    let before = video_count(a);
    for (lora, why) in [
        (json!(["../x"]), "adapter name"),
        (json!(["/etc/passwd"]), "adapter name"),
        (json!(["sub/peft"]), "adapter name"),
        (json!(["..\\peft"]), "adapter name"),
        (json!(["notes.txt"]), "no adapter"),
        (json!(["missing"]), "no adapter"),
        (json!(["peft:inf"]), "finite"),
        (json!("peft, nope"), "no adapter"),
        (json!([1]), "list of adapter names"),
    ] {
        let r = post_json(
            a,
            "/v1/videos",
            &json!({"prompt": "x", "seconds": "1", "lora": lora}),
        );
        let e = r.assert_error(400, Some("lora"));
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{lora}: {msg}");
        if why != "list of adapter names" && why != "finite" {
            assert!(msg.contains("peft, wan"), "names what is available: {msg}");
        }
    }
    // Multipart, one comma-separated field.
    let (ct, body) = multipart(&[("prompt", "x"), ("lora", "peft,../../etc/passwd")], &[]);
    let r = request(a, "POST", "/v1/videos", &[("Content-Type", &ct)], &body);
    r.assert_error(400, Some("lora"));
    // Edits and extensions take the same field.
    for path in ["/v1/videos/edits", "/v1/videos/extensions"] {
        let r = post_json(
            a,
            path,
            &json!({"prompt": "x", "video": {"id": done["id"]}, "lora": ["../peft"]}),
        );
        assert_eq!(
            r.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Bad caches: the engine's message.
    for (cache, param) in [
        (json!("warp:3"), "cache"),
        (json!("first-block:-1"), "cache"),
        (json!("mag:0.1"), "cache"),
        (json!(5), "cache"),
    ] {
        let r = post_json(a, "/v1/videos", &json!({"prompt": "x", "cache": cache}));
        let e = r.assert_error(400, Some(param));
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("first-block") || msg.contains("mag"),
            "{cache}: {msg}"
        );
    }
    let r = post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "cache": "first-block:0.1", "mag_ratios": [1.0]}),
    );
    r.assert_error(400, Some("mag_ratios"));
    let r = post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "mag_ratios": ["a"]}),
    );
    r.assert_error(400, Some("mag_ratios"));
    assert_eq!(video_count(a), before, "nothing queued on a 400");
    srv.stop().unwrap();

    // Without --lora-dir: how to enable it.
    let data2 = tempfile::tempdir().unwrap();
    let srv = server(data2.path(), "tiny-lora", model, None);
    let a = srv.addr();
    let r = post_json(a, "/v1/videos", &json!({"prompt": "x", "lora": ["peft"]}));
    let e = r.assert_error(400, Some("lora"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--lora-dir"),
        "{e}"
    );
    assert_eq!(get(a, "/v1/models").json()["adapters"], json!([]));
    assert_eq!(video_count(a), 0);
}

#[test]
fn step_cache_skips_forwards_and_reports_them() {
    let data = tempfile::tempdir().unwrap();
    let model = fixtures().join("pipeline-cache/model");
    // (The fixture's thresholds skip on its own inputs; with a prompt through the tiny text
    // encoder these settings skip some but not all forwards.)
    let ratios_file = fixtures().join("pipeline-cache/mag_ratios.json");
    let ratios: Value =
        serde_json::from_str(&std::fs::read_to_string(&ratios_file).unwrap()).unwrap();
    // The server's default ratios (`--mag-ratios FILE`) for requests that send none.
    let mut c = ServerConfig::new(
        "127.0.0.1:0",
        data.path(),
        vec![ModelSpec {
            id: "tiny-cache".into(),
            path: model,
        }],
    );
    c.devices = vec![DeviceChoice::Cpu];
    c.mag_ratios = Some(kino_engine::hooks::read_mag_ratios(&ratios_file).unwrap());
    let srv = ServerHandle::start(c).unwrap();
    let a = srv.addr();
    for body in [
        json!({"prompt": "a red square", "seconds": "1", "steps": 10, "guidance": 5.0,
               "cache": "first-block:0.9"}),
        json!({"prompt": "a red square", "seconds": "1", "steps": 10, "guidance": 5.0,
               "cache": "mag:0.5,max_skip_steps=2,retention_ratio=0.1", "mag_ratios": ratios}),
        json!({"prompt": "a red square", "seconds": "1", "steps": 10, "guidance": 5.0,
               "cache": "mag:0.5,max_skip_steps=2,retention_ratio=0.1"}),
    ] {
        let v = create(a, body.clone());
        assert_eq!(v["cache"]["spec"], body["cache"], "{v}");
        let done = completed(a, &v);
        let c = &done["cache"];
        let (fw, sk) = (c["forwards"].as_u64(), c["skipped"].as_u64());
        assert_eq!(fw, Some(20), "10 steps × cond/uncond: {done}");
        assert!(sk.is_some_and(|s| s > 0 && s < 20), "{done}");
        let meta = kino_media::read_metadata(mp4(data.path(), done["id"].as_str().unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(meta["cache"]["forwards"], c["forwards"], "{meta}");
        assert_eq!(meta["cache"]["skipped"], c["skipped"], "{meta}");
        assert_eq!(meta["cache"]["spec"], body["cache"]);
        if body["cache"].as_str().unwrap().starts_with("mag") {
            assert_eq!(
                meta["cache"]["mag_ratios"].as_array().map(Vec::len),
                Some(10)
            );
        }
    }
}

#[test]
fn openai_sdk_sends_adapters_in_extra_body() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let data = tempfile::tempdir().unwrap();
    let loras = lora_dir();
    let model = fixtures().join("pipeline-lora/model");
    let srv = server(data.path(), "tiny-lora", model, Some(loras.path()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/adapters_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("KINO_BASE_URL", format!("http://{}/v1", srv.addr()))
        .env_remove("OPENAI_BASE_URL")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}); set KINO_PYTHON to a Python with `pip install openai==3.57.0`"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "adapters_sdk.py failed:\n{stdout}\n{stderr}"
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(v["lora"][0]["name"], "peft", "{v}");
    let meta = kino_media::read_metadata(mp4(data.path(), v["id"].as_str().unwrap()))
        .unwrap()
        .unwrap();
    assert_eq!(meta["lora"]["adapters"][0]["file"], "peft.safetensors");
    assert_eq!(meta["lora"]["adapters"][0]["scale"], 0.5);
}

#[test]
fn a_missing_lora_dir_stops_the_server_at_start() {
    let data = tempfile::tempdir().unwrap();
    let missing = data.path().join("no-such-dir");
    let mut c = ServerConfig::new(
        "127.0.0.1:0",
        data.path(),
        vec![ModelSpec {
            id: "tiny-lora".into(),
            path: fixtures().join("pipeline-lora/model"),
        }],
    );
    c.devices = vec![DeviceChoice::Cpu];
    c.lora_dir = Some(missing);
    let err = ServerHandle::start(c).err().expect("refused");
    assert!(err.to_string().contains("--lora-dir"), "{err}");
}

/// A copy of `src` (a safetensors file) whose `__metadata__` also holds `kino` = `kino_json`.
fn with_kino_metadata(src: &Path, dst: &Path, kino_json: &str) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    if header.get("__metadata__").is_none() {
        header["__metadata__"] = json!({});
    }
    header["__metadata__"]["kino"] = json!(kino_json);
    let mut h = serde_json::to_vec(&header).unwrap();
    // Keep the data 8-byte aligned, as safetensors writers do.
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn a_preset_named_by_an_adapter_sets_steps_and_guidance_and_is_recorded() {
    let data = tempfile::tempdir().unwrap();
    let loras = lora_dir();
    with_kino_metadata(
        &loras.path().join("peft.safetensors"),
        &loras.path().join("quick.safetensors"),
        r#"{"presets": {"fast": {"num_inference_steps": 2, "guidance_scale": 1.0}}}"#,
    );
    let model = fixtures().join("pipeline-lora/model");
    let srv = server(data.path(), "tiny-lora", model, Some(loras.path()));
    let a = srv.addr();

    let v = create(
        a,
        json!({"prompt": "a red square", "seconds": "1", "seed": 5,
               "lora": ["quick"], "preset": "fast"}),
    );
    assert_eq!(v["preset"], "fast", "{v}");
    let done = completed(a, &v);
    let meta = kino_media::read_metadata(mp4(data.path(), done["id"].as_str().unwrap()))
        .unwrap()
        .expect("metadata");
    assert_eq!(meta["steps"], 2, "{meta}");
    assert_eq!(meta["guidance"], 1.0, "{meta}");
    assert_eq!(meta["preset"], "fast", "{meta}");
    assert_eq!(meta["lora"]["adapters"][0]["file"], "quick.safetensors");

    // Explicit settings win over the preset's.
    let v = create(
        a,
        json!({"prompt": "a red square", "seconds": "1", "seed": 5,
               "lora": ["quick"], "preset": "fast", "steps": 3}),
    );
    let done = completed(a, &v);
    let meta = kino_media::read_metadata(mp4(data.path(), done["id"].as_str().unwrap()))
        .unwrap()
        .unwrap();
    assert_eq!(meta["steps"], 3, "{meta}");
    assert_eq!(meta["guidance"], 1.0, "{meta}");

    // A preset nobody names: 400, naming the presets there are; nothing queued.
    let before = video_count(a);
    let r = post_json(
        a,
        "/v1/videos",
        &json!({"prompt": "x", "lora": ["quick"], "preset": "turbo"}),
    );
    let e = r.assert_error(400, Some("preset"));
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("no preset `turbo`"), "{msg}");
    assert!(msg.contains("fast (from quick.safetensors)"), "{msg}");
    assert!(
        !msg.contains(loras.path().to_str().unwrap()),
        "no server paths: {msg}"
    );
    let r = post_json(a, "/v1/videos", &json!({"prompt": "x", "preset": "fast"}));
    let e = r.assert_error(400, Some("preset"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("name any preset"),
        "{e}"
    );
    assert_eq!(video_count(a), before, "nothing queued on a 400");
}
