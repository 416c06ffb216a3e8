//! Wan video generation, one pipeline for every conditioning: mirrors diffusers' `WanPipeline`
//! (`pipelines/wan/pipeline_wan.py`, text), `WanImageToVideoPipeline` (`pipeline_wan_i2v.py`:
//! Wan2.1 I2V / first–last frame with the CLIP image encoder, Wan2.2 TI2V's first latent frame
//! with per-token timesteps, Wan2.2 A14B's two experts) and `WanVideoToVideoPipeline`
//! (`pipeline_wan_video2video.py`), `__call__` step by step: check inputs → encode prompt →
//! encode image → `set_timesteps` (cut by `strength`) → prepare latents (noise, condition
//! latents, mask) → denoising loop with classifier-free guidance (high-noise expert, then the
//! low-noise one past `boundary_ratio`) → `latents / latents_std + latents_mean` → VAE decode →
//! frames.
//!
//! Differences from the reference, on purpose:
//! - a request that breaks the frame rule (4k+1) or the size multiple is refused with the nearest
//!   valid values named, instead of being rounded silently;
//! - the initial noise comes from our own seeded generator (same seed → same noise on every
//!   device), not PyTorch's, so the same seed gives another (equally valid) video;
//! - the negative prompt defaults to the Wan family's own recommended one (the original Wan
//!   repository's `sample_neg_prompt`), where diffusers defaults to "";
//! - low-memory mode loads each model just before its stage and frees it right after (the two
//!   experts of a Wan2.2 A14B model one after the other);
//! - a first–last-frame request to an I2V model whose image embedder has no `pos_embed`, or a
//!   last image for a TI2V model, is refused (the reference crashes, or ignores the last image);
//! - video-to-video uses the VAE's real spatial factor (the reference assumes 8× and fails on
//!   the Wan2.2 5B VAE), and a `strength` that leaves no step is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::clip::{self, CLIPVisionModel, ImageProcessorConfig};
use crate::hooks::{CacheConfig, CacheReport, CacheStats, StepCache};
use crate::loading::{read_config, ModelIndex};
use crate::lora::{LoraSet, LoraSpec};
use crate::progress::{Progress, ProgressEvent, Stage};
use crate::schedulers::{self, Scheduler};
use crate::skyreels::diffusion_forcing::{self, DfCondition, DiffusionForcingArgs};
use crate::skyreels::transformer::SkyReelsV2Transformer3DModel;
use crate::wan::text_encoder::{WanTextEncoder, MAX_SEQUENCE_LENGTH};
use crate::wan::transformer::{self, WanTransformer3DModel};
use crate::wan::transformer_vace::{self, WanVACETransformer3DModel};
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
    /// Diffusion forcing (SkyReels-V2 DF): pixel frames of one window (`base_num_frames`,
    /// the model's clip; longer videos go in windows).
    pub base_num_frames: Option<usize>,
    /// Diffusion forcing: frames each later window takes from the end of the video.
    pub overlap_history: Option<usize>,
    /// Diffusion forcing: steps each causal block lags the previous one (0: synchronous).
    pub ar_step: usize,
    /// Diffusion forcing: frames per causal block (`None`: the transformer's).
    pub causal_block_size: Option<usize>,
    /// Diffusion forcing: noise level given to the frames a window continues from.
    pub addnoise_condition: f64,
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
            base_num_frames: None,
            overlap_history: None,
            ar_step: 0,
            causal_block_size: None,
            addnoise_condition: 0.0,
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
    /// Extension: go on after these frames (the end of an existing video, of the request's
    /// size). A first-image model starts from the last frame; a diffusion-forcing model
    /// (SkyReels-V2 DF, `SkyReelsV2DiffusionForcingVideoToVideoPipeline`) from the last
    /// `overlap_history` frames. The output holds only the new frames: `num_frames − 1` of them
    /// (the first generated frame would repeat the given one).
    Continue { frames: Vec<RgbImage> },
    /// VACE (`WanVACEPipeline`, a VACE model): edit a source video inside a mask, keep a
    /// subject from reference images, or both. See [`VaceCondition`].
    Vace(VaceCondition),
}

/// A one-channel picture (a mask frame): u8, row-major `height × width`. The engine reads
/// `value / 255`, as the reference's mask preprocessing does (a PIL mask through
/// `preprocess_video`, then `(m + 1) / 2`); 255 = generate, 0 = keep. Callers threshold user
/// masks first (see `kino_media`), so masks are binary in practice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl GrayImage {
    /// Checks that `data` holds `width × height` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height {
            return Err(Error::InvalidRequest(format!(
                "a mask of {width}×{height} needs {} bytes, got {}",
                width * height,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// A mask of one value everywhere.
    pub fn filled(width: usize, height: usize, value: u8) -> Self {
        Self {
            width,
            height,
            data: vec![value; width * height],
        }
    }
}

/// What a VACE run is conditioned on (the reference's `video`, `mask`, `reference_images` and
/// `conditioning_scale`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VaceCondition {
    /// The source video: exactly the request's `num_frames` frames, of its size. `None`:
    /// generate every frame (the reference's zeros with an all-ones mask).
    pub video: Option<Vec<RgbImage>>,
    /// One mask per source frame, of the request's size, 255 where the model generates and 0
    /// where it keeps the source. `None` with a video: all 255 (the whole video is regenerated,
    /// guided by it). Needs `video`.
    pub mask: Option<Vec<GrayImage>>,
    /// Reference images (a subject, a style), any size: each is letterboxed on white to the
    /// request's size and prepended on the time axis (dropped before decoding). To match the
    /// reference exactly, callers first resize each to sides that are multiples of
    /// [`WanPipeline::vace_reference_multiple`] (Lanczos), as its preprocessing does.
    pub reference_images: Vec<RgbImage>,
    /// How strongly the control branch steers: empty = 1.0; one value for every VACE layer, or
    /// one per layer (`len(vace_layers)`).
    pub conditioning_scale: Vec<f64>,
    /// With a video and a mask: after decoding, put the source's pixels back where the mask
    /// keeps them (`output·m + source·(1 − m)`, `m` = mask / 255, as diffusers'
    /// `VaeImageProcessor.apply_overlay` does for its inpainting pipelines), so what the user
    /// did not mask comes out exactly as given instead of through the VAE. Not part of
    /// `WanVACEPipeline` itself (its latents are unchanged); `kino edit --mask` and the
    /// server's masked edits turn it on.
    pub composite: bool,
}

impl Conditioning {
    /// "text", "image", "first-last image" or "video".
    pub fn kind(&self) -> &'static str {
        match self {
            Conditioning::Text => "text",
            Conditioning::Image { last: None, .. } => "image",
            Conditioning::Image { last: Some(_), .. } => "first-last image",
            Conditioning::Video { .. } => "video",
            Conditioning::Continue { .. } => "continuation",
            Conditioning::Vace(v) => match (&v.video, &v.mask, v.reference_images.is_empty()) {
                (Some(_), Some(_), true) => "masked edit",
                (Some(_), Some(_), false) => "masked edit with references",
                (Some(_), None, true) => "edit",
                (Some(_), None, false) => "edit with references",
                (None, _, false) => "references",
                (None, _, true) => "vace",
            },
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
    /// Makes videos longer than its clip by itself (diffusion forcing, SkyReels-V2 DF).
    pub long_video: bool,
    /// Takes VACE conditioning: a masked source video, reference images (Wan2.1 VACE).
    pub vace: bool,
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
    /// What the run starts from: "text", "image", "first-last image" or "video".
    #[serde(default = "text_kind")]
    pub conditioning: String,
    /// Video-to-video: the share of the schedule run.
    #[serde(default)]
    pub strength: Option<f64>,
}

fn text_kind() -> String {
    "text".into()
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
    /// With a step cache (`PipelineOptions::cache`): the transformer forwards run and skipped.
    pub cache_stats: Option<CacheStats>,
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
    /// LoRA adapters for the transformer (`FILE[:SCALE]`, in order; see `crate::lora`).
    pub lora: Vec<LoraSpec>,
    /// LoRA adapters for `transformer_2` (the low-noise expert of a two-expert folder; the
    /// reference's `load_into_transformer_2=True`).
    pub lora_2: Vec<LoraSpec>,
    /// Fold the adapters into the weights at load instead of applying them on the fly.
    pub lora_fuse: bool,
    /// A step cache (`crate::hooks`: First Block Cache, MagCache, TaylorSeer), fresh for each
    /// generation. With guidance the conditional and unconditional passes then run as two
    /// forwards (cache contexts "cond" and "uncond"), even with `batched_cfg`.
    pub cache: Option<CacheConfig>,
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
            lora: Vec::new(),
            lora_2: Vec::new(),
            lora_fuse: false,
            cache: None,
        }
    }
}

/// A Wan model folder in diffusers layout, opened (configs read, weights not yet loaded).
pub struct WanPipeline {
    root: PathBuf,
    index: ModelIndex,
    options: PipelineOptions,
    transformer_config: transformer::Config,
    /// Wan2.2 A14B: the low-noise expert's config, and the timestep fraction below which it
    /// takes over (`boundary_ratio` in model_index.json).
    transformer_2_config: Option<transformer::Config>,
    boundary_ratio: Option<f64>,
    vae_config: vae::Config,
    scheduler: Box<dyn Scheduler>,
    defaults: ModelDefaults,
    /// Wan2.1 I2V: `image_processor/` (CLIP preprocessing).
    image_processor: Option<ImageProcessorConfig>,
    text_encoder: Option<WanTextEncoder>,
    image_encoder: Option<CLIPVisionModel>,
    /// SkyReels-V2 diffusion forcing (`SkyReelsV2DiffusionForcingPipeline`): its transformer.
    diffusion_forcing: bool,
    df_transformer: Option<SkyReelsV2Transformer3DModel>,
    /// Wan2.1 VACE (`WanVACEPipeline`): the experts are `WanVACETransformer3DModel`s.
    vace: bool,
    transformer: Option<Denoiser>,
    transformer_2: Option<Denoiser>,
    vae: Option<AutoencoderKLWan>,
    /// The LoRA adapters of `options.lora` and `options.lora_2`, read once at open.
    lora: Option<Arc<LoraSet>>,
    lora_2: Option<Arc<LoraSet>>,
    /// The step cache's report of the last denoising loop.
    last_cache: Option<CacheReport>,
}

/// A loaded expert: the Wan transformer, or its VACE form (the pipeline's folder says which).
enum Denoiser {
    Wan(WanTransformer3DModel),
    Vace(WanVACETransformer3DModel),
}

impl Denoiser {
    /// One prediction; `control` is VACE's control latents and per-layer scale, which a VACE
    /// expert needs and a Wan one must not be given.
    fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        image: Option<&Tensor>,
        control: Option<(&Tensor, &[f64])>,
    ) -> Result<Tensor> {
        match (self, control) {
            (Denoiser::Wan(m), None) => m.forward_with_image(x, timestep, context, image),
            (Denoiser::Vace(m), Some((c, scale))) => {
                m.forward(x, timestep, context, image, c, Some(scale))
            }
            (Denoiser::Wan(_), Some(_)) => Err(Error::InvalidRequest(
                "VACE control latents were given to a transformer without a VACE branch".into(),
            )),
            (Denoiser::Vace(_), None) => Err(Error::InvalidRequest(
                "a VACE transformer needs its control latents".into(),
            )),
        }
    }

    /// [`Self::forward`] through a step cache (Wan experts only).
    fn forward_cached(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        image: Option<&Tensor>,
        cache: &mut StepCache,
    ) -> Result<Tensor> {
        match self {
            Denoiser::Wan(m) => m.forward_cached(x, timestep, context, image, cache),
            Denoiser::Vace(_) => Err(Error::InvalidRequest(
                "step caches do not apply to VACE models".into(),
            )),
        }
    }
}

/// The conditioning of one run in latent space, as `prepare_latents` of the reference builds it.
#[derive(Debug, Clone)]
pub enum LatentCondition {
    /// Text to video (and video to video: the source is in the initial latents).
    None,
    /// Wan2.2 TI2V (`expand_timesteps`): the normalised latent of the first image,
    /// `[B, z, 1, h, w]`; latent frame 0 is replaced by it before every forward (its tokens get
    /// timestep 0) and once more after the loop.
    FirstFrame(Tensor),
    /// Wan2.1 I2V / FLF2V and Wan2.2 I2V: the mask (4 channels) and the normalised condition
    /// latents, `[B, 4 + z, T, h, w]`, concatenated to the latents on channels at every forward.
    Channels(Tensor),
    /// VACE: the control latents `[B, 2·z + 64, T, h, w]` (inactive and reactive latents, the
    /// mask; reference frames first) handed to the control branch at every forward, and the
    /// scale of each VACE layer.
    Vace { control: Tensor, scale: Vec<f64> },
}

/// Everything one denoising loop needs besides the scheduler and the models.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseInputs<'a> {
    /// The initial latents `[B, z, T, h, w]`: noise, or (video-to-video) the noised source.
    pub latents: &'a Tensor,
    pub prompt_embeds: &'a Tensor,
    pub negative_prompt_embeds: Option<&'a Tensor>,
    /// The image encoder's tokens (Wan2.1 I2V), `[B, S, image_dim]` or `[2B, S, image_dim]` with
    /// a last image.
    pub image_embeds: Option<&'a Tensor>,
    pub condition: &'a LatentCondition,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// The low-noise expert's guidance (`guidance_scale_2`; `None`: `guidance_scale`).
    pub guidance_scale_2: Option<f64>,
    /// The first step to run (video-to-video's `t_start`); 0 runs the whole schedule.
    pub t_start: usize,
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
        let diffusion_forcing =
            crate::loading::DIFFUSION_FORCING_PIPELINES.contains(&index.class_name.as_str());
        let vace = index.class_name == crate::loading::VACE_PIPELINE;
        let transformer_classes: &[&str] = if diffusion_forcing {
            &[crate::skyreels::transformer::CLASS_NAME]
        } else if vace {
            &[transformer_vace::CLASS_NAME]
        } else {
            &[transformer::CLASS_NAME]
        };
        let transformer_config: transformer::Config =
            read_config(&transformer_dir, transformer_classes)?;
        transformer_config.validate()?;
        let vae_config: vae::Config = read_config(&vae_dir, &["AutoencoderKLWan"])?;
        let scheduler = schedulers::from_folder(&scheduler_dir)?;
        let z = vae_config.z_dim;
        // VACE: the reference lays the mask out as `vae_scale_factor_spatial²` channels with the
        // factor taken as 2^len(temperal_downsample); a VAE whose real factor differs (Wan2.2's
        // 16×) would make another layout than the checkpoint was trained on.
        let vace_mask_factor = 1usize << vae_config.temperal_downsample.len();
        if vace && vae_config.spatial_compression() != vace_mask_factor {
            return Err(Error::BadFile {
                path: vae_dir.join("config.json"),
                message: format!(
                    "a VACE pipeline needs a VAE with spatial factor 2^len(temperal_downsample) = \
                     {vace_mask_factor} (the mask layout of WanVACEPipeline); this VAE compresses \
                     {}×",
                    vae_config.spatial_compression()
                ),
            });
        }
        let check_channels = |cfg: &transformer::Config, dir: &Path| -> Result<()> {
            let c = cfg.in_channels;
            if vace {
                let want = 2 * z + vace_mask_factor * vace_mask_factor;
                if c != z || cfg.vace_in_channels != Some(want) {
                    return Err(Error::BadFile {
                        path: dir.join("config.json"),
                        message: format!(
                            "a VACE transformer here takes {z} latent channels and {want} control \
                             channels (2·z_dim + {}), found in_channels {c} and vace_in_channels \
                             {:?}; the components come from different models",
                            vace_mask_factor * vace_mask_factor,
                            cfg.vace_in_channels
                        ),
                    });
                }
            } else if c != z && c != 2 * z + 4 {
                return Err(Error::BadFile {
                    path: dir.join("config.json"),
                    message: format!(
                        "transformer in_channels {c} fits neither text-to-video (the VAE's z_dim, {z}) \
                         nor image-to-video (2·z_dim + 4 = {}); the components come from different models",
                        2 * z + 4
                    ),
                });
            }
            if cfg.out_channels() != z {
                return Err(Error::BadFile {
                    path: dir.join("config.json"),
                    message: format!(
                        "transformer out_channels {} does not match the VAE's z_dim {z}",
                        cfg.out_channels()
                    ),
                });
            }
            Ok(())
        };
        check_channels(&transformer_config, &transformer_dir)?;

        // Wan2.2 A14B: two experts split at boundary_ratio. A folder with one but not the other
        // would run differently from the reference (or not at all there): refuse it.
        let boundary_ratio = match index.extra.get("boundary_ratio") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => Some(r),
                _ => {
                    return Err(Error::BadFile {
                        path: root.join("model_index.json"),
                        message: format!("boundary_ratio {v} must be a number in [0, 1]"),
                    })
                }
            },
        };
        let has_t2 = matches!(index.components.get("transformer_2"), Some(Some(_)));
        let transformer_2_config = match (has_t2, boundary_ratio) {
            (true, Some(_)) => {
                let dir = component_dir(root, &index, "transformer_2")?;
                let cfg: transformer::Config = read_config(&dir, transformer_classes)?;
                cfg.validate()?;
                check_channels(&cfg, &dir)?;
                if cfg.in_channels != transformer_config.in_channels
                    || cfg.patch_size != transformer_config.patch_size
                    || cfg.text_dim != transformer_config.text_dim
                    || cfg.image_dim != transformer_config.image_dim
                    || cfg.vace_layers.as_ref().map(Vec::len)
                        != transformer_config.vace_layers.as_ref().map(Vec::len)
                {
                    return Err(Error::BadFile {
                        path: dir.join("config.json"),
                        message: "transformer_2 takes other inputs than transformer (in_channels, patch_size, text_dim or image_dim differ); the experts come from different models".into(),
                    });
                }
                Some(cfg)
            }
            (true, None) => {
                return Err(Error::BadFile {
                    path: root.join("model_index.json"),
                    message: "the folder has a second expert (transformer_2) but no boundary_ratio, so the reference never runs it; set boundary_ratio (Wan2.2 A14B: 0.875 text-to-video, 0.9 image-to-video) or remove transformer_2".into(),
                });
            }
            (false, Some(r)) => {
                return Err(Error::BadFile {
                    path: root.join("model_index.json"),
                    message: format!("boundary_ratio is {r} but the folder has no transformer_2 (the low-noise expert); add it or set boundary_ratio to null"),
                });
            }
            (false, None) => None,
        };
        let image_processor = if transformer_config.image_dim.is_some() {
            component_dir(root, &index, "image_encoder")?;
            let dir = component_dir(root, &index, "image_processor")?;
            Some(clip::read_image_processor(&dir)?)
        } else {
            None
        };
        let defaults = read_defaults(root, &index, &vae_config)?;
        if diffusion_forcing && !(options.lora.is_empty() && options.lora_2.is_empty()) {
            return Err(Error::InvalidRequest(
                "LoRA adapters are not supported on diffusion-forcing (SkyReels-V2 DF) models yet"
                    .into(),
            ));
        }
        if let Some(cache) = &options.cache {
            let why = if diffusion_forcing {
                Some("diffusion-forcing (SkyReels-V2 DF) models")
            } else if vace {
                Some("VACE models")
            } else if transformer_2_config.is_some() {
                Some("two-expert (Wan2.2 A14B) models")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::InvalidRequest(format!(
                    "step caches (--cache {}) are not supported on {why}: the reference hooks \
                     them differently; run without --cache",
                    cache.name()
                )));
            }
            cache.validate()?;
        }
        if !options.lora_2.is_empty() && transformer_2_config.is_none() {
            return Err(Error::InvalidRequest(
                "adapters for transformer_2 need a two-expert model (Wan2.2 A14B); this folder has one transformer"
                    .into(),
            ));
        }
        let load_set = |specs: &[LoraSpec]| -> Result<Option<Arc<LoraSet>>> {
            Ok(if specs.is_empty() {
                None
            } else {
                Some(Arc::new(LoraSet::load(specs, options.lora_fuse)?))
            })
        };
        let lora = load_set(&options.lora)?;
        let lora_2 = load_set(&options.lora_2)?;
        if let Some(l) = &lora {
            l.check_blocks(transformer_config.num_layers, "this model's transformer")?;
        }
        if let (Some(l), Some(c)) = (&lora_2, &transformer_2_config) {
            l.check_blocks(c.num_layers, "this model's transformer_2")?;
        }
        if options.device.is_cpu() {
            // A small model runs on one thread (threads that wait for a busy neighbour's core
            // cost more than they give; see `device::SMALL_MODEL_BLOCK_PARAMS`).
            let cfg = &transformer_config;
            let d = cfg.num_attention_heads * cfg.attention_head_dim;
            let blocks = cfg.num_layers + cfg.vace_layers.as_ref().map_or(0, Vec::len);
            let block_params = blocks * (8 * d * d + 2 * d * cfg.ffn_dim);
            if let Some(n) = crate::device::choose_cpu_threads(block_params) {
                tracing::info!(
                    "small model ({:.1} M block parameters): {n} CPU thread (set \
                     RAYON_NUM_THREADS to choose)",
                    block_params as f64 / 1e6
                );
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            index,
            options,
            transformer_config,
            transformer_2_config,
            boundary_ratio,
            vae_config,
            scheduler,
            defaults,
            image_processor,
            text_encoder: None,
            image_encoder: None,
            diffusion_forcing,
            df_transformer: None,
            vace,
            transformer: None,
            transformer_2: None,
            vae: None,
            lora,
            lora_2,
            last_cache: None,
        })
    }

    /// With a step cache: the transformer forwards the last denoising loop ran and skipped
    /// (conditional and unconditional passes counted separately).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.last_cache.as_ref().map(|r| r.stats)
    }

    /// After a `mag:calibrate` run: the magnitude ratios it measured ("cond" context), one per
    /// step, for `--mag-ratios` of later runs.
    pub fn mag_calibration(&self) -> Option<&[f64]> {
        self.last_cache
            .as_ref()
            .and_then(|r| r.mag_ratios.as_deref())
    }

    /// The folder this pipeline was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn options(&self) -> &PipelineOptions {
        &self.options
    }

    /// The (first) transformer's config.
    pub fn transformer_config(&self) -> &transformer::Config {
        &self.transformer_config
    }

    /// The VAE's config.
    pub fn vae_config(&self) -> &vae::Config {
        &self.vae_config
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
        // Two images' CLIP tokens need the FLF2V image embedder (its pos_embed); without CLIP
        // (Wan2.2 I2V) the last image is only a latent frame.
        let two_images = self.transformer_config.image_dim.is_none()
            || self.transformer_config.pos_embed_seq_len.is_some();
        if self.diffusion_forcing {
            // Text, a first image (and a last one within one window), and continuing videos
            // from their last frames; not video-to-video restyling with a strength.
            return Capabilities {
                text: true,
                image: true,
                last_image: true,
                video: false,
                long_video: true,
                vace: false,
            };
        }
        if self.vace {
            // Text, images (as kept frames of a masked video), continuing from several frames,
            // masked edits and references; a video is edited through a mask, not a strength.
            return Capabilities {
                text: true,
                image: true,
                last_image: true,
                video: false,
                long_video: false,
                vace: true,
            };
        }
        Capabilities {
            text: !i2v,
            image: i2v || expand,
            last_image: i2v && !expand && two_images,
            video: !i2v,
            long_video: false,
            vace: false,
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
        let strength = match &req.conditioning {
            Conditioning::Video { strength, .. } => Some(*strength),
            _ => None,
        };
        let r = ResolvedRequest {
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
            conditioning: req.conditioning.kind().to_string(),
            strength,
        };
        self.check_conditioning(&req.conditioning, &r)?;
        Ok(r)
    }

    /// Checks that this model takes `c` and that its images or frames fit the request `r`.
    pub fn check_conditioning(&self, c: &Conditioning, r: &ResolvedRequest) -> Result<()> {
        let caps = self.capabilities();
        let fits = |what: &str, img: &RgbImage| -> Result<()> {
            if img.width != r.width
                || img.height != r.height
                || img.data.len() != img.width * img.height * 3
            {
                return Err(Error::InvalidRequest(format!(
                    "the {what} is {}×{} but the video is {}×{}; resize and crop it to the video's size first",
                    img.width, img.height, r.width, r.height
                )));
            }
            Ok(())
        };
        if let Conditioning::Vace(_) = c {
            if !caps.vace {
                let names = crate::registry::vace_model_names().join(", ");
                return Err(Error::InvalidRequest(format!(
                    "this model takes no mask or reference images; VACE models do ({names}, or a \
                     WanVACEPipeline folder)"
                )));
            }
        }
        // A VACE model checks images as every image model does (below); the rest as VACE.
        if caps.vace && !matches!(c, Conditioning::Image { .. }) {
            if let Conditioning::Continue { frames } = c {
                let k = self.vace_context_frames(r.num_frames).min(frames.len());
                for f in &frames[frames.len() - k..] {
                    fits("video to continue", f)?;
                }
                if r.num_frames <= k {
                    return Err(Error::InvalidRequest(format!(
                        "continuing a video with this model keeps its last {k} frames; ask for \
                         more than {k} frames"
                    )));
                }
                return Ok(());
            }
            let v = self.vace_condition(c, r)?;
            return self.check_vace(&v, r);
        }
        match c {
            Conditioning::Vace(_) => Ok(()), // VACE models returned above
            Conditioning::Text if !caps.text => Err(Error::InvalidRequest(
                "this is an image-to-video model: it needs a first image (--image FIRST.png, or \
                 input_reference in the API)"
                    .into(),
            )),
            Conditioning::Text => Ok(()),
            Conditioning::Image { .. } if !caps.image => Err(Error::InvalidRequest(format!(
                "this model makes video from text only and cannot start from an image; models \
                 that take one: {}",
                crate::registry::image_model_names().join(", ")
            ))),
            Conditioning::Image { last: Some(_), .. } if !caps.last_image => {
                let why = if self.index.expand_timesteps() {
                    "this model (Wan2.2 TI2V form) takes a first image only"
                } else {
                    "this model's image encoder takes one image (its image embedder has no pos_embed for two)"
                };
                Err(Error::InvalidRequest(format!(
                    "{why}; for a first and a last frame use a first–last-frame model ({})",
                    crate::registry::last_image_model_names().join(", ")
                )))
            }
            Conditioning::Image { first, last } => {
                fits("first image", first)?;
                if let Some(l) = last {
                    fits("last image", l)?;
                    let window = self.defaults.base_num_frames.unwrap_or(r.num_frames);
                    if self.diffusion_forcing && r.num_frames > window {
                        return Err(Error::InvalidRequest(format!(
                            "with a last image a diffusion-forcing model makes one window: at \
                             most {window} frames (asked for {}); leave out the last image for \
                             a longer video",
                            r.num_frames
                        )));
                    }
                    if r.num_frames < 2 {
                        return Err(Error::InvalidRequest(
                            "a first and a last image need at least 2 frames; try --frames 5"
                                .into(),
                        ));
                    }
                }
                Ok(())
            }
            Conditioning::Continue { .. } if !caps.image && !caps.long_video => {
                Err(Error::InvalidRequest(format!(
                    "this model cannot continue a video: it starts from neither an image nor \
                     earlier frames; models that can: {}",
                    crate::registry::continuing_model_names().join(", ")
                )))
            }
            Conditioning::Continue { frames } => {
                let last = frames.last().ok_or_else(|| {
                    Error::InvalidRequest("there are no frames to continue from".into())
                })?;
                fits("video to continue", last)?;
                if caps.long_video {
                    for f in frames {
                        fits("video to continue", f)?;
                    }
                }
                if r.num_frames < 2 {
                    return Err(Error::InvalidRequest(
                        "continuing a video needs at least 5 frames (the first repeats the given frame); try --frames 17".into(),
                    ));
                }
                Ok(())
            }
            Conditioning::Video { .. } if !caps.video && self.diffusion_forcing => {
                Err(Error::InvalidRequest(
                    "this diffusion-forcing model continues a video (kino extend, or the API's \
                     extensions) but does not restyle one with a strength; use a text-to-video \
                     model (e.g. wan2.1-t2v-1.3b) for video-to-video"
                        .into(),
                ))
            }
            Conditioning::Video { .. } if !caps.video => Err(Error::InvalidRequest(
                "this is an image-to-video model; it cannot restyle a video. Give it an image, \
                 or use a text-to-video model (e.g. wan2.1-t2v-1.3b) for video-to-video"
                    .into(),
            )),
            Conditioning::Video { frames, strength } => {
                if !strength.is_finite() || *strength <= 0.0 || *strength > 1.0 {
                    return Err(Error::InvalidRequest(format!(
                        "strength {strength} is outside (0, 1]: 1 ignores the source video, small \
                         values keep it almost unchanged; try 0.7"
                    )));
                }
                let (_, run) = schedulers::strength_start(r.num_inference_steps, *strength);
                if run == 0 {
                    return Err(Error::InvalidRequest(format!(
                        "strength {strength} with {} steps runs no denoising step (int(steps · \
                         strength) = 0); use a strength of at least {:.3} or more steps",
                        r.num_inference_steps,
                        1.0 / r.num_inference_steps as f64
                    )));
                }
                if frames.len() < r.num_frames {
                    return Err(Error::InvalidRequest(format!(
                        "the source video has {} frames but {} are needed; use fewer frames or a \
                         longer video",
                        frames.len(),
                        r.num_frames
                    )));
                }
                for f in &frames[..r.num_frames] {
                    fits("source video", f)?;
                }
                Ok(())
            }
        }
    }

    /// Latent shape `[1, z, F', H', W']` for a resolved request.
    pub fn latent_shape(&self, r: &ResolvedRequest) -> [usize; 5] {
        let s = self.vae_config.spatial_compression();
        [
            1,
            self.vae_config.z_dim,
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
        let [_, _, mut f, h, w] = self.latent_shape(r);
        if self.diffusion_forcing {
            // One window at a time.
            let base = self
                .defaults
                .base_num_frames
                .unwrap_or(self.defaults.num_frames);
            f = f.min((base.max(1) - 1) / self.frame_step() + 1);
        }
        let tokens = (f * (h / c.patch_size[1]) * (w / c.patch_size[2])) as u64;
        let dim = c.inner_dim() as u64;
        let dt = bytes(self.options.dtype);
        // A GGUF file's matrices stay in their blocks: the file's size, not the parameters'.
        let t_dir = component_dir(&self.root, &self.index, "transformer")?;
        let weights = match crate::loading::weight_files(&t_dir) {
            Ok(fs) if !fs.is_empty() && fs.iter().all(|f| crate::gguf::is_gguf(f)) => {
                file_bytes(&t_dir)
            }
            _ => c.num_params() as u64 * dt,
        };
        // Hidden states and their temporaries, the FFN intermediate, and one chunk of attention
        // scores (we compute attention in query chunks on the CPU).
        let act = tokens * dim * dt * 12
            + tokens * c.ffn_dim as u64 * dt * 2
            + (c.num_attention_heads as u64) * tokens.min(4096) * tokens * 4;
        // Two experts: one at a time in low-memory mode, both otherwise.
        let transformer = weights
            + act
            + match &self.transformer_2_config {
                Some(c2) if !self.options.low_memory => c2.num_params() as u64 * dt,
                _ => 0,
            };

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
        self.scheduler.set_shift(r.shift);
        if self.diffusion_forcing {
            let (latents, skip) = self.denoise_diffusion_forcing(
                &r,
                &prompt_embeds,
                negative_embeds.as_ref(),
                &req.conditioning,
                progress,
            )?;
            drop(prompt_embeds);
            drop(negative_embeds);
            // With a last image the latents end with its frame, which the reference drops
            // before decoding.
            let decode_latents = match &req.conditioning {
                Conditioning::Image { last: Some(_), .. } => {
                    latents.narrow(2, 0, latents.dim(2)? - 1)?
                }
                _ => latents.clone(),
            };
            let video = self.decode(&decode_latents, progress)?;
            drop(decode_latents);
            let mut frames = video_to_frames(&video)?;
            match &req.conditioning {
                Conditioning::Continue { .. } => {
                    // The decoded prefix repeats the end of the given video: keep the new frames.
                    frames.drain(..skip.min(frames.len()));
                    frames.truncate(r.num_frames - 1);
                }
                // A long image-to-video run is made with full windows (see
                // `denoise_diffusion_forcing`): keep the frames asked for.
                _ => frames.truncate(r.num_frames),
            }
            return Ok(GenerateOutput {
                frames,
                width: r.width,
                height: r.height,
                fps: r.fps,
                latents,
                request: r,
                cache_stats: None,
            });
        }
        if self.vace {
            return self.generate_vace(req, r, prompt_embeds, negative_embeds, progress);
        }
        let noise = self.prepare_latents(&r)?;
        let device = self.options.device.clone();
        let mut image_embeds = None;
        let continuing = matches!(req.conditioning, Conditioning::Continue { .. });
        let (latents, condition, t_start) = match &req.conditioning {
            Conditioning::Text => (noise, LatentCondition::None, 0),
            Conditioning::Continue { frames } => {
                let last = frames.last().ok_or_else(|| {
                    Error::InvalidRequest("there are no frames to continue from".into())
                })?;
                if self.transformer_config.image_dim.is_some() {
                    image_embeds = Some(self.encode_image(&[last], progress)?);
                }
                let first = image_to_tensor(last, &device)?;
                let cond = self.prepare_image_condition(&first, None, r.num_frames, progress)?;
                (noise, cond, 0)
            }
            Conditioning::Image { first, last } => {
                if self.transformer_config.image_dim.is_some() {
                    let mut images = vec![first];
                    images.extend(last.as_ref());
                    image_embeds = Some(self.encode_image(&images, progress)?);
                }
                let first = image_to_tensor(first, &device)?;
                let last = last
                    .as_ref()
                    .map(|l| image_to_tensor(l, &device))
                    .transpose()?;
                let cond =
                    self.prepare_image_condition(&first, last.as_ref(), r.num_frames, progress)?;
                (noise, cond, 0)
            }
            Conditioning::Vace(_) => {
                return Err(Error::InvalidRequest(
                    "this model takes no mask or reference images (a VACE model does)".into(),
                ))
            }
            Conditioning::Video { frames, strength } => {
                let video = frames_to_tensor(&frames[..r.num_frames], &device)?;
                let (latents, t_start) = self.prepare_video_latents(
                    &video,
                    &noise,
                    r.num_inference_steps,
                    *strength,
                    progress,
                )?;
                (latents, LatentCondition::None, t_start)
            }
        };
        if self.options.low_memory {
            self.vae = None;
        }
        let latents = self.denoise_with(
            DenoiseInputs {
                latents: &latents,
                prompt_embeds: &prompt_embeds,
                negative_prompt_embeds: negative_embeds.as_ref(),
                image_embeds: image_embeds.as_ref(),
                condition: &condition,
                num_inference_steps: r.num_inference_steps,
                guidance_scale: r.guidance_scale,
                guidance_scale_2: None,
                t_start,
            },
            progress,
        )?;
        drop(prompt_embeds);
        drop(negative_embeds);
        let video = self.decode(&latents, progress)?;
        let mut frames = video_to_frames(&video)?;
        if continuing {
            // Frame 0 reproduces the given last frame: the continuation starts after it.
            frames.remove(0);
        }
        Ok(GenerateOutput {
            frames,
            width: r.width,
            height: r.height,
            fps: r.fps,
            latents,
            request: r,
            cache_stats: self.cache_stats(),
        })
    }

    /// `generate` for a VACE model (`WanVACEPipeline.__call__` from step 5): control latents,
    /// noise with the reference frames in front, the shared loop, the reference frames dropped,
    /// decode; a continuation outputs only the frames after its context.
    fn generate_vace(
        &mut self,
        req: &GenerateRequest,
        r: ResolvedRequest,
        prompt_embeds: Tensor,
        negative_embeds: Option<Tensor>,
        progress: Progress,
    ) -> Result<GenerateOutput> {
        let v = self.vace_condition(&req.conditioning, &r)?;
        let scale = self.vace_scale(&v.conditioning_scale)?;
        let control = self.vace_control_for(&v, &r, progress)?;
        let refs = v.reference_images.len();
        let mut shape = self.latent_shape(&r);
        shape[2] += refs;
        let noise = self.noise(shape, r.seed)?;
        if self.options.low_memory {
            self.vae = None;
        }
        let latents = self.denoise_with(
            DenoiseInputs {
                latents: &noise,
                prompt_embeds: &prompt_embeds,
                negative_prompt_embeds: negative_embeds.as_ref(),
                image_embeds: None,
                condition: &LatentCondition::Vace { control, scale },
                num_inference_steps: r.num_inference_steps,
                guidance_scale: r.guidance_scale,
                guidance_scale_2: None,
                t_start: 0,
            },
            progress,
        )?;
        drop(prompt_embeds);
        drop(negative_embeds);
        let latents = latents.narrow(2, refs, latents.dim(2)? - refs)?;
        let video = self.decode(&latents, progress)?;
        let mut frames = video_to_frames(&video)?;
        if let (true, Some(source), Some(mask)) = (v.composite, &v.video, &v.mask) {
            crate::wan::pipeline_vace::apply_overlay(&mut frames, source, mask)?;
        }
        if let Conditioning::Continue { frames: given } = &req.conditioning {
            let k = self.vace_context_frames(r.num_frames).min(given.len());
            frames.drain(..k.min(frames.len()));
        }
        Ok(GenerateOutput {
            frames,
            width: r.width,
            height: r.height,
            fps: r.fps,
            latents,
            request: r,
            cache_stats: self.cache_stats(),
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
            let tok = component_dir(&self.root, &self.index, "tokenizer")?;
            let te = component_dir(&self.root, &self.index, "text_encoder")?;
            let (dtype, device) = (self.options.dtype, self.options.device.clone());
            self.text_encoder = Some(load_stage(progress, Stage::LoadTextEncoder, || {
                WanTextEncoder::load(&tok, &te, dtype, &device)
            })?);
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
        self.noise(self.latent_shape(r), r.seed)
    }

    /// f32 standard normal noise of `shape` from our seeded generator.
    pub(crate) fn noise(&self, shape: [usize; 5], seed: u64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::StandardNormal;
        let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(data, &shape[..], &self.options.device)?)
    }

    /// The diffusion-forcing args of a resolved request, from the folder's defaults.
    pub fn diffusion_forcing_args(&self, r: &ResolvedRequest) -> DiffusionForcingArgs {
        let d = &self.defaults;
        DiffusionForcingArgs {
            num_frames: r.num_frames,
            base_num_frames: d.base_num_frames.unwrap_or(d.num_frames),
            overlap_history: d.overlap_history,
            ar_step: d.ar_step,
            causal_block_size: d.causal_block_size,
            addnoise_condition: d.addnoise_condition,
            fps: r.fps,
            num_inference_steps: r.num_inference_steps,
            guidance_scale: r.guidance_scale,
            seed: r.seed,
        }
    }

    /// `SkyReelsV2DiffusionForcingPipeline.__call__` from the prompt embeddings to the latents
    /// of the whole video: windows of `base_num_frames`, each later one continuing from the last
    /// `overlap_history` frames, each window's noise from the run's seed (window k: seed + k).
    /// Continuing frames (`Conditioning::Continue`, `SkyReelsV2DiffusionForcingVideoToVideoPipeline`):
    /// the first window starts from their last `overlap_history` frames, encoded. A first image
    /// (and a last one; `SkyReelsV2DiffusionForcingImageToVideoPipeline`): each encoded alone as
    /// one latent frame; a long run is made with full windows (the reference fails on a shorter
    /// last one), i.e. up to the next full-window frame count, and the caller keeps the frames
    /// asked for. Returns the latents and how many decoded frames repeat the context (to drop).
    fn denoise_diffusion_forcing(
        &mut self,
        r: &ResolvedRequest,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: Option<&Tensor>,
        conditioning: &Conditioning,
        progress: Progress,
    ) -> Result<(Tensor, usize)> {
        let mut args = self.diffusion_forcing_args(r);
        let temporal = self.frame_step();
        let mut prefix = None;
        let mut images = None;
        let mut skip = 0;
        if let Conditioning::Image { first, last } = conditioning {
            let mut encode = |p: &mut Self, img: &RgbImage| -> Result<Tensor> {
                let x = image_to_tensor(img, &p.options.device)?.unsqueeze(2)?;
                p.encode_latents(&x, progress)
            };
            let f = encode(self, first)?;
            let l = last.as_ref().map(|l| encode(self, l)).transpose()?;
            args.num_frames = diffusion_forcing::full_window_frames(&args, temporal);
            images = Some((f, l));
        }
        if let Conditioning::Continue { frames } = conditioning {
            // The last 4k+1 frames, at most overlap_history (17 by default).
            let want = args.overlap_history.unwrap_or(17);
            let avail = (frames.len().max(1) - 1) / temporal * temporal + 1;
            let o = want.min(avail).max(1);
            let tail = frames_to_tensor(&frames[frames.len() - o..], &self.options.device)?;
            let z = self.encode_latents(&tail, progress)?;
            let p = z.dim(2)?;
            // Latents: the prefix and (num_frames − 1) / temporal new ones.
            let new_latents = (r.num_frames - 1).div_ceil(temporal).max(1);
            args.overlap_history = Some(o);
            args.num_frames = (p + new_latents - 1) * temporal + 1;
            skip = (p - 1) * temporal + 1;
            prefix = Some(z);
        }
        diffusion_forcing::check_args(&args, temporal)?;
        if self.df_transformer.is_none() {
            let dir = component_dir(&self.root, &self.index, "transformer")?;
            let (dtype, device) = (self.options.dtype, self.options.device.clone());
            self.df_transformer = Some(load_stage(progress, Stage::LoadTransformer, || {
                SkyReelsV2Transformer3DModel::load(&dir, dtype, &device)
            })?);
        }
        let shape = self.latent_shape(r);
        let device = self.options.device.clone();
        let seed = r.seed;
        if self.options.low_memory {
            self.vae = None;
        }
        let mut noise = |k: usize, frames: usize| -> Result<Tensor> {
            let shape = [shape[0], shape[1], frames, shape[3], shape[4]];
            let n: usize = shape.iter().product();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(k as u64));
            let data: Vec<f32> = (0..n)
                .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                .collect();
            Ok(Tensor::from_vec(data, &shape[..], &device)?)
        };
        // The pipeline's scheduler (shift set by `generate`) after `set_timesteps`: each latent
        // frame steps a copy of it.
        self.scheduler.set_timesteps(r.num_inference_steps)?;
        let mut model = self
            .df_transformer
            .take()
            .ok_or_else(|| Error::InvalidRequest("transformer not loaded".into()))?;
        let result = diffusion_forcing::denoise_long(
            &mut model,
            self.scheduler.as_ref(),
            &args,
            prompt_embeds,
            negative_prompt_embeds,
            temporal,
            &mut noise,
            match (&prefix, &images) {
                (Some(p), _) => DfCondition::Video(p),
                (None, Some((first, last))) => DfCondition::Image {
                    first,
                    last: last.as_ref(),
                },
                (None, None) => DfCondition::Text,
            },
            progress,
            &device,
            self.options.dtype,
        );
        if !self.options.low_memory {
            self.df_transformer = Some(model);
        }
        Ok((result?, skip))
    }

    /// Loads expert `which` (1: `transformer`, 2: `transformer_2`); in low-memory mode the
    /// other expert is freed first.
    fn load_transformer(&mut self, which: usize, progress: Progress) -> Result<()> {
        let loaded = if which == 1 {
            self.transformer.is_some()
        } else {
            self.transformer_2.is_some()
        };
        if loaded {
            return Ok(());
        }
        if self.options.low_memory {
            self.transformer = None;
            self.transformer_2 = None;
        }
        let name = if which == 1 {
            "transformer"
        } else {
            "transformer_2"
        };
        let dir = component_dir(&self.root, &self.index, name)?;
        let (dtype, device) = (self.options.dtype, self.options.device.clone());
        let vace = self.vace;
        // `--lora` adapters go into `transformer`, `--lora-2` ones into `transformer_2` (as
        // `load_lora_weights` with `load_into_transformer_2`).
        let lora = if which == 1 {
            self.lora.clone()
        } else {
            self.lora_2.clone()
        };
        let model = load_stage(progress, Stage::LoadTransformer, || {
            if vace {
                WanVACETransformer3DModel::load_with_lora(&dir, dtype, &device, lora)
                    .map(Denoiser::Vace)
            } else {
                WanTransformer3DModel::load_with_lora(&dir, dtype, &device, lora).map(Denoiser::Wan)
            }
        })?;
        if which == 1 {
            self.transformer = Some(model);
        } else {
            self.transformer_2 = Some(model);
        }
        Ok(())
    }

    /// The denoising loop of `__call__` for text-to-video (section 6): from initial latents and
    /// prompt embeddings to the final latents (f32). Uses the scheduler as configured (see
    /// [`Self::set_shift`]).
    pub fn denoise(
        &mut self,
        latents: &Tensor,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: Option<&Tensor>,
        num_inference_steps: usize,
        guidance_scale: f64,
        progress: Progress,
    ) -> Result<Tensor> {
        self.denoise_with(
            DenoiseInputs {
                latents,
                prompt_embeds,
                negative_prompt_embeds,
                image_embeds: None,
                condition: &LatentCondition::None,
                num_inference_steps,
                guidance_scale,
                guidance_scale_2: None,
                t_start: 0,
            },
            progress,
        )
    }

    /// The denoising loop for every conditioning: text (`WanPipeline`), image
    /// (`WanImageToVideoPipeline`, both forms, two experts) and video
    /// (`WanVideoToVideoPipeline`, from `t_start`).
    pub fn denoise_with(&mut self, inp: DenoiseInputs, progress: Progress) -> Result<Tensor> {
        let guidance_scale = inp.guidance_scale;
        let do_cfg = guidance_scale > 1.0;
        if do_cfg && inp.negative_prompt_embeds.is_none() {
            return Err(Error::InvalidRequest(
                "guidance scale > 1 needs negative prompt embeddings".into(),
            ));
        }
        let dims = inp.latents.dims().to_vec();
        let c = self.transformer_config.clone();
        let z = self.vae_config.z_dim;
        if dims.len() != 5 || dims[1] != z {
            return Err(Error::InvalidRequest(format!(
                "latents must be [B, {z}, F, H, W], got {dims:?}"
            )));
        }
        let (ph, pw) = (c.patch_size[1], c.patch_size[2]);
        if !dims[3].is_multiple_of(ph) || !dims[4].is_multiple_of(pw) {
            return Err(Error::InvalidRequest(format!(
                "latent height and width {}×{} must be multiples of the patch size {ph}×{pw}",
                dims[3], dims[4]
            )));
        }
        let (batch, frames) = (dims[0], dims[2]);
        let wants_channels = c.in_channels == 2 * z + 4;
        match inp.condition {
            LatentCondition::Channels(cond) => {
                let cd = cond.dims();
                if !wants_channels
                    || cd.len() != 5
                    || cd[0] != batch
                    || cd[1] != z + 4
                    || cd[2..] != dims[2..]
                {
                    return Err(Error::InvalidRequest(format!(
                        "the mask and condition latents {cd:?} do not fit latents {dims:?} for a \
                         transformer with {} input channels",
                        c.in_channels
                    )));
                }
            }
            LatentCondition::Vace { control, scale } => {
                let cd = control.dims();
                let vc = c.vace_in_channels.unwrap_or(0);
                if !self.vace {
                    return Err(Error::InvalidRequest(
                        "VACE control latents need a VACE model (WanVACEPipeline)".into(),
                    ));
                }
                if cd.len() != 5
                    || cd[0] != batch
                    || cd[1] != vc
                    || cd[2] > dims[2]
                    || cd[3..] != dims[3..]
                {
                    return Err(Error::InvalidRequest(format!(
                        "the VACE control latents {cd:?} do not fit latents {dims:?} (expected \
                         [{batch}, {vc}, ≤{}, {}, {}])",
                        dims[2], dims[3], dims[4]
                    )));
                }
                let layers = c.vace_layers.as_ref().map_or(0, Vec::len);
                if scale.len() != layers {
                    return Err(Error::InvalidRequest(format!(
                        "{} conditioning scales for {layers} VACE layers",
                        scale.len()
                    )));
                }
            }
            _ if self.vace => {
                return Err(Error::InvalidRequest(
                    "a VACE model needs its control latents (a masked video, references, or the \
                     empty condition of text-to-video)"
                        .into(),
                ))
            }
            _ if wants_channels => {
                return Err(Error::InvalidRequest(
                    "this image-to-video transformer needs the mask and condition latents of a \
                     first image"
                        .into(),
                ))
            }
            LatentCondition::FirstFrame(cond) => {
                let cd = cond.dims();
                if cd.len() != 5
                    || cd[0] != batch
                    || cd[1] != z
                    || cd[2] != 1
                    || cd[3..] != dims[3..]
                {
                    return Err(Error::InvalidRequest(format!(
                        "the first-frame latent {cd:?} does not fit latents {dims:?}"
                    )));
                }
                if !self.index.expand_timesteps() {
                    return Err(Error::InvalidRequest(
                        "a first-frame latent needs an expand_timesteps model (Wan2.2 TI2V)".into(),
                    ));
                }
            }
            LatentCondition::None => {}
        }
        if c.image_dim.is_some() && inp.image_embeds.is_none() {
            return Err(Error::InvalidRequest(
                "this transformer reads image embeddings (image_dim is set): give the image \
                 encoder's output (image_embeds)"
                    .into(),
            ));
        }
        let dtype = self.options.dtype;
        let device = self.options.device.clone();
        let seq_len = frames * (dims[3] / ph) * (dims[4] / pw);
        let tokens_per_frame = seq_len / frames;
        let prompt_embeds = inp.prompt_embeds.to_device(&device)?.to_dtype(dtype)?;
        let negative = match inp.negative_prompt_embeds {
            Some(n) if do_cfg => Some(n.to_device(&device)?.to_dtype(dtype)?),
            _ => None,
        };
        let image_embeds = match inp.image_embeds {
            Some(e) if c.image_dim.is_some() => Some(e.to_device(&device)?.to_dtype(dtype)?),
            _ => None,
        };
        // A step cache keeps one state per pass ("cond", "uncond"): the passes run apart.
        let mut cache = match &self.options.cache {
            Some(cfg) => Some(StepCache::new(
                cfg,
                c.num_layers,
                c.added_kv_proj_dim.is_some(),
                inp.num_inference_steps.saturating_sub(inp.t_start),
            )?),
            None => None,
        };
        self.last_cache = None;
        let batched = self.options.batched_cfg && negative.is_some() && cache.is_none();
        // Batched guidance: [prompt; negative] along the batch, built once (the image tokens,
        // the same for both, repeated).
        let both = match &negative {
            Some(n) if batched => Some(Tensor::cat(&[&prompt_embeds, n], 0)?),
            _ => None,
        };
        let both_images = match &image_embeds {
            Some(e) if batched => Some(Tensor::cat(&[e, e], 0)?),
            _ => None,
        };
        let condition = match inp.condition {
            LatentCondition::None | LatentCondition::Vace { .. } => None,
            LatentCondition::FirstFrame(t) | LatentCondition::Channels(t) => {
                Some(t.to_device(&device)?.to_dtype(DType::F32)?)
            }
        };
        // VACE: `conditioning_latents.to(transformer_dtype)`, the same at every step; batched
        // guidance repeats it for the negative half.
        let (vace_control, vace_scale) = match inp.condition {
            LatentCondition::Vace { control, scale } => (
                Some(control.to_device(&device)?.to_dtype(dtype)?),
                scale.as_slice(),
            ),
            _ => (None, &[][..]),
        };
        let vace_both = match &vace_control {
            Some(c) if batched => Some(Tensor::cat(&[c, c], 0)?),
            _ => None,
        };
        let control = vace_control.as_ref().map(|c| (c, vace_scale));
        let control_both = vace_both.as_ref().map(|c| (c, vace_scale));

        self.scheduler.set_timesteps(inp.num_inference_steps)?;
        let timesteps = self.scheduler.timesteps().to_vec();
        if inp.t_start >= timesteps.len() {
            return Err(Error::InvalidRequest(format!(
                "t_start {} leaves none of the {} steps",
                inp.t_start,
                timesteps.len()
            )));
        }
        let run = timesteps[inp.t_start..].to_vec();
        // WanPipeline calls `set_begin_index(0)`; video-to-video does not, so there the
        // scheduler finds its first index from the first timestep (`_init_step_index`). (The
        // image-to-video pipeline does not either, but from step 0 the lookup only differs when
        // the schedule repeats its first timestep, where the reference fails; Kino starts at 0.)
        let begin = if inp.t_start == 0 {
            0
        } else {
            schedulers::index_for_timestep(&timesteps, run[0])
        };
        if begin + run.len() > timesteps.len() {
            return Err(Error::InvalidRequest(format!(
                "the schedule repeats timestep {} so the reference would step past its end; use another number of steps",
                run[0]
            )));
        }
        self.scheduler.set_begin_index(begin)?;
        let boundary = self
            .boundary_ratio
            .map(|r| r * self.scheduler.num_train_timesteps() as f64);
        let expand = self.index.expand_timesteps();
        let first_frame = matches!(inp.condition, LatentCondition::FirstFrame(_));
        let mut latents = inp.latents.to_device(&device)?.to_dtype(DType::F32)?;
        let t0 = Instant::now();
        emit(progress, Stage::Denoise, 0, run.len(), t0)?;
        for (i, &t) in run.iter().enumerate() {
            let low_noise = matches!(boundary, Some(b) if t < b);
            let (which, g) = if low_noise {
                (2, inp.guidance_scale_2.unwrap_or(guidance_scale))
            } else {
                (1, guidance_scale)
            };
            self.load_transformer(which, progress)?;
            crate::calibration::set_component(if which == 1 {
                "transformer"
            } else {
                "transformer_2"
            });
            let model = if which == 1 {
                self.transformer.as_ref()
            } else {
                self.transformer_2.as_ref()
            }
            .ok_or_else(|| Error::InvalidRequest("transformer not loaded".into()))?;

            let latent_model_input = match (&condition, first_frame) {
                // (1 − mask)·condition + mask·latents, mask 0 on latent frame 0 only.
                (Some(cond), true) => {
                    if frames > 1 {
                        Tensor::cat(&[cond, &latents.narrow(2, 1, frames - 1)?], 2)?
                    } else {
                        cond.clone()
                    }
                }
                (Some(cond), false) => Tensor::cat(&[&latents, cond], 1)?,
                (None, _) => latents.clone(),
            }
            .to_dtype(dtype)?;
            let timestep = if expand {
                // (mask[0][0][:, ::2, ::2] · t).flatten(): 0 for frame-0 tokens of an image.
                // diffusers strides by 2, the 1×2×2 patch of Wan2.2 TI2V 5B; this is the same
                // mask on the model's own token grid (kino-shapes: 1×4×4), as
                // fixtures/gen_kino_shapes.py's `restride_expanded_timesteps` gives the reference.
                let mut ts = vec![t as f32; seq_len];
                if first_frame {
                    ts[..tokens_per_frame].iter_mut().for_each(|v| *v = 0.0);
                }
                Tensor::from_vec(ts, seq_len, &device)?
                    .unsqueeze(0)?
                    .repeat((batch, 1))?
            } else {
                Tensor::full(t as f32, batch, &device)?
            };
            let mut forward = |context: &Tensor, name: &str| -> Result<Tensor> {
                match cache.as_mut() {
                    Some(cache) => {
                        cache.set_context(name);
                        model.forward_cached(
                            &latent_model_input,
                            &timestep,
                            context,
                            image_embeds.as_ref(),
                            cache,
                        )
                    }
                    None => model.forward(
                        &latent_model_input,
                        &timestep,
                        context,
                        image_embeds.as_ref(),
                        control,
                    ),
                }
            };
            let noise_pred = match (&both, &negative) {
                (Some(both), _) => {
                    let x = Tensor::cat(&[&latent_model_input, &latent_model_input], 0)?;
                    let ts = Tensor::cat(&[&timestep, &timestep], 0)?;
                    let out = model.forward(&x, &ts, both, both_images.as_ref(), control_both)?;
                    let cond = out.narrow(0, 0, batch)?;
                    let uncond = out.narrow(0, batch, batch)?;
                    (&uncond + ((cond - &uncond)? * g)?)?
                }
                (None, Some(neg)) => {
                    let cond = forward(&prompt_embeds, "cond")?;
                    let uncond = forward(neg, "uncond")?;
                    // noise_uncond + g · (noise_pred − noise_uncond)
                    (&uncond + ((cond - &uncond)? * g)?)?
                }
                (None, None) => forward(&prompt_embeds, "cond")?,
            };
            latents = self.scheduler.step(&noise_pred, begin + i, &latents)?;
            emit(progress, Stage::Denoise, i + 1, run.len(), t0)?;
        }
        if let (Some(cond), true) = (&condition, first_frame) {
            latents = if frames > 1 {
                Tensor::cat(&[cond, &latents.narrow(2, 1, frames - 1)?], 2)?
            } else {
                cond.clone()
            };
        }
        if let Some(cache) = cache {
            let report = cache.finish();
            tracing::info!("{}", report.stats.message());
            self.last_cache = Some(report);
        }
        if self.options.low_memory {
            self.transformer = None;
            self.transformer_2 = None;
        }
        Ok(latents)
    }

    /// Loads the VAE if it is not loaded.
    fn load_vae(&mut self, progress: Progress) -> Result<()> {
        if self.vae.is_none() {
            let dir = component_dir(&self.root, &self.index, "vae")?;
            let (dtype, device) = (self.options.vae_dtype, self.options.device.clone());
            let tiling = self.options.vae_tiling;
            self.vae = Some(load_stage(progress, Stage::LoadVae, || {
                let mut vae = AutoencoderKLWan::load(&dir, dtype, &device)?;
                vae.set_tiling(tiling);
                Ok(vae)
            })?);
        }
        Ok(())
    }

    /// `latents_mean` and `1 / latents_std` as `[1, z, 1, 1, 1]` in `dtype` (the reference
    /// computes `1 / std` first).
    fn latent_stats(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let cfg = &self.vae_config;
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
        let mean = Tensor::from_vec(mean, (1, z, 1, 1, 1), device)?.to_dtype(dtype)?;
        let inv_std = (1.0 / Tensor::from_vec(std, (1, z, 1, 1, 1), device)?)?.to_dtype(dtype)?;
        Ok((mean, inv_std))
    }

    /// The VAE encoding of a video `[B, 3, F, H, W]` in [-1, 1] as the pipelines use it:
    /// `retrieve_latents(..., sample_mode="argmax")` (the mean), then
    /// `(latents − latents_mean) · (1 / latents_std)`; f32 `[B, z, T, h, w]`.
    pub fn encode_latents(&mut self, video: &Tensor, progress: Progress) -> Result<Tensor> {
        self.load_vae(progress)?;
        let vae = self
            .vae
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("VAE not loaded".into()))?;
        let t0 = Instant::now();
        emit(progress, Stage::EncodeImage, 0, 1, t0)?;
        let x = video
            .to_device(&self.options.device)?
            .to_dtype(self.options.vae_dtype)?;
        let (mean, _logvar) = crate::memory::lean(|| vae.encode(&x))?;
        let z = mean.to_dtype(DType::F32)?;
        let (m, inv_std) = self.latent_stats(DType::F32)?;
        let z = z.broadcast_sub(&m)?.broadcast_mul(&inv_std)?;
        emit(progress, Stage::EncodeImage, 1, 1, t0)?;
        Ok(z)
    }

    /// `prepare_latents` of `WanImageToVideoPipeline` from the preprocessed image(s)
    /// `[1, 3, H, W]` in [-1, 1]: TI2V (`expand_timesteps`) encodes the image alone as latent
    /// frame 0; the I2V form encodes `[image, zeros…, (last_image)]` as a whole clip and puts the
    /// mask in front of it (latent frame 0 all ones; with a last image the last latent frame
    /// `[0, 0, 0, 1]`).
    pub fn prepare_image_condition(
        &mut self,
        image: &Tensor,
        last_image: Option<&Tensor>,
        num_frames: usize,
        progress: Progress,
    ) -> Result<LatentCondition> {
        let (b, ch, h, w) = image.dims4().map_err(|_| {
            Error::InvalidRequest(format!(
                "image has shape {:?}; expected [1, 3, height, width]",
                image.dims()
            ))
        })?;
        if b != 1 || ch != 3 {
            return Err(Error::InvalidRequest(format!(
                "image has shape {:?}; expected [1, 3, height, width]",
                image.dims()
            )));
        }
        if let Some(l) = last_image {
            if l.dims() != image.dims() {
                return Err(Error::InvalidRequest(format!(
                    "last_image has shape {:?} but image has {:?}; they must be equal",
                    l.dims(),
                    image.dims()
                )));
            }
        }
        let device = self.options.device.clone();
        let image = image
            .to_device(&device)?
            .to_dtype(DType::F32)?
            .unsqueeze(2)?;
        if self.index.expand_timesteps() {
            // TI2V: last_image is ignored by the reference; `resolve` refuses it for users.
            let z = self.encode_latents(&image, progress)?;
            return Ok(LatentCondition::FirstFrame(z));
        }
        let z_dim = self.vae_config.z_dim;
        if self.transformer_config.in_channels != 2 * z_dim + 4 {
            return Err(Error::InvalidRequest(format!(
                "this model makes video from text only and cannot start from an image; models \
                 that take one: {}",
                crate::registry::image_model_names().join(", ")
            )));
        }
        let tf = self.vae_config.temporal_compression();
        if num_frames == 0
            || !(num_frames - 1).is_multiple_of(tf)
            || (last_image.is_some() && num_frames < 2)
        {
            return Err(Error::InvalidRequest(format!(
                "{num_frames} frames is not a valid frame count for this model ({tf}·k + 1)"
            )));
        }
        let zeros = |n: usize| Tensor::zeros((1, 3, n, h, w), DType::F32, &device);
        let video = match last_image {
            None => Tensor::cat(&[image.clone(), zeros(num_frames - 1)?], 2)?,
            Some(l) => {
                let l = l.to_device(&device)?.to_dtype(DType::F32)?.unsqueeze(2)?;
                Tensor::cat(&[image.clone(), zeros(num_frames - 2)?, l], 2)?
            }
        };
        let z = self.encode_latents(&video, progress)?;
        let (_, _, t, lh, lw) = z.dims5()?;
        // mask_lat_size: pixel frame 0 repeated tf times, then frames 1..F-1, viewed
        // (B, T, tf, h, w) and transposed to (B, tf, T, h, w).
        let mut mask = vec![0f32; tf * t * lh * lw];
        for c in 0..tf {
            for ti in 0..t {
                let j = ti * tf + c; // position on the concatenated time axis
                let pixel = if j < tf { 0 } else { j - tf + 1 };
                let on = pixel == 0 || (last_image.is_some() && pixel == num_frames - 1);
                if on {
                    let base = (c * t + ti) * lh * lw;
                    mask[base..base + lh * lw].iter_mut().for_each(|v| *v = 1.0);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (1, tf, t, lh, lw), &device)?;
        Ok(LatentCondition::Channels(Tensor::cat(&[&mask, &z], 1)?))
    }

    /// `get_timesteps` and `prepare_latents` of `WanVideoToVideoPipeline`: the source video
    /// `[1, 3, F, H, W]` in [-1, 1] encoded and normalised, then noised to the first kept
    /// timestep with `noise` (latent-shaped). Returns the initial latents and `t_start`.
    pub fn prepare_video_latents(
        &mut self,
        video: &Tensor,
        noise: &Tensor,
        num_inference_steps: usize,
        strength: f64,
        progress: Progress,
    ) -> Result<(Tensor, usize)> {
        if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
            return Err(Error::InvalidRequest(format!(
                "strength {strength} is outside (0, 1]; try 0.7"
            )));
        }
        let (t_start, run) = schedulers::strength_start(num_inference_steps, strength);
        if run == 0 {
            return Err(Error::InvalidRequest(format!(
                "strength {strength} with {num_inference_steps} steps runs no denoising step"
            )));
        }
        let init = self.encode_latents(video, progress)?;
        if init.dims() != noise.dims() {
            return Err(Error::InvalidRequest(format!(
                "noise has shape {:?} but the encoded video has {:?}",
                noise.dims(),
                init.dims()
            )));
        }
        self.scheduler.set_timesteps(num_inference_steps)?;
        let timesteps = self.scheduler.timesteps().to_vec();
        let index = schedulers::index_for_timestep(&timesteps, timesteps[t_start]);
        let noise = noise
            .to_device(&self.options.device)?
            .to_dtype(DType::F32)?;
        let latents = self.scheduler.add_noise(&init, &noise, index)?;
        Ok((latents, t_start))
    }

    /// `encode_image` of `WanImageToVideoPipeline`: the folder's CLIP preprocessing and the
    /// image encoder's penultimate hidden states, `[N, S, image_dim]` for N images (first, and
    /// last).
    pub fn encode_image(&mut self, images: &[&RgbImage], progress: Progress) -> Result<Tensor> {
        let processor = self
            .image_processor
            .clone()
            .ok_or_else(|| Error::InvalidRequest("this model has no image encoder".into()))?;
        if self.image_encoder.is_none() {
            let dir = component_dir(&self.root, &self.index, "image_encoder")?;
            let (dtype, device) = (self.options.dtype, self.options.device.clone());
            self.image_encoder = Some(load_stage(progress, Stage::LoadTextEncoder, || {
                CLIPVisionModel::load(&dir, dtype, &device)
            })?);
        }
        let encoder = self
            .image_encoder
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("image encoder not loaded".into()))?;
        let t0 = Instant::now();
        emit(progress, Stage::EncodeImage, 0, 1, t0)?;
        let pixel_values = clip::preprocess(&processor, images, &self.options.device)?;
        let embeds = encoder.penultimate_hidden_states(&pixel_values)?;
        emit(progress, Stage::EncodeImage, 1, 1, t0)?;
        if self.options.low_memory {
            self.image_encoder = None;
        }
        Ok(embeds)
    }

    /// Overrides the scheduler's shift (flow_shift) for the next `denoise`.
    pub fn set_shift(&mut self, shift: f64) {
        self.scheduler.set_shift(shift);
    }

    /// `latents / latents_std + latents_mean` then the VAE decode: video in [-1, 1],
    /// `[B, 3, F, H, W]` f32.
    pub fn decode(&mut self, latents: &Tensor, progress: Progress) -> Result<Tensor> {
        self.load_vae(progress)?;
        let vdt = self.options.vae_dtype;
        let (mean, inv_std) = self.latent_stats(vdt)?;
        let vae = self
            .vae
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("VAE not loaded".into()))?;
        let latents = latents.to_device(&self.options.device)?.to_dtype(vdt)?;
        let latents = latents.broadcast_div(&inv_std)?.broadcast_add(&mean)?;
        let t0 = Instant::now();
        let total = latents.dim(2)?;
        emit(progress, Stage::DecodeVae, 0, total, t0)?;
        let mut cb = |done: usize, total: usize| emit(progress, Stage::DecodeVae, done, total, t0);
        // Lean: the VAE's few, large frame buffers (see `crate::memory`).
        let video = crate::memory::lean(|| vae.decode_with_progress(&latents, &mut cb))?;
        Ok(video.to_dtype(DType::F32)?)
    }
}

/// `VideoProcessor.preprocess` of an RGB image already at the target size:
/// `np.array(image).astype(np.float32) / 255`, then `2·x − 1`; `[1, 3, H, W]` f32.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width, img.height);
    if img.data.len() != w * h * 3 {
        return Err(Error::InvalidRequest(format!(
            "an RGB image of {w}×{h} needs {} bytes, got {}",
            w * h * 3,
            img.data.len()
        )));
    }
    let mut planes = vec![0f32; 3 * h * w];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = px[c] as f32 / 255.0;
            planes[c * h * w + i] = 2.0 * x - 1.0;
        }
    }
    Ok(Tensor::from_vec(planes, (1, 3, h, w), device)?)
}

/// Frames of one size as a video `[1, 3, F, H, W]` in [-1, 1] (`preprocess_video`).
pub fn frames_to_tensor(frames: &[RgbImage], device: &Device) -> Result<Tensor> {
    let ts = frames
        .iter()
        .map(|f| {
            image_to_tensor(f, device)?
                .unsqueeze(2)
                .map_err(Error::from)
        })
        .collect::<Result<Vec<_>>>()?;
    if ts.is_empty() {
        return Err(Error::InvalidRequest(
            "the source video has no frames".into(),
        ));
    }
    Ok(Tensor::cat(&ts, 2)?)
}

/// Loads a model as a progress stage: an event before and one after.
fn load_stage<T>(progress: Progress, stage: Stage, load: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    emit(progress, stage, 0, 1, t0)?;
    let model = crate::memory::lean(load)?;
    emit(progress, stage, 1, 1, t0)?;
    Ok(model)
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
    if crate::loading::DIFFUSION_FORCING_PIPELINES.contains(&index.class_name.as_str()) {
        // SkyReels-V2 DF 540P, as its model card runs it: 960×544, windows of 97 frames at
        // 24 fps continuing from the last 17, 30 steps, guidance 6, added noise 20 (720P
        // checkpoints: pass --size 1280x720).
        d.width = 960;
        d.height = 544;
        d.num_frames = 97;
        d.fps = 24;
        d.num_inference_steps = 30;
        d.guidance_scale = 6.0;
        d.base_num_frames = Some(97);
        d.overlap_history = Some(17);
        d.addnoise_condition = 20.0;
        return Ok(d);
    }
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
        crate::testing::copy_dir(&root, &tmp).unwrap();
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

    fn image(w: usize, h: usize, seed: u8) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| ((i * 7 + seed as usize * 31) % 251) as u8)
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    fn with(c: Conditioning, r: GenerateRequest) -> GenerateRequest {
        GenerateRequest {
            conditioning: c,
            ..r
        }
    }

    fn err(p: &WanPipeline, r: &GenerateRequest) -> String {
        p.resolve(r).expect_err("refused").to_string()
    }

    #[test]
    fn capabilities_follow_the_folder() {
        let caps = |case: &str| open(case).capabilities();
        let c = caps("pipeline-wan21");
        assert!(c.text && c.video && !c.image && !c.last_image);
        let c = caps("pipeline-ti2v");
        assert!(c.text && c.image && !c.last_image && c.video);
        let c = caps("pipeline-i2v-wan21");
        assert!(!c.text && c.image && !c.last_image && !c.video);
        let c = caps("pipeline-flf2v");
        assert!(!c.text && c.image && c.last_image);
        let c = caps("pipeline-a14b-i2v");
        assert!(
            c.image && c.last_image,
            "no CLIP: the last image is only a latent frame"
        );
        let c = caps("pipeline-a14b-t2v");
        assert!(c.text && !c.image);
    }

    #[test]
    fn conditioning_is_checked_against_the_model() {
        let t2v = open("pipeline-wan21");
        let (w, h) = (t2v.defaults().width, t2v.defaults().height);
        let e = err(
            &t2v,
            &with(
                Conditioning::Image {
                    first: image(w, h, 1),
                    last: None,
                },
                req("x"),
            ),
        );
        assert!(
            e.contains("text only") && e.contains("kino-shapes") && e.contains("wan2.2-ti2v-5b"),
            "{e}"
        );
        let video = |n: usize, strength: f64| Conditioning::Video {
            frames: (0..n).map(|i| image(w, h, i as u8)).collect(),
            strength,
        };
        for s in [0.0, -0.5, 1.5, f64::NAN] {
            let e = err(&t2v, &with(video(17, s), req("x")));
            assert!(e.contains("outside (0, 1]"), "{s}: {e}");
        }
        let e = err(
            &t2v,
            &with(
                video(17, 0.1),
                GenerateRequest {
                    num_inference_steps: Some(4),
                    ..req("x")
                },
            ),
        );
        assert!(
            e.contains("runs no denoising step") && e.contains("0.250"),
            "{e}"
        );
        let e = err(&t2v, &with(video(9, 0.7), req("x")));
        assert!(e.contains("has 9 frames but 17 are needed"), "{e}");
        let e = err(
            &t2v,
            &with(
                Conditioning::Video {
                    frames: vec![image(w + 16, h, 0); 17],
                    strength: 0.7,
                },
                req("x"),
            ),
        );
        assert!(e.contains("resize and crop"), "{e}");
        let r = t2v.resolve(&with(video(20, 0.7), req("x"))).unwrap();
        assert_eq!((r.conditioning.as_str(), r.strength), ("video", Some(0.7)));

        let ti2v = open("pipeline-ti2v");
        let (w, h) = (ti2v.defaults().width, ti2v.defaults().height);
        let e = err(
            &ti2v,
            &with(
                Conditioning::Image {
                    first: image(w, h, 1),
                    last: Some(image(w, h, 2)),
                },
                req("x"),
            ),
        );
        assert!(
            e.contains("first image only") && e.contains("wan2.1-flf2v-14b-720p"),
            "{e}"
        );
        let e = err(
            &ti2v,
            &with(
                Conditioning::Image {
                    first: image(w, h / 2, 1),
                    last: None,
                },
                req("x"),
            ),
        );
        assert!(e.contains(&format!("is {w}×{}", h / 2)), "{e}");

        let i2v = open("pipeline-i2v-wan21");
        let e = err(&i2v, &req("x"));
        assert!(e.contains("needs a first image"), "{e}");
        let (w, h) = (i2v.defaults().width, i2v.defaults().height);
        let e = err(&i2v, &with(video(17, 0.5), req("x")));
        assert!(e.contains("cannot restyle a video"), "{e}");
        let e = err(
            &i2v,
            &with(
                Conditioning::Image {
                    first: image(w, h, 1),
                    last: Some(image(w, h, 2)),
                },
                req("x"),
            ),
        );
        assert!(e.contains("takes one image"), "{e}");
    }

    fn count_loads(events: &[(Stage, usize, usize)]) -> usize {
        events
            .iter()
            .filter(|e| e.0 == Stage::LoadTransformer && e.1 == 1)
            .count()
    }

    #[test]
    fn image_to_video_runs_every_form() {
        for (case, last) in [
            ("pipeline-ti2v", false),
            ("pipeline-i2v-wan21", false),
            ("pipeline-flf2v", true),
            ("pipeline-a14b-i2v", true),
        ] {
            let mut p = open(case);
            let (w, h) = (p.defaults().width, p.defaults().height);
            let first = image(w, h, 3);
            let r = with(
                Conditioning::Image {
                    first: first.clone(),
                    last: last.then(|| image(w, h, 4)),
                },
                GenerateRequest {
                    num_inference_steps: Some(2),
                    ..req("a red circle")
                },
            );
            let mut events = Vec::new();
            let out = p
                .generate(&r, &mut |e: &ProgressEvent| {
                    events.push((e.stage, e.step, e.total));
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(out.frames.len(), p.defaults().num_frames, "{case}");
            assert_eq!(
                out.request.conditioning,
                if last { "first-last image" } else { "image" }
            );
            assert!(events.iter().any(|e| e.0 == Stage::EncodeImage), "{case}");
            // The same image gives the same video; another image another one.
            let again = p.generate(&r, &mut crate::progress::ignore).unwrap();
            assert_eq!(
                crate::testing::rel_error(&again.latents, &out.latents).unwrap(),
                0.0
            );
            let other = with(
                Conditioning::Image {
                    first: image(w, h, 9),
                    last: last.then(|| image(w, h, 4)),
                },
                r.clone(),
            );
            let other = p.generate(&other, &mut crate::progress::ignore).unwrap();
            assert!(
                crate::testing::rel_error(&other.latents, &out.latents).unwrap() > 1e-3,
                "{case}: the image changes nothing"
            );
            if case == "pipeline-ti2v" {
                // Latent frame 0 is the image's own latent, exactly.
                let img = image_to_tensor(&first, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap();
                let z = p
                    .encode_latents(&img, &mut crate::progress::ignore)
                    .unwrap();
                let f0 = out.latents.narrow(2, 0, 1).unwrap();
                assert_eq!(crate::testing::rel_error(&f0, &z).unwrap(), 0.0);
            }
            if case == "pipeline-a14b-i2v" {
                // Low-memory mode: the high-noise expert, then the low-noise one, each once.
                assert_eq!(count_loads(&events), 2, "{events:?}");
                assert!(p.transformer.is_none() && p.transformer_2.is_none());
            }
        }
    }

    #[test]
    fn two_experts_switch_at_the_boundary() {
        let mut p = open("pipeline-a14b-t2v");
        let mut events = Vec::new();
        let r = GenerateRequest {
            num_inference_steps: Some(5),
            ..req("x")
        };
        p.generate(&r, &mut |e: &ProgressEvent| {
            events.push((e.stage, e.step, e.total));
            Ok(())
        })
        .unwrap();
        assert_eq!(count_loads(&events), 2);
        // Kept loaded without low-memory mode.
        let dir = crate::testing::fixtures_dir().join("pipeline-a14b-t2v/model");
        let mut opts = PipelineOptions::for_device(Device::Cpu);
        opts.low_memory = false;
        let mut p = WanPipeline::open(&dir, opts).unwrap();
        p.generate(&r, &mut crate::progress::ignore).unwrap();
        assert!(p.transformer.is_some() && p.transformer_2.is_some());
        // All steps above the boundary: the low-noise expert is never loaded.
        let mut p = WanPipeline::open(&dir, PipelineOptions::for_device(Device::Cpu)).unwrap();
        let mut events = Vec::new();
        p.generate(
            &GenerateRequest {
                num_inference_steps: Some(1),
                ..req("x")
            },
            &mut |e: &ProgressEvent| {
                events.push((e.stage, e.step, e.total));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(count_loads(&events), 1);
    }

    #[test]
    fn half_configured_expert_folders_are_refused() {
        let src = crate::testing::fixtures_dir().join("pipeline-a14b-t2v/model");
        let tmp = std::env::temp_dir().join(format!("kino-experts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        crate::testing::copy_dir(&src, &tmp).unwrap();
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
                .unwrap();
        let try_open = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = index.clone();
            edit(&mut v);
            std::fs::write(tmp.join("model_index.json"), v.to_string()).unwrap();
            WanPipeline::open(&tmp, PipelineOptions::for_device(Device::Cpu))
                .err()
                .map(|e| e.to_string())
        };
        let e = try_open(&|v| v["boundary_ratio"] = serde_json::Value::Null).unwrap();
        assert!(e.contains("no boundary_ratio"), "{e}");
        let e = try_open(&|v| v["transformer_2"] = serde_json::json!([null, null])).unwrap();
        assert!(e.contains("no transformer_2"), "{e}");
        let e = try_open(&|v| v["boundary_ratio"] = serde_json::json!(3)).unwrap();
        assert!(e.contains("[0, 1]"), "{e}");
        assert!(try_open(&|_| {}).is_none());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn video_to_video_runs_the_cut_schedule() {
        let mut p = open("pipeline-v2v");
        let (w, h, n) = (
            p.defaults().width,
            p.defaults().height,
            p.defaults().num_frames,
        );
        let frames: Vec<RgbImage> = (0..n).map(|i| image(w, h, i as u8)).collect();
        let run = |p: &mut WanPipeline, strength: f64| {
            let mut denoise = 0;
            let out = p
                .generate(
                    &with(
                        Conditioning::Video {
                            frames: frames.clone(),
                            strength,
                        },
                        GenerateRequest {
                            num_inference_steps: Some(4),
                            ..req("x")
                        },
                    ),
                    &mut |e: &ProgressEvent| {
                        if e.stage == Stage::Denoise {
                            denoise = e.total;
                        }
                        Ok(())
                    },
                )
                .unwrap();
            (out, denoise)
        };
        let (a, steps_a) = run(&mut p, 0.5);
        let (b, steps_b) = run(&mut p, 1.0);
        assert_eq!((steps_a, steps_b), (2, 4));
        assert_eq!(a.request.strength, Some(0.5));
        assert!(crate::testing::rel_error(&a.latents, &b.latents).unwrap() > 1e-3);
    }

    #[test]
    fn diffusion_forcing_folders_make_long_videos_in_windows() {
        let p = open("pipeline-df");
        let caps = p.capabilities();
        assert!(caps.long_video && caps.image && caps.last_image && !caps.video);
        // kino.json: 21-frame windows; 37 frames need two, continuing from the last 5.
        let dir = crate::testing::fixtures_dir().join("pipeline-df/model");
        let tmp = std::env::temp_dir().join(format!("kino-df-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        crate::testing::copy_dir(&dir, &tmp).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("kino.json")).unwrap()).unwrap();
        json["overlap_history"] = 5.into();
        json["max_sequence_length"] = 8.into();
        std::fs::write(tmp.join("kino.json"), json.to_string()).unwrap();
        let mut p2 = WanPipeline::open(&tmp, PipelineOptions::for_device(Device::Cpu)).unwrap();
        let r = GenerateRequest {
            num_frames: Some(37),
            num_inference_steps: Some(2),
            ..req("a red circle")
        };
        let mut denoise_runs = 0;
        let out = p2
            .generate(&r, &mut |e: &ProgressEvent| {
                if e.stage == Stage::Denoise && e.step == 0 {
                    denoise_runs += 1;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(denoise_runs, 2, "two windows");
        assert_eq!(out.frames.len(), 37);
        assert_eq!(out.latents.dim(2).unwrap(), 10);
        let again = p2.generate(&r, &mut crate::progress::ignore).unwrap();
        assert_eq!(again.frames, out.frames);

        // Image-to-video (SkyReelsV2DiffusionForcingImageToVideoPipeline). 29 frames would end
        // with a short window (which the reference fails on): it is made as 37 and cut to 29,
        // so its frames are the first 29 of the 37-frame run.
        let (w, h) = (p.defaults().width, p.defaults().height);
        let first = image(w, h, 40);
        let i2v = |n: usize, last: Option<RgbImage>| {
            with(
                Conditioning::Image {
                    first: first.clone(),
                    last,
                },
                GenerateRequest {
                    num_frames: Some(n),
                    num_inference_steps: Some(2),
                    ..req("a red circle")
                },
            )
        };
        let long = p2
            .generate(&i2v(37, None), &mut crate::progress::ignore)
            .unwrap();
        let cut = p2
            .generate(&i2v(29, None), &mut crate::progress::ignore)
            .unwrap();
        assert_eq!((long.frames.len(), cut.frames.len()), (37, 29));
        assert_eq!(cut.frames[..], long.frames[..29]);
        assert_ne!(
            long.frames[..29],
            out.frames[..29],
            "the image changes the video"
        );
        // Latent frame 0 is the image's latent (the causal VAE decodes frame 0 from it alone).
        let z = p2
            .encode_latents(
                &image_to_tensor(&first, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap(),
                &mut crate::progress::ignore,
            )
            .unwrap();
        assert!(
            crate::testing::rel_error(&long.latents.narrow(2, 0, 1).unwrap(), &z).unwrap() < 1e-6
        );
        // A last image: one window only; its latent frame is dropped before decoding.
        let last = image(w, h, 200);
        let flf = p2
            .generate(&i2v(21, Some(last.clone())), &mut crate::progress::ignore)
            .unwrap();
        assert_eq!(flf.frames.len(), 21);
        assert_eq!(
            flf.latents.dim(2).unwrap(),
            7,
            "6 latent frames + the last image's"
        );
        let e = err(&p2, &i2v(37, Some(last)));
        assert!(e.contains("one window") && e.contains("at most 21"), "{e}");
        // Restyling a video with a strength is not what it does.
        let e = err(
            &p2,
            &with(
                Conditioning::Video {
                    frames: vec![first.clone(); 21],
                    strength: 0.5,
                },
                req("x"),
            ),
        );
        assert!(e.contains("continues a video"), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn continuing_a_video_gives_only_new_frames() {
        for case in ["pipeline-ti2v", "pipeline-df", "pipeline-i2v-wan21"] {
            let mut p = open(case);
            let (w, h) = (p.defaults().width, p.defaults().height);
            let frames: Vec<RgbImage> = (0..9).map(|i| image(w, h, i as u8)).collect();
            let r = with(
                Conditioning::Continue {
                    frames: frames.clone(),
                },
                GenerateRequest {
                    num_frames: Some(9),
                    num_inference_steps: Some(2),
                    ..req("x")
                },
            );
            let out = p
                .generate(&r, &mut crate::progress::ignore)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(out.frames.len(), 8, "{case}");
            assert_eq!(out.request.conditioning, "continuation");
            // What it continues from matters.
            let other: Vec<RgbImage> = (0..9).map(|i| image(w, h, 100 + i as u8)).collect();
            let o = p
                .generate(
                    &with(Conditioning::Continue { frames: other }, r.clone()),
                    &mut crate::progress::ignore,
                )
                .unwrap();
            assert_ne!(o.frames, out.frames, "{case}");
        }
        let t2v = open("pipeline-wan21");
        let (w, h) = (t2v.defaults().width, t2v.defaults().height);
        let e = err(
            &t2v,
            &with(
                Conditioning::Continue {
                    frames: vec![image(w, h, 0)],
                },
                req("x"),
            ),
        );
        assert!(
            e.contains("cannot continue") && e.contains("skyreels-v2-df-1.3b-540p"),
            "{e}"
        );
    }
}
