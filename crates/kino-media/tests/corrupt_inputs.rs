//! Damaged and wrong inputs give errors that say what is wrong, never panics; bad requests
//! give errors that say what to do.

mod common;

use kino_media::{
    decode_image, decode_mp4, encode_image, encode_mp4, probe, read_image, read_metadata, read_mp4,
    write_gif, write_mp4, Fps, Frame, GifOptions, ImageFormat, MediaError, Mp4Options, Quality,
    Video,
};

/// A tiny deterministic generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn small_mp4() -> (Video, Vec<u8>) {
    let video = common::synthetic_video(64, 48, 10, 10);
    let opts = Mp4Options {
        metadata: Some(serde_json::json!({"prompt": "x"})),
        keyframe_interval: 4,
        ..Default::default()
    };
    let bytes = encode_mp4(&video, &opts).unwrap();
    (video, bytes)
}

/// Position just after the `moov` box.
fn moov_end(bytes: &[u8]) -> usize {
    let ftyp = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
    let moov = u32::from_be_bytes(bytes[ftyp..ftyp + 4].try_into().unwrap()) as usize;
    assert_eq!(&bytes[ftyp + 4..ftyp + 8], b"moov");
    ftyp + moov
}

#[test]
fn truncated_mp4_is_an_error_not_a_panic() {
    let (_, bytes) = small_mp4();
    let dir = common::temp_dir("trunc");
    let path = dir.join("t.mp4");
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(37).collect();
    cuts.extend([
        1,
        7,
        8,
        9,
        31,
        moov_end(&bytes) - 1,
        moov_end(&bytes) + 8,
        bytes.len() - 1,
    ]);
    for cut in cuts {
        let data = &bytes[..cut];
        let e = decode_mp4(data).expect_err(&format!("cut at {cut} decoded"));
        assert!(
            matches!(e, MediaError::Corrupt { .. } | MediaError::Unsupported(_)),
            "cut {cut}: {e:?}"
        );
        std::fs::write(&path, data).unwrap();
        assert!(read_mp4(&path).is_err(), "cut {cut}");
        let _ = probe(&path);
        let _ = read_metadata(&path);
    }
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = read_mp4(&path).unwrap_err().to_string();
    assert!(msg.contains("truncated") && msg.contains("t.mp4"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_is_rejected_clearly() {
    for data in [
        &b""[..],
        b"hello",
        b"\0\0\0\x08ftyp",
        b"this is not a video file, just some text that goes on for a while",
        &[0xff; 64],
    ] {
        let e = decode_mp4(data).unwrap_err();
        assert!(matches!(e, MediaError::Corrupt { .. }), "{data:?}: {e:?}");
        assert!(decode_image(data).is_err());
    }
    let dir = common::temp_dir("garbage");
    let path = dir.join("g.bin");
    std::fs::write(&path, b"not media at all").unwrap();
    let msg = probe(&path).unwrap_err().to_string();
    assert!(msg.contains("not an MP4, GIF, PNG, JPEG or WebP"), "{msg}");
    let e = read_mp4(dir.join("missing.mp4")).unwrap_err();
    assert!(matches!(e, MediaError::Read { .. }), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzzed_moov_never_panics() {
    let (_, bytes) = small_mp4();
    let end = moov_end(&bytes);
    let mut rng = Lcg(42);
    let mut errors = 0;
    for _ in 0..600 {
        let mut data = bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % end;
            data[i] = match rng.next() % 3 {
                0 => rng.next() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        if decode_mp4(&data).is_err() {
            errors += 1;
        }
    }
    // Many mutations hit fields we check; the rest are harmless (names, reserved bytes).
    assert!(errors > 100, "only {errors} of 600 mutations were detected");
}

#[test]
fn fuzzed_samples_never_panic() {
    let (_, bytes) = small_mp4();
    let end = moov_end(&bytes) + 8;
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let mut data = bytes.clone();
        for _ in 0..1 + rng.next() % 8 {
            let i = end + (rng.next() as usize) % (bytes.len() - end);
            data[i] = rng.next() as u8;
        }
        // Damaged pictures may decode to garbage or fail; either way no panic and no crash.
        let _ = decode_mp4(&data);
    }
}

#[test]
fn truncated_images_and_gifs_are_errors() {
    let frame = common::synthetic_frame(48, 32, 3);
    let dir = common::temp_dir("imgtrunc");
    for fmt in [
        ImageFormat::Png,
        ImageFormat::Jpeg { quality: 80 },
        ImageFormat::WebpLossless,
    ] {
        let bytes = encode_image(&frame, fmt).unwrap();
        for cut in [
            0,
            4,
            12,
            30,
            bytes.len() / 2,
            bytes.len() * 3 / 4,
            bytes.len() - 3,
        ] {
            assert!(decode_image(&bytes[..cut]).is_err(), "{fmt:?} cut {cut}");
        }
        let path = dir.join(format!("x.{}", fmt.extension()));
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = read_image(&path).unwrap_err().to_string();
        assert!(msg.contains("x."), "{msg}");
    }
    let video = common::synthetic_video(48, 32, 5, 10);
    let gif = dir.join("a.gif");
    write_gif(&gif, &video, &GifOptions::default()).unwrap();
    let bytes = std::fs::read(&gif).unwrap();
    for cut in [6, 13, 100, bytes.len() / 2, bytes.len() - 2] {
        std::fs::write(&gif, &bytes[..cut]).unwrap();
        assert!(probe(&gif).is_err(), "gif cut {cut}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_say_what_to_do() {
    let odd = Video::new(
        vec![Frame::filled(833, 480, [9, 9, 9]).unwrap()],
        Fps::integer(16).unwrap(),
    )
    .unwrap();
    let msg = encode_mp4(&odd, &Mp4Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("width 833 is odd; H.264 yuv420p needs even sizes, try 832"),
        "{msg}"
    );
    let big = Video::new(
        vec![Frame::filled(4096, 2304, [0, 0, 0]).unwrap()],
        Fps::integer(16).unwrap(),
    )
    .unwrap();
    let msg = encode_mp4(&big, &Mp4Options::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("scale the frames down"), "{msg}");

    let ok = common::synthetic_video(64, 48, 2, 8);
    let msg = write_mp4("/nonexistent-kino-dir/out.mp4", &ok, &Mp4Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cannot write /nonexistent-kino-dir/out.mp4"),
        "{msg}"
    );
    assert!(msg.contains("does not exist"), "{msg}");
    let opts = Mp4Options {
        quality: Quality::Qp(5),
        ..Default::default()
    };
    let msg = encode_mp4(&ok, &opts).unwrap_err().to_string();
    assert!(msg.contains("use 12 (best) to 51"), "{msg}");
    // A failed write leaves nothing behind.
    let dir = common::temp_dir("nowrite");
    let target = dir.join("sub");
    std::fs::create_dir_all(&target).unwrap();
    assert!(write_mp4(&target, &ok, &Mp4Options::default()).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bitrate_mode_and_bt601_roundtrip() {
    let video = common::synthetic_video(128, 96, 12, 12);
    let opts = Mp4Options {
        quality: Quality::Bitrate(2_000_000),
        color: kino_media::ColorSpace::Bt601,
        ..Default::default()
    };
    let bytes = encode_mp4(&video, &opts).unwrap();
    let back = decode_mp4(&bytes).unwrap();
    assert_eq!(back.len(), 12);
    let q = kino_media::psnr_video(video.frames(), back.frames()).unwrap();
    assert!(q > 30.0, "{q:.2}");
}
