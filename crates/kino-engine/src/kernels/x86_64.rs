//! x86-64 microkernels: AVX-512F and AVX2+FMA versions of the packed-GEMM microkernel
//! ([`AVX512`], [`AVX2`]); the VAE's conv runs on them too, as an implicit GEMM (`conv.rs`),
//! measured faster than the AVX-512 and AVX2 direct rows this file had before.
//! Each is compiled for its ISA with `#[target_feature]` and only reached after the CPU was
//! found to have it (the `Kernel`s carry their check).
//!
//! Pure: `std::arch` only, no crate dependencies.

use std::arch::x86_64::*;

use super::gemm::{Init, Kernel};

fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

// -------------------------------------------------------------------------------------------------
// GEMM microkernels.
// -------------------------------------------------------------------------------------------------

/// AVX-512: 8 rows of A × 48 output columns (24 zmm accumulators, 3 for B, 1 broadcast),
/// `KC` = 128-deep slices (a B panel slice is 24 KiB, half of Ice Lake's L1), `MC × NC` = 96 ×
/// 528 tiles. Until stop 54 the tile was 12 × 32 in 256-deep slices (93% of the FMA peak on a
/// Zen 4, where AVX-512 runs on 256-bit units); on an Ice Lake server core, whose loads cost
/// more, 8 broadcasts and 3 vector loads per 24 FMAs instead of 12 and 2 took 0.90–0.97 of the
/// 12 × 32 kernel's time in the 1.3B's linear layers (medians of interleaved pairs; README,
/// CPU kernels). Each element still sums its k in order: the result is the same to the bit.
pub static AVX512: Kernel = {
    // SAFETY: `gemm_avx512` honours the contract where AVX-512F is present.
    unsafe {
        Kernel::new(
            "avx512",
            8,
            48,
            128,
            12 * 8,
            11 * 48,
            gemm_avx512,
            has_avx512,
        )
    }
};

/// AVX2+FMA: 6 rows of A × 16 output columns (12 ymm accumulators, 2 for B, 1 broadcast),
/// `KC` = 512-deep slices, `MC × NC` = 96 × 256 tiles. The 6 × 16 tile does a quarter of the
/// AVX-512 tile's work per k, so a call's fixed cost (entry, C loaded and stored) weighs four
/// times as much at the same depth: 512 instead of 256 halves it (stop 39 on the Zen 4 box, the
/// feed-forward 5% faster in 7 of 8 interleaved rounds, the forward 3.5% in 5 of 6 pairs; the
/// result identical to the bit, since each element still sums its k in order).
pub static AVX2: Kernel = {
    // SAFETY: `gemm_avx2` honours the contract where AVX2 and FMA are present.
    unsafe { Kernel::new("avx2", 6, 16, 512, 16 * 6, 16 * 16, gemm_avx2, has_avx2_fma) }
};

/// Columns per AVX-512 panel: `V` vectors of 16.
const V512: usize = 3;

/// C[R, 16·V] (= or +=) A[R, kc] · B[kc, 16·V]. `a`: row stride `lda`; `b`: packed panel at the
/// slice start (stride 16·V per k); `c`: row stride `ldc`; `masks`: the columns of each vector.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    masks: [__mmask16; V],
) {
    let nr = 16 * V;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            let row: [__m512; V] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], bias.add(16 * v)));
            acc = [row; R];
        }
        Init::Load => {
            for (r, row) in acc.iter_mut().enumerate() {
                let cr = c.add(r * ldc);
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(masks[v], cr.add(16 * v));
                }
            }
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * nr);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            for (x, b) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, *b, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (v, x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(cr.add(16 * v), masks[v], *x);
        }
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
    let masks: [__mmask16; V512] = std::array::from_fn(|v| {
        let n = cols.saturating_sub(16 * v).min(16);
        ((1u32 << n) - 1) as u16
    });
    macro_rules! k {
        ($r:literal) => {
            kernel_avx512::<$r, V512>(kc, a, lda, b, c, ldc, init, masks)
        };
    }
    match rows {
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
