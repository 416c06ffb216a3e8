//! GIF, PNG frame folders, thumbnails and spritesheets, checked with ffprobe/ffmpeg and our
//! own readers.

mod common;

use std::process::Command;

use kino_media::{
    probe, psnr, psnr_video, read_image, write_gif, write_png_frames, write_spritesheet,
    write_thumbnail, Fps, GifOptions, ImageFormat, MediaFormat, SpritesheetOptions,
    ThumbnailOptions,
};

#[test]
fn gif_plays_with_right_timing_and_colours() {
    let (w, h, n) = (320, 176, 24);
    let video = common::synthetic_video(w, h, n, 16);
    let dir = common::temp_dir("gif");
    let path = dir.join("out.gif");
    write_gif(&path, &video, &GifOptions::default()).expect("write gif");

    let p = common::ffprobe(&path);
    let s = &p["streams"][0];
    assert_eq!(s["codec_name"], "gif", "{p:#}");
    assert_eq!(s["width"], w);
    assert_eq!(s["height"], h);
    assert_eq!(s["nb_read_frames"], n.to_string());
    // 24 frames at 16 fps = 1.5 s; GIF delays are 6 or 7 centiseconds adding up to 150.
    let dur: f64 = p["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 1.5).abs() < 0.011, "duration {dur}");

    // Per-frame delays as ffprobe sees them.
    let ffprobe = common::require_tool("ffprobe", "ffmpeg");
    let out = common::run(
        Command::new(ffprobe)
            .args([
                "-v",
                "error",
                "-show_entries",
                "packet=duration",
                "-of",
                "csv=p=0",
            ])
            .arg(&path),
    );
    let delays: Vec<i64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(delays.len(), n as usize);
    assert!(delays.iter().all(|&d| d == 6 || d == 7), "{delays:?}");
    assert_eq!(delays.iter().sum::<i64>(), 150);

    // Content: ffmpeg composes the changed rectangles back into full frames.
    let decoded = common::ffmpeg_decode_rgb(&path, w, h);
    assert_eq!(decoded.len(), n as usize);
    let q = psnr_video(video.frames(), &decoded).unwrap();
    println!("GIF PSNR (ffmpeg decode) vs source: {q:.2} dB");
    assert!(q >= 28.0, "GIF PSNR {q:.2} dB");
    for (i, (a, b)) in video.frames().iter().zip(&decoded).enumerate() {
        let fq = psnr(a, b).unwrap();
        assert!(fq >= 26.0, "frame {i}: {fq:.2} dB");
    }

    let info = probe(&path).unwrap();
    assert_eq!(info.format, MediaFormat::Gif);
    assert_eq!(
        (info.width, info.height, info.frame_count),
        (w, h, u64::from(n))
    );
    assert_eq!(info.fps, Some(Fps::integer(16).unwrap()));
    assert_eq!(info.duration_secs, Some(1.5));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn png_frames_are_lossless() {
    let (w, h, n) = (96, 64, 7);
    let video = common::synthetic_video(w, h, n, 8);
    let dir = common::temp_dir("png");
    let frames_dir = dir.join("frames");
    let paths = write_png_frames(&frames_dir, &video).expect("write pngs");
    assert_eq!(paths.len(), n as usize);
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            p.file_name().unwrap().to_str().unwrap(),
            format!("frame_{i:05}.png")
        );
        assert_eq!(&read_image(p).unwrap(), &video.frames()[i]);
    }
    let pattern = frames_dir.join("frame_%05d.png");
    let p = common::ffprobe(&pattern);
    let s = &p["streams"][0];
    assert_eq!(s["codec_name"], "png");
    assert_eq!(s["pix_fmt"], "rgb24");
    assert_eq!(s["width"], w);
    assert_eq!(s["nb_read_frames"], n.to_string());
    let decoded = common::ffmpeg_decode_rgb(&pattern, w, h);
    assert_eq!(decoded, video.frames());
    let info = probe(&paths[0]).unwrap();
    assert_eq!(
        (info.format, info.width, info.height, info.frame_count),
        (MediaFormat::Png, w, h, 1)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn thumbnail_and_spritesheet() {
    let (w, h, n) = (320, 176, 21);
    let video = common::synthetic_video(w, h, n, 16);
    let dir = common::temp_dir("thumbs");

    let jpg = dir.join("thumb.jpg");
    write_thumbnail(&jpg, &video, &ThumbnailOptions::default()).unwrap();
    let p = common::ffprobe(&jpg);
    assert_eq!(p["streams"][0]["codec_name"], "mjpeg");
    assert_eq!(p["streams"][0]["width"], w);
    let decoded = common::ffmpeg_decode_rgb(&jpg, w, h);
    let q = psnr(&decoded[0], &video.frames()[10]).unwrap();
    println!("thumbnail JPEG PSNR vs middle frame: {q:.2} dB");
    assert!(q >= 30.0, "{q:.2}");
    let ours = read_image(&jpg).unwrap();
    assert!(psnr(&ours, &video.frames()[10]).unwrap() >= 30.0);

    let webp = dir.join("thumb.webp");
    let opts = ThumbnailOptions {
        frame: Some(0),
        max_side: Some(160),
        format: ImageFormat::WebpLossless,
    };
    write_thumbnail(&webp, &video, &opts).unwrap();
    let p = common::ffprobe(&webp);
    assert_eq!(p["streams"][0]["codec_name"], "webp");
    let t = read_image(&webp).unwrap();
    assert_eq!((t.width(), t.height()), (160, 88));
    let info = probe(&webp).unwrap();
    assert_eq!(
        (info.format, info.width, info.height),
        (MediaFormat::Webp, 160, 88)
    );

    let sheet = dir.join("sheet.jpg");
    let layout = write_spritesheet(
        &sheet,
        &video,
        &SpritesheetOptions {
            count: 6,
            columns: Some(3),
            tile_width: 80,
            format: ImageFormat::Jpeg { quality: 90 },
        },
    )
    .unwrap();
    assert_eq!(layout.frame_indices, vec![0, 4, 8, 12, 16, 20]);
    assert_eq!(
        (
            layout.columns,
            layout.rows,
            layout.tile_width,
            layout.tile_height
        ),
        (3, 2, 80, 44)
    );
    let p = common::ffprobe(&sheet);
    assert_eq!(p["streams"][0]["codec_name"], "mjpeg");
    assert_eq!(
        (
            p["streams"][0]["width"].clone(),
            p["streams"][0]["height"].clone()
        ),
        (240.into(), 88.into())
    );
    // Each tile resembles its frame scaled down.
    let img = read_image(&sheet).unwrap();
    for (k, &fi) in layout.frame_indices.iter().enumerate() {
        let (cx, cy) = ((k % 3) as u32 * 80, (k / 3) as u32 * 44);
        let tile = img.crop(cx, cy, 80, 44).unwrap();
        let expect = kino_media::resize(&video.frames()[fi], 80, 44).unwrap();
        let q = psnr(&tile, &expect).unwrap();
        assert!(q >= 25.0, "tile {k}: {q:.2} dB");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
