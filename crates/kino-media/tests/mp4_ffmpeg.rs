//! MP4 output checked by outside tools (ffprobe/ffmpeg from Debian's `ffmpeg` package) and by
//! our own reader.

mod common;

use std::path::Path;
use std::process::Command;

use kino_media::{
    probe, psnr_video, read_metadata, read_mp4, write_mp4, Fps, MediaFormat, Mp4Options, Video,
};
use serde_json::json;

/// Top-level boxes of a file, parsed here independently of the crate.
fn top_boxes(path: &Path) -> Vec<(String, u64)> {
    let data = std::fs::read(path).expect("read mp4");
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let mut size = u64::from(u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()));
        let kind = String::from_utf8_lossy(&data[pos + 4..pos + 8]).into_owned();
        if size == 1 {
            size = u64::from_be_bytes(data[pos + 8..pos + 16].try_into().unwrap());
        } else if size == 0 {
            size = (data.len() - pos) as u64;
        }
        assert!(size >= 8, "box {kind} has size {size}");
        out.push((kind, size));
        pos += size as usize;
    }
    assert_eq!(pos, data.len(), "boxes do not tile the file");
    out
}

fn params() -> serde_json::Value {
    json!({
        "prompt": "a corgi surfing at sunset, \"golden\" light — ünïcode ✓",
        "negative_prompt": "blurry",
        "model": "wan2.1-t2v-1.3b",
        "seed": 1234567890123u64,
        "steps": 30,
        "guidance": 5.5,
        "width": 640,
        "height": 352,
        "frames": 33,
        "fps": 16,
        "kino_version": "0.1.0"
    })
}

fn stream(probe: &serde_json::Value) -> &serde_json::Value {
    &probe["streams"][0]
}

#[test]
fn mp4_is_read_by_ffmpeg_and_by_us() {
    let (w, h, n, fps) = (640, 352, 33, 16);
    let video = common::synthetic_video(w, h, n, fps);
    let dir = common::temp_dir("mp4");
    let path = dir.join("out.mp4");
    let opts = Mp4Options {
        metadata: Some(params()),
        ..Default::default()
    };
    write_mp4(&path, &video, &opts).expect("write mp4");

    // Fast start: ftyp, moov, mdat in that order, nothing else.
    let boxes: Vec<String> = top_boxes(&path).into_iter().map(|(k, _)| k).collect();
    assert_eq!(boxes, ["ftyp", "moov", "mdat"]);

    let p = common::ffprobe(&path);
    let s = stream(&p);
    assert_eq!(s["codec_name"], "h264", "{p:#}");
    assert_eq!(s["profile"], "Constrained Baseline", "{p:#}");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(s["width"], w);
    assert_eq!(s["height"], h);
    assert_eq!(s["nb_read_frames"], n.to_string());
    assert_eq!(s["nb_frames"], n.to_string());
    assert_eq!(s["r_frame_rate"], "16/1");
    assert_eq!(s["avg_frame_rate"], "16/1");
    assert_eq!(s["duration"], "2.062500"); // 33 / 16 exactly
    assert_eq!(p["format"]["duration"], "2.062500");
    assert_eq!(s["color_range"], "tv");
    assert_eq!(s["color_space"], "bt709");
    assert_eq!(s["color_primaries"], "bt709");
    assert_eq!(s["color_transfer"], "bt709");
    let tags = &p["format"]["tags"];
    let comment: serde_json::Value =
        serde_json::from_str(tags["comment"].as_str().expect("comment tag")).expect("JSON");
    assert_eq!(comment, params());
    let generation: serde_json::Value =
        serde_json::from_str(tags["generation"].as_str().expect("generation tag")).expect("JSON");
    assert_eq!(generation, params());
    assert!(
        tags["encoder"].as_str().unwrap_or("").contains("Kino"),
        "{tags}"
    );

    // ffmpeg's decode against the source.
    let decoded = common::ffmpeg_decode_rgb(&path, w, h);
    assert_eq!(decoded.len(), n as usize);
    let psnr_ffmpeg = psnr_video(video.frames(), &decoded).unwrap();
    println!("PSNR ffmpeg decode (accurate swscale) vs source: {psnr_ffmpeg:.2} dB");
    let fast = common::ffmpeg_decode_rgb_with(&path, w, h, &[]);
    let psnr_fast = psnr_video(video.frames(), &fast).unwrap();
    println!("PSNR ffmpeg decode (default swscale) vs source: {psnr_fast:.2} dB");

    // Our reader.
    let ours = read_mp4(&path).expect("read mp4");
    assert_eq!(ours.len(), n as usize);
    assert_eq!(ours.fps(), Fps::integer(16).unwrap());
    assert_eq!((ours.width(), ours.height()), (w, h));
    let psnr_ours = psnr_video(video.frames(), ours.frames()).unwrap();
    println!("PSNR own decode vs source: {psnr_ours:.2} dB");
    assert!(psnr_ffmpeg >= 38.0, "ffmpeg PSNR {psnr_ffmpeg:.2} dB < 38");
    assert!(psnr_ours >= 38.0, "own PSNR {psnr_ours:.2} dB < 38");
    // The two decoders agree (same colour matrix and range).
    let agree = psnr_video(&decoded, ours.frames()).unwrap();
    println!("PSNR own decode vs ffmpeg decode: {agree:.2} dB");
    assert!(
        agree >= 42.0,
        "own and ffmpeg decodes differ: {agree:.2} dB"
    );

    assert_eq!(read_metadata(&path).unwrap(), Some(params()));
    let info = probe(&path).unwrap();
    assert_eq!(info.format, MediaFormat::Mp4);
    assert_eq!(
        (info.width, info.height, info.frame_count),
        (w, h, u64::from(n))
    );
    assert_eq!(info.fps, Some(Fps::integer(16).unwrap()));
    assert_eq!(info.duration_secs, Some(2.0625));
    assert_eq!(info.metadata, Some(params()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ntsc_rate_has_exact_timestamps_and_keyframes() {
    let fps = Fps::new(24000, 1001).unwrap();
    let frames = common::synthetic_video(160, 96, 50, 24).into_frames();
    let video = Video::new(frames, fps).unwrap();
    let dir = common::temp_dir("ntsc");
    let path = dir.join("ntsc.mp4");
    let opts = Mp4Options {
        keyframe_interval: 12,
        threads: 1,
        ..Default::default()
    };
    write_mp4(&path, &video, &opts).unwrap();
    let p = common::ffprobe(&path);
    let s = stream(&p);
    assert_eq!(s["r_frame_rate"], "24000/1001");
    assert_eq!(s["nb_read_frames"], "50");
    assert_eq!(s["duration"], "2.085417"); // 50 * 1001 / 24000 = 2.0854166…
                                           // Key frames where we asked for them, and only there.
    let ffprobe = common::require_tool("ffprobe", "ffmpeg");
    let out = common::run(
        Command::new(ffprobe)
            .args([
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                "packet=pts,flags",
                "-of",
                "csv=p=0",
            ])
            .arg(&path),
    );
    let text = String::from_utf8(out).unwrap();
    let packets: Vec<(i64, bool)> = text
        .lines()
        .map(|l| {
            let mut it = l.split(',');
            let pts = it.next().unwrap().parse().unwrap();
            let key = it.next().unwrap().starts_with('K');
            (pts, key)
        })
        .collect();
    assert_eq!(packets.len(), 50);
    for (i, &(pts, key)) in packets.iter().enumerate() {
        assert_eq!(pts, i as i64 * 1_001_000, "pts of packet {i}");
        assert_eq!(key, i % 12 == 0, "key flag of packet {i}");
    }
    let back = read_mp4(&path).unwrap();
    assert_eq!(back.fps(), fps);
    assert_eq!(back.len(), 50);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reads_mp4_written_by_ffmpeg() {
    // A file from another muxer and encoder (libx264 baseline, moov at the end).
    let (w, h, n) = (320, 176, 20);
    let video = common::synthetic_video(w, h, n, 10);
    let dir = common::temp_dir("x264");
    let raw: Vec<u8> = video
        .frames()
        .iter()
        .flat_map(|f| f.data().to_vec())
        .collect();
    let rawpath = dir.join("in.rgb");
    std::fs::write(&rawpath, raw).unwrap();
    let path = dir.join("x264.mp4");
    let ffmpeg = common::require_tool("ffmpeg", "ffmpeg");
    common::run(
        Command::new(ffmpeg)
            .args([
                "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
            ])
            .arg(format!("{w}x{h}"))
            .args(["-r", "10", "-i"])
            .arg(&rawpath)
            .args([
                "-c:v",
                "libx264",
                "-profile:v",
                "baseline",
                "-pix_fmt",
                "yuv420p",
                "-crf",
                "12",
                "-vf",
                "scale=out_color_matrix=bt709:out_range=tv",
                "-colorspace",
                "bt709",
                "-color_primaries",
                "bt709",
                "-color_trc",
                "bt709",
            ])
            .arg(&path),
    );
    let boxes: Vec<String> = top_boxes(&path).into_iter().map(|(k, _)| k).collect();
    let moov = boxes.iter().position(|b| b == "moov").unwrap();
    let mdat = boxes.iter().position(|b| b == "mdat").unwrap();
    assert!(
        mdat < moov,
        "expected ffmpeg's default layout (moov last): {boxes:?}"
    );
    let back = read_mp4(&path).expect("read x264 mp4");
    assert_eq!(back.len(), n as usize);
    assert_eq!(back.fps(), Fps::integer(10).unwrap());
    let p = psnr_video(video.frames(), back.frames()).unwrap();
    println!("PSNR own decode of x264 file: {p:.2} dB");
    assert!(p >= 38.0, "{p:.2}");
    assert_eq!(read_metadata(&path).unwrap(), None);

    // x264's default High profile with B-frames: probed, but decoding says what to do.
    let hi = dir.join("x264-high.mp4");
    let ffmpeg = common::require_tool("ffmpeg", "ffmpeg");
    common::run(
        Command::new(ffmpeg)
            .args([
                "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
            ])
            .arg(format!("{w}x{h}"))
            .args(["-r", "10", "-i"])
            .arg(&rawpath)
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "2"])
            .arg(&hi),
    );
    let info = probe(&hi).unwrap();
    assert_eq!(
        (info.width, info.height, info.frame_count),
        (w, h, u64::from(n))
    );
    let e = read_mp4(&hi).unwrap_err();
    assert!(matches!(e, kino_media::MediaError::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("B-frames"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
