//! The Wan family: transformer, VAE, prompt encoding and the text-to-video pipeline.

pub mod linear;
pub mod pipeline;
pub mod pipeline_vace;
pub mod text_encoder;
pub mod transformer;
pub mod transformer_vace;
pub mod vae;
