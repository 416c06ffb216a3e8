//! Mirrors diffusers' `FlowMatchEulerDiscreteScheduler`
//! (`diffusers/schedulers/scheduling_flow_match_euler_discrete.py`, diffusers 0.42.1): the Euler
//! step `x_{t-1} = x_t + (sigma_next - sigma) * v` of a flow-matching model, with a static
//! `shift`. Refused by [`FlowMatchEulerDiscreteScheduler::new`]: `use_dynamic_shifting` (needs
//! the resolution-dependent `mu`), `invert_sigmas`, `shift_terminal`, Karras/exponential/beta
//! sigmas and `stochastic_sampling`.
//!
//! Precision, as in the reference: `__init__` computes `sigma_max`/`sigma_min` in float32 torch;
//! `set_timesteps` spaces them in float64 numpy, applies the shift in float64, casts `sigmas` to
//! float32 and computes `timesteps = sigmas * num_train_timesteps` in float32. `step` upcasts the
//! sample to float32 and returns the model output's dtype.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{check_step, linspace, promote, unsupported};
use crate::{Error, Result};

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// `scheduler_config.json` fields, with the defaults of the reference `__init__`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: String,
    pub stochastic_sampling: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".into(),
            stochastic_sampling: false,
        }
    }
}

/// Euler sampler for flow-matching models.
#[derive(Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: Config,
    /// The reference's float32 timesteps, held exactly as f64.
    timesteps: Vec<f64>,
    /// The reference's float32 sigmas (N + 1 values, the last 0), held exactly as f64.
    sigmas: Vec<f64>,
    step_index: usize,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Builds the scheduler; refuses options we do not implement, naming what is supported.
    pub fn new(config: Config) -> Result<Self> {
        let no = |what: String, supported: &str| Err(unsupported(CLASS, what, supported));
        if !["exponential", "linear"].contains(&config.time_shift_type.as_str()) {
            return no(
                format!("time_shift_type \"{}\"", config.time_shift_type),
                "\"exponential\", \"linear\"",
            );
        }
        for (on, name) in [
            (
                config.use_dynamic_shifting,
                "use_dynamic_shifting (needs a resolution-dependent mu)",
            ),
            (config.invert_sigmas, "invert_sigmas"),
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.stochastic_sampling, "stochastic_sampling"),
        ] {
            if on {
                return no(
                    format!("{name} true"),
                    "the static shift with use_dynamic_shifting, invert_sigmas, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas and stochastic_sampling all false",
                );
            }
        }
        if config.shift_terminal.is_some_and(|s| s != 0.0) {
            return no("shift_terminal".into(), "shift_terminal null");
        }
        if config.num_train_timesteps == 0 {
            return no("num_train_timesteps 0".into(), "a positive number");
        }
        Ok(Self {
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
        })
    }

    /// The config in force (with `shift` as set by `set_shift`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `(sigma_max, sigma_min)` as `__init__` computes them: the shifted first and last of
    /// `linspace(1, N, N) / N`, in float32.
    fn sigma_range(&self) -> (f64, f64) {
        let n = self.config.num_train_timesteps as f32;
        // shift * sigmas / (1 + (shift - 1) * sigmas), the Python floats cast to float32
        let shift = self.config.shift as f32;
        let shift_m1 = (self.config.shift - 1.0) as f32;
        let shifted = |s: f32| shift * s / (1.0 + shift_m1 * s);
        // sigmas[0] = N / N = 1 exactly; sigmas[-1] = 1 / N.
        (shifted(1.0) as f64, shifted(1.0 / n) as f64)
    }
}

impl super::Scheduler for FlowMatchEulerDiscreteScheduler {
    /// Sets `shift` as `FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)` does:
    /// unlike the reference's `set_shift`, `sigma_max`/`sigma_min` follow the new shift too.
    fn set_shift(&mut self, shift: f64) {
        self.config.shift = shift;
    }

    fn shift(&self) -> f64 {
        self.config.shift
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::InvalidRequest(format!(
                "{CLASS}: the number of inference steps must be at least 1"
            )));
        }
        let shift = self.config.shift;
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "{CLASS}: shift must be a positive number, got {shift}"
            )));
        }
        let n_train = self.config.num_train_timesteps as f64;
        let (sigma_max, sigma_min) = self.sigma_range();
        // timesteps = np.linspace(_sigma_to_t(sigma_max), _sigma_to_t(sigma_min), N)
        let timesteps = linspace(
            sigma_max * n_train,
            sigma_min * n_train,
            num_inference_steps,
        );
        // sigmas = timesteps / N; sigmas = shift * sigmas / (1 + (shift - 1) * sigmas); float32
        let sigmas: Vec<f32> = timesteps
            .iter()
            .map(|t| t / n_train)
            .map(|s| (shift * s / (1.0 + (shift - 1.0) * s)) as f32)
            .collect();
        // timesteps = sigmas * num_train_timesteps (float32)
        let n_train32 = self.config.num_train_timesteps as f32;
        self.timesteps = sigmas.iter().map(|&s| (s * n_train32) as f64).collect();
        self.sigmas = sigmas.iter().map(|&s| s as f64).collect();
        self.sigmas.push(0.0);
        self.step_index = 0; // set_begin_index(0), as WanPipeline does
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `prev_sample = sample.float() + (sigma_next - sigma) * model_output`, cast back to the
    /// model output's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let num_steps = self.timesteps.len();
        check_step(
            CLASS,
            step_index,
            self.step_index,
            num_steps,
            model_output,
            sample,
        )?;

        // "Upcast to avoid precision issues when computing prev_sample"
        let sample = sample.to_dtype(DType::F32)?;
        let sigma = self.sigmas[step_index] as f32;
        let sigma_next = self.sigmas[step_index + 1] as f32;
        let dt = sigma_next - sigma;
        // dt * model_output stays in the model output's dtype (dt is a 0-dim float32 tensor).
        let update = model_output.affine(dt as f64, 0.0)?;
        let dtype = promote(DType::F32, model_output.dtype());
        let prev_sample = sample.to_dtype(dtype)?.add(&update.to_dtype(dtype)?)?;

        self.step_index += 1;
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }

    fn boxed_clone(&self) -> Box<dyn super::Scheduler> {
        Box::new(self.clone())
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        super::check_begin(CLASS, index, self.timesteps.len())?;
        self.step_index = index;
        Ok(())
    }

    /// `scale_noise`: `σ · noise + (1 − σ) · sample`, σ cast to the sample's dtype.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas.get(index).ok_or_else(|| {
            Error::InvalidRequest(format!("{CLASS}.scale_noise: no sigma at index {index}"))
        })? as f32;
        Ok(((noise * sigma as f64)? + (original * (1.0f32 - sigma) as f64)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::Scheduler;
    use candle_core::Device;

    #[test]
    fn defaults_and_unknown_fields() {
        let cfg: Config =
            serde_json::from_str(r#"{"shift": 3.0, "a_new_field": [1]}"#).expect("parses");
        assert_eq!(cfg.shift, 3.0);
        assert_eq!(cfg.num_train_timesteps, 1000);
        let defaults: Config = serde_json::from_str("{}").expect("parses");
        assert_eq!(defaults, Config::default());
    }

    #[test]
    fn refuses_unsupported_options() {
        for (patch, expect) in [
            (r#"{"use_dynamic_shifting": true}"#, "use_dynamic_shifting"),
            (r#"{"invert_sigmas": true}"#, "invert_sigmas"),
            (r#"{"stochastic_sampling": true}"#, "stochastic_sampling"),
            (r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas"),
            (r#"{"shift_terminal": 0.02}"#, "shift_terminal"),
            (
                r#"{"time_shift_type": "cubic"}"#,
                "\"exponential\", \"linear\"",
            ),
        ] {
            let cfg: Config = serde_json::from_str(patch).expect("parses");
            let err = FlowMatchEulerDiscreteScheduler::new(cfg).err();
            let msg = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                matches!(err, Some(Error::InvalidRequest(_))) && msg.contains(expect),
                "{patch}: {msg}"
            );
        }
    }

    #[test]
    fn step_errors() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = FlowMatchEulerDiscreteScheduler::new(Config::default())?;
        let x = Tensor::zeros((1, 4, 2, 4, 4), DType::F32, &dev)?;
        assert!(matches!(s.step(&x, 0, &x), Err(Error::InvalidRequest(_))));
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidRequest(_))));
        s.set_timesteps(2)?;
        let bad = Tensor::zeros((4, 2, 4, 4), DType::F32, &dev)?;
        assert!(matches!(s.step(&bad, 0, &x), Err(Error::InvalidRequest(_))));
        assert!(matches!(s.step(&x, 1, &x), Err(Error::InvalidRequest(_))));
        s.step(&x, 0, &x)?;
        s.step(&x, 1, &x)?;
        assert!(matches!(s.step(&x, 2, &x), Err(Error::InvalidRequest(_))));
        Ok(())
    }

    #[test]
    fn bf16_model_output_returns_bf16() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = FlowMatchEulerDiscreteScheduler::new(Config::default())?;
        s.set_timesteps(1)?;
        let x = Tensor::ones((2, 3), DType::F32, &dev)?;
        let v = Tensor::ones((2, 3), DType::BF16, &dev)?;
        let out = s.step(&v, 0, &x)?;
        assert_eq!(out.dtype(), DType::BF16);
        // One step from sigma 1 to 0: x - v = 0.
        let sum = out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(sum, 0.0);
        Ok(())
    }
}
