//! Development probe: marking time per frame of one bench source, with saturated pixels realised
//! through the other channels (`gamut`, layout v4 since stop 53) and without.
//! `cargo run --release -p kino-watermark --example wm_speed -- [W H [SOURCE]]` (SOURCE: an
//! index into the bench's ffmpeg sources, default 1, a fractal).
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{Embedder, Key, QimParams};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (w, h, src) = (arg(1, 832) as u32, arg(2, 480) as u32, arg(3, 1));
    let frames = lavfi_frames(&natural_sources()[src], w, h, 16);
    let key = Key::from_bytes(b"kino watermark benchmark key");
    for gamut in [true, false, true, false] {
        let p = QimParams {
            gamut,
            ..QimParams::default()
        };
        let e = Embedder::with_params(&key, 1, w, h, p);
        let t = Instant::now();
        for (i, f) in frames.clone().iter_mut().enumerate() {
            e.mark(f, i);
        }
        let per = t.elapsed().as_secs_f64() * 1e3 / frames.len() as f64;
        println!("{w}x{h} source {src}, gamut {gamut}: {per:.1} ms per frame");
    }
}
