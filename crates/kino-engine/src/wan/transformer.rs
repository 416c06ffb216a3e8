//! `WanTransformer3DModel`: the Wan diffusion transformer (DiT) of Wan2.1 T2V and Wan2.2 TI2V.
//!
//! Mirrors diffusers `src/diffusers/models/transformers/transformer_wan.py` (diffusers 0.42.1):
//!
//! | diffusers                     | here                                   |
//! |-------------------------------|----------------------------------------|
//! | `WanRotaryPosEmbed`           | `WanRotaryPosEmbed` (`rope`)         |
//! | `nn.Conv3d` `patch_embedding` | `PatchEmbedding` (a linear map)      |
//! | `WanTimeTextImageEmbedding`   | `WanTimeTextImageEmbedding`          |
//! | `WanAttention` + `WanAttnProcessor` | `WanAttention`                 |
//! | `FeedForward` (`gelu-approximate`)  | `FeedForward`                  |
//! | `WanTransformerBlock`         | `WanTransformerBlock`                |
//! | `WanTransformer3DModel`       | [`WanTransformer3DModel`]              |
//!
//! Weight names are the diffusers names (`blocks.{i}.attn1.to_q.weight`, ...). The order of
//! operations and the dtype handling follow the reference under `from_pretrained`: the modules of
//! `_keep_in_fp32_modules` (`rope`, `time_embedder`, `scale_shift_table`, `norm1/2/3`) stay in f32
//! when the model runs in bf16/f16, the modulation and gated residuals are computed in f32, and the
//! RoPE tables are computed in f64 and rounded to f32.
//!
//! Image conditioning of Wan2.1 I2V / FLF2V (`image_dim`, `added_kv_proj_dim`,
//! `pos_embed_seq_len`): `WanImageEmbedding` turns the CLIP tokens into image tokens that are put
//! before the text tokens, and each cross-attention attends to them with its own key/value
//! projections (`add_k_proj`, `add_v_proj`, `norm_added_k`), adding the result to the text
//! attention. As in the reference, the attention finds the image tokens as "all but the last 512"
//! of the context (Wan's text length is hard-coded there), Python slicing included. Wan2.2
//! TI2V's image-to-video needs none of this (the image is a latent frame with per-token timestep
//! 0, see `timestep` in [`WanTransformer3DModel::forward`]).
//!
//! Speed notes (the CPU hot path; the kernels live in [`crate::kernels`]): on CPUs with a packed
//! GEMM kernel (AVX-512, AVX2+FMA, NEON) the linear layers run a packed f32 matmul (weights packed once at load; bias and the FFN's GELU applied as
//! each output tile is finished) and the attention is blocked per (batch, head, query block)
//! with the scores kept in cache, reading q/k/v in the `[B, N, heads, head_dim]` layout the
//! linear layers produce (no transposed copies). Elsewhere candle's matmuls and a chunked
//! attention do the same maths. RoPE is one `rope_i` pass; the modulated LayerNorms and the
//! gated residuals are single fused passes that read the `[B, 1, D]` modulation without
//! broadcasting it to every token; softmax and GELU use a vectorizable `exp`.
//! On CUDA with the `flash-attn` feature, bf16 attention with head dimension 128 uses
//! `candle_flash_attn` (the trimmed copy in `vendor/candle-flash-attn`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hooks::{Attn, MagDecision, StepCache};
use crate::kernels::{self, gated_residual_to, modulated_layer_norm_to, softmax_last_dim_owned};
use crate::loading::{read_config, Weights};
use crate::profile;
use crate::wan::linear::LinBase;
pub(crate) use crate::wan::linear::{lin, Lin};

/// The diffusers class name in `transformer/config.json`.
pub const CLASS_NAME: &str = "WanTransformer3DModel";

/// Upper bound on the elements of one chunk of attention scores (`heads × queries × keys`) in
/// [`attention_chunked`], so that long videos (32k tokens) don't need a 50 GB score matrix:
/// small on the CPU (cache), larger on GPUs (fewer kernel launches).
const ATTN_CHUNK_ELEMS_CPU: usize = 8 << 20;
const ATTN_CHUNK_ELEMS_GPU: usize = 256 << 20;

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
    /// CLIP image embedding width of Wan2.1 I2V (`WanImageEmbedding`'s input).
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// Added key/value projections for image tokens (Wan2.1 I2V); must equal the inner dim.
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_max_seq_len")]
    pub rope_max_seq_len: usize,
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
    /// SkyReels-V2: an fps embedding added to the modulation (`fps_embedding`,
    /// `fps_projection`).
    #[serde(default)]
    pub inject_sample_info: bool,
    /// SkyReels-V2: frames per causal attention block (1: full attention).
    #[serde(default = "default_one")]
    pub num_frame_per_block: usize,
    /// VACE (`WanVACETransformer3DModel`): the main layers after which a VACE block's hint is
    /// added, one VACE block each.
    #[serde(default)]
    pub vace_layers: Option<Vec<usize>>,
    /// VACE: channels of the control latents (2·z_dim + 64: inactive, reactive, mask).
    #[serde(default)]
    pub vace_in_channels: Option<usize>,
}

fn default_one() -> usize {
    1
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
            inject_sample_info: false,
            num_frame_per_block: 1,
            vace_layers: None,
            vace_in_channels: None,
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
        if let Some(layers) = &self.vace_layers {
            // vace_patch_embedding; each VACE block is a block plus proj_out (block 0: proj_in).
            n += d * self.vace_in_channels.unwrap_or(0) * p + d;
            n += layers.len() * (block + linear(d, d)) + linear(d, d);
        }
        // proj_out, scale_shift_table
        n += linear(d, self.out_channels() * p) + 2 * d;
        n
    }

    /// Checks the config describes a model we can build, with a message saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidRequest(format!("transformer config: {what}")));
        if let Some(kv) = self.added_kv_proj_dim {
            if kv != self.inner_dim() {
                return bad(format!(
                    "added_kv_proj_dim {kv} must equal the inner dimension {} (the image tokens \
                     are projected to it before the added key/value projections read them)",
                    self.inner_dim()
                ));
            }
        }
        if self.image_dim == Some(0) {
            return bad("image_dim must be positive".into());
        }
        if self.image_dim.is_some() && self.added_kv_proj_dim.is_none() {
            return bad(
                "image_dim is set but added_kv_proj_dim is not: the image tokens would have no \
                 attention to go to"
                    .into(),
            );
        }
        if self.pos_embed_seq_len.is_some() && self.image_dim.is_none() {
            return bad("pos_embed_seq_len is set without image_dim".into());
        }
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
        if self.num_frame_per_block == 0 {
            return bad("num_frame_per_block must be at least 1".into());
        }
        match (&self.vace_layers, self.vace_in_channels) {
            (None, None) => {}
            (Some(layers), Some(c)) => {
                if c == 0 {
                    return bad("vace_in_channels must be positive".into());
                }
                if !layers.contains(&0) {
                    return bad(format!(
                        "vace_layers {layers:?} must include layer 0 (its VACE block takes the \
                         patch-embedded latents)"
                    ));
                }
                if let Some(l) = layers.iter().find(|&&l| l >= self.num_layers) {
                    return bad(format!(
                        "vace_layers names layer {l} but the model has {} layers",
                        self.num_layers
                    ));
                }
                let mut sorted = layers.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != layers.len() {
                    return bad(format!(
                        "vace_layers {layers:?} names a layer twice; the reference would leave \
                         a VACE block's hint unused"
                    ));
                }
            }
            _ => {
                return bad(
                    "vace_layers and vace_in_channels come together (a VACE transformer has \
                     both)"
                        .into(),
                )
            }
        }
        Ok(())
    }
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
        self.forward_rope(x, None, 1)
    }

    /// [`Self::forward`], then the rotary embedding of each of the `heads` heads
    /// ([`Rope::apply`]) when `rope` is given: one threaded pass over `x` on the CPU in f32
    /// ([`kernels::rms_norm_rope`]), candle's ops elsewhere.
    fn forward_rope(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let tables = rope.map(|r| (&r.cos, &r.sin));
        if let Some(y) = kernels::rms_norm_rope(x, &self.weight, self.eps, tables)? {
            return Ok(y);
        }
        let y = candle_nn::ops::rms_norm(x, &self.weight, self.eps)?;
        match rope {
            Some(r) => r.apply(&y, heads),
            None => Ok(y),
        }
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
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The reference's `apply_rotary_emb`: interleaved pairs, computed in f32 (the tables are
    /// f32) and cast back to the input dtype. `x` is `[B, N, heads * head_dim]`.
    fn apply(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if kernels::fused_gpu(x.device()) {
            // One kernel: the same f32 maths, x's dtype in and out.
            return kernels::cuda::rope_i(x, &self.cos, &self.sin, heads);
        }
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
/// (contiguous). Returns `[B, N, H * d]`. Flash attention on CUDA in bf16 with head dimension
/// 128 (feature `flash-attn`: the one kernel of `vendor/candle-flash-attn`, every Wan size),
/// [`kernels::attention`] on CPUs with a packed GEMM kernel (AVX-512, AVX2+FMA, NEON) in f32,
/// else [`attention_chunked`]. Public for `kino bench attention`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let d = q.dim(3)?;
    let scale = 1.0 / (d as f64).sqrt();

    #[cfg(feature = "flash-attn")]
    {
        if q.device().is_cuda() && q.dtype() == DType::BF16 && d == 128 {
            let (b, n, h, _) = q.dims4()?;
            // candle_flash_attn::flash_attn takes (batch, seq, heads, head_dim), our layout.
            let o = candle_flash_attn::flash_attn(q, k, v, scale as f32, false)?;
            return o.reshape((b, n, h * d));
        }
    }

    if let Some(kernel) = packed_cpu_kernel(q) {
        return kernels::attention(q, k, v, scale as f32, kernel);
    }
    let budget = if q.device().is_cpu() {
        ATTN_CHUNK_ELEMS_CPU
    } else {
        ATTN_CHUNK_ELEMS_GPU
    };
    attention_chunked(q, k, v, budget)
}

/// The packed microkernel [`attention`] runs `x`'s attention on: f32 on a CPU that has one.
fn packed_cpu_kernel(x: &Tensor) -> Option<&'static kernels::gemm::Kernel> {
    (x.device().is_cpu() && x.dtype() == DType::F32)
        .then(kernels::packed_gemm)
        .flatten()
}

/// Attention with candle ops, queries in chunks of at most `max_scores` attention scores.
fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_scores: usize,
) -> candle_core::Result<Tensor> {
    let (b, n, h, d) = q.dims4()?;
    let m = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let chunk = (max_scores / (h * m).max(1)).clamp(1, n.max(1));
    if q.device().is_cpu() {
        // Read q/k/v through strides: per batch element [H, N, d] views, no copies. Queries go
        // in chunks so the scores of a chunk stay in cache between the two matmuls.
        let q = q.affine(scale, 0.0)?;
        let mut outs = Vec::with_capacity(b * n.div_ceil(chunk));
        for bi in 0..b {
            let qb = q.get(bi)?.transpose(0, 1)?; // [H, N, d]
            let kt = k.get(bi)?.permute((1, 2, 0))?; // [H, d, M]
            let vb = v.get(bi)?.transpose(0, 1)?; // [H, M, d]
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let s = qb.narrow(1, start, len)?.matmul(&kt)?;
                let p = softmax_last_dim_owned(s)?;
                outs.push(p.matmul(&vb)?.transpose(0, 1)?); // [len, H, d]
                start += len;
            }
        }
        // One copy into [B·N, H, d].
        let o = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
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
        let p = softmax_last_dim_owned(s)?;
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
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    to_out: Lin,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// Wan2.1 I2V cross-attention: `add_k_proj`, `add_v_proj`, `norm_added_k` for the image
    /// tokens.
    added_kv: Option<(Lin, Lin, RmsNorm)>,
    heads: usize,
}

/// The reference's split of the cross-attention context into image and text tokens:
/// `image_context_length = encoder_hidden_states.shape[1] - 512`, then
/// `[:, :image_context_length]` / `[:, image_context_length:]` with Python's slicing (a negative
/// length counts from the end, clamped at 0).
pub const WAN_TEXT_CONTEXT_LENGTH: usize = 512;

fn image_context_split(total: usize) -> usize {
    let n = total as i64 - WAN_TEXT_CONTEXT_LENGTH as i64;
    if n >= 0 {
        (n as usize).min(total)
    } else {
        (total as i64 + n).max(0) as usize
    }
}

impl WanAttention {
    fn new(dim: usize, heads: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: lin(dim, dim, vb.pp("to_q"))?,
            to_k: lin(dim, dim, vb.pp("to_k"))?,
            to_v: lin(dim, dim, vb.pp("to_v"))?,
            to_out: lin(dim, dim, vb.pp("to_out.0"))?,
            norm_q: RmsNorm::new(dim, eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(dim, eps, vb.pp("norm_k"))?,
            added_kv: None,
            heads,
        })
    }

    /// A cross-attention with the added image key/value projections of Wan2.1 I2V.
    fn with_added_kv(
        mut self,
        dim: usize,
        kv_dim: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        self.added_kv = Some((
            lin(kv_dim, dim, vb.pp("add_k_proj"))?,
            lin(kv_dim, dim, vb.pp("add_v_proj"))?,
            RmsNorm::new(dim, eps, vb.pp("norm_added_k"))?,
        ));
        Ok(self)
    }

    /// `x`: `[B, N, D]`; `context`: `[B, M, D]` for cross-attention, `None` for self-attention.
    /// `causal_block`: SkyReels-V2's block-causal self-attention, the tokens of one block of
    /// frames: the queries of block i see the keys of blocks 0..=i. `x` is taken by value so
    /// it is freed once the projections have read it.
    fn forward(
        &self,
        x: Tensor,
        context: Option<&Tensor>,
        rope: Option<&Rope>,
        causal_block: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, dim) = x.dims3()?;
        let (h, hd) = (self.heads, dim / self.heads);
        let dev = x.device().clone();
        let (q, k, v, image, counted) = profile::span("attn.qkv (proj, norm, rope)", &dev, || {
            let q = self
                .norm_q
                .forward_rope(&self.to_q.forward(&x)?, rope, h)?
                .reshape((b, n, h, hd))?;
            let mut ctx = match context {
                Some(c) => c.clone(),
                None => x.clone(),
            };
            drop(x);
            let mut image = None;
            if self.added_kv.is_some() {
                let total = ctx.dim(1)?;
                let split = image_context_split(total);
                if split > 0 {
                    image = Some(ctx.narrow(1, 0, split)?);
                }
                ctx = ctx.narrow(1, split, total - split)?;
            }
            // A padded prompt's rows after the text embedder are one row repeated: on the CPU
            // kernels that row is projected once and counted (`kernels::attention_counted`).
            let mut counted = None;
            if context.is_some() {
                if let Some(kernel) = packed_cpu_kernel(&ctx) {
                    let repeats = kernels::trailing_equal_rows(&ctx)?;
                    if repeats > 1 {
                        ctx = ctx.narrow(1, 0, ctx.dim(1)? - repeats + 1)?;
                        counted = Some((kernel, repeats));
                    }
                }
            }
            let m = ctx.dim(1)?;
            let k = self
                .norm_k
                .forward_rope(&self.to_k.forward(&ctx)?, rope, h)?
                .reshape((b, m, h, hd))?;
            let v = self.to_v.forward(&ctx)?.reshape((b, m, h, hd))?;
            drop(ctx);
            Ok((q, k, v, image, counted))
        })?;
        let mut o = profile::span("attn.sdpa", &dev, || {
            Ok(match causal_block {
                Some(bt) if bt < n => {
                    let mut parts = Vec::with_capacity(n.div_ceil(bt));
                    let mut start = 0;
                    while start < n {
                        let len = bt.min(n - start);
                        let qi = q.narrow(1, start, len)?;
                        let kv_len = start + len;
                        let ki = k.narrow(1, 0, kv_len)?;
                        let vi = v.narrow(1, 0, kv_len)?;
                        parts.push(attention(&qi, &ki, &vi)?);
                        start += len;
                    }
                    Tensor::cat(&parts, 1)?
                }
                _ => match counted {
                    Some((kernel, count)) => {
                        let scale = (1.0 / (hd as f64).sqrt()) as f32; // as `attention`
                        kernels::attention_counted(&q, &k, &v, scale, kernel, count)?
                    }
                    None => attention(&q, &k, &v)?,
                },
            })
        })?;
        if let (Some((add_k, add_v, norm_added_k)), Some(img)) = (&self.added_kv, &image) {
            // I2V: the text query attends to the image tokens too; the outputs are summed.
            let mi = img.dim(1)?;
            let k_img = norm_added_k
                .forward(&add_k.forward(img)?)?
                .reshape((b, mi, h, hd))?;
            let v_img = add_v.forward(img)?.reshape((b, mi, h, hd))?;
            let o_img = attention(&q, &k_img, &v_img)?;
            o = (o + o_img)?;
        }
        drop((q, k, v, image));
        profile::span("attn.out", &dev, || self.to_out.forward(&o))
    }
}

/// diffusers `FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")`:
/// `net.0.proj` → GELU(tanh) → `net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Lin,
    proj_out: Lin,
}

impl FeedForward {
    fn new(dim: usize, ffn_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: lin(dim, ffn_dim, vb.pp("net.0.proj"))?,
            proj_out: lin(ffn_dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // On the CPU's packed kernels: strip by strip of the hidden width, never holding the
        // [N, ffn_dim] activations whole (same result to the bit; see `kernels::feed_forward`).
        if let (Some(a), Some(b)) = (self.proj_in.ffn_layer(), self.proj_out.ffn_layer()) {
            if let Some(y) = kernels::feed_forward(x, a, b)? {
                return Ok(y);
            }
        }
        let h = match &self.proj_in {
            Lin {
                base: LinBase::Candle(l),
                lora: None,
                ..
            } if x.device().is_cpu()
                && x.dtype() == DType::F32
                && !crate::calibration::recording() =>
            {
                // Bias and GELU fused into one in-place pass over the [N, ffn_dim] activations.
                let (b, n, d) = x.dims3()?;
                let h = x
                    .contiguous()?
                    .reshape((b * n, d))?
                    .matmul(&l.weight().t()?)?;
                match l.bias() {
                    Some(bias) => kernels::bias_gelu_inplace(h, bias)?.reshape((b, n, ()))?,
                    None => candle_core::bail!("ffn.net.0.proj has no bias"),
                }
            }
            // GELU applied by the packed matmul as each output tile is finished.
            l => l.forward_act(x, true)?,
        };
        self.proj_out.forward(&h)
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
pub(crate) struct WanTransformerBlock {
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
    pub(crate) fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
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
            attn2: match cfg.added_kv_proj_dim {
                Some(kv) => WanAttention::new(dim, heads, cfg.eps, vb.pp("attn2"))?.with_added_kv(
                    dim,
                    kv,
                    cfg.eps,
                    vb.pp("attn2"),
                )?,
                None => WanAttention::new(dim, heads, cfg.eps, vb.pp("attn2"))?,
            },
            norm2,
            ffn: FeedForward::new(dim, cfg.ffn_dim, vb.pp("ffn"))?,
            scale_shift_table: vb32.get((1, 6, dim), "scale_shift_table")?,
            eps: cfg.eps,
        })
    }

    /// `x`: `[B, N, D]` (model dtype); `context`: `[B, L, D]`; `temb`: `timestep_proj`,
    /// `[B, 6, D]` or `[B, S, 6, D]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        causal_block: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let e = modulation_chunks(&self.scale_shift_table, temb, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&e[0], &e[1], &e[2]);
        let (c_shift_msa, c_scale_msa, c_gate_msa) = (&e[3], &e[4], &e[5]);

        let dev = x.device();

        // Each step in its own scope, so its temporaries (`[B, N, D]` each) are freed before
        // the next step allocates. (`profile::span` is a plain call unless KINO_PROFILE is set.)
        // 1. Self-attention
        let x = {
            let attn = {
                let norm = profile::span("block.norms and residuals", dev, || {
                    modulated_layer_norm_to(x, scale_msa, shift_msa, self.eps, true, dtype)
                })?;
                profile::span("block.attn1", dev, || {
                    self.attn1.forward(norm, None, Some(rope), causal_block)
                })?
            };
            profile::span("block.norms and residuals", dev, || {
                gated_residual_to(x, &attn, gate_msa, dtype)
            })?
        };

        // 2. Cross-attention
        let attn = {
            let norm = profile::span("block.norms and residuals", dev, || match &self.norm2 {
                Some((w, b)) => modulated_layer_norm_to(&x, w, b, self.eps, false, dtype),
                None => Ok(x.clone()),
            })?;
            profile::span("block.attn2", dev, || {
                self.attn2.forward(norm, Some(context), None, None)
            })?
        };
        let x = profile::span("block.norms and residuals", dev, || x + attn)?;

        // 3. Feed-forward
        let ff = {
            let norm = profile::span("block.norms and residuals", dev, || {
                modulated_layer_norm_to(&x, c_scale_msa, c_shift_msa, self.eps, true, dtype)
            })?;
            profile::span("block.ffn", dev, || self.ffn.forward(&norm))?
        };
        profile::span("block.norms and residuals", dev, || {
            gated_residual_to(&x, &ff, c_gate_msa, dtype)
        })
    }

    /// [`Self::forward`] with TaylorSeer around the attention modules (`crate::hooks`); the
    /// same operations otherwise.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_cached(
        &self,
        index: usize,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        causal_block: Option<usize>,
        cache: &mut StepCache,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let e = modulation_chunks(&self.scale_shift_table, temb, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&e[0], &e[1], &e[2]);
        let (c_shift_msa, c_scale_msa, c_gate_msa) = (&e[3], &e[4], &e[5]);

        // 1. Self-attention (each step scoped as in `forward`)
        let x = {
            let attn = {
                let norm = modulated_layer_norm_to(x, scale_msa, shift_msa, self.eps, true, dtype)?;
                cache.taylor_module(index, Attn::Attn1, move || {
                    self.attn1.forward(norm, None, Some(rope), causal_block)
                })?
            };
            gated_residual_to(x, &attn, gate_msa, dtype)?
        };

        // 2. Cross-attention
        let attn = {
            let norm = match &self.norm2 {
                Some((w, b)) => modulated_layer_norm_to(&x, w, b, self.eps, false, dtype)?,
                None => x.clone(),
            };
            cache.taylor_module(index, Attn::Attn2, move || {
                self.attn2.forward(norm, Some(context), None, None)
            })?
        };
        let x = (x + attn)?;

        // 3. Feed-forward
        let ff = {
            let norm =
                modulated_layer_norm_to(&x, c_scale_msa, c_shift_msa, self.eps, true, dtype)?;
            self.ffn.forward(&norm)?
        };
        Ok(gated_residual_to(&x, &ff, c_gate_msa, dtype)?)
    }
}

/// `WanImageEmbedding`: (`pos_embed` +) `norm1` (FP32LayerNorm) → `ff` (Linear, exact GELU,
/// Linear) → `norm2` (FP32LayerNorm), CLIP tokens `[B, S, image_dim]` → image tokens
/// `[B, S, D]`. With `pos_embed` (FLF2V) the first and last images' tokens arrive as a batch of
/// two per sample and are viewed as one sequence of 2·S first.
#[derive(Debug, Clone)]
struct WanImageEmbedding {
    norm1: (Tensor, Tensor),
    ff_in: Lin,
    ff_out: Lin,
    norm2: (Tensor, Tensor),
    /// `[1, pos_embed_seq_len, image_dim]`, in the model dtype.
    pos_embed: Option<Tensor>,
}

/// FP32LayerNorm's default epsilon (`nn.LayerNorm`).
const FP32_LAYER_NORM_EPS: f64 = 1e-5;

impl WanImageEmbedding {
    fn new(cfg: &Config, image_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let vb32 = vb.to_dtype(DType::F32);
        let norm = |name: &str, n: usize| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                vb32.pp(name).get(n, "weight")?.reshape((1, 1, n))?,
                vb32.pp(name).get(n, "bias")?.reshape((1, 1, n))?,
            ))
        };
        let pos_embed = match cfg.pos_embed_seq_len {
            Some(l) => Some(vb.get((1, l, image_dim), "pos_embed")?),
            None => None,
        };
        Ok(Self {
            norm1: norm("norm1", image_dim)?,
            ff_in: lin(image_dim, image_dim, vb.pp("ff.net.0.proj"))?,
            ff_out: lin(image_dim, d, vb.pp("ff.net.2"))?,
            norm2: norm("norm2", d)?,
            pos_embed,
        })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = image.dtype();
        let mut x = image.clone();
        if let Some(pe) = &self.pos_embed {
            let (b, s, e) = x.dims3()?;
            if b % 2 != 0 || 2 * s != pe.dim(1)? {
                candle_core::bail!(
                    "image embeddings {:?} do not fit pos_embed {:?}: a first–last-frame model \
                     takes both images' tokens ([2·B, {}, {e}])",
                    x.dims(),
                    pe.dims(),
                    pe.dim(1)? / 2
                );
            }
            x = x.reshape((b / 2, 2 * s, e))?.broadcast_add(pe)?;
        }
        let (w, b) = &self.norm1;
        let h = modulated_layer_norm_to(&x, w, b, FP32_LAYER_NORM_EPS, false, dtype)?;
        let h = self.ff_in.forward(&h)?.gelu_erf()?;
        let h = self.ff_out.forward(&h)?;
        let (w, b) = &self.norm2;
        modulated_layer_norm_to(&h, w, b, FP32_LAYER_NORM_EPS, false, dtype)
    }
}

/// `WanTimeTextImageEmbedding`: `timesteps_proj` (sinusoid, `flip_sin_to_cos=True`, shift 0),
/// `time_embedder` (f32), `time_proj`, `text_embedder`, and for Wan2.1 I2V `image_embedder`.
#[derive(Debug, Clone)]
struct WanTimeTextImageEmbedding {
    freq_dim: usize,
    time_linear_1: Lin,
    time_linear_2: Lin,
    time_proj: Lin,
    text_linear_1: Lin,
    text_linear_2: Lin,
    image_embedder: Option<WanImageEmbedding>,
}

impl WanTimeTextImageEmbedding {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let te = vb.pp("time_embedder").to_dtype(DType::F32);
        Ok(Self {
            freq_dim: cfg.freq_dim,
            time_linear_1: lin(cfg.freq_dim, d, te.pp("linear_1"))?,
            time_linear_2: lin(d, d, te.pp("linear_2"))?,
            time_proj: lin(d, 6 * d, vb.pp("time_proj"))?,
            text_linear_1: lin(cfg.text_dim, d, vb.pp("text_embedder.linear_1"))?,
            text_linear_2: lin(d, d, vb.pp("text_embedder.linear_2"))?,
            image_embedder: match cfg.image_dim {
                Some(img) => Some(WanImageEmbedding::new(cfg, img, vb.pp("image_embedder"))?),
                None => None,
            },
        })
    }

    /// SkyReels-V2's `SkyReelsV2Timesteps`: `get_1d_sincos_pos_embed_from_grid(freq_dim, t,
    /// flip_sin_to_cos=True)` computed in f64 (`omega = 1 / 10000^(i / (D/2))`, outer product,
    /// [cos | sin]), then cast to f32 for the time embedder.
    fn timesteps_proj_f64(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.freq_dim / 2;
        let omega: Vec<f64> = (0..half)
            .map(|i| 1.0 / 10000f64.powf(i as f64 / (self.freq_dim as f64 / 2.0)))
            .collect();
        let ts: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        let mut out = Vec::with_capacity(ts.len() * 2 * half);
        for &p in &ts {
            out.extend(omega.iter().map(|&w| (p * w).cos() as f32));
            out.extend(omega.iter().map(|&w| (p * w).sin() as f32));
        }
        Tensor::from_vec(out, (ts.len(), 2 * half), t.device())
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
        sincos_f64: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let mut t = if sincos_f64 {
            self.timesteps_proj_f64(timestep)?
        } else {
            self.timesteps_proj(timestep)?
        };
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
pub(crate) struct PatchEmbedding {
    proj: Lin,
    dim: usize,
}

impl PatchEmbedding {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_channels(cfg, cfg.in_channels, vb)
    }

    /// A `Conv3d(channels, inner_dim, patch_size, stride=patch_size)` (VACE's
    /// `vace_patch_embedding` reads the control latents).
    pub(crate) fn with_channels(
        cfg: &Config,
        channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let [pt, ph, pw] = cfg.patch_size;
        let d = cfg.inner_dim();
        let weight = vb.get((d, channels, pt, ph, pw), "weight")?;
        let weight = weight.reshape((d, channels * pt * ph * pw))?;
        let bias = vb.get(d, "bias")?;
        Ok(Self {
            proj: Lin::new(Linear::new(weight, Some(bias)))?,
            dim: d,
        })
    }

    /// `[B, C, F, H, W]` → `[B, N, D]`, tokens in (f, h, w) order (`flatten(2).transpose(1, 2)`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        [pt, ph, pw]: [usize; 3],
    ) -> candle_core::Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let (ppf, pph, ppw) = (f / pt, h / ph, w / pw);
        let n = ppf * pph * ppw;
        let patches = x
            .reshape(&[b, c, ppf, pt, pph, ph, ppw, pw][..])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b * n, c * pt * ph * pw))?;
        self.proj.forward(&patches)?.reshape((b, n, self.dim))
    }
}

/// The Wan diffusion transformer (`WanTransformer3DModel`).
#[derive(Debug, Clone)]
pub struct WanTransformer3DModel {
    rope: WanRotaryPosEmbed,
    patch_embedding: PatchEmbedding,
    condition_embedder: WanTimeTextImageEmbedding,
    blocks: Vec<WanTransformerBlock>,
    proj_out: Lin,
    /// f32 `[1, 2, D]`.
    scale_shift_table: Tensor,
    /// SkyReels-V2 `inject_sample_info`: `fps_embedding` `[2, D]` and `fps_projection`
    /// (`linear-silu` FeedForward: `net.0.proj` → SiLU → `net.2`).
    fps: Option<(Tensor, Lin, Lin)>,
    config: Config,
    dtype: DType,
    device: Device,
}

/// What the blocks of one forward share: the (text and image) context, the timestep
/// projection, the RoPE tables and the causal block (SkyReels-V2).
pub(crate) struct BlockInputs<'a> {
    pub context: &'a Tensor,
    pub timestep_proj: &'a Tensor,
    pub rope: &'a Rope,
    pub causal_block: Option<usize>,
}

/// A branch that runs beside the main blocks (VACE's control blocks, `crate::wan::transformer_vace`):
/// shown the patch-embedded tokens before the first block, then handed the hidden states after
/// each block `i`, which it may add to.
pub(crate) trait BlockHook {
    fn begin(&mut self, x: &Tensor, shared: &BlockInputs) -> Result<()>;
    fn after_block(&mut self, i: usize, x: Tensor, shared: &BlockInputs) -> Result<Tensor>;
}

/// What a SkyReels-V2 forward adds to the Wan one (`crate::skyreels`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ForwardVariant {
    /// The SkyReels-V2 timestep sinusoid (f64) instead of Wan's (f32).
    pub sincos_f64: bool,
    /// `timestep` is `[B, F']`, one value per latent frame (`enable_diffusion_forcing`).
    pub per_frame: bool,
    /// Index into `fps_embedding` (0 for 16 fps, 1 otherwise), with `inject_sample_info`.
    pub fps_index: Option<usize>,
    /// Frames per causal attention block (`num_frame_per_block` > 1).
    pub causal_frames: Option<usize>,
}

impl WanTransformer3DModel {
    /// Loads a diffusers `transformer/` folder (config.json + safetensors) to run in `dtype`
    /// (f32 on the CPU; bf16/f16 on a GPU) on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_class(dir, &[CLASS_NAME], dtype, device)
    }

    /// [`Self::load`] for a folder whose `_class_name` is one of `classes` (SkyReels-V2 shares
    /// the architecture).
    pub(crate) fn load_class(
        dir: &Path,
        classes: &[&str],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(dir, classes, dtype, device, None, |_, _| Ok(())).map(|(m, ())| m)
    }

    /// [`Self::load`] with LoRA adapters (`crate::lora`), fused or on the fly as the set says;
    /// every adapter layer must be one of the model's.
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<std::sync::Arc<crate::lora::LoraSet>>,
    ) -> Result<Self> {
        Self::load_with(dir, &[CLASS_NAME], dtype, device, lora, |_, _| Ok(())).map(|(m, ())| m)
    }

    /// [`Self::load_class`], also building `extra` parts from the same weights (VACE's control
    /// branch).
    pub(crate) fn load_with<E>(
        dir: &Path,
        classes: &[&str],
        dtype: DType,
        device: &Device,
        lora: Option<std::sync::Arc<crate::lora::LoraSet>>,
        extra: impl FnOnce(&Config, VarBuilder) -> candle_core::Result<E>,
    ) -> Result<(Self, E)> {
        let cfg: Config = read_config(dir, classes)?;
        if (cfg.inject_sample_info || cfg.num_frame_per_block != 1)
            && !classes.contains(&crate::skyreels::transformer::CLASS_NAME)
        {
            return Err(Error::InvalidRequest(
                "this transformer config has SkyReels-V2 keys (inject_sample_info, num_frame_per_block); load it as SkyReelsV2Transformer3DModel".into(),
            ));
        }
        if cfg.vace_layers.is_some() && !classes.contains(&crate::wan::transformer_vace::CLASS_NAME)
        {
            return Err(Error::InvalidRequest(
                "this transformer config has VACE keys (vace_layers, vace_in_channels); load it as WanVACETransformer3DModel".into(),
            ));
        }
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
        let w = Weights::open(dir)?.with_lora(lora.clone());
        let vb = w.var_builder(dtype, device);
        let model = crate::loading::building_from(&w, || Self::new(&cfg, vb.clone()))
            .map_err(|e| w.map_err(e))?;
        let extra = extra(&cfg, vb).map_err(|e| w.map_err(e))?;
        if let Some(l) = &lora {
            l.check_all_used(&format!("the transformer in {}", dir.display()))?;
        }
        Ok((model, extra))
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
            proj_out: lin(d, cfg.out_channels() * p, vb.pp("proj_out"))?,
            scale_shift_table: vb
                .to_dtype(DType::F32)
                .get((1, 2, d), "scale_shift_table")?,
            fps: if cfg.inject_sample_info {
                Some((
                    vb.get((2, d), "fps_embedding.weight")?,
                    lin(d, d, vb.pp("fps_projection.net.0.proj"))?,
                    lin(d, 6 * d, vb.pp("fps_projection.net.2"))?,
                ))
            } else {
                None
            },
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
        self.forward_with_image(hidden_states, timestep, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with `encoder_hidden_states_image`: the image encoder's tokens
    /// `[B, S, image_dim]` (FLF2V: `[2·B, S, image_dim]`, first and last image of each sample),
    /// for a transformer with `image_dim` (Wan2.1 I2V / FLF2V).
    pub fn forward_with_image(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_variant(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            ForwardVariant::default(),
            None,
        )
    }

    /// [`Self::forward_with_image`] with a step cache (`crate::hooks`): MagCache decides before
    /// the blocks, First Block Cache after block 0, TaylorSeer around the attention modules.
    /// The cache's current context (`StepCache::set_context`) keeps its own state.
    pub fn forward_cached(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        cache: &mut StepCache,
    ) -> Result<Tensor> {
        self.forward_inner(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            ForwardVariant::default(),
            None,
            Some(cache),
        )
    }

    /// The one forward of Wan and SkyReels-V2.
    pub(crate) fn forward_variant(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        variant: ForwardVariant,
        hook: Option<&mut dyn BlockHook>,
    ) -> Result<Tensor> {
        self.forward_inner(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            variant,
            hook,
            None,
        )
    }

    /// The blocks of one forward with a step cache.
    fn blocks_cached(
        &self,
        x: Tensor,
        shared: &BlockInputs,
        cache: &mut StepCache,
    ) -> Result<Tensor> {
        let (context, temb, rope, causal) = (
            shared.context,
            shared.timestep_proj,
            shared.rope,
            shared.causal_block,
        );
        let run = |i: usize, x: &Tensor, cache: &mut StepCache| -> Result<Tensor> {
            self.blocks[i].forward_cached(i, x, context, temb, rope, causal, cache)
        };
        let n = self.blocks.len();
        cache.begin_forward();
        let out = if cache.is_mag() {
            match cache.mag_begin(&x)? {
                MagDecision::Skip(out) => out,
                MagDecision::Compute => {
                    let mut h = x.clone();
                    for i in 0..n {
                        h = run(i, &h, cache)?;
                    }
                    cache.mag_end(&x, &h)?;
                    h
                }
            }
        } else if cache.is_first_block() {
            let h0 = run(0, &x, cache)?;
            match cache.fbc_head(&x, &h0)? {
                Some(out) => out,
                None => {
                    let mut h = h0;
                    for i in 1..n {
                        h = run(i, &h, cache)?;
                    }
                    cache.fbc_tail(&h)?;
                    h
                }
            }
        } else {
            let mut h = x;
            for i in 0..n {
                h = run(i, &h, cache)?;
            }
            h
        };
        cache.end_forward();
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        variant: ForwardVariant,
        mut hook: Option<&mut dyn BlockHook>,
        cache: Option<&mut StepCache>,
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

        // Diffusion forcing: one timestep per latent frame, the same for all its tokens.
        let per_token;
        let timestep = if variant.per_frame {
            match *timestep.dims() {
                [tb, tf] if tb == b && tf == ppf => {
                    per_token = timestep
                        .to_dtype(DType::F32)?
                        .unsqueeze(2)?
                        .repeat((1, 1, pph * ppw))?
                        .reshape((b, n))?;
                    &per_token
                }
                _ => {
                    return Err(Error::InvalidRequest(format!(
                        "timestep has shape {:?}; with diffusion forcing it is [{b}, {ppf}] (one per latent frame)",
                        timestep.dims()
                    )))
                }
            }
        } else {
            timestep
        };
        let causal_block = match variant.causal_frames {
            Some(k) if k > 1 => {
                if !ppf.is_multiple_of(k) {
                    return Err(Error::InvalidRequest(format!(
                        "{ppf} latent frames do not split into causal blocks of {k} frames; use a multiple of {k}"
                    )));
                }
                Some(k * pph * ppw)
            }
            _ => None,
        };

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

        let (temb, timestep_proj, mut context) =
            self.condition_embedder
                .forward(&timestep, &context, ts_seq_len, variant.sincos_f64)?;
        match (
            encoder_hidden_states_image,
            &self.condition_embedder.image_embedder,
        ) {
            (Some(img), Some(embedder)) => {
                let img = img.to_device(dev)?.to_dtype(self.dtype)?;
                match *img.dims() {
                    [ib, _, id] if id == cfg.image_dim.unwrap_or(0) && (ib == b || ib == 2 * b) => {
                    }
                    _ => {
                        return Err(Error::InvalidRequest(format!(
                        "encoder_hidden_states_image has shape {:?}; expected [{b}, tokens, {}] \
                             (first–last frame: [{}, tokens, {}])",
                        img.dims(),
                        cfg.image_dim.unwrap_or(0),
                        2 * b,
                        cfg.image_dim.unwrap_or(0)
                    )))
                    }
                }
                let img = embedder.forward(&img)?;
                if img.dim(0)? != b {
                    return Err(Error::InvalidRequest(format!(
                        "encoder_hidden_states_image gives {} image sequences for a batch of {b}; \
                         two images per sample need a first–last-frame model (pos_embed_seq_len)",
                        img.dim(0)?
                    )));
                }
                // Image tokens go before the text tokens.
                context = Tensor::cat(&[&img, &context], 1)?;
            }
            (Some(_), None) => {
                return Err(Error::InvalidRequest(
                    "encoder_hidden_states_image was given but this transformer has no image \
                     embedder (image_dim is not set in its config)"
                        .into(),
                ))
            }
            (None, _) => {}
        }
        let d = cfg.inner_dim();
        let mut timestep_proj = match ts_seq_len {
            Some(s) => timestep_proj.reshape((b, s, 6, d))?,
            None => timestep_proj.reshape((b, 6, d))?,
        };
        match (&self.fps, variant.fps_index) {
            (Some((table, proj_in, proj_out)), Some(i)) => {
                if i > 1 {
                    return Err(Error::InvalidRequest(format!(
                        "fps index {i} must be 0 (16 fps) or 1"
                    )));
                }
                let e = table.narrow(0, i, 1)?; // [1, D]
                let f = proj_out.forward(&proj_in.forward(&e)?.silu()?)?; // [1, 6D]
                let f = match ts_seq_len {
                    Some(_) => f.reshape((1, 1, 6, d))?,
                    None => f.reshape((1, 6, d))?,
                };
                timestep_proj = timestep_proj.broadcast_add(&f.to_dtype(timestep_proj.dtype())?)?;
            }
            (Some(_), None) => {
                return Err(Error::InvalidRequest(
                    "this transformer injects the frame rate (inject_sample_info): give fps".into(),
                ))
            }
            _ => {}
        }

        let mut x = x;
        if let Some(hook) = hook.as_deref_mut() {
            let shared = BlockInputs {
                context: &context,
                timestep_proj: &timestep_proj,
                rope: &rope,
                causal_block,
            };
            hook.begin(&x, &shared)?;
        }
        if let Some(cache) = cache {
            if hook.is_some() {
                return Err(Error::InvalidRequest(
                    "step caches do not apply to VACE models".into(),
                ));
            }
            let shared = BlockInputs {
                context: &context,
                timestep_proj: &timestep_proj,
                rope: &rope,
                causal_block,
            };
            x = self.blocks_cached(x, &shared, cache)?;
        } else {
            for (i, block) in self.blocks.iter().enumerate() {
                x = block.forward(&x, &context, &timestep_proj, &rope, causal_block)?;
                if let Some(hook) = hook.as_deref_mut() {
                    let shared = BlockInputs {
                        context: &context,
                        timestep_proj: &timestep_proj,
                        rope: &rope,
                        causal_block,
                    };
                    x = hook.after_block(i, x, &shared)?;
                }
            }
        }

        // Output norm, projection, unpatchify. temb: [B, D] or [B, S, D] → [.., 1, D].
        let temb = match ts_seq_len {
            Some(_) => temb.unsqueeze(2)?,
            None => temb.unsqueeze(1)?,
        };
        let e = modulation_chunks(&self.scale_shift_table, &temb, 2)?;
        let (shift, scale) = (&e[0], &e[1]);
        let x = modulated_layer_norm_to(&x, scale, shift, cfg.eps, true, self.dtype)?;
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
    use crate::kernels::Isa;
    use crate::testing::{fixtures_dir, rel_error};
    use candle_core::Module;

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

    /// The portable CPU paths (candle matmuls, chunked attention, fused bias+GELU), used where
    /// AVX-512 is missing, also match the reference.
    #[test]
    fn portable_cpu_path_matches_reference() -> Result<()> {
        let errs = kernels::with_isa(Isa::Portable, || {
            ["transformer-wan21", "transformer-wan22"].map(|c| run_case(c, DType::F32))
        });
        for (case, err) in ["wan21", "wan22"].iter().zip(errs) {
            let err = err?;
            println!("{case} portable path rel error {err:e}");
            assert!(err <= 1e-4, "{case}: rel error {err}");
        }
        Ok(())
    }

    /// A padded prompt (zeros after each entry's own tokens, a different length per batch
    /// entry): on the CPU kernels the cross-attention projects the repeated row once and counts
    /// it (`kernels::attention_counted`); the portable path attends to every row. Both agree.
    #[test]
    fn padded_prompt_counted_once_matches_every_row() -> Result<()> {
        for case in ["transformer-wan21", "transformer-wan22"] {
            let dir = case_dir(case);
            let model =
                WanTransformer3DModel::load(&dir.join("transformer"), DType::F32, &Device::Cpu)?;
            let inp = inputs(case);
            let ctx = &inp["encoder_hidden_states"];
            let (b, l, d) = ctx.dims3()?;
            let rows: Vec<Tensor> = (0..b)
                .map(|bi| {
                    let own = (3 + 2 * bi).min(l - 2);
                    let zeros = Tensor::zeros((1, l - own, d), DType::F32, &Device::Cpu)?;
                    Tensor::cat(&[ctx.narrow(0, bi, 1)?.narrow(1, 0, own)?, zeros], 1)
                })
                .collect::<candle_core::Result<_>>()?;
            let padded = Tensor::cat(&rows, 0)?;
            assert!(
                kernels::trailing_equal_rows(&padded)? > 1,
                "{case}: nothing padded"
            );
            let run = || model.forward(&inp["hidden_states"], &inp["timestep"], &padded);
            let counted = run()?;
            let every_row = kernels::with_isa(Isa::Portable, run)?;
            let err = rel_error(&counted, &every_row)?;
            println!("{case} padded prompt: counted vs every row rel error {err:e}");
            assert!(err <= 1e-5, "{case}: rel error {err}");
        }
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
    fn image_configs_that_cannot_run_are_refused() -> Result<()> {
        // image_dim without added key/value projections, projections of the wrong width, and a
        // pos_embed without an image embedder: each named, none run approximately.
        for (edit, needle) in [
            (
                ("\"image_dim\": null", "\"image_dim\": 1280"),
                "added_kv_proj_dim is not",
            ),
            (
                ("\"added_kv_proj_dim\": null", "\"added_kv_proj_dim\": 7"),
                "must equal the inner dimension",
            ),
            (
                ("\"pos_embed_seq_len\": null", "\"pos_embed_seq_len\": 514"),
                "pos_embed_seq_len is set without image_dim",
            ),
        ] {
            let dir = edited_copy("i2v", |_| {})?;
            let path = dir.join("config.json");
            let text =
                std::fs::read_to_string(&path).map_err(|e| Error::InvalidRequest(e.to_string()))?;
            assert!(text.contains(edit.0), "{text}");
            let text = text.replace(edit.0, edit.1);
            std::fs::write(&path, text).map_err(|e| Error::InvalidRequest(e.to_string()))?;
            let r = WanTransformer3DModel::load(&dir, DType::F32, &Device::Cpu);
            let _ = std::fs::remove_dir_all(&dir);
            match r {
                Err(Error::InvalidRequest(msg)) => assert!(msg.contains(needle), "{msg}"),
                Err(e) => panic!("expected InvalidRequest, got {e}"),
                Ok(_) => panic!("{edit:?} loaded"),
            }
        }
        Ok(())
    }

    #[test]
    fn image_tokens_split_as_the_reference_slices() {
        // total − 512 when there are at least 512 tokens; Python's negative slicing below.
        assert_eq!(image_context_split(257 + 512), 257);
        assert_eq!(image_context_split(512), 0);
        assert_eq!(image_context_split(265), 18); // [:, :-247] of 265 tokens
        assert_eq!(image_context_split(100), 0);
    }

    /// Times one forward at Wan2.1 T2V-1.3B size (dim 1536, 12 heads, 30 layers, ffn 8960) with
    /// random weights: 1280 video tokens (latent 16×5×32×32) and 512 text tokens, f32, batch 1.
    /// Run with `RAYON_NUM_THREADS=2 CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test -p kino-engine --lib
    /// wan::transformer::tests::bench_forward_wan21_1_3b -- --ignored --nocapture`.
    /// PyTorch counterpart (same shapes, `torch.set_num_threads(2)`, `torch.no_grad()`):
    /// `WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16,
    /// out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)` called with
    /// `randn(1, 16, 5, 32, 32)`, `tensor([500.])`, `randn(1, 512, 4096)`.
    /// `KINO_BENCH_LAYERS=n` builds only n layers (for profiling). Prints wall and process CPU
    /// time (the latter is the fairer comparison on a busy machine).
    #[test]
    #[ignore]
    fn bench_forward_wan21_1_3b() -> Result<()> {
        let cfg = Config {
            num_attention_heads: 12,
            ffn_dim: 8960,
            num_layers: std::env::var("KINO_BENCH_LAYERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(30),
            ..Config::default()
        };
        let dev = Device::Cpu;
        let t0 = std::time::Instant::now();
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = WanTransformer3DModel::new(&cfg, vb)?;
        println!("built {} params in {:.1?}", cfg.num_params(), t0.elapsed());
        let x = Tensor::randn(0f32, 1.0, (1, 16, 5, 32, 32), &dev)?;
        let ts = Tensor::new(&[500f32], &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (1, 512, 4096), &dev)?;
        // Process CPU time (utime + stime, clock ticks of 10 ms), to compare on a busy machine.
        let cpu = || -> f64 {
            let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let f: Vec<&str> = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) / 100.0
        };
        let (t0, c0) = (std::time::Instant::now(), cpu());
        let out = model.forward(&x, &ts, &ctx)?;
        let (secs, cpu_secs) = (t0.elapsed().as_secs_f64(), cpu() - c0);
        println!(
            "forward {:?} in {secs:.2} s wall, {cpu_secs:.2} s CPU ({} threads)",
            out.dims(),
            candle_core::utils::get_num_threads()
        );
        assert_eq!(out.dims(), &[1, 16, 5, 32, 32]);
        Ok(())
    }

    /// The packed AVX-512 linear (when the CPU has it) equals candle's `Linear`, for sizes that
    /// are not multiples of the register tile or of the K slice, with and without bias and GELU.
    #[test]
    fn linear_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n, with_bias) in [
            (37, 300, 70, true),
            (1, 5, 33, false),
            (130, 520, 600, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 0.1, n, &dev)?;
            let l = Linear::new(w, with_bias.then_some(b));
            let reference = l.forward(&x)?;
            let packed = Lin::new(l)?;
            let out = packed.forward(&x)?;
            let err = rel_error(&out, &reference)?;
            assert!(err < 1e-6, "({m}, {k}, {n}): {err}");
            let err = rel_error(&packed.forward_act(&x, true)?, &reference.gelu()?)?;
            assert!(err < 1e-6, "gelu ({m}, {k}, {n}): {err}");
        }
        Ok(())
    }

    /// Plain attention `softmax(q·kᵀ/√d)·v` in the [B, H, N, d] layout, as the reference.
    fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h, d) = q.dims4()?;
        let qt = q.transpose(1, 2)?.contiguous()?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let vt = v.transpose(1, 2)?.contiguous()?;
        let s = (qt.matmul(&kt.t()?)? / (d as f64).sqrt())?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        p.matmul(&vt)?.transpose(1, 2)?.reshape((b, n, h * d))
    }

    /// The blocked CPU attention and the chunked fallback equal plain attention, with query
    /// blocks that do not divide the sequence.
    #[test]
    fn attention_paths_match_plain() -> Result<()> {
        let dev = Device::Cpu;
        for (b, n, m, h, d) in [(2, 37, 11, 3, 8), (1, 300, 5000, 2, 16)] {
            let q = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, m, h, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, h, d), &dev)?;
            let reference = plain_attention(&q, &k, &v)?;
            let err = rel_error(&attention(&q, &k, &v)?, &reference)?;
            assert!(err < 1e-5, "blocked ({n}, {m}): {err}");
            for budget in [ATTN_CHUNK_ELEMS_CPU, 5 * h * m, 1] {
                let out = attention_chunked(&q, &k, &v, budget)?;
                let err = rel_error(&out, &reference)?;
                assert!(err < 1e-5, "chunked ({n}, {m}) budget {budget}: {err}");
            }
        }
        Ok(())
    }
}
