//! Drives the web studio in headless Chromium (tests/studio_chromium.py, standard library
//! only): type a prompt, watch the progress, see the video play, delete it; drop an image, see
//! the image-to-video result play; drop that video, see the video-to-video edit play; Extend
//! the image-to-video result from its card and see the longer video play; start a long video
//! and see "segment 2 of 2" and the time left in the queue. Needs $KINO_PYTHON
//! (default python3) and $KINO_CHROMIUM (default chromium); fails saying so if either is missing.

mod common;

use std::process::Command;

#[test]
fn studio_in_headless_chromium() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let chromium = std::env::var("KINO_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if let Err(e) = Command::new(&chromium).arg("--version").output() {
        panic!("cannot run `{chromium}` ({e}): install Chromium (Debian: apt-get install chromium) or set KINO_CHROMIUM");
    }
    let dir = tempfile::tempdir().unwrap();
    // `tiny` first (text), then `tiny-ti2v`, which takes a first image.
    let srv = kino_server::ServerHandle::start(common::config_two(dir.path())).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/studio_chromium.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("KINO_STUDIO_URL", format!("http://{}/", srv.addr()))
        .env("KINO_CHROMIUM", &chromium)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{python}` ({e}); install Python 3 or set KINO_PYTHON")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "studio_chromium.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("studio OK"), "{stdout}");
}

/// The studio's "Adapters" multi-select (from `GET /v1/models`) and "Step cache" field reach the
/// API as `lora` / `cache`, and the gallery card shows them.
#[test]
fn studio_adapters_and_step_cache_in_headless_chromium() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let chromium = std::env::var("KINO_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if let Err(e) = Command::new(&chromium).arg("--version").output() {
        panic!("cannot run `{chromium}` ({e}): install Chromium (Debian: apt-get install chromium) or set KINO_CHROMIUM");
    }
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data");
    let dir = tempfile::tempdir().unwrap();
    let loras = tempfile::tempdir().unwrap();
    for f in ["peft.safetensors", "wan.safetensors"] {
        std::fs::copy(fixtures.join("pipeline-lora").join(f), loras.path().join(f)).unwrap();
    }
    let mut config = common::config(dir.path());
    config.models[0].path = fixtures.join("pipeline-lora/model");
    config.lora_dir = Some(loras.path().to_path_buf());
    let srv = kino_server::ServerHandle::start(config).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/studio_chromium.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("KINO_STUDIO_URL", format!("http://{}/", srv.addr()))
        .env("KINO_CHROMIUM", &chromium)
        .env("KINO_STUDIO_DRIVE", "adapters")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{python}` ({e}); install Python 3 or set KINO_PYTHON")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "studio_chromium.py (adapters) failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("studio adapters OK"), "{stdout}");
    // What the page sent, as the API stored it.
    let list = common::get(srv.addr(), "/v1/videos").json();
    let v = &list["data"][0];
    assert_eq!(v["lora"][0]["name"], "peft", "{v}");
    assert_eq!(v["cache"]["spec"], "first-block:0.9", "{v}");
    assert!(
        v["cache"]["forwards"].as_u64().is_some_and(|f| f > 0),
        "{v}"
    );
}
