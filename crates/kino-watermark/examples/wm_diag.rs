//! Development probe: for each ffmpeg source at one size, mark, attack, and print what the
//! detector found (reading the file as `kino verify` does) next to a decode of the chips at the
//! true sync (scale 1, shift 0: no crop).
//! `cargo run --release -p kino-watermark --example wm_diag -- W H N ATTACK` (ATTACK: crf28, crf23,
//! half, raw, cropoff: the true-sync column is meaningless for cropoff)
#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use kino_watermark::{decode_at, detect_luma, Embedder, Key};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let w: u32 = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let h: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let attack = a.get(4).cloned().unwrap_or("crf28".into());
    let key = Key::from_bytes(b"kino watermark benchmark key");
    let dir = scratch("diag");
    // KINO_WM_PHOTOS=DIR: pans over the photographs in DIR instead of the ffmpeg sources.
    let srcs = match std::env::var("KINO_WM_PHOTOS") {
        Ok(dir) => photo_sources(std::path::Path::new(&dir)),
        Err(_) => natural_sources(),
    };
    // Optional 5th argument: repeat the sources this many times, each from a later start frame.
    let reps: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let srcs = repeated(&srcs, n, reps);
    let n = srcs.len();
    let (mut ok_det, mut ok_true) = (0, 0);
    for (ci, s) in srcs.iter().take(n).enumerate() {
        let frames = lavfi_frames(s, w, h, 24);
        let id = 0x5eed_0000_0000 + ci as u64 * 7919;
        let e = Embedder::new(&key, id, w, h);
        let mut m = frames.clone();
        for (i, f) in m.iter_mut().enumerate() {
            e.mark(f, i);
        }
        let psnr = kino_media::psnr_video(&frames, &m).unwrap();
        let p = dir.join(format!("{ci}.mp4"));
        let (vf, crf, scale) = match attack.as_str() {
            "crf23" => (None, 23, 1.0),
            "half" => (Some("scale=trunc(iw/4)*2:trunc(ih/4)*2"), 23, -1.0),
            "raw" => (None, 0, 1.0),
            // An off-centre 10% crop: only the free search can find it.
            "cropoff" => (
                Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2:37:11"),
                23,
                1.0,
            ),
            _ => (None, 28, 1.0),
        };
        let (back, luma) = if attack == "raw" {
            let l = m.iter().map(kino_media::LumaPlane::from_frame).collect();
            (m.clone(), l)
        } else {
            encode_filtered(&m, 24, vf, crf, &[], &p);
            decode_luma(&p)
        };
        let scale = if scale < 0.0 {
            // Half size: the detector's chip size for the new size vs the true one.
            let (w2, h2) = (back[0].width(), back[0].height());
            let c_new = (f64::from(w2.min(h2)) / 48.0).max(3.0);
            let c_true = (f64::from(w.min(h)) / 48.0).max(3.0) * f64::from(w2) / f64::from(w);
            c_true / c_new
        } else {
            scale
        };
        let d = detect_luma(&back, &luma, &key);
        let t = decode_at(&back, &key, scale, 0, 0);
        let t1 = decode_at(&back[..1], &key, scale, 0, 0);
        let t4 = decode_at(&back[..4], &key, scale, 0, 0);
        print!(
            "first {} e {} | first4 e {} || ",
            t1.id == Some(id),
            t1.bit_errors,
            t4.bit_errors
        );
        ok_det += usize::from(d.id == Some(id));
        ok_true += usize::from(t.id == Some(id));
        println!(
            "{ci} psnr {psnr:.1}: detect {} z {:.1} s {:.3} e {} | true sync: {} e {}",
            d.id == Some(id),
            d.sync_score,
            d.scale,
            d.bit_errors,
            t.id == Some(id),
            t.bit_errors
        );
    }
    println!("detected {ok_det}/{n}, decodable at the true sync {ok_true}/{n}");
    let _ = std::fs::remove_dir_all(dir);
}
