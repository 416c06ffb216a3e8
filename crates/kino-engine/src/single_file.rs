//! Single-file checkpoints: the files people already have from ComfyUI or the original Wan
//! releases (a diffusion model with the original Wan tensor names, a UMT5 text encoder in
//! transformers' names — fp16/bf16/f32 or ComfyUI's `fp8_e4m3fn` "scaled" —, a Wan VAE with the
//! original names), used as the components of a diffusers-layout model.
//!
//! The renames mirror diffusers 0.42.1 `loaders/single_file_utils.py`:
//! [`transformer_name`] is `convert_wan_transformer_to_diffusers` (its rename table, applied in
//! order to every key after stripping `model.diffusion_model.`), [`vae_name`] is
//! `convert_wan_vae_to_diffusers` (its decoder grouping written for any `num_res_blocks`: the
//! reference hard-codes the Wan2.1 VAE's 3 resnets + 1 upsampler per block, which this gives for
//! `num_res_blocks = 2`), and [`classify`] follows `infer_diffusers_model_type`'s marker keys.
//!
//! Nothing is converted on disk: [`layout`] makes a small folder under Kino's cache (configs,
//! tokenizer and scheduler from a diffusers folder or alias the user names; each single file is
//! referenced by a [`NOTE`]), and [`crate::loading::Weights::open`] follows the note and maps
//! names in memory ([`NameMap`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file in a component folder that points at a single file instead of holding weights.
pub const NOTE: &str = "kino-single-file.json";

/// How a single file names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Naming {
    /// Already diffusers/transformers names (a component's `diffusion_pytorch_model.safetensors`
    /// taken on its own).
    Diffusers,
    /// A Wan diffusion model with the original names (`blocks.0.self_attn.q.weight`, with or
    /// without ComfyUI's `model.diffusion_model.` prefix).
    WanOriginal,
    /// A Wan VAE with the original names (`encoder.downsamples.0.residual.0.gamma`).
    WanVaeOriginal,
    /// A UMT5 encoder in transformers' names, possibly ComfyUI's fp8 "scaled" layout (`X.weight`
    /// in float8 e4m3 with a `X.scale_weight`).
    Umt5,
    /// A UMT5 encoder in llama.cpp's T5 names (`enc.blk.0.attn_q.weight`), as the community's
    /// GGUF files have them ([`umt5_gguf_name`]).
    Umt5Gguf,
}

/// The component a single file provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Transformer,
    TextEncoder,
    Vae,
}

impl Part {
    /// The diffusers component folder it stands for.
    pub fn folder(self) -> &'static str {
        match self {
            Part::Transformer => "transformer",
            Part::TextEncoder => "text_encoder",
            Part::Vae => "vae",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Part::Transformer => "a Wan diffusion model",
            Part::TextEncoder => "a UMT5 text encoder",
            Part::Vae => "a Wan VAE",
        }
    }
}

/// What a component folder's [`NOTE`] says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Note {
    /// The single file (absolute path).
    pub file: PathBuf,
    pub part: Part,
    pub naming: Naming,
    /// The VAE's `num_res_blocks` (the decoder grouping depends on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_res_blocks: Option<usize>,
}

impl Note {
    /// The note of a component folder, if it has one.
    pub fn read(dir: &Path) -> Result<Option<Note>> {
        let path = dir.join(NOTE);
        if !path.exists() {
            return Ok(None);
        }
        let note: Note = crate::loading::read_json(&path)?;
        if !note.file.is_file() {
            return Err(Error::MissingFile {
                path: note.file.clone(),
                hint: format!(
                    "{} points at this single file, which is gone; pass the files to --model again",
                    path.display()
                ),
            });
        }
        Ok(Some(note))
    }
}

/// Diffusers names → the file's names, and the per-tensor scales of fp8 "scaled" weights.
#[derive(Clone, Debug, Default)]
pub struct NameMap {
    /// Diffusers name → name in the file.
    pub names: HashMap<String, String>,
    /// Diffusers name of a weight → name of its scale in the file (`X.scale_weight`).
    pub scales: HashMap<String, String>,
}

/// Builds the name map of a file with these tensor names.
pub fn name_map(note: &Note, file_names: &[String]) -> Result<NameMap> {
    let mut map = NameMap::default();
    let bad = |message: String| Error::BadFile {
        path: note.file.clone(),
        message,
    };
    if note.naming == Naming::WanOriginal && file_names.iter().any(|k| k.contains("face_adapter")) {
        return Err(bad(
            "a Wan-Animate checkpoint (face adapter, motion encoder); Kino does not run Wan-Animate"
                .into(),
        ));
    }
    for f in file_names {
        let d = match note.naming {
            Naming::Diffusers => f.clone(),
            Naming::WanOriginal => transformer_name(f),
            Naming::WanVaeOriginal => vae_name(f, note.num_res_blocks.unwrap_or(2)),
            Naming::Umt5Gguf => umt5_gguf_name(f),
            Naming::Umt5 => {
                // ComfyUI's scaled fp8: `scaled_fp8` marks the file; `X.scale_weight` scales
                // `X.weight`; `X.scale_input` is for fp8 matmuls on the input (not used: Kino
                // computes in the model's dtype).
                if f == "scaled_fp8" || f.ends_with(".scale_input") {
                    continue;
                }
                if let Some(base) = f.strip_suffix(".scale_weight") {
                    map.scales.insert(format!("{base}.weight"), f.clone());
                    continue;
                }
                f.clone()
            }
        };
        if let Some(other) = map.names.insert(d.clone(), f.clone()) {
            return Err(bad(format!(
                "tensors `{other}` and `{f}` both stand for `{d}`; the file mixes two namings"
            )));
        }
    }
    Ok(map)
}

/// `convert_wan_transformer_to_diffusers` for one key: strips `model.diffusion_model.` and
/// applies the reference's rename table in its order (including its norm2/norm3 swap).
pub fn transformer_name(key: &str) -> String {
    const RENAMES: [(&str, &str); 28] = [
        (
            "time_embedding.0",
            "condition_embedder.time_embedder.linear_1",
        ),
        (
            "time_embedding.2",
            "condition_embedder.time_embedder.linear_2",
        ),
        (
            "text_embedding.0",
            "condition_embedder.text_embedder.linear_1",
        ),
        (
            "text_embedding.2",
            "condition_embedder.text_embedder.linear_2",
        ),
        ("time_projection.1", "condition_embedder.time_proj"),
        ("cross_attn", "attn2"),
        ("self_attn", "attn1"),
        (".o.", ".to_out.0."),
        (".q.", ".to_q."),
        (".k.", ".to_k."),
        (".v.", ".to_v."),
        (".k_img.", ".add_k_proj."),
        (".v_img.", ".add_v_proj."),
        (".norm_k_img.", ".norm_added_k."),
        ("head.modulation", "scale_shift_table"),
        ("head.head", "proj_out"),
        ("modulation", "scale_shift_table"),
        ("ffn.0", "ffn.net.0.proj"),
        ("ffn.2", "ffn.net.2"),
        // The reference's hack to swap the layer names.
        ("norm2", "norm__placeholder"),
        ("norm3", "norm2"),
        ("norm__placeholder", "norm3"),
        // I2V model.
        ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
        (
            "img_emb.proj.1",
            "condition_embedder.image_embedder.ff.net.0.proj",
        ),
        (
            "img_emb.proj.3",
            "condition_embedder.image_embedder.ff.net.2",
        ),
        ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
        // VACE model.
        ("before_proj", "proj_in"),
        ("after_proj", "proj_out"),
    ];
    let mut k = key.replace("model.diffusion_model.", "");
    for (from, to) in RENAMES {
        k = k.replace(from, to);
    }
    k
}

/// llama.cpp's T5 names → transformers' (ComfyUI-GGUF's `T5_SD_MAP`, applied in its order).
pub const T5_GGUF_NAMES: [(&str, &str); 14] = [
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// A UMT5 tensor name of a GGUF file (llama.cpp's T5 names) in transformers' names.
pub fn umt5_gguf_name(key: &str) -> String {
    let mut k = key.to_string();
    for (from, to) in T5_GGUF_NAMES {
        k = k.replace(from, to);
    }
    k
}

/// transformers' UMT5 names → llama.cpp's (the inverse of [`umt5_gguf_name`]), for
/// `kino quantize --part text_encoder`.
pub fn umt5_gguf_original(name: &str) -> String {
    let mut k = name.to_string();
    for (gguf, hf) in T5_GGUF_NAMES.iter().rev() {
        k = k.replace(hf, gguf);
    }
    k
}

/// Diffusers' Wan transformer names → the original Wan names (the inverse of
/// [`transformer_name`]), for `kino quantize --part transformer`: files as the community
/// publishes them.
pub fn transformer_original(name: &str) -> String {
    const TOP: [(&str, &str); 6] = [
        (
            "condition_embedder.time_embedder.linear_1.",
            "time_embedding.0.",
        ),
        (
            "condition_embedder.time_embedder.linear_2.",
            "time_embedding.2.",
        ),
        (
            "condition_embedder.text_embedder.linear_1.",
            "text_embedding.0.",
        ),
        (
            "condition_embedder.text_embedder.linear_2.",
            "text_embedding.2.",
        ),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("proj_out.", "head.head."),
    ];
    const IMAGE: [(&str, &str); 4] = [
        (
            "condition_embedder.image_embedder.norm1.",
            "img_emb.proj.0.",
        ),
        (
            "condition_embedder.image_embedder.ff.net.0.proj.",
            "img_emb.proj.1.",
        ),
        (
            "condition_embedder.image_embedder.ff.net.2.",
            "img_emb.proj.3.",
        ),
        (
            "condition_embedder.image_embedder.norm2.",
            "img_emb.proj.4.",
        ),
    ];
    if name == "scale_shift_table" {
        return "head.modulation".into();
    }
    for (d, o) in TOP.iter().chain(IMAGE.iter()) {
        if let Some(rest) = name.strip_prefix(d) {
            return format!("{o}{rest}");
        }
    }
    let Some(rest) = name.strip_prefix("blocks.") else {
        return name.to_string();
    };
    let (n, part) = rest.split_once('.').unwrap_or((rest, ""));
    if part == "scale_shift_table" {
        return format!("blocks.{n}.modulation");
    }
    for (d, o) in [("attn1.", "self_attn."), ("attn2.", "cross_attn.")] {
        if let Some(r) = part.strip_prefix(d) {
            for (a, b) in [
                ("to_q.", "q."),
                ("to_k.", "k."),
                ("to_v.", "v."),
                ("to_out.0.", "o."),
                ("add_k_proj.", "k_img."),
                ("add_v_proj.", "v_img."),
                ("norm_added_k.", "norm_k_img."),
            ] {
                if let Some(t) = r.strip_prefix(a) {
                    return format!("blocks.{n}.{o}{b}{t}");
                }
            }
            return format!("blocks.{n}.{o}{r}");
        }
    }
    for (d, o) in [
        ("ffn.net.0.proj.", "ffn.0."),
        ("ffn.net.2.", "ffn.2."),
        ("norm2.", "norm3."),
        ("norm3.", "norm2."),
    ] {
        if let Some(r) = part.strip_prefix(d) {
            return format!("blocks.{n}.{o}{r}");
        }
    }
    format!("blocks.{n}.{part}")
}

/// `convert_wan_vae_to_diffusers` for one key, with the decoder's flat `upsamples` list grouped
/// into `up_blocks` of `num_res_blocks + 1` resnets followed by one upsampler (the reference
/// writes the Wan2.1 VAE's grouping, `num_res_blocks = 2`, out by hand).
pub fn vae_name(key: &str, num_res_blocks: usize) -> String {
    const FIXED: [(&str, &str); 16] = [
        ("encoder.conv1.weight", "encoder.conv_in.weight"),
        ("encoder.conv1.bias", "encoder.conv_in.bias"),
        ("decoder.conv1.weight", "decoder.conv_in.weight"),
        ("decoder.conv1.bias", "decoder.conv_in.bias"),
        ("encoder.head.0.gamma", "encoder.norm_out.gamma"),
        ("encoder.head.2.bias", "encoder.conv_out.bias"),
        ("encoder.head.2.weight", "encoder.conv_out.weight"),
        ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
        ("decoder.head.2.bias", "decoder.conv_out.bias"),
        ("decoder.head.2.weight", "decoder.conv_out.weight"),
        ("conv1.weight", "quant_conv.weight"),
        ("conv1.bias", "quant_conv.bias"),
        ("conv2.weight", "post_quant_conv.weight"),
        ("conv2.bias", "post_quant_conv.bias"),
        ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
        ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
    ];
    for (from, to) in FIXED {
        if from.ends_with('.') {
            if let Some(rest) = key.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        } else if key == from {
            return to.to_string();
        }
    }
    // Residual block parts: `residual.{0,2,3,6}` → norm1, conv1, norm2, conv2.
    let resnet_part = |rest: &str| -> Option<String> {
        for (from, to) in [
            ("residual.0.", "norm1."),
            ("residual.2.", "conv1."),
            ("residual.3.", "norm2."),
            ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."),
        ] {
            if let Some(r) = rest.strip_prefix(from) {
                return Some(format!("{to}{r}"));
            }
        }
        None
    };
    for side in ["encoder", "decoder"] {
        for (i, j) in [(0, 0), (2, 1)] {
            let prefix = format!("{side}.middle.{i}.");
            if let Some(rest) = key.strip_prefix(&prefix) {
                if let Some(r) = resnet_part(rest) {
                    return format!("{side}.mid_block.resnets.{j}.{r}");
                }
            }
        }
    }
    if let Some(rest) = key.strip_prefix("encoder.downsamples.") {
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let tail = resnet_part(tail).unwrap_or_else(|| tail.to_string());
        return format!("encoder.down_blocks.{idx}.{tail}");
    }
    if let Some(rest) = key.strip_prefix("decoder.upsamples.") {
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        if let Ok(i) = idx.parse::<usize>() {
            let per = num_res_blocks + 2; // resnets + the upsampler
            let (block, slot) = (i / per, i % per);
            if slot < per - 1 {
                if let Some(r) = resnet_part(tail) {
                    return format!("decoder.up_blocks.{block}.resnets.{slot}.{r}");
                }
            } else if tail.starts_with("resample.") || tail.starts_with("time_conv.") {
                return format!("decoder.up_blocks.{block}.upsamplers.0.{tail}");
            }
        }
        return format!("decoder.up_blocks.{rest}");
    }
    key.to_string()
}

/// Which component a file is, and how it names its tensors, from its tensor names (the marker
/// keys of `infer_diffusers_model_type`).
pub fn classify(names: &[String]) -> Option<(Part, Naming)> {
    let has = |k: &str| names.iter().any(|n| n == k);
    if has("head.modulation") || has("model.diffusion_model.head.modulation") {
        return Some((Part::Transformer, Naming::WanOriginal));
    }
    if has("decoder.middle.0.residual.0.gamma") {
        return Some((Part::Vae, Naming::WanVaeOriginal));
    }
    if has("encoder.final_layer_norm.weight")
        && names
            .iter()
            .any(|n| n.starts_with("encoder.block.0.layer.0.SelfAttention."))
    {
        return Some((Part::TextEncoder, Naming::Umt5));
    }
    if has("enc.output_norm.weight") || has("enc.blk.0.attn_q.weight") {
        return Some((Part::TextEncoder, Naming::Umt5Gguf));
    }
    if has("condition_embedder.time_embedder.linear_1.weight") && has("scale_shift_table") {
        return Some((Part::Transformer, Naming::Diffusers));
    }
    if has("decoder.mid_block.resnets.0.norm1.gamma") {
        return Some((Part::Vae, Naming::Diffusers));
    }
    None
}

/// Tensor names and dtypes in a safetensors (or GGUF) file's header (the file is not mapped).
pub fn header(path: &Path) -> Result<BTreeMap<String, String>> {
    if crate::gguf::is_gguf(path) {
        let g = crate::gguf::GgufFile::open(path)?;
        return Ok(g
            .names()
            .into_iter()
            .map(|n| {
                let dt = format!("{:?}", g.dtype(&n));
                (n, dt)
            })
            .collect());
    }
    let (v, _, _) = crate::loading::safetensors_header(path)?;
    let mut out = BTreeMap::new();
    if let Some(obj) = v.as_object() {
        for (k, t) in obj {
            if k != "__metadata__" {
                let dt = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
                out.insert(k.clone(), dt.to_string());
            }
        }
    }
    Ok(out)
}

/// Whether `--model` names single files (and so goes through [`layout`]): a `.safetensors` file,
/// several comma-separated pieces, or a ComfyUI `models/` folder.
pub fn is_single_file_spec(spec: &str) -> bool {
    let p = Path::new(spec);
    if p.is_dir() {
        return is_comfy_models_dir(p);
    }
    spec.contains(',') || is_weight_file(p)
}

/// A single weight file Kino reads: safetensors or GGUF.
fn is_weight_file(p: &Path) -> bool {
    has_ext(p, "safetensors") || has_ext(p, "gguf")
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// ComfyUI's folders for each part, in the order it looks.
const COMFY_FOLDERS: [(&str, Part); 5] = [
    ("diffusion_models", Part::Transformer),
    ("unet", Part::Transformer),
    ("text_encoders", Part::TextEncoder),
    ("clip", Part::TextEncoder),
    ("vae", Part::Vae),
];

fn is_comfy_models_dir(p: &Path) -> bool {
    !p.join("model_index.json").exists()
        && (p.join("diffusion_models").is_dir() || p.join("unet").is_dir())
}

/// Which expert of a two-expert model (Wan2.2 A14B) a diffusion-model file is, from its name
/// as ComfyUI's files say it (`wan2.2_t2v_high_noise_14B_fp16.safetensors`, `…low_noise…`):
/// the high-noise expert is diffusers' `transformer`, the low-noise one `transformer_2`.
fn expert_folder(file: &Path) -> Option<&'static str> {
    let name = file
        .file_name()?
        .to_str()?
        .to_ascii_lowercase()
        .replace(['-', '.'], "_");
    let high = name.contains("high_noise") || name.contains("highnoise");
    let low = name.contains("low_noise") || name.contains("lownoise");
    match (high, low) {
        (true, false) => Some("transformer"),
        (false, true) => Some("transformer_2"),
        _ => None,
    }
}

/// A model folder for `--model` given as single files: comma-separated pieces, each a
/// `.safetensors` file (a Wan diffusion model, a UMT5 text encoder, a Wan VAE, in any order), a
/// ComfyUI `models/` folder (one file in each of its `diffusion_models/` or `unet/`,
/// `text_encoders/` or `clip/`, and `vae/`), and one diffusers folder or model alias that gives
/// the configs, the tokenizer, the scheduler and any part not given as a file. `resolve` turns an
/// alias into its folder. The folder made lives under `cache/single-file/` and points at the
/// files (nothing is copied or converted).
pub fn layout(
    spec: &str,
    cache: &Path,
    resolve: &dyn Fn(&str) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut source: Option<PathBuf> = None;
    let example = "e.g. --model wan2.1_t2v_1.3B_fp16.safetensors,umt5_xxl_fp8_e4m3fn_scaled.safetensors,wan_2.1_vae.safetensors,wan2.1-t2v-1.3b";
    for piece in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = Path::new(piece);
        if p.is_file() {
            if !is_weight_file(p) {
                return Err(Error::InvalidRequest(format!(
                    "--model piece `{piece}`: Kino reads single files in safetensors (.safetensors) or GGUF (.gguf) format"
                )));
            }
            files.push(p.to_path_buf());
            continue;
        }
        if p.is_dir() && is_comfy_models_dir(p) {
            files.extend(comfy_files(p)?);
            continue;
        }
        let dir = resolve(piece)?;
        if let Some(prev) = &source {
            return Err(Error::InvalidRequest(format!(
                "--model names two model folders ({} and {}); give one, for the configs, tokenizer and scheduler",
                prev.display(),
                dir.display()
            )));
        }
        source = Some(dir);
    }
    let Some(source) = source else {
        return Err(Error::InvalidRequest(format!(
            "single files carry weights but no configs: add a diffusers folder or a model alias \
             of the same model for the configs, tokenizer and scheduler ({example})"
        )));
    };
    if files.is_empty() {
        return Ok(source);
    }
    let index: serde_json::Value = crate::loading::read_json(&source.join("model_index.json"))?;
    let two_experts = index
        .get("transformer_2")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|x| !x.is_null()));
    // Classify every file; the key is the component folder it stands for.
    let mut parts: BTreeMap<&'static str, (Part, PathBuf, Naming)> = BTreeMap::new();
    for f in &files {
        let names: Vec<String> = header(f)?.into_keys().collect();
        let Some((part, naming)) = classify(&names) else {
            let first: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
            return Err(Error::InvalidRequest(format!(
                "{}: not a Wan diffusion model, a UMT5 text encoder or a Wan VAE (its first tensors: {}); \
                 Kino takes those three as single files",
                f.display(),
                first.join(", ")
            )));
        };
        let folder = match part {
            Part::Transformer if two_experts => expert_folder(f).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "{} has two experts (a high-noise and a low-noise diffusion model), and the \
                     name of {} does not say which one it is; name the files as ComfyUI's Wan2.2 \
                     files are (…_high_noise_… and …_low_noise_…)",
                    source.display(),
                    f.display()
                ))
            })?,
            _ => part.folder(),
        };
        if let Some((_, other, _)) = parts.get(folder) {
            let which = if two_experts && part == Part::Transformer {
                format!(
                    "the {} expert",
                    if folder == "transformer" {
                        "high-noise"
                    } else {
                        "low-noise"
                    }
                )
            } else {
                part.what().to_string()
            };
            return Err(Error::InvalidRequest(format!(
                "two files for {which} ({} and {}); give one",
                other.display(),
                f.display()
            )));
        }
        let abs = std::fs::canonicalize(f).map_err(|e| Error::BadFile {
            path: f.clone(),
            message: e.to_string(),
        })?;
        parts.insert(folder, (part, abs, naming));
    }
    let source = std::fs::canonicalize(&source).unwrap_or(source);
    // The folder: one per (source, files with their sizes and times).
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        source.hash(&mut h);
        for (folder, (_, f, _)) in &parts {
            folder.hash(&mut h);
            f.hash(&mut h);
            if let Ok(m) = std::fs::metadata(f) {
                m.len().hash(&mut h);
                m.modified().ok().hash(&mut h);
            }
        }
        h.finish()
    };
    let stem = parts
        .get("transformer")
        .or_else(|| parts.get("transformer_2"))
        .and_then(|(_, f, _)| f.file_stem())
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>();
    let out = cache.join("single-file").join(format!("{stem}-{key:016x}"));
    let io = |path: &Path, e: std::io::Error| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("cannot lay out the single-file model: {e}"),
    };
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    for entry in std::fs::read_dir(&source).map_err(|e| io(&source, e))? {
        let entry = entry.map_err(|e| io(&source, e))?;
        let name = entry.file_name();
        let from = entry.path();
        let to = tmp.join(&name);
        let part = parts.get(name.to_str().unwrap_or_default());
        if let Some((part, file, naming)) = part {
            let part = *part;
            std::fs::create_dir_all(&to).map_err(|e| io(&to, e))?;
            let cfg = from.join("config.json");
            std::fs::copy(&cfg, to.join("config.json")).map_err(|e| io(&cfg, e))?;
            let num_res_blocks = if part == Part::Vae {
                let v: serde_json::Value = crate::loading::read_json(&cfg)?;
                v.get("num_res_blocks")
                    .and_then(|n| n.as_u64())
                    .map(|n| n as usize)
            } else {
                None
            };
            let note = Note {
                file: file.clone(),
                part,
                naming: *naming,
                num_res_blocks,
            };
            let text = serde_json::to_string_pretty(&note).expect("a note serialises");
            std::fs::write(to.join(NOTE), text).map_err(|e| io(&to, e))?;
        } else if from.is_dir() {
            link_dir(&from, &to).map_err(|e| io(&to, e))?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| io(&from, e))?;
        }
    }
    for (folder, (part, file, _)) in &parts {
        if !tmp.join(folder).join(NOTE).exists() {
            return Err(Error::InvalidRequest(format!(
                "{} is {}, but {} has no {}/ folder to take its config from; name a folder of the same kind of model",
                file.display(),
                part.what(),
                source.display(),
                folder
            )));
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| io(&out, e))?;
    }
    std::fs::rename(&tmp, &out).map_err(|e| io(&out, e))?;
    Ok(out)
}

/// The one `.safetensors` file in each of a ComfyUI `models/` folder's part folders.
fn comfy_files(models: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen: Vec<Part> = Vec::new();
    for (folder, part) in COMFY_FOLDERS {
        if seen.contains(&part) {
            continue;
        }
        let dir = models.join(folder);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_weight_file(p))
            .collect();
        found.sort();
        let two_experts = |f: &[PathBuf]| {
            f.len() == 2
                && part == Part::Transformer
                && matches!(
                    (expert_folder(&f[0]), expert_folder(&f[1])),
                    (Some(a), Some(b)) if a != b
                )
        };
        match found.len() {
            0 => continue,
            1 => {
                seen.push(part);
                out.push(found.remove(0));
            }
            // Wan2.2 A14B's high- and low-noise experts.
            2 if two_experts(&found) => {
                seen.push(part);
                out.append(&mut found);
            }
            _ => {
                let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
                return Err(Error::InvalidRequest(format!(
                    "{} holds {} files for {}: {}; name the one to use, comma-separated with the others",
                    dir.display(),
                    found.len(),
                    part.what(),
                    names.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(unix)]
fn link_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(from, to)
}

#[cfg(not(unix))]
fn link_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.path().is_dir() {
            link_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformer_names_follow_the_reference_table() {
        for (orig, want) in [
            (
                "model.diffusion_model.blocks.3.self_attn.q.weight",
                "blocks.3.attn1.to_q.weight",
            ),
            ("blocks.0.cross_attn.o.bias", "blocks.0.attn2.to_out.0.bias"),
            (
                "blocks.0.self_attn.norm_k.weight",
                "blocks.0.attn1.norm_k.weight",
            ),
            ("blocks.1.norm3.weight", "blocks.1.norm2.weight"),
            ("blocks.1.norm2.weight", "blocks.1.norm3.weight"),
            ("blocks.2.modulation", "blocks.2.scale_shift_table"),
            ("blocks.2.ffn.0.weight", "blocks.2.ffn.net.0.proj.weight"),
            ("blocks.2.ffn.2.bias", "blocks.2.ffn.net.2.bias"),
            ("head.modulation", "scale_shift_table"),
            ("head.head.weight", "proj_out.weight"),
            (
                "time_embedding.0.weight",
                "condition_embedder.time_embedder.linear_1.weight",
            ),
            (
                "time_projection.1.bias",
                "condition_embedder.time_proj.bias",
            ),
            (
                "text_embedding.2.weight",
                "condition_embedder.text_embedder.linear_2.weight",
            ),
            (
                "blocks.0.cross_attn.k_img.weight",
                "blocks.0.attn2.add_k_proj.weight",
            ),
            (
                "blocks.0.cross_attn.norm_k_img.weight",
                "blocks.0.attn2.norm_added_k.weight",
            ),
            (
                "img_emb.proj.1.weight",
                "condition_embedder.image_embedder.ff.net.0.proj.weight",
            ),
            (
                "vace_blocks.0.before_proj.weight",
                "vace_blocks.0.proj_in.weight",
            ),
            (
                "vace_blocks.0.after_proj.bias",
                "vace_blocks.0.proj_out.bias",
            ),
            ("patch_embedding.weight", "patch_embedding.weight"),
        ] {
            assert_eq!(transformer_name(orig), want, "{orig}");
        }
    }

    #[test]
    fn vae_names_match_the_reference_for_the_wan21_vae() {
        // The reference's hard-coded grouping is num_res_blocks = 2.
        for (orig, want) in [
            (
                "decoder.upsamples.0.residual.0.gamma",
                "decoder.up_blocks.0.resnets.0.norm1.gamma",
            ),
            (
                "decoder.upsamples.2.residual.6.weight",
                "decoder.up_blocks.0.resnets.2.conv2.weight",
            ),
            (
                "decoder.upsamples.3.resample.1.weight",
                "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
            ),
            (
                "decoder.upsamples.3.time_conv.bias",
                "decoder.up_blocks.0.upsamplers.0.time_conv.bias",
            ),
            (
                "decoder.upsamples.4.shortcut.weight",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "decoder.upsamples.14.residual.3.gamma",
                "decoder.up_blocks.3.resnets.2.norm2.gamma",
            ),
            (
                "encoder.downsamples.2.resample.1.bias",
                "encoder.down_blocks.2.resample.1.bias",
            ),
            (
                "encoder.downsamples.4.shortcut.bias",
                "encoder.down_blocks.4.conv_shortcut.bias",
            ),
            (
                "encoder.middle.2.residual.2.weight",
                "encoder.mid_block.resnets.1.conv1.weight",
            ),
            (
                "decoder.middle.1.to_qkv.weight",
                "decoder.mid_block.attentions.0.to_qkv.weight",
            ),
            ("encoder.head.2.weight", "encoder.conv_out.weight"),
            ("conv2.bias", "post_quant_conv.bias"),
            ("decoder.conv1.weight", "decoder.conv_in.weight"),
        ] {
            assert_eq!(vae_name(orig, 2), want, "{orig}");
        }
        // One resnet fewer per block: 2 resnets + 1 upsampler.
        assert_eq!(
            vae_name("decoder.upsamples.2.resample.1.weight", 1),
            "decoder.up_blocks.0.upsamplers.0.resample.1.weight"
        );
        assert_eq!(
            vae_name("decoder.upsamples.4.residual.0.gamma", 1),
            "decoder.up_blocks.1.resnets.1.norm1.gamma"
        );
    }

    #[test]
    fn inverse_names_round_trip() {
        for d in [
            "blocks.7.attn1.to_q.weight",
            "blocks.7.attn2.to_out.0.bias",
            "blocks.7.attn2.add_k_proj.weight",
            "blocks.7.attn2.norm_added_k.weight",
            "blocks.7.attn1.norm_k.weight",
            "blocks.7.norm2.weight",
            "blocks.7.ffn.net.0.proj.weight",
            "blocks.7.ffn.net.2.bias",
            "blocks.7.scale_shift_table",
            "scale_shift_table",
            "proj_out.weight",
            "patch_embedding.weight",
            "condition_embedder.time_proj.bias",
            "condition_embedder.text_embedder.linear_2.weight",
            "condition_embedder.image_embedder.ff.net.2.weight",
        ] {
            assert_eq!(transformer_name(&transformer_original(d)), d, "{d}");
        }
        for d in [
            "shared.weight",
            "encoder.final_layer_norm.weight",
            "encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.3.layer.0.SelfAttention.o.weight",
            "encoder.block.3.layer.0.layer_norm.weight",
            "encoder.block.3.layer.1.DenseReluDense.wi_0.weight",
            "encoder.block.3.layer.1.DenseReluDense.wi_1.weight",
            "encoder.block.3.layer.1.DenseReluDense.wo.weight",
            "encoder.block.3.layer.1.layer_norm.weight",
        ] {
            let g = umt5_gguf_original(d);
            assert!(
                g.starts_with("enc.") || g == "token_embd.weight",
                "{d} -> {g}"
            );
            assert_eq!(umt5_gguf_name(&g), d, "{d}");
        }
    }

    #[test]
    fn classification_by_marker_keys() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            classify(&names(&["model.diffusion_model.head.modulation"])),
            Some((Part::Transformer, Naming::WanOriginal))
        );
        assert_eq!(
            classify(&names(&["decoder.middle.0.residual.0.gamma"])),
            Some((Part::Vae, Naming::WanVaeOriginal))
        );
        assert_eq!(
            classify(&names(&[
                "encoder.final_layer_norm.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight"
            ])),
            Some((Part::TextEncoder, Naming::Umt5))
        );
        assert_eq!(classify(&names(&["lora_unet_x.lora_down.weight"])), None);
    }
}
