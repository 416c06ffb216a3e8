//! Decodes a video file and says what came out and how long it took:
//! `cargo run --release -p kino-media --example read_video -- FILE [ffmpeg|rust] [RAW_RGB_REFERENCE]`
//! (`rust`: the pure-Rust MP4 reader, for Kino's own files; a raw rgb24 reference of the same
//! size gives the PSNR against it). Also `FILE make W H N` (write a Kino MP4 to time) and
//! `IN.png fit W H OUT.png` (fit_crop a picture).

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: read_video FILE [ffmpeg|rust] [RAW_RGB_REFERENCE]");
        std::process::exit(2);
    };
    let how = args.get(1).map_or("ffmpeg", String::as_str);
    if how == "fit" {
        // `read_video IN.png fit W H OUT.png`: fit_crop a picture (to compare with PIL).
        let n = |i: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(64);
        let r = kino_media::read_image(path)
            .and_then(|f| kino_media::fit_crop(&f, n(2), n(3)))
            .and_then(|f| kino_media::write_image(args.get(4).map_or("fit.png", |s| s), &f));
        if let Err(e) = r {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    if how == "make" {
        // A Kino file to time: `read_video OUT.mp4 make 832 480 81` (a moving pattern, 16 fps).
        let n = |i: usize, d: u32| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
        let (w, h, count) = (n(2, 832), n(3, 480), n(4, 81));
        let frames = (0..count)
            .map(|t| {
                kino_media::Frame::from_fn(w, h, |x, y| {
                    let v = (x * 7 + y * 13 + t * 5) ^ (x * y + t);
                    [(x + t) as u8, (y * 2) as u8, v as u8]
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|f| kino_media::Video::new(f, kino_media::Fps::integer(16)?))
            .and_then(|v| kino_media::write_mp4(path, &v, &Default::default()));
        if let Err(e) = frames {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    let t = Instant::now();
    let v = match how {
        "rust" => kino_media::read_mp4(path),
        _ => kino_media::read_video(std::path::Path::new(path)),
    };
    let secs = t.elapsed().as_secs_f64();
    match v {
        Ok(v) => {
            println!(
                "{path}: {} frames of {}x{} at {} fps, decoded by {how} in {:.3} s",
                v.len(),
                v.width(),
                v.height(),
                v.fps(),
                secs
            );
            if let Some(reference) = args.get(2) {
                let raw = std::fs::read(reference).unwrap_or_default();
                let n = (v.width() * v.height() * 3) as usize;
                let frames: Vec<kino_media::Frame> = raw
                    .chunks_exact(n)
                    .filter_map(|c| kino_media::Frame::new(v.width(), v.height(), c.to_vec()).ok())
                    .collect();
                match kino_media::psnr_video(&frames, v.frames()) {
                    Ok(p) => println!("PSNR against {reference}: {p:.2} dB"),
                    Err(e) => println!("cannot compare with {reference}: {e}"),
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
