//! What a job starts from besides its prompt: a first image (`input_reference`), a last image
//! (`last_image`, Kino extension) or a source video (`POST /v1/videos/edits`).
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
    /// For an edit of a video of this server: its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_video_id: Option<String>,
}

impl JobInputs {
    /// "image", "first-last image" or "video" (the engine's names).
    pub fn kind(&self) -> &'static str {
        match (&self.image, &self.last_image, &self.video) {
            (_, _, Some(_)) => "video",
            (Some(_), Some(_), None) => "first-last image",
            (Some(_), None, None) => "image",
            _ => "text",
        }
    }

    /// Each stored file with its role (`image`, `last_image`, `video`).
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &StoredInput)> {
        [
            ("image", &self.image),
            ("last_image", &self.last_image),
            ("video", &self.video),
        ]
        .into_iter()
        .filter_map(|(role, s)| s.as_ref().map(|s| (role, s)))
    }

    /// What the MP4's metadata records (`conditioning`): kind, each input's name and sha256,
    /// the strength of an edit.
    pub fn metadata(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("kind".into(), json!(self.kind()));
        for (role, s) in self.files() {
            m.insert(
                role.into(),
                json!({"name": s.name, "sha256": s.sha256, "size": format!("{}x{}", s.width, s.height)}),
            );
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

/// Decodes a video (MP4/MOV/WebM through FFmpeg).
pub fn decode_video(bytes: &[u8]) -> Result<Video, String> {
    kino_media::decode_mp4(bytes).map_err(|e| e.to_string())
}

/// Scales `frame` to cover `width × height` and crops the centre (what the reference's image
/// processors do for a fixed output size).
pub fn fit(frame: &Frame, width: u32, height: u32) -> Result<Frame, String> {
    let (w, h) = (frame.width(), frame.height());
    if (w, h) == (width, height) {
        return Ok(frame.clone());
    }
    let scale = (f64::from(width) / f64::from(w)).max(f64::from(height) / f64::from(h));
    let sw = ((f64::from(w) * scale).ceil() as u32).max(width);
    let sh = ((f64::from(h) * scale).ceil() as u32).max(height);
    let scaled = kino_media::resize(frame, sw, sh).map_err(|e| e.to_string())?;
    scaled
        .crop((sw - width) / 2, (sh - height) / 2, width, height)
        .map_err(|e| e.to_string())
}

/// How many frames at `fps` a source video covers (frame `i` is the one shown at `i / fps`).
pub fn frames_available(video: &Video, fps: u32) -> usize {
    let dur = video.len() as f64 / video.fps().as_f64();
    ((dur * f64::from(fps)) - 1e-9).ceil().max(0.0) as usize
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
    let avail = frames_available(video, fps);
    if avail < frames {
        return Err(too_short_message(video, fps, frames));
    }
    let src_fps = video.fps().as_f64();
    (0..frames)
        .map(|i| {
            let t = i as f64 / f64::from(fps);
            let k = ((t * src_fps) + 1e-9).floor() as usize;
            let f = &video.frames()[k.min(video.len() - 1)];
            fit(f, width, height)
        })
        .collect()
}

/// "the source video has … ; … need …".
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
        let video = decode_video(&read(v)?)?;
        let frames = r.num_frames.unwrap_or(video.len());
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

/// The default video-to-video strength.
pub const DEFAULT_STRENGTH: f64 = 0.7;

#[cfg(test)]
mod tests {
    use super::*;
    use kino_media::Fps;

    #[test]
    fn fit_covers_and_crops_the_centre() {
        // 4x2: left half red, right half blue; fitted to 2x2 the centre columns are kept.
        let f = Frame::from_fn(4, 2, |x, _| if x < 2 { [255, 0, 0] } else { [0, 0, 255] }).unwrap();
        let g = fit(&f, 2, 2).unwrap();
        assert_eq!((g.width(), g.height()), (2, 2));
        let g = fit(&f, 8, 2).unwrap();
        assert_eq!((g.width(), g.height()), (8, 2));
        assert_eq!(g.pixel(0, 0).unwrap()[0], 255);
    }

    #[test]
    fn conform_samples_by_time_and_refuses_short_sources() {
        let frames: Vec<Frame> = (0..16)
            .map(|i| Frame::filled(8, 8, [i as u8 * 10, 0, 0]).unwrap())
            .collect();
        let v = Video::new(frames, Fps::integer(16).unwrap()).unwrap(); // 1 s
        assert_eq!(frames_available(&v, 8), 8);
        let out = conform(&v, 4, 4, 8, 5).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(
            out[1].pixel(0, 0).unwrap()[0],
            20,
            "frame 1 at 8 fps is source frame 2"
        );
        let e = conform(&v, 4, 4, 8, 9).unwrap_err();
        assert!(e.contains("too") || e.contains("longer"), "{e}");
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
