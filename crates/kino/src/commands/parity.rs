//! `kino parity COMPONENT --model DIR --input IN.safetensors --output OUT.safetensors`

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use kino_engine::device::{self, DeviceChoice};
use kino_engine::parity::{self, Component, ParityOptions};

#[derive(clap::Args)]
pub struct Args {
    /// text-encoder, transformer, vae-encode, vae-decode, image-encoder, pipeline, pipeline-i2v,
    /// pipeline-v2v, pipeline-df or pipeline-vace.
    component: String,
    /// The component folder (text_encoder/, transformer/, vae/, image_encoder/) or, for the
    /// pipeline components, the whole model.
    #[arg(long)]
    model: PathBuf,
    /// Input tensors (safetensors).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the output tensors (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Denoising steps (pipeline only; default 3).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (pipeline only; default 5).
    #[arg(long)]
    guidance: Option<f64>,
    /// Video-to-video strength, in (0, 1] (pipeline-v2v only; default 0.8, as the reference).
    #[arg(long)]
    strength: Option<f64>,
    /// pipeline-df: frames of the whole video (default: those of `latents_0`).
    #[arg(long)]
    num_frames: Option<usize>,
    /// pipeline-df: frames of one window (default 97, the reference's).
    #[arg(long)]
    base_num_frames: Option<usize>,
    /// pipeline-df: frames each later window takes from the end of the video (default: none).
    #[arg(long)]
    overlap_history: Option<usize>,
    /// pipeline-df: steps each causal block lags the previous one (default 0).
    #[arg(long)]
    ar_step: Option<usize>,
    /// pipeline-df: frames per causal block (default: the transformer's num_frame_per_block).
    #[arg(long)]
    causal_block_size: Option<usize>,
    /// pipeline-df: noise level given to the prefix frames (default 0).
    #[arg(long)]
    addnoise_condition: Option<f64>,
    /// pipeline-df: the video's frame rate (default 24; 16 selects the other fps embedding).
    #[arg(long)]
    fps: Option<u32>,
    /// pipeline-vace: how strongly the control branch steers, one value for every VACE layer
    /// or comma-separated, one per layer (e.g. 0.4,1.3; default 1).
    #[arg(long, value_delimiter = ',')]
    conditioning_scale: Option<Vec<f64>>,
    /// Two-expert pipelines: the low-noise expert's guidance (the reference's
    /// guidance_scale_2; default: --guidance).
    #[arg(long)]
    guidance_2: Option<f64>,
    /// Pipeline components: a LoRA adapter for the transformer, FILE or FILE:SCALE (scale 1 if
    /// left out); repeat for several (their scales as `set_adapters` weights).
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// A LoRA adapter for transformer_2 (two-expert models; `load_into_transformer_2`).
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora_2: Vec<String>,
    /// Fold the adapters into the weights at load (`fuse_lora`) instead of applying them on the
    /// fly.
    #[arg(long)]
    fuse_lora: bool,
    /// pipeline, pipeline-i2v, pipeline-v2v: a step cache, as diffusers' hooks with their
    /// option names: first-block:THRESHOLD, mag:THRESHOLD[,max_skip_steps=N,retention_ratio=R]
    /// (with --mag-ratios), mag:calibrate (with --write-mag-ratios) or
    /// taylorseer:INTERVAL[,max_order=N,disable_cache_before_step=N,cache_identifiers=REGEX].
    #[arg(long, value_name = "CACHE")]
    cache: Option<String>,
    /// MagCache's magnitude ratios for this model: a JSON list of numbers, one per step (made
    /// by a `--cache mag:calibrate` run).
    #[arg(long, value_name = "FILE")]
    mag_ratios: Option<PathBuf>,
    /// With --cache mag:calibrate: where to write the measured ratios (a JSON list).
    #[arg(long, value_name = "FILE")]
    write_mag_ratios: Option<PathBuf>,
    /// Reference outputs to compare with: prints ‖out − ref‖/‖ref‖ for each tensor.
    #[arg(long)]
    expected: Option<PathBuf>,
    /// Where to run: cpu (the parity contract), cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32 (the parity contract) or bf16 (the GPU default; the VAE stays f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Pipeline only: also decode the final latents with the VAE (output tensor `video`).
    #[arg(long)]
    decode: bool,
    /// Write wall-clock timings (load, each step, VAE decode; device synchronized) as JSON here.
    #[arg(long)]
    timings: Option<PathBuf>,
}

fn parse_device(s: &str) -> anyhow::Result<DeviceChoice> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        "metal" => Ok(DeviceChoice::Metal),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(DeviceChoice::Cuda(i)),
            _ => anyhow::bail!("unknown device `{s}`; use cpu, cuda, cuda:N or metal"),
        },
    }
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => anyhow::bail!("unknown dtype `{s}`; use f32, bf16 or f16"),
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let component: Component = a.component.parse()?;
    if !component.is_pipeline() && (a.steps.is_some() || a.guidance.is_some() || a.decode) {
        anyhow::bail!(
            "--steps, --guidance and --decode apply only to the pipeline components (pipeline, pipeline-i2v, pipeline-v2v, pipeline-df, pipeline-vace)"
        );
    }
    if component != Component::PipelineVace && a.conditioning_scale.is_some() {
        anyhow::bail!("--conditioning-scale applies only to `pipeline-vace`");
    }
    if !component.is_pipeline() && a.guidance_2.is_some() {
        anyhow::bail!("--guidance-2 applies only to the pipeline components");
    }
    if component != Component::PipelineV2v && a.strength.is_some() {
        anyhow::bail!("--strength applies only to `pipeline-v2v`");
    }
    let df = kino_engine::parity::DfOptions {
        num_frames: a.num_frames,
        base_num_frames: a.base_num_frames,
        overlap_history: a.overlap_history,
        ar_step: a.ar_step,
        causal_block_size: a.causal_block_size,
        addnoise_condition: a.addnoise_condition,
        fps: a.fps,
    };
    let df = if component == Component::PipelineDf {
        Some(df)
    } else if df != kino_engine::parity::DfOptions::default() {
        anyhow::bail!(
            "--num-frames, --base-num-frames, --overlap-history, --ar-step, --causal-block-size, --addnoise-condition and --fps apply only to `pipeline-df`"
        );
    } else {
        None
    };
    let cache = super::generate::cache_config(
        a.cache.as_deref(),
        a.mag_ratios.as_deref(),
        a.write_mag_ratios.as_deref(),
    )?;
    let choice = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let dev = device::open(choice).with_context(|| {
        format!(
            "opening device `{}` (is this binary built with the matching feature, e.g. --features cuda?)",
            a.device
        )
    })?;
    let inputs = parity::read_tensors(&a.input)?;
    let (out, timings, cache_report) = parity::run_report(
        component,
        &a.model,
        &inputs,
        ParityOptions {
            steps: a.steps,
            guidance: a.guidance,
            dtype: Some(dtype),
            decode: a.decode,
            strength: a.strength,
            df,
            conditioning_scale: a.conditioning_scale,
            guidance_2: a.guidance_2,
            lora: a.lora.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
            lora_2: a
                .lora_2
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?,
            fuse_lora: a.fuse_lora,
            cache,
        },
        &dev,
    )
    .with_context(|| format!("running {} from {}", component.name(), a.model.display()))?;
    parity::write_tensors(&a.output, &out)?;
    if let Some(report) = &cache_report {
        println!("{}", report.stats.message());
        if let (Some(path), Some(ratios)) = (&a.write_mag_ratios, &report.mag_ratios) {
            kino_engine::hooks::write_mag_ratios(path, ratios)?;
            println!(
                "wrote {} MagCache ratios to {}",
                ratios.len(),
                path.display()
            );
        }
    }
    if let Some(path) = &a.timings {
        let json = serde_json::to_string_pretty(&timings)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing timings to {}", path.display()))?;
    }
    let mut names: Vec<_> = out.keys().cloned().collect();
    names.sort();
    for n in &names {
        println!("{n}: {:?}", out[n].dims());
    }
    if let Some(exp) = a.expected {
        let expected = parity::read_tensors(&exp)?;
        for n in &names {
            let e = expected
                .get(n)
                .with_context(|| format!("{} has no tensor `{n}`", exp.display()))?;
            let err = kino_engine::testing::rel_error(&out[n], e)?;
            println!("{n}: relative error {err:.3e}");
        }
    }
    Ok(())
}
