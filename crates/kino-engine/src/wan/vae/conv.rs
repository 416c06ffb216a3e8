//! `WanCausalConv3d` (diffusers `autoencoder_kl_wan.py`) and the causal feature cache
//! (`feat_cache` / `feat_idx`, `CACHE_T`).
//!
//! Layout: inside the VAE every video is held per sample as `[T, C, H, W]` (frames first), so a
//! frame is one contiguous `[C, H, W]` block. candle has no conv3d; a causal 3D convolution with
//! a `kt × kh × kw` kernel is computed per output frame as ONE conv2d whose input is the window
//! of `kt` consecutive frames seen as `kt·C` channels (a zero-copy view of `[T, C, H, W]`), with
//! the weight stored once as `[out, kt·in, kh, kw]` (the reference `[out, in, kt, kh, kw]` with
//! `kt` moved before `in`). Zero frames of the causal padding are not materialised: their taps
//! are simply left out of the sum.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

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

/// The last `n` frames of `x` (`x[:, :, -n:]`), copied when that is only part of `x` so the
/// cache does not keep the whole activation alive.
pub fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(0)?;
    if t <= n {
        Ok(x.clone())
    } else {
        x.narrow(0, t - n, n)?.copy()
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

/// `WanCausalConv3d`: a Conv3d whose temporal padding (`2·padding_t`) is all in front, with the
/// cached frames of the previous chunk taking the place of that padding.
#[derive(Debug, Clone)]
pub struct WanCausalConv3d {
    /// `[out, kt·in, kh, kw]` (taps `k` outermost in the channel dim: channel `k·in + c`).
    weight: Tensor,
    /// `[1, out, 1, 1]`.
    bias: Tensor,
    in_c: usize,
    out_c: usize,
    kt: usize,
    ks: usize,
    stride_t: usize,
    stride_s: usize,
    /// Frames of causal padding in front (`2·padding_t`).
    pad_t: usize,
    pad_s: usize,
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
        let bias = vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?;
        let weight =
            w.permute((0, 2, 1, 3, 4))?
                .contiguous()?
                .reshape((out_c, kt * in_c, ks, ks))?;
        Ok(Self {
            weight,
            bias,
            in_c,
            out_c,
            kt,
            ks,
            stride_t: stride.0,
            stride_s: stride.1,
            pad_t: 2 * padding.0,
            pad_s: padding.1,
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

    /// `forward(x, cache_x)` on `x: [T, C, H, W]`, giving `[T', out, H', W']`.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.in_c {
            candle_core::bail!("causal conv expects {} channels, got {c}", self.in_c)
        }
        // Reference: if a cache is given and there is temporal padding, cat the cache in front
        // and pad only what is left (a negative pad crops).
        let mut zeros = self.pad_t;
        let xs = match cache {
            Some(cache) if self.pad_t > 0 => {
                let n = cache.dim(0)?;
                let xs = Tensor::cat(&[cache, x], 0)?;
                if n > self.pad_t {
                    zeros = 0;
                    let skip = n - self.pad_t;
                    xs.narrow(0, skip, xs.dim(0)? - skip)?
                } else {
                    zeros = self.pad_t - n;
                    xs
                }
            }
            _ => x.clone(),
        };
        let frames = xs.dim(0)?;
        if zeros + frames < self.kt {
            candle_core::bail!(
                "causal conv with {} temporal taps got only {} frames",
                self.kt,
                zeros + frames
            )
        }
        let t_out = (zeros + frames - self.kt) / self.stride_t + 1;

        if self.kt == 1 {
            // Pointwise in time: all frames are one conv2d batch.
            let xs = if self.stride_t > 1 {
                let idx: Vec<u32> = (0..t_out).map(|t| (t * self.stride_t) as u32).collect();
                xs.index_select(&Tensor::new(idx.as_slice(), xs.device())?, 0)?
            } else {
                xs
            };
            let y = xs.conv2d(&self.weight, self.pad_s, self.stride_s, 1, 1)?;
            return y.broadcast_add(&self.bias);
        }

        let xs = xs.contiguous()?;
        let mut outs = Vec::with_capacity(t_out);
        for t in 0..t_out {
            let w0 = t * self.stride_t;
            // Taps that fall on the zero padding contribute nothing: leave them out.
            let k0 = zeros.saturating_sub(w0);
            let m = self.kt - k0;
            let r0 = w0 + k0 - zeros;
            let win = xs.narrow(0, r0, m)?.reshape((1, m * c, h, w))?;
            let y = if k0 == 0 {
                win.conv2d(&self.weight, self.pad_s, self.stride_s, 1, 1)?
            } else {
                let wk = self
                    .weight
                    .narrow(1, k0 * self.in_c, m * self.in_c)?
                    .contiguous()?;
                win.conv2d(&wk, self.pad_s, self.stride_s, 1, 1)?
            };
            outs.push(y);
        }
        let y = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("no output".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        y.broadcast_add(&self.bias)
    }

    /// The cached-conv pattern of the reference (`WanResidualBlock`, `conv_in`, `conv_out`):
    /// compute the next cache from `x`, run the conv with the previous cache, store the new one.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let prev = match cache.take() {
            Some(Slot::Frames(t)) => Some(t),
            Some(Slot::Rep) | None => None,
        };
        let next = next_cache(x, prev.as_ref())?;
        let y = self.forward(x, prev.as_ref())?;
        drop(prev);
        cache.put(Slot::Frames(next));
        Ok(y)
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// Kernel size `(kt, ks)`.
    pub fn kernel(&self) -> (usize, usize) {
        (self.kt, self.ks)
    }
}
