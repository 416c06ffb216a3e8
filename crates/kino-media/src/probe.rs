//! `probe`: what a media file is, without decoding its pictures.

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{MediaError, Result};
use crate::frame::Fps;
use crate::mp4::{probe_mp4, with_path};

/// A container/image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaFormat {
    Mp4,
    Gif,
    Png,
    Jpeg,
    Webp,
}

impl MediaFormat {
    /// Sniffs the format from the first bytes of a file.
    pub fn sniff(head: &[u8]) -> Option<MediaFormat> {
        if head.len() >= 8
            && matches!(
                &head[4..8],
                b"ftyp" | b"moov" | b"mdat" | b"free" | b"wide" | b"skip"
            )
        {
            Some(MediaFormat::Mp4)
        } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
            Some(MediaFormat::Gif)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(MediaFormat::Png)
        } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(MediaFormat::Jpeg)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(MediaFormat::Webp)
        } else {
            None
        }
    }

    /// The MIME type.
    pub fn mime_type(&self) -> &'static str {
        match self {
            MediaFormat::Mp4 => "video/mp4",
            MediaFormat::Gif => "image/gif",
            MediaFormat::Png => "image/png",
            MediaFormat::Jpeg => "image/jpeg",
            MediaFormat::Webp => "image/webp",
        }
    }
}

/// What [`probe`] finds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub format: MediaFormat,
    pub width: u32,
    pub height: u32,
    /// Number of frames (1 for a still image).
    pub frame_count: u64,
    /// Frame rate of a video (for GIF, frames over duration); `None` for stills.
    pub fps: Option<Fps>,
    /// Duration in seconds; `None` for stills.
    pub duration_secs: Option<f64>,
    /// Generation parameters stored by this crate (MP4 only).
    pub metadata: Option<serde_json::Value>,
}

/// Tells a file's format, size, frame count, frame rate, duration and stored metadata.
pub fn probe(path: impl AsRef<Path>) -> Result<MediaInfo> {
    let path = path.as_ref();
    let mut file = std::fs::File::open(path).map_err(|e| MediaError::read(path, e))?;
    let mut head = [0u8; 16];
    let mut n = 0;
    loop {
        let k = file
            .read(&mut head[n..])
            .map_err(|e| MediaError::read(path, e))?;
        if k == 0 || n + k == head.len() {
            n += k;
            break;
        }
        n += k;
    }
    let format = MediaFormat::sniff(&head[..n]).ok_or_else(|| {
        MediaError::Unsupported(format!(
            "{}: not an MP4, GIF, PNG, JPEG or WebP file (unknown signature)",
            path.display()
        ))
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| MediaError::read(path, e))?;
    let info = match format {
        MediaFormat::Mp4 => {
            let p =
                probe_mp4(&mut std::io::BufReader::new(file)).map_err(|e| with_path(e, path))?;
            MediaInfo {
                format,
                width: p.width,
                height: p.height,
                frame_count: p.frames,
                fps: Some(p.fps),
                duration_secs: Some(p.duration_secs),
                metadata: p.metadata,
            }
        }
        MediaFormat::Gif => {
            let bytes = std::fs::read(path).map_err(|e| MediaError::read(path, e))?;
            let (width, height, frames, duration) =
                crate::gif::probe_gif(&bytes).map_err(|e| with_path(e, path))?;
            let fps = if duration > 0.0 {
                Fps::approx(frames as f64 / duration).ok()
            } else {
                None
            };
            MediaInfo {
                format,
                width,
                height,
                frame_count: frames,
                fps,
                duration_secs: Some(duration),
                metadata: None,
            }
        }
        MediaFormat::Png | MediaFormat::Jpeg | MediaFormat::Webp => {
            let bytes = std::fs::read(path).map_err(|e| MediaError::read(path, e))?;
            let (width, height) = image::ImageReader::new(Cursor::new(&bytes))
                .with_guessed_format()
                .map_err(|e| MediaError::corrupt("image", e.to_string()))?
                .into_dimensions()
                .map_err(|e| with_path(MediaError::corrupt("image", e.to_string()), path))?;
            MediaInfo {
                format,
                width,
                height,
                frame_count: 1,
                fps: None,
                duration_secs: None,
                metadata: None,
            }
        }
    };
    Ok(info)
}
