//! Errors: [`ApiError`] is what a client sees (OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, with an HTTP status); [`ServerError`] is
//! what starting or running the server can fail with.

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error returned to an HTTP client in OpenAI's error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, …
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the offending field.
    pub fn bad_request(
        param: Option<&'static str>,
        code: &'static str,
        msg: impl Into<String>,
    ) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: msg.into(),
            kind: "invalid_request_error",
            param,
            code: Some(code),
        }
    }

    /// 404 for a video id that does not exist.
    pub fn video_not_found(id: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no video with id `{id}`; list the videos with GET /v1/videos"),
            kind: "invalid_request_error",
            param: Some("video_id"),
            code: Some("video_not_found"),
        }
    }

    /// 404 for a path that is not an endpoint.
    pub fn no_route(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no endpoint {method} {path}; see GET /v1/models, POST /v1/videos, GET /v1/videos"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 409: the video is not in a state that allows this.
    pub fn conflict(code: &'static str, msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            message: msg.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// 500: our fault; the message says what failed.
    pub fn internal(msg: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: msg.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), "{}", self.message);
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(format!("job store: {e}"))
    }
}

/// Errors of the job store (SQLite or Postgres).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored parameters of {id} are unreadable: {message}")]
    BadRow { id: String, message: String },
    #[error("the job store lock was poisoned by a panic")]
    Poisoned,
    #[error("database: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the data directory {}: {source}; choose another with --data-dir", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model {name}: {source}")]
    Model {
        name: String,
        source: kino_engine::Error,
    },
    #[error("no model configured; pass --model ALIAS|DIR")]
    NoModel,
    #[error("two models are both named `{0}`; give one of them another folder name")]
    DuplicateModel(String),
    #[error("device: {0}")]
    Device(kino_engine::Error),
    #[error(
        "cannot listen on {addr}: {source}; is another server running there? choose another --port"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("webhooks: {0}")]
    Webhook(String),
    #[error("provenance: {0}")]
    Provenance(String),
    #[error("the worker thread stopped before it was ready")]
    WorkerGone,
    #[error("--lora-dir {}: {why}", path.display())]
    LoraDir { path: PathBuf, why: String },
    #[error("--mag-ratios: {0}")]
    MagRatios(kino_engine::Error),
    /// The Postgres job store cannot be used (bad URL, unreachable, no schema, …).
    #[error("--database {url}: {why}")]
    Database { url: String, why: String },
    /// The output storage cannot be used (unreachable, missing bucket, bad credentials, …).
    #[error("--storage {url}: {why}")]
    Storage { url: String, why: String },
    /// `--role` does not fit the other options.
    #[error("--role: {0}")]
    Role(String),
}
