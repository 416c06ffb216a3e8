//! Encode benchmark: 121 synthetic frames at 1280×704, 16 fps, to MP4 with the default
//! settings (and a few other quantisers), timed, with PSNR of our own decode against the
//! source. Run with `cargo bench -p kino-media --bench encode`.
//!
//! Environment: `KINO_BENCH_QPS=18,22,26` (quantisers; the default QP first),
//! `KINO_BENCH_THREADS=0` (0 = all cores), `KINO_BENCH_REPEAT=3` (best of N).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use kino_media::{decode_mp4, encode_mp4, psnr_video, Mp4Options, Quality};

/// CPU seconds (user + system) this process has used, from /proc (Linux); `None` elsewhere.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0) // USER_HZ is 100 on Linux
}

fn main() {
    let (w, h, n, fps) = (1280, 704, 121, 16);
    let qps: Vec<u8> = std::env::var("KINO_BENCH_QPS")
        .ok()
        .map(|s| s.split(',').filter_map(|q| q.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![Quality::DEFAULT_QP, 22, 26]);
    let threads: usize = std::env::var("KINO_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let repeat: usize = std::env::var("KINO_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let t0 = Instant::now();
    let video = common::synthetic_video(w, h, n, fps);
    eprintln!(
        "made {n} frames {w}x{h} in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("kino-media encode benchmark: {n} frames {w}x{h} @ {fps} fps, {cores} cores, best of {repeat}");
    println!("| qp | threads | encode wall s | encode CPU s | frames/s | MiB | Mbit/s | PSNR dB (own decode) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for qp in qps {
        let opts = Mp4Options {
            quality: Quality::Qp(qp),
            threads,
            ..Default::default()
        };
        let mut best = f64::INFINITY;
        let mut best_cpu = f64::INFINITY;
        let mut bytes = Vec::new();
        for _ in 0..repeat {
            let c = cpu_secs();
            let t = Instant::now();
            bytes = encode_mp4(&video, &opts).expect("encode");
            best = best.min(t.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (c, cpu_secs()) {
                best_cpu = best_cpu.min(b - a);
            }
        }
        let back = decode_mp4(&bytes).expect("decode");
        let p = psnr_video(video.frames(), back.frames()).expect("psnr");
        let mib = bytes.len() as f64 / (1 << 20) as f64;
        let mbps = bytes.len() as f64 * 8.0 / video.duration_secs() / 1e6;
        println!(
            "| {qp} | {} | {best:.3} | {best_cpu:.2} | {:.1} | {mib:.2} | {mbps:.2} | {p:.2} |",
            if threads == 0 { cores } else { threads },
            n as f64 / best
        );
    }
}
