//! End-to-end: mark → real H.264 (libx264 through the ffmpeg CLI) → decode → detect.

mod common;

use common::*;
use kino_media::psnr_video;
use kino_watermark::{detect_luma, Embedder, Key};

fn marked(frames: &[kino_media::Frame], key: &Key, id: u64) -> Vec<kino_media::Frame> {
    let (w, h) = (frames[0].width(), frames[0].height());
    let e = Embedder::new(key, id, w, h);
    let mut out = frames.to_vec();
    for (i, f) in out.iter_mut().enumerate() {
        e.mark(f, i);
    }
    out
}

#[test]
fn survives_h264_crf28_and_is_keyed() {
    let dir = scratch("crf28");
    let key = Key::from_bytes(b"kino test key");
    let id = 0x0000_a1b2_c3d4_e5f6;
    // 832×480 (Wan's size); the README's table has the rates for smaller frames.
    let src = lavfi_frames("mandelbrot=size={w}x{h}:rate=16", 832, 480, 16);
    let m = marked(&src, &key, id);
    let psnr = psnr_video(&src, &m).unwrap();
    assert!(psnr >= 40.0, "PSNR {psnr:.2} dB is below 40 dB");
    let path = dir.join("crf28.mp4");
    encode(&m, 16, 28, &path);
    let (back, luma) = decode_luma(&path);
    let d = detect_luma(&back, &luma, &key);
    eprintln!("marked, CRF 28: {d:?}");
    assert!(d.detected, "{d:?}");
    assert_eq!(d.id, Some(id));
    assert!(d.confidence > 0.999, "{d:?}");
    // Another key finds nothing.
    let other = detect_luma(&back, &luma, &Key::from_bytes(b"some other key"));
    assert!(!other.detected, "{other:?}");
    assert_eq!(other.id, None);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unmarked_clips_are_not_detected() {
    let dir = scratch("unmarked");
    let key = Key::from_bytes(b"kino test key");
    for (i, src) in [
        "testsrc2=size={w}x{h}:rate=16",
        "mandelbrot=size={w}x{h}:rate=16",
        "cellauto=size={w}x{h}:rate=16:rule=110",
    ]
    .iter()
    .enumerate()
    {
        let frames = lavfi_frames(src, 256, 256, 16);
        let path = dir.join(format!("u{i}.mp4"));
        encode(&frames, 16, 23, &path);
        let d = detect_file(&path, &key);
        assert!(!d.detected, "{src}: {d:?}");
        assert!(
            d.false_alarm_probability >= 1.0 && d.confidence == 0.0,
            "{d:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn psnr_at_least_40db_on_varied_content() {
    let key = Key::generate();
    for src in [
        "testsrc2=size={w}x{h}:rate=16",
        "mandelbrot=size={w}x{h}:rate=16",
        "color=c=gray:size={w}x{h},noise=alls=40:allf=t",
    ] {
        let frames = lavfi_frames(src, 320, 192, 4);
        let m = marked(&frames, &key, 42);
        let p = psnr_video(&frames, &m).unwrap();
        assert!(p >= 40.0, "{src}: PSNR {p:.2} dB");
        assert!(p.is_finite(), "{src}: nothing was marked");
    }
}

#[test]
fn centred_and_off_centre_crops_are_found() {
    let dir = scratch("crops");
    let key = Key::from_bytes(b"kino test key");
    let id = 0x0000_0bad_cafe_0042;
    let src = lavfi_frames("testsrc2=size={w}x{h}:rate=16", 832, 480, 12);
    let m = marked(&src, &key, id);
    let master = dir.join("master.mp4");
    encode(&m, 16, 18, &master);
    // Centred (found at the centre anchor) and off-centre (found only by the free search).
    for (name, vf) in [
        ("centred", "crop=748:432"),
        ("off-centre", "crop=748:432:37:11"),
    ] {
        let p = dir.join(format!("{name}.mp4"));
        transcode(&master, &p, Some(vf), 23, &[]);
        let d = detect_file(&p, &key);
        eprintln!("{name} crop: {d:?}");
        assert_eq!(d.id, Some(id), "{name}: {d:?}");
        // 480 / 432: the chips look 1.11 times larger than a 432-px-high frame implies.
        assert!((d.scale - 480.0 / 432.0).abs() < 0.02, "{name}: {d:?}");
        assert!(d.false_alarm_probability < 1e-3, "{name}: {d:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn textured_256_clips_survive_crf28_and_a_crop_through_the_qim_carrier() {
    // A textured, unclipped picture at 256×256 (where the spread-spectrum chips alone decode
    // about half of the bench's clips after CRF 28): the QIM carrier carries it.
    let dir = scratch("qim");
    let key = Key::from_bytes(b"kino test key");
    let id = 0x0000_5eed_0042_0001;
    let src = lavfi_frames(
        "life=size={w}x{h}:rate=24:seed=1:ratio=0.3:mold=10:life_color=#c0a080:death_color=#203040:mold_color=#506030,gblur=sigma=1.2",
        256,
        256,
        24,
    );
    let m = marked(&src, &key, id);
    let psnr = psnr_video(&src, &m).unwrap();
    assert!(psnr >= 40.0, "PSNR {psnr:.2} dB is below 40 dB");
    let master = dir.join("master.mp4");
    encode(&m, 24, 28, &master);
    let d = detect_file(&master, &key);
    eprintln!("CRF 28: {d:?}");
    assert_eq!(d.id, Some(id), "{d:?}");
    assert_eq!(d.carrier, "qim", "{d:?}");
    assert!(d.false_alarm_probability < 1e-3, "{d:?}");
    // A centred 10% crop of a CRF 18 copy: the grid is found by how well the cells fit.
    let hq = dir.join("hq.mp4");
    encode(&m, 24, 18, &hq);
    let p = dir.join("crop.mp4");
    transcode(
        &hq,
        &p,
        Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"),
        23,
        &[],
    );
    let d = detect_file(&p, &key);
    eprintln!("crop: {d:?}");
    assert_eq!(d.id, Some(id), "{d:?}");
    assert!((d.scale - 256.0 / 230.0).abs() < 0.02, "{d:?}");
    assert!(!detect_file(&p, &Key::from_bytes(b"some other key")).detected);
    // Off-centre (flush right, 11 rows down): found through the chips' full sync tile, which
    // QIM frames carry since stop 55 (before: 0 of 15 such clips at 256×256).
    let p = dir.join("crop-off.mp4");
    transcode(
        &hq,
        &p,
        Some("crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2:37:11"),
        23,
        &[],
    );
    let d = detect_file(&p, &key);
    eprintln!("off-centre crop: {d:?}");
    assert_eq!(d.id, Some(id), "{d:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_coded_luma_reads_the_cells_better_than_decoded_rgb() {
    // The QIM cells sit within a quarter step (4 levels) of their lattice points; the luma of
    // swscale's 8-bit RGB is 1–2 levels low on coloured pixels and clipped on saturated ones,
    // which the coded luma (`detect_luma`, as `kino verify` reads a file) is not. At 256×256
    // after CRF 28 (stop 55, 45 clips): 41 detected from the coded luma, 35 from RGB.
    let dir = scratch("luma");
    let key = Key::from_bytes(b"kino test key");
    let (mut from_luma, mut from_rgb) = (0, 0);
    for (i, src) in [
        "mandelbrot=size={w}x{h}:rate=24:start_scale=3",
        "life=size={w}x{h}:rate=24:seed=2:ratio=0.3:mold=10:life_color=#c0a080:death_color=#203040:mold_color=#506030,gblur=sigma=1.2",
    ]
    .iter()
    .enumerate()
    {
        let id = 0x0000_5eed_0055_0000 + i as u64;
        let m = marked(&lavfi_frames(src, 256, 256, 24), &key, id);
        let p = dir.join(format!("{i}.mp4"));
        encode(&m, 24, 28, &p);
        let d = detect_file(&p, &key);
        let rgb = kino_watermark::detect(&decode(&p), &key);
        eprintln!("{src}: coded luma {d:?}\nRGB {rgb:?}");
        assert_eq!(d.id, Some(id), "{d:?}");
        from_luma += d.bit_errors;
        from_rgb += rgb.bit_errors;
    }
    assert!(
        from_luma < from_rgb,
        "bit errors: {from_luma} from the coded luma, {from_rgb} from RGB"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// kino-shapes' clips on white or black: a soft coloured disk moving over a flat background
/// that cannot brighten (darken), drawn at 64×64 and upscaled to 256×256 as the README's
/// bench does with the model's clips.
fn flat_background_clip(background: u8, colour: [u8; 3]) -> Vec<kino_media::Frame> {
    (0..17)
        .map(|n| {
            let (cx, cy, r) = (14.0 + 2.0 * n as f32, 30.0, 11.0);
            let mut px = Vec::with_capacity(64 * 64 * 3);
            for y in 0..64 {
                for x in 0..64 {
                    // Coverage of the pixel by the disk, with a one-pixel soft edge.
                    let d = ((x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy) - r).clamp(-0.5, 0.5);
                    let a = 0.5 - d;
                    px.extend(colour.map(|c| {
                        (a * f32::from(c) + (1.0 - a) * f32::from(background)).round() as u8
                    }));
                }
            }
            let f = kino_media::Frame::new(64, 64, px).unwrap();
            kino_media::resize(&f, 256, 256).unwrap()
        })
        .collect()
}

#[test]
fn flat_white_and_black_backgrounds_survive_crf28_with_the_pull_at_the_ends() {
    use kino_watermark::QimParams;
    let dir = scratch("flat");
    let key = Key::from_bytes(b"kino test key");
    let id = 0x0000_0b1a_c4e0_77e5;
    for (bg, colour) in [(255u8, [255, 140, 0]), (0, [224, 48, 32])] {
        let src = flat_background_clip(bg, colour);
        let mut errors = Vec::new();
        for headroom in [0.0, 1.0] {
            let p = QimParams {
                headroom,
                ..QimParams::default()
            };
            let e = Embedder::with_params(&key, id, 256, 256, p);
            let mut m = src.clone();
            for (i, f) in m.iter_mut().enumerate() {
                e.mark(f, i);
            }
            let psnr = psnr_video(&src, &m).unwrap();
            assert!(
                psnr >= 40.0,
                "background {bg}, headroom {headroom}: PSNR {psnr:.2}"
            );
            let path = dir.join(format!("{bg}-{headroom}.mp4"));
            encode(&m, 16, 28, &path);
            let (back, luma) = decode_luma(&path);
            let d = detect_luma(&back, &luma, &key);
            eprintln!("background {bg}, headroom {headroom}: PSNR {psnr:.2} dB, CRF 28: {d:?}");
            errors.push(d.bit_errors);
            if headroom == 0.0 {
                continue;
            }
            assert!(d.detected && d.id == Some(id), "background {bg}: {d:?}");
            assert!(d.bit_errors <= 24, "background {bg}: {d:?}");
            // On the flat background (the top rows, away from the disk) the chips move both
            // ways around the level one step in from the end, and never more than 2 levels
            // from the original: as on any flat region, not a one-sided dark (light) speckle.
            let mut seen = [false; 3];
            for (a, b) in src[8].data()[..256 * 40 * 3]
                .iter()
                .zip(&m[8].data()[..256 * 40 * 3])
            {
                assert_eq!(*a, bg);
                let off = (i16::from(*b) - i16::from(bg)).abs();
                assert!(off <= 2, "background {bg} moved to {b}");
                seen[off as usize] = true;
            }
            assert_eq!(seen, [true; 3], "background {bg}: levels 0, 1 and 2 away");
        }
        assert!(
            errors[1] < errors[0],
            "background {bg}: the pull should leave fewer bit errors after CRF 28 ({} against {})",
            errors[1],
            errors[0]
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
