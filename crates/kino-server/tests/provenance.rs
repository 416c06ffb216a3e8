//! Provenance end to end through the official `openai` SDK (tests/provenance_sdk.py): a video
//! made by `kino serve` is signed and watermarked; `content_provenance_checks.create` finds both;
//! an `ffmpeg` re-encode keeps only the watermark; a prompt the policy blocks is refused with its
//! reason and logged. Needs $KINO_PYTHON with openai==3.57.0, and ffmpeg.

mod common;

use std::process::Command;

#[test]
fn sdk_checks_signed_watermarked_video_and_policy_refusal() {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    // The tiny model at 256×256 (the watermark is meant for 256 px and up), 5 frames, 2 steps.
    let model = dir.path().join("tiny256");
    copy_dir(&common::model_dir(), &model);
    std::fs::write(
        model.join("kino.json"),
        r#"{"width": 256, "height": 256, "num_frames": 9, "fps": 8, "num_inference_steps": 2, "guidance_scale": 1.0}"#,
    )
    .unwrap();
    let term = "Example Person";
    let reason = "videos of real people are not allowed on this server";
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[block]]\nterm = \"{term}\"\nreason = \"{reason}\"\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut config = common::config(&data);
    config.models[0].id = "tiny256".into();
    config.models[0].path = model.clone();
    config.provenance.data_dir = Some(dir.path().join("keys"));
    config.provenance.policy = Some(policy);
    let srv = kino_server::ServerHandle::start(config).unwrap();
    assert!(dir.path().join("keys/provenance/root-ca.pem").is_file());

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/provenance_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("KINO_BASE_URL", format!("http://{}/v1", srv.addr()))
        .env("KINO_MODEL_ID", "tiny256")
        .env("KINO_BLOCKED_TERM", term.to_lowercase())
        .env("KINO_BLOCKED_REASON", reason)
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("run the SDK script (set KINO_PYTHON to a Python with openai==3.57.0)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "provenance_sdk.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK"), "{stdout}");

    // The refusal is in the audit log, with the rule and where it came from.
    let log = std::fs::read_to_string(data.join("policy-audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(lines[0]["rule"], format!("term: {term}"));
    assert_eq!(lines[0]["reason"], reason);
    assert_eq!(lines[0]["source"], "kino serve");
    assert!(lines[0]["prompt"]
        .as_str()
        .unwrap()
        .contains("example person"));
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
