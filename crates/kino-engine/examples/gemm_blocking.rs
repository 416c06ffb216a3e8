//! Probe: the packed GEMM's blocking (`KC`, `MC`, `NC`) compared on this machine, in one
//! process. Each blocking packs its own copy of the weights; a round runs every blocking once,
//! in turn (the order reversed every other round), so they see the same moments of a shared
//! machine, whose speed drifts by ±20% from one second to the next. Prints each blocking's
//! median rate and the median of its per-round ratio to the first (the baseline).
//!
//! `cargo run --release -p kino-engine --example gemm_blocking -- WHAT ROUNDS KC,MC,NC ...`
//! with WHAT `linear` (eight 1,280 × 1,536 × 1,536 products through `PackedLinear`: the
//! transformer's q, k, v and o), `ffn` (its feed-forward, 1,536 → 8,960 → 1,536 over 1,280
//! tokens) or `attention` (12 heads of 128, 1,280 queries and keys), on the kernel this CPU
//! dispatches to (`KINO_CPU_ISA` caps it) and `RAYON_NUM_THREADS` threads. E.g. on AVX-512
//! `… -- linear 12 128,96,528 128,192,528 256,96,528` (the first is the shipped blocking).
use candle_core::{Device, Tensor};
use kino_engine::kernels::gemm::Kernel;
use kino_engine::kernels::{attention, feed_forward, packed_gemm, FfnLayer, PackedLinear};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: gemm_blocking linear|ffn|attention ROUNDS KC,MC,NC [KC,MC,NC ...]";
    let (what, rounds) = match (args.first(), args.get(1).and_then(|r| r.parse().ok())) {
        (Some(w), Some(r)) if ["linear", "ffn", "attention"].contains(&w.as_str()) => {
            (w.clone(), r)
        }
        _ => return Err(usage.into()),
    };
    let base = packed_gemm().ok_or("no packed GEMM kernel for this CPU")?;
    let mut kernels: Vec<&'static Kernel> = Vec::new();
    for spec in &args[2..] {
        let v: Vec<usize> = spec.split(',').filter_map(|x| x.parse().ok()).collect();
        let kern = match v[..] {
            [kc, mc, nc] => base.reblocked(kc, mc, nc).ok_or_else(|| {
                format!(
                    "{spec}: MC must be a multiple of {} and NC of {} ({:?})",
                    base.mr, base.nr, base
                )
            })?,
            _ => return Err(format!("{spec}: expected KC,MC,NC\n{usage}").into()),
        };
        kernels.push(Box::leak(Box::new(kern)));
    }
    if kernels.is_empty() {
        return Err(usage.into());
    }
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 1280, 1536), &dev)?;
    let (f, d) = (8960, 1536);
    let w = |o: usize, i: usize| Tensor::randn(0f32, 0.02, (o, i), &dev);
    let (w_in, w_out, w_q) = (w(f, d)?, w(d, f)?, w(d, d)?);
    let (b_in, b_out) = (
        Tensor::randn(0f32, 0.02, f, &dev)?,
        Tensor::randn(0f32, 0.02, d, &dev)?,
    );
    let heads = || Tensor::randn(0f32, 1.0, (1, 1280, 12, 128), &dev);
    let (q, k, v) = (heads()?, heads()?, heads()?);
    /// One blocking's kernel and its packed layers (the second only for the feed-forward).
    struct Layers {
        kern: &'static Kernel,
        lin: Option<(PackedLinear, Option<PackedLinear>)>,
    }
    let layers: Vec<Layers> = kernels
        .iter()
        .map(|&kern| -> candle_core::Result<Layers> {
            let lin = match what.as_str() {
                "linear" => Some((PackedLinear::new(kern, &w_q, Some(&b_out))?, None)),
                "ffn" => Some((
                    PackedLinear::new(kern, &w_in, Some(&b_in))?,
                    Some(PackedLinear::new(kern, &w_out, Some(&b_out))?),
                )),
                _ => None,
            };
            Ok(Layers { kern, lin })
        })
        .collect::<candle_core::Result<_>>()?;
    let run = |l: &Layers| -> candle_core::Result<f64> {
        let t0 = Instant::now();
        let flops = match &l.lin {
            Some((a, None)) => {
                for _ in 0..8 {
                    drop(a.forward(&x, false)?);
                }
                8 * 2 * 1280 * d * d
            }
            Some((a, Some(b))) => {
                let y = feed_forward(&x, FfnLayer::Packed(a), FfnLayer::Packed(b))?;
                drop(y.ok_or_else(|| candle_core::Error::Msg("no packed FFN".into()))?);
                2 * 2 * 1280 * d * f
            }
            None => {
                for _ in 0..4 {
                    drop(attention(&q, &k, &v, 128f32.powf(-0.5), l.kern)?);
                }
                4 * 2 * 2 * 1280 * 1280 * d
            }
        };
        Ok(flops as f64 / t0.elapsed().as_secs_f64() / 1e9)
    };
    for l in &layers {
        run(l)?; // warm up: pages touched, caches and clocks settled
    }
    let n = layers.len();
    let (mut rates, mut ratios) = (vec![vec![]; n], vec![vec![]; n]);
    for round in 0..rounds {
        let mut r = vec![0.0; n];
        for i in 0..n {
            let j = if round % 2 == 0 { i } else { n - 1 - i };
            r[j] = run(&layers[j])?;
        }
        for j in 0..n {
            rates[j].push(r[j]);
            ratios[j].push(r[j] / r[0]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{what}, {:?} kernel, {threads} threads, {rounds} rounds:",
        base
    );
    for (j, l) in layers.iter().enumerate() {
        println!(
            "  KC {:>4} MC {:>4} NC {:>5}: {:6.1} GFLOP/s (median), {:.3}× the first (median ratio)",
            l.kern.kc,
            l.kern.mc,
            l.kern.nc,
            median(&mut rates[j]),
            median(&mut ratios[j])
        );
    }
    Ok(())
}
