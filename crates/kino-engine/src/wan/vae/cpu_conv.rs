//! CPU f32 kernel for the VAE's causal convolutions (`WanCausalConv3d` and the stride-1
//! `nn.Conv2d`s), as an implicit GEMM: no im2col buffer is built.
//!
//! With the input zero-padded spatially to `[C, Hp, Wp]` per frame and the output computed in
//! "padded-width" coordinates (`n = y·Wp + x`), each kernel tap `(a, dy, dx)` is a plain matrix
//! product `W_tap [Co × C] · X [C × n]` where `X` is the padded frame `a` read from offset
//! `dy·Wp + dx` with row stride `Hp·Wp`, i.e. a strided view of the input. The taps are summed
//! into one output tile by `gemm` with accumulation; tiles of output rows run in parallel and
//! each is small enough to stay in cache while its taps accumulate. The `Wp − W_out` columns
//! of garbage per row are dropped when the tile is copied out (with the bias added).

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Geometry of one causal conv call.
#[derive(Debug, Clone, Copy)]
pub struct Geom {
    /// Input channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub co: usize,
    /// Temporal taps and spatial kernel size (square).
    pub kt: usize,
    pub ks: usize,
    /// Spatial zero padding (each side).
    pub pad: usize,
    pub stride_t: usize,
}

/// The f32 data of a contiguous CPU tensor.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    if !layout.is_contiguous() {
        candle_core::bail!("cpu conv: tensor is not contiguous")
    }
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            let n = layout.shape().elem_count();
            v.get(start..start + n)
                .ok_or_else(|| candle_core::Error::Msg("cpu conv: storage too small".into()))
        }
        _ => candle_core::bail!("cpu conv: expected an f32 CPU tensor"),
    }
}

/// Output pointer shared by the tasks; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs the causal conv over `zeros` zero frames followed by the real `frames` (each
/// `[C, H, W]`), with tap weights `taps` `[kt·ks·ks, Co, C]` and `bias` `[Co]`.
/// Returns `[T_out, Co, H_out, W_out]`.
pub fn causal_conv(
    frames: &[&[f32]],
    zeros: usize,
    g: Geom,
    taps: &[f32],
    bias: &[f32],
) -> Result<Tensor> {
    let Geom {
        c,
        h,
        w,
        co,
        kt,
        ks,
        pad,
        stride_t,
    } = g;
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    if hp < ks || wp < ks || zeros + frames.len() < kt || stride_t == 0 {
        candle_core::bail!("cpu conv: input too small for the kernel")
    }
    if taps.len() != kt * ks * ks * co * c || bias.len() != co {
        candle_core::bail!("cpu conv: weight size does not match the geometry")
    }
    let (h_out, w_out) = (hp + 1 - ks, wp + 1 - ks);
    let plane = hp * wp;
    let fsize = c * plane;
    for f in frames {
        if f.len() != c * h * w {
            candle_core::bail!("cpu conv: frame size does not match the geometry")
        }
    }

    // Spatially padded copy of the frames (none needed without padding).
    let padded: Vec<f32> = if pad > 0 {
        let mut p = vec![0f32; frames.len() * fsize];
        p.par_chunks_mut(plane).enumerate().for_each(|(idx, dst)| {
            let src = &frames[idx / c][(idx % c) * h * w..][..h * w];
            for y in 0..h {
                let d = (y + pad) * wp + pad;
                dst[d..d + w].copy_from_slice(&src[y * w..(y + 1) * w]);
            }
        });
        p
    } else {
        Vec::new()
    };
    let src: Vec<&[f32]> = if pad > 0 {
        padded.chunks(fsize).collect()
    } else {
        frames.to_vec()
    };

    let t_out = (zeros + frames.len() - kt) / stride_t + 1;
    // Rows per task: an output tile of about 128 Ki floats, and enough tasks for all threads.
    let threads = rayon::current_num_threads().max(1);
    let target_n = (131_072 / co.max(1)).max(256);
    let mut rows = (target_n / wp).max(1).min(h_out);
    let per_frame_min = (4 * threads).div_ceil(t_out);
    if h_out.div_ceil(rows) < per_frame_min {
        rows = h_out.div_ceil(per_frame_min).max(1);
    }
    let tiles_per_frame = h_out.div_ceil(rows);

    let mut out = vec![0f32; t_out * co * h_out * w_out];
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..t_out * tiles_per_frame)
        .into_par_iter()
        .for_each(|task| {
            let t = task / tiles_per_frame;
            let y0 = (task % tiles_per_frame) * rows;
            let nrows = rows.min(h_out - y0);
            let n = (nrows - 1) * wp + w_out;
            let mut tile = vec![0f32; co * n];
            let w0 = t * stride_t;
            let k0 = zeros.saturating_sub(w0).min(kt);
            let mut first = true;
            for a in k0..kt {
                let fr = src[w0 + a - zeros];
                for dy in 0..ks {
                    for dx in 0..ks {
                        let tap = (a * ks + dy) * ks + dx;
                        let lhs = &taps[tap * co * c..(tap + 1) * co * c];
                        let off = (y0 + dy) * wp + dx;
                        // Last element read: (c-1)·plane + off + n − 1 ≤ c·plane − 1.
                        debug_assert!((c - 1) * plane + off + n <= fr.len());
                        // SAFETY: dst is `co × n` row-major in `tile`; lhs is `co × c`
                        // row-major in `taps`; rhs reads `c` rows of `n` floats at stride
                        // `plane` from `off`, which stays inside `fr` (see above).
                        unsafe {
                            gemm::gemm(
                                co,
                                n,
                                c,
                                tile.as_mut_ptr(),
                                1,
                                n as isize,
                                !first,
                                lhs.as_ptr(),
                                1,
                                c as isize,
                                fr.as_ptr().add(off),
                                1,
                                plane as isize,
                                1.0f32,
                                1.0f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        first = false;
                    }
                }
            }
            for (o, &b) in bias.iter().enumerate() {
                for r in 0..nrows {
                    let s = &tile[o * n + r * wp..][..w_out];
                    let d = ((t * co + o) * h_out + y0 + r) * w_out;
                    // SAFETY: (t, o, y0 + r) is written by this task only, and the
                    // row lies inside `out` (t < t_out, o < co, y0 + r < h_out).
                    unsafe {
                        let dst = std::slice::from_raw_parts_mut(out_ptr.get().add(d), w_out);
                        for (dv, sv) in dst.iter_mut().zip(s) {
                            *dv = sv + b;
                        }
                    }
                }
            }
        });
    Tensor::from_vec(out, (t_out, co, h_out, w_out), &candle_core::Device::Cpu)
}
