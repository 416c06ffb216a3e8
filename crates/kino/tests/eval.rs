//! End-to-end tests of `kino eval`: scoring a model on its held-out prompts, and analysing a video.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{copy_dir, kino, repo, run, stderr};

use kino_media::{Fps, Frame, Video};

/// A private copy of the tiny random-weight Wan2.1 model folder.
fn tiny_model(tmp: &Path) -> PathBuf {
    let dst = tmp.join("model");
    copy_dir(&repo().join("fixtures/data/pipeline-wan21/model"), &dst);
    dst
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

const SPEC: &str = r#"{
  "colours": {"red": [220, 40, 40], "green": [40, 180, 60], "blue": [50, 90, 230]},
  "backgrounds": {"black": [0, 0, 0], "white": [255, 255, 255], "gray": [128, 128, 128]},
  "shapes": ["circle", "square", "triangle"],
  "motions": ["left", "right", "up", "down"],
  "cases": [
    {"prompt": "a red circle moving right on a black background",
     "colour": "red", "shape": "circle", "motion": "right", "background": "black"},
    {"prompt": "a blue square moving up on a white background",
     "colour": "blue", "shape": "square", "motion": "up", "background": "white"}
  ]
}"#;

#[test]
fn eval_scores_every_case_and_prints_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    std::fs::write(model.join("kino-eval.json"), SPEC).unwrap();
    let saved = tmp.path().join("saved");
    let o = run(kino()
        .args(["eval", "--seeds", "1", "--steps", "2", "--cpu", "--model"])
        .arg(&model)
        .arg("--save")
        .arg(&saved));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}\n{}", stderr(&o));
    for attr in ["colour", "shape", "motion", "background"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(attr))
            .unwrap_or_else(|| panic!("no `{attr}` row in\n{out}"));
        assert!(line.contains(" 2 ") && line.ends_with('%'), "{line}");
    }
    assert!(
        out.contains("2 videos (2 cases × 1 seeds, 2 steps)"),
        "{out}"
    );
    assert!(out.contains("misses"), "{out}");
    // Shape per asked shape, in the cases' order, each with its one video.
    let by_shape = out
        .lines()
        .find(|l| l.starts_with("shape by asked shape: "))
        .unwrap_or_else(|| panic!("no shape-by-shape line in\n{out}"));
    let circle = by_shape.find("circle ").expect(by_shape);
    let square = by_shape.find("square ").expect(by_shape);
    assert!(circle < square, "{by_shape}");
    assert!(
        by_shape[circle..].starts_with("circle 0/1")
            || by_shape[circle..].starts_with("circle 1/1"),
        "{by_shape}"
    );
    // One progress line per video.
    let err = stderr(&o);
    assert!(
        err.contains("[1/2]") && err.contains("[2/2]") && err.contains("seed 0"),
        "{err}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "001-a-red-circle-moving-right-on-a-black-background-seed0.mp4",
            "002-a-blue-square-moving-up-on-a-white-background-seed0.mp4"
        ]
    );
    let v = kino_media::read_mp4(saved.join(&files[0])).unwrap();
    assert_eq!((v.width(), v.height(), v.len()), (96, 64, 17));

    // The same as JSON, with --cases naming the file.
    let cases = tmp.path().join("cases.json");
    std::fs::write(&cases, SPEC).unwrap();
    std::fs::remove_file(model.join("kino-eval.json")).unwrap();
    let o = run(kino()
        .args([
            "eval", "--seeds", "1", "--steps", "2", "--cpu", "--json", "--model",
        ])
        .arg(&model)
        .arg("--cases")
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for attr in ["colour", "shape", "motion", "background", "all"] {
        let a = &v["accuracy"][attr];
        assert_eq!(a["total"], 2, "{v}");
        let c = a["correct"].as_u64().unwrap();
        assert!(
            c <= 2 && a["accuracy"].as_f64().unwrap() == c as f64 / 2.0,
            "{v}"
        );
    }
    assert_eq!(v["videos"], 2);
    assert_eq!(v["steps"], 2);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["expected"]["shape"], "square");
    assert_eq!(runs[1]["seed"], 0);
    for key in [
        "colour",
        "shape",
        "motion",
        "background",
        "dx",
        "dy",
        "fill",
        "rgb",
    ] {
        assert!(runs[0]["detected"].get(key).is_some(), "{key} in {v}");
    }
    // Per asked shape: the runs' own shape verdicts, fills and sizes.
    let rows = v["shape_by_asked_shape"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    for (row, r) in rows.iter().zip(runs) {
        assert_eq!(row["shape"], r["expected"]["shape"], "{v}");
        assert_eq!(row["total"], 1, "{v}");
        let right = !r["wrong"].as_array().unwrap().iter().any(|w| w == "shape");
        assert_eq!(row["correct"], u64::from(right), "{v}");
        if r["detected"]["shape"] == "none" {
            assert!(row["mean_fill"].is_null(), "{v}");
        } else {
            assert_eq!(row["mean_fill"], r["detected"]["fill"], "{v}");
            assert_eq!(row["mean_size_px"], r["detected"]["size"], "{v}");
        }
    }
    let misses = v["misses"].as_array().unwrap().len();
    let wrong_runs = runs
        .iter()
        .filter(|r| !r["wrong"].as_array().unwrap().is_empty())
        .count();
    assert_eq!(misses, wrong_runs);
}

#[test]
fn eval_errors_say_what_is_missing_and_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let o = run(kino().args(["eval", "--model"]).arg(&model));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("has no kino-eval.json") && e.contains("--cases FILE"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");

    let o = run(kino()
        .args(["eval", "--cases", "/nonexistent/eval.json", "--model"])
        .arg(&model));
    assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"colours\": ").unwrap();
    let o = run(kino()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--cases")
        .arg(&bad));
    let e = stderr(&o);
    assert!(e.contains("is not a valid kino-eval.json"), "{e}");

    std::fs::write(
        &bad,
        SPEC.replace("\"colour\": \"blue\"", "\"colour\": \"pink\""),
    )
    .unwrap();
    let o = run(kino()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--cases")
        .arg(&bad));
    let e = stderr(&o);
    assert!(
        e.contains("case 2") && e.contains("colour `pink`") && e.contains("blue, green, red"),
        "{e}"
    );

    let o = run(kino().args(["eval", "--video", "x.mp4", "--steps", "3"]));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));

    let o = run(kino()
        .args(["eval", "--video"])
        .arg(tmp.path().join("none.mp4"))
        .arg("--cases")
        .arg(model.join("../cases-missing.json")));
    assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));
    std::fs::write(&bad, SPEC).unwrap();
    let o = run(kino()
        .args(["eval", "--video"])
        .arg(tmp.path().join("none.mp4"))
        .arg("--cases")
        .arg(&bad));
    let e = stderr(&o);
    assert!(e.contains("none.mp4: no such file"), "{e}");
}

/// `--image` needs a model that takes a first image, and is not for `--video`.
#[test]
fn eval_image_refuses_a_text_only_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    std::fs::write(model.join("kino-eval.json"), SPEC).unwrap();
    let o = run(kino()
        .args(["eval", "--image", "--seeds", "1", "--cpu", "--model"])
        .arg(&model));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("takes no image") && e.contains("kino-shapes"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    let o = run(kino().args(["eval", "--image", "--video", "x.mp4"]));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}

/// `kino eval --image` on the bundled model: every case starts from a first image drawn by the
/// world, and the table gains the start position.
#[test]
fn eval_image_scores_the_start_position_too() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = tmp.path().join("cases.json");
    std::fs::write(&cases, SPEC).unwrap();
    let o = run(kino()
        .args([
            "eval", "--image", "--seeds", "1", "--steps", "4", "--cpu", "--cases",
        ])
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}\n{}", stderr(&o));
    for attr in [
        "colour",
        "shape",
        "motion",
        "background",
        "start",
        "all five",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(attr) && l.ends_with('%')),
            "no `{attr}` row in\n{out}"
        );
    }
    assert!(out.contains("each from a first image"), "{out}");
    assert!(stderr(&o).contains(", start "), "{}", stderr(&o));

    let o = run(kino()
        .args([
            "eval", "--image", "--json", "--seeds", "1", "--steps", "4", "--cpu", "--cases",
        ])
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "image");
    assert_eq!(v["accuracy"]["start"]["total"], 2, "{v}");
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["scene"]["shape"], r["expected"]["shape"], "{r}");
        let size = r["scene"]["size"].as_f64().unwrap();
        assert!((18.0..=26.0).contains(&size), "{r}");
        // The given image shows the object where the scene put it.
        let image = &r["start"]["image"];
        let x0 = r["scene"]["x0"].as_f64().unwrap();
        assert!((image[0].as_f64().unwrap() - x0).abs() < 1.0, "{r}");
    }
}

/// `kino eval --long K` on the bundled model: each case a video of K segments through the
/// engine's long-video plan, the direction turning clockwise, scored per segment and seam.
#[test]
fn eval_long_scores_segments_and_seams() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = tmp.path().join("cases.json");
    std::fs::write(&cases, SPEC).unwrap();
    let o = run(kino()
        .args([
            "eval", "--long", "3", "--json", "--seeds", "1", "--steps", "4", "--cpu", "--cases",
        ])
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "long");
    assert_eq!(v["segments"], 6, "{v}");
    for key in [
        "colour_kept",
        "shape_kept",
        "size_kept",
        "colour_as_prompted",
        "shape_as_prompted",
        "direction",
    ] {
        let x = v[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{key}: {v}");
    }
    // Per segment index: "kept" is against segment 0 of the same video, so segment 0 has none;
    // "as prompted" is against the case, in every segment.
    let per = v["per_segment"].as_array().unwrap();
    assert_eq!(per.len(), 3, "{v}");
    assert!(per[0]["colour_kept"].is_null() && per[0]["shape_kept"].is_null());
    assert!(per[1]["colour_kept"].as_f64().is_some());
    assert!(per[0]["colour_as_prompted"].as_f64().is_some());
    // Every seam is either measured or counted as one without an object: 2 videos × 2 seams.
    let seams = v["seams_measured"].as_u64().unwrap() + v["seams_without_object"].as_u64().unwrap();
    assert_eq!(seams, 4, "{v}");
    let runs = v["runs"].as_array().unwrap();
    let dirs: Vec<&str> = runs[0]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["direction"].as_str().unwrap())
        .collect();
    assert_eq!(dirs, ["right", "down", "left"]);
    // Segment 0 has no seam; the later ones are measured when both sides show the object.
    assert!(runs[0]["segments"][0]["seam_excess"].is_null());
    for r in runs {
        let segs = r["segments"].as_array().unwrap();
        assert!(segs[0]["shape_kept"].is_null(), "{r}");
        for s in &segs[1..] {
            // Kept means the same as segment 0 showed.
            let same = s["detected"]["shape"] == segs[0]["detected"]["shape"];
            assert_eq!(s["shape_kept"].as_bool(), Some(same), "{r}");
            match s["seam_excess"].as_f64() {
                Some(e) => {
                    let jump = s["seam_jump"].as_f64().unwrap();
                    assert!(e >= 0.0 && e <= jump + 1e-9, "{r}");
                    assert_eq!(s["seam_without_object"], false, "{r}");
                }
                None => assert_eq!(s["seam_without_object"], true, "{r}"),
            }
        }
    }
    // The plain table, and the refusals.
    let o = run(kino()
        .args([
            "eval", "--long", "2", "--seeds", "1", "--steps", "2", "--cpu", "--cases",
        ])
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for row in [
        "colour kept (vs segment 0)",
        "shape kept (vs segment 0)",
        "size kept",
        "colour as prompted",
        "shape as prompted",
        "direction as prompted",
        "mean seam jump",
        "seams without an object",
    ] {
        assert!(out.contains(row), "no `{row}` in\n{out}");
    }
    let o = run(kino().args(["eval", "--long", "1", "--cases"]).arg(&cases));
    assert!(stderr(&o).contains("at least 2 segments"), "{}", stderr(&o));
    let model = tiny_model(tmp.path());
    std::fs::write(model.join("kino-eval.json"), SPEC).unwrap();
    let o = run(kino()
        .args(["eval", "--long", "2", "--seeds", "1", "--cpu", "--model"])
        .arg(&model));
    assert!(
        stderr(&o).contains("cannot continue its own clips"),
        "{}",
        stderr(&o)
    );
}

/// A red anti-aliased circle of diameter 16 moving 24 px to the right on gray, 64×64, 17 frames.
fn synthetic_clip() -> Video {
    let (w, h, d) = (64u32, 64u32, 16.0f64);
    let frames = (0..17)
        .map(|t| {
            let cx = 14.0 + 24.0 * t as f64 / 16.0;
            let cy = 30.0;
            Frame::from_fn(w, h, |x, y| {
                let mut hits = 0;
                for j in 0..4 {
                    for i in 0..4 {
                        let px = x as f64 + (i as f64 + 0.5) / 4.0 - cx;
                        let py = y as f64 + (j as f64 + 0.5) / 4.0 - cy;
                        hits += (px * px + py * py <= d * d / 4.0) as u32;
                    }
                }
                let a = hits as f64 / 16.0;
                let mix = |fg: f64, bg: f64| (bg + a * (fg - bg)).round() as u8;
                [mix(220.0, 128.0), mix(40.0, 128.0), mix(40.0, 128.0)]
            })
            .unwrap()
        })
        .collect();
    Video::new(frames, Fps::integer(8).unwrap()).unwrap()
}

#[test]
fn eval_video_reads_what_an_mp4_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = tmp.path().join("clip.mp4");
    kino_media::write_mp4(&clip, &synthetic_clip(), &Default::default()).unwrap();
    let cases = tmp.path().join("kino-eval.json");
    std::fs::write(&cases, SPEC).unwrap();
    let o = run(kino()
        .args(["eval", "--json", "--video"])
        .arg(&clip)
        .arg("--cases")
        .arg(&cases));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    println!("{v}");
    assert_eq!(v["colour"], "red");
    assert_eq!(v["shape"], "circle");
    assert_eq!(v["motion"], "right");
    assert_eq!(v["background"], "gray");
    let (dx, dy) = (v["dx"].as_f64().unwrap(), v["dy"].as_f64().unwrap());
    assert!((dx - 24.0).abs() < 2.0 && dy.abs() < 1.0, "{v}");
    let fill = v["fill"].as_f64().unwrap();
    assert!((0.7..0.86).contains(&fill), "{v}");
    assert_eq!(v["rgb"].as_array().unwrap().len(), 3);

    // The palette may also come from a model folder; the text form names each attribute.
    let model = tiny_model(tmp.path());
    std::fs::copy(&cases, model.join("kino-eval.json")).unwrap();
    let o = run(kino()
        .args(["eval", "--video"])
        .arg(&clip)
        .arg("--model")
        .arg(&model));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        "colour:     red",
        "shape:      circle",
        "motion:     right",
        "background: gray",
    ] {
        assert!(out.contains(line), "{line} in\n{out}");
    }
}

/// Held-out prompts (from the model's kino-eval.json), one per direction and each background,
/// that the shipped kino-shapes gets right in colour and motion at all of seeds 0–3 with its
/// default settings (`kino eval --seeds 4 --json`). A regression guard for the engine, the
/// defaults and the MP4 path on prompts the model never saw in training; `kino eval` measures the
/// model itself. Retrained weights may need a new list.
const GUARDED_CASES: [&str; 4] = [
    "a green triangle moving left on a black background",
    "a blue square moving right on a white background",
    "a white circle moving up on a gray background",
    "a red square moving down on a gray background",
];

/// The bundled model draws what held-out prompts ask for: colour and motion, seed 0, its
/// default settings (no --model: it is the default), read back from the MP4 by
/// `kino eval --video`.
#[test]
fn shipped_model_follows_held_out_prompts() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/kino-shapes");
    let spec_path = model.join("kino-eval.json");
    let text = std::fs::read_to_string(&spec_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the bundled model models/kino-shapes (issue 4) with its \
             kino-eval.json must be in the repository for this test",
            spec_path.display()
        )
    });
    let spec: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", spec_path.display()));
    let cases = spec["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no \"cases\" list", spec_path.display()));
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for prompt in GUARDED_CASES {
        let case = cases
            .iter()
            .find(|c| c["prompt"] == prompt)
            .unwrap_or_else(|| {
                panic!(
                    "{prompt:?} is not a held-out case of {}",
                    spec_path.display()
                )
            });
        let prompt = case["prompt"].as_str().expect("case prompt");
        let out = tmp.path().join("x.mp4");
        let _ = std::fs::remove_file(&out);
        let o = run(kino()
            .args(["generate", prompt, "--seed", "0", "-o"])
            .arg(&out));
        assert!(
            o.status.success(),
            "kino generate {prompt:?}: {}",
            stderr(&o)
        );
        let o = run(kino().args(["eval", "--json", "--video"]).arg(&out));
        assert!(o.status.success(), "kino eval --video: {}", stderr(&o));
        let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for attr in ["colour", "motion"] {
            if found[attr] != case[attr] {
                failures.push(format!(
                    "{prompt:?}: {attr} expected {}, detected {} (analysis: {found})",
                    case[attr], found[attr]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `kino eval --edit` and `--reference` on the tiny random-weight VACE folder: every case ×
/// seed goes through the VACE pipeline (a masked source clip, or a reference image), and the
/// report has the colour, the PSNR outside the mask next to the VAE round trip's, and (for
/// --reference) the shape. A random model scores anything; the structure and ranges are what
/// is checked. A model without VACE is refused with one clear error.
#[test]
fn eval_edit_and_reference_score_a_vace_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("vace");
    copy_dir(&repo().join("fixtures/data/pipeline-vace/model"), &model);
    std::fs::write(model.join("kino-eval.json"), SPEC).unwrap();
    let saved = tmp.path().join("saved");

    let o = run(kino()
        .args([
            "eval", "--edit", "--json", "--seeds", "1", "--steps", "2", "--cpu", "--model",
        ])
        .arg(&model)
        .arg("--save")
        .arg(&saved));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "edit");
    assert_eq!(v["videos"], 2, "{v}");
    for attr in ["colour", "shape", "motion", "background"] {
        assert_eq!(v["accuracy"][attr]["total"], 2, "{attr}: {v}");
        let a = v["accuracy"][attr]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{attr}: {v}");
    }
    let p = &v["psnr_outside_mask_db"];
    let (out, rt, gap) = (
        p["output"].as_f64().unwrap(),
        p["vae_round_trip"].as_f64().unwrap(),
        p["gap"].as_f64().unwrap(),
    );
    assert!(out > 0.0 && out <= 99.0 && rt > 0.0 && rt <= 99.0, "{p}");
    assert!((gap - (rt - out)).abs() < 1e-9, "{p}");
    assert_eq!(p["within_bar"]["total"], 2, "{p}");
    for r in v["runs"].as_array().unwrap() {
        // The source is the case's scene in another colour of the palette, never the
        // background's.
        let from = r["source_colour"].as_str().unwrap();
        assert_ne!(from, r["expected"]["colour"], "{r}");
        assert_ne!(from, r["expected"]["background"], "{r}");
        assert!(["red", "green", "blue"].contains(&from), "{r}");
        let (o, t, g) = (
            r["psnr_output_db"].as_f64().unwrap(),
            r["psnr_round_trip_db"].as_f64().unwrap(),
            r["psnr_gap_db"].as_f64().unwrap(),
        );
        assert!((g - (t - o)).abs() < 1e-9, "{r}");
        assert_eq!(
            r["colour_ok"],
            r["detected"]["colour"] == r["expected"]["colour"],
            "{r}"
        );
    }
    let n_saved = std::fs::read_dir(&saved).unwrap().count();
    assert_eq!(n_saved, 2);
    let first = std::fs::read_dir(&saved)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let clip = kino_media::read_mp4(&first).unwrap();
    assert_eq!((clip.width(), clip.height(), clip.len()), (48, 32, 9));

    // `kino eval ARGS` on the VACE folder, one seed of two steps.
    let eval_vace = |args: &[&str]| {
        run(kino()
            .arg("eval")
            .args(args)
            .args(["--seeds", "1", "--steps", "2", "--cpu", "--model"])
            .arg(&model))
    };
    let o = eval_vace(&["--reference"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    println!("{out}\n{}", stderr(&o));
    assert!(
        out.contains("2 videos (2 cases × 1 seeds, 2 steps, --reference)"),
        "{out}"
    );
    for row in [
        "colour as the reference",
        "shape as the reference",
        "motion as prompted",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row in\n{out}"));
        let pct: f64 = line
            .split_whitespace()
            .find_map(|w| w.strip_suffix('%').and_then(|x| x.parse().ok()))
            .unwrap_or_else(|| panic!("no percentage in {line:?}"));
        assert!((0.0..=100.0).contains(&pct), "{line}");
    }
    assert!(out.contains("shape by asked shape: circle "), "{out}");
    // The prompt leaves out colour and shape: the reference has to give them.
    let err = stderr(&o);
    assert!(
        err.contains("\"an object moving right on a black background\" seed 0"),
        "{err}"
    );

    // The VACE conditioning scale reaches the runs and the report; a bad one, or one without
    // --edit / --reference, is refused before anything is generated.
    let o = eval_vace(&["--reference", "--json", "--conditioning-scale", "0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["conditioning_scale"], serde_json::json!([0.5]), "{v}");
    // Shape per asked shape (the reference's): the same count as the shape accuracy.
    let rows = v["shape_by_asked_shape"].as_array().unwrap();
    let shapes: Vec<&str> = rows.iter().map(|r| r["shape"].as_str().unwrap()).collect();
    assert_eq!(shapes, ["circle", "square"], "{v}");
    let correct: u64 = rows.iter().map(|r| r["correct"].as_u64().unwrap()).sum();
    assert_eq!(
        correct,
        v["accuracy"]["shape"]["correct"].as_u64().unwrap(),
        "{v}"
    );
    assert!(rows.iter().all(|r| r["total"] == 1), "{v}");
    for (args, needle) in [
        (
            vec!["--reference", "--conditioning-scale", "1,x"],
            "conditioning",
        ),
        (
            vec!["--conditioning-scale", "0.5"],
            "use it with --edit or --reference",
        ),
    ] {
        let o = eval_vace(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("[1/"), "{args:?}: {err}");
    }

    // A model without VACE: one error that says what is needed; nothing generated.
    let plain = tiny_model(tmp.path());
    std::fs::write(plain.join("kino-eval.json"), SPEC).unwrap();
    let o = run(kino()
        .args([
            "eval", "--edit", "--seeds", "1", "--steps", "2", "--cpu", "--model",
        ])
        .arg(&plain));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("is not a VACE model") && err.contains("kino-shapes-vace"),
        "{err}"
    );
    assert!(!err.contains("[1/"), "{err}");
}
