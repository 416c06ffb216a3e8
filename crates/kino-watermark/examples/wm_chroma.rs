//! Development probe: is chroma a better carrier than luma at 256×256 after H.264 CRF 28?
//!
//! For each ffmpeg source, a random ±1 tile (16×16 chips, origin at the corner) is added to one
//! plane — luma (Y), Cb or Cr — at the same cost in RGB (root-mean-square change `T` levels over
//! R, G, B, i.e. the same PSNR), with chips 1× or 2× the luma chip size, flat or following the
//! luma texture mask. After the attack the chips are read at the true sync from the same plane
//! with the detector's whitening and payload fold, and the per-chip SNR (mean / standard
//! deviation of chip value × true sign, over the 256 chips) is printed, with the same before the
//! attack and on the unmarked clip (the picture's own interference).
//! `cargo run --release -p kino-watermark --example wm_chroma -- W H N CRF T [FRAMES]`
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_media::Frame;
use kino_watermark::{probe_amplitude, probe_chips, probe_pattern};

/// RGB change per unit change of Y, Cb, Cr (BT.601, full range).
const COL: [[f32; 3]; 3] = [
    [1.0, 1.0, 1.0],
    [0.0, -0.344_136, 1.772],
    [1.402, -0.714_136, 0.0],
];

fn stats(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
    (m, s)
}

/// Adds `deltas[k]` (per pixel, in plane k's units) to the planes of every frame.
fn add(frames: &[Frame], deltas: &[(usize, Vec<f32>)]) -> Vec<Frame> {
    frames
        .iter()
        .map(|f| {
            let mut d = f.data().to_vec();
            for (i, px) in d.chunks_exact_mut(3).enumerate() {
                let mut v = [f32::from(px[0]), f32::from(px[1]), f32::from(px[2])];
                for (plane, delta) in deltas {
                    for c in 0..3 {
                        v[c] += COL[*plane][c] * delta[i];
                    }
                }
                for c in 0..3 {
                    px[c] = v[c].round().clamp(0.0, 255.0) as u8;
                }
            }
            Frame::new(f.width(), f.height(), d).unwrap()
        })
        .collect()
}

struct Cfg {
    name: &'static str,
    plane: usize,
    mult: f64,
    masked: bool,
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let w: u32 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let h: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(15);
    let crf: u32 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(28);
    let target: f32 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let nf: usize = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(24);
    let c0 = (f64::from(w.min(h)) / 48.0).max(3.0);
    let cfgs = [
        Cfg {
            name: "Y  flat 1x",
            plane: 0,
            mult: 1.0,
            masked: false,
        },
        Cfg {
            name: "Y  mask 1x",
            plane: 0,
            mult: 1.0,
            masked: true,
        },
        Cfg {
            name: "Y  mask 2x",
            plane: 0,
            mult: 2.0,
            masked: true,
        },
        Cfg {
            name: "Cb flat 1x",
            plane: 1,
            mult: 1.0,
            masked: false,
        },
        Cfg {
            name: "Cb flat 2x",
            plane: 1,
            mult: 2.0,
            masked: false,
        },
        Cfg {
            name: "Cr flat 1x",
            plane: 2,
            mult: 1.0,
            masked: false,
        },
        Cfg {
            name: "Cr flat 2x",
            plane: 2,
            mult: 2.0,
            masked: false,
        },
        Cfg {
            name: "Cb mask 2x",
            plane: 1,
            mult: 2.0,
            masked: true,
        },
        Cfg {
            name: "Cr mask 2x",
            plane: 2,
            mult: 2.0,
            masked: true,
        },
    ];
    let dir = scratch("chroma");
    let srcs = natural_sources();
    let chips = lcg_chips(256);
    // snr[cfg] = per-source (raw, attacked, host-only sd / attacked mark mean)
    let mut sums = vec![(0f64, 0f64, 0f64, 0usize); cfgs.len()];
    let mut att_by_src = vec![vec![0f64; cfgs.len()]; n];
    for (ci, s) in srcs.iter().take(n).enumerate() {
        let frames = lavfi_frames(s, w, h, nf);
        let amp0 = probe_amplitude(&frames[0]);
        print!("{ci:2}");
        for (k, c) in cfgs.iter().enumerate() {
            let chip = c0 * c.mult;
            let pat = probe_pattern(&chips, chip, w, h);
            let amp: Vec<f32> = if c.masked {
                amp0.clone()
            } else {
                vec![1.0; pat.len()]
            };
            let col = COL[c.plane];
            let cost = (col.iter().map(|v| v * v).sum::<f32>() / 3.0).sqrt();
            let rms = (pat
                .iter()
                .zip(&amp)
                .map(|(p, a)| f64::from(p * a).powi(2))
                .sum::<f64>()
                / pat.len() as f64)
                .sqrt() as f32;
            let g = target / (rms * cost);
            let delta: Vec<f32> = pat.iter().zip(&amp).map(|(p, a)| g * p * a).collect();
            let marked = add(&frames, &[(c.plane, delta)]);
            let p = dir.join("m.mp4");
            encode(&marked, 24, crf, &p);
            let back = decode(&p);
            let snr = |fr: &[Frame]| {
                let v = probe_chips(fr, c.plane, chip, true);
                let s: Vec<f64> = v
                    .iter()
                    .zip(&chips)
                    .map(|(v, c)| v * f64::from(*c))
                    .collect();
                let (m, sd) = stats(&s);
                m / sd
            };
            let raw = snr(&marked);
            let att = snr(&back);
            let host = snr(&frames);
            sums[k].0 += raw;
            sums[k].1 += att;
            sums[k].2 += host.abs();
            sums[k].3 += 1;
            att_by_src[ci][k] = att;
            print!(" | {att:5.2} ({raw:5.2})");
        }
        println!();
        // Combined: luma as v3 marks it (texture mask, RMS cap 2.3) plus an independent Cr (and
        // Cb) tile, 1x chips, flat, filling the PSNR headroom up to a total RGB RMS of `cap`.
        for cap in [2.3f32, 2.55] {
            let pat = probe_pattern(&chips, c0, w, h);
            let rmsl = (pat
                .iter()
                .zip(&amp0)
                .map(|(p, a)| f64::from(p * a).powi(2))
                .sum::<f64>()
                / pat.len() as f64)
                .sqrt() as f32;
            let gl = if rmsl > 2.3 { 2.3 / rmsl } else { 1.0 };
            let dl: Vec<f32> = pat.iter().zip(&amp0).map(|(p, a)| gl * p * a).collect();
            let used = (gl * rmsl).min(2.3);
            let left = (cap * cap - used * used).max(0.0).sqrt();
            let chips2: Vec<f32> = chips
                .iter()
                .enumerate()
                .map(|(i, c)| if (i * 7 + i / 5) % 3 == 0 { -c } else { *c })
                .collect();
            let chips3: Vec<f32> = chips
                .iter()
                .enumerate()
                .map(|(i, c)| if (i * 11 + i / 3) % 2 == 0 { -c } else { *c })
                .collect();
            let mut line = format!("   cap {cap}: luma rms {used:.2}, chroma rms {left:.2}");
            for both in [false, true] {
                let mut deltas = vec![(0usize, dl.clone())];
                let planes: Vec<(usize, &Vec<f32>)> = if both {
                    vec![(2, &chips2), (1, &chips3)]
                } else {
                    vec![(2, &chips2)]
                };
                for &(pl, ch) in &planes {
                    let pt = probe_pattern(ch, c0, w, h);
                    let rp = (pt.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>()
                        / pt.len() as f64)
                        .sqrt() as f32;
                    let col = COL[pl];
                    let cost = (col.iter().map(|v| v * v).sum::<f32>() / 3.0).sqrt();
                    let g = left / (planes.len() as f32).sqrt() / (rp * cost);
                    deltas.push((pl, pt.iter().map(|p| g * p).collect()));
                }
                let marked = add(&frames, &deltas);
                let psnr = kino_media::psnr_video(&frames, &marked).unwrap();
                let p = dir.join("c.mp4");
                encode(&marked, 24, crf, &p);
                let back = decode(&p);
                let mut chans = vec![(0usize, &chips)];
                chans.extend(planes.iter().copied());
                let mut comb2 = 0.0;
                let mut parts = String::new();
                for (pl, ch) in chans {
                    let v = probe_chips(&back, pl, c0, true);
                    let s: Vec<f64> = v
                        .iter()
                        .zip(ch.iter())
                        .map(|(v, c)| v * f64::from(*c))
                        .collect();
                    let (m, sd) = stats(&s);
                    comb2 += (m / sd).max(0.0).powi(2);
                    parts.push_str(&format!(" {:.2}", m / sd));
                }
                line.push_str(&format!(
                    " | {} psnr {psnr:.1}: per plane{parts} -> MRC {:.2}",
                    if both { "Y+Cr+Cb" } else { "Y+Cr" },
                    comb2.sqrt()
                ));
            }
            println!("{line}");
        }
    }
    println!(
        "\nper-chip SNR (mean / sd of chip × sign at the true sync, payload fold), {w}×{h}, {nf} frames, CRF {crf}, RGB RMS {target} levels ({:.1} dB), {n} sources:",
        20.0 * (255.0 / f64::from(target)).log10()
    );
    for (k, c) in cfgs.iter().enumerate() {
        let (r, at, ho, m) = sums[k];
        let m = m as f64;
        let mut v: Vec<f64> = att_by_src.iter().map(|s| s[k]).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "{}: after CRF {crf} mean {:.2} (median {:.2}, min {:.2}); before {:.2}; |host-only bias| {:.2}",
            c.name,
            at / m,
            v[v.len() / 2],
            v[0],
            r / m,
            ho / m
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
