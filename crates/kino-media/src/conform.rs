//! Fitting pictures and clips to a model's size, length and frame rate.

use image::imageops::FilterType;

use crate::error::{MediaError, Result};
use crate::frame::{Fps, Frame, Video, MAX_SIDE};

/// What [`fit_crop`] does to a `src_w × src_h` picture for a `width × height` target: the size
/// it is resized to and the top-left corner of the centred crop in the resized picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FitCrop {
    /// Size after resizing (covers the target, keeps the source's aspect ratio).
    pub resized: (u32, u32),
    /// Top-left corner of the `width × height` window cut from the resized picture.
    pub offset: (u32, u32),
}

impl FitCrop {
    /// The plan for a `src_w × src_h` picture, as diffusers' `VaeImageProcessor._resize_and_crop`
    /// computes it: if the target is wider than the source (`width/height > src_w/src_h`) the
    /// width becomes `width` and the height `src_h·width // src_w`; otherwise the height becomes
    /// `height` and the width `src_w·height // src_h` (integer division); then the picture is
    /// pasted centred at `(width//2 − new_w//2, height//2 − new_h//2)`, i.e. cropped from
    /// `(new_w//2 − width//2, new_h//2 − height//2)`.
    pub fn plan(src_w: u32, src_h: u32, width: u32, height: u32) -> Result<FitCrop> {
        for (what, w, h) in [("picture", src_w, src_h), ("target", width, height)] {
            if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
                return Err(MediaError::InvalidSize(format!(
                    "{what} size {w}x{h} is out of range; each side must be 1 to {MAX_SIDE}"
                )));
            }
        }
        let (sw, sh, w, h) = (
            u64::from(src_w),
            u64::from(src_h),
            u64::from(width),
            u64::from(height),
        );
        // ratio > src_ratio  ⇔  w·sh > sw·h (exact, no floating point).
        let (nw, nh) = if w * sh > sw * h {
            (w, sh * w / sw)
        } else {
            (sw * h / sh, h)
        };
        if nw > u64::from(MAX_SIDE) * 8 || nh > u64::from(MAX_SIDE) * 8 {
            return Err(MediaError::InvalidSize(format!(
                "a {src_w}x{src_h} picture is too far from the {width}x{height} target's shape \
                 to crop it (it would be resized to {nw}x{nh}); crop it closer to {width}:{height} first"
            )));
        }
        Ok(FitCrop {
            resized: (nw as u32, nh as u32),
            offset: ((nw / 2 - w / 2) as u32, (nh / 2 - h / 2) as u32),
        })
    }

    /// What fitting a `src_w × src_h` picture to `width × height` does, in words: "kept as it
    /// is", "resized to 64×64", "centre-cropped to 64×64" or "resized to 85×64 and
    /// centre-cropped to 64×64" (what `kino generate` prints and the metadata records).
    pub fn describe(src_w: u32, src_h: u32, width: u32, height: u32) -> Result<String> {
        let (rw, rh) = FitCrop::plan(src_w, src_h, width, height)?.resized;
        Ok(if (src_w, src_h) == (width, height) {
            "kept as it is".to_string()
        } else if (rw, rh) == (width, height) {
            format!("resized to {width}×{height}")
        } else if (rw, rh) == (src_w, src_h) {
            format!("centre-cropped to {width}×{height}")
        } else {
            format!("resized to {rw}×{rh} and centre-cropped to {width}×{height}")
        })
    }
}

/// Resizes `frame` so that it covers `width × height` keeping its aspect ratio, then cuts the
/// centred `width × height` window: the semantics of diffusers' `VaeImageProcessor.resize`
/// with `resize_mode="crop"` (`_resize_and_crop`, sizes and offsets computed exactly as there,
/// see [`FitCrop::plan`]), with a Lanczos3 filter (PIL's `LANCZOS`, which that processor uses,
/// is also a 3-lobe Lanczos widened when shrinking; results agree to within rounding, not
/// bit for bit: on a 640×480 picture fitted to 64×64, 832×480, 480×832 and 1280×704 the mean
/// absolute difference from diffusers 0.42.1 + PIL was 0.08–0.23 levels, at most 4, 54–59 dB). A frame already of the target size is returned unchanged. Both upscaling and
/// downscaling happen as needed.
pub fn fit_crop(frame: &Frame, width: u32, height: u32) -> Result<Frame> {
    let plan = FitCrop::plan(frame.width(), frame.height(), width, height)?;
    if (frame.width(), frame.height()) == (width, height) {
        return Ok(frame.clone());
    }
    let (nw, nh) = plan.resized;
    let resized = if (nw, nh) == (frame.width(), frame.height()) {
        frame.clone()
    } else {
        let img = image::RgbImage::from_raw(frame.width(), frame.height(), frame.data().to_vec())
            .ok_or_else(|| {
            MediaError::InvalidSize("frame buffer does not match its size".into())
        })?;
        let out = image::imageops::resize(&img, nw, nh, FilterType::Lanczos3);
        Frame::new(nw, nh, out.into_raw())?
    };
    resized.crop(plan.offset.0, plan.offset.1, width, height)
}

/// The index of the source frame shown at output frame `i` when a `src` clip is played at
/// `out` frames per second: the nearest source timestamp (ties to the later frame).
fn source_index(i: usize, src: Fps, out: Fps) -> usize {
    // t = i·out.den/out.num seconds; source frame = round(t·src.num/src.den).
    let num = i as u128 * u128::from(out.den()) * u128::from(src.num());
    let den = u128::from(out.num()) * u128::from(src.den());
    ((2 * num + den) / (2 * den)) as usize
}

/// The first `frames` frames of `video` at `fps`, each [`fit_crop`]ped to `width × height`:
/// when the source's frame rate differs, output frame `i` (at `i / fps` seconds) is the source
/// frame with the nearest timestamp (frames are repeated or skipped; none are blended). A
/// source too short for that is an error that says how long it is and how long it must be, in
/// frames and seconds.
pub fn conform_video(
    video: &Video,
    width: u32,
    height: u32,
    fps: Fps,
    frames: usize,
) -> Result<Vec<Frame>> {
    let src = video.fps();
    check_length(video.len(), video.duration_secs(), src, fps, frames)?;
    FitCrop::plan(video.width(), video.height(), width, height)?;
    (0..frames)
        .map(|i| fit_crop(&video.frames()[source_index(i, src, fps)], width, height))
        .collect()
}

/// Checks that a source of `len` frames (`duration` s at `src` fps) has enough for `frames`
/// output frames at `fps`.
fn check_length(len: usize, duration: f64, src: Fps, fps: Fps, frames: usize) -> Result<()> {
    if frames == 0 {
        return Err(MediaError::InvalidOption(
            "asked for 0 frames of the source video; ask for at least 1".to_string(),
        ));
    }
    let needed = source_index(frames - 1, src, fps) + 1;
    if needed > len {
        return Err(MediaError::InvalidVideo(format!(
            "the source video is too short: it has {len} frames ({duration:.2} s at {} fps), but \
             {frames} frames at {} fps need {needed} of its frames ({:.2} s); use a longer clip \
             or ask for fewer frames with --frames or --seconds",
            fmt_fps(src),
            fmt_fps(fps),
            src.duration_of(needed),
        )));
    }
    Ok(())
}

/// [`conform_video`] of a file, streamed: the output frames `range` (of `frames`) of
/// `conform_video(&read_video(path)?, width, height, fps, frames)`, each handed to `each` as it
/// is made, with one decoded picture in memory at a time (`layout` from
/// [`crate::scan_video`] of the same file). The same checks and messages as
/// [`conform_video`].
#[allow(clippy::too_many_arguments)]
pub fn conform_video_file(
    path: &std::path::Path,
    layout: &crate::VideoLayout,
    width: u32,
    height: u32,
    fps: Fps,
    frames: usize,
    range: std::ops::Range<usize>,
    each: &mut dyn FnMut(usize, Frame) -> Result<()>,
) -> Result<()> {
    let src = layout.fps;
    check_length(layout.len(), layout.duration_secs(), src, fps, frames)?;
    FitCrop::plan(layout.width, layout.height, width, height)?;
    let range = range.start.min(frames)..range.end.min(frames);
    let sources: Vec<usize> = range.clone().map(|i| source_index(i, src, fps)).collect();
    let mut i = range.start;
    crate::stream_video(path, layout, &sources, &mut |_, frame| {
        let out = fit_crop(frame, width, height)?;
        each(i, out)?;
        i += 1;
        Ok(())
    })
}

/// How many frames at `fps` a clip of `len` frames at `src` gives when played to its end: its
/// duration in output frames (rounded), one fewer when the last would fall past its end.
pub fn frames_at(len: usize, src: Fps, fps: Fps) -> usize {
    let want = ((src.duration_of(len) * fps.as_f64()).round() as usize).max(1);
    if source_index(want - 1, src, fps) < len {
        want
    } else {
        want.saturating_sub(1).max(1)
    }
}

fn fmt_fps(f: Fps) -> String {
    if f.den() == 1 {
        f.num().to_string()
    } else {
        format!("{:.3}", f.as_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_match_the_reference_arithmetic() {
        // 640×480 → 64×64: height-limited, 85×64, crop x from 42−32 = 10.
        let p = FitCrop::plan(640, 480, 64, 64).unwrap();
        assert_eq!(p.resized, (85, 64));
        assert_eq!(p.offset, (10, 0));
        // Portrait 480×640 → 832×480: width-limited, 832×1109, crop y 554−240 = 314.
        let p = FitCrop::plan(480, 640, 832, 480).unwrap();
        assert_eq!(p.resized, (832, 1109));
        assert_eq!(p.offset, (0, 314));
        // Same aspect: exact resize, no crop.
        let p = FitCrop::plan(1664, 960, 832, 480).unwrap();
        assert_eq!(
            p,
            FitCrop {
                resized: (832, 480),
                offset: (0, 0)
            }
        );
        assert!(FitCrop::plan(0, 10, 8, 8).is_err());
        assert!(FitCrop::plan(10, 10, 8, 0).is_err());
    }

    #[test]
    fn fit_crop_keeps_the_centre() {
        // A 200×100 picture: left quarter red, middle half green, right quarter blue.
        let f = Frame::from_fn(200, 100, |x, _| match x {
            0..50 => [255, 0, 0],
            50..150 => [0, 255, 0],
            _ => [0, 0, 255],
        })
        .unwrap();
        let out = fit_crop(&f, 32, 32).unwrap();
        assert_eq!((out.width(), out.height()), (32, 32));
        // Resized to 64×32, cropped from x = 16: all of it is the green middle (the edge
        // columns touch the red and blue, a few pixels of Lanczos ringing away).
        for (x, y) in [(4, 0), (27, 31), (16, 16)] {
            let p = out.pixel(x, y).unwrap();
            assert!(p[1] > 240 && p[0] < 15 && p[2] < 15, "({x},{y}) {p:?}");
        }
        // Upscaling works too.
        let up = fit_crop(&Frame::filled(8, 6, [10, 20, 30]).unwrap(), 64, 32).unwrap();
        assert_eq!((up.width(), up.height()), (64, 32));
        assert!(up.data().chunks(3).all(|p| p == [10, 20, 30]));
    }

    #[test]
    fn conform_resamples_in_time_and_explains_short_clips() {
        let v = Video::new(
            (0..30u8)
                .map(|i| Frame::filled(4, 4, [i, 0, 0]).unwrap())
                .collect(),
            Fps::integer(30).unwrap(),
        )
        .unwrap();
        // 30 → 10 fps: every third frame.
        let out = conform_video(&v, 4, 4, Fps::integer(10).unwrap(), 5).unwrap();
        let idx: Vec<u8> = out.iter().map(|f| f.data()[0]).collect();
        assert_eq!(idx, [0, 3, 6, 9, 12]);
        // Same rate: the first frames as they are.
        let out = conform_video(&v, 4, 4, Fps::integer(30).unwrap(), 3).unwrap();
        assert_eq!(
            out.iter().map(|f| f.data()[0]).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        // 30 → 24000/1001: nearest timestamps.
        let out = conform_video(&v, 4, 4, Fps::new(24000, 1001).unwrap(), 5).unwrap();
        assert_eq!(
            out.iter().map(|f| f.data()[0]).collect::<Vec<_>>(),
            [0, 1, 3, 4, 5]
        );
        // Too short: 17 frames at 8 fps need 2 s = 61 source frames.
        let e = conform_video(&v, 4, 4, Fps::integer(8).unwrap(), 17)
            .unwrap_err()
            .to_string();
        assert!(e.contains("30 frames (1.00 s at 30 fps)"), "{e}");
        assert!(e.contains("need 61 of its frames (2.03 s)"), "{e}");
        assert!(e.contains("--frames"), "{e}");
    }
}
