//! Shared helpers for the end-to-end tests and the benchmark: synthetic content and outside
//! tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kino_media::{Fps, Frame, Video};

/// A small deterministic hash → 0..=255.
fn hash(x: u32, y: u32) -> u32 {
    let mut h = x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h & 0xff
}

/// Frame `t` of a synthetic clip, something like generated video: a moving colour gradient
/// with a little scrolling texture; a checkerboard square with sharp edges and a thin-line
/// grid that move across it (both brighten or darken the gradient, so their edges are sharp
/// in luma); and a saturated disc with a sharp colour edge moving the other way.
pub fn synthetic_frame(w: u32, h: u32, t: u32) -> Frame {
    let (wf, hf) = (w as f32, h as f32);
    let sq = (w.min(h) / 3).max(8);
    let sx = (t * 5) % (w.saturating_sub(sq).max(1));
    let sy = (t * 3) % (h.saturating_sub(sq).max(1));
    let cell = (sq / 6).max(2);
    let r = (w.min(h) / 8).max(4) as f32;
    let cx = wf - r - ((t * 4) as f32 % (wf - 2.0 * r).max(1.0));
    let cy = hf / 2.0 + (hf / 4.0) * ((t as f32) / 9.0).sin();
    Frame::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let tex = hash(x + 2 * t, y + t) as f32 / 255.0 * 8.0 - 4.0;
        let mut rgb = [
            (xf + 3.0 * t as f32) / wf * 140.0 + 60.0,
            (yf + 2.0 * t as f32) / hf * 120.0 + 70.0,
            128.0 + 60.0 * ((xf + yf) / 60.0 + t as f32 / 6.0).sin(),
        ];
        let mut shift = tex;
        if (x + t) % 64 < 2 || (y + t) % 48 < 2 {
            shift += 50.0;
        }
        if x >= sx && x < sx + sq && y >= sy && y < sy + sq {
            let on = ((x - sx) / cell + (y - sy) / cell).is_multiple_of(2);
            shift += if on { 55.0 } else { -55.0 };
        }
        for c in &mut rgb {
            *c += shift;
        }
        let (dx, dy) = (xf - cx, yf - cy);
        if dx * dx + dy * dy <= r * r {
            rgb = [40.0, 200.0, 60.0];
        }
        [
            rgb[0].clamp(0.0, 255.0) as u8,
            rgb[1].clamp(0.0, 255.0) as u8,
            rgb[2].clamp(0.0, 255.0) as u8,
        ]
    })
    .expect("valid synthetic frame")
}

/// A synthetic clip of `n` frames.
pub fn synthetic_video(w: u32, h: u32, n: u32, fps: u32) -> Video {
    let frames = (0..n).map(|t| synthetic_frame(w, h, t)).collect();
    Video::new(frames, Fps::integer(fps).expect("fps")).expect("video")
}

/// Path to a required outside tool, or a panic that says how to install it.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "`{name}` is required by this test but is not on PATH; install it with \
             `apt-get install -y {package}` (CI installs it)"
        ),
    }
}

/// Runs a command and returns stdout, panicking with stderr on failure.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `ffprobe -show_streams -show_format -count_frames` as JSON.
pub fn ffprobe(path: &Path) -> serde_json::Value {
    let ffprobe = require_tool("ffprobe", "ffmpeg");
    let out = run(Command::new(ffprobe)
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(path));
    serde_json::from_slice(&out).expect("ffprobe JSON")
}

/// Decodes a file with ffmpeg to RGB24 frames of `w × h`, converting YUV to RGB with
/// swscale's accurate path (exact rounding, interpolated chroma) and the matrix the file
/// signals.
pub fn ffmpeg_decode_rgb(path: &Path, w: u32, h: u32) -> Vec<Frame> {
    ffmpeg_decode_rgb_with(
        path,
        w,
        h,
        &["-sws_flags", "accurate_rnd+full_chroma_int+bicubic"],
    )
}

/// Decodes a file with ffmpeg to RGB24 frames with extra input/output options.
pub fn ffmpeg_decode_rgb_with(path: &Path, w: u32, h: u32, extra: &[&str]) -> Vec<Frame> {
    let ffmpeg = require_tool("ffmpeg", "ffmpeg");
    let out = run(Command::new(ffmpeg)
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(extra)
        .args([
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-vsync",
            "passthrough",
            "-",
        ]));
    let size = (w * h * 3) as usize;
    assert_eq!(
        out.len() % size,
        0,
        "ffmpeg output is not whole {w}x{h} frames"
    );
    out.chunks_exact(size)
        .map(|c| Frame::new(w, h, c.to_vec()).expect("frame"))
        .collect()
}

/// A fresh temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kino-media-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
