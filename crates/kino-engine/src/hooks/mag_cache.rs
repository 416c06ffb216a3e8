//! MagCache, mirroring diffusers 0.42.1 `hooks/mag_cache.py`.
//!
//! Before block 0, the accumulated magnitude-ratio error of the steps since the last computed
//! forward decides: while it stays within `threshold` (and at most `max_skip_steps` steps in a
//! row, after the first `retention_ratio` of the steps) no block runs and the forward outputs
//! the blocks' input plus the previous residual (last block's output − block 0's input).

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// diffusers `MagCacheConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct MagCacheConfig {
    /// Accumulated error within which a step is skipped (default 0.06).
    pub threshold: f64,
    /// At most this many steps skipped in a row (default 3).
    pub max_skip_steps: usize,
    /// The share of the first steps never skipped (default 0.2).
    pub retention_ratio: f64,
    /// Steps of one generation; `None`: the run's own (the reference's default is 28, which its
    /// users set to their step count).
    pub num_inference_steps: Option<usize>,
    /// The model's magnitude ratios, one per step (resampled with [`nearest_interp`] to the
    /// steps when their count differs); read as f32.
    pub mag_ratios: Option<Vec<f32>>,
    /// Skip nothing; measure the ratios of this run instead (see
    /// `WanPipeline::mag_calibration`).
    pub calibrate: bool,
}

impl Default for MagCacheConfig {
    fn default() -> Self {
        Self {
            threshold: 0.06,
            max_skip_steps: 3,
            retention_ratio: 0.2,
            num_inference_steps: None,
            mag_ratios: None,
            calibrate: false,
        }
    }
}

impl MagCacheConfig {
    /// The reference's `__post_init__` check: ratios or calibration.
    pub fn validate(&self) -> Result<()> {
        if self.mag_ratios.is_none() && !self.calibrate {
            return Err(Error::InvalidRequest(
                "mag: MagCache needs the model's magnitude ratios (a JSON list of numbers, e.g. \
                 --mag-ratios FILE); make them with a calibration run (`--cache mag:calibrate`)"
                    .into(),
            ));
        }
        if matches!(&self.mag_ratios, Some(r) if r.is_empty()) {
            return Err(Error::InvalidRequest(
                "mag: the magnitude ratio list is empty".into(),
            ));
        }
        Ok(())
    }

    /// The ratios the run uses: resampled to `steps` as the reference's `__post_init__`.
    pub(crate) fn ratios_for(&self, steps: usize) -> Vec<f32> {
        match &self.mag_ratios {
            Some(r) if r.len() != steps => nearest_interp(r, steps),
            Some(r) => r.clone(),
            None => Vec::new(),
        }
    }
}

/// Reads magnitude ratios from a JSON list of numbers (as f32).
pub fn read_mag_ratios(path: &Path) -> Result<Vec<f32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::MissingFile {
        path: path.to_path_buf(),
        hint: format!("cannot read the MagCache ratios ({e}); give a JSON list of numbers"),
    })?;
    let v: Vec<f64> = serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!(
            "MagCache ratios must be a JSON list of numbers, e.g. [1.0, 1.02, 0.99]: {e}"
        ),
    })?;
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            message: "MagCache ratios must be a non-empty list of finite numbers".into(),
        });
    }
    Ok(v.into_iter().map(|x| x as f32).collect())
}

/// Writes calibrated ratios as a JSON list.
pub fn write_mag_ratios(path: &Path, ratios: &[f64]) -> Result<()> {
    let json = serde_json::to_string(ratios).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("cannot write the MagCache ratios: {e}"),
    })
}

/// diffusers `nearest_interp`: `src[round(i · (n − 1) / (m − 1))]` (round half to even, in f32
/// as `torch.round` of an f32 grid times a Python float).
pub fn nearest_interp(src: &[f32], target_length: usize) -> Vec<f32> {
    if src.is_empty() || target_length == 0 {
        return Vec::new();
    }
    if target_length == 1 {
        return vec![src[src.len() - 1]];
    }
    let scale = (src.len() - 1) as f64 / (target_length - 1) as f64;
    (0..target_length)
        .map(|i| {
            let x = (i as f32) * (scale as f32);
            let j = x.round_ties_even() as usize;
            src[j.min(src.len() - 1)]
        })
        .collect()
}

/// `MagCacheState`: one per cache context.
#[derive(Debug)]
pub(crate) struct MagState {
    pub previous_residual: Option<Tensor>,
    pub accumulated_ratio: f32,
    pub accumulated_err: f32,
    pub accumulated_steps: usize,
    pub step_index: usize,
    pub calibration_ratios: Vec<f64>,
}

impl Default for MagState {
    fn default() -> Self {
        Self {
            previous_residual: None,
            accumulated_ratio: 1.0,
            accumulated_err: 0.0,
            accumulated_steps: 0,
            step_index: 0,
            calibration_ratios: Vec::new(),
        }
    }
}

/// The head hook's decision (l. 195–220 of the reference), in f32 as there (`mag_ratios` is an
/// f32 tensor, so the accumulators and the comparison with the threshold are f32).
pub(crate) fn should_compute(
    cfg: &MagCacheConfig,
    ratios: &[f32],
    steps: usize,
    state: &mut MagState,
) -> bool {
    if cfg.calibrate {
        return true;
    }
    let current = state.step_index;
    let scale = ratios.get(current).copied().unwrap_or(1.0);
    let retention_step = (cfg.retention_ratio * steps as f64 + 0.5) as usize;
    if current >= retention_step {
        state.accumulated_ratio *= scale;
        state.accumulated_steps += 1;
        state.accumulated_err += (1.0 - state.accumulated_ratio).abs();
        if state.previous_residual.is_some()
            && state.accumulated_err <= cfg.threshold as f32
            && state.accumulated_steps <= cfg.max_skip_steps
        {
            return false;
        }
        state.accumulated_ratio = 1.0;
        state.accumulated_steps = 0;
        state.accumulated_err = 0.0;
    }
    true
}

/// The tail hook's `_advance_step`: at the end of a generation the state starts over; the
/// calibration ratios of the finished run are returned.
pub(crate) fn advance_step(steps: usize, state: &mut MagState) -> Option<Vec<f64>> {
    state.step_index += 1;
    if state.step_index >= steps {
        let done = std::mem::take(&mut state.calibration_ratios);
        *state = MagState::default();
        return Some(done);
    }
    None
}

/// `_perform_calibration_step`: mean over tokens of ‖current‖ / (‖previous‖ + 1e-8), norms over
/// the last dimension; 1.0 at the first step.
pub(crate) fn calibration_ratio(current: &Tensor, previous: Option<&Tensor>) -> Result<f64> {
    let Some(prev) = previous else {
        return Ok(1.0);
    };
    let norm = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(DType::F32)?
            .sqr()?
            .sum_keepdim(candle_core::D::Minus1)?
            .sqrt()
    };
    let r = norm(current)?.broadcast_div(&(norm(prev)? + 1e-8)?)?;
    Ok(r.mean_all()?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: f64, max_skip: usize, retention: f64) -> MagCacheConfig {
        MagCacheConfig {
            threshold,
            max_skip_steps: max_skip,
            retention_ratio: retention,
            mag_ratios: Some(vec![1.0; 4]),
            ..Default::default()
        }
    }

    /// Runs the decision over `ratios` as the hooks do (a computed step stores a residual).
    fn decisions(c: &MagCacheConfig, ratios: &[f32]) -> Vec<bool> {
        let mut s = MagState::default();
        let dev = candle_core::Device::Cpu;
        (0..ratios.len())
            .map(|_| {
                let compute = should_compute(c, ratios, ratios.len(), &mut s);
                if compute {
                    s.previous_residual = Some(Tensor::zeros(1, DType::F32, &dev).unwrap());
                }
                advance_step(ratios.len(), &mut s);
                compute
            })
            .collect()
    }

    #[test]
    fn interp_matches_the_reference_indices() {
        // 16 → 10: indices 0,2,3,5,7,8,10,12,13,15 (K-reference.md).
        let src: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let got: Vec<f32> = nearest_interp(&src, 10);
        assert_eq!(got, [0., 2., 3., 5., 7., 8., 10., 12., 13., 15.]);
        assert_eq!(nearest_interp(&src, 1), [15.0]);
        assert_eq!(nearest_interp(&src, 16), src);
    }

    #[test]
    fn retention_threshold_and_max_skip() {
        // 10 steps, retention 0.2 → steps 0, 1 always computed.
        let r = [1.0f32, 1.0, 1.01, 1.01, 1.01, 1.01, 1.01, 1.01, 1.01, 1.01];
        let d = decisions(&cfg(0.1, 2, 0.2), &r);
        assert_eq!(
            d,
            [true, true, false, false, true, false, false, true, false, false]
        );
        // A threshold nothing fits computes every step.
        assert!(decisions(&cfg(0.001, 3, 0.2), &r).iter().all(|&c| c));
        // Errors accumulate: 0.01, then 0.01 + 0.0201 > 0.025.
        let d = decisions(&cfg(0.025, 5, 0.0), &r[1..]);
        assert_eq!(d[..4], [true, false, true, false]);
    }

    #[test]
    fn calibration_never_skips_and_returns_its_ratios_at_the_end() {
        let c = MagCacheConfig {
            calibrate: true,
            ..Default::default()
        };
        c.validate().unwrap();
        assert!(MagCacheConfig::default().validate().is_err());
        let mut s = MagState {
            previous_residual: Some(
                Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
            ),
            ..Default::default()
        };
        assert!(should_compute(&c, &[], 2, &mut s));
        s.calibration_ratios.push(1.0);
        assert!(advance_step(2, &mut s).is_none());
        s.calibration_ratios.push(0.5);
        assert_eq!(advance_step(2, &mut s), Some(vec![1.0, 0.5]));
        assert_eq!(s.step_index, 0);
    }

    #[test]
    fn calibration_ratio_is_the_mean_token_norm_ratio() {
        let dev = candle_core::Device::Cpu;
        let prev = Tensor::new(&[[3.0f32, 4.0], [0.0, 1.0]], &dev).unwrap();
        let cur = Tensor::new(&[[6.0f32, 8.0], [0.0, 3.0]], &dev).unwrap();
        let r = calibration_ratio(&cur, Some(&prev)).unwrap();
        assert!((r - 2.5).abs() < 1e-6, "{r}");
        assert_eq!(calibration_ratio(&cur, None).unwrap(), 1.0);
    }
}
