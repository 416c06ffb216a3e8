//! `CLIPVisionModel`: the image encoder of Wan2.1 I2V / FLF2V (open-clip ViT-H/14 in
//! transformers' layout), and `CLIPImageProcessor`, its preprocessing.
//!
//! Mirrors transformers `models/clip/modeling_clip.py` (transformers 5.24):
//!
//! | transformers              | here                       |
//! |---------------------------|----------------------------|
//! | `CLIPVisionEmbeddings`    | `CLIPVisionEmbeddings`     |
//! | `CLIPAttention`           | `CLIPAttention`            |
//! | `CLIPMLP`                 | `CLIPMLP`                  |
//! | `CLIPEncoderLayer`        | `CLIPEncoderLayer`         |
//! | `CLIPVisionModel`         | [`CLIPVisionModel`]        |
//!
//! Wan's pipeline reads `hidden_states[-2]`, the output of the second-to-last encoder layer
//! (no `post_layernorm`), so [`CLIPVisionModel::penultimate_hidden_states`] runs every layer
//! but the last. Weights are read with or without the `vision_model.` prefix (checkpoints saved
//! by transformers 4 have it).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::loading::{read_json, Weights};
use crate::wan::pipeline::RgbImage;
use crate::{Error, Result};

/// `config.json` of a `CLIPVisionModel` (serde defaults: transformers' `CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_heads() -> usize {
    12
}
fn d_layers() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

/// Activations `hidden_act` may name.
const ACTIVATIONS: [&str; 4] = ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"];

impl Config {
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(Error::BadFile {
                path: path.to_path_buf(),
                message,
            })
        };
        if let Some(t) = &self.model_type {
            if t != "clip_vision_model" {
                return bad(format!(
                    "model_type `{t}` is not a CLIP vision encoder (clip_vision_model)"
                ));
            }
        }
        if !ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            return bad(format!(
                "hidden_act `{}` is not supported; supported: {}",
                self.hidden_act,
                ACTIVATIONS.join(", ")
            ));
        }
        if self.num_attention_heads == 0
            || self.hidden_size == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} must be a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_hidden_layers < 2 {
            return bad(format!(
                "num_hidden_layers {} leaves no penultimate hidden state (Wan reads hidden_states[-2])",
                self.num_hidden_layers
            ));
        }
        Ok(())
    }

    fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

fn activation(name: &str, x: &Tensor) -> candle_core::Result<Tensor> {
    match name {
        // x * sigmoid(1.702 x)
        "quick_gelu" => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        "gelu" => x.gelu_erf(),
        _ => x.gelu(),
    }
}

/// `CLIPVisionEmbeddings`: class token + patch embedding (conv without bias) + learned positions.
#[derive(Debug, Clone)]
struct CLIPVisionEmbeddings {
    /// Conv weight read as a linear map `[hidden, C·p·p]`.
    patch: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
}

impl CLIPVisionEmbeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let patch = vb
            .get((d, c, p, p), "patch_embedding.weight")?
            .reshape((d, c * p * p))?;
        Ok(Self {
            patch,
            class_embedding: vb.get(d, "class_embedding")?,
            position_embedding: vb.get((cfg.num_positions(), d), "position_embedding.weight")?,
            patch_size: p,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let d = self.patch.dim(0)?;
        // [B, C, gh, p, gw, p] → [B, gh, gw, C, p, p] → [B·gh·gw, C·p·p]
        let patches = pixel_values
            .reshape(&[b, c, gh, p, gw, p][..])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((b * gh * gw, c * p * p))?;
        let patch_embeds = patches.matmul(&self.patch.t()?)?.reshape((b, gh * gw, d))?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        let embeddings = Tensor::cat(&[&class, &patch_embeds], 1)?;
        embeddings.broadcast_add(&self.position_embedding.unsqueeze(0)?)
    }
}

/// `CLIPAttention`: multi-head self-attention with biased q/k/v/out projections, scale
/// `head_dim^-0.5`, softmax in f32.
#[derive(Debug, Clone)]
struct CLIPAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl CLIPAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (self.heads, d / self.heads);
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, h, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        let o = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, d))?;
        self.out_proj.forward(&o)
    }
}

/// `CLIPMLP`: `fc1` → activation → `fc2`.
#[allow(clippy::upper_case_acronyms)] // the reference's name
#[derive(Debug, Clone)]
struct CLIPMLP {
    fc1: Linear,
    fc2: Linear,
    act: String,
}

impl CLIPMLP {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2
            .forward(&activation(&self.act, &self.fc1.forward(x)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct CLIPEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: CLIPAttention,
    layer_norm2: LayerNorm,
    mlp: CLIPMLP,
}

impl CLIPEncoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let ln =
            |name: &str| candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp(name));
        Ok(Self {
            layer_norm1: ln("layer_norm1")?,
            self_attn: CLIPAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: ln("layer_norm2")?,
            mlp: CLIPMLP::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// The CLIP vision encoder, up to its penultimate layer (what Wan reads).
#[derive(Debug, Clone)]
pub struct CLIPVisionModel {
    embeddings: CLIPVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    /// The first `num_hidden_layers − 1` layers (the last one's output is never read).
    layers: Vec<CLIPEncoderLayer>,
    config: Config,
    dtype: DType,
    device: Device,
}

impl CLIPVisionModel {
    /// Loads an `image_encoder/` folder (transformers `CLIPVisionModel`: config.json +
    /// safetensors) to run in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "expected an image_encoder/ folder (config.json + *.safetensors)".into(),
            });
        }
        let cfg: Config = read_json(&path)?;
        cfg.validate(&path)?;
        let w = Weights::open(dir)?;
        let prefixed = w.names().iter().any(|n| n.starts_with("vision_model."));
        let vb = w.var_builder(dtype, device);
        let vb = if prefixed { vb.pp("vision_model") } else { vb };
        Self::new(&cfg, vb).map_err(|e| w.map_err(e))
    }

    /// Builds the model from `vb` (its dtype is the compute dtype).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..cfg.num_hidden_layers - 1)
            .map(|i| CLIPEncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: CLIPVisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            pre_layrnorm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("pre_layrnorm"),
            )?,
            layers,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `model(pixel_values, output_hidden_states=True).hidden_states[-2]`:
    /// `[B, 3, image_size, image_size]` → `[B, 1 + (image_size/patch)², hidden_size]` (f32).
    pub fn penultimate_hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        match *pixel_values.dims() {
            [_, ch, h, w] if ch == c.num_channels && h == c.image_size && w == c.image_size => {}
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "pixel_values has shape {:?}; this image encoder takes [B, {}, {}, {}]",
                    pixel_values.dims(),
                    c.num_channels,
                    c.image_size,
                    c.image_size
                )))
            }
        }
        let x = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut h = self.pre_layrnorm.forward(&self.embeddings.forward(&x)?)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        Ok(h.to_dtype(DType::F32)?)
    }
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (the pipeline's `image_processor/`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "d_true")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: Option<serde_json::Value>,
    #[serde(default = "d_true")]
    pub do_center_crop: bool,
    #[serde(default)]
    pub crop_size: Option<serde_json::Value>,
    #[serde(default = "d_true")]
    pub do_rescale: bool,
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    #[serde(default = "d_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "d_std")]
    pub image_std: Vec<f64>,
}

fn d_true() -> bool {
    true
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}
fn d_mean() -> Vec<f64> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn d_std() -> Vec<f64> {
    vec![0.26862954, 0.26130258, 0.27577711]
}

/// Reads `{"shortest_edge": n}`, `{"height": h, "width": w}` or a bare number.
fn size_of(v: &Option<serde_json::Value>, default: usize) -> (Option<usize>, usize, usize) {
    let get = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
    };
    if let Some(s) = get("shortest_edge") {
        return (Some(s), s, s);
    }
    if let (Some(h), Some(w)) = (get("height"), get("width")) {
        return (None, h, w);
    }
    if let Some(n) = v.as_ref().and_then(|v| v.as_u64()) {
        return (Some(n as usize), n as usize, n as usize);
    }
    (Some(default), default, default)
}

/// `CLIPImageProcessor`: resize the shortest edge (bicubic with antialiasing, as PIL), centre
/// crop, rescale to [0, 1], normalise with the CLIP mean/std. Returns `pixel_values`
/// `[N, 3, crop_h, crop_w]` for the given images.
pub fn preprocess(
    config: &ImageProcessorConfig,
    images: &[&RgbImage],
    device: &Device,
) -> Result<Tensor> {
    let (shortest, rh, rw) = size_of(&config.size, 224);
    let (_, ch, cw) = size_of(&config.crop_size, 224);
    let mut out = Vec::new();
    let mut size: Option<(usize, usize)> = None;
    for img in images {
        let mut plane = to_planes(img);
        let (mut h, mut w) = (img.height, img.width);
        if config.do_resize {
            let (nh, nw) = match shortest {
                // get_resize_output_image_size(default_to_square=False): the short side to s,
                // the long side int(s · long / short).
                Some(s) => {
                    if h <= w {
                        (s, (s as f64 * w as f64 / h as f64) as usize)
                    } else {
                        ((s as f64 * h as f64 / w as f64) as usize, s)
                    }
                }
                None => (rh, rw),
            };
            plane = resize_bicubic(&plane, (h, w), (nh, nw));
            (h, w) = (nh, nw);
        }
        if config.do_center_crop {
            if h < ch || w < cw {
                return Err(Error::InvalidRequest(format!(
                    "image of {w}×{h} after resizing is smaller than the {cw}×{ch} crop"
                )));
            }
            let (top, left) = ((h - ch) / 2, (w - cw) / 2);
            plane = (0..3)
                .map(|c| {
                    let mut p = Vec::with_capacity(ch * cw);
                    for y in 0..ch {
                        let row = &plane[c][(top + y) * w + left..(top + y) * w + left + cw];
                        p.extend_from_slice(row);
                    }
                    p
                })
                .collect();
            (h, w) = (ch, cw);
        }
        for (c, p) in plane.iter().enumerate() {
            for &v in p {
                let mut x = v;
                if config.do_rescale {
                    x *= config.rescale_factor;
                }
                if config.do_normalize {
                    let m = config.image_mean.get(c).copied().unwrap_or(0.0);
                    let s = config.image_std.get(c).copied().unwrap_or(1.0);
                    x = (x - m) / s;
                }
                out.push(x as f32);
            }
        }
        match size {
            Some(s) if s != (h, w) => {
                return Err(Error::InvalidRequest(format!(
                    "images preprocess to different sizes ({}×{} and {w}×{h}); the processor \
                     needs a centre crop or a fixed size to batch them",
                    s.1, s.0
                )))
            }
            _ => size = Some((h, w)),
        }
    }
    let n = images.len();
    let (h, w) = size.unwrap_or((ch, cw));
    Ok(Tensor::from_vec(out, (n, 3, h, w), device)?)
}

/// An RGB image as three f64 planes of 0–255 values.
fn to_planes(img: &RgbImage) -> Vec<Vec<f64>> {
    (0..3)
        .map(|c| {
            img.data
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| v as f64)
                .collect()
        })
        .collect()
}

/// Separable bicubic resampling (a = −0.5) with the kernel widened by the scale when shrinking,
/// as PIL's `Image.resize(..., BICUBIC)`; values clamped to 0–255 and rounded, as PIL's 8-bit
/// result.
fn resize_bicubic(
    planes: &[Vec<f64>],
    (h, w): (usize, usize),
    (nh, nw): (usize, usize),
) -> Vec<Vec<f64>> {
    fn cubic(x: f64) -> f64 {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    // For each output index: the first input index and the normalised weights.
    fn weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f64>)> {
        let scale = n_in as f64 / n_out as f64;
        let fscale = scale.max(1.0);
        let support = 2.0 * fscale;
        (0..n_out)
            .map(|i| {
                let center = (i as f64 + 0.5) * scale;
                let lo = ((center - support).floor().max(0.0)) as usize;
                let hi = ((center + support).ceil() as usize).min(n_in);
                let mut ws: Vec<f64> = (lo..hi)
                    .map(|j| cubic((j as f64 - center + 0.5) / fscale))
                    .collect();
                let sum: f64 = ws.iter().sum();
                if sum != 0.0 {
                    ws.iter_mut().for_each(|x| *x /= sum);
                }
                (lo, ws)
            })
            .collect()
    }
    let wx = weights(w, nw);
    let wy = weights(h, nh);
    planes
        .iter()
        .map(|p| {
            // Horizontal pass (rounded to 8 bits, as PIL's two-pass uint8 resize), then vertical.
            let mut tmp = vec![0.0; h * nw];
            for y in 0..h {
                for (x, (lo, ws)) in wx.iter().enumerate() {
                    let v: f64 = ws
                        .iter()
                        .enumerate()
                        .map(|(k, wt)| wt * p[y * w + lo + k])
                        .sum();
                    tmp[y * nw + x] = v.round().clamp(0.0, 255.0);
                }
            }
            let mut out = vec![0.0; nh * nw];
            for (y, (lo, ws)) in wy.iter().enumerate() {
                for x in 0..nw {
                    let v: f64 = ws
                        .iter()
                        .enumerate()
                        .map(|(k, wt)| wt * tmp[(lo + k) * nw + x])
                        .sum();
                    out[y * nw + x] = v.round().clamp(0.0, 255.0);
                }
            }
            out
        })
        .collect()
}

/// Reads `DIR/preprocessor_config.json` (defaults: CLIP's 224-pixel processor).
pub fn read_image_processor(dir: &Path) -> Result<ImageProcessorConfig> {
    let path = dir.join("preprocessor_config.json");
    if !path.is_file() {
        return Err(Error::MissingFile {
            path,
            hint: "the image_processor/ folder of an image-to-video model holds preprocessor_config.json".into(),
        });
    }
    read_json(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_crops_and_normalises() -> Result<()> {
        // A 40×20 image: the short side (20) goes to 8, the long one to 16, then an 8×8 centre crop.
        let mut data = Vec::new();
        for _y in 0..20 {
            for x in 0..40 {
                data.extend_from_slice(&[(x * 6) as u8, 128, 255]);
            }
        }
        let img = RgbImage::new(40, 20, data)?;
        let cfg = ImageProcessorConfig {
            size: Some(serde_json::json!({"shortest_edge": 8})),
            crop_size: Some(serde_json::json!({"height": 8, "width": 8})),
            ..serde_json::from_str("{}").unwrap()
        };
        let px = preprocess(&cfg, &[&img, &img], &Device::Cpu)?;
        assert_eq!(px.dims(), &[2, 3, 8, 8]);
        // The blue channel is 255 everywhere: (1 - mean) / std.
        let b: Vec<f32> = px.get(0)?.get(2)?.flatten_all()?.to_vec1()?;
        let expect = ((1.0 - 0.40821073) / 0.26862954 * 0.26862954 / 0.27577711) as f32;
        assert!(
            b.iter().all(|v| (v - expect).abs() < 1e-4),
            "{b:?} vs {expect}"
        );
        // The red ramp increases left to right and was cropped from the middle.
        let r: Vec<f32> = px.get(0)?.get(0)?.get(0)?.to_vec1()?;
        assert!(r.windows(2).all(|w| w[1] > w[0]), "{r:?}");
        Ok(())
    }

    /// The fixture folder's CLIPImageProcessor as transformers runs it with PIL (bicubic
    /// resize of the short side, centre crop, normalise), on a landscape and a portrait picture.
    #[test]
    fn preprocess_matches_the_reference_processor() -> Result<()> {
        let case = crate::testing::fixtures_dir().join("pipeline-i2v-wan21");
        let cfg = read_image_processor(&case.join("model/image_processor"))?;
        let t =
            candle_core::safetensors::load(case.join("clip-preprocess.safetensors"), &Device::Cpu)?;
        for name in ["landscape", "portrait"] {
            let rgb = &t[&format!("{name}_rgb")];
            let (h, w, _) = rgb.dims3()?;
            let data: Vec<u8> = rgb.flatten_all()?.to_vec1()?;
            let img = RgbImage::new(w, h, data)?;
            let ours = preprocess(&cfg, &[&img], &Device::Cpu)?;
            let reference = &t[&format!("{name}_pixel_values")];
            assert_eq!(ours.dims(), reference.dims(), "{name}");
            let diff: Vec<f32> = (ours - reference)?.abs()?.flatten_all()?.to_vec1()?;
            let max = diff.iter().copied().fold(0f32, f32::max);
            let mean = diff.iter().sum::<f32>() / diff.len() as f32;
            // One 8-bit level after normalising is 1/255/std: at most 0.0150 (std 0.2613).
            let level = 1.0 / 255.0 / 0.261_302_6_f32;
            println!("{name}: max |Δ| {max:.4}, mean {mean:.5} (one level {level:.4})");
            // Within one 8-bit level everywhere (PIL rounds its two passes to 8 bits as we do):
            // measured max one level, mean 0.04 of a level (landscape), exact (portrait).
            assert!(max <= level * 1.001, "{name}: max {max}");
            assert!(mean < 0.1 * level, "{name}: mean {mean}");
        }
        Ok(())
    }

    #[test]
    fn bad_configs_are_refused() {
        let dir = std::env::temp_dir().join(format!("kino-clip-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type": "clip_vision_model", "hidden_act": "swish"}"#,
        )
        .unwrap();
        let e = CLIPVisionModel::load(&dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("hidden_act `swish`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
