//! aarch64 NEON microkernels: the packed-GEMM microkernel ([`NEON`]) and the direct
//! convolution of one output row ([`conv_row_neon`]). NEON (Advanced SIMD) is part of the
//! aarch64 baseline; the functions still check for it at run time before running.
//!
//! Pure: `std::arch` only, no crate dependencies. Tested under emulation by `neon_check.rs`
//! (`scripts/test-neon.sh`).

use std::arch::aarch64::*;

use super::gemm::{Init, Kernel};
use super::portable::ConvRow;

fn has_neon() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

// -------------------------------------------------------------------------------------------------
// GEMM microkernel.
// -------------------------------------------------------------------------------------------------

const NR: usize = 16;

/// NEON: 6 rows of A × 16 output columns (24 of the 32 q registers as accumulators, 4 for B,
/// 1 broadcast), `KC` = 256-deep slices, `MC × NC` = 96 × 256 tiles.
pub static NEON: Kernel = {
    // SAFETY: `gemm_neon` honours the contract where NEON is present.
    unsafe { Kernel::new("neon", 6, NR, 256, 16 * 6, 16 * NR, gemm_neon, has_neon) }
};

/// 16 floats from `p`, of which only `cols` are read (the rest zero).
#[target_feature(enable = "neon")]
unsafe fn load16(p: *const f32, cols: usize) -> [float32x4_t; 4] {
    if cols >= NR {
        return [
            vld1q_f32(p),
            vld1q_f32(p.add(4)),
            vld1q_f32(p.add(8)),
            vld1q_f32(p.add(12)),
        ];
    }
    let mut tmp = [0f32; NR];
    std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), cols);
    let t = tmp.as_ptr();
    [
        vld1q_f32(t),
        vld1q_f32(t.add(4)),
        vld1q_f32(t.add(8)),
        vld1q_f32(t.add(12)),
    ]
}

/// Stores the first `cols` of 16 floats at `p`.
#[target_feature(enable = "neon")]
unsafe fn store16(p: *mut f32, v: &[float32x4_t; 4], cols: usize) {
    if cols >= NR {
        for (q, &x) in v.iter().enumerate() {
            vst1q_f32(p.add(4 * q), x);
        }
        return;
    }
    let mut tmp = [0f32; NR];
    for (q, &x) in v.iter().enumerate() {
        vst1q_f32(tmp.as_mut_ptr().add(4 * q), x);
    }
    std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, cols);
}

/// C[R, 16] (= or +=) A[R, kc] · B[kc, 16].
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_neon<const R: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    cols: usize,
) {
    let mut acc = [[vdupq_n_f32(0.0); 4]; R];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            let bv = load16(bias, cols);
            for row in acc.iter_mut() {
                *row = bv;
            }
        }
        Init::Load => {
            for (r, row) in acc.iter_mut().enumerate() {
                *row = load16(c.add(r * ldc), cols);
            }
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * NR);
        let bv = [
            vld1q_f32(bp),
            vld1q_f32(bp.add(4)),
            vld1q_f32(bp.add(8)),
            vld1q_f32(bp.add(12)),
        ];
        for (r, row) in acc.iter_mut().enumerate() {
            let av = vdupq_n_f32(*a.add(r * lda + kk));
            for (x, &w) in row.iter_mut().zip(&bv) {
                *x = vfmaq_f32(*x, av, w);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        store16(c.add(r * ldc), row, cols);
    }
}

/// The [`NEON`] microkernel (the `MicroKernel` contract).
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_neon(
    rows: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    cols: usize,
) {
    macro_rules! k {
        ($r:literal) => {
            kernel_neon::<$r>(kc, a, lda, b, c, ldc, init, cols)
        };
    }
    match rows {
        6 => k!(6),
        5 => k!(5),
        4 => k!(4),
        3 => k!(3),
        2 => k!(2),
        1 => k!(1),
        _ => {}
    }
}

// -------------------------------------------------------------------------------------------------
// Direct convolution of one output row.
// -------------------------------------------------------------------------------------------------

/// A block of `NP` pixels from `x0` × `NV·4` channels from `o0` (`NP·NV` q accumulators).
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_neon<const NP: usize, const NV: usize>(
    p: &ConvRow,
    x0: usize,
    o0: usize,
    out: *mut f32,
    res: *const f32,
) {
    let (ps, c, co) = (p.ps, p.c, p.co);
    let mut acc = [[vdupq_n_f32(0.0); NV]; NP];
    for &(tx, tw) in p.taps {
        let mut xp = p.x.as_ptr().add(tx + x0 * ps);
        let mut wp = p.w.as_ptr().add(tw + o0);
        for _ in 0..c {
            let mut wv = [vdupq_n_f32(0.0); NV];
            for (v, w) in wv.iter_mut().enumerate() {
                *w = vld1q_f32(wp.add(4 * v));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = vdupq_n_f32(*xp.add(j * ps));
                for (av, &w) in a.iter_mut().zip(&wv) {
                    *av = vfmaq_f32(*av, xv, w);
                }
            }
            xp = xp.add(1);
            wp = wp.add(co);
        }
    }
    let bias = p.bias.as_ptr();
    for (j, a) in acc.iter().enumerate() {
        let off = (x0 + j) * co + o0;
        for (v, &av) in a.iter().enumerate() {
            let mut r = vaddq_f32(av, vld1q_f32(bias.add(o0 + 4 * v)));
            if !res.is_null() {
                r = vaddq_f32(r, vld1q_f32(res.add(off + 4 * v)));
            }
            vst1q_f32(out.add(off + 4 * v), r);
        }
    }
}

/// The NEON direct convolution of one row: blocks of 6 (or 1) pixels × 16 (or 4) output
/// channels. Needs `co % 4 == 0`; panics otherwise, or when `p` reads or writes out of bounds.
pub fn conv_row_neon(p: &ConvRow, out: &mut [f32]) {
    assert!(has_neon(), "conv_row_neon on a CPU without NEON");
    assert!(p.co.is_multiple_of(4), "conv_row_neon: co % 4 != 0");
    p.check(out);
    // SAFETY: NEON is present and `check` bounded every access.
    unsafe { row_neon(p, out) }
}

#[target_feature(enable = "neon")]
unsafe fn row_neon(p: &ConvRow, orow: &mut [f32]) {
    let (co, w_out) = (p.co, p.w_out);
    let out = orow.as_mut_ptr();
    let res = p.res.map_or(std::ptr::null(), |rr| rr.as_ptr());
    // Pixel blocks of 6, the last one shifted left to stay full, or single pixels for rows
    // narrower than 6.
    let mut x0 = 0;
    while x0 < w_out {
        let (np, xb) = if w_out >= 6 {
            (6, x0.min(w_out - 6))
        } else {
            (1, x0)
        };
        let mut o0 = 0;
        while o0 < co {
            let wide = co - o0 >= 16;
            match (np, wide) {
                (6, true) => block_neon::<6, 4>(p, xb, o0, out, res),
                (6, false) => block_neon::<6, 1>(p, xb, o0, out, res),
                (_, true) => block_neon::<1, 4>(p, xb, o0, out, res),
                (_, false) => block_neon::<1, 1>(p, xb, o0, out, res),
            }
            o0 += if wide { 16 } else { 4 };
        }
        x0 += np;
    }
}
