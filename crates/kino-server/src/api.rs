//! The HTTP handlers: OpenAI's Videos API under `/v1`, plus Kino's extensions.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kino_engine::wan::pipeline::GenerateRequest;
use serde_json::{json, Map, Value};

use crate::content::serve_file;
use crate::error::ApiError;
use crate::mapping::{self, ModelInfo};
use crate::store::{Job, JobParams, ListResult, Order, Status};
use crate::{new_video_id, now_unix, valid_video_id, video_dir, AppState};

type ApiResult<T> = Result<T, ApiError>;

/// The OpenAI `Video` object for a job (exactly OpenAI's fields).
pub fn video_object(job: &Job) -> Value {
    json!({
        "id": job.id,
        "object": "video",
        "status": job.status.as_str(),
        "progress": job.progress,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "expires_at": job.expires_at,
        "model": job.model,
        "size": job.size,
        "seconds": job.seconds,
        "prompt": job.prompt,
        "remixed_from_video_id": job.remixed_from_video_id,
        "error": job.error.as_ref().map(|(code, message)| json!({"code": code, "message": message})),
    })
}

/// The fields of a create (or remix) request, from JSON or multipart.
async fn read_fields(state: &AppState, req: Request) -> ApiResult<Map<String, Value>> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(None, "invalid_multipart", e.body_text()))?;
        let mut fields = Map::new();
        let mut total = 0usize;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(multipart_error(e, state.config.max_upload_bytes)),
            };
            let name = field.name().unwrap_or("").to_string();
            let is_file = field.file_name().is_some();
            let data = field
                .bytes()
                .await
                .map_err(|e| multipart_error(e, state.config.max_upload_bytes))?;
            total += data.len();
            if total > state.config.max_upload_bytes {
                return Err(too_large(state.config.max_upload_bytes));
            }
            if is_file || name == "input_reference" {
                fields.insert(
                    name,
                    Value::Object(Map::from_iter([(
                        "file_bytes".to_string(),
                        json!(data.len()),
                    )])),
                );
                continue;
            }
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::bad_request(
                    None,
                    "invalid_multipart",
                    format!("field `{name}` is not UTF-8 text"),
                )
            })?;
            fields.insert(name, Value::String(text));
        }
        return Ok(fields);
    }
    let body = axum::body::to_bytes(req.into_body(), state.config.max_upload_bytes)
        .await
        .map_err(|_| too_large(state.config.max_upload_bytes))?;
    parse_json_object(&body)
}

fn parse_json_object(body: &Bytes) -> ApiResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            None,
            "invalid_json",
            "the body must be a JSON object, e.g. {\"prompt\": \"a corgi surfing\"}",
        )),
        Err(e) => Err(ApiError::bad_request(
            None,
            "invalid_json",
            format!("the body is not valid JSON ({e}); send a JSON object or multipart/form-data"),
        )),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is over this server's limit of {limit} bytes"),
        kind: "invalid_request_error",
        param: None,
        code: Some("payload_too_large"),
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::bad_request(None, "invalid_multipart", e.body_text())
    }
}

/// A text field (strings; numbers are turned into their text).
fn text_field(fields: &Map<String, Value>, name: &'static str) -> ApiResult<Option<String>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(ApiError::bad_request(
            Some(name),
            "invalid_type",
            format!("`{name}` must be a string, not {other}"),
        )),
    }
}

/// A number field given as a JSON number or a numeric string.
fn number_field<T: std::str::FromStr>(
    fields: &Map<String, Value>,
    names: &[&'static str],
    what: &str,
) -> ApiResult<Option<T>> {
    for &name in names {
        let Some(text) = text_field(fields, name)? else {
            continue;
        };
        return text.trim().parse::<T>().map(Some).map_err(|_| {
            ApiError::bad_request(
                Some(name),
                "invalid_type",
                format!("`{name}` = `{text}` is not {what}"),
            )
        });
    }
    Ok(None)
}

fn required_prompt(state: &AppState, fields: &Map<String, Value>) -> ApiResult<String> {
    let prompt = text_field(fields, "prompt")?.unwrap_or_default();
    if prompt.trim().is_empty() {
        return Err(ApiError::bad_request(
            Some("prompt"),
            "missing_required_parameter",
            "`prompt` is required: say what the video should show, e.g. {\"prompt\": \"a corgi surfing at sunset\"}",
        ));
    }
    let n = prompt.chars().count();
    if n > state.config.max_prompt_chars {
        return Err(ApiError::bad_request(
            Some("prompt"),
            "prompt_too_long",
            format!(
                "the prompt has {n} characters; this server takes at most {}",
                state.config.max_prompt_chars
            ),
        ));
    }
    Ok(prompt)
}

fn check_queue(state: &AppState) -> ApiResult<()> {
    let queued = state
        .store
        .counts()?
        .into_iter()
        .filter(|(s, _)| matches!(s, Status::Queued))
        .map(|(_, n)| n)
        .sum::<i64>();
    if queued as usize >= state.config.max_queue {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the queue is full ({queued} videos waiting); try again when some have finished"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        });
    }
    Ok(())
}

/// Turns create fields into a queued job.
fn build_job(
    state: &AppState,
    fields: &Map<String, Value>,
    owner: Option<String>,
) -> ApiResult<Job> {
    if fields.contains_key("input_reference") {
        return Err(ApiError::bad_request(
            Some("input_reference"),
            "unsupported_parameter",
            "`input_reference` (image-to-video) is not supported by the models this server runs yet; send a text prompt only",
        ));
    }
    let prompt = required_prompt(state, fields)?;
    let model_name = text_field(fields, "model")?;
    let mi = mapping::resolve_model(&state.models, model_name.as_deref())?;
    let model: &ModelInfo = &state.models[mi];
    let requested = text_field(fields, "size")?
        .map(|s| mapping::parse_size(&s))
        .transpose()?;
    let (width, height) = mapping::map_size(model, requested);
    let seconds = match text_field(fields, "seconds")? {
        Some(s) => mapping::parse_seconds(&s, state.config.max_seconds)?,
        None => 4.0f64.min(state.config.max_seconds),
    };
    let num_frames = mapping::frames_for(model, seconds);
    let negative_prompt = text_field(fields, "negative_prompt")?;
    let seed: Option<u64> = number_field(fields, &["seed"], "a whole number ≥ 0")?;
    let steps: Option<usize> =
        number_field(fields, &["steps", "num_inference_steps"], "a whole number")?;
    if let Some(s) = steps {
        if s == 0 || s > state.config.max_steps {
            return Err(ApiError::bad_request(
                Some("steps"),
                "invalid_steps",
                format!(
                    "steps {s} is out of range; use 1 to {} (the model's default is {})",
                    state.config.max_steps, model.defaults.num_inference_steps
                ),
            ));
        }
    }
    let guidance: Option<f64> = number_field(fields, &["guidance", "guidance_scale"], "a number")?;
    if let Some(g) = guidance {
        if !(g.is_finite() && (0.0..=100.0).contains(&g)) {
            return Err(ApiError::bad_request(
                Some("guidance"),
                "invalid_guidance",
                format!("guidance {g} is out of range; use 0 to 100 (1 or less turns guidance off; the default is {})", model.defaults.guidance_scale),
            ));
        }
    }
    let request = GenerateRequest {
        prompt: prompt.clone(),
        negative_prompt,
        width: Some(width),
        height: Some(height),
        num_frames: Some(num_frames),
        num_inference_steps: Some(steps.unwrap_or(model.defaults.num_inference_steps)),
        guidance_scale: Some(guidance.unwrap_or(model.defaults.guidance_scale)),
        shift: None,
        seed: Some(seed.unwrap_or_else(rand::random)),
    };
    Ok(Job {
        id: new_video_id(),
        seq: 0,
        status: Status::Queued,
        progress: 0,
        created_at: now_unix(),
        completed_at: None,
        expires_at: None,
        model: model_name
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "sora-2".into()),
        size: format!("{width}x{height}"),
        seconds: mapping::seconds_string(seconds),
        prompt,
        remixed_from_video_id: None,
        error: None,
        params: JobParams {
            model_id: model.id.clone(),
            request,
            fps: model.defaults.fps,
        },
        owner,
    })
}

fn enqueue(state: &AppState, mut job: Job) -> ApiResult<Response> {
    check_queue(state)?;
    job.seq = state.store.insert(&job)?;
    state.shared.notify();
    tracing::info!(
        id = job.id,
        size = job.size,
        seconds = job.seconds,
        "video queued"
    );
    Ok(Json(video_object(&job)).into_response())
}

/// `POST /v1/videos`
pub async fn create_video(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let owner = crate::auth::owner_of(&req);
    let fields = read_fields(&state, req).await?;
    let job = build_job(&state, &fields, owner)?;
    enqueue(&state, job)
}

/// The job `id`, if the caller may see it.
pub fn find(state: &AppState, id: &str, owner: &Option<String>) -> ApiResult<Job> {
    if !valid_video_id(id) {
        return Err(ApiError::bad_request(
            Some("video_id"),
            "invalid_video_id",
            format!("`{id}` is not a video id; ids look like video_0123abcd…"),
        ));
    }
    match state.store.get(id)? {
        Some(j) if owner.is_none() || j.owner == *owner => Ok(j),
        _ => Err(ApiError::video_not_found(id)),
    }
}

/// `GET /v1/videos/{id}`
pub async fn get_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
    owner: crate::auth::Owner,
) -> ApiResult<Response> {
    let job = find(&state, &id, &owner.0)?;
    Ok(Json(video_object(&job)).into_response())
}

/// `GET /v1/videos?after=&limit=&order=`
pub async fn list_videos(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    owner: crate::auth::Owner,
) -> ApiResult<Response> {
    let limit = match q.get("limit") {
        None => 20,
        Some(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    Some("limit"),
                    "invalid_limit",
                    format!("limit `{s}` must be a whole number from 1 to 100"),
                ))
            }
        },
    };
    let order = match q.get("order").map(|s| s.trim()) {
        None | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(o) => {
            return Err(ApiError::bad_request(
                Some("order"),
                "invalid_order",
                format!("order `{o}` must be `asc` or `desc`"),
            ))
        }
    };
    let after = q.get("after").map(|s| s.trim()).filter(|s| !s.is_empty());
    if let Some(a) = after {
        if !valid_video_id(a) {
            return Err(ApiError::bad_request(
                Some("after"),
                "invalid_video_id",
                format!("after `{a}` is not a video id"),
            ));
        }
    }
    let (jobs, has_more) = match state.store.list(owner.0.as_deref(), after, limit, order)? {
        ListResult::Page { jobs, has_more } => (jobs, has_more),
        ListResult::UnknownCursor => {
            return Err(ApiError::bad_request(
                Some("after"),
                "invalid_cursor",
                format!(
                    "after `{}` names no video; pass the last_id of the previous page",
                    after.unwrap_or_default()
                ),
            ))
        }
    };
    let data: Vec<Value> = jobs.iter().map(video_object).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": jobs.first().map(|j| j.id.clone()),
        "last_id": jobs.last().map(|j| j.id.clone()),
        "has_more": has_more,
    }))
    .into_response())
}

/// `DELETE /v1/videos/{id}`: removes the video (stopping it if it runs) and its files.
pub async fn delete_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
    owner: crate::auth::Owner,
) -> ApiResult<Response> {
    let job = find(&state, &id, &owner.0)?;
    if job.status == Status::InProgress {
        state.shared.request_cancel(&id);
    }
    let deleted = state.store.delete(&id)?;
    crate::worker::remove_outputs(&state.config.data_dir, &id);
    Ok(Json(json!({"id": id, "object": "video.deleted", "deleted": deleted})).into_response())
}

/// `POST /v1/videos/{id}/cancel` (extension): a queued or running video becomes `failed` with
/// `error.code = "cancelled"`.
pub async fn cancel_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
    owner: crate::auth::Owner,
) -> ApiResult<Response> {
    let job = find(&state, &id, &owner.0)?;
    match job.status {
        Status::Queued => {
            let failed = state.store.fail(
                &id,
                "cancelled",
                "the video was cancelled before it started",
                now_unix(),
            )?;
            if failed {
                state.shared.emit("video.failed", &id);
            }
        }
        Status::InProgress => {
            state.shared.request_cancel(&id);
            // Wait briefly for the worker to stop so the answer shows the final state.
            for _ in 0..100 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                match state.store.get(&id)? {
                    Some(j) if j.status == Status::InProgress => continue,
                    _ => break,
                }
            }
        }
        Status::Completed | Status::Failed => {
            return Err(ApiError::conflict(
                "video_finished",
                format!(
                    "video {id} is already {}; nothing to cancel",
                    job.status.as_str()
                ),
            ))
        }
    }
    let job = find(&state, &id, &owner.0)?;
    Ok(Json(video_object(&job)).into_response())
}

/// `POST /v1/videos/{id}/remix`: the same settings (model, size, seconds, seed, steps,
/// guidance, negative prompt) with a new prompt.
pub async fn remix_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let owner = crate::auth::owner_of(&req);
    let src = find(&state, &id, &owner)?;
    let fields = read_fields(&state, req).await?;
    let prompt = required_prompt(&state, &fields)?;
    if !state.models.iter().any(|m| m.id == src.params.model_id) {
        return Err(ApiError::bad_request(
            Some("video_id"),
            "model_not_found",
            format!(
                "video {id} was made with model `{}`, which this server no longer serves",
                src.params.model_id
            ),
        ));
    }
    let mut params = src.params.clone();
    params.request.prompt = prompt.clone();
    let job = Job {
        id: new_video_id(),
        seq: 0,
        status: Status::Queued,
        progress: 0,
        created_at: now_unix(),
        completed_at: None,
        expires_at: None,
        model: src.model.clone(),
        size: src.size.clone(),
        seconds: src.seconds.clone(),
        prompt,
        remixed_from_video_id: Some(src.id.clone()),
        error: None,
        params,
        owner,
    };
    enqueue(&state, job)
}

/// `GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet`
pub async fn video_content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    owner: crate::auth::Owner,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = find(&state, &id, &owner.0)?;
    let variant = q.get("variant").map(|s| s.trim()).unwrap_or("video");
    let (file, ctype, ext) = match variant {
        "video" | "" => ("video.mp4", "video/mp4", "mp4"),
        "thumbnail" => ("thumbnail.jpg", "image/jpeg", "jpg"),
        "spritesheet" => ("spritesheet.jpg", "image/jpeg", "jpg"),
        other => {
            return Err(ApiError::bad_request(
                Some("variant"),
                "invalid_variant",
                format!("variant `{other}` must be video, thumbnail or spritesheet"),
            ))
        }
    };
    if job.status != Status::Completed {
        return Err(ApiError::conflict(
            "video_not_ready",
            format!(
                "video {id} is {} ({}%); download it when its status is completed",
                job.status.as_str(),
                job.progress
            ),
        ));
    }
    let path = video_dir(&state.config.data_dir, &id).join(file);
    let name = if variant == "video" || variant.is_empty() {
        format!("{id}.{ext}")
    } else {
        format!("{id}-{variant}.{ext}")
    };
    serve_file(&path, ctype, &name, &headers).await
}

/// `GET /v1/models`
pub async fn list_models(State(state): State<AppState>) -> Response {
    let mut data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "kino"}))
        .collect();
    for alias in mapping::SORA_ALIASES {
        data.push(json!({"id": alias, "object": "model", "created": 0, "owned_by": "kino"}));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /`: the web studio (one embedded page; it talks to the API above).
pub async fn studio() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("studio.html"),
    )
        .into_response()
}

/// `GET /health`
pub async fn health(State(state): State<AppState>) -> ApiResult<Response> {
    let counts = state.store.counts()?;
    let mut jobs = Map::new();
    for (s, n) in counts {
        jobs.insert(s.as_str().into(), json!(n));
    }
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "models": state.models.iter().map(|m| &m.id).collect::<Vec<_>>(),
        "jobs": jobs,
    }))
    .into_response())
}

/// `GET /metrics` (Prometheus text format).
pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    use std::fmt::Write;
    use std::sync::atomic::Ordering;
    let counts = state.store.counts()?;
    let mut s = String::new();
    let _ = writeln!(s, "# HELP kino_videos Videos in the store by status.");
    let _ = writeln!(s, "# TYPE kino_videos gauge");
    for (st, n) in &counts {
        let _ = writeln!(s, "kino_videos{{status=\"{}\"}} {n}", st.as_str());
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == Status::Queued)
        .map_or(0, |c| c.1);
    let _ = writeln!(s, "# HELP kino_queue_depth Videos waiting to run.");
    let _ = writeln!(s, "# TYPE kino_queue_depth gauge");
    let _ = writeln!(s, "kino_queue_depth {queued}");
    let sh = &state.shared;
    let _ = writeln!(
        s,
        "# HELP kino_jobs_run_total Jobs the workers finished (any outcome) since start."
    );
    let _ = writeln!(s, "# TYPE kino_jobs_run_total counter");
    let _ = writeln!(
        s,
        "kino_jobs_run_total {}",
        sh.jobs_run.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        s,
        "# HELP kino_denoise_steps_total Denoising steps run since start."
    );
    let _ = writeln!(s, "# TYPE kino_denoise_steps_total counter");
    let _ = writeln!(
        s,
        "kino_denoise_steps_total {}",
        sh.denoise_steps.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        s,
        "# HELP kino_denoise_seconds_total Time spent in denoising steps since start."
    );
    let _ = writeln!(s, "# TYPE kino_denoise_seconds_total counter");
    let _ = writeln!(
        s,
        "kino_denoise_seconds_total {}",
        sh.denoise_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s,
    )
        .into_response())
}

/// A known path with the wrong method: 405 in OpenAI's shape.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} does not take {method}", uri.path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
}

/// Anything else: 404 in OpenAI's shape.
pub async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}
