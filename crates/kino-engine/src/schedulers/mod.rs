//! Diffusion schedulers, each mirroring its diffusers class.

pub mod flow_match_euler;
pub mod unipc;

use std::path::Path;

use candle_core::Tensor;

use crate::Result;

/// What a pipeline needs from a scheduler (the subset of diffusers' `SchedulerMixin` that
/// `WanPipeline` uses).
pub trait Scheduler: Send {
    /// Overrides `flow_shift` / `shift` before `set_timesteps` (the `--shift` option).
    fn set_shift(&mut self, shift: f64);
    /// The shift in force.
    fn shift(&self) -> f64;
    /// Prepares `num_inference_steps` steps; resets any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps (sigma × num_train_timesteps) to call the model with, one per step.
    fn timesteps(&self) -> &[f64];
    /// The sigmas, one per step plus the final one.
    fn sigmas(&self) -> &[f64];
    /// One denoising step: from the model output at `timesteps()[step_index]` and the current
    /// sample, the previous sample. Must be called in order, once per timestep.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<Tensor>;
}

/// Scheduler classes we implement.
pub const SUPPORTED_SCHEDULERS: [&str; 2] =
    ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"];

/// Reads `DIR/scheduler_config.json` and builds the scheduler its `_class_name` names.
pub fn from_folder(dir: &Path) -> Result<Box<dyn Scheduler>> {
    let path = dir.join("scheduler_config.json");
    let raw: serde_json::Value = crate::loading::read_json(&path)?;
    let class = raw
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("UniPCMultistepScheduler")
        .to_string();
    let bad = |e: serde_json::Error| crate::Error::BadFile {
        path: path.clone(),
        message: format!("scheduler config does not fit {class}: {e}"),
    };
    match class.as_str() {
        "UniPCMultistepScheduler" => Ok(Box::new(unipc::UniPCMultistepScheduler::new(
            serde_json::from_value(raw.clone()).map_err(bad)?,
        )?)),
        "FlowMatchEulerDiscreteScheduler" => Ok(Box::new(
            flow_match_euler::FlowMatchEulerDiscreteScheduler::new(
                serde_json::from_value(raw.clone()).map_err(bad)?,
            )?,
        )),
        _ => Err(crate::Error::UnsupportedClass {
            path,
            found: class,
            supported: SUPPORTED_SCHEDULERS.join(", "),
        }),
    }
}
