//! VACE jobs (a server whose model is a VACE model, `Capabilities::vace`): masked edits,
//! guided edits and characters as reference images, all through the engine's one pipeline
//! (`Conditioning::Vace`).
//!
//! - **Masks** (`mask` on `POST /v1/videos/edits`, Kino extension): a PNG/JPEG/WebP still
//!   (one mask for every frame) or a video (one mask per frame, read at the model's frame rate
//!   like the source). White = regenerate, black = keep. A mask is fitted to the output size
//!   exactly as the source video is (scale to cover, centre crop) and thresholded at 128. The
//!   API checks it before anything is queued ([`check_mask`]): it must decode, have the
//!   source's aspect ratio (within 1%), give enough frames (a video mask), and have some white
//!   left after fitting. The masked region of the source is filled with gray 128 before it
//!   goes to the engine (VACE's inpainting recipe: generate = gray + white mask); the rest of
//!   the source is kept.
//! - **No mask**: the whole video is regenerated, guided by the source (the engine's all-white
//!   mask over the real pixels).
//! - **Characters**: each character's image, resized (Lanczos) to the largest size whose sides
//!   are multiples of `WanPipeline::vace_reference_multiple` as the reference's preprocessing
//!   does, becomes a reference image; with a first image (`input_reference`) the engine's own
//!   image recipe is used and the references added to it.

use std::path::Path;

use kino_engine::wan::pipeline::{Conditioning, GrayImage, RgbImage, VaceCondition, WanPipeline};
use kino_engine::wan::pipeline_vace::VACE_GRAY;
use kino_media::{Frame, Video};

use crate::inputs::{self, StoredInput};
use crate::store::Job;

/// A decoded mask upload: one still, or a video.
pub enum MaskSource {
    Still(Frame),
    Video(Video),
}

impl MaskSource {
    pub fn width(&self) -> u32 {
        match self {
            MaskSource::Still(f) => f.width(),
            MaskSource::Video(v) => v.width(),
        }
    }

    pub fn height(&self) -> u32 {
        match self {
            MaskSource::Still(f) => f.height(),
            MaskSource::Video(v) => v.height(),
        }
    }
}

/// Decodes a mask upload (a still, or the first `seconds` of a video).
pub fn decode_mask(bytes: &[u8], seconds: f64) -> Result<MaskSource, String> {
    if inputs::sniff_image(bytes).is_some() {
        return inputs::decode_image(bytes).map(MaskSource::Still);
    }
    inputs::decode_video(bytes, seconds).map(MaskSource::Video)
}

/// 0 or 255 per pixel: BT.601 luma of an RGB frame thresholded at 128.
fn threshold(frame: &Frame) -> Vec<u8> {
    frame
        .data()
        .chunks_exact(3)
        .map(|p| {
            let l = 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]);
            if l >= 128.0 {
                255
            } else {
                0
            }
        })
        .collect()
}

/// Share of pixels between 32 and 224 (grey, not clearly black or white) in the upload's
/// frames as sent (the first frame of a video).
pub fn grey_fraction(mask: &MaskSource) -> f64 {
    let f = match mask {
        MaskSource::Still(f) => f,
        MaskSource::Video(v) => &v.frames()[0],
    };
    let px = f.data().len() / 3;
    let grey = f
        .data()
        .chunks_exact(3)
        .filter(|p| {
            let l = (u32::from(p[0]) + u32::from(p[1]) + u32::from(p[2])) / 3;
            (32..=224).contains(&l)
        })
        .count();
    grey as f64 / px.max(1) as f64
}

/// The mask fitted to `width × height` for `frames` frames at `fps` (a still repeats), 0/255.
pub fn conform_mask(
    mask: &MaskSource,
    width: u32,
    height: u32,
    fps: u32,
    frames: usize,
) -> Result<Vec<GrayImage>, String> {
    let to_gray = |f: &Frame| -> Result<GrayImage, String> {
        GrayImage::new(width as usize, height as usize, threshold(f)).map_err(|e| e.to_string())
    };
    match mask {
        MaskSource::Still(f) => {
            let g = to_gray(&inputs::fit(f, width, height)?)?;
            Ok(vec![g; frames])
        }
        MaskSource::Video(v) => inputs::conform(v, width, height, fps, frames)?
            .iter()
            .map(to_gray)
            .collect(),
    }
}

/// What is wrong with a mask, for a 400 (`code`, message).
pub type MaskProblem = (&'static str, String);

/// Checks a decoded mask against the source video (`src_w × src_h`) and the job (`width ×
/// height`, `frames` at `fps`): the aspect ratio, the frame count of a video mask, some white
/// after fitting. Returns the fitted masks.
pub fn check_mask(
    mask: &MaskSource,
    name: &str,
    (src_w, src_h): (u32, u32),
    (width, height): (u32, u32),
    fps: u32,
    frames: usize,
) -> Result<Vec<GrayImage>, MaskProblem> {
    let (mw, mh) = (mask.width(), mask.height());
    let ratio = |w: u32, h: u32| f64::from(w) / f64::from(h.max(1));
    let (a, b) = (ratio(mw, mh), ratio(src_w, src_h));
    if (mw, mh) != (src_w, src_h) && (a / b - 1.0).abs() > 0.01 {
        return Err((
            "mask_size_mismatch",
            format!(
                "the mask ({name}) is {mw}×{mh} but the video is {src_w}×{src_h}: their aspect ratios differ ({a:.3} vs {b:.3}); paint the mask at the video's size ({src_w}×{src_h})"
            ),
        ));
    }
    if let MaskSource::Video(v) = mask {
        let avail = inputs::frames_available(v, fps);
        if avail < frames {
            return Err((
                "mask_too_short",
                format!(
                    "the mask video ({name}) gives {avail} frames at {fps} fps ({} frames at {:.3} fps as sent) but the edit makes {frames}; send one mask frame per video frame (as long as the video), or a still PNG mask for every frame",
                    v.len(),
                    v.fps().as_f64()
                ),
            ));
        }
    }
    let fitted = conform_mask(mask, width, height, fps, frames).map_err(|e| {
        (
            "invalid_mask",
            format!("the mask ({name}) cannot be fitted: {e}"),
        )
    })?;
    if fitted.iter().all(|m| m.data.iter().all(|&v| v == 0)) {
        let sent_black = match mask {
            MaskSource::Still(f) => threshold(f).iter().all(|&v| v == 0),
            MaskSource::Video(v) => v
                .frames()
                .iter()
                .all(|f| threshold(f).iter().all(|&x| x == 0)),
        };
        let why = if sent_black {
            "it is all black".to_string()
        } else {
            format!("its white part falls outside the {width}×{height} crop of the video")
        };
        return Err((
            "empty_mask",
            format!(
                "the mask ({name}) marks nothing to regenerate: {why}; paint white where the video should change (black is kept)"
            ),
        ));
    }
    Ok(fitted)
}

/// Resizes a reference image (Lanczos3) to the largest size whose sides are multiples of `m`
/// (at least `m`), as the reference's `video_processor.preprocess` does; unchanged when its
/// sides already are.
pub fn snap_reference(frame: &Frame, m: u32) -> Result<Frame, String> {
    let m = m.max(1);
    let (w, h) = (frame.width(), frame.height());
    let (nw, nh) = ((w / m).max(1) * m, (h / m).max(1) * m);
    if (nw, nh) == (w, h) {
        return Ok(frame.clone());
    }
    let img = image::RgbImage::from_raw(w, h, frame.data().to_vec())
        .ok_or("a reference image's buffer does not match its size")?;
    let out = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Lanczos3);
    Frame::new(nw, nh, out.into_raw()).map_err(|e| e.to_string())
}

fn rgb(frame: Frame) -> Result<RgbImage, String> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    RgbImage::new(w, h, frame.into_data()).map_err(|e| e.to_string())
}

/// Fills the masked pixels (255) of each frame with gray 128.
pub fn fill_masked(frames: &mut [RgbImage], masks: &[GrayImage]) {
    for (f, m) in frames.iter_mut().zip(masks) {
        for (px, &v) in f.data.chunks_exact_mut(3).zip(&m.data) {
            if v >= 128 {
                px.fill(VACE_GRAY);
            }
        }
    }
}

/// The engine's conditioning for a VACE job, rebuilt from its stored inputs.
pub fn conditioning(
    data_dir: &Path,
    job: &Job,
    pipeline: &WanPipeline,
) -> Result<Conditioning, String> {
    let Some(inp) = &job.params.inputs else {
        return Ok(Conditioning::Text);
    };
    let r = &job.params.request;
    let (Some(w), Some(h)) = (r.width, r.height) else {
        return Err("the job has no size".into());
    };
    let (w, h) = (w as u32, h as u32);
    let n = r.num_frames.unwrap_or(1);
    let fps = job.params.fps;
    let dir = inputs::inputs_dir(data_dir, &job.id);
    let read = |s: &StoredInput| -> Result<Vec<u8>, String> {
        let p = dir.join(&s.file);
        std::fs::read(&p).map_err(|e| format!("cannot read the stored input {}: {e}", p.display()))
    };
    let m = pipeline.vace_reference_multiple() as u32;
    let reference_images = inp
        .characters
        .iter()
        .map(|c| {
            let f = inputs::decode_image(&read(&c.image)?)?;
            rgb(snap_reference(&f, m)?)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(v) = &inp.video {
        let video = inputs::decode_video(&read(v)?, inputs::head_seconds(n, fps))?;
        let mut frames = inputs::conform(&video, w, h, fps, n)?
            .into_iter()
            .map(rgb)
            .collect::<Result<Vec<_>, _>>()?;
        let mask = match &inp.mask {
            Some(s) => {
                let src = decode_mask(&read(s)?, inputs::head_seconds(n, fps))?;
                let masks = conform_mask(&src, w, h, fps, n)?;
                fill_masked(&mut frames, &masks);
                Some(masks)
            }
            None => None,
        };
        return Ok(Conditioning::Vace(VaceCondition {
            video: Some(frames),
            mask,
            reference_images,
            conditioning_scale: Vec::new(),
        }));
    }
    let image = |s: &StoredInput| -> Result<RgbImage, String> {
        rgb(inputs::fit(&inputs::decode_image(&read(s)?)?, w, h)?)
    };
    let base = match &inp.image {
        Some(first) => Conditioning::Image {
            first: image(first)?,
            last: inp.last_image.as_ref().map(image).transpose()?,
        },
        None => Conditioning::Text,
    };
    if reference_images.is_empty() {
        return Ok(base);
    }
    // The engine's own recipe for the image (or text), plus the references.
    let mut request = r.clone();
    request.conditioning = base.clone();
    let resolved = pipeline.resolve(&request).map_err(|e| e.to_string())?;
    let mut v = pipeline
        .vace_condition(&base, &resolved)
        .map_err(|e| e.to_string())?
        .into_owned();
    v.reference_images = reference_images;
    Ok(Conditioning::Vace(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn still(w: u32, h: u32, white: impl Fn(u32, u32) -> bool) -> MaskSource {
        MaskSource::Still(
            Frame::from_fn(w, h, |x, y| if white(x, y) { [255; 3] } else { [0; 3] }).unwrap(),
        )
    }

    #[test]
    fn masks_are_checked() {
        let half = still(96, 64, |x, _| x >= 48);
        let m = check_mask(&half, "m.png", (96, 64), (48, 32), 8, 9).unwrap();
        assert_eq!(m.len(), 9);
        assert!(m[0].data.iter().all(|&v| v == 0 || v == 255));
        assert_eq!(m[0].data[0], 0);
        assert_eq!(m[0].data[47], 255);
        // Wrong aspect.
        let e = check_mask(&half, "m.png", (64, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "mask_size_mismatch");
        assert!(e.1.contains("96×64") && e.1.contains("64×64"), "{}", e.1);
        // All black.
        let black = still(96, 64, |_, _| false);
        let e = check_mask(&black, "m.png", (96, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "empty_mask");
        assert!(e.1.contains("all black"), "{}", e.1);
        // A short mask video.
        let frames = (0..3)
            .map(|_| Frame::filled(96, 64, [255; 3]).unwrap())
            .collect();
        let v =
            MaskSource::Video(Video::new(frames, kino_media::Fps::integer(8).unwrap()).unwrap());
        let e = check_mask(&v, "m.mp4", (96, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "mask_too_short");
    }

    #[test]
    fn masked_pixels_turn_gray_and_references_snap() {
        let mut frames = vec![RgbImage::new(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap()];
        let masks = vec![GrayImage::new(2, 1, vec![0, 255]).unwrap()];
        fill_masked(&mut frames, &masks);
        assert_eq!(frames[0].data, vec![10, 20, 30, 128, 128, 128]);
        let f = Frame::filled(37, 21, [200, 10, 10]).unwrap();
        let s = snap_reference(&f, 8).unwrap();
        assert_eq!((s.width(), s.height()), (32, 16));
        let same = Frame::filled(32, 16, [1, 2, 3]).unwrap();
        assert_eq!(snap_reference(&same, 8).unwrap(), same);
    }
}
