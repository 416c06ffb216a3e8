//! Progress events: one per stage start/end and one per denoising step or decoded latent frame.
//! The CLI renders them as a progress bar; the server forwards them to clients.

use std::time::Duration;

/// A stage of one generation, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    LoadTextEncoder,
    EncodePrompt,
    /// Encoding the conditioning images or video (image encoder and VAE), before denoising.
    EncodeImage,
    LoadTransformer,
    Denoise,
    LoadVae,
    DecodeVae,
}

impl Stage {
    /// A short human name ("denoise").
    pub fn name(self) -> &'static str {
        match self {
            Stage::LoadTextEncoder => "load text encoder",
            Stage::EncodePrompt => "encode prompt",
            Stage::EncodeImage => "encode image",
            Stage::LoadTransformer => "load transformer",
            Stage::Denoise => "denoise",
            Stage::LoadVae => "load VAE",
            Stage::DecodeVae => "decode VAE",
        }
    }
}

/// `step` of `total` done in `stage`, `elapsed` since the stage began.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProgressEvent {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
}

/// Receives progress; returning `Err` (normally [`crate::Error::Cancelled`]) stops the run at the
/// next step boundary.
pub type Progress<'a> = &'a mut dyn FnMut(&ProgressEvent) -> crate::Result<()>;

/// A progress sink that ignores events.
pub fn ignore(_: &ProgressEvent) -> crate::Result<()> {
    Ok(())
}
