//! `kino quantize`: one component of a diffusers folder as a GGUF file with quantized matrices
//! (Q8_0, Q6_K, Q5_K, Q4_K_M, Q4_K), named as the community's Wan GGUF files are; pass it to `--model`
//! with the folder (`--model OUT.gguf,FOLDER`).

use std::path::PathBuf;

use kino_engine::single_file::Part;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a folder in diffusers layout or an alias (default: $KINO_MODEL, else the
    /// bundled kino-shapes).
    #[arg(long)]
    model: Option<String>,
    /// Which component: transformer or text_encoder.
    #[arg(long, default_value = "transformer")]
    part: String,
    /// Block type: q8_0, q6_k, q5_k, q4_k_m (Q4_K with Q6_K for attention values and the
    /// feed-forward's down projection, llama.cpp's mix), q4_k or f16.
    #[arg(long = "type", default_value = "q8_0")]
    qtype: String,
    /// Output file (.gguf).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let part = match a.part.as_str() {
        "transformer" => Part::Transformer,
        "text_encoder" | "text-encoder" => Part::TextEncoder,
        other => anyhow::bail!(
            "--part {other}: choose transformer or text_encoder (the VAE stays in f32)"
        ),
    };
    let dtype = kino_engine::gguf::parse_quant_type(&a.qtype)?;
    if a.output.extension().is_none_or(|e| e != "gguf") {
        anyhow::bail!("-o {}: name the output *.gguf", a.output.display());
    }
    let model = a
        .model
        .or_else(|| std::env::var("KINO_MODEL").ok().filter(|m| !m.is_empty()))
        .unwrap_or_else(|| "kino-shapes".into());
    let dir = kino_engine::registry::resolve(&model)?;
    let component = dir.join(part.folder());
    let start = std::time::Instant::now();
    let report =
        kino_engine::gguf::quantize_component(&component, part, dtype, &a.output, |i, n| {
            if i % 50 == 0 {
                eprintln!("quantize: tensor {i} of {n}");
            }
        })?;
    println!(
        "wrote {} ({} tensors: {} in {}, {} kept in f16 (embeddings, time projection, head), {} in f32; {:.1} MB from {:.1} MB) in {:.1} s",
        a.output.display(),
        report.tensors,
        report.quantized,
        a.qtype.to_lowercase(),
        report.kept_f16,
        report.kept_f32,
        report.bytes_out as f64 / 1e6,
        report.bytes_in as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
