//! `kino generate --lora` end to end on the tiny random-weight folder and adapters of
//! `fixtures/data/pipeline-lora` (the same files the parity fixtures check against diffusers):
//! an adapter changes the video, on the fly and fused give the same video, the metadata names
//! the adapters, and an adapter that does not fit the model is refused naming its tensor, with
//! nothing written.

use std::path::{Path, PathBuf};

mod common;
use common::{kino, repo, run, stderr};

fn case() -> PathBuf {
    repo().join("fixtures/data/pipeline-lora")
}

/// `kino generate` on the tiny model with `extra` flags; returns the decoded frames.
fn generate(out: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let o = run(kino()
        .args(["generate", "a red circle", "--model"])
        .arg(case().join("model"))
        .args(["--steps", "2", "--seed", "3", "--no-watermark", "-o"])
        .arg(out)
        .args(extra));
    assert!(o.status.success(), "{}", stderr(&o));
    kino_media::read_mp4(out)
        .unwrap()
        .frames()
        .iter()
        .map(|f| f.data().to_vec())
        .collect()
}

fn mean_abs_diff(a: &[Vec<u8>], b: &[Vec<u8>]) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            s += (*p as f64 - *q as f64).abs();
            n += 1.0;
        }
    }
    s / n.max(1.0)
}

/// A safetensors file of f32 tensors (name, shape, value everywhere).
fn write_safetensors(path: &Path, tensors: &[(&str, &[usize], f32)]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, shape, v) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn adapters_change_the_video_fused_or_not_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let c = case();
    let peft = format!("{}:0.6", c.join("peft.safetensors").display());
    let wan = format!("{}:1.3", c.join("wan.safetensors").display());
    let base = generate(&tmp.path().join("base.mp4"), &[]);
    let on_path = tmp.path().join("on.mp4");
    let on = generate(&on_path, &["--lora", &peft, "--lora", &wan]);
    let fused = generate(
        &tmp.path().join("fused.mp4"),
        &["--lora", &peft, "--lora", &wan, "--fuse-lora"],
    );
    assert_eq!(on.len(), base.len());
    let changed = mean_abs_diff(&base, &on);
    let same = mean_abs_diff(&on, &fused);
    assert!(
        changed > 2.0,
        "the adapters changed the video by only {changed}"
    );
    assert!(same < 0.5, "on the fly and fused differ by {same}");

    let o = run(kino().args(["info", "--json"]).arg(&on_path));
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let l = &info["generation"]["lora"];
    let files: Vec<&str> = l["adapters"]
        .as_array()
        .unwrap_or_else(|| panic!("no lora in the metadata: {info}"))
        .iter()
        .map(|a| a["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["peft.safetensors", "wan.safetensors"]);
    assert_eq!(l["adapters"][1]["scale"], 1.3);
    assert_eq!(l["adapters"][0]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(l["fused"], false);
}

#[test]
fn adapters_that_do_not_fit_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("other-model.safetensors");
    write_safetensors(
        &bad,
        &[
            (
                "transformer.blocks.9.attn1.to_q.lora_A.weight",
                &[2, 24],
                0.1,
            ),
            (
                "transformer.blocks.9.attn1.to_q.lora_B.weight",
                &[24, 2],
                0.1,
            ),
        ],
    );
    let missing = tmp.path().join("missing.safetensors");
    for (lora, want) in [
        (bad.display().to_string(), "blocks.9.attn1.to_q"),
        (missing.display().to_string(), "missing.safetensors"),
    ] {
        let out = tmp.path().join("out.mp4");
        let o = run(kino()
            .args(["generate", "a red circle", "--model"])
            .arg(case().join("model"))
            .args(["--steps", "2", "--lora", &lora, "-o"])
            .arg(&out));
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(want), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out.exists(), "nothing is written on error");
    }
}

/// The step caches from the command line: `skipped N of M transformer forwards` printed and
/// recorded, MagCache ratios that Kino measures itself (`mag:calibrate`) then used, and a bad
/// spec refused before anything runs.
#[test]
fn step_caches_skip_forwards_and_calibrate_their_own_ratios() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo().join("fixtures/data/pipeline-cache/model");
    let gen = |out: &Path, extra: &[&str]| {
        run(kino()
            .args(["generate", "a red circle", "--model"])
            .arg(&model)
            .args(["--steps", "10", "--seed", "2", "--no-watermark", "-o"])
            .arg(out)
            .args(extra))
    };
    let skipped = |e: &str| -> (usize, usize) {
        let line = e
            .lines()
            .find(|l| l.contains("transformer forwards"))
            .unwrap_or_else(|| panic!("no cache report in {e}"));
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "skipped").unwrap();
        (w[i + 1].parse().unwrap(), w[i + 3].parse().unwrap())
    };
    let out = tmp.path().join("fb.mp4");
    let o = gen(&out, &["--cache", "first-block:0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (n, m) = skipped(&stderr(&o));
    assert!(n > 0 && n < m && m == 20, "{n} of {m}");
    let info = run(kino().args(["info", "--json"]).arg(&out));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["generation"]["cache"]["skipped"], n);

    let ratios = tmp.path().join("ratios.json");
    let o = gen(
        &tmp.path().join("cal.mp4"),
        &["--cache", "mag:calibrate", "--write-mag-ratios"],
    );
    // --write-mag-ratios needs its file: the flag alone is a usage error.
    assert!(!o.status.success());
    let o = gen(
        &tmp.path().join("cal.mp4"),
        &[
            "--cache",
            "mag:calibrate",
            "--write-mag-ratios",
            ratios.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let list: Vec<f64> = serde_json::from_slice(&std::fs::read(&ratios).unwrap()).unwrap();
    assert_eq!(list.len(), 10, "one ratio per step");
    let o = gen(
        &tmp.path().join("mag.mp4"),
        &[
            "--cache",
            "mag:0.5,max_skip_steps=2",
            "--mag-ratios",
            ratios.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (n, _) = skipped(&stderr(&o));
    assert!(n > 0, "MagCache with its own ratios skipped nothing");

    let bad = tmp.path().join("bad.mp4");
    let o = gen(&bad, &["--cache", "sometimes"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("first-block"), "{}", stderr(&o));
    assert!(!bad.exists());
}
