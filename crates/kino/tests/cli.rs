//! End-to-end tests of the `kino` binary on tiny random-weight model folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{copy_dir, kino, repo, run, stderr};

/// A private copy of a tiny random-weight Wan model folder (so a test may break it).
fn tiny_model(tmp: &Path, which: &str) -> PathBuf {
    let dst = tmp.join(which);
    copy_dir(
        &repo().join("fixtures/data").join(which).join("model"),
        &dst,
    );
    dst
}

/// `kino generate ARGS… -o OUT --model MODEL` (ARGS starts with the prompt).
fn generate(model: &Path, out: &Path, args: &[&str]) -> Output {
    run(kino()
        .arg("generate")
        .args(args)
        .arg("-o")
        .arg(out)
        .arg("--model")
        .arg(model))
}

fn ffprobe_json(path: &Path) -> serde_json::Value {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-print_format",
            "json",
            "-show_streams",
            "-show_format",
        ])
        .arg(path)
        .output()
        .expect("ffprobe is installed (Debian package ffmpeg; .ci/run installs it)");
    assert!(o.status.success(), "ffprobe failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn generate_writes_a_valid_mp4_with_its_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let out = tmp.path().join("clip.mp4");
    let o = generate(
        &model,
        &out,
        &[
            "a red circle moving right",
            "--size",
            "96x64",
            "--frames",
            "9",
            "--steps",
            "3",
            "--seed",
            "7",
            "--fps",
            "8",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["frames"], 9);
    assert_eq!(summary["seed"], 7);

    let p = ffprobe_json(&out);
    let s = &p["streams"][0];
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(s["width"], 96);
    assert_eq!(s["height"], 64);
    assert_eq!(s["nb_read_frames"], "9");
    let dur: f64 = p["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 9.0 / 8.0).abs() < 1e-3, "duration {dur}");

    let o = run(kino().args(["info", "--json"]).arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["frames"], 9);
    assert_eq!(info["width"], 96);
    let g = &info["generation"];
    assert_eq!(g["prompt"], "a red circle moving right");
    assert_eq!(g["seed"], 7);
    assert_eq!(g["steps"], 3);
    assert_eq!(g["frames"], 9);

    // Same seed, same settings: the same video. Each output's watermark carries its own id, so
    // the pixels are compared without it (and the marked one stays close).
    let same = |name: &str| {
        let path = tmp.path().join(name);
        let o = generate(
            &model,
            &path,
            &[
                "a red circle moving right",
                "--size",
                "96x64",
                "--frames",
                "9",
                "--steps",
                "3",
                "--seed",
                "7",
                "--fps",
                "8",
                "--no-watermark",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        kino_media::read_mp4(&path).unwrap()
    };
    let b = same("clip2.mp4");
    let c = same("clip3.mp4");
    assert!(b
        .frames()
        .iter()
        .zip(c.frames())
        .all(|(x, y)| x.data() == y.data()));
    let a = kino_media::read_mp4(&out).unwrap();
    let (mut sq, mut n) = (0f64, 0f64);
    for (x, y) in a.frames().iter().zip(b.frames()) {
        for (p, q) in x.data().iter().zip(y.data()) {
            sq += (*p as f64 - *q as f64).powi(2);
            n += 1.0;
        }
    }
    let psnr = 10.0 * (255f64.powi(2) / (sq / n)).log10();
    assert!(
        n > 0.0 && psnr > 36.0,
        "marked vs unmarked PSNR {psnr:.1} dB"
    );

    // Never overwrite silently.
    let o = generate(&model, &out, &["again"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

#[test]
fn generate_gif_and_png_folder_and_wan22() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan22");
    let gif = tmp.path().join("clip.gif");
    let o = generate(&model, &gif, &["blue square", "--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = ffprobe_json(&gif);
    assert_eq!(p["streams"][0]["codec_name"], "gif");
    assert_eq!(p["streams"][0]["width"], 192);
    assert_eq!(p["streams"][0]["nb_read_frames"], "17");

    let dir = tmp.path().join("frames");
    let o = generate(
        &model,
        &dir,
        &["blue square", "--steps", "2", "--frames", "5"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let pngs = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, 5);
    assert!(dir.join("params.json").exists());
}

#[test]
fn bad_requests_get_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--size", "100x64"],
            "width 100 is not a multiple of 16, which this model needs; try 96 or 112",
        ),
        (&["--size", "96x0"], "zero side"),
        (&["--size", "96"], "WIDTHxHEIGHT"),
        (
            &["--frames", "10"],
            "10 frames is not a valid frame count: this model makes 4·k + 1 frames; try 9 or 13",
        ),
        (&["--steps", "0"], "0 steps is out of range"),
        (&["--guidance=-1"], "guidance scale -1 must be"),
        (
            &["-o", "/nonexistent-dir/x.mp4"],
            "folder /nonexistent-dir does not exist",
        ),
        (&["-o", "clip.avi"], "cannot write `.avi` files"),
    ];
    for (args, want) in cases {
        let o = run(kino()
            .current_dir(tmp.path())
            .args(["generate", "a cat"])
            .args(*args)
            .arg("--model")
            .arg(&model));
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: expected `{want}` in: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
    let o = run(kino().args(["generate", "a cat", "--model", "sora-3"]));
    let e = stderr(&o);
    assert!(
        e.contains("unknown model `sora-3`") && e.contains("wan2.1-t2v-1.3b"),
        "{e}"
    );
    let o = run(kino().args(["generate", "   "]));
    assert!(stderr(&o).contains("the prompt is empty"), "{}", stderr(&o));
}

#[test]
fn broken_model_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // Not a model folder.
    let o = run(kino()
        .current_dir(tmp.path())
        .args(["generate", "a cat", "--model"])
        .arg(tmp.path()));
    let e = stderr(&o);
    assert!(
        e.contains("model_index.json") && e.contains("is not a model folder"),
        "{e}"
    );

    // A truncated weight file.
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let w = model.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(kino()
        .current_dir(tmp.path())
        .args(["generate", "a cat", "--model"])
        .arg(&model));
    let e = stderr(&o);
    assert!(
        e.contains("truncated") && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );

    // A missing VAE weight file.
    let model = tiny_model(&tmp.path().join("b"), "pipeline-wan21");
    std::fs::remove_file(model.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let o = run(kino()
        .current_dir(tmp.path())
        .args(["generate", "a cat", "--model"])
        .arg(&model));
    let e = stderr(&o);
    assert!(e.contains("missing file") && e.contains("vae"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn parity_cli_reproduces_a_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let case = repo().join("fixtures/data/transformer-wan22");
    let out = tmp.path().join("out.safetensors");
    let o = run(kino()
        .args(["parity", "transformer", "--model"])
        .arg(case.join("transformer"))
        .arg("--input")
        .arg(case.join("input.safetensors"))
        .arg("--output")
        .arg(&out)
        .arg("--expected")
        .arg(case.join("expected.safetensors")));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let err: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sample: relative error "))
        .expect("error line")
        .parse()
        .unwrap();
    assert!(err <= 1e-4, "{err}");
    assert!(out.exists());

    let o = run(kino().args([
        "parity", "unet", "--model", ".", "--input", "x", "--output", "y",
    ]));
    assert!(
        stderr(&o).contains("unknown component `unet`"),
        "{}",
        stderr(&o)
    );
    let o = run(kino()
        .args(["parity", "vae-decode", "--model"])
        .arg(case.join("transformer"))
        .arg("--input")
        .arg(case.join("input.safetensors"))
        .arg("--output")
        .arg(&out));
    assert!(stderr(&o).contains("has no tensor `z`"), "{}", stderr(&o));
}

#[test]
fn info_on_a_corrupt_file_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("broken.mp4");
    std::fs::write(&f, b"\0\0\0\x18ftypisom garbage garbage").unwrap();
    let o = run(kino().arg("info").arg(&f));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.starts_with("error:") && !e.contains("panicked"), "{e}");
}

#[test]
fn models_lists_the_known_aliases() {
    let o = run(kino().args(["models"]).env("HF_HUB_CACHE", "/nonexistent"));
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("wan2.1-t2v-1.3b") && s.contains("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
        "{s}"
    );
    assert!(
        s.contains("wan2.2-ti2v-5b") && s.contains("Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
        "{s}"
    );
    // The bundled model is listed, present (it ships in the repository) and the default.
    let line = s
        .lines()
        .find(|l| l.starts_with("kino-shapes"))
        .unwrap_or_else(|| panic!("no kino-shapes row in\n{s}"));
    assert!(
        line.contains("yes") && line.ends_with("(default)"),
        "{line}"
    );
}

#[test]
fn pull_without_network_fails_at_once_and_says_what_to_do() {
    let start = std::time::Instant::now();
    let o = run(kino()
        .args(["pull", "wan2.1-t2v-1.3b"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", "/nonexistent"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("cannot reach 127.0.0.1:9"), "{e}");
    assert!(
        e.contains("--model /path/to/Wan2.1-T2V-1.3B-Diffusers"),
        "{e}"
    );
    assert!(start.elapsed().as_secs() < 10);
    let o = run(kino().args(["pull", "wan9"]));
    assert!(
        stderr(&o).contains("unknown model `wan9`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn vae_tiling_decodes_large_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let out = tmp.path().join("wide.mp4");
    let o = generate(
        &model,
        &out,
        &[
            "wide",
            "--size",
            "320x272",
            "--frames",
            "5",
            "--steps",
            "1",
            "--vae-tiling",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = ffprobe_json(&out);
    assert_eq!(p["streams"][0]["width"], 320);
    assert_eq!(p["streams"][0]["height"], 272);
}

#[test]
fn ctrl_c_stops_cleanly_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let out = tmp.path().join("stopped.mp4");
    let child = kino()
        .env_remove("KINO_MODEL")
        .args([
            "generate", "long", "--size", "480x320", "--frames", "33", "--steps", "1000", "-o",
        ])
        .arg(&out)
        .arg("--model")
        .arg(&model)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let start = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    assert!(
        start.elapsed().as_secs() < 20,
        "took {:?} to stop",
        start.elapsed()
    );
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cancelled; nothing was written"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

// ---- Starting from a picture or a clip (issue 16): --image, --last-image, --video ----------

/// A 640×480 PNG: a red square on black, off centre.
fn start_png(dir: &Path) -> PathBuf {
    let p = dir.join("start.png");
    let f = kino_media::Frame::from_fn(640, 480, |x, y| {
        if (300..380).contains(&x) && (200..280).contains(&y) {
            [220, 30, 30]
        } else {
            [0, 0, 0]
        }
    })
    .unwrap();
    kino_media::write_image(&p, &f).unwrap();
    p
}

/// An H.264 High (B-frames) clip made by the ffmpeg command line: `seconds` of testsrc at 30 fps.
fn source_clip(dir: &Path, name: &str, seconds: u32) -> PathBuf {
    let p = dir.join(name);
    let o = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc=size=320x240:rate=30:duration={seconds}"))
        .args([
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-bf",
            "3",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&p)
        .output()
        .expect("ffmpeg is installed (Debian package ffmpeg; .ci/run installs it)");
    assert!(o.status.success(), "ffmpeg: {}", stderr(&o));
    p
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(std::fs::read(path).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn info_json(path: &Path) -> serde_json::Value {
    let o = run(kino().arg("info").arg(path).arg("--json"));
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Image-to-video on the tiny Wan2.2 TI2V folder: the picture is fitted (and says how), and the
/// output's metadata, `--json` and `kino info` name it with its sha256.
#[test]
fn generate_from_an_image_records_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan22");
    let image = start_png(tmp.path());
    let out = tmp.path().join("from-image.mp4");
    let o = generate(
        &model,
        &out,
        &[
            "a red square",
            "--image",
            image.to_str().unwrap(),
            "--steps",
            "2",
            "--seed",
            "3",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    // 640×480 onto 192×128: cover (192×144), then the centre 192×128.
    assert!(
        e.contains(
            "first image start.png 640×480 → resized to 192×144 and centre-cropped to 192×128"
        ),
        "{e}"
    );
    let sha = sha256_hex(&image);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["conditioning"]["kind"], "image");
    assert_eq!(summary["conditioning"]["image"]["sha256"], sha.as_str());

    let info = info_json(&out);
    let c = &info["generation"]["conditioning"];
    assert_eq!(c["kind"], "image", "{info}");
    assert_eq!(c["image"]["name"], "start.png");
    assert_eq!(c["image"]["sha256"], sha.as_str());
    assert_eq!(c["image"]["size"], "640x480");
    assert!(c.get("video").is_none() && c.get("last_image").is_none());

    let o = run(kino().arg("info").arg(&out));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("first image: start.png (640x480), sha256 {sha}")),
        "{text}"
    );
    // The video has the request's size and length (the tiny model's weights are random, so
    // its pixels say nothing about the picture).
    let v = kino_media::read_video(&out).unwrap();
    assert_eq!((v.width(), v.height(), v.len()), (192, 128, 17));
}

/// Video-to-video on the tiny Wan2.1 folder: an H.264 High clip at 30 fps is resampled to the
/// video's 8 fps and fitted; its name, sha256 and the strength are recorded.
#[test]
fn generate_from_a_video_records_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), "pipeline-wan21");
    let clip = source_clip(tmp.path(), "source.mp4", 3);
    let out = tmp.path().join("restyled.mp4");
    let o = generate(
        &model,
        &out,
        &[
            "a red circle",
            "--video",
            clip.to_str().unwrap(),
            "--strength",
            "0.5",
            "--size",
            "96x64",
            "--frames",
            "9",
            "--fps",
            "8",
            "--steps",
            "4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("source video source.mp4 320×240 at 30 fps → 9 frames at 8 fps from 30 fps (nearest frame), resized to 96×72 and centre-cropped to 96×64"),
        "{e}"
    );
    let info = info_json(&out);
    let c = &info["generation"]["conditioning"];
    assert_eq!(c["kind"], "video", "{info}");
    assert_eq!(c["strength"], 0.5);
    assert_eq!(c["video"]["name"], "source.mp4");
    assert_eq!(c["video"]["sha256"], sha256_hex(&clip).as_str());
    assert_eq!(c["video"]["size"], "320x240");
    let o = run(kino().arg("info").arg(&out));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("source video: source.mp4 (320x240 at 30 fps)"),
        "{text}"
    );
    assert!(text.contains("strength: 0.5"), "{text}");

    // Without --strength, --video runs at 0.7.
    let out2 = tmp.path().join("default-strength.mp4");
    let o = generate(
        &model,
        &out2,
        &["a cat", "--video", clip.to_str().unwrap(), "--steps", "4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        info_json(&out2)["generation"]["conditioning"]["strength"],
        0.7
    );
}

/// Every bad input: one clear error, a non-zero exit, and no output file.
#[test]
fn bad_image_and_video_inputs_get_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let t2v = tiny_model(dir, "pipeline-wan21");
    let ti2v = tiny_model(dir, "pipeline-wan22");
    let i2v = tiny_model(dir, "pipeline-i2v-wan21");
    let image = start_png(dir);
    let short = source_clip(dir, "short.mp4", 1);
    let garbage_png = dir.join("garbage.png");
    std::fs::write(&garbage_png, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let truncated_png = dir.join("truncated.png");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&truncated_png, &bytes[..bytes.len() / 2]).unwrap();
    let garbage_mp4 = dir.join("garbage.mp4");
    std::fs::write(
        &garbage_mp4,
        (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let truncated_mp4 = dir.join("truncated.mp4");
    let bytes = std::fs::read(&short).unwrap();
    std::fs::write(&truncated_mp4, &bytes[..bytes.len() / 3]).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();

    let cases: Vec<(&Path, Vec<String>, Vec<&str>)> = vec![
        (
            &ti2v,
            vec!["--last-image".into(), p(&image)],
            vec!["--image"],
        ),
        (
            &ti2v,
            vec!["--image".into(), p(&image), "--video".into(), p(&short)],
            vec!["cannot be used with"],
        ),
        (
            &t2v,
            vec!["--strength".into(), "0.5".into()],
            vec!["--video"],
        ),
        (
            &t2v,
            vec!["--video".into(), p(&short), "--strength".into(), "0".into()],
            vec!["--strength 0 is outside (0, 1]"],
        ),
        (
            &t2v,
            vec![
                "--video".into(),
                p(&short),
                "--strength".into(),
                "1.5".into(),
            ],
            vec!["--strength 1.5 is outside (0, 1]", "try 0.7"],
        ),
        (
            &ti2v,
            vec!["--image".into(), p(&dir.join("missing.png"))],
            vec!["missing.png", "exists"],
        ),
        (
            &ti2v,
            vec!["--image".into(), p(&garbage_png)],
            vec!["garbage.png"],
        ),
        (
            &ti2v,
            vec!["--image".into(), p(&truncated_png)],
            vec!["truncated.png", "truncated"],
        ),
        (
            &ti2v,
            vec!["--image".into(), p(&short)],
            vec!["short.mp4", "PNG, JPEG or WebP"],
        ),
        (
            &t2v,
            vec!["--video".into(), p(&dir.join("missing.mp4"))],
            vec!["missing.mp4", "exists"],
        ),
        (
            &t2v,
            vec!["--video".into(), p(&garbage_mp4)],
            vec!["garbage.mp4"],
        ),
        (
            &t2v,
            vec!["--video".into(), p(&truncated_mp4)],
            vec!["truncated.mp4", "truncated"],
        ),
        (
            &t2v,
            vec!["--video".into(), p(&image)],
            vec!["start.png", "still PNG image"],
        ),
        // 1 s of source; 17 frames at 8 fps need 2 s.
        (
            &t2v,
            vec![
                "--video".into(),
                p(&short),
                "--frames".into(),
                "17".into(),
                "--fps".into(),
                "8".into(),
            ],
            vec![
                "too short",
                "30 frames (1.00 s at 30 fps)",
                "--frames or --seconds",
            ],
        ),
        (
            &t2v,
            vec!["--image".into(), p(&image)],
            vec!["cannot start from an image", "wan2.2-ti2v-5b"],
        ),
        (
            &ti2v,
            vec![
                "--image".into(),
                p(&image),
                "--last-image".into(),
                p(&image),
            ],
            vec!["first image only", "wan2.1-flf2v-14b-720p"],
        ),
        (&i2v, vec![], vec!["needs a first image", "--image"]),
        (
            &i2v,
            vec!["--video".into(), p(&short)],
            vec!["cannot restyle a video"],
        ),
    ];
    for (i, (model, args, wants)) in cases.iter().enumerate() {
        let out = dir.join(format!("out-{i}.mp4"));
        let o = run(kino()
            .args(["generate", "a red square"])
            .args(args)
            .arg("-o")
            .arg(&out)
            .arg("--model")
            .arg(model));
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail: {e}");
        for want in wants {
            assert!(e.contains(want), "{args:?}: expected `{want}` in: {e}");
        }
        assert!(!e.contains("panicked"), "{e}");
        assert_eq!(
            e.lines().filter(|l| l.starts_with("error")).count(),
            1,
            "{args:?}: one error: {e}"
        );
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

/// `kino bench attention` times Kino's attention on the shapes asked for (a few hundred tokens,
/// without the PyTorch side, then with it over three runs: medians and pair ratios) and prints
/// its row; `--runs` out of range or on `video`, and an unknown benchmark, are refused.
#[test]
fn bench_attention_runs_and_unknown_benchmarks_are_refused() {
    let o = run(kino().args(["bench", "attention", "--tokens", "300", "--no-reference"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let row = out
        .lines()
        .find(|l| l.starts_with("attention 300"))
        .unwrap_or_else(|| panic!("no attention row in {out}"));
    let secs: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
    // Printed to 1/100 s: a few hundred tokens may show as 0.00.
    assert!((0.0..60.0).contains(&secs), "{row}");
    // Several runs, Kino and PyTorch in turn: the medians in the row, each pair's ratio below.
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = run(kino()
        .args(["bench", "attention", "--tokens", "200", "--runs", "3"])
        .env("KINO_PYTHON", &python));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("timing PyTorch").count(),
        3,
        "{}",
        stderr(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("attention 200"))
        .unwrap_or_else(|| panic!("no attention row in {out}"))
        .split_whitespace()
        .collect();
    let spread = out
        .lines()
        .find(|l| l.starts_with("attention 200: 3 runs each"))
        .unwrap_or_else(|| panic!("no line of the runs in {out}"));
    let pairs: Vec<f64> = spread
        .split(['(', ')'])
        .nth(1)
        .unwrap()
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(pairs.len(), 3, "{spread}");
    let mut sorted = pairs.clone();
    sorted.sort_by(f64::total_cmp);
    let median: f64 = row[4].parse().unwrap();
    assert!(
        (median - sorted[1]).abs() < 1.5e-3,
        "median {median} of {pairs:?}"
    );
    // Refused with a message that says why (a padded prompt is the transformer's setting)…
    let refused: &[(&[&str], &str)] = &[
        (&["video", "--runs", "2"], "--runs applies to"),
        (
            &["attention", "--tokens", "0"],
            "--tokens must be at least 1",
        ),
        (
            &["attn"],
            "choose transformer, vae, attention, all or video",
        ),
        (
            &["vae", "--prompt-tokens", "40"],
            "--prompt-tokens applies to the transformer",
        ),
    ];
    for (args, want) in refused {
        let o = run(kino().arg("bench").args(*args));
        assert!(!o.status.success(), "{args:?} was taken");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    // …and refused outright: runs from 1, prompt tokens 1 to 512.
    let bad: &[&[&str]] = &[
        &["attention", "--runs", "0"],
        &["transformer", "--prompt-tokens", "0"],
        &["transformer", "--prompt-tokens", "513"],
    ];
    for args in bad {
        let o = run(kino().arg("bench").args(*args));
        assert!(!o.status.success(), "{args:?} was taken");
    }
}
