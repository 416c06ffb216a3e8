//! Provenance on the server: `POST /v1/content_provenance_checks` (as in the official `openai`
//! SDK: a multipart `file` upload → `results` with a `c2pa` entry and an entry for Kino's
//! watermark), the prompt policy for every create-like endpoint, and the helpers the worker
//! stamps its outputs with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kino_provenance::{C2paState, Provenance, Subject, Verification};
use serde_json::{json, Value};

use crate::error::{ApiError, ServerError};
use crate::{now_unix, AppState, ServerConfig};

/// Each running server's provenance, by data directory (the worker and the handlers find it
/// from the paths they already have; several servers may run in one process, as in tests).
static SERVERS: Mutex<Vec<(PathBuf, Arc<Provenance>)>> = Mutex::new(Vec::new());

/// Opens the server's provenance (keys made on first use; refusals logged in
/// `DATA_DIR/policy-audit.jsonl` unless the policy names a log), logs what the operator should
/// know (a key was made, signing or the watermark is off) and registers it for `data_dir`.
pub fn open(config: &ServerConfig) -> Result<Arc<Provenance>, ServerError> {
    let mut settings = config.provenance.clone();
    if settings.audit_dir.is_none() {
        settings.audit_dir = Some(config.data_dir.clone());
    }
    let mut prov =
        Provenance::open(settings).map_err(|e| ServerError::Provenance(e.to_string()))?;
    for n in prov.notices.drain(..) {
        if n.contains("warning") {
            tracing::warn!("{n}");
        }
        eprintln!("{n}");
    }
    let prov = Arc::new(prov);
    if let Ok(mut s) = SERVERS.lock() {
        s.retain(|(d, _)| d != &config.data_dir);
        s.push((config.data_dir.clone(), prov.clone()));
    }
    Ok(prov)
}

/// The provenance of the server whose data directory holds `path` (the one registered with the
/// longest matching directory); a server's own paths always have one.
pub fn for_path(path: &Path) -> Option<Arc<Provenance>> {
    let s = SERVERS.lock().ok()?;
    s.iter()
        .filter(|(d, _)| path.starts_with(d))
        .max_by_key(|(d, _)| d.as_os_str().len())
        .map(|(_, p)| p.clone())
}

/// Refuses a prompt the operator's policy blocks (400 `moderation_blocked`, with the rule's
/// reason); the refusal is in the audit log.
pub fn check_prompt(data_dir: &Path, prompt: &str) -> Result<(), ApiError> {
    let Some(prov) = for_path(data_dir) else {
        return Ok(());
    };
    prov.check_prompt(prompt, "kino serve")
        .map_err(|r| ApiError::bad_request(Some("prompt"), "moderation_blocked", r.to_string()))
}

/// Writes a finished video's MP4 through the server's provenance (watermark embedded before
/// encoding, signed after; the metadata records what was applied), then signs the thumbnail
/// and spritesheet as derived from it. `video_id` seeds the watermark id (its SHA-256's first
/// 48 bits) so the operator can look a marked clip up.
pub fn write_video(
    mp4: &Path,
    video: &kino_media::Video,
    opts: &kino_media::Mp4Options,
    model_dir: &Path,
    video_id: &str,
) -> Result<(), String> {
    let Some(prov) = for_path(mp4) else {
        return kino_media::write_mp4(mp4, video, opts).map_err(|e| e.to_string());
    };
    let mut subject = Subject::new(Some(model_dir), video_id);
    subject.video_id = Some(video_id.to_string());
    prov.write_mp4(mp4, video, opts, &subject)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Signs a thumbnail or spritesheet as derived from the video's MP4.
pub fn sign_derived(path: &Path, mp4: &Path, video_id: &str) -> Result<(), String> {
    let Some(prov) = for_path(path) else {
        return Ok(());
    };
    let meta = kino_media::read_metadata(mp4).ok().flatten();
    let mut subject = Subject::new(None, video_id);
    subject.video_id = Some(video_id.to_string());
    prov.sign_derived(path, mp4, meta.as_ref(), &subject)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The response body for a verification, in the shape of the SDK's `ContentProvenanceCheck`.
pub fn check_object(v: &Verification) -> Value {
    let c = &v.c2pa;
    let intact = matches!(c.state, C2paState::Trusted | C2paState::Valid);
    let kino = c.kino.as_ref();
    let c2pa = json!({
        "type": "c2pa",
        "outcome": if intact && (kino.is_some() || c.ai_generated()) { "detected" } else { "not_detected" },
        "validation_state": c.state.api_name(),
        "issuer": if c.state == C2paState::Absent { None } else { c.issuer.clone().or_else(|| c.signer.clone()) },
        "model": kino.and_then(|k| k.model.clone()),
        "generated_at": kino.and_then(|k| k.generated_at.clone()),
    });
    let w = &v.watermark;
    let mut watermark = json!({
        "type": "kino_watermark",
        "outcome": if w.detected { "detected" } else { "not_detected" },
        "id": w.id,
        "confidence": w.confidence,
        "frames_used": w.frames_used,
    });
    if let Some(why) = &w.skipped {
        watermark["not_checked"] = json!(why);
    }
    json!({
        "object": "content_provenance_check",
        "created_at": now_unix(),
        "results": [c2pa, watermark],
    })
}

/// `POST /v1/content_provenance_checks`: multipart with a `file` (MP4 or another video, PNG,
/// JPEG, WebP, GIF).
pub async fn create_check(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let ctype = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !ctype.starts_with("multipart/form-data") {
        return Err(ApiError::bad_request(
            Some("file"),
            "invalid_request",
            "send the file as multipart/form-data with a `file` field, e.g. curl -F file=@video.mp4",
        ));
    }
    let max = state.config.max_upload_bytes;
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::bad_request(None, "invalid_multipart", e.body_text()))?;
    let mut file: Option<Vec<u8>> = None;
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::bad_request(
                    None,
                    "invalid_multipart",
                    format!("{}; uploads are limited to {max} bytes", e.body_text()),
                ))
            }
        };
        if field.name() != Some("file") {
            continue;
        }
        let bytes = field.bytes().await.map_err(|e| {
            ApiError::bad_request(
                Some("file"),
                "invalid_multipart",
                format!("{}; uploads are limited to {max} bytes", e.body_text()),
            )
        })?;
        file = Some(bytes.to_vec());
    }
    let Some(bytes) = file else {
        return Err(ApiError::bad_request(
            Some("file"),
            "missing_required_parameter",
            "`file` is required: the video or image to check",
        ));
    };
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            Some("file"),
            "invalid_file",
            "the uploaded `file` is empty",
        ));
    }
    let Some(prov) = for_path(&state.config.data_dir) else {
        return Err(ApiError::internal(
            "the server's provenance settings are not loaded",
        ));
    };
    let v = tokio::task::spawn_blocking(move || {
        let anchors = prov.trust_anchors().unwrap_or_default();
        kino_provenance::verify_bytes(&bytes, &anchors, &prov.watermark_key)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the check failed: {e}")))?;
    if v.format == "unknown" && v.watermark.skipped.is_some() {
        return Err(ApiError::bad_request(
            Some("file"),
            "invalid_file",
            "the file is not a video or image this server can read; send MP4, MOV, WebM, PNG, \
             JPEG, WebP or GIF",
        ));
    }
    Ok(Json(check_object(&v)).into_response())
}
