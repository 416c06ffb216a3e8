//! Loading diffusers model folders: `model_index.json`, per-component `config.json`, and single or
//! sharded `*.safetensors` weights (f32, bf16 or f16 on disk, converted to the dtype asked for).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::error::{Error, LoadError, Result};

/// Weight file names diffusers and transformers write, in the order we look for them.
const SINGLE_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];
const INDEX_NAMES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
];

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                hint: "a diffusers component folder has a config.json next to its weights".into(),
            }
        } else {
            Error::BadFile {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("invalid JSON for this component: {e}"),
    })
}

/// Reads `DIR/config.json` into `T`, checking `_class_name` against the supported classes.
pub fn read_config<T: DeserializeOwned>(dir: &Path, supported: &[&str]) -> Result<T> {
    check_dir(dir)?;
    let path = dir.join("config.json");
    let raw: serde_json::Value = read_json(&path)?;
    if let Some(class) = raw.get("_class_name").and_then(|v| v.as_str()) {
        if !supported.is_empty() && !supported.contains(&class) {
            return Err(Error::UnsupportedClass {
                path,
                found: class.to_string(),
                supported: supported.join(", "),
            });
        }
    }
    serde_json::from_value(raw).map_err(|e| Error::BadFile {
        path,
        message: format!("config does not fit this component: {e}"),
    })
}

fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            hint: "expected a folder in diffusers layout (config.json + *.safetensors)".into(),
        });
    }
    Ok(())
}

/// The safetensors files of a component folder: the shards named by an `*.index.json`, or one
/// single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    check_dir(dir)?;
    if let Some(note) = crate::single_file::Note::read(dir)? {
        return Ok(vec![note.file]);
    }
    for index in INDEX_NAMES {
        let path = dir.join(index);
        if path.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = read_json(&path)?;
            let files: BTreeSet<&String> = idx.weight_map.values().collect();
            let mut out = Vec::new();
            for f in files {
                let p = dir.join(f);
                if !p.exists() {
                    return Err(Error::MissingFile {
                        path: p,
                        hint: format!("{} lists this shard; download it again", path.display()),
                    });
                }
                out.push(p);
            }
            if out.is_empty() {
                return Err(Error::BadFile {
                    path,
                    message: "the index names no weight files".into(),
                });
            }
            return Ok(out);
        }
    }
    for name in SINGLE_NAMES {
        let p = dir.join(name);
        if p.exists() {
            return Ok(vec![p]);
        }
    }
    let mut any: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::BadFile {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    any.sort();
    if any.is_empty() {
        return Err(Error::MissingFile {
            path: dir.join(SINGLE_NAMES[0]),
            hint: format!(
                "no *.safetensors weights in {}; expected {} or {} (or shards with an index.json)",
                dir.display(),
                SINGLE_NAMES[0],
                SINGLE_NAMES[1]
            ),
        });
    }
    Ok(any)
}

/// Where a component's tensors live: memory-mapped safetensors, or a GGUF file.
#[derive(Clone)]
enum Store {
    Safetensors(Arc<candle_core::safetensors::MmapedSafetensors>),
    Gguf(Arc<crate::gguf::GgufFile>),
}

impl Store {
    fn names(&self) -> Vec<String> {
        match self {
            Store::Safetensors(s) => s.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Gguf(g) => g.names(),
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Store::Safetensors(s) => s.get(name).is_ok(),
            Store::Gguf(g) => g.contains(name),
        }
    }

    /// A dense tensor in its stored float type (GGUF: dequantized to f32).
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            Store::Safetensors(s) => s.load(name, dev),
            Store::Gguf(g) => g.tensor(name)?.to_device(dev),
        }
    }
}

/// Memory-mapped weights of one component folder, with errors that name the tensor and shapes.
#[derive(Clone)]
pub struct Weights {
    inner: Store,
    location: PathBuf,
    last_error: Arc<Mutex<Option<LoadError>>>,
    /// LoRA adapters applied to these weights (see `crate::lora`): folded into the weights and
    /// biases they adapt, and (on the fly) served as `LAYER.lora_down` / `LAYER.lora_up`.
    lora: Option<Arc<crate::lora::LoraSet>>,
    /// A single file with other names (`crate::single_file`): diffusers names → the file's, and
    /// the scales of fp8 "scaled" weights.
    renamed: Option<Arc<crate::single_file::NameMap>>,
}

/// The virtual tensor names a layer's on-the-fly LoRA pair is served under.
pub(crate) const LORA_DOWN: &str = "lora_down";
pub(crate) const LORA_UP: &str = "lora_up";

impl Weights {
    /// Maps every safetensors file of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let note = crate::single_file::Note::read(dir)?;
        let files = weight_files(dir)?;
        if let Some(note) = note.as_ref().filter(|n| crate::gguf::is_gguf(&n.file)) {
            let inner = Store::Gguf(crate::gguf::GgufFile::open(&note.file)?);
            let map = crate::single_file::name_map(note, &inner.names())?;
            return Ok(Self {
                inner,
                location: note.file.clone(),
                last_error: Arc::new(Mutex::new(None)),
                lora: None,
                renamed: Some(Arc::new(map)),
            });
        }
        for f in &files {
            check_safetensors(f)?;
        }
        // SAFETY: the files are mapped read-only; like every mmap user we assume nobody
        // truncates them while the model runs.
        let inner =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                Error::BadFile {
                    path: files[0].clone(),
                    message: format!("not a valid safetensors file: {e}"),
                }
            })?;
        let inner = Store::Safetensors(Arc::new(inner));
        let renamed = match &note {
            Some(note) => Some(Arc::new(crate::single_file::name_map(
                note,
                &inner.names(),
            )?)),
            None => None,
        };
        Ok(Self {
            inner,
            location: note.map(|n| n.file).unwrap_or_else(|| dir.to_path_buf()),
            last_error: Arc::new(Mutex::new(None)),
            lora: None,
            renamed,
        })
    }

    /// The name a tensor has in the files (the same but for single files with other names).
    fn file_name<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match &self.renamed {
            Some(map) => map.names.get(name).map(String::as_str),
            None => Some(name),
        }
    }

    /// These weights with LoRA adapters applied.
    pub fn with_lora(mut self, lora: Option<Arc<crate::lora::LoraSet>>) -> Self {
        self.lora = lora;
        self
    }

    /// A `VarBuilder` over these weights that converts to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// The shape of tensor `name` (diffusers name) as stored, without reading its data; `None`
    /// when there is no such tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let f = self.file_name(name)?;
        match &self.inner {
            Store::Safetensors(s) => s.get(f).ok().map(|v| v.shape().to_vec()),
            Store::Gguf(g) => g.shape(f),
        }
    }

    /// Names of all tensors (for diagnostics and tests).
    pub fn names(&self) -> Vec<String> {
        match &self.renamed {
            Some(map) => map.names.keys().cloned().collect(),
            None => self.inner.names(),
        }
    }

    /// The blocks of a quantized matrix `name` (diffusers name), kept quantized, when these
    /// weights come from a GGUF file that stores it so, on `device`; `None` for a plain tensor
    /// (and whenever LoRA adapters are applied: they need the dense weight).
    pub fn quantized(
        &self,
        name: &str,
        device: &Device,
    ) -> candle_core::Result<Option<candle_core::quantized::QTensor>> {
        self.blocks(name, device, false)
    }

    /// [`Weights::quantized`], and with `half_too` also a GGUF file's F16 / BF16 matrices (a
    /// linear layer keeps those in their 16 bits as well and expands them strip by strip).
    pub fn blocks(
        &self,
        name: &str,
        device: &Device,
        half_too: bool,
    ) -> candle_core::Result<Option<candle_core::quantized::QTensor>> {
        let Store::Gguf(g) = &self.inner else {
            return Ok(None);
        };
        if self.lora.is_some() {
            return Ok(None);
        }
        let Some(file_name) = self.file_name(name) else {
            return Ok(None);
        };
        match g.dtype(file_name) {
            Some(dt)
                if (crate::gguf::is_quantized(dt)
                    || (half_too
                        && matches!(
                            dt,
                            candle_core::quantized::GgmlDType::F16
                                | candle_core::quantized::GgmlDType::BF16
                        )))
                    && g.shape(file_name).is_some_and(|s| s.len() == 2) =>
            {
                Ok(Some(g.qtensor(file_name, device)?))
            }
            _ => Ok(None),
        }
    }

    /// Converts an error raised while building a model from these weights into our typed error.
    pub fn map_err(&self, e: candle_core::Error) -> Error {
        if let Some(le) = self.last_error.lock().ok().and_then(|mut g| g.take()) {
            return le.into();
        }
        Error::Candle(e)
    }

    fn record(&self, e: LoadError) -> candle_core::Error {
        let msg = e.to_string();
        if let Ok(mut g) = self.last_error.lock() {
            if g.is_none() {
                *g = Some(e);
            }
        }
        candle_core::Error::Msg(msg)
    }
}

/// The JSON header of a safetensors file, the header's size and the file's length (only the
/// header is read).
pub fn safetensors_header(path: &Path) -> Result<(serde_json::Value, u64, u64)> {
    use std::io::Read;
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("file is too short to be safetensors; download it again".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > len {
        return Err(bad(
            "corrupt safetensors header (truncated or not a safetensors file); download it again"
                .into(),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let v = serde_json::from_slice(&header).map_err(|e| {
        bad(format!(
            "corrupt safetensors header ({e}); download it again"
        ))
    })?;
    Ok((v, n, len))
}

/// Reads a safetensors header and checks it is sound and that the data section fits the file,
/// so a truncated download is reported as such and not as a crash later.
fn check_safetensors(path: &Path) -> Result<()> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let (v, n, len) = safetensors_header(path)?;
    let mut max_end = 0u64;
    if let Some(obj) = v.as_object() {
        for (k, t) in obj {
            if k == "__metadata__" {
                continue;
            }
            if let Some(end) = t
                .get("data_offsets")
                .and_then(|o| o.get(1))
                .and_then(|e| e.as_u64())
            {
                max_end = max_end.max(end);
            }
        }
    }
    if 8 + n + max_end > len {
        return Err(bad(format!(
            "file is truncated: its header needs {} bytes but the file has {len}; download it again",
            8 + n + max_end
        )));
    }
    Ok(())
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(self.record(LoadError::Shape {
                name: name.to_string(),
                location: self.location.clone(),
                expected: s.dims().to_vec(),
                found: t.dims().to_vec(),
            }));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(lora) = &self.lora {
            if let Some((layer, which)) = name.rsplit_once('.') {
                if which == LORA_DOWN || which == LORA_UP {
                    let (down, up) = lora.low_rank(layer)?.ok_or_else(|| {
                        candle_core::Error::Msg(format!("no LoRA on the fly for `{layer}`"))
                    })?;
                    let t = if which == LORA_DOWN { down } else { up };
                    return t.to_device(dev)?.to_dtype(dtype);
                }
            }
        }
        let Some(file_name) = self.file_name(name).filter(|n| self.inner.contains(n)) else {
            return Err(self.record(LoadError::Missing {
                name: name.to_string(),
                location: self.location.clone(),
            }));
        };
        let mut t = self.inner.load(file_name, dev)?;
        // ComfyUI's fp8 "scaled" weights: the stored value times its per-tensor scale.
        if let Some(scale) = self.renamed.as_ref().and_then(|m| m.scales.get(name)) {
            let s = self.inner.load(scale, dev)?.to_dtype(DType::F32)?;
            let s = if s.elem_count() == 1 {
                s.flatten_all()?.reshape(())?
            } else {
                s
            };
            t = t.to_dtype(DType::F32)?.broadcast_mul(&s)?;
        }
        match &self.lora {
            Some(lora) => lora.adjust(name, t)?.to_dtype(dtype),
            None => t.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let (Some(lora), Some((layer, which))) = (&self.lora, name.rsplit_once('.')) {
            if which == LORA_DOWN || which == LORA_UP {
                return lora.on_the_fly(layer);
            }
        }
        self.file_name(name).is_some_and(|n| self.inner.contains(n))
    }
}

thread_local! {
    /// The weights a model is being built from on this thread, for [`quantized_weight`].
    static BUILDING_FROM: std::cell::RefCell<Option<Weights>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a model's constructor) with `w` as the source of [`quantized_weight`], so linear
/// layers can keep a GGUF file's quantized matrices instead of dense copies.
pub fn building_from<R>(w: &Weights, f: impl FnOnce() -> R) -> R {
    let prev = BUILDING_FROM.with(|b| b.replace(Some(w.clone())));
    let r = f();
    BUILDING_FROM.with(|b| *b.borrow_mut() = prev);
    r
}

/// The quantized blocks of the matrix `name` of the model being built (see [`building_from`]),
/// when its weights keep it quantized.
pub fn quantized_weight(
    name: &str,
    device: &Device,
) -> candle_core::Result<Option<candle_core::quantized::QTensor>> {
    BUILDING_FROM.with(|b| match b.borrow().as_ref() {
        Some(w) => w.quantized(name, device),
        None => Ok(None),
    })
}

/// [`quantized_weight`] for the `[out_dim, in_dim]` matrix `PREFIX.weight` of a linear layer,
/// its shape checked against the config.
pub fn quantized_matrix(
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    device: &Device,
) -> candle_core::Result<Option<candle_core::quantized::QTensor>> {
    let name = format!("{prefix}.weight");
    let q = BUILDING_FROM.with(|b| match b.borrow().as_ref() {
        Some(w) => w.blocks(&name, device, true),
        None => Ok(None),
    })?;
    let Some(q) = q else {
        return Ok(None);
    };
    if q.shape().dims() != [out_dim, in_dim] {
        candle_core::bail!(
            "tensor `{name}` has shape {:?}, but the config asks for {:?}",
            q.shape().dims(),
            [out_dim, in_dim]
        );
    }
    Ok(Some(q))
}

/// `model_index.json` of a whole pipeline folder.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    /// Component name → (library, class), e.g. `transformer` → (`diffusers`, `WanTransformer3DModel`).
    pub components: BTreeMap<String, Option<(String, String)>>,
    /// Other keys (e.g. `expand_timesteps`, `boundary_ratio`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Pipeline classes we can run.
pub const SUPPORTED_PIPELINES: [&str; 7] = [
    "WanPipeline",
    "WanImageToVideoPipeline",
    "WanVideoToVideoPipeline",
    VACE_PIPELINE,
    "SkyReelsV2DiffusionForcingPipeline",
    "SkyReelsV2DiffusionForcingImageToVideoPipeline",
    "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
];

/// Wan2.1 VACE (`WanVACEPipeline`): masked editing and reference images through the VACE
/// transformer's control branch.
pub const VACE_PIPELINE: &str = "WanVACEPipeline";

/// The SkyReels-V2 diffusion-forcing pipelines: one checkpoint serves all three (text, image
/// and video conditioned), so a folder saved by any of them opens as a diffusion-forcing model.
pub const DIFFUSION_FORCING_PIPELINES: [&str; 3] = [
    "SkyReelsV2DiffusionForcingPipeline",
    "SkyReelsV2DiffusionForcingImageToVideoPipeline",
    "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
];

impl ModelIndex {
    /// Reads `DIR/model_index.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        check_dir(dir)?;
        let path = dir.join("model_index.json");
        if !path.exists() {
            return Err(Error::MissingFile {
                path,
                hint: format!(
                    "{} is not a model folder: a diffusers model has model_index.json and the folders transformer/, vae/, text_encoder/, tokenizer/, scheduler/",
                    dir.display()
                ),
            });
        }
        let raw: serde_json::Map<String, serde_json::Value> = read_json(&path)?;
        let class_name = raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if !SUPPORTED_PIPELINES.contains(&class_name.as_str()) {
            return Err(Error::UnsupportedClass {
                path,
                found: class_name,
                supported: SUPPORTED_PIPELINES.join(", "),
            });
        }
        let mut components = BTreeMap::new();
        let mut extra = serde_json::Map::new();
        for (k, v) in raw {
            if k.starts_with('_') {
                continue;
            }
            match v.as_array().map(|a| a.as_slice()) {
                Some([lib, class]) => {
                    let pair = match (lib.as_str(), class.as_str()) {
                        (Some(l), Some(c)) => Some((l.to_string(), c.to_string())),
                        _ => None,
                    };
                    components.insert(k, pair);
                }
                _ => {
                    extra.insert(k, v);
                }
            }
        }
        Ok(Self {
            class_name,
            components,
            extra,
        })
    }

    /// Whether the pipeline uses per-token timesteps (Wan2.2 TI2V's `expand_timesteps`).
    pub fn expand_timesteps(&self) -> bool {
        self.extra
            .get("expand_timesteps")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }
}

/// A weight source that makes random values of whatever shape a model asks for: for benchmarks at
/// full size without any download. Matrices get uniform values with variance 1/fan_in, biases small
/// values, norm gains values near 1. Cheap to generate (xorshift), deterministic for a seed.
pub struct RandomWeights {
    pub seed: u64,
}

impl RandomWeights {
    /// A `VarBuilder` making random weights in `dtype` on `device`.
    pub fn var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Self::backend(seed), dtype, device.clone())
    }

    /// The backend itself (for wrapping, e.g. `crate::testing::save_random_weights`).
    pub fn backend(seed: u64) -> Box<dyn SimpleBackend> {
        Box::new(RandomWeights { seed })
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let dims = s.dims();
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut x = h | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // uniform in [-1, 1)
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        };
        let data: Vec<f32> = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let a = (3.0 / fan_in.max(1) as f32).sqrt();
            (0..n).map(|_| next() * a).collect()
        } else if name.ends_with("bias") || name.contains("scale_shift_table") {
            (0..n).map(|_| next() * 0.05).collect()
        } else {
            (0..n).map(|_| 1.0 + next() * 0.1).collect()
        };
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    /// Every weight a model asks for, but no LoRA factors (random weights carry no adapter).
    fn contains_tensor(&self, name: &str) -> bool {
        !(name.ends_with(LORA_DOWN) || name.ends_with(LORA_UP))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::wan::transformer::WanTransformer3DModel;

    fn fixture(case: &str) -> PathBuf {
        crate::testing::fixtures_dir().join(case)
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kino-loading-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs the wan2.1 transformer fixture from `dir` and returns its output.
    fn run_transformer(dir: &Path) -> Result<Tensor> {
        let case = fixture("transformer-wan21");
        let inputs = candle_core::safetensors::load(case.join("input.safetensors"), &Device::Cpu)?;
        let m = WanTransformer3DModel::load(dir, DType::F32, &Device::Cpu)?;
        m.forward(
            &inputs["hidden_states"],
            &inputs["timestep"],
            &inputs["encoder_hidden_states"],
        )
    }

    #[test]
    fn sharded_weights_with_an_index_load_like_a_single_file() {
        let src = fixture("transformer-wan21/transformer");
        let single = run_transformer(&src).unwrap();
        let tensors = candle_core::safetensors::load(
            src.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let dir = tmpdir("sharded");
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        let (a, b) = names.split_at(names.len() / 2);
        let mut map = serde_json::Map::new();
        for (i, part) in [a, b].iter().enumerate() {
            let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
            let shard: HashMap<String, Tensor> = part
                .iter()
                .map(|n| (n.clone(), tensors[n].clone()))
                .collect();
            candle_core::safetensors::save(&shard, dir.join(&file)).unwrap();
            for n in *part {
                map.insert(n.clone(), serde_json::Value::String(file.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        assert_eq!(weight_files(&dir).unwrap().len(), 2);
        let sharded = run_transformer(&dir).unwrap();
        assert_eq!(crate::testing::rel_error(&sharded, &single).unwrap(), 0.0);

        // A shard the index names but that is missing is reported by name.
        std::fs::remove_file(dir.join("diffusion_pytorch_model-00002-of-00002.safetensors"))
            .unwrap();
        let e = run_transformer(&dir).unwrap_err().to_string();
        assert!(
            e.contains("diffusion_pytorch_model-00002-of-00002.safetensors"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn half_precision_weights_are_converted_to_the_compute_dtype() {
        let src = fixture("transformer-wan21/transformer");
        let f32_out = run_transformer(&src).unwrap();
        let tensors = candle_core::safetensors::load(
            src.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for (dt, tol) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
            let dir = tmpdir(&format!("{dt:?}"));
            std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
            let half: HashMap<String, Tensor> = tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.to_dtype(dt).unwrap()))
                .collect();
            candle_core::safetensors::save(&half, dir.join("diffusion_pytorch_model.safetensors"))
                .unwrap();
            let w = Weights::open(&dir).unwrap();
            let vb = w.var_builder(DType::F32, &Device::Cpu);
            let t = vb.get_unchecked("proj_out.weight").unwrap();
            assert_eq!(t.dtype(), DType::F32);
            let out = run_transformer(&dir).unwrap();
            let err = crate::testing::rel_error(&out, &f32_out).unwrap();
            // Only the rounding of the weights differs.
            assert!(err > 0.0 && err < tol, "{dt:?}: {err}");
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let src = fixture("transformer-wan21/transformer");
        let mut tensors = candle_core::safetensors::load(
            src.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let dir = tmpdir("missing");
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let removed = tensors.remove("blocks.1.attn2.to_k.weight").unwrap();
        candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        match run_transformer(&dir) {
            Err(Error::MissingTensor { name, .. }) => {
                assert_eq!(name, "blocks.1.attn2.to_k.weight")
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("loaded without a tensor"),
        }
        tensors.insert(
            "blocks.1.attn2.to_k.weight".into(),
            removed.narrow(0, 0, removed.dim(0).unwrap() - 1).unwrap(),
        );
        candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        let e = run_transformer(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{msg}");
        assert!(msg.contains("blocks.1.attn2.to_k.weight"), "{msg}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn not_a_model_folder_and_garbage_files_are_explained() {
        let dir = tmpdir("garbage");
        let e = weight_files(&dir).unwrap_err().to_string();
        assert!(e.contains("no *.safetensors weights"), "{e}");
        std::fs::write(
            dir.join("model.safetensors"),
            b"this is not safetensors at all",
        )
        .unwrap();
        let e = Weights::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("corrupt safetensors header") || e.contains("truncated"),
            "{e}"
        );
        let e = ModelIndex::read(&dir).unwrap_err().to_string();
        assert!(e.contains("is not a model folder"), "{e}");
        std::fs::write(
            dir.join("model_index.json"),
            r#"{"_class_name": "StableDiffusionPipeline"}"#,
        )
        .unwrap();
        let e = ModelIndex::read(&dir).unwrap_err().to_string();
        assert!(
            e.contains("StableDiffusionPipeline") && e.contains("WanPipeline"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
