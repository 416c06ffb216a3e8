//! Typed errors of the media crate. Every message says what was wrong and, where the caller can
//! do something about it, what to do.

use std::path::PathBuf;

/// Errors from building frames, writing files and reading files.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A frame or video size that the target format cannot take (zero, odd, too large, or not
    /// matching the data length).
    #[error("{0}")]
    InvalidSize(String),

    /// A video that cannot be written as given (no frames, frames of different sizes, bad fps).
    #[error("{0}")]
    InvalidVideo(String),

    /// An option out of its range.
    #[error("{0}")]
    InvalidOption(String),

    /// Writing a file failed.
    #[error("cannot write {path}: {source}; check that the folder exists, is writable and has free space")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Reading a file failed.
    #[error("cannot read {path}: {source}; check that the file exists and is readable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The input is damaged or not what its format promises.
    #[error("corrupt {format} input: {reason}; the file may be truncated or damaged, re-create or re-download it")]
    Corrupt {
        format: &'static str,
        reason: String,
    },

    /// The input is well formed but uses something this crate does not read.
    #[error("unsupported input: {0}")]
    Unsupported(String),

    /// The H.264 encoder or decoder failed.
    #[error("H.264 {0}")]
    Codec(String),

    /// An image encoder failed.
    #[error("image encoding failed: {0}")]
    Image(String),
}

impl MediaError {
    pub(crate) fn corrupt(format: &'static str, reason: impl Into<String>) -> Self {
        MediaError::Corrupt {
            format,
            reason: reason.into(),
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MediaError::Write {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn read(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MediaError::Read {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`MediaError`].
pub type Result<T, E = MediaError> = std::result::Result<T, E>;

/// The nearest even sizes to suggest for an odd one: the one below (if not zero) and the one above.
pub(crate) fn even_suggestion(v: u32) -> String {
    if v <= 1 {
        "2".to_string()
    } else {
        format!("{} or {}", v - 1, v + 1)
    }
}
