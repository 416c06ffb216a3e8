//! Characters (`POST /v1/videos/characters`, `GET /v1/videos/characters/{id}`): a subject kept
//! across videos. In Kino a character is one stored reference image that a create names with
//! the extension field `"characters": ["char_…"]`; a VACE model gets the images as its
//! reference images (in the order given).
//!
//! - **From a video** (the `video` upload, as the official SDK's `create_character(name=…,
//!   video=…)` sends it, or `{"video": {"id": "video_…"}}` for a completed video of this
//!   server): up to [`SAMPLED_FRAMES`] evenly spaced frames of its first
//!   [`CHARACTER_HEAD_SECONDS`] seconds are scored by the variance of the Laplacian of their
//!   luma (a 4-neighbour Laplacian over the inner pixels; the usual focus measure: sharp edges
//!   score high, blur and flat frames low) and the clearest one is kept (the earliest on a tie).
//!   A video whose sampled frames are all flat (variance below [`MIN_SHARPNESS`]) is refused.
//! - **From an image** (Kino extension: an image in the `video` field, or the field `image`,
//!   an upload or a data URL): the image itself.
//!
//! The image is kept at the size it was taken at as `DATA_DIR/characters/<id>/image.png` and
//! described in the `characters` table of the job store, so characters survive a restart.
//! `GET /v1/videos/characters/{id}/content` (extension) downloads it. When a job uses a
//! character, its image is copied into the job's inputs, so the job (and its remixes) keep it.

use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kino_media::Frame;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{self, Fields};
use crate::error::ApiError;
use crate::store::Character;
use crate::{inputs, now_unix, AppState};

/// Frames of a video scored for sharpness.
pub const SAMPLED_FRAMES: usize = 16;
/// How much of a video is read to pick a frame.
pub const CHARACTER_HEAD_SECONDS: f64 = 20.0;
/// Below this Laplacian variance a frame counts as flat (no subject to keep).
pub const MIN_SHARPNESS: f64 = 1.0;
/// The most characters one video may use.
pub const MAX_CHARACTERS_PER_VIDEO: usize = 4;
/// The longest character name.
pub const MAX_NAME_CHARS: usize = 200;

/// What the store keeps about a character besides its id, name and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterInfo {
    /// The stored image: `image.png` in the character's folder.
    pub file: String,
    pub width: u32,
    pub height: u32,
    /// SHA-256 of the stored PNG (hex).
    pub sha256: String,
    /// What it was made from.
    pub source: inputs::StoredInput,
    /// For a video: the index of the chosen frame among the decoded frames, how many were
    /// scored, and its sharpness (Laplacian variance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharpness: Option<f64>,
}

/// A new id: `char_` and 32 hex digits.
pub fn new_character_id() -> String {
    format!("char_{:032x}", rand::random::<u128>())
}

/// Ids are `char_` + 1 to 64 hex digits (so they never name a path outside the data dir).
pub fn valid_character_id(id: &str) -> bool {
    id.strip_prefix("char_")
        .is_some_and(|h| (1..=64).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where a character's image is kept.
pub fn character_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("characters").join(id)
}

/// The path of a character's stored image.
pub fn image_path(data_dir: &Path, c: &Character) -> PathBuf {
    character_dir(data_dir, &c.id).join(&c.info.file)
}

/// The API object: the SDK's `id`, `created_at`, `name`, plus `object` and Kino's `width`,
/// `height` (of the stored image) and `source_frame` (the frame picked from a video; `null` for
/// an image).
pub fn character_object(c: &Character) -> Value {
    json!({
        "id": c.id,
        "object": "character",
        "created_at": c.created_at,
        "name": c.name,
        "width": c.info.width,
        "height": c.info.height,
        "source_frame": c.info.frame,
    })
}

/// Variance of the 4-neighbour Laplacian of the frame's luma (BT.601 weights) over the inner
/// pixels; 0 for frames smaller than 3×3.
pub fn sharpness(frame: &Frame) -> f64 {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let d = frame.data();
    let luma: Vec<f64> = d
        .chunks_exact(3)
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect();
    let (mut sum, mut sq, mut n) = (0.0, 0.0, 0.0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let i = y * w + x;
            let l = luma[i - 1] + luma[i + 1] + luma[i - w] + luma[i + w] - 4.0 * luma[i];
            sum += l;
            sq += l * l;
            n += 1.0;
        }
    }
    let mean = sum / n;
    (sq / n - mean * mean).max(0.0)
}

/// The clearest of up to [`SAMPLED_FRAMES`] evenly spaced frames: `(index, sharpness, sampled)`
/// (the earliest on a tie).
pub fn clearest_frame(frames: &[Frame]) -> Option<(usize, f64, usize)> {
    let picks = kino_media::evenly_spaced(frames.len(), SAMPLED_FRAMES);
    let mut best: Option<(usize, f64)> = None;
    for &i in &picks {
        let s = sharpness(&frames[i]);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, s)| (i, s, picks.len()))
}

fn name_field(fields: &Fields) -> Result<String, ApiError> {
    let name = match fields.map.get("name") {
        Some(Value::String(s)) => s.trim().to_string(),
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err(ApiError::bad_request(
                Some("name"),
                "invalid_type",
                format!("`name` must be a string, not {other}"),
            ))
        }
    };
    if name.is_empty() {
        return Err(ApiError::bad_request(
            Some("name"),
            "missing_required_parameter",
            "`name` is required: a display name for the character, e.g. name=\"Mossy the cat\"",
        ));
    }
    let n = name.chars().count();
    if n > MAX_NAME_CHARS {
        return Err(ApiError::bad_request(
            Some("name"),
            "name_too_long",
            format!("the name has {n} characters; use at most {MAX_NAME_CHARS}"),
        ));
    }
    Ok(name)
}

/// Checks the request and picks the image: `(info without file hash, the image)`.
fn build_character(
    state: &AppState,
    fields: &Fields,
    owner: &Option<String>,
) -> Result<(String, CharacterInfo, Frame), ApiError> {
    let name = name_field(fields)?;
    let usage = "send the video as the multipart file field `video` (with the openai SDK: client.videos.create_character(name=…, video=open(\"clip.mp4\", \"rb\"))), an image as `video` or `image`, or name a completed video of this server with {\"video\": {\"id\": \"video_…\"}}";
    let raw = if !fields.files.contains_key("video") && !fields.map.contains_key("video") {
        match api::image_input(state, fields, "image")? {
            Some(r) => r,
            None => {
                return Err(ApiError::bad_request(
                    Some("video"),
                    "missing_required_parameter",
                    format!("`video` is required; {usage}"),
                ))
            }
        }
    } else {
        api::source_video(state, fields, owner, usage, "used for a character")?.0
    };
    let mut stored = inputs::StoredInput {
        name: raw.name.clone(),
        sha256: inputs::sha256_hex(&raw.bytes),
        bytes: raw.bytes.len() as u64,
        file: String::new(),
        format: String::new(),
        width: 0,
        height: 0,
        frames: None,
        fps: None,
    };
    if let Some(format) = inputs::sniff_image(&raw.bytes) {
        if raw.bytes.len() > state.config.max_image_bytes {
            return Err(api::input_too_large(
                "video",
                state.config.max_image_bytes,
                "image",
            ));
        }
        let frame = inputs::decode_image(&raw.bytes).map_err(|e| {
            ApiError::bad_request(
                Some("video"),
                "invalid_image",
                format!("`video` ({}) is not a readable image: {e}", raw.name),
            )
        })?;
        stored.format = format.into();
        stored.width = frame.width();
        stored.height = frame.height();
        let info = CharacterInfo {
            file: "image.png".into(),
            width: frame.width(),
            height: frame.height(),
            sha256: String::new(),
            source: stored,
            frame: None,
            sampled: None,
            sharpness: None,
        };
        return Ok((name, info, frame));
    }
    let video = inputs::decode_video(&raw.bytes, CHARACTER_HEAD_SECONDS).map_err(|e| {
        ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!(
                "`video` ({}) is not a readable video or image: {e}; {usage}",
                raw.name
            ),
        )
    })?;
    stored.format = inputs::sniff_video(&raw.bytes).unwrap_or("video").into();
    stored.width = video.width();
    stored.height = video.height();
    stored.frames = Some(video.len() as u64);
    stored.fps = Some(video.fps().as_f64());
    let Some((index, score, sampled)) = clearest_frame(video.frames()) else {
        return Err(ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!("`video` ({}) has no frames", raw.name),
        ));
    };
    if score < MIN_SHARPNESS {
        return Err(ApiError::bad_request(
            Some("video"),
            "no_subject",
            format!(
                "`video` ({}) shows nothing to keep: all {sampled} sampled frames are flat (sharpness {score:.2}, below {MIN_SHARPNESS}); send a video in which the subject is visible",
                raw.name
            ),
        ));
    }
    let frame = video.into_frames().swap_remove(index);
    let info = CharacterInfo {
        file: "image.png".into(),
        width: frame.width(),
        height: frame.height(),
        sha256: String::new(),
        source: stored,
        frame: Some(index),
        sampled: Some(sampled),
        sharpness: Some(score),
    };
    Ok((name, info, frame))
}

/// `POST /v1/videos/characters` (multipart `name`, `video`): stores a character.
pub async fn create_character(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let owner = crate::auth::owner_of(&req);
    let fields = api::read_fields(&state, req).await?;
    api::blocking(move || {
        let (name, mut info, frame) = build_character(&state, &fields, &owner)?;
        let png = kino_media::encode_image(&frame, kino_media::ImageFormat::Png)
            .map_err(|e| ApiError::internal(format!("cannot encode the character image: {e}")))?;
        info.sha256 = inputs::sha256_hex(&png);
        let c = Character {
            id: new_character_id(),
            name,
            created_at: now_unix(),
            owner,
            info,
        };
        let dir = character_dir(&state.config.data_dir, &c.id);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(".image.png.tmp");
            std::fs::write(&tmp, &png)?;
            std::fs::rename(&tmp, dir.join(&c.info.file))
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::internal(format!(
                "cannot store the character image in {}: {e}",
                dir.display()
            )));
        }
        if let Err(e) = state.store.insert_character(&c) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        tracing::info!(
            id = c.id,
            frame = c.info.frame,
            size = format!("{}x{}", c.info.width, c.info.height),
            "character stored"
        );
        Ok(Json(character_object(&c)).into_response())
    })
    .await
}

/// 404 for a character id that does not exist.
pub fn character_not_found(id: &str, param: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no character with id `{id}`; create one with POST /v1/videos/characters (name, video)"
        ),
        kind: "invalid_request_error",
        param: Some(param),
        code: Some("character_not_found"),
    }
}

/// The character `id`, if the caller may see it; `param` names the field in errors.
pub fn find_character(
    state: &AppState,
    id: &str,
    owner: &Option<String>,
    param: &'static str,
) -> Result<Character, ApiError> {
    if !valid_character_id(id) {
        return Err(ApiError::bad_request(
            Some(param),
            "invalid_character_id",
            format!("`{id}` is not a character id; ids look like char_0123abcd… (from POST /v1/videos/characters)"),
        ));
    }
    match state.store.get_character(id)? {
        Some(c) if owner.is_none() || c.owner == *owner => Ok(c),
        _ => Err(character_not_found(id, param)),
    }
}

/// `GET /v1/videos/characters/{id}`
pub async fn get_character(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    owner: crate::auth::Owner,
) -> Result<Response, ApiError> {
    let c = find_character(&state, &id, &owner.0, "character_id")?;
    Ok(Json(character_object(&c)).into_response())
}

/// `GET /v1/videos/characters/{id}/content` (extension): the character's PNG.
pub async fn character_content(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    owner: crate::auth::Owner,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = find_character(&state, &id, &owner.0, "character_id")?;
    let path = image_path(&state.config.data_dir, &c);
    crate::content::serve_file(&path, "image/png", &format!("{id}.png"), &headers).await
}

/// Character folders whose row is gone (a request that died between the two writes).
pub fn remove_orphans(state_dir: &Path, known: &[String]) {
    let Ok(rd) = std::fs::read_dir(state_dir.join("characters")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(name) = e.file_name().to_str().map(String::from) else {
            continue;
        };
        if valid_character_id(&name) && !known.contains(&name) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let id = new_character_id();
        assert!(valid_character_id(&id), "{id}");
        assert!(!valid_character_id("char_"));
        assert!(!valid_character_id("char_../x"));
        assert!(!valid_character_id("video_00ff"));
    }

    #[test]
    fn the_sharpest_frame_wins() {
        let flat = Frame::filled(16, 16, [90, 90, 90]).unwrap();
        // A soft edge and a hard checkerboard.
        let soft = Frame::from_fn(16, 16, |x, _| {
            let v = (x * 16).min(255) as u8;
            [v, v, v]
        })
        .unwrap();
        let sharp = Frame::from_fn(16, 16, |x, y| {
            let v = if (x + y) % 2 == 0 { 250 } else { 5 };
            [v, v, v]
        })
        .unwrap();
        assert_eq!(sharpness(&flat), 0.0);
        assert!(sharpness(&sharp) > sharpness(&soft));
        let frames = vec![flat.clone(), soft, sharp, flat];
        let (i, s, n) = clearest_frame(&frames).unwrap();
        assert_eq!((i, n), (2, 4));
        assert!(s > MIN_SHARPNESS);
        assert!(clearest_frame(&[]).is_none());
    }
}
