//! Every ISA path this CPU has against the portable one, and the `KINO_CPU_ISA` selection.
//! (The NEON paths are checked by `neon_check.rs` under emulation, `scripts/test-neon.sh`.)

use super::gemm::{self, PackedB};
use super::portable::{self, ConvRow};
use super::*;

/// Deterministic pseudo-random floats in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// The x86 ISAs with their own kernels that this CPU runs.
fn simd_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|&i| i != Isa::Portable && i.supported())
        .collect()
}

/// Plain triple loop `A[m, k] · W[n, k]ᵀ + bias`, in f64.
fn naive_matmul(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j] as f64);
            for kk in 0..k {
                s += a[i * k + kk] as f64 * w[j * k + kk] as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[test]
fn gemm_kernels_match_portable() {
    let isas = simd_isas();
    println!("ISA paths tested here: {isas:?}");
    // Sizes off every block: rows not a multiple of MR or MC, columns not a multiple of NR or
    // NC, depths below, at and above KC (AVX-512's 128, portable's 256, AVX2's 512) and not
    // multiples of it; with and without bias.
    for (m, n, k, bias) in [
        (1, 1, 1, false),
        (5, 7, 3, true),
        (13, 33, 300, true),
        (37, 70, 257, false),
        (100, 530, 520, true),
        (7, 17, 256, true),
        // Partial tiles of every width: 13, 29 and 12 columns past the last full panel.
        (9, 45, 40, true),
        (3, 29, 17, false),
        (8, 60, 300, true),
        (11, 40, 512, false),
        (14, 19, 1030, true),
    ] {
        let a = rand_vec(m * k, 1);
        let w = rand_vec(n * k, 2);
        let b = rand_vec(n, 3);
        let bias = bias.then_some(&b[..]);
        let reference = naive_matmul(&a, &w, bias, m, n, k);
        let port = PackedB::from_rows(&portable::KERNEL, &w, n, k, k);
        let out = gemm::matmul_serial(&a, m, &port, bias);
        let err = max_rel_diff(&out, &reference);
        assert!(err < 1e-5, "portable ({m}, {n}, {k}): {err}");
        for &isa in &isas {
            let kernel = gemm_kernel(isa).expect("a GEMM kernel");
            // Weights given as rows and as columns (the attention packs V that way).
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            for packed in [
                PackedB::from_rows(kernel, &w, n, k, k),
                PackedB::from_cols(kernel, &wt, n, k, n),
            ] {
                let got = gemm::matmul_serial(&a, m, &packed, bias);
                let err = max_rel_diff(&got, &out);
                assert!(err < 1e-5, "{isa} ({m}, {n}, {k}): {err}");
            }
        }
    }
}

/// A kernel with other blocking (`Kernel::reblocked`, what `examples/gemm_blocking.rs` compares)
/// gives the same product to the bit: every element still sums its k in order; blockings that
/// do not fit the register tile are refused.
#[test]
fn reblocked_kernels_give_the_same_bits() {
    let (m, n, k) = (37, 150, 700);
    let a = rand_vec(m * k, 4);
    let w = rand_vec(n * k, 5);
    let b = rand_vec(n, 6);
    let mut kernels: Vec<&'static gemm::Kernel> = vec![&portable::KERNEL];
    kernels.extend(simd_isas().into_iter().filter_map(gemm_kernel));
    for kern in kernels {
        let (mr, nr) = (kern.mr, kern.nr);
        assert!(kern.reblocked(0, mr, nr).is_none());
        assert!(kern.reblocked(64, mr + 1, nr).is_none());
        assert!(kern.reblocked(64, mr, nr / 2 + nr).is_none());
        let want = gemm::matmul_serial(&a, m, &PackedB::from_rows(kern, &w, n, k, k), Some(&b));
        for (kc, mc, nc) in [
            (64, mr, nr),
            (kern.kc * 2, 4 * mr, 2 * nr),
            (5, 2 * mr, 3 * nr),
        ] {
            let other = kern.reblocked(kc, mc, nc).expect("a blocking that fits");
            assert_eq!((other.kc, other.mc, other.nc), (kc, mc, nc));
            assert_eq!((other.mr, other.nr, other.name), (mr, nr, kern.name));
            let other: &'static gemm::Kernel = Box::leak(Box::new(other));
            let packed = PackedB::from_rows(other, &w, n, k, k);
            let got = gemm::matmul_serial(&a, m, &packed, Some(&b));
            let same = got
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{} with KC {kc}, MC {mc}, NC {nc}", kern.name);
        }
    }
}

#[test]
fn conv_rows_match_portable() {
    let isas = simd_isas();
    // (input channels, output channels, taps, output pixels, pixel stride in channels)
    for (c, co, ntaps, w_out, stride) in [
        (3, 16, 27, 13, 1),
        (5, 32, 9, 30, 2),
        (4, 48, 3, 3, 1),
        (16, 64, 27, 7, 1),
        (2, 8, 1, 5, 1),
        (7, 24, 4, 1, 1),
    ] {
        let ps = stride * c;
        let row_len = (w_out - 1) * ps + c + 3 * c;
        let x = rand_vec(ntaps * row_len, 4);
        let w = rand_vec(ntaps * c * co, 5);
        let bias = rand_vec(co, 6);
        let res = rand_vec(w_out * co, 7);
        let taps: Vec<(usize, usize)> = (0..ntaps)
            .map(|t| (t * row_len + (t % 3) * c, t * c * co))
            .collect();
        for res in [None, Some(&res[..])] {
            let p = ConvRow {
                x: &x,
                w: &w,
                taps: &taps,
                ps,
                c,
                co,
                w_out,
                bias: &bias,
                res,
            };
            let mut expected = vec![0f32; w_out * co];
            portable::conv_row(&p, &mut expected);
            for &isa in &isas {
                let mut got = vec![f32::NAN; w_out * co];
                let ran = conv_row(isa, &p, &mut got);
                // x86-64 convolves by implicit GEMM (no direct row); NEON has rows.
                let fits = match isa {
                    Isa::Neon => co % 4 == 0,
                    _ => false,
                };
                assert_eq!(ran.is_some(), fits, "{isa}: co {co}");
                if ran.is_some() {
                    let err = max_rel_diff(&got, &expected);
                    assert!(
                        err < 1e-5,
                        "{isa} conv (c {c}, co {co}, taps {ntaps}): {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn elementwise_kernels_equal_portable_per_isa() {
    let (r, m) = (5, 83);
    let base: Vec<f32> = rand_vec(r * m, 8).iter().map(|v| v * 30.0).collect();
    let bias = rand_vec(m, 9);
    let mut want = base.clone();
    let mut want_sums = vec![0f32; r];
    portable::softmax_rows_unnormalized(&mut want, m, &mut want_sums, 0.7);
    let mut want_gelu = base.clone();
    for row in want_gelu.chunks_mut(m) {
        portable::bias_gelu_row(row, &bias);
    }
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        let mut got = base.clone();
        let mut sums = vec![0f32; r];
        softmax_rows_unnormalized(isa, &mut got, m, &mut sums, 0.7);
        assert_eq!(got, want, "{isa} softmax");
        assert_eq!(sums, want_sums, "{isa} softmax sums");
        let mut got = base.clone();
        for row in got.chunks_mut(m) {
            bias_gelu_row(isa, row, &bias);
        }
        assert_eq!(got, want_gelu, "{isa} bias+gelu");
    }
    // Modulated LayerNorm (rows of 83: remainders after the f64 lanes) and the gated residual:
    // per ISA as portable, and the LayerNorm within f32 rounding of its definition in f64.
    let (scale, shift) = (rand_vec(m, 10), rand_vec(m, 11));
    let mut want_ln = vec![0f32; r * m];
    let mut want_res = vec![0f32; r * m];
    for (row, (o, res)) in want_ln
        .chunks_mut(m)
        .zip(want_res.chunks_mut(m))
        .enumerate()
    {
        let x = &base[row * m..(row + 1) * m];
        portable::modulated_layer_norm_row(x, &scale, &shift, 1e-6, true, o);
        portable::gated_residual_row(x, &bias, &scale, res);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / m as f64;
        for j in 0..m {
            let y = (x[j] as f64 - mean) / (var + 1e-6).sqrt() * (1.0 + scale[j] as f64)
                + shift[j] as f64;
            assert!(
                (o[j] as f64 - y).abs() < 1e-6 * (1.0 + y.abs()),
                "LN {row},{j}"
            );
        }
    }
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        let mut ln = vec![0f32; r * m];
        let mut res = vec![0f32; r * m];
        for (row, (o, rs)) in ln.chunks_mut(m).zip(res.chunks_mut(m)).enumerate() {
            let x = &base[row * m..(row + 1) * m];
            modulated_layer_norm_row(isa, x, &scale, &shift, 1e-6, true, o);
            gated_residual_row(isa, x, &bias, &scale, rs);
        }
        assert_eq!(ln, want_ln, "{isa} modulated LayerNorm");
        assert_eq!(res, want_res, "{isa} gated residual");
    }
    // The attention's online softmax: per ISA as portable, and over blocks of keys as one
    // softmax of the whole row (in f64).
    let scale = 0.7;
    let mut want_blocks = base.clone();
    let (mut want_max, mut want_sum, mut want_corr) = (vec![0f32; r], vec![0f32; r], vec![0f32; r]);
    let blocks = [0..40, 40..80, 80..m];
    for isa in std::iter::once(None).chain(Isa::ALL.into_iter().filter(|i| i.supported()).map(Some))
    {
        let mut got = base.clone();
        let (mut mx, mut sum, mut corr) =
            (vec![f32::NEG_INFINITY; r], vec![0f32; r], vec![0f32; r]);
        let mut factor = vec![1f32; r * blocks.len()];
        for (bi, cols) in blocks.iter().enumerate() {
            let s = &mut got[cols.start..];
            let len = s.len();
            let rows_len = (r - 1) * m + cols.len();
            let s = &mut s[..rows_len.min(len)];
            match isa {
                None => portable::softmax_block_online(
                    s,
                    m,
                    cols.len(),
                    scale,
                    &mut mx,
                    &mut sum,
                    &mut corr,
                ),
                Some(isa) => {
                    softmax_block_online(isa, s, m, cols.len(), scale, &mut mx, &mut sum, &mut corr)
                }
            }
            for (row, &c) in corr.iter().enumerate() {
                factor[row * blocks.len() + bi] = c;
            }
        }
        match isa {
            None => {
                want_blocks = got;
                (want_max, want_sum, want_corr) = (mx, sum, corr);
                // Bring each block's exps to the final maximum and compare with the softmax.
                for row in 0..r {
                    let x = &base[row * m..(row + 1) * m];
                    let top = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                    let total: f64 = x
                        .iter()
                        .map(|&v| ((v as f64 - top) * scale as f64).exp())
                        .sum();
                    assert!(
                        (want_sum[row] as f64 - total).abs() < 1e-5 * total,
                        "sum {row}"
                    );
                    assert_eq!(want_max[row] as f64, top, "max {row}");
                    for (bi, cols) in blocks.iter().enumerate() {
                        // Factor from this block's maximum to the final one: the later corrections.
                        // (Within 1e-6 of each value, or 1e-9 of the row's maximum, which is 1:
                        // a far-below-maximum value's argument is rounded in f32.)
                        let later: f64 = (bi + 1..blocks.len())
                            .map(|b| factor[row * blocks.len() + b] as f64)
                            .product();
                        for j in cols.clone() {
                            let want = ((x[j] as f64 - top) * scale as f64).exp();
                            let got = want_blocks[row * m + j] as f64 * later;
                            assert!(
                                (got - want).abs() < 1e-6 * want + 1e-9,
                                "p {row},{j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
            Some(isa) => {
                assert_eq!(got, want_blocks, "{isa} online softmax");
                assert_eq!(
                    (mx, sum, corr),
                    (want_max.clone(), want_sum.clone(), want_corr.clone()),
                    "{isa}"
                );
            }
        }
    }
    // exp2_f32 is close to 2^x.
    for &x in &[
        -125.0f32, -60.3, -10.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 20.0, 100.0,
    ] {
        let (a, b) = (portable::exp2_f32(x) as f64, 2f64.powf(x as f64));
        assert!((a - b).abs() <= 2e-7 * b, "2^{x}: {a} vs {b}");
    }
    // exp_f32 is close to std's exp over the clamped range.
    for &x in &[-80.0f32, -10.5, -1.0, 0.0, 0.3, 1.0, 20.0, 88.0] {
        let (a, b) = (portable::exp_f32(x), x.exp());
        assert!((a - b).abs() <= 2e-7 * b, "exp({x}): {a} vs {b}");
    }
}

#[test]
fn isa_selection_caps_and_refuses() {
    let all = |_: Isa| true;
    let avx2_only = |i: Isa| matches!(i, Isa::Avx2Fma | Isa::Portable);
    assert_eq!(select(None, all, Isa::Avx512), (Isa::Avx512, None));
    assert_eq!(select(Some(""), all, Isa::Avx512), (Isa::Avx512, None));
    assert_eq!(select(Some("avx2"), all, Isa::Avx512), (Isa::Avx2Fma, None));
    assert_eq!(
        select(Some(" AVX2 "), all, Isa::Avx512),
        (Isa::Avx2Fma, None)
    );
    assert_eq!(
        select(Some("portable"), all, Isa::Avx512),
        (Isa::Portable, None)
    );
    // An ISA the CPU lacks: the best it has, with a warning that names both.
    let (isa, warning) = select(Some("avx512"), avx2_only, Isa::Avx2Fma);
    assert_eq!(isa, Isa::Avx2Fma);
    let warning = warning.expect("a warning");
    assert!(
        warning.contains("avx512") && warning.contains("avx2"),
        "{warning}"
    );
    let (isa, warning) = select(Some("neon"), avx2_only, Isa::Avx2Fma);
    assert_eq!(isa, Isa::Avx2Fma);
    assert!(warning.is_some());
    let (isa, warning) = select(Some("sse9"), avx2_only, Isa::Avx2Fma);
    assert_eq!(isa, Isa::Avx2Fma);
    assert!(warning.expect("a warning").contains("not one of"));
    // Names round-trip, and the real CPU's best is supported.
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()), Some(isa));
    }
    assert!(Isa::best().supported());
    assert!(super::isa().supported());
    // Only supported ISAs have kernels handed out.
    for isa in Isa::ALL {
        if let Some(k) = gemm_kernel(isa) {
            assert!(isa.supported() && k.supported(), "{isa}");
        }
    }
}

/// The guided schedule hands out every unit exactly once, in ranges of at most `cap` units that
/// never cross a multiple of `boundary`, large first and single units at the end; taken by
/// several threads at once.
#[test]
fn guided_schedule_covers_every_unit_once() {
    for (n, cap, boundary, threads) in [
        (321, 8, 107, 2),
        (120, 10, 0, 2),
        (5, 8, 0, 4),
        (1, 1, 1, 3),
    ] {
        let g = ops::Guided::new(n, cap, boundary, threads);
        let taken: Vec<Vec<std::ops::Range<usize>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| std::iter::from_fn(|| g.next()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut seen = vec![0u8; n];
        for r in taken.iter().flatten() {
            assert!(!r.is_empty() && r.len() <= cap, "{r:?} (cap {cap})");
            assert_eq!(
                r.start.checked_div(boundary),
                (r.end - 1).checked_div(boundary),
                "{r:?} crosses a multiple of {boundary}"
            );
            for u in r.clone() {
                seen[u] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "n {n}: {seen:?}");
        let mut all: Vec<_> = taken.into_iter().flatten().collect();
        all.sort_by_key(|r| r.start);
        assert_eq!(
            all.last().map(|r| r.len()),
            Some(1),
            "the last grab is one unit"
        );
        assert!(g.next().is_none());
    }
}

/// The threaded products (rows cut by the guided schedule, a last partial row group, several
/// column tiles) equal the serial product bit for bit, for every ISA.
#[test]
fn threaded_products_equal_serial_bit_for_bit() -> candle_core::Result<()> {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let kernels = simd_isas()
        .into_iter()
        .filter_map(gemm_kernel)
        .chain([&portable::KERNEL]);
    for kernel in kernels {
        {
            let isa = kernel.name;
            for (m, k, n) in [(1283, 70, 1100), (13, 300, 40), (1, 5, 33), (37, 1100, 70)] {
                let a = rand_vec(m * k, 1);
                let wv = rand_vec(n * k, 2);
                let bias = rand_vec(n, 3);
                let w = Tensor::from_vec(wv.clone(), (n, k), &dev)?;
                let b = Tensor::from_vec(bias.clone(), n, &dev)?;
                let x = Tensor::from_vec(a.clone(), (1, m, k), &dev)?;
                let got = PackedLinear::new(kernel, &w, Some(&b))?
                    .forward(&x, false)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let packed = PackedB::from_rows(kernel, &wv, n, k, k);
                let want = gemm::matmul_serial(&a, m, &packed, Some(&bias));
                assert!(got == want, "{isa} [{m}, {k}] × [{n}, {k}]ᵀ");
            }
        }
    }
    Ok(())
}

/// The packed linear layer and attention on every ISA path equal candle's ops.
#[test]
fn packed_linear_and_attention_match_candle_per_isa() -> candle_core::Result<()> {
    use candle_core::{Device, Module, Tensor};
    let dev = Device::Cpu;
    let (m, k, n) = (37, 300, 70);
    let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
    let w = Tensor::randn(0f32, 0.1, (n, k), &dev)?;
    let b = Tensor::randn(0f32, 0.1, n, &dev)?;
    let reference = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
    let (bq, nq, mk, h, d) = (1, 45, 300, 2, 16);
    let q = Tensor::randn(0f32, 1.0, (bq, nq, h, d), &dev)?;
    let kk = Tensor::randn(0f32, 1.0, (bq, mk, h, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (bq, mk, h, d), &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let plain = {
        let qt = q.transpose(1, 2)?.contiguous()?;
        let kt = kk.transpose(1, 2)?.contiguous()?;
        let vt = v.transpose(1, 2)?.contiguous()?;
        let s = (qt.matmul(&kt.t()?)? * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        p.matmul(&vt)?.transpose(1, 2)?.reshape((bq, nq, h * d))?
    };
    // Several query blocks and key blocks (256 keys each), the last one partial, with keys whose
    // scores grow along the sequence (each later block raises the running maximum, so the
    // output accumulated so far is rescaled); and fewer keys than a panel.
    let plain_of = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
        let (b, n, h, d) = q.dims4()?;
        let qt = q.transpose(1, 2)?.contiguous()?;
        let kt = k.transpose(1, 2)?.contiguous()?;
        let vt = v.transpose(1, 2)?.contiguous()?;
        let s = (qt.matmul(&kt.t()?)? * 0.125)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        p.matmul(&vt)?.transpose(1, 2)?.reshape((b, n, h * d))
    };
    let mut more = Vec::new();
    // A padded prompt's keys: head 0's keys and values from 40 on all equal (610 of them, taken
    // as one key counted 610 times), head 1's all distinct; and a head whose keys are all one.
    {
        let (n, m, h, d) = (300, 650, 2, 64);
        let q = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
        let mut kd = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut vd = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let row = h * d;
        for j in 41..m {
            for x in [&mut kd, &mut vd] {
                let (src, dst) = x.split_at_mut(j * row);
                dst[..d].copy_from_slice(&src[40 * row..40 * row + d]);
            }
        }
        assert_eq!(ops::trailing_repeats(&[&kd, &vd], m, d, row), m - 40);
        assert_eq!(ops::trailing_repeats(&[&kd[d..], &vd[d..]], m, d, row), 1);
        let k = Tensor::from_vec(kd, (1, m, h, d), &dev)?;
        let v = Tensor::from_vec(vd, (1, m, h, d), &dev)?;
        let want = plain_of(&q, &k, &v)?;
        more.push(((q, k, v), want));
        let (n, m, h) = (20, 9, 1);
        let q = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, h, d), &dev)?.repeat((1, m, 1, 1))?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, h, d), &dev)?.repeat((1, m, 1, 1))?;
        let want = plain_of(&q, &k, &v)?;
        more.push(((q, k, v), want));
    }
    // A last key counted 300 times (`attention_counted`) is the plain attention with it
    // repeated that often, also when equal keys before it join the count.
    let counted_case = {
        let (n, m, h, d, count) = (50, 40, 2, 32, 300);
        let q = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?;
        let (k, v) = (
            Tensor::cat(&[&k, &k.narrow(1, m - 1, 1)?.repeat((1, 3, 1, 1))?], 1)?,
            Tensor::cat(&[&v, &v.narrow(1, m - 1, 1)?.repeat((1, 3, 1, 1))?], 1)?,
        );
        let last = |x: &Tensor| x.narrow(1, m + 2, 1)?.repeat((1, count - 1, 1, 1));
        let (kr, vr) = (
            Tensor::cat(&[&k, &last(&k)?], 1)?,
            Tensor::cat(&[&v, &last(&v)?], 1)?,
        );
        let want = plain_of(&q, &kr, &vr)?;
        ((q, k, v), count, want)
    };
    for (n, m) in [(300, 700), (37, 7)] {
        let (h, d) = (2, 64);
        let q = Tensor::randn(0f32, 1.0, (1, n, h, d), &dev)?;
        let ramp = Tensor::arange(0u32, m as u32, &dev)?
            .to_dtype(candle_core::DType::F32)?
            .affine(3.0 / m as f64, 0.2)?
            .reshape((1, m, 1, 1))?;
        let k = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?.broadcast_mul(&ramp)?;
        let v = Tensor::randn(0f32, 1.0, (1, m, h, d), &dev)?;
        let want = plain_of(&q, &k, &v)?;
        more.push(((q, k, v), want));
    }
    let rel = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        Ok(diff / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
    };
    for isa in simd_isas() {
        with_isa(isa, || -> candle_core::Result<()> {
            let kernel = packed_gemm().expect("a kernel");
            assert_eq!(kernel as *const _, gemm_kernel(isa).unwrap() as *const _);
            let lin = PackedLinear::new(kernel, &w, Some(&b))?;
            assert_eq!(lin.kernel().name, isa.name());
            let err = rel(&lin.forward(&x, false)?, &reference)?;
            assert!(err < 1e-6, "{isa} linear: {err}");
            let err = rel(&lin.forward(&x, true)?, &reference.gelu()?)?;
            assert!(err < 1e-6, "{isa} linear+gelu: {err}");
            let err = rel(&attention(&q, &kk, &v, scale as f32, kernel)?, &plain)?;
            assert!(err < 1e-5, "{isa} attention: {err}");
            {
                let ((q, kk, v), count, want) = &counted_case;
                let got = attention_counted(q, kk, v, 0.125, kernel, *count)?;
                let err = rel(&got, want)?;
                assert!(err < 1e-5, "{isa} attention with a counted last key: {err}");
            }
            for (shape, want) in &more {
                let (q, kk, v) = shape;
                let err = rel(&attention(q, kk, v, 0.125, kernel)?, want)?;
                assert!(
                    err < 1e-5,
                    "{isa} attention {:?} × {:?}: {err}",
                    q.dims(),
                    kk.dims()
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn f16_conversion_is_exact_and_q8_0_expands_as_candle() -> candle_core::Result<()> {
    for bits in 0..=u16::MAX {
        let (got, want) = (
            portable::f16_to_f32(bits),
            half::f16::from_bits(bits).to_f32(),
        );
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
        }
    }
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let w = Tensor::randn(0f32, 1.0, (8, 96), &Device::Cpu)?;
    let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
    let raw = q.data()?;
    let got = dequantize_q8_0(&raw, 8 * 96).expect("sizes fit");
    let want = q
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(got, want);
    assert!(dequantize_q8_0(&raw, 8 * 96 + 32).is_none());
    Ok(())
}

/// The strip-by-strip quantized linear layer against the expanded matrix through candle, for
/// each block type a GGUF file may hold, each ISA, with and without GELU; also the path for
/// CPUs without a packed kernel (portable).
#[test]
fn quantized_linear_matches_expanded_matrix_per_isa() -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};
    let dev = Device::Cpu;
    let rel = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        Ok(diff / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
    };
    // n = 70 and 1100 are not multiples of any kernel's panel width; 1100 makes several strips.
    for (dtype, k, n) in [
        (GgmlDType::Q8_0, 96, 70),
        (GgmlDType::Q8_0, 256, 1100),
        (GgmlDType::Q4K, 512, 70),
        (GgmlDType::Q5K, 256, 40),
        (GgmlDType::Q6K, 256, 33),
        (GgmlDType::Q4_0, 64, 50),
        (GgmlDType::F16, 48, 70),
        (GgmlDType::F16, 160, 100),
        (GgmlDType::BF16, 96, 50),
    ] {
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.1, n, &dev)?;
        let q = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
        let expanded = q.dequantize(&dev)?;
        let lin = QuantizedLinear::new(q, Some(&b))?;
        for m in [1, 37] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let reference =
                candle_nn::Linear::new(expanded.clone(), Some(b.clone())).forward(&x)?;
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                with_isa(isa, || -> candle_core::Result<()> {
                    let y = lin.forward(&x, false)?;
                    assert_eq!(y.dims(), [1, m, n]);
                    let err = rel(&y, &reference)?;
                    assert!(err < 1e-6, "{isa} {dtype:?} m={m} n={n}: {err}");
                    let err = rel(&lin.forward(&x, true)?, &reference.gelu()?)?;
                    assert!(err < 1e-6, "{isa} {dtype:?} +gelu m={m}: {err}");
                    // The panels expanded chunk by chunk hold the expanded matrix's values
                    // exactly: the same bits as the matrix expanded whole and packed at load.
                    if let Some(kernel) = packed_gemm() {
                        let packed = PackedLinear::new(kernel, &expanded, Some(&b))?;
                        assert_eq!(
                            bits(&y)?,
                            bits(&packed.forward(&x, false)?)?,
                            "{isa} {dtype:?} m={m} n={n}: not the packed matrix's bits"
                        );
                    }
                    Ok(())
                })?;
            }
        }
    }
    // A bias-free layer, and an input that does not end in the layer's width.
    let w = Tensor::randn(0f32, 0.1, (64, 64), &dev)?;
    let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
    let lin = QuantizedLinear::new(q.clone(), None)?;
    let x = Tensor::randn(0f32, 1.0, (3, 64), &dev)?;
    let reference = x.matmul(&q.dequantize(&dev)?.t()?)?;
    assert!(rel(&lin.forward(&x, false)?, &reference)? < 1e-6);
    let bad = Tensor::randn(0f32, 1.0, (3, 65), &dev)?;
    assert!(lin.forward(&bad, false).is_err());
    Ok(())
}

/// The feed-forward strip by strip of its hidden width gives the two layers' result to the bit
/// (packed f32, quantized, and mixed), with a hidden width that leaves a short last strip.
#[test]
fn feed_forward_strips_fit_every_kernel_and_block() {
    use super::ops::ffn_strip;
    let mut kernels = vec![&portable::KERNEL];
    kernels.extend(simd_isas().into_iter().filter_map(gemm_kernel));
    for k in kernels {
        for block in [1, 32, 256] {
            let s = ffn_strip(k, k, block);
            assert!(s >= 512, "{k:?}: {s}");
            for d in [k.nr, k.kc, block] {
                assert!(
                    s.is_multiple_of(d),
                    "{k:?}, block {block}: {s} not a multiple of {d}"
                );
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86_64::{AVX2, AVX512};
        assert_eq!(ffn_strip(&AVX2, &AVX2, 256), 512);
        assert_eq!(ffn_strip(&AVX512, &AVX512, 1), 768);
        assert_eq!(ffn_strip(&AVX512, &AVX512, 256), 768);
    }
}

#[test]
fn feed_forward_in_strips_equals_two_layers_bit_for_bit() -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let (m, dim, f) = (37, 256, 1280);
    let x = Tensor::randn(0f32, 1.0, (1, m, dim), &dev)?;
    let w_in = Tensor::randn(0f32, 0.1, (f, dim), &dev)?;
    let b_in = Tensor::randn(0f32, 0.1, f, &dev)?;
    let w_out = Tensor::randn(0f32, 0.1, (dim, f), &dev)?;
    let b_out = Tensor::randn(0f32, 0.1, dim, &dev)?;
    let mut checked = 0;
    for isa in simd_isas() {
        with_isa(isa, || -> candle_core::Result<()> {
            let kernel = packed_gemm().expect("a kernel");
            let p_in = PackedLinear::new(kernel, &w_in, Some(&b_in))?;
            let p_out = PackedLinear::new(kernel, &w_out, Some(&b_out))?;
            let want = p_out.forward(&p_in.forward(&x, true)?, false)?;
            let got = feed_forward(&x, FfnLayer::Packed(&p_in), FfnLayer::Packed(&p_out))?
                .expect("runs on packed layers");
            assert_eq!(got.dims(), [1, m, dim]);
            assert_eq!(bits(&got)?, bits(&want)?, "{isa} packed");
            for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
                let q = |w: &Tensor, b: &Tensor| -> candle_core::Result<QuantizedLinear> {
                    QuantizedLinear::new(std::sync::Arc::new(QTensor::quantize(w, dtype)?), Some(b))
                };
                let (q_in, q_out) = (q(&w_in, &b_in)?, q(&w_out, &b_out)?);
                let want = q_out.forward(&q_in.forward(&x, true)?, false)?;
                let got =
                    feed_forward(&x, FfnLayer::Quantized(&q_in), FfnLayer::Quantized(&q_out))?
                        .expect("runs on quantized layers");
                assert_eq!(bits(&got)?, bits(&want)?, "{isa} {dtype:?}");
                let want = q_out.forward(&p_in.forward(&x, true)?, false)?;
                let got = feed_forward(&x, FfnLayer::Packed(&p_in), FfnLayer::Quantized(&q_out))?
                    .expect("runs on mixed layers");
                assert_eq!(bits(&got)?, bits(&want)?, "{isa} packed + {dtype:?}");
            }
            // Not its case: another dtype, or layers that do not chain.
            let half = x.to_dtype(DType::BF16)?;
            assert!(
                feed_forward(&half, FfnLayer::Packed(&p_in), FfnLayer::Packed(&p_out))?.is_none()
            );
            assert!(feed_forward(&x, FfnLayer::Packed(&p_in), FfnLayer::Packed(&p_in))?.is_none());
            checked += 1;
            Ok(())
        })?;
    }
    assert!(checked > 0 || simd_isas().is_empty());
    Ok(())
}

/// The causal conv straight from its definition, in f64: `zeros` zero frames then `frames`
/// (`[H, W, C]` each), taps `[kt, ks, ks, C, Co]`, spatial padding `[top, bottom, left, right]`,
/// stride 1. Returns `[T_out, H_out, W_out, Co]`.
#[allow(clippy::too_many_arguments)]
fn naive_causal_conv(
    frames: &[Vec<f32>],
    zeros: usize,
    g: conv::Geom,
    taps: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let conv::Geom {
        c,
        h,
        w,
        co,
        kt,
        ks,
        pad,
        ..
    } = g;
    let (h_out, w_out) = (h + pad[0] + pad[1] - ks + 1, w + pad[2] + pad[3] - ks + 1);
    let t_out = zeros + frames.len() - kt + 1;
    let mut out = vec![0f32; t_out * h_out * w_out * co];
    for t in 0..t_out {
        for y in 0..h_out {
            for x in 0..w_out {
                for o in 0..co {
                    let mut s = bias[o] as f64;
                    for a in 0..kt {
                        let Some(fi) = (t + a).checked_sub(zeros) else {
                            continue;
                        };
                        for dy in 0..ks {
                            for dx in 0..ks {
                                let (yi, xi) = (y + dy, x + dx);
                                if yi < pad[0]
                                    || xi < pad[2]
                                    || yi - pad[0] >= h
                                    || xi - pad[2] >= w
                                {
                                    continue;
                                }
                                let px = &frames[fi][((yi - pad[0]) * w + xi - pad[2]) * c..][..c];
                                for (ci, &v) in px.iter().enumerate() {
                                    let wv = taps[(((a * ks + dy) * ks + dx) * c + ci) * co + o];
                                    s += v as f64 * wv as f64;
                                }
                            }
                        }
                    }
                    let at = ((t * h_out + y) * w_out + x) * co + o;
                    out[at] = (s + residual.map_or(0.0, |r| r[at] as f64)) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn winograd_conv_matches_the_definition_per_isa() {
    // (C, Co, H, W, kt, zeros, frames, pad): odd and even sizes, asymmetric padding, taps on the
    // causal zero frames, more channels than one K slice of the microkernels.
    let cases = [
        (4, 8, 6, 6, 3, 2, 3, [1, 1, 1, 1]),
        (5, 16, 7, 9, 3, 1, 2, [1, 1, 1, 1]),
        (3, 5, 5, 4, 1, 0, 2, [1, 1, 1, 1]),
        (8, 40, 9, 11, 3, 0, 4, [0, 2, 2, 0]),
        (300, 36, 4, 5, 3, 2, 1, [1, 1, 1, 1]),
        (16, 33, 34, 3, 1, 0, 1, [1, 1, 1, 1]),
    ];
    let mut isas = simd_isas();
    isas.retain(|&i| gemm_kernel(i).is_some() && i != Isa::Neon);
    for (n, &(c, co, h, w, kt, zeros, nf, pad)) in cases.iter().enumerate() {
        let frames: Vec<Vec<f32>> = (0..nf)
            .map(|f| rand_vec(h * w * c, 100 + f as u64))
            .collect();
        let taps = rand_vec(kt * 9 * c * co, 7 + n as u64);
        let bias = rand_vec(co, 8);
        let g = conv::Geom {
            c,
            h,
            w,
            co,
            kt,
            ks: 3,
            pad,
            stride_t: 1,
            stride_s: 1,
        };
        let (h_out, w_out) = (h + pad[0] + pad[1] - 2, w + pad[2] + pad[3] - 2);
        let res = rand_vec((zeros + nf - kt + 1) * h_out * w_out * co, 9);
        for residual in [None, Some(&res[..])] {
            let want = naive_causal_conv(&frames, zeros, g, &taps, &bias, residual);
            let refs: Vec<&[f32]> = frames.iter().map(|f| &f[..]).collect();
            for &isa in &isas {
                for on in [true, false] {
                    let got = with_isa(isa, || {
                        conv::with_winograd(on, || {
                            conv::causal_conv(&refs, zeros, g, &taps, &bias, residual)
                        })
                    })
                    .unwrap();
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let err = max_rel_diff(&got, &want);
                    let path = if on { "winograd" } else { "implicit gemm" };
                    println!("{isa} {path} case {n}: {err:.2e}");
                    assert!(
                        err < 2e-6 * (kt * 9 * c) as f32 / 27.0 + 1e-6,
                        "{isa} {path} case {n} (residual {}): {err}",
                        residual.is_some()
                    );
                }
            }
        }
    }
}

/// The fused RMS norm (+ RoPE) of q and k: per ISA bit-equal to the portable path, and within
/// f32 rounding of candle's `rms_norm` followed by its `rope_i` (the path it replaced), with a
/// batch of two (tables per row), and without RoPE on rows that are not a multiple of the lanes.
#[test]
fn rms_norm_rope_matches_candle_per_isa() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, n, heads, hd) = (2, 7, 3, 8);
    let d = heads * hd;
    let x: Vec<f32> = rand_vec(b * n * d, 21).iter().map(|v| v * 4.0).collect();
    let x = Tensor::from_vec(x, (b, n, d), &dev)?;
    let w = Tensor::from_vec(rand_vec(d, 22), d, &dev)?;
    let angles = rand_vec(b * n * hd / 2, 23);
    let cos: Vec<f32> = angles.iter().map(|a| (a * 3.0).cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| (a * 3.0).sin()).collect();
    let cos = Tensor::from_vec(cos, (b * n, 1, hd / 2), &dev)?;
    let sin = Tensor::from_vec(sin, (b * n, 1, hd / 2), &dev)?;
    let eps = 1e-6;
    let normed = candle_nn::ops::rms_norm(&x, &w, eps)?;
    let want = candle_nn::rotary_emb::rope_i(&normed.reshape((b * n, heads, 1, hd))?, &cos, &sin)?
        .reshape((b, n, d))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let run = |isa: Isa, rope: bool| -> candle_core::Result<Vec<f32>> {
        with_isa(isa, || {
            let tables = rope.then_some((&cos, &sin));
            let y = rms_norm_rope(&x, &w, eps, tables)?.expect("a CPU f32 path");
            assert_eq!(y.dims(), x.dims());
            y.flatten_all()?.to_vec1::<f32>()
        })
    };
    let portable = run(Isa::Portable, true)?;
    let diff = max_rel_diff(&portable, &want);
    assert!(diff < 1e-6, "RMS norm + RoPE vs candle: {diff}");
    let plain = run(Isa::Portable, false)?;
    let diff = max_rel_diff(&plain, &normed.flatten_all()?.to_vec1::<f32>()?);
    assert!(diff < 1e-6, "RMS norm vs candle: {diff}");
    for isa in simd_isas() {
        assert_eq!(run(isa, true)?, portable, "{isa} RMS norm + RoPE");
        assert_eq!(run(isa, false)?, plain, "{isa} RMS norm");
    }
    // Rows of 83 (a remainder after the lanes), no RoPE.
    let x = Tensor::from_vec(rand_vec(5 * 83, 24), (5, 83), &dev)?;
    let w = Tensor::from_vec(rand_vec(83, 25), 83, &dev)?;
    let want = candle_nn::ops::rms_norm(&x, &w, eps)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let got = rms_norm_rope(&x, &w, eps, None)?.expect("a CPU f32 path");
    let diff = max_rel_diff(&got.flatten_all()?.to_vec1::<f32>()?, &want);
    assert!(diff < 1e-6, "RMS norm of 83 vs candle: {diff}");
    // Tables that do not fit the rows are an error, not a wrong read.
    let short = cos.narrow(0, 0, 3)?;
    assert!(rms_norm_rope(&x, &w, eps, Some((&short, &short))).is_err());
    // Another dtype is left to candle.
    assert!(rms_norm_rope(&x.to_dtype(DType::F16)?, &w, eps, None)?.is_none());
    Ok(())
}

/// A tensor's values as their bit patterns (to compare results to the bit).
fn bits(t: &candle_core::Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}
