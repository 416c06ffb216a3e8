//! Named sampling presets (`--preset fast`): the steps, guidance and shift that go with a model
//! or an adapter, and the adapters a model's preset brings.
//!
//! Distilled few-step adapters only work with the settings they were distilled for (the
//! published Wan ones document e.g. 4 steps with guidance off); a preset carries those settings
//! so that a user names one word instead of three numbers. Presets come from two places:
//!
//! - a LoRA file's safetensors metadata, key `kino` (JSON), entry `presets`:
//!   `{"presets": {"fast": {"num_inference_steps": 4, "guidance_scale": 1.0}}}` — what Kino's own
//!   adapters carry (`training/train_lora.py` writes it); the adapter is already loaded;
//! - a model folder's `kino.json`, entry `presets`, which may also name adapters (paths relative
//!   to the folder, `FILE[:SCALE]`):
//!   `{"presets": {"fast": {"lora": ["lora/fast.safetensors"], "num_inference_steps": 4,
//!   "guidance_scale": 1.0}}}`.
//!
//! A loaded adapter's preset wins over the model's of the same name. Settings given explicitly
//! (`--steps`, `--guidance`, `--shift`) win over the preset's.

use std::path::{Path, PathBuf};

use crate::lora::{read_metadata_json, LoraSpec};
use crate::{Error, Result};

/// What a preset sets (fields left `None` keep the model's defaults).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Preset {
    pub name: String,
    /// Where it was found: the model's `kino.json` or the adapter file.
    pub source: PathBuf,
    pub num_inference_steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub shift: Option<f64>,
    /// Adapters the preset adds (a model folder's preset only), resolved against the folder.
    pub lora: Vec<LoraSpec>,
}

impl Preset {
    /// "4 steps, guidance 1, adapter fast.safetensors" for messages and metadata.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.num_inference_steps {
            parts.push(format!("{n} steps"));
        }
        if let Some(g) = self.guidance_scale {
            parts.push(if g <= 1.0 {
                "guidance off".to_string()
            } else {
                format!("guidance {g}")
            });
        }
        if let Some(s) = self.shift {
            parts.push(format!("shift {s}"));
        }
        for l in &self.lora {
            let name = l.path.file_name().unwrap_or_default().to_string_lossy();
            parts.push(format!("adapter {name}:{}", l.scale));
        }
        if parts.is_empty() {
            "the model's defaults".into()
        } else {
            parts.join(", ")
        }
    }
}

fn bad(path: &Path, message: String) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message,
    }
}

/// One `presets` entry (`{"num_inference_steps": …, "guidance_scale": …, "shift": …,
/// "lora": [...]}`); adapters only where `base` (a model folder) is given.
fn parse_one(
    name: &str,
    v: &serde_json::Value,
    source: &Path,
    base: Option<&Path>,
) -> Result<Preset> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad(source, format!("preset `{name}` is not a JSON object")))?;
    let mut p = Preset {
        name: name.to_string(),
        source: source.to_path_buf(),
        ..Default::default()
    };
    for (k, val) in obj {
        match k.as_str() {
            "num_inference_steps" => {
                let n = val
                    .as_u64()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        bad(
                            source,
                            format!("preset `{name}`: num_inference_steps must be 1 to 1000"),
                        )
                    })?;
                p.num_inference_steps = Some(n as usize);
            }
            "guidance_scale" => {
                let g = val
                    .as_f64()
                    .filter(|g| g.is_finite() && *g >= 0.0)
                    .ok_or_else(|| {
                        bad(
                            source,
                            format!("preset `{name}`: guidance_scale must be a number ≥ 0"),
                        )
                    })?;
                p.guidance_scale = Some(g);
            }
            "shift" => {
                let s = val
                    .as_f64()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        bad(
                            source,
                            format!("preset `{name}`: shift must be a number > 0"),
                        )
                    })?;
                p.shift = Some(s);
            }
            "lora" => {
                let Some(base) = base else {
                    return Err(bad(
                        source,
                        format!(
                            "preset `{name}`: an adapter's preset cannot name further adapters"
                        ),
                    ));
                };
                let list = val.as_array().ok_or_else(|| {
                    bad(
                        source,
                        format!("preset `{name}`: lora must be a list of \"FILE[:SCALE]\""),
                    )
                })?;
                for item in list {
                    let s = item.as_str().ok_or_else(|| {
                        bad(
                            source,
                            format!("preset `{name}`: lora entries are \"FILE[:SCALE]\" strings"),
                        )
                    })?;
                    let mut spec: LoraSpec = s.parse()?;
                    if spec.path.is_relative() {
                        spec.path = base.join(&spec.path);
                    }
                    if !spec.path.is_file() {
                        return Err(bad(
                            source,
                            format!(
                                "preset `{name}` names the adapter {}, which is not there",
                                spec.path.display()
                            ),
                        ));
                    }
                    p.lora.push(spec);
                }
            }
            // Free-text fields for people reading the file.
            "description" | "note" => {}
            other => {
                return Err(bad(
                    source,
                    format!(
                        "preset `{name}` has the unknown setting `{other}` (known: \
                         num_inference_steps, guidance_scale, shift, lora, description)"
                    ),
                ))
            }
        }
    }
    Ok(p)
}

fn parse_map(
    map: Option<&serde_json::Value>,
    source: &Path,
    base: Option<&Path>,
) -> Result<Vec<Preset>> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    let obj = map
        .as_object()
        .ok_or_else(|| bad(source, "`presets` is not a JSON object".into()))?;
    obj.iter()
        .map(|(name, v)| parse_one(name, v, source, base))
        .collect()
}

/// The presets of a model folder's `kino.json` (none without the file or the entry).
pub fn model_presets(model_dir: &Path) -> Result<Vec<Preset>> {
    let path = model_dir.join("kino.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("not JSON: {e}")))?;
    parse_map(v.get("presets"), &path, Some(model_dir))
}

/// The presets a LoRA file's `kino` metadata names (none for other files).
pub fn lora_presets(path: &Path) -> Result<Vec<Preset>> {
    let meta = read_metadata_json(path, "kino")?;
    parse_map(meta.as_ref().and_then(|m| m.get("presets")), path, None)
}

/// Every preset there is for `model_dir` with `loras` loaded: the adapters' first (in order),
/// then the model folder's.
pub fn all(model_dir: &Path, loras: &[LoraSpec]) -> Result<Vec<Preset>> {
    let mut out = Vec::new();
    for l in loras {
        out.extend(lora_presets(&l.path)?);
    }
    out.extend(model_presets(model_dir)?);
    Ok(out)
}

/// "fast (from fast.safetensors), slow (from the model's kino.json)", or a sentence saying
/// there are none; for messages.
pub fn listing(presets: &[Preset]) -> String {
    if presets.is_empty() {
        return "neither the model nor the adapters given name any preset".to_string();
    }
    let names: Vec<String> = presets
        .iter()
        .map(|p| {
            let from = p.source.file_name().unwrap_or_default().to_string_lossy();
            if from == "kino.json" {
                format!("{} (from the model's kino.json)", p.name)
            } else {
                format!("{} (from {from})", p.name)
            }
        })
        .collect();
    format!("the presets there are: {}", names.join(", "))
}

/// Finds preset `name` among the loaded adapters' (first) and the model folder's. Not found:
/// an error that lists the presets there are and says where presets come from.
pub fn find(model_dir: &Path, loras: &[LoraSpec], name: &str) -> Result<Preset> {
    let presets = all(model_dir, loras)?;
    if let Some(p) = presets.iter().find(|p| p.name == name) {
        return Ok(p.clone());
    }
    Err(Error::InvalidRequest(format!(
        "no preset `{name}` for {}: {}. Presets come from a model folder's kino.json \
         (\"presets\") or a LoRA's metadata; a few-step adapter that names one is loaded with \
         --lora FILE --preset NAME",
        model_dir.display(),
        listing(&presets)
    )))
}

/// For adapters loaded without `--preset` that name presets: one line each, e.g.
/// "fast.safetensors names the preset `fast` (4 steps, guidance off): add --preset fast".
pub fn hints(loras: &[LoraSpec]) -> Vec<String> {
    let mut out = Vec::new();
    for l in loras {
        if let Ok(ps) = lora_presets(&l.path) {
            for p in ps {
                let file = l.path.file_name().unwrap_or_default().to_string_lossy();
                out.push(format!(
                    "{file} names the preset `{}` ({}): add --preset {} to use it",
                    p.name,
                    p.describe(),
                    p.name
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal safetensors file (one f32 tensor) with an optional `kino` metadata entry.
    fn write_lora(path: &Path, kino: Option<&str>) {
        let mut header = serde_json::json!({
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        });
        if let Some(k) = kino {
            header["__metadata__"] = serde_json::json!({ "kino": k });
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&[0u8; 4]);
        std::fs::write(path, bytes).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kino-preset-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn adapter_preset_wins_and_explicit_lists_are_named() {
        let dir = temp_dir("wins");
        let model = dir.join("model");
        std::fs::create_dir_all(model.join("lora")).unwrap();
        write_lora(&model.join("lora/f.safetensors"), None);
        std::fs::write(
            model.join("kino.json"),
            r#"{"num_inference_steps": 20, "presets": {"fast": {"lora": ["lora/f.safetensors:0.5"],
                "num_inference_steps": 6, "guidance_scale": 1.0}, "slow": {"shift": 3.0}}}"#,
        )
        .unwrap();
        let own = dir.join("own.safetensors");
        write_lora(
            &own,
            Some(r#"{"presets": {"fast": {"num_inference_steps": 4, "guidance_scale": 1.0}}}"#),
        );
        // The model's preset, with its adapter resolved against the folder.
        let p = find(&model, &[], "fast").unwrap();
        assert_eq!(p.num_inference_steps, Some(6));
        assert_eq!(p.lora.len(), 1);
        assert_eq!(p.lora[0].path, model.join("lora/f.safetensors"));
        assert_eq!(p.lora[0].scale, 0.5);
        assert_eq!(
            p.describe(),
            "6 steps, guidance off, adapter f.safetensors:0.5"
        );
        // A loaded adapter's preset of the same name wins.
        let spec = LoraSpec {
            path: own.clone(),
            scale: 1.0,
        };
        let p = find(&model, std::slice::from_ref(&spec), "fast").unwrap();
        assert_eq!(p.num_inference_steps, Some(4));
        assert!(p.lora.is_empty());
        assert_eq!(find(&model, &[], "slow").unwrap().shift, Some(3.0));
        // Unknown: the message lists what there is.
        let e = find(&model, std::slice::from_ref(&spec), "turbo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no preset `turbo`"), "{e}");
        assert!(e.contains("fast (from the model's kino.json)"), "{e}");
        assert!(e.contains("slow"), "{e}");
        assert_eq!(hints(&[spec]).len(), 1);
    }

    #[test]
    fn bad_presets_are_refused_with_the_reason() {
        let dir = temp_dir("bad");
        for (json, says) in [
            (
                r#"{"presets": {"fast": {"steps": 4}}}"#,
                "unknown setting `steps`",
            ),
            (
                r#"{"presets": {"fast": {"num_inference_steps": 0}}}"#,
                "1 to 1000",
            ),
            (
                r#"{"presets": {"fast": {"lora": ["nope.safetensors"]}}}"#,
                "not there",
            ),
            (r#"{"presets": []}"#, "not a JSON object"),
        ] {
            std::fs::write(dir.join("kino.json"), json).unwrap();
            let e = find(&dir, &[], "fast").unwrap_err().to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
        let own = dir.join("own.safetensors");
        write_lora(
            &own,
            Some(r#"{"presets": {"fast": {"lora": ["x.safetensors"]}}}"#),
        );
        let e = lora_presets(&own).unwrap_err().to_string();
        assert!(e.contains("cannot name further adapters"), "{e}");
    }
}
