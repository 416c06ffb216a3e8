//! The UMT5 text encoder: a port of transformers' `UMT5EncoderModel`
//! (`transformers/models/umt5/modeling_umt5.py`, configuration in `configuration_umt5.py`), the
//! text encoder of Wan (umt5-xxl).
//!
//! Reference names, kept here: `UMT5EncoderModel` (`shared`, `encoder`) → `UMT5Stack`
//! (`embed_tokens`, `block`, `final_layer_norm`) → `UMT5Block` (`layer.0` =
//! `UMT5LayerSelfAttention` with `SelfAttention` + `layer_norm`, `layer.1` = `UMT5LayerFF` with
//! `DenseReluDense` + `layer_norm`) → `UMT5Attention` (`q`, `k`, `v`, `o`,
//! `relative_attention_bias`), `UMT5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or
//! `UMT5DenseActDense` (`wi`, `wo`), `UMT5LayerNorm` (`weight`).
//!
//! How UMT5 differs from T5: every self-attention layer has its own `relative_attention_bias`
//! (T5 has one, in block 0, shared by all layers). As in T5: RMS layer norm without mean or bias,
//! no attention scaling, no biases in the linear layers, gated-GELU (tanh approximation,
//! `gelu_new`) feed-forward.
//!
//! Numerics follow the reference's default attention (`sdpa`): scores and softmax in f32, padded
//! keys (attention mask 0) get the dtype minimum, so a row with no key left attends uniformly, as in
//! PyTorch. Like transformers' `_keep_in_fp32_modules = ["wo"]`, the `wo` projections stay in f32
//! when the model runs in f16 (not in bf16: transformers only does this for f16), which makes the
//! residual stream f32 from the first feed-forward layer on, as in PyTorch's type promotion.
//!
//! Weights are read under transformers' names; `UMT5EncoderModel` ties `encoder.embed_tokens` to
//! `shared` and `save_pretrained` stores only `shared.weight`: either name is accepted.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::loading::{read_config, Weights};
use crate::{Error, Result};

/// The `architectures` entry we load. `T5EncoderModel` is refused: T5 shares one relative
/// attention bias (block 0) across layers, so its weights do not fit this layout.
pub const SUPPORTED_CLASSES: [&str; 1] = ["UMT5EncoderModel"];

/// `UMT5Config`, as saved in `text_encoder/config.json`. Defaults are the reference `__init__`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (gelu_new, tanh approximation), `"gated-ACT"` or `"ACT"` with ACT one of
    /// relu, gelu (erf), gelu_new, gelu_pytorch_tanh, silu, swish.
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn default_vocab_size() -> usize {
    250112
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    1024
}
fn default_num_layers() -> usize {
    8
}
fn default_num_heads() -> usize {
    6
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "gated-gelu".into()
}
fn default_pad_token_id() -> Option<u32> {
    Some(0)
}

/// The activations `ACT2FN` names that `feed_forward_proj` can select here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// `gelu`: exact (erf) GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
        }
    }
}

impl Config {
    /// `(dense_act_fn, is_gated_act)` as `UMT5Config.__post_init__` derives them from
    /// `feed_forward_proj`.
    pub fn activation(&self) -> Result<(Activation, bool)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let bad = || {
            Error::InvalidRequest(format!(
                "text encoder config: feed_forward_proj `{}` is not supported; use `gated-gelu`, \
                 `gated-relu`, `gated-silu`, `relu`, `gelu` or `silu`",
                self.feed_forward_proj
            ))
        };
        let gated = match parts.as_slice() {
            [_] => false,
            ["gated", _] => true,
            _ => return Err(bad()),
        };
        let name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            parts[parts.len() - 1]
        };
        let act = match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            _ => return Err(bad()),
        };
        Ok((act, gated))
    }

    /// Checks the config describes a model we can run (beyond what serde checks).
    fn validate(&self) -> Result<()> {
        self.activation()?;
        let nb = self.relative_attention_num_buckets / 2;
        let max_exact = nb / 2;
        if max_exact == 0 || self.relative_attention_max_distance <= max_exact {
            return Err(Error::InvalidRequest(format!(
                "text encoder config: relative_attention_num_buckets {} with \
                 relative_attention_max_distance {} is not a usable bucketing (need at least 4 \
                 buckets and a max distance above a quarter of them)",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            )));
        }
        if self.d_model == 0 || self.d_kv == 0 || self.num_heads == 0 || self.d_ff == 0 {
            return Err(Error::InvalidRequest(
                "text encoder config: d_model, d_kv, num_heads and d_ff must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The dtype the `wo` projections are kept in when the model runs in `dtype`
    /// (`_keep_in_fp32_modules = ["wo"]`, which transformers applies for f16 only).
    pub fn wo_dtype(dtype: DType) -> DType {
        if dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        }
    }
}

/// Number of parameters of the encoder (embedding included), for memory estimates.
pub fn num_params(cfg: &Config) -> usize {
    let inner = cfg.num_heads * cfg.d_kv;
    let gated = cfg.feed_forward_proj.starts_with("gated-");
    let ff = (if gated { 3 } else { 2 }) * cfg.d_model * cfg.d_ff;
    let attn = 4 * cfg.d_model * inner + cfg.relative_attention_num_buckets * cfg.num_heads;
    let block = attn + ff + 2 * cfg.d_model;
    cfg.vocab_size * cfg.d_model + cfg.num_layers * block + cfg.d_model
}

/// Bytes the weights take in `dtype` (the `wo` projections count in f32 when `dtype` is f16).
pub fn weight_bytes(cfg: &Config, dtype: DType) -> usize {
    let wo = cfg.num_layers * cfg.d_model * cfg.d_ff;
    let wo_dtype = Config::wo_dtype(dtype);
    (num_params(cfg) - wo) * dtype.size_in_bytes() + wo * wo_dtype.size_in_bytes()
}

/// `UMT5Attention._relative_position_bucket` for the encoder (bidirectional): the bucket of
/// `relative_position` = key position − query position. Computed in f32 as PyTorch does, so the
/// boundaries of the logarithmic buckets fall where the reference puts them.
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let num_buckets = num_buckets / 2;
    let mut bucket = if relative_position > 0 {
        num_buckets
    } else {
        0
    };
    let n = relative_position.unsigned_abs() as usize;
    let max_exact = num_buckets / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let log_ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (log_ratio * (num_buckets - max_exact) as f32) as usize;
        bucket += large.min(num_buckets - 1);
    }
    bucket
}

/// `UMT5LayerNorm`: RMS norm, variance in f32, no mean and no bias; the output has the weight's
/// dtype.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    weight_f32: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get(size, "weight")?;
        let weight_f32 = weight.to_dtype(DType::F32)?;
        Ok(Self {
            weight,
            weight_f32,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == self.weight.dtype() {
            // candle's kernel accumulates in f32 for half types, as the reference does.
            candle_nn::ops::rms_norm(x, &self.weight, self.eps)
        } else {
            // An f32 residual stream (f16 models, see module doc): normalize in f32, then cast.
            candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.weight_f32, self.eps)?
                .to_dtype(self.weight.dtype())
        }
    }
}

/// The token table: dense, or a GGUF file's quantized blocks (rows dequantized on lookup).
#[derive(Debug, Clone)]
enum TokenEmbedding {
    Dense(Embedding),
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
}

/// A bias-free `nn.Linear`: dense, or kept quantized when the weights come from a GGUF file
/// that stores the matrix so (`crate::loading::quantized_weight`).
#[derive(Debug, Clone)]
enum Linear {
    Dense(candle_nn::Linear),
    /// Expanded to f32 strip by strip at each forward (the activations keep full precision).
    Quantized(std::sync::Arc<crate::kernels::QuantizedLinear>),
}

impl Linear {
    /// The dense weight (`None` when kept quantized).
    #[cfg(test)]
    fn weight(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense(l) => Some(l.weight()),
            Linear::Quantized(_) => None,
        }
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Quantized(q) => q.forward(x, false),
        }
    }
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    if let Some(q) = crate::loading::quantized_matrix(&vb.prefix(), out_dim, in_dim, vb.device())? {
        return Ok(Linear::Quantized(std::sync::Arc::new(
            crate::kernels::QuantizedLinear::new(std::sync::Arc::new(q), None)?,
        )));
    }
    let w = vb.get((out_dim, in_dim), "weight")?;
    Ok(Linear::Dense(candle_nn::Linear::new(w, None)))
}

/// `UMT5Attention` of an encoder layer (`has_relative_attention_bias=True`, scaling 1.0).
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `relative_attention_bias.weight` [num_buckets, n_heads], transposed to [n_heads,
    /// num_buckets] and in f32, to gather the bias straight into [n_heads, L·L].
    bias_t: Tensor,
    n_heads: usize,
    d_kv: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let bias = vb.get(
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            "relative_attention_bias.weight",
        )?;
        Ok(Self {
            q: linear(cfg.d_model, inner, vb.pp("q"))?,
            k: linear(cfg.d_model, inner, vb.pp("k"))?,
            v: linear(cfg.d_model, inner, vb.pp("v"))?,
            o: linear(inner, cfg.d_model, vb.pp("o"))?,
            bias_t: bias.to_dtype(DType::F32)?.t()?.contiguous()?,
            n_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `x` [B, L, D]; `buckets` u32 [L·L] (row = query); `mask` f32 [B, 1, 1, L] additive (0 or
    /// the f32 minimum), `None` when nothing is padded.
    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| {
            t.reshape((b, l, self.n_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        // compute_bias: position_bias [1, H, L, L].
        let position_bias =
            self.bias_t
                .index_select(buckets, 1)?
                .reshape((1, self.n_heads, l, l))?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let mut scores = scores.broadcast_add(&position_bias)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.n_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// `UMT5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or `UMT5DenseActDense` (`wi`, `wo`).
#[derive(Debug, Clone)]
struct DenseReluDense {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    wo_dtype: DType,
    act: Activation,
}

impl DenseReluDense {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (act, gated) = cfg
            .activation()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (wi_0, wi_1) = if gated {
            (
                linear(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(linear(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?),
            )
        } else {
            (linear(cfg.d_model, cfg.d_ff, vb.pp("wi"))?, None)
        };
        let wo_dtype = Config::wo_dtype(vb.dtype());
        let wo = linear(cfg.d_ff, cfg.d_model, vb.pp("wo").to_dtype(wo_dtype))?;
        Ok(Self {
            wi_0,
            wi_1,
            wo,
            wo_dtype,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.act.apply(&self.wi_0.forward(x)?)?;
        if let Some(wi_1) = &self.wi_1 {
            h = (h * wi_1.forward(x)?)?;
        }
        self.wo.forward(&h.to_dtype(self.wo_dtype)?)
    }
}

/// `UMT5Block` of the encoder: `layer.0` self-attention, `layer.1` feed-forward, both pre-norm
/// with a residual.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: LayerNorm,
    attn: Attention,
    ff_norm: LayerNorm,
    ff: DenseReluDense,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let l0 = vb.pp("layer.0");
        let l1 = vb.pp("layer.1");
        Ok(Self {
            attn_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l0.pp("layer_norm"))?,
            attn: Attention::new(cfg, l0.pp("SelfAttention"))?,
            ff_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, l1.pp("layer_norm"))?,
            ff: DenseReluDense::new(cfg, l1.pp("DenseReluDense"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let a = self
            .attn
            .forward(&self.attn_norm.forward(x)?, buckets, mask)?;
        let x = clamp_f16(add_promote(x, &a)?)?;
        let f = self.ff.forward(&self.ff_norm.forward(&x)?)?;
        clamp_f16(add_promote(&x, &f)?)
    }
}

/// `a + b` with PyTorch's promotion for mixed float dtypes (here: anything with f32 gives f32).
fn add_promote(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == b.dtype() {
        a + b
    } else {
        a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?
    }
}

/// The reference's "clamp inf values to enable fp16 training", applied to f16 hidden states only.
fn clamp_f16(x: Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let max = f64::from(half::f16::MAX);
    let any_inf = x
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_infinite();
    let clamp = if any_inf { max - 1000.0 } else { max };
    x.clamp(-clamp, clamp)
}

/// `UMT5EncoderModel`: token embedding, the encoder blocks and the final layer norm.
#[derive(Debug, Clone)]
pub struct UMT5EncoderModel {
    embed_tokens: TokenEmbedding,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl UMT5EncoderModel {
    /// Loads a `text_encoder/` folder (transformers layout: config.json + safetensors).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: Config = read_config(dir, &[])?;
        check_class(dir, &cfg)?;
        cfg.validate().map_err(|e| Error::BadFile {
            path: dir.join("config.json"),
            message: e.to_string(),
        })?;
        let w = Weights::open(dir)?;
        let vb = w.var_builder(dtype, device);
        crate::loading::building_from(&w, || Self::new(&cfg, vb)).map_err(|e| w.map_err(e))
    }

    /// Builds the model from weights under transformers' names.
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // Tied embeddings: save_pretrained stores `shared.weight`; accept `encoder.embed_tokens`.
        let name = if !vb.contains_tensor("shared.weight")
            && vb.contains_tensor("encoder.embed_tokens.weight")
        {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        // A GGUF file's quantized token table stays quantized: only the rows of the prompt's
        // tokens are dequantized (UMT5-XXL's table is 256,384 × 4,096: 4.2 GB in f32).
        let embed_tokens = match crate::loading::quantized_weight(name, vb.device())? {
            Some(q) if q.shape().dims() == [cfg.vocab_size, cfg.d_model] => {
                TokenEmbedding::Quantized(std::sync::Arc::new(q))
            }
            _ => TokenEmbedding::Dense(Embedding::new(
                vb.get((cfg.vocab_size, cfg.d_model), name)?,
                cfg.d_model,
            )),
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, enc.pp(format!("block.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            blocks,
            final_layer_norm: LayerNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                enc.pp("final_layer_norm"),
            )?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// `last_hidden_state` [B, L, D] in the model dtype, for `input_ids` and `attention_mask`
    /// [B, L] (integer tensors: i64, u32, ...; mask 1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = match *input_ids.dims() {
            [b, l] if b > 0 && l > 0 => (b, l),
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "text encoder: input_ids must have shape [batch, length] with both above 0, \
                     got {:?}",
                    input_ids.dims()
                )))
            }
        };
        if attention_mask.dims() != input_ids.dims() {
            return Err(Error::InvalidRequest(format!(
                "text encoder: attention_mask has shape {:?}, expected the input_ids shape {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let ids = int_values(input_ids, "input_ids")?;
        let vocab = self.cfg.vocab_size;
        let mut ids_u32 = Vec::with_capacity(ids.len());
        for &id in &ids {
            if id < 0 || id as u64 >= vocab as u64 {
                return Err(Error::InvalidRequest(format!(
                    "text encoder: token id {id} is outside the vocabulary (0..{vocab}); does the \
                     tokenizer belong to this text encoder?"
                )));
            }
            ids_u32.push(id as u32);
        }
        let mask = int_values(attention_mask, "attention_mask")?;
        // No padding: no mask to add (the usual case for one prompt, see wan::text_encoder).
        let mask = if mask.iter().all(|&m| m != 0) {
            None
        } else {
            let additive: Vec<f32> = mask
                .into_iter()
                .map(|m| if m != 0 { 0.0 } else { f32::MIN })
                .collect();
            Some(Tensor::from_vec(additive, (b, 1, 1, l), &self.device)?)
        };
        let buckets = self.bucket_indices(l)?;
        let ids = Tensor::from_vec(ids_u32, b * l, &self.device)?;
        let rows = match &self.embed_tokens {
            TokenEmbedding::Dense(e) => e.forward(&ids)?,
            TokenEmbedding::Quantized(q) => q.embedding(&ids)?.to_dtype(self.dtype)?,
        };
        let mut x = rows.reshape((b, l, self.cfg.d_model))?;
        for block in &self.blocks {
            x = block.forward(&x, &buckets, mask.as_ref())?;
        }
        Ok(self.final_layer_norm.forward(&x)?)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype of the weights (and of `forward`'s output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bucket of every (query, key) pair, u32 [L·L], shared by all layers.
    fn bucket_indices(&self, l: usize) -> candle_core::Result<Tensor> {
        let (nb, md) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        // by_offset[r + l - 1] = bucket of relative position r.
        let by_offset: Vec<u32> = (-(l as i64 - 1)..l as i64)
            .map(|r| relative_position_bucket(r, nb, md) as u32)
            .collect();
        let mut idx = Vec::with_capacity(l * l);
        for q in 0..l {
            idx.extend_from_slice(&by_offset[l - 1 - q..2 * l - 1 - q]);
        }
        Tensor::from_vec(idx, l * l, &self.device)
    }
}

/// The values of an integer tensor, for ids and masks.
fn int_values(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    match t.dtype() {
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => {
            Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
        }
        other => Err(Error::InvalidRequest(format!(
            "text encoder: {what} must be an integer tensor (i64 or u32), got {other:?}"
        ))),
    }
}

/// Accepts a config whose `architectures` names `UMT5EncoderModel`, or, without `architectures`,
/// whose `model_type` is `umt5`.
fn check_class(dir: &Path, cfg: &Config) -> Result<()> {
    let ok = match (&cfg.architectures, cfg.model_type.as_deref()) {
        (Some(archs), _) if !archs.is_empty() => archs
            .iter()
            .any(|a| SUPPORTED_CLASSES.contains(&a.as_str())),
        (_, Some(mt)) => mt == "umt5",
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let found = match &cfg.architectures {
        Some(a) if !a.is_empty() => a.join(", "),
        _ => format!("model_type {}", cfg.model_type.as_deref().unwrap_or("?")),
    };
    Err(Error::UnsupportedClass {
        path: dir.join("config.json"),
        found,
        supported: format!(
            "{} (a T5 encoder shares one relative attention bias across layers and does not fit)",
            SUPPORTED_CLASSES.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixtures_dir, rel_error};

    fn case() -> std::path::PathBuf {
        fixtures_dir().join("text-encoder")
    }

    fn load_f32() -> Result<UMT5EncoderModel> {
        UMT5EncoderModel::load(&case().join("text_encoder"), DType::F32, &Device::Cpu)
    }

    #[test]
    fn text_encoder_parity() -> Result<()> {
        let model = load_f32()?;
        let input = candle_core::safetensors::load(case().join("input.safetensors"), &Device::Cpu)?;
        let expected =
            candle_core::safetensors::load(case().join("expected.safetensors"), &Device::Cpu)?;
        let out = model.forward(&input["input_ids"], &input["attention_mask"])?;
        assert_eq!(out.dtype(), DType::F32);
        let err = rel_error(&out, &expected["last_hidden_state"])?;
        println!("text-encoder rel error {err:e}");
        assert!(err <= 1e-4, "rel error {err}");
        // u32 ids and mask give the same result.
        let ids = input["input_ids"].to_dtype(DType::U32)?;
        let mask = input["attention_mask"].to_dtype(DType::U32)?;
        let out32 = model.forward(&ids, &mask)?;
        assert_eq!(rel_error(&out32, &out)?, 0.0);
        Ok(())
    }

    #[test]
    fn bf16_runs_close_to_f32() -> Result<()> {
        let dir = case().join("text_encoder");
        let model = UMT5EncoderModel::load(&dir, DType::BF16, &Device::Cpu)?;
        let input = candle_core::safetensors::load(case().join("input.safetensors"), &Device::Cpu)?;
        let expected =
            candle_core::safetensors::load(case().join("expected.safetensors"), &Device::Cpu)?;
        let out = model.forward(&input["input_ids"], &input["attention_mask"])?;
        assert_eq!(out.dtype(), DType::BF16);
        let err = rel_error(&out, &expected["last_hidden_state"])?;
        println!("text-encoder bf16 rel error {err:e}");
        assert!(err <= 5e-2, "bf16 rel error {err}");
        Ok(())
    }

    #[test]
    fn f16_keeps_wo_in_f32() -> Result<()> {
        let dir = case().join("text_encoder");
        let model = UMT5EncoderModel::load(&dir, DType::F16, &Device::Cpu)?;
        assert_eq!(model.blocks[0].ff.wo.weight().unwrap().dtype(), DType::F32);
        assert_eq!(
            model.blocks[0].ff.wi_0.weight().unwrap().dtype(),
            DType::F16
        );
        let input = candle_core::safetensors::load(case().join("input.safetensors"), &Device::Cpu)?;
        let expected =
            candle_core::safetensors::load(case().join("expected.safetensors"), &Device::Cpu)?;
        let out = model.forward(&input["input_ids"], &input["attention_mask"])?;
        assert_eq!(out.dtype(), DType::F16);
        let err = rel_error(&out, &expected["last_hidden_state"])?;
        println!("text-encoder f16 rel error {err:e}");
        assert!(err <= 1e-2, "f16 rel error {err}");
        Ok(())
    }

    #[test]
    fn position_buckets_match_reference() -> Result<()> {
        let t = candle_core::safetensors::load(case().join("buckets.safetensors"), &Device::Cpu)?;
        let rel = t["relative_position"].to_vec1::<i64>()?;
        for (nb, md) in [(32usize, 128usize), (16, 20)] {
            let want = t[&format!("buckets_{nb}_{md}")].to_vec1::<i64>()?;
            for (r, w) in rel.iter().zip(&want) {
                assert_eq!(
                    relative_position_bucket(*r, nb, md) as i64,
                    *w,
                    "relative position {r}, {nb} buckets, max distance {md}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bucket_indices_row_is_query() -> Result<()> {
        let model = load_f32()?;
        let idx = model.bucket_indices(3)?.to_vec1::<u32>()?;
        let (nb, md) = (32, 128);
        let b = |r| relative_position_bucket(r, nb, md) as u32;
        // query q, key k → relative position k - q.
        assert_eq!(
            idx,
            vec![b(0), b(1), b(2), b(-1), b(0), b(1), b(-2), b(-1), b(0)]
        );
        Ok(())
    }

    #[test]
    fn bad_inputs_are_invalid_requests() -> Result<()> {
        let model = load_f32()?;
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[3i64, 4, 1]], &dev)?;
        let mask = Tensor::new(&[[1i64, 1, 1]], &dev)?;
        let cases = [
            (
                Tensor::new(&[3i64, 4, 1], &dev)?,
                mask.clone(),
                "[batch, length]",
            ),
            (
                ids.clone(),
                Tensor::new(&[[1i64, 1]], &dev)?,
                "attention_mask has shape",
            ),
            (ids.to_dtype(DType::F32)?, mask.clone(), "integer tensor"),
            (
                Tensor::new(&[[3i64, 100_000, 1]], &dev)?,
                mask.clone(),
                "outside the vocabulary",
            ),
            (
                Tensor::new(&[[3i64, -1, 1]], &dev)?,
                mask.clone(),
                "outside the vocabulary",
            ),
        ];
        for (ids, mask, want) in cases {
            match model.forward(&ids, &mask) {
                Err(Error::InvalidRequest(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("expected InvalidRequest({want}), got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn fully_masked_row_is_finite() -> Result<()> {
        let model = load_f32()?;
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[3i64, 4, 1, 0]], &dev)?;
        let mask = Tensor::new(&[[0i64, 0, 0, 0]], &dev)?;
        let out = model.forward(&ids, &mask)?;
        let s = out.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(s.is_finite() && s > 0.0, "sum {s}");
        Ok(())
    }

    fn copy_case(tag: &str) -> Result<std::path::PathBuf> {
        let src = case().join("text_encoder");
        let dst = std::env::temp_dir().join(format!("kino-umt5-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dst).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dst.join(f))
                .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        }
        Ok(dst)
    }

    #[test]
    fn missing_tensor_is_typed() -> Result<()> {
        let dir = copy_case("missing")?;
        let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let gone = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight";
        assert!(ts.remove(gone).is_some());
        candle_core::safetensors::save(&ts, dir.join("model.safetensors"))?;
        let r = UMT5EncoderModel::load(&dir, DType::F32, &Device::Cpu);
        std::fs::remove_dir_all(&dir).ok();
        match r {
            Err(Error::MissingTensor { name, .. }) => assert_eq!(name, gone),
            other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
        }
        Ok(())
    }

    #[test]
    fn embed_tokens_name_is_accepted() -> Result<()> {
        let dir = copy_case("embed")?;
        let mut ts = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let shared = ts
            .remove("shared.weight")
            .ok_or_else(|| Error::InvalidRequest("no shared.weight".into()))?;
        ts.insert("encoder.embed_tokens.weight".into(), shared);
        candle_core::safetensors::save(&ts, dir.join("model.safetensors"))?;
        let r = UMT5EncoderModel::load(&dir, DType::F32, &Device::Cpu);
        std::fs::remove_dir_all(&dir).ok();
        let model = r?;
        let input = candle_core::safetensors::load(case().join("input.safetensors"), &Device::Cpu)?;
        let expected =
            candle_core::safetensors::load(case().join("expected.safetensors"), &Device::Cpu)?;
        let out = model.forward(&input["input_ids"], &input["attention_mask"])?;
        assert!(rel_error(&out, &expected["last_hidden_state"])? <= 1e-4);
        Ok(())
    }

    #[test]
    fn t5_encoder_class_is_refused() -> Result<()> {
        let dir = copy_case("t5")?;
        let cfg = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?
            .replace("\"UMT5EncoderModel\"", "\"T5EncoderModel\"")
            .replace("\"umt5\"", "\"t5\"");
        std::fs::write(dir.join("config.json"), cfg)
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let r = UMT5EncoderModel::load(&dir, DType::F32, &Device::Cpu);
        std::fs::remove_dir_all(&dir).ok();
        match r {
            Err(Error::UnsupportedClass { found, .. }) => assert_eq!(found, "T5EncoderModel"),
            other => panic!("expected UnsupportedClass, got {:?}", other.map(|_| ())),
        }
        Ok(())
    }

    #[test]
    fn config_activation_and_sizes() -> Result<()> {
        let cfg: Config =
            serde_json::from_str("{}").map_err(|e| Error::InvalidRequest(e.to_string()))?;
        assert_eq!(cfg.activation()?, (Activation::GeluTanh, true));
        let mut c = cfg.clone();
        c.feed_forward_proj = "relu".into();
        assert_eq!(c.activation()?, (Activation::Relu, false));
        c.feed_forward_proj = "gated-silu".into();
        assert_eq!(c.activation()?, (Activation::Silu, true));
        c.feed_forward_proj = "gated-gelu-x".into();
        assert!(matches!(c.activation(), Err(Error::InvalidRequest(_))));
        // umt5-xxl (Wan's text encoder): about 5.68 billion parameters.
        let xxl: Config = serde_json::from_str(
            r#"{"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                "num_layers": 24, "num_heads": 64}"#,
        )
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let n = num_params(&xxl);
        assert!((5_600_000_000..5_800_000_000).contains(&n), "{n}");
        assert_eq!(weight_bytes(&xxl, DType::BF16), 2 * n);
        assert!(weight_bytes(&xxl, DType::F16) > 2 * n);
        // The tiny fixture: the parameter count equals the stored weights'.
        let model = load_f32()?;
        let w = Weights::open(&case().join("text_encoder"))?;
        let stored: usize = w
            .names()
            .iter()
            .map(|n| {
                w.var_builder(DType::F32, &Device::Cpu)
                    .get_unchecked(n)
                    .map(|t| t.elem_count())
            })
            .sum::<candle_core::Result<usize>>()?;
        assert_eq!(num_params(model.config()), stored);
        Ok(())
    }
}
