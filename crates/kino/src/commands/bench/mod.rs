//! `kino bench transformer|vae|attention`: one Wan2.1-1.3B transformer forward (latent
//! 16×5×32×32 = 1,280 video tokens, 512 text tokens), one Wan2.1 VAE decode (17 frames at
//! 256×256), or one self-attention of the 1.3B's shape (12 heads of 128) over a whole video's
//! tokens (`--tokens`, default 32,760: 81 frames at 832×480), f32 on the CPU, with random weights,
//! against PyTorch + diffusers (the attention: `torch.nn.functional.scaled_dot_product_attention`,
//! what diffusers' Wan attention calls) on the same shapes in the same run. Each side runs in its
//! own process so that peak memory is its own. Prints a table with the ratios.
//!
//! `kino bench video`: time per video at the Wan2.1-1.3B size ([`video`]).

mod video;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use kino_engine::loading::RandomWeights;
use kino_engine::wan::{transformer, vae};

/// The text tokens of the transformer benchmark's context (Wan's padded prompt length; the
/// `--prompt-tokens` range and default spell it out, as clap wants literals).
const TEXT_TOKENS: usize = transformer::WAN_TEXT_CONTEXT_LENGTH;

const REFERENCE_PY: &str = include_str!("../../../../../bench/cpu/reference.py");

#[derive(clap::Args)]
pub struct Args {
    /// `transformer`, `vae`, `attention`, `all` (the three) or `video`.
    #[arg(default_value = "all")]
    what: String,
    /// `attention`: query and key tokens (the video tokens of one Wan2.1 clip; 32,760 is 81
    /// frames at 832×480, 21 latent frames of 30×52 patches).
    #[arg(long, default_value_t = 32_760)]
    tokens: usize,
    /// `transformer`: the prompt's own tokens among the 512 text tokens; the rest are zeros, as
    /// Wan's pipelines pad a prompt's embeddings (both sides get the same context). Default 512:
    /// all 512 random, as no real prompt gives (then nothing repeats).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..=512))]
    prompt_tokens: u16,
    /// CPU threads for both sides (`transformer`, `vae`; `video` runs in this process with
    /// $RAYON_NUM_THREADS threads, default all cores).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python with torch and diffusers for the reference side (default: $KINO_PYTHON or python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Only time Kino.
    #[arg(long)]
    no_reference: bool,
    /// `transformer`, `vae`, `attention`: time each side this many times, Kino and PyTorch in
    /// turn, and report the median time of each and the median of the pairs' ratios (with their
    /// range): on a shared machine one run of each can be off by 10% or more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// `video`: the frame size, WxH.
    #[arg(long, default_value = "256x256", value_name = "WxH")]
    size: String,
    /// `video`: frames per video (4k+1).
    #[arg(long, default_value_t = 17)]
    frames: usize,
    /// `video`: the step cache of the cached row (`kino generate --cache` syntax). The default,
    /// TaylorSeer on the attention modules, skips by a fixed pattern, so its count is the same
    /// with random weights as with trained ones.
    #[arg(
        long,
        default_value = r"taylorseer:2,cache_identifiers=^blocks\.\d+\.attn[12]$"
    )]
    cache: String,
    /// `video`: where the random-weight 1.3B model folder is written (about 6 GB, kept for
    /// the next run). Default: $TMPDIR/kino-bench-wan2.1-1.3b-random.
    #[arg(long, value_name = "DIR")]
    model_dir: Option<PathBuf>,
    /// `transformer`: Kino's weight formats to time, comma-separated: `f32` (random weights
    /// built in memory), or a GGUF format (`q8_0`, `q6_k`, `q5_k`, `q4_k`, `f16`): the
    /// random-weight 1.3B folder of `video` quantized by `kino quantize` (once, kept beside it)
    /// and loaded from the file, matrices kept quantized.
    #[arg(long, default_value = "f32")]
    format: String,
    /// Internal: run one side in this process and print JSON.
    #[arg(long, hide = true)]
    child: bool,
}

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Measure {
    seconds: f64,
    peak_rss_bytes: u64,
    /// The reference side only: the instruction set PyTorch's kernels ran with
    /// (`torch.backends.cpu.get_cpu_capability()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpu_capability: Option<String>,
}

/// The environment that caps PyTorch's kernels at the instruction set Kino's run at, so that
/// `KINO_CPU_ISA=avx2` on an AVX-512 machine times both sides as an AVX2-only CPU would run
/// them: ATen's vectorised kernels (`ATEN_CPU_CAPABILITY`), oneDNN's convolutions
/// (`ONEDNN_MAX_CPU_ISA`) and MKL's GEMM (`MKL_ENABLE_INSTRUCTIONS`). Variables the user set
/// already are left as they are. Empty when Kino runs its best ISA (nothing to cap).
fn reference_isa_env(isa: kino_engine::kernels::Isa) -> Vec<(&'static str, &'static str)> {
    use kino_engine::kernels::Isa;
    let caps: &[(&str, &str)] = match isa {
        Isa::Avx2Fma if Isa::best() == Isa::Avx512 => &[
            ("ATEN_CPU_CAPABILITY", "avx2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ],
        _ => &[],
    };
    caps.iter()
        .copied()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let what: Vec<&str> = match a.what.as_str() {
        "all" => vec!["transformer", "vae", "attention"],
        "transformer" => vec!["transformer"],
        "vae" => vec!["vae"],
        "attention" => vec!["attention"],
        "video" if a.runs > 1 => {
            bail!("--runs applies to transformer, vae and attention; `kino bench video` times each of its settings once")
        }
        "video" => return video::run(&a),
        other => {
            bail!("unknown benchmark `{other}`; choose transformer, vae, attention, all or video")
        }
    };
    if a.prompt_tokens as usize != TEXT_TOKENS && !what.contains(&"transformer") {
        bail!("--prompt-tokens applies to the transformer benchmark (`kino bench transformer`)");
    }
    if what.contains(&"attention") && a.tokens == 0 {
        bail!("--tokens must be at least 1 (the attention's query and key tokens)");
    }
    let formats: Vec<String> = a
        .format
        .split(',')
        .map(|f| f.trim().to_lowercase())
        .filter(|f| !f.is_empty())
        .collect();
    for f in &formats {
        if f != "f32" {
            kino_engine::gguf::parse_quant_type(f)?;
        }
    }
    if a.child {
        let m = match (what[0], formats.first().map(String::as_str)) {
            ("transformer", Some(f)) if f != "f32" => measure_gguf_transformer(&a, f)?,
            (w, _) => measure_kino(w, &a)?,
        };
        // `KINO_PROFILE=1`: where the forward spent its time, on stderr.
        if let Some(table) = kino_engine::profile::report() {
            eprintln!("{table}");
        }
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var_os("KINO_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let mut rows = Vec::new();
    let runs = a.runs as usize;
    for w in what {
        let formats: Vec<&str> = if w == "transformer" {
            formats.iter().map(String::as_str).collect()
        } else {
            vec!["f32"]
        };
        // Each run times every Kino format, then PyTorch: side by side in time, so that each
        // pair of a run saw the same machine.
        let mut kinos: Vec<(String, Vec<Measure>)> = formats
            .iter()
            .map(|f| (f.to_string(), Vec::new()))
            .collect();
        let mut references = Vec::new();
        for run in 1..=runs {
            let of = if runs > 1 {
                format!(" (run {run} of {runs})")
            } else {
                String::new()
            };
            for (fi, f) in formats.iter().copied().enumerate() {
                eprintln!(
                    "{w}: timing Kino, {f} ({} threads, {} CPU kernels){of}…",
                    a.threads,
                    kino_engine::kernels::isa()
                );
                if f != "f32" {
                    // Quantize here, so the child's peak memory is the forward's alone.
                    gguf_folder(&a, f)?;
                }
                let exe = std::env::current_exe().context("cannot find the kino executable")?;
                let mut cmd = Command::new(exe);
                cmd.args(["bench", w, "--child", "--format", f]);
                cmd.arg("--tokens").arg(a.tokens.to_string());
                cmd.arg("--prompt-tokens").arg(a.prompt_tokens.to_string());
                if let Some(d) = &a.model_dir {
                    cmd.arg("--model-dir").arg(d);
                }
                let m =
                    run_child(cmd, a.threads).with_context(|| format!("Kino {w} {f} benchmark"))?;
                kinos[fi].1.push(m);
            }
            if !a.no_reference {
                eprintln!("{w}: timing PyTorch ({} threads){of}…", a.threads);
                let script =
                    std::env::temp_dir().join(format!("kino-bench-{}.py", std::process::id()));
                std::fs::write(&script, REFERENCE_PY)?;
                let mut cmd = Command::new(&python);
                cmd.arg(&script)
                    .arg(w)
                    .arg(a.threads.to_string())
                    .arg(a.tokens.to_string())
                    .arg(a.prompt_tokens.to_string());
                let caps = reference_isa_env(kino_engine::kernels::isa());
                if !caps.is_empty() {
                    eprintln!(
                        "{w}: PyTorch capped as Kino is: {}",
                        caps.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                }
                cmd.envs(caps);
                let r = run_child(cmd, a.threads).with_context(|| {
                format!(
                    "PyTorch {w} benchmark with {} (install the reference with `pip install -r fixtures/requirements.txt`, or pass --no-reference)",
                    python.display()
                )
            });
                let _ = std::fs::remove_file(&script);
                references.push(r?);
            }
        }
        let reference = (!a.no_reference).then_some(references);
        for (f, kino) in kinos {
            let name = if w == "attention" {
                format!("attention {}", a.tokens)
            } else if f == "f32" {
                w.to_string()
            } else {
                format!("{w} {f}")
            };
            let name = if w == "transformer" && (a.prompt_tokens as usize) < TEXT_TOKENS {
                format!("{name} (prompt {})", a.prompt_tokens)
            } else {
                name
            };
            rows.push((name, kino, reference.clone()));
        }
    }
    println!(
        "{:<18} {:>12} {:>12} {:>8} {:>12} {:>12} {:>8}",
        "component", "PyTorch s", "Kino s", "ratio", "PyTorch GB", "Kino GB", "ratio"
    );
    let gb = |b: u64| b as f64 / 1e9;
    let capability = rows
        .iter()
        .find_map(|(_, _, r)| r.as_ref().and_then(|r| r.first()?.cpu_capability.clone()));
    let mut spreads = Vec::new();
    for (w, k, r) in rows {
        let k = Summary::of(&k);
        match r {
            Some(r) => {
                let ratios = Summary::ratios(&k.runs, &r);
                let r = Summary::of(&r);
                println!(
                    "{:<18} {:>12.2} {:>12.2} {:>8.3} {:>12.2} {:>12.2} {:>8.3}",
                    w,
                    r.seconds,
                    k.seconds,
                    ratios.median,
                    gb(r.peak),
                    gb(k.peak),
                    k.peak as f64 / r.peak as f64
                );
                if runs > 1 {
                    spreads.push(format!(
                        "{w}: {runs} runs each, medians above; pair ratios {:.3}–{:.3} ({}); \
                         PyTorch {:.2}–{:.2} s, Kino {:.2}–{:.2} s",
                        ratios.min,
                        ratios.max,
                        ratios
                            .values
                            .iter()
                            .map(|v| format!("{v:.3}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        r.min,
                        r.max,
                        k.min,
                        k.max
                    ));
                }
            }
            None => {
                println!(
                    "{:<18} {:>12} {:>12.2} {:>8} {:>12} {:>12.2} {:>8}",
                    w,
                    "-",
                    k.seconds,
                    "-",
                    "-",
                    gb(k.peak),
                    "-"
                );
                if runs > 1 {
                    spreads.push(format!(
                        "{w}: {runs} runs, median above; Kino {:.2}–{:.2} s",
                        k.min, k.max
                    ));
                }
            }
        }
    }
    for line in spreads {
        println!("{line}");
    }
    println!(
        "CPU kernels: Kino {}, PyTorch {}",
        kino_engine::kernels::isa(),
        capability.as_deref().unwrap_or("-")
    );
    Ok(())
}

/// Several runs of one side: the median time (the mean of the middle two for an even count),
/// its range, and the highest peak memory.
struct Summary {
    seconds: f64,
    min: f64,
    max: f64,
    peak: u64,
    runs: Vec<f64>,
}

/// The ratios of paired runs, Kino's time over PyTorch's, run by run.
struct Ratios {
    median: f64,
    min: f64,
    max: f64,
    values: Vec<f64>,
}

/// The median (the mean of the middle two for an even count), minimum and maximum.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => return (f64::NAN, f64::NAN, f64::NAN),
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    (median, v[0], v[n - 1])
}

impl Summary {
    fn of(runs: &[Measure]) -> Self {
        let secs: Vec<f64> = runs.iter().map(|m| m.seconds).collect();
        let (seconds, min, max) = stats(&secs);
        Self {
            seconds,
            min,
            max,
            peak: runs.iter().map(|m| m.peak_rss_bytes).max().unwrap_or(0),
            runs: secs,
        }
    }

    fn ratios(kino: &[f64], reference: &[Measure]) -> Ratios {
        let values: Vec<f64> = kino
            .iter()
            .zip(reference)
            .map(|(k, r)| k / r.seconds)
            .collect();
        let (median, min, max) = stats(&values);
        Ratios {
            median,
            min,
            max,
            values,
        }
    }
}

/// A transformer folder whose weights are the random-weight 1.3B folder's transformer in GGUF
/// format `f` (quantized once, kept beside it; named with the recipe's version, so a file an older
/// `kino quantize` made is not reused).
fn gguf_folder(a: &Args, f: &str) -> anyhow::Result<PathBuf> {
    use kino_engine::single_file::{Naming, Note, Part, NOTE};
    let root = video::model_folder(a)?;
    let file = root.join(format!(
        "transformer-{f}-r{}.gguf",
        kino_engine::gguf::QUANTIZE_RECIPE
    ));
    if !file.is_file() {
        eprintln!("transformer: quantizing to {}…", file.display());
        kino_engine::gguf::quantize_component(
            &root.join("transformer"),
            Part::Transformer,
            kino_engine::gguf::parse_quant_type(f)?,
            &file,
            None,
            |_, _| {},
        )?;
    }
    let dir = root.join(format!("transformer-{f}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(
        root.join("transformer/config.json"),
        dir.join("config.json"),
    )?;
    let note = Note {
        file,
        part: Part::Transformer,
        naming: Naming::WanOriginal,
        num_res_blocks: None,
    };
    std::fs::write(dir.join(NOTE), serde_json::to_string_pretty(&note)?)?;
    Ok(dir)
}

/// One forward of the 1.3B transformer loaded from its GGUF file in format `f`.
fn measure_gguf_transformer(a: &Args, f: &str) -> anyhow::Result<Measure> {
    let dev = Device::Cpu;
    let dir = gguf_folder(a, f)?;
    let model = kino_engine::memory::lean(|| {
        transformer::WanTransformer3DModel::load(&dir, DType::F32, &dev)
    })?;
    if std::env::var_os("KINO_BENCH_DEBUG").is_some() {
        eprintln!("loaded: VmRSS {}", rss_line("VmRSS:"));
    }
    time_forward(&model, a.prompt_tokens as usize)
}

/// One forward at the benchmark's shapes (1,280 video + 512 text tokens, the first
/// `prompt_tokens` of them random, the rest zeros), timed.
fn time_forward(
    model: &transformer::WanTransformer3DModel,
    prompt_tokens: usize,
) -> anyhow::Result<Measure> {
    let x = randn(&[1, 16, 5, 32, 32], 1)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let mut ctx = randn(&[1, TEXT_TOKENS, 4096], 2)?;
    if prompt_tokens < TEXT_TOKENS {
        let pad = Tensor::zeros(
            (1, TEXT_TOKENS - prompt_tokens, 4096),
            DType::F32,
            &Device::Cpu,
        )?;
        ctx = Tensor::cat(&[ctx.narrow(1, 0, prompt_tokens)?, pad], 1)?;
    }
    let start = Instant::now();
    let y = model.forward(&x, &t, &ctx)?;
    let seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(y.dims() == [1, 16, 5, 32, 32], "unexpected output shape");
    Ok(Measure::kino(seconds))
}

impl Measure {
    /// Kino's side: `seconds`, and this process's peak memory so far.
    fn kino(seconds: f64) -> Self {
        Measure {
            seconds,
            peak_rss_bytes: peak_rss(),
            cpu_capability: None,
        }
    }
}

fn run_child(mut cmd: Command, threads: usize) -> anyhow::Result<Measure> {
    let t = threads.to_string();
    let out = cmd
        .env("RAYON_NUM_THREADS", &t)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "it failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `KINO_PROFILE=1`: a Kino child (or the reference, by its modules) printed where its
    // forward spent its time under a title starting as Kino's does; pass it on.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(at) = stderr.find("profile (KINO_PROFILE;") {
        eprintln!("{}", stderr[at..].trim_end());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no result line in its output")?;
    Ok(serde_json::from_str(line)?)
}

fn rss_line(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(str::to_string))
        .unwrap_or_default()
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn randn(shape: &[usize], seed: u64) -> anyhow::Result<Tensor> {
    let vb = RandomWeights::var_builder(seed, DType::F32, &Device::Cpu);
    // A "norm-like" 1-D name would give values near 1; ask for a 2-D tensor and reshape.
    let n: usize = shape.iter().product();
    Ok(vb.get((n, 1), "input")?.reshape(shape)?)
}

fn measure_kino(what: &str, a: &Args) -> anyhow::Result<Measure> {
    let tokens = a.tokens;
    let dev = Device::Cpu;
    let vb = RandomWeights::var_builder(0, DType::F32, &dev);
    match what {
        "transformer" => {
            let cfg: transformer::Config = serde_json::from_value(serde_json::json!({
                "_class_name": "WanTransformer3DModel",
                "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
                "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
                "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": true,
                "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024
            }))?;
            let model =
                kino_engine::memory::lean(|| transformer::WanTransformer3DModel::new(&cfg, vb))?;
            time_forward(&model, a.prompt_tokens as usize)
        }
        "vae" => {
            let cfg: vae::Config =
                serde_json::from_value(serde_json::json!({"_class_name": "AutoencoderKLWan"}))?;
            let model = kino_engine::memory::lean(|| vae::AutoencoderKLWan::new(&cfg, vb))?;
            let z = randn(&[1, 16, 5, 32, 32], 3)?;
            let start = Instant::now();
            let y = kino_engine::memory::lean(|| model.decode(&z))?;
            let seconds = start.elapsed().as_secs_f64();
            anyhow::ensure!(y.dims() == [1, 3, 17, 256, 256], "unexpected output shape");
            Ok(Measure::kino(seconds))
        }
        "attention" => {
            let shape = [1, tokens, 12, 128];
            let (q, k, v) = (randn(&shape, 4)?, randn(&shape, 5)?, randn(&shape, 6)?);
            let start = Instant::now();
            let o = transformer::attention(&q, &k, &v)?;
            let seconds = start.elapsed().as_secs_f64();
            anyhow::ensure!(o.dims() == [1, tokens, 12 * 128], "unexpected output shape");
            Ok(Measure::kino(seconds))
        }
        other => bail!("unknown benchmark `{other}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::reference_isa_env;
    use kino_engine::kernels::Isa;

    #[test]
    fn reference_is_capped_only_when_kino_is() {
        // Kino at its best ISA (or portable): PyTorch keeps its own choice.
        assert!(reference_isa_env(Isa::best()).is_empty());
        assert!(reference_isa_env(Isa::Portable).is_empty());
        // Kino capped at AVX2 on an AVX-512 machine: PyTorch's ATen, oneDNN and MKL too (each
        // unless the user set it already).
        let capped = reference_isa_env(Isa::Avx2Fma);
        if Isa::best() == Isa::Avx512 {
            for key in [
                "ATEN_CPU_CAPABILITY",
                "ONEDNN_MAX_CPU_ISA",
                "MKL_ENABLE_INSTRUCTIONS",
            ] {
                let set = capped.iter().any(|(k, _)| *k == key);
                assert_eq!(set, std::env::var_os(key).is_none(), "{key}");
            }
            assert!(capped.iter().all(|(_, v)| v.eq_ignore_ascii_case("avx2")));
        } else {
            assert!(capped.is_empty());
        }
    }
}
