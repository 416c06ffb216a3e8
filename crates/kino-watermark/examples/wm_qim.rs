//! Development probe for the two carriers of layout v4: for each of the first N bench sources at
//! one size, mark with the given strengths, attack, and print what the detector found (and from
//! which carrier) next to a spread-spectrum-only decode at the true sync.
//! `cargo run --release -p kino-watermark --example wm_qim -- W H N ATTACK [STEP D_MAX Q_FLOOR
//! MAX_CLIPPED SYNC_SHARE MAX_SATURATED]` (defaults: layout v4's; ATTACK: crf28, crf23, half, crop, crop0 (the
//! crop losslessly), raw; STEP 0 turns the QIM carrier off, MAX_CLIPPED 1.01 makes every frame a
//! QIM frame, -1 none). Environment: `KINO_WM_PHOTOS=DIR` the panned photographs instead of the
//! ffmpeg sources, `KINO_WM_REPS=R` each from R start frames, `KINO_WM_PICK=i,j` only those sources, `KINO_WM_SLOTS=1` one QIM value per
//! bit (all its cells together) instead of one per cell, `KINO_WM_GAMUT=0` every channel moved
//! alike and clipped (saturated pixels not helped by the others, as layout v4 was first made), `KINO_WM_RAW=1` the clipped share and the
//! QIM's raw errors per frame at the true grid (`KINO_WM_DX` shifts it), `KINO_WM_LOOK=DIR` the
//! first frame original | marked | change ×10, `KINO_WM_RGB=1` the luma of the decoded RGB frames
//! instead of the coded luma.
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{
    decode_at, detect_with, probe_clipped, qim_raw_errors, Embedder, Key, QimParams,
};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (w, h) = (arg(1, 256.0) as u32, arg(2, 256.0) as u32);
    let n = arg(3, 15.0) as usize;
    let attack = a.get(4).cloned().unwrap_or("crf28".into());
    let def = QimParams::default();
    let params = QimParams {
        step: arg(5, f64::from(def.step)) as f32,
        d_max: arg(6, f64::from(def.d_max)) as f32,
        q_floor: arg(7, f64::from(def.q_floor)) as f32,
        max_clipped: arg(8, f64::from(def.max_clipped)) as f32,
        sync_share: arg(9, f64::from(def.sync_share)) as f32,
        max_saturated: arg(10, f64::from(def.max_saturated)) as f32,
        per_cell: std::env::var("KINO_WM_SLOTS").is_err(),
        gamut: std::env::var("KINO_WM_GAMUT").map_or(true, |v| v != "0"),
        ..def
    };
    let params = if params.step == 0.0 {
        QimParams {
            step: def.step,
            d_max: 0.0,
            ..params
        }
    } else {
        params
    };
    let key = Key::from_bytes(b"kino watermark benchmark key");
    let dir = scratch("qim");
    let (mut ok, mut ok_ss, mut psnr_sum, mut psnr_min) = (0, 0, 0.0, f64::MAX);
    let srcs = match std::env::var("KINO_WM_PHOTOS") {
        Ok(dir) => photo_sources(std::path::Path::new(&dir)),
        Err(_) => natural_sources(),
    };
    // KINO_WM_REPS=R: each source also from R-1 later start frames.
    let reps: usize = std::env::var("KINO_WM_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let srcs = repeated(&srcs, n, reps);
    // KINO_WM_PICK=i,j,…: only these of them (indices as printed).
    let srcs: Vec<String> = match std::env::var("KINO_WM_PICK") {
        Ok(v) => v
            .split(',')
            .filter_map(|i| i.trim().parse::<usize>().ok())
            .filter_map(|i| srcs.get(i).cloned())
            .collect(),
        Err(_) => srcs,
    };
    let n = srcs.len();
    for (ci, s) in srcs.iter().enumerate() {
        let frames = lavfi_frames(s, w, h, 24);
        let id = 0x5eed_0000_0000 + ci as u64 * 7919;
        let e = Embedder::with_params(&key, id, w, h, params);
        let mut m = frames.clone();
        for (i, f) in m.iter_mut().enumerate() {
            e.mark(f, i);
        }
        let psnr = kino_media::psnr_video(&frames, &m).unwrap();
        // KINO_WM_LOOK=DIR: the first frame, original | marked | change ×10 around mid-grey.
        if let Ok(dir) = std::env::var("KINO_WM_LOOK") {
            let (f, g) = (&frames[0], &m[0]);
            let (fw, fh) = (f.width() as usize, f.height() as usize);
            let mut out = vec![0u8; fw * 3 * fh * 3];
            for y in 0..fh {
                for x in 0..fw {
                    for c in 0..3 {
                        let (a, b) = (
                            f.data()[(y * fw + x) * 3 + c],
                            g.data()[(y * fw + x) * 3 + c],
                        );
                        let row = y * fw * 3 * 3;
                        out[row + x * 3 + c] = a;
                        out[row + (fw + x) * 3 + c] = b;
                        out[row + (2 * fw + x) * 3 + c] =
                            (128 + 10 * (i32::from(b) - i32::from(a))).clamp(0, 255) as u8;
                    }
                }
            }
            let img = kino_media::Frame::new(fw as u32 * 3, fh as u32, out).unwrap();
            kino_media::write_image(std::path::Path::new(&dir).join(format!("{ci}.png")), &img)
                .unwrap();
        }
        psnr_sum += psnr;
        psnr_min = psnr_min.min(psnr);
        let p = dir.join(format!("{ci}.mp4"));
        let (vf, crf) = match attack.as_str() {
            "crf23" => (None, 23),
            "half" => (Some("scale=trunc(iw/4)*2:trunc(ih/4)*2"), 23),
            "crop" => (Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"), 23),
            "crop0" => (Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"), 0),
            "raw" => (None, 0),
            _ => (None, 28),
        };
        let (back, luma) = if attack == "raw" {
            let l = m.iter().map(kino_media::LumaPlane::from_frame).collect();
            (m.clone(), l)
        } else {
            encode_filtered(&m, 24, vf, crf, &[], &p);
            decode_luma(&p)
        };
        // KINO_WM_RGB=1: the luma of the decoded RGB, as the detector read it before stop 55.
        let luma = std::env::var("KINO_WM_RGB").is_err().then_some(&luma[..]);
        let d = detect_with(&back, luma, &key, &params);
        let t = decode_at(&back, &key, 1.0, 0, 0);
        if std::env::var("KINO_WM_RAW").is_ok() {
            let (clipped, stuck) = probe_clipped(&frames[0]);
            println!("   clipped {clipped:.2} stuck {stuck:.2}");
            let all: Vec<String> = frames
                .iter()
                .map(|f| {
                    let (c, s) = probe_clipped(f);
                    format!("{c:.2}/{s:.2}")
                })
                .collect();
            println!("   clipped/stuck per frame {}", all.join(" "));
            // After a centred crop the grid's origin lies outside the frame.
            let (bw, bh) = (back[0].width(), back[0].height());
            let cell = f64::from(w.min(h)) / 32.0;
            let dx: f64 = std::env::var("KINO_WM_DX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let grid = attack.starts_with("crop").then(|| {
                (
                    -f64::from((w - bw) / 2) + dx,
                    -f64::from((h - bh) / 2),
                    cell.max(4.0),
                )
            });
            let (per, mean) = qim_raw_errors(&back, &key, id, &params, grid);
            println!("   raw QIM errors per frame {per:?}, of the mean {mean}");
        }
        ok += usize::from(d.id == Some(id));
        ok_ss += usize::from(t.id == Some(id));
        println!(
            "{ci:2} {:10} psnr {psnr:.1}: detect {} ({}, e {}) | spread spectrum at the true sync: {} e {}",
            s.split(['=', ',']).nth(1).unwrap_or(s).rsplit('/').next().unwrap_or(s),
            d.id == Some(id),
            d.carrier,
            d.bit_errors,
            t.id == Some(id),
            t.bit_errors
        );
    }
    println!(
        "{params:?}: detected {ok}/{n}, spread spectrum at the true sync {ok_ss}/{n}, PSNR mean {:.1} min {psnr_min:.1}",
        psnr_sum / n as f64
    );
    let _ = std::fs::remove_dir_all(dir);
}
