//! Probe: where the packed GEMM loses time on this CPU. One thread unless `RAYON_NUM_THREADS`
//! says otherwise for the last line. Prints, per round: the core's FMA peak now (AVX-512), the
//! microkernel on data in L1 (one `MR × NR` tile, K = `KC`), one `MC × NC` tile of a K = 1,536
//! product, a whole 1,280 × 1,536 × 1,536 product by tiles on this thread, and the same through
//! `PackedLinear` on candle's pool (the transformer's q/k/v/o shape). Rounds interleave them,
//! since the machine's speed drifts by ±20% (see README, CPU kernels).
//! `cargo run --release -p kino-engine --example gemm_rate [rounds]`.
use candle_core::{Device, Tensor};
use kino_engine::kernels::gemm::{self, PackedB};
use kino_engine::kernels::{packed_gemm, PackedLinear};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let kern = packed_gemm().expect("a packed GEMM kernel for this CPU");
    let threads = candle_core::utils::get_num_threads();
    println!(
        "kernel {kern:?}, KC {}, MC {}, NC {}; pool threads {threads}",
        kern.kc, kern.mc, kern.nc
    );
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (1536, 1536), &dev)?;
    let x = Tensor::randn(0f32, 1.0, (1280, 1536), &dev)?;
    let lin = PackedLinear::new(kern, &w, None)?;
    for round in 0..rounds {
        let mut out = format!("round {round}:");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            out += &format!(" zmm FMA peak {:.1}", unsafe { fma_peak() });
        }
        for (what, m, n, k) in [
            ("L1 tile", kern.mr, kern.nr, kern.kc),
            ("MC x NC tile", kern.mc, kern.nc, 1536),
            ("1280x1536x1536", 1280, 1536, 1536),
        ] {
            out += &format!(" | {what} {:.1}", tiles_rate(kern, m, n, k));
        }
        let _ = lin.forward(&x, false)?;
        let t0 = Instant::now();
        let reps = 5usize;
        for _ in 0..reps {
            drop(lin.forward(&x, false)?);
        }
        let gf = (reps * 2 * 1280 * 1536 * 1536) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        out += &format!(" | PackedLinear on {threads} threads {gf:.1}  (GFLOP/s)");
        println!("{out}");
    }
    Ok(())
}

/// GFLOP/s of `C[m, n] = A[m, k] · Wᵀ` by [`gemm::tile_of`] on this thread, repeated.
fn tiles_rate(kern: &'static gemm::Kernel, m: usize, n: usize, k: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let src: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let w = PackedB::from_rows(kern, &src, n, k, k);
    let view = w.view();
    let mut c = vec![0f32; m * n];
    let (tm, tn) = gemm::tiles_of(m, &view);
    let reps = (3_000_000_000 / (2 * m * n * k)).max(1);
    let noop = |_: &mut [f32], _: usize| {};
    let t0 = Instant::now();
    for _ in 0..reps {
        for tj in 0..tn {
            for ti in 0..tm {
                // SAFETY: A, C and the weights have the shapes the call names; one thread.
                unsafe {
                    gemm::tile_of(
                        a.as_ptr(),
                        k,
                        m,
                        &view,
                        None,
                        c.as_mut_ptr(),
                        n,
                        (ti, tj),
                        &noop,
                        false,
                    )
                };
            }
        }
        std::hint::black_box(&mut c);
    }
    (reps * 2 * m * n * k) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// 24 independent zmm FMA chains, register operands only: one core's peak rate, now.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_peak() -> f64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 24];
    let x = _mm512_set1_ps(std::hint::black_box(0.999_999));
    let y = _mm512_set1_ps(std::hint::black_box(1e-7));
    let iters = 10_000_000u64;
    let t0 = Instant::now();
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let mut s = _mm512_set1_ps(0.0);
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    std::hint::black_box(s);
    (iters * 24 * 32) as f64 / dt / 1e9
}
