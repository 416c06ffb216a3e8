//! `AutoencoderKLWan`: the Wan2.1 / Wan2.2 video VAE, mirroring diffusers
//! `models/autoencoders/autoencoder_kl_wan.py` (class `AutoencoderKLWan`; its parts live in
//! [`conv`] (`WanCausalConv3d`, the feature cache), [`blocks`] (`WanRMS_norm`,
//! `WanResidualBlock`, `WanAttentionBlock`, `WanMidBlock`, `WanResample`, `AvgDown3D`,
//! `DupUp3D`, `WanResidualDownBlock`, `WanResidualUpBlock`, `WanUpBlock`), [`encoder`]
//! (`WanEncoder3d`) and [`decoder`] (`WanDecoder3d`)).
//!
//! Both variants come from the same `config.json`: Wan2.1 (`z_dim` 16, plain blocks, 8×
//! spatial) and Wan2.2 (`is_residual`, `patch_size` 2 → 12 channels, `z_dim` 48,
//! `decoder_base_dim`, 16× spatial). Compression factors always come from the config.
//!
//! Execution follows the reference: encode runs the first frame alone and then chunks of 4
//! frames through the causal feature cache (`_encode`); decode runs one latent frame at a time
//! (`_decode`, `first_chunk` for frame 0), so memory does not grow with the frame count beyond
//! the output itself; `tiled_decode` / `tiled_encode` with `blend_v` / `blend_h` when tiling is
//! set. Internally every sample is held channels-last as `[T, H, W, C]`; inputs and outputs
//! use the reference layout `[B, C, F, H, W]`.

pub mod blocks;
pub mod conv;
pub mod decoder;
pub mod encoder;

#[cfg(test)]
mod tests;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loading::{read_config, Weights};

use conv::{FeatCache, WanCausalConv3d};
use decoder::WanDecoder3d;
use encoder::WanEncoder3d;

/// Frames per encoder chunk after the first frame (the reference's `1 + (num_frame - 1) // 4`
/// loop in `_encode` / `tiled_encode`).
pub const ENCODE_CHUNK_FRAMES: usize = 4;

fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_num_res_blocks() -> usize {
    2
}
fn default_temperal_downsample() -> Vec<bool> {
    vec![false, true, true]
}
fn default_latents_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn default_latents_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}
fn default_channels() -> usize {
    3
}
fn default_scale_temporal() -> Option<usize> {
    Some(4)
}
fn default_scale_spatial() -> Option<usize> {
    Some(8)
}

/// `vae/config.json` of `AutoencoderKLWan`, with the reference `__init__` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    /// Decoder width (Wan2.2: 256 while `base_dim` is 160); `None` means `base_dim`.
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_num_res_blocks")]
    pub num_res_blocks: usize,
    /// Must be empty: diffusers' encoder cannot run attention blocks outside the mid block.
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// Spelling as in diffusers.
    #[serde(default = "default_temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default)]
    pub dropout: f64,
    /// Per-channel latent mean: the pipeline decodes `latents * std + mean`.
    #[serde(default = "default_latents_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "default_latents_std")]
    pub latents_std: Vec<f64>,
    #[serde(default)]
    pub is_residual: bool,
    /// Encoder input channels after patchify (3·p²).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Decoder output channels before unpatchify (3·p²).
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "default_scale_temporal")]
    pub scale_factor_temporal: Option<usize>,
    #[serde(default = "default_scale_spatial")]
    pub scale_factor_spatial: Option<usize>,
    /// Present in some published Wan2.2 configs; diffusers' `AutoencoderKLWan` does not read it
    /// and always clamps the decoded video to [-1, 1], and so do we.
    #[serde(default)]
    pub clip_output: Option<bool>,
}

impl Default for Config {
    fn default() -> Self {
        // Every field has a serde default, so an empty object gives the reference defaults.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!())
    }
}

impl Config {
    /// The patchify size (`patch_size`, `None` meaning 1).
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }

    /// Decoder width (`decoder_base_dim`, or `base_dim`).
    pub fn decoder_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Pixel channels of the video (`in_channels / p²`, 3 for Wan).
    pub fn sample_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
    }

    /// Spatial compression: `scale_factor_spatial` (what the reference uses for tiling), or
    /// the architecture's own factor when the config leaves it out.
    pub fn spatial_compression(&self) -> usize {
        self.scale_factor_spatial
            .unwrap_or_else(|| self.arch_spatial_compression())
    }

    /// Temporal compression: `scale_factor_temporal`, or the architecture's own factor.
    pub fn temporal_compression(&self) -> usize {
        self.scale_factor_temporal
            .unwrap_or_else(|| self.arch_temporal_compression())
    }

    /// Spatial factor the layers really apply: `2^(len(dim_mult) - 1) · patch_size`.
    fn arch_spatial_compression(&self) -> usize {
        (1usize << self.dim_mult.len().saturating_sub(1)) * self.patch()
    }

    /// Temporal factor the encoder really applies: `2^(temporal downsamples)`.
    fn arch_temporal_compression(&self) -> usize {
        1usize << self.encoder_temporal_flags().filter(|&t| t).count()
    }

    fn encoder_temporal_flags(&self) -> impl Iterator<Item = bool> + '_ {
        let n = self.dim_mult.len().saturating_sub(1);
        self.temperal_downsample.iter().copied().take(n)
    }

    /// `temperal_upsample = temperal_downsample[::-1]`, as used by up block `i` (only for
    /// blocks that upsample).
    fn decoder_temporal_flags(&self) -> Vec<bool> {
        let rev: Vec<bool> = self.temperal_downsample.iter().rev().copied().collect();
        let n = self.dim_mult.len().saturating_sub(1);
        (0..n)
            .map(|i| rev.get(i).copied().unwrap_or(false))
            .collect()
    }

    /// Output frames the decoder makes from each latent frame after the first.
    fn decoder_temporal_factor(&self) -> usize {
        1usize << self.decoder_temporal_flags().iter().filter(|&&t| t).count()
    }

    /// Checks what the reference would reject or could not run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let p = self.patch();
        if self.base_dim == 0 || self.decoder_dim() == 0 || self.z_dim == 0 {
            return Err("base_dim, decoder_base_dim and z_dim must be positive".into());
        }
        if self.dim_mult.is_empty() || self.dim_mult.contains(&0) {
            return Err(format!(
                "dim_mult {:?} must be a non-empty list of positive numbers",
                self.dim_mult
            ));
        }
        if self.temperal_downsample.len() + 1 < self.dim_mult.len() {
            return Err(format!(
                "temperal_downsample has {} entries but dim_mult {:?} needs {}",
                self.temperal_downsample.len(),
                self.dim_mult,
                self.dim_mult.len() - 1
            ));
        }
        if !self.attn_scales.is_empty() {
            return Err(format!(
                "attn_scales {:?} is not supported (diffusers' WanEncoder3d cannot run attention outside the mid block); use []",
                self.attn_scales
            ));
        }
        if p == 0 {
            return Err("patch_size must be positive".into());
        }
        if self.in_channels == 0
            || !self.in_channels.is_multiple_of(p * p)
            || self.out_channels == 0
            || !self.out_channels.is_multiple_of(p * p)
        {
            return Err(format!(
                "in_channels {} and out_channels {} must be positive multiples of patch_size² = {}",
                self.in_channels,
                self.out_channels,
                p * p
            ));
        }
        if self.scale_factor_spatial == Some(0) || self.scale_factor_temporal == Some(0) {
            return Err("scale_factor_spatial and scale_factor_temporal must be positive".into());
        }
        if !self.is_residual && self.dim_mult.len() > 1 {
            // Wan2.1 up blocks after the first take dims[i] // 2 channels.
            let d = self.decoder_dim() * self.dim_mult[self.dim_mult.len() - 2];
            if d / 2 == 0 {
                return Err("decoder_base_dim is too small for this dim_mult".into());
            }
        }
        Ok(())
    }
}

/// Spatial tiling of encode/decode (diffusers `enable_tiling`), in pixels of the video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TilingConfig {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for TilingConfig {
    /// diffusers' defaults: tiles of 256 px every 192 px.
    fn default() -> Self {
        Self {
            tile_sample_min_height: 256,
            tile_sample_min_width: 256,
            tile_sample_stride_height: 192,
            tile_sample_stride_width: 192,
        }
    }
}

/// `AutoencoderKLWan`.
#[derive(Debug, Clone)]
pub struct AutoencoderKLWan {
    encoder: WanEncoder3d,
    quant_conv: WanCausalConv3d,
    post_quant_conv: WanCausalConv3d,
    decoder: WanDecoder3d,
    config: Config,
    tiling: Option<TilingConfig>,
    dtype: DType,
    device: Device,
}

/// `min(len, start + size) - start`: the length of a Python slice `[start:start+size]`.
fn span(len: usize, start: usize, size: usize) -> usize {
    size.min(len - start)
}

/// Suggests the nearest valid sizes for a dimension that must be a multiple of `m`.
fn multiple_hint(v: usize, m: usize) -> String {
    let lo = v / m * m;
    let hi = lo + m;
    if lo == 0 {
        format!("try {hi}")
    } else {
        format!("try {lo} or {hi}")
    }
}

impl AutoencoderKLWan {
    /// Loads `DIR/config.json` and the weights of a diffusers `vae/` folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: Config = read_config(dir, &["AutoencoderKLWan"])?;
        cfg.validate().map_err(|message| Error::BadFile {
            path: dir.join("config.json"),
            message,
        })?;
        let w = Weights::open(dir)?;
        let vb = w.var_builder(dtype, device);
        Self::new(&cfg, vb).map_err(|e| w.map_err(e))
    }

    /// Builds the model from a config and weights named as diffusers names them.
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        if let Some(s) = cfg.scale_factor_spatial {
            if s != cfg.arch_spatial_compression() {
                tracing::warn!(
                    "scale_factor_spatial {s} differs from the architecture's {}; tiling uses {s} as diffusers does",
                    cfg.arch_spatial_compression()
                );
            }
        }
        let z = cfg.z_dim;
        let n_t = cfg.dim_mult.len().saturating_sub(1);
        let encoder = WanEncoder3d::new(
            cfg.in_channels,
            cfg.base_dim,
            z * 2,
            &cfg.dim_mult,
            cfg.num_res_blocks,
            &cfg.temperal_downsample[..n_t.min(cfg.temperal_downsample.len())],
            cfg.is_residual,
            vb.pp("encoder"),
        )?;
        let quant_conv = WanCausalConv3d::k1(z * 2, z * 2, vb.pp("quant_conv"))?;
        let post_quant_conv = WanCausalConv3d::k1(z, z, vb.pp("post_quant_conv"))?;
        let decoder = WanDecoder3d::new(
            cfg.decoder_dim(),
            z,
            &cfg.dim_mult,
            cfg.num_res_blocks,
            &cfg.decoder_temporal_flags(),
            cfg.out_channels,
            cfg.is_residual,
            vb.pp("decoder"),
        )?;
        Ok(Self {
            encoder,
            quant_conv,
            post_quant_conv,
            decoder,
            config: cfg.clone(),
            tiling: None,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Enables (`Some`) or disables (`None`) spatial tiling, as diffusers'
    /// `enable_tiling(...)` / `disable_tiling()`.
    pub fn set_tiling(&mut self, tiling: Option<TilingConfig>) {
        self.tiling = tiling;
    }

    pub fn tiling(&self) -> Option<&TilingConfig> {
        self.tiling.as_ref()
    }

    /// Video frames decoded from `latent_frames` latent frames (`1 + 4·(F'−1)` for Wan).
    pub fn decoded_num_frames(&self, latent_frames: usize) -> usize {
        if latent_frames == 0 {
            0
        } else {
            1 + (latent_frames - 1) * self.config.decoder_temporal_factor()
        }
    }

    // ---------------------------------------------------------------- layout helpers

    /// One sample `[C, F, H, W]` → patchified channels-last frames `[F, H/p, W/p, C·p²]`
    /// (reference `patchify`: channel `(c·p + pw)·p + ph`).
    fn sample_to_frames(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.config.patch();
        let (c, f, h, w) = x.dims4()?;
        if p == 1 {
            return x.permute((1, 2, 3, 0))?.contiguous();
        }
        // [C, F, h, ph, w, pw] → [F, h, w, C, pw, ph]
        x.reshape(vec![c, f, h / p, p, w / p, p])?
            .permute(vec![1, 2, 4, 0, 5, 3])?
            .contiguous()?
            .reshape((f, h / p, w / p, c * p * p))
    }

    /// Patchified channels-last frames `[T, h, w, C·p²]` → one sample `[C, T, h·p, w·p]`
    /// (reference `unpatchify`).
    fn frames_to_sample(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.config.patch();
        let (t, h, w, cp) = y.dims4()?;
        if p == 1 {
            return y.permute((3, 0, 1, 2))?.contiguous();
        }
        let c = cp / (p * p);
        // [T, h, w, C, pw, ph] → [C, T, h, ph, w, pw]
        y.reshape(vec![t, h, w, c, p, p])?
            .permute(vec![3, 0, 1, 5, 2, 4])?
            .contiguous()?
            .reshape((c, t, h * p, w * p))
    }

    /// Channels-last frames `[T, h, w, C]` → `[C, T, h, w]`.
    fn frames_to_cthw(y: &Tensor) -> candle_core::Result<Tensor> {
        y.permute((3, 0, 1, 2))
    }

    /// One latent sample `[Z, F, h, w]` → `post_quant_conv` on channels-last `[F, h, w, Z]`.
    fn latent_frames(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let x = z.permute((1, 2, 3, 0))?.contiguous()?;
        self.post_quant_conv.forward(&x, None)
    }

    /// Reference `unpatchify` on `[B, C·p², F, H, W]`.
    fn unpatchify(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.config.patch();
        if p == 1 {
            return Ok(x.clone());
        }
        let (b, cp, f, h, w) = x.dims5()?;
        let c = cp / (p * p);
        x.reshape(vec![b, c, p, p, f, h, w])?
            .permute(vec![0, 1, 4, 5, 3, 6, 2])?
            .contiguous()?
            .reshape((b, c, f, h * p, w * p))
    }

    // ---------------------------------------------------------------- validation

    fn check_sample(&self, x: &Tensor) -> Result<()> {
        let cfg = &self.config;
        let c_exp = cfg.sample_channels();
        let dims = x.dims();
        let [b, c, f, h, w] = *dims else {
            return Err(Error::InvalidRequest(format!(
                "VAE encode expects a video [batch, {c_exp}, frames, height, width], got shape {dims:?}"
            )));
        };
        if b == 0 {
            return Err(Error::InvalidRequest(
                "VAE encode got an empty batch".into(),
            ));
        }
        if c != c_exp {
            return Err(Error::InvalidRequest(format!(
                "VAE encode expects {c_exp} channels (RGB) in dim 1 of [batch, channels, frames, height, width], got {c} (shape {dims:?})"
            )));
        }
        let m = cfg.arch_spatial_compression();
        for (name, v) in [("height", h), ("width", w)] {
            if v == 0 || v % m != 0 {
                return Err(Error::InvalidRequest(format!(
                    "{name} {v} is not a multiple of {m} (the VAE's spatial compression); {}",
                    multiple_hint(v, m)
                )));
            }
        }
        if f == 0 || (f - 1) % ENCODE_CHUNK_FRAMES != 0 {
            let lo = f.saturating_sub(1) / ENCODE_CHUNK_FRAMES * ENCODE_CHUNK_FRAMES + 1;
            return Err(Error::InvalidRequest(format!(
                "VAE encode needs 1 + {ENCODE_CHUNK_FRAMES}·k frames, got {f}; try {lo} or {}",
                lo + ENCODE_CHUNK_FRAMES
            )));
        }
        Ok(())
    }

    fn check_latent(&self, z: &Tensor) -> Result<()> {
        let zc = self.config.z_dim;
        let dims = z.dims();
        let [b, c, f, h, w] = *dims else {
            return Err(Error::InvalidRequest(format!(
                "VAE decode expects latents [batch, {zc}, frames, height, width], got shape {dims:?}"
            )));
        };
        if c != zc {
            return Err(Error::InvalidRequest(format!(
                "VAE decode expects {zc} latent channels (z_dim) in dim 1, got {c} (shape {dims:?})"
            )));
        }
        if b == 0 || f == 0 || h == 0 || w == 0 {
            return Err(Error::InvalidRequest(format!(
                "VAE decode got empty latents of shape {dims:?}"
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- encode

    /// `encode(x).latent_dist`: the posterior `(mean, logvar)` of a video `[B, 3, F, H, W]` in
    /// [-1, 1], each `[B, z_dim, F', H', W']` (not normalized; logvar clamped to [-30, 20] as
    /// `DiagonalGaussianDistribution` does).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_sample(x)?;
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (_, _, _, h, w) = x.dims5()?;
        let enc = match self.tiling {
            Some(t) if w > t.tile_sample_min_width || h > t.tile_sample_min_height => {
                self.tiled_encode(&x, &t)?
            }
            _ => {
                let mut per_b = Vec::new();
                for b in 0..x.dim(0)? {
                    let frames = self.sample_to_frames(&x.get(b)?)?;
                    let enc = self.encode_frames(&frames)?;
                    per_b.push(Self::frames_to_cthw(&enc)?);
                }
                Tensor::stack(&per_b, 0)?
            }
        };
        let z = self.config.z_dim;
        let mean = enc.narrow(1, 0, z)?.contiguous()?;
        let logvar = enc.narrow(1, z, z)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// `_encode` on one sample's patchified frames `[F, H, W, C]`: the first frame, then
    /// chunks of 4 with the feature cache, then `quant_conv`. Gives `[F', h, w, 2z]`.
    fn encode_frames(&self, frames: &Tensor) -> candle_core::Result<Tensor> {
        let f = frames.dim(0)?;
        let mut cache = FeatCache::new();
        let mut outs = Vec::new();
        for (start, len) in encode_chunks(f) {
            cache.start_chunk();
            let chunk = frames.narrow(0, start, len)?.contiguous()?;
            outs.push(self.encoder.forward(&chunk, &mut cache)?);
        }
        drop(cache);
        let out = Tensor::cat(&outs, 0)?;
        drop(outs);
        self.quant_conv.forward(&out, None)
    }

    /// `tiled_encode`: overlapping spatial tiles (each with its own cache and chunk loop,
    /// `quant_conv` per chunk), blended and cropped. Gives `[B, 2z, F', H', W']`.
    fn tiled_encode(&self, x: &Tensor, t: &TilingConfig) -> Result<Tensor> {
        let cfg = &self.config;
        let p = cfg.patch();
        let sc = cfg.spatial_compression();
        if !sc.is_multiple_of(p) {
            return Err(Error::InvalidRequest(format!(
                "tiled encode needs scale_factor_spatial {sc} to be a multiple of patch_size {p}"
            )));
        }
        let enc_sc = sc / p;
        let frames: Vec<Tensor> = (0..x.dim(0)?)
            .map(|b| self.sample_to_frames(&x.get(b)?))
            .collect::<candle_core::Result<_>>()?;
        let (f, height, width, _) = frames[0].dims4()?;
        let latent_h = height / enc_sc;
        let latent_w = width / enc_sc;
        let tl_min_h = t.tile_sample_min_height / enc_sc;
        let tl_min_w = t.tile_sample_min_width / enc_sc;
        let tl_stride_h = t.tile_sample_stride_height / enc_sc;
        let tl_stride_w = t.tile_sample_stride_width / enc_sc;
        if t.tile_sample_stride_height == 0 || t.tile_sample_stride_width == 0 {
            return Err(Error::InvalidRequest(
                "tile strides must be positive".into(),
            ));
        }
        let blend_h = tl_min_h.saturating_sub(tl_stride_h);
        let blend_w = tl_min_w.saturating_sub(tl_stride_w);

        let mut prev_row: Vec<Tensor> = Vec::new();
        let mut result_rows = Vec::new();
        for i in (0..height).step_by(t.tile_sample_stride_height) {
            let mut row: Vec<Tensor> = Vec::new();
            let mut result_row = Vec::new();
            for (jj, j) in (0..width).step_by(t.tile_sample_stride_width).enumerate() {
                let th = span(height, i, t.tile_sample_min_height);
                let tw = span(width, j, t.tile_sample_min_width);
                let mut per_b = Vec::new();
                for fr in &frames {
                    let tile = fr.narrow(1, i, th)?.narrow(2, j, tw)?;
                    let mut cache = FeatCache::new();
                    let mut outs = Vec::new();
                    for (start, len) in encode_chunks(f) {
                        cache.start_chunk();
                        let chunk = tile.narrow(0, start, len)?.contiguous()?;
                        let e = self.encoder.forward(&chunk, &mut cache)?;
                        outs.push(self.quant_conv.forward(&e, None)?);
                    }
                    per_b.push(Self::frames_to_cthw(&Tensor::cat(&outs, 0)?)?);
                }
                let mut tile = Tensor::stack(&per_b, 0)?;
                if let Some(above) = prev_row.get(jj) {
                    tile = blend_v(above, &tile, blend_h)?;
                }
                if let Some(left) = row.last() {
                    tile = blend_h_(left, &tile, blend_w)?;
                }
                result_row.push(crop(&tile, tl_stride_h, tl_stride_w)?);
                row.push(tile);
            }
            result_rows.push(Tensor::cat(&result_row, 4)?);
            prev_row = row;
        }
        drop(prev_row);
        let enc = Tensor::cat(&result_rows, 3)?;
        Ok(crop(&enc, latent_h, latent_w)?)
    }

    // ---------------------------------------------------------------- decode

    /// `decode(z).sample`: latents `[B, z_dim, F', H', W']` (not normalized) → video
    /// `[B, 3, F, H, W]` clamped to [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with_progress(z, &mut |_, _| Ok(()))
    }

    /// [`Self::decode`], calling `on_frame(done, total)` after each latent frame (per tile and
    /// frame when tiling). An `Err` from the callback stops decoding and is returned.
    pub fn decode_with_progress(
        &self,
        z: &Tensor,
        on_frame: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        self.check_latent(z)?;
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        let (b, _, f, h, w) = z.dims5()?;
        if let Some(t) = self.tiling {
            let sc = self.config.spatial_compression();
            if w > t.tile_sample_min_width / sc || h > t.tile_sample_min_height / sc {
                return self.tiled_decode(&z, &t, on_frame);
            }
        }
        let cfg = &self.config;
        let sc = cfg.arch_spatial_compression();
        let out = Tensor::zeros(
            (
                b,
                cfg.out_channels / (cfg.patch() * cfg.patch()),
                self.decoded_num_frames(f),
                h * sc,
                w * sc,
            ),
            self.dtype,
            &self.device,
        )?;
        let xs: Vec<Tensor> = (0..b)
            .map(|i| self.latent_frames(&z.get(i)?))
            .collect::<candle_core::Result<_>>()?;
        let mut caches: Vec<FeatCache> = (0..b).map(|_| FeatCache::new()).collect();
        let mut offset = 0;
        for i in 0..f {
            let mut per_b = Vec::with_capacity(b);
            for (x, cache) in xs.iter().zip(caches.iter_mut()) {
                cache.start_chunk();
                let y = self.decoder.forward(&x.narrow(0, i, 1)?, cache, i == 0)?;
                let y = y.clamp(-1f32, 1f32)?;
                per_b.push(self.frames_to_sample(&y)?);
            }
            let chunk = Tensor::stack(&per_b, 0)?;
            drop(per_b);
            let tf = chunk.dim(2)?;
            out.slice_set(&chunk, 2, offset)?;
            offset += tf;
            on_frame(i + 1, f)?;
        }
        Ok(out)
    }

    /// All latent frames of one latent tile `[B, Z, F, h, w]` through `post_quant_conv` and the
    /// decoder (fresh cache), giving the raw (patchified, unclamped) `[B, C·p², F_out, H, W]`.
    fn decode_tile(&self, z: &Tensor, on_frame: &mut dyn FnMut() -> Result<()>) -> Result<Tensor> {
        let (b, _, f, _, _) = z.dims5()?;
        let xs: Vec<Tensor> = (0..b)
            .map(|i| self.latent_frames(&z.get(i)?))
            .collect::<candle_core::Result<_>>()?;
        let mut caches: Vec<FeatCache> = (0..b).map(|_| FeatCache::new()).collect();
        let mut frames: Vec<Vec<Tensor>> = (0..b).map(|_| Vec::with_capacity(f)).collect();
        for k in 0..f {
            for ((x, cache), fr) in xs.iter().zip(caches.iter_mut()).zip(frames.iter_mut()) {
                cache.start_chunk();
                fr.push(self.decoder.forward(&x.narrow(0, k, 1)?, cache, k == 0)?);
            }
            on_frame()?;
        }
        drop(caches);
        let per_b = frames
            .iter()
            .map(|fr| Self::frames_to_cthw(&Tensor::cat(fr, 0)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&per_b, 0)?)
    }

    /// `tiled_decode`: overlapping latent tiles decoded separately, blended with `blend_v` /
    /// `blend_h` in patchified space, cropped, unpatchified and clamped.
    fn tiled_decode(
        &self,
        z: &Tensor,
        t: &TilingConfig,
        on_frame: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (_, _, f, height, width) = z.dims5()?;
        let sc = cfg.spatial_compression();
        let p = cfg.patch();
        let tl_min_h = t.tile_sample_min_height / sc;
        let tl_min_w = t.tile_sample_min_width / sc;
        let tl_stride_h = t.tile_sample_stride_height / sc;
        let tl_stride_w = t.tile_sample_stride_width / sc;
        if tl_min_h == 0 || tl_min_w == 0 || tl_stride_h == 0 || tl_stride_w == 0 {
            return Err(Error::InvalidRequest(format!(
                "tile sizes {t:?} must be at least the spatial compression {sc} px"
            )));
        }
        let sample_h = height * sc / p;
        let sample_w = width * sc / p;
        let ts_stride_h = t.tile_sample_stride_height / p;
        let ts_stride_w = t.tile_sample_stride_width / p;
        let blend_h = (t.tile_sample_min_height / p).saturating_sub(ts_stride_h);
        let blend_w = (t.tile_sample_min_width / p).saturating_sub(ts_stride_w);

        let rows: Vec<usize> = (0..height).step_by(tl_stride_h).collect();
        let cols: Vec<usize> = (0..width).step_by(tl_stride_w).collect();
        let total = rows.len() * cols.len() * f;
        let mut done = 0;
        let mut prev_row: Vec<Tensor> = Vec::new();
        let mut result_rows = Vec::new();
        for &i in &rows {
            let mut row: Vec<Tensor> = Vec::new();
            let mut result_row = Vec::new();
            for (jj, &j) in cols.iter().enumerate() {
                let zt = z.narrow(3, i, span(height, i, tl_min_h))?.narrow(
                    4,
                    j,
                    span(width, j, tl_min_w),
                )?;
                let mut tile = self.decode_tile(&zt, &mut || {
                    done += 1;
                    on_frame(done, total)
                })?;
                if let Some(above) = prev_row.get(jj) {
                    tile = blend_v(above, &tile, blend_h)?;
                }
                if let Some(left) = row.last() {
                    tile = blend_h_(left, &tile, blend_w)?;
                }
                result_row.push(crop(&tile, ts_stride_h, ts_stride_w)?);
                row.push(tile);
            }
            result_rows.push(Tensor::cat(&result_row, 4)?);
            prev_row = row;
        }
        drop(prev_row);
        let dec = crop(&Tensor::cat(&result_rows, 3)?, sample_h, sample_w)?;
        drop(result_rows);
        let dec = self.unpatchify(&dec)?;
        Ok(dec.clamp(-1f32, 1f32)?)
    }
}

/// `(start, len)` of the encoder chunks: frame 0, then `[1 + 4(i−1), 1 + 4i)`.
fn encode_chunks(f: usize) -> impl Iterator<Item = (usize, usize)> {
    let iters = 1 + f.saturating_sub(1) / ENCODE_CHUNK_FRAMES;
    (0..iters).map(|i| {
        if i == 0 {
            (0, 1)
        } else {
            (1 + ENCODE_CHUNK_FRAMES * (i - 1), ENCODE_CHUNK_FRAMES)
        }
    })
}

/// `tile[:, :, :, :h, :w]` on `[B, C, F, H, W]`.
fn crop(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (_, _, _, xh, xw) = x.dims5()?;
    x.narrow(3, 0, h.min(xh))?.narrow(4, 0, w.min(xw))
}

/// Weights `(1 − y/e, y/e)` for `y` in `0..e`, computed in f64 like Python then cast.
fn blend_weights(e: usize, dtype: DType, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let wb: Vec<f64> = (0..e).map(|y| y as f64 / e as f64).collect();
    let wa: Vec<f64> = wb.iter().map(|v| 1.0 - v).collect();
    Ok((
        Tensor::new(wa.as_slice(), device)?.to_dtype(dtype)?,
        Tensor::new(wb.as_slice(), device)?.to_dtype(dtype)?,
    ))
}

/// `blend_v(a, b, blend_extent)` on `[B, C, F, H, W]`: the first rows of `b` fade in from the
/// last rows of `a`.
fn blend_v(a: &Tensor, b: &Tensor, extent: usize) -> candle_core::Result<Tensor> {
    let (ah, bh) = (a.dim(3)?, b.dim(3)?);
    let e = extent.min(ah).min(bh);
    if e == 0 {
        return Ok(b.clone());
    }
    let (wa, wb) = blend_weights(e, b.dtype(), b.device())?;
    let (wa, wb) = (wa.reshape((e, 1))?, wb.reshape((e, 1))?);
    let mixed =
        (a.narrow(3, ah - e, e)?.broadcast_mul(&wa)? + b.narrow(3, 0, e)?.broadcast_mul(&wb)?)?;
    if e == bh {
        return Ok(mixed);
    }
    Tensor::cat(&[&mixed, &b.narrow(3, e, bh - e)?], 3)
}

/// `blend_h(a, b, blend_extent)` on `[B, C, F, H, W]`: the first columns of `b` fade in from the
/// last columns of `a`.
fn blend_h_(a: &Tensor, b: &Tensor, extent: usize) -> candle_core::Result<Tensor> {
    let (aw, bw) = (a.dim(4)?, b.dim(4)?);
    let e = extent.min(aw).min(bw);
    if e == 0 {
        return Ok(b.clone());
    }
    let (wa, wb) = blend_weights(e, b.dtype(), b.device())?;
    let mixed =
        (a.narrow(4, aw - e, e)?.broadcast_mul(&wa)? + b.narrow(4, 0, e)?.broadcast_mul(&wb)?)?;
    if e == bw {
        return Ok(mixed);
    }
    Tensor::cat(&[&mixed, &b.narrow(4, e, bw - e)?], 4)
}
