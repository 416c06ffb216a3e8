//! What a job starts from besides its prompt: a first image (`input_reference`), a last image
//! (`last_image`, Kino extension) or a source video (`POST /v1/videos/edits`, or one to
//! continue: `POST /v1/videos/extensions`).
//!
//! The API checks every input before anything is queued (size limit, format, decodable, model
//! capability, long enough), then stores the bytes as they were sent in
//! `DATA_DIR/inputs/<video id>/{image,last_image,video}.<ext>` and records them
//! ([`JobInputs`]: name, sha256, size, format) in the job's parameters in SQLite, so a restart
//! loses nothing. The worker decodes them again and fits them to the request's size
//! ([`conditioning`]) when it runs the job. Deleting a video deletes its inputs.

use std::path::{Path, PathBuf};

use kino_engine::wan::pipeline::{Conditioning, RgbImage};
use kino_media::{Frame, Video};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::Job;

/// One stored input file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredInput {
    /// What the client called it: the uploaded file's name, `data URL`, or `video_…` for an
    /// edit of a video of this server.
    pub name: String,
    /// SHA-256 of the bytes as sent (hex).
    pub sha256: String,
    pub bytes: u64,
    /// The file's name in `DATA_DIR/inputs/<id>/`.
    pub file: String,
    /// `png`, `jpeg`, `webp`, `mp4`, `mov`, `webm`, …
    pub format: String,
    /// Size of the picture as sent.
    pub width: u32,
    pub height: u32,
    /// Videos: frames and frame rate as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
}

/// The inputs of one job (stored in its parameters; absent for text-to-video).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobInputs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<StoredInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_image: Option<StoredInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<StoredInput>,
    /// Video-to-video strength, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// For an edit or extension of a video of this server: its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_video_id: Option<String>,
    /// The video is continued (`POST /v1/videos/extensions`), not restyled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extends: bool,
    /// The job runs on a VACE model with VACE conditioning (a masked or guided edit, reference
    /// images); see [`crate::vace`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vace: bool,
    /// An edit's mask (Kino extension): a still (applies to every frame) or a video (one mask
    /// per frame), white = regenerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<StoredInput>,
    /// Characters (`"characters": ["char_…"]`): their reference images, copied into the job's
    /// inputs, in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub characters: Vec<CharacterInput>,
}

/// One character a job uses: its id and its image as stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterInput {
    pub id: String,
    #[serde(flatten)]
    pub image: StoredInput,
}

impl JobInputs {
    /// "image", "first-last image", "video" or "continuation" (the engine's names).
    pub fn kind(&self) -> &'static str {
        if self.extends {
            return "continuation";
        }
        if self.vace {
            let refs = !self.characters.is_empty();
            return match (&self.video, &self.mask, &self.image, refs) {
                (Some(_), Some(_), _, false) => "masked edit",
                (Some(_), Some(_), _, true) => "masked edit with references",
                (Some(_), None, _, false) => "edit",
                (Some(_), None, _, true) => "edit with references",
                (None, _, Some(_), true) if self.last_image.is_some() => {
                    "first-last image with references"
                }
                (None, _, Some(_), true) => "image with references",
                (None, _, None, true) => "references",
                (None, _, Some(_), false) if self.last_image.is_some() => "first-last image",
                (None, _, Some(_), false) => "image",
                (None, _, None, false) => "text",
            };
        }
        match (&self.image, &self.last_image, &self.video) {
            (_, _, Some(_)) => "video",
            (Some(_), Some(_), None) => "first-last image",
            (Some(_), None, None) => "image",
            _ => "text",
        }
    }

    /// Each stored file with its role (`image`, `last_image`, `video`, `mask`); characters'
    /// images are in [`JobInputs::all_files`].
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &StoredInput)> {
        [
            ("image", &self.image),
            ("last_image", &self.last_image),
            ("video", &self.video),
            ("mask", &self.mask),
        ]
        .into_iter()
        .filter_map(|(role, s)| s.as_ref().map(|s| (role, s)))
    }

    /// Every stored file, characters' images included.
    pub fn all_files(&self) -> impl Iterator<Item = &StoredInput> {
        self.files()
            .map(|(_, s)| s)
            .chain(self.characters.iter().map(|c| &c.image))
    }

    /// What the MP4's metadata records (`conditioning`, the shape `kino generate` writes and
    /// `kino info` shows): kind, each input's name, sha256, size (and frames and fps for a
    /// video) and how it was fitted to the output's `width × height`, the strength of an edit.
    pub fn metadata(&self, width: u32, height: u32) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("kind".into(), json!(self.kind()));
        for (role, s) in self.files() {
            let mut f = json!({
                "name": s.name,
                "sha256": s.sha256,
                "size": format!("{}x{}", s.width, s.height),
                "fitted": describe_fit(s.width, s.height, width, height),
            });
            if let Some(n) = s.frames {
                f["frames"] = json!(n);
            }
            if let Some(fps) = s.fps {
                f["fps"] = json!(fps);
            }
            m.insert(role.into(), f);
        }
        if !self.characters.is_empty() {
            let list: Vec<Value> = self
                .characters
                .iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "name": c.image.name,
                        "sha256": c.image.sha256,
                        "size": format!("{}x{}", c.image.width, c.image.height),
                    })
                })
                .collect();
            m.insert("characters".into(), Value::Array(list));
        }
        if let Some(st) = self.strength {
            m.insert("strength".into(), json!(st));
        }
        if let Some(src) = &self.source_video_id {
            m.insert("source_video_id".into(), json!(src));
        }
        Value::Object(m)
    }
}

/// "resized to 85×64 and centre-cropped to 64×64" (or "kept as it is").
pub fn describe_fit(src_w: u32, src_h: u32, w: u32, h: u32) -> String {
    kino_media::FitCrop::describe(src_w, src_h, w, h)
        .unwrap_or_else(|_| format!("fitted to {w}×{h}"))
}

/// Where a job's inputs are kept.
pub fn inputs_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("inputs").join(id)
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes one input file of job `id` (atomically: a temporary name, then a rename).
pub fn write_input(data_dir: &Path, id: &str, file: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = inputs_dir(data_dir, id);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(file))
}

/// Deletes a job's inputs (ignoring ones that are not there).
pub fn remove_inputs(data_dir: &Path, id: &str) {
    let dir = inputs_dir(data_dir, id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
    }
}

/// The ids that have an inputs folder (to remove the ones whose job is gone).
pub fn stored_ids(data_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(data_dir.join("inputs")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| crate::valid_video_id(n))
        .collect()
}

/// The container a video file is in, from its first bytes (`None`: not a video we know).
pub fn sniff_video(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return Some(if &bytes[8..10] == b"qt" { "mov" } else { "mp4" });
    }
    if bytes.len() >= 8 && matches!(&bytes[4..8], b"moov" | b"mdat" | b"wide" | b"free") {
        return Some("mov");
    }
    if bytes.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some("webm");
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"AVI " {
        return Some("avi");
    }
    None
}

/// The format of a still image, from its first bytes.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    match kino_media::MediaFormat::sniff(bytes) {
        Some(kino_media::MediaFormat::Png) => Some("png"),
        Some(kino_media::MediaFormat::Jpeg) => Some("jpeg"),
        Some(kino_media::MediaFormat::Webp) => Some("webp"),
        Some(kino_media::MediaFormat::Gif) => Some("gif"),
        _ => None,
    }
}

/// Decodes an image (PNG, JPEG, WebP).
pub fn decode_image(bytes: &[u8]) -> Result<Frame, String> {
    kino_media::decode_image(bytes).map_err(|e| e.to_string())
}

/// Decodes the first `seconds` of a video (MP4/MOV/WebM/MKV, any codec the system's FFmpeg
/// reads); a shorter clip is read whole.
pub fn decode_video(bytes: &[u8], seconds: f64) -> Result<Video, String> {
    kino_media::decode_video_head(bytes, seconds).map_err(|e| e.to_string())
}

/// Scales `frame` to cover `width × height` and crops the centre, as the reference's image
/// processor does (`kino_media::fit_crop`).
pub fn fit(frame: &Frame, width: u32, height: u32) -> Result<Frame, String> {
    kino_media::fit_crop(frame, width, height).map_err(|e| e.to_string())
}

/// How many frames at `fps` a source video gives `kino_media::conform_video` (output frame
/// `i` is the source frame nearest `i / fps` seconds).
pub fn frames_available(video: &Video, fps: u32) -> usize {
    let n = (video.len() as f64 - 0.5) * f64::from(fps) / video.fps().as_f64();
    (n - 1e-9).ceil().max(0.0) as usize
}

/// `frames` frames of `video` at `fps`, fitted to `width × height`; an error if it is too
/// short.
pub fn conform(
    video: &Video,
    width: u32,
    height: u32,
    fps: u32,
    frames: usize,
) -> Result<Vec<Frame>, String> {
    let rate = kino_media::Fps::integer(fps).map_err(|e| e.to_string())?;
    kino_media::conform_video(video, width, height, rate, frames).map_err(|e| e.to_string())
}

/// "the source video is … long …; … need …".
pub fn too_short_message(video: &Video, fps: u32, frames: usize) -> String {
    let dur = video.len() as f64 / video.fps().as_f64();
    let need = (frames - 1) as f64 / f64::from(fps);
    format!(
        "the source video is {dur:.2} s long ({} frames at {:.3} fps), but {frames} frames at {fps} fps need {need:.2} s; ask for fewer seconds or send a longer video",
        video.len(),
        video.fps().as_f64()
    )
}

fn rgb(frame: Frame) -> Result<RgbImage, String> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    RgbImage::new(w, h, frame.into_data()).map_err(|e| e.to_string())
}

/// The engine's conditioning for a job, rebuilt from its stored inputs.
pub fn conditioning(data_dir: &Path, job: &Job) -> Result<Conditioning, String> {
    let Some(inputs) = &job.params.inputs else {
        return Ok(Conditioning::Text);
    };
    let r = &job.params.request;
    let (Some(w), Some(h)) = (r.width, r.height) else {
        return Err("the job has no size".into());
    };
    let (w, h) = (w as u32, h as u32);
    let dir = inputs_dir(data_dir, &job.id);
    let read = |s: &StoredInput| -> Result<Vec<u8>, String> {
        let p = dir.join(&s.file);
        std::fs::read(&p).map_err(|e| format!("cannot read the stored input {}: {e}", p.display()))
    };
    if let Some(v) = &inputs.video {
        let frames = r.num_frames.unwrap_or(1);
        let video = decode_video(&read(v)?, head_seconds(frames, job.params.fps))?;
        let frames = conform(&video, w, h, job.params.fps, frames)?
            .into_iter()
            .map(rgb)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Conditioning::Video {
            frames,
            strength: inputs.strength.unwrap_or(DEFAULT_STRENGTH),
        });
    }
    let image = |s: &StoredInput| -> Result<RgbImage, String> {
        rgb(fit(&decode_image(&read(s)?)?, w, h)?)
    };
    match &inputs.image {
        Some(first) => Ok(Conditioning::Image {
            first: image(first)?,
            last: inputs.last_image.as_ref().map(image).transpose()?,
        }),
        None => Ok(Conditioning::Text),
    }
}

/// How much of a source to decode for `frames` frames at `fps` (a little more than needed).
pub fn head_seconds(frames: usize, fps: u32) -> f64 {
    frames as f64 / f64::from(fps.max(1)) + 1.0
}

/// The default video-to-video strength.
pub const DEFAULT_STRENGTH: f64 = 0.7;

#[cfg(test)]
mod tests {
    use super::*;
    use kino_media::Fps;

    #[test]
    fn available_frames_match_conform_video() {
        let frames: Vec<Frame> = (0..16)
            .map(|i| Frame::filled(8, 8, [i as u8 * 10, 0, 0]).unwrap())
            .collect();
        let v = Video::new(frames, Fps::integer(16).unwrap()).unwrap(); // 1 s
        let n = frames_available(&v, 8);
        assert_eq!(n, 8);
        assert_eq!(conform(&v, 4, 4, 8, n).unwrap().len(), n);
        assert!(conform(&v, 4, 4, 8, n + 1).is_err());
        let n = frames_available(&v, 6);
        assert!(conform(&v, 4, 4, 6, n).is_ok() && conform(&v, 4, 4, 6, n + 1).is_err());
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff_video(b"\0\0\0\x18ftypisom\0\0"), Some("mp4"));
        assert_eq!(sniff_video(b"\0\0\0\x14ftypqt  \0\0"), Some("mov"));
        assert_eq!(sniff_video(&[0x1a, 0x45, 0xdf, 0xa3, 0, 0]), Some("webm"));
        assert_eq!(sniff_video(b"\x89PNG\r\n\x1a\n"), None);
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n"), Some("png"));
    }

    #[test]
    fn old_params_without_inputs_still_parse() {
        let inputs: JobInputs = serde_json::from_str("{}").unwrap();
        assert_eq!(inputs.kind(), "text");
    }
}
