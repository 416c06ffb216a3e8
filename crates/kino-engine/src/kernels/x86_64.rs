//! x86-64 microkernels: AVX-512F and AVX2+FMA versions of the packed-GEMM microkernel
//! ([`AVX512`], [`AVX2`]) and of the direct convolution of one output row
//! ([`conv_row_avx512`], [`conv_row_avx2`]). Each is compiled for its ISA with
//! `#[target_feature]` and only reached after the CPU was found to have it (the `Kernel`s carry
//! their check; the conv rows check on entry).
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

/// The AVX-512 direct convolution of one row: blocks of 12 (or 4, or 1) pixels × 32 (or 16)
/// output channels. Needs `co % 16 == 0` and at most [`MAX_TAPS`] taps; panics otherwise, or
/// when the CPU lacks AVX-512F, or when `p` reads or writes out of bounds.
pub fn conv_row_avx512(p: &ConvRow, out: &mut [f32]) {
    assert!(has_avx512(), "conv_row_avx512 on a CPU without AVX-512F");
    assert!(p.co.is_multiple_of(16), "conv_row_avx512: co % 16 != 0");
    p.check(out);
    let taps = Taps::new(p);
    // SAFETY: AVX-512F is present and `check` bounded every access.
    unsafe { row_avx512(&taps, p, out) }
}

#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(taps: &Taps, p: &ConvRow, orow: &mut [f32]) {
    let (c, co, w_out) = (p.c, p.co, p.w_out);
    let out = orow.as_mut_ptr();
    let res = p.res.map_or(std::ptr::null(), |rr| rr.as_ptr());
    let bias = p.bias.as_ptr();
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
                (12, true) => k12x2(taps, xb, o0, c, co, out, res, bias),
                (12, false) => k12x1(taps, xb, o0, c, co, out, res, bias),
                (4, true) => k4x2(taps, xb, o0, c, co, out, res, bias),
                (4, false) => k4x1(taps, xb, o0, c, co, out, res, bias),
                (_, true) => k1x2(taps, xb, o0, c, co, out, res, bias),
                (_, false) => k1x1(taps, xb, o0, c, co, out, res, bias),
            }
            o0 += if two { 32 } else { 16 };
        }
        x0 += np;
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
