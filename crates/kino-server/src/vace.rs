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
use kino_media::{Fps, MaskFrames, MaskReport, MediaError};

use crate::inputs::{self, StoredInput};
use crate::store::Job;

/// Decodes a mask upload with kino-media's mask reader: a still, or the first `seconds` of a
/// video (only the head a job can use is decoded, as for source videos).
pub fn decode_mask(bytes: &[u8], seconds: f64) -> Result<MaskFrames, String> {
    if inputs::sniff_image(bytes).is_some() {
        return kino_media::decode_mask(bytes).map_err(|e| e.to_string());
    }
    let video = inputs::decode_video(bytes, seconds)?;
    MaskFrames::from_frames(video.frames(), Some(video.fps())).map_err(|e| e.to_string())
}

/// What is wrong with a mask, for a 400 (`code`, message).
pub type MaskProblem = (&'static str, String);

/// Fits a decoded mask to the job (`width × height`, `frames` at `fps`) as the source
/// (`src_w × src_h`) is fitted, with kino-media's checks (aspect ratio, frames of a mask video,
/// something white in what the model sees), each mapped to its error code. Returns the fitted
/// masks (0/255) and the report.
pub fn check_mask(
    mask: &MaskFrames,
    (src_w, src_h): (u32, u32),
    (width, height): (u32, u32),
    fps: u32,
    frames: usize,
) -> Result<(Vec<Vec<u8>>, MaskReport), MaskProblem> {
    let rate = Fps::integer(fps).map_err(|e| ("invalid_mask", e.to_string()))?;
    kino_media::conform_mask(mask, src_w, src_h, width, height, rate, frames).map_err(|e| {
        let code = match &e {
            MediaError::InvalidSize(_) => "mask_size_mismatch",
            MediaError::InvalidVideo(_) => "mask_too_short",
            MediaError::InvalidOption(_) => "empty_mask",
            _ => "invalid_mask",
        };
        (code, e.to_string())
    })
}

fn rgb(frame: kino_media::Frame) -> Result<RgbImage, String> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    RgbImage::new(w, h, frame.into_data()).map_err(|e| e.to_string())
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
            rgb(kino_media::snap_to_multiple(&f, m).map_err(|e| e.to_string())?)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(v) = &inp.video {
        let video = inputs::decode_video(&read(v)?, inputs::head_seconds(n, fps))?;
        let mut frames = inputs::conform(&video, w, h, fps, n)?;
        let mask = match &inp.mask {
            Some(s) => {
                let src = decode_mask(&read(s)?, inputs::head_seconds(n, fps))?;
                let (masks, _) = check_mask(&src, (video.width(), video.height()), (w, h), fps, n)
                    .map_err(|(_, msg)| msg)?;
                let mut gray = Vec::with_capacity(masks.len());
                for (f, m) in frames.iter_mut().zip(masks) {
                    // VACE's inpainting recipe: the regenerated region is gray 128.
                    kino_media::fill_masked(f, &m).map_err(|e| e.to_string())?;
                    gray.push(
                        GrayImage::new(w as usize, h as usize, m).map_err(|e| e.to_string())?,
                    );
                }
                Some(gray)
            }
            None => None,
        };
        let frames = frames.into_iter().map(rgb).collect::<Result<Vec<_>, _>>()?;
        return Ok(Conditioning::Vace(VaceCondition {
            video: Some(frames),
            composite: mask.is_some(),
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

    fn still(w: u32, h: u32, white: impl Fn(u32, u32) -> bool) -> MaskFrames {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| if white(x, y) { 255 } else { 0 })
            .collect();
        MaskFrames::still(w, h, data).unwrap()
    }

    #[test]
    fn mask_problems_get_their_codes() {
        let half = still(96, 64, |x, _| x >= 48);
        let (m, report) = check_mask(&half, (96, 64), (48, 32), 8, 9).unwrap();
        assert_eq!(m.len(), 9);
        assert_eq!((m[0][0], m[0][47]), (0, 255));
        assert!((report.white_fraction - 0.5).abs() < 0.05);
        let e = check_mask(&half, (64, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "mask_size_mismatch", "{}", e.1);
        let black = still(96, 64, |_, _| false);
        let e = check_mask(&black, (96, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "empty_mask", "{}", e.1);
        let short = MaskFrames {
            fps: Some(Fps::integer(8).unwrap()),
            frames: vec![half.frames[0].clone(); 3],
            ..half.clone()
        };
        let e = check_mask(&short, (96, 64), (48, 32), 8, 9).unwrap_err();
        assert_eq!(e.0, "mask_too_short", "{}", e.1);
        assert!(decode_mask(b"not a mask", 1.0).is_err());
    }
}
