//! Development probe: surviving mark vs host+codec noise per chip after an attack.
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{chip_soft, Embedder, Key};

fn stats(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
    (m, s)
}
fn corr(a: &[f64], b: &[f64]) -> f64 {
    let (ma, sa) = stats(a);
    let (mb, sb) = stats(b);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / a.len() as f64
        / sa
        / sb
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let w: u32 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let h: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let crf: u32 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(28);
    let nf: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(24);
    let key = Key::from_bytes(b"kino watermark benchmark key");
    let dir = scratch("snr");
    let srcs = natural_sources();
    for (ci, s) in srcs.iter().take(n).enumerate() {
        let frames = lavfi_frames(s, w, h, nf);
        let id = 0x5eed_0000_0000 + ci as u64 * 7919;
        let e = Embedder::new(&key, id, w, h);
        let mut m = frames.clone();
        for (i, f) in m.iter_mut().enumerate() {
            e.mark(f, i);
        }
        // Sign of each chip in the mark (+1 if the embedded value agrees with the key's sign).
        let pure: Vec<kino_media::Frame> = frames
            .iter()
            .zip(&m)
            .map(|(a, b)| {
                let d: Vec<u8> = a
                    .data()
                    .iter()
                    .zip(b.data())
                    .map(|(&x, &y)| (128 + 8 * (i16::from(y) - i16::from(x))).clamp(0, 255) as u8)
                    .collect();
                kino_media::Frame::new(w, h, d).unwrap()
            })
            .collect();
        let truth: Vec<f64> = chip_soft(&pure, &key, 1.0)
            .iter()
            .map(|v| v.signum())
            .collect();
        let p = dir.join("m.mp4");
        let q = dir.join("u.mp4");
        encode(&m, 24, crf, &p);
        encode(&frames, 24, crf, &q);
        let am = chip_soft(&decode(&p), &key, 1.0);
        let au = chip_soft(&decode(&q), &key, 1.0);
        let rm = chip_soft(&m, &key, 1.0);
        let ru = chip_soft(&frames, &key, 1.0);
        let sig_raw: Vec<f64> = rm
            .iter()
            .zip(&ru)
            .zip(&truth)
            .map(|((a, b), t)| (a - b) * t)
            .collect();
        let sig_att: Vec<f64> = am
            .iter()
            .zip(&au)
            .zip(&truth)
            .map(|((a, b), t)| (a - b) * t)
            .collect();
        let (sr, _) = stats(&sig_raw);
        let (sa, sda) = stats(&sig_att);
        let (_, nu) = stats(&ru);
        let (_, na) = stats(&au);
        let err_raw = rm.iter().zip(&truth).filter(|(a, t)| *a * *t < 0.0).count();
        let err_att = am.iter().zip(&truth).filter(|(a, t)| *a * *t < 0.0).count();
        println!(
            "{ci}: mark raw {sr:.3} att {sa:.3} (gain {:.2}, sd {sda:.3}) | host raw sd {nu:.3} att sd {na:.3} corr(host raw, att) {:.2} corr(att host, att mark-diff) {:.2} | chip errors raw {err_raw} att {err_att} / 256",
            sa / sr,
            corr(&ru, &au),
            corr(&au, &sig_att)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
