//! `torch.nn.Linear` as Kino runs it: on CPUs with a packed GEMM kernel (see
//! [`crate::kernels`]) f32 weights are packed once at load; quantized GGUF matrices stay in their
//! blocks; LoRA adapters can run on the fly beside the layer.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{self, PackedLinear, QuantizedLinear};

/// The layer itself: candle's `Linear`, packed f32 weights, or quantized blocks.
#[derive(Debug, Clone)]
pub(crate) enum LinBase {
    Candle(Linear),
    /// Weights packed for the CPU's GEMM microkernel (the original tensor dropped).
    Packed(std::sync::Arc<PackedLinear>),
    /// A matrix kept in a GGUF file's blocks (Q8_0, Q4_K, …), expanded strip by strip at each
    /// forward and multiplied in f32 (see [`QuantizedLinear`]); the bias dense.
    Quantized(std::sync::Arc<QuantizedLinear>),
}

/// A linear layer and, when LoRA adapters run on the fly, their low-rank pair (`down`
/// `[R, in]`, `up` `[out, R]` with the scales folded in; see `crate::lora`): `W·x + b +
/// up·(down·x)`.
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    pub(crate) base: LinBase,
    pub(crate) lora: Option<(Tensor, Tensor)>,
    /// The layer's diffusers prefix (`blocks.0.attn1.to_q`), under which
    /// [`crate::calibration::record`] reports its mean input.
    pub(crate) name: Option<std::sync::Arc<str>>,
}

impl Lin {
    pub(crate) fn new(linear: Linear) -> candle_core::Result<Self> {
        Ok(Self {
            base: LinBase::new(linear)?,
            lora: None,
            name: None,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, false)
    }

    /// The layer as the fused feed-forward takes it (packed or quantized, no LoRA on the fly).
    pub(crate) fn ffn_layer(&self) -> Option<kernels::FfnLayer<'_>> {
        if self.lora.is_some() || crate::calibration::recording() {
            return None;
        }
        match &self.base {
            LinBase::Packed(p) => Some(kernels::FfnLayer::Packed(p)),
            LinBase::Quantized(q) => Some(kernels::FfnLayer::Quantized(q)),
            LinBase::Candle(_) => None,
        }
    }

    /// `gelu_tanh(linear(x))` when `gelu`.
    pub(crate) fn forward_act(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        if let Some(name) = &self.name {
            crate::calibration::observe(name, x)?;
        }
        let Some((down, up)) = &self.lora else {
            return self.base.forward_act(x, gelu);
        };
        let y = self.base.forward_act(x, false)?;
        let dims = x.dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / k.max(1);
        let low = x
            .contiguous()?
            .reshape((rows, k))?
            .matmul(&down.t()?)?
            .matmul(&up.t()?)?;
        let low = low.reshape(y.shape())?;
        let y = (y + low)?;
        if gelu {
            y.gelu()
        } else {
            Ok(y)
        }
    }
}

impl LinBase {
    pub(crate) fn new(linear: Linear) -> candle_core::Result<Self> {
        let w = linear.weight();
        if w.device().is_cpu() && w.dtype() == DType::F32 {
            if let Some(kernel) = kernels::packed_gemm() {
                let packed = PackedLinear::new(kernel, w, linear.bias())?;
                return Ok(LinBase::Packed(std::sync::Arc::new(packed)));
            }
        }
        Ok(LinBase::Candle(linear))
    }

    /// `gelu_tanh(linear(x))` when `gelu`.
    pub(crate) fn forward_act(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        match self {
            LinBase::Candle(l) => {
                #[cfg(feature = "cuda")]
                if let (Some(bias), true) = (l.bias(), kernels::fused_gpu(x.device())) {
                    // CUDA: the matmul, then bias (and GELU) in one pass instead of candle's
                    // broadcast add (and a GELU pass). The matmul as `candle_nn::Linear`'s.
                    let w = match *x.dims() {
                        [b1, b2, _, _] => l.weight().broadcast_left((b1, b2))?.t()?,
                        [bsize, _, _] => l.weight().broadcast_left(bsize)?.t()?,
                        _ => l.weight().t()?,
                    };
                    return kernels::cuda::bias_act(&x.matmul(&w)?, bias, gelu);
                }
                let y = l.forward(x)?;
                if gelu {
                    y.gelu()
                } else {
                    Ok(y)
                }
            }
            LinBase::Packed(p) => p.forward(x, gelu),
            LinBase::Quantized(q) => q.forward(x, gelu),
        }
    }
}

/// `candle_nn::linear` (weight `[out, in]` + bias) as a [`Lin`], with the layer's LoRA pair
/// when adapters run on the fly (served by the weights as `lora_down` / `lora_up`).
pub(crate) fn lin(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Lin> {
    let name = Some(std::sync::Arc::from(vb.prefix().as_str()));
    let lora = if vb.contains_tensor(crate::loading::LORA_DOWN) {
        let down = vb.get_unchecked(crate::loading::LORA_DOWN)?;
        let up = vb.get_unchecked(crate::loading::LORA_UP)?;
        let r = down.dim(0)?;
        if down.dims() != [r, in_dim] || up.dims() != [out_dim, r] {
            candle_core::bail!(
                "LoRA layer `{}` has lora_A {:?} and lora_B {:?}, but the layer maps {in_dim} \
                 inputs to {out_dim} outputs; the adapter was made for another model",
                vb.prefix(),
                down.dims(),
                up.dims()
            );
        }
        Some((down, up))
    } else {
        None
    };
    if let Some(q) = crate::loading::quantized_matrix(&vb.prefix(), out_dim, in_dim, vb.device())? {
        let bias = vb.to_dtype(DType::F32).get(out_dim, "bias")?;
        return Ok(Lin {
            base: LinBase::Quantized(std::sync::Arc::new(QuantizedLinear::new(
                std::sync::Arc::new(q),
                Some(&bias),
            )?)),
            lora,
            name,
        });
    }
    let mut l = Lin::new(candle_nn::linear(in_dim, out_dim, vb)?)?;
    l.lora = lora;
    l.name = name;
    Ok(l)
}
