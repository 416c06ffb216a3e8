//! Development probe: kino-shapes clips (`KINO_WM_KINO_CLIPS=DIR`, folders of PNG frames)
//! upscaled to 256×256, marked, attacked (`half` or `crf28`), and the QIM carrier's raw coded-bit
//! errors at the corner grid: per frame, and of the frames' soft bits summed, beside what the
//! detector found.
//! `KINO_WM_KINO_CLIPS=DIR cargo run --release -p kino-watermark --example wm_kino -- ATTACK`
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{detect_luma, qim_raw_errors, Embedder, Key, QimParams};

fn main() {
    let attack = std::env::args().nth(1).unwrap_or("half".into());
    let dir = std::env::var("KINO_WM_KINO_CLIPS").expect("KINO_WM_KINO_CLIPS=DIR");
    let key = Key::from_bytes(b"kino watermark benchmark key");
    let scratch = scratch("wm-kino");
    for (ci, (name, frames)) in png_clips(std::path::Path::new(&dir)).iter().enumerate() {
        let id = 0x5eed_0000_0000 + ci as u64 * 7919;
        let mut m: Vec<_> = frames
            .iter()
            .map(|f| kino_media::resize(f, 256, 256).unwrap())
            .collect();
        let e = Embedder::new(&key, id, 256, 256);
        for (i, f) in m.iter_mut().enumerate() {
            e.mark(f, i);
        }
        let p = scratch.join("a.mp4");
        let (vf, crf) = match attack.as_str() {
            "half" => (Some("scale=iw/2:ih/2"), 23),
            _ => (None, 28),
        };
        encode_filtered(&m, 24, vf, crf, &[], &p);
        let (back, luma) = decode_luma(&p);
        let d = detect_luma(&back, &luma, &key);
        let (per, sum) = qim_raw_errors(&back, &key, id, &QimParams::default(), None);
        println!(
            "{name}: detected {} (e {}, {}), raw errors per frame {:?}, summed {sum}",
            d.detected && d.id == Some(id),
            d.bit_errors,
            d.carrier,
            per
        );
    }
}
