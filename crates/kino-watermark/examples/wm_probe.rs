//! Development probe: mark one generated clip, pass it through libx264 at a few CRFs, print
//! what the detector sees. `cargo run --release -p kino-watermark --example wm_probe -- SRC W H`
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{detect, Embedder, Key};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = a
        .get(1)
        .map(String::as_str)
        .unwrap_or("testsrc2=size={w}x{h}:rate=16");
    let w: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let h: u32 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(256);
    let key = Key::from_bytes(b"probe");
    let frames = lavfi_frames(src, w, h, 24);
    let e = Embedder::new(&key, 77, w, h);
    let mut m = frames.clone();
    let t = std::time::Instant::now();
    for (i, f) in m.iter_mut().enumerate() {
        e.mark(f, i);
    }
    println!(
        "mark {:.2} ms/frame",
        t.elapsed().as_secs_f64() * 1e3 / m.len() as f64
    );
    println!("psnr {:.2}", kino_media::psnr_video(&frames, &m).unwrap());
    let t = std::time::Instant::now();
    println!(
        "raw: {:?} ({:.0} ms)",
        detect(&m, &key),
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("raw unmarked: {:?}", detect(&frames, &key));
    let pure: Vec<kino_media::Frame> = frames
        .iter()
        .zip(&m)
        .map(|(a, b)| {
            let d: Vec<u8> = a
                .data()
                .iter()
                .zip(b.data())
                .map(|(&x, &y)| (128 + i16::from(y) - i16::from(x)) as u8)
                .collect();
            kino_media::Frame::new(w, h, d).unwrap()
        })
        .collect();
    println!("pure mark: {:?}", detect(&pure, &key));
    if std::env::var("ONLY_RAW").is_ok() {
        return;
    }
    let dir = scratch("probe");
    for crf in [18, 23, 28] {
        let p = dir.join(format!("c{crf}.mp4"));
        encode(&m, 16, crf, &p);
        println!("crf {crf}: {:?}", detect(&decode(&p), &key));
    }
    let p = dir.join("c18.mp4");
    for (name, vf) in [
        ("half", "scale=iw/2:ih/2"),
        ("crop10", "crop=iw*0.9:ih*0.9"),
    ] {
        let q = dir.join(format!("{name}.mp4"));
        transcode(&p, &q, Some(vf), 23, &[]);
        println!("{name}: {:?}", detect(&decode(&q), &key));
    }
}
