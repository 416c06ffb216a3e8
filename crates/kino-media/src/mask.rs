//! Masks for editing a video (VACE inpainting and outpainting): reading them, fitting them to
//! the video the model sees, checking them, and the canvas arithmetic of outpainting.
//!
//! A mask is white where the model regenerates and black where it keeps the source. It can be
//! a still picture (PNG, JPEG or WebP: the same mask on every frame) or a video (one mask per
//! frame, any format [`crate::read_video`] reads). Colour masks are read by their luma.
//!
//! [`conform_mask`] fits a mask the way the source video is fitted ([`crate::fit_crop`]: resize
//! to cover, centre-crop): the mask is mapped onto the source frame (it must have the source's
//! aspect ratio), then resized bilinearly with the source's crop plan and thresholded at 128,
//! so every value handed on is 0 or 255. It also reports how much of the mask was neither black
//! nor white ([`MaskReport`]) and refuses a mask with nothing to edit.
//!
//! [`outpaint_canvas`] plans a wider frame: the source scaled to fit inside, centred, on a
//! canvas rounded to the model's size multiple; [`outpaint_frame`] and [`OutpaintPlan::mask`]
//! make the gray-bordered frame and its mask (VACE's recipe: generate = gray 128 + white mask).
//!
//! Every error is a [`MediaError`] in plain words that says what to change.

use std::path::Path;

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

use crate::conform::FitCrop;
use crate::error::{MediaError, Result};
use crate::frame::{Fps, Frame, MAX_SIDE};
use crate::probe::MediaFormat;

/// Gray level VACE fills the frames or regions it generates with.
pub const MASK_FILL_GRAY: u8 = 128;

/// A mask pixel counts as "grey" (neither clearly black nor clearly white) strictly between
/// these levels.
pub const GREY_LOW: u8 = 32;
/// See [`GREY_LOW`].
pub const GREY_HIGH: u8 = 224;

/// More than this share of grey pixels makes [`MaskReport::warning`] say so.
pub const GREY_WARN_FRACTION: f64 = 0.05;

/// Mask pictures as read: luma, one byte a pixel, row-major, all of one size.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskFrames {
    /// Width of every frame.
    pub width: u32,
    /// Height of every frame.
    pub height: u32,
    /// `None` for a still picture (one frame, used for every video frame); the video's frame
    /// rate otherwise.
    pub fps: Option<Fps>,
    /// `width × height` bytes each.
    pub frames: Vec<Vec<u8>>,
}

impl std::fmt::Debug for MaskFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskFrames")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("fps", &self.fps)
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl MaskFrames {
    /// One mask for every frame (a still picture).
    pub fn is_still(&self) -> bool {
        self.fps.is_none()
    }

    /// Number of mask frames (1 for a still).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// A mask from RGB frames (their luma). `fps` `None` = a still (exactly one frame).
    pub fn from_frames(frames: &[Frame], fps: Option<Fps>) -> Result<MaskFrames> {
        let first = frames.first().ok_or_else(|| {
            MediaError::InvalidVideo("the mask has no frames; give a picture or a video".into())
        })?;
        let (width, height) = (first.width(), first.height());
        if fps.is_none() && frames.len() != 1 {
            return Err(MediaError::InvalidVideo(
                "a still mask has exactly one picture".into(),
            ));
        }
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            if (f.width(), f.height()) != (width, height) {
                return Err(MediaError::InvalidVideo(format!(
                    "the mask's frames differ in size ({width}x{height} and {}x{}); give a \
                     mask video whose frames all have one size",
                    f.width(),
                    f.height()
                )));
            }
            out.push(luma(f));
        }
        Ok(MaskFrames {
            width,
            height,
            fps,
            frames: out,
        })
    }

    /// Whether no pixel of any frame reaches 128 (nothing would be regenerated).
    pub fn is_all_black(&self) -> bool {
        self.frames.iter().all(|f| f.iter().all(|&v| v < 128))
    }

    /// One still mask from luma bytes (`width × height`).
    pub fn still(width: u32, height: u32, data: Vec<u8>) -> Result<MaskFrames> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(MediaError::InvalidSize(format!(
                "mask size {width}x{height} is out of range; each side must be 1 to {MAX_SIDE}"
            )));
        }
        if data.len() != width as usize * height as usize {
            return Err(MediaError::InvalidSize(format!(
                "a {width}x{height} mask needs {} bytes, got {}",
                width as usize * height as usize,
                data.len()
            )));
        }
        Ok(MaskFrames {
            width,
            height,
            fps: None,
            frames: vec![data],
        })
    }
}

/// BT.601 luma of an RGB frame, rounded.
fn luma(f: &Frame) -> Vec<u8> {
    f.data()
        .chunks_exact(3)
        .map(|p| {
            let y = 299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]);
            ((y + 500) / 1000) as u8
        })
        .collect()
}

/// Reads a mask from bytes: a PNG, JPEG or WebP still (one mask for every frame) or a video
/// (one mask per frame; anything [`crate::decode_video`] reads).
pub fn decode_mask(bytes: &[u8]) -> Result<MaskFrames> {
    if bytes.is_empty() {
        return Err(MediaError::corrupt(
            "mask",
            "the file is empty; give a black-and-white PNG (white = regenerate) or a mask video",
        ));
    }
    match MediaFormat::sniff(bytes) {
        Some(MediaFormat::Png | MediaFormat::Jpeg | MediaFormat::Webp) => {
            let frame = crate::decode_image(bytes)?;
            MaskFrames::from_frames(std::slice::from_ref(&frame), None)
        }
        _ => {
            let video = crate::decode_video(bytes).map_err(not_a_mask)?;
            MaskFrames::from_frames(video.frames(), Some(video.fps()))
        }
    }
}

/// [`decode_mask`] of a file; errors name it.
pub fn read_mask(path: impl AsRef<Path>) -> Result<MaskFrames> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(MediaError::read(
            path,
            std::io::Error::other("it is a folder, not a mask picture or video"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| MediaError::read(path, e))?;
    decode_mask(&bytes).map_err(|e| crate::mp4::with_path(e, path))
}

/// A video reader's "not a video" said for a mask.
fn not_a_mask(e: MediaError) -> MediaError {
    match e {
        MediaError::Corrupt { .. } | MediaError::Unsupported(_) => MediaError::Corrupt {
            format: "mask",
            reason: "it is neither a picture (PNG, JPEG or WebP) nor a video FFmpeg can read \
                     (MP4, MOV, WebM, MKV); a mask is a black-and-white picture (white = \
                     regenerate) or a video of them"
                .to_string(),
        },
        other => other,
    }
}

/// What [`conform_mask`] found in a mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskReport {
    /// Share of the mask's own pixels (before resizing, over the frames used) strictly between
    /// [`GREY_LOW`] and [`GREY_HIGH`]: soft edges, anti-aliasing, a grey picture.
    pub grey_fraction: f64,
    /// Share of the fitted mask's pixels that are white (regenerated), over all frames.
    pub white_fraction: f64,
    /// Fitted mask frames.
    pub frames: usize,
}

impl MaskReport {
    /// A line to show the user when the mask was far from black and white (more than
    /// [`GREY_WARN_FRACTION`] grey): it was thresholded at 128, which may not be what was meant.
    pub fn warning(&self) -> Option<String> {
        (self.grey_fraction > GREY_WARN_FRACTION).then(|| {
            format!(
                "{:.1}% of the mask's pixels are grey (between {GREY_LOW} and {GREY_HIGH}), not \
                 black or white; it was thresholded at 128 (128 and above = regenerate). Use a \
                 black-and-white mask to say exactly which pixels change",
                self.grey_fraction * 100.0
            )
        })
    }
}

/// What an all-black mask is told.
pub const MASK_ALL_BLACK: &str = "the mask is all black, so nothing would be edited; paint white \
     (255) where the video should change and black (0) where it should stay";

/// Checks that a `mask_w × mask_h` mask has the shape of the `video_w × video_h` source it is
/// drawn on (within 1%, or a pixel of rounding), so that fitting both the same way keeps them
/// aligned.
pub fn check_mask_aspect(mask_w: u32, mask_h: u32, video_w: u32, video_h: u32) -> Result<()> {
    let (mw, mh, vw, vh) = (
        f64::from(mask_w),
        f64::from(mask_h),
        f64::from(video_w),
        f64::from(video_h),
    );
    if mw <= 0.0 || mh <= 0.0 || vw <= 0.0 || vh <= 0.0 {
        return Err(MediaError::InvalidSize(format!(
            "the mask ({mask_w}x{mask_h}) or the video ({video_w}x{video_h}) has a zero side"
        )));
    }
    let ratio = (mw / mh) / (vw / vh);
    // A pixel of rounding on the smaller of the two pictures is allowed too.
    let slack = (1.0 / mw.min(vw).min(mh).min(vh)).max(0.01);
    if (ratio - 1.0).abs() > slack {
        return Err(MediaError::InvalidSize(format!(
            "the mask is {mask_w}x{mask_h} but the video is {video_w}x{video_h}: their shapes \
             differ ({:.3} against {:.3} width/height), so the mask would not line up with the \
             picture; draw the mask on a frame of the video (or give it the video's size, \
             {video_w}x{video_h})",
            mw / mh,
            vw / vh
        )));
    }
    Ok(())
}

/// The nearest source index at output frame `i` (as [`crate::conform_video`] picks frames).
fn source_index(i: usize, src: Fps, out: Fps) -> usize {
    let num = i as u128 * u128::from(out.den()) * u128::from(src.num());
    let den = u128::from(out.num()) * u128::from(src.den());
    ((2 * num + den) / (2 * den)) as usize
}

/// Fits `mask` to a `width × height` video made from a `source_w × source_h` source the way
/// [`crate::conform_video`] fits the source: the same frames in time (`frames` output frames
/// at `fps`, nearest mask frame, from the mask video's own frame rate; a still is used for
/// every frame), the same resize-to-cover and centre crop in space (the mask stretched onto
/// the source frame first: its aspect must match, see [`check_mask_aspect`]), bilinear, then
/// thresholded at 128 (0 or 255 out). Errors: a mask video too short for `frames` (with the
/// numbers), a mask with nothing white in the part the model sees.
pub fn conform_mask(
    mask: &MaskFrames,
    source_w: u32,
    source_h: u32,
    width: u32,
    height: u32,
    fps: Fps,
    frames: usize,
) -> Result<(Vec<Vec<u8>>, MaskReport)> {
    if mask.frames.is_empty() {
        return Err(MediaError::InvalidVideo(
            "the mask has no frames; give a picture or a video".into(),
        ));
    }
    if frames == 0 {
        return Err(MediaError::InvalidOption(
            "asked for 0 mask frames; ask for at least 1".into(),
        ));
    }
    check_mask_aspect(mask.width, mask.height, source_w, source_h)?;
    let plan = FitCrop::plan(source_w, source_h, width, height)?;
    let picks: Vec<usize> = match mask.fps {
        None => vec![0; frames],
        Some(src) => {
            let picks: Vec<usize> = (0..frames).map(|i| source_index(i, src, fps)).collect();
            let needed = picks.last().map_or(0, |&j| j + 1);
            if needed > mask.frames.len() {
                return Err(MediaError::InvalidVideo(format!(
                    "the mask video has {} frames ({:.2} s at {} fps) but the edit needs {frames} \
                     frames at {} fps, i.e. {needed} of its frames ({:.2} s); give a mask video \
                     as long as the part of the source that is edited ({frames} frames), or one \
                     still picture for every frame",
                    mask.frames.len(),
                    src.duration_of(mask.frames.len()),
                    fmt_fps(src),
                    fmt_fps(fps),
                    src.duration_of(needed)
                )));
            }
            picks
        }
    };
    // Grey share over the distinct mask frames used.
    let mut used: Vec<usize> = picks.clone();
    used.dedup();
    let (mut grey, mut total) = (0u64, 0u64);
    for &j in &used {
        let f = &mask.frames[j];
        grey += f.iter().filter(|&&v| v > GREY_LOW && v < GREY_HIGH).count() as u64;
        total += f.len() as u64;
    }
    let mut fitted: Vec<Option<Vec<u8>>> = vec![None; mask.frames.len()];
    let mut out = Vec::with_capacity(frames);
    let mut white = 0u64;
    for &j in &picks {
        if fitted[j].is_none() {
            fitted[j] = Some(fit_one(
                &mask.frames[j],
                mask.width,
                mask.height,
                &plan,
                width,
                height,
            )?);
        }
        let f = fitted[j].clone().unwrap_or_default();
        white += f.iter().filter(|&&v| v == 255).count() as u64;
        out.push(f);
    }
    let report = MaskReport {
        grey_fraction: if total == 0 {
            0.0
        } else {
            grey as f64 / total as f64
        },
        white_fraction: white as f64
            / (out.len() as u64 * u64::from(width) * u64::from(height)) as f64,
        frames: out.len(),
    };
    if white == 0 {
        let any_white = used
            .iter()
            .any(|&j| mask.frames[j].iter().any(|&v| v >= 128));
        return Err(MediaError::InvalidOption(if any_white {
            format!(
                "the mask's white part lies outside the {width}x{height} centre of the picture \
                 the model sees (the source is cropped to that shape), so nothing would be \
                 edited; move the white area towards the middle, or choose a --size of the \
                 source's shape"
            )
        } else {
            MASK_ALL_BLACK.to_string()
        }));
    }
    Ok((out, report))
}

/// One mask frame stretched onto the source, resized with `plan`, cropped, thresholded.
fn fit_one(
    data: &[u8],
    w: u32,
    h: u32,
    plan: &FitCrop,
    width: u32,
    height: u32,
) -> Result<Vec<u8>> {
    let img = GrayImage::from_raw(w, h, data.to_vec())
        .ok_or_else(|| MediaError::InvalidSize("mask buffer does not match its size".into()))?;
    let (rw, rh) = plan.resized;
    let resized = if (rw, rh) == (w, h) {
        img
    } else {
        image::imageops::resize(&img, rw, rh, FilterType::Triangle)
    };
    let (ox, oy) = plan.offset;
    let mut out = Vec::with_capacity(width as usize * height as usize);
    for y in 0..height {
        let row = ((oy + y) * rw + ox) as usize;
        out.extend(
            resized.as_raw()[row..row + width as usize]
                .iter()
                .map(|&v| if v >= 128 { 255 } else { 0 }),
        );
    }
    Ok(out)
}

/// How to widen a frame ([`outpaint_canvas`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outpaint {
    /// The canvas is the fitted source's size times these (width, height), e.g. `1.5x` =
    /// (1.5, 1.5), `2x1` = (2, 1).
    Factor(f64, f64),
    /// The canvas is this size (width, height); the source is scaled to fit inside.
    Canvas(u32, u32),
}

impl Outpaint {
    /// Parses `--outpaint`: `1.5x` / `1.5` (both sides), `2x1` (width×2, height×1).
    pub fn parse_factor(s: &str) -> Result<Outpaint> {
        let t = s.trim();
        let bad = || {
            MediaError::InvalidOption(format!(
                "--outpaint `{s}` is not a factor; use e.g. 1.5x (both sides 1.5 times as \
                 long) or 2x1 (twice as wide, as tall)"
            ))
        };
        let body = t.strip_suffix(['x', 'X']).unwrap_or(t);
        let parts: Vec<&str> = body.split(['x', 'X', '×']).collect();
        let (fx, fy) = match parts.as_slice() {
            [a] => {
                let v: f64 = a.trim().parse().map_err(|_| bad())?;
                (v, v)
            }
            [a, b] => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            _ => return Err(bad()),
        };
        Ok(Outpaint::Factor(fx, fy))
    }
}

/// Where the source goes on a widened frame (made by [`outpaint_canvas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutpaintPlan {
    /// The canvas (the output size): a multiple of the model's size multiple.
    pub canvas: (u32, u32),
    /// The canvas asked for, before rounding (equal to `canvas` when no rounding was needed).
    pub requested: (u32, u32),
    /// Size the source is scaled to (its aspect kept), inside the canvas.
    pub inner: (u32, u32),
    /// Top-left corner of the source on the canvas (centred).
    pub offset: (u32, u32),
}

impl OutpaintPlan {
    /// Whether the canvas had to be rounded to the model's multiple.
    pub fn rounded(&self) -> bool {
        self.canvas != self.requested
    }

    /// The mask of the widened frame: 255 on the new border, 0 on the source.
    pub fn mask(&self) -> Vec<u8> {
        let (cw, ch) = self.canvas;
        let (iw, ih) = self.inner;
        let (ox, oy) = self.offset;
        let mut m = vec![255u8; cw as usize * ch as usize];
        for y in oy..oy + ih {
            let row = (y * cw) as usize;
            m[row + ox as usize..row + (ox + iw) as usize].fill(0);
        }
        m
    }
}

/// Rounds `v` to the nearest multiple of `m` (at least `m`).
fn round_to(v: f64, m: u32) -> u32 {
    let m = m.max(1);
    (((v / f64::from(m)).round() as u32).max(1)) * m
}

/// The largest size with the `src_w × src_h` aspect that fits inside `w × h` (rounded, at
/// least 1×1).
fn fit_inside(src_w: u32, src_h: u32, w: u32, h: u32) -> (u32, u32) {
    let s = (f64::from(w) / f64::from(src_w)).min(f64::from(h) / f64::from(src_h));
    (
        ((f64::from(src_w) * s).round() as u32).clamp(1, w),
        ((f64::from(src_h) * s).round() as u32).clamp(1, h),
    )
}

/// Plans an outpainted (widened) frame for a `src_w × src_h` source. `base` is the size the
/// source would otherwise be made at (the model's size or `--size`): with
/// [`Outpaint::Factor`] the source is scaled to fit inside `base` and the canvas is that size
/// times the factors; with [`Outpaint::Canvas`] the canvas is given and the source is scaled to
/// fit inside it. Either way the canvas is rounded to the nearest multiple of `multiple`
/// (width, height) and the source is centred on it. Errors: factors below 1 or above 4, a
/// canvas the source already fills (nothing to outpaint), sizes out of range.
pub fn outpaint_canvas(
    src_w: u32,
    src_h: u32,
    base: (u32, u32),
    how: Outpaint,
    multiple: (u32, u32),
) -> Result<OutpaintPlan> {
    for (what, w, h) in [("source", src_w, src_h), ("base", base.0, base.1)] {
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(MediaError::InvalidSize(format!(
                "the {what} size {w}x{h} is out of range; each side must be 1 to {MAX_SIDE}"
            )));
        }
    }
    let (requested, inner_max) = match how {
        Outpaint::Factor(fx, fy) => {
            let ok = |f: f64| f.is_finite() && (1.0..=4.0).contains(&f);
            if !ok(fx) || !ok(fy) || (fx == 1.0 && fy == 1.0) {
                return Err(MediaError::InvalidOption(format!(
                    "--outpaint {fx}x{fy}: each factor must be from 1 to 4 and at least one \
                     above 1 (the frame gets wider or taller); e.g. 1.5x or 2x1"
                )));
            }
            let inner = fit_inside(src_w, src_h, base.0, base.1);
            let req = (
                (f64::from(inner.0) * fx).round() as u32,
                (f64::from(inner.1) * fy).round() as u32,
            );
            (req, Some(inner))
        }
        Outpaint::Canvas(w, h) => {
            if w == 0 || h == 0 {
                return Err(MediaError::InvalidOption(format!(
                    "--canvas {w}x{h} has a zero side; e.g. --canvas 832x480"
                )));
            }
            ((w, h), None)
        }
    };
    let canvas = (
        round_to(f64::from(requested.0), multiple.0),
        round_to(f64::from(requested.1), multiple.1),
    );
    if canvas.0 > MAX_SIDE || canvas.1 > MAX_SIDE {
        return Err(MediaError::InvalidOption(format!(
            "the outpainted canvas would be {}x{}; each side must be at most {MAX_SIDE}",
            canvas.0, canvas.1
        )));
    }
    let inner = match inner_max {
        Some((iw, ih)) => {
            // Rounding may have made the canvas smaller than the source on a side.
            if iw > canvas.0 || ih > canvas.1 {
                fit_inside(src_w, src_h, canvas.0, canvas.1)
            } else {
                (iw, ih)
            }
        }
        None => fit_inside(src_w, src_h, canvas.0, canvas.1),
    };
    if inner == canvas {
        return Err(MediaError::InvalidOption(format!(
            "the source ({src_w}x{src_h}) already fills the {}x{} canvas, so there is nothing \
             to outpaint; give a canvas of another shape (e.g. wider than the source) or use \
             --outpaint 1.5x",
            canvas.0, canvas.1
        )));
    }
    Ok(OutpaintPlan {
        canvas,
        requested,
        inner,
        offset: ((canvas.0 - inner.0) / 2, (canvas.1 - inner.1) / 2),
    })
}

/// A source frame on the outpainted canvas: scaled to `plan.inner` (Lanczos3, a centre crop
/// of at most a pixel of rounding, as [`crate::fit_crop`]) and pasted centred on gray
/// [`MASK_FILL_GRAY`].
pub fn outpaint_frame(frame: &Frame, plan: &OutpaintPlan) -> Result<Frame> {
    let inner = crate::fit_crop(frame, plan.inner.0, plan.inner.1)?;
    paste_on_gray(&inner, plan)
}

/// A frame already of `plan.inner`'s size pasted centred on a gray canvas.
pub fn paste_on_gray(inner: &Frame, plan: &OutpaintPlan) -> Result<Frame> {
    if (inner.width(), inner.height()) != plan.inner {
        return Err(MediaError::InvalidSize(format!(
            "the frame is {}x{} but the outpaint plan places a {}x{} source",
            inner.width(),
            inner.height(),
            plan.inner.0,
            plan.inner.1
        )));
    }
    let (cw, ch) = plan.canvas;
    let mut data = vec![MASK_FILL_GRAY; cw as usize * ch as usize * 3];
    let (ox, oy) = plan.offset;
    let iw = inner.width() as usize;
    for y in 0..inner.height() as usize {
        let src = &inner.data()[y * iw * 3..(y + 1) * iw * 3];
        let dst = ((oy as usize + y) * cw as usize + ox as usize) * 3;
        data[dst..dst + src.len()].copy_from_slice(src);
    }
    Frame::new(cw, ch, data)
}

/// Fills a frame's masked pixels (mask ≥ 128) with gray [`MASK_FILL_GRAY`]: what VACE's
/// inpainting is given where it regenerates.
pub fn fill_masked(frame: &mut Frame, mask: &[u8]) -> Result<()> {
    let n = frame.width() as usize * frame.height() as usize;
    if mask.len() != n {
        return Err(MediaError::InvalidSize(format!(
            "a mask of {} pixels for a {}x{} frame ({n} pixels)",
            mask.len(),
            frame.width(),
            frame.height()
        )));
    }
    for (p, &m) in frame.data_mut().chunks_exact_mut(3).zip(mask) {
        if m >= 128 {
            p.fill(MASK_FILL_GRAY);
        }
    }
    Ok(())
}

/// A picture resized (Lanczos3, no crop: the aspect may change by under a multiple) to the
/// largest size whose sides are multiples of `multiple` (each side rounded down, at least one
/// multiple): what diffusers' `VideoProcessor.preprocess` does to VACE reference images. A
/// picture already of such a size is returned unchanged.
pub fn snap_to_multiple(frame: &Frame, multiple: u32) -> Result<Frame> {
    let m = multiple.max(1);
    let (w, h) = (frame.width(), frame.height());
    let (nw, nh) = ((w / m).max(1) * m, (h / m).max(1) * m);
    if (nw, nh) == (w, h) {
        return Ok(frame.clone());
    }
    let img = RgbImage::from_raw(w, h, frame.data().to_vec())
        .ok_or_else(|| MediaError::InvalidSize("frame buffer does not match its size".into()))?;
    let out = image::imageops::resize(&img, nw, nh, FilterType::Lanczos3);
    Frame::new(nw, nh, out.into_raw())
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
    use crate::still::{encode_image, ImageFormat};

    fn fps(n: u32) -> Fps {
        Fps::integer(n).unwrap()
    }

    /// A still mask: white in the rectangle `x0..x1 × y0..y1`.
    fn rect(w: u32, h: u32, x0: u32, x1: u32, y0: u32, y1: u32) -> MaskFrames {
        let data = (0..h)
            .flat_map(|y| {
                (0..w).map(move |x| {
                    if (x0..x1).contains(&x) && (y0..y1).contains(&y) {
                        255
                    } else {
                        0
                    }
                })
            })
            .collect();
        MaskFrames::still(w, h, data).unwrap()
    }

    #[test]
    fn decodes_png_masks_and_refuses_garbage() {
        let f = Frame::from_fn(20, 10, |x, _| if x < 10 { [0; 3] } else { [255; 3] }).unwrap();
        let png = encode_image(&f, ImageFormat::Png).unwrap();
        let m = decode_mask(&png).unwrap();
        assert!(m.is_still());
        assert_eq!((m.width, m.height, m.len()), (20, 10, 1));
        assert_eq!(m.frames[0][0], 0);
        assert_eq!(m.frames[0][19], 255);
        // A red-on-black mask reads by luma (76).
        let red = Frame::filled(4, 4, [255, 0, 0]).unwrap();
        let m = decode_mask(&encode_image(&red, ImageFormat::Png).unwrap()).unwrap();
        assert_eq!(m.frames[0][0], 76);
        for bad in [
            &b""[..],
            b"not a mask at all, just words",
            &png[..png.len() / 2],
        ] {
            let e = decode_mask(bad).unwrap_err();
            assert!(matches!(e, MediaError::Corrupt { .. }), "{e}");
        }
    }

    #[test]
    fn decodes_video_masks_one_per_frame() {
        // 5 frames of 32×16 at 8 fps: white on the right half from frame 2 on.
        let frames: Vec<Frame> = (0..5)
            .map(|i| {
                Frame::from_fn(
                    32,
                    16,
                    |x, _| if i >= 2 && x >= 16 { [255; 3] } else { [0; 3] },
                )
                .unwrap()
            })
            .collect();
        let video = crate::Video::new(frames, fps(8)).unwrap();
        let mp4 = crate::encode_mp4(&video, &crate::Mp4Options::default()).unwrap();
        let m = decode_mask(&mp4).unwrap();
        assert!(!m.is_still());
        assert_eq!(
            (m.width, m.height, m.len(), m.fps),
            (32, 16, 5, Some(fps(8)))
        );
        let (out, _) = conform_mask(&m, 32, 16, 32, 16, fps(8), 5).unwrap();
        // Lossy video: thresholding brings it back to the drawn mask.
        assert!(out[0].iter().all(|&v| v == 0), "frame 0 is black");
        assert_eq!(out[3][5 * 32 + 28], 255);
        assert_eq!(out[3][5 * 32 + 3], 0);
    }

    #[test]
    fn conform_follows_the_video_crop_and_thresholds() {
        // A 64×32 source fitted to 32×32: resized to 64×32 (kept), cropped from x = 16. A mask
        // white on the left half (x < 32) leaves x < 16 of the crop white.
        let m = rect(64, 32, 0, 32, 0, 32);
        let (out, rep) = conform_mask(&m, 64, 32, 32, 32, fps(8), 3).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|f| f.len() == 32 * 32));
        assert!(out[0].iter().all(|&v| v == 0 || v == 255));
        assert_eq!(out[0][15], 255);
        assert_eq!(out[0][16], 0);
        assert!((rep.white_fraction - 0.5).abs() < 1e-9, "{rep:?}");
        assert_eq!(rep.grey_fraction, 0.0);
        assert!(rep.warning().is_none());
        // The same mask drawn at half the source's size lines up the same way (bilinear
        // upscaling, thresholded: the edge stays within a pixel).
        let half = rect(32, 16, 0, 16, 0, 16);
        let (out2, _) = conform_mask(&half, 64, 32, 32, 32, fps(8), 1).unwrap();
        let diff = out[0].iter().zip(&out2[0]).filter(|(a, b)| a != b).count();
        assert!(diff <= 32, "{diff} pixels differ");
    }

    #[test]
    fn bad_masks_get_one_clear_error() {
        // All black.
        let black = MaskFrames::still(16, 16, vec![0; 256]).unwrap();
        let e = conform_mask(&black, 16, 16, 16, 16, fps(8), 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("all black"), "{e}");
        // White only where the crop cuts it away.
        let edge = rect(64, 16, 0, 8, 0, 16);
        let e = conform_mask(&edge, 64, 16, 16, 16, fps(8), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        // Wrong shape: names both sizes.
        let wide = rect(64, 16, 0, 8, 0, 16);
        let e = conform_mask(&wide, 48, 32, 48, 32, fps(8), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64x16") && e.contains("48x32"), "{e}");
        // A pixel of rounding is fine: 641×480 against 640×480.
        check_mask_aspect(641, 480, 640, 480).unwrap();
        check_mask_aspect(320, 240, 640, 480).unwrap();
        assert!(check_mask_aspect(640, 360, 640, 480).is_err());
        // A mask video too short: 4 frames at 8 fps, 9 frames asked for.
        let frames: Vec<Frame> = (0..4)
            .map(|_| Frame::filled(8, 8, [255; 3]).unwrap())
            .collect();
        let v = MaskFrames::from_frames(&frames, Some(fps(8))).unwrap();
        let e = conform_mask(&v, 8, 8, 8, 8, fps(8), 9)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 4 frames") && e.contains("9"), "{e}");
        // Long enough: one mask per frame, in order.
        let frames: Vec<Frame> = (0..9u8)
            .map(|i| Frame::filled(8, 8, if i % 2 == 0 { [255; 3] } else { [0; 3] }).unwrap())
            .collect();
        let v = MaskFrames::from_frames(&frames, Some(fps(8))).unwrap();
        let (out, rep) = conform_mask(&v, 8, 8, 8, 8, fps(8), 9).unwrap();
        assert_eq!(out.len(), 9);
        assert!(out[0].iter().all(|&v| v == 255) && out[1].iter().all(|&v| v == 0));
        assert!((rep.white_fraction - 5.0 / 9.0).abs() < 1e-9);
    }

    #[test]
    fn grey_masks_are_thresholded_and_reported() {
        // A soft gradient: most pixels grey.
        let data: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
        let m = MaskFrames::still(16, 16, data).unwrap();
        let (out, rep) = conform_mask(&m, 16, 16, 16, 16, fps(8), 1).unwrap();
        assert!(out[0].iter().all(|&v| v == 0 || v == 255));
        assert_eq!(out[0].iter().filter(|&&v| v == 255).count(), 128);
        // 33..=223 are grey: 191 of 256.
        assert!((rep.grey_fraction - 191.0 / 256.0).abs() < 1e-9, "{rep:?}");
        let w = rep.warning().unwrap();
        assert!(w.contains("74.6%") && w.contains("thresholded"), "{w}");
    }

    #[test]
    fn outpaint_plans_round_and_centre() {
        // 48×32 source on a 48×32 model, 1.5x: 72×48, rounded to 16 → 80×48.
        let p = outpaint_canvas(48, 32, (48, 32), Outpaint::Factor(1.5, 1.5), (16, 16)).unwrap();
        assert_eq!(p.requested, (72, 48));
        assert_eq!(p.canvas, (80, 48));
        assert!(p.rounded());
        assert_eq!(p.inner, (48, 32));
        assert_eq!(p.offset, (16, 8));
        let m = p.mask();
        assert_eq!(m.len(), 80 * 48);
        assert_eq!(m.iter().filter(|&&v| v == 0).count(), 48 * 32);
        assert_eq!(m[8 * 80 + 16], 0);
        assert_eq!(m[8 * 80 + 15], 255);
        // 2x1: twice as wide, as tall; a 640×480 source fitted inside 48×32 first (43×32).
        let p = outpaint_canvas(640, 480, (48, 32), Outpaint::Factor(2.0, 1.0), (8, 8)).unwrap();
        assert_eq!(p.inner, (43, 32));
        assert_eq!(p.canvas, (88, 32));
        // A canvas: the source fits inside it.
        let p = outpaint_canvas(48, 32, (48, 32), Outpaint::Canvas(96, 32), (16, 16)).unwrap();
        assert_eq!((p.canvas, p.inner, p.offset), ((96, 32), (48, 32), (24, 0)));
        assert!(!p.rounded());
        // Nothing to outpaint, bad factors.
        assert!(outpaint_canvas(48, 32, (48, 32), Outpaint::Canvas(96, 64), (16, 16)).is_err());
        assert!(outpaint_canvas(48, 32, (48, 32), Outpaint::Factor(0.5, 1.0), (16, 16)).is_err());
        assert!(outpaint_canvas(48, 32, (48, 32), Outpaint::Factor(1.0, 1.0), (16, 16)).is_err());
        assert_eq!(
            Outpaint::parse_factor("1.5x").unwrap(),
            Outpaint::Factor(1.5, 1.5)
        );
        assert_eq!(
            Outpaint::parse_factor("2x1").unwrap(),
            Outpaint::Factor(2.0, 1.0)
        );
        assert!(Outpaint::parse_factor("wide").is_err());
        // The frame: gray border, the source in the middle.
        let src = Frame::filled(48, 32, [10, 200, 30]).unwrap();
        let p = outpaint_canvas(48, 32, (48, 32), Outpaint::Factor(1.5, 1.5), (16, 16)).unwrap();
        let f = outpaint_frame(&src, &p).unwrap();
        assert_eq!((f.width(), f.height()), (80, 48));
        assert_eq!(f.pixel(0, 0).unwrap(), [128; 3]);
        assert_eq!(f.pixel(16, 8).unwrap(), [10, 200, 30]);
        assert_eq!(f.pixel(63, 39).unwrap(), [10, 200, 30]);
        assert_eq!(f.pixel(64, 40).unwrap(), [128; 3]);
    }

    #[test]
    fn fill_and_snap() {
        let mut f = Frame::filled(2, 1, [9, 9, 9]).unwrap();
        fill_masked(&mut f, &[255, 0]).unwrap();
        assert_eq!(f.data(), &[128, 128, 128, 9, 9, 9]);
        assert!(fill_masked(&mut f, &[0]).is_err());
        let r = snap_to_multiple(&Frame::filled(37, 21, [5, 6, 7]).unwrap(), 8).unwrap();
        assert_eq!((r.width(), r.height()), (32, 16));
        assert!(r.data().chunks(3).all(|p| p == [5, 6, 7]));
        let same = Frame::filled(32, 16, [1, 2, 3]).unwrap();
        assert_eq!(snap_to_multiple(&same, 8).unwrap(), same);
    }
}
