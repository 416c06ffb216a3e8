//! The VACE part of [`WanPipeline`]: mirrors diffusers' `WanVACEPipeline`
//! (`pipelines/wan/pipeline_wan_vace.py`, 0.42.1) `preprocess_conditions`,
//! `prepare_video_latents` and `prepare_masks`, which build the control latents the VACE
//! transformer's branch reads at every step (the loop itself is the shared
//! [`WanPipeline::denoise_with`], with [`LatentCondition::Vace`]).
//!
//! The control latents, `[1, 2·z + 64, R + T, h, w]`:
//! - the source video (zeros without one) split by the mask binarised at 0.5 into the
//!   *inactive* part `video · (1 − m)` and the *reactive* part `video · m`, each VAE-encoded
//!   (the mean) and normalised, concatenated on channels;
//! - each reference image letterboxed on white (bilinear resize keeping its aspect, centred on a
//!   canvas of ones) and encoded alone as one latent frame, with z zero channels after it, put
//!   in FRONT of the time axis one after the other, so the last reference ends up first (the
//!   reference's `torch.cat([reference_latent, latent], dim=1)` inside the loop);
//! - the mask, NOT binarised (the raw values), as 64 channels: each 8×8 pixel block's pixels
//!   become channels (`view(F, h, 8, w, 8).permute(2, 4, 0, 1, 3)`), resized on time to the
//!   latent frames with `nearest-exact` (latent frame t samples pixel frame
//!   `floor((t + 0.5) · F / T)`), with R zero frames in front for the references. The 8 is
//!   the reference's `vae_scale_factor_spatial = 2 ** len(temperal_downsample)`;
//!   [`WanPipeline::open`] refuses a VACE folder whose VAE compresses otherwise.
//!
//! The noise has R more latent frames than the video (`num_frames + R · 4` in the reference);
//! the reference frames are dropped before decoding.
//!
//! Every other conditioning a VACE model is asked for becomes a VACE one here
//! ([`WanPipeline::vace_condition`]), following VACE's own recipes (keep = the real pixels with
//! mask 0, generate = gray 128 with mask 255): a first (and last) image is a kept frame in a
//! gray video, a continuation keeps the last [`WanPipeline::vace_context_frames`] frames of
//! what came before and generates the rest.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};

use crate::progress::Progress;
use crate::wan::pipeline::{
    frames_to_tensor, image_to_tensor, Conditioning, GrayImage, ResolvedRequest, RgbImage,
    VaceCondition, WanPipeline,
};
use crate::{Error, Result};

/// Gray for the frames VACE generates (VACE's preprocessing fills them with 128).
pub const VACE_GRAY: u8 = 128;

impl WanPipeline {
    /// The frames a VACE model continues from: about a quarter of the clip, in whole latent
    /// frames (`temporal · m + 1`), at least 1. Wan2.1 VACE's 81 frames: 21; 17 frames: 5.
    pub fn vace_context_frames(&self, num_frames: usize) -> usize {
        vace_context_frames(num_frames, self.frame_step())
    }

    /// Reference images are first resized (Lanczos, as PIL) to the largest size whose sides
    /// are multiples of this, as the reference's `video_processor.preprocess` does
    /// (`vae_scale_factor_spatial` = 2^len(temperal_downsample): 8 for Wan2.1, 4 for
    /// kino-shapes); callers do it (`kino_media`), the engine letterboxes what it gets.
    pub fn vace_reference_multiple(&self) -> usize {
        1usize << self.vae_config().temperal_downsample.len()
    }

    /// Frames a continuation of this model keeps from what came before (and does not output
    /// again): the VACE context, or 1 (the first-image models, whose frame 0 repeats it).
    pub fn continuation_context(&self, num_frames: usize) -> usize {
        if self.capabilities().vace {
            self.vace_context_frames(num_frames)
        } else {
            1
        }
    }

    /// `conditioning` for a VACE model as a [`VaceCondition`] (see the module docs).
    pub fn vace_condition<'a>(
        &self,
        conditioning: &'a Conditioning,
        r: &ResolvedRequest,
    ) -> Result<Cow<'a, VaceCondition>> {
        let (w, h, n) = (r.width, r.height, r.num_frames);
        let gray = || RgbImage {
            width: w,
            height: h,
            data: vec![VACE_GRAY; w * h * 3],
        };
        let keep = || GrayImage::filled(w, h, 0);
        let generate = || GrayImage::filled(w, h, 255);
        Ok(match conditioning {
            Conditioning::Vace(v) => Cow::Borrowed(v),
            Conditioning::Text => Cow::Owned(VaceCondition::default()),
            Conditioning::Image { first, last } => {
                let mut video = vec![first.clone()];
                let mut mask = vec![keep()];
                let middle = n.saturating_sub(1 + usize::from(last.is_some()));
                video.extend((0..middle).map(|_| gray()));
                mask.extend((0..middle).map(|_| generate()));
                if let Some(l) = last {
                    video.push(l.clone());
                    mask.push(keep());
                }
                video.truncate(n);
                mask.truncate(n);
                Cow::Owned(VaceCondition {
                    video: Some(video),
                    mask: Some(mask),
                    ..Default::default()
                })
            }
            Conditioning::Continue { frames } => {
                let k = self.vace_context_frames(n).min(frames.len());
                if k == 0 {
                    return Err(Error::InvalidRequest(
                        "there are no frames to continue from".into(),
                    ));
                }
                let mut video: Vec<RgbImage> = frames[frames.len() - k..].to_vec();
                let mut mask: Vec<GrayImage> = (0..k).map(|_| keep()).collect();
                video.extend((k..n).map(|_| gray()));
                mask.extend((k..n).map(|_| generate()));
                Cow::Owned(VaceCondition {
                    video: Some(video),
                    mask: Some(mask),
                    ..Default::default()
                })
            }
            Conditioning::Video { .. } => {
                return Err(Error::InvalidRequest(
                    "a VACE model edits a video through a mask (kino edit IN.mp4 \"…\" --mask \
                     MASK.png), not with a strength"
                        .into(),
                ))
            }
        })
    }

    /// The per-layer scale of `v` (empty: ones; one value: repeated), checked against the
    /// model's VACE layers.
    pub fn vace_scale(&self, conditioning_scale: &[f64]) -> Result<Vec<f64>> {
        let layers = self
            .transformer_config()
            .vace_layers
            .as_ref()
            .map_or(0, Vec::len);
        if let Some(bad) = conditioning_scale.iter().find(|s| !s.is_finite()) {
            return Err(Error::InvalidRequest(format!(
                "conditioning scale {bad} is not a finite number; use e.g. 1.0"
            )));
        }
        match conditioning_scale.len() {
            0 => Ok(vec![1.0; layers]),
            1 => Ok(vec![conditioning_scale[0]; layers]),
            n if n == layers => Ok(conditioning_scale.to_vec()),
            n => Err(Error::InvalidRequest(format!(
                "{n} conditioning scales given; this model has {layers} VACE layers: give one \
                 value for all, or {layers}"
            ))),
        }
    }

    /// Checks a [`VaceCondition`] against the request (sizes, frame counts, scales).
    pub(crate) fn check_vace(&self, v: &VaceCondition, r: &ResolvedRequest) -> Result<()> {
        if let Some(video) = &v.video {
            if video.len() != r.num_frames {
                return Err(Error::InvalidRequest(format!(
                    "the video to edit has {} frames but the run makes {}; give exactly as many \
                     (trim the clip or change --frames)",
                    video.len(),
                    r.num_frames
                )));
            }
            for (i, f) in video.iter().enumerate() {
                if f.width != r.width || f.height != r.height {
                    return Err(Error::InvalidRequest(format!(
                        "frame {i} of the video to edit is {}×{} but the run is {}×{}; resize it \
                         first",
                        f.width, f.height, r.width, r.height
                    )));
                }
            }
        }
        match (&v.mask, &v.video) {
            (Some(_), None) => {
                return Err(Error::InvalidRequest(
                    "a mask needs the video it masks".into(),
                ))
            }
            (Some(mask), Some(video)) => {
                if mask.len() != video.len() {
                    return Err(Error::InvalidRequest(format!(
                        "the mask has {} frames but the video has {}; give one mask frame per \
                         video frame (or one still mask for all)",
                        mask.len(),
                        video.len()
                    )));
                }
                for (i, m) in mask.iter().enumerate() {
                    if m.width != r.width
                        || m.height != r.height
                        || m.data.len() != m.width * m.height
                    {
                        return Err(Error::InvalidRequest(format!(
                            "mask frame {i} is {}×{} but the video is {}×{}; the mask must have \
                             the video's size",
                            m.width, m.height, r.width, r.height
                        )));
                    }
                }
            }
            _ => {}
        }
        for (i, img) in v.reference_images.iter().enumerate() {
            if img.width == 0 || img.height == 0 || img.data.len() != img.width * img.height * 3 {
                return Err(Error::InvalidRequest(format!(
                    "reference image {} is empty or malformed",
                    i + 1
                )));
            }
        }
        self.vace_scale(&v.conditioning_scale)?;
        Ok(())
    }

    /// `preprocess_conditions` + `prepare_video_latents` + `prepare_masks` +
    /// `torch.cat([conditioning_latents, mask], dim=1)`: the control latents
    /// `[1, 2·z + 64, R + T, h, w]` (f32).
    ///
    /// - `video`: `[1, 3, F, H, W]` in [-1, 1] at the generation size, or `None` (zeros);
    /// - `mask`: `[1, 1, F, H, W]` in [0, 1] (1 = generate), or `None` (ones);
    /// - `reference_images`: each `[1, 3, h_r, w_r]` in [-1, 1], any size (letterboxed here);
    /// - the frames, height and width of the run (used without a video).
    pub fn prepare_vace_control(
        &mut self,
        video: Option<&Tensor>,
        mask: Option<&Tensor>,
        reference_images: &[Tensor],
        [num_frames, height, width]: [usize; 3],
        progress: Progress,
    ) -> Result<Tensor> {
        let device = self.options().device.clone();
        let video = match video {
            Some(v) => {
                let d = v.dims();
                if d.len() != 5 || d[0] != 1 || d[1] != 3 || d[3] != height || d[4] != width {
                    return Err(Error::InvalidRequest(format!(
                        "video has shape {d:?}; expected [1, 3, frames, {height}, {width}]"
                    )));
                }
                v.to_device(&device)?.to_dtype(DType::F32)?
            }
            None => Tensor::zeros((1, 3, num_frames, height, width), DType::F32, &device)?,
        };
        let frames = video.dim(2)?;
        let mask = match mask {
            Some(m) => {
                let d = m.dims();
                if d.len() != 5 || d[0] != 1 || d[1] != 1 || d[2..] != video.dims()[2..] {
                    return Err(Error::InvalidRequest(format!(
                        "mask has shape {d:?}; expected [1, 1, {frames}, {height}, {width}] (one \
                         channel, the video's frames and size)"
                    )));
                }
                m.to_device(&device)?
                    .to_dtype(DType::F32)?
                    .clamp(0f32, 1f32)?
            }
            None => Tensor::ones((1, 1, frames, height, width), DType::F32, &device)?,
        };
        // prepare_video_latents: the mask binarised at 0.5 splits the video.
        let binary = mask.gt(0.5)?.to_dtype(DType::F32)?;
        let inactive = video.broadcast_mul(&(1.0 - &binary)?)?;
        let reactive = video.broadcast_mul(&binary)?;
        let inactive = self.encode_latents(&inactive, progress)?;
        let reactive = self.encode_latents(&reactive, progress)?;
        let mut latents = Tensor::cat(&[&inactive, &reactive], 1)?;
        drop((inactive, reactive));
        for image in reference_images {
            let canvas = letterbox_on_white(image, height, width)?;
            let z = self.encode_latents(&canvas.unsqueeze(2)?, progress)?; // [1, z, 1, h, w]
            let z = Tensor::cat(&[&z, &z.zeros_like()?], 1)?;
            latents = Tensor::cat(&[&z, &latents], 2)?;
        }
        // prepare_masks: the raw mask, 8×8 blocks to channels, nearest-exact on time.
        let s = 1usize << self.vae_config().temperal_downsample.len();
        let patch = self.transformer_config().patch_size[1];
        let t = frames.div_ceil(self.frame_step());
        let mask = mask_to_channels(&mask, s, patch, t)?;
        let mask = if reference_images.is_empty() {
            mask
        } else {
            let (c, _, h, w) = mask.dims4()?;
            let pad = Tensor::zeros((c, reference_images.len(), h, w), DType::F32, &device)?;
            Tensor::cat(&[&pad, &mask], 1)?
        };
        let mask = mask.unsqueeze(0)?;
        if mask.dims()[2..] != latents.dims()[2..] {
            return Err(Error::InvalidRequest(format!(
                "the VACE mask {:?} does not fit the condition latents {:?}; use a size that is \
                 a multiple of {}",
                mask.dims(),
                latents.dims(),
                s * patch
            )));
        }
        Ok(Tensor::cat(&[&latents, &mask], 1)?)
    }

    /// [`Self::prepare_vace_control`] from a [`VaceCondition`] of the request `r`.
    pub(crate) fn vace_control_for(
        &mut self,
        v: &VaceCondition,
        r: &ResolvedRequest,
        progress: Progress,
    ) -> Result<Tensor> {
        let device = self.options().device.clone();
        let video = v
            .video
            .as_ref()
            .map(|f| frames_to_tensor(f, &device))
            .transpose()?;
        let mask = v
            .mask
            .as_ref()
            .map(|m| masks_to_tensor(m, &device))
            .transpose()?;
        let refs = v
            .reference_images
            .iter()
            .map(|i| image_to_tensor(i, &device))
            .collect::<Result<Vec<_>>>()?;
        self.prepare_vace_control(
            video.as_ref(),
            mask.as_ref(),
            &refs,
            [r.num_frames, r.height, r.width],
            progress,
        )
    }
}

/// [`WanPipeline::vace_context_frames`] from the clip's frames and the frame step (pure, for
/// planning without a model).
pub fn vace_context_frames(num_frames: usize, frame_step: usize) -> usize {
    let step = frame_step.max(1);
    let latent = num_frames.saturating_sub(1) / step; // latent frames after the first
    (latent / 4) * step + 1
}

/// Mask frames as `[1, 1, F, H, W]`, `value / 255`.
pub fn masks_to_tensor(masks: &[GrayImage], device: &Device) -> Result<Tensor> {
    let first = masks
        .first()
        .ok_or_else(|| Error::InvalidRequest("the mask has no frames".into()))?;
    let (w, h) = (first.width, first.height);
    let mut data = Vec::with_capacity(masks.len() * w * h);
    for m in masks {
        if m.width != w || m.height != h || m.data.len() != w * h {
            return Err(Error::InvalidRequest(
                "the mask's frames differ in size".into(),
            ));
        }
        data.extend(m.data.iter().map(|&v| v as f32 / 255.0));
    }
    Ok(Tensor::from_vec(data, (1, 1, masks.len(), h, w), device)?)
}

/// Diffusers' `VaeImageProcessor.apply_overlay` for a video: each output frame becomes
/// `output·m + source·(1 − m)` with `m` = the frame's mask / 255 (binary masks: the source's
/// pixels exactly where the mask keeps them). `frames` are RGB bytes of the masks' size.
pub fn apply_overlay(
    frames: &mut [Vec<u8>],
    source: &[RgbImage],
    mask: &[GrayImage],
) -> Result<()> {
    if source.len() < frames.len() || mask.len() < frames.len() {
        return Err(Error::InvalidRequest(format!(
            "cannot put back the source outside the mask: {} output frames, {} source frames, {} \
             mask frames",
            frames.len(),
            source.len(),
            mask.len()
        )));
    }
    for ((out, src), m) in frames.iter_mut().zip(source).zip(mask) {
        if out.len() != src.data.len() || m.data.len() * 3 != out.len() {
            return Err(Error::InvalidRequest(
                "cannot put back the source outside the mask: the output, source and mask \
                 differ in size"
                    .into(),
            ));
        }
        for ((o, s), &a) in out
            .chunks_exact_mut(3)
            .zip(src.data.chunks_exact(3))
            .zip(&m.data)
        {
            match a {
                255 => {}
                0 => o.copy_from_slice(s),
                a => {
                    let a = f32::from(a) / 255.0;
                    for c in 0..3 {
                        o[c] = (f32::from(o[c]) * a + f32::from(s[c]) * (1.0 - a)).round() as u8;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `prepare_masks` for one video: `[1, 1, F, H, W]` → `[s², T, H/s, W/s]`: the pixel at
/// `(y·s + i, x·s + j)` goes to channel `i·s + j`; frames resized to `t` with PyTorch's
/// `nearest-exact` (source frame `min(floor((k + 0.5) · F / t), F − 1)`, the scale in f32).
fn mask_to_channels(mask: &Tensor, s: usize, patch: usize, t: usize) -> Result<Tensor> {
    let (_, _, f, hh, ww) = mask.dims5()?;
    let nh = hh / (s * patch) * patch;
    let nw = ww / (s * patch) * patch;
    if nh * s != hh || nw * s != ww {
        return Err(Error::InvalidRequest(format!(
            "a VACE mask of {ww}×{hh} does not split into {s}×{s} blocks on a {patch}-patch grid; \
             use a size that is a multiple of {}",
            s * patch
        )));
    }
    let m = mask
        .squeeze(0)?
        .squeeze(0)?
        .reshape((f, nh, s, nw, s))?
        .permute((2, 4, 0, 1, 3))?
        .reshape((s * s, f, nh, nw))?;
    let scale = f as f32 / t as f32;
    let index: Vec<u32> = (0..t)
        .map(|k| (((k as f32 + 0.5) * scale).floor() as usize).min(f - 1) as u32)
        .collect();
    let index = Tensor::from_vec(index, t, mask.device())?;
    Ok(m.contiguous()?.index_select(&index, 1)?)
}

/// `preprocess_conditions`' letterbox: `image` `[1, 3, h, w]` resized by
/// `min(H / h, W / w)` (sizes truncated to integers) with bilinear interpolation
/// (`align_corners=False`, no antialias), centred on a white canvas (ones) of `[1, 3, H, W]`.
pub fn letterbox_on_white(image: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (b, c, h, w) = image.dims4().map_err(|_| {
        Error::InvalidRequest(format!(
            "a reference image has shape {:?}; expected [1, 3, height, width]",
            image.dims()
        ))
    })?;
    if b != 1 || c != 3 || h == 0 || w == 0 {
        return Err(Error::InvalidRequest(format!(
            "a reference image has shape {:?}; expected [1, 3, height, width]",
            image.dims()
        )));
    }
    let scale = (height as f64 / h as f64).min(width as f64 / w as f64);
    let nh = ((h as f64 * scale) as usize).clamp(1, height);
    let nw = ((w as f64 * scale) as usize).clamp(1, width);
    let src: Vec<f32> = image.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // PyTorch's linear source index: scale·(dst + 0.5) − 0.5, clamped at 0 (scale in f32).
    let taps = |out: usize, inp: usize| -> Vec<(usize, usize, f32, f32)> {
        let sc = inp as f32 / out as f32;
        (0..out)
            .map(|d| {
                let x = (sc * (d as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (x as usize).min(inp - 1);
                let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
                let l1 = x - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ty = taps(nh, h);
    let tx = taps(nw, w);
    let (top, left) = ((height - nh) / 2, (width - nw) / 2);
    let mut out = vec![1f32; 3 * height * width];
    for ch in 0..3 {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                let v = wy0 * (wx0 * plane[y0 * w + x0] + wx1 * plane[y0 * w + x1])
                    + wy1 * (wx0 * plane[y1 * w + x0] + wx1 * plane[y1 * w + x1]);
                out[ch * height * width + (top + oy) * width + left + ox] = v;
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (1, 3, height, width),
        image.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wan::pipeline::{GenerateRequest, PipelineOptions};

    fn open(case: &str) -> WanPipeline {
        let dir = crate::testing::fixtures_dir().join(case).join("model");
        WanPipeline::open(&dir, PipelineOptions::for_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn apply_overlay_puts_the_source_back_where_the_mask_keeps_it() {
        let (w, h) = (4, 2);
        let source = vec![image(w, h, 1), image(w, h, 2)];
        let made: Vec<Vec<u8>> = vec![image(w, h, 7).data, image(w, h, 8).data];
        // Frame 0: the left half regenerated; frame 1: one pixel half-way.
        let left: Vec<u8> = (0..w * h)
            .map(|p| if p % w < 2 { 255 } else { 0 })
            .collect();
        let mut half = vec![0u8; w * h];
        half[5] = 128;
        let mask = vec![
            GrayImage::new(w, h, left.clone()).unwrap(),
            GrayImage::new(w, h, half).unwrap(),
        ];
        let mut out = made.clone();
        apply_overlay(&mut out, &source, &mask).unwrap();
        for p in 0..w * h {
            let px = |v: &[u8]| v[p * 3..p * 3 + 3].to_vec();
            let want0 = if left[p] == 255 {
                px(&made[0])
            } else {
                px(&source[0].data)
            };
            assert_eq!(px(&out[0]), want0, "frame 0, pixel {p}");
            if p != 5 {
                assert_eq!(px(&out[1]), px(&source[1].data), "frame 1, pixel {p}");
            }
        }
        let a = 128.0 / 255.0;
        for c in 0..3 {
            let (m, s) = (made[1][15 + c] as f32, source[1].data[15 + c] as f32);
            assert_eq!(out[1][15 + c], (m * a + s * (1.0 - a)).round() as u8);
        }
        // Sizes that do not fit are refused, not cut.
        let mut short = made.clone();
        let err = apply_overlay(&mut short, &source[..1], &mask).unwrap_err();
        assert!(
            err.to_string().contains("2 output frames, 1 source frames"),
            "{err}"
        );
    }

    fn image(w: usize, h: usize, seed: u8) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| ((i * 37 + seed as usize * 101) % 251) as u8)
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    fn run(p: &mut WanPipeline, c: Conditioning, frames: usize) -> Result<Vec<Vec<u8>>> {
        let r = GenerateRequest {
            conditioning: c,
            prompt: "a red circle".into(),
            num_frames: Some(frames),
            num_inference_steps: Some(2),
            seed: Some(3),
            ..Default::default()
        };
        Ok(p.generate(&r, &mut crate::progress::ignore)?.frames)
    }

    /// A box mask: 255 inside `(x0..x1, y0..y1)`.
    fn box_mask(w: usize, h: usize, x0: usize, x1: usize, y0: usize, y1: usize) -> GrayImage {
        let mut m = GrayImage::filled(w, h, 0);
        for y in y0..y1 {
            for x in x0..x1 {
                m.data[y * w + x] = 255;
            }
        }
        m
    }

    #[test]
    fn every_conditioning_runs_on_a_vace_model() {
        let mut p = open("pipeline-vace");
        assert!(p.capabilities().vace);
        let (w, h, n) = (
            p.defaults().width,
            p.defaults().height,
            p.defaults().num_frames,
        );
        let video: Vec<RgbImage> = (0..n).map(|i| image(w, h, i as u8)).collect();
        let mask: Vec<GrayImage> = (0..n).map(|_| box_mask(w, h, 8, 24, 8, 24)).collect();
        let edit = |mask: Vec<GrayImage>, refs: Vec<RgbImage>| {
            Conditioning::Vace(VaceCondition {
                video: Some(video.clone()),
                mask: Some(mask),
                reference_images: refs,
                conditioning_scale: vec![],
                composite: false,
            })
        };
        let text = run(&mut p, Conditioning::Text, n).unwrap();
        assert_eq!(text.len(), n);
        let masked = run(&mut p, edit(mask.clone(), vec![]), n).unwrap();
        assert_eq!(masked.len(), n);
        assert_ne!(masked, text, "the video and mask steer the run");
        // Deterministic, and every input matters: the mask, references and their order, the
        // scale.
        assert_eq!(run(&mut p, edit(mask.clone(), vec![]), n).unwrap(), masked);
        let other_mask: Vec<GrayImage> = (0..n).map(|_| box_mask(w, h, 0, 16, 0, 32)).collect();
        assert_ne!(run(&mut p, edit(other_mask, vec![]), n).unwrap(), masked);
        let (a, b) = (image(20, 12, 7), image(12, 20, 9));
        let ab = run(&mut p, edit(mask.clone(), vec![a.clone(), b.clone()]), n).unwrap();
        assert_eq!(ab.len(), n, "reference frames are dropped before decoding");
        assert_ne!(ab, masked);
        let ba = run(&mut p, edit(mask.clone(), vec![b, a]), n).unwrap();
        assert_ne!(ab, ba, "the order of the references matters");
        let scaled = Conditioning::Vace(VaceCondition {
            video: Some(video.clone()),
            mask: Some(mask.clone()),
            conditioning_scale: vec![0.3, 1.5],
            ..Default::default()
        });
        assert_ne!(run(&mut p, scaled, n).unwrap(), masked);
        // Composited: the source exactly outside the mask, the same run inside it.
        let composited = Conditioning::Vace(VaceCondition {
            video: Some(video.clone()),
            mask: Some(mask.clone()),
            composite: true,
            ..Default::default()
        });
        let c = run(&mut p, composited, n).unwrap();
        for (t, (f, made)) in c.iter().zip(&masked).enumerate() {
            for px in 0..w * h {
                let want = if mask[t].data[px] == 255 {
                    made
                } else {
                    &video[t].data
                };
                assert_eq!(
                    f[px * 3..px * 3 + 3],
                    want[px * 3..px * 3 + 3],
                    "frame {t} px {px}"
                );
            }
        }
        // A first and a last image become kept frames of a gray video.
        let flf = Conditioning::Image {
            first: image(w, h, 1),
            last: Some(image(w, h, 2)),
        };
        assert_eq!(run(&mut p, flf, n).unwrap().len(), n);
        // A continuation keeps the model's context (5 of 17 frames) and outputs the rest.
        assert_eq!(p.vace_context_frames(17), 5);
        let cont = Conditioning::Continue {
            frames: video.clone(),
        };
        assert_eq!(run(&mut p, cont, 17).unwrap().len(), 12);
    }

    #[test]
    fn bad_vace_inputs_are_refused_in_plain_words() {
        let mut p = open("pipeline-vace");
        let (w, h, n) = (
            p.defaults().width,
            p.defaults().height,
            p.defaults().num_frames,
        );
        let video: Vec<RgbImage> = (0..n).map(|i| image(w, h, i as u8)).collect();
        let mask: Vec<GrayImage> = (0..n).map(|_| GrayImage::filled(w, h, 255)).collect();
        let vace = |v: VaceCondition| Conditioning::Vace(v);
        let cases = [
            (
                vace(VaceCondition {
                    mask: Some(mask.clone()),
                    ..Default::default()
                }),
                "a mask needs the video",
            ),
            (
                vace(VaceCondition {
                    video: Some(video[..n - 1].to_vec()),
                    ..Default::default()
                }),
                "frames but the run makes",
            ),
            (
                vace(VaceCondition {
                    video: Some(video.clone()),
                    mask: Some(mask[..2].to_vec()),
                    ..Default::default()
                }),
                "one mask frame per video frame",
            ),
            (
                vace(VaceCondition {
                    video: Some(video.clone()),
                    mask: Some(vec![GrayImage::filled(w / 2, h, 255); n]),
                    ..Default::default()
                }),
                "the mask must have the video's size",
            ),
            (
                vace(VaceCondition {
                    conditioning_scale: vec![1.0, 1.0, 1.0],
                    ..Default::default()
                }),
                "this model has 2 VACE layers",
            ),
            (
                Conditioning::Video {
                    frames: video.clone(),
                    strength: 0.5,
                },
                "through a mask",
            ),
        ];
        for (c, want) in cases {
            let e = run(&mut p, c, n).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        // A model without VACE names the ones that have it.
        let mut plain = open("pipeline-wan21");
        let frames = plain.defaults().num_frames;
        let e = run(
            &mut plain,
            vace(VaceCondition {
                reference_images: vec![image(8, 8, 0)],
                ..Default::default()
            }),
            frames,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("wan2.1-vace-1.3b"), "{e}");
    }

    #[test]
    fn mask_channels_follow_the_reference_layout() {
        // F = 9 frames of 16×16, value = frame·1000 + y·16 + x, s = 8, patch 2, T = 3.
        let (f, h, w) = (9usize, 16usize, 16usize);
        let data: Vec<f32> = (0..f * h * w)
            .map(|i| {
                let (k, y, x) = (i / (h * w), (i / w) % h, i % w);
                (k * 1000 + y * 16 + x) as f32
            })
            .collect();
        let m = Tensor::from_vec(data, (1, 1, f, h, w), &Device::Cpu).unwrap();
        let c = mask_to_channels(&m, 8, 2, 3).unwrap();
        assert_eq!(c.dims(), &[64, 3, 2, 2]);
        let flat: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
        let at = |ch: usize, t: usize, y: usize, x: usize| flat[((ch * 3 + t) * 2 + y) * 2 + x];
        // nearest-exact: latent frames 0, 1, 2 take pixel frames 1, 4, 7.
        for (t, src) in [(0, 1), (1, 4), (2, 7)] {
            // channel i·8 + j of block (y, x) is pixel (y·8 + i, x·8 + j).
            assert_eq!(
                at(3 * 8 + 5, t, 1, 0),
                (src * 1000 + (8 + 3) * 16 + 5) as f32
            );
            assert_eq!(at(0, t, 0, 1), (src * 1000 + 8) as f32);
        }
    }

    #[test]
    fn letterbox_keeps_the_aspect_on_white() {
        // A 2×4 black image into 8×8: scaled by 2 to 4×8, rows 2..6, white elsewhere.
        let img = Tensor::full(-1f32, (1, 3, 2, 4), &Device::Cpu).unwrap();
        let out = letterbox_on_white(&img, 8, 8).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        for y in 0..8 {
            let want = if (2..6).contains(&y) { -1.0 } else { 1.0 };
            assert_eq!(v[y * 8 + 3], want, "row {y}");
        }
    }
}
