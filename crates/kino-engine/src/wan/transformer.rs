//! `WanTransformer3DModel`: the Wan diffusion transformer (DiT) of Wan2.1 T2V and Wan2.2 TI2V.
//!
//! Mirrors diffusers `src/diffusers/models/transformers/transformer_wan.py` (diffusers 0.42.1):
//!
//! | diffusers                     | here                                   |
//! |-------------------------------|----------------------------------------|
//! | `WanRotaryPosEmbed`           | [`WanRotaryPosEmbed`] (`rope`)         |
//! | `nn.Conv3d` `patch_embedding` | [`PatchEmbedding`] (a linear map)      |
//! | `WanTimeTextImageEmbedding`   | [`WanTimeTextImageEmbedding`]          |
//! | `WanAttention` + `WanAttnProcessor` | [`WanAttention`]                 |
//! | `FeedForward` (`gelu-approximate`)  | [`FeedForward`]                  |
//! | `WanTransformerBlock`         | [`WanTransformerBlock`]                |
//! | `WanTransformer3DModel`       | [`WanTransformer3DModel`]              |
//!
//! Weight names are the diffusers names (`blocks.{i}.attn1.to_q.weight`, ...). The order of
//! operations and the dtype handling follow the reference under `from_pretrained`: the modules of
//! `_keep_in_fp32_modules` (`rope`, `time_embedder`, `scale_shift_table`, `norm1/2/3`) stay in f32
//! when the model runs in bf16/f16, the modulation and gated residuals are computed in f32, and the
//! RoPE tables are computed in f64 and rounded to f32.
//!
//! Image conditioning (`image_dim` / `added_kv_proj_dim`, Wan2.1 I2V's CLIP tokens) is not
//! implemented: such a config is refused. Wan2.2 TI2V's image-to-video works without it (the
//! image is a latent frame with per-token timestep 0, see `timestep` in [`WanTransformer3DModel::forward`]).
//!
//! Speed notes (the CPU hot path): q/k/v stay in the `[B, N, heads, head_dim]` layout the linear
//! layers produce, and the attention matmuls read them through strides (no transposed copies);
//! RoPE is one `rope_i` pass; the attention is chunked over queries to bound the memory of the
//! score matrix; modulated LayerNorm and gated residuals are single fused passes on the CPU that
//! read the `[B, 1, D]` modulation without broadcasting it to every token.

use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loading::{read_config, Weights};

/// The diffusers class name in `transformer/config.json`.
pub const CLASS_NAME: &str = "WanTransformer3DModel";

/// Upper bound on the elements of one chunk of attention scores (`heads × queries × keys`), so
/// that long videos (32k tokens) don't need a 50 GB score matrix on the CPU path.
const ATTN_CHUNK_ELEMS: usize = 32 * 1024 * 1024;

fn default_patch_size() -> [usize; 3] {
    [1, 2, 2]
}
fn default_num_attention_heads() -> usize {
    40
}
fn default_attention_head_dim() -> usize {
    128
}
fn default_in_channels() -> usize {
    16
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}
fn default_text_dim() -> usize {
    4096
}
fn default_freq_dim() -> usize {
    256
}
fn default_ffn_dim() -> usize {
    13824
}
fn default_num_layers() -> usize {
    40
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".to_string())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_max_seq_len() -> usize {
    1024
}

/// `transformer/config.json` of a `WanTransformer3DModel`; serde defaults are the reference
/// `__init__` defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// (t, h, w) patch size of the 3D patch embedding.
    #[serde(default = "default_patch_size")]
    pub patch_size: [usize; 3],
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// `None` (or 0) means `in_channels`, as the reference's `out_channels or in_channels`.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    pub text_dim: usize,
    #[serde(default = "default_freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "default_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Affine LayerNorm (`norm2`) before the cross-attention; identity when false.
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    /// Accepted and, as in the reference, not consulted: `WanAttention` always applies RMSNorm
    /// across heads to q and k.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// CLIP image embedding width of Wan2.1 I2V (not supported).
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// Added key/value projections for image tokens (Wan2.1 I2V; not supported).
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_max_seq_len")]
    pub rope_max_seq_len: usize,
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            patch_size: default_patch_size(),
            num_attention_heads: default_num_attention_heads(),
            attention_head_dim: default_attention_head_dim(),
            in_channels: default_in_channels(),
            out_channels: default_out_channels(),
            text_dim: default_text_dim(),
            freq_dim: default_freq_dim(),
            ffn_dim: default_ffn_dim(),
            num_layers: default_num_layers(),
            cross_attn_norm: true,
            qk_norm: default_qk_norm(),
            eps: default_eps(),
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: default_rope_max_seq_len(),
            pos_embed_seq_len: None,
        }
    }
}

impl Config {
    /// Width of the hidden states: `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels or in_channels`).
    pub fn out_channels(&self) -> usize {
        match self.out_channels {
            Some(c) if c > 0 => c,
            _ => self.in_channels,
        }
    }

    /// Number of parameters the reference model has for this config (for memory estimates).
    pub fn num_params(&self) -> usize {
        let d = self.inner_dim();
        let p: usize = self.patch_size.iter().product();
        let linear = |i: usize, o: usize| i * o + o;
        let mut n = 0;
        // patch_embedding (Conv3d with bias)
        n += d * self.in_channels * p + d;
        // condition_embedder: time_embedder, time_proj, text_embedder
        n += linear(self.freq_dim, d) + linear(d, d);
        n += linear(d, 6 * d);
        n += linear(self.text_dim, d) + linear(d, d);
        if let Some(img) = self.image_dim {
            // WanImageEmbedding: norm1, ff (Linear img->img, GELU, Linear img->d), norm2, pos_embed
            n += 2 * img + linear(img, img) + linear(img, d) + 2 * d;
            n += self.pos_embed_seq_len.unwrap_or(0) * img;
        }
        // blocks
        let attn = 4 * linear(d, d) + 2 * d;
        let mut block = 2 * attn + linear(d, self.ffn_dim) + linear(self.ffn_dim, d) + 6 * d;
        if self.cross_attn_norm {
            block += 2 * d;
        }
        if let Some(kv) = self.added_kv_proj_dim {
            block += 2 * linear(kv, d) + d;
        }
        n += self.num_layers * block;
        // proj_out, scale_shift_table
        n += linear(d, self.out_channels() * p) + 2 * d;
        n
    }

    /// Checks the config describes a model we can build, with a message saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return Err(Error::InvalidRequest(format!(
                "this transformer takes image conditioning (image_dim={:?}, added_kv_proj_dim={:?}), \
                 i.e. it is a Wan2.1 image-to-video model; Kino does not support that yet. \
                 Use a text-to-video transformer (e.g. Wan2.1-T2V-1.3B or Wan2.2-TI2V-5B)",
                self.image_dim, self.added_kv_proj_dim
            )));
        }
        let bad = |what: String| Err(Error::InvalidRequest(format!("transformer config: {what}")));
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return bad("num_attention_heads and attention_head_dim must be positive".into());
        }
        if !self.attention_head_dim.is_multiple_of(2) {
            return bad(format!(
                "attention_head_dim {} must be even (3D RoPE rotates pairs of channels)",
                self.attention_head_dim
            ));
        }
        if self.patch_size.contains(&0) {
            return bad(format!("patch_size {:?} must be positive", self.patch_size));
        }
        if self.in_channels == 0 || self.text_dim == 0 || self.ffn_dim == 0 {
            return bad("in_channels, text_dim and ffn_dim must be positive".into());
        }
        if self.freq_dim < 2 {
            return bad(format!("freq_dim {} must be at least 2", self.freq_dim));
        }
        if self.rope_max_seq_len == 0 {
            return bad("rope_max_seq_len must be positive".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Fused CPU kernels (f32). On other devices the same maths runs as candle tensor ops.
// ---------------------------------------------------------------------------------------------

/// Rows `[d]` of a `[b|1, n|1, d]` f32 tensor with unit stride in the last dim, indexed by
/// (batch, token) of a `[b, n, d]` tensor: the modulation broadcast without copies.
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    stride_b: usize,
    stride_n: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn new(data: &'a [f32], l: &Layout, b: usize, n: usize, d: usize) -> candle_core::Result<Self> {
        let (lb, ln, ld) = l.shape().dims3()?;
        let st = l.stride();
        if ld != d || !(lb == 1 || lb == b) || !(ln == 1 || ln == n) || (d > 1 && st[2] != 1) {
            candle_core::bail!(
                "modulation of shape {:?} (strides {st:?}) does not broadcast to [{b}, {n}, {d}]",
                l.dims()
            );
        }
        let stride_b = if lb == 1 { 0 } else { st[0] };
        let stride_n = if ln == 1 { 0 } else { st[1] };
        let last = l.start_offset() + (lb - 1) * st[0] + (ln - 1) * st[1] + d;
        if last > data.len() {
            candle_core::bail!("modulation layout out of bounds");
        }
        Ok(Self {
            data,
            offset: l.start_offset(),
            stride_b,
            stride_n,
            d,
        })
    }

    fn row(&self, bi: usize, ni: usize) -> &[f32] {
        let o = self.offset + bi * self.stride_b + ni * self.stride_n;
        &self.data[o..o + self.d]
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("{what}: expected f32, got {:?}", s.dtype()),
    }
}

/// Runs `f(row_index, row)` over the `n_rows` rows of `dst` on candle's CPU thread pool.
fn par_rows(dst: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 {
        return;
    }
    let n_rows = dst.len() / row_len;
    let ptr = dst.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(n_rows, |range| {
        for r in range {
            // SAFETY: `r < n_rows`, so the row lies inside `dst`; every row is handed to exactly
            // one worker, so the mutable slices are disjoint; `dst` outlives this call.
            let row = unsafe {
                std::slice::from_raw_parts_mut((ptr as *mut f32).add(r * row_len), row_len)
            };
            f(r, row);
        }
    });
}

/// `LayerNorm(x) * (1 + scale) + shift` (or `* scale + shift` when `one_plus` is false, i.e. an
/// affine LayerNorm), LayerNorm without affine, over the last dim of a contiguous f32
/// `[B, N, D]` tensor; `scale`/`shift` are `[B|1, N|1, D]`.
struct ModulatedLayerNorm {
    eps: f64,
    one_plus: bool,
}

impl CustomOp3 for ModulatedLayerNorm {
    fn name(&self) -> &'static str {
        "wan-modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm input")?;
        let (b, n, d) = l1.shape().dims3()?;
        let scale = Rows::new(f32_data(s2, "layer norm scale")?, l2, b, n, d)?;
        let shift = Rows::new(f32_data(s3, "layer norm shift")?, l3, b, n, d)?;
        let mut dst = vec![0f32; b * n * d];
        let (eps, one_plus) = (self.eps, self.one_plus);
        par_rows(&mut dst, d, |r, out| {
            let src = &x[r * d..(r + 1) * d];
            let (bi, ni) = (r / n, r % n);
            let mean = src.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = src
                .iter()
                .map(|&v| {
                    let c = v as f64 - mean;
                    c * c
                })
                .sum::<f64>()
                / d as f64;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            let (sc, sh) = (scale.row(bi, ni), shift.row(bi, ni));
            if one_plus {
                for (((o, &v), &s), &t) in out.iter_mut().zip(src).zip(sc).zip(sh) {
                    *o = ((v - mean) * rstd) * (1.0 + s) + t;
                }
            } else {
                for (((o, &v), &s), &t) in out.iter_mut().zip(src).zip(sc).zip(sh) {
                    *o = ((v - mean) * rstd) * s + t;
                }
            }
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `x + y * gate` for contiguous f32 `[B, N, D]` `x`, `y` and a `[B|1, N|1, D]` gate.
struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "wan-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "residual")?;
        let y = contiguous_f32(s2, l2, "residual branch")?;
        let (b, n, d) = l1.shape().dims3()?;
        if l2.dims() != l1.dims() {
            candle_core::bail!("residual shapes differ: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let gate = Rows::new(f32_data(s3, "gate")?, l3, b, n, d)?;
        let mut dst = vec![0f32; b * n * d];
        par_rows(&mut dst, d, |r, out| {
            let g = gate.row(r / n, r % n);
            let (xs, ys) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
            for (((o, &a), &c), &g) in out.iter_mut().zip(xs).zip(ys).zip(g) {
                *o = a + c * g;
            }
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `FP32LayerNorm(x.float()) * (1 + scale) + shift` in f32 (`one_plus`), or the affine
/// `FP32LayerNorm` with weight `scale` and bias `shift` (`!one_plus`). `x` is `[B, N, D]`.
fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    one_plus: bool,
) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if x.device().is_cpu() {
        return x.apply_op3_no_bwd(scale, shift, &ModulatedLayerNorm { eps, one_plus });
    }
    let d = x.dim(D::Minus1)?;
    let ones = Tensor::ones(d, DType::F32, x.device())?;
    let zeros = Tensor::zeros(d, DType::F32, x.device())?;
    let y = candle_nn::ops::layer_norm(&x, &ones, &zeros, eps as f32)?;
    let scale = if one_plus {
        (scale + 1.0)?
    } else {
        scale.clone()
    };
    y.broadcast_mul(&scale)?.broadcast_add(shift)
}

/// `x.float() + y.float() * gate` (f32 result).
fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let y = y.to_dtype(DType::F32)?.contiguous()?;
    if x.device().is_cpu() {
        return x.apply_op3_no_bwd(&y, gate, &GatedResidual);
    }
    x + y.broadcast_mul(gate)?
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// `torch.nn.RMSNorm(dim, eps, elementwise_affine=True)`.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// `WanRotaryPosEmbed`: 3D RoPE over (frame, row, column) with `t_dim`, `h_dim`, `w_dim`
/// channels of each head; tables from `get_1d_rotary_pos_embed(dim, max_seq_len, 10000,
/// use_real=True, repeat_interleave_real=True, freqs_dtype=float64)`, rounded to f32.
#[derive(Debug, Clone)]
struct WanRotaryPosEmbed {
    head_dim: usize,
    /// Per axis (t, h, w): half the axis' channels, and cos/sin of `pos * freq` as
    /// `[max_seq_len, half]` (the reference repeats each value twice; `rope_i` reads pairs).
    axes: [(usize, Vec<f32>, Vec<f32>); 3],
}

impl WanRotaryPosEmbed {
    fn new(attention_head_dim: usize, max_seq_len: usize) -> Self {
        let theta = 10000f64;
        let h_dim = 2 * (attention_head_dim / 6);
        let w_dim = h_dim;
        let t_dim = attention_head_dim - h_dim - w_dim;
        let axis = |dim: usize| {
            let half = dim / 2;
            // freqs = 1 / theta ** (arange(0, dim, 2) / dim), in f64
            let freqs: Vec<f64> = (0..half)
                .map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64))
                .collect();
            let mut cos = Vec::with_capacity(max_seq_len * half);
            let mut sin = Vec::with_capacity(max_seq_len * half);
            for pos in 0..max_seq_len {
                for f in &freqs {
                    let a = pos as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
            (half, cos, sin)
        };
        Self {
            head_dim: attention_head_dim,
            axes: [axis(t_dim), axis(h_dim), axis(w_dim)],
        }
    }

    /// cos and sin, f32 `[batch * ppf * pph * ppw, 1, head_dim / 2]`, tokens in (t, h, w) order
    /// and channels [t | h | w], repeated for each batch element (the layout `rope_i` wants for
    /// q/k viewed as `[B * N, heads, 1, head_dim]`).
    fn forward(
        &self,
        batch: usize,
        (ppf, pph, ppw): (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let n = ppf * pph * ppw;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let [(ht, ct, st), (hh, ch, sh), (hw, cw, sw)] = &self.axes;
        for f in 0..ppf {
            for h in 0..pph {
                for w in 0..ppw {
                    cos.extend_from_slice(&ct[f * ht..(f + 1) * ht]);
                    cos.extend_from_slice(&ch[h * hh..(h + 1) * hh]);
                    cos.extend_from_slice(&cw[w * hw..(w + 1) * hw]);
                    sin.extend_from_slice(&st[f * ht..(f + 1) * ht]);
                    sin.extend_from_slice(&sh[h * hh..(h + 1) * hh]);
                    sin.extend_from_slice(&sw[w * hw..(w + 1) * hw]);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (1, n, half), device)?;
        let sin = Tensor::from_vec(sin, (1, n, half), device)?;
        let (cos, sin) = if batch == 1 {
            (cos, sin)
        } else {
            (cos.repeat((batch, 1, 1))?, sin.repeat((batch, 1, 1))?)
        };
        Ok((
            cos.reshape((batch * n, 1, half))?,
            sin.reshape((batch * n, 1, half))?,
        ))
    }
}

/// RoPE tables of one forward pass.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The reference's `apply_rotary_emb`: interleaved pairs, computed in f32 (the tables are
    /// f32) and cast back to the input dtype. `x` is `[B, N, heads * head_dim]`.
    fn apply(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (b, n, dim) = x.dims3()?;
        let xf = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((b * n, heads, 1, dim / heads))?;
        candle_nn::rotary_emb::rope_i(&xf, &self.cos, &self.sin)?
            .reshape((b, n, dim))?
            .to_dtype(x.dtype())
    }
}

/// Scaled dot-product attention without mask. `q`: `[B, N, H, d]`, `k`, `v`: `[B, M, H, d]`
/// (contiguous). Returns `[B, N, H * d]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    attention_chunked(q, k, v, ATTN_CHUNK_ELEMS)
}

/// [`attention`] with queries processed in chunks of at most `max_scores` attention scores.
fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_scores: usize,
) -> candle_core::Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let m = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();

    #[cfg(feature = "flash-attn")]
    {
        if q.device().is_cuda() && matches!(q.dtype(), DType::BF16 | DType::F16) {
            // candle_flash_attn::flash_attn takes (batch, seq, heads, head_dim), our layout.
            let o = candle_flash_attn::flash_attn(q, k, v, scale as f32, false)?;
            return o.reshape((b, n, h * d));
        }
    }

    let chunk = (max_scores / (h * m).max(1)).clamp(1, n.max(1));
    if q.device().is_cpu() {
        // Read q/k/v through strides: per batch element [H, N, d] views, no copies.
        let q = q.affine(scale, 0.0)?;
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            let qb = q.get(bi)?.transpose(0, 1)?; // [H, N, d]
            let kt = k.get(bi)?.permute((1, 2, 0))?; // [H, d, M]
            let vb = v.get(bi)?.transpose(0, 1)?; // [H, M, d]
            let mut parts = Vec::with_capacity(n.div_ceil(chunk));
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let s = qb.narrow(1, start, len)?.matmul(&kt)?;
                let p = candle_nn::ops::softmax_last_dim(&s)?;
                parts.push(p.matmul(&vb)?); // [H, len, d]
                start += len;
            }
            let o = if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 1)?
            };
            outs.push(o.transpose(0, 1)?); // [N, H, d]
        }
        let o = if b == 1 {
            outs.remove(0).unsqueeze(0)?
        } else {
            Tensor::stack(&outs, 0)?
        };
        return o.reshape((b, n, h * d));
    }

    // Other devices: the usual [B, H, N, d] layout (BLAS wants plain batch strides).
    let q = (q.transpose(1, 2)?.contiguous()? * scale)?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let kt = k.t()?;
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let s = q.narrow(2, start, len)?.matmul(&kt)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        parts.push(p.matmul(&v)?);
        start += len;
    }
    let o = if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(&parts, 2)?
    };
    o.transpose(1, 2)?.reshape((b, n, h * d))
}

/// `WanAttention` with `WanAttnProcessor` (no image tokens): `to_q/to_k/to_v` → RMSNorm across
/// heads (`norm_q`, `norm_k`) → RoPE (self-attention) → SDPA → `to_out.0`.
#[derive(Debug, Clone)]
struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl WanAttention {
    fn new(dim: usize, heads: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: candle_nn::linear(dim, dim, vb.pp("to_q"))?,
            to_k: candle_nn::linear(dim, dim, vb.pp("to_k"))?,
            to_v: candle_nn::linear(dim, dim, vb.pp("to_v"))?,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: RmsNorm::new(dim, eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(dim, eps, vb.pp("norm_k"))?,
            heads,
        })
    }

    /// `x`: `[B, N, D]`; `context`: `[B, M, D]` for cross-attention, `None` for self-attention.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&Rope>,
    ) -> candle_core::Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, n, dim) = x.dims3()?;
        let m = ctx.dim(1)?;
        let (h, hd) = (self.heads, dim / self.heads);
        let q = self.norm_q.forward(&self.to_q.forward(x)?)?;
        let k = self.norm_k.forward(&self.to_k.forward(ctx)?)?;
        let v = self.to_v.forward(ctx)?;
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, h)?, r.apply(&k, h)?),
            None => (q, k),
        };
        let q = q.reshape((b, n, h, hd))?;
        let k = k.reshape((b, m, h, hd))?;
        let v = v.reshape((b, m, h, hd))?;
        let o = attention(&q, &k, &v)?;
        self.to_out.forward(&o)
    }
}

/// diffusers `FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")`:
/// `net.0.proj` → GELU(tanh) → `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, ffn_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: candle_nn::linear(dim, ffn_dim, vb.pp("net.0.proj"))?,
            proj_out: candle_nn::linear(ffn_dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.proj_out.forward(&self.proj_in.forward(x)?.gelu()?)
    }
}

/// The six modulation rows of a block (or the two of the output head), f32, each
/// `[B, 1, D]` (timestep `[B]`) or `[B, S, D]` (per-token timesteps).
fn modulation_chunks(
    table: &Tensor,
    temb: &Tensor,
    parts: usize,
) -> candle_core::Result<Vec<Tensor>> {
    let temb = temb.to_dtype(DType::F32)?;
    if temb.rank() == 4 {
        // [1, 1, parts, D] + [B, S, parts, D]
        let e = table.unsqueeze(0)?.broadcast_add(&temb)?;
        (0..parts).map(|i| e.narrow(2, i, 1)?.squeeze(2)).collect()
    } else {
        // [1, parts, D] + [B, parts, D]
        let e = table.broadcast_add(&temb)?;
        (0..parts).map(|i| e.narrow(1, i, 1)).collect()
    }
}

/// `WanTransformerBlock`: modulated self-attention with RoPE, cross-attention to the text,
/// modulated feed-forward.
#[derive(Debug, Clone)]
struct WanTransformerBlock {
    attn1: WanAttention,
    attn2: WanAttention,
    /// `norm2` (affine FP32LayerNorm) weight and bias, f32; `None` = identity.
    norm2: Option<(Tensor, Tensor)>,
    ffn: FeedForward,
    /// f32 `[1, 6, D]`.
    scale_shift_table: Tensor,
    eps: f64,
}

impl WanTransformerBlock {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let heads = cfg.num_attention_heads;
        let vb32 = vb.to_dtype(DType::F32);
        let norm2 = if cfg.cross_attn_norm {
            let w = vb32.pp("norm2").get(dim, "weight")?.reshape((1, 1, dim))?;
            let b = vb32.pp("norm2").get(dim, "bias")?.reshape((1, 1, dim))?;
            Some((w, b))
        } else {
            None
        };
        Ok(Self {
            attn1: WanAttention::new(dim, heads, cfg.eps, vb.pp("attn1"))?,
            attn2: WanAttention::new(dim, heads, cfg.eps, vb.pp("attn2"))?,
            norm2,
            ffn: FeedForward::new(dim, cfg.ffn_dim, vb.pp("ffn"))?,
            scale_shift_table: vb32.get((1, 6, dim), "scale_shift_table")?,
            eps: cfg.eps,
        })
    }

    /// `x`: `[B, N, D]` (model dtype); `context`: `[B, L, D]`; `temb`: `timestep_proj`,
    /// `[B, 6, D]` or `[B, S, 6, D]`.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let e = modulation_chunks(&self.scale_shift_table, temb, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&e[0], &e[1], &e[2]);
        let (c_shift_msa, c_scale_msa, c_gate_msa) = (&e[3], &e[4], &e[5]);

        // 1. Self-attention
        let norm =
            modulated_layer_norm(x, scale_msa, shift_msa, self.eps, true)?.to_dtype(dtype)?;
        let attn = self.attn1.forward(&norm, None, Some(rope))?;
        let x = gated_residual(x, &attn, gate_msa)?.to_dtype(dtype)?;

        // 2. Cross-attention
        let norm = match &self.norm2 {
            Some((w, b)) => modulated_layer_norm(&x, w, b, self.eps, false)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let attn = self.attn2.forward(&norm, Some(context), None)?;
        let x = (x + attn)?;

        // 3. Feed-forward
        let norm =
            modulated_layer_norm(&x, c_scale_msa, c_shift_msa, self.eps, true)?.to_dtype(dtype)?;
        let ff = self.ffn.forward(&norm)?;
        gated_residual(&x, &ff, c_gate_msa)?.to_dtype(dtype)
    }
}

/// `WanTimeTextImageEmbedding` without the image embedder: `timesteps_proj` (sinusoid,
/// `flip_sin_to_cos=True`, shift 0), `time_embedder` (f32), `time_proj`, `text_embedder`.
#[derive(Debug, Clone)]
struct WanTimeTextImageEmbedding {
    freq_dim: usize,
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
}

impl WanTimeTextImageEmbedding {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let te = vb.pp("time_embedder").to_dtype(DType::F32);
        Ok(Self {
            freq_dim: cfg.freq_dim,
            time_linear_1: candle_nn::linear(cfg.freq_dim, d, te.pp("linear_1"))?,
            time_linear_2: candle_nn::linear(d, d, te.pp("linear_2"))?,
            time_proj: candle_nn::linear(d, 6 * d, vb.pp("time_proj"))?,
            text_linear_1: candle_nn::linear(cfg.text_dim, d, vb.pp("text_embedder.linear_1"))?,
            text_linear_2: candle_nn::linear(d, d, vb.pp("text_embedder.linear_2"))?,
        })
    }

    /// diffusers `get_timestep_embedding(t, freq_dim, flip_sin_to_cos=True,
    /// downscale_freq_shift=0)`, in f32: `[T]` → `[T, freq_dim]` = [cos | sin].
    fn timesteps_proj(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.freq_dim / 2;
        let neg_log = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (neg_log * i as f32 / half as f32).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let emb = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let mut parts = vec![emb.cos()?, emb.sin()?];
        if !self.freq_dim.is_multiple_of(2) {
            parts.push(Tensor::zeros((t.dim(0)?, 1), DType::F32, t.device())?);
        }
        Tensor::cat(&parts, 1)
    }

    /// Returns (`temb`, `timestep_proj`, text embeddings). `timestep`: flat `[T]`;
    /// `ts_seq_len`: `Some(S)` for per-token timesteps (T = B·S).
    fn forward(
        &self,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        ts_seq_len: Option<usize>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let mut t = self.timesteps_proj(timestep)?;
        if let Some(s) = ts_seq_len {
            let total = t.dim(0)?;
            t = t.reshape((total / s, s, self.freq_dim))?;
        }
        // time_embedder is kept in f32; `.type_as(encoder_hidden_states)` afterwards.
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t)?.silu()?)?
            .to_dtype(encoder_hidden_states.dtype())?;
        let timestep_proj = self.time_proj.forward(&temb.silu()?)?;
        let text = self
            .text_linear_2
            .forward(&self.text_linear_1.forward(encoder_hidden_states)?.gelu()?)?;
        Ok((temb, timestep_proj, text))
    }
}

/// `patch_embedding`: `nn.Conv3d(in, D, kernel=stride=patch_size)`, done as a linear map on
/// the flattened patches (weight `[D, C, pt, ph, pw]` read as `[D, C·pt·ph·pw]`).
#[derive(Debug, Clone)]
struct PatchEmbedding {
    weight: Tensor,
    bias: Tensor,
}

impl PatchEmbedding {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let [pt, ph, pw] = cfg.patch_size;
        let d = cfg.inner_dim();
        let weight = vb.get((d, cfg.in_channels, pt, ph, pw), "weight")?;
        Ok(Self {
            weight: weight.reshape((d, cfg.in_channels * pt * ph * pw))?,
            bias: vb.get(d, "bias")?,
        })
    }

    /// `[B, C, F, H, W]` → `[B, N, D]`, tokens in (f, h, w) order (`flatten(2).transpose(1, 2)`).
    fn forward(&self, x: &Tensor, [pt, ph, pw]: [usize; 3]) -> candle_core::Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let (ppf, pph, ppw) = (f / pt, h / ph, w / pw);
        let n = ppf * pph * ppw;
        let patches = x
            .reshape(&[b, c, ppf, pt, pph, ph, ppw, pw][..])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b * n, c * pt * ph * pw))?;
        let d = self.weight.dim(0)?;
        patches
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((b, n, d))
    }
}

/// The Wan diffusion transformer (`WanTransformer3DModel`).
#[derive(Debug, Clone)]
pub struct WanTransformer3DModel {
    rope: WanRotaryPosEmbed,
    patch_embedding: PatchEmbedding,
    condition_embedder: WanTimeTextImageEmbedding,
    blocks: Vec<WanTransformerBlock>,
    proj_out: Linear,
    /// f32 `[1, 2, D]`.
    scale_shift_table: Tensor,
    config: Config,
    dtype: DType,
    device: Device,
}

impl WanTransformer3DModel {
    /// Loads a diffusers `transformer/` folder (config.json + safetensors) to run in `dtype`
    /// (f32 on the CPU; bf16/f16 on a GPU) on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: Config = read_config(dir, &[CLASS_NAME])?;
        cfg.validate()?;
        if !dtype.is_float() {
            return Err(Error::InvalidRequest(format!(
                "the transformer runs in a float dtype (f32, bf16, f16), not {dtype:?}"
            )));
        }
        if device.is_cpu() && dtype == DType::BF16 {
            return Err(Error::InvalidRequest(
                "bf16 matrix products are not available on the CPU; run the transformer in f32 \
                 there (bf16 is for GPUs)"
                    .into(),
            ));
        }
        let w = Weights::open(dir)?;
        let vb = w.var_builder(dtype, device);
        Self::new(&cfg, vb).map_err(|e| w.map_err(e))
    }

    /// Builds the model from `vb` (its dtype is the compute dtype; the `_keep_in_fp32_modules`
    /// are read in f32).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let d = cfg.inner_dim();
        let p: usize = cfg.patch_size.iter().product();
        let blocks = (0..cfg.num_layers)
            .map(|i| WanTransformerBlock::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            rope: WanRotaryPosEmbed::new(cfg.attention_head_dim, cfg.rope_max_seq_len),
            patch_embedding: PatchEmbedding::new(cfg, vb.pp("patch_embedding"))?,
            condition_embedder: WanTimeTextImageEmbedding::new(cfg, vb.pp("condition_embedder"))?,
            blocks,
            proj_out: candle_nn::linear(d, cfg.out_channels() * p, vb.pp("proj_out"))?,
            scale_shift_table: vb
                .to_dtype(DType::F32)
                .get((1, 2, d), "scale_shift_table")?,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One denoising prediction (the reference `forward(..., return_dict=False)[0]`).
    ///
    /// - `hidden_states`: latents `[B, in_channels, F, H, W]`, any float dtype (computed in the
    ///   model dtype); F, H, W divisible by `patch_size`.
    /// - `timestep`: `[B]` (one per sample), or `[B, S]` with S = F/pt · H/ph · W/pw, one per
    ///   patch token (Wan2.2 `expand_timesteps`: per-token modulation, e.g. 0 on an image frame).
    /// - `encoder_hidden_states`: text embeddings `[B, L, text_dim]`.
    ///
    /// Returns the f32 sample `[B, out_channels, F, H, W]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let [pt, ph, pw] = cfg.patch_size;
        let (b, c, f, h, w) = hidden_states.dims5().map_err(|_| {
            Error::InvalidRequest(format!(
                "hidden_states has shape {:?}; expected [batch, {}, frames, height, width]",
                hidden_states.dims(),
                cfg.in_channels
            ))
        })?;
        if c != cfg.in_channels {
            return Err(Error::InvalidRequest(format!(
                "hidden_states has {c} channels (shape {:?}); this transformer takes {} latent channels",
                hidden_states.dims(),
                cfg.in_channels
            )));
        }
        if b == 0 || f == 0 || h == 0 || w == 0 {
            return Err(Error::InvalidRequest(format!(
                "hidden_states has an empty dimension: {:?}",
                hidden_states.dims()
            )));
        }
        for (name, size, p) in [("frames", f, pt), ("height", h, ph), ("width", w, pw)] {
            if !size.is_multiple_of(p) {
                let lo = size / p * p;
                return Err(Error::InvalidRequest(format!(
                    "latent {name} {size} is not a multiple of the patch size {p}; use {} or {}",
                    lo.max(p),
                    lo + p
                )));
            }
        }
        let (ppf, pph, ppw) = (f / pt, h / ph, w / pw);
        for (name, n) in [("frames", ppf), ("height", pph), ("width", ppw)] {
            if n > cfg.rope_max_seq_len {
                return Err(Error::InvalidRequest(format!(
                    "latent {name} gives {n} patches, more than the {} positions of the rotary \
                     embedding (rope_max_seq_len); use a smaller size",
                    cfg.rope_max_seq_len
                )));
            }
        }
        let n = ppf * pph * ppw;

        let ts_seq_len = match *timestep.dims() {
            [tb] if tb == b => None,
            [tb, s] if tb == b && s == n => Some(s),
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "timestep has shape {:?}; expected [{b}] (one per sample) or [{b}, {n}] \
                     (one per patch token: {ppf}·{pph}·{ppw})",
                    timestep.dims()
                )))
            }
        };
        match *encoder_hidden_states.dims() {
            [eb, l, td] if eb == b && l > 0 && td == cfg.text_dim => {}
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "encoder_hidden_states has shape {:?}; expected [{b}, text_len, {}]",
                    encoder_hidden_states.dims(),
                    cfg.text_dim
                )))
            }
        }
        for (name, t) in [
            ("hidden_states", hidden_states),
            ("encoder_hidden_states", encoder_hidden_states),
        ] {
            if !t.dtype().is_float() {
                return Err(Error::InvalidRequest(format!(
                    "{name} must be a float tensor, got {:?}",
                    t.dtype()
                )));
            }
        }

        let dev = &self.device;
        let x = hidden_states.to_device(dev)?.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_device(dev)?.to_dtype(self.dtype)?;
        let timestep = timestep
            .to_device(dev)?
            .to_dtype(DType::F32)?
            .flatten_all()?;

        let (cos, sin) = self.rope.forward(b, (ppf, pph, ppw), dev)?;
        let rope = Rope { cos, sin };

        let x = self.patch_embedding.forward(&x, cfg.patch_size)?;

        let (temb, timestep_proj, context) = self
            .condition_embedder
            .forward(&timestep, &context, ts_seq_len)?;
        let d = cfg.inner_dim();
        let timestep_proj = match ts_seq_len {
            Some(s) => timestep_proj.reshape((b, s, 6, d))?,
            None => timestep_proj.reshape((b, 6, d))?,
        };

        let mut x = x;
        for block in &self.blocks {
            x = block.forward(&x, &context, &timestep_proj, &rope)?;
        }

        // Output norm, projection, unpatchify. temb: [B, D] or [B, S, D] → [.., 1, D].
        let temb = match ts_seq_len {
            Some(_) => temb.unsqueeze(2)?,
            None => temb.unsqueeze(1)?,
        };
        let e = modulation_chunks(&self.scale_shift_table, &temb, 2)?;
        let (shift, scale) = (&e[0], &e[1]);
        let x = modulated_layer_norm(&x, scale, shift, cfg.eps, true)?.to_dtype(self.dtype)?;
        let x = self.proj_out.forward(&x)?;
        let oc = cfg.out_channels();
        let out = x
            .reshape(&[b, ppf, pph, ppw, pt, ph, pw, oc][..])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, oc, f, h, w))?
            .to_dtype(DType::F32)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;
    use crate::testing::{fixtures_dir, rel_error};

    fn case_dir(case: &str) -> PathBuf {
        fixtures_dir().join(case)
    }

    fn inputs(case: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(case_dir(case).join("input.safetensors"), &Device::Cpu)
            .expect("fixture input")
    }

    fn run_case(case: &str, dtype: DType) -> Result<f64> {
        let dir = case_dir(case);
        let model = WanTransformer3DModel::load(&dir.join("transformer"), dtype, &Device::Cpu)?;
        let inp = inputs(case);
        let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
        let out = model.forward(
            &inp["hidden_states"],
            &inp["timestep"],
            &inp["encoder_hidden_states"],
        )?;
        assert_eq!(out.dtype(), DType::F32);
        rel_error(&out, &exp["sample"])
    }

    #[test]
    fn wan21_matches_reference() -> Result<()> {
        let err = run_case("transformer-wan21", DType::F32)?;
        println!("transformer-wan21 rel error {err:e}");
        assert!(err <= 1e-4, "rel error {err}");
        Ok(())
    }

    #[test]
    fn wan22_per_token_timesteps_match_reference() -> Result<()> {
        let inp = inputs("transformer-wan22");
        assert_eq!(inp["timestep"].dims(), &[2, 48]);
        let err = run_case("transformer-wan22", DType::F32)?;
        println!("transformer-wan22 rel error {err:e}");
        assert!(err <= 1e-4, "rel error {err}");
        Ok(())
    }

    /// Exercises the mixed-precision plumbing (f16 compute, f32 modulation and norms) on the CPU.
    #[test]
    fn f16_is_close_to_reference() -> Result<()> {
        for case in ["transformer-wan21", "transformer-wan22"] {
            let err = run_case(case, DType::F16)?;
            println!("{case} f16 rel error {err:e}");
            assert!(err <= 5e-3, "{case}: f16 rel error {err}");
        }
        Ok(())
    }

    #[test]
    fn config_defaults_and_param_count() -> Result<()> {
        let cfg: Config =
            serde_json::from_str("{}").map_err(|e| Error::InvalidRequest(e.to_string()))?;
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.inner_dim(), 5120);
        for case in ["transformer-wan21", "transformer-wan22"] {
            let dir = case_dir(case).join("transformer");
            let cfg: Config = read_config(&dir, &[CLASS_NAME])?;
            let w = candle_core::safetensors::load(
                dir.join("diffusion_pytorch_model.safetensors"),
                &Device::Cpu,
            )?;
            let total: usize = w.values().map(|t| t.elem_count()).sum();
            assert_eq!(cfg.num_params(), total, "{case}");
        }
        // Wan2.1 T2V-1.3B
        let cfg = Config {
            num_attention_heads: 12,
            ffn_dim: 8960,
            num_layers: 30,
            ..Config::default()
        };
        assert_eq!(cfg.inner_dim(), 1536);
        let n = cfg.num_params();
        assert!((1_400_000_000..1_450_000_000).contains(&n), "{n}");
        Ok(())
    }

    fn expect_invalid(r: Result<Tensor>, needle: &str) {
        match r {
            Err(Error::InvalidRequest(msg)) => {
                println!("{msg}");
                assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`");
            }
            Err(e) => panic!("expected InvalidRequest, got {e}"),
            Ok(t) => panic!("expected an error, got a tensor {:?}", t.dims()),
        }
    }

    #[test]
    fn bad_inputs_are_invalid_requests() -> Result<()> {
        let dir = case_dir("transformer-wan21").join("transformer");
        let model = WanTransformer3DModel::load(&dir, DType::F32, &Device::Cpu)?;
        let dev = Device::Cpu;
        let ts = Tensor::new(&[999f32, 500.0], &dev)?;
        let ctx = Tensor::zeros((2, 8, 32), DType::F32, &dev)?;
        let x = Tensor::zeros((2, 4, 3, 8, 8), DType::F32, &dev)?;
        // wrong channel count
        let bad = Tensor::zeros((2, 5, 3, 8, 8), DType::F32, &dev)?;
        expect_invalid(model.forward(&bad, &ts, &ctx), "4 latent channels");
        // odd height
        let bad = Tensor::zeros((2, 4, 3, 7, 8), DType::F32, &dev)?;
        expect_invalid(model.forward(&bad, &ts, &ctx), "height 7");
        // rank 4
        let bad = Tensor::zeros((2, 4, 8, 8), DType::F32, &dev)?;
        expect_invalid(model.forward(&bad, &ts, &ctx), "expected [batch, 4");
        // per-token timesteps of the wrong length (48 tokens)
        let bad_ts = Tensor::zeros((2, 47), DType::F32, &dev)?;
        expect_invalid(model.forward(&x, &bad_ts, &ctx), "[2, 48]");
        // timestep batch mismatch
        let bad_ts = Tensor::zeros(3, DType::F32, &dev)?;
        expect_invalid(model.forward(&x, &bad_ts, &ctx), "timestep");
        // text width
        let bad_ctx = Tensor::zeros((2, 8, 31), DType::F32, &dev)?;
        expect_invalid(model.forward(&x, &ts, &bad_ctx), "text_len, 32");
        // the valid call works
        let out = model.forward(&x, &ts, &ctx)?;
        assert_eq!(out.dims(), &[2, 4, 3, 8, 8]);
        Ok(())
    }

    /// A copy of the wan21 fixture's transformer folder with its weights edited by `edit`.
    fn edited_copy(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<PathBuf> {
        let src = case_dir("transformer-wan21").join("transformer");
        let dst =
            std::env::temp_dir().join(format!("kino-wan-transformer-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dst).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        std::fs::copy(src.join("config.json"), dst.join("config.json"))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let mut w = candle_core::safetensors::load(
            src.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )?;
        edit(&mut w);
        candle_core::safetensors::save(&w, dst.join("diffusion_pytorch_model.safetensors"))?;
        Ok(dst)
    }

    #[test]
    fn missing_tensor_is_named() -> Result<()> {
        let name = "blocks.1.attn2.norm_k.weight";
        let dir = edited_copy("missing", |w| {
            w.remove(name);
        })?;
        let r = WanTransformer3DModel::load(&dir, DType::F32, &Device::Cpu);
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Err(Error::MissingTensor { name: n, .. }) => assert_eq!(n, name),
            Err(e) => panic!("expected MissingTensor, got {e}"),
            Ok(_) => panic!("loaded without {name}"),
        }
        Ok(())
    }

    #[test]
    fn wrong_shape_is_a_shape_mismatch() -> Result<()> {
        let name = "blocks.0.ffn.net.0.proj.weight";
        let dir = edited_copy("shape", |w| {
            w.insert(
                name.to_string(),
                Tensor::zeros((40, 24), DType::F32, &Device::Cpu).unwrap(),
            );
        })?;
        let r = WanTransformer3DModel::load(&dir, DType::F32, &Device::Cpu);
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Err(Error::ShapeMismatch {
                name: n,
                expected,
                found,
                ..
            }) => {
                assert_eq!(n, name);
                assert_eq!(expected, vec![48, 24]);
                assert_eq!(found, vec![40, 24]);
            }
            Err(e) => panic!("expected ShapeMismatch, got {e}"),
            Ok(_) => panic!("loaded a wrong-shaped {name}"),
        }
        Ok(())
    }

    #[test]
    fn image_conditioned_config_is_refused() -> Result<()> {
        let dir = edited_copy("i2v", |_| {})?;
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let text = text.replace("\"image_dim\": null", "\"image_dim\": 1280");
        std::fs::write(&path, text).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let r = WanTransformer3DModel::load(&dir, DType::F32, &Device::Cpu);
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Err(Error::InvalidRequest(msg)) => assert!(msg.contains("image-to-video"), "{msg}"),
            Err(e) => panic!("expected InvalidRequest, got {e}"),
            Ok(_) => panic!("an image-conditioned config loaded"),
        }
        Ok(())
    }

    /// The strided CPU attention equals a plain reference computation, also when chunked.
    #[test]
    fn chunked_attention_matches_plain() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, m, h, d) = (2, 37, 11, 3, 8);
        let q = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, m, h, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, m, h, d), &dev)?;
        let qt = q.transpose(1, 2)?.contiguous()?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let vt = v.transpose(1, 2)?.contiguous()?;
        let s = (qt.matmul(&kt.t()?)? / (d as f64).sqrt())?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let reference = p.matmul(&vt)?.transpose(1, 2)?.reshape((b, n, h * d))?;
        for budget in [ATTN_CHUNK_ELEMS, 5 * h * m, 1] {
            let out = attention_chunked(&q, &k, &v, budget)?;
            let err = rel_error(&out, &reference)?;
            assert!(err < 1e-6, "budget {budget}: {err}");
        }
        Ok(())
    }
}
