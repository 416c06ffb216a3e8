//! `kino parity`: runs one component on tensors from a safetensors file, exactly as
//! `DESIGN.md` § Faithfulness specifies, so anyone can compare any component with the reference.
//!
//! | component | model folder | inputs | outputs |
//! |---|---|---|---|
//! | `text-encoder` | `text_encoder/` | `input_ids`, `attention_mask` | `last_hidden_state` |
//! | `transformer` | `transformer/` | `hidden_states`, `timestep`, `encoder_hidden_states` | `sample` |
//! | `vae-encode` | `vae/` | `sample` | `mean`, `logvar` |
//! | `vae-decode` | `vae/` | `z` | `sample` |
//! | `pipeline` | whole model (one or two experts) | `latents`, `prompt_embeds`, `negative_prompt_embeds` | `latents` |
//! | `pipeline-i2v` | whole image-to-video model | as `pipeline` + `image`, optional `last_image`, `image_embeds` | `latents` |
//! | `pipeline-v2v` | whole model | `video`, `noise`, `prompt_embeds`, `negative_prompt_embeds`; `--strength` | `latents` |
//! | `image-encoder` | `image_encoder/` (CLIP vision) | `pixel_values` | `image_embeds` (penultimate hidden states) |
//!
//! | `pipeline-df` | a SkyReels-V2 diffusion-forcing model | `latents_0`, `latents_1`, … (each window's noise, in the order the reference draws them), `prompt_embeds`, `negative_prompt_embeds`; optional `video` (continue it) or `image` + optional `last_image` (image-to-video); long-video flags | `latents` (the whole video; with `last_image` ending with its latent frame, as the reference returns them) |
//!
//! `transformer` also takes `encoder_hidden_states_image` (Wan2.1 I2V's CLIP tokens), for a
//! `SkyReelsV2Transformer3DModel` folder `enable_diffusion_forcing` (any nonzero value) and `fps`
//! (the index into `fps_embedding`, as the pipeline passes it), and for a
//! `WanVACETransformer3DModel` folder `control_hidden_states` (required) and
//! `control_hidden_states_scale` (one value per VACE layer; default ones).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::progress::{ProgressEvent, Stage};

use crate::clip::CLIPVisionModel;
use crate::skyreels::diffusion_forcing::{self, DiffusionForcingArgs};
use crate::skyreels::transformer::SkyReelsV2Transformer3DModel;
use crate::umt5::UMT5EncoderModel;
use crate::wan::pipeline::{DenoiseInputs, LatentCondition, PipelineOptions, WanPipeline};
use crate::wan::transformer::WanTransformer3DModel;
use crate::wan::transformer_vace::WanVACETransformer3DModel;
use crate::wan::vae::AutoencoderKLWan;
use crate::{Error, Result};

/// A component `kino parity` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    Transformer,
    VaeEncode,
    VaeDecode,
    Pipeline,
    PipelineI2v,
    PipelineV2v,
    ImageEncoder,
    PipelineDf,
    PipelineVace,
}

impl Component {
    pub const ALL: [Component; 10] = [
        Component::TextEncoder,
        Component::Transformer,
        Component::VaeEncode,
        Component::VaeDecode,
        Component::Pipeline,
        Component::PipelineI2v,
        Component::PipelineV2v,
        Component::ImageEncoder,
        Component::PipelineDf,
        Component::PipelineVace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text-encoder",
            Component::Transformer => "transformer",
            Component::VaeEncode => "vae-encode",
            Component::VaeDecode => "vae-decode",
            Component::Pipeline => "pipeline",
            Component::PipelineI2v => "pipeline-i2v",
            Component::PipelineV2v => "pipeline-v2v",
            Component::ImageEncoder => "image-encoder",
            Component::PipelineDf => "pipeline-df",
            Component::PipelineVace => "pipeline-vace",
        }
    }

    /// Whether the component runs the denoising loop (takes `--steps`, `--guidance`).
    pub fn is_pipeline(self) -> bool {
        matches!(
            self,
            Component::Pipeline
                | Component::PipelineI2v
                | Component::PipelineV2v
                | Component::PipelineDf
                | Component::PipelineVace
        )
    }

    /// Input tensor names, in the DESIGN.md order.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Component::TextEncoder => &["input_ids", "attention_mask"],
            Component::Transformer => &["hidden_states", "timestep", "encoder_hidden_states"],
            Component::VaeEncode => &["sample"],
            Component::VaeDecode => &["z"],
            Component::Pipeline => &["latents", "prompt_embeds", "negative_prompt_embeds"],
            Component::PipelineI2v => &[
                "latents",
                "prompt_embeds",
                "negative_prompt_embeds",
                "image",
                "last_image (optional)",
                "image_embeds (when the transformer has image_dim)",
            ],
            Component::PipelineV2v => {
                &["video", "noise", "prompt_embeds", "negative_prompt_embeds"]
            }
            Component::ImageEncoder => &["pixel_values"],
            Component::PipelineDf => &[
                "latents_0",
                "latents_1 … (one per window)",
                "prompt_embeds",
                "negative_prompt_embeds",
                "video (optional: a video to continue, [1,3,F,H,W] in [-1,1])",
            ],
            Component::PipelineVace => &[
                "latents ([1, z, R + T, h, w]: R reference frames first)",
                "prompt_embeds",
                "negative_prompt_embeds",
                "video (optional, [1,3,F,H,W] in [-1,1])",
                "mask (optional, [1,1,F,H,W] in [0,1], 1 = generate)",
                "reference_images (optional, [R,3,H,W] in [-1,1], any size)",
            ],
        }
    }
}

impl FromStr for Component {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown component `{s}`; choose one of: {}",
                    Component::ALL.map(|c| c.name()).join(", ")
                ))
            })
    }
}

/// Options of a parity run.
#[derive(Debug, Clone, Default)]
pub struct ParityOptions {
    /// Denoising steps (pipeline only; default 3).
    pub steps: Option<usize>,
    /// Guidance scale (pipeline only; default 5.0).
    pub guidance: Option<f64>,
    /// Compute dtype (default f32, the parity contract). With bf16 the transformer and text
    /// encoder run in bf16; the VAE stays in f32 (as diffusers' Wan examples load it).
    pub dtype: Option<DType>,
    /// Pipeline only: also decode the final latents with the VAE (output `video`, f32 in [-1, 1]).
    pub decode: bool,
    /// `pipeline-v2v` only: the share of the schedule run, in (0, 1] (default 0.8, the
    /// reference's).
    pub strength: Option<f64>,
    /// `pipeline-df` only: the long-video arguments.
    pub df: Option<DfOptions>,
    /// `pipeline-vace` only: `conditioning_scale`, one value for every VACE layer or one per
    /// layer (default 1.0).
    pub conditioning_scale: Option<Vec<f64>>,
    /// Two-expert pipelines: the low-noise expert's guidance (`guidance_scale_2`; default the
    /// guidance).
    pub guidance_2: Option<f64>,
    /// Pipeline components: LoRA adapters for `transformer` and `transformer_2`, applied on the
    /// fly or fused at load.
    pub lora: Vec<crate::lora::LoraSpec>,
    pub lora_2: Vec<crate::lora::LoraSpec>,
    pub fuse_lora: bool,
    /// `pipeline`, `pipeline-i2v`, `pipeline-v2v`: a step cache (`crate::hooks`), MagCache's
    /// ratios included.
    pub cache: Option<crate::hooks::CacheConfig>,
}

/// `pipeline-df`'s long-video arguments; `None` takes the reference's defaults
/// (`num_frames` from `latents_0` when there is one window, `base_num_frames` 97, no overlap,
/// `ar_step` 0, the transformer's causal block, no added noise, 24 fps).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct DfOptions {
    pub num_frames: Option<usize>,
    pub base_num_frames: Option<usize>,
    pub overlap_history: Option<usize>,
    pub ar_step: Option<usize>,
    pub causal_block_size: Option<usize>,
    pub addnoise_condition: Option<f64>,
    pub fps: Option<u32>,
}

/// Wall-clock timings of a parity run, each measured after the device finished its work
/// (the device is synchronized at every boundary, so GPU times are real, not launch times).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Loading the weights of the component (pipeline: the transformer).
    pub load_s: f64,
    /// Each denoising step (pipeline only).
    pub step_s: Vec<f64>,
    /// Loading the VAE (pipeline with `decode`).
    pub vae_load_s: Option<f64>,
    /// The VAE decode (pipeline with `decode`), from its first frame to its last.
    pub decode_s: Option<f64>,
    /// The whole run.
    pub total_s: f64,
}

fn take<'a>(
    inputs: &'a HashMap<String, Tensor>,
    component: Component,
    name: &str,
) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| {
        Error::InvalidRequest(format!(
            "the input file has no tensor `{name}`; `{}` needs: {}",
            component.name(),
            component.inputs().join(", ")
        ))
    })
}

/// Runs `component` from the folder `model` on `inputs`, in `options.dtype` (default f32) on
/// `device`.
pub fn run(
    component: Component,
    model: &Path,
    inputs: &HashMap<String, Tensor>,
    options: ParityOptions,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    run_timed(component, model, inputs, options, device).map(|(out, _)| out)
}

/// [`run`], also returning [`Timings`].
pub fn run_timed(
    component: Component,
    model: &Path,
    inputs: &HashMap<String, Tensor>,
    options: ParityOptions,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, Timings)> {
    run_report(component, model, inputs, options, device).map(|(out, t, _)| (out, t))
}

/// [`run_timed`], also returning the step cache's report (forwards run and skipped; a
/// `mag:calibrate` run's ratios) when `options.cache` is set.
pub fn run_report(
    component: Component,
    model: &Path,
    inputs: &HashMap<String, Tensor>,
    options: ParityOptions,
    device: &Device,
) -> Result<(
    HashMap<String, Tensor>,
    Timings,
    Option<crate::hooks::CacheReport>,
)> {
    if let Some(cache) = &options.cache {
        if !matches!(
            component,
            Component::Pipeline | Component::PipelineI2v | Component::PipelineV2v
        ) {
            return Err(Error::InvalidRequest(format!(
                "step caches (--cache {}) apply to `pipeline`, `pipeline-i2v` and `pipeline-v2v`; \
                 the reference hooks VACE and diffusion-forcing models differently",
                cache.name()
            )));
        }
    }
    let mut report = None;
    if options.decode && !component.is_pipeline() {
        return Err(Error::InvalidRequest(
            "decode applies only to the pipeline components".into(),
        ));
    }
    if options.df.is_some() && component != Component::PipelineDf {
        return Err(Error::InvalidRequest(
            "the long-video arguments apply only to `pipeline-df`".into(),
        ));
    }
    let has_lora = !(options.lora.is_empty() && options.lora_2.is_empty());
    if has_lora && !component.is_pipeline() {
        return Err(Error::InvalidRequest(
            "LoRA adapters apply to the pipeline components".into(),
        ));
    }
    if options.conditioning_scale.is_some() && component != Component::PipelineVace {
        return Err(Error::InvalidRequest(
            "the conditioning scale applies only to `pipeline-vace`".into(),
        ));
    }
    if options.strength.is_some() && component != Component::PipelineV2v {
        return Err(Error::InvalidRequest(
            "strength applies only to `pipeline-v2v`".into(),
        ));
    }
    let dtype = options.dtype.unwrap_or(DType::F32);
    let t_start = Instant::now();
    let mut timings = Timings::default();
    let mut out = HashMap::new();
    match component {
        Component::TextEncoder => {
            let ids = take(inputs, component, "input_ids")?;
            let mask = take(inputs, component, "attention_mask")?;
            let m = UMT5EncoderModel::load(model, dtype, device)?;
            let h = m.forward(&ids.to_device(device)?, &mask.to_device(device)?)?;
            out.insert("last_hidden_state".to_string(), h.to_dtype(DType::F32)?);
        }
        Component::Transformer => {
            let x = take(inputs, component, "hidden_states")?.to_device(device)?;
            let t = take(inputs, component, "timestep")?.to_device(device)?;
            let ctx = take(inputs, component, "encoder_hidden_states")?.to_device(device)?;
            let img = inputs
                .get("encoder_hidden_states_image")
                .map(|t| t.to_device(device)?.to_dtype(dtype))
                .transpose()?;
            let class: serde_json::Value = crate::loading::read_json(&model.join("config.json"))?;
            let class_name = class.get("_class_name").and_then(|c| c.as_str());
            let skyreels = class_name == Some(crate::skyreels::transformer::CLASS_NAME);
            let vace = class_name == Some(crate::wan::transformer_vace::CLASS_NAME);
            let y = if vace {
                let m = WanVACETransformer3DModel::load(model, dtype, device)?;
                let control = take(inputs, component, "control_hidden_states")?;
                let scale = inputs
                    .get("control_hidden_states_scale")
                    .map(|t| -> Result<Vec<f64>> {
                        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
                    })
                    .transpose()?;
                m.forward(
                    &x.to_dtype(dtype)?,
                    &t.to_dtype(DType::F32)?,
                    &ctx.to_dtype(dtype)?,
                    img.as_ref(),
                    &control.to_device(device)?.to_dtype(dtype)?,
                    scale.as_deref(),
                )?
            } else if skyreels {
                let m = SkyReelsV2Transformer3DModel::load(model, dtype, device)?;
                let flag = |name: &str| -> Result<Option<i64>> {
                    inputs
                        .get(name)
                        .map(|t| -> Result<i64> {
                            let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                            Ok(v.first().copied().unwrap_or(0.0) as i64)
                        })
                        .transpose()
                };
                let df = flag("enable_diffusion_forcing")?.unwrap_or(0) != 0;
                let fps = flag("fps")?.map(|v| v.max(0) as usize);
                m.forward(
                    &x.to_dtype(dtype)?,
                    &t.to_dtype(DType::F32)?,
                    &ctx.to_dtype(dtype)?,
                    img.as_ref(),
                    df,
                    fps,
                )?
            } else {
                let m = WanTransformer3DModel::load(model, dtype, device)?;
                m.forward_with_image(
                    &x.to_dtype(dtype)?,
                    &t.to_dtype(DType::F32)?,
                    &ctx.to_dtype(dtype)?,
                    img.as_ref(),
                )?
            };
            out.insert("sample".to_string(), y.to_dtype(DType::F32)?);
        }
        Component::VaeEncode => {
            let x = take(inputs, component, "sample")?.to_device(device)?;
            let m = AutoencoderKLWan::load(model, dtype, device)?;
            let (mean, logvar) = m.encode(&x.to_dtype(dtype)?)?;
            out.insert("mean".to_string(), mean.to_dtype(DType::F32)?);
            out.insert("logvar".to_string(), logvar.to_dtype(DType::F32)?);
        }
        Component::VaeDecode => {
            let z = take(inputs, component, "z")?.to_device(device)?;
            let m = AutoencoderKLWan::load(model, dtype, device)?;
            let y = m.decode(&z.to_dtype(dtype)?)?;
            out.insert("sample".to_string(), y.to_dtype(DType::F32)?);
        }
        Component::ImageEncoder => {
            let px = take(inputs, component, "pixel_values")?.to_device(device)?;
            let m = CLIPVisionModel::load(model, dtype, device)?;
            let y = m.penultimate_hidden_states(&px.to_dtype(dtype)?)?;
            out.insert("image_embeds".to_string(), y.to_dtype(DType::F32)?);
        }
        Component::PipelineDf => {
            let pe = take(inputs, component, "prompt_embeds")?;
            let guidance = options.guidance.unwrap_or(5.0);
            let ne = if guidance > 1.0 {
                Some(take(inputs, component, "negative_prompt_embeds")?)
            } else {
                inputs.get("negative_prompt_embeds")
            };
            let steps = options.steps.unwrap_or(3);
            let l0 = take(inputs, component, "latents_0")?;
            let d = options.df.unwrap_or_default();
            let mut scheduler = crate::schedulers::from_folder(&model.join("scheduler"))?;
            scheduler.set_timesteps(steps)?;
            let mut opts = PipelineOptions::for_device(device.clone());
            opts.dtype = dtype;
            opts.vae_dtype = DType::F32;
            let mut p = WanPipeline::open(model, opts)?;
            let temporal = p.frame_step();
            let args = DiffusionForcingArgs {
                num_frames: d.num_frames.unwrap_or((l0.dim(2)? - 1) * temporal + 1),
                base_num_frames: d.base_num_frames.unwrap_or(97),
                overlap_history: d.overlap_history,
                ar_step: d.ar_step.unwrap_or(0),
                causal_block_size: d.causal_block_size,
                addnoise_condition: d.addnoise_condition.unwrap_or(0.0),
                fps: d.fps.unwrap_or(24),
                num_inference_steps: steps,
                guidance_scale: guidance,
                seed: 0,
            };
            // Image-to-video: `image` (and `last_image`) `[1, 3, H, W]` in [-1, 1], each encoded
            // alone as one latent frame.
            let mut encode_image = |name: &str| -> Result<Option<Tensor>> {
                inputs
                    .get(name)
                    .map(|x| p.encode_latents(&x.unsqueeze(2)?, &mut crate::progress::ignore))
                    .transpose()
            };
            let image = encode_image("image")?;
            let last_image = encode_image("last_image")?;
            if last_image.is_some() && image.is_none() {
                return Err(Error::InvalidRequest(
                    "`last_image` needs `image` too".into(),
                ));
            }
            // Video-to-video (continuing `video`): its last overlap_history frames, encoded.
            let prefix = match inputs.get("video") {
                Some(video) => {
                    let o = args.overlap_history.ok_or_else(|| {
                        Error::InvalidRequest("continuing `video` needs --overlap-history".into())
                    })?;
                    let f = video.dim(2)?;
                    let tail = video.narrow(2, f - o.min(f), o.min(f))?;
                    Some(p.encode_latents(&tail, &mut crate::progress::ignore)?)
                }
                None => None,
            };
            let t_load = Instant::now();
            let mut m =
                SkyReelsV2Transformer3DModel::load(&model.join("transformer"), dtype, device)?;
            timings.load_s = t_load.elapsed().as_secs_f64();
            let mut noise = |k: usize, frames: usize| -> Result<Tensor> {
                let name = format!("latents_{k}");
                let t = inputs.get(&name).ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "the input file has no tensor `{name}`: window {k} needs its noise \
                         ([B, z, {frames}, h, w], the reference's draw for that window)"
                    ))
                })?;
                Ok(t.clone())
            };
            let y = diffusion_forcing::denoise_long(
                &mut m,
                scheduler.as_ref(),
                &args,
                pe,
                ne,
                temporal,
                &mut noise,
                match (&prefix, &image) {
                    (Some(v), None) => diffusion_forcing::DfCondition::Video(v),
                    (None, Some(first)) => diffusion_forcing::DfCondition::Image {
                        first,
                        last: last_image.as_ref(),
                    },
                    (None, None) => diffusion_forcing::DfCondition::Text,
                    (Some(_), Some(_)) => {
                        return Err(Error::InvalidRequest(
                            "give `video` (continue) or `image` (image-to-video), not both".into(),
                        ))
                    }
                },
                &mut crate::progress::ignore,
                device,
                dtype,
            )?;
            out.insert("latents".to_string(), y.to_dtype(DType::F32)?);
        }
        Component::Pipeline
        | Component::PipelineI2v
        | Component::PipelineV2v
        | Component::PipelineVace => {
            let pe = take(inputs, component, "prompt_embeds")?;
            let guidance = options.guidance.unwrap_or(5.0);
            let ne = if guidance > 1.0 {
                Some(take(inputs, component, "negative_prompt_embeds")?)
            } else {
                inputs.get("negative_prompt_embeds")
            };
            let mut opts = PipelineOptions::for_device(device.clone());
            opts.dtype = dtype;
            opts.vae_dtype = DType::F32;
            opts.lora = options.lora.clone();
            opts.lora_2 = options.lora_2.clone();
            opts.lora_fuse = options.fuse_lora;
            opts.cache = options.cache.clone();
            let mut p = WanPipeline::open(model, opts)?;
            let steps = options.steps.unwrap_or(3);
            // Synchronize at each event so that the times are the device's, not launch times.
            let mut last = Instant::now();
            let mut record = |e: &ProgressEvent| -> Result<()> {
                device.synchronize()?;
                let now = Instant::now();
                let dt = now.duration_since(last).as_secs_f64();
                last = now;
                tracing::info!(
                    "{} {}/{}: {dt:.3} s since the last event",
                    e.stage.name(),
                    e.step,
                    e.total
                );
                match (e.stage, e.step) {
                    (Stage::LoadTransformer, s) if s > 0 => timings.load_s = dt,
                    (Stage::Denoise, s) if s > 0 => timings.step_s.push(dt),
                    (Stage::LoadVae, s) if s > 0 => timings.vae_load_s = Some(dt),
                    (Stage::DecodeVae, s) if s > 0 => {
                        timings.decode_s = Some(timings.decode_s.unwrap_or(0.0) + dt)
                    }
                    _ => {}
                }
                Ok(())
            };
            let (latents, condition, t_start, image_embeds) = match component {
                Component::PipelineI2v => {
                    let latents = take(inputs, component, "latents")?.clone();
                    let image = take(inputs, component, "image")?;
                    let last = inputs.get("last_image");
                    let f = latents.dim(2)?;
                    let num_frames = (f - 1) * p.frame_step() + 1;
                    let cond = p.prepare_image_condition(image, last, num_frames, &mut record)?;
                    (latents, cond, 0, inputs.get("image_embeds"))
                }
                Component::PipelineV2v => {
                    let video = take(inputs, component, "video")?;
                    let noise = take(inputs, component, "noise")?;
                    let strength = options.strength.unwrap_or(0.8);
                    let (latents, t_start) =
                        p.prepare_video_latents(video, noise, steps, strength, &mut record)?;
                    (latents, LatentCondition::None, t_start, None)
                }
                Component::PipelineVace => {
                    let latents = take(inputs, component, "latents")?.clone();
                    let refs = match inputs.get("reference_images") {
                        Some(r) => (0..r.dim(0)?)
                            .map(|i| r.narrow(0, i, 1))
                            .collect::<candle_core::Result<Vec<_>>>()?,
                        None => Vec::new(),
                    };
                    let (f, h, w) = match inputs.get("video") {
                        Some(v) => (v.dim(2)?, v.dim(3)?, v.dim(4)?),
                        None => {
                            let s = p.vae_config().spatial_compression();
                            let t = latents.dim(2)?.saturating_sub(refs.len()).max(1);
                            (
                                (t - 1) * p.frame_step() + 1,
                                latents.dim(3)? * s,
                                latents.dim(4)? * s,
                            )
                        }
                    };
                    let scale =
                        p.vace_scale(options.conditioning_scale.as_deref().unwrap_or(&[]))?;
                    let control = p.prepare_vace_control(
                        inputs.get("video"),
                        inputs.get("mask"),
                        &refs,
                        [f, h, w],
                        &mut record,
                    )?;
                    (latents, LatentCondition::Vace { control, scale }, 0, None)
                }
                _ => (
                    take(inputs, component, "latents")?.clone(),
                    LatentCondition::None,
                    0,
                    None,
                ),
            };
            let y = p.denoise_with(
                DenoiseInputs {
                    latents: &latents,
                    prompt_embeds: pe,
                    negative_prompt_embeds: ne,
                    image_embeds,
                    condition: &condition,
                    num_inference_steps: steps,
                    guidance_scale: guidance,
                    guidance_scale_2: options.guidance_2,
                    t_start,
                },
                &mut record,
            )?;
            if let Some(stats) = p.cache_stats() {
                report = Some(crate::hooks::CacheReport {
                    stats,
                    mag_ratios: p.mag_calibration().map(<[f64]>::to_vec),
                });
            }
            if options.decode {
                let video = p.decode(&y, &mut record)?;
                device.synchronize()?;
                out.insert("video".to_string(), video.to_dtype(DType::F32)?);
            }
            out.insert("latents".to_string(), y.to_dtype(DType::F32)?);
        }
    }
    device.synchronize()?;
    timings.total_s = t_start.elapsed().as_secs_f64();
    if let Some(table) = crate::profile::report() {
        eprintln!("{table}");
    }
    // Outputs on the CPU, where they are written and compared.
    let out = out
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok((out, timings, report))
}

/// Reads a safetensors file of inputs (on the CPU).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "give a safetensors file with the component's input tensors".into(),
        });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// Writes output tensors to a safetensors file.
pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("cannot write the output: {e}"),
    })
}

/// One run of a fixture's `case.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FixtureRun {
    pub component: String,
    pub model: String,
    pub input: String,
    pub expected: String,
    pub tolerance: f64,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    pub strength: Option<f64>,
    /// `pipeline-df`: the long-video arguments, under their own names.
    #[serde(flatten)]
    pub df: DfOptions,
    /// `pipeline-vace`: a float or one per VACE layer.
    #[serde(default)]
    pub conditioning_scale: Option<ScaleValue>,
    #[serde(default)]
    pub guidance_2: Option<f64>,
    /// LoRA adapters, `FILE[:SCALE]` relative to the case folder.
    #[serde(default)]
    pub lora: Vec<String>,
    #[serde(default)]
    pub lora_2: Vec<String>,
    #[serde(default)]
    pub fuse: bool,
    /// A step cache in the CLI syntax (`first-block:0.5`, `mag:0.1`, `taylorseer:2,…`).
    #[serde(default)]
    pub cache: Option<String>,
    /// MagCache's ratios, a JSON list file relative to the case folder.
    #[serde(default)]
    pub mag_ratios: Option<String>,
    /// The transformer forwards the reference skipped (Kino must skip as many) and ran.
    #[serde(default)]
    pub skipped: Option<usize>,
    #[serde(default)]
    pub forwards: Option<usize>,
}

/// `conditioning_scale` as the reference takes it: one float, or a list.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum ScaleValue {
    One(f64),
    PerLayer(Vec<f64>),
}

impl ScaleValue {
    pub fn to_vec(&self) -> Vec<f64> {
        match self {
            ScaleValue::One(v) => vec![*v],
            ScaleValue::PerLayer(v) => v.clone(),
        }
    }
}

/// A fixture's `case.json`. Runs of other (non-CLI) checks have their own fields and are kept raw.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FixtureCase {
    pub runs: Vec<serde_json::Value>,
}

/// One output of one fixture run, compared with the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureResult {
    pub case: String,
    pub component: String,
    pub output: String,
    /// ‖out − ref‖ / ‖ref‖
    pub rel_error: f64,
    pub tolerance: f64,
    /// A cached run: the cache setting, Kino's (skipped, forwards) and the fixture's.
    pub cache: Option<String>,
    pub skipped: Option<(usize, usize)>,
    pub expected_skipped: Option<(usize, usize)>,
}

impl FixtureResult {
    /// Within tolerance (NaN is not), and a cached run skipped as many forwards as the
    /// reference.
    pub fn passed(&self) -> bool {
        self.rel_error <= self.tolerance && self.skipped == self.expected_skipped
    }
}

/// Runs every parity-component run of every fixture case under `root` through [`run`] and returns
/// one result per output tensor.
pub fn check_fixtures(root: &Path) -> Result<Vec<FixtureResult>> {
    let mut results = Vec::new();
    let mut cases: Vec<_> = std::fs::read_dir(root)
        .map_err(|e| Error::BadFile {
            path: root.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").exists())
        .collect();
    cases.sort();
    for case in cases {
        let c: FixtureCase = crate::loading::read_json(&case.join("case.json"))?;
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        for raw in c.runs {
            let component = raw.get("component").and_then(|v| v.as_str()).unwrap_or("");
            let Ok(component) = component.parse::<Component>() else {
                continue; // not a parity-CLI component (checked by the module's own tests)
            };
            let r: FixtureRun = serde_json::from_value(raw).map_err(|e| Error::BadFile {
                path: case.join("case.json"),
                message: format!("bad run: {e}"),
            })?;
            let inputs = read_tensors(&case.join(&r.input))?;
            let specs = |list: &[String]| -> Result<Vec<crate::lora::LoraSpec>> {
                list.iter()
                    .map(|s| {
                        let mut spec: crate::lora::LoraSpec = s.parse()?;
                        spec.path = case.join(&spec.path);
                        Ok(spec)
                    })
                    .collect()
            };
            let expected = read_tensors(&case.join(&r.expected))?;
            let cache = match &r.cache {
                Some(spec) => {
                    let c: crate::hooks::CacheConfig = spec.parse()?;
                    Some(match &r.mag_ratios {
                        Some(f) => {
                            c.with_mag_ratios(crate::hooks::read_mag_ratios(&case.join(f))?)?
                        }
                        None => c,
                    })
                }
                None => None,
            };
            let expected_skipped = match (r.skipped, r.forwards) {
                (Some(s), Some(f)) => Some((s, f)),
                (None, None) => None,
                _ => {
                    return Err(Error::BadFile {
                        path: case.join("case.json"),
                        message: "a cached run gives both `skipped` and `forwards`".into(),
                    })
                }
            };
            let (out, _, report) = run_report(
                component,
                &case.join(&r.model),
                &inputs,
                ParityOptions {
                    steps: r.steps,
                    guidance: r.guidance,
                    strength: r.strength,
                    df: (component == Component::PipelineDf).then_some(r.df),
                    conditioning_scale: r.conditioning_scale.as_ref().map(ScaleValue::to_vec),
                    guidance_2: r.guidance_2,
                    lora: specs(&r.lora)?,
                    lora_2: specs(&r.lora_2)?,
                    fuse_lora: r.fuse,
                    cache,
                    ..Default::default()
                },
                &Device::Cpu,
            )?;
            let skipped = report.map(|c| (c.stats.skipped, c.stats.forwards));
            for (k, v) in &out {
                let Some(e) = expected.get(k) else {
                    return Err(Error::InvalidRequest(format!(
                        "{}: expected file lacks `{k}`",
                        case.display()
                    )));
                };
                let err = crate::testing::rel_error(v, e)?;
                results.push(FixtureResult {
                    case: name.clone(),
                    component: r.component.clone(),
                    output: k.clone(),
                    rel_error: err,
                    tolerance: r.tolerance,
                    cache: r.cache.clone(),
                    skipped,
                    expected_skipped,
                });
            }
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_run_fails_when_it_skips_another_count_than_the_reference() {
        let r = FixtureResult {
            case: "pipeline-cache".into(),
            component: "pipeline".into(),
            output: "latents".into(),
            rel_error: 1e-6,
            tolerance: 1e-3,
            cache: Some("first-block:0.5".into()),
            skipped: Some((11, 20)),
            expected_skipped: Some((11, 20)),
        };
        assert!(r.passed());
        let other = FixtureResult {
            skipped: Some((10, 20)),
            ..r.clone()
        };
        assert!(!other.passed());
        let uncounted = FixtureResult { skipped: None, ..r };
        assert!(!uncounted.passed());
    }

    #[test]
    fn caches_are_refused_on_vace_and_diffusion_forcing() {
        let cache: crate::hooks::CacheConfig = "first-block:0.1".parse().unwrap();
        for component in [
            Component::PipelineVace,
            Component::PipelineDf,
            Component::Transformer,
        ] {
            let e = run(
                component,
                Path::new("/nonexistent"),
                &HashMap::new(),
                ParityOptions {
                    cache: Some(cache.clone()),
                    ..Default::default()
                },
                &Device::Cpu,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("apply to `pipeline`"), "{e}");
        }
    }
}
