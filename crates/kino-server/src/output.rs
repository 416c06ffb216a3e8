//! From an engine result to media: the frames as a [`Video`] and the generation parameters stored
//! in the MP4. Shared by `kino generate` and the server's worker.

use kino_engine::wan::pipeline::ResolvedRequest;
use kino_media::{Fps, Frame, GenerationParams, MediaError, Video};

/// RGB u8 frames of `width × height` (as the pipeline returns them) as a video at `fps`.
pub fn frames_to_video(
    frames: Vec<Vec<u8>>,
    width: usize,
    height: usize,
    fps: u32,
) -> Result<Video, MediaError> {
    let frames = frames
        .into_iter()
        .map(|f| Frame::new(width as u32, height as u32, f))
        .collect::<Result<Vec<_>, _>>()?;
    Video::new(frames, Fps::integer(fps)?)
}

/// The parameters that reproduce a video: what the request resolved to, the model, the fps and
/// the Kino version (`shift` goes into `extra`).
pub fn generation_params(r: &ResolvedRequest, model: &str, fps: u32) -> GenerationParams {
    let mut extra = serde_json::Map::new();
    extra.insert("shift".into(), serde_json::json!(r.shift));
    GenerationParams {
        prompt: Some(r.prompt.clone()),
        negative_prompt: Some(r.negative_prompt.clone()),
        model: Some(model.to_string()),
        seed: Some(r.seed),
        steps: Some(r.num_inference_steps as u32),
        guidance: Some(r.guidance_scale),
        width: Some(r.width as u32),
        height: Some(r.height as u32),
        frames: Some(r.num_frames as u32),
        fps: Some(fps as f64),
        kino_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        extra,
    }
}
