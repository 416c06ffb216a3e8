//! `kino quantize`: one component of a diffusers folder as a GGUF file with quantized matrices
//! (Q8_0, Q6_K, Q5_K, Q4_K_M, Q4_K), named as the community's Wan GGUF files are; pass it to `--model`
//! with the folder (`--model OUT.gguf,FOLDER`). With `--calibrate`, the transformer's biases are
//! corrected for the matrices' rounding from short generations (`kino_engine::calibration`).

use std::path::PathBuf;

use kino_engine::single_file::Part;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a folder in diffusers layout or an alias (default: $KINO_MODEL, else the
    /// bundled kino-shapes).
    #[arg(long)]
    model: Option<String>,
    /// Which component: transformer, transformer_2 (the low-noise expert of a two-expert model,
    /// Wan2.2 A14B) or text_encoder.
    #[arg(long, default_value = "transformer")]
    part: String,
    /// Block type: q8_0, q6_k, q5_k, q4_k_m (Q4_K with Q6_K for attention values and the
    /// feed-forward's down projection, llama.cpp's mix), q4_k or f16.
    #[arg(long = "type", default_value = "q8_0")]
    qtype: String,
    /// Output file (.gguf).
    #[arg(short, long)]
    output: PathBuf,
    /// Correct each quantized matrix's bias for its rounding (the transformer only): first runs
    /// short generations (small size, few steps; from --calibration-image for image-to-video
    /// models) to record every layer's mean input, then stores `b − (Ŵ − W)·E[x]`. Halves a 4-bit forward's error; the file stays a
    /// plain GGUF any reader runs.
    #[arg(long)]
    calibrate: bool,
    /// Prompts for --calibrate, one per line (default: four built-in ones).
    #[arg(long, requires = "calibrate")]
    calibration_prompts: Option<PathBuf>,
    /// Denoising steps of each calibration generation.
    #[arg(long, default_value_t = 10, requires = "calibrate")]
    calibration_steps: usize,
    /// A first image for the calibration generations (repeatable; the prompts take them in turn):
    /// needed for an image-to-video model, used by any model that takes a first image. Pictures
    /// like the ones you will animate.
    #[arg(long = "calibration-image", requires = "calibrate")]
    calibration_images: Vec<PathBuf>,
    /// Run the calibration on the CPU even when a GPU is available.
    #[arg(long, requires = "calibrate")]
    cpu: bool,
}

/// What `--calibrate` generates when no prompts are given: varied scenes, so that the mean inputs
/// are not one picture's.
const CALIBRATION_PROMPTS: [&str; 4] = [
    "a red circle moving right on a white background",
    "a corgi running on a beach at sunset, waves in the background",
    "a busy city street at night with neon signs and cars, rain",
    "close-up of a woman's face smiling in soft window light",
];

/// The layers' mean inputs over short generations of `prompts` by the model in `dir`.
fn calibrate(
    dir: &std::path::Path,
    prompts: &[String],
    images: &[PathBuf],
    steps: usize,
    cpu: bool,
) -> anyhow::Result<kino_engine::calibration::InputMeans> {
    use anyhow::Context;
    use kino_engine::device::{self, DeviceChoice};
    use kino_engine::wan::pipeline::{
        Conditioning, GenerateRequest, PipelineOptions, RgbImage, WanPipeline,
    };
    if steps == 0 {
        anyhow::bail!("--calibration-steps 0: give at least 1 (10 is the default)");
    }
    // Decode the images before any model is opened.
    let mut pictures = Vec::with_capacity(images.len());
    for p in images {
        let bytes = super::generate::read_input_bytes(p, "--calibration-image")?;
        let frame = kino_media::decode_image(&bytes)
            .map_err(|e| anyhow::anyhow!("--calibration-image {}: {e}", p.display()))?;
        pictures.push(frame);
    }
    let dev = device::open(if cpu {
        DeviceChoice::Cpu
    } else {
        DeviceChoice::Auto
    })?;
    let mut pipeline = WanPipeline::open(dir, PipelineOptions::for_device(dev))
        .with_context(|| format!("opening model {} for the calibration", dir.display()))?;
    // Small and short: the model's aspect with the long side at most 320 pixels, up to 9 frames.
    let d = pipeline.defaults().clone();
    let (mw, mh) = pipeline.size_multiple();
    let scale = (320.0 / d.width.max(d.height) as f64).min(1.0);
    let fit = |v: usize, m: usize| (((v as f64 * scale) / m as f64).round() as usize).max(1) * m;
    let (width, height) = (fit(d.width, mw), fit(d.height, mh));
    let step = pipeline.frame_step();
    let frames = (d.num_frames.min(9).saturating_sub(1)) / step * step + 1;
    let caps = pipeline.capabilities();
    if !caps.text && pictures.is_empty() {
        anyhow::bail!(
            "--calibrate: {} is an image-to-video model, so its calibration generations need first \
             images: add --calibration-image FILE (one or more, pictures like the ones you will \
             animate)",
            dir.display()
        );
    }
    if !caps.image && !pictures.is_empty() {
        anyhow::bail!(
            "--calibration-image: {} does not take a first image; leave the images out",
            dir.display()
        );
    }
    let mut firsts = Vec::with_capacity(pictures.len());
    for f in &pictures {
        let fitted = kino_media::fit_crop(f, width as u32, height as u32)?;
        let (w, h) = (fitted.width() as usize, fitted.height() as usize);
        firsts.push(RgbImage::new(w, h, fitted.into_data())?);
    }
    let ((), means) = kino_engine::calibration::record(|| {
        for (i, prompt) in prompts.iter().enumerate() {
            eprintln!(
                "calibrate: generation {} of {} ({width}x{height}, {frames} frames, {steps} steps): {prompt}",
                i + 1,
                prompts.len()
            );
            let req = GenerateRequest {
                prompt: prompt.clone(),
                width: Some(width),
                height: Some(height),
                num_frames: Some(frames),
                num_inference_steps: Some(steps),
                seed: Some(i as u64),
                conditioning: match firsts.get(i % firsts.len().max(1)) {
                    Some(first) => Conditioning::Image {
                        first: first.clone(),
                        last: None,
                    },
                    None => Conditioning::Text,
                },
                ..Default::default()
            };
            pipeline.generate(&req, &mut |_| Ok(()))?;
        }
        Ok(())
    })
    .context("--calibrate: the calibration generations failed")?;
    Ok(means)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (part, folder) = match a.part.as_str() {
        "transformer" => (Part::Transformer, "transformer"),
        "transformer_2" | "transformer-2" => (Part::Transformer, "transformer_2"),
        "text_encoder" | "text-encoder" => (Part::TextEncoder, "text_encoder"),
        other => anyhow::bail!(
            "--part {other}: choose transformer, transformer_2 or text_encoder (the VAE stays in f32)"
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
    let component = dir.join(folder);
    let two_experts = dir.join("transformer_2").is_dir();
    if folder == "transformer_2" && !two_experts {
        anyhow::bail!(
            "--part transformer_2: {} has one transformer; transformer_2 is the low-noise expert \
             of a two-expert model (Wan2.2 A14B)",
            dir.display()
        );
    }
    if two_experts && part == Part::Transformer {
        // `--model FILE.gguf,…` tells the experts apart by their file names, as ComfyUI's.
        let name = a
            .output
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .to_ascii_lowercase()
                    .replace(['-', '.'], "_")
            })
            .unwrap_or_default();
        let (says, other) = if folder == "transformer" {
            ("high_noise", "low_noise")
        } else {
            ("low_noise", "high_noise")
        };
        if !name.contains(says) || name.contains(other) {
            anyhow::bail!(
                "-o {}: this model has two experts and --part {folder} is the {} one; put \
                 `{says}` in the file name (e.g. wan2.2-{says}-{}.gguf) so that --model knows \
                 which expert the file is",
                a.output.display(),
                says.replace('_', "-"),
                a.qtype.to_lowercase()
            );
        }
    }
    let start = std::time::Instant::now();
    let means = if a.calibrate {
        if part != Part::Transformer {
            anyhow::bail!(
                "--calibrate corrects biases, and the text encoder's (UMT5's) matrices have none: \
                 use it with --part transformer or transformer_2"
            );
        }
        let prompts: Vec<String> = match &a.calibration_prompts {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--calibration-prompts {}: {e}", f.display()))?;
                let p: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                if p.is_empty() {
                    anyhow::bail!(
                        "--calibration-prompts {}: the file has no prompts (one per line)",
                        f.display()
                    );
                }
                p
            }
            None => CALIBRATION_PROMPTS.iter().map(|p| p.to_string()).collect(),
        };
        Some(
            calibrate(
                &dir,
                &prompts,
                &a.calibration_images,
                a.calibration_steps,
                a.cpu,
            )?
            .component(folder),
        )
    } else {
        None
    };
    let report = kino_engine::gguf::quantize_component(
        &component,
        part,
        dtype,
        &a.output,
        means.as_ref(),
        |i, n| {
            if i % 50 == 0 {
                eprintln!("quantize: tensor {i} of {n}");
            }
        },
    )?;
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
    if a.calibrate {
        println!(
            "biases of {} quantized matrices corrected for their rounding",
            report.bias_corrected
        );
    } else if part == Part::Transformer
        && kino_engine::gguf::is_quantized(dtype.base)
        && dtype.base != candle_core::quantized::GgmlDType::Q8_0
    {
        eprintln!(
            "tip: --calibrate corrects the biases for the 4- to 6-bit rounding (on Wan2.1-1.3B's \
             shapes it halves a Q4_K forward's error); it first runs a few short generations"
        );
    }
    Ok(())
}
