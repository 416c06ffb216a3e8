pub mod transformer;
pub mod vae;
