//! The watermark measurement behind the README's "Watermark" table. Ignored by default (it runs
//! hundreds of real ffmpeg encodes); run it with
//! `nice -n 10 cargo test --release -p kino-watermark --test bench -- --ignored --nocapture`.
//! Optional: `KINO_WM_KINO_CLIPS=DIR` (folders of PNG frames written by `kino generate -o DIR/x`),
//! `KINO_WM_FP_CLIPS=N` (unmarked clips, default 500); for quick iterations
//! `KINO_WM_SIZES=256x256,832x480` (ffmpeg-source groups to run, default all three),
//! `KINO_WM_SOURCES=N` (the first N of the 15 sources per group), `KINO_WM_REPS=R` (at 256×256
//! every source also from R-1 later start frames: R times the clips), `KINO_WM_ATTACKS=crf28,half`
//! (attack keys: crf23 crf28 half crop drop fps30 fps15; default all) and `KINO_WM_KINO=0` (skip
//! the Kino-output groups). `KINO_WM_PHOTOS=DIR` adds natural-looking clips: slow pans over the
//! photographs in DIR (`scripts/wm-photos.sh DIR` fetches the CC0 / public-domain ones that ship
//! in scikit-image's wheel), at 256×256 and 832×480. `KINO_WM_HEADROOM=L` marks with
//! `QimParams::headroom` L instead of the default (0: as until stop 61).

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;
use kino_media::{psnr_video, Frame};
use kino_watermark::{detect, Embedder, Key, QimParams};

struct Attack {
    key: &'static str,
    name: &'static str,
    vf: Option<&'static str>,
    crf: u32,
    extra: &'static [&'static str],
}

const ATTACKS: &[Attack] = &[
    Attack {
        key: "crf23",
        name: "H.264 CRF 23",
        vf: None,
        crf: 23,
        extra: &[],
    },
    Attack {
        key: "crf28",
        name: "H.264 CRF 28",
        vf: None,
        crf: 28,
        extra: &[],
    },
    Attack {
        key: "half",
        name: "half size (+CRF 23)",
        vf: Some("scale=trunc(iw/4)*2:trunc(ih/4)*2"),
        crf: 23,
        extra: &[],
    },
    Attack {
        key: "crop",
        name: "crop 10% (+CRF 23)",
        vf: Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"),
        crf: 23,
        extra: &[],
    },
    Attack {
        key: "drop",
        name: "drop 1 frame in 4 (+CRF 23)",
        vf: Some("select='not(eq(mod(n\\,4)\\,1))',setpts=N/FRAME_RATE/TB"),
        crf: 23,
        extra: &[],
    },
    Attack {
        key: "fps30",
        name: "24→30 fps (+CRF 23)",
        vf: Some("fps=30"),
        crf: 23,
        extra: &[],
    },
    Attack {
        key: "fps15",
        name: "24→15 fps (+CRF 23)",
        vf: Some("fps=15"),
        crf: 23,
        extra: &[],
    },
];

#[derive(Default, Clone)]
struct Tally {
    clips: usize,
    detected: usize,
    bits_ok: usize,
    bits: usize,
}

impl Tally {
    fn add(&mut self, detected_right: bool, raw: u64, expected: u64) {
        self.clips += 1;
        self.detected += usize::from(detected_right);
        // The 48 id bits.
        self.bits_ok += 48 - ((raw ^ expected) & ((1 << 48) - 1)).count_ones() as usize;
        self.bits += 48;
    }
    fn cell(&self) -> String {
        if self.clips == 0 {
            return "–".into();
        }
        format!(
            "{:.1}% / {:.1}%",
            100.0 * self.detected as f64 / self.clips as f64,
            100.0 * self.bits_ok as f64 / self.bits as f64
        )
    }
}

fn kino_clips() -> Vec<(String, Vec<Frame>)> {
    match std::env::var("KINO_WM_KINO_CLIPS") {
        Ok(dir) => png_clips(Path::new(&dir)),
        Err(_) => Vec::new(),
    }
}

fn upscale(frames: &[Frame], w: u32, h: u32) -> Vec<Frame> {
    frames
        .iter()
        .map(|f| kino_media::resize(f, w, h).unwrap())
        .collect()
}

/// The attacks selected by `KINO_WM_ATTACKS` (all by default).
fn attacks() -> Vec<&'static Attack> {
    let sel = std::env::var("KINO_WM_ATTACKS").ok();
    ATTACKS
        .iter()
        .filter(|a| {
            sel.as_ref()
                .is_none_or(|s| s.split(',').any(|k| k == a.key))
        })
        .collect()
}

/// The embedder's parameters: the defaults, or `KINO_WM_HEADROOM`'s pull at the channel ends.
fn params() -> QimParams {
    let def = QimParams::default();
    QimParams {
        headroom: std::env::var("KINO_WM_HEADROOM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(def.headroom),
        ..def
    }
}

fn run_group(name: &str, clips: &[Vec<Frame>], key: &Key, dir: &Path, report: &mut String) {
    let attacks = attacks();
    let mut tallies = vec![Tally::default(); attacks.len() + 1];
    let mut psnrs = Vec::new();
    for (ci, frames) in clips.iter().enumerate() {
        let id = 0x5eed_0000_0000 + ci as u64 * 7919;
        let expected = id;
        let (w, h) = (frames[0].width(), frames[0].height());
        let e = Embedder::with_params(key, id, w, h, params());
        let mut m = frames.to_vec();
        for (i, f) in m.iter_mut().enumerate() {
            e.mark(f, i);
        }
        psnrs.push(psnr_video(frames, &m).unwrap());
        let d = detect(&m, key);
        tallies[0].add(d.detected && d.id == Some(id), d.raw_payload, expected);
        let mut diag = vec![format!("z {:.1} e {}", d.sync_score, d.bit_errors)];
        for (ai, a) in attacks.iter().enumerate() {
            let p = dir.join(format!("{name}-{ci}-{ai}.mp4"));
            encode_filtered(&m, 24, a.vf, a.crf, a.extra, &p);
            let d = detect_file(&p, key);
            let _ = std::fs::remove_file(&p);
            tallies[ai + 1].add(d.detected && d.id == Some(id), d.raw_payload, expected);
            diag.push(format!(
                "{}: z {:.1} e {} s {:.3}",
                a.key, d.sync_score, d.bit_errors, d.scale
            ));
        }
        eprintln!(
            "{name} clip {ci}: {}",
            tallies
                .iter()
                .map(Tally::cell)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        eprintln!("  ({})", diag.join(", "));
    }
    let mean_psnr = psnrs.iter().sum::<f64>() / psnrs.len().max(1) as f64;
    let min_psnr = psnrs.iter().cloned().fold(f64::INFINITY, f64::min);
    report.push_str(&format!(
        "| {name} | {} | {:.1} ({:.1}) | {} |\n",
        clips.len(),
        mean_psnr,
        min_psnr,
        tallies
            .iter()
            .map(Tally::cell)
            .collect::<Vec<_>>()
            .join(" | ")
    ));
}

#[test]
#[ignore = "long measurement; run by hand (see the file's doc)"]
fn watermark_table() {
    let dir = scratch("bench");
    let key = Key::from_bytes(b"kino watermark benchmark key");
    let names: Vec<&str> = attacks().iter().map(|a| a.name).collect();
    let sizes = std::env::var("KINO_WM_SIZES").ok();
    // A size is run unless KINO_WM_SIZES lists others.
    let wanted = |w: u32, h: u32| {
        sizes
            .as_ref()
            .is_none_or(|s| s.split(',').any(|s| s == format!("{w}x{h}")))
    };
    let n_sources: usize = std::env::var("KINO_WM_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let mut report = format!(
        "| clips | n | PSNR dB mean (min) | no attack | {} |\n|---|---|---|---|{}\n",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    // KINO_WM_REPS=R: at 256×256 each source (ffmpeg and photographs) also from R-1 later start
    // frames (more clips for the size where the mark is weakest).
    let reps: usize = std::env::var("KINO_WM_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let reps_at = |w: u32| if w == 256 { reps } else { 1 };
    // ffmpeg-generated content at three sizes: the natural-looking sources, and the test cards
    // (testsrc2: flat bars of saturated colour) in a row of their own.
    for (w, h, frames) in [(256, 256, 24), (832, 480, 16), (1280, 720, 12)] {
        if !wanted(w, h) {
            continue;
        }
        let sources = natural_sources();
        let n = n_sources.min(sources.len());
        let all = repeated(&sources, n, reps_at(w));
        for cards in [false, true] {
            let clips: Vec<Vec<Frame>> = all
                .iter()
                .filter(|s| s.starts_with("testsrc2") == cards)
                .map(|s| lavfi_frames(s, w, h, frames))
                .collect();
            if clips.is_empty() {
                continue;
            }
            let name = if cards {
                format!("ffmpeg test cards {w}×{h}")
            } else {
                format!("ffmpeg sources {w}×{h}")
            };
            run_group(&name, &clips, &key, &dir, &mut report);
        }
    }
    // Natural-looking clips: pans over photographs (KINO_WM_PHOTOS=DIR, scripts/wm-photos.sh), at
    // 256×256 and 832×480.
    if let Ok(photos) = std::env::var("KINO_WM_PHOTOS") {
        for (w, h) in [(256, 256), (832, 480)] {
            if !wanted(w, h) {
                continue;
            }
            let sources = photo_sources(Path::new(&photos));
            let n = n_sources.min(sources.len());
            let clips: Vec<Vec<Frame>> = repeated(&sources, n, reps_at(w))
                .iter()
                .map(|s| lavfi_frames(s, w, h, 24))
                .collect();
            run_group(
                &format!("photographs panned {w}×{h}"),
                &clips,
                &key,
                &dir,
                &mut report,
            );
        }
    }
    let kino = if std::env::var("KINO_WM_KINO").is_ok_and(|v| v == "0") {
        Vec::new()
    } else {
        kino_clips()
    };
    if !kino.is_empty() {
        let up: Vec<Vec<Frame>> = kino.iter().map(|(_, f)| upscale(f, 256, 256)).collect();
        run_group(
            "Kino outputs upscaled to 256×256",
            &up,
            &key,
            &dir,
            &mut report,
        );
        let native: Vec<Vec<Frame>> = kino.iter().map(|(_, f)| f.clone()).collect();
        run_group(
            "Kino outputs, native 64×64",
            &native,
            &key,
            &dir,
            &mut report,
        );
    }
    // False positives: unmarked clips (and marked clips under another key).
    let n_fp: usize = std::env::var("KINO_WM_FP_CLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    // The ffmpeg sources, and the photographs too when they are given.
    let mut sources = natural_sources();
    let photos = std::env::var("KINO_WM_PHOTOS").ok();
    if let Some(dir) = &photos {
        sources.extend(photo_sources(Path::new(dir)));
    }
    let mut fp = 0;
    let mut max_sync = 0f64;
    let t = Instant::now();
    for i in 0..n_fp {
        let (w, h) = [(256, 256), (320, 192), (416, 240)][i % 3];
        let src = &sources[i % sources.len()];
        // A different stretch of the source for each clip.
        let graph = format!("{src},trim=start_frame={}", (i / sources.len()) * 5);
        let frames = lavfi_frames(&graph, w, h, 8);
        let p = dir.join(format!("fp-{i}.mp4"));
        encode_filtered(&frames, 24, None, 23, &[], &p);
        let d = detect_file(&p, &key);
        let _ = std::fs::remove_file(&p);
        max_sync = max_sync.max(d.sync_score);
        if d.detected {
            fp += 1;
            eprintln!("FALSE POSITIVE on unmarked clip {i} ({graph} {w}x{h}): {d:?}");
        }
    }
    report.push_str(&format!(
        "\nFalse positives: {fp} of {n_fp} unmarked clips (8 frames each, 256×256 / 320×192 / 416×240, the {} sources above at different start frames, H.264 CRF 23), highest sync score {max_sync:.2}; {:.0} ms per clip.\n",
        if photos.is_some() { "ffmpeg and photograph" } else { "15 ffmpeg" },
        t.elapsed().as_secs_f64() * 1e3 / n_fp.max(1) as f64
    ));
    // Speed of marking.
    for (w, h) in [(832u32, 480u32), (64, 64)] {
        let frames = lavfi_frames("mandelbrot=size={w}x{h}:rate=24", w, h, 16);
        let e = Embedder::new(&key, 1, w, h);
        let mut m = frames.clone();
        let t = Instant::now();
        for _ in 0..4 {
            for (i, f) in m.iter_mut().enumerate() {
                e.mark(f, i);
            }
        }
        let per = t.elapsed().as_secs_f64() * 1e3 / 64.0;
        let t = Instant::now();
        let _ = Embedder::new(&key, 1, w, h);
        report.push_str(&format!(
            "Marking {w}×{h}: {per:.2} ms per frame (+{:.2} ms once per video for the pattern).\n",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }
    println!("\n{report}");
    if let Ok(out) = std::env::var("KINO_WM_BENCH_OUT") {
        std::fs::write(out, &report).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
    assert!(fp * 500 <= n_fp, "false positives {fp} of {n_fp}");
}
