//! GGUF weight files, as the community publishes Wan models (ComfyUI-GGUF's conversions: the
//! original Wan tensor names, 1-D and small tensors in F32, the embeddings, time projection and
//! output head in 16 bits, the blocks' matrices in Q8_0 / Q5_K / Q4_K …,
//! `comfy.gguf.orig_shape.NAME` metadata for a tensor stored reshaped; UMT5 encoders with
//! llama.cpp's T5 names, see [`crate::single_file::umt5_gguf_name`]).
//!
//! Tensors are read through candle's GGUF reader. [`GgufFile::tensor`] dequantizes to a dense
//! tensor; [`GgufFile::qtensor`] keeps the blocks as they are for the quantized matrix products
//! of the transformer's and the text encoder's linear layers (`crate::loading::quantized_weight`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::calibration::InputMeans;
use crate::error::{Error, Result};

/// Metadata key prefix of ComfyUI-GGUF for a tensor stored in another shape than its own.
pub const ORIG_SHAPE: &str = "comfy.gguf.orig_shape.";

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: GgmlDType,
    /// Row-major dims (the file stores them innermost first).
    dims: Vec<usize>,
    /// Offset from the start of the data section.
    offset: u64,
}

/// An open GGUF file: its header, and the file to read tensors from on demand.
///
/// The header is parsed here rather than by candle's reader, which refuses tensors of more than
/// four dimensions: ComfyUI-GGUF's Wan files carry the 5-D `patch_embedding.weight` as it is.
pub struct GgufFile {
    path: PathBuf,
    tensors: HashMap<String, TensorInfo>,
    data_start: u64,
    file: Mutex<std::fs::File>,
    /// Shapes to restore (from `comfy.gguf.orig_shape.*`).
    orig_shapes: HashMap<String, Vec<usize>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({})", self.path.display())
    }
}

/// A metadata value, as far as Kino reads them (numbers, strings, lists).
#[derive(Debug, Clone)]
enum Meta {
    Int(i128),
    Float,
    Bool,
    Str,
    List(Vec<Meta>),
}

/// Little-endian reads from the header.
struct Reader<R: std::io::Read> {
    r: R,
    pos: u64,
}

impl<R: std::io::Read> Reader<R> {
    fn bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.pos += n as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(std::io::Error::other(format!("a string of {n} bytes")));
        }
        let b = self.bytes(n as usize)?;
        String::from_utf8(b).map_err(|e| std::io::Error::other(e.to_string()))
    }
    fn value(&mut self, ty: u32, depth: usize) -> std::io::Result<Meta> {
        let int = |b: Vec<u8>, signed: bool| -> i128 {
            let mut x = [0u8; 16];
            x[..b.len()].copy_from_slice(&b);
            if signed && b.last().is_some_and(|l| l & 0x80 != 0) {
                x[b.len()..].fill(0xff);
            }
            i128::from_le_bytes(x)
        };
        Ok(match ty {
            0 => Meta::Int(int(self.bytes(1)?, false)),
            1 => Meta::Int(int(self.bytes(1)?, true)),
            2 => Meta::Int(int(self.bytes(2)?, false)),
            3 => Meta::Int(int(self.bytes(2)?, true)),
            4 => Meta::Int(int(self.bytes(4)?, false)),
            5 => Meta::Int(int(self.bytes(4)?, true)),
            6 => {
                self.bytes(4)?;
                Meta::Float
            }
            7 => {
                self.bytes(1)?;
                Meta::Bool
            }
            8 => {
                self.string()?;
                Meta::Str
            }
            9 => {
                if depth > 4 {
                    return Err(std::io::Error::other("lists nested too deep"));
                }
                let item = self.u32()?;
                let n = self.u64()?;
                if n > 1 << 26 {
                    return Err(std::io::Error::other(format!("a list of {n} values")));
                }
                let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Meta::List(v)
            }
            10 => Meta::Int(int(self.bytes(8)?, false)),
            11 => Meta::Int(int(self.bytes(8)?, true)),
            12 => {
                self.bytes(8)?;
                Meta::Float
            }
            other => return Err(std::io::Error::other(format!("unknown value type {other}"))),
        })
    }
}

/// GGML's type numbers (ggml.h) → candle's block types.
fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    /// Reads the header of a GGUF file (versions 2 and 3).
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let bad = |message: String| Error::BadFile {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let mut r = Reader {
            r: std::io::BufReader::new(&file),
            pos: 0,
        };
        let trunc = |e: std::io::Error| {
            bad(format!(
                "not a valid GGUF file ({e}); it may be truncated: download it again"
            ))
        };
        if r.bytes(4).map_err(trunc)? != b"GGUF" {
            return Err(bad("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32().map_err(trunc)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version}; Kino reads versions 2 and 3"
            )));
        }
        let n_tensors = r.u64().map_err(trunc)?;
        let n_kv = r.u64().map_err(trunc)?;
        let mut alignment = 32u64;
        let mut orig_shapes = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(trunc)?;
            let ty = r.u32().map_err(trunc)?;
            let v = r.value(ty, 0).map_err(trunc)?;
            if key == "general.alignment" {
                if let Meta::Int(a) = v {
                    alignment = u64::try_from(a).unwrap_or(32).max(1);
                }
            } else if let Some(name) = key.strip_prefix(ORIG_SHAPE) {
                let dims = match &v {
                    Meta::List(items) => items
                        .iter()
                        .map(|d| match d {
                            Meta::Int(x) => usize::try_from(*x).ok(),
                            _ => None,
                        })
                        .collect::<Option<Vec<usize>>>(),
                    _ => None,
                }
                .ok_or_else(|| bad(format!("metadata {key} is not a list of sizes")))?;
                orig_shapes.insert(name.to_string(), dims);
            }
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let name = r.string().map_err(trunc)?;
            let n_dims = r.u32().map_err(trunc)?;
            if n_dims > 8 {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<std::io::Result<Vec<usize>>>()
                .map_err(trunc)?;
            dims.reverse();
            let t = r.u32().map_err(trunc)?;
            let dtype = ggml_dtype(t).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has GGML type {t}, which Kino cannot read (it reads F32, F16, BF16, Q4_0…Q8_1 and the K-quants)"
                ))
            })?;
            let offset = r.u64().map_err(trunc)?;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    dims,
                    offset,
                },
            );
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        for (name, info) in &tensors {
            let end = data_start + info.offset + byte_size(info) as u64;
            if end > len {
                return Err(bad(format!(
                    "tensor `{name}` ends at byte {end} but the file has {len}: it is truncated; download it again"
                )));
            }
            if let Some(s) = orig_shapes.get(name) {
                let n: usize = info.dims.iter().product();
                if s.iter().product::<usize>() != n {
                    return Err(bad(format!(
                        "tensor `{name}`: its original shape {s:?} does not hold its {n} values"
                    )));
                }
            }
        }
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            tensors,
            data_start,
            file: Mutex::new(file),
            orig_shapes,
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The storage type of a tensor.
    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.tensors.get(name).map(|i| i.dtype)
    }

    /// A tensor's shape as the model sees it (the original shape where one was recorded).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(s) = self.orig_shapes.get(name) {
            return Some(s.clone());
        }
        self.tensors.get(name).map(|i| i.dims.clone())
    }

    /// The tensor's blocks as stored (quantized or not), on `device`.
    pub fn qtensor(&self, name: &str, device: &Device) -> candle_core::Result<QTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}` in the file")))?;
        let n: usize = info.dims.iter().product();
        if !n.is_multiple_of(info.dtype.block_size()) {
            candle_core::bail!(
                "tensor `{name}`: {n} values are not whole blocks of {:?}",
                info.dtype
            );
        }
        let mut raw = vec![0u8; byte_size(info)];
        {
            let mut f = self
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("GGUF file lock poisoned".into()))?;
            f.seek(SeekFrom::Start(self.data_start + info.offset))?;
            f.read_exact(&mut raw)?;
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.dtype,
            &raw,
            info.dims.clone(),
            device,
        )
    }

    /// The tensor dequantized to f32 on the CPU, in its original shape.
    pub fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        let q = self.qtensor(name, &Device::Cpu)?;
        let t = q.dequantize(&Device::Cpu)?;
        match self.orig_shapes.get(name) {
            Some(s) => t.reshape(s.as_slice()),
            None => Ok(t),
        }
    }
}

/// Bytes a tensor takes in the file.
fn byte_size(info: &TensorInfo) -> usize {
    let n: usize = info.dims.iter().product();
    n / info.dtype.block_size() * info.dtype.type_size()
}

/// Whether a storage type is a block quantization (not a plain float).
pub fn is_quantized(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Whether a path names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The block types `kino quantize` writes. `q4_k_m` is llama.cpp's mix: Q4_K, with the
/// matrices that suffer most from 4 bits (attention values, the feed-forward's down projection)
/// in Q6_K.
pub const QUANT_TYPES: [(&str, GgmlDType); 6] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q4_k_m", GgmlDType::Q4K),
    ("q4_k", GgmlDType::Q4K),
    ("f16", GgmlDType::F16),
];

/// A quantization recipe: the block type of the matrices, and another for the sensitive ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantKind {
    pub base: GgmlDType,
    pub sensitive: Option<GgmlDType>,
}

/// Diffusers / transformers names of the matrices a `_m` mix keeps at more bits.
fn is_sensitive(name: &str) -> bool {
    [
        ".to_v.",
        ".ffn.net.2.",
        ".SelfAttention.v.",
        ".DenseReluDense.wo.",
    ]
    .iter()
    .any(|p| name.contains(p))
}

/// Original Wan names (prefixes) of the transformer's matrices that the community's Wan GGUF
/// files keep in 16 bits at every quantization type: ComfyUI-GGUF's patched `llama-quantize`
/// (`tools/lcpp.patch`, `LLM_ARCH_WAN`) leaves the embeddings of the patches, the text, the time
/// and the image, the time projection that makes every block's modulation, and the output head
/// unquantized. `kino quantize` keeps them in F16 below 8 bits (Q6_K … Q4_K: quantized with the
/// blocks they were most of a 4-bit forward's error on the 1.3B shapes with 2 blocks, 8.4e-2
/// instead of 3.1e-2), and in Q8_0 files in Q8_0, which is already within 1e-2 and keeps a Q8_0
/// file at 0.55× of F16's memory (16 bits there cost 24 MB on Wan2.1-1.3B: 0.558×); the
/// community's files, F16 there too, run the same way.
const WAN_KEPT_16_BIT: [&str; 6] = [
    "patch_embedding.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "img_emb.",
    "head.",
];

/// Version of [`quantize_component`]'s choice of block types (2: [`WAN_KEPT_16_BIT`] in F16 below
/// 8 bits), for caches of its files (`kino bench`'s) to tell an old file from a current one.
pub const QUANTIZE_RECIPE: u32 = 2;

/// What [`quantize_component`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Matrices stored in the block type asked for.
    pub quantized: usize,
    /// Tensors kept in F32 (1-D, small, `.modulation`, or rows not a multiple of the block).
    pub kept_f32: usize,
    /// Matrices kept in F16 as the community's Wan files keep them below 8 bits (embeddings, the time
    /// projection, the output head: [`WAN_KEPT_16_BIT`]).
    pub kept_f16: usize,
    /// Quantized matrices whose bias was corrected for their rounding (with [`InputMeans`]).
    pub bias_corrected: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Writes one component of a diffusers folder (`transformer` or `text_encoder`) as a GGUF file
/// the way the community publishes Wan models (ComfyUI-GGUF's recipe): the original tensor names
/// (Wan's for the transformer, llama.cpp's T5 names for the UMT5 encoder), matrices in `dtype`,
/// 1-D tensors, tensors of at most 1,024 values and `.modulation` in F32, and a matrix whose rows
/// are not a multiple of the block size in F32 too (K-quants need 256); the transformer's
/// embeddings, time projection and output head in F16 below 8 bits ([`WAN_KEPT_16_BIT`]).
///
/// With `means` (the layers' mean inputs, [`crate::calibration::record`]), every quantized matrix
/// with a bias gets the bias `b − (Ŵ − W)·E[x]`, which takes the mean part of its rounding error
/// out of the forward (see [`crate::calibration`]); the file says so in `kino.bias_correction`.
pub fn quantize_component(
    component_dir: &Path,
    part: crate::single_file::Part,
    kind: QuantKind,
    out: &Path,
    means: Option<&InputMeans>,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    use crate::single_file::{transformer_original, umt5_gguf_original, Part};
    let w = crate::loading::Weights::open(component_dir)?;
    let mut names = w.names();
    names.sort();
    let rename = |d: &str| match part {
        Part::Transformer => transformer_original(d),
        Part::TextEncoder => umt5_gguf_original(d),
        Part::Vae => d.to_string(),
    };
    if part == Part::Vae {
        return Err(Error::InvalidRequest(
            "kino quantize takes the transformer or the text encoder; the VAE is small and runs in f32".into(),
        ));
    }
    let mut report = QuantizeReport {
        tensors: names.len(),
        quantized: 0,
        kept_f32: 0,
        kept_f16: 0,
        bias_corrected: 0,
        bytes_in: crate::loading::weight_files(component_dir)?
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum(),
        bytes_out: 0,
    };
    use candle_nn::var_builder::SimpleBackend;
    let load = |name: &str| {
        w.get_unchecked(name, candle_core::DType::F32, &Device::Cpu)
            .map_err(|e| w.map_err(e))
    };
    // First the plan (names, shapes, block types: the GGUF header), from the files' headers;
    // then each tensor read, quantized and written in turn, so memory holds one tensor at a time.
    let mut plan: Vec<(String, Vec<usize>, GgmlDType)> = Vec::with_capacity(names.len());
    for name in &names {
        let dims = match w.shape(name) {
            Some(d) => d,
            None => load(name)?.dims().to_vec(),
        };
        let n: usize = dims.iter().product();
        let dtype = match kind.sensitive {
            Some(t) if is_sensitive(name) => t,
            _ => kind.base,
        };
        let keep = dims.len() != 2
            || n <= 1024
            || name.ends_with("scale_shift_table")
            || dims[1] % dtype.block_size() != 0;
        let original = rename(name);
        let sixteen =
            part == Part::Transformer && WAN_KEPT_16_BIT.iter().any(|p| original.starts_with(p));
        let dtype = if keep {
            report.kept_f32 += 1;
            GgmlDType::F32
        } else if sixteen && is_quantized(kind.base) && kind.base != GgmlDType::Q8_0 {
            report.kept_f16 += 1;
            GgmlDType::F16
        } else {
            report.quantized += 1;
            dtype
        };
        report.bytes_out += (n / dtype.block_size() * dtype.type_size()) as u64;
        plan.push((original, dims, dtype));
    }
    // Bias correction: for each quantized matrix with a recorded mean input and a bias, the
    // index of its bias (written first: `….bias` sorts before `….weight`) → the matrix's index.
    let mut corrected: HashMap<usize, usize> = HashMap::new();
    if let Some(m) = means {
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        for (j, name) in names.iter().enumerate() {
            let (Some(mu), Some(prefix)) = (m.for_weight(name), name.strip_suffix(".weight"))
            else {
                continue;
            };
            let Some(&i) = index.get(format!("{prefix}.bias").as_str()) else {
                continue;
            };
            if !is_quantized(plan[j].2) {
                continue;
            }
            if plan[j].1.get(1) != Some(&mu.len()) {
                return Err(Error::InvalidRequest(format!(
                    "the calibration's mean input of `{prefix}` has {} values but the matrix \
                     takes {:?}: it was recorded on another model",
                    mu.len(),
                    plan[j].1
                )));
            }
            corrected.insert(i, j);
        }
        report.bias_corrected = corrected.len();
    }
    let arch = match part {
        Part::Transformer => "wan",
        _ => "t5encoder",
    };
    let by = format!("kino {}", env!("CARGO_PKG_VERSION"));
    let note = format!(
        "biases of {} quantized matrices corrected by their rounding error times the mean input \
         of a calibration run (Nagel et al. 2019, empirical bias correction)",
        corrected.len()
    );
    let mut metadata = vec![
        ("general.architecture", MetaValue::Str(arch)),
        ("general.quantization_version", MetaValue::U32(2)),
        ("general.quantized_by", MetaValue::Str(&by)),
    ];
    if !corrected.is_empty() {
        metadata.push(("kino.bias_correction", MetaValue::Str(&note)));
    }
    // The matrix quantized for its bias's correction, kept until its own turn comes.
    let mut pending: Option<(usize, QTensor)> = None;
    let tmp = out.with_extension("gguf.partial");
    let io = |e: std::io::Error| Error::BadFile {
        path: out.to_path_buf(),
        message: e.to_string(),
    };
    let written = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let entries: Vec<(&str, &[usize], GgmlDType)> = plan
            .iter()
            .map(|(n, d, t)| (n.as_str(), d.as_slice(), *t))
            .collect();
        write_streaming(&mut f, &metadata, &entries, |i| {
            progress(i, names.len());
            if let Some(q) = pending.take_if(|(j, _)| *j == i) {
                return Ok(q.1);
            }
            if let (Some(&j), Some(m)) = (corrected.get(&i), means) {
                let w = load(&names[j])?;
                let q = QTensor::quantize(&w, plan[j].2)?;
                let mu = m.for_weight(&names[j]).unwrap_or_default();
                let bias = corrected_bias(&load(&names[i])?, &w, &q, mu)?;
                pending = Some((j, q));
                return Ok(QTensor::quantize(&bias, plan[i].2)?);
            }
            Ok(QTensor::quantize(&load(&names[i])?, plan[i].2)?)
        })
        .map_err(|e| match e {
            StreamError::Io(e) => io(e),
            StreamError::Other(e) => e,
        })?;
        use std::io::Write;
        f.flush().map_err(io)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(report)
}

/// `b − (Ŵ − W)·μ`: the bias that takes the rounding error's part along the mean input `μ` out of
/// a quantized layer's output (f64 sums).
pub(crate) fn corrected_bias(bias: &Tensor, w: &Tensor, q: &QTensor, mu: &[f64]) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let w = w
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let wq = q
        .dequantize(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = bias.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    if b.len() != rows || mu.len() != cols || wq.len() != w.len() {
        return Err(Error::InvalidRequest(format!(
            "bias correction: a {rows}×{cols} matrix with {} biases and {} means",
            b.len(),
            mu.len()
        )));
    }
    let out: Vec<f32> = (0..rows)
        .map(|r| {
            let o = r * cols;
            let d: f64 = (0..cols)
                .map(|c| (wq[o + c] as f64 - w[o + c] as f64) * mu[c])
                .sum();
            (b[r] as f64 - d) as f32
        })
        .collect();
    Ok(Tensor::from_vec(out, rows, &Device::Cpu)?)
}

/// A metadata value [`write_streaming`] writes.
#[derive(Debug, Clone, Copy)]
pub enum MetaValue<'a> {
    U32(u32),
    Str(&'a str),
}

/// Why [`write_streaming`] stopped.
#[derive(Debug)]
pub enum StreamError {
    Io(std::io::Error),
    Other(Error),
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io(e)
    }
}

/// GGML's number for a block type (the GGUF tensor info's `type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Writes a GGUF file (version 2, 32-byte alignment: byte for byte what candle's
/// `gguf_file::write` writes for the same tensors) from a plan of `(name, dims, type)` entries,
/// asking `tensor(i)` for each tensor's blocks only when its turn comes, so a model of any size
/// is quantized in the memory of its largest tensor. A tensor that does not match its entry
/// stops the write.
pub fn write_streaming<W: std::io::Write>(
    w: &mut W,
    metadata: &[(&str, MetaValue)],
    entries: &[(&str, &[usize], GgmlDType)],
    mut tensor: impl FnMut(usize) -> Result<QTensor>,
) -> std::result::Result<(), StreamError> {
    let mut pos = 0usize;
    let put = |w: &mut W, b: &[u8], pos: &mut usize| -> std::io::Result<()> {
        *pos += b.len();
        w.write_all(b)
    };
    let string = |s: &str| {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let pad = |len: usize| 31 - (31 + len) % 32;
    put(w, &0x46554747u32.to_le_bytes(), &mut pos)?;
    put(w, &2u32.to_le_bytes(), &mut pos)?;
    put(w, &(entries.len() as u64).to_le_bytes(), &mut pos)?;
    put(w, &(metadata.len() as u64).to_le_bytes(), &mut pos)?;
    for (key, value) in metadata {
        put(w, &string(key), &mut pos)?;
        match value {
            MetaValue::U32(v) => {
                put(w, &4u32.to_le_bytes(), &mut pos)?;
                put(w, &v.to_le_bytes(), &mut pos)?;
            }
            MetaValue::Str(s) => {
                put(w, &8u32.to_le_bytes(), &mut pos)?;
                put(w, &string(s), &mut pos)?;
            }
        }
    }
    let size = |dims: &[usize], t: GgmlDType| {
        dims.iter().product::<usize>() / t.block_size() * t.type_size()
    };
    let mut offset = 0usize;
    for (name, dims, t) in entries {
        put(w, &string(name), &mut pos)?;
        put(w, &(dims.len() as u32).to_le_bytes(), &mut pos)?;
        for &d in dims.iter().rev() {
            put(w, &(d as u64).to_le_bytes(), &mut pos)?;
        }
        put(w, &ggml_type_id(*t).to_le_bytes(), &mut pos)?;
        put(w, &(offset as u64).to_le_bytes(), &mut pos)?;
        let s = size(dims, *t);
        offset += s + pad(s);
    }
    put(w, &vec![0u8; pad(pos)], &mut pos)?;
    for (i, (name, dims, t)) in entries.iter().enumerate() {
        let q = tensor(i).map_err(StreamError::Other)?;
        let data = q.data().map_err(|e| StreamError::Other(e.into()))?;
        if q.shape().dims() != *dims || q.dtype() != *t || data.len() != size(dims, *t) {
            return Err(StreamError::Other(Error::InvalidRequest(format!(
                "tensor `{name}` came as {:?} {:?}, but the file's header says {:?} {dims:?}",
                q.dtype(),
                q.shape().dims(),
                t
            ))));
        }
        put(w, &data, &mut pos)?;
        put(w, &vec![0u8; pad(data.len())], &mut pos)?;
    }
    Ok(())
}

/// The recipe named `s` (`q8_0`, `q6_k`, `q5_k`, `q4_k_m`, `q4_k`, `f16`).
pub fn parse_quant_type(s: &str) -> Result<QuantKind> {
    QUANT_TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
        .map(|(n, t)| QuantKind {
            base: *t,
            sensitive: n.ends_with("_m").then_some(GgmlDType::Q6K),
        })
        .ok_or_else(|| {
            Error::InvalidRequest(format!(
                "unknown quantization `{s}`; choose one of {}",
                QUANT_TYPES.map(|(n, _)| n).join(", ")
            ))
        })
}

/// `q` as a dense f32 tensor on `device`: Q8_0 (the format most Wan GGUF files use) expanded
/// by Kino in parallel, other types by candle. The quantized layers call this at every forward,
/// so it is on the hot path (candle's scalar expansion doubled a 1.3B forward).
pub fn dequantize(q: &QTensor, device: &Device) -> candle_core::Result<Tensor> {
    if q.dtype() == GgmlDType::Q8_0 && device.is_cpu() {
        if let Ok(raw) = q.data() {
            if let Some(out) = crate::kernels::dequantize_q8_0(&raw, q.shape().elem_count()) {
                return Tensor::from_vec(out, q.shape().clone(), device);
            }
        }
    }
    q.dequantize(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    fn write(path: &Path, tensors: &[(&str, &QTensor)]) {
        let arch = gguf_file::Value::String("wan".into());
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], tensors).unwrap();
    }

    /// The streaming writer makes the same bytes as candle's writer (which needs every tensor
    /// in memory at once), and stops at a tensor that does not match the header.
    #[test]
    fn streaming_writer_matches_candles_writer_byte_for_byte() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (64, 256), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (8, 4, 1, 2, 2), &dev).unwrap();
        let d = Tensor::randn(0f32, 1.0, (3, 32), &dev).unwrap();
        let tensors = [
            (
                "blocks.0.attn.q.weight",
                QTensor::quantize(&a, GgmlDType::Q8_0).unwrap(),
            ),
            (
                "blocks.0.ffn.2.weight",
                QTensor::quantize(&a, GgmlDType::Q4K).unwrap(),
            ),
            (
                "blocks.0.ffn.0.weight",
                QTensor::quantize(&a, GgmlDType::Q6K).unwrap(),
            ),
            ("norm.bias", QTensor::quantize(&b, GgmlDType::F32).unwrap()),
            (
                "patch_embedding.weight",
                QTensor::quantize(&c, GgmlDType::F32).unwrap(),
            ),
            (
                "head.weight",
                QTensor::quantize(&d, GgmlDType::F16).unwrap(),
            ),
        ];
        let arch = gguf_file::Value::String("wan".into());
        let version = gguf_file::Value::U32(2);
        let mut want = std::io::Cursor::new(Vec::new());
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
        gguf_file::write(
            &mut want,
            &[
                ("general.architecture", &arch),
                ("general.quantization_version", &version),
            ],
            &refs,
        )
        .unwrap();
        let meta = [
            ("general.architecture", MetaValue::Str("wan")),
            ("general.quantization_version", MetaValue::U32(2)),
        ];
        let dims: Vec<Vec<usize>> = tensors
            .iter()
            .map(|(_, q)| q.shape().dims().to_vec())
            .collect();
        let entries: Vec<(&str, &[usize], GgmlDType)> = tensors
            .iter()
            .zip(&dims)
            .map(|((n, q), d)| (*n, d.as_slice(), q.dtype()))
            .collect();
        let mut asked = Vec::new();
        let mut got = Vec::new();
        write_streaming(&mut got, &meta, &entries, |i| {
            asked.push(i);
            let (_, q) = &tensors[i];
            Ok(QTensor::new(
                candle_core::quantized::QStorage::from_data(q.data()?, &dev, q.dtype())?,
                q.shape().clone(),
            )?)
        })
        .unwrap();
        assert_eq!(asked, (0..tensors.len()).collect::<Vec<_>>());
        assert_eq!(got, want.into_inner());
        // A tensor of another type than its entry says is refused, not written.
        let mut bad = Vec::new();
        let err = write_streaming(&mut bad, &meta, &entries[..1], |_| {
            Ok(QTensor::quantize(&a, GgmlDType::Q4K)?)
        });
        assert!(matches!(err, Err(StreamError::Other(_))));
    }

    #[test]
    fn reads_back_quantized_and_five_dimensional_tensors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.gguf");
        let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
        let conv = Tensor::randn(0f32, 1.0, (8, 4, 1, 2, 2), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let c = QTensor::quantize(&conv, GgmlDType::F32).unwrap();
        write(
            &p,
            &[
                ("a.weight", &q8),
                ("b.weight", &q4),
                ("patch_embedding.weight", &c),
            ],
        );
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.dtype("a.weight"), Some(GgmlDType::Q8_0));
        assert_eq!(g.shape("patch_embedding.weight"), Some(vec![8, 4, 1, 2, 2]));
        // Kino's Q8_0 expansion is candle's, value for value.
        let fast = dequantize(&q8, &Device::Cpu).unwrap();
        let slow = q8.dequantize(&Device::Cpu).unwrap();
        let dd = (fast - slow).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(dd.to_scalar::<f32>().unwrap(), 0.0);
        let back = g.tensor("patch_embedding.weight").unwrap();
        let diff = (back - &conv).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        for (name, bar) in [("a.weight", 1e-2), ("b.weight", 1e-1)] {
            let t = g.tensor(name).unwrap();
            let err = crate::testing::rel_error(&t, &w).unwrap();
            assert!(err < bar, "{name}: {err}");
        }
        // A cut file is refused with a sentence, not a panic.
        let bytes = std::fs::read(&p).unwrap();
        for cut in [3, 20, bytes.len() / 2, bytes.len() - 1] {
            let q = d.path().join(format!("cut{cut}.gguf"));
            std::fs::write(&q, &bytes[..cut]).unwrap();
            let e = GgufFile::open(&q).unwrap_err().to_string();
            assert!(
                e.contains("download it again") || e.contains("not a GGUF"),
                "{cut}: {e}"
            );
        }
    }
}
