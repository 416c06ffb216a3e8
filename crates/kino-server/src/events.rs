//! `GET /v1/videos/{id}/events` (extension): server-sent events for one video, modelled on
//! fal's status stream. Events (each `data` is JSON):
//!
//! - `queued`: `{"position": N}` (videos ahead of this one),
//! - `progress`: `{"stage", "step", "total", "progress", "segment", "segments",
//!   "remaining_seconds"}` while it runs (`segment` k of `segments` n: a video longer than one
//!   clip, or an extension, is made in segments; `progress` goes 0→100 over all of them;
//!   `remaining_seconds` estimates the time left from the progress so far, `null` until there is
//!   some),
//! - `completed` / `failed`: the final video object, after which the stream ends.
//!
//! An event is sent when something changes; a comment keeps the connection alive.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::video_object;
use crate::auth::Owner;
use crate::error::ApiError;
use crate::store::Status;
use crate::AppState;

struct Cursor {
    state: AppState,
    id: String,
    last: Option<String>,
    done: bool,
}

/// The next event to send, or `None` when the stream is over.
async fn next_event(mut c: Cursor) -> Option<(Result<Event, Infallible>, Cursor)> {
    loop {
        if c.done || c.state.shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        let job = match c.state.store.get(&c.id) {
            Ok(j) => j,
            Err(e) => {
                c.done = true;
                let ev = Event::default()
                    .event("error")
                    .data(json!({"message": e.to_string()}).to_string());
                return Some((Ok(ev), c));
            }
        };
        let (name, data) = match &job {
            None => {
                c.done = true;
                ("deleted", json!({"id": c.id}))
            }
            Some(j) => match j.status {
                Status::Queued => {
                    let pos = c.state.store.queue_position(j.seq).unwrap_or(0);
                    ("queued", json!({"position": pos}))
                }
                Status::InProgress => match c.state.shared.live(&j.id) {
                    Some(l) => (
                        "progress",
                        json!({"stage": l.stage, "step": l.step, "total": l.total, "progress": l.progress.max(j.progress), "segment": l.segment, "segments": l.segments, "remaining_seconds": l.remaining_secs}),
                    ),
                    // Running on another node: what it recorded in the shared store.
                    None => match c.state.store.live(&j.id).ok().flatten() {
                        Some(l) => (
                            "progress",
                            json!({"stage": l["stage"], "step": l["step"], "total": l["total"], "progress": l["progress"].as_u64().unwrap_or(0).max(u64::from(j.progress)), "segment": l["segment"], "segments": l["segments"], "remaining_seconds": l["remaining_secs"]}),
                        ),
                        None => (
                            "progress",
                            json!({"stage": null, "step": 0, "total": 0, "progress": j.progress}),
                        ),
                    },
                },
                Status::Completed | Status::Failed => {
                    c.done = true;
                    (j.status.as_str(), video_object(j))
                }
            },
        };
        let text = data.to_string();
        let key = format!("{name}:{text}");
        if c.last.as_deref() != Some(key.as_str()) || c.done {
            c.last = Some(key);
            return Some((Ok(Event::default().event(name).data(text)), c));
        }
        if c.state.store.lease_duration().is_some() {
            // Another node's change arrives as a NOTIFY; polling covers a lost one.
            tokio::select! {
                _ = c.state.shared.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `GET /v1/videos/{id}/events`
pub async fn video_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    owner: Owner,
) -> Result<Response, ApiError> {
    crate::api::find(&state, &id, &owner.0)?;
    let cursor = Cursor {
        state,
        id,
        last: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, next_event);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
