//! Optional API keys. With keys configured, every endpoint but `/health` and the studio page `/`
//! needs `Authorization: Bearer KEY`, and a key sees only the videos it created (their `owner` is a
//! stable fingerprint of the key, never the key itself).

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Who is calling: `Some(fingerprint)` with keys on, `None` with keys off (sees everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Owner {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Owner>().cloned().unwrap_or_default())
    }
}

/// The owner of a request (for handlers that consume the whole request).
pub fn owner_of(req: &Request) -> Option<String> {
    req.extensions().get::<Owner>().and_then(|o| o.0.clone())
}

/// A stable, non-secret fingerprint of a key (FNV-1a, 64 bits).
pub fn fingerprint(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("key_{h:016x}")
}

fn unauthorized(msg: &str) -> Response {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: msg.to_string(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response()
}

/// Middleware: checks the bearer key when keys are configured.
pub async fn check(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // The studio page itself is public; it asks for a key and sends it with every API call.
    let public = matches!(req.uri().path(), "/health" | "/");
    if state.config.api_keys.is_empty() || public {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(given) = given else {
        return unauthorized(
            "this server needs an API key: send `Authorization: Bearer YOUR_KEY` (the openai SDK sends OPENAI_API_KEY)",
        );
    };
    // Compare against every key without an early exit on the first mismatching byte.
    let ok = state.config.api_keys.iter().fold(false, |acc, k| {
        acc | constant_time_eq(k.as_bytes(), given.as_bytes())
    });
    if !ok {
        return unauthorized("the API key is not valid for this server");
    }
    let owner = Owner(Some(fingerprint(given)));
    req.extensions_mut().insert(owner);
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
