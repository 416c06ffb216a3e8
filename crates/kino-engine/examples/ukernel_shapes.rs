//! Probe: which AVX-512 register tile runs nearest the FMA peak on this CPU, with A packed
//! (`R` floats per k, broadcast one at a time) and B packed (`16·V` floats per k), all in L1
//! (K = 64); best of 5 rounds each. Then what each kind of load costs the 12 × 32 tile: the
//! FMAs alone (register operands), with A's broadcasts from memory, with B's vector loads, with
//! both. Standalone (`std::arch` only).
//! `cargo run --release -p kino-engine --example ukernel_shapes`.
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// C[R, 16·V] += A[R, kc] · B[kc, 16·V], A and B packed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(c.add(r * V * 16 + v * 16));
        }
    }
    for kk in 0..kc {
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(b.add(kk * V * 16 + v * 16));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(kk * R + r));
            for (x, bv) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, *bv, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * V * 16 + v * 16), *x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn run<const R: usize, const V: usize>(kc: usize) -> f64 {
    let a = vec![0.5f32; R * kc];
    let b = vec![0.25f32; V * 16 * kc];
    let mut c = vec![0f32; R * V * 16];
    let calls = 400_000_000 / kc / R / V;
    let t0 = Instant::now();
    for _ in 0..calls {
        // SAFETY: AVX-512F checked by the caller; the buffers hold what the tile reads.
        unsafe { tile::<R, V>(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) };
        std::hint::black_box(&mut c);
    }
    (calls * 2 * R * V * 16 * kc) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// The 12 × 32 tile with some operands in registers: `BC`, A broadcast from memory (else one
/// register); `LD`, B loaded from memory (else two registers). Both from memory is [`tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mix<const BC: bool, const LD: bool>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 12];
    let areg = _mm512_set1_ps(*a);
    let (b0r, b1r) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
    for kk in 0..kc {
        let (b0, b1) = if LD {
            (
                _mm512_loadu_ps(b.add(kk * 32)),
                _mm512_loadu_ps(b.add(kk * 32 + 16)),
            )
        } else {
            (b0r, b1r)
        };
        for (r, row) in acc.iter_mut().enumerate() {
            let av = if BC {
                _mm512_set1_ps(*a.add(kk * 12 + r))
            } else {
                areg
            };
            row[0] = _mm512_fmadd_ps(av, b0, row[0]);
            row[1] = _mm512_fmadd_ps(av, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * 32), row[0]);
        _mm512_storeu_ps(c.add(r * 32 + 16), row[1]);
    }
}

#[cfg(target_arch = "x86_64")]
fn run_mix<const BC: bool, const LD: bool>(kc: usize) -> f64 {
    let a = vec![0.5f32; 12 * kc];
    let b = vec![0.25f32; 32 * kc];
    let mut c = vec![0f32; 12 * 32];
    let calls = 400_000_000 / kc / 24;
    let t0 = Instant::now();
    for _ in 0..calls {
        // SAFETY: as in `run`.
        unsafe { mix::<BC, LD>(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) };
        std::hint::black_box(&mut c);
    }
    (calls * 2 * 12 * 32 * kc) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        println!("no AVX-512F on this CPU");
        return;
    }
    const KC: usize = 64;
    let names = [
        "12x32", "14x32", "10x32", "8x48", "7x48", "6x64", "5x80", "4x96",
    ];
    let mut best = [0f64; 8];
    let mut mixes = [0f64; 4];
    for _ in 0..5 {
        let r = [
            run::<12, 2>(KC),
            run::<14, 2>(KC),
            run::<10, 2>(KC),
            run::<8, 3>(KC),
            run::<7, 3>(KC),
            run::<6, 4>(KC),
            run::<5, 5>(KC),
            run::<4, 6>(KC),
        ];
        for (b, x) in best.iter_mut().zip(r) {
            *b = b.max(x);
        }
        let m = [
            run_mix::<false, false>(256),
            run_mix::<true, false>(256),
            run_mix::<false, true>(256),
            run::<12, 2>(256),
        ];
        for (b, x) in mixes.iter_mut().zip(m) {
            *b = b.max(x);
        }
    }
    for (n, b) in names.iter().zip(best) {
        println!("tile {n:6} best {b:6.1} GFLOP/s");
    }
    println!(
        "12x32, K 256: FMAs alone {:.1}, + A broadcasts {:.1}, + B loads {:.1}, both {:.1} GFLOP/s",
        mixes[0], mixes[1], mixes[2], mixes[3]
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only");
}
