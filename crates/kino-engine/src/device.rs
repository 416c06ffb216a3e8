//! Device and dtype choice: the best accelerator compiled in and present, else the CPU;
//! f32 on the CPU, bf16 on a GPU.

use candle_core::{DType, Device};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A GPU if one was compiled in and is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
    Metal,
}

/// Opens the device asked for.
pub fn open(choice: DeviceChoice) -> crate::Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(i) => Device::new_cuda(i)?,
        DeviceChoice::Metal => Device::new_metal(0)?,
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)?
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)?
            } else {
                Device::Cpu
            }
        }
    })
}

/// The compute dtype we use by default on a device.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Transformers with fewer parameters in their blocks than this run on one CPU thread unless
/// the user sets `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`.
///
/// Why: a split operation waits at its join for every thread, and when another busy process
/// holds one of the cores, the thread there gets its turn only after a scheduler slice
/// (milliseconds). A small model runs thousands of operations of microseconds each, so beside a
/// CPU-heavy neighbour two threads made kino-shapes ~6× slower, while one thread is ~unchanged
/// (`bench/busy-neighbour.sh`; the README's Performance section has the numbers). Large models
/// do milliseconds of work per split, where the wait is noise and every core counts.
pub const SMALL_MODEL_BLOCK_PARAMS: usize = 20_000_000;

/// Chooses the CPU thread count for a transformer with `block_params` parameters in its blocks:
/// one thread for a small model (see [`SMALL_MODEL_BLOCK_PARAMS`]) when the user set neither
/// `RAYON_NUM_THREADS` nor `CANDLE_NUM_THREADS`. Returns the count chosen, or `None` when Kino
/// leaves the default (all cores, or what the user set).
///
/// It takes effect for the whole process (candle reads `RAYON_NUM_THREADS` at every matmul, and
/// rayon's global pool is built with one thread if it does not exist yet), so call it before the
/// first tensor operation.
pub fn choose_cpu_threads(block_params: usize) -> Option<usize> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if set("RAYON_NUM_THREADS") || set("CANDLE_NUM_THREADS") {
        return None;
    }
    if block_params >= SMALL_MODEL_BLOCK_PARAMS {
        return None;
    }
    // Edition 2021: `set_var` is safe to call; it runs before the model computes anything.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_models_keep_every_core() {
        // Whatever the environment says, a large model is left alone.
        assert_eq!(choose_cpu_threads(SMALL_MODEL_BLOCK_PARAMS), None);
        assert_eq!(choose_cpu_threads(1_400_000_000), None);
    }
}
