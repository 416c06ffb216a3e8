//! Mirrors diffusers' `UniPCMultistepScheduler`. PLACEHOLDER: being written; replace this whole file.

use candle_core::Tensor;

use crate::Result;

/// `scheduler_config.json` fields.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Config {}

/// Placeholder.
pub struct UniPCMultistepScheduler {
    _config: Config,
}

impl UniPCMultistepScheduler {
    pub fn new(config: Config) -> Result<Self> {
        let _ = Self { _config: config };
        Err(crate::Error::InvalidRequest("UniPCMultistepScheduler is not implemented yet".into()))
    }
}

impl super::Scheduler for UniPCMultistepScheduler {
    fn set_shift(&mut self, _shift: f64) {}
    fn shift(&self) -> f64 {
        0.0
    }
    fn set_timesteps(&mut self, _n: usize) -> Result<()> {
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &[]
    }
    fn sigmas(&self) -> &[f64] {
        &[]
    }
    fn step(&mut self, model_output: &Tensor, _i: usize, _sample: &Tensor) -> Result<Tensor> {
        Ok(model_output.clone())
    }
}
