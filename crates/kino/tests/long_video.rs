//! Long videos end to end: `kino generate --seconds 60` and `--script` in segments, `kino extend`
//! of an outside MP4, `--resume` after an interrupted run, peak memory of a 4-segment run
//! against a 1-segment one and of extending a long source against a short one, and the errors
//! a user can cause. On the tiny random-weight
//! `pipeline-wan22` folder (Wan2.2 TI2V form: takes a first image; 192×128, 17 frames, 8 fps).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{kino, repo, run, stderr};

fn ti2v() -> PathBuf {
    repo().join("fixtures/data/pipeline-wan22/model")
}

fn text_only() -> PathBuf {
    repo().join("fixtures/data/pipeline-wan21/model")
}

fn generate(out: &Path, args: &[&str]) -> Output {
    run(kino()
        .arg("generate")
        .args(args)
        .args(["--cpu", "--steps", "2", "-o"])
        .arg(out)
        .arg("--model")
        .arg(ti2v()))
}

/// Frames ffprobe counts by decoding the file.
fn ffprobe_frames(path: &Path) -> (u64, String) {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames,r_frame_rate",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe is installed (Debian package ffmpeg; .ci/run installs it)");
    assert!(o.status.success(), "ffprobe failed: {}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut it = s.split(',');
    let rate = it.next().unwrap_or_default().to_string();
    let n = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (n, rate)
}

fn metadata(path: &Path) -> serde_json::Value {
    kino_media::read_metadata(path)
        .unwrap()
        .expect("kino writes its parameters")
}

fn json_out(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "kino failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn sixty_seconds_from_one_command_in_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("minute.mp4");
    let o = generate(
        &out,
        &[
            "a red circle moving right",
            "--seconds",
            "60",
            "--seed",
            "5",
            "--json",
        ],
    );
    let j = json_out(&o);
    let err = stderr(&o);
    // 8 fps × 60 s = 480 frames: 17 + 28 × 16 + 15.
    assert_eq!(ffprobe_frames(&out), (480, "8/1".to_string()));
    assert_eq!(j["segments"], 30);
    assert!(
        err.contains("segment 1 of 30") && err.contains("segment 30 of 30"),
        "{err}"
    );
    assert!(
        err.contains(" left)"),
        "progress shows the time left: {err}"
    );
    let m = metadata(&out);
    assert_eq!(m["frames"], 480);
    let segs = m["long_video"]["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 30);
    assert_eq!(segs[1]["seed"], 6);
    assert_eq!(segs[1]["dropped"], 1);
    assert_eq!(segs[29]["first_frame"], 465);
    assert!(!tmp.path().join("minute.kino-partial").exists());
    let boxes: Vec<String> = kino_media::mp4_boxes(&out)
        .unwrap()
        .into_iter()
        .map(|b| b.kind)
        .filter(|k| k != "uuid")
        .collect();
    // (A `uuid` box after ftyp holds the C2PA manifest when the output is signed.)
    assert_eq!(boxes, ["ftyp", "moov", "mdat"]);
    eprintln!(
        "60 s: seams {} (random weights), peak memory {} bytes",
        j["seams"], j["peak_memory_bytes"]
    );
}

#[test]
fn a_script_makes_one_segment_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("shots.txt");
    std::fs::write(
        &script,
        "# four shots\nmoving right\nmoving down\n\nmoving left\nmoving up\n",
    )
    .unwrap();
    let out = tmp.path().join("shots.mp4");
    let o = run(kino()
        .args(["generate", "--script"])
        .arg(&script)
        .args(["--cpu", "--steps", "2", "--seed", "1", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(ti2v()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ffprobe_frames(&out).0, 17 + 3 * 16);
    let m = metadata(&out);
    let prompts: Vec<&str> = m["long_video"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(
        prompts,
        ["moving right", "moving down", "moving left", "moving up"]
    );
    assert!(stderr(&o).contains("segment 4 of 4: \"moving up\""));
    assert_eq!(m["long_video"]["color_match"], false);

    // --color-match: the same plan, each continued segment's colours matched to the frame it
    // continues; recorded, and the first segment (nothing to match) unchanged.
    let matched = tmp.path().join("shots-matched.mp4");
    let o = run(kino()
        .args(["generate", "--script"])
        .arg(&script)
        .args([
            "--cpu",
            "--steps",
            "2",
            "--seed",
            "1",
            "--color-match",
            "-o",
        ])
        .arg(&matched)
        .arg("--model")
        .arg(ti2v()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(ffprobe_frames(&matched).0, 17 + 3 * 16);
    let mm = metadata(&matched);
    assert_eq!(mm["long_video"]["color_match"], true);
    assert!(
        mm["long_video"]["seams"]
            .as_str()
            .unwrap()
            .contains("colours matched"),
        "{mm}"
    );
    let (a, b) = (
        kino_media::read_mp4(&out).unwrap(),
        kino_media::read_mp4(&matched).unwrap(),
    );
    // (Each file carries its own watermark id, so frames agree only to the mark's level.)
    let psnr = |r: std::ops::Range<usize>| {
        let v: Vec<f64> = r
            .map(|i| kino_media::psnr(&a.frames()[i], &b.frames()[i]).unwrap())
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (first, later) = (psnr(0..17), psnr(17..65));
    eprintln!("PSNR plain vs matched: segment 0 {first:.1} dB, later {later:.1} dB");
    assert!(first > 33.0, "segment 0 is not matched: {first:.1} dB");
    assert!(
        later < first - 6.0,
        "later segments are: {later:.1} vs {first:.1} dB"
    );
}

/// An H.264 High (B-frames) clip from the ffmpeg command line: 1.5 s of testsrc at 24 fps.
fn outside_clip(dir: &Path) -> PathBuf {
    let p = dir.join("outside.mp4");
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
        .arg("testsrc=size=320x240:rate=24:duration=1.5")
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

#[test]
fn extend_an_outside_mp4() {
    let tmp = tempfile::tempdir().unwrap();
    let src = outside_clip(tmp.path());
    let out = tmp.path().join("extended.mp4");
    let o = run(kino()
        .arg("extend")
        .arg(&src)
        .args([
            "the picture keeps going",
            "--seconds",
            "4",
            "--cpu",
            "--steps",
            "2",
            "--json",
        ])
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(ti2v()));
    let j = json_out(&o);
    let err = stderr(&o);
    // 1.5 s at 8 fps = 12 source frames, then 32 new ones (16 + 16: frame 0 of each dropped).
    assert_eq!(ffprobe_frames(&out), (44, "8/1".to_string()));
    assert_eq!(j["source_frames"], 12);
    assert_eq!(j["new_frames"], 32);
    assert!(
        err.contains("outside.mp4 320×240, 36 frames at 24.000 fps → 12 frames at 8 fps"),
        "{err}"
    );
    assert!(err.contains("re-encoded"), "{err}");
    let m = metadata(&out);
    assert_eq!(m["source"]["name"], "outside.mp4");
    assert_eq!(m["source"]["sha256"], sha256_hex(&src));
    assert_eq!(m["source"]["frames_in_output"], 12);
    assert_eq!(m["long_video"]["start"], "continue");
    assert_eq!(m["long_video"]["segments"][0]["first_frame"], 12);
    assert_eq!(m["frames"], 44);
    // The copied source survives the re-encode: the first output frame looks like the first
    // source frame fitted to 192×128.
    let back = kino_media::read_mp4(&out).unwrap();
    let srcv = kino_media::read_video(&src).unwrap();
    let fitted = kino_media::fit_crop(&srcv.frames()[0], 192, 128).unwrap();
    let p = kino_media::psnr(&fitted, &back.frames()[0]).unwrap();
    assert!(p > 25.0, "source frame 0 copied: PSNR {p:.1}");
}

#[test]
fn resume_redoes_no_finished_segment_and_makes_the_same_video() {
    let tmp = tempfile::tempdir().unwrap();
    // Frames compared exactly: without the (per-output) watermark.
    let args = [
        "a blue square",
        "--seconds",
        "8",
        "--seed",
        "11",
        "--no-watermark",
    ];
    // Uninterrupted, for comparison: 64 frames in 4 segments (17 + 16 + 16 + 15).
    let whole = tmp.path().join("whole.mp4");
    let o = generate(&whole, &args);
    assert!(o.status.success(), "{}", stderr(&o));

    let out = tmp.path().join("long.mp4");
    let partial = tmp.path().join("long.kino-partial");
    let o = run(kino()
        .arg("generate")
        .args(args)
        .args(["--cpu", "--steps", "2", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(ti2v())
        .env("KINO_TEST_STOP_AFTER_SEGMENTS", "2"));
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 of 4 segments are kept"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no output from an interrupted run");
    assert!(partial.join("manifest.json").is_file());
    // Without --resume: refused, nothing touched.
    let o = generate(&out, &args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    // Other settings: refused, saying which.
    let o = generate(
        &out,
        &[
            "a blue square",
            "--seconds",
            "8",
            "--seed",
            "12",
            "--resume",
        ],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cannot resume") && e.contains("seed 11 → 12"),
        "{e}"
    );

    // Resumed (the seed comes from the unfinished run): segments 3 and 4 only.
    let o = generate(
        &out,
        &[
            "a blue square",
            "--seconds",
            "8",
            "--resume",
            "--no-watermark",
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("resuming: 2 of 4 segments already made"), "{e}");
    assert!(
        !e.contains("segment 1 of 4") && !e.contains("segment 2 of 4"),
        "{e}"
    );
    assert!(
        e.contains("segment 3 of 4") && e.contains("segment 4 of 4"),
        "{e}"
    );
    assert!(
        !partial.exists(),
        "the sidecar folder is removed on success"
    );
    assert_eq!(ffprobe_frames(&out).0, 64);
    let a = kino_media::read_mp4(&whole).unwrap();
    let b = kino_media::read_mp4(&out).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(
        a.frames().iter().zip(b.frames()).all(|(x, y)| x == y),
        "a resumed run makes the same video as an uninterrupted one"
    );
}

/// Conditioned segments on both sides (`kino extend`: every segment encodes its first frame
/// through the VAE), at 384×256 so that frames weigh: a whole segment is 17 × 295 KB.
#[test]
fn peak_memory_of_four_segments_is_that_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = outside_clip(tmp.path());
    let peak = |seconds: &str, segments: usize| -> u64 {
        let out = tmp.path().join(format!("ext-{seconds}.mp4"));
        let o = run(kino()
            .arg("extend")
            .arg(&src)
            .args(["a green triangle", "--seconds", seconds])
            .args([
                "--cpu", "--steps", "2", "--seed", "3", "--size", "384x256", "--json", "-o",
            ])
            .arg(&out)
            .arg("--model")
            .arg(ti2v()));
        let j = json_out(&o);
        assert_eq!(j["segments"], segments);
        j["peak_memory_bytes"].as_u64().expect("VmHWM on Linux")
    };
    let one = peak("2", 1);
    let four = peak("8", 4);
    eprintln!(
        "peak memory: 1 segment {:.1} MiB, 4 segments {:.1} MiB ({:.3}×)",
        one as f64 / 1048576.0,
        four as f64 / 1048576.0,
        four as f64 / one as f64
    );
    assert!(
        (four as f64) <= 1.2 * one as f64,
        "4 segments {four} B vs 1 segment {one} B"
    );
}

/// `kino extend` streams its source: decoding only the frames it needs and copying them into
/// the output one at a time, so a 40 s source at 320×240 (1200 pictures, 276 MB decoded) costs
/// about the memory of a 2 s one.
#[test]
fn extending_a_long_source_costs_the_memory_of_a_short_one() {
    let tmp = tempfile::tempdir().unwrap();
    let peak = |seconds: u32| -> u64 {
        let src = tmp.path().join(format!("src-{seconds}.mp4"));
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
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
            .arg(&src)
            .output()
            .expect("ffmpeg is installed (Debian package ffmpeg; .ci/run installs it)");
        assert!(o.status.success(), "ffmpeg: {}", stderr(&o));
        let out = tmp.path().join(format!("ext-{seconds}.mp4"));
        let o = run(kino()
            .arg("extend")
            .arg(&src)
            .args([
                "it goes on",
                "--seconds",
                "2",
                "--cpu",
                "--steps",
                "2",
                "--json",
                // The source's memory only: signing and watermarking are measured apart.
                "--no-sign",
                "--no-watermark",
                "-o",
            ])
            .arg(&out)
            .arg("--model")
            .arg(ti2v()));
        let j = json_out(&o);
        assert_eq!(j["source_frames"], seconds as u64 * 8);
        assert_eq!(ffprobe_frames(&out).0, seconds as u64 * 8 + 16);
        j["peak_memory_bytes"].as_u64().expect("VmHWM on Linux")
    };
    let short = peak(2);
    let long = peak(40);
    eprintln!(
        "peak memory of kino extend: 2 s source {:.1} MiB, 40 s source {:.1} MiB ({:.3}×)",
        short as f64 / 1048576.0,
        long as f64 / 1048576.0,
        long as f64 / short as f64
    );
    // Holding the source whole would be ~276 MB more (about 4×); the rest grows with the
    // output's length (1.02× with the plain MP4 writer, 1.19× with the signing one).
    assert!(
        (long as f64) <= 1.5 * short as f64,
        "40 s source {long} B vs 2 s source {short} B"
    );
}

/// `kino extend` with a diffusion-forcing model: one call continues from the source's last
/// frames (SkyReels-V2's video-to-video pipeline), only new frames added.
#[test]
fn extend_with_a_diffusion_forcing_model() {
    let tmp = tempfile::tempdir().unwrap();
    let src = outside_clip(tmp.path());
    let out = tmp.path().join("df-extended.mp4");
    let o = run(kino()
        .arg("extend")
        .arg(&src)
        .args([
            "more of it",
            "--seconds",
            "2",
            "--cpu",
            "--steps",
            "2",
            "--json",
        ])
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(repo().join("fixtures/data/pipeline-df/model")));
    let j = json_out(&o);
    // 1.5 s at the folder's 24 fps = 36 source frames, then 2 s = 48 new ones.
    assert_eq!(ffprobe_frames(&out), (84, "24/1".to_string()), "{j}");
    assert_eq!(j["source_frames"], 36);
    assert_eq!(j["new_frames"], 48);
    let m = metadata(&out);
    assert_eq!(m["long_video"]["start"], "continue");
    assert_eq!(m["long_video"]["segments"].as_array().unwrap().len(), 1);
}

/// A diffusion-forcing model (SkyReels-V2 DF) makes a long video itself, in windows, from one
/// generate call: no segments, no dropped frames.
#[test]
fn a_diffusion_forcing_model_goes_long_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("df.mp4");
    let o = run(kino()
        .args([
            "generate",
            "a red circle",
            "--seconds",
            "6",
            "--cpu",
            "--steps",
            "2",
            "--json",
            "-o",
        ])
        .arg(&out)
        .arg("--model")
        .arg(repo().join("fixtures/data/pipeline-df/model")));
    let v = json_out(&o);
    let e = stderr(&o);
    assert!(!e.contains("segment"), "{e}");
    // 6 s at the folder's 24 fps: 145 frames (4k+1) = 37 latent frames, in windows of 6
    // (kino.json: base_num_frames 21) that continue from the last 2 (overlap_history 5): 9 of
    // them, each a denoising run of its own.
    let windows = e.matches("denoise: done").count();
    assert_eq!(windows, 9, "{e}");
    let (n, rate) = ffprobe_frames(&out);
    assert_eq!((n, rate.as_str()), (145, "24/1"), "{v}");
}

#[test]
fn clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = outside_clip(tmp.path());
    let out = tmp.path().join("x.mp4");
    let extend = |input: &Path, model: &Path, extra: &[&str]| {
        run(kino()
            .arg("extend")
            .arg(input)
            .args(["more", "--cpu", "-o"])
            .arg(&out)
            .arg("--model")
            .arg(model)
            .args(extra))
    };
    // A text-only model asked to extend or to go long names the models that can.
    let o = extend(&src, &text_only(), &["--seconds", "2"]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("cannot continue a video") && e.contains("kino-shapes"),
        "{e}"
    );
    assert!(e.contains("wan2.2-ti2v-5b"), "{e}");
    let o = run(kino()
        .args(["generate", "long", "--seconds", "60", "--cpu", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(text_only()));
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("text only") && e.contains("kino-shapes"), "{e}");
    let script = tmp.path().join("s.txt");
    std::fs::write(&script, "a\nb\n").unwrap();
    let o = run(kino()
        .args(["generate", "--cpu", "--script"])
        .arg(&script)
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(text_only()));
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("cannot be conditioned") && e.contains("kino-shapes"),
        "{e}"
    );
    // Unreadable input.
    let junk = tmp.path().join("junk.mp4");
    std::fs::write(&junk, b"not a video at all").unwrap();
    let o = extend(&junk, &ti2v(), &["--seconds", "2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot read the video"),
        "{}",
        stderr(&o)
    );
    let o = extend(
        &tmp.path().join("missing.mp4"),
        &ti2v(),
        &["--seconds", "2"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.mp4"), "{}", stderr(&o));
    // --seconds ≤ 0.
    for s in ["0", "-3"] {
        let o = extend(&src, &ti2v(), &[&format!("--seconds={s}")]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("positive number"), "{}", stderr(&o));
        let o = generate(&out, &["x", &format!("--seconds={s}")]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("positive number"), "{}", stderr(&o));
    }
    assert!(!out.exists());
}
