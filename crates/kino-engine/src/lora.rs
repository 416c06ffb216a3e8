//! LoRA adapters for the Wan transformer, as diffusers 0.42.1 loads them
//! (`WanLoraLoaderMixin.lora_state_dict` / `load_lora_weights` / `set_adapters` /
//! `fuse_lora`, `loaders/lora_pipeline.py`, with PEFT's `LoraLayer`).
//!
//! File formats (detected from the tensor names, as `lora_state_dict` does):
//! - diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, `lora_B.weight`,
//!   `lora_B.bias`; `lora_alpha`/`r` (and `rank_pattern`/`alpha_pattern`, `use_rslora`) from
//!   the file's `lora_adapter_metadata` when present, else alpha = rank (scale 1), as
//!   `get_peft_kwargs` decides;
//! - the original Wan / ComfyUI naming (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`,
//!   `lora_up`, `alpha`, `diff_b`), converted as `_convert_non_diffusers_wan_lora_to_diffusers`
//!   does: `alpha / rank` folded into the two matrices (split into a power-of-two-balanced
//!   pair, in the file's dtype), `diff_b` as a bias delta; norm `diff`/`diff_b` dropped and
//!   full-weight `diff` deltas ignored, as the reference does (reported);
//! - kohya / musubi-tuner (`lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`),
//!   converted as `_convert_musubi_wan_lora_to_diffusers`.
//!
//! A layer with adapters computes `W·x + b + Σ_a s_a·(B_a·(A_a·x) + bias_a)`, with
//! `s_a = weight_a · alpha_a / r_a` (the `set_adapters` weight, 1 when a file is given without
//! one). Kino applies them two ways, same maths: **on the fly** (the default; the base weights
//! as loaded, the adapters of a layer concatenated into one low-rank pair `[A_1; A_2]`,
//! `[s_1·B_1, s_2·B_2]`, one extra small matmul per layer) or **fused** at load
//! (`W + Σ s·B·A`, as `fuse_lora`; no extra work per step). Files on disk are never changed.
//! Every adapter tensor must land on a layer of the model: one that does not (an unknown layer,
//! a shape that does not fit) is refused, naming the tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// `FILE[:SCALE]` as the CLI and parity take it (scale 1 when left out).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl FromStr for LoraSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((p, sc)) if !p.is_empty() => match sc.trim().parse::<f64>() {
                Ok(v) => (p, v),
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        if !scale.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "LoRA scale in `{s}` is not a finite number; write FILE or FILE:SCALE (e.g. \
                 style.safetensors:0.8)"
            )));
        }
        Ok(Self {
            path: PathBuf::from(path),
            scale,
        })
    }
}

/// One adapted layer (diffusers naming, e.g. `blocks.0.attn1.to_q`).
#[derive(Debug, Clone)]
struct LoraModule {
    /// `lora_A.weight`, `[r, in]`, f32.
    down: Tensor,
    /// `lora_B.weight`, `[out, r]`, f32.
    up: Tensor,
    /// `lora_B.bias`, `[out]`, f32.
    bias: Option<Tensor>,
    /// PEFT's `scaling`: `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    scaling: f64,
}

/// One LoRA file, converted to diffusers naming.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    modules: BTreeMap<String, LoraModule>,
    /// What the reference drops from this file, and Kino with it (norm deltas, full-weight
    /// `diff` deltas, DoRA scales), for a warning.
    pub ignored: Vec<String>,
}

impl LoraAdapter {
    /// Reads and converts one LoRA file.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadFile {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "give a LoRA file (.safetensors)".into(),
            });
        }
        let metadata = read_metadata(path)?;
        let raw = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        if raw.is_empty() {
            return Err(bad("the LoRA file holds no tensors".into()));
        }
        let mut ignored = Vec::new();
        let mut sd: BTreeMap<String, Tensor> =
            if raw.keys().any(|k| k.starts_with("diffusion_model.")) {
                convert_wan(raw, &mut ignored).map_err(bad)?
            } else if raw.keys().any(|k| k.starts_with("lora_unet_")) {
                convert_musubi(raw).map_err(bad)?
            } else {
                raw.into_iter().collect()
            };
        // `lora_state_dict` drops DoRA scales with a warning.
        let dora: Vec<String> = sd
            .keys()
            .filter(|k| k.contains("dora_scale"))
            .cloned()
            .collect();
        for k in dora {
            sd.remove(&k);
            ignored.push(k);
        }
        if sd.keys().any(|k| k.contains("lora_magnitude_vector")) {
            return Err(bad(
                "this is a DoRA adapter (lora_magnitude_vector); Kino runs LoRA adapters only"
                    .into(),
            ));
        }
        // `load_lora_adapter(prefix="transformer")` keeps the `transformer.` keys only.
        let other: Vec<&String> = sd
            .keys()
            .filter(|k| !k.starts_with("transformer."))
            .collect();
        if let Some(k) = other.first() {
            return Err(bad(format!(
                "tensor `{k}` is not for the transformer (diffusers LoRA files name them \
                 `transformer.…`, original Wan ones `diffusion_model.…`, kohya ones \
                 `lora_unet_…`); {} such tensors",
                other.len()
            )));
        }
        // diffusers' own saved naming (`convert_state_dict_to_diffusers`: `….lora.down.weight`,
        // `….lora.up.weight`, what `save_lora_weights` writes from its training scripts) is
        // turned into PEFT naming as `load_lora_adapter` does (`convert_unet_state_dict_to_peft`,
        // on every key when the first, in sorted order, is not PEFT-named: that function names
        // only the attention projections the old way, so files mix both namings).
        if sd.keys().next().is_some_and(|k| !k.contains("lora_A")) {
            sd = sd
                .into_iter()
                .map(|(k, v)| (unet_to_peft_name(&k), v))
                .collect();
        }
        let config = PeftConfig::from_metadata(metadata.as_ref()).map_err(bad)?;
        // Per layer: lora_A, lora_B, lora_B.bias.
        type Parts = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (k, t) in sd {
            let k = k.trim_start_matches("transformer.");
            let t = t.to_dtype(DType::F32)?;
            let (module, slot) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = k.strip_suffix(".lora_B.bias") {
                (m, 2)
            } else {
                return Err(bad(format!(
                    "tensor `transformer.{k}` is not a LoRA matrix (expected names ending in \
                     lora_A.weight, lora_B.weight or lora_B.bias)"
                )));
            };
            let e = parts.entry(module.to_string()).or_default();
            match slot {
                0 => e.0 = Some(t),
                1 => e.1 = Some(t),
                _ => e.2 = Some(t),
            }
        }
        let mut modules = BTreeMap::new();
        for (m, (down, up, bias)) in parts {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(bad(format!(
                    "layer `{m}` has only part of a LoRA (lora_A and lora_B are both needed)"
                )));
            };
            let (r, _) = down.dims2().map_err(|_| {
                bad(format!(
                    "lora_A of `{m}` has shape {:?}; expected [rank, in]",
                    down.dims()
                ))
            })?;
            match up.dims() {
                [_, ur] if *ur == r => {}
                d => {
                    return Err(bad(format!(
                        "lora_B of `{m}` has shape {d:?}; expected [out, {r}] (its lora_A has \
                         rank {r})"
                    )))
                }
            }
            if let Some(b) = &bias {
                if b.dims() != [up.dim(0)?] {
                    return Err(bad(format!(
                        "lora_B.bias of `{m}` has shape {:?}; expected [{}]",
                        b.dims(),
                        up.dim(0)?
                    )));
                }
            }
            let scaling = config.scaling(&m, r);
            modules.insert(
                m,
                LoraModule {
                    down,
                    up,
                    bias,
                    scaling,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            modules,
            ignored,
        })
    }

    /// The layers it adapts (diffusers names).
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }
}

/// PEFT's `LoraConfig` fields that set the scaling.
#[derive(Debug, Default)]
struct PeftConfig {
    r: Option<f64>,
    lora_alpha: Option<f64>,
    rank_pattern: BTreeMap<String, f64>,
    alpha_pattern: BTreeMap<String, f64>,
    rslora: bool,
}

impl PeftConfig {
    /// From the file's `lora_adapter_metadata` (a JSON `LoraConfig`), if any.
    fn from_metadata(meta: Option<&serde_json::Value>) -> std::result::Result<Self, String> {
        let Some(m) = meta else {
            return Ok(Self::default());
        };
        let get = |k: &str| {
            m.get(k)
                .or_else(|| m.get(format!("transformer.{k}")))
                .cloned()
        };
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err("this is a DoRA adapter (use_dora); Kino runs LoRA adapters only".into());
        }
        let pattern = |k: &str| -> BTreeMap<String, f64> {
            get(k)
                .and_then(|v| v.as_object().cloned())
                .map(|o| {
                    o.into_iter()
                        .filter_map(|(k, v)| v.as_f64().map(|v| (k, v)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            r: get("r").and_then(|v| v.as_f64()),
            lora_alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            rank_pattern: pattern("rank_pattern"),
            alpha_pattern: pattern("alpha_pattern"),
            rslora: get("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        })
    }

    /// PEFT's scaling of a layer of rank `rank`: `alpha / r` (rsLoRA `alpha / sqrt(r)`), with
    /// the per-layer patterns (a key matches a layer name equal to it or ending in `.key`);
    /// without metadata alpha = rank (scale 1).
    fn scaling(&self, module: &str, rank: usize) -> f64 {
        let find = |p: &BTreeMap<String, f64>| {
            p.iter()
                .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
                .map(|(_, v)| *v)
        };
        let r = find(&self.rank_pattern).or(self.r).unwrap_or(rank as f64);
        let alpha = find(&self.alpha_pattern).or(self.lora_alpha).unwrap_or(r);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// diffusers' `convert_unet_state_dict_to_peft` on one key: `KEYS_TO_ALWAYS_REPLACE`, then each
/// the first pattern of `UNET_TO_DIFFUSERS` (in its order) that the key holds.
fn unet_to_peft_name(key: &str) -> String {
    const UNET_TO_DIFFUSERS: [(&str, &str); 11] = [
        (".to_out_lora.up", ".to_out.0.lora_B"),
        (".to_out_lora.down", ".to_out.0.lora_A"),
        (".to_q_lora.down", ".to_q.lora_A"),
        (".to_q_lora.up", ".to_q.lora_B"),
        (".to_k_lora.down", ".to_k.lora_A"),
        (".to_k_lora.up", ".to_k.lora_B"),
        (".to_v_lora.down", ".to_v.lora_A"),
        (".to_v_lora.up", ".to_v.lora_B"),
        (".lora.up", ".lora_B"),
        (".lora.down", ".lora_A"),
        (
            ".to_out.lora_magnitude_vector",
            ".to_out.0.lora_magnitude_vector",
        ),
    ];
    let mut k = key.replace(".processor.", ".");
    for (from, to) in UNET_TO_DIFFUSERS {
        if k.contains(from) {
            k = k.replace(from, to);
            break;
        }
    }
    k
}

/// The `__metadata__` `lora_adapter_metadata` JSON of a safetensors file, if any.
fn read_metadata(path: &Path) -> Result<Option<serde_json::Value>> {
    read_metadata_json(path, "lora_adapter_metadata")
}

/// The JSON string under `key` in a safetensors file's `__metadata__`, parsed, if any (the
/// header alone is read). Kino's own adapters keep what they are and their presets under
/// `kino` ([`crate::preset`]).
pub fn read_metadata_json(path: &Path, key: &str) -> Result<Option<serde_json::Value>> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let (v, _, _) = crate::loading::safetensors_header(path)?;
    let meta = v
        .get("__metadata__")
        .and_then(|m| m.get(key))
        .and_then(|s| s.as_str());
    match meta {
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| bad(format!("{key} in the metadata is not JSON: {e}"))),
        None => Ok(None),
    }
}

/// `get_alpha_scales`: `alpha / rank` split into (down, up) factors whose product it is,
/// balanced by powers of two.
fn alpha_scales(alpha: f64, rank: usize) -> (f64, f64) {
    let mut down = alpha / rank as f64;
    let mut up = 1.0;
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    (down, up)
}

/// `tensor * python_float` in the tensor's dtype (as torch does).
fn times(t: &Tensor, s: f64) -> std::result::Result<Tensor, String> {
    t.affine(s, 0.0).map_err(|e| e.to_string())
}

/// `_convert_non_diffusers_wan_lora_to_diffusers` (original Wan / ComfyUI naming).
fn convert_wan(
    state_dict: std::collections::HashMap<String, Tensor>,
    ignored: &mut Vec<String>,
) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let mut sd: BTreeMap<String, Tensor> = state_dict
        .into_iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("diffusion_model.").unwrap_or(&k).to_string(),
                v,
            )
        })
        .collect();
    let blocks: BTreeSet<usize> = sd
        .keys()
        .filter_map(|k| k.strip_prefix("blocks."))
        .filter_map(|k| k.split('.').next()?.parse().ok())
        .collect();
    let (Some(&min_block), Some(&max_block)) = (blocks.first(), blocks.last()) else {
        return Err("an original-format Wan LoRA without any `blocks.N.` tensor".into());
    };
    let i2v = sd.keys().any(|k| k.contains("k_img")) && sd.keys().any(|k| k.contains("v_img"));
    let down_key = if sd.keys().any(|k| k.contains("lora_A")) {
        "lora_A"
    } else {
        "lora_down"
    };
    let up_key = if sd.keys().any(|k| k.contains("lora_B")) {
        "lora_B"
    } else {
        "lora_up"
    };
    let has_time_weight = sd
        .keys()
        .any(|k| k.starts_with("time_projection") && k.ends_with(".weight"));
    let keys: Vec<String> = sd.keys().cloned().collect();
    for k in keys {
        if (k.ends_with(".diff") || k.ends_with(".diff_b")) && k.contains("norm") {
            sd.remove(&k);
            ignored.push(format!("diffusion_model.{k}"));
        }
        if k.contains("time_projection") && !has_time_weight && sd.remove(&k).is_some() {
            ignored.push(format!("diffusion_model.{k}"));
        }
    }
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let alpha_of = |sd: &mut BTreeMap<String, Tensor>, key: &str| -> Option<f64> {
        sd.remove(key)
            .and_then(|t| {
                t.to_dtype(DType::F64)
                    .ok()?
                    .flatten_all()
                    .ok()?
                    .to_vec1::<f64>()
                    .ok()
            })
            .and_then(|v| v.first().copied())
    };
    // One (original, diffusers) layer: A, B, alpha folded, diff_b as the bias.
    let mut layer = |sd: &mut BTreeMap<String, Tensor>,
                     orig: &str,
                     conv: &str|
     -> std::result::Result<(), String> {
        let alpha = alpha_of(sd, &format!("{orig}.alpha"));
        let a = sd.remove(&format!("{orig}.{down_key}.weight"));
        let b = sd.remove(&format!("{orig}.{up_key}.weight"));
        match (a, b, alpha) {
            (Some(a), Some(b), Some(alpha)) => {
                let rank = a.dim(0).map_err(|e| e.to_string())?;
                let (sd_, su) = alpha_scales(alpha, rank);
                out.insert(format!("{conv}.lora_A.weight"), times(&a, sd_)?);
                out.insert(format!("{conv}.lora_B.weight"), times(&b, su)?);
            }
            (a, b, _) => {
                if let Some(a) = a {
                    out.insert(format!("{conv}.lora_A.weight"), a);
                }
                if let Some(b) = b {
                    out.insert(format!("{conv}.lora_B.weight"), b);
                }
            }
        }
        if let Some(bias) = sd.remove(&format!("{orig}.diff_b")) {
            out.insert(format!("{conv}.lora_B.bias"), bias);
        }
        Ok(())
    };
    for i in min_block..=max_block {
        for (o, c) in [
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
        ] {
            layer(
                &mut sd,
                &format!("blocks.{i}.self_attn.{o}"),
                &format!("blocks.{i}.attn1.{c}"),
            )?;
        }
        for (o, c) in [
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
        ] {
            layer(
                &mut sd,
                &format!("blocks.{i}.cross_attn.{o}"),
                &format!("blocks.{i}.attn2.{c}"),
            )?;
        }
        if i2v {
            for (o, c) in [("k_img", "add_k_proj"), ("v_img", "add_v_proj")] {
                layer(
                    &mut sd,
                    &format!("blocks.{i}.cross_attn.{o}"),
                    &format!("blocks.{i}.attn2.{c}"),
                )?;
            }
        }
        for (o, c) in [("ffn.0", "net.0.proj"), ("ffn.2", "net.2")] {
            layer(
                &mut sd,
                &format!("blocks.{i}.{o}"),
                &format!("blocks.{i}.ffn.{c}"),
            )?;
        }
    }
    // The embedders and the head (A, B and diff_b only; no alpha, as the reference).
    let mut plain = |sd: &mut BTreeMap<String, Tensor>, orig: &str, conv: &str| {
        if let Some(a) = sd.remove(&format!("{orig}.{down_key}.weight")) {
            out.insert(format!("{conv}.lora_A.weight"), a);
        }
        if let Some(b) = sd.remove(&format!("{orig}.{up_key}.weight")) {
            out.insert(format!("{conv}.lora_B.weight"), b);
        }
        if let Some(b) = sd.remove(&format!("{orig}.diff_b")) {
            out.insert(format!("{conv}.lora_B.bias"), b);
        }
    };
    plain(&mut sd, "time_projection.1", "condition_embedder.time_proj");
    plain(&mut sd, "head.head", "proj_out");
    for (n, m) in [("0", "1"), ("2", "2")] {
        plain(
            &mut sd,
            &format!("text_embedding.{n}"),
            &format!("condition_embedder.text_embedder.linear_{m}"),
        );
        plain(
            &mut sd,
            &format!("time_embedding.{n}"),
            &format!("condition_embedder.time_embedder.linear_{m}"),
        );
    }
    plain(
        &mut sd,
        "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.0.proj",
    );
    plain(
        &mut sd,
        "img_emb.proj.3",
        "condition_embedder.image_embedder.ff.net.2",
    );
    if sd.contains_key("head.head.diff") {
        return Err(
            "`head.head.diff` (a distillation LoRA's head delta) is not supported yet".into(),
        );
    }
    if !sd.is_empty() {
        if sd.keys().all(|k| k.contains(".diff")) {
            // The reference logs these and leaves them out.
            ignored.extend(sd.keys().map(|k| format!("diffusion_model.{k}")));
        } else {
            let k: Vec<&String> = sd.keys().take(5).collect();
            return Err(format!(
                "tensors the Wan LoRA converter does not know: {k:?} (diffusers 0.42.1 refuses \
                 this file too)"
            ));
        }
    }
    Ok(out
        .into_iter()
        .map(|(k, v)| (format!("transformer.{k}"), v))
        .collect())
}

/// `_convert_musubi_wan_lora_to_diffusers` (kohya / musubi-tuner naming).
fn convert_musubi(
    state_dict: std::collections::HashMap<String, Tensor>,
) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let mut sd: BTreeMap<String, Tensor> = state_dict
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("lora_unet_").unwrap_or(&k).to_string(), v))
        .collect();
    let blocks: BTreeSet<String> = sd
        .keys()
        .filter_map(|k| {
            k.split("blocks_")
                .nth(1)?
                .split('_')
                .next()
                .map(str::to_string)
        })
        .collect();
    let i2v = sd.keys().any(|k| k.contains("k_img")) && sd.keys().any(|k| k.contains("v_img"));
    let mut out = BTreeMap::new();
    let mut layer = |sd: &mut BTreeMap<String, Tensor>,
                     orig: &str,
                     conv: &str|
     -> std::result::Result<(), String> {
        let missing = |what: &str| format!("kohya LoRA lacks `lora_unet_{orig}.{what}`");
        let a = sd
            .remove(&format!("{orig}.lora_down.weight"))
            .ok_or_else(|| missing("lora_down.weight"))?;
        let b = sd
            .remove(&format!("{orig}.lora_up.weight"))
            .ok_or_else(|| missing("lora_up.weight"))?;
        let alpha = sd
            .remove(&format!("{orig}.alpha"))
            .and_then(|t| {
                t.to_dtype(DType::F64)
                    .ok()?
                    .flatten_all()
                    .ok()?
                    .to_vec1::<f64>()
                    .ok()
            })
            .and_then(|v| v.first().copied())
            .ok_or_else(|| missing("alpha"))?;
        let rank = a.dim(0).map_err(|e| e.to_string())?;
        let (sd_, su) = alpha_scales(alpha, rank);
        out.insert(format!("transformer.{conv}.lora_A.weight"), times(&a, sd_)?);
        out.insert(format!("transformer.{conv}.lora_B.weight"), times(&b, su)?);
        Ok(())
    };
    for i in 0..blocks.len() {
        for (o, c) in [
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
        ] {
            layer(
                &mut sd,
                &format!("blocks_{i}_self_attn_{o}"),
                &format!("blocks.{i}.attn1.{c}"),
            )?;
            layer(
                &mut sd,
                &format!("blocks_{i}_cross_attn_{o}"),
                &format!("blocks.{i}.attn2.{c}"),
            )?;
        }
        if i2v {
            for (o, c) in [("k_img", "add_k_proj"), ("v_img", "add_v_proj")] {
                layer(
                    &mut sd,
                    &format!("blocks_{i}_cross_attn_{o}"),
                    &format!("blocks.{i}.attn2.{c}"),
                )?;
            }
        }
        for (o, c) in [("ffn_0", "net.0.proj"), ("ffn_2", "net.2")] {
            layer(
                &mut sd,
                &format!("blocks_{i}_{o}"),
                &format!("blocks.{i}.ffn.{c}"),
            )?;
        }
    }
    if !sd.is_empty() {
        let k: Vec<&String> = sd.keys().take(5).collect();
        return Err(format!(
            "tensors the kohya Wan LoRA converter does not know: {k:?}"
        ));
    }
    Ok(out)
}

/// The adapters of one transformer, with their weights, applied fused or on the fly.
#[derive(Debug)]
pub struct LoraSet {
    adapters: Vec<(LoraAdapter, f64)>,
    /// Fold the adapters into the weights at load (`fuse_lora`) instead of applying them on
    /// the fly.
    pub fuse: bool,
    used: Mutex<BTreeSet<String>>,
}

impl LoraSet {
    /// Loads every adapter of `specs` (in order; weights from their scales).
    pub fn load(specs: &[LoraSpec], fuse: bool) -> Result<Self> {
        let adapters = specs
            .iter()
            .map(|s| Ok((LoraAdapter::load(&s.path)?, s.scale)))
            .collect::<Result<Vec<_>>>()?;
        for (a, _) in &adapters {
            if !a.ignored.is_empty() {
                tracing::warn!(
                    "{}: {} tensors left out, as diffusers 0.42.1 leaves them out (norm deltas, \
                     full-weight `diff` deltas, DoRA scales): {}",
                    a.path.display(),
                    a.ignored.len(),
                    a.ignored
                        .iter()
                        .take(4)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(Self {
            adapters,
            fuse,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn adapters(&self) -> impl Iterator<Item = (&LoraAdapter, f64)> {
        self.adapters.iter().map(|(a, s)| (a, *s))
    }

    fn of(&self, module: &str) -> Vec<(&LoraModule, f64)> {
        self.adapters
            .iter()
            .filter_map(|(a, w)| a.modules.get(module).map(|m| (m, w * m.scaling)))
            .collect()
    }

    fn mark(&self, module: &str) {
        if let Ok(mut u) = self.used.lock() {
            u.insert(module.to_string());
        }
    }

    /// Whether `module` has adapters applied on the fly.
    pub(crate) fn on_the_fly(&self, module: &str) -> bool {
        !self.fuse && !self.of(module).is_empty()
    }

    /// `name` (a weight or bias of the model) with the adapters folded in where they apply:
    /// a `.weight` gains `Σ s·B·A` when fused; a `.bias` gains `Σ s·bias` (either way).
    pub(crate) fn adjust(&self, name: &str, base: Tensor) -> candle_core::Result<Tensor> {
        let (module, kind) = match name.rsplit_once('.') {
            Some(x) => x,
            None => return Ok(base),
        };
        let ads = self.of(module);
        if ads.is_empty() {
            return Ok(base);
        }
        let dtype = base.dtype();
        let mut acc = base.to_dtype(DType::F32)?;
        match kind {
            "weight" if self.fuse => {
                for (m, s) in &ads {
                    let delta = (m.up.matmul(&m.down)? * *s)?.to_device(acc.device())?;
                    if delta.dims() != acc.dims() {
                        candle_core::bail!(
                            "LoRA layer `{module}` makes a {:?} weight delta but the model's \
                             weight is {:?}",
                            delta.dims(),
                            acc.dims()
                        );
                    }
                    acc = (acc + delta)?;
                }
                self.mark(module);
            }
            "bias" => {
                for (m, s) in &ads {
                    if let Some(b) = &m.bias {
                        let delta = (b * *s)?.to_device(acc.device())?;
                        if delta.dims() != acc.dims() {
                            candle_core::bail!(
                                "LoRA layer `{module}`'s bias is {:?} but the model's is {:?}",
                                delta.dims(),
                                acc.dims()
                            );
                        }
                        acc = (acc + delta)?;
                    }
                }
            }
            _ => return Ok(base),
        }
        acc.to_dtype(dtype)
    }

    /// On the fly: the adapters of `module` as one low-rank pair, `down` `[R, in]` and `up`
    /// `[out, R]` with the scales folded into `up`.
    pub(crate) fn low_rank(&self, module: &str) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let ads = self.of(module);
        if ads.is_empty() || self.fuse {
            return Ok(None);
        }
        let downs: Vec<&Tensor> = ads.iter().map(|(m, _)| &m.down).collect();
        let ups = ads
            .iter()
            .map(|(m, s)| &m.up * *s)
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.mark(module);
        Ok(Some((Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?)))
    }

    /// Before loading anything: adapters of blocks past the model's last are refused at once
    /// (the full check of every layer and shape happens when the weights load).
    pub fn check_blocks(&self, num_layers: usize, what: &str) -> Result<()> {
        for (a, _) in &self.adapters {
            for m in a.modules.keys() {
                let block = m
                    .strip_prefix("blocks.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(b) = block.filter(|&b| b >= num_layers) {
                    return Err(Error::BadFile {
                        path: a.path.clone(),
                        message: format!(
                            "LoRA layer `{m}` (block {b}) is not a layer of {what}, which has \
                             {num_layers} blocks; the adapter was made for another model"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// After the model is built: every adapted layer must have been one of the model's.
    pub fn check_all_used(&self, what: &str) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        for (a, _) in &self.adapters {
            if let Some(m) = a.modules.keys().find(|m| !used.contains(*m)) {
                return Err(Error::BadFile {
                    path: a.path.clone(),
                    message: format!(
                        "LoRA layer `{m}` (tensor transformer.{m}.lora_A.weight) is not a \
                         layer of {what}; the adapter was made for another model"
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_scale() {
        let s: LoraSpec = "a/b.safetensors:0.75".parse().unwrap();
        assert_eq!((s.path, s.scale), (PathBuf::from("a/b.safetensors"), 0.75));
        let s: LoraSpec = "c.safetensors".parse().unwrap();
        assert_eq!(s.scale, 1.0);
        let s: LoraSpec = "C:/x/c.safetensors".parse().unwrap();
        assert_eq!(
            (s.path, s.scale),
            (PathBuf::from("C:/x/c.safetensors"), 1.0)
        );
    }

    fn tiny_model() -> PathBuf {
        crate::testing::fixtures_dir()
            .join("pipeline-lora")
            .join("model")
            .join("transformer")
    }

    fn write(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kino-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    fn load_err(path: &Path) -> String {
        let set = LoraSet::load(
            &[LoraSpec {
                path: path.to_path_buf(),
                scale: 1.0,
            }],
            false,
        );
        let set = match set {
            Ok(s) => std::sync::Arc::new(s),
            Err(e) => return e.to_string(),
        };
        crate::wan::transformer::WanTransformer3DModel::load_with_lora(
            &tiny_model(),
            DType::F32,
            &Device::Cpu,
            Some(set),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    }

    #[test]
    fn diffusers_saved_naming_reads_as_peft_naming() {
        // What `save_lora_weights` writes from `convert_state_dict_to_diffusers(...)`.
        let a = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let b = Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap();
        let old = write(
            "saved.safetensors",
            &[
                (
                    "transformer.blocks.0.attn1.to_q.lora.down.weight",
                    a.clone(),
                ),
                ("transformer.blocks.0.attn1.to_q.lora.up.weight", b.clone()),
                (
                    "transformer.blocks.0.attn1.processor.to_k.lora.down.weight",
                    a.clone(),
                ),
                (
                    "transformer.blocks.0.attn1.processor.to_k.lora.up.weight",
                    b.clone(),
                ),
                // The feed-forward layers keep PEFT naming in such files.
                ("transformer.blocks.0.ffn.net.2.lora_A.weight", a.clone()),
                ("transformer.blocks.0.ffn.net.2.lora_B.weight", b.clone()),
            ],
        );
        let peft = write(
            "peft-named.safetensors",
            &[
                ("transformer.blocks.0.attn1.to_q.lora_A.weight", a.clone()),
                ("transformer.blocks.0.attn1.to_q.lora_B.weight", b.clone()),
                ("transformer.blocks.0.attn1.to_k.lora_A.weight", a.clone()),
                ("transformer.blocks.0.attn1.to_k.lora_B.weight", b.clone()),
                ("transformer.blocks.0.ffn.net.2.lora_A.weight", a),
                ("transformer.blocks.0.ffn.net.2.lora_B.weight", b),
            ],
        );
        let (x, y) = (
            LoraAdapter::load(&old).unwrap(),
            LoraAdapter::load(&peft).unwrap(),
        );
        assert_eq!(
            x.layers().collect::<Vec<_>>(),
            [
                "blocks.0.attn1.to_k",
                "blocks.0.attn1.to_q",
                "blocks.0.ffn.net.2"
            ]
        );
        assert_eq!(
            x.layers().collect::<Vec<_>>(),
            y.layers().collect::<Vec<_>>()
        );
        for (m, n) in x.modules.values().zip(y.modules.values()) {
            let d = (&m.down - &n.down)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            assert_eq!(m.scaling, n.scaling);
        }
        assert_eq!(
            unet_to_peft_name("x.to_out_lora.up.weight"),
            "x.to_out.0.lora_B.weight"
        );
    }

    #[test]
    fn adapters_that_do_not_fit_the_model_are_named() {
        let d = Device::Cpu;
        let a = Tensor::ones((2, 24), DType::F32, &d).unwrap();
        let b = Tensor::ones((24, 2), DType::F32, &d).unwrap();
        // A layer the model does not have.
        let p = write(
            "unknown.safetensors",
            &[
                ("transformer.blocks.9.attn1.to_q.lora_A.weight", a.clone()),
                ("transformer.blocks.9.attn1.to_q.lora_B.weight", b.clone()),
            ],
        );
        let e = load_err(&p);
        assert!(
            e.contains("blocks.9.attn1.to_q") && e.contains("not a layer"),
            "{e}"
        );
        // A shape that does not fit (the layer takes 24 inputs, not 7).
        let p = write(
            "shape.safetensors",
            &[
                (
                    "transformer.blocks.0.attn1.to_q.lora_A.weight",
                    Tensor::ones((2, 7), DType::F32, &d).unwrap(),
                ),
                ("transformer.blocks.0.attn1.to_q.lora_B.weight", b.clone()),
            ],
        );
        let e = load_err(&p);
        assert!(
            e.contains("blocks.0.attn1.to_q") && e.contains("another model"),
            "{e}"
        );
        // Half a LoRA, a tensor for something else, and no file at all.
        let p = write(
            "half.safetensors",
            &[("transformer.blocks.0.attn1.to_q.lora_A.weight", a.clone())],
        );
        assert!(load_err(&p).contains("only part of a LoRA"));
        let p = write("text.safetensors", &[("text_encoder.x.lora_A.weight", a)]);
        assert!(load_err(&p).contains("not for the transformer"));
        assert!(load_err(Path::new("/nonexistent/x.safetensors")).contains("LoRA file"));
    }

    #[test]
    fn alpha_scales_balance_by_powers_of_two() {
        let (d, u) = alpha_scales(1.0, 16);
        assert!((d * u - 1.0 / 16.0).abs() < 1e-12);
        assert_eq!((d, u), (0.25, 0.25));
        assert_eq!(alpha_scales(8.0, 4), (2.0, 1.0));
    }
}
