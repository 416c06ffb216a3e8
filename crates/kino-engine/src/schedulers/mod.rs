//! Diffusion schedulers, each mirroring its diffusers class.
//!
//! - [`unipc::UniPCMultistepScheduler`] mirrors `UniPCMultistepScheduler`, what Wan's
//!   `scheduler_config.json` names (flow-prediction mode).
//! - [`flow_match_euler::FlowMatchEulerDiscreteScheduler`] mirrors
//!   `FlowMatchEulerDiscreteScheduler`.
//!
//! As in the reference, schedules (`timesteps`, `sigmas`) are computed on the host in the
//! precision diffusers uses (numpy float64, then float32 where it casts), and the per-step tensor
//! math runs in the sample's dtype with float32 scalar coefficients.

pub mod flow_match_euler;
pub mod unipc;

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// What a pipeline needs from a scheduler (the subset of diffusers' `SchedulerMixin` that
/// `WanPipeline` uses).
pub trait Scheduler: Send {
    /// Overrides `flow_shift` / `shift` before `set_timesteps` (the `--shift` option), with the
    /// effect of `Class.from_config(config, flow_shift=shift)` in diffusers.
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
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor)
        -> Result<Tensor>;
    /// The caller wrote `new_sample` over the memory of the sample it last passed to `step`.
    /// The reference's UniPC keeps that very tensor (a view into the pipeline's latents) as
    /// `last_sample` when no corrector ran, so SkyReels' diffusion-forcing loop, which assigns
    /// each frame's result in place, changes what the next corrector reads. Schedulers without
    /// such state ignore it.
    fn sample_overwritten(&mut self, _new_sample: &Tensor) {}
    /// A copy with the same configuration, schedule and state (the reference's `deepcopy`).
    fn boxed_clone(&self) -> Box<dyn Scheduler>;
    /// `config.num_train_timesteps` (Wan: 1000), the scale of `boundary_ratio`.
    fn num_train_timesteps(&self) -> usize;
    /// Makes the next `step` the one at `index` (after `set_timesteps`), with no multistep
    /// history: what the reference's `_init_step_index` does when a pipeline starts part-way
    /// down the schedule (video-to-video).
    fn set_begin_index(&mut self, index: usize) -> Result<()>;
    /// The forward process at `sigmas()[index]`: UniPC's `add_noise`
    /// (`(1 − σ)·original + σ·noise`), flow-match Euler's `scale_noise`
    /// (`σ·noise + (1 − σ)·original`), in the sample's dtype as the reference computes them.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}

/// The reference's `index_for_timestep`: the position of `timestep` in `timesteps`; the second
/// one when it occurs more than once, the last position when it does not occur.
pub fn index_for_timestep(timesteps: &[f64], timestep: f64) -> usize {
    let hits: Vec<usize> = (0..timesteps.len())
        .filter(|&i| timesteps[i] == timestep)
        .collect();
    match hits.as_slice() {
        [] => timesteps.len().saturating_sub(1),
        [only] => *only,
        [_, second, ..] => *second,
    }
}

/// `get_timesteps` of the image/video-to-video pipelines: how many of `num_inference_steps`
/// steps a `strength` runs, and the index of the first one (`t_start`).
pub fn strength_start(num_inference_steps: usize, strength: f64) -> (usize, usize) {
    let init = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    let t_start = num_inference_steps.saturating_sub(init);
    (t_start, num_inference_steps - t_start)
}

pub(crate) fn check_begin(class: &str, index: usize, num_steps: usize) -> Result<()> {
    if num_steps == 0 {
        return Err(Error::InvalidRequest(format!(
            "{class}: call set_timesteps before set_begin_index"
        )));
    }
    if index >= num_steps {
        return Err(Error::InvalidRequest(format!(
            "{class}: begin index {index} is past the last of {num_steps} steps"
        )));
    }
    Ok(())
}

/// Scheduler classes we implement.
pub const SUPPORTED_SCHEDULERS: [&str; 2] =
    ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"];

/// Reads `DIR/scheduler_config.json` and builds the scheduler its `_class_name` names.
pub fn from_folder(dir: &Path) -> Result<Box<dyn Scheduler>> {
    let path = dir.join("scheduler_config.json");
    if !path.is_file() {
        return Err(Error::MissingFile {
            path,
            hint: "a diffusers scheduler/ folder holds scheduler_config.json".into(),
        });
    }
    let raw: serde_json::Value = crate::loading::read_json(&path)?;
    let class = raw
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("UniPCMultistepScheduler")
        .to_string();
    let bad = |e: serde_json::Error| Error::BadFile {
        path: path.clone(),
        message: format!("scheduler config does not fit {class}: {e}"),
    };
    // Options we do not implement are refused by `new`; name the file in that error.
    let in_file = |e: Error| match e {
        Error::InvalidRequest(m) => Error::InvalidRequest(format!("{}: {m}", path.display())),
        e => e,
    };
    match class.as_str() {
        "UniPCMultistepScheduler" => Ok(Box::new(
            unipc::UniPCMultistepScheduler::new(serde_json::from_value(raw.clone()).map_err(bad)?)
                .map_err(in_file)?,
        )),
        "FlowMatchEulerDiscreteScheduler" => Ok(Box::new(
            flow_match_euler::FlowMatchEulerDiscreteScheduler::new(
                serde_json::from_value(raw.clone()).map_err(bad)?,
            )
            .map_err(in_file)?,
        )),
        _ => Err(Error::UnsupportedClass {
            path,
            found: class,
            supported: SUPPORTED_SCHEDULERS.join(", "),
        }),
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included), computed as numpy 2.x does so the
/// float64 values agree bit for bit: `i * step + start`, with the last value set to `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let div = num.saturating_sub(1);
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if div > 0 {
        y[div] = stop;
    }
    y
}

/// The dtype PyTorch's type promotion gives a binary op between two float tensors.
pub(crate) fn promote(a: DType, b: DType) -> DType {
    match (a, b) {
        _ if a == b => a,
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        _ => DType::F32,
    }
}

/// Checks a `step` call: `set_timesteps` was called, steps come in order (`expected` is the next
/// one of `num_steps`), and the model output and the sample have the same shape.
pub(crate) fn check_step(
    class: &str,
    step_index: usize,
    expected: usize,
    num_steps: usize,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<()> {
    if num_steps == 0 {
        return Err(Error::InvalidRequest(format!(
            "{class}: call set_timesteps before step"
        )));
    }
    if step_index != expected || step_index >= num_steps {
        return Err(Error::InvalidRequest(format!(
            "{class}: step {step_index} called out of order; the next step is {expected} of {num_steps}"
        )));
    }
    if model_output.dims() != sample.dims() {
        return Err(Error::InvalidRequest(format!(
            "{class}.step: the model output has shape {:?} but the sample has shape {:?}; they must be equal",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

/// Reference config fields we refuse, with what we support instead.
pub(crate) fn unsupported(class: &str, what: String, supported: &str) -> Error {
    Error::InvalidRequest(format!(
        "{class}: {what} is not supported; supported: {supported}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixtures_dir, rel_error};
    use candle_core::Device;

    /// Relative distance of two schedules, elementwise; exact zeros must match exactly.
    fn schedule_error(ours: &[f64], reference: &[f64]) -> f64 {
        assert_eq!(ours.len(), reference.len(), "schedule lengths differ");
        ours.iter()
            .zip(reference)
            .map(|(a, b)| {
                if *b == 0.0 {
                    if *a == 0.0 {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                } else {
                    ((a - b) / b).abs()
                }
            })
            .fold(0.0, f64::max)
    }

    #[derive(serde::Deserialize)]
    struct Case {
        class: String,
        runs: Vec<Run>,
    }

    #[derive(serde::Deserialize)]
    struct Run {
        model: String,
        num_inference_steps: usize,
        shift: Option<f64>,
        input: String,
        expected: String,
        tolerance: f64,
        schedule_tolerance: f64,
    }

    /// Runs every fixture in `fixtures/data/schedulers/`, WanPipeline's loop: `set_timesteps`,
    /// then `step` once per timestep, comparing the schedule and every intermediate sample.
    #[test]
    fn fixtures_match_reference() -> Result<()> {
        let root = fixtures_dir().join("schedulers");
        let mut cases: Vec<_> = std::fs::read_dir(&root)
            .map_err(|e| Error::BadFile {
                path: root.clone(),
                message: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("case.json").is_file())
            .collect();
        cases.sort();
        assert!(
            cases.len() >= 7,
            "expected the scheduler fixtures in {}",
            root.display()
        );
        let dev = Device::Cpu;
        let mut classes = std::collections::BTreeSet::new();
        let mut failures = Vec::new();
        for case_dir in cases {
            let case: Case = crate::loading::read_json(&case_dir.join("case.json"))?;
            classes.insert(case.class.clone());
            for run in &case.runs {
                let mut scheduler = from_folder(&case_dir.join(&run.model))?;
                if let Some(shift) = run.shift {
                    scheduler.set_shift(shift);
                    assert_eq!(scheduler.shift(), shift);
                }
                scheduler.set_timesteps(run.num_inference_steps)?;
                let input = candle_core::safetensors::load(case_dir.join(&run.input), &dev)?;
                let expected = candle_core::safetensors::load(case_dir.join(&run.expected), &dev)?;
                let get = |m: &std::collections::HashMap<String, Tensor>, k: &str| {
                    m.get(k)
                        .cloned()
                        .ok_or_else(|| Error::InvalidRequest(format!("fixture tensor {k} missing")))
                };
                let ts_ref = get(&expected, "timesteps")?.to_vec1::<f64>()?;
                let sigmas_ref = get(&expected, "sigmas")?.to_vec1::<f64>()?;
                let ts_err = schedule_error(scheduler.timesteps(), &ts_ref);
                let sig_err = schedule_error(scheduler.sigmas(), &sigmas_ref);
                let label = format!(
                    "{} {} steps shift {:?}",
                    case_dir.file_name().unwrap_or_default().to_string_lossy(),
                    run.num_inference_steps,
                    run.shift
                );
                if ts_err > run.schedule_tolerance || sig_err > run.schedule_tolerance {
                    failures.push(format!(
                        "{label}: timesteps {:?} vs {:?} (err {ts_err}), sigmas {:?} vs {:?} (err {sig_err})",
                        scheduler.timesteps(),
                        ts_ref,
                        scheduler.sigmas(),
                        sigmas_ref
                    ));
                }
                let mut sample = get(&input, "sample")?;
                let model_outputs = get(&input, "model_outputs")?;
                let samples = get(&expected, "samples")?;
                let mut worst = 0f64;
                for i in 0..run.num_inference_steps {
                    sample = scheduler.step(&model_outputs.get(i)?, i, &sample)?;
                    let err = rel_error(&sample, &samples.get(i)?)?;
                    if err > run.tolerance {
                        failures.push(format!(
                            "{label}: step {i} rel error {err:.2e} > {:.0e}",
                            run.tolerance
                        ));
                    }
                    worst = worst.max(err);
                }
                println!("{label}: schedule err {ts_err:.1e}/{sig_err:.1e}, worst step rel err {worst:.2e}");
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert_eq!(
            classes.len(),
            2,
            "fixtures should cover both classes: {classes:?}"
        );
        Ok(())
    }

    #[test]
    fn unsupported_class_is_refused() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kino-sched-class-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        std::fs::write(
            dir.join("scheduler_config.json"),
            r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}"#,
        )
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let err = from_folder(&dir).err();
        let _ = std::fs::remove_dir_all(&dir);
        match err {
            Some(Error::UnsupportedClass {
                found, supported, ..
            }) => {
                assert_eq!(found, "DDIMScheduler");
                assert!(supported.contains("UniPCMultistepScheduler"));
            }
            other => panic!("expected UnsupportedClass, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn unsupported_option_names_file_and_option() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("kino-sched-opt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        std::fs::write(
            dir.join("scheduler_config.json"),
            r#"{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true,
                "prediction_type": "epsilon"}"#,
        )
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let err = from_folder(&dir).err();
        let _ = std::fs::remove_dir_all(&dir);
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("scheduler_config.json")
                && msg.contains("epsilon")
                && msg.contains("flow_prediction"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn missing_folder_is_reported() {
        let err = from_folder(Path::new("/nonexistent/scheduler")).err();
        assert!(matches!(err, Some(Error::MissingFile { .. })), "{err:?}");
    }

    #[test]
    fn linspace_matches_numpy() {
        // numpy.linspace(1, 1/1000, 4) and (999.0, 2.994011976047904, 1)
        let v = linspace(1.0, 1.0 / 1000.0, 4);
        assert_eq!(v, vec![1.0, 0.667, 0.33399999999999996, 0.001]);
        assert_eq!(linspace(999.0, 3.0, 1), vec![999.0]);
        assert!(linspace(1.0, 2.0, 0).is_empty());
    }
}
