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
/// Since stop 56 the full tile's k loop is assembly ([`k_steps_8x48`]) and the packed panels
/// start on cache lines (`gemm.rs`).
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
/// slice start (stride 48 per k: the first `V` of its 3 vectors are used); `c`: row stride
/// `ldc`; `masks`: the columns of each vector.
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
    let mut k0 = 0;
    if R == 8 && V == 3 && kc >= 4 && asm_on() {
        // SAFETY: the same type (R = 8, V = 3); AVX-512F is enabled here; the caller's A and
        // B cover `kc` k.
        let acc8 = &mut *(&mut acc as *mut [[__m512; V]; R] as *mut [[__m512; 3]; 8]);
        k_steps_8x48(kc / 4, a, lda, b, acc8);
        k0 = kc / 4 * 4;
    }
    k_loop_avx512(k0..kc, a, lda, b, &mut acc);
    for (r, row) in acc.iter().enumerate() {
        let cr = c.add(r * ldc);
        for (v, x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(cr.add(16 * v), masks[v], *x);
        }
    }
}

/// `acc += A[.., ks] · B[ks, ..]` one k at a time (the tile's loop wherever the assembly
/// below does not run, and its tail).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn k_loop_avx512<const R: usize, const V: usize>(
    ks: std::ops::Range<usize>,
    a: *const f32,
    lda: usize,
    b: *const f32,
    acc: &mut [[__m512; V]; R],
) {
    for kk in ks {
        let bp = b.add(kk * 16 * V512);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            for (x, b) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, *b, *x);
            }
        }
    }
}

/// The k loop of the full 8 × 48 tile, four k a step, in assembly: the compiler's version of
/// [`kernel_avx512`]'s loop spends 8–10 integer instructions a k on A's row addresses (each
/// row's pointer moved on its own), and on an Intel core they take turns with the FMAs on the
/// vector ports. Here the 8 rows are two base pointers with `lda` and `3·lda` as index
/// registers and the four k displacements: 5 integer instructions per 4 k. The same FMAs in
/// the same order as the Rust loop: the result is the same to the bit.
///
/// # Safety
/// AVX-512F; `a` has 8 rows `lda` apart and `b` a packed panel of 48 floats per k, each
/// readable for `4 · steps` k; `steps ≥ 1`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn k_steps_8x48(
    steps: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    acc: &mut [[__m512; 3]; 8],
) {
    let l = lda * 4;
    std::arch::asm!(
            "2:",
            "vmovups {b0}, zmmword ptr [{bp}+0]",
            "vmovups {b1}, zmmword ptr [{bp}+64]",
            "vmovups {b2}, zmmword ptr [{bp}+128]",
            "vbroadcastss {t0}, dword ptr [{a0}+0]",
            "vfmadd231ps {c00}, {b0}, {t0}",
            "vfmadd231ps {c01}, {b1}, {t0}",
            "vfmadd231ps {c02}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l}+0]",
            "vfmadd231ps {c10}, {b0}, {t1}",
            "vfmadd231ps {c11}, {b1}, {t1}",
            "vfmadd231ps {c12}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a0}+{l}*2+0]",
            "vfmadd231ps {c20}, {b0}, {t0}",
            "vfmadd231ps {c21}, {b1}, {t0}",
            "vfmadd231ps {c22}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l3}+0]",
            "vfmadd231ps {c30}, {b0}, {t1}",
            "vfmadd231ps {c31}, {b1}, {t1}",
            "vfmadd231ps {c32}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+0]",
            "vfmadd231ps {c40}, {b0}, {t0}",
            "vfmadd231ps {c41}, {b1}, {t0}",
            "vfmadd231ps {c42}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l}+0]",
            "vfmadd231ps {c50}, {b0}, {t1}",
            "vfmadd231ps {c51}, {b1}, {t1}",
            "vfmadd231ps {c52}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+{l}*2+0]",
            "vfmadd231ps {c60}, {b0}, {t0}",
            "vfmadd231ps {c61}, {b1}, {t0}",
            "vfmadd231ps {c62}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l3}+0]",
            "vfmadd231ps {c70}, {b0}, {t1}",
            "vfmadd231ps {c71}, {b1}, {t1}",
            "vfmadd231ps {c72}, {b2}, {t1}",
            "vmovups {b0}, zmmword ptr [{bp}+192]",
            "vmovups {b1}, zmmword ptr [{bp}+256]",
            "vmovups {b2}, zmmword ptr [{bp}+320]",
            "vbroadcastss {t0}, dword ptr [{a0}+4]",
            "vfmadd231ps {c00}, {b0}, {t0}",
            "vfmadd231ps {c01}, {b1}, {t0}",
            "vfmadd231ps {c02}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l}+4]",
            "vfmadd231ps {c10}, {b0}, {t1}",
            "vfmadd231ps {c11}, {b1}, {t1}",
            "vfmadd231ps {c12}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a0}+{l}*2+4]",
            "vfmadd231ps {c20}, {b0}, {t0}",
            "vfmadd231ps {c21}, {b1}, {t0}",
            "vfmadd231ps {c22}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l3}+4]",
            "vfmadd231ps {c30}, {b0}, {t1}",
            "vfmadd231ps {c31}, {b1}, {t1}",
            "vfmadd231ps {c32}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+4]",
            "vfmadd231ps {c40}, {b0}, {t0}",
            "vfmadd231ps {c41}, {b1}, {t0}",
            "vfmadd231ps {c42}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l}+4]",
            "vfmadd231ps {c50}, {b0}, {t1}",
            "vfmadd231ps {c51}, {b1}, {t1}",
            "vfmadd231ps {c52}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+{l}*2+4]",
            "vfmadd231ps {c60}, {b0}, {t0}",
            "vfmadd231ps {c61}, {b1}, {t0}",
            "vfmadd231ps {c62}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l3}+4]",
            "vfmadd231ps {c70}, {b0}, {t1}",
            "vfmadd231ps {c71}, {b1}, {t1}",
            "vfmadd231ps {c72}, {b2}, {t1}",
            "vmovups {b0}, zmmword ptr [{bp}+384]",
            "vmovups {b1}, zmmword ptr [{bp}+448]",
            "vmovups {b2}, zmmword ptr [{bp}+512]",
            "vbroadcastss {t0}, dword ptr [{a0}+8]",
            "vfmadd231ps {c00}, {b0}, {t0}",
            "vfmadd231ps {c01}, {b1}, {t0}",
            "vfmadd231ps {c02}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l}+8]",
            "vfmadd231ps {c10}, {b0}, {t1}",
            "vfmadd231ps {c11}, {b1}, {t1}",
            "vfmadd231ps {c12}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a0}+{l}*2+8]",
            "vfmadd231ps {c20}, {b0}, {t0}",
            "vfmadd231ps {c21}, {b1}, {t0}",
            "vfmadd231ps {c22}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l3}+8]",
            "vfmadd231ps {c30}, {b0}, {t1}",
            "vfmadd231ps {c31}, {b1}, {t1}",
            "vfmadd231ps {c32}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+8]",
            "vfmadd231ps {c40}, {b0}, {t0}",
            "vfmadd231ps {c41}, {b1}, {t0}",
            "vfmadd231ps {c42}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l}+8]",
            "vfmadd231ps {c50}, {b0}, {t1}",
            "vfmadd231ps {c51}, {b1}, {t1}",
            "vfmadd231ps {c52}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+{l}*2+8]",
            "vfmadd231ps {c60}, {b0}, {t0}",
            "vfmadd231ps {c61}, {b1}, {t0}",
            "vfmadd231ps {c62}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l3}+8]",
            "vfmadd231ps {c70}, {b0}, {t1}",
            "vfmadd231ps {c71}, {b1}, {t1}",
            "vfmadd231ps {c72}, {b2}, {t1}",
            "vmovups {b0}, zmmword ptr [{bp}+576]",
            "vmovups {b1}, zmmword ptr [{bp}+640]",
            "vmovups {b2}, zmmword ptr [{bp}+704]",
            "vbroadcastss {t0}, dword ptr [{a0}+12]",
            "vfmadd231ps {c00}, {b0}, {t0}",
            "vfmadd231ps {c01}, {b1}, {t0}",
            "vfmadd231ps {c02}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l}+12]",
            "vfmadd231ps {c10}, {b0}, {t1}",
            "vfmadd231ps {c11}, {b1}, {t1}",
            "vfmadd231ps {c12}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a0}+{l}*2+12]",
            "vfmadd231ps {c20}, {b0}, {t0}",
            "vfmadd231ps {c21}, {b1}, {t0}",
            "vfmadd231ps {c22}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a0}+{l3}+12]",
            "vfmadd231ps {c30}, {b0}, {t1}",
            "vfmadd231ps {c31}, {b1}, {t1}",
            "vfmadd231ps {c32}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+12]",
            "vfmadd231ps {c40}, {b0}, {t0}",
            "vfmadd231ps {c41}, {b1}, {t0}",
            "vfmadd231ps {c42}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l}+12]",
            "vfmadd231ps {c50}, {b0}, {t1}",
            "vfmadd231ps {c51}, {b1}, {t1}",
            "vfmadd231ps {c52}, {b2}, {t1}",
            "vbroadcastss {t0}, dword ptr [{a4}+{l}*2+12]",
            "vfmadd231ps {c60}, {b0}, {t0}",
            "vfmadd231ps {c61}, {b1}, {t0}",
            "vfmadd231ps {c62}, {b2}, {t0}",
            "vbroadcastss {t1}, dword ptr [{a4}+{l3}+12]",
            "vfmadd231ps {c70}, {b0}, {t1}",
            "vfmadd231ps {c71}, {b1}, {t1}",
            "vfmadd231ps {c72}, {b2}, {t1}",
            "add {a0}, 16",
            "add {a4}, 16",
            "add {bp}, 768",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a => _,
            a4 = inout(reg) a.wrapping_add(4 * lda) => _,
            l = in(reg) l,
            l3 = in(reg) 3 * l,
            bp = inout(reg) b => _,
            n = inout(reg) steps => _,
            b0 = out(zmm_reg) _,
            b1 = out(zmm_reg) _,
            b2 = out(zmm_reg) _,
            t0 = out(zmm_reg) _,
            t1 = out(zmm_reg) _,
            c00 = inout(zmm_reg) acc[0][0],
            c01 = inout(zmm_reg) acc[0][1],
            c02 = inout(zmm_reg) acc[0][2],
            c10 = inout(zmm_reg) acc[1][0],
            c11 = inout(zmm_reg) acc[1][1],
            c12 = inout(zmm_reg) acc[1][2],
            c20 = inout(zmm_reg) acc[2][0],
            c21 = inout(zmm_reg) acc[2][1],
            c22 = inout(zmm_reg) acc[2][2],
            c30 = inout(zmm_reg) acc[3][0],
            c31 = inout(zmm_reg) acc[3][1],
            c32 = inout(zmm_reg) acc[3][2],
            c40 = inout(zmm_reg) acc[4][0],
            c41 = inout(zmm_reg) acc[4][1],
            c42 = inout(zmm_reg) acc[4][2],
            c50 = inout(zmm_reg) acc[5][0],
            c51 = inout(zmm_reg) acc[5][1],
            c52 = inout(zmm_reg) acc[5][2],
            c60 = inout(zmm_reg) acc[6][0],
            c61 = inout(zmm_reg) acc[6][1],
            c62 = inout(zmm_reg) acc[6][2],
            c70 = inout(zmm_reg) acc[7][0],
            c71 = inout(zmm_reg) acc[7][1],
            c72 = inout(zmm_reg) acc[7][2],
            options(nostack, readonly),
    );
}

/// Whether the full tile's k loop runs in assembly ([`k_steps_8x48`]); `KINO_GEMM_ASM=0` runs
/// the compiler's loop instead, to compare the two on another CPU (the result is the same).
fn asm_on() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *P.get_or_init(|| std::env::var("KINO_GEMM_ASM").map_or(true, |v| v != "0"))
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
    // A partial panel runs only the vectors that hold its columns: a head dimension of 128 is
    // panels of 48, 48 and 32, and the last one's third vector would multiply padding.
    match cols.div_ceil(16) {
        3 => rows_avx512::<V512>(rows, kc, a, lda, b, c, ldc, init, cols),
        2 => rows_avx512::<2>(rows, kc, a, lda, b, c, ldc, init, cols),
        1 => rows_avx512::<1>(rows, kc, a, lda, b, c, ldc, init, cols),
        _ => {}
    }
}

/// [`gemm_avx512`] for tiles of `V` vectors.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512<const V: usize>(
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
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let n = cols.saturating_sub(16 * v).min(16);
        ((1u32 << n) - 1) as u16
    });
    macro_rules! k {
        ($r:literal) => {
            kernel_avx512::<$r, V>(kc, a, lda, b, c, ldc, init, masks)
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

#[cfg(test)]
mod asm_loops {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The assembly k loop (and its Rust tail) gives every accumulator the same bits as the
    /// Rust loop, at depths that are and are not multiples of the four-k step.
    #[test]
    fn the_assembly_k_loop_equals_the_rust_loop_to_the_bit() {
        for kc in [4usize, 13, 128, 131] {
            let lda = kc + 5;
            if has_avx512() {
                let a = data(8 * lda, 1);
                let b = data(kc * 48, 2);
                let start = data(8 * 48, 3);
                // SAFETY: AVX-512F is present; A has 8 rows of `kc`, B `kc` × 48.
                let (want, got) = unsafe {
                    let init: [[__m512; 3]; 8] = std::array::from_fn(|r| {
                        std::array::from_fn(|v| _mm512_loadu_ps(start[r * 48 + 16 * v..].as_ptr()))
                    });
                    let mut want = init;
                    k_loop_avx512(0..kc, a.as_ptr(), lda, b.as_ptr(), &mut want);
                    let mut got = init;
                    k_steps_8x48(kc / 4, a.as_ptr(), lda, b.as_ptr(), &mut got);
                    k_loop_avx512(kc / 4 * 4..kc, a.as_ptr(), lda, b.as_ptr(), &mut got);
                    let bits = |x: [[__m512; 3]; 8]| -> Vec<u32> {
                        x.iter()
                            .flatten()
                            .flat_map(|v| std::mem::transmute::<__m512, [u32; 16]>(*v))
                            .collect()
                    };
                    (bits(want), bits(got))
                };
                assert_eq!(want, got, "avx512, kc {kc}");
            }
        }
    }
}
