//! SkyReels-V2 (Wan2.1 architecture, trained for diffusion forcing): its transformer and the
//! diffusion-forcing schedule of `SkyReelsV2DiffusionForcingPipeline`.

pub mod diffusion_forcing;
pub mod transformer;
