//! Serving output files with HTTP Range support (`206 Partial Content`, `Accept-Ranges`,
//! `Content-Range`; `416` for ranges past the end). Safari will not play an MP4 without it.

use std::io::SeekFrom;
use std::path::Path;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::ApiError;

/// What a `Range` header asks for, given the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: send everything with 200.
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// Parses a single `bytes=` range (RFC 9110 §14.1.2). Multiple ranges and other units are
/// answered with the whole file, which the RFC allows.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(h) = header else {
        return RangeAnswer::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeAnswer::Full;
        };
        if n == 0 || len == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Partial {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeAnswer::Full;
    };
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(len.saturating_sub(1)),
            _ => return RangeAnswer::Full,
        }
    };
    if start >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial { start, end }
}

/// What to send for a file of `len` bytes: the response head and the byte range, or a
/// finished response (416).
enum Plan {
    Send {
        builder: axum::http::response::Builder,
        status: StatusCode,
        start: u64,
        n: u64,
    },
    Done(Response),
}

fn plan(len: u64, content_type: &'static str, download_name: &str, headers: &HeaderMap) -> Plan {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let disposition = HeaderValue::from_str(&format!("inline; filename=\"{download_name}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("inline"));
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::CACHE_CONTROL, "private, max-age=3600");
    let (status, start, n) = match parse_range(range, len) {
        RangeAnswer::Full => (StatusCode::OK, 0, len),
        RangeAnswer::Partial { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut r = ApiError {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                message: format!(
                    "range `{}` is outside the file ({len} bytes)",
                    range.unwrap_or_default()
                ),
                kind: "invalid_request_error",
                param: Some("range"),
                code: Some("range_not_satisfiable"),
            }
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            return Plan::Done(r);
        }
    };
    Plan::Send {
        builder,
        status,
        start,
        n,
    }
}

/// A file as a response, honouring `Range`.
pub async fn serve_file(
    path: &Path,
    content_type: &'static str,
    download_name: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("cannot read {}: {e}", path.display())))?
        .len();
    let (builder, status, start, n) = match plan(len, content_type, download_name, headers) {
        Plan::Done(r) => return Ok(r),
        Plan::Send {
            builder,
            status,
            start,
            n,
        } => (builder, status, start, n),
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(format!("cannot seek {}: {e}", path.display())))?;
    }
    let stream = tokio_util::io::ReaderStream::new(file.take(n));
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, n)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("response: {e}")))
}

/// A stored output ([`crate::storage`]: the data directory or a bucket) as a response,
/// honouring `Range`.
pub async fn serve_object(
    outputs: &crate::storage::Outputs,
    key: &object_store::path::Path,
    content_type: &'static str,
    download_name: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let len = outputs.size(key).await.map_err(ApiError::internal)?;
    let (builder, status, start, n) = match plan(len, content_type, download_name, headers) {
        Plan::Done(r) => return Ok(r),
        Plan::Send {
            builder,
            status,
            start,
            n,
        } => (builder, status, start, n),
    };
    let body = if n == 0 {
        Body::empty()
    } else {
        Body::from_stream(
            outputs
                .stream(key, start..start + n)
                .await
                .map_err(ApiError::internal)?,
        )
    };
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, n)
        .body(body)
        .map_err(|e| ApiError::internal(format!("response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeAnswer::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(
            parse_range(Some("bytes=0-1"), 10),
            Partial { start: 0, end: 1 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-"), 10),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            Partial { start: 7, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=2-100"), 10),
            Partial { start: 2, end: 9 }
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Full);
    }
}
