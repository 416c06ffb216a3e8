//! Development probe: how the luma amplitude profile (perceptual mask) trades against the
//! per-chip SNR after H.264, at the same rounding and RMS cap (2.3 levels) as the embedder.
//! Profiles map the embedder's texture amplitude `a = 1 + act` (flat areas 1, up to 6) to a new
//! amplitude; flat areas stay at 1 level in all but the `flat` reference.
//! `cargo run --release -p kino-watermark --example wm_amp -- W H N CRF`
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_media::Frame;
use kino_watermark::{probe_amplitude, probe_chips, probe_pattern};

/// A named map from the embedder's amplitude to a new one.
type Profile = (&'static str, Box<dyn Fn(f32) -> f32>);

fn stats(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
    (m, s)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let w: u32 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let h: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(15);
    let crf: u32 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(28);
    let c0 = (f64::from(w.min(h)) / 48.0).max(3.0);
    let profiles: Vec<Profile> = vec![
        ("v3 1+act max 6", Box::new(|a| a)),
        ("1+act max 3", Box::new(|a: f32| a.min(3.0))),
        (
            "1+2act max 3",
            Box::new(|a: f32| (1.0 + 2.0 * (a - 1.0)).min(3.0)),
        ),
        (
            "1+2act max 4",
            Box::new(|a: f32| (1.0 + 2.0 * (a - 1.0)).min(4.0)),
        ),
        ("1+0.5act max 6", Box::new(|a: f32| 1.0 + 0.5 * (a - 1.0))),
        ("flat 1.5 (ref)", Box::new(|_| 1.5)),
        ("flat 2 (ref)", Box::new(|_| 2.0)),
    ];
    let dir = scratch("amp");
    let srcs = natural_sources();
    let chips = lcg_chips(256);
    let pat = probe_pattern(&chips, c0, w, h);
    let mut sum = vec![(0f64, 0f64, 0f64); profiles.len()];
    for (ci, s) in srcs.iter().take(n).enumerate() {
        let frames = lavfi_frames(s, w, h, 24);
        print!("{ci:2}");
        for (k, (_, f)) in profiles.iter().enumerate() {
            let marked: Vec<Frame> = frames
                .iter()
                .map(|fr| {
                    let amp: Vec<f32> = probe_amplitude(fr).into_iter().map(f).collect();
                    let rms = (pat
                        .iter()
                        .zip(&amp)
                        .map(|(p, a)| f64::from(p * a).powi(2))
                        .sum::<f64>()
                        / pat.len() as f64)
                        .sqrt() as f32;
                    let g = if rms > 2.3 { 2.3 / rms } else { 1.0 };
                    let mut d = fr.data().to_vec();
                    for ((px, p), a) in d.chunks_exact_mut(3).zip(&pat).zip(&amp) {
                        let di = (g * a * p).round() as i16;
                        for c in px.iter_mut() {
                            *c = (i16::from(*c) + di).clamp(0, 255) as u8;
                        }
                    }
                    Frame::new(w, h, d).unwrap()
                })
                .collect();
            let psnr = kino_media::psnr_video(&frames, &marked).unwrap();
            let p = dir.join("m.mp4");
            encode(&marked, 24, crf, &p);
            let back = decode(&p);
            let v = probe_chips(&back, 0, c0, true);
            let s: Vec<f64> = v
                .iter()
                .zip(&chips)
                .map(|(v, c)| v * f64::from(*c))
                .collect();
            let (m, sd) = stats(&s);
            let v = probe_chips(&marked, 0, c0, true);
            let s: Vec<f64> = v
                .iter()
                .zip(&chips)
                .map(|(v, c)| v * f64::from(*c))
                .collect();
            let (m0, sd0) = stats(&s);
            sum[k].0 += m / sd;
            sum[k].1 += m0 / sd0;
            sum[k].2 += psnr;
            print!(" | {:.2} ({:.1} dB)", m / sd, psnr);
        }
        println!();
    }
    println!("\nluma profiles, {w}×{h}, CRF {crf}, {n} sources: per-chip SNR after (before) the attack, mean PSNR");
    for (k, (name, _)) in profiles.iter().enumerate() {
        let m = n as f64;
        println!(
            "{name}: {:.2} ({:.2}), {:.1} dB",
            sum[k].0 / m,
            sum[k].1 / m,
            sum[k].2 / m
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
