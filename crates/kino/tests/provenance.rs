//! Provenance through the `kino` binary: `kino generate` signs (a local CA made on first use)
//! and watermarks; `kino verify` reads both; an ffmpeg re-encode keeps only the watermark;
//! `kino mark` marks and signs it again; `--no-sign --no-watermark` is recorded and warned
//! about; a prompt the policy blocks is refused with its reason and logged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{copy_dir, kino, repo, run, stderr};

fn tiny_model(tmp: &Path) -> PathBuf {
    let dst = tmp.join("tiny");
    copy_dir(&repo().join("fixtures/data/pipeline-wan21/model"), &dst);
    dst
}

/// `kino ARGS…` with its data directory (keys, audit log) in `data`.
fn kino_in(data: &Path, args: &[&str]) -> Output {
    run(kino().args(args).env("KINO_DATA_DIR", data))
}

fn verify(data: &Path, file: &Path) -> serde_json::Value {
    let o = kino_in(data, &["verify", "--json", file.to_str().unwrap()]);
    assert!(o.status.success(), "kino verify failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn generate(data: &Path, model: &Path, out: &Path, prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        prompt,
        "--size",
        "256x256",
        "--frames",
        "9",
        "--steps",
        "2",
        "--cpu",
        "-o",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kino_in(data, &args)
}

#[test]
fn generate_signs_and_marks_verify_reads_both_and_mark_restamps_an_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("clip.mp4");
    let o = generate(&data, &model, &out, "a red ball bouncing", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("made a local C2PA signing key"),
        "{}",
        stderr(&o)
    );
    assert!(data.join("provenance/root-ca.pem").is_file());

    let v = verify(&data, &out);
    assert_eq!(v["c2pa"]["state"], "trusted", "{v:#}");
    assert_eq!(v["ai_generated"], true);
    assert_eq!(v["c2pa"]["kino"]["model"], model.to_str().unwrap());
    assert_eq!(
        v["c2pa"]["kino"]["model_sha256"].as_str().map(str::len),
        Some(64),
        "{v:#}"
    );
    assert!(v["c2pa"]["kino"].get("prompt").is_none(), "{v:#}");
    assert_eq!(v["watermark"]["detected"], true, "{v:#}");
    let id = v["watermark"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["c2pa"]["kino"]["watermark_id"], id.as_str());

    // `kino info` shows what was applied.
    let o = kino_in(&data, &["info", "--json", out.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["generation"]["provenance"]["c2pa"]["signed"], true);
    assert_eq!(
        info["generation"]["provenance"]["watermark"]["id"],
        id.as_str()
    );

    // Plain words too.
    let o = kino_in(&data, &["verify", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("valid and trusted"), "{text}");
    assert!(text.contains("trainedAlgorithmicMedia"), "{text}");
    assert!(text.contains(&format!("detected — id {id}")), "{text}");
    // Nothing but the report: no library warnings (c2pa's about its thumbnail feature was
    // printed on every read until stop 36).
    assert!(
        !stderr(&o).contains("WARN"),
        "kino verify warned: {}",
        stderr(&o)
    );

    // An edit elsewhere (ffmpeg re-encode): the manifest is gone, the watermark stays.
    let re = tmp.path().join("edited.mp4");
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&out)
        .args(["-c:v", "libx264", "-crf", "23", "-pix_fmt", "yuv420p"])
        .arg(&re)
        .status()
        .expect("ffmpeg is installed");
    assert!(st.success());
    let v = verify(&data, &re);
    assert_eq!(v["c2pa"]["state"], "absent", "{v:#}");
    assert_eq!(v["watermark"]["detected"], true, "{v:#}");
    assert_eq!(v["watermark"]["id"], id.as_str());

    // `kino mark` stamps the edit again.
    let marked = tmp.path().join("marked.mp4");
    let o = kino_in(
        &data,
        &["mark", re.to_str().unwrap(), "-o", marked.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = verify(&data, &marked);
    assert_eq!(v["c2pa"]["state"], "trusted", "{v:#}");
    let sha = {
        use std::io::Read;
        let mut b = Vec::new();
        std::fs::File::open(&re)
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        kino_provenance_sha(&b)
    };
    assert_eq!(v["c2pa"]["kino"]["marked_from"]["sha256"], sha.as_str());
    assert_eq!(v["watermark"]["detected"], true, "{v:#}");
}

fn kino_provenance_sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn switches_off_are_warned_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("plain.mp4");
    let o = generate(
        &data,
        &model,
        &out,
        "a red ball",
        &["--no-sign", "--no-watermark"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("C2PA signing is off (--no-sign)"), "{e}");
    assert!(e.contains("watermark is off (--no-watermark)"), "{e}");
    let o = kino_in(&data, &["info", "--json", out.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["generation"]["provenance"]["c2pa"]["signed"], false);
    assert_eq!(
        info["generation"]["provenance"]["watermark"]["embedded"],
        false
    );
    let v = verify(&data, &out);
    assert_eq!(v["c2pa"]["state"], "absent");
    assert_eq!(v["watermark"]["detected"], false);
}

#[test]
fn blocked_prompt_is_refused_with_its_reason_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let model = tiny_model(tmp.path());
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[block]]\npattern = \"(?i)\\\\bforbidden\\\\b\"\nreason = \"this installation does not make forbidden things\"\n",
    )
    .unwrap();
    let out = tmp.path().join("x.mp4");
    let o = generate(
        &data,
        &model,
        &out,
        "a Forbidden thing",
        &["--policy", policy.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("this installation does not make forbidden things"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    let log = std::fs::read_to_string(data.join("policy-audit.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(line["source"], "kino generate");
    assert_eq!(line["rule"], "pattern: (?i)\\bforbidden\\b");
    assert_eq!(line["prompt"], "a Forbidden thing");
}
