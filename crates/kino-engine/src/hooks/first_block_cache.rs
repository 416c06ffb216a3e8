//! First Block Cache, mirroring diffusers 0.42.1 `hooks/first_block_cache.py`.
//!
//! After block 0 the relative change of its residual (block-0 output − input) since the last
//! computed forward of the same context decides: above `threshold` every block runs; below it the
//! other blocks are skipped and the forward outputs block 0's output plus the tail residual
//! (last block's output − block 0's output) of the last computed forward.

use candle_core::Tensor;

use crate::Result;

/// diffusers `FirstBlockCacheConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstBlockCacheConfig {
    /// Relative mean absolute change of block 0's residual below which the other blocks are
    /// skipped (default 0.05).
    pub threshold: f64,
}

impl Default for FirstBlockCacheConfig {
    fn default() -> Self {
        Self { threshold: 0.05 }
    }
}

/// `FBCSharedBlockState`: one per cache context.
#[derive(Debug, Default)]
pub(crate) struct FbcState {
    pub head_block_output: Option<Tensor>,
    pub head_block_residual: Option<Tensor>,
    pub tail_block_residual: Option<Tensor>,
}

/// `_should_compute_remaining_blocks`: mean|r − r_prev| / mean|r_prev| > threshold (always
/// compute without a previous residual).
pub(crate) fn should_compute(
    threshold: f64,
    residual: &Tensor,
    previous: Option<&Tensor>,
) -> Result<bool> {
    let Some(prev) = previous else {
        return Ok(true);
    };
    let absmean = (residual - prev)?.abs()?.mean_all()?;
    let prev_absmean = prev.abs()?.mean_all()?;
    // In the model dtype as the reference (`.item()` of the ratio).
    let diff = (absmean / prev_absmean)?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()? as f64;
    Ok(decide(threshold, diff))
}

/// The comparison itself, as the reference's `diff > self.threshold`.
pub(crate) fn decide(threshold: f64, diff: f64) -> bool {
    diff > threshold
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn computes_without_history_and_skips_small_changes() {
        let dev = Device::Cpu;
        let prev = Tensor::new(&[1.0f32, -2.0, 3.0, -4.0], &dev).unwrap();
        assert!(should_compute(0.05, &prev, None).unwrap());
        // mean|Δ| = 0.1, mean|prev| = 2.5: 0.04 ≤ 0.05 skips, ≤ 0.03 computes.
        let r = Tensor::new(&[1.1f32, -2.1, 3.1, -4.1], &dev).unwrap();
        assert!(!should_compute(0.05, &r, Some(&prev)).unwrap());
        assert!(should_compute(0.03, &r, Some(&prev)).unwrap());
        assert!(decide(0.05, 0.0501) && !decide(0.05, 0.05));
        assert_eq!(FirstBlockCacheConfig::default().threshold, 0.05);
    }
}
