//! Writes PNGs to look at the mark: `cargo run --release -p kino-watermark --example wm_look -- OUT_DIR`
//! `[W H]` (for each source: the marked frame, and the change amplified ×20 around mid-grey).
//! With `KINO_WM_KINO_CLIPS=DIR` (folders of PNG frames from `kino generate -o DIR/x`) it writes
//! instead, for the middle frame of each clip upscaled to `W × H`, the original, the mark without
//! the pull at the ends (`QimParams::headroom` 0) and with it, side by side, and their changes ×20.
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_media::{write_image, Frame};
use kino_watermark::{Embedder, Key, QimParams};

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("/tmp/wm-look".into()));
    std::fs::create_dir_all(&out).unwrap();
    let key = Key::from_bytes(b"look");
    let arg = |i: usize, d: u32| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (w, h) = (arg(2, 832), arg(3, 480));
    if let Ok(dir) = std::env::var("KINO_WM_KINO_CLIPS") {
        return look_at_clips(std::path::Path::new(&dir), &out, &key, w, h);
    }
    for (name, src) in [
        ("mandelbrot", "mandelbrot=size={w}x{h}:rate=24"),
        ("gradient", "gradients=size={w}x{h}:rate=24:seed=1"),
        ("testsrc2", "testsrc2=size={w}x{h}:rate=24"),
        (
            "ramp",
            "nullsrc=size={w}x{h}:rate=24,geq=r='60+X*120/W':g='90+Y*80/H':b='140+40*sin(X/40+Y/57)'",
        ),
        (
            "gradient-noise3",
            "gradients=size={w}x{h}:rate=24:seed=2,noise=alls=3:allf=t+u",
        ),
    ] {
        let f = lavfi_frames(src, w, h, 1).remove(0);
        let mut m = f.clone();
        Embedder::new(&key, 5, w, h).mark(&mut m, 0);
        write_image(out.join(format!("{name}-orig.png")), &f).unwrap();
        write_image(out.join(format!("{name}-marked.png")), &m).unwrap();
        write_image(out.join(format!("{name}-diff-x20.png")), &change_x20(&f, &m)).unwrap();
        println!("{name}: PSNR {:.2} dB", kino_media::psnr(&f, &m).unwrap());
    }
}

/// The change from `f` to `m`, ×20 around mid-grey.
fn change_x20(f: &Frame, m: &Frame) -> Frame {
    let d: Vec<u8> = f
        .data()
        .iter()
        .zip(m.data())
        .map(|(&a, &b)| (128 + 20 * (i32::from(b) - i32::from(a))).clamp(0, 255) as u8)
        .collect();
    Frame::new(f.width(), f.height(), d).unwrap()
}

/// `a | b | c …` side by side (all of one size).
fn side_by_side(frames: &[&Frame]) -> Frame {
    let (w, h) = (frames[0].width() as usize, frames[0].height() as usize);
    let mut data = Vec::with_capacity(w * h * 3 * frames.len());
    for y in 0..h {
        for f in frames {
            data.extend_from_slice(&f.data()[y * w * 3..(y + 1) * w * 3]);
        }
    }
    Frame::new((w * frames.len()) as u32, h as u32, data).unwrap()
}

fn look_at_clips(dir: &std::path::Path, out: &std::path::Path, key: &Key, w: u32, h: u32) {
    for (path, frames) in png_clips(dir) {
        let f = kino_media::resize(&frames[frames.len() / 2], w, h).unwrap();
        let marked = |headroom: f32| {
            let p = QimParams {
                headroom,
                ..QimParams::default()
            };
            let mut m = f.clone();
            Embedder::with_params(key, 5, w, h, p).mark(&mut m, 0);
            m
        };
        let (old, new) = (marked(0.0), marked(1.0));
        let name = std::path::Path::new(&path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        write_image(
            out.join(format!("{name}-orig-old-new.png")),
            &side_by_side(&[&f, &old, &new]),
        )
        .unwrap();
        write_image(
            out.join(format!("{name}-diff-old-new-x20.png")),
            &side_by_side(&[&change_x20(&f, &old), &change_x20(&f, &new)]),
        )
        .unwrap();
        println!(
            "{name}: PSNR without the pull {:.2} dB, with it {:.2} dB",
            kino_media::psnr(&f, &old).unwrap(),
            kino_media::psnr(&f, &new).unwrap()
        );
    }
}
