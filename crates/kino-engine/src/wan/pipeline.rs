//! Text-to-video with Wan: mirrors diffusers' `WanPipeline` (`pipelines/wan/pipeline_wan.py`),
//! `__call__` step by step: check inputs → encode prompt → `set_timesteps` → prepare latents →
//! denoising loop with classifier-free guidance → `latents / latents_std + latents_mean` → VAE decode
//! → frames.
//!
//! Differences from the reference, on purpose:
//! - a request that breaks the frame rule (4k+1) or the size multiple is refused with the nearest
//!   valid values named, instead of being rounded silently;
//! - the initial noise comes from our own seeded generator (same seed → same noise on every
//!   device), not PyTorch's, so the same seed gives another (equally valid) video;
//! - the negative prompt defaults to the Wan family's own recommended one (the original Wan
//!   repository's `sample_neg_prompt`), where diffusers defaults to "";
//! - low-memory mode loads each model just before its stage and frees it right after.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::loading::{read_config, ModelIndex};
use crate::progress::{Progress, ProgressEvent, Stage};
use crate::schedulers::{self, Scheduler};
use crate::wan::text_encoder::{WanTextEncoder, MAX_SEQUENCE_LENGTH};
use crate::wan::transformer::{self, WanTransformer3DModel};
use crate::wan::vae::{self, AutoencoderKLWan};
use crate::{Error, Result};

/// The original Wan repository's `sample_neg_prompt` (`wan/configs/shared_config.py`), which every
/// Wan model card recommends.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// Defaults a model folder may set in an optional `kino.json` at its root; otherwise they are
/// derived from the model (Wan2.1: 832×480, 81 frames, 16 fps; Wan2.2 TI2V: 1280×704, 121 frames,
/// 24 fps; 50 steps, guidance 5).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModelDefaults {
    pub width: usize,
    pub height: usize,
    pub num_frames: usize,
    pub fps: u32,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// `None`: the scheduler config's `flow_shift` / `shift`.
    pub shift: Option<f64>,
    /// `None`: [`DEFAULT_NEGATIVE_PROMPT`].
    pub negative_prompt: Option<String>,
    /// The token length prompts are padded and truncated to (`max_sequence_length` of
    /// `WanPipeline.__call__`, default 512); a small model may set less to keep cross-attention
    /// small.
    pub max_sequence_length: usize,
}

impl Default for ModelDefaults {
    fn default() -> Self {
        Self {
            width: 832,
            height: 480,
            num_frames: 81,
            fps: 16,
            num_inference_steps: 50,
            guidance_scale: 5.0,
            shift: None,
            negative_prompt: None,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
        }
    }
}

/// An RGB picture handed to the pipeline: u8, row-major `height × width × 3`. The engine reads
/// no files: callers decode and fit images to the request's size (see `kino_media`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Checks that `data` holds `width × height × 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(Error::InvalidRequest(format!(
                "an RGB image of {width}×{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// What a generation starts from besides its prompt. One pipeline serves them all.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Conditioning {
    /// Text only (text-to-video).
    #[default]
    Text,
    /// Image-to-video: the first frame, and for first–last-frame models the last one. Images
    /// must have the request's width and height (callers fit them).
    Image {
        first: RgbImage,
        last: Option<RgbImage>,
    },
    /// Video-to-video: at least `num_frames` source frames of the request's size (the first
    /// `num_frames` are used), and how much of the schedule to run, in (0, 1]: 1 ignores the
    /// source entirely, small values change it little.
    Video {
        frames: Vec<RgbImage>,
        strength: f64,
    },
}

impl Conditioning {
    /// "text", "image", "first-last image" or "video".
    pub fn kind(&self) -> &'static str {
        match self {
            Conditioning::Text => "text",
            Conditioning::Image { last: None, .. } => "image",
            Conditioning::Image { last: Some(_), .. } => "first-last image",
            Conditioning::Video { .. } => "video",
        }
    }
}

/// What a model folder can be conditioned on besides text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Generates from text alone (every Wan model but the Wan2.1 I2V ones).
    pub text: bool,
    /// Takes a first image (Wan2.1 I2V, Wan2.2 TI2V / I2V, kino-shapes).
    pub image: bool,
    /// Takes a last image too (Wan2.1 I2V / FLF2V).
    pub last_image: bool,
    /// Takes a source video (video-to-video: every text-to-video model).
    pub video: bool,
}

/// What a generation asks for. `None` fields take the model's defaults.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// Images or a video to start from; not serialized (callers store the files themselves).
    #[serde(skip)]
    pub conditioning: Conditioning,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_frames: Option<usize>,
    pub num_inference_steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub shift: Option<f64>,
    pub seed: Option<u64>,
}

/// A request with every default filled in and every rule checked.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub num_frames: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub shift: f64,
    pub seed: u64,
    pub fps: u32,
}

/// The result of one generation.
pub struct GenerateOutput {
    /// RGB u8 frames, each `height × width × 3`.
    pub frames: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    /// Final latents, before the VAE (f32, `[1, z, F', H', W']`).
    pub latents: Tensor,
    pub request: ResolvedRequest,
}

/// How to run the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device: Device,
    /// Compute dtype of the transformer and text encoder (f32 on CPU, bf16 on GPU).
    pub dtype: DType,
    /// VAE dtype (f32 keeps quality, as the diffusers docs advise).
    pub vae_dtype: DType,
    /// Load each model right before its stage and free it right after.
    pub low_memory: bool,
    /// Refuse runs whose estimated memory exceeds what is available.
    pub check_memory: bool,
    /// Decode the VAE in overlapping spatial tiles (less memory for large frames).
    pub vae_tiling: Option<vae::TilingConfig>,
    /// Classifier-free guidance as one transformer forward with batch 2B (prompt and negative
    /// prompt together) instead of two forwards of batch B, as the reference does. Same numbers
    /// (each sample is computed independently); fewer, larger kernels, which pays off on GPUs.
    pub batched_cfg: bool,
}

impl PipelineOptions {
    /// Defaults for a device: f32 on CPU, bf16 on GPU; low-memory on.
    pub fn for_device(device: Device) -> Self {
        let dtype = crate::device::default_dtype(&device);
        let batched_cfg = !device.is_cpu();
        Self {
            device,
            dtype,
            vae_dtype: DType::F32,
            low_memory: true,
            check_memory: true,
            vae_tiling: None,
            batched_cfg,
        }
    }
}

/// A Wan model folder in diffusers layout, opened (configs read, weights not yet loaded).
pub struct WanPipeline {
    root: PathBuf,
    index: ModelIndex,
    options: PipelineOptions,
    transformer_config: transformer::Config,
    vae_config: vae::Config,
    scheduler: Box<dyn Scheduler>,
    defaults: ModelDefaults,
    text_encoder: Option<WanTextEncoder>,
    transformer: Option<WanTransformer3DModel>,
    vae: Option<AutoencoderKLWan>,
}

/// Estimated peak memory of a run, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryEstimate {
    pub text_encoder: u64,
    pub transformer: u64,
    pub vae: u64,
    pub peak: u64,
}

impl WanPipeline {
    /// Opens a model folder: checks `model_index.json`, reads each component's config.
    pub fn open(root: &Path, options: PipelineOptions) -> Result<Self> {
        let index = ModelIndex::read(root)?;
        let transformer_dir = component_dir(root, &index, "transformer")?;
        let vae_dir = component_dir(root, &index, "vae")?;
        let scheduler_dir = component_dir(root, &index, "scheduler")?;
        let transformer_config: transformer::Config =
            read_config(&transformer_dir, &["WanTransformer3DModel"])?;
        let vae_config: vae::Config = read_config(&vae_dir, &["AutoencoderKLWan"])?;
        let scheduler = schedulers::from_folder(&scheduler_dir)?;
        if transformer_config.in_channels != vae_config.z_dim {
            return Err(Error::BadFile {
                path: transformer_dir.join("config.json"),
                message: format!(
                    "transformer in_channels {} does not match the VAE's z_dim {}; the components come from different models",
                    transformer_config.in_channels, vae_config.z_dim
                ),
            });
        }
        let defaults = read_defaults(root, &index, &vae_config)?;
        Ok(Self {
            root: root.to_path_buf(),
            index,
            options,
            transformer_config,
            vae_config,
            scheduler,
            defaults,
            text_encoder: None,
            transformer: None,
            vae: None,
        })
    }

    /// The folder this pipeline was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model's defaults (size, frames, fps, steps, guidance, shift).
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// Whether the pipeline uses per-token timesteps (Wan2.2 TI2V).
    pub fn expand_timesteps(&self) -> bool {
        self.index.expand_timesteps()
    }

    /// What this model can be conditioned on: a Wan2.1/2.2 I2V transformer (mask and condition
    /// latents on its channels, `in_channels = 2·z_dim + 4`) needs a first image and may take a
    /// last one; an `expand_timesteps` model (Wan2.2 TI2V, kino-shapes) takes text or a first
    /// image; every text-to-video model takes a source video.
    pub fn capabilities(&self) -> Capabilities {
        let z = self.vae_config.z_dim;
        let i2v = self.transformer_config.in_channels == 2 * z + 4;
        let expand = self.index.expand_timesteps();
        Capabilities {
            text: !i2v,
            image: i2v || expand,
            last_image: i2v && !expand,
            video: !i2v,
        }
    }

    /// Width and height must be multiples of this (VAE spatial factor × transformer patch).
    pub fn size_multiple(&self) -> (usize, usize) {
        let s = self.vae_config.spatial_compression();
        (
            s * self.transformer_config.patch_size[1],
            s * self.transformer_config.patch_size[2],
        )
    }

    /// Frame counts are `temporal · k + 1`.
    pub fn frame_step(&self) -> usize {
        self.vae_config.temporal_compression()
    }

    /// Fills in defaults and checks every rule; errors name the nearest valid values.
    pub fn resolve(&self, req: &GenerateRequest) -> Result<ResolvedRequest> {
        let d = &self.defaults;
        let width = req.width.unwrap_or(d.width);
        let height = req.height.unwrap_or(d.height);
        let num_frames = req.num_frames.unwrap_or(d.num_frames);
        let steps = req.num_inference_steps.unwrap_or(d.num_inference_steps);
        let guidance = req.guidance_scale.unwrap_or(d.guidance_scale);
        let shift = req
            .shift
            .or(d.shift)
            .unwrap_or_else(|| self.scheduler.shift());
        let (mw, mh) = self.size_multiple();
        check_multiple("width", width, mw)?;
        check_multiple("height", height, mh)?;
        let step = self.frame_step();
        if num_frames == 0 || !(num_frames - 1).is_multiple_of(step) {
            let lower = if num_frames == 0 {
                1
            } else {
                (num_frames - 1) / step * step + 1
            };
            let upper = lower + step;
            return Err(Error::InvalidRequest(format!(
                "{num_frames} frames is not a valid frame count: this model makes {step}·k + 1 frames; try {lower} or {upper}"
            )));
        }
        if steps == 0 || steps > 1000 {
            return Err(Error::InvalidRequest(format!(
                "{steps} steps is out of range: use 1 to 1000 (the model's default is {})",
                d.num_inference_steps
            )));
        }
        if !guidance.is_finite() || guidance < 0.0 {
            return Err(Error::InvalidRequest(format!(
                "guidance scale {guidance} must be a finite number ≥ 0 (1 or less turns guidance off; the default is {})",
                d.guidance_scale
            )));
        }
        if !shift.is_finite() || shift <= 0.0 {
            return Err(Error::InvalidRequest(format!(
                "shift {shift} must be a positive number (Wan uses 3 for 480p and 5 for 720p)"
            )));
        }
        let negative_prompt = req.negative_prompt.clone().unwrap_or_else(|| {
            d.negative_prompt
                .clone()
                .unwrap_or_else(|| DEFAULT_NEGATIVE_PROMPT.to_string())
        });
        Ok(ResolvedRequest {
            prompt: req.prompt.clone(),
            negative_prompt,
            width,
            height,
            num_frames,
            num_inference_steps: steps,
            guidance_scale: guidance,
            shift,
            seed: req.seed.unwrap_or_else(random_seed),
            fps: d.fps,
        })
    }

    /// Latent shape `[1, z, F', H', W']` for a resolved request.
    pub fn latent_shape(&self, r: &ResolvedRequest) -> [usize; 5] {
        let s = self.vae_config.spatial_compression();
        [
            1,
            self.transformer_config.in_channels,
            (r.num_frames - 1) / self.frame_step() + 1,
            r.height / s,
            r.width / s,
        ]
    }

    /// A rough estimate of the memory a run needs (weights plus the largest activations).
    pub fn estimate_memory(&self, r: &ResolvedRequest) -> Result<MemoryEstimate> {
        let bytes = |dt: DType| dt.size_in_bytes() as u64;
        let te_dir = component_dir(&self.root, &self.index, "text_encoder")?;
        // Weights as stored (UMT5 ships in f32), plus the activations of max_sequence_length
        // tokens.
        let text_encoder =
            file_bytes(&te_dir) + (self.defaults.max_sequence_length as u64) * 2 * 64 * 1024 * 4;

        let c = &self.transformer_config;
        let [_, _, f, h, w] = self.latent_shape(r);
        let tokens = (f * (h / c.patch_size[1]) * (w / c.patch_size[2])) as u64;
        let dim = c.inner_dim() as u64;
        let dt = bytes(self.options.dtype);
        let weights = c.num_params() as u64 * dt;
        // Hidden states and their temporaries, the FFN intermediate, and one chunk of attention
        // scores (we compute attention in query chunks on the CPU).
        let act = tokens * dim * dt * 12
            + tokens * c.ffn_dim as u64 * dt * 2
            + (c.num_attention_heads as u64) * tokens.min(4096) * tokens * 4;
        let transformer = weights + act;

        let v = &self.vae_config;
        let pixels = (r.width * r.height) as u64;
        let out = pixels * 3 * r.num_frames as u64 * 4 * 2;
        let vdim = v.decoder_base_dim.unwrap_or(v.base_dim) as u64;
        let vae_act = pixels * vdim * 4 * 14;
        let vae = file_bytes(&component_dir(&self.root, &self.index, "vae")?) + vae_act + out;

        let peak = if self.options.low_memory {
            text_encoder.max(transformer).max(vae)
        } else {
            text_encoder + transformer + vae
        };
        Ok(MemoryEstimate {
            text_encoder,
            transformer,
            vae,
            peak,
        })
    }

    /// Runs the whole pipeline: prompt → frames.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        progress: Progress,
    ) -> Result<GenerateOutput> {
        let r = self.resolve(req)?;
        if self.options.check_memory && self.options.device.is_cpu() {
            let est = self.estimate_memory(&r)?;
            if let Some(avail) = available_memory() {
                if est.peak > avail {
                    return Err(Error::OutOfMemory(format!(
                        "this run needs about {:.1} GiB but only {:.1} GiB is available; try a smaller size or fewer frames (e.g. --size {}x{} --frames {})",
                        gib(est.peak),
                        gib(avail),
                        self.defaults.width.min(r.width),
                        self.defaults.height.min(r.height),
                        (r.num_frames / 2 / self.frame_step()) * self.frame_step() + 1
                    )));
                }
            }
        }
        let do_cfg = r.guidance_scale > 1.0;
        let (prompt_embeds, negative_embeds) = self.encode_prompt(
            &r.prompt,
            do_cfg.then_some(r.negative_prompt.as_str()),
            progress,
        )?;
        let latents = self.prepare_latents(&r)?;
        self.scheduler.set_shift(r.shift);
        let latents = self.denoise(
            &latents,
            &prompt_embeds,
            negative_embeds.as_ref(),
            r.num_inference_steps,
            r.guidance_scale,
            progress,
        )?;
        drop(prompt_embeds);
        drop(negative_embeds);
        let video = self.decode(&latents, progress)?;
        let frames = video_to_frames(&video)?;
        Ok(GenerateOutput {
            frames,
            width: r.width,
            height: r.height,
            fps: r.fps,
            latents,
            request: r,
        })
    }

    /// Mirrors `encode_prompt`: embeddings of the prompt and (when guidance is on) the negative
    /// prompt, each `[1, max_sequence_length, D]` (the model's
    /// [`ModelDefaults::max_sequence_length`], 512 unless its `kino.json` says otherwise).
    pub fn encode_prompt(
        &mut self,
        prompt: &str,
        negative_prompt: Option<&str>,
        progress: Progress,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if self.text_encoder.is_none() {
            let t0 = Instant::now();
            emit(progress, Stage::LoadTextEncoder, 0, 1, t0)?;
            let tok = component_dir(&self.root, &self.index, "tokenizer")?;
            let te = component_dir(&self.root, &self.index, "text_encoder")?;
            self.text_encoder = Some(WanTextEncoder::load(
                &tok,
                &te,
                self.options.dtype,
                &self.options.device,
            )?);
            emit(progress, Stage::LoadTextEncoder, 1, 1, t0)?;
        }
        let t0 = Instant::now();
        let total = 1 + negative_prompt.is_some() as usize;
        emit(progress, Stage::EncodePrompt, 0, total, t0)?;
        let encoder = self
            .text_encoder
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("text encoder not loaded".into()))?;
        let max_len = self.defaults.max_sequence_length;
        let pe = encoder.encode(&[prompt.to_string()], max_len)?;
        emit(progress, Stage::EncodePrompt, 1, total, t0)?;
        let ne = match negative_prompt {
            Some(n) => {
                let ne = encoder.encode(&[n.to_string()], max_len)?;
                emit(progress, Stage::EncodePrompt, 2, total, t0)?;
                Some(ne)
            }
            None => None,
        };
        if self.options.low_memory {
            self.text_encoder = None;
        }
        Ok((pe, ne))
    }

    /// Mirrors `prepare_latents`: f32 standard normal noise from our seeded generator.
    pub fn prepare_latents(&self, r: &ResolvedRequest) -> Result<Tensor> {
        let shape = self.latent_shape(r);
        let n: usize = shape.iter().product();
        let mut rng = rand::rngs::StdRng::seed_from_u64(r.seed);
        let normal = rand_distr::StandardNormal;
        let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(data, &shape[..], &self.options.device)?)
    }

    fn load_transformer(&mut self, progress: Progress) -> Result<()> {
        if self.transformer.is_none() {
            let t0 = Instant::now();
            emit(progress, Stage::LoadTransformer, 0, 1, t0)?;
            let dir = component_dir(&self.root, &self.index, "transformer")?;
            self.transformer = Some(WanTransformer3DModel::load(
                &dir,
                self.options.dtype,
                &self.options.device,
            )?);
            emit(progress, Stage::LoadTransformer, 1, 1, t0)?;
        }
        Ok(())
    }

    /// The denoising loop of `__call__` (section 6): from initial latents and prompt embeddings
    /// to the final latents (f32). Uses the scheduler as configured (see [`Self::set_shift`]).
    pub fn denoise(
        &mut self,
        latents: &Tensor,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: Option<&Tensor>,
        num_inference_steps: usize,
        guidance_scale: f64,
        progress: Progress,
    ) -> Result<Tensor> {
        let do_cfg = guidance_scale > 1.0;
        if do_cfg && negative_prompt_embeds.is_none() {
            return Err(Error::InvalidRequest(
                "guidance scale > 1 needs negative prompt embeddings".into(),
            ));
        }
        let dims = latents.dims().to_vec();
        let c = &self.transformer_config;
        if dims.len() != 5 || dims[1] != c.in_channels {
            return Err(Error::InvalidRequest(format!(
                "latents must be [B, {}, F, H, W], got {dims:?}",
                c.in_channels
            )));
        }
        let (ph, pw) = (c.patch_size[1], c.patch_size[2]);
        if !dims[3].is_multiple_of(ph) || !dims[4].is_multiple_of(pw) {
            return Err(Error::InvalidRequest(format!(
                "latent height and width {}×{} must be multiples of the patch size {ph}×{pw}",
                dims[3], dims[4]
            )));
        }
        self.load_transformer(progress)?;
        let model = self
            .transformer
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("transformer not loaded".into()))?;
        let dtype = self.options.dtype;
        let device = &self.options.device;
        let batch = dims[0];
        let seq_len = dims[2] * (dims[3] / ph) * (dims[4] / pw);
        let prompt_embeds = prompt_embeds.to_device(device)?.to_dtype(dtype)?;
        let negative = match negative_prompt_embeds {
            Some(n) if do_cfg => Some(n.to_device(device)?.to_dtype(dtype)?),
            _ => None,
        };
        // Batched guidance: [prompt; negative] along the batch, built once.
        let both = match &negative {
            Some(n) if self.options.batched_cfg => Some(Tensor::cat(&[&prompt_embeds, n], 0)?),
            _ => None,
        };

        self.scheduler.set_timesteps(num_inference_steps)?;
        let timesteps = self.scheduler.timesteps().to_vec();
        let expand = self.index.expand_timesteps();
        let mut latents = latents.to_device(device)?.to_dtype(DType::F32)?;
        let t0 = Instant::now();
        emit(progress, Stage::Denoise, 0, timesteps.len(), t0)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let latent_model_input = latents.to_dtype(dtype)?;
            // With expand_timesteps the mask is all ones for text-to-video, so every token gets t.
            let timestep = if expand {
                Tensor::full(t as f32, (batch, seq_len), device)?
            } else {
                Tensor::full(t as f32, batch, device)?
            };
            let noise_pred = match (&both, &negative) {
                (Some(both), _) => {
                    let x = Tensor::cat(&[&latent_model_input, &latent_model_input], 0)?;
                    let ts = Tensor::cat(&[&timestep, &timestep], 0)?;
                    let out = model.forward(&x, &ts, both)?;
                    let cond = out.narrow(0, 0, batch)?;
                    let uncond = out.narrow(0, batch, batch)?;
                    (&uncond + ((cond - &uncond)? * guidance_scale)?)?
                }
                (None, Some(neg)) => {
                    let cond = model.forward(&latent_model_input, &timestep, &prompt_embeds)?;
                    let uncond = model.forward(&latent_model_input, &timestep, neg)?;
                    // noise_uncond + g · (noise_pred − noise_uncond)
                    (&uncond + ((cond - &uncond)? * guidance_scale)?)?
                }
                (None, None) => model.forward(&latent_model_input, &timestep, &prompt_embeds)?,
            };
            latents = self.scheduler.step(&noise_pred, i, &latents)?;
            emit(progress, Stage::Denoise, i + 1, timesteps.len(), t0)?;
        }
        if self.options.low_memory {
            self.transformer = None;
        }
        Ok(latents)
    }

    /// Overrides the scheduler's shift (flow_shift) for the next `denoise`.
    pub fn set_shift(&mut self, shift: f64) {
        self.scheduler.set_shift(shift);
    }

    /// `latents / latents_std + latents_mean` then the VAE decode: video in [-1, 1],
    /// `[B, 3, F, H, W]` f32.
    pub fn decode(&mut self, latents: &Tensor, progress: Progress) -> Result<Tensor> {
        if self.vae.is_none() {
            let t0 = Instant::now();
            emit(progress, Stage::LoadVae, 0, 1, t0)?;
            let dir = component_dir(&self.root, &self.index, "vae")?;
            let mut vae =
                AutoencoderKLWan::load(&dir, self.options.vae_dtype, &self.options.device)?;
            vae.set_tiling(self.options.vae_tiling);
            self.vae = Some(vae);
            emit(progress, Stage::LoadVae, 1, 1, t0)?;
        }
        let vae = self
            .vae
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("VAE not loaded".into()))?;
        let cfg = vae.config();
        let z = cfg.z_dim;
        let device = &self.options.device;
        let mean: Vec<f32> = cfg.latents_mean.iter().map(|&x| x as f32).collect();
        let std: Vec<f32> = cfg.latents_std.iter().map(|&x| x as f32).collect();
        if mean.len() != z || std.len() != z {
            return Err(Error::BadFile {
                path: self.root.join("vae/config.json"),
                message: format!(
                    "latents_mean and latents_std must have z_dim = {z} values, found {} and {}",
                    mean.len(),
                    std.len()
                ),
            });
        }
        let vdt = self.options.vae_dtype;
        let mean = Tensor::from_vec(mean, (1, z, 1, 1, 1), device)?.to_dtype(vdt)?;
        // The reference computes 1/std first, then divides by it.
        let inv_std = (1.0 / Tensor::from_vec(std, (1, z, 1, 1, 1), device)?)?.to_dtype(vdt)?;
        let latents = latents.to_device(device)?.to_dtype(vdt)?;
        let latents = latents.broadcast_div(&inv_std)?.broadcast_add(&mean)?;
        let t0 = Instant::now();
        let total = latents.dim(2)?;
        emit(progress, Stage::DecodeVae, 0, total, t0)?;
        let mut cb = |done: usize, total: usize| emit(progress, Stage::DecodeVae, done, total, t0);
        let video = vae.decode_with_progress(&latents, &mut cb)?;
        Ok(video.to_dtype(DType::F32)?)
    }
}

fn emit(progress: Progress, stage: Stage, step: usize, total: usize, t0: Instant) -> Result<()> {
    progress(&ProgressEvent {
        stage,
        step,
        total,
        elapsed: t0.elapsed(),
    })
}

/// Mirrors `VideoProcessor.postprocess_video` followed by the PIL conversion:
/// `(x / 2 + 0.5).clamp(0, 1) · 255`, rounded, as RGB u8 frames (batch 0).
pub fn video_to_frames(video: &Tensor) -> Result<Vec<Vec<u8>>> {
    let v = video.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let v = v.get(0)?; // [3, F, H, W]
    let v = ((v / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let v = (v * 255.0)?.round()?.to_dtype(DType::U8)?;
    let v = v.permute((1, 2, 3, 0))?.contiguous()?; // [F, H, W, 3]
    let f = v.dim(0)?;
    let mut frames = Vec::with_capacity(f);
    for i in 0..f {
        frames.push(v.get(i)?.flatten_all()?.to_vec1::<u8>()?);
    }
    Ok(frames)
}

/// The folder of a component named in `model_index.json`.
pub fn component_dir(root: &Path, index: &ModelIndex, name: &str) -> Result<PathBuf> {
    match index.components.get(name) {
        Some(Some(_)) => {}
        _ => {
            return Err(Error::BadFile {
                path: root.join("model_index.json"),
                message: format!("the model has no `{name}` component; a Wan text-to-video model needs transformer, vae, text_encoder, tokenizer and scheduler"),
            })
        }
    }
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir,
            hint: format!(
                "model_index.json lists `{name}` but its folder is missing; copy the whole model folder again"
            ),
        });
    }
    Ok(dir)
}

fn read_defaults(root: &Path, index: &ModelIndex, vae: &vae::Config) -> Result<ModelDefaults> {
    let path = root.join("kino.json");
    if path.exists() {
        let d: ModelDefaults = crate::loading::read_json(&path)?;
        if d.max_sequence_length == 0 {
            return Err(Error::BadFile {
                path,
                message: format!(
                    "max_sequence_length must be at least 1 (leave it out for the default, {MAX_SEQUENCE_LENGTH})"
                ),
            });
        }
        return Ok(d);
    }
    let mut d = ModelDefaults::default();
    if index.expand_timesteps() || vae.z_dim == 48 {
        // Wan2.2 TI2V-5B (its original generate.py defaults).
        d.width = 1280;
        d.height = 704;
        d.num_frames = 121;
        d.fps = 24;
    }
    Ok(d)
}

fn check_multiple(what: &str, value: usize, m: usize) -> Result<()> {
    if value == 0 || !value.is_multiple_of(m) {
        let lower = value / m * m;
        let upper = lower + m;
        let hint = if lower == 0 {
            format!("try {upper}")
        } else {
            format!("try {lower} or {upper}")
        };
        return Err(Error::InvalidRequest(format!(
            "{what} {value} is not a multiple of {m}, which this model needs; {hint}"
        )));
    }
    Ok(())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() % 4_294_967_296
}

fn file_bytes(dir: &Path) -> u64 {
    crate::loading::weight_files(dir)
        .map(|fs| {
            fs.iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(case: &str) -> WanPipeline {
        let dir = crate::testing::fixtures_dir().join(case).join("model");
        WanPipeline::open(&dir, PipelineOptions::for_device(Device::Cpu)).unwrap()
    }

    fn req(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            seed: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn rules_are_checked_with_the_nearest_valid_values() {
        let p = open("pipeline-wan22");
        assert_eq!(p.size_multiple(), (32, 32));
        let e = p
            .resolve(&GenerateRequest {
                width: Some(200),
                ..req("x")
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("width 200 is not a multiple of 32") && e.contains("try 192 or 224"),
            "{e}"
        );
        let e = p
            .resolve(&GenerateRequest {
                num_frames: Some(0),
                ..req("x")
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("try 1 or 5"), "{e}");
        let r = p.resolve(&req("x")).unwrap();
        assert_eq!((r.width, r.height, r.num_frames, r.fps), (192, 128, 17, 8));
        assert_eq!(r.negative_prompt, DEFAULT_NEGATIVE_PROMPT);
        assert_eq!(r.shift, 5.0);
        let r = p
            .resolve(&GenerateRequest {
                negative_prompt: Some(String::new()),
                shift: Some(2.0),
                ..req("x")
            })
            .unwrap();
        assert_eq!((r.negative_prompt.as_str(), r.shift), ("", 2.0));
        assert_eq!(p.latent_shape(&r), [1, 12, 5, 8, 12]);
    }

    #[test]
    fn kino_json_may_set_max_sequence_length() {
        // Not set: the diffusers default, 512 (the fixture kino.json does not set it).
        let mut p = open("pipeline-wan21");
        assert_eq!(p.defaults().max_sequence_length, 512);
        let d: ModelDefaults = serde_json::from_str(r#"{"width": 64}"#).unwrap();
        assert_eq!((d.width, d.max_sequence_length), (64, 512));
        // Set in kino.json: prompts are padded to it.
        let tmp = std::env::temp_dir().join(format!("kino-msl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let root = p.root().to_path_buf();
        fn copy_dir(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    copy_dir(&e.path(), &to.join(e.file_name()));
                } else {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
        copy_dir(&root, &tmp);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("kino.json")).unwrap())
                .unwrap();
        json["max_sequence_length"] = 16.into();
        std::fs::write(tmp.join("kino.json"), json.to_string()).unwrap();
        let mut small = WanPipeline::open(&tmp, PipelineOptions::for_device(Device::Cpu)).unwrap();
        assert_eq!(small.defaults().max_sequence_length, 16);
        assert_eq!(small.defaults().width, p.defaults().width);
        let (pe, ne) = small
            .encode_prompt("a red circle", Some("blurry"), &mut crate::progress::ignore)
            .unwrap();
        assert_eq!(pe.dim(1).unwrap(), 16);
        assert_eq!(ne.unwrap().dim(1).unwrap(), 16);
        let (pe, _) = p
            .encode_prompt("a red circle", None, &mut crate::progress::ignore)
            .unwrap();
        assert_eq!(pe.dim(1).unwrap(), 512);
        let r = small.resolve(&req("x")).unwrap();
        assert!(
            small.estimate_memory(&r).unwrap().text_encoder
                < p.estimate_memory(&r).unwrap().text_encoder
        );
        // 0 is refused when the model is opened, naming the file.
        json["max_sequence_length"] = 0.into();
        std::fs::write(tmp.join("kino.json"), json.to_string()).unwrap();
        let e = WanPipeline::open(&tmp, PipelineOptions::for_device(Device::Cpu))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("kino.json") && e.contains("max_sequence_length must be at least 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn runs_that_cannot_fit_are_refused_before_starting() {
        let mut p = open("pipeline-wan21");
        let big = GenerateRequest {
            width: Some(4096),
            height: Some(4096),
            num_frames: Some(1001),
            ..req("x")
        };
        let r = p.resolve(&big).unwrap();
        let est = p.estimate_memory(&r).unwrap();
        assert!(est.peak > 100 << 30, "{est:?}");
        let mut events = 0;
        let mut count = |_: &ProgressEvent| -> Result<()> {
            events += 1;
            Ok(())
        };
        match p.generate(&big, &mut count) {
            Err(Error::OutOfMemory(m)) => {
                assert!(m.contains("GiB") && m.contains("smaller size"), "{m}")
            }
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("a 4096² run fitted?"),
        }
        assert_eq!(events, 0, "refused before any work");
    }

    #[test]
    fn generate_reports_progress_is_deterministic_and_can_be_cancelled() {
        let mut p = open("pipeline-wan21");
        let r = GenerateRequest {
            width: Some(32),
            height: Some(32),
            num_frames: Some(5),
            num_inference_steps: Some(3),
            ..req("a red circle")
        };
        let mut events = Vec::new();
        let mut record = |e: &ProgressEvent| -> Result<()> {
            events.push((e.stage, e.step, e.total));
            Ok(())
        };
        let a = p.generate(&r, &mut record).unwrap();
        assert_eq!(a.frames.len(), 5);
        assert_eq!(a.frames[0].len(), 32 * 32 * 3);
        let denoise: Vec<_> = events.iter().filter(|e| e.0 == Stage::Denoise).collect();
        assert_eq!(denoise.len(), 4);
        assert_eq!(*denoise[3], (Stage::Denoise, 3, 3));
        assert!(events.iter().any(|e| e.0 == Stage::DecodeVae && e.1 == e.2));
        // Low-memory mode freed everything.
        assert!(p.text_encoder.is_none() && p.transformer.is_none());
        let b = p.generate(&r, &mut crate::progress::ignore).unwrap();
        assert_eq!(a.frames, b.frames);
        assert_eq!(
            crate::testing::rel_error(&a.latents, &b.latents).unwrap(),
            0.0
        );
        let c = p
            .generate(
                &GenerateRequest {
                    seed: Some(2),
                    ..r.clone()
                },
                &mut crate::progress::ignore,
            )
            .unwrap();
        assert!(crate::testing::rel_error(&c.latents, &a.latents).unwrap() > 0.1);

        let mut stop = |e: &ProgressEvent| -> Result<()> {
            if e.stage == Stage::Denoise && e.step == 1 {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        };
        assert!(matches!(p.generate(&r, &mut stop), Err(Error::Cancelled)));
    }

    #[test]
    fn batched_guidance_gives_the_same_latents() {
        for case in ["pipeline-wan21", "pipeline-wan22"] {
            let run = |batched: bool| {
                let dir = crate::testing::fixtures_dir().join(case).join("model");
                let mut opts = PipelineOptions::for_device(Device::Cpu);
                opts.batched_cfg = batched;
                let mut p = WanPipeline::open(&dir, opts).unwrap();
                let mut r = req("a red circle");
                r.num_inference_steps = Some(3);
                p.generate(&r, &mut |_| Ok(())).unwrap().latents
            };
            let (a, b) = (run(false), run(true));
            let err = crate::testing::rel_error(&b, &a).unwrap();
            println!("{case}: batched vs two forwards {err:.2e}");
            assert!(err < 1e-5, "{case}: {err}");
        }
    }

    #[test]
    fn guidance_off_runs_one_forward_per_step() {
        let mut p = open("pipeline-wan21");
        let r = GenerateRequest {
            width: Some(32),
            height: Some(32),
            num_frames: Some(1),
            num_inference_steps: Some(2),
            guidance_scale: Some(1.0),
            ..req("x")
        };
        let mut encodes = 0;
        let mut count = |e: &ProgressEvent| -> Result<()> {
            if e.stage == Stage::EncodePrompt {
                encodes = e.total;
            }
            Ok(())
        };
        let out = p.generate(&r, &mut count).unwrap();
        assert_eq!(encodes, 1, "no negative prompt without guidance");
        assert_eq!(out.frames.len(), 1);
    }
}
