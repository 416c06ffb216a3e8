//! Reading the video files people have (`read_video`, `decode_video`): clips made at test time
//! by the `ffmpeg` command line in the codecs and containers phones, cameras and ffmpeg write
//! (H.264 High with B-frames in MP4 and MOV, H.265, VP9 in WebM, AV1), checked for size, frame
//! count, frame rate and pixel content against what `ffmpeg` itself decodes to rgb24.
//! Encoders this ffmpeg lacks are skipped with a printed note.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kino_media::{
    conform_video, decode_video, decode_video_head_luma, fit_crop, read_video, read_video_head,
    Fps, Frame, MediaError,
};

fn ffmpeg() -> PathBuf {
    common::require_tool("ffmpeg", "ffmpeg")
}

fn has_encoder(name: &str) -> bool {
    let out = Command::new(ffmpeg())
        .args(["-hide_banner", "-encoders"])
        .output()
        .expect("run ffmpeg -encoders");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == name)
}

fn run_ffmpeg(args: &[&str]) {
    let out = Command::new(ffmpeg())
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What ffmpeg itself decodes the file to, as rgb24 frames of `w × h`.
fn ffmpeg_rgb(path: &Path, w: u32, h: u32) -> Vec<Frame> {
    let out = Command::new(ffmpeg())
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = (w * h * 3) as usize;
    assert_eq!(out.stdout.len() % n, 0, "rawvideo is whole frames");
    out.stdout
        .chunks(n)
        .map(|c| Frame::new(w, h, c.to_vec()).unwrap())
        .collect()
}

fn mean_abs_diff(a: &Frame, b: &Frame) -> f64 {
    assert_eq!((a.width(), a.height()), (b.width(), b.height()));
    let s: u64 = a
        .data()
        .iter()
        .zip(b.data())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    s as f64 / a.data().len() as f64
}

struct Case {
    name: &'static str,
    encoder: &'static str,
    file: &'static str,
    args: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "H.264 High, B-frames, MP4",
        encoder: "libx264",
        file: "h264-high.mp4",
        args: &[
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-bf",
            "3",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "18",
        ],
    },
    Case {
        name: "H.264 High, B-frames, MOV",
        encoder: "libx264",
        file: "h264-high.mov",
        args: &[
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-bf",
            "2",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "18",
        ],
    },
    Case {
        name: "H.265 MP4",
        encoder: "libx265",
        file: "h265.mp4",
        args: &[
            "-c:v",
            "libx265",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "18",
            "-tag:v",
            "hvc1",
            "-x265-params",
            "log-level=error",
        ],
    },
    Case {
        name: "VP9 WebM",
        encoder: "libvpx-vp9",
        file: "vp9.webm",
        args: &[
            "-c:v",
            "libvpx-vp9",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "20",
            "-b:v",
            "0",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
        ],
    },
    Case {
        name: "AV1 (SVT-AV1) MP4",
        encoder: "libsvtav1",
        file: "av1-svt.mp4",
        args: &[
            "-c:v",
            "libsvtav1",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "20",
            "-preset",
            "12",
        ],
    },
    Case {
        name: "AV1 (libaom) WebM",
        encoder: "libaom-av1",
        file: "av1-aom.webm",
        args: &[
            "-c:v",
            "libaom-av1",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "20",
            "-b:v",
            "0",
            "-cpu-used",
            "8",
            "-row-mt",
            "1",
        ],
    },
];

/// Every codec/container case: 96×64 (SVT-AV1 needs 64 rows) testsrc, 12 frames at 12 fps.
#[test]
fn reads_common_codecs_like_ffmpeg_does() {
    let dir = common::temp_dir("vin-codecs");
    let mut done = 0;
    for case in CASES {
        if !has_encoder(case.encoder) {
            println!(
                "note: skipping {}: this ffmpeg has no {} encoder",
                case.name, case.encoder
            );
            continue;
        }
        let path = dir.as_path().join(case.file);
        let mut args = vec!["-f", "lavfi", "-i", "testsrc=size=96x64:rate=12:duration=1"];
        args.extend_from_slice(case.args);
        let p = path.to_str().unwrap().to_string();
        args.push(&p);
        run_ffmpeg(&args);

        let v = read_video(&path).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!((v.width(), v.height()), (96, 64), "{}", case.name);
        assert_eq!(v.len(), 12, "{}", case.name);
        assert_eq!(v.fps(), Fps::integer(12).unwrap(), "{}", case.name);
        let reference = ffmpeg_rgb(&path, 96, 64);
        assert_eq!(reference.len(), 12, "{}", case.name);
        for (i, (ours, theirs)) in v.frames().iter().zip(&reference).enumerate() {
            let d = mean_abs_diff(ours, theirs);
            assert!(
                d < 1.5,
                "{} frame {i}: mean |diff| {d:.2} against ffmpeg's rgb24",
                case.name
            );
        }
        // The clip moves (testsrc's gradient scrolls), so a stuck decoder would show.
        let moved = v.frames()[1..]
            .iter()
            .map(|f| mean_abs_diff(&v.frames()[0], f))
            .fold(0.0, f64::max);
        assert!(
            moved > 1.0,
            "{}: frames barely differ ({moved:.2})",
            case.name
        );
        // The same bytes from memory.
        let bytes = std::fs::read(&path).unwrap();
        let m = decode_video(&bytes).unwrap_or_else(|e| panic!("{} in memory: {e}", case.name));
        assert_eq!(m.len(), 12);
        assert_eq!(m.frames()[5], v.frames()[5], "{}", case.name);
        done += 1;
        println!("ok: {}", case.name);
    }
    assert!(
        done >= 1,
        "no encoder at all was available; install Debian's ffmpeg"
    );
}

/// A solid colour survives the trip through H.264 High (4:2:0, limited range, BT.601 untagged)
/// and through a BT.709-tagged stream within a few levels.
#[test]
fn solid_colours_come_back() {
    if !has_encoder("libx264") {
        println!("note: skipping: this ffmpeg has no libx264 encoder");
        return;
    }
    let dir = common::temp_dir("vin-solid");
    for (tag, extra) in [
        ("untagged", &[][..]),
        (
            "bt709",
            &[
                "-colorspace",
                "bt709",
                "-color_primaries",
                "bt709",
                "-color_trc",
                "bt709",
                "-vf",
                "scale=out_color_matrix=bt709",
            ][..],
        ),
    ] {
        let path = dir.as_path().join(format!("solid-{tag}.mp4"));
        let mut args = vec![
            "-f",
            "lavfi",
            "-i",
            "color=c=0xC83250:size=32x32:rate=8:duration=1",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "1"]);
        let p = path.to_str().unwrap().to_string();
        args.push(&p);
        run_ffmpeg(&args);
        let v = read_video(&path).unwrap();
        assert_eq!(v.len(), 8);
        let px = v.frames()[3].pixel(16, 16).unwrap();
        for (c, want) in px.iter().zip([0xC8u8, 0x32, 0x50]) {
            assert!(c.abs_diff(want) <= 4, "{tag}: {px:?} vs C83250");
        }
    }
}

/// A phone's portrait clip: stored landscape with a display matrix saying "rotate 90".
#[test]
fn rotation_metadata_is_applied() {
    if !has_encoder("libx264") {
        println!("note: skipping: this ffmpeg has no libx264 encoder");
        return;
    }
    let dir = common::temp_dir("vin-rotation");
    let plain = dir.as_path().join("plain.mp4");
    // Left half red, right half blue, 64×32.
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=red:size=32x32:rate=4:duration=1",
        "-f",
        "lavfi",
        "-i",
        "color=c=blue:size=32x32:rate=4:duration=1",
        "-filter_complex",
        "[0][1]hstack",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        plain.to_str().unwrap(),
    ]);
    let rotated = dir.as_path().join("rotated.mp4");
    // ffmpeg 5.x writes the stream's "rotate" tag as a display matrix when stream-copying.
    run_ffmpeg(&[
        "-i",
        plain.to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        rotated.to_str().unwrap(),
    ]);
    let reference = {
        let probe = Command::new(ffmpeg())
            .args(["-hide_banner", "-i"])
            .arg(&rotated)
            .output()
            .unwrap();
        String::from_utf8_lossy(&probe.stderr).into_owned()
    };
    if !reference.contains("rotation") && !reference.contains("rotate") {
        println!("note: skipping: this ffmpeg did not write a display matrix ({reference})");
        return;
    }
    let v = read_video(&rotated).unwrap();
    assert_eq!((v.width(), v.height()), (32, 64), "turned to portrait");
    // ffmpeg's own autorotated decode agrees on where red and blue went.
    let theirs = ffmpeg_rgb(&rotated, 32, 64);
    let d = mean_abs_diff(&v.frames()[0], &theirs[0]);
    assert!(d < 2.0, "mean |diff| {d:.2} against ffmpeg's autorotate");
    // "rotate=90" is a display matrix of 90° anticlockwise (ffprobe: "rotation of 90.00
    // degrees"): the left (red) half ends at the bottom.
    let top = v.frames()[0].pixel(16, 8).unwrap();
    let bottom = v.frames()[0].pixel(16, 56).unwrap();
    assert!(top[2] > 200 && top[0] < 60, "top {top:?}: blue");
    assert!(bottom[0] > 200 && bottom[2] < 60, "bottom {bottom:?}: red");
    // The coded luma turns with the pictures: blue's luma (29) on top, red's (76) below.
    let bytes = std::fs::read(&rotated).unwrap();
    let (_, luma) = decode_video_head_luma(&bytes, f64::INFINITY).unwrap();
    let l = luma[0].to_f32();
    assert_eq!((luma[0].width(), luma[0].height()), (32, 64));
    let (t, b) = (l[8 * 32 + 16], l[56 * 32 + 16]);
    assert!(
        (t - 29.1).abs() < 3.0 && (b - 76.2).abs() < 3.0,
        "top {t}, bottom {b}"
    );
}

/// BT.601 luma of an RGB frame, per pixel.
fn luma601(f: &Frame) -> Vec<f64> {
    f.data()
        .chunks_exact(3)
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect()
}

/// Mean |a − b| of two luma planes.
fn luma_gap(a: &[f64], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - f64::from(*y)).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// `decode_video_head_luma` gives the luma the stream codes: for saturated colours that RGB
/// clips, and against swscale's RGB (biased on coloured pixels), it is the picture's own luma
/// to within the YUV rounding, in BT.601 streams and (chroma added back) BT.709 ones.
#[test]
fn coded_luma_is_the_pictures_luma() {
    if !has_encoder("libx264") {
        println!("note: skipping: this ffmpeg has no libx264 encoder");
        return;
    }
    let dir = common::temp_dir("vin-luma");
    // Saturated hues across, brightness down: much of it clips in RGB after a YUV round trip.
    let (w, h) = (64u32, 48u32);
    let frame = Frame::from_fn(w, h, |x, y| {
        let hue = x as f64 / f64::from(w) * 6.0;
        let v = 1.0 - y as f64 / f64::from(h) * 0.8;
        let c = |k: f64| {
            let d = ((hue - k).rem_euclid(6.0) - 3.0).abs();
            ((d - 1.0).clamp(0.0, 1.0) * v * 255.0).round() as u8
        };
        [c(0.0), c(2.0), c(4.0)]
    })
    .unwrap();
    let raw: Vec<u8> = (0..4).flat_map(|_| frame.data().to_vec()).collect();
    let src = dir.as_path().join("frames.rgb");
    std::fs::write(&src, &raw).unwrap();
    let want = luma601(&frame);
    for (name, vf, tag) in [
        ("bt601", "format=yuv420p", "smpte170m"),
        (
            "bt709",
            "scale=out_color_matrix=bt709,format=yuv420p",
            "bt709",
        ),
    ] {
        let out = dir.as_path().join(format!("{name}.mp4"));
        run_ffmpeg(&[
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            &format!("{w}x{h}"),
            "-r",
            "4",
            "-i",
            src.to_str().unwrap(),
            "-vf",
            vf,
            "-c:v",
            "libx264",
            "-qp",
            "0",
            "-colorspace",
            tag,
            out.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&out).unwrap();
        let (video, luma) = decode_video_head_luma(&bytes, f64::INFINITY).unwrap();
        assert_eq!(luma.len(), video.len());
        let coded = luma_gap(&want, &luma[0].to_f32());
        let from_rgb: Vec<f32> = luma601(&video.frames()[0])
            .iter()
            .map(|&v| v as f32)
            .collect();
        let rgb = luma_gap(&want, &from_rgb);
        println!("{name}: mean |luma error| coded {coded:.3}, from decoded RGB {rgb:.3}");
        // BT.601: the Y plane itself (rounding of 219 levels); BT.709: chroma at half
        // resolution adds a little.
        let bound = if name == "bt601" { 0.35 } else { 1.0 };
        assert!(
            coded < bound,
            "{name}: coded luma off by {coded:.3} on average"
        );
        assert!(coded < rgb, "{name}: coded {coded:.3} vs RGB {rgb:.3}");
    }
}

/// Kino's own MP4s (OpenH264, Baseline, BT.709) read the same through FFmpeg as through the
/// pure-Rust reader.
#[test]
fn kino_files_read_the_same_both_ways() {
    let dir = common::temp_dir("vin-kinofiles");
    let path = dir.as_path().join("kino.mp4");
    let v = common::synthetic_video(64, 48, 9, 8);
    kino_media::write_mp4(&path, &v, &Default::default()).unwrap();
    let ours = kino_media::read_mp4(&path).unwrap();
    let via_ffmpeg = read_video(&path).unwrap();
    assert_eq!(via_ffmpeg.len(), 9);
    assert_eq!(via_ffmpeg.fps(), Fps::integer(8).unwrap());
    // Against the source: FFmpeg's swscale repeats chroma samples where our reader blends them,
    // which costs a little (31.6 against 32.2 dB on this clip), nothing more.
    let p_ours = kino_media::psnr_video(v.frames(), ours.frames()).unwrap();
    let p_ffmpeg = kino_media::psnr_video(v.frames(), via_ffmpeg.frames()).unwrap();
    assert!(p_ffmpeg > 30.0, "{p_ffmpeg:.2} dB");
    assert!(
        p_ffmpeg > p_ours - 1.5,
        "{p_ffmpeg:.2} against {p_ours:.2} dB"
    );
}

/// Variable frame rate and frame-rate conversion: a 30 fps clip read, then conformed to 8 fps.
#[test]
fn head_reading_and_conforming() {
    if !has_encoder("libx264") {
        println!("note: skipping: this ffmpeg has no libx264 encoder");
        return;
    }
    let dir = common::temp_dir("vin-head");
    let path = dir.as_path().join("long.mp4");
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=160x90:rate=30:duration=4",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
    let whole = read_video(&path).unwrap();
    assert_eq!(whole.len(), 120);
    let head = read_video_head(&path, 1.0).unwrap();
    assert!((30..=32).contains(&head.len()), "{} frames", head.len());
    assert_eq!(head.frames()[10], whole.frames()[10]);

    let frames = conform_video(&whole, 64, 64, Fps::integer(8).unwrap(), 17).unwrap();
    assert_eq!(frames.len(), 17);
    // Frame 4 at 8 fps is 0.5 s: source frame 15, fit-cropped.
    assert_eq!(frames[4], fit_crop(&whole.frames()[15], 64, 64).unwrap());
    let e = conform_video(&head, 64, 64, Fps::integer(8).unwrap(), 17).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("too short") && msg.contains("--frames"),
        "{msg}"
    );
}

/// Streaming a file (`scan_video`, `stream_video`, `conform_video_file`, `read_video_tail`)
/// gives exactly what reading it whole gives, for a constant and a variable frame rate.
#[test]
fn streaming_gives_what_reading_whole_gives() {
    if !has_encoder("libx264") {
        println!("note: skipping: this ffmpeg has no libx264 encoder");
        return;
    }
    let dir = common::temp_dir("vin-stream");
    let cfr = dir.as_path().join("cfr.mp4");
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=96x54:rate=24:duration=3",
        "-c:v",
        "libx264",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        cfr.to_str().unwrap(),
    ]);
    // Variable frame rate: frames at irregular times (every 3rd frame held longer).
    let vfr = dir.as_path().join("vfr.mkv");
    run_ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=96x54:rate=20:duration=3",
        "-vf",
        "setpts='N/20/TB+if(eq(mod(N,3),2),0.03/TB,0)'",
        "-fps_mode",
        "vfr",
        "-r",
        "20",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        vfr.to_str().unwrap(),
    ]);
    for path in [&cfr, &vfr] {
        let whole = read_video(path).unwrap();
        let layout = kino_media::scan_video(path).unwrap();
        assert_eq!(
            (layout.width, layout.height, layout.fps, layout.len()),
            (whole.width(), whole.height(), whole.fps(), whole.len()),
            "{}",
            path.display()
        );
        let all: Vec<usize> = (0..whole.len()).collect();
        let mut streamed = Vec::new();
        kino_media::stream_video(path, &layout, &all, &mut |j, f| {
            streamed.push((j, f.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed.len(), whole.len());
        assert!(streamed
            .iter()
            .enumerate()
            .all(|(i, (j, f))| *j == i && f == &whole.frames()[i]));
        let tail = kino_media::read_video_tail(path, 5).unwrap();
        assert_eq!(tail.frames(), &whole.frames()[whole.len() - 5..]);
        // Conformed to 8 fps at 32×32, streamed, and only its end.
        let fps = Fps::integer(8).unwrap();
        let n = kino_media::frames_at(whole.len(), whole.fps(), fps);
        let expect = conform_video(&whole, 32, 32, fps, n).unwrap();
        let mut got = Vec::new();
        kino_media::conform_video_file(path, &layout, 32, 32, fps, n, 0..n, &mut |_, f| {
            got.push(f);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, expect);
        let mut end = Vec::new();
        kino_media::conform_video_file(path, &layout, 32, 32, fps, n, n - 3..n, &mut |i, f| {
            end.push((i, f));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            end.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [n - 3, n - 2, n - 1]
        );
        assert!(end.iter().all(|(i, f)| f == &expect[*i]));
        let e = kino_media::conform_video_file(
            path,
            &layout,
            32,
            32,
            fps,
            n + 10,
            0..1,
            &mut |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("too short"), "{e}");
    }
}

/// Truncated, damaged and non-video files: one clear error each, no panic.
#[test]
fn bad_files_are_clear_errors() {
    let dir = common::temp_dir("vin-badfiles");
    let missing = dir.as_path().join("missing.mp4");
    let e = read_video(&missing).unwrap_err();
    assert!(matches!(e, MediaError::Read { .. }), "{e}");
    assert!(e.to_string().contains("missing.mp4"), "{e}");

    let garbage = dir.as_path().join("garbage.mp4");
    let junk: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&garbage, &junk).unwrap();
    let e = read_video(&garbage).unwrap_err().to_string();
    assert!(e.contains("garbage.mp4"), "{e}");

    let text = dir.as_path().join("notes.mov");
    std::fs::write(&text, "just some text, not a video\n".repeat(100)).unwrap();
    let e = read_video(&text).unwrap_err().to_string();
    assert!(e.contains("notes.mov"), "{e}");

    let empty = dir.as_path().join("empty.webm");
    std::fs::write(&empty, b"").unwrap();
    let e = read_video(&empty).unwrap_err().to_string();
    assert!(e.contains("empty.webm"), "{e}");

    // A PNG is not a video.
    let png = dir.as_path().join("still.png");
    kino_media::write_image(&png, &Frame::filled(16, 16, [1, 2, 3]).unwrap()).unwrap();
    let e = read_video(&png).unwrap_err().to_string();
    assert!(
        e.contains("still PNG image") && e.contains("still.png"),
        "{e}"
    );

    if !has_encoder("libx264") {
        println!("note: skipping the truncation cases: this ffmpeg has no libx264 encoder");
        return;
    }
    // Truncated files: with the index at the end (ffmpeg's default) and at the start.
    for (name, faststart) in [("tail.mp4", false), ("fast.mp4", true)] {
        let path = dir.as_path().join(name);
        let mut args = vec![
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=12:duration=2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
        ];
        if faststart {
            args.extend_from_slice(&["-movflags", "+faststart"]);
        }
        let p = path.to_str().unwrap().to_string();
        args.push(&p);
        run_ffmpeg(&args);
        let bytes = std::fs::read(&path).unwrap();
        for frac in [0.1, 0.5, 0.9] {
            let cut = dir.as_path().join(format!("cut-{frac}-{name}"));
            std::fs::write(&cut, &bytes[..(bytes.len() as f64 * frac) as usize]).unwrap();
            let e = read_video(&cut).unwrap_err().to_string();
            assert!(e.contains("cut-"), "{name} at {frac}: {e}");
            assert!(
                e.contains("truncated") || e.contains("damaged") || e.contains("ends"),
                "{name} at {frac}: {e}"
            );
        }
        // Bytes flipped in the middle of the data: an error or a decode, never a panic.
        let mut damaged = bytes.clone();
        let mid = damaged.len() / 2;
        for b in &mut damaged[mid..mid + 200] {
            *b ^= 0x5a;
        }
        let _ = decode_video(&damaged);
    }
}
