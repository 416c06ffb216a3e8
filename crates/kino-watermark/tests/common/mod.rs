//! Helpers shared by the watermark tests and the benchmark: real ffmpeg for sources, encodes and
//! attacks; kino-media's reader for decoding.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use kino_media::Frame;

/// A fresh scratch directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kino-wm-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("ffmpeg must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` RGB frames of `w × h` from an ffmpeg lavfi source graph (e.g. `testsrc2`, or any
/// filtergraph that produces video); `filter` may use `{w}`, `{h}` placeholders.
pub fn lavfi_frames(filter: &str, w: u32, h: u32, n: usize) -> Vec<Frame> {
    let graph = filter
        .replace("{w}", &w.to_string())
        .replace("{h}", &h.to_string());
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "lavfi", "-i", &graph])
        .args(["-vf", &format!("scale={w}:{h}:flags=bicubic,format=rgb24")])
        .args([
            "-frames:v",
            &n.to_string(),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .output()
        .expect("ffmpeg must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "ffmpeg lavfi {graph}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    split(&out.stdout, w, h)
}

fn split(bytes: &[u8], w: u32, h: u32) -> Vec<Frame> {
    let size = (w * h * 3) as usize;
    bytes
        .chunks_exact(size)
        .map(|c| Frame::new(w, h, c.to_vec()).unwrap())
        .collect()
}

/// Encodes frames to H.264 MP4 with libx264 at `crf` (yuv420p), `fps` frames per second.
pub fn encode(frames: &[Frame], fps: u32, crf: u32, path: &Path) {
    encode_filtered(frames, fps, None, crf, &[], path)
}

/// [`encode`] after the ffmpeg filter `vf`, with more output options `extra`.
pub fn encode_filtered(
    frames: &[Frame],
    fps: u32,
    vf: Option<&str>,
    crf: u32,
    extra: &[&str],
    path: &Path,
) {
    let (w, h) = (frames[0].width(), frames[0].height());
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{w}x{h}"), "-r", &fps.to_string(), "-i", "-"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            &crf.to_string(),
        ])
        .args(vf.map(|v| vec!["-vf", v]).unwrap_or_default())
        .args(["-pix_fmt", "yuv420p"])
        .args(extra)
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffmpeg must be installed (see .ci/run)");
    {
        let mut stdin = child.stdin.take().unwrap();
        for f in frames {
            stdin.write_all(f.data()).unwrap();
        }
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "ffmpeg encode: {err}");
}

/// Re-encodes `src` to `dst` with libx264 at `crf` after the filter `vf` (`None`: no filter);
/// `extra` are more output options (e.g. `-r 30`).
pub fn transcode(src: &Path, dst: &Path, vf: Option<&str>, crf: u32, extra: &[&str]) {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-v", "error", "-y", "-i"]).arg(src);
    if let Some(vf) = vf {
        cmd.args(["-vf", vf]);
    }
    cmd.args([
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        &crf.to_string(),
    ])
    .args(["-pix_fmt", "yuv420p"])
    .args(extra)
    .arg(dst);
    run(&mut cmd);
}

/// Decoded RGB frames of a video file (through kino-media).
pub fn decode(path: &Path) -> Vec<Frame> {
    kino_media::read_video(path).unwrap().into_frames()
}

/// Decoded RGB frames of a video file with their coded luma, as `kino verify` reads them.
pub fn decode_luma(path: &Path) -> (Vec<Frame>, Vec<kino_media::LumaPlane>) {
    let bytes = std::fs::read(path).unwrap();
    let (v, l) = kino_media::decode_video_head_luma(&bytes, f64::INFINITY).unwrap();
    (v.into_frames(), l)
}

/// The detector on a video file, read as `kino verify` reads it (RGB and coded luma).
pub fn detect_file(path: &Path, key: &kino_watermark::Key) -> kino_watermark::Detection {
    let (f, l) = decode_luma(path);
    kino_watermark::detect_luma(&f, &l, key)
}

/// The fifteen natural-looking lavfi sources of the benchmark (`{w}`/`{h}` filled by
/// [`lavfi_frames`]).
pub fn natural_sources() -> Vec<String> {
    let mut v = Vec::new();
    for seed in 0..3 {
        v.push(format!(
            "testsrc2=size={{w}}x{{h}}:rate=24,hue=h={}",
            seed * 40
        ));
        v.push(format!(
            "mandelbrot=size={{w}}x{{h}}:rate=24:start_scale={}",
            [3.0, 1.5, 0.8][seed]
        ));
        v.push(format!(
            "life=size={{w}}x{{h}}:rate=24:seed={seed}:ratio=0.3:mold=10:life_color=#c0a080:death_color=#203040:mold_color=#506030,gblur=sigma=1.2"
        ));
        v.push(format!(
            "cellauto=size={{w}}x{{h}}:rate=24:rule={}:seed={seed},gblur=sigma=1,eq=contrast=0.7",
            [30, 110, 150][seed]
        ));
        v.push(format!(
            "gradients=size={{w}}x{{h}}:rate=24:seed={seed}:speed=0.02,noise=alls=10:allf=t+u"
        ));
    }
    v
}

/// Natural-looking clips from photographs: for each image file in `dir` (PNG or JPEG, sorted by
/// name), a lavfi graph that scales it to cover 1.5 times the clip's width and height and pans a
/// `{w}×{h}` window across it (3 px right and 1 px down per frame, as a slow camera pan), for
/// [`lavfi_frames`]. The README's bench takes the CC0 / public-domain photographs that ship in
/// scikit-image's wheel (`scripts/wm-photos.sh` fetches them).
pub fn photo_sources(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the photo folder {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            // lavfi's movie source needs its path's special characters escaped.
            let path = p.display().to_string().replace('\\', "\\\\").replace(':', "\\:");
            format!(
                "movie={path},loop=loop=-1:size=1:start=0,setpts=N/24/TB,format=rgb24,\
                 scale='trunc(iw*max(1.5*{{w}}/iw,1.5*{{h}}/ih)/2)*2':'trunc(ih*max(1.5*{{w}}/iw,1.5*{{h}}/ih)/2)*2',\
                 crop={{w}}:{{h}}:x='min(n*3,iw-{{w}})':y='min(n,ih-{{h}})'"
            )
        })
        .collect()
}

/// The first `n` of `sources`, then the same again from `reps - 1` later start frames (17
/// frames apart): more clips from the same pictures, for the probes.
pub fn repeated(sources: &[String], n: usize, reps: usize) -> Vec<String> {
    (0..reps.max(1))
        .flat_map(|r| {
            sources.iter().take(n).map(move |s| {
                if r == 0 {
                    s.clone()
                } else {
                    format!("{s},trim=start_frame={}", 17 * r)
                }
            })
        })
        .collect()
}

/// `n` pseudo-random ±1 chips from a fixed LCG (any ±1 tile will do for the probes).
pub fn lcg_chips(n: usize) -> Vec<f32> {
    let mut st = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            st = st.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            if st >> 63 == 1 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

/// The clips in `dir`: each sub-folder of PNG frames (as `kino generate -o DIR/x` writes them),
/// in name order, with its path; folders without PNGs are skipped.
pub fn png_clips(dir: &Path) -> Vec<(String, Vec<Frame>)> {
    let mut dirs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let mut files: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        files.sort();
        let frames: Vec<Frame> = files
            .iter()
            .map(|f| kino_media::read_image(f).unwrap())
            .collect();
        if !frames.is_empty() {
            out.push((d.display().to_string(), frames));
        }
    }
    out
}
