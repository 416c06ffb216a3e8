//! The VAE's CPU f32 kernels: the causal conv (`WanCausalConv3d` and the stride-1
//! `nn.Conv2d`s) and the fused `WanRMS_norm` + SiLU, on channels-last frames `[H, W, C]`.
//!
//! The conv runs in tasks of a few output rows of one output frame. Each task first copies the
//! input rows it needs (for every temporal tap) into a small zero-bordered scratch band, so
//! spatial padding costs no full-size copy. Then:
//! * with a direct row kernel for the ISA ([`super::conv_row`]: NEON and `out % 4 == 0`): a
//!   register-blocked direct convolution (6 pixels × 16 output channels of accumulators; per
//!   input channel one weight load per vector of channels and one broadcast per pixel), the
//!   scheme of oneDNN's direct conv kernels;
//! * for a 3 × 3 kernel at stride 1 where the ISA has a packed microkernel (AVX-512, AVX2):
//!   Winograd's F(2 × 2, 3 × 3) ([`winograd_conv`]), 16 products of transformed tiles per task
//!   on that microkernel; the Wan2.1 VAE decode (17 frames at 256 × 256, 9.6 TFLOP of which
//!   99% in 3 × 3 convs), 2 threads on a Zen 4, went from 58.5 to 31.8 s with it;
//! * otherwise (x86-64, where it measured faster than AVX-512 and AVX2 direct rows, and the
//!   portable path): an implicit GEMM per (temporal tap, kernel row), whose K dimension is
//!   `(dx, c)`, contiguous in channels-last rows. For stride 1 one product covers the task's
//!   whole band of rows ([`gemm_band`]), on Kino's packed microkernels where the ISA has one
//!   ([`packed_band`]: AVX-512, AVX2) and with the `gemm` crate otherwise; other strides run it
//!   row by row with the `gemm` crate ([`gemm_row`]).
//!
//! Taps that fall on the zero frames of the causal padding are skipped. An optional residual
//! (`x + h` of `WanResidualBlock`) is added when the output is stored.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::gemm::{self as packed_gemm, PackedB};
use super::portable::ConvRow;
use super::{isa, Isa};

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
    /// Spatial zero padding `[top, bottom, left, right]`.
    pub pad: [usize; 4],
    pub stride_t: usize,
    /// Spatial stride (same for rows and columns).
    pub stride_s: usize,
}

/// The f32 data of a contiguous CPU tensor.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    if !layout.is_contiguous() {
        candle_core::bail!("cpu kernel: tensor is not contiguous")
    }
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            let n = layout.shape().elem_count();
            v.get(start..start + n)
                .ok_or_else(|| candle_core::Error::Msg("cpu kernel: storage too small".into()))
        }
        _ => candle_core::bail!("cpu kernel: expected an f32 CPU tensor"),
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
/// `[H, W, C]`), with tap weights `taps` `[kt, ks, ks, C, Co]` and `bias` `[Co]`, adding
/// `residual` (`[T_out, H_out, W_out, Co]`) if given. Returns `[T_out, H_out, W_out, Co]`.
pub fn causal_conv(
    frames: &[&[f32]],
    zeros: usize,
    g: Geom,
    taps: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
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
        stride_s,
    } = g;
    let [pt, pb, pl, pr] = pad;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    if hp < ks
        || wp < ks
        || zeros + frames.len() < kt
        || stride_t == 0
        || stride_s == 0
        || c == 0
        || co == 0
    {
        candle_core::bail!("cpu conv: input too small for the kernel")
    }
    if taps.len() != kt * ks * ks * c * co || bias.len() != co {
        candle_core::bail!("cpu conv: weight size does not match the geometry")
    }
    if frames.iter().any(|f| f.len() != h * w * c) {
        candle_core::bail!("cpu conv: frame size does not match the geometry")
    }
    let (h_out, w_out) = ((hp - ks) / stride_s + 1, (wp - ks) / stride_s + 1);
    let t_out = (zeros + frames.len() - kt) / stride_t + 1;
    let out_len = t_out * h_out * w_out * co;
    if residual.is_some_and(|r| r.len() != out_len) {
        candle_core::bail!("cpu conv: residual size does not match the output")
    }
    let isa = isa();
    if let Some(kernel) = super::gemm_kernel(isa) {
        if ks == 3 && stride_s == 1 && isa != Isa::Neon && winograd_enabled() {
            return winograd_conv(frames, zeros, g, taps, bias, residual, kernel);
        }
    }

    // Rows per task: bound the scratch band, and give every thread several tasks.
    let row_bytes = wp * c * 4 * kt;
    let rows = per_task(h_out, ((2 << 20) / row_bytes.max(1)).clamp(1, 8), t_out);

    // Stride 1 off NEON (which keeps its direct row): a task's rows as one band ([`gemm_band`]),
    // on the ISA's packed-GEMM microkernel where it has one, each (temporal tap, kernel row)'s
    // weights `[ks·C, Co]` packed once for the whole call.
    let as_band = stride_s == 1 && isa != Isa::Neon;
    let packed: Option<Vec<PackedB>> = match super::gemm_kernel(isa) {
        Some(kernel) if as_band => Some(
            (0..kt * ks)
                .into_par_iter()
                .map(|ad| {
                    let w = &taps[ad * ks * c * co..][..ks * c * co];
                    PackedB::from_cols(kernel, w, co, ks * c, co)
                })
                .collect(),
        ),
        _ => None,
    };

    let mut out = vec![0f32; out_len];
    let out_ptr = OutPtr(out.as_mut_ptr());
    for_each_task(
        t_out,
        h_out,
        rows,
        g,
        zeros,
        || (),
        |_, task| {
            let (t, y0, nrows, w0, k0) = (task.t, task.u0, task.n, task.w0, task.k0);
            // Scratch band: [kt - k0][band rows][wp][c], zero outside the input. Output row
            // y0 + r reads band rows r·stride + dy.
            let band = (nrows - 1) * stride_s + ks;
            let fstride = band * wp * c;
            let mut scratch = vec![0f32; (kt - k0) * fstride];
            let top = (y0 * stride_s) as isize - pt as isize;
            fill_band(
                &mut scratch,
                &frames[w0 + k0 - zeros..w0 + kt - zeros],
                g,
                top,
                band,
                wp,
            );
            let out_base = t * h_out * w_out * co;
            let res_base = residual.map(|r| &r[out_base..out_base + h_out * w_out * co]);
            // SAFETY: rows y0..y0+nrows of output frame t belong to this task only.
            let out_frame = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(out_base), h_out * w_out * co)
            };
            let ctx = TaskCtx {
                g,
                k0,
                band,
                wp,
                w_out,
                scratch: &scratch,
                taps,
                bias,
            };
            if as_band {
                let rows = y0 * w_out * co..(y0 + nrows) * w_out * co;
                let (orows, rrows) = (&mut out_frame[rows.clone()], res_base.map(|rb| &rb[rows]));
                match &packed {
                    Some(packed) => packed_band(&ctx, nrows, packed, orows, rrows),
                    None => gemm_band(&ctx, nrows, orows, rrows),
                }
                return;
            }
            let mut offsets = Vec::with_capacity((kt - k0) * ks * ks);
            for r in 0..nrows {
                let y = y0 + r;
                let orow = &mut out_frame[y * w_out * co..][..w_out * co];
                let rrow = res_base.map(|rb| &rb[y * w_out * co..][..w_out * co]);
                if !direct_row(&ctx, isa, r, &mut offsets, orow, rrow) {
                    gemm_row(&ctx, r, orow, rrow);
                }
            }
        },
    );
    Tensor::from_vec(out, (t_out, h_out, w_out, co), &candle_core::Device::Cpu)
}

/// One task of a conv call: output frame `t`, units (rows or rows of tiles) `u0 .. u0 + n` of it;
/// its window of input frames starts at `w0` (counting the causal zero frames), and its taps
/// from `k0` on fall on real frames.
#[derive(Clone, Copy)]
struct Task {
    t: usize,
    u0: usize,
    n: usize,
    w0: usize,
    k0: usize,
}

/// Runs `f` on every task, `per` of a frame's `units` each, in parallel, with a state made by
/// `init` for each run of tasks rayon hands a thread (buffers reused from task to task, and
/// freed when the call ends).
#[allow(clippy::too_many_arguments)]
fn for_each_task<S>(
    t_out: usize,
    units: usize,
    per: usize,
    g: Geom,
    zeros: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, Task) + Sync + Send,
) {
    let per_frame = units.div_ceil(per);
    (0..t_out * per_frame)
        .into_par_iter()
        .for_each_init(init, |state, i| {
            let t = i / per_frame;
            let u0 = (i % per_frame) * per;
            let w0 = t * g.stride_t;
            f(
                state,
                Task {
                    t,
                    u0,
                    n: per.min(units - u0),
                    w0,
                    k0: zeros.saturating_sub(w0).min(g.kt),
                },
            )
        });
}

/// How many of a frame's `units` (output rows, or rows of tiles) one task takes: `want`, within
/// 1..=units, fewer if the `t_out` frames would otherwise make under four tasks per thread.
fn per_task(units: usize, want: usize, t_out: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = want.clamp(1, units.max(1));
    let per_frame_min = (4 * threads).div_ceil(t_out.max(1));
    if units.div_ceil(per) < per_frame_min {
        units.div_ceil(per_frame_min).max(1)
    } else {
        per
    }
}

/// Copies rows `top .. top + band` of each of `frames` (`[H, W, C]`; rows outside the frame
/// left as they are, zero) into consecutive `[band, width, C]` blocks of the zeroed `scratch`,
/// each row from pixel `pad[2]` (the left padding) on: a task's zero-bordered input band.
fn fill_band(
    scratch: &mut [f32],
    frames: &[&[f32]],
    g: Geom,
    top: isize,
    band: usize,
    width: usize,
) {
    let (h, w, c, pl) = (g.h, g.w, g.c, g.pad[2]);
    let fstride = band * width * c;
    for (fr, dst) in frames.iter().zip(scratch.chunks_exact_mut(fstride)) {
        for r in 0..band {
            let yi = top + r as isize;
            if yi < 0 || yi >= h as isize {
                continue;
            }
            let yi = yi as usize;
            dst[(r * width + pl) * c..][..w * c].copy_from_slice(&fr[yi * w * c..][..w * c]);
        }
    }
}

/// What a task's row kernels need.
struct TaskCtx<'a> {
    g: Geom,
    k0: usize,
    band: usize,
    wp: usize,
    w_out: usize,
    scratch: &'a [f32],
    taps: &'a [f32],
    bias: &'a [f32],
}

/// Output row `r` of the task's band with the direct row kernel of `isa`, if it has one for
/// this geometry (`offsets`: scratch for the tap offsets). Returns whether it ran.
fn direct_row(
    ctx: &TaskCtx,
    isa: Isa,
    r: usize,
    offsets: &mut Vec<(usize, usize)>,
    orow: &mut [f32],
    rrow: Option<&[f32]>,
) -> bool {
    // On x86-64 the implicit GEMM (measured here with the gemm crate's AVX2+FMA kernels, which it
    // runs on AVX-512 CPUs too) decodes faster than direct rows. A whole VAE decode (`kino bench vae
    // --child`, A and B run in turn): on an Intel AVX-512 box, 2 threads, 3 pairs, the AVX-512
    // 12×32 row took 109.0 s against 102.6 s (median ratio 1.065); on an AMD EPYC (Zen 4), 1
    // thread, 2 pairs, the AVX2 6×16 row took 2.14× the CPU time (277 against 130 s). Both rows
    // were removed (they are in the history before 2026-12-05). NEON keeps its direct row: the
    // gemm crate's NEON path has not been timed against it on an ARM machine.
    if !matches!(isa, Isa::Neon) {
        return false;
    }
    let Geom {
        c,
        co,
        kt,
        ks,
        stride_s,
        ..
    } = ctx.g;
    offsets.clear();
    for a in ctx.k0..kt {
        for dy in 0..ks {
            for dx in 0..ks {
                let xo = (((a - ctx.k0) * ctx.band + r * stride_s + dy) * ctx.wp + dx) * c;
                let wo = ((a * ks + dy) * ks + dx) * c * co;
                offsets.push((xo, wo));
            }
        }
    }
    let p = ConvRow {
        x: ctx.scratch,
        w: ctx.taps,
        taps: offsets,
        ps: stride_s * c,
        c,
        co,
        w_out: ctx.w_out,
        bias: ctx.bias,
        res: rrow,
    };
    super::conv_row(isa, &p, orow).is_some()
}

/// All `nrows` output rows of the task's band by implicit GEMM, for stride 1: for each (temporal
/// tap, kernel row) one `gemm` whose N runs through the band's padded rows. Output pixel `p` of
/// band row `r` reads the scratch from pixel `r·wp + p` on, so the band is one run of
/// `(nrows − 1)·wp + w_out` pixels at a stride of one pixel; the `ks − 1` of each row that fall
/// on the padding are computed and dropped. One call per (tap, kernel row) for the whole band
/// instead of one per output row: the weights are packed once per band.
fn gemm_band(ctx: &TaskCtx, nrows: usize, orows: &mut [f32], rrows: Option<&[f32]>) {
    let Geom { c, co, kt, ks, .. } = ctx.g;
    let (wp, w_out) = (ctx.wp, ctx.w_out);
    let n = (nrows - 1) * wp + w_out;
    let mut tile = vec![0f32; n * co];
    let mut first = true;
    for a in ctx.k0..kt {
        for dy in 0..ks {
            let start = ((a - ctx.k0) * ctx.band + dy) * wp * c;
            // Last rhs element: (n − 1)·c + ks·c − 1 = nrows·wp·c − 1 (stride 1: w_out + ks − 1
            // = wp), inside the band (band = nrows − 1 + ks rows, dy ≤ ks − 1).
            let x = &ctx.scratch[start..][..nrows * wp * c];
            let wt = &ctx.taps[(a * ks + dy) * ks * c * co..][..ks * c * co];
            gemm_crate_product(&mut tile, x, wt, n, co, ks * c, c, !first);
            first = false;
        }
    }
    store_band(&tile, ctx, nrows, orows, rrows);
}

/// [`gemm_band`] with Kino's packed GEMM ([`packed_gemm`]: the ISA's microkernel, the weights
/// of each (temporal tap, kernel row) packed once per call in `packed`). Tile by tile of the
/// band's output, all (tap, kernel row) products are added while the tile is in cache.
fn packed_band(
    ctx: &TaskCtx,
    nrows: usize,
    packed: &[PackedB],
    orows: &mut [f32],
    rrows: Option<&[f32]>,
) {
    let Geom { c, co, kt, ks, .. } = ctx.g;
    let (wp, w_out) = (ctx.wp, ctx.w_out);
    let n = (nrows - 1) * wp + w_out;
    let mut tile = vec![0f32; n * co];
    let noop = |_: &mut [f32], _: usize| {};
    let (tm, tn) = packed_gemm::tiles_of(n, &packed[0].view());
    for tj in 0..tn {
        for ti in 0..tm {
            let mut first = true;
            for a in ctx.k0..kt {
                for dy in 0..ks {
                    let start = ((a - ctx.k0) * ctx.band + dy) * wp * c;
                    // As in gemm_band: pixel q reads x[q·c..q·c + ks·c], all inside the band.
                    let x = &ctx.scratch[start..][..nrows * wp * c];
                    // SAFETY: A `[n, ks·c]` at row stride c ends at x's end (above), C is the
                    // task's own `[n, co]` tile, the weights were packed for this kernel.
                    unsafe {
                        packed_gemm::tile_of(
                            x.as_ptr(),
                            c,
                            n,
                            &packed[a * ks + dy].view(),
                            None,
                            tile.as_mut_ptr(),
                            co,
                            (ti, tj),
                            &noop,
                            !first,
                        );
                    }
                    first = false;
                }
            }
        }
    }
    store_band(&tile, ctx, nrows, orows, rrows);
}

/// `tile[q·co + o] (+)= Σ_kk wt[kk·co + o] · x[q·ps + kk]` for `q < n`, `o < co`, `kk < k`
/// (adding to the tile with `acc`), with the `gemm` crate: the implicit GEMM of one (temporal
/// tap, kernel row), pixels `ps` floats apart in the scratch band.
#[allow(clippy::too_many_arguments)]
fn gemm_crate_product(
    tile: &mut [f32],
    x: &[f32],
    wt: &[f32],
    n: usize,
    co: usize,
    k: usize,
    ps: usize,
    acc: bool,
) {
    assert!(n > 0 && tile.len() >= n * co && wt.len() >= k * co && x.len() >= (n - 1) * ps + k);
    // dst[o, q] at q·co + o; lhs W[o, kk] at kk·co + o; rhs X[kk, q] at q·ps + kk.
    // SAFETY: all three operands stay inside their slices (asserted above).
    unsafe {
        gemm::gemm(
            co,
            n,
            k,
            tile.as_mut_ptr(),
            co as isize,
            1,
            acc,
            wt.as_ptr(),
            co as isize,
            1,
            x.as_ptr(),
            ps as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The band's output rows from its tile (rows `wp` pixels apart, the padding's dropped).
fn store_band(tile: &[f32], ctx: &TaskCtx, nrows: usize, orows: &mut [f32], rrows: Option<&[f32]>) {
    let (wp, w_out, co) = (ctx.wp, ctx.w_out, ctx.g.co);
    for r in 0..nrows {
        let src = &tile[r * wp * co..][..w_out * co];
        let dst = &mut orows[r * w_out * co..][..w_out * co];
        store_row(
            src,
            dst,
            ctx.bias,
            rrows.map(|rr| &rr[r * w_out * co..][..w_out * co]),
        );
    }
}

/// `dst = src + bias (+ residual)`, pixel by pixel (`[pixels, co]`).
fn store_row(src: &[f32], dst: &mut [f32], bias: &[f32], res: Option<&[f32]>) {
    let co = bias.len();
    for (p, (d, s)) in dst
        .chunks_exact_mut(co)
        .zip(src.chunks_exact(co))
        .enumerate()
    {
        match res {
            Some(rr) => {
                for (((dv, sv), bv), rv) in d.iter_mut().zip(s).zip(bias).zip(&rr[p * co..]) {
                    *dv = sv + bv + rv;
                }
            }
            None => {
                for ((dv, sv), bv) in d.iter_mut().zip(s).zip(bias) {
                    *dv = sv + bv;
                }
            }
        }
    }
}

/// One output row by implicit GEMM: for each (temporal tap, kernel row) one `gemm` with
/// `K = ks·C` (the `dx` taps and channels are contiguous in a channels-last row).
fn gemm_row(ctx: &TaskCtx, r: usize, orow: &mut [f32], rrow: Option<&[f32]>) {
    let Geom {
        c,
        co,
        kt,
        ks,
        stride_s,
        ..
    } = ctx.g;
    let (wp, w_out) = (ctx.wp, ctx.w_out);
    let n = w_out;
    let mut tile = vec![0f32; n * co];
    let mut first = true;
    for a in ctx.k0..kt {
        for dy in 0..ks {
            let row = ((a - ctx.k0) * ctx.band + r * stride_s + dy) * wp * c;
            let x = &ctx.scratch[row..][..wp * c];
            let wt = &ctx.taps[(a * ks + dy) * ks * c * co..][..ks * c * co];
            gemm_crate_product(&mut tile, x, wt, n, co, ks * c, stride_s * c, !first);
            first = false;
        }
    }
    store_row(&tile, orow, ctx.bias, rrow);
}

/// Fused `WanRMS_norm` + SiLU over the last (channel) dim of a contiguous f32 CPU tensor:
/// `silu(x / max(‖x‖₂, 1e-12) · g)` with `g = gamma·sqrt(C)`.
pub fn rms_norm_silu(x: &Tensor, g: &[f32]) -> Result<Tensor> {
    let c = g.len();
    let (xg, xl) = x.storage_and_layout();
    let xs = cpu_f32(&xg, xl)?;
    if c == 0 || xs.len() % c != 0 || x.dims().last() != Some(&c) {
        candle_core::bail!("rms_norm_silu: channel count mismatch")
    }
    let mut out = vec![0f32; xs.len()];
    let px = (16_384 / c).max(1);
    let isa = isa();
    out.par_chunks_mut(px * c)
        .zip(xs.par_chunks(px * c))
        .for_each(|(o, s)| super::rms_norm_silu_rows(isa, s, g, o));
    Tensor::from_vec(out, x.dims(), &candle_core::Device::Cpu)
}

/// Whether 3 × 3 stride-1 convs run by Winograd ([`winograd_conv`]): yes unless
/// `KINO_CPU_CONV=implicit-gemm` (read once), which runs them by implicit GEMM as before, for
/// timing one against the other.
fn winograd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if let Some(on) = WINOGRAD.with(|w| w.get()) {
        return on;
    }
    *ON.get_or_init(|| match std::env::var("KINO_CPU_CONV").as_deref() {
        Ok("implicit-gemm") => false,
        Ok("winograd") | Err(_) => true,
        Ok(other) => {
            let w = format!(
                "KINO_CPU_CONV={other} is not one of winograd, implicit-gemm; using winograd"
            );
            tracing::warn!("{w}");
            eprintln!("warning: {w}");
            true
        }
    })
}

#[cfg(test)]
thread_local! {
    static WINOGRAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with Winograd on or off on this thread (tests: one path against the other).
#[cfg(test)]
pub(crate) fn with_winograd<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = WINOGRAD.with(|w| w.replace(Some(on)));
    let r = f();
    WINOGRAD.with(|w| w.set(before));
    r
}

/// Row `u` of Winograd's input transform `Bᵀ` (F(2, 3)): `(Bᵀd)[u] = d[i1] + s·d[i2]`, as
/// `(i1, i2, s)`. `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
const BT: [(usize, usize, f32); 4] = [(0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)];

/// The 3 × 3 stride-1 causal conv by Winograd's minimal filtering F(2 × 2, 3 × 3) (Lavin & Gray,
/// "Fast Algorithms for Convolutional Neural Networks", 2016): each 2 × 2 block of output pixels
/// from a 4 × 4 block of input pixels as `Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`, which takes 16
/// multiplications per (input, output channel) instead of 36. Over the channels that is 16
/// products `[tiles, kt·C] · [kt·C, Co]` per task, one per position ξ of the 4 × 4 transformed
/// tile, on the ISA's packed microkernel: the temporal taps are stacked along K (the filters
/// `U = G g Gᵀ` of every tap packed once per call; a frame whose first taps fall on the causal
/// padding's zero frames takes a slice of K), and the input tiles are transformed one ξ at a
/// time into a `[tiles, kt·C]` matrix that stays in cache for its product. The transforms only
/// add and subtract (and halve, in `G`), so the result equals the direct sum up to f32
/// rounding (a few ulps more than the implicit GEMM's; the VAE fixtures hold it to 1e-4).
#[allow(clippy::too_many_arguments)]
fn winograd_conv(
    frames: &[&[f32]],
    zeros: usize,
    g: Geom,
    taps: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    kernel: &'static super::gemm::Kernel,
) -> Result<Tensor> {
    let Geom {
        c,
        h,
        w,
        co,
        kt,
        pad,
        stride_t,
        ..
    } = g;
    let [pt, pb, pl, pr] = pad;
    let (h_out, w_out) = (h + pt + pb - 2, w + pl + pr - 2);
    let t_out = (zeros + frames.len() - kt) / stride_t + 1;
    // Tiles of 2 × 2 output pixels; the scratch band is `2·tw + 2` pixels wide (zero beyond
    // the input and its padding, for an odd output width).
    let (th, tw) = (h_out.div_ceil(2), w_out.div_ceil(2));
    let wpp = 2 * tw + 2;

    // The filters: U[ξ][(a·C + ci), o] = (G g_{a,ci,o} Gᵀ)[ξ], G = [[1, 0, 0], [½, ½, ½],
    // [½, −½, ½], [0, 0, 1]], packed per ξ as `[kt·C, Co]`.
    let kk_all = kt * c;
    let u: Vec<PackedB> = (0..16)
        .into_par_iter()
        .map(|xi| {
            let (ui, vi) = (xi / 4, xi % 4);
            let gw = |i: usize, k: usize| -> f32 {
                [
                    [1.0, 0.0, 0.0],
                    [0.5, 0.5, 0.5],
                    [0.5, -0.5, 0.5],
                    [0.0, 0.0, 1.0],
                ][i][k]
            };
            // Built by appending: adding into a fresh zeroed buffer would read its pages before
            // writing them, and each such page costs a copy-on-write fault and a TLB shootdown.
            let mut m = Vec::with_capacity(kk_all * co);
            let mut dst = vec![0f32; co];
            for a in 0..kt {
                for ci in 0..c {
                    dst.fill(0.0);
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let f = gw(ui, dy) * gw(vi, dx);
                            if f == 0.0 {
                                continue;
                            }
                            let src = &taps[(((a * 3 + dy) * 3 + dx) * c + ci) * co..][..co];
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += f * s;
                            }
                        }
                    }
                    m.extend_from_slice(&dst);
                }
            }
            PackedB::from_cols(kernel, &m, co, kk_all, co)
        })
        .collect();

    // Tile rows per task: about 128 tiles (the product's M), and several tasks per thread.
    let trows = per_task(th, 128 / tw, t_out);
    let isa = isa();

    let out_len = t_out * h_out * w_out * co;
    let mut out = vec![0f32; out_len];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let buffers = || [Vec::new(), Vec::new(), Vec::new()];
    for_each_task(
        t_out,
        th,
        trows,
        g,
        zeros,
        buffers,
        |bufs: &mut [Vec<f32>; 3], task| {
            let (t, tr0, ntr, w0, k0) = (task.t, task.u0, task.n, task.w0, task.k0);
            let na = kt - k0;
            // Scratch band: [na][2·ntr + 2 rows][wpp][c], zero outside the input.
            let band = 2 * ntr + 2;
            let fstride = band * wpp * c;
            let nt = ntr * tw;
            let kk = na * c;
            // The task's buffers (scratch band, transformed input, products), kept from task to
            // task: fresh ones of these sizes (MBs) come from mmap and cost page faults and TLB
            // shootdowns each time.
            let [scratch, v, m] = bufs;
            {
                scratch.clear();
                scratch.resize(na * fstride, 0.0);
                v.resize(nt * kk, 0.0);
                m.resize(16 * nt * co, 0.0);
                let top = (2 * tr0) as isize - pt as isize;
                fill_band(
                    scratch,
                    &frames[w0 + k0 - zeros..w0 + kt - zeros],
                    g,
                    top,
                    band,
                    wpp,
                );
                let noop = |_: &mut [f32], _: usize| {};
                for xi in 0..16 {
                    // V[tile, (a, ci)] = (Bᵀ d B)[ξ] of the tile's 4 × 4 input pixels.
                    let ((i1, i2, s), (j1, j2, sj)) = (BT[xi / 4], BT[xi % 4]);
                    for ti in 0..ntr {
                        for tj in 0..tw {
                            let row = &mut v[(ti * tw + tj) * kk..][..kk];
                            for a in 0..na {
                                let px = |r: usize, col: usize| {
                                    &scratch
                                        [a * fstride + ((2 * ti + r) * wpp + 2 * tj + col) * c..]
                                        [..c]
                                };
                                let x = [px(i1, j1), px(i1, j2), px(i2, j1), px(i2, j2)];
                                super::winograd_input(isa, &mut row[a * c..][..c], x, s, sj);
                            }
                        }
                    }
                    let view = u[xi].view_k(k0 * c, kt * c);
                    let (tm, tn) = packed_gemm::tiles_of(nt, &view);
                    let mx = &mut m[xi * nt * co..][..nt * co];
                    for tj in 0..tn {
                        for ti in 0..tm {
                            // SAFETY: V is `[nt, kk]` (row stride kk = view.k), M's slice `[nt, co]`,
                            // the filters were packed for this kernel; the buffers are the task's.
                            unsafe {
                                packed_gemm::tile_of(
                                    v.as_ptr(),
                                    kk,
                                    nt,
                                    &view,
                                    None,
                                    mx.as_mut_ptr(),
                                    co,
                                    (ti, tj),
                                    &noop,
                                    false,
                                );
                            }
                        }
                    }
                }
                // Output transform Aᵀ M A, A = [[1, 0], [1, 1], [1, −1], [0, −1]], + bias (+ residual).
                let out_base = t * h_out * w_out * co;
                // SAFETY: output rows 2·tr0 .. 2·(tr0 + ntr) of frame t belong to this task only.
                let out_frame = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add(out_base), h_out * w_out * co)
                };
                let res_frame = residual.map(|r| &r[out_base..out_base + h_out * w_out * co]);
                let mut y = vec![0f32; 4 * co];
                for ti in 0..ntr {
                    for tj in 0..tw {
                        let tile = ti * tw + tj;
                        let mm = |xi: usize| &m[(xi * nt + tile) * co..][..co];
                        let (y00, rest) = y.split_at_mut(co);
                        let (y01, rest) = rest.split_at_mut(co);
                        let (y10, y11) = rest.split_at_mut(co);
                        let ms: [&[f32]; 16] = std::array::from_fn(mm);
                        super::winograd_output(isa, ms, [y00, y01, y10, y11]);
                        for p in 0..2 {
                            let yy = 2 * (tr0 + ti) + p;
                            if yy >= h_out {
                                continue;
                            }
                            for q in 0..2 {
                                let xx = 2 * tj + q;
                                if xx >= w_out {
                                    continue;
                                }
                                let at = (yy * w_out + xx) * co;
                                store_row(
                                    &y[(2 * p + q) * co..][..co],
                                    &mut out_frame[at..at + co],
                                    bias,
                                    res_frame.map(|r| &r[at..at + co]),
                                );
                            }
                        }
                    }
                }
            }
        },
    );
    Tensor::from_vec(out, (t_out, h_out, w_out, co), &candle_core::Device::Cpu)
}
