//! LoRA adapters and step caches as request extensions.
//!
//! - **Adapters.** The operator names a directory (`kino serve --lora-dir DIR`); a request may
//!   name the `*.safetensors` files in it, by file name with or without the extension, each
//!   with an optional scale: `"lora": ["anime", "clay.safetensors:0.8"]` (multipart: repeated
//!   `lora[]` fields, or one field with names separated by commas). A name is never a path: a
//!   path separator, `..`, or a name not in the directory is refused, naming what is there.
//!   `GET /v1/models` lists them (`"adapters"`).
//! - **Step caches.** `"cache": "first-block:0.05"` (or `mag:…`, `taylorseer:…`), parsed as
//!   `kino generate --cache` parses it; MagCache takes its calibration from `"mag_ratios":
//!   [floats]` or the server's `--mag-ratios FILE`.
//! - **Presets.** `"preset": "fast"` applies a named preset as `kino generate --preset` does:
//!   from the request's adapters' metadata (a few-step adapter names the steps and guidance it
//!   was distilled for) or the model folder's `kino.json`; steps and guidance given explicitly
//!   win.
//!
//! Both are checked before anything is queued, kept with the job (a remix keeps them) and
//! recorded in the MP4's metadata and the video object.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::SystemTime;

use kino_engine::hooks::CacheConfig;
use kino_engine::lora::{LoraSet, LoraSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::mapping::ModelInfo;

/// One adapter of a job: its file in the operator's directory and its scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobLora {
    /// The file name (`anime.safetensors`).
    pub name: String,
    pub path: PathBuf,
    pub scale: f64,
}

/// The step cache of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCache {
    /// As the client wrote it (`first-block:0.05`).
    pub spec: String,
    /// MagCache: the calibration ratios (the request's, or the server's `--mag-ratios`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mag_ratios: Option<Vec<f32>>,
    /// After the run: transformer forwards run and skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwards: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<usize>,
}

impl JobCache {
    /// The engine's configuration (ratios applied).
    pub fn config(&self) -> Result<CacheConfig, kino_engine::Error> {
        let mut c = CacheConfig::from_str(&self.spec)?;
        if let Some(r) = &self.mag_ratios {
            c = c.with_mag_ratios(r.clone())?;
        }
        c.validate()?;
        Ok(c)
    }
}

/// The adapters in `dir`: file names of its `*.safetensors` files, sorted.
pub fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The names `GET /v1/models` lists (without the extension).
pub fn listed(dir: Option<&Path>) -> Vec<Value> {
    dir.map(available)
        .unwrap_or_default()
        .into_iter()
        .map(|n| {
            let id = n.trim_end_matches(".safetensors").to_string();
            json!({"id": id, "file": n})
        })
        .collect()
}

fn bad(param: &'static str, code: &'static str, msg: String) -> ApiError {
    ApiError::bad_request(Some(param), code, msg)
}

/// The `lora` field's items: a JSON array of strings, repeated `lora[]` fields, or one text
/// field with names separated by commas (or holding a JSON array).
fn lora_items(fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let usage = || {
        bad(
            "lora",
            "invalid_type",
            "`lora` must be a list of adapter names, each NAME or NAME:SCALE, e.g. {\"lora\": [\"anime\", \"clay:0.8\"]} (multipart: lora[]=anime; with the openai SDK: extra_body={\"lora\": [\"anime\"]}); GET /v1/models lists the adapters".into(),
        )
    };
    let Some(items) = crate::api::list_field(fields, "lora").map_err(|()| usage())? else {
        return Ok(Vec::new());
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => Err(usage()),
        })
        .collect()
}

/// Results of loading adapter files, by (path, length, modified time) and model.
type Checked = HashMap<(PathBuf, u64, Option<SystemTime>, usize), Result<(), String>>;

static CHECKED: Mutex<Option<Checked>> = Mutex::new(None);

/// Loads `path` as a LoRA and checks its blocks fit a transformer of `num_layers` blocks
/// (remembered per file version, so a file is read once).
fn check_file(path: &Path, num_layers: usize) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    let key = (
        path.to_path_buf(),
        meta.len(),
        meta.modified().ok(),
        num_layers,
    );
    if let Some(r) = CHECKED
        .lock()
        .ok()
        .and_then(|g| g.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return r;
    }
    let spec = LoraSpec {
        path: path.to_path_buf(),
        scale: 1.0,
    };
    let r = LoraSet::load(&[spec], false)
        .and_then(|s| {
            if num_layers > 0 {
                s.check_blocks(num_layers, "this model's transformer")
            } else {
                Ok(())
            }
        })
        .map_err(|e| e.to_string());
    if let Ok(mut g) = CHECKED.lock() {
        g.get_or_insert_with(HashMap::new).insert(key, r.clone());
    }
    r
}

/// The request's `lora` field, checked against the operator's directory and the model.
pub fn read_lora(
    fields: &Map<String, Value>,
    dir: Option<&Path>,
    model: &ModelInfo,
) -> Result<Vec<JobLora>, ApiError> {
    let items = lora_items(fields)?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let Some(dir) = dir else {
        return Err(bad(
            "lora",
            "adapters_disabled",
            "this server takes no LoRA adapters: start it with `kino serve --lora-dir DIR` (DIR holding the *.safetensors adapters clients may name)".into(),
        ));
    };
    let names = available(dir);
    let listing = if names.is_empty() {
        "none (the adapter directory has no *.safetensors files)".to_string()
    } else {
        names
            .iter()
            .map(|n| n.trim_end_matches(".safetensors"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    for item in items {
        let (name, scale) = match item.rsplit_once(':') {
            Some((n, s)) if !n.is_empty() => match s.trim().parse::<f64>() {
                Ok(v) => (n.trim().to_string(), v),
                Err(_) => (item.clone(), 1.0),
            },
            _ => (item.clone(), 1.0),
        };
        if !scale.is_finite() {
            return Err(bad(
                "lora",
                "invalid_lora",
                format!("the scale in `{item}` is not a finite number; write NAME or NAME:SCALE (e.g. anime:0.8)"),
            ));
        }
        if name.contains('/')
            || name.contains('\\')
            || name.contains("..")
            || name.contains('\0')
            || name.starts_with('.')
            || Path::new(&name).is_absolute()
        {
            return Err(bad(
                "lora",
                "invalid_lora",
                format!("`{name}` is not an adapter name: adapters are named by file name only (no paths); available: {listing}"),
            ));
        }
        let file = if name.ends_with(".safetensors") {
            name.clone()
        } else {
            format!("{name}.safetensors")
        };
        if !names.contains(&file) {
            return Err(bad(
                "lora",
                "unknown_lora",
                format!("there is no adapter `{name}` on this server; available: {listing}"),
            ));
        }
        let path = dir.join(&file);
        check_file(&path, model.num_layers).map_err(|why| {
            bad(
                "lora",
                "invalid_lora",
                format!(
                    "adapter `{name}` cannot be used with model `{}`: {why}",
                    model.id
                ),
            )
        })?;
        out.push(JobLora {
            name: file,
            path,
            scale,
        });
    }
    Ok(out)
}

/// The request's `preset`: found among its adapters' presets (a few-step adapter names the
/// settings it was distilled for) and the model folder's `kino.json` ones, as `kino generate
/// --preset` finds it; not found, the message lists what there is (without server paths).
pub fn read_preset(
    name: &str,
    lora: &[JobLora],
    model: &ModelInfo,
) -> Result<kino_engine::preset::Preset, ApiError> {
    let specs: Vec<LoraSpec> = lora
        .iter()
        .map(|l| LoraSpec {
            path: l.path.clone(),
            scale: l.scale,
        })
        .collect();
    let presets = kino_engine::preset::all(&model.path, &specs).map_err(|e| {
        tracing::warn!(error = %e, model = %model.id, "reading presets");
        bad(
            "preset",
            "invalid_preset",
            format!("the presets of model `{}` or its adapters cannot be read; the operator's log says why", model.id),
        )
    })?;
    match presets.iter().find(|p| p.name == name) {
        Some(p) => Ok(p.clone()),
        None => Err(bad(
            "preset",
            "unknown_preset",
            format!(
                "there is no preset `{name}` for model `{}` with the adapters given: {}. A few-step adapter that names one is sent with it, e.g. {{\"lora\": [\"fast\"], \"preset\": \"fast\"}}",
                model.id,
                kino_engine::preset::listing(&presets)
            ),
        )),
    }
}

/// The adapters a model folder's preset adds (files in the model folder, which the operator
/// controls), checked against the model as a request's are.
pub fn preset_lora(
    p: &kino_engine::preset::Preset,
    model: &ModelInfo,
) -> Result<Vec<JobLora>, ApiError> {
    p.lora
        .iter()
        .map(|l| {
            let name = l
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            check_file(&l.path, model.num_layers).map_err(|why| {
                bad(
                    "preset",
                    "invalid_preset",
                    format!("preset `{}` names the adapter `{name}`, which cannot be used with model `{}`: {why}", p.name, model.id),
                )
            })?;
            Ok(JobLora {
                name,
                path: l.path.clone(),
                scale: l.scale,
            })
        })
        .collect()
}

/// The request's `cache` (and `mag_ratios`) fields, checked.
pub fn read_cache(
    fields: &Map<String, Value>,
    default_ratios: Option<&[f32]>,
    model: &ModelInfo,
) -> Result<Option<JobCache>, ApiError> {
    let spec = match fields.get("cache") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Some(other) => {
            return Err(bad(
                "cache",
                "invalid_type",
                format!("`cache` must be a string such as \"first-block:0.05\", not {other}"),
            ))
        }
    };
    let ratios: Option<Vec<f32>> = match fields.get("mag_ratios") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let v = match v {
                Value::String(s) => serde_json::from_str::<Value>(s.trim()).unwrap_or(Value::Null),
                Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                    serde_json::from_str::<Value>(a[0].as_str().unwrap_or("").trim())
                        .unwrap_or(Value::Null)
                }
                v => v.clone(),
            };
            let list = v.as_array().and_then(|a| {
                a.iter()
                    .map(|x| {
                        x.as_f64()
                            .or_else(|| x.as_str().and_then(|s| s.trim().parse().ok()))
                            .filter(|f| f.is_finite())
                            .map(|f| f as f32)
                    })
                    .collect::<Option<Vec<f32>>>()
            });
            match list {
                Some(l) if !l.is_empty() => Some(l),
                _ => {
                    return Err(bad(
                        "mag_ratios",
                        "invalid_type",
                        "`mag_ratios` must be a non-empty list of numbers, e.g. [1.0, 1.02, 0.99] (one per step, from a calibration run)".into(),
                    ))
                }
            }
        }
    };
    let Some(spec) = spec else {
        if ratios.is_some() {
            return Err(bad(
                "mag_ratios",
                "unsupported_parameter",
                "`mag_ratios` calibrates the MagCache: send it with \"cache\": \"mag:THRESHOLD\""
                    .into(),
            ));
        }
        return Ok(None);
    };
    let parsed =
        CacheConfig::from_str(&spec).map_err(|e| bad("cache", "invalid_cache", e.to_string()))?;
    let is_calibrate = matches!(&parsed, CacheConfig::Mag(m) if m.calibrate);
    let mag_ratios = match (&parsed, ratios) {
        (CacheConfig::Mag(_), Some(r)) => Some(r),
        (CacheConfig::Mag(_), None) if !is_calibrate => default_ratios.map(<[f32]>::to_vec),
        (_, Some(_)) => {
            return Err(bad(
                "mag_ratios",
                "unsupported_parameter",
                format!(
                    "`mag_ratios` applies to the mag cache, not `{}`",
                    parsed.name()
                ),
            ))
        }
        _ => None,
    };
    let cache = JobCache {
        spec,
        mag_ratios,
        forwards: None,
        skipped: None,
    };
    cache.config().map_err(|e| {
        let mut msg = e.to_string();
        if matches!(parsed, CacheConfig::Mag(_)) && cache.mag_ratios.is_none() {
            msg.push_str("; send \"mag_ratios\": [ … ] with the request, or start the server with --mag-ratios FILE");
        }
        bad("cache", "invalid_cache", msg)
    })?;
    let caps = model.capabilities;
    if caps.vace || caps.long_video || model.two_experts {
        return Err(bad(
            "cache",
            "unsupported_parameter",
            format!("model `{}` runs without step caches (they apply to one-transformer Wan models, not VACE, diffusion-forcing or two-expert ones); leave `cache` out", model.id),
        ));
    }
    Ok(Some(cache))
}

/// SHA-256 of a file, hex.
fn sha256_file(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("cannot read the adapter {}: {e}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)
        .map_err(|e| format!("cannot read the adapter {}: {e}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}

/// What the MP4's metadata records about the adapters, as `kino generate` records it:
/// `{"adapters": [{file, sha256, scale, expert}], "fused": false}`.
pub fn lora_metadata(lora: &[JobLora]) -> Result<Option<Value>, String> {
    if lora.is_empty() {
        return Ok(None);
    }
    let list = lora
        .iter()
        .map(|l| {
            Ok(json!({
                "file": l.name,
                "sha256": sha256_file(&l.path)?,
                "scale": l.scale,
                "expert": "transformer",
            }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Some(json!({"adapters": list, "fused": false})))
}

/// What the MP4's metadata (`with_ratios`) and the video object record about the cache.
pub fn cache_value(c: &JobCache, with_ratios: bool) -> Value {
    let mut v = json!({"spec": c.spec});
    if let Ok(cfg) = c.config() {
        v["name"] = json!(cfg.name());
    }
    if with_ratios && c.mag_ratios.is_some() {
        v["mag_ratios"] = json!(c.mag_ratios);
    }
    if let (Some(f), Some(s)) = (c.forwards, c.skipped) {
        v["forwards"] = json!(f);
        v["skipped"] = json!(s);
    }
    v
}

/// The video object's extension fields for a job's adapters.
pub fn lora_value(lora: &[JobLora]) -> Value {
    Value::Array(
        lora.iter()
            .map(|l| json!({"name": l.name.trim_end_matches(".safetensors"), "file": l.name, "scale": l.scale}))
            .collect(),
    )
}
