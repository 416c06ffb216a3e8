//! x86-64 microkernels: AVX-512F and AVX2+FMA versions of the packed-GEMM microkernel
//! ([`AVX512`], [`AVX2`]) and the AVX2+FMA direct convolution of one output row
//! ([`conv_row_avx2`]; AVX-512 machines convolve with the `gemm` crate's implicit GEMM, measured
//! faster there than an AVX-512 direct row, see `conv.rs`). Each is compiled for its ISA with
//! `#[target_feature]` and only reached after the CPU was found to have it (the `Kernel`s carry
//! their check; the conv row checks on entry).
//!
//! Pure: `std::arch` only, no crate dependencies.

use std::arch::x86_64::*;

use super::gemm::{Init, Kernel};
use super::portable::ConvRow;

fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

// -------------------------------------------------------------------------------------------------
// GEMM microkernels.
// -------------------------------------------------------------------------------------------------

/// AVX-512: 12 rows of A × 32 output columns (24 zmm accumulators), `KC` = 256-deep slices,
/// `MC × NC` = 96 × 512 tiles.
pub static AVX512: Kernel = {
    // SAFETY: `gemm_avx512` honours the contract where AVX-512F is present.
    unsafe {
        Kernel::new(
            "avx512",
            12,
            32,
            256,
            8 * 12,
            16 * 32,
            gemm_avx512,
            has_avx512,
        )
    }
};

/// AVX2+FMA: 6 rows of A × 16 output columns (12 ymm accumulators, 2 for B, 1 broadcast),
/// `KC` = 256-deep slices, `MC × NC` = 96 × 256 tiles.
pub static AVX2: Kernel = {
    // SAFETY: `gemm_avx2` honours the contract where AVX2 and FMA are present.
    unsafe { Kernel::new("avx2", 6, 16, 256, 16 * 6, 16 * 16, gemm_avx2, has_avx2_fma) }
};

/// C[R, 32] (= or +=) A[R, kc] · B[kc, 32]. `a`: row stride `lda`; `b`: packed panel at the
/// slice start (stride 32 per k); `c`: row stride `ldc`; `m0`, `m1`: column masks.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512<const R: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    m0: __mmask16,
    m1: __mmask16,
) {
    const NR: usize = 32;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            let b0 = _mm512_maskz_loadu_ps(m0, bias);
            let b1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
            for row in acc.iter_mut() {
                *row = [b0, b1];
            }
        }
        Init::Load => {
            for (r, row) in acc.iter_mut().enumerate() {
                let cr = c.add(r * ldc);
                *row = [
                    _mm512_maskz_loadu_ps(m0, cr),
                    _mm512_maskz_loadu_ps(m1, cr.add(16)),
                ];
            }
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * NR);
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            row[0] = _mm512_fmadd_ps(av, b0, row[0]);
            row[1] = _mm512_fmadd_ps(av, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        _mm512_mask_storeu_ps(cr, m0, row[0]);
        _mm512_mask_storeu_ps(cr.add(16), m1, row[1]);
    }
}

/// The [`AVX512`] microkernel (the `MicroKernel` contract).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx512(
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
    let m0 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let m1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    macro_rules! k {
        ($r:literal) => {
            kernel_avx512::<$r>(kc, a, lda, b, c, ldc, init, m0, m1)
        };
    }
    match rows {
        12 => k!(12),
        11 => k!(11),
        10 => k!(10),
        9 => k!(9),
        8 => k!(8),
        7 => k!(7),
        6 => k!(6),
        5 => k!(5),
        4 => k!(4),
        3 => k!(3),
        2 => k!(2),
        1 => k!(1),
        _ => {}
    }
}

/// Lanes `0..n` of 8 set (for `_mm256_maskload_ps` / `_mm256_maskstore_ps`).
#[target_feature(enable = "avx2")]
unsafe fn mask8(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// C[R, 16] (= or +=) A[R, kc] · B[kc, 16], as [`kernel_avx512`] with 8-lane halves; `masks`
/// select the columns of a partial tile (plain loads and stores for a full one: masked
/// stores are slow on some CPUs).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2<const R: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    masks: Option<(__m256i, __m256i)>,
) {
    const NR: usize = 16;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            let b = load16_avx2(bias, masks);
            for row in acc.iter_mut() {
                *row = b;
            }
        }
        Init::Load => {
            for (r, row) in acc.iter_mut().enumerate() {
                *row = load16_avx2(c.add(r * ldc), masks);
            }
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * NR);
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        match masks {
            None => {
                _mm256_storeu_ps(cr, row[0]);
                _mm256_storeu_ps(cr.add(8), row[1]);
            }
            Some((m0, m1)) => {
                _mm256_maskstore_ps(cr, m0, row[0]);
                _mm256_maskstore_ps(cr.add(8), m1, row[1]);
            }
        }
    }
}

/// 16 floats from `p`: all (`masks` `None`), or the lanes the two masks select (others zero).
#[target_feature(enable = "avx2")]
unsafe fn load16_avx2(p: *const f32, masks: Option<(__m256i, __m256i)>) -> [__m256; 2] {
    match masks {
        None => [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))],
        Some((m0, m1)) => [_mm256_maskload_ps(p, m0), _mm256_maskload_ps(p.add(8), m1)],
    }
}

/// The [`AVX2`] microkernel (the `MicroKernel` contract).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
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
    let masks = (cols < 16).then(|| (mask8(cols), mask8(cols.saturating_sub(8))));
    macro_rules! k {
        ($r:literal) => {
            kernel_avx2::<$r>(kc, a, lda, b, c, ldc, init, masks)
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
// Direct convolution of one output row (channels-last; see `ConvRow`).
// -------------------------------------------------------------------------------------------------

/// Most taps (`kt·ks·ks`) the direct kernels take.
pub const MAX_TAPS: usize = 27;

/// Per-tap input pointers (at pixel 0 of the row band, channel 0) and weight pointers
/// (at input channel 0, output channel 0); `ps` is the input stride between output pixels.
struct Taps {
    n: usize,
    ps: usize,
    x: [*const f32; MAX_TAPS],
    w: [*const f32; MAX_TAPS],
}

impl Taps {
    /// Pointers of the taps of `p` (which `check`ed), at most [`MAX_TAPS`].
    fn new(p: &ConvRow) -> Self {
        assert!(
            p.taps.len() <= MAX_TAPS,
            "conv row: more than {MAX_TAPS} taps"
        );
        let mut taps = Taps {
            n: p.taps.len(),
            ps: p.ps,
            x: [std::ptr::null(); MAX_TAPS],
            w: [std::ptr::null(); MAX_TAPS],
        };
        for (t, &(tx, tw)) in p.taps.iter().enumerate() {
            taps.x[t] = p.x[tx..].as_ptr();
            taps.w[t] = p.w[tw..].as_ptr();
        }
        taps
    }
}

/// AVX2: a block of `NP` pixels from `x0` × `NV·8` channels from `o0` (`NP·NV` ymm
/// accumulators; 6 × 2 leaves 4 of the 16 registers for the weights and the broadcast).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2<const NP: usize, const NV: usize>(
    taps: &Taps,
    x0: usize,
    o0: usize,
    c: usize,
    co: usize,
    out: *mut f32,
    res: *const f32,
    bias: *const f32,
) {
    let ps = taps.ps;
    let mut acc = [[_mm256_setzero_ps(); NV]; NP];
    for t in 0..taps.n {
        let mut xp = taps.x[t].add(x0 * ps);
        let mut wp = taps.w[t].add(o0);
        for _ in 0..c {
            let mut wv = [_mm256_setzero_ps(); NV];
            for (v, w) in wv.iter_mut().enumerate() {
                *w = _mm256_loadu_ps(wp.add(8 * v));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xp.add(j * ps));
                for (av, &w) in a.iter_mut().zip(&wv) {
                    *av = _mm256_fmadd_ps(xv, w, *av);
                }
            }
            xp = xp.add(1);
            wp = wp.add(co);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let off = (x0 + j) * co + o0;
        for (v, &av) in a.iter().enumerate() {
            let mut r = _mm256_add_ps(av, _mm256_loadu_ps(bias.add(o0 + 8 * v)));
            if !res.is_null() {
                r = _mm256_add_ps(r, _mm256_loadu_ps(res.add(off + 8 * v)));
            }
            _mm256_storeu_ps(out.add(off + 8 * v), r);
        }
    }
}

/// The AVX2+FMA direct convolution of one row: blocks of 6 (or 1) pixels × 16 (or 8) output
/// channels. Needs `co % 8 == 0` and at most [`MAX_TAPS`] taps; panics otherwise, or when the
/// CPU lacks AVX2/FMA, or when `p` reads or writes out of bounds.
pub fn conv_row_avx2(p: &ConvRow, out: &mut [f32]) {
    assert!(
        has_avx2_fma(),
        "conv_row_avx2 on a CPU without AVX2 and FMA"
    );
    assert!(p.co.is_multiple_of(8), "conv_row_avx2: co % 8 != 0");
    p.check(out);
    let taps = Taps::new(p);
    // SAFETY: AVX2 and FMA are present and `check` bounded every access.
    unsafe { row_avx2(&taps, p, out) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(taps: &Taps, p: &ConvRow, orow: &mut [f32]) {
    let (c, co, w_out) = (p.c, p.co, p.w_out);
    let out = orow.as_mut_ptr();
    let res = p.res.map_or(std::ptr::null(), |rr| rr.as_ptr());
    let bias = p.bias.as_ptr();
    // Pixel blocks of 6, the last one shifted left to stay full (a few pixels computed twice),
    // or single pixels for rows narrower than 6.
    let mut x0 = 0;
    while x0 < w_out {
        let (np, xb) = if w_out >= 6 {
            (6, x0.min(w_out - 6))
        } else {
            (1, x0)
        };
        let mut o0 = 0;
        while o0 < co {
            let two = co - o0 >= 16;
            match (np, two) {
                (6, true) => block_avx2::<6, 2>(taps, xb, o0, c, co, out, res, bias),
                (6, false) => block_avx2::<6, 1>(taps, xb, o0, c, co, out, res, bias),
                (_, true) => block_avx2::<1, 2>(taps, xb, o0, c, co, out, res, bias),
                (_, false) => block_avx2::<1, 1>(taps, xb, o0, c, co, out, res, bias),
            }
            o0 += if two { 16 } else { 8 };
        }
        x0 += np;
    }
}
