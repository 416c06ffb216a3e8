//! The HTTP handlers: OpenAI's Videos API under `/v1`, plus Kino's extensions.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kino_engine::wan::pipeline::GenerateRequest;
use kino_media::Frame;
use serde_json::{json, Map, Value};

use crate::characters;
use crate::content::serve_object;
use crate::error::ApiError;
use crate::inputs::{self, CharacterInput, JobInputs, StoredInput};
use crate::mapping::{self, ModelInfo};
use crate::segments::LongJob;
use crate::store::{Job, JobParams, ListResult, Order, Status};
use crate::{new_video_id, now_unix, valid_video_id, AppState};

type ApiResult<T> = Result<T, ApiError>;

/// The OpenAI `Video` object for a job (OpenAI's fields; plus `lora` / `cache` when the job
/// used Kino's extensions).
pub fn video_object(job: &Job) -> Value {
    let mut v = json!({
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
    });
    // Kino's extensions, only when used.
    if !job.params.lora.is_empty() {
        v["lora"] = crate::adapters::lora_value(&job.params.lora);
    }
    if let Some(c) = &job.params.cache {
        v["cache"] = crate::adapters::cache_value(c, false);
    }
    if let Some(p) = &job.params.preset {
        v["preset"] = json!(p);
    }
    v
}

/// A file sent in a multipart body.
pub struct Upload {
    /// The file name the client gave (none for a bare binary field).
    pub filename: Option<String>,
    pub data: Vec<u8>,
}

/// The fields of a request: text and JSON values (multipart names like `video[id]` become
/// nested objects, as JSON would send them), and uploaded files by field name.
#[derive(Default)]
pub struct Fields {
    pub map: Map<String, Value>,
    pub files: HashMap<String, Upload>,
}

/// Fields that carry an image (`input_reference`, `last_image`) or a video (`video`).
fn input_limit(state: &AppState, name: &str) -> Option<(usize, &'static str)> {
    match name {
        "input_reference" | "last_image" | "image" => Some((state.config.max_image_bytes, "image")),
        // A mask may be a video.
        "video" | "mask" => Some((state.config.max_video_bytes, "video")),
        _ => None,
    }
}

/// 413 for one input over its limit.
pub(crate) fn input_too_large(name: &str, limit: usize, kind: &str) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "`{name}` is over this server's {kind} limit of {limit} bytes ({:.1} MiB); send a smaller {kind} (the server's --max-{kind}-bytes sets the limit)",
            limit as f64 / (1024.0 * 1024.0)
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("payload_too_large"),
    }
}

/// Puts `name` (or `outer[inner]`) into `map`; repeated `name[]` fields (how the openai SDK
/// sends a list in multipart) become an array.
fn insert_field(map: &mut Map<String, Value>, name: String, value: Value) {
    if let Some(outer) = name.strip_suffix("[]").filter(|o| !o.is_empty()) {
        let entry = map
            .entry(outer.to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !entry.is_array() {
            *entry = Value::Array(Vec::new());
        }
        if let Value::Array(a) = entry {
            a.push(value);
        }
        return;
    }
    if let Some((outer, rest)) = name.split_once('[') {
        if let Some(inner) = rest
            .strip_suffix(']')
            .filter(|i| !i.is_empty() && !i.contains('['))
        {
            let entry = map
                .entry(outer.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(o) = entry {
                o.insert(inner.to_string(), value);
            }
            return;
        }
    }
    map.insert(name, value);
}

/// The fields of a request, from JSON or multipart.
pub(crate) async fn read_fields(state: &AppState, req: Request) -> ApiResult<Fields> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let max = state.config.max_upload_bytes;
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(None, "invalid_multipart", e.body_text()))?;
        let mut fields = Fields::default();
        let mut total = 0usize;
        loop {
            let mut field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(multipart_error(e, max)),
            };
            let name = field.name().unwrap_or("").to_string();
            let filename = field.file_name().map(String::from);
            let limit = input_limit(state, &name).filter(|_| filename.is_some());
            let mut data = Vec::new();
            loop {
                let chunk = match field.chunk().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => return Err(multipart_error(e, max)),
                };
                total += chunk.len();
                if total > max {
                    return Err(too_large(max));
                }
                data.extend_from_slice(&chunk);
                if let Some((lim, kind)) = limit {
                    if data.len() > lim {
                        return Err(input_too_large(&name, lim, kind));
                    }
                }
            }
            if filename.is_some() {
                fields.files.insert(name, Upload { filename, data });
                continue;
            }
            match String::from_utf8(data) {
                Ok(text) => insert_field(&mut fields.map, name, Value::String(text)),
                Err(e) if input_limit(state, &name).is_some() => {
                    fields.files.insert(
                        name,
                        Upload {
                            filename: None,
                            data: e.into_bytes(),
                        },
                    );
                }
                Err(_) => {
                    return Err(ApiError::bad_request(
                        None,
                        "invalid_multipart",
                        format!("field `{name}` is not UTF-8 text"),
                    ))
                }
            }
        }
        return Ok(fields);
    }
    let body = axum::body::to_bytes(req.into_body(), state.config.max_upload_bytes)
        .await
        .map_err(|_| too_large(state.config.max_upload_bytes))?;
    Ok(Fields {
        map: parse_json_object(&body)?,
        files: HashMap::new(),
    })
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

/// A yes/no field: a JSON boolean or the text `true`/`false` (multipart sends text).
fn bool_field(fields: &Map<String, Value>, name: &'static str) -> ApiResult<Option<bool>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(t)) if t.trim().eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(t)) if t.trim().eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(ApiError::bad_request(
            Some(name),
            "invalid_type",
            format!("`{name}` must be true or false, not {other}"),
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
    crate::provenance::check_prompt(&state.config.data_dir, &prompt)?;
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

/// The settings every create and edit takes (OpenAI's and Kino's).
struct Settings {
    prompt: String,
    model_name: Option<String>,
    model: usize,
    size: Option<(u32, u32)>,
    seconds: Option<(f64, String)>,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f64>,
    /// Kino's extensions: LoRA adapters from `--lora-dir`, a step cache, a named preset (its
    /// settings already folded into `steps`, `guidance`, `shift` and `lora`).
    lora: Vec<crate::adapters::JobLora>,
    cache: Option<crate::adapters::JobCache>,
    shift: Option<f64>,
    preset: Option<String>,
}

/// Reads and checks the settings; `default_model` is used when the request names none.
fn read_settings(
    state: &AppState,
    fields: &Map<String, Value>,
    default_model: Option<&str>,
) -> ApiResult<Settings> {
    let prompt = required_prompt(state, fields)?;
    let model_name = text_field(fields, "model")?.filter(|m| !m.trim().is_empty());
    let mi = mapping::resolve_model(&state.models, model_name.as_deref().or(default_model))?;
    let model: &ModelInfo = &state.models[mi];
    let size = text_field(fields, "size")?
        .map(|s| mapping::parse_size(&s))
        .transpose()?;
    let seconds = match text_field(fields, "seconds")? {
        Some(s) => {
            let v = mapping::parse_seconds(&s, state.config.max_seconds)?;
            Some((v, mapping::seconds_string(v)))
        }
        None => None,
    };
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
    let mut lora = crate::adapters::read_lora(fields, state.config.lora_dir.as_deref(), model)?;
    let (mut steps, mut guidance, mut shift) = (steps, guidance, None);
    let preset = text_field(fields, "preset")?.filter(|p| !p.trim().is_empty());
    if let Some(name) = &preset {
        let p = crate::adapters::read_preset(name, &lora, model)?;
        // Explicit settings win over the preset's.
        steps = steps.or(p.num_inference_steps.map(|n| n.min(state.config.max_steps)));
        guidance = guidance.or(p.guidance_scale);
        shift = p.shift;
        lora.extend(crate::adapters::preset_lora(&p, model)?);
    }
    if !lora.is_empty() && model.capabilities.long_video {
        return Err(ApiError::bad_request(
            Some("lora"),
            "unsupported_parameter",
            format!(
                "model `{}` (diffusion forcing) takes no LoRA adapters yet; leave `lora` out",
                model.id
            ),
        ));
    }
    let cache = crate::adapters::read_cache(fields, state.config.mag_ratios.as_deref(), model)?;
    Ok(Settings {
        prompt,
        model_name,
        model: mi,
        size,
        seconds,
        negative_prompt,
        seed,
        steps,
        guidance,
        lora,
        cache,
        shift,
        preset,
    })
}

/// A job from checked settings, its size and frame count, and its inputs.
fn make_job(
    state: &AppState,
    s: Settings,
    (width, height): (usize, usize),
    num_frames: usize,
    seconds: String,
    inputs: Option<JobInputs>,
    owner: Option<String>,
) -> Job {
    let model = &state.models[s.model];
    let request = GenerateRequest {
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt,
        width: Some(width),
        height: Some(height),
        num_frames: Some(num_frames),
        num_inference_steps: Some(s.steps.unwrap_or(model.defaults.num_inference_steps)),
        guidance_scale: Some(s.guidance.unwrap_or(model.defaults.guidance_scale)),
        shift: s.shift,
        seed: Some(s.seed.unwrap_or_else(rand::random)),
        ..Default::default()
    };
    Job {
        id: new_video_id(),
        seq: 0,
        status: Status::Queued,
        progress: 0,
        created_at: now_unix(),
        completed_at: None,
        expires_at: None,
        model: s.model_name.unwrap_or_else(|| "sora-2".into()),
        size: format!("{width}x{height}"),
        seconds,
        prompt: s.prompt,
        remixed_from_video_id: None,
        error: None,
        params: JobParams {
            model_id: model.id.clone(),
            request,
            fps: model.defaults.fps,
            inputs,
            long: None,
            lora: s.lora,
            cache: s.cache,
            preset: s.preset,
        },
        owner,
        output_attempt: None,
    }
}

/// What a model can be asked to start from.
#[derive(Clone, Copy)]
enum Need {
    Text,
    Image,
    LastImage,
    Video,
    /// Continue a video from its last frames (a first-image or diffusion-forcing model).
    Continue,
}

/// A 400 unless `model` can start from `need`; it names the served models that can.
fn require(state: &AppState, model: &ModelInfo, need: Need, param: &'static str) -> ApiResult<()> {
    let can = |m: &ModelInfo| match need {
        Need::Text => m.capabilities.text,
        Need::Image => m.capabilities.image,
        Need::LastImage => m.capabilities.last_image,
        Need::Video => m.capabilities.video || m.capabilities.vace,
        Need::Continue => m.capabilities.image || m.capabilities.long_video,
    };
    if can(model) {
        return Ok(());
    }
    let what = match need {
        Need::Text => "text alone",
        Need::Image => "an image (input_reference)",
        Need::LastImage => "a last image (last_image)",
        Need::Video => "a video (video-to-video)",
        Need::Continue => "the end of a video (it takes neither a first image nor earlier frames)",
    };
    let able: Vec<&str> = state
        .models
        .iter()
        .filter(|m| can(m))
        .map(|m| m.id.as_str())
        .collect();
    let hint = if let Need::Text = need {
        "send an image as input_reference".to_string()
    } else if able.is_empty() {
        let example = match need {
            Need::LastImage => kino_engine::registry::last_image_model_names().join(", "),
            Need::Video => "a text-to-video model such as wan2.1-t2v-1.3b".to_string(),
            Need::Continue => kino_engine::registry::continuing_model_names().join(", "),
            _ => kino_engine::registry::image_model_names().join(", "),
        };
        format!("none of the models this server runs can; serve one that does with --model (e.g. {example})")
    } else {
        format!(
            "the served models that can: {} (pass \"model\": \"{}\")",
            able.join(", "),
            able[0]
        )
    };
    Err(ApiError::bad_request(
        Some(param),
        "unsupported_input",
        format!("model `{}` cannot start from {what}; {hint}", model.id),
    ))
}

/// An image input as sent: its name and bytes.
pub(crate) struct RawInput {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Decodes a `data:` URL.
fn data_url(param: &'static str, url: &str, limit: usize, kind: &str) -> ApiResult<Vec<u8>> {
    let bad = |why: &str| {
        ApiError::bad_request(
            Some(param),
            "invalid_data_url",
            format!("`{param}` has a malformed data URL: {why}; use data:image/png;base64,<base64 of the file>"),
        )
    };
    let rest = url
        .trim()
        .strip_prefix("data:")
        .ok_or_else(|| bad("it does not start with data:"))?;
    let (head, payload) = rest
        .split_once(',')
        .ok_or_else(|| bad("no comma before the data"))?;
    if !head.to_ascii_lowercase().ends_with(";base64") {
        return Err(bad("only base64 data URLs are taken (…;base64,…)"));
    }
    if payload.len() / 4 * 3 > limit + 3 {
        return Err(input_too_large(param, limit, kind));
    }
    use base64::Engine;
    let clean: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(clean.as_bytes()))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(clean.as_bytes()))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(clean.as_bytes()))
        .map_err(|e| bad(&format!("the base64 does not decode ({e})")))?;
    if bytes.len() > limit {
        return Err(input_too_large(param, limit, kind));
    }
    Ok(bytes)
}

/// An image input (`input_reference` or `last_image`): an upload, a data URL, or
/// `{"image_url": "data:…"}`. `{"file_id": …}` and remote URLs are refused.
pub(crate) fn image_input(
    state: &AppState,
    fields: &Fields,
    param: &'static str,
) -> ApiResult<Option<RawInput>> {
    let limit = state.config.max_image_bytes;
    if let Some(u) = fields.files.get(param) {
        if u.data.len() > limit {
            return Err(input_too_large(param, limit, "image"));
        }
        return Ok(Some(RawInput {
            name: u
                .filename
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| param.to_string()),
            bytes: u.data.clone(),
        }));
    }
    let usage = format!(
        "upload the image as the multipart file field `{param}`, or pass {{\"{param}\": {{\"image_url\": \"data:image/png;base64,…\"}}}}"
    );
    let url = match fields.map.get(param) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            if o.get("file_id").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::bad_request(
                    Some(param),
                    "unsupported_parameter",
                    format!("Kino has no Files API, so `{param}.file_id` cannot be used; {usage}"),
                ));
            }
            match o.get("image_url") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(ApiError::bad_request(
                        Some(param),
                        "invalid_type",
                        format!("`{param}` must be an image; {usage}"),
                    ))
                }
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                Some(param),
                "invalid_type",
                format!("`{param}` must be an image; {usage}"),
            ))
        }
    };
    let lower = url.trim_start().to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::bad_request(
            Some(param),
            "unsupported_parameter",
            format!("Kino does not fetch images from URLs; {usage}"),
        ));
    }
    if !lower.starts_with("data:") {
        return Err(ApiError::bad_request(
            Some(param),
            "invalid_type",
            format!("`{param}` is neither a file nor a data URL; {usage}"),
        ));
    }
    Ok(Some(RawInput {
        name: "data URL".into(),
        bytes: data_url(param, &url, limit, "image")?,
    }))
}

/// Decodes an image input; `role` names its stored file (`image`, `last_image`).
fn check_image(param: &'static str, role: &str, raw: &RawInput) -> ApiResult<(StoredInput, Frame)> {
    if let Some(kind) = inputs::sniff_video(&raw.bytes) {
        return Err(ApiError::bad_request(
            Some(param),
            "invalid_image",
            format!("`{param}` takes an image (PNG, JPEG or WebP), but {} is a {kind} video; to start from a video, send it to POST /v1/videos/edits (video-to-video)", raw.name),
        ));
    }
    let frame = inputs::decode_image(&raw.bytes).map_err(|e| {
        ApiError::bad_request(
            Some(param),
            "invalid_image",
            format!("`{param}` ({}) is not a readable image: {e}", raw.name),
        )
    })?;
    let format = inputs::sniff_image(&raw.bytes).unwrap_or("image");
    let ext = if format == "jpeg" { "jpg" } else { format };
    Ok((
        StoredInput {
            name: raw.name.clone(),
            sha256: inputs::sha256_hex(&raw.bytes),
            bytes: raw.bytes.len() as u64,
            file: format!("{role}.{ext}"),
            format: format.to_string(),
            width: frame.width(),
            height: frame.height(),
            frames: None,
            fps: None,
        },
        frame,
    ))
}

/// Files to store with a job: `(file name, bytes)`.
type PendingFiles = Vec<(String, Vec<u8>)>;

/// A 400 for VACE-only input (`what`: "a mask", "characters") sent to a model that is not a
/// VACE model; it names the VACE models (served ones first).
fn vace_needed(state: &AppState, model: &ModelInfo, param: &'static str, what: &str) -> ApiError {
    let able: Vec<&str> = state
        .models
        .iter()
        .filter(|m| m.capabilities.vace)
        .map(|m| m.id.as_str())
        .collect();
    let known = kino_engine::registry::vace_model_names().join(", ");
    let hint = if able.is_empty() {
        format!("this server runs none; serve one with --model (VACE models: {known}, or a WanVACEPipeline folder)")
    } else {
        format!(
            "the served VACE models: {} (pass \"model\": \"{}\")",
            able.join(", "),
            able[0]
        )
    };
    ApiError::bad_request(
        Some(param),
        "unsupported_input",
        format!(
            "model `{}` takes no {what}: that needs a VACE model; {hint}",
            model.id
        ),
    )
}

/// A 400 when the request has field `name` (an upload or a non-empty value), which this
/// endpoint does not take; `why` says where it goes.
fn refuse_field(fields: &Fields, name: &'static str, why: &str) -> ApiResult<()> {
    let given = fields.files.contains_key(name)
        || match fields.map.get(name) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
    if given {
        return Err(ApiError::bad_request(
            Some(name),
            "unsupported_parameter",
            format!("this endpoint takes no `{name}`: {why}"),
        ));
    }
    Ok(())
}

/// A list-valued extension field (`characters`, `lora`): a JSON array, repeated multipart
/// `NAME[]` fields (gathered into an array), or one text field holding a JSON array or items
/// separated by commas. `Ok(None)` when absent; `Err(())` when it is none of these.
pub(crate) fn list_field(
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<Vec<Value>>, ()> {
    Ok(Some(match fields.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.starts_with('[') {
                serde_json::from_str::<Vec<Value>>(t).map_err(|_| ())?
            } else {
                t.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| Value::String(x.to_string()))
                    .collect()
            }
        }
        Some(_) => return Err(()),
    }))
}

/// The `characters` extension field: character ids in order, from a JSON array (of ids or
/// `{"id": …}`), repeated multipart `characters[]` fields, or one text field holding ids
/// separated by commas (or a JSON array).
fn character_ids(fields: &Map<String, Value>) -> ApiResult<Vec<String>> {
    let bad = || {
        ApiError::bad_request(
            Some("characters"),
            "invalid_type",
            "`characters` must be a list of character ids, e.g. {\"characters\": [\"char_0123…\"]} (multipart: characters[]=char_…; with the openai SDK: extra_body={\"characters\": [id]})",
        )
    };
    let Some(items) = list_field(fields, "characters").map_err(|()| bad())? else {
        return Ok(Vec::new());
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Value::Object(o) => match o.get("id") {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect()
}

/// The characters a request names, checked (a VACE model, known ids, at most
/// [`characters::MAX_CHARACTERS_PER_VIDEO`]); their images are added to `files`.
fn use_characters(
    state: &AppState,
    model: &ModelInfo,
    fields: &Fields,
    owner: &Option<String>,
    files: &mut PendingFiles,
) -> ApiResult<Vec<CharacterInput>> {
    let ids = character_ids(&fields.map)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if !model.capabilities.vace {
        return Err(vace_needed(
            state,
            model,
            "characters",
            "characters (reference images)",
        ));
    }
    let max = characters::MAX_CHARACTERS_PER_VIDEO;
    if ids.len() > max {
        return Err(ApiError::bad_request(
            Some("characters"),
            "too_many_characters",
            format!(
                "{} characters given; a video takes at most {max}",
                ids.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let c = characters::find_character(state, id, owner, "characters")?;
        let path = characters::image_path(&state.config.data_dir, &c);
        let bytes = std::fs::read(&path).map_err(|e| {
            ApiError::internal(format!(
                "cannot read character {id}'s image {}: {e}",
                path.display()
            ))
        })?;
        let file = format!("character_{i}.png");
        out.push(CharacterInput {
            id: c.id.clone(),
            image: StoredInput {
                name: c.name.clone(),
                sha256: inputs::sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                file: file.clone(),
                format: "png".into(),
                width: c.info.width,
                height: c.info.height,
                frames: None,
                fps: None,
            },
        });
        files.push((file, bytes));
    }
    Ok(out)
}

/// The `mask` of an edit (Kino extension): a multipart file, or a data URL (also as
/// `{"image_url": "data:…"}`), of a still or a video.
fn mask_input(state: &AppState, fields: &Fields) -> ApiResult<Option<RawInput>> {
    let limit = state.config.max_video_bytes;
    if let Some(u) = fields.files.get("mask") {
        if u.data.len() > limit {
            return Err(input_too_large("mask", limit, "video"));
        }
        return Ok(Some(RawInput {
            name: u
                .filename
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "mask".into()),
            bytes: u.data.clone(),
        }));
    }
    let usage = "upload the mask (a PNG, or a video with one mask per frame; white = regenerate) as the multipart file field `mask`, or pass {\"mask\": \"data:image/png;base64,…\"} (with the openai SDK: extra_body={\"mask\": …})";
    let url = match fields.map.get("mask") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => match o.get("image_url").or_else(|| o.get("video_url")) {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    Some("mask"),
                    "invalid_type",
                    format!("`mask` must be an image or a video; {usage}"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("mask"),
                "invalid_type",
                format!("`mask` must be an image or a video; {usage}"),
            ))
        }
    };
    if !url.trim_start().to_ascii_lowercase().starts_with("data:") {
        return Err(ApiError::bad_request(
            Some("mask"),
            "invalid_type",
            format!("`mask` is neither a file nor a data URL (Kino does not fetch URLs); {usage}"),
        ));
    }
    Ok(Some(RawInput {
        name: "data URL".into(),
        bytes: data_url("mask", &url, limit, "video")?,
    }))
}

/// Turns create fields into a job (and the input files to store with it).
fn build_job(
    state: &AppState,
    fields: &Fields,
    owner: Option<String>,
) -> ApiResult<(Job, PendingFiles)> {
    let s = read_settings(state, &fields.map, None)?;
    refuse_field(
        fields,
        "mask",
        "a mask edits an existing video: send it with the video to POST /v1/videos/edits",
    )?;
    let model = &state.models[s.model];
    let first = image_input(state, fields, "input_reference")?;
    let last = image_input(state, fields, "last_image")?;
    if last.is_some() && first.is_none() {
        return Err(ApiError::bad_request(
            Some("last_image"),
            "missing_required_parameter",
            "`last_image` needs a first image too: send `input_reference` as well",
        ));
    }
    if first.is_some() {
        require(state, model, Need::Image, "input_reference")?;
    } else {
        require(state, model, Need::Text, "input_reference")?;
    }
    if last.is_some() {
        require(state, model, Need::LastImage, "last_image")?;
    }
    let mut files = PendingFiles::new();
    let characters = use_characters(state, model, fields, &owner, &mut files)?;
    let mut job_inputs = JobInputs {
        vace: !characters.is_empty(),
        characters,
        ..Default::default()
    };
    let mut image_size = None;
    if let Some(raw) = first {
        let (stored, frame) = check_image("input_reference", "image", &raw)?;
        image_size = Some((frame.width(), frame.height()));
        files.push((stored.file.clone(), raw.bytes));
        job_inputs.image = Some(stored);
    }
    if let Some(raw) = last {
        let (stored, _) = check_image("last_image", "last_image", &raw)?;
        files.push((stored.file.clone(), raw.bytes));
        job_inputs.last_image = Some(stored);
    }
    // Without a size, an image keeps its own aspect ratio.
    let (width, height) = mapping::map_size(model, s.size.or(image_size));
    let (secs, seconds) = s.seconds.clone().unwrap_or_else(|| {
        let v = 4.0f64.min(state.config.max_seconds);
        (v, mapping::seconds_string(v))
    });
    let num_frames = mapping::frames_for(model, secs);
    let clip = clip_frames(model);
    if job_inputs.vace && num_frames > clip {
        return Err(ApiError::bad_request(
            Some("seconds"),
            "invalid_seconds",
            format!(
                "characters keep a subject within one clip: at most {clip} frames ({} s at {} fps), but {seconds} s make {num_frames}; ask for fewer seconds, or extend the video afterwards",
                mapping::seconds_string((clip - 1) as f64 / f64::from(model.defaults.fps)),
                model.defaults.fps
            ),
        ));
    }
    let inputs = (job_inputs != JobInputs::default()).then_some(job_inputs);
    let mut job = make_job(
        state,
        s,
        (width, height),
        num_frames,
        seconds,
        inputs,
        owner,
    );
    // Longer than one clip: a model that continues videos makes it in segments (a
    // diffusion-forcing model makes a long num_frames by itself; any other one clip as asked).
    let caps = model.capabilities;
    if num_frames > clip && caps.image && !caps.long_video {
        let mut long = LongJob::plan(model, num_frames, false, 0)
            .map_err(|m| ApiError::bad_request(Some("seconds"), "invalid_seconds", m))?;
        long.color_match = bool_field(&fields.map, "color_match")?.unwrap_or(false);
        job.params.long = Some(long);
    }
    Ok((job, files))
}

/// The source video of an edit or extension: an upload (multipart file `video`), or a completed
/// video of this server named by `{"video": {"id": …}}` (multipart `video[id]`) or `"video":
/// "video_…"`. `verb` says what is done to it ("edited", "extended").
pub(crate) fn source_video(
    state: &AppState,
    fields: &Fields,
    owner: &Option<String>,
    usage: &str,
    verb: &str,
) -> ApiResult<(RawInput, Option<Job>)> {
    let mut source_job = None;
    let raw = if let Some(u) = fields.files.get("video") {
        RawInput {
            name: u
                .filename
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "video".into()),
            bytes: u.data.clone(),
        }
    } else {
        let id = match fields.map.get("video") {
            Some(Value::Object(o)) => match o.get("id") {
                Some(Value::String(id)) => id.trim().to_string(),
                _ => {
                    return Err(ApiError::bad_request(
                        Some("video"),
                        "invalid_type",
                        format!("`video` must be a video; {usage}"),
                    ))
                }
            },
            Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_string(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                return Err(ApiError::bad_request(
                    Some("video"),
                    "missing_required_parameter",
                    format!("`video` is required; {usage}"),
                ))
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    Some("video"),
                    "invalid_type",
                    format!("`video` must be a video; {usage}"),
                ))
            }
        };
        if !valid_video_id(&id) {
            return Err(ApiError::bad_request(
                Some("video"),
                "invalid_video_id",
                format!("`{id}` is not a video id; ids look like video_0123abcd…; {usage}"),
            ));
        }
        let src = match find(state, &id, owner) {
            Ok(j) => j,
            Err(mut e) => {
                e.param = Some("video");
                return Err(e);
            }
        };
        if src.status != Status::Completed {
            return Err(ApiError::bad_request(
                Some("video"),
                "video_not_ready",
                format!(
                    "video {id} is {} ({}%); only a completed video can be {verb}",
                    src.status.as_str(),
                    src.progress
                ),
            ));
        }
        let key = state
            .outputs
            .key(&id, src.output_attempt, crate::worker::OUTPUT_FILES[0]);
        let bytes = crate::rt::block_on(state.outputs.read(&key))
            .map_err(ApiError::internal)?
            .to_vec();
        source_job = Some(src);
        RawInput { name: id, bytes }
    };
    if raw.bytes.len() > state.config.max_video_bytes {
        return Err(input_too_large(
            "video",
            state.config.max_video_bytes,
            "video",
        ));
    }
    Ok((raw, source_job))
}

/// The frames of one clip of `model` (segments are at most this long).
fn clip_frames(model: &ModelInfo) -> usize {
    model
        .defaults
        .base_num_frames
        .unwrap_or(model.defaults.num_frames)
        .max(model.frame_step.max(1) + 1)
}

/// Turns extension fields (prompt, seconds, a video upload or `{"id": "video_…"}`) into a job
/// that continues the video in segments; the result is the source followed by the new frames.
fn build_extension(
    state: &AppState,
    fields: &Fields,
    owner: Option<String>,
) -> ApiResult<(Job, PendingFiles)> {
    let usage = "send the video to extend as the multipart file field `video`, or name a completed video of this server with {\"video\": {\"id\": \"video_…\"}} (multipart: video[id]; with the openai SDK: extra_body={\"video\": {\"id\": …}})";
    refuse_field(
        fields,
        "mask",
        "a mask edits a video in place: send it to POST /v1/videos/edits",
    )?;
    refuse_field(
        fields,
        "characters",
        "characters are used on POST /v1/videos and POST /v1/videos/edits; an extension continues the video as it is",
    )?;
    let (raw, source_job) = source_video(state, fields, &owner, usage, "extended")?;
    // Without a model, an extension of one of our videos uses the model that made it (if it
    // still runs here and can continue a video).
    let default_model = source_job.as_ref().and_then(|j| {
        state
            .models
            .iter()
            .find(|m| {
                m.id == j.params.model_id && (m.capabilities.image || m.capabilities.long_video)
            })
            .map(|m| m.id.clone())
    });
    let mut s = read_settings(state, &fields.map, default_model.as_deref())?;
    // The video object names the model that makes it when the request named none.
    if s.model_name.is_none() {
        s.model_name = default_model;
    }
    let model = &state.models[s.model];
    require(state, model, Need::Continue, "model")?;
    if inputs::sniff_image(&raw.bytes).is_some() {
        return Err(ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!("`video` ({}) is an image; to start from an image, send it as input_reference to POST /v1/videos", raw.name),
        ));
    }
    let video = kino_media::decode_video(&raw.bytes).map_err(|e| {
        ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!("`video` ({}) is not a readable video: {e}", raw.name),
        )
    })?;
    let fps = model.defaults.fps;
    let source_frames = inputs::frames_available(&video, fps).max(1);
    // Without a size: an extension of our own video by the model that made it keeps its size;
    // otherwise the source's aspect ratio at the model's pixel budget.
    let same = source_job
        .as_ref()
        .filter(|j| j.params.model_id == model.id)
        .and_then(|j| Some((j.params.request.width?, j.params.request.height?)));
    let (width, height) = match (s.size, same) {
        (None, Some(wh)) => wh,
        (size, _) => mapping::map_size(model, size.or(Some((video.width(), video.height())))),
    };
    // `seconds` is the length of the new part (4 when not given); the video's `seconds` is the
    // whole stitched video's.
    let added = s
        .seconds
        .as_ref()
        .map_or(4.0f64.min(state.config.max_seconds), |v| v.0);
    let new_frames = ((added * f64::from(fps)).round() as usize).max(1);
    let source_secs = source_job
        .as_ref()
        .and_then(|j| j.seconds.parse::<f64>().ok())
        .filter(|_| source_job.as_ref().is_some_and(|j| j.params.fps == fps))
        .unwrap_or(video.len() as f64 / video.fps().as_f64());
    let seconds = mapping::seconds_string(source_secs + added);
    let format = inputs::sniff_video(&raw.bytes).unwrap_or("mp4");
    let stored = StoredInput {
        name: raw.name.clone(),
        sha256: inputs::sha256_hex(&raw.bytes),
        bytes: raw.bytes.len() as u64,
        file: format!("video.{format}"),
        format: format.to_string(),
        width: video.width(),
        height: video.height(),
        frames: Some(video.len() as u64),
        fps: Some(video.fps().as_f64()),
    };
    let files = vec![(stored.file.clone(), raw.bytes)];
    let inputs = JobInputs {
        video: Some(stored),
        source_video_id: source_job.map(|j| j.id),
        extends: true,
        ..Default::default()
    };
    let clip = clip_frames(model);
    let mut long = LongJob::plan(model, new_frames, true, source_frames)
        .map_err(|m| ApiError::bad_request(Some("seconds"), "invalid_seconds", m))?;
    long.color_match = bool_field(&fields.map, "color_match")?.unwrap_or(false);
    let first = long.segments.first().map_or(clip, |p| p.num_frames);
    let mut job = make_job(
        state,
        s,
        (width, height),
        first,
        seconds,
        Some(inputs),
        owner,
    );
    job.params.request.num_frames = Some(long.total_frames());
    job.params.long = Some(long);
    Ok((job, files))
}

/// Turns edit fields (prompt + a video upload or `{"id": "video_…"}`) into a video-to-video
/// job; on a VACE model a VACE edit (inside the optional `mask`, with optional `characters`).
fn build_edit(
    state: &AppState,
    fields: &Fields,
    owner: Option<String>,
) -> ApiResult<(Job, PendingFiles)> {
    let usage = "send the source video as the multipart file field `video`, or name a completed video of this server with {\"video\": {\"id\": \"video_…\"}} (multipart: video[id]; with the openai SDK: extra_body={\"video\": {\"id\": …}})";
    let (raw, source_job) = source_video(state, fields, &owner, usage, "edited")?;
    // Without a model, an edit of one of our videos uses the model that made it (if it still
    // runs here and takes a video).
    let default_model = source_job.as_ref().and_then(|j| {
        state
            .models
            .iter()
            .find(|m| m.id == j.params.model_id && (m.capabilities.video || m.capabilities.vace))
            .map(|m| m.id.clone())
    });
    let s = read_settings(state, &fields.map, default_model.as_deref())?;
    let model = &state.models[s.model];
    require(state, model, Need::Video, "model")?;
    let vace = model.capabilities.vace;
    let mask_raw = mask_input(state, fields)?;
    if mask_raw.is_some() && !vace {
        return Err(vace_needed(state, model, "mask", "mask"));
    }
    let mut files = PendingFiles::new();
    let characters = use_characters(state, model, fields, &owner, &mut files)?;
    let given_strength: Option<f64> = number_field(&fields.map, &["strength"], "a number")?;
    if vace && given_strength.is_some() {
        return Err(ApiError::bad_request(
            Some("strength"),
            "unsupported_parameter",
            format!("model `{}` is a VACE model: it regenerates the white part of `mask` (or, without a mask, the whole video guided by the source) and takes no `strength`; leave it out", model.id),
        ));
    }
    let strength = given_strength.unwrap_or(inputs::DEFAULT_STRENGTH);
    if vace {
        // No strength to check.
    } else if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(ApiError::bad_request(
            Some("strength"),
            "invalid_strength",
            format!("strength {strength} is out of range; use a number in (0, 1]: small values keep the source, 1 ignores it (default {})", inputs::DEFAULT_STRENGTH),
        ));
    }
    let steps = s.steps.unwrap_or(model.defaults.num_inference_steps);
    let (_, run) = kino_engine::schedulers::strength_start(steps, strength);
    if run == 0 && !vace {
        let min = 1.0 / steps as f64;
        return Err(ApiError::bad_request(
            Some("strength"),
            "invalid_strength",
            format!("strength {strength} with {steps} steps runs no denoising step (int(steps × strength) = 0); use a strength of at least {min:.3} or more steps"),
        ));
    }
    if inputs::sniff_image(&raw.bytes).is_some() {
        return Err(ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!("`video` ({}) is an image; to start from an image, send it as input_reference to POST /v1/videos", raw.name),
        ));
    }
    // Only the head that can be used is decoded (the longest video this server makes).
    let head = s.seconds.as_ref().map_or(state.config.max_seconds, |v| v.0) + 1.0;
    let video = inputs::decode_video(&raw.bytes, head).map_err(|e| {
        ApiError::bad_request(
            Some("video"),
            "invalid_video",
            format!("`video` ({}) is not a readable video: {e}", raw.name),
        )
    })?;
    // Without a size: an edit of our own video by the model that made it keeps its size;
    // otherwise the source's aspect ratio at the model's pixel budget.
    let same = source_job
        .as_ref()
        .filter(|j| j.params.model_id == model.id)
        .and_then(|j| Some((j.params.request.width?, j.params.request.height?)));
    let (width, height) = match (s.size, same) {
        (None, Some(wh)) => wh,
        (size, _) => mapping::map_size(model, size.or(Some((video.width(), video.height())))),
    };
    let fps = model.defaults.fps;
    let step = model.frame_step.max(1);
    let avail = inputs::frames_available(&video, fps);
    let (num_frames, seconds) = match &s.seconds {
        Some((v, text)) => {
            let n = mapping::frames_for(model, *v);
            if n > avail {
                return Err(ApiError::bad_request(
                    Some("video"),
                    "video_too_short",
                    inputs::too_short_message(&video, fps, n),
                ));
            }
            (n, text.clone())
        }
        None => {
            // As long as the source (or the source job's seconds), at most the server's limit.
            let dur = video.len() as f64 / video.fps().as_f64();
            let asked = source_job
                .as_ref()
                .and_then(|j| j.seconds.parse::<f64>().ok())
                .unwrap_or(dur)
                .min(state.config.max_seconds);
            let mut n = mapping::frames_for(model, asked);
            if n > avail {
                n = avail.saturating_sub(1) / step * step + 1;
            }
            if avail < step + 1 {
                return Err(ApiError::bad_request(
                    Some("video"),
                    "video_too_short",
                    inputs::too_short_message(&video, fps, step + 1),
                ));
            }
            // The source job's own seconds when they give these frames, else (frames − 1) / fps.
            let own = source_job.as_ref().filter(|j| {
                mapping::frames_for(model, asked) == n && j.seconds.parse::<f64>().is_ok()
            });
            let text = if let Some(j) = own {
                j.seconds.clone()
            } else {
                mapping::seconds_string((n - 1) as f64 / f64::from(fps))
            };
            (n, text)
        }
    };
    let format = inputs::sniff_video(&raw.bytes).unwrap_or("mp4");
    let stored = StoredInput {
        name: raw.name.clone(),
        sha256: inputs::sha256_hex(&raw.bytes),
        bytes: raw.bytes.len() as u64,
        file: format!("video.{format}"),
        format: format.to_string(),
        width: video.width(),
        height: video.height(),
        frames: Some(video.len() as u64),
        fps: Some(video.fps().as_f64()),
    };
    // The mask: decoded, checked against the source and the output, before anything is
    // stored.
    let mut mask = None;
    if let Some(m) = mask_raw {
        let src = crate::vace::decode_mask(&m.bytes, head).map_err(|e| {
            ApiError::bad_request(
                Some("mask"),
                "invalid_mask",
                format!("the mask ({}) is not a readable image or video: {e}; send a PNG (white = regenerate, black = keep) or a video with one mask per frame", m.name),
            )
        })?;
        let (_, report) = crate::vace::check_mask(
            &src,
            (video.width(), video.height()),
            (width as u32, height as u32),
            fps,
            num_frames,
        )
        .map_err(|(code, msg)| {
            ApiError::bad_request(Some("mask"), code, format!("`mask` ({}): {msg}", m.name))
        })?;
        if let Some(w) = report.warning() {
            tracing::warn!("mask {}: {w}", m.name);
        }
        let format = inputs::sniff_image(&m.bytes)
            .map(|f| if f == "jpeg" { "jpg" } else { f })
            .or_else(|| inputs::sniff_video(&m.bytes))
            .unwrap_or("mp4");
        let (frames, mfps) = match src.fps {
            None => (None, None),
            Some(r) => (Some(src.len() as u64), Some(r.as_f64())),
        };
        let stored = StoredInput {
            name: m.name.clone(),
            sha256: inputs::sha256_hex(&m.bytes),
            bytes: m.bytes.len() as u64,
            file: format!("mask.{format}"),
            format: format.to_string(),
            width: src.width,
            height: src.height,
            frames,
            fps: mfps,
        };
        files.push((stored.file.clone(), m.bytes));
        mask = Some(stored);
    }
    files.push((stored.file.clone(), raw.bytes));
    let inputs = JobInputs {
        video: Some(stored),
        strength: (!vace).then_some(strength),
        source_video_id: source_job.map(|j| j.id),
        vace,
        mask,
        characters,
        ..Default::default()
    };
    let job = make_job(
        state,
        s,
        (width, height),
        num_frames,
        seconds,
        Some(inputs),
        owner,
    );
    Ok((job, files))
}

/// Stores the job's input files, then the job; nothing is queued if either fails.
fn enqueue(state: &AppState, mut job: Job, files: PendingFiles) -> ApiResult<Response> {
    check_queue(state)?;
    let data_dir = &state.config.data_dir;
    for (name, bytes) in &files {
        if let Err(e) = inputs::write_input(data_dir, &job.id, name, bytes) {
            inputs::remove_inputs(data_dir, &job.id);
            return Err(ApiError::internal(format!(
                "cannot store the input {name}: {e}"
            )));
        }
    }
    // With a shared store, workers on other machines fetch the inputs from the bucket.
    if state.store.lease_duration().is_some() {
        for (name, bytes) in &files {
            let key = state.outputs.input_key(&job.id, name);
            if let Err(e) = crate::rt::block_on(state.outputs.put_bytes(&key, bytes.clone())) {
                inputs::remove_inputs(data_dir, &job.id);
                let _ = crate::rt::block_on(state.outputs.remove_inputs(&job.id));
                return Err(ApiError::internal(format!(
                    "cannot store the input {name}: {e}"
                )));
            }
        }
    }
    job.seq = match state.store.insert(&job) {
        Ok(seq) => seq,
        Err(e) => {
            inputs::remove_inputs(data_dir, &job.id);
            if state.store.lease_duration().is_some() {
                let _ = crate::rt::block_on(state.outputs.remove_inputs(&job.id));
            }
            return Err(e.into());
        }
    };
    state.shared.notify();
    tracing::info!(
        id = job.id,
        size = job.size,
        seconds = job.seconds,
        conditioning = job.params.inputs.as_ref().map_or("text", |i| i.kind()),
        "video queued"
    );
    Ok(Json(video_object(&job)).into_response())
}

/// Runs request work that decodes media or touches files off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))?
}

/// How a create-like endpoint turns the request's fields into a job and its input files.
type BuildJob = fn(&AppState, &Fields, Option<String>) -> ApiResult<(Job, PendingFiles)>;

/// Reads the fields, builds the job (every check before anything is stored) and queues it.
async fn submit(state: AppState, req: Request, build: BuildJob) -> ApiResult<Response> {
    let owner = crate::auth::owner_of(&req);
    let fields = read_fields(&state, req).await?;
    blocking(move || {
        let (job, files) = build(&state, &fields, owner)?;
        enqueue(&state, job, files)
    })
    .await
}

/// `POST /v1/videos` (with `input_reference` and Kino's `last_image`: image-to-video).
pub async fn create_video(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    submit(state, req, build_job).await
}

/// `POST /v1/videos/edits`: video-to-video from an uploaded video or a completed one.
pub async fn edit_video(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    submit(state, req, build_edit).await
}

/// `POST /v1/videos/extensions`: continues an uploaded video or a completed one; the result is
/// the source followed by the new segment(s), one MP4.
pub async fn extend_video(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    submit(state, req, build_extension).await
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
    // With Postgres, deleting the row also tells the node that runs it to stop.
    let deleted = state.store.delete(&id)?;
    if let Err(e) = state.outputs.remove_video(&id, None).await {
        tracing::warn!(id, "{e}");
    }
    inputs::remove_inputs(&state.config.data_dir, &id);
    if state.store.lease_duration().is_some() {
        if let Err(e) = state.outputs.remove_inputs(&id).await {
            tracing::warn!(id, "{e}");
        }
    }
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
            // The node that runs it may be another one.
            state.store.request_cancel(&id)?;
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
    let prompt = required_prompt(&state, &fields.map)?;
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
        output_attempt: None,
    };
    // A remix starts from what its source started from: copy the inputs.
    blocking(move || {
        let mut files = PendingFiles::new();
        if let Some(inputs) = &job.params.inputs {
            let dir = inputs::inputs_dir(&state.config.data_dir, &src.id);
            for stored in inputs.all_files() {
                let path = dir.join(&stored.file);
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    // Queued through another API node: the bucket has it.
                    Err(_) if state.store.lease_duration().is_some() => {
                        let key = state.outputs.input_key(&src.id, &stored.file);
                        crate::rt::block_on(state.outputs.read(&key))
                            .map_err(ApiError::internal)?
                            .to_vec()
                    }
                    Err(e) => {
                        return Err(ApiError::internal(format!(
                            "cannot read the input {}: {e}",
                            path.display()
                        )))
                    }
                };
                files.push((stored.file.clone(), bytes));
            }
        }
        enqueue(&state, job, files)
    })
    .await
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
    let key = state.outputs.key(&id, job.output_attempt, file);
    let name = if variant == "video" || variant.is_empty() {
        format!("{id}.{ext}")
    } else {
        format!("{id}-{variant}.{ext}")
    };
    if let Some(ttl) = state.config.presign {
        if let Some(url) = state.outputs.presign(&key, ttl).await {
            let url = url.map_err(ApiError::internal)?;
            return Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, url)
                .header(header::CACHE_CONTROL, "no-store")
                .body(axum::body::Body::empty())
                .map_err(|e| ApiError::internal(format!("response: {e}")));
        }
    }
    serve_object(&state.outputs, &key, ctype, &name, &headers).await
}

/// `GET /v1/models`
pub async fn list_models(State(state): State<AppState>) -> Response {
    let mut data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "kino", "capabilities": m.capabilities}))
        .collect();
    for alias in mapping::SORA_ALIASES {
        data.push(json!({"id": alias, "object": "model", "created": 0, "owned_by": "kino"}));
    }
    // Kino's extension: the LoRA adapters a request may name (`"lora": ["name"]`).
    let adapters = crate::adapters::listed(state.config.lora_dir.as_deref());
    Json(json!({"object": "list", "data": data, "adapters": adapters})).into_response()
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
    /// A metric family's `# HELP` and `# TYPE` lines.
    fn family(s: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} {kind}");
    }
    let counts = state.store.counts()?;
    let mut s = String::new();
    family(
        &mut s,
        "kino_videos",
        "gauge",
        "Videos in the store by status.",
    );
    for (st, n) in &counts {
        let _ = writeln!(s, "kino_videos{{status=\"{}\"}} {n}", st.as_str());
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == Status::Queued)
        .map_or(0, |c| c.1);
    family(
        &mut s,
        "kino_queue_depth",
        "gauge",
        "Videos waiting to run.",
    );
    let _ = writeln!(s, "kino_queue_depth {queued}");
    let sh = &state.shared;
    let counters: [(&str, &str, f64); 5] = [
        (
            "kino_jobs_run_total",
            "Jobs the workers finished (any outcome) since start.",
            sh.jobs_run.load(Ordering::Relaxed) as f64,
        ),
        (
            "kino_denoise_steps_total",
            "Denoising steps run since start.",
            sh.denoise_steps.load(Ordering::Relaxed) as f64,
        ),
        (
            "kino_denoise_seconds_total",
            "Time spent in denoising steps since start.",
            sh.denoise_micros.load(Ordering::Relaxed) as f64 / 1e6,
        ),
        (
            "kino_lease_expiries_total",
            "Jobs this node took over because their worker's lease ran out.",
            sh.lease_expiries.load(Ordering::Relaxed) as f64,
        ),
        (
            "kino_leases_lost_total",
            "Jobs this node stopped because its lease was taken over, cancelled or deleted.",
            sh.leases_lost.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, help, value) in counters {
        family(&mut s, name, "counter", help);
        let _ = writeln!(s, "{name} {value}");
    }
    if let Ok(h) = sh.durations.lock() {
        family(
            &mut s,
            "kino_job_duration_seconds",
            "histogram",
            "How long the jobs this node finished took.",
        );
        let mut cum = 0;
        for (b, n) in h.bounds.iter().zip(&h.counts) {
            cum += n;
            let _ = writeln!(s, "kino_job_duration_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += h.counts.last().copied().unwrap_or(0);
        let _ = writeln!(s, "kino_job_duration_seconds_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(s, "kino_job_duration_seconds_sum {}", h.sum);
        let _ = writeln!(s, "kino_job_duration_seconds_count {cum}");
    }
    if state.store.lease_duration().is_some() {
        family(
            &mut s,
            "kino_workers",
            "gauge",
            "Live workers (seen within two leases) per model they hold.",
        );
        for (m, n) in state.store.workers_per_model()? {
            let _ = writeln!(s, "kino_workers{{model=\"{m}\"}} {n}");
        }
    }
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
