//! Kino's tensor side: the Wan models (transformer, VAE), the UMT5 text encoder, schedulers and
//! the text-to-video pipeline, each mirroring its reference class in diffusers/transformers.
//! Knows nothing of files beyond model folders, HTTP or video containers.

pub mod calibration;
pub mod clip;
pub mod device;
pub mod error;
pub mod gguf;
pub mod hooks;
pub mod kernels;
pub mod loading;
pub mod long_video;
pub mod lora;
pub mod memory;
pub mod parity;
pub mod preset;
pub mod profile;
pub mod progress;
pub mod registry;
pub mod schedulers;
pub mod single_file;
pub mod skyreels;
pub mod testing;
pub mod umt5;
pub mod wan;

pub use error::{Error, Result};
