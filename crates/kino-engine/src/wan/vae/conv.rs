//! `WanCausalConv3d` (diffusers `autoencoder_kl_wan.py`) and the causal feature cache
//! (`feat_cache` / `feat_idx`, `CACHE_T`).
//!
//! Layout: inside the VAE every video is held per sample channels-last as `[T, H, W, C]`, so a
//! frame is one contiguous `[H, W, C]` block and the RMS norm is over the last dim. candle has
//! no conv3d. On the CPU in f32 the causal conv runs in [`crate::kernels::conv`] (a direct
//! kernel per ISA, or an implicit GEMM). Elsewhere each output frame is ONE candle conv2d (NCHW)
//! whose input is the window of `kt` consecutive frames seen as `kt·C` channels, with the weight
//! stored as `[out, kt·in, kh, kw]`. In both, taps that fall on the zero frames of the causal
//! padding are left out of the sum instead of multiplying zeros.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv;
use crate::profile;

/// Number of frames a causal conv keeps from the previous chunk (reference `CACHE_T`).
pub const CACHE_T: usize = 2;

/// What a `feat_cache` slot holds: the reference stores either the last frames of the previous
/// chunk or the string `"Rep"` (first chunk of a temporal upsample).
#[derive(Debug, Clone)]
pub enum Slot {
    Rep,
    Frames(Tensor),
}

/// The reference's `feat_cache` list together with its `feat_idx` counter: one slot per causal
/// conv, visited in forward order; `idx` is reset to 0 before each chunk.
#[derive(Debug, Default)]
pub struct FeatCache {
    slots: Vec<Option<Slot>>,
    idx: usize,
}

impl FeatCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new chunk (`feat_idx = [0]`).
    pub fn start_chunk(&mut self) {
        self.idx = 0;
    }

    /// Takes the current slot out (`feat_cache[idx]`), leaving `None`; pair with [`Self::put`].
    pub fn take(&mut self) -> Option<Slot> {
        if self.idx >= self.slots.len() {
            self.slots.resize(self.idx + 1, None);
        }
        self.slots[self.idx].take()
    }

    /// Stores the current slot and moves on (`feat_cache[idx] = v; feat_idx[0] += 1`).
    pub fn put(&mut self, v: Slot) {
        if self.idx >= self.slots.len() {
            self.slots.resize(self.idx + 1, None);
        }
        self.slots[self.idx] = Some(v);
        self.idx += 1;
    }
}

/// The last `n` frames of `x` (`x[:, :, -n:]`), copied into their own storage when that is only
/// part of `x`, so the cache does not keep the whole activation alive (`Tensor::copy` would
/// clone the whole storage, and a contiguous view shares it).
pub fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(0)?;
    if t <= n {
        Ok(x.clone())
    } else {
        x.narrow(0, t - n, n)?.force_contiguous()
    }
}

/// The cache for the next chunk, as the reference computes it before a cached conv:
/// `cache_x = x[:, :, -CACHE_T:]`, and when that is a single frame, the last frame of the
/// previous cache in front of it.
pub fn next_cache(x: &Tensor, prev: Option<&Tensor>) -> Result<Tensor> {
    let cache = last_frames(x, CACHE_T)?;
    match prev {
        Some(p) if cache.dim(0)? < CACHE_T => {
            let last = p.narrow(0, p.dim(0)? - 1, 1)?;
            Tensor::cat(&[&last, &cache], 0)
        }
        _ => Ok(cache),
    }
}

/// How the conv runs: the CPU f32 kernels of [`crate::kernels::conv`], or candle's conv2d
/// elsewhere.
#[derive(Debug, Clone)]
enum Kernel {
    /// Weights `[kt, ks, ks, in, out]` and the bias, for [`crate::kernels::conv`].
    Cpu { taps: Tensor, bias: Vec<f32> },
    /// `[out, kt·in, ks, ks]` (taps `k` outermost in the channel dim: channel `k·in + c`) and
    /// the bias `[1, out, 1, 1]`.
    Generic { weight: Tensor, bias: Tensor },
}

/// `WanCausalConv3d`: a Conv3d whose temporal padding (`2·padding_t`) is all in front, with the
/// cached frames of the previous chunk taking the place of that padding. Also used for the
/// `nn.Conv2d`s of `WanResample` (one temporal tap, frames as the batch).
#[derive(Debug, Clone)]
pub struct WanCausalConv3d {
    kernel: Kernel,
    in_c: usize,
    out_c: usize,
    kt: usize,
    ks: usize,
    stride_t: usize,
    stride_s: usize,
    /// Frames of causal padding in front (`2·padding_t`).
    pad_t: usize,
    /// Spatial zero padding `[top, bottom, left, right]`.
    pad_s: [usize; 4],
}

impl WanCausalConv3d {
    /// `WanCausalConv3d(in, out, kernel_size=(kt, ks, ks), stride=(stride_t, stride_s, stride_s),
    /// padding=(pad_t, pad_s, pad_s))`; weights `weight` `[out, in, kt, ks, ks]` and `bias`.
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let (kt, ks) = kernel;
        let w = vb.get((out_c, in_c, kt, ks, ks), "weight")?;
        let bias = vb.get(out_c, "bias")?;
        Self::from_weights(w, bias, stride, padding.0, [padding.1; 4])
    }

    /// A stride-1 `nn.Conv2d(in, out, ks, padding=pad)` (weight `[out, in, ks, ks]`), run on
    /// every frame of `[T, H, W, C]`.
    pub fn conv2d(
        in_c: usize,
        out_c: usize,
        ks: usize,
        pad: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get((out_c, in_c, ks, ks), "weight")?.unsqueeze(2)?;
        let bias = vb.get(out_c, "bias")?;
        Self::from_weights(w, bias, (1, 1), 0, [pad; 4])
    }

    /// The downsampling `nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in, out, 3,
    /// stride=2))` of `WanResample` as one conv (weight `[out, in, 3, 3]`).
    pub fn conv2d_down(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_c, in_c, 3, 3), "weight")?.unsqueeze(2)?;
        let bias = vb.get(out_c, "bias")?;
        Self::from_weights(w, bias, (1, 2), 0, [0, 1, 0, 1])
    }

    fn from_weights(
        w: Tensor,
        bias: Tensor,
        stride: (usize, usize),
        pad_t: usize,
        pad_s: [usize; 4],
    ) -> Result<Self> {
        let (out_c, in_c, kt, ks, _) = w.dims5()?;
        let cpu = w.device().is_cpu() && w.dtype() == DType::F32;
        let kernel = if cpu {
            Kernel::Cpu {
                taps: w.permute((2, 3, 4, 1, 0))?.contiguous()?,
                bias: bias.to_vec1::<f32>()?,
            }
        } else {
            Kernel::Generic {
                weight: w.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((
                    out_c,
                    kt * in_c,
                    ks,
                    ks,
                ))?,
                bias: bias.reshape((1, out_c, 1, 1))?,
            }
        };
        Ok(Self {
            kernel,
            in_c,
            out_c,
            kt,
            ks,
            stride_t: stride.0,
            stride_s: stride.1,
            pad_t: 2 * pad_t,
            pad_s,
        })
    }

    /// A 3³ conv with padding 1 (the common case).
    pub fn k3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_c, out_c, (3, 3), (1, 1), (1, 1), vb)
    }

    /// A 1×1×1 conv.
    pub fn k1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_c, out_c, (1, 1), (1, 1), (0, 0), vb)
    }

    pub fn out_channels(&self) -> usize {
        self.out_c
    }

    /// `forward(x, cache_x)` on `x: [T, H, W, C]`, giving `[T', H', W', out]`.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        self.forward_res(x, cache, None)
    }

    /// [`Self::forward`] plus `residual` (same shape as the output), fused on the CPU.
    pub fn forward_res(
        &self,
        x: &Tensor,
        cache: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, _, _, c) = x.dims4()?;
        if c != self.in_c {
            candle_core::bail!("causal conv expects {} channels, got {c}", self.in_c)
        }
        // Reference: if a cache is given and there is temporal padding, cat the cache in front
        // and pad only what is left (a negative pad crops the front).
        let (cache, zeros) = match cache {
            Some(cache) if self.pad_t > 0 => {
                let n = cache.dim(0)?;
                if n > self.pad_t {
                    (Some(cache.narrow(0, n - self.pad_t, self.pad_t)?), 0)
                } else {
                    (Some(cache.clone()), self.pad_t - n)
                }
            }
            _ => (None, self.pad_t),
        };
        let frames = x.dim(0)? + cache.as_ref().map_or(Ok(0), |c| c.dim(0))?;
        if zeros + frames < self.kt {
            candle_core::bail!(
                "causal conv with {} temporal taps got only {} frames",
                self.kt,
                zeros + frames
            )
        }
        match &self.kernel {
            Kernel::Cpu { taps, bias } => {
                self.forward_cpu(taps, bias, x, cache.as_ref(), zeros, residual)
            }
            Kernel::Generic { weight, bias } => {
                let xs = match &cache {
                    Some(c) => Tensor::cat(&[c, x], 0)?,
                    None => x.clone(),
                };
                let y = self.forward_generic(weight, bias, &xs, zeros)?;
                match residual {
                    Some(r) => y + r,
                    None => Ok(y),
                }
            }
        }
    }

    fn forward_cpu(
        &self,
        taps: &Tensor,
        bias: &[f32],
        x: &Tensor,
        cache: Option<&Tensor>,
        zeros: usize,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, h, w, c) = x.dims4()?;
        let x = x.contiguous()?;
        let cache = cache.map(|t| t.contiguous()).transpose()?;
        let residual = residual.map(|t| t.contiguous()).transpose()?;
        let (xg, xl) = x.storage_and_layout();
        let xd = conv::cpu_f32(&xg, xl)?;
        let cache_guard = cache.as_ref().map(|t| t.storage_and_layout());
        let res_guard = residual.as_ref().map(|t| t.storage_and_layout());
        let fsize = h * w * c;
        let mut frames: Vec<&[f32]> = Vec::new();
        if let Some((cg, cl)) = &cache_guard {
            frames.extend(conv::cpu_f32(cg, cl)?.chunks(fsize));
        }
        frames.extend(xd.chunks(fsize));
        let res = match &res_guard {
            Some((rg, rl)) => Some(conv::cpu_f32(rg, rl)?),
            None => None,
        };
        let (tg, tl) = taps.storage_and_layout();
        let g = conv::Geom {
            c,
            h,
            w,
            co: self.out_c,
            kt: self.kt,
            ks: self.ks,
            pad: self.pad_s,
            stride_t: self.stride_t,
            stride_s: self.stride_s,
        };
        conv::causal_conv(&frames, zeros, g, conv::cpu_f32(&tg, tl)?, bias, res)
    }

    /// candle conv2d (NCHW) per output frame over the window of `kt` frames seen as `kt·C`
    /// channels; `xs` and the result are channels-last.
    fn forward_generic(
        &self,
        weight: &Tensor,
        bias: &Tensor,
        xs: &Tensor,
        zeros: usize,
    ) -> Result<Tensor> {
        let [pt, pb, pl, pr] = self.pad_s;
        let dev = xs.device().clone();
        let (xs, pad) = profile::span("vae.conv layout (NHWC<->NCHW, pad)", &dev, || {
            let xs = xs.permute((0, 3, 1, 2))?.contiguous()?;
            // Symmetric padding goes to conv2d, anything else is applied first.
            Ok(if pt == pb && pl == pr && pt == pl {
                (xs, pt)
            } else {
                (xs.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?, 0)
            })
        })?;
        let (frames, c, h, w) = xs.dims4()?;
        let t_out = (zeros + frames - self.kt) / self.stride_t + 1;
        let y = profile::span("vae.conv2d", &dev, || {
            Ok(if self.kt == 1 {
                // Pointwise in time: all frames are one conv2d batch.
                let xs = if self.stride_t > 1 {
                    let idx: Vec<u32> = (0..t_out).map(|t| (t * self.stride_t) as u32).collect();
                    xs.index_select(&Tensor::new(idx.as_slice(), xs.device())?, 0)?
                } else {
                    xs
                };
                xs.conv2d(weight, pad, self.stride_s, 1, 1)?
            } else {
                let mut outs = Vec::with_capacity(t_out);
                for t in 0..t_out {
                    let w0 = t * self.stride_t;
                    // Taps that fall on the zero padding contribute nothing: leave them out.
                    let k0 = zeros.saturating_sub(w0);
                    let m = self.kt - k0;
                    let r0 = w0 + k0 - zeros;
                    let win = xs.narrow(0, r0, m)?.reshape((1, m * c, h, w))?;
                    let y = if k0 == 0 {
                        win.conv2d(weight, pad, self.stride_s, 1, 1)?
                    } else {
                        let wk = weight
                            .narrow(1, k0 * self.in_c, m * self.in_c)?
                            .contiguous()?;
                        win.conv2d(&wk, pad, self.stride_s, 1, 1)?
                    };
                    outs.push(y);
                }
                Tensor::cat(&outs, 0)?
            })
        })?;
        profile::span("vae.conv layout (NHWC<->NCHW, pad)", &dev, || {
            y.broadcast_add(bias)?.permute((0, 2, 3, 1))?.contiguous()
        })
    }

    /// The cached-conv pattern of the reference (`WanResidualBlock`, `conv_in`, `conv_out`):
    /// compute the next cache from `x`, run the conv with the previous cache, store the new one.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        self.forward_cached_res(x, cache, None)
    }

    /// [`Self::forward_cached`] plus a fused residual.
    pub fn forward_cached_res(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let prev = match cache.take() {
            Some(Slot::Frames(t)) => Some(t),
            Some(Slot::Rep) | None => None,
        };
        let next = next_cache(x, prev.as_ref())?;
        let y = self.forward_res(x, prev.as_ref(), residual)?;
        drop(prev);
        cache.put(Slot::Frames(next));
        Ok(y)
    }

    /// Kernel size `(kt, ks)`.
    pub fn kernel(&self) -> (usize, usize) {
        (self.kt, self.ks)
    }
}
