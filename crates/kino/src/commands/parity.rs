//! `kino parity COMPONENT --model DIR --input IN.safetensors --output OUT.safetensors`

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use kino_engine::parity::{self, Component, ParityOptions};

#[derive(clap::Args)]
pub struct Args {
    /// text-encoder, transformer, vae-encode, vae-decode or pipeline.
    component: String,
    /// The component folder (text_encoder/, transformer/, vae/) or, for `pipeline`, the whole model.
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
    /// Reference outputs to compare with: prints ‖out − ref‖/‖ref‖ for each tensor.
    #[arg(long)]
    expected: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let component: Component = a.component.parse()?;
    if component != Component::Pipeline && (a.steps.is_some() || a.guidance.is_some()) {
        anyhow::bail!("--steps and --guidance apply only to the `pipeline` component");
    }
    let inputs = parity::read_tensors(&a.input)?;
    let out = parity::run(
        component,
        &a.model,
        &inputs,
        ParityOptions {
            steps: a.steps,
            guidance: a.guidance,
        },
        &Device::Cpu,
    )
    .with_context(|| format!("running {} from {}", component.name(), a.model.display()))?;
    parity::write_tensors(&a.output, &out)?;
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
