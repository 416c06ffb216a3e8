//! Diffusion forcing for long videos: mirrors diffusers'
//! `SkyReelsV2DiffusionForcingPipeline` (`pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py`,
//! 0.42.1) and its image- and video-conditioned variants (`…_diffusion_forcing_i2v.py`,
//! `…_diffusion_forcing_v2v.py`, which share the loop; [`DfCondition`]): `generate_timestep_matrix` (every latent frame its own noise level, blocks of
//! `causal_block_size` frames lagging `ar_step` steps behind the previous block) and the
//! `__call__` loop over windows of `base_num_frames`, each later window starting from the last
//! `overlap_history` frames of what exists (as latents, not re-encoded pixels), every latent frame
//! stepped by its own copy of the scheduler.
//!
//! Copied where they surprise: the schedule's template is `[999] + timesteps + [0]` cast to
//! integers; a frame's scheduler finds its first index from the frame's timestep
//! (`index_for_timestep`); the prefix of a later window is cut to a multiple of the causal block
//! from its end, yet the window's first `overlap_history` latent frames are the ones dropped when
//! it is appended; each frame's result is assigned in place into the latents, of which UniPC kept
//! a view as its `last_sample`, so the next corrector reads the new sample (3.7% of the result on
//! the fixture); `addnoise_condition` noises the prefix frames (the reference draws that noise
//! without the generator; Kino draws it from the run's seed).
//!
//! The image-to-video variant differs in three places, copied: the first window starts from the
//! image's latent (one frame, not cut to the causal block); the timestep matrix is always built
//! for `base_num_frames` (the text pipeline uses the window's own length in long runs); and a
//! last image is appended as one more latent frame of the final window, held at timestep 0 and
//! never stepped, and left in the returned latents (the pipeline drops it before decoding). The
//! reference fails (index errors) when a long image-to-video run's last window is shorter than
//! `base_num_frames` and when a last image is given to a run of more than one window; Kino
//! refuses both with the frame counts that work ([`full_window_frames`]).

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::progress::{Progress, ProgressEvent, Stage};
use crate::schedulers::{index_for_timestep, Scheduler};
use crate::skyreels::transformer::SkyReelsV2Transformer3DModel;
use crate::{Error, Result};

/// `generate_timestep_matrix`'s result: for each iteration the timestep of every latent frame,
/// which frames are stepped, and the window `[start, end)` of frames the transformer sees.
#[derive(Debug, Clone, PartialEq)]
pub struct TimestepMatrix {
    pub step_matrix: Vec<Vec<f64>>,
    pub step_index: Vec<Vec<usize>>,
    pub update_mask: Vec<Vec<bool>>,
    pub valid_interval: Vec<(usize, usize)>,
}

/// `generate_timestep_matrix(num_latent_frames, step_template, base_num_latent_frames, ar_step,
/// num_pre_ready, causal_block_size)` (without `shrink_interval_with_mask`, which the pipeline
/// never sets).
pub fn generate_timestep_matrix(
    num_latent_frames: usize,
    step_template: &[f64],
    base_num_latent_frames: usize,
    ar_step: usize,
    num_pre_ready: usize,
    causal_block_size: usize,
) -> Result<TimestepMatrix> {
    if causal_block_size == 0 {
        return Err(Error::InvalidRequest(
            "causal_block_size must be at least 1".into(),
        ));
    }
    let num_iterations = step_template.len() + 1;
    let num_blocks = num_latent_frames / causal_block_size;
    let base_num_blocks = base_num_latent_frames / causal_block_size;
    if base_num_blocks == 0 || num_blocks == 0 {
        return Err(Error::InvalidRequest(format!(
            "{num_latent_frames} latent frames (window {base_num_latent_frames}) make no causal block of {causal_block_size} frames"
        )));
    }
    if base_num_blocks < num_blocks {
        let min_ar_step = step_template.len() as f64 / base_num_blocks as f64;
        if (ar_step as f64) < min_ar_step {
            return Err(Error::InvalidRequest(format!(
                "ar_step should be at least {} in this setting",
                min_ar_step.ceil()
            )));
        }
    }
    // [999] + step_template.long() + [0]
    let mut template = vec![999.0];
    template.extend(step_template.iter().map(|t| t.trunc()));
    template.push(0.0);

    let last = num_iterations as i64;
    let mut pre_row = vec![0i64; num_blocks];
    if num_pre_ready > 0 {
        let ready = (num_pre_ready / causal_block_size).min(num_blocks);
        pre_row[..ready].iter_mut().for_each(|v| *v = last);
    }
    let mut step_matrix = Vec::new();
    let mut step_index = Vec::new();
    let mut update_mask = Vec::new();
    while !pre_row.iter().all(|&v| v >= last - 1) {
        let mut new_row = vec![0i64; num_blocks];
        for i in 0..num_blocks {
            if i == 0 || pre_row[i - 1] >= last - 1 {
                new_row[i] = pre_row[i] + 1;
            } else {
                new_row[i] = new_row[i - 1] - ar_step as i64;
            }
        }
        new_row.iter_mut().for_each(|v| *v = (*v).clamp(0, last));
        update_mask.push(
            (0..num_blocks)
                .map(|i| new_row[i] != pre_row[i] && new_row[i] != last)
                .collect::<Vec<_>>(),
        );
        step_index.push(new_row.iter().map(|&v| v as usize).collect::<Vec<_>>());
        step_matrix.push(
            new_row
                .iter()
                .map(|&v| template[v as usize])
                .collect::<Vec<_>>(),
        );
        pre_row = new_row;
        if step_matrix.len() > 100_000 {
            return Err(Error::InvalidRequest(
                "the diffusion-forcing schedule does not finish; check ar_step".into(),
            ));
        }
    }
    let mut terminal = base_num_blocks;
    let mut valid_interval = Vec::with_capacity(update_mask.len());
    for mask in &update_mask {
        if terminal < num_blocks && mask[terminal] {
            terminal += 1;
        }
        valid_interval.push((terminal.saturating_sub(base_num_blocks), terminal));
    }
    let step_matrix = repeat_per_block(step_matrix, causal_block_size);
    let step_index = repeat_per_block(step_index, causal_block_size);
    let update_mask = repeat_per_block(update_mask, causal_block_size);
    let valid_interval = valid_interval
        .into_iter()
        .map(|(s, e)| (s * causal_block_size, e * causal_block_size))
        .collect();
    Ok(TimestepMatrix {
        step_matrix,
        step_index,
        update_mask,
        valid_interval,
    })
}

/// Each block's value for each of its `k` frames (`unsqueeze(-1).repeat(1, 1, k).flatten(1)`).
fn repeat_per_block<T: Clone>(rows: Vec<Vec<T>>, k: usize) -> Vec<Vec<T>> {
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .flat_map(|v| std::iter::repeat_n(v, k))
                .collect()
        })
        .collect()
}

/// The long-video arguments of `SkyReelsV2DiffusionForcingPipeline.__call__`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionForcingArgs {
    /// Pixel frames of the whole video (4k+1).
    pub num_frames: usize,
    /// Pixel frames of one window (the model's clip, 97 for 540P); longer videos go in windows.
    pub base_num_frames: usize,
    /// Pixel frames each later window takes from the end of what exists (`None`: one window).
    pub overlap_history: Option<usize>,
    /// Steps each causal block lags the previous one (0: all frames together).
    pub ar_step: usize,
    /// Frames per causal block (`None`: the transformer's `num_frame_per_block`).
    pub causal_block_size: Option<usize>,
    /// Noise level the prefix frames are given (0: none; the reference recommends 20).
    pub addnoise_condition: f64,
    /// The video's frame rate (the fps embedding is 0 for 16 fps, 1 otherwise).
    pub fps: u32,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// Seed of the `addnoise_condition` noise.
    pub seed: u64,
}

/// What the first window starts from.
#[derive(Debug, Clone, Copy, Default)]
pub enum DfCondition<'a> {
    /// Text alone (`SkyReelsV2DiffusionForcingPipeline`).
    #[default]
    Text,
    /// The normalised VAE latents of the last `overlap_history` frames of a video to continue
    /// (`SkyReelsV2DiffusionForcingVideoToVideoPipeline`).
    Video(&'a Tensor),
    /// The normalised latents `[B, z, 1, h, w]` of a first image and optionally a last one
    /// (`SkyReelsV2DiffusionForcingImageToVideoPipeline`).
    Image {
        first: &'a Tensor,
        last: Option<&'a Tensor>,
    },
}

/// The smallest frame count ≥ `args.num_frames` whose windows are all `base_num_frames` long
/// (what the image-to-video pipeline needs in a long run): `base + k · (base − overlap)` latent
/// frames.
pub fn full_window_frames(args: &DiffusionForcingArgs, temporal: usize) -> usize {
    let (_, base, overlap, is_long) = plan_windows(args, temporal, false);
    if !is_long {
        return args.num_frames;
    }
    let num_latent = (args.num_frames - 1) / temporal + 1;
    let k = (num_latent.saturating_sub(base)).div_ceil(base - overlap);
    (base + k * (base - overlap) - 1) * temporal + 1
}

/// The windows of a run: `(n_iter, base latent frames, overlap latent frames, windowed)`.
/// Continuing a video (`SkyReelsV2DiffusionForcingVideoToVideoPipeline`) is always windowed:
/// its first window starts from the video's last `overlap_history` frames.
pub fn plan_windows(
    args: &DiffusionForcingArgs,
    temporal: usize,
    continuing: bool,
) -> (usize, usize, usize, bool) {
    let num_latent = (args.num_frames - 1) / temporal + 1;
    let is_long =
        continuing || (args.overlap_history.is_some() && args.num_frames > args.base_num_frames);
    if !is_long {
        return (1, num_latent, 0, false);
    }
    let overlap = (args.overlap_history.unwrap_or(1).max(1) - 1) / temporal + 1;
    let base = (args.base_num_frames - 1) / temporal + 1;
    // 1 + (num_latent - base - 1) // (base - overlap) + 1, with Python's floor division.
    let num = num_latent as i64 - base as i64 - 1;
    let den = (base - overlap) as i64;
    let n_iter = (1 + num.div_euclid(den) + 1).max(1) as usize;
    (n_iter, base, overlap, true)
}

/// Checks the long-video arguments, with the fix in every message.
pub fn check_args(args: &DiffusionForcingArgs, temporal: usize) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    for (name, n) in [
        ("num_frames", args.num_frames),
        ("base_num_frames", args.base_num_frames),
    ] {
        if n == 0 || (n - 1) % temporal != 0 {
            return bad(format!(
                "{name} {n} is not {temporal}·k + 1; try {}",
                n.saturating_sub(1) / temporal * temporal + 1
            ));
        }
    }
    if let Some(o) = args.overlap_history {
        let overlap = (o.max(1) - 1) / temporal + 1;
        let base = (args.base_num_frames - 1) / temporal + 1;
        if o == 0 || overlap >= base {
            return bad(format!(
                "overlap_history {o} must be at least 1 and shorter than a window ({} frames); SkyReels recommends 17 or 37",
                args.base_num_frames
            ));
        }
    }
    if !args.addnoise_condition.is_finite() || args.addnoise_condition < 0.0 {
        return bad(format!(
            "addnoise_condition {} must be ≥ 0 (20 is recommended)",
            args.addnoise_condition
        ));
    }
    if args.num_inference_steps == 0 {
        return bad("at least one denoising step is needed".into());
    }
    Ok(())
}

/// Runs the windows of `__call__` (sections 5–7) on given per-window noise: `noise(k, frames)`
/// returns the initial latents `[B, z, frames, h, w]` of window k (the reference's k-th
/// `randn_tensor` draw). The first window starts from `condition` ([`DfCondition`]). Returns the
/// latents of the whole generated video (f32; when continuing, they begin with the prefix, and
/// with a last image they end with its latent frame, as the reference's).
#[allow(clippy::too_many_arguments)]
pub fn denoise_long(
    transformer: &mut SkyReelsV2Transformer3DModel,
    scheduler: &dyn Scheduler,
    args: &DiffusionForcingArgs,
    prompt_embeds: &Tensor,
    negative_prompt_embeds: Option<&Tensor>,
    temporal: usize,
    noise: &mut dyn FnMut(usize, usize) -> Result<Tensor>,
    condition: DfCondition<'_>,
    progress: Progress,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    check_args(args, temporal)?;
    let source_prefix = match condition {
        DfCondition::Video(v) => Some(v),
        _ => None,
    };
    let (image, last_image) = match condition {
        DfCondition::Image { first, last } => (Some(first), last),
        _ => (None, None),
    };
    if source_prefix.is_some() && args.overlap_history.is_none() {
        return Err(Error::InvalidRequest(
            "continuing a video needs overlap_history (how many of its last frames to continue from; 17 or 37)".into(),
        ));
    }
    let do_cfg = args.guidance_scale > 1.0;
    if do_cfg && negative_prompt_embeds.is_none() {
        return Err(Error::InvalidRequest(
            "guidance scale > 1 needs negative prompt embeddings".into(),
        ));
    }
    let timesteps = scheduler.timesteps().to_vec();
    let causal = match args.causal_block_size {
        Some(c) => {
            transformer.set_ar_attention(c);
            c
        }
        None => transformer.num_frame_per_block(),
    };
    let fps_index = if args.fps == 16 { 0 } else { 1 };
    let (n_iter, base_latent, overlap, is_long) =
        plan_windows(args, temporal, source_prefix.is_some());
    let num_latent = (args.num_frames - 1) / temporal + 1;
    if image.is_some() && is_long {
        if last_image.is_some() {
            return Err(Error::InvalidRequest(format!(
                "a last image works within one window only: {} frames need {n_iter} windows of \
                 {}; ask for at most {} frames, or leave out the last image",
                args.num_frames, args.base_num_frames, args.base_num_frames
            )));
        }
        let full = full_window_frames(args, temporal);
        if full != args.num_frames {
            return Err(Error::InvalidRequest(format!(
                "starting from an image, a long video's windows must all be {} frames long \
                 (the reference fails on a shorter last window): ask for {full} frames instead \
                 of {}",
                args.base_num_frames, args.num_frames
            )));
        }
    }
    let pe = prompt_embeds.to_device(device)?.to_dtype(dtype)?;
    let ne = match negative_prompt_embeds {
        Some(n) if do_cfg => Some(n.to_device(device)?.to_dtype(dtype)?),
        _ => None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5eed_add0);
    let mut accumulated: Option<Tensor> = None;
    for iter in 0..n_iter {
        // prepare_latents
        let previous = match (&accumulated, source_prefix) {
            (Some(acc), _) => Some(acc.clone()),
            (None, Some(src)) => Some(src.to_device(device)?.to_dtype(DType::F32)?),
            (None, None) => None,
        };
        let (frames, prefix) = match &previous {
            None => (
                if is_long { base_latent } else { num_latent },
                // The image-to-video pipeline's first window starts from the image's latent.
                image
                    .map(|i| i.to_device(device)?.to_dtype(DType::F32))
                    .transpose()?,
            ),
            Some(acc) => {
                let total = acc.dim(2)?;
                let take = if accumulated.is_some() {
                    overlap.min(total)
                } else {
                    total
                };
                let mut prefix = acc.narrow(2, total - take, take)?;
                let cut = prefix.dim(2)? % causal;
                if cut != 0 {
                    prefix = prefix.narrow(2, 0, prefix.dim(2)? - cut)?;
                }
                let finished = iter * (base_latent - overlap) + overlap;
                let left = num_latent.saturating_sub(finished);
                let frames = (left + overlap).min(base_latent);
                if frames <= prefix.dim(2)? {
                    return Err(Error::InvalidRequest(format!(
                        "window {iter} would have {frames} latent frames, no more than the {} it continues from; ask for more frames",
                        prefix.dim(2)?
                    )));
                }
                (frames, Some(prefix))
            }
        };
        let mut latents: Vec<Tensor> = {
            let n = noise(iter, frames)?
                .to_device(device)?
                .to_dtype(DType::F32)?;
            if n.dim(2)? != frames {
                return Err(Error::InvalidRequest(format!(
                    "the noise of window {iter} has {} latent frames; it needs {frames}",
                    n.dim(2)?
                )));
            }
            (0..frames)
                .map(|f| n.narrow(2, f, 1))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let prefix_frames = prefix.as_ref().map(|p| p.dim(2)).transpose()?.unwrap_or(0);
        if let Some(p) = &prefix {
            for (f, slot) in latents.iter_mut().enumerate().take(prefix_frames) {
                *slot = p.narrow(2, f, 1)?.to_dtype(DType::F32)?;
            }
        }
        // The last image: one more latent frame at the end of the final window (only one
        // window is allowed above, whose prefix is the first image's one frame).
        let end_frames = match last_image {
            Some(l) if iter + 1 == n_iter => {
                for f in 0..l.dim(2)? {
                    latents.push(l.narrow(2, f, 1)?.to_device(device)?.to_dtype(DType::F32)?);
                }
                prefix_frames
            }
            _ => 0,
        };
        let frames = frames + end_frames;
        // Every frame steps its own copy of the scheduler (`deepcopy` after `set_timesteps`).
        let mut schedulers: Vec<Box<dyn Scheduler>> =
            (0..frames).map(|_| scheduler.boxed_clone()).collect();
        let mut next_index: Vec<Option<usize>> = vec![None; frames];
        let mut m = generate_timestep_matrix(
            frames,
            &timesteps,
            // The text pipeline builds a long run's matrix for the window, the image pipeline
            // always for base_num_frames (+ the last image's frames).
            if is_long && image.is_none() {
                frames
            } else {
                base_latent + end_frames
            },
            args.ar_step,
            prefix_frames,
            causal,
        )?;
        if end_frames > 0 {
            // `step_matrix[:, -prefix:] = 0; step_update_mask[:, -prefix:] = False`
            for (row, mask) in m.step_matrix.iter_mut().zip(m.update_mask.iter_mut()) {
                let n = row.len();
                row[n - end_frames..].iter_mut().for_each(|t| *t = 0.0);
                mask[n - end_frames..].iter_mut().for_each(|u| *u = false);
            }
        }
        let t0 = std::time::Instant::now();
        let total = m.step_matrix.len();
        progress(&ProgressEvent {
            stage: Stage::Denoise,
            step: 0,
            total,
            elapsed: t0.elapsed(),
        })?;
        for (i, row) in m.step_matrix.iter().enumerate() {
            let (s, e) = m.valid_interval[i];
            let mut input: Vec<Tensor> = latents[s..e].to_vec();
            let mut ts: Vec<f32> = row[s..e].iter().map(|&t| t as f32).collect();
            if args.addnoise_condition > 0.0 && s < prefix_frames {
                let nf = 0.001 * args.addnoise_condition;
                for f in s..prefix_frames {
                    let x = &input[f - s];
                    let n: Vec<f32> = (0..x.elem_count())
                        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                        .collect();
                    let n = Tensor::from_vec(n, x.dims(), device)?;
                    input[f - s] = ((x * (1.0 - nf))? + (n * nf)?)?;
                    ts[f - s] = args.addnoise_condition as f32;
                }
            }
            let x = Tensor::cat(&input, 2)?.to_dtype(dtype)?;
            let b = x.dim(0)?;
            let tt = Tensor::from_vec(ts.clone(), (1, e - s), device)?.repeat((b, 1))?;
            let cond = transformer.forward(&x, &tt, &pe, None, true, Some(fps_index))?;
            let noise_pred = match &ne {
                Some(n) => {
                    let uncond = transformer.forward(&x, &tt, n, None, true, Some(fps_index))?;
                    (&uncond + ((cond - &uncond)? * args.guidance_scale)?)?
                }
                None => cond,
            };
            for idx in s..e {
                if !m.update_mask[i][idx] {
                    continue;
                }
                let t = row[idx];
                let sched = &mut schedulers[idx];
                let index = match next_index[idx] {
                    Some(k) => k,
                    None => {
                        let k = index_for_timestep(sched.timesteps(), t);
                        sched.set_begin_index(k)?;
                        k
                    }
                };
                let out = noise_pred.narrow(2, idx - s, 1)?;
                latents[idx] = sched.step(&out, index, &latents[idx])?;
                // `latents[:, :, idx] = …` writes into the view UniPC kept.
                sched.sample_overwritten(&latents[idx]);
                next_index[idx] = Some(index + 1);
            }
            progress(&ProgressEvent {
                stage: Stage::Denoise,
                step: i + 1,
                total,
                elapsed: t0.elapsed(),
            })?;
        }
        let window = Tensor::cat(&latents, 2)?;
        accumulated = Some(match accumulated {
            None => window,
            Some(acc) => {
                let keep = window.dim(2)?.saturating_sub(overlap);
                Tensor::cat(
                    &[&acc, &window.narrow(2, overlap.min(window.dim(2)?), keep)?],
                    2,
                )?
            }
        });
    }
    accumulated.ok_or_else(|| Error::InvalidRequest("no window was generated".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synchronous_schedule_steps_every_frame_together() {
        let m = generate_timestep_matrix(3, &[999.0, 750.0, 500.0], 3, 0, 0, 1).unwrap();
        assert_eq!(
            m.step_matrix,
            vec![vec![999.0; 3], vec![750.0; 3], vec![500.0; 3]]
        );
        assert!(m.update_mask.iter().all(|r| r.iter().all(|&u| u)));
        assert!(m.valid_interval.iter().all(|&v| v == (0, 3)));
    }

    #[test]
    fn asynchronous_blocks_lag_by_ar_step() {
        // 2 blocks of 2 frames, ar_step 1: block 1 starts one iteration after block 0.
        let m = generate_timestep_matrix(4, &[900.0, 600.0], 4, 1, 0, 2).unwrap();
        assert_eq!(m.step_matrix[0], vec![900.0, 900.0, 999.0, 999.0]);
        assert_eq!(m.update_mask[0], vec![true, true, false, false]);
        assert_eq!(m.step_matrix[1], vec![600.0, 600.0, 900.0, 900.0]);
        // Block 0 is done (template end, 0) while block 1 takes its last step.
        assert_eq!(m.step_matrix.last().unwrap(), &vec![0.0, 0.0, 600.0, 600.0]);
        assert_eq!(
            m.update_mask.last().unwrap(),
            &vec![false, false, true, true]
        );
        // Prefix frames start finished and are never stepped.
        let m = generate_timestep_matrix(4, &[900.0, 600.0], 4, 0, 2, 2).unwrap();
        assert!(m.update_mask.iter().all(|r| !r[0] && !r[1]));
        // A window smaller than the video needs a large enough ar_step.
        let e = generate_timestep_matrix(8, &[900.0, 600.0, 300.0], 4, 0, 0, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ar_step should be at least 2"), "{e}");
    }

    #[test]
    fn windows_are_planned_as_the_reference() {
        let args = DiffusionForcingArgs {
            num_frames: 257,
            base_num_frames: 97,
            overlap_history: Some(17),
            ar_step: 0,
            causal_block_size: None,
            addnoise_condition: 0.0,
            fps: 24,
            num_inference_steps: 30,
            guidance_scale: 6.0,
            seed: 0,
        };
        // 65 latent frames, windows of 25 with 5 overlapping: 25 + 20 + 20 = 65.
        assert_eq!(plan_windows(&args, 4, false), (3, 25, 5, true));
        let short = DiffusionForcingArgs {
            num_frames: 97,
            ..args.clone()
        };
        assert_eq!(plan_windows(&short, 4, false), (1, 25, 0, false));
        // Continuing a video is windowed even when it fits one window.
        assert_eq!(plan_windows(&short, 4, true), (1, 25, 5, true));
        let e = check_args(
            &DiffusionForcingArgs {
                overlap_history: Some(97),
                ..args.clone()
            },
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shorter than a window"), "{e}");
    }
}
