//! `kino edit` (VACE inpainting and outpainting) and `kino generate --reference` end to end on
//! the tiny random-weight VACE folder `fixtures/data/pipeline-vace/model` (48×32, 9 frames,
//! 8 fps; its outputs are noise-like, but sizes, frame counts and metadata are real). Inputs
//! are made with the real `ffmpeg` command; outputs are checked with `ffprobe` and
//! `kino info`. Every bad mask must give one clear error and write nothing; a non-VACE model
//! (`models/kino-shapes`) must be refused with the VACE models named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{kino, repo, run, stderr};

fn vace() -> PathBuf {
    repo().join("fixtures/data/pipeline-vace/model")
}

/// Runs `ffmpeg -y -loglevel error ARGS…`, panicking with its stderr on failure.
fn ffmpeg(args: &[&str]) {
    let o = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error"])
        .args(args)
        .output()
        .expect("ffmpeg is installed (Debian package ffmpeg; .ci/run installs it)");
    assert!(o.status.success(), "ffmpeg {args:?}: {}", stderr(&o));
}

/// Width, height and decoded frame count of a video, by ffprobe.
fn ffprobe(path: &Path) -> (u32, u32, u64) {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe is installed");
    assert!(o.status.success(), "ffprobe failed: {}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let v: Vec<u64> = s.split(',').map(|x| x.parse().unwrap()).collect();
    (v[0] as u32, v[1] as u32, v[2])
}

/// The test inputs in one folder: a 96×64 test pattern of 12 frames at 8 fps, a still mask
/// (white box in the middle), a 9-frame mask video, and a 40×40 and a 37×22 reference.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Inputs {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=96x64:rate=8",
            "-frames:v",
            "12",
            "-pix_fmt",
            "yuv420p",
            &p("src.mp4"),
        ]);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "color=black:size=96x64,drawbox=x=24:y=16:w=48:h=32:color=white:t=fill",
            "-frames:v",
            "1",
            &p("mask.png"),
        ]);
        // A box moving right, one mask per frame.
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "color=black:size=96x64:rate=8[b];color=white:size=32x32:rate=8[w];\
             [b][w]overlay=x='8+4*n':y=16[out0]",
            "-frames:v",
            "9",
            "-pix_fmt",
            "yuv420p",
            &p("mask.mp4"),
        ]);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "color=red:size=40x40",
            "-frames:v",
            "1",
            &p("subject.png"),
        ]);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "color=blue:size=38x22",
            "-frames:v",
            "1",
            &p("odd.png"),
        ]);
        Inputs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn edit(inputs: &Inputs, out: &Path, model: &Path, args: &[&str]) -> Output {
    run(kino()
        .arg("edit")
        .arg(inputs.path("src.mp4"))
        .arg("a red ball")
        .args(args)
        .args(["--cpu", "--steps", "2", "--seed", "7", "-o"])
        .arg(out)
        .arg("--model")
        .arg(model))
}

fn metadata(path: &Path) -> serde_json::Value {
    kino_media::read_metadata(path)
        .unwrap()
        .expect("kino writes its parameters")
}

fn info(path: &Path) -> String {
    let o = run(kino().arg("info").arg(path));
    assert!(o.status.success(), "kino info: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exactly one `error:` line, and it contains every one of `want`.
fn one_error(o: &Output, want: &[&str]) -> String {
    assert!(!o.status.success(), "expected a failure");
    let e = stderr(o);
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{e}");
    for w in want {
        assert!(errors[0].contains(w), "`{w}` missing from: {}", errors[0]);
    }
    assert!(!e.contains("panicked"), "{e}");
    errors[0].to_string()
}

#[test]
fn png_mask_edit_makes_the_model_clip_and_records_it() {
    let inputs = Inputs::new();
    let out = inputs.path("edited.mp4");
    let o = edit(
        &inputs,
        &out,
        &vace(),
        &[
            "--mask",
            inputs.path("mask.png").to_str().unwrap(),
            "--json",
        ],
    );
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    // The model's 48×32 clip of 9 frames (the source has 12: its first 9, and it says so).
    assert_eq!(ffprobe(&out), (48, 32, 9));
    let e = stderr(&o);
    assert!(e.contains("first 9 frames (of 12)"), "{e}");
    assert!(e.contains("25.0% of the video regenerated"), "{e}");
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["frames"], 9);
    let m = metadata(&out);
    let c = &m["conditioning"];
    assert_eq!(c["kind"], "masked edit");
    assert_eq!(c["mask"]["name"], "mask.png");
    assert_eq!(c["mask"]["frames"], "still");
    // The box is a quarter of the picture; the fit keeps the shape, so a quarter stays.
    assert_eq!(c["mask"]["regenerated"], 0.25);
    assert_eq!(c["mask"]["keep_masked"], false);
    assert_eq!(c["video"]["name"], "src.mp4");
    assert_eq!(c["video"]["frames"], 12);
    let shown = info(&out);
    assert!(shown.contains("conditioning: masked edit"), "{shown}");
    assert!(shown.contains("source video: src.mp4"), "{shown}");
    assert!(shown.contains("mask.png"), "{shown}");
}

/// PSNR of `a` against `b` over the pixels outside the box `(x0..x1, y0..y1)` grown by 2 px.
fn psnr_outside(
    a: &kino_media::Frame,
    b: &kino_media::Frame,
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
) -> f64 {
    let w = a.width() as usize;
    let (da, db) = (a.data(), b.data());
    let (mut se, mut n) = (0.0f64, 0usize);
    for (p, (pa, pb)) in da.chunks_exact(3).zip(db.chunks_exact(3)).enumerate() {
        let (x, y) = (p % w, p / w);
        if (x0.saturating_sub(2)..x1 + 2).contains(&x)
            && (y0.saturating_sub(2)..y1 + 2).contains(&y)
        {
            continue;
        }
        for c in 0..3 {
            let d = f64::from(pa[c]) - f64::from(pb[c]);
            se += d * d;
        }
        n += 3;
    }
    10.0 * (255.0f64 * 255.0 / (se / n as f64).max(1e-10)).log10()
}

#[test]
fn outside_the_mask_the_source_comes_back_unless_no_composite() {
    let inputs = Inputs::new();
    let mask = inputs.path("mask.png");
    let mask = mask.to_str().unwrap();
    let kept = inputs.path("kept.mp4");
    let o = edit(&inputs, &kept, &vace(), &["--mask", mask]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metadata(&kept)["conditioning"]["composite"], true);
    let raw = inputs.path("raw.mp4");
    let o = edit(&inputs, &raw, &vace(), &["--mask", mask, "--no-composite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metadata(&raw)["conditioning"]["composite"], false);
    // The source fitted to the model's 48×32 (the 96×64 mask box 24..72 × 16..48 → 12..36 × 8..24).
    let src = kino_media::read_video(&inputs.path("src.mp4")).unwrap();
    let (k, r) = (
        kino_media::read_mp4(&kept).unwrap(),
        kino_media::read_mp4(&raw).unwrap(),
    );
    for t in 0..9 {
        let fitted = kino_media::fit_crop(&src.frames()[t], 48, 32).unwrap();
        let pk = psnr_outside(&k.frames()[t], &fitted, 12, 36, 8, 24);
        let pr = psnr_outside(&r.frames()[t], &fitted, 12, 36, 8, 24);
        // Random weights make noise outside the mask (about 7 dB); put back, the source is
        // there up to the watermark, the fit's filter and H.264 at 48×32 on testsrc's sharp
        // edges (about 20 dB).
        assert!(
            pk > 17.0 && pk > pr + 8.0,
            "frame {t}: {pk:.1} dB put back, {pr:.1} dB raw"
        );
    }
}

#[test]
fn mp4_mask_gives_one_mask_per_frame() {
    let inputs = Inputs::new();
    let out = inputs.path("moving.mp4");
    let o = edit(
        &inputs,
        &out,
        &vace(),
        &[
            "--mask",
            inputs.path("mask.mp4").to_str().unwrap(),
            "--keep-masked",
        ],
    );
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    assert_eq!(ffprobe(&out), (48, 32, 9));
    let e = stderr(&o);
    assert!(e.contains("9 frames at 8 fps"), "{e}");
    assert!(e.contains("--keep-masked"), "{e}");
    let c = metadata(&out)["conditioning"].clone();
    assert_eq!(c["kind"], "masked edit");
    assert_eq!(c["mask"]["frames"], 9);
    assert_eq!(c["mask"]["keep_masked"], true);
    // A 32×32 box on 96×64 is a sixth of each frame; the fit keeps that share.
    let share = c["mask"]["regenerated"].as_f64().unwrap();
    assert!((share - 1.0 / 6.0).abs() < 0.02, "{share}");
}

#[test]
fn keep_masked_changes_what_the_model_sees() {
    // Same seed, no per-output watermark: the same command twice gives the same frames, and
    // --keep-masked (original pixels under the mask instead of gray) gives other frames.
    let inputs = Inputs::new();
    let mask = inputs.path("mask.png");
    let frames = |name: &str, extra: &[&str]| {
        let out = inputs.path(name);
        let mut args = vec![
            "--mask",
            mask.to_str().unwrap(),
            "--no-watermark",
            "--no-sign",
        ];
        args.extend_from_slice(extra);
        let o = edit(&inputs, &out, &vace(), &args);
        assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
        kino_media::read_video(&out).unwrap()
    };
    let a = frames("a.mp4", &[]);
    let b = frames("b.mp4", &[]);
    let k = frames("k.mp4", &["--keep-masked"]);
    assert_eq!(a.frames(), b.frames(), "same seed, same video");
    assert_ne!(
        a.frames(),
        k.frames(),
        "--keep-masked must change the input"
    );
}

#[test]
fn a_soft_mask_is_thresholded_with_a_warning() {
    let inputs = Inputs::new();
    let soft = inputs.path("soft.png");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:size=96x64,drawbox=x=24:y=16:w=48:h=32:color=white:t=fill,gblur=sigma=6",
        "-frames:v",
        "1",
        soft.to_str().unwrap(),
    ]);
    let out = inputs.path("soft.mp4");
    let o = edit(&inputs, &out, &vace(), &["--mask", soft.to_str().unwrap()]);
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    let e = stderr(&o);
    let warning = e
        .lines()
        .find(|l| l.starts_with("warning: --mask"))
        .unwrap_or_else(|| panic!("no warning about the grey mask in:\n{e}"));
    assert!(warning.contains("thresholded at 128"), "{warning}");
    let grey = metadata(&out)["conditioning"]["mask"]["grey_fraction"]
        .as_f64()
        .unwrap();
    assert!(grey > 0.05, "{grey}");
    // A hard mask gets no warning.
    let o = edit(
        &inputs,
        &inputs.path("hard.mp4"),
        &vace(),
        &["--mask", inputs.path("mask.png").to_str().unwrap()],
    );
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn outpaint_widens_to_the_rounded_canvas() {
    let inputs = Inputs::new();
    // 1.5x of the 48×32 fit is 72×48; this model's sizes are multiples of 16: 80×48.
    let out = inputs.path("wide.mp4");
    let o = edit(&inputs, &out, &vace(), &["--outpaint", "1.5x"]);
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    assert_eq!(ffprobe(&out), (80, 48, 9));
    let e = stderr(&o);
    assert!(e.contains("canvas 72×48 rounded to 80×48"), "{e}");
    let c = metadata(&out)["conditioning"].clone();
    assert_eq!(c["outpaint"]["canvas"], "80x48");
    assert_eq!(c["outpaint"]["source_area"], "48x32 at 16,8");
    // A canvas given outright, already a multiple: no rounding said.
    let out = inputs.path("canvas.mp4");
    let o = edit(&inputs, &out, &vace(), &["--canvas", "96x32"]);
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    assert_eq!(ffprobe(&out), (96, 32, 9));
    assert!(!stderr(&o).contains("rounded"), "{}", stderr(&o));
}

#[test]
fn references_work_and_kino_info_shows_them() {
    let inputs = Inputs::new();
    let out = inputs.path("subject.mp4");
    let o = run(kino()
        .args(["generate", "a ball", "--cpu", "--steps", "2", "--seed", "3"])
        .arg("--reference")
        .arg(inputs.path("subject.png"))
        .arg("--reference")
        .arg(inputs.path("odd.png"))
        .args(["--conditioning-scale", "0.5", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(vace()));
    assert!(o.status.success(), "kino generate failed: {}", stderr(&o));
    assert_eq!(ffprobe(&out), (48, 32, 9));
    // 38×22 is not a multiple of 8 (2^len(temperal_downsample) for this VAE): snapped to 32×16.
    let e = stderr(&o);
    assert!(e.contains("resized to 32×16 (multiples of 8"), "{e}");
    let c = metadata(&out)["conditioning"].clone();
    assert_eq!(c["kind"], "references");
    let refs = c["references"].as_array().unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0]["name"], "subject.png", "order kept");
    assert_eq!(refs[1]["name"], "odd.png");
    assert_eq!(c["conditioning_scale"], serde_json::json!([0.5]));
    let shown = info(&out);
    assert!(shown.contains("conditioning: references"), "{shown}");
    assert!(
        shown.contains("subject.png") && shown.contains("odd.png"),
        "{shown}"
    );
    // With kino edit too: a masked edit with references.
    let out = inputs.path("both.mp4");
    let o = edit(
        &inputs,
        &out,
        &vace(),
        &[
            "--mask",
            inputs.path("mask.png").to_str().unwrap(),
            "--reference",
            inputs.path("subject.png").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "kino edit failed: {}", stderr(&o));
    assert_eq!(
        metadata(&out)["conditioning"]["kind"],
        "masked edit with references"
    );
}

#[test]
fn bad_masks_each_get_one_clear_error_and_write_nothing() {
    let inputs = Inputs::new();
    let p = |n: &str| inputs.path(n).to_string_lossy().into_owned();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=white:size=64x64",
        "-frames:v",
        "1",
        &p("square.png"),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:size=96x64",
        "-frames:v",
        "1",
        &p("black.png"),
    ]);
    std::fs::write(inputs.path("broken.png"), b"this is not a picture").unwrap();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=white:size=96x64:rate=8",
        "-frames:v",
        "4",
        "-pix_fmt",
        "yuv420p",
        &p("short.mp4"),
    ]);
    let cases: [(&str, &[&str]); 4] = [
        ("square.png", &["64x64", "96x64", "shapes differ"]),
        ("black.png", &["all black", "nothing would be edited"]),
        (
            "broken.png",
            &["broken.png", "neither a picture", "nor a video"],
        ),
        ("short.mp4", &["4 frames", "needs 9 frames"]),
    ];
    for (mask, want) in cases {
        let out = inputs.path("never.mp4");
        let o = edit(&inputs, &out, &vace(), &["--mask", &p(mask)]);
        let e = one_error(&o, want);
        assert!(e.contains(mask), "the error names the mask: {e}");
        assert!(!out.exists(), "{mask}: nothing may be written");
    }
}

#[test]
fn a_model_without_vace_is_refused_with_the_vace_models_named() {
    let inputs = Inputs::new();
    let shapes = repo().join("models/kino-shapes");
    let out = inputs.path("never.mp4");
    let mask = inputs.path("mask.png");
    let o = edit(&inputs, &out, &shapes, &["--mask", mask.to_str().unwrap()]);
    one_error(&o, &["no mask or reference images", "wan2.1-vace-1.3b"]);
    assert!(!out.exists());
    let o = run(kino()
        .args(["generate", "a ball", "--cpu", "--reference"])
        .arg(inputs.path("subject.png"))
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(&shapes));
    one_error(&o, &["no mask or reference images", "wan2.1-vace-1.3b"]);
    assert!(!out.exists());
}
