//! How an OpenAI request (`model`, `size`, `seconds`) maps onto a local model.
//!
//! - **Model.** A configured model is named by the alias or folder name it was given with
//!   (`--model wan2.1-t2v-1.3b` → `wan2.1-t2v-1.3b`, `--model /m/tiny` → `tiny`). OpenAI's names
//!   are aliases: `sora-2` and its dated variants (`sora-2-2025-10-06`, …) → the first configured
//!   model; `sora-2-pro` and its dated variants → the second configured model if there is one,
//!   otherwise the first. No `model` means `sora-2`.
//! - **Size.** `WxH` (any positive numbers) gives only the aspect ratio `W/H`. The output keeps
//!   that aspect ratio and the model's pixel budget (its default width × height), each side
//!   rounded to the nearest multiple of the model's size multiple (16 for Wan2.1, 32 for Wan2.2),
//!   at least one multiple. A size equal to the model's default maps to itself. Aspect ratios
//!   beyond 4:1 are refused. No `size` means the model's default size.
//! - **Seconds.** A positive number (`"4"` or `4`), at most the server's limit. The frame count
//!   is the valid one (`step·k + 1`, step 4 for Wan) nearest to `seconds × fps`, at least `step +
//!   1`. No `seconds` means 4 (OpenAI's default). The video object reports the seconds asked for;
//!   the MP4's metadata has the exact frame count and fps.

use kino_engine::wan::pipeline::{Capabilities, ModelDefaults};
use serde::Serialize;

use crate::error::ApiError;

/// What the server knows about a configured model (read when it opened the model).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name clients use (`wan2.1-t2v-1.3b`, or the folder name).
    pub id: String,
    /// Where the model folder is.
    pub path: std::path::PathBuf,
    pub defaults: ModelDefaults,
    /// Width and height multiples.
    pub size_multiple: (usize, usize),
    /// Frame counts are `frame_step·k + 1`.
    pub frame_step: usize,
    /// What it can start from besides text (an image, a last image, a video).
    pub capabilities: Capabilities,
    /// The transformer's block count (to check a LoRA adapter's blocks before queueing).
    #[serde(skip)]
    pub num_layers: usize,
    /// A two-expert folder (Wan2.2 A14B: `transformer_2`).
    #[serde(skip)]
    pub two_experts: bool,
}

/// OpenAI's model names that are served as aliases.
pub const SORA_ALIASES: [&str; 2] = ["sora-2", "sora-2-pro"];

/// The index of the configured model that `name` means, or a 400 naming what is served.
pub fn resolve_model(models: &[ModelInfo], name: Option<&str>) -> Result<usize, ApiError> {
    let name = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("sora-2");
    if let Some(i) = models.iter().position(|m| m.id == name) {
        return Ok(i);
    }
    if is_dated(name, "sora-2-pro") {
        return Ok(if models.len() > 1 { 1 } else { 0 });
    }
    if is_dated(name, "sora-2") {
        return Ok(0);
    }
    let served: Vec<&str> = models
        .iter()
        .map(|m| m.id.as_str())
        .chain(SORA_ALIASES)
        .collect();
    Err(ApiError::bad_request(
        Some("model"),
        "model_not_found",
        format!(
            "unknown model `{name}`; this server serves: {} (see GET /v1/models)",
            served.join(", ")
        ),
    ))
}

/// `name` is `base` or `base-YYYY-MM-DD`.
fn is_dated(name: &str, base: &str) -> bool {
    match name.strip_prefix(base) {
        Some("") => true,
        Some(rest) => {
            let Some(date) = rest.strip_prefix('-') else {
                return false;
            };
            let parts: Vec<&str> = date.split('-').collect();
            parts.len() == 3
                && [4, 2, 2]
                    .iter()
                    .zip(&parts)
                    .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_digit()))
        }
        None => false,
    }
}

/// Parses `"WxH"` (also `W*H`, `W×H`).
pub fn parse_size(s: &str) -> Result<(u32, u32), ApiError> {
    let bad = |why: String| ApiError::bad_request(Some("size"), "invalid_size", why);
    let parts: Vec<&str> = s.trim().split(['x', 'X', '*', '×']).collect();
    let [w, h] = parts.as_slice() else {
        return Err(bad(format!(
            "size `{s}` is not WIDTHxHEIGHT; use e.g. 1280x720 or 720x1280"
        )));
    };
    let parse = |v: &str, what: &str| -> Result<u32, ApiError> {
        v.trim().parse::<u32>().map_err(|_| {
            bad(format!(
                "{what} `{v}` in size `{s}` is not a whole number; use e.g. 1280x720"
            ))
        })
    };
    let (w, h) = (parse(w, "width")?, parse(h, "height")?);
    if w == 0 || h == 0 {
        return Err(bad(format!(
            "size `{s}` has a zero side; use e.g. 1280x720"
        )));
    }
    if w > 16384 || h > 16384 {
        return Err(bad(format!(
            "size `{s}` is too large; sides are at most 16384"
        )));
    }
    let ratio = w as f64 / h as f64;
    if !(0.25..=4.0).contains(&ratio) {
        return Err(bad(format!(
            "size `{s}` has aspect ratio {ratio:.2}; use a ratio between 1:4 and 4:1, e.g. 1280x720"
        )));
    }
    Ok((w, h))
}

/// The size the model makes for a requested size (see the module doc).
pub fn map_size(model: &ModelInfo, requested: Option<(u32, u32)>) -> (usize, usize) {
    let d = &model.defaults;
    let Some((w, h)) = requested else {
        return (d.width, d.height);
    };
    let budget = (d.width * d.height) as f64;
    let ratio = w as f64 / h as f64;
    let (mw, mh) = model.size_multiple;
    let round = |v: f64, m: usize| -> usize { (((v / m as f64).round() as usize).max(1)) * m };
    (
        round((budget * ratio).sqrt(), mw),
        round((budget / ratio).sqrt(), mh),
    )
}

/// Parses `seconds` (already a string) as a positive number at most `max`.
pub fn parse_seconds(s: &str, max: f64) -> Result<f64, ApiError> {
    let v: f64 = s.trim().parse().map_err(|_| {
        ApiError::bad_request(
            Some("seconds"),
            "invalid_seconds",
            format!("seconds `{s}` is not a number; use e.g. \"4\", \"8\" or \"12\""),
        )
    })?;
    if !(v.is_finite() && v > 0.0) {
        return Err(ApiError::bad_request(
            Some("seconds"),
            "invalid_seconds",
            format!("seconds {s} must be a positive number, e.g. \"4\""),
        ));
    }
    if v > max {
        return Err(ApiError::bad_request(
            Some("seconds"),
            "invalid_seconds",
            format!("seconds {s} is over this server's limit of {max}; ask for {max} or less"),
        ));
    }
    Ok(v)
}

/// The valid frame count nearest `seconds × fps`.
pub fn frames_for(model: &ModelInfo, seconds: f64) -> usize {
    let step = model.frame_step.max(1);
    let fps = model.defaults.fps as f64;
    let k = ((seconds * fps - 1.0) / step as f64).round().max(1.0) as usize;
    k * step + 1
}

/// `4.0` → `"4"`, `2.5` → `"2.5"`.
pub fn seconds_string(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wan(id: &str) -> ModelInfo {
        ModelInfo {
            id: id.into(),
            path: "/m".into(),
            defaults: ModelDefaults::default(),
            size_multiple: (16, 16),
            frame_step: 4,
            capabilities: Capabilities {
                text: true,
                image: false,
                last_image: false,
                video: true,
                long_video: false,
                vace: false,
            },
            num_layers: 1,
            two_experts: false,
        }
    }

    #[test]
    fn sora_names_are_aliases() {
        let ms = [wan("a"), wan("b")];
        assert_eq!(resolve_model(&ms, None).unwrap(), 0);
        assert_eq!(resolve_model(&ms, Some("sora-2")).unwrap(), 0);
        assert_eq!(resolve_model(&ms, Some("sora-2-2025-10-06")).unwrap(), 0);
        assert_eq!(resolve_model(&ms, Some("sora-2-pro")).unwrap(), 1);
        assert_eq!(
            resolve_model(&ms, Some("sora-2-pro-2025-10-06")).unwrap(),
            1
        );
        assert_eq!(resolve_model(&ms[..1], Some("sora-2-pro")).unwrap(), 0);
        assert_eq!(resolve_model(&ms, Some("b")).unwrap(), 1);
        let e = resolve_model(&ms, Some("sora-3")).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(
            e.message.contains("a, b, sora-2, sora-2-pro"),
            "{}",
            e.message
        );
        assert!(resolve_model(&ms, Some("sora-2-foo")).is_err());
    }

    #[test]
    fn sizes_keep_aspect_and_budget() {
        let m = wan("a"); // 832x480
        assert_eq!(map_size(&m, None), (832, 480));
        assert_eq!(map_size(&m, Some((832, 480))), (832, 480));
        let (w, h) = map_size(&m, Some((1280, 720)));
        assert_eq!((w % 16, h % 16), (0, 0));
        assert_eq!((w, h), (848, 480));
        let (w, h) = map_size(&m, Some((720, 1280)));
        assert_eq!((w, h), (480, 848));
        assert!(parse_size("1280").is_err());
        assert!(parse_size("0x720").is_err());
        assert!(parse_size("axb").is_err());
        assert!(parse_size("5000x100").is_err());
        assert_eq!(parse_size("1792x1024").unwrap(), (1792, 1024));
    }

    #[test]
    fn seconds_round_to_valid_frames() {
        let m = wan("a"); // 16 fps, step 4
        assert_eq!(frames_for(&m, 4.0), 65);
        assert_eq!(frames_for(&m, 5.0), 81);
        assert_eq!(frames_for(&m, 0.01), 5);
        assert!(parse_seconds("x", 20.0).is_err());
        assert!(parse_seconds("-1", 20.0).is_err());
        assert!(parse_seconds("21", 20.0).is_err());
        assert_eq!(parse_seconds("8", 20.0).unwrap(), 8.0);
        assert_eq!(seconds_string(4.0), "4");
        assert_eq!(seconds_string(2.5), "2.5");
    }
}
