//! Portable kernels: plain Rust, no `std::arch`, no crate dependencies (slices in, slices out).
//! They are the reference the ISA paths are tested against, and the scalar code the element-wise
//! passes run everywhere (compiled per ISA by `multiversion!` in `mod.rs`, where the loops
//! auto-vectorize).
//!
//! This file compiles standalone (`neon_check.rs` includes it with `#[path]`).

use super::gemm::{Init, Kernel};

/// `exp(x)` in f32 without libm calls, so loops over it vectorize: Cephes' `expf` (range
/// reduction by ln 2, degree-6 polynomial), about 1 ulp; inputs are clamped to [-87.3, 88.7].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    f32::from_bits(e.to_bits().wrapping_add(n_bits << 23))
}

/// `2^y` in f32 without libm calls (loops over it vectorize): `y` rounded to an integer `n`
/// (added to the exponent) and `2^f` on the rest `f ∈ [−½, ½]` by a degree-6 polynomial
/// (least-squares fit of the relative error, under 1e-7 in f32); `y` below −125 is taken as −125
/// (2^−125 ≈ 2e-38: nothing beside the 1 of a softmax's maximum). Fewer operations than
/// [`exp_f32`] of `y·ln 2` when the factor `log₂ e` can be folded into a scale the caller applies
/// anyway (the attention's softmax).
#[inline(always)]
pub fn exp2_f32(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const C: [f32; 7] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_47,
        5.550_329e-2,
        9.618_52e-3,
        1.339_986e-3,
        1.533_757_7e-4,
    ];
    let y = if y < -125.0 { -125.0 } else { y };
    let y = if y > 127.0 { 127.0 } else { y };
    let t = y + MAGIC;
    let n = t - MAGIC;
    let f = y - n;
    let p = C[6]
        .mul_add(f, C[5])
        .mul_add(f, C[4])
        .mul_add(f, C[3])
        .mul_add(f, C[2])
        .mul_add(f, C[1])
        .mul_add(f, C[0]);
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(p.to_bits().wrapping_add(n_bits << 23))
}

/// GELU with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, written as
/// the identical `x · sigmoid(2·inner)`.
#[inline(always)]
pub fn gelu_tanh_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * inner))
}

/// Lanes of the partial maxima and sums in [`softmax_rows_unnormalized`].
const LANES: usize = 16;

/// Lanes of the f64 partial sums of [`modulated_layer_norm_row`]: two AVX-512 registers.
const F64_LANES: usize = 16;

/// Replaces each row of `rows` (`[r, m]`) by `exp((x - max(row))·scale)` and stores the row
/// sums in `sums[..r]`: a softmax of `scale·x` whose division by the sum is left to the caller.
#[inline(always)]
pub fn softmax_rows_unnormalized(rows: &mut [f32], m: usize, sums: &mut [f32], scale: f32) {
    for (row, sum) in rows.chunks_exact_mut(m).zip(sums.iter_mut()) {
        let max = row_max(row, f32::NEG_INFINITY);
        *sum = map_sum(row, |x| exp_f32((x - max) * scale));
    }
}

/// The largest of `init` and the values of `row` (in LANES partial maxima, so it vectorizes).
#[inline(always)]
fn row_max(row: &[f32], init: f32) -> f32 {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let mut max = init;
    for &v in mx.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    max
}

/// Replaces each value `x` of `row` by `f(x)` and returns their sum (in LANES partial sums, so it
/// vectorizes).
#[inline(always)]
fn map_sum(row: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = f(c[i]);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        let e = f(*v);
        *v = e;
        s += e;
    }
    s
}

/// One block of keys of an attention computed block by block ("online softmax", as flash
/// attention): `s` holds `rows` rows of `cols` scores `q·k` (row stride `ld`) for this block;
/// `max[r]` and `sum[r]` are row r's running maximum of `q·k` and its running sum of
/// `exp((q·k - max)·scale)` over the blocks before. Each score becomes `exp((x - max')·scale)`
/// with the new maximum `max'`, `sum` is brought to it, and `corr[r] = exp((max - max')·scale)`
/// is what the caller multiplies row r's accumulated output by before adding this block's.
#[inline(always)]
pub fn softmax_block_online(
    s: &mut [f32],
    ld: usize,
    cols: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    corr: &mut [f32],
) {
    // exp((x − max)·scale) = 2^((x − max)·c), c = scale·log₂ e (the difference first: x·c − max·c
    // in one FMA would lose the low bits of a large maximum, ~1e-6 of the result at 30).
    let c2 = scale * std::f32::consts::LOG2_E;
    for (r, ((m, l), c)) in max
        .iter_mut()
        .zip(sum.iter_mut())
        .zip(corr.iter_mut())
        .enumerate()
    {
        let row = &mut s[r * ld..r * ld + cols];
        let new_max = row_max(row, *m);
        let block_sum = map_sum(row, |x| exp2_f32((x - new_max) * c2));
        // The first block: nothing before it (max −∞), so nothing to bring along.
        let f = if *m == f32::NEG_INFINITY {
            0.0
        } else if *m == new_max {
            1.0
        } else {
            exp2_f32((*m - new_max) * c2)
        };
        *c = f;
        *l = *l * f + block_sum;
        *m = new_max;
    }
}

/// `row = gelu_tanh(row + bias)`.
#[inline(always)]
pub fn bias_gelu_row(row: &mut [f32], bias: &[f32]) {
    for (v, &b) in row.iter_mut().zip(bias) {
        *v = gelu_tanh_f32(*v + b);
    }
}

/// `row = gelu_tanh(row)`.
#[inline(always)]
pub fn gelu_row(row: &mut [f32]) {
    for v in row.iter_mut() {
        *v = gelu_tanh_f32(*v);
    }
}

/// `Σ f(v)` over `src` in f64, in [`F64_LANES`] partial sums (one running sum would be a chain
/// of dependent adds, slow and not vectorized).
#[inline(always)]
fn sum_f64(src: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; F64_LANES];
    let mut chunks = src.chunks_exact(F64_LANES);
    for ch in &mut chunks {
        for i in 0..F64_LANES {
            acc[i] += f(ch[i]);
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f64>()
}

/// LayerNorm without affine of `src` (mean and variance in f64), then `· (1 + scale) + shift`
/// when `one_plus`, else `· scale + shift`, into `out`.
#[inline(always)]
pub fn modulated_layer_norm_row(
    src: &[f32],
    scale: &[f32],
    shift: &[f32],
    eps: f64,
    one_plus: bool,
    out: &mut [f32],
) {
    let d = src.len();
    let mean = sum_f64(src, |v| v as f64) / d as f64;
    let var = sum_f64(src, |v| {
        let c = v as f64 - mean;
        c * c
    }) / d as f64;
    let rstd = (1.0 / (var + eps).sqrt()) as f32;
    let mean = mean as f32;
    if one_plus {
        for (((o, &v), &s), &t) in out.iter_mut().zip(src).zip(scale).zip(shift) {
            *o = ((v - mean) * rstd) * (1.0 + s) + t;
        }
    } else {
        for (((o, &v), &s), &t) in out.iter_mut().zip(src).zip(scale).zip(shift) {
            *o = ((v - mean) * rstd) * s + t;
        }
    }
}

/// `out = x + y · gate`.
#[inline(always)]
pub fn gated_residual_row(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
    for (((o, &a), &c), &g) in out.iter_mut().zip(x).zip(y).zip(gate) {
        *o = a + c * g;
    }
}

/// `Σ x²` over `row`, in LANES partial sums (a single running sum would be one long chain of
/// dependent adds, and would not vectorize).
#[inline(always)]
fn sum_squares(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            acc[i] += ch[i] * ch[i];
        }
    }
    let mut ss: f32 = acc.iter().sum();
    for v in chunks.remainder() {
        ss += v * v;
    }
    ss
}

/// `torch.nn.RMSNorm` (weight `w`) of the rows of `src` into `out`, `x · rsqrt(mean(x²) + eps)
/// · w`, each row then, when `cos` is not empty, rotated by diffusers' `apply_rotary_emb`
/// head by head (interleaved pairs: `(a, b) → (a·cos − b·sin, a·sin + b·cos)`); `cos` and
/// `sin` hold `half` values per row, the same for every head of the row (head size
/// `2 · half`).
#[inline(always)]
pub fn rms_norm_rope_rows(
    src: &[f32],
    w: &[f32],
    eps: f32,
    cos: &[f32],
    sin: &[f32],
    half: usize,
    out: &mut [f32],
) {
    let d = w.len();
    for (r, (op, sp)) in out.chunks_mut(d).zip(src.chunks(d)).enumerate() {
        let rstd = 1.0 / (sum_squares(sp) / d as f32 + eps).sqrt();
        for ((ov, &sv), &wv) in op.iter_mut().zip(sp).zip(w) {
            *ov = sv * rstd * wv;
        }
        if cos.is_empty() || half == 0 {
            continue;
        }
        let (c, s) = (
            &cos[r * half..(r + 1) * half],
            &sin[r * half..(r + 1) * half],
        );
        for head in op.chunks_exact_mut(2 * half) {
            for ((pair, &cv), &sv) in head.chunks_exact_mut(2).zip(c).zip(s) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cv - b * sv;
                pair[1] = a * sv + b * cv;
            }
        }
    }
}

/// `WanRMS_norm` + SiLU of the pixels (`c` channels each) of `src` into `out`:
/// `silu(x / max(‖x‖₂, 1e-12) · g)`.
#[inline(always)]
pub fn rms_norm_silu_rows(src: &[f32], g: &[f32], out: &mut [f32]) {
    let c = g.len();
    for (op, sp) in out.chunks_mut(c).zip(src.chunks(c)) {
        let denom = sum_squares(sp).sqrt().max(1e-12);
        for ((ov, &sv), &gv) in op.iter_mut().zip(sp).zip(g) {
            let v = sv / denom * gv;
            *ov = v / (1.0 + exp_f32(-v));
        }
    }
}

/// One row of Winograd F(2 × 2, 3 × 3)'s input transform: `dst = (x₁₁ + sj·x₁₂) + s·(x₂₁ +
/// sj·x₂₂)` channel by channel, the four input pixels `x` (one entry each of `Bᵀ` and `B` being
/// ±1 or 0: see `conv.rs`).
#[inline(always)]
pub fn winograd_input(dst: &mut [f32], x: [&[f32]; 4], s: f32, sj: f32) {
    let n = dst.len();
    // Sliced to the same length first, so the loop has no bounds checks and vectorizes.
    let [x11, x12, x21, x22] = x.map(|v| &v[..n]);
    for k in 0..n {
        dst[k] = (x11[k] + sj * x12[k]) + s * (x21[k] + sj * x22[k]);
    }
}

/// Winograd F(2 × 2, 3 × 3)'s output transform `Aᵀ M A` of one tile, channel by channel: `m` the
/// 16 products (ξ = 4u + v), `y` the 2 × 2 outputs (y₀₀, y₀₁, y₁₀, y₁₁), A = [[1, 0], [1, 1],
/// [1, −1], [0, −1]].
#[inline(always)]
pub fn winograd_output(m: [&[f32]; 16], y: [&mut [f32]; 4]) {
    let n = y[0].len();
    let m = m.map(|v| &v[..n]);
    let [y00, y01, y10, y11] = y.map(|v| &mut v[..n]);
    for o in 0..n {
        let s0 = |vi: usize| m[vi][o] + m[4 + vi][o] + m[8 + vi][o];
        let s1 = |vi: usize| m[4 + vi][o] - m[8 + vi][o] - m[12 + vi][o];
        let (a0, a1, a2, a3) = (s0(0), s0(1), s0(2), s0(3));
        let (b0, b1, b2, b3) = (s1(0), s1(1), s1(2), s1(3));
        y00[o] = a0 + a1 + a2;
        y01[o] = a1 - a2 - a3;
        y10[o] = b0 + b1 + b2;
        y11[o] = b1 - b2 - b3;
    }
}

/// An IEEE half-precision float (its bits) as f32, exactly (subnormals, infinities and NaNs
/// included; a NaN comes back quiet).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // Zero or subnormal: man · 2⁻²⁴, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        31 if man == 0 => f32::from_bits(sign | 0x7f80_0000),
        31 => f32::from_bits(sign | 0x7fc0_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// GGUF's Q8_0 blocks (34 bytes: a little-endian f16 scale, then 32 × i8) expanded into `out`,
/// 32 floats per block: `scale · q`.
pub fn dequantize_q8_0(raw: &[u8], out: &mut [f32]) {
    for (ob, rb) in out.chunks_exact_mut(32).zip(raw.chunks_exact(34)) {
        let d = f16_to_f32(u16::from_le_bytes([rb[0], rb[1]]));
        for (v, &b) in ob.iter_mut().zip(&rb[2..]) {
            *v = d * f32::from(b as i8);
        }
    }
}

// -------------------------------------------------------------------------------------------------
// GEMM microkernel (the reference for the ISA ones).
// -------------------------------------------------------------------------------------------------

const MR: usize = 4;
const NR: usize = 8;

/// The portable microkernel: `MR` = 4 rows × `NR` = 8 columns, scalar code.
pub static KERNEL: Kernel = {
    fn always() -> bool {
        true
    }
    // SAFETY: `kernel` uses no instructions beyond the baseline target.
    unsafe { Kernel::new("portable", MR, NR, 256, 16 * MR, 32 * NR, kernel, always) }
};

/// C[rows, cols] (= or +=) A[rows, kc] · B[kc, cols]; the contract of [`Kernel`].
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
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
    let mut acc = [[0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(rows) {
        for (j, v) in row.iter_mut().enumerate().take(cols) {
            *v = match init {
                Init::Zero => 0.0,
                Init::Bias(bias) => *bias.add(j),
                Init::Load => *c.add(r * ldc + j),
            };
        }
    }
    for kk in 0..kc {
        let bp = b.add(kk * NR);
        for (r, row) in acc.iter_mut().enumerate().take(rows) {
            let av = *a.add(r * lda + kk);
            for (j, v) in row.iter_mut().enumerate() {
                *v += av * *bp.add(j);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (j, &v) in row.iter().enumerate().take(cols) {
            *c.add(r * ldc + j) = v;
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Direct convolution of one output row (the reference for the ISA ones).
// -------------------------------------------------------------------------------------------------

/// One output row of a direct convolution on channels-last data: output pixel `p`, channel `o`
/// is `bias[o] + Σ_taps Σ_ci x[tx + p·ps + ci] · w[tw + ci·co + o] (+ res[p·co + o])`, for each
/// tap `(tx, tw)` of `taps` (offsets into `x` and `w`).
pub struct ConvRow<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub taps: &'a [(usize, usize)],
    /// Input stride between output pixels (stride · channels).
    pub ps: usize,
    /// Input and output channels, output pixels.
    pub c: usize,
    pub co: usize,
    pub w_out: usize,
    pub bias: &'a [f32],
    pub res: Option<&'a [f32]>,
}

impl ConvRow<'_> {
    /// Panics unless every read of the row and the write of `out` are in bounds (the ISA
    /// kernels then read through raw pointers).
    pub fn check(&self, out: &[f32]) {
        let n = self.w_out * self.co;
        assert!(self.c > 0 && self.co > 0, "conv row: empty channels");
        assert!(out.len() >= n, "conv row: output too short");
        assert!(self.bias.len() >= self.co, "conv row: bias too short");
        assert!(
            self.res.is_none_or(|r| r.len() >= n),
            "conv row: residual too short"
        );
        for &(tx, tw) in self.taps {
            let last_x = tx + self.w_out.saturating_sub(1) * self.ps + self.c;
            assert!(last_x <= self.x.len(), "conv row: input out of bounds");
            assert!(
                tw + self.c * self.co <= self.w.len(),
                "conv row: weights out of bounds"
            );
        }
    }
}

/// The portable direct convolution of one row (any channel counts).
pub fn conv_row(p: &ConvRow, out: &mut [f32]) {
    p.check(out);
    let (c, co) = (p.c, p.co);
    let mut acc = vec![0f32; co];
    for px in 0..p.w_out {
        acc.fill(0.0);
        for &(tx, tw) in p.taps {
            let xs = &p.x[tx + px * p.ps..][..c];
            for (ci, &xv) in xs.iter().enumerate() {
                let ws = &p.w[tw + ci * co..][..co];
                for (a, &wv) in acc.iter_mut().zip(ws) {
                    *a += xv * wv;
                }
            }
        }
        let o = &mut out[px * co..][..co];
        for ((ov, &a), &b) in o.iter_mut().zip(&acc).zip(p.bias) {
            *ov = a + b;
        }
        if let Some(r) = p.res {
            for (ov, &rv) in o.iter_mut().zip(&r[px * co..][..co]) {
                *ov += rv;
            }
        }
    }
}
