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
