//! The building blocks of `AutoencoderKLWan` (diffusers `autoencoder_kl_wan.py`):
//! `WanRMS_norm`, `WanResidualBlock`, `WanAttentionBlock`, `WanMidBlock`, `WanResample`,
//! `AvgDown3D`, `DupUp3D`, `WanResidualDownBlock`, `WanResidualUpBlock`, `WanUpBlock`.
//!
//! Every `forward` takes one sample channels-last as `[T, H, W, C]` (see [`super::conv`]), so
//! the reference's `permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)` around 2D ops is free here.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::conv::{last_frames, FeatCache, Slot, WanCausalConv3d, CACHE_T};

/// `WanRMS_norm`: `F.normalize(x, dim=channels) * dim**0.5 * gamma` (no bias in the VAE).
/// The normalisation runs in f32 for half-precision inputs, as in the reference.
#[derive(Debug, Clone)]
pub struct WanRmsNorm {
    /// `gamma · sqrt(dim)`, shaped `[dim]` to broadcast over `[T, H, W, C]`.
    gamma: Tensor,
    /// The same as f32 values, for the fused CPU kernel.
    gamma_cpu: Option<Vec<f32>>,
}

impl WanRmsNorm {
    /// `images=false` stores gamma as `[dim, 1, 1, 1]`, `images=true` as `[dim, 1, 1]`.
    pub fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        let gamma = (gamma.reshape(dim)? * (dim as f64).sqrt())?;
        let gamma_cpu = if gamma.device().is_cpu() && gamma.dtype() == DType::F32 {
            Some(gamma.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self { gamma, gamma_cpu })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F32 || dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        // F.normalize: x / max(||x||_2, 1e-12) over the channel dim.
        let norm = xf.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
        let normalized = xf.broadcast_div(&norm)?.to_dtype(dtype)?;
        normalized.broadcast_mul(&self.gamma)
    }

    /// `silu(norm(x))`, fused into one pass on the CPU in f32.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.gamma_cpu {
            Some(g) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                crate::kernels::rms_norm_silu(&x.contiguous()?, g)
            }
            _ => self.forward(x)?.silu(),
        }
    }
}

/// `WanResidualBlock`: shortcut (1×1×1 causal conv when the channel count changes) +
/// [RMS norm → SiLU → causal conv 3³ → RMS norm → SiLU → (dropout) → causal conv 3³].
#[derive(Debug, Clone)]
pub struct WanResidualBlock {
    norm1: WanRmsNorm,
    conv1: WanCausalConv3d,
    norm2: WanRmsNorm,
    conv2: WanCausalConv3d,
    conv_shortcut: Option<WanCausalConv3d>,
}

impl WanResidualBlock {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_dim != out_dim {
            Some(WanCausalConv3d::k1(
                in_dim,
                out_dim,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: WanRmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: WanCausalConv3d::k3(in_dim, out_dim, vb.pp("conv1"))?,
            norm2: WanRmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: WanCausalConv3d::k3(out_dim, out_dim, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.conv_shortcut {
            Some(c) => c.forward(x, None)?,
            None => x.clone(),
        };
        // Each step replaces `y`, so every intermediate is freed as soon as it is used.
        let mut y = self.norm1.forward_silu(x)?;
        y = self.conv1.forward_cached(&y, cache)?;
        y = self.norm2.forward_silu(&y)?;
        // `conv2(y) + h`, the residual added as the conv output is stored.
        self.conv2.forward_cached_res(&y, cache, Some(&h))
    }
}

/// Rows of queries per attention step, so the score matrix stays near 64 Mi elements even at
/// large latent sizes (the result does not depend on it).
const ATTN_SCORE_ELEMS: usize = 1 << 26;

/// `WanAttentionBlock`: single-head self-attention within each frame (RMS norm → 1×1 conv to
/// q, k, v → softmax(q·kᵀ/√C)·v → 1×1 proj), plus the identity.
#[derive(Debug, Clone)]
pub struct WanAttentionBlock {
    norm: WanRmsNorm,
    /// 1×1 convs as linear maps: `[in, out]` weights (transposed) and `[out]` biases.
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    dim: usize,
}

impl WanAttentionBlock {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let lin = |out: usize, name: &str| -> Result<(Tensor, Tensor)> {
            let w = vb.pp(name).get((out, dim, 1, 1), "weight")?;
            let b = vb.pp(name).get(out, "bias")?;
            Ok((w.reshape((out, dim))?.t()?.contiguous()?, b))
        };
        let (qkv_w, qkv_b) = lin(dim * 3, "to_qkv")?;
        let (proj_w, proj_b) = lin(dim, "proj")?;
        Ok(Self {
            norm: WanRmsNorm::new(dim, true, vb.pp("norm"))?,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            dim,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h, w, c) = x.dims4()?;
        let hw = h * w;
        let xn = self.norm.forward(x)?.reshape((t * hw, c))?;
        let qkv = xn
            .matmul(&self.qkv_w)?
            .broadcast_add(&self.qkv_b)?
            .reshape((t, hw, 3 * c))?;
        // [T, HW, C] each (rows strided by 3C).
        let q = qkv.narrow(2, 0, c)?;
        let k = qkv.narrow(2, c, c)?.contiguous()?;
        let v = qkv.narrow(2, 2 * c, c)?.contiguous()?;
        let kt = k.t()?;
        let scale = 1.0 / (self.dim as f64).sqrt();
        let rows = (ATTN_SCORE_ELEMS / (t * hw).max(1)).clamp(1, hw);
        let mut outs = Vec::new();
        let mut start = 0;
        while start < hw {
            let n = rows.min(hw - start);
            let qi = q.narrow(1, start, n)?.contiguous()?;
            let scores = (qi.matmul(&kt)? * scale)?;
            let attn = candle_nn::ops::softmax_last_dim(&scores)?;
            drop(scores);
            outs.push(attn.matmul(&v)?);
            start += n;
        }
        let o = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        let o = o
            .reshape((t * hw, c))?
            .matmul(&self.proj_w)?
            .broadcast_add(&self.proj_b)?
            .reshape((t, h, w, c))?;
        o + x
    }
}

/// `WanMidBlock` (`num_layers=1`): resnet → attention → resnet.
#[derive(Debug, Clone)]
pub struct WanMidBlock {
    resnets: Vec<WanResidualBlock>,
    attentions: Vec<WanAttentionBlock>,
}

impl WanMidBlock {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| WanResidualBlock::new(dim, dim, vb.pp("resnets").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![WanAttentionBlock::new(dim, vb.pp("attentions").pp(0))?];
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, cache)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x)?;
            x = resnet.forward(&x, cache)?;
        }
        Ok(x)
    }
}

/// The `mode` of a [`WanResample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    Upsample2d,
    Upsample3d,
    Downsample2d,
    Downsample3d,
}

/// `WanResample`: spatial ×2 up (nearest + conv) or down (zero-pad right/bottom + stride-2
/// conv), with a causal time conv for the 3D modes (temporal ×2 up by channel split, or ×2
/// down with a stride-2 (3,1,1) conv).
#[derive(Debug, Clone)]
pub struct WanResample {
    mode: ResampleMode,
    /// `resample.1`, the Conv2d inside the reference's `nn.Sequential` (run like a causal conv
    /// with one temporal tap; for downsampling it includes the `ZeroPad2d((0, 1, 0, 1))`).
    conv: WanCausalConv3d,
    time_conv: Option<WanCausalConv3d>,
}

impl WanResample {
    /// `WanResample(dim, mode, upsample_out_dim)` (`upsample_out_dim` defaults to `dim // 2`).
    pub fn new(
        dim: usize,
        mode: ResampleMode,
        upsample_out_dim: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let up_out = upsample_out_dim.unwrap_or(dim / 2);
        let (conv, time_conv) = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let conv = WanCausalConv3d::conv2d(dim, up_out, 3, 1, vb.pp("resample").pp(1))?;
                let tc = if mode == ResampleMode::Upsample3d {
                    Some(WanCausalConv3d::new(
                        dim,
                        dim * 2,
                        (3, 1),
                        (1, 1),
                        (1, 0),
                        vb.pp("time_conv"),
                    )?)
                } else {
                    None
                };
                (conv, tc)
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                let conv = WanCausalConv3d::conv2d_down(dim, dim, vb.pp("resample").pp(1))?;
                let tc = if mode == ResampleMode::Downsample3d {
                    Some(WanCausalConv3d::new(
                        dim,
                        dim,
                        (3, 1),
                        (2, 1),
                        (0, 0),
                        vb.pp("time_conv"),
                    )?)
                } else {
                    None
                };
                (conv, tc)
            }
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            match cache.take() {
                None => cache.put(Slot::Rep),
                Some(prev) => {
                    let mut cache_x = last_frames(&x, CACHE_T)?;
                    if cache_x.dim(0)? < 2 {
                        let front = match &prev {
                            Slot::Frames(p) => p.narrow(0, p.dim(0)? - 1, 1)?,
                            Slot::Rep => cache_x.zeros_like()?,
                        };
                        cache_x = Tensor::cat(&[&front, &cache_x], 0)?;
                    }
                    let y = match &prev {
                        Slot::Rep => tc.forward(&x, None)?,
                        Slot::Frames(p) => tc.forward(&x, Some(p))?,
                    };
                    drop(prev);
                    cache.put(Slot::Frames(cache_x));
                    // [T, H, W, 2C] with channels (j, c) → frames 2t + j.
                    let (t, h, w, c2) = y.dims4()?;
                    x = y
                        .reshape((t, h, w, 2, c2 / 2))?
                        .permute((0, 3, 1, 2, 4))?
                        .contiguous()?
                        .reshape((t * 2, h, w, c2 / 2))?;
                }
            }
        }
        x = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                // nearest-exact ×2 (each pixel repeated 2×2).
                let (t, h, w, c) = x.dims4()?;
                let up = x
                    .reshape((t, h, 1, w, 1, c))?
                    .broadcast_as((t, h, 2, w, 2, c))?
                    .contiguous()?
                    .reshape((t, 2 * h, 2 * w, c))?;
                self.conv.forward(&up, None)?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                self.conv.forward(&x, None)?
            }
        };
        if let (ResampleMode::Downsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            match cache.take() {
                // The reference caches the whole chunk; only its last frame is ever read.
                None => cache.put(Slot::Frames(last_frames(&x, 1)?)),
                Some(prev) => {
                    let cache_x = last_frames(&x, 1)?;
                    let last = match &prev {
                        Slot::Frames(p) => p.narrow(0, p.dim(0)? - 1, 1)?,
                        Slot::Rep => candle_core::bail!("temporal downsample found a Rep cache"),
                    };
                    x = tc.forward(&Tensor::cat(&[&last, &x], 0)?, None)?;
                    cache.put(Slot::Frames(cache_x));
                }
            }
        }
        Ok(x)
    }
}

/// `AvgDown3D`: space/time-to-channel (front-padding time to a multiple of `factor_t`), then the
/// mean over groups of `in·factor/out` channels. The shortcut of [`WanResidualDownBlock`].
#[derive(Debug, Clone)]
pub struct AvgDown3D {
    out_c: usize,
    factor_t: usize,
    factor_s: usize,
    group: usize,
}

impl AvgDown3D {
    pub fn new(in_c: usize, out_c: usize, factor_t: usize, factor_s: usize) -> Result<Self> {
        let factor = factor_t * factor_s * factor_s;
        if out_c == 0 || !(in_c * factor).is_multiple_of(out_c) {
            candle_core::bail!(
                "AvgDown3D: in_channels ({in_c}) times the downsampling factor ({factor}) must be divisible by out_channels ({out_c})"
            )
        }
        Ok(Self {
            out_c,
            factor_t,
            factor_s,
            group: in_c * factor / out_c,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h, w, c) = x.dims4()?;
        let (ft, fs) = (self.factor_t, self.factor_s);
        let pad = (ft - t % ft) % ft;
        let x = if pad > 0 {
            x.pad_with_zeros(0, pad, 0)?
        } else {
            x.clone()
        };
        let t2 = (t + pad) / ft;
        // Reference channel order (c, ft, fs_h, fs_w):
        // [T', ft, H', fs, W', fs, C] → [T', H', W', C, ft, fs, fs].
        let x = x
            .reshape(vec![t2, ft, h / fs, fs, w / fs, fs, c])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5])?
            .contiguous()?
            .reshape((t2, h / fs, w / fs, self.out_c, self.group))?;
        x.mean(4)
    }
}

/// `DupUp3D`: channel repeat then depth-to-space/time; on the first chunk the first
/// `factor_t - 1` frames are dropped. The shortcut of [`WanResidualUpBlock`].
#[derive(Debug, Clone)]
pub struct DupUp3D {
    out_c: usize,
    factor_t: usize,
    factor_s: usize,
    repeats: usize,
}

impl DupUp3D {
    pub fn new(in_c: usize, out_c: usize, factor_t: usize, factor_s: usize) -> Result<Self> {
        let factor = factor_t * factor_s * factor_s;
        if in_c == 0 || !(out_c * factor).is_multiple_of(in_c) {
            candle_core::bail!(
                "DupUp3D: out_channels ({out_c}) times the upsampling factor ({factor}) must be divisible by in_channels ({in_c})"
            )
        }
        Ok(Self {
            out_c,
            factor_t,
            factor_s,
            repeats: out_c * factor / in_c,
        })
    }

    pub fn forward(&self, x: &Tensor, first_chunk: bool) -> Result<Tensor> {
        let (t, h, w, c) = x.dims4()?;
        let (ft, fs) = (self.factor_t, self.factor_s);
        // repeat_interleave over channels: [T, H, W, C, r], then channels (out, ft, fs, fs)
        // → [T, ft, H, fs, W, fs, out].
        let x = x
            .unsqueeze(4)?
            .broadcast_as((t, h, w, c, self.repeats))?
            .reshape(vec![t, h, w, self.out_c, ft, fs, fs])?
            .permute(vec![0, 4, 1, 5, 2, 6, 3])?
            .contiguous()?
            .reshape((t * ft, h * fs, w * fs, self.out_c))?;
        if first_chunk && ft > 1 {
            x.narrow(0, ft - 1, t * ft - (ft - 1))
        } else {
            Ok(x)
        }
    }
}

/// `WanResidualDownBlock` (Wan2.2 encoder): resnets, optional downsampler, plus the
/// [`AvgDown3D`] shortcut of the block input.
#[derive(Debug, Clone)]
pub struct WanResidualDownBlock {
    avg_shortcut: AvgDown3D,
    resnets: Vec<WanResidualBlock>,
    downsampler: Option<WanResample>,
}

impl WanResidualDownBlock {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        num_res_blocks: usize,
        temperal_downsample: bool,
        down_flag: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let avg_shortcut = AvgDown3D::new(
            in_dim,
            out_dim,
            if temperal_downsample { 2 } else { 1 },
            if down_flag { 2 } else { 1 },
        )?;
        let mut resnets = Vec::with_capacity(num_res_blocks);
        let mut d = in_dim;
        for i in 0..num_res_blocks {
            resnets.push(WanResidualBlock::new(d, out_dim, vb.pp("resnets").pp(i))?);
            d = out_dim;
        }
        let downsampler = if down_flag {
            let mode = if temperal_downsample {
                ResampleMode::Downsample3d
            } else {
                ResampleMode::Downsample2d
            };
            Some(WanResample::new(out_dim, mode, None, vb.pp("downsampler"))?)
        } else {
            None
        };
        Ok(Self {
            avg_shortcut,
            resnets,
            downsampler,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let shortcut = self.avg_shortcut.forward(x)?;
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, cache)?;
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, cache)?;
        }
        h + shortcut
    }
}

/// `WanUpBlock` (Wan2.1 decoder): `num_res_blocks + 1` resnets and an optional upsampler.
#[derive(Debug, Clone)]
pub struct WanUpBlock {
    resnets: Vec<WanResidualBlock>,
    upsampler: Option<WanResample>,
}

impl WanUpBlock {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        num_res_blocks: usize,
        upsample_mode: Option<ResampleMode>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_res_blocks + 1);
        let mut d = in_dim;
        for i in 0..=num_res_blocks {
            resnets.push(WanResidualBlock::new(d, out_dim, vb.pp("resnets").pp(i))?);
            d = out_dim;
        }
        let upsampler = match upsample_mode {
            Some(mode) => Some(WanResample::new(
                out_dim,
                mode,
                None,
                vb.pp("upsamplers").pp(0),
            )?),
            None => None,
        };
        Ok(Self { resnets, upsampler })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, cache)?;
        }
        match &self.upsampler {
            Some(u) => u.forward(&x, cache),
            None => Ok(x),
        }
    }
}

/// `WanResidualUpBlock` (Wan2.2 decoder): `num_res_blocks + 1` resnets, an optional upsampler
/// to `out_dim`, plus the [`DupUp3D`] shortcut of the block input when upsampling.
#[derive(Debug, Clone)]
pub struct WanResidualUpBlock {
    avg_shortcut: Option<DupUp3D>,
    resnets: Vec<WanResidualBlock>,
    upsampler: Option<WanResample>,
}

impl WanResidualUpBlock {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        num_res_blocks: usize,
        temperal_upsample: bool,
        up_flag: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ft = if temperal_upsample { 2 } else { 1 };
        let avg_shortcut = if up_flag {
            Some(DupUp3D::new(in_dim, out_dim, ft, 2)?)
        } else {
            None
        };
        let mut resnets = Vec::with_capacity(num_res_blocks + 1);
        let mut d = in_dim;
        for i in 0..=num_res_blocks {
            resnets.push(WanResidualBlock::new(d, out_dim, vb.pp("resnets").pp(i))?);
            d = out_dim;
        }
        let upsampler = if up_flag {
            let mode = if temperal_upsample {
                ResampleMode::Upsample3d
            } else {
                ResampleMode::Upsample2d
            };
            Some(WanResample::new(
                out_dim,
                mode,
                Some(out_dim),
                vb.pp("upsampler"),
            )?)
        } else {
            None
        };
        Ok(Self {
            avg_shortcut,
            resnets,
            upsampler,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Result<Tensor> {
        let shortcut = match &self.avg_shortcut {
            Some(s) => Some(s.forward(x, first_chunk)?),
            None => None,
        };
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h, cache)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, cache)?;
        }
        match shortcut {
            Some(s) => h + s,
            None => Ok(h),
        }
    }
}
