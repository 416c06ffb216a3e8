//! Typed errors of the engine. Every variant a user can cause says what was wrong and what to do.

use std::path::PathBuf;

/// Errors returned by `kino-engine`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model folder needs is not there.
    #[error("missing file {}: {hint}", path.display())]
    MissingFile { path: PathBuf, hint: String },

    /// A file exists but could not be read or parsed.
    #[error("cannot read {}: {message}", path.display())]
    BadFile { path: PathBuf, message: String },

    /// A weight tensor the model needs is not in the weight files.
    #[error("tensor `{name}` is missing from the weights in {}; is this the right folder for this component?", location.display())]
    MissingTensor { name: String, location: PathBuf },

    /// A weight tensor has the wrong shape for the config.
    #[error("tensor `{name}` in {} has shape {found:?}, but the config.json asks for {expected:?}; the weights and config.json do not belong together", location.display())]
    ShapeMismatch {
        name: String,
        location: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A model class named in a config that we don't implement.
    #[error("{}: model class `{found}` is not supported; supported classes: {supported}", path.display())]
    UnsupportedClass {
        path: PathBuf,
        found: String,
        supported: String,
    },

    /// A request the model can't serve (bad size, frame count, ...). The message names valid values.
    #[error("{0}")]
    InvalidRequest(String),

    /// The run would not fit in memory.
    #[error("{0}")]
    OutOfMemory(String),

    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The caller asked to stop.
    #[error("cancelled")]
    Cancelled,

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Load errors noticed inside candle's `VarBuilder` (see [`crate::loading::Weights`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("tensor `{name}` is missing from {}", location.display())]
    Missing { name: String, location: PathBuf },
    #[error("tensor `{name}` in {} has shape {found:?}, expected {expected:?}", location.display())]
    Shape {
        name: String,
        location: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Missing { name, location } => Error::MissingTensor { name, location },
            LoadError::Shape {
                name,
                location,
                expected,
                found,
            } => Error::ShapeMismatch {
                name,
                location,
                expected,
                found,
            },
        }
    }
}
