//! Probe: what keeping a matrix in its GGUF blocks costs on this machine, in one process. The
//! Wan2.1-1.3B feed-forward (1,536 → 8,960 → 1,536 over 1,280 tokens) runs with its two
//! matrices kept in each block type (expanded strip by strip at every call, as `kino generate`
//! runs a GGUF file) and with the same expanded values packed in f32 at load; a round runs each
//! once, in turn (the order reversed every other round), so they see the same moments of a
//! shared machine. Prints each one's median time and the median of its per-round ratio to f32.
//!
//! Then the expansion alone: one token through each layer in its blocks (at least 20 times).
//!
//! `cargo run --release -p kino-engine --example quantized_rate -- ROUNDS [TYPE ...]` (ROUNDS 0:
//! the expansion only) with TYPE
//! among `f16`, `bf16`, `q8_0`, `q6_k`, `q5_k`, `q4_k` (default `f16 q8_0 q4_k`), on the kernel
//! this CPU dispatches to (`KINO_CPU_ISA` caps it) and `RAYON_NUM_THREADS` threads.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kino_engine::kernels::{feed_forward, packed_gemm, FfnLayer, PackedLinear, QuantizedLinear};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: quantized_rate ROUNDS [f16|bf16|q8_0|q6_k|q5_k|q4_k ...]";
    let rounds: usize = args.first().and_then(|r| r.parse().ok()).ok_or(usage)?;
    let names: Vec<&str> = if args.len() > 1 {
        args[1..].iter().map(String::as_str).collect()
    } else {
        vec!["f16", "q8_0", "q4_k"]
    };
    let kernel = packed_gemm().ok_or("no packed GEMM kernel for this CPU")?;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 1280, 1536), &dev)?;
    let (f, d) = (8960, 1536);
    let (w_in, w_out) = (
        Tensor::randn(0f32, 0.02, (f, d), &dev)?,
        Tensor::randn(0f32, 0.02, (d, f), &dev)?,
    );
    let (b_in, b_out) = (
        Tensor::randn(0f32, 0.02, f, &dev)?,
        Tensor::randn(0f32, 0.02, d, &dev)?,
    );
    /// One row: packed f32, or the two matrices in their blocks.
    enum Layers {
        F32(PackedLinear, PackedLinear),
        Blocks(QuantizedLinear, QuantizedLinear),
    }
    let mut rows: Vec<(String, Layers)> = Vec::new();
    for name in &names {
        let dtype = match *name {
            "f16" => GgmlDType::F16,
            "bf16" => GgmlDType::BF16,
            "q8_0" => GgmlDType::Q8_0,
            "q6_k" => GgmlDType::Q6K,
            "q5_k" => GgmlDType::Q5K,
            "q4_k" => GgmlDType::Q4K,
            other => return Err(format!("{other}: unknown type\n{usage}").into()),
        };
        let q_in = Arc::new(QTensor::quantize(&w_in, dtype)?);
        let q_out = Arc::new(QTensor::quantize(&w_out, dtype)?);
        // f32 with the very values the blocks expand to, so both rows compute the same thing.
        let (e_in, e_out) = (q_in.dequantize(&dev)?, q_out.dequantize(&dev)?);
        rows.push((
            format!("{name} as f32"),
            Layers::F32(
                PackedLinear::new(kernel, &e_in, Some(&b_in))?,
                PackedLinear::new(kernel, &e_out, Some(&b_out))?,
            ),
        ));
        rows.push((
            format!("{name} in blocks"),
            Layers::Blocks(
                QuantizedLinear::new(q_in, Some(&b_in))?,
                QuantizedLinear::new(q_out, Some(&b_out))?,
            ),
        ));
    }
    let run = |l: &Layers| -> candle_core::Result<f64> {
        let t = Instant::now();
        let y = match l {
            Layers::F32(a, b) => feed_forward(&x, FfnLayer::Packed(a), FfnLayer::Packed(b))?,
            Layers::Blocks(a, b) => {
                feed_forward(&x, FfnLayer::Quantized(a), FfnLayer::Quantized(b))?
            }
        };
        y.ok_or_else(|| candle_core::Error::Msg("the feed-forward did not run packed".into()))?;
        Ok(t.elapsed().as_secs_f64())
    };
    for (_, l) in rows.iter().filter(|_| rounds > 0) {
        run(l)?; // warm up
    }
    let mut times = vec![Vec::new(); rows.len()];
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (0..rows.len()).collect()
        } else {
            (0..rows.len()).rev().collect()
        };
        for i in order {
            times[i].push(run(&rows[i].1)?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{} kernel, {} threads, {rounds} rounds: the feed-forward, 1,280 × 1,536 → 8,960 → 1,536",
        kernel.name,
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<16} {:>10} {:>16}",
        "weights", "median ms", "ratio to f32"
    );
    for pair in (0..rows.len() / 2).filter(|_| rounds > 0) {
        let (a, b) = (2 * pair, 2 * pair + 1);
        let mut ratios: Vec<f64> = times[b].iter().zip(&times[a]).map(|(q, f)| q / f).collect();
        let ta = median(&mut times[a].clone());
        let tb = median(&mut times[b].clone());
        println!("{:<16} {:>10.1} {:>16}", rows[a].0, ta * 1e3, "1");
        println!(
            "{:<16} {:>10.1} {:>16.3}",
            rows[b].0,
            tb * 1e3,
            median(&mut ratios)
        );
    }
    // The expansion alone: one token through each layer in its blocks (the products then cost
    // next to nothing), as values expanded per second.
    let x1 = Tensor::randn(0f32, 1.0, (1, 1, 1536), &dev)?;
    let h1 = Tensor::randn(0f32, 1.0, (1, 1, 8960), &dev)?;
    for (name, l) in &rows {
        if let Layers::Blocks(a, b) = l {
            let mut t = Vec::new();
            for _ in 0..rounds.max(20) {
                let t0 = Instant::now();
                a.forward(&x1, false)?;
                b.forward(&h1, false)?;
                t.push(t0.elapsed().as_secs_f64());
            }
            let s = median(&mut t);
            println!(
                "{name}: expanded {:.2} G values/s ({:.1} ms for the two matrices, one token)",
                2.0 * (f * d) as f64 / s / 1e9,
                s * 1e3
            );
        }
    }
    Ok(())
}
