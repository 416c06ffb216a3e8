//! Checks the NEON kernels of `aarch64.rs` against the portable ones of `portable.rs` on random
//! data (odd sizes, partial register tiles, depths that are not multiples of the K slice) and
//! exits non-zero on a mismatch. A plain `main` without threads or libtest, so it runs under
//! qemu-user (whose thread support hangs here); compiled standalone from the pure kernel files:
//!
//! ```sh
//! scripts/test-neon.sh   # rustc --target aarch64-unknown-linux-gnu … && qemu-aarch64 …
//! ```
//!
//! Not part of the kino-engine crate (no `mod` declares it).

#![allow(dead_code)]

#[path = "aarch64.rs"]
mod aarch64;
#[path = "gemm.rs"]
mod gemm;
#[path = "portable.rs"]
mod portable;

use gemm::PackedB;
use portable::ConvRow;

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

fn main() {
    let mut failures = 0;
    let mut check = |what: String, err: f32, tol: f32| {
        let ok = err.is_finite() && err < tol;
        println!(
            "{} {what}: max rel diff {err:.2e}",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures += 1;
        }
    };
    println!(
        "NEON detected: {}",
        std::arch::is_aarch64_feature_detected!("neon")
    );
    let neon = &aarch64::NEON;
    if !neon.supported() {
        println!("FAIL: the NEON kernel reports no NEON");
        std::process::exit(1);
    }

    // GEMM: NEON microkernel vs portable microkernel vs a plain f64 loop; rows off MR (6) and
    // MC (96), columns off NR (16) and NC (256), depths off KC (256); weights packed from rows
    // and from columns.
    for (m, n, k, with_bias) in [
        (1, 1, 1, false),
        (5, 7, 3, true),
        (6, 16, 256, true),
        (13, 33, 300, true),
        (37, 70, 257, false),
        (100, 530, 520, true),
        (97, 257, 513, false),
        // Partial tiles of other widths: 13, 29 and 12 columns past the last full panel.
        (9, 45, 40, true),
        (3, 29, 17, false),
        (8, 60, 300, true),
    ] {
        let a = rand_vec(m * k, 1);
        let w = rand_vec(n * k, 2);
        let b = rand_vec(n, 3);
        let bias = with_bias.then_some(&b[..]);
        let reference = naive_matmul(&a, &w, bias, m, n, k);
        let port = gemm::matmul_serial(
            &a,
            m,
            &PackedB::from_rows(&portable::KERNEL, &w, n, k, k),
            bias,
        );
        check(
            format!("gemm portable ({m}, {n}, {k})"),
            max_rel_diff(&port, &reference),
            1e-5,
        );
        let got = gemm::matmul_serial(&a, m, &PackedB::from_rows(neon, &w, n, k, k), bias);
        check(
            format!("gemm neon rows ({m}, {n}, {k})"),
            max_rel_diff(&got, &port),
            1e-5,
        );
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let got = gemm::matmul_serial(&a, m, &PackedB::from_cols(neon, &wt, n, k, n), bias);
        check(
            format!("gemm neon cols ({m}, {n}, {k})"),
            max_rel_diff(&got, &port),
            1e-5,
        );
    }

    // Direct conv rows: NEON vs portable, with and without residual; channel counts that take
    // the 16-wide and the 4-wide blocks, rows narrower than the 6-pixel block, strides 1 and 2.
    for (c, co, ntaps, w_out, stride) in [
        (3, 16, 27, 13, 1),
        (5, 32, 9, 30, 2),
        (4, 20, 3, 3, 1),
        (16, 64, 27, 7, 1),
        (2, 4, 1, 5, 1),
        (7, 24, 4, 1, 1),
        (9, 36, 9, 6, 1),
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
            let mut got = vec![f32::NAN; w_out * co];
            aarch64::conv_row_neon(&p, &mut got);
            check(
                format!(
                    "conv neon (c {c}, co {co}, taps {ntaps}, w_out {w_out}, stride {stride}, residual {})",
                    res.is_some()
                ),
                max_rel_diff(&got, &expected),
                1e-5,
            );
        }
    }

    // Attention rows (flash style, `gemm::attention_rows` with the portable online softmax) on
    // the NEON microkernel vs a plain f64 softmax attention: one key block and several (256
    // keys each, the last partial), keys whose scores grow along the sequence so the running
    // maximum moves, and fewer keys than a panel.
    for (n, m, d) in [(5, 7, 16), (13, 300, 32), (40, 600, 64)] {
        let q = rand_vec(n * d, 8);
        let k: Vec<f32> = rand_vec(m * d, 9)
            .iter()
            .enumerate()
            .map(|(i, x)| x * (0.5 + 4.0 * (i / d) as f32 / m as f32))
            .collect();
        let v = rand_vec(m * d, 10);
        let scale = 1.0 / (d as f32).sqrt();
        let mut want = vec![0f32; n * d];
        for i in 0..n {
            let s: Vec<f64> = (0..m)
                .map(|j| (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>())
                .collect();
            let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| ((x - top) * scale as f64).exp()).collect();
            let total: f64 = p.iter().sum();
            for c in 0..d {
                let o: f64 = (0..m).map(|j| p[j] * v[j * d + c] as f64).sum();
                want[i * d + c] = (o / total) as f32;
            }
        }
        let kp = PackedB::from_rows(neon, &k, m, d, d);
        let vp = PackedB::from_cols(neon, &v, d, m, d);
        let softmax = |s: &mut [f32], ld: usize, cols: usize, st: gemm::SoftmaxState| {
            portable::softmax_block_online(s, ld, cols, scale, st.max, st.sum, st.corr)
        };
        let mut scratch = gemm::AttentionScratch::new(n, 256, d);
        let mut got = vec![f32::NAN; n * d];
        // SAFETY: q and got are [n, d] with row stride d; K and V packed for NEON from m keys.
        unsafe {
            gemm::attention_rows(
                q.as_ptr(),
                d,
                n,
                (&kp, &vp),
                &softmax,
                &mut scratch,
                got.as_mut_ptr(),
                d,
            );
        }
        check(
            format!("attention neon ({n} queries, {m} keys, d {d})"),
            max_rel_diff(&got, &want),
            1e-5,
        );
    }

    if failures > 0 {
        println!("{failures} NEON check(s) failed");
        std::process::exit(1);
    }
    println!("all NEON checks passed");
}
