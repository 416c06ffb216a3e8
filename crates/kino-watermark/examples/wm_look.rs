//! Writes PNGs to look at the mark: `cargo run --release -p kino-watermark --example wm_look -- OUT_DIR`
//! `[W H]` (for each source: the marked frame, and the change amplified ×20 around mid-grey).
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_media::{write_image, Frame};
use kino_watermark::{Embedder, Key};

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
        let amp: Vec<u8> = f
            .data()
            .iter()
            .zip(m.data())
            .map(|(&a, &b)| (128 + 20 * (i32::from(b) - i32::from(a))).clamp(0, 255) as u8)
            .collect();
        write_image(out.join(format!("{name}-orig.png")), &f).unwrap();
        write_image(out.join(format!("{name}-marked.png")), &m).unwrap();
        write_image(
            out.join(format!("{name}-diff-x20.png")),
            &Frame::new(w, h, amp).unwrap(),
        )
        .unwrap();
        println!("{name}: PSNR {:.2} dB", kino_media::psnr(&f, &m).unwrap());
    }
}
