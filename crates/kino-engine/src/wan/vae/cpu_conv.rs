//! CPU f32 kernels of the VAE: the causal conv (`WanCausalConv3d` and the stride-1
//! `nn.Conv2d`s) and the fused `WanRMS_norm` + SiLU, on channels-last frames `[H, W, C]`.
//!
//! The conv runs in tasks of a few output rows of one output frame. Each task first copies the
//! input rows it needs (for every temporal tap) into a small zero-bordered scratch band, so
//! spatial padding costs no full-size copy. Then:
//! * with AVX-512 and `out % 16 == 0`: a register-blocked direct convolution (12 pixels × 32
//!   output channels of accumulators; per input channel one weight load per 16 channels and one
//!   broadcast per pixel), the scheme of oneDNN's direct conv kernels;
//! * otherwise: an implicit GEMM per (temporal tap, kernel row) with `gemm`, whose K dimension
//!   is `(dx, c)`, contiguous in channels-last rows.
//!
//! Taps that fall on the zero frames of the causal padding are skipped. An optional residual
//! (`x + h` of `WanResidualBlock`) is added when the output is stored.

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

/// Whether the AVX-512 direct kernel can run here.
fn use_avx512(co: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        co.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = co;
        false
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
    let avx = use_avx512(co) && kt * ks * ks <= MAX_TAPS;

    // Rows per task: bound the scratch band, and give every thread several tasks.
    let threads = rayon::current_num_threads().max(1);
    let row_bytes = wp * c * 4 * kt;
    let mut rows = (2 << 20) / row_bytes.max(1);
    rows = rows.clamp(1, 8).min(h_out);
    let per_frame_min = (4 * threads).div_ceil(t_out);
    if h_out.div_ceil(rows) < per_frame_min {
        rows = h_out.div_ceil(per_frame_min).max(1);
    }
    let tiles_per_frame = h_out.div_ceil(rows);

    let mut out = vec![0f32; out_len];
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..t_out * tiles_per_frame)
        .into_par_iter()
        .for_each(|task| {
            let t = task / tiles_per_frame;
            let y0 = (task % tiles_per_frame) * rows;
            let nrows = rows.min(h_out - y0);
            let w0 = t * stride_t;
            let k0 = zeros.saturating_sub(w0).min(kt);
            // Scratch band: [kt - k0][band rows][wp][c], zero outside the input. Output row
            // y0 + r reads band rows r·stride + dy.
            let band = (nrows - 1) * stride_s + ks;
            let fstride = band * wp * c;
            let mut scratch = vec![0f32; (kt - k0) * fstride];
            for a in k0..kt {
                let fr = frames[w0 + a - zeros];
                let dst = &mut scratch[(a - k0) * fstride..][..fstride];
                for r in 0..band {
                    let yi = (y0 * stride_s + r) as isize - pt as isize;
                    if yi < 0 || yi >= h as isize {
                        continue;
                    }
                    let yi = yi as usize;
                    dst[(r * wp + pl) * c..][..w * c].copy_from_slice(&fr[yi * w * c..][..w * c]);
                }
            }
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
            for r in 0..nrows {
                let y = y0 + r;
                let orow = &mut out_frame[y * w_out * co..][..w_out * co];
                let rrow = res_base.map(|rb| &rb[y * w_out * co..][..w_out * co]);
                if avx {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX-512F was detected; the row and its inputs are in bounds.
                    unsafe {
                        avx512::row(&ctx, r, orow, rrow)
                    };
                } else {
                    gemm_row(&ctx, r, orow, rrow);
                }
            }
        });
    Tensor::from_vec(out, (t_out, h_out, w_out, co), &candle_core::Device::Cpu)
}

/// Most kernel taps (`kt·ks·ks`) the direct kernel handles.
const MAX_TAPS: usize = 27;

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
            // dst[o, p] at p·co + o; lhs W[o, kk] at kk·co + o; rhs X[kk, p] at p·s·c + kk.
            // Last rhs element: ((n − 1)·s + ks)·c − 1 ≤ wp·c − 1.
            // SAFETY: all three operands stay inside the slices above.
            unsafe {
                gemm::gemm(
                    co,
                    n,
                    ks * c,
                    tile.as_mut_ptr(),
                    co as isize,
                    1,
                    !first,
                    wt.as_ptr(),
                    co as isize,
                    1,
                    x.as_ptr(),
                    (stride_s * c) as isize,
                    1,
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
    for p in 0..n {
        let d = &mut orow[p * co..][..co];
        let s = &tile[p * co..][..co];
        match rrow {
            Some(rr) => {
                for (((dv, sv), bv), rv) in d.iter_mut().zip(s).zip(ctx.bias).zip(&rr[p * co..]) {
                    *dv = sv + bv + rv;
                }
            }
            None => {
                for ((dv, sv), bv) in d.iter_mut().zip(s).zip(ctx.bias) {
                    *dv = sv + bv;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The register-blocked direct conv: NP output pixels × NV·16 output channels of
    //! accumulators, written out by macros so they stay in registers at any opt-level.
    use std::arch::x86_64::*;

    use super::{Geom, TaskCtx, MAX_TAPS};

    /// Per-tap input pointers (at pixel 0 of the row band, channel 0) and weight pointers
    /// (at input channel 0, output channel 0); `ps` is the input stride between output pixels.
    struct Taps {
        n: usize,
        ps: usize,
        x: [*const f32; MAX_TAPS],
        w: [*const f32; MAX_TAPS],
    }

    // The kernels are written out by macros with one named accumulator per (pixel, 16
    // channels), plain pointer bumps and wrapping arithmetic, so they compile to a register-only
    // inner loop even without optimisation-level help (no arrays, no checked arithmetic).

    macro_rules! kernel_x2 {
        ($name:ident, [$(($a:ident, $b:ident, $j:literal)),*]) => {
            /// A block of pixels `x0..` × 32 channels `o0..o0+32`.
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments, clippy::erasing_op, clippy::identity_op)]
            unsafe fn $name(
                taps: &Taps,
                x0: usize,
                o0: usize,
                c: usize,
                co: usize,
                out: *mut f32,
                res: *const f32,
                bias: *const f32,
            ) {
                $( let mut $a = _mm512_setzero_ps(); let mut $b = _mm512_setzero_ps(); )*
                for t in 0..taps.n {
                    let mut xp = taps.x[t].wrapping_add(x0.wrapping_mul(taps.ps));
                    let mut wp = taps.w[t].wrapping_add(o0);
                    for _ in 0..c {
                        let w0 = _mm512_loadu_ps(wp);
                        let w1 = _mm512_loadu_ps(wp.wrapping_add(16));
                        $(
                            let v = _mm512_set1_ps(*xp.wrapping_add(taps.ps.wrapping_mul($j)));
                            $a = _mm512_fmadd_ps(v, w0, $a);
                            $b = _mm512_fmadd_ps(v, w1, $b);
                        )*
                        xp = xp.wrapping_add(1);
                        wp = wp.wrapping_add(co);
                    }
                }
                let bias = bias.wrapping_add(o0);
                let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.wrapping_add(16)));
                $(
                    let off = (x0 + $j) * co + o0;
                    let mut r0 = _mm512_add_ps($a, b0);
                    let mut r1 = _mm512_add_ps($b, b1);
                    if !res.is_null() {
                        r0 = _mm512_add_ps(r0, _mm512_loadu_ps(res.wrapping_add(off)));
                        r1 = _mm512_add_ps(r1, _mm512_loadu_ps(res.wrapping_add(off + 16)));
                    }
                    _mm512_storeu_ps(out.wrapping_add(off), r0);
                    _mm512_storeu_ps(out.wrapping_add(off + 16), r1);
                )*
            }
        };
    }

    macro_rules! kernel_x1 {
        ($name:ident, [$(($a:ident, $j:literal)),*]) => {
            /// A block of pixels `x0..` × 16 channels `o0..o0+16`.
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments, clippy::erasing_op, clippy::identity_op)]
            unsafe fn $name(
                taps: &Taps,
                x0: usize,
                o0: usize,
                c: usize,
                co: usize,
                out: *mut f32,
                res: *const f32,
                bias: *const f32,
            ) {
                $( let mut $a = _mm512_setzero_ps(); )*
                for t in 0..taps.n {
                    let mut xp = taps.x[t].wrapping_add(x0.wrapping_mul(taps.ps));
                    let mut wp = taps.w[t].wrapping_add(o0);
                    for _ in 0..c {
                        let w0 = _mm512_loadu_ps(wp);
                        $(
                            let v = _mm512_set1_ps(*xp.wrapping_add(taps.ps.wrapping_mul($j)));
                            $a = _mm512_fmadd_ps(v, w0, $a);
                        )*
                        xp = xp.wrapping_add(1);
                        wp = wp.wrapping_add(co);
                    }
                }
                let b0 = _mm512_loadu_ps(bias.wrapping_add(o0));
                $(
                    let off = (x0 + $j) * co + o0;
                    let mut r0 = _mm512_add_ps($a, b0);
                    if !res.is_null() {
                        r0 = _mm512_add_ps(r0, _mm512_loadu_ps(res.wrapping_add(off)));
                    }
                    _mm512_storeu_ps(out.wrapping_add(off), r0);
                )*
            }
        };
    }

    /// The hot block: 12 pixels × 32 channels, its channel loop in assembly so the 24
    /// accumulators stay in registers at every optimisation level.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn k12x2(
        taps: &Taps,
        x0: usize,
        o0: usize,
        c: usize,
        co: usize,
        out: *mut f32,
        res: *const f32,
        bias: *const f32,
    ) {
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (z, z, z, z, z, z);
        let (mut a6, mut a7, mut a8, mut a9, mut a10, mut a11) = (z, z, z, z, z, z);
        let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5) = (z, z, z, z, z, z);
        let (mut b6, mut b7, mut b8, mut b9, mut b10, mut b11) = (z, z, z, z, z, z);
        let ps = taps.ps;
        let cs = ps * 4;
        for t in 0..taps.n {
            let p0 = taps.x[t].wrapping_add(x0 * ps);
            let wp = taps.w[t].wrapping_add(o0);
            // Pixel j of 12 sits at p0 + j·cs bytes (cs = 4·ps): bases p0, p0 + 4cs, p0 + 8cs,
            // each with offsets 0, cs, 2cs, 3cs.
            std::arch::asm!(
                "2:",
                "vmovups {w0}, zmmword ptr [{wp}]",
                "vmovups {w1}, zmmword ptr [{wp} + 64]",
                "vbroadcastss {t0}, dword ptr [{p0}]",
                "vfmadd231ps {a0}, {t0}, {w0}",
                "vfmadd231ps {b0}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p0} + {cs}]",
                "vfmadd231ps {a1}, {t1}, {w0}",
                "vfmadd231ps {b1}, {t1}, {w1}",
                "vbroadcastss {t0}, dword ptr [{p0} + {cs}*2]",
                "vfmadd231ps {a2}, {t0}, {w0}",
                "vfmadd231ps {b2}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p0} + {cs3}]",
                "vfmadd231ps {a3}, {t1}, {w0}",
                "vfmadd231ps {b3}, {t1}, {w1}",
                "vbroadcastss {t0}, dword ptr [{p1}]",
                "vfmadd231ps {a4}, {t0}, {w0}",
                "vfmadd231ps {b4}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p1} + {cs}]",
                "vfmadd231ps {a5}, {t1}, {w0}",
                "vfmadd231ps {b5}, {t1}, {w1}",
                "vbroadcastss {t0}, dword ptr [{p1} + {cs}*2]",
                "vfmadd231ps {a6}, {t0}, {w0}",
                "vfmadd231ps {b6}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p1} + {cs3}]",
                "vfmadd231ps {a7}, {t1}, {w0}",
                "vfmadd231ps {b7}, {t1}, {w1}",
                "vbroadcastss {t0}, dword ptr [{p2}]",
                "vfmadd231ps {a8}, {t0}, {w0}",
                "vfmadd231ps {b8}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p2} + {cs}]",
                "vfmadd231ps {a9}, {t1}, {w0}",
                "vfmadd231ps {b9}, {t1}, {w1}",
                "vbroadcastss {t0}, dword ptr [{p2} + {cs}*2]",
                "vfmadd231ps {a10}, {t0}, {w0}",
                "vfmadd231ps {b10}, {t0}, {w1}",
                "vbroadcastss {t1}, dword ptr [{p2} + {cs3}]",
                "vfmadd231ps {a11}, {t1}, {w0}",
                "vfmadd231ps {b11}, {t1}, {w1}",
                "add {p0}, 4",
                "add {p1}, 4",
                "add {p2}, 4",
                "add {wp}, {cos}",
                "dec {n}",
                "jnz 2b",
                p0 = inout(reg) p0 => _,
                p1 = inout(reg) p0.wrapping_add(4 * ps) => _,
                p2 = inout(reg) p0.wrapping_add(8 * ps) => _,
                wp = inout(reg) wp => _,
                n = inout(reg) c => _,
                cs = in(reg) cs,
                cs3 = in(reg) 3 * cs,
                cos = in(reg) co * 4,
                w0 = out(zmm_reg) _,
                w1 = out(zmm_reg) _,
                t0 = out(zmm_reg) _,
                t1 = out(zmm_reg) _,
                a0 = inout(zmm_reg) a0,
                a1 = inout(zmm_reg) a1,
                a2 = inout(zmm_reg) a2,
                a3 = inout(zmm_reg) a3,
                a4 = inout(zmm_reg) a4,
                a5 = inout(zmm_reg) a5,
                a6 = inout(zmm_reg) a6,
                a7 = inout(zmm_reg) a7,
                a8 = inout(zmm_reg) a8,
                a9 = inout(zmm_reg) a9,
                a10 = inout(zmm_reg) a10,
                a11 = inout(zmm_reg) a11,
                b0 = inout(zmm_reg) b0,
                b1 = inout(zmm_reg) b1,
                b2 = inout(zmm_reg) b2,
                b3 = inout(zmm_reg) b3,
                b4 = inout(zmm_reg) b4,
                b5 = inout(zmm_reg) b5,
                b6 = inout(zmm_reg) b6,
                b7 = inout(zmm_reg) b7,
                b8 = inout(zmm_reg) b8,
                b9 = inout(zmm_reg) b9,
                b10 = inout(zmm_reg) b10,
                b11 = inout(zmm_reg) b11,
                options(nostack, readonly),
            );
        }
        let acc = [
            (a0, b0),
            (a1, b1),
            (a2, b2),
            (a3, b3),
            (a4, b4),
            (a5, b5),
            (a6, b6),
            (a7, b7),
            (a8, b8),
            (a9, b9),
            (a10, b10),
            (a11, b11),
        ];
        let bias = bias.wrapping_add(o0);
        let (bv0, bv1) = (
            _mm512_loadu_ps(bias),
            _mm512_loadu_ps(bias.wrapping_add(16)),
        );
        for (j, (a, b)) in acc.into_iter().enumerate() {
            let off = (x0 + j) * co + o0;
            let mut r0 = _mm512_add_ps(a, bv0);
            let mut r1 = _mm512_add_ps(b, bv1);
            if !res.is_null() {
                r0 = _mm512_add_ps(r0, _mm512_loadu_ps(res.wrapping_add(off)));
                r1 = _mm512_add_ps(r1, _mm512_loadu_ps(res.wrapping_add(off + 16)));
            }
            _mm512_storeu_ps(out.wrapping_add(off), r0);
            _mm512_storeu_ps(out.wrapping_add(off + 16), r1);
        }
    }
    kernel_x1!(
        k12x1,
        [
            (a0, 0),
            (a1, 1),
            (a2, 2),
            (a3, 3),
            (a4, 4),
            (a5, 5),
            (a6, 6),
            (a7, 7),
            (a8, 8),
            (a9, 9),
            (a10, 10),
            (a11, 11)
        ]
    );
    kernel_x2!(k4x2, [(a0, b0, 0), (a1, b1, 1), (a2, b2, 2), (a3, b3, 3)]);
    kernel_x1!(k4x1, [(a0, 0), (a1, 1), (a2, 2), (a3, 3)]);
    kernel_x2!(k1x2, [(a0, b0, 0)]);
    kernel_x1!(k1x1, [(a0, 0)]);

    /// Output row `r` of the task's band (`orow`: `[W_out, Co]`).
    ///
    /// # Safety
    /// AVX-512F must be available; `ctx` must describe the scratch band and weights.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(ctx: &TaskCtx, r: usize, orow: &mut [f32], rrow: Option<&[f32]>) {
        let Geom {
            c,
            co,
            kt,
            ks,
            stride_s,
            ..
        } = ctx.g;
        let (wp, w_out) = (ctx.wp, ctx.w_out);
        let mut taps = Taps {
            n: 0,
            ps: stride_s * c,
            x: [std::ptr::null(); MAX_TAPS],
            w: [std::ptr::null(); MAX_TAPS],
        };
        for a in ctx.k0..kt {
            for dy in 0..ks {
                for dx in 0..ks {
                    let xo = (((a - ctx.k0) * ctx.band + r * stride_s + dy) * wp + dx) * c;
                    let wo = ((a * ks + dy) * ks + dx) * c * co;
                    taps.x[taps.n] = ctx.scratch.as_ptr().add(xo);
                    taps.w[taps.n] = ctx.taps.as_ptr().add(wo);
                    taps.n += 1;
                }
            }
        }
        let out = orow.as_mut_ptr();
        let res = rrow.map_or(std::ptr::null(), |rr| rr.as_ptr());
        let bias = ctx.bias.as_ptr();
        // Pixel blocks: 12 while they fit, then 4 (the last one shifted left to stay full, so
        // a few pixels are computed twice), or single pixels for rows narrower than 4.
        let mut x0 = 0;
        while x0 < w_out {
            let (np, xb) = if w_out - x0 >= 12 {
                (12, x0)
            } else if w_out >= 4 {
                (4, x0.min(w_out - 4))
            } else {
                (1, x0)
            };
            let mut o0 = 0;
            while o0 < co {
                let two = co - o0 >= 32;
                match (np, two) {
                    (12, true) => k12x2(&taps, xb, o0, c, co, out, res, bias),
                    (12, false) => k12x1(&taps, xb, o0, c, co, out, res, bias),
                    (4, true) => k4x2(&taps, xb, o0, c, co, out, res, bias),
                    (4, false) => k4x1(&taps, xb, o0, c, co, out, res, bias),
                    (_, true) => k1x2(&taps, xb, o0, c, co, out, res, bias),
                    (_, false) => k1x1(&taps, xb, o0, c, co, out, res, bias),
                }
                o0 += if two { 32 } else { 16 };
            }
            x0 += np;
        }
    }
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
    out.par_chunks_mut(px * c)
        .zip(xs.par_chunks(px * c))
        .for_each(|(o, s)| {
            for (op, sp) in o.chunks_mut(c).zip(s.chunks(c)) {
                let ss: f32 = sp.iter().map(|v| v * v).sum();
                let denom = ss.sqrt().max(1e-12);
                for ((ov, &sv), &gv) in op.iter_mut().zip(sp).zip(g) {
                    let v = sv / denom * gv;
                    *ov = v / (1.0 + (-v).exp());
                }
            }
        });
    Tensor::from_vec(out, x.dims(), &candle_core::Device::Cpu)
}
