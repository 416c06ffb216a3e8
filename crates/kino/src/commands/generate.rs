//! `kino generate PROMPT …`: prompt → video file (MP4, GIF, or a folder of PNGs).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use kino_engine::device::{self, DeviceChoice};
use kino_engine::progress::{ProgressEvent, Stage};
use kino_engine::wan::pipeline::{
    Conditioning, GenerateRequest, PipelineOptions, RgbImage, WanPipeline,
};
use kino_media::{FitCrop, Fps, Frame, GifOptions, Mp4Options};
use serde_json::json;

/// The model `kino generate` uses when none is named.
pub use kino_engine::registry::DEFAULT_MODEL;

/// The sampling and device options `kino generate` and `kino extend` share.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Denoising steps (default: the model's, 50 for Wan).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: the model's; 1 or less turns guidance off).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Flow shift of the noise schedule (default: the model's scheduler config).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Run on the CPU even if a GPU is available.
    #[arg(long)]
    pub cpu: bool,
    /// Keep every model loaded for the whole run (faster with plenty of memory).
    #[arg(long)]
    pub no_low_memory: bool,
    /// Decode the video in overlapping 256-pixel tiles (less memory for large frames).
    #[arg(long)]
    pub vae_tiling: bool,
    /// C2PA signing, the invisible watermark and the prompt policy.
    #[command(flatten)]
    pub provenance: kino_provenance::ProvenanceArgs,
    /// Long videos in segments: frames cross-faded at each seam (each segment continues from
    /// the frame M before the previous one's end); 0 drops the repeated frame instead.
    /// Default: the engine's (see the README's long-video section).
    #[arg(long, value_name = "M")]
    pub overlap: Option<usize>,
    /// Long videos in segments: match each continued segment's colours to the frames it
    /// continues (per-channel histogram matching, one map per segment), against colour drift.
    /// Off by default: it can also undo a colour change a later prompt asks for, and on
    /// kino-shapes it kept colour better but shape slightly worse (README, long videos).
    #[arg(long)]
    pub color_match: bool,
    /// A LoRA adapter for the transformer, FILE or FILE:SCALE (scale 1 if left out; diffusers,
    /// original Wan / ComfyUI and kohya files); repeat for several.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    /// A LoRA adapter for the low-noise expert (transformer_2) of a two-expert model.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora_2: Vec<String>,
    /// Fold the adapters into the weights once at load (no extra work per step, a little more
    /// load time) instead of applying them on the fly.
    #[arg(long)]
    pub fuse_lora: bool,
    /// A step cache that skips transformer forwards whose output barely changes, as diffusers'
    /// hooks with their settings: first-block:THRESHOLD,
    /// mag:THRESHOLD[,max_skip_steps=N,retention_ratio=R] (with --mag-ratios), mag:calibrate
    /// (with --write-mag-ratios), taylorseer:INTERVAL[,max_order=N,cache_identifiers=REGEX].
    #[arg(long, value_name = "SPEC")]
    pub cache: Option<String>,
    /// MagCache: the model's magnitude ratios (a JSON list, e.g. from a mag:calibrate run).
    #[arg(long, value_name = "FILE")]
    pub mag_ratios: Option<PathBuf>,
    /// With --cache mag:calibrate: where to write the measured ratios.
    #[arg(long, value_name = "FILE")]
    pub write_mag_ratios: Option<PathBuf>,
    /// A named preset of steps, guidance and shift (and, from a model folder, adapters): e.g.
    /// `fast` for a few-step model or adapter. From a --lora file's metadata or the model
    /// folder's kino.json; --steps/--guidance/--shift given explicitly win.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// The preset applied by [`RunArgs::apply_preset`].
    #[arg(skip)]
    pub applied_preset: Option<kino_engine::preset::Preset>,
}

/// `--cache SPEC [--mag-ratios FILE] [--write-mag-ratios FILE]` as a cache config, checked
/// (`kino generate`/`extend`/`edit` and `kino parity` share it).
pub fn cache_config(
    cache: Option<&str>,
    mag_ratios: Option<&Path>,
    write_mag_ratios: Option<&Path>,
) -> anyhow::Result<Option<kino_engine::hooks::CacheConfig>> {
    let Some(spec) = cache else {
        if mag_ratios.is_some() || write_mag_ratios.is_some() {
            bail!("--mag-ratios and --write-mag-ratios go with --cache mag:…");
        }
        return Ok(None);
    };
    let c: kino_engine::hooks::CacheConfig = spec.parse()?;
    let c = match mag_ratios {
        Some(f) => c.with_mag_ratios(kino_engine::hooks::read_mag_ratios(f)?)?,
        None => c,
    };
    c.validate()?;
    let calibrate = matches!(&c, kino_engine::hooks::CacheConfig::Mag(m) if m.calibrate);
    if calibrate != write_mag_ratios.is_some() {
        bail!(if calibrate {
            "--cache mag:calibrate needs --write-mag-ratios FILE (where the ratios go)"
        } else {
            "--write-mag-ratios goes with --cache mag:calibrate"
        });
    }
    Ok(Some(c))
}

/// After a single-clip run with a step cache: prints `skipped N of M transformer forwards`,
/// writes calibrated MagCache ratios where asked, and returns what the metadata records.
pub(crate) fn report_cache(
    run: &RunArgs,
    pipeline: &WanPipeline,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(spec) = &run.cache else {
        return Ok(None);
    };
    let mut meta = json!({ "spec": spec });
    if let Some(stats) = pipeline.cache_stats() {
        eprintln!("kino: {}", stats.message());
        meta["forwards"] = json!(stats.forwards);
        meta["skipped"] = json!(stats.skipped);
    }
    if let (Some(path), Some(ratios)) = (&run.write_mag_ratios, pipeline.mag_calibration()) {
        kino_engine::hooks::write_mag_ratios(path, ratios)?;
        eprintln!(
            "kino: wrote {} magnitude ratios to {} (use them with --cache mag:THRESHOLD --mag-ratios {})",
            ratios.len(),
            path.display(),
            path.display()
        );
    }
    Ok(Some(meta))
}

/// A preset as the output's metadata records it: its name, where it came from (file name) and
/// what it set.
fn preset_metadata(p: &kino_engine::preset::Preset) -> serde_json::Value {
    json!({
        "name": p.name,
        "from": p.source.file_name().map(|n| n.to_string_lossy().to_string()),
        "settings": p.describe(),
    })
}

impl RunArgs {
    /// The adapters of `--lora` / `--lora-2`, parsed.
    pub fn lora_specs(
        &self,
    ) -> anyhow::Result<(
        Vec<kino_engine::lora::LoraSpec>,
        Vec<kino_engine::lora::LoraSpec>,
    )> {
        let parse = |list: &[String]| -> anyhow::Result<Vec<kino_engine::lora::LoraSpec>> {
            list.iter()
                .map(|s| s.parse().map_err(anyhow::Error::from))
                .collect()
        };
        Ok((parse(&self.lora)?, parse(&self.lora_2)?))
    }

    /// `--preset NAME`: finds the preset (a --lora file's, else the model folder's) and fills
    /// in the steps, guidance and shift not given explicitly, and adds the adapters a model's
    /// preset names. Without --preset, says which loaded adapters name presets.
    pub fn apply_preset(&mut self, model_name: &str) -> anyhow::Result<()> {
        let (lora, _) = self.lora_specs()?;
        let Some(name) = self.preset.clone() else {
            for hint in kino_engine::preset::hints(&lora) {
                eprintln!("kino: note: {hint}");
            }
            return Ok(());
        };
        let model_dir = kino_engine::registry::resolve(model_name)?;
        let p = kino_engine::preset::find(&model_dir, &lora, &name)?;
        self.steps = self.steps.or(p.num_inference_steps);
        self.guidance = self.guidance.or(p.guidance_scale);
        self.shift = self.shift.or(p.shift);
        for l in &p.lora {
            self.lora.push(format!("{}:{}", l.path.display(), l.scale));
        }
        eprintln!("kino: preset `{name}`: {}", p.describe());
        self.applied_preset = Some(p);
        Ok(())
    }

    /// What the output's metadata records about the adapters (file name, SHA-256, scale,
    /// expert, fused) and the preset, or `None` without either.
    pub fn lora_metadata(&self) -> anyhow::Result<Option<serde_json::Value>> {
        let (l1, l2) = self.lora_specs()?;
        if l1.is_empty() && l2.is_empty() {
            return Ok(self
                .applied_preset
                .as_ref()
                .map(|p| json!({ "adapters": [], "fused": false, "preset": preset_metadata(p) })));
        }
        let mut list = Vec::new();
        for (expert, specs) in [("transformer", &l1), ("transformer_2", &l2)] {
            for s in specs {
                list.push(json!({
                    "file": s.path.file_name().map(|n| n.to_string_lossy().to_string()),
                    "sha256": sha256_file(&s.path, "the LoRA file")?,
                    "scale": s.scale,
                    "expert": expert,
                }));
            }
        }
        let mut meta = json!({ "adapters": list, "fused": self.fuse_lora });
        if let Some(p) = &self.applied_preset {
            meta["preset"] = preset_metadata(p);
        }
        Ok(Some(meta))
    }

    /// [`open_pipeline_with`] with these options (device, memory, tiling, adapters, cache).
    pub fn open(&self, model_name: &str) -> anyhow::Result<(PathBuf, WanPipeline)> {
        let (lora, lora_2) = self.lora_specs()?;
        let cache = cache_config(
            self.cache.as_deref(),
            self.mag_ratios.as_deref(),
            self.write_mag_ratios.as_deref(),
        )?;
        open_pipeline_with(
            model_name,
            self.cpu,
            !self.no_low_memory,
            self.vae_tiling,
            (lora, lora_2, self.fuse_lora),
            cache,
        )
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// What the video shows (or use --script for one prompt per segment).
    #[arg(required_unless_present = "script", conflicts_with = "script")]
    prompt: Option<String>,
    /// A text file with one prompt per line, one segment each (a sequence of shots; blank
    /// lines and lines starting with # are skipped); with --seconds the last line repeats until
    /// the length is reached. Needs a model that takes a first image.
    #[arg(long, value_name = "shots.txt")]
    script: Option<PathBuf>,
    /// Continue an interrupted long run from the segments it finished (kept beside the output
    /// in OUT.kino-partial/); the settings must be the same.
    #[arg(long)]
    resume: bool,
    /// A model alias (see `kino models`) or a model folder. Default: $KINO_MODEL or kino-shapes (the small model that ships with Kino).
    #[arg(long, short)]
    model: Option<String>,
    /// What the video should not show (default: the model family's recommended negative prompt;
    /// "" for none).
    #[arg(long)]
    negative: Option<String>,
    /// Width×height, e.g. 832x480 (default: the model's).
    #[arg(long)]
    size: Option<String>,
    /// Number of frames, 4k+1 (default: the model's, 81 for Wan2.1); with a --seconds longer
    /// than it, the length of each segment.
    #[arg(long)]
    frames: Option<usize>,
    /// Length in seconds (turned into the nearest valid frame count at --fps). Longer than the
    /// model's clip (or --frames) on a model that takes a first image: a long video made in
    /// segments, each continuing from the last frame of the one before.
    #[arg(long)]
    seconds: Option<f64>,
    /// Playback frames per second (default: the model's, 16 for Wan2.1).
    #[arg(long)]
    fps: Option<u32>,
    /// Random seed; the same seed, settings, device and dtype give the same video.
    #[arg(long)]
    seed: Option<u64>,
    /// Output file: .mp4, .gif, or a folder (for PNG frames). Default: named after the prompt.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the output if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a machine-readable summary (JSON) on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Sampling and device settings shared with `kino extend`.
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// Start from this picture (PNG, JPEG or WebP): image-to-video. It is resized to cover the
    /// video's size and centre-cropped.
    #[arg(long, value_name = "FIRST.png", conflicts_with = "video")]
    image: Option<PathBuf>,
    /// End on this picture too (first–last-frame models; needs --image).
    #[arg(long, value_name = "LAST.png", requires = "image")]
    last_image: Option<PathBuf>,
    /// Restyle this clip (MP4, MOV, WebM, … in H.264, H.265, VP9, AV1): video-to-video. Its
    /// first frames at the video's fps are used, resized and centre-cropped.
    #[arg(long, value_name = "IN.mp4")]
    video: Option<PathBuf>,
    /// How much of the schedule runs on the source video, in (0, 1]: 1 ignores it, small
    /// values change it little (default 0.7; only with --video).
    #[arg(long, requires = "video")]
    strength: Option<f64>,
    /// A reference image (a subject, a style) to keep (VACE models); repeat for several, order
    /// kept. Works with text and with --image.
    #[arg(long, value_name = "subject.png", conflicts_with = "video")]
    reference: Vec<PathBuf>,
    /// How strongly VACE's control steers: one number, or one per VACE layer separated by
    /// commas (default 1; with --reference).
    #[arg(long, value_name = "F or F,F,…", requires = "reference")]
    conditioning_scale: Option<String>,
}

/// One input file: where it came from, what it was, and (once fitted) what was done to it.
struct InputFile {
    /// `image`, `last_image` or `video` (as the server records them).
    role: &'static str,
    path: PathBuf,
    sha256: String,
    width: u32,
    height: u32,
    /// Videos: the frame rate.
    fps: Option<Fps>,
    /// "resized to 85×64 and centre-cropped to 64×64", filled in when fitted.
    fitted: String,
}

impl InputFile {
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    fn metadata(&self) -> serde_json::Value {
        let mut m = json!({
            "name": self.name(),
            "sha256": self.sha256,
            "size": format!("{}x{}", self.width, self.height),
            "fitted": self.fitted,
        });
        if let Some(f) = self.fps {
            m["fps"] = json!(f.as_f64());
        }
        m
    }
}

/// Reads a file's bytes for hashing, with the usual message when it is missing.
pub(crate) fn read_input_bytes(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    if path.is_dir() {
        bail!("{what} {} is a folder; give a file", path.display());
    }
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read the {what} {}; check that the file exists and is readable",
            path.display()
        )
    })
}

/// SHA-256 (hex) of an input file, read in pieces (clips can be large); `what` names it in
/// errors ("--video", "the source video").
pub(crate) fn sha256_file(path: &Path, what: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    if path.is_dir() {
        bail!("{what} {} is a folder; give a video file", path.display());
    }
    let mut file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot read {what} {}; check that the file exists and is readable",
            path.display()
        )
    })?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {what} {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Decodes an image given with --image/--last-image.
fn load_image(path: &Path, role: &'static str) -> anyhow::Result<(InputFile, Frame)> {
    let what = if role == "image" {
        "--image"
    } else {
        "--last-image"
    };
    let bytes = read_input_bytes(path, what)?;
    let frame = kino_media::decode_image(&bytes)
        .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))?;
    let f = InputFile {
        role,
        path: path.to_path_buf(),
        sha256: kino_server::inputs::sha256_hex(&bytes),
        width: frame.width(),
        height: frame.height(),
        fps: None,
        fitted: String::new(),
    };
    Ok((f, frame))
}

/// [`FitCrop::describe`]: "resized to 85×64 and centre-cropped to 64×64" (or "kept as it is").
pub(crate) fn describe_fit(src_w: u32, src_h: u32, w: u32, h: u32) -> anyhow::Result<String> {
    Ok(FitCrop::describe(src_w, src_h, w, h)?)
}

fn rgb(frame: Frame) -> anyhow::Result<RgbImage> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    Ok(RgbImage::new(w, h, frame.into_data())?)
}

/// The models that take a first image, for an error message (not `current`: a folder of the
/// bundled model from before it learnt images is text-only).
fn image_models(current: &str) -> String {
    others(kino_engine::registry::image_model_names(), current)
}

/// The models that can go on past one clip: those that continue from a frame, and the
/// diffusion-forcing ones that make long videos themselves.
fn long_models(current: &str) -> String {
    others(kino_engine::registry::continuing_model_names(), current)
}

fn others(names: Vec<&str>, current: &str) -> String {
    names
        .into_iter()
        .filter(|m| !m.eq_ignore_ascii_case(current))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Mp4,
    Gif,
    PngFolder,
}

impl Format {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Format::Mp4 => "mp4",
            Format::Gif => "gif",
            Format::PngFolder => "png",
        }
    }
}

pub(crate) fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(['x', 'X', '*', '×']).collect();
    let [w, h] = parts.as_slice() else {
        bail!("size `{s}` is not WIDTHxHEIGHT, e.g. 832x480");
    };
    let w: usize = w
        .trim()
        .parse()
        .with_context(|| format!("width `{w}` in `{s}` is not a whole number"))?;
    let h: usize = h
        .trim()
        .parse()
        .with_context(|| format!("height `{h}` in `{s}` is not a whole number"))?;
    if w == 0 || h == 0 {
        bail!("size {w}x{h} has a zero side; e.g. 832x480");
    }
    Ok((w, h))
}

pub(crate) fn format_of(path: &Path) -> anyhow::Result<Format> {
    if path.is_dir() {
        return Ok(Format::PngFolder);
    }
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("mp4") => Ok(Format::Mp4),
        Some("gif") => Ok(Format::Gif),
        None => Ok(Format::PngFolder),
        Some(other) => bail!(
            "cannot write `.{other}` files; use .mp4, .gif, or a folder name (for PNG frames)"
        ),
    }
}

/// A file name from the prompt: lowercase words joined by dashes, at most 60 characters.
pub fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for word in prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if s.len() + word.len() + 1 > 60 {
            break;
        }
        if !s.is_empty() {
            s.push('-');
        }
        s.extend(word.chars().flat_map(|c| c.to_lowercase()));
    }
    if s.is_empty() {
        "video".into()
    } else {
        s
    }
}

/// `slug.mp4`, or `slug-2.mp4`, … : never an existing file.
fn default_output(prompt: &str) -> PathBuf {
    let base = slug(prompt);
    let mut p = PathBuf::from(format!("{base}.mp4"));
    let mut i = 2;
    while p.exists() {
        p = PathBuf::from(format!("{base}-{i}.mp4"));
        i += 1;
    }
    p
}

/// Checks we can write `path` before spending minutes on the video.
pub(crate) fn check_writable(path: &Path, format: Format, overwrite: bool) -> anyhow::Result<()> {
    if format != Format::PngFolder && path.exists() && !overwrite {
        bail!(
            "{} already exists; choose another name with -o, or pass --overwrite",
            path.display()
        );
    }
    if format == Format::PngFolder && path.is_dir() && !overwrite {
        let non_empty = std::fs::read_dir(path)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty {
            bail!(
                "folder {} is not empty; choose another folder with -o, or pass --overwrite",
                path.display()
            );
        }
    }
    let dir = match format {
        Format::PngFolder => path.to_path_buf(),
        _ => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    if format == Format::PngFolder {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    } else if !dir.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".kino-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write to {}: check its permissions", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Renders progress events as a bar on a terminal, or plain lines otherwise.
pub(crate) struct ProgressView {
    bar: Option<ProgressBar>,
    stage: Option<Stage>,
    last_line: Instant,
    pub(crate) stage_times: BTreeMap<&'static str, f64>,
}

impl ProgressView {
    pub(crate) fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(1);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>18} [{bar:30.cyan/blue}] {pos}/{len} {per_sec} ETA {eta} ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Self {
            bar,
            stage: None,
            last_line: Instant::now(),
            stage_times: BTreeMap::new(),
        }
    }

    pub(crate) fn event(&mut self, e: &ProgressEvent) {
        let new_stage = self.stage != Some(e.stage);
        if new_stage {
            self.stage = Some(e.stage);
        }
        if e.step == e.total {
            self.stage_times
                .insert(e.stage.name(), e.elapsed.as_secs_f64());
        }
        match &self.bar {
            Some(b) => {
                if new_stage {
                    b.reset();
                    b.set_message(e.stage.name());
                }
                b.set_length(e.total as u64);
                b.set_position(e.step as u64);
            }
            None => {
                // Plain lines for logs: loads and encodes once when done, steps every 2 s.
                if e.total <= 2 {
                    if e.step == e.total {
                        eprintln!(
                            "{}: done ({:.1} s)",
                            e.stage.name(),
                            e.elapsed.as_secs_f64()
                        );
                    }
                    return;
                }
                let due = (new_stage && e.step == 0)
                    || e.step == e.total
                    || (e.step > 0 && self.last_line.elapsed() >= Duration::from_secs(2));
                if due {
                    let per = if e.step > 0 {
                        format!(", {:.2} s/step", e.elapsed.as_secs_f64() / e.step as f64)
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "{}: {}/{} ({:.1} s{per})",
                        e.stage.name(),
                        e.step,
                        e.total,
                        e.elapsed.as_secs_f64()
                    );
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The model a command uses: `--model`, else `$KINO_MODEL`, else [`DEFAULT_MODEL`].
pub fn model_name(arg: Option<&str>) -> String {
    arg.map(String::from)
        .or_else(|| std::env::var("KINO_MODEL").ok())
        .unwrap_or_else(|| DEFAULT_MODEL.to_string())
}

/// Resolves a model alias or folder and opens it on the GPU if there is one (the CPU with
/// `cpu`), with LoRA adapters (for `transformer`, for `transformer_2`, fused) and a step cache.
/// Returns the model folder and the pipeline.
pub fn open_pipeline_with(
    model_name: &str,
    cpu: bool,
    low_memory: bool,
    vae_tiling: bool,
    (lora, lora_2, fuse): (
        Vec<kino_engine::lora::LoraSpec>,
        Vec<kino_engine::lora::LoraSpec>,
        bool,
    ),
    cache: Option<kino_engine::hooks::CacheConfig>,
) -> anyhow::Result<(PathBuf, WanPipeline)> {
    let model_dir = kino_engine::registry::resolve(model_name)?;
    let dev = device::open(if cpu {
        DeviceChoice::Cpu
    } else {
        DeviceChoice::Auto
    })?;
    let mut opts = PipelineOptions::for_device(dev);
    opts.low_memory = low_memory;
    opts.lora = lora;
    opts.lora_2 = lora_2;
    opts.lora_fuse = fuse;
    opts.cache = cache;
    if vae_tiling {
        opts.vae_tiling = Some(Default::default());
    }
    let pipeline = WanPipeline::open(&model_dir, opts)
        .with_context(|| format!("opening model {}", model_dir.display()))?;
    Ok((model_dir, pipeline))
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let script_prompts = a
        .script
        .as_deref()
        .map(super::extend::read_script)
        .transpose()?;
    let prompt = match (&a.prompt, &script_prompts) {
        (Some(p), _) => p.clone(),
        (None, Some(ps)) => ps[0].clone(),
        (None, None) => String::new(),
    };
    if let Some(s) = a.seconds {
        super::extend::frames_for_seconds(s, 1)?;
    }
    if prompt.trim().is_empty() {
        bail!("the prompt is empty; say what the video should show, e.g. kino generate \"a corgi surfing at sunset\"");
    }
    let all_prompts = script_prompts
        .clone()
        .unwrap_or_else(|| vec![prompt.clone()]);
    let checked: Vec<&str> = all_prompts.iter().map(String::as_str).collect();
    kino_provenance::cli::open(&a.run.provenance, &checked, "kino generate")?;
    let model_name = model_name(a.model.as_deref());
    a.run.apply_preset(&model_name)?;
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let output = a.output.clone().unwrap_or_else(|| default_output(&prompt));
    let format = format_of(&output)?;
    if let Some(st) = a.strength {
        if !(st.is_finite() && st > 0.0 && st <= 1.0) {
            bail!(
                "--strength {st} is outside (0, 1]: 1 ignores the source video, small values keep \
                 it almost unchanged; try 0.7"
            );
        }
    }
    // The inputs: read and decode the images now (before any model is opened); the video's
    // file is checked here and decoded once the request's length is known.
    let mut inputs: Vec<InputFile> = Vec::new();
    let mut images: Vec<Frame> = Vec::new();
    if let Some(p) = &a.image {
        let (f, img) = load_image(p, "image")?;
        inputs.push(f);
        images.push(img);
    }
    if let Some(p) = &a.last_image {
        let (f, img) = load_image(p, "last_image")?;
        inputs.push(f);
        images.push(img);
    }
    let mut references = super::edit::load_references(&a.reference)?;
    let vace_scale = a
        .conditioning_scale
        .as_deref()
        .map(super::edit::parse_conditioning_scale)
        .transpose()?
        .unwrap_or_default();
    let video_sha = a
        .video
        .as_deref()
        .map(|p| sha256_file(p, "the --video"))
        .transpose()?;
    check_writable(&output, format, a.overwrite)?;

    let lora_meta = a.run.lora_metadata()?;
    let (model_dir, mut pipeline) = a.run.open(&model_name)?;
    if !references.is_empty() {
        super::edit::require_vace(&pipeline, &model_name)?;
    }
    let defaults = pipeline.defaults().clone();
    let fps = a.fps.unwrap_or(defaults.fps);
    if fps == 0 || fps > 240 {
        bail!(
            "--fps {fps} is out of range; use 1 to 240 (the model's default is {})",
            defaults.fps
        );
    }
    let step = pipeline.frame_step();
    // Longer than one clip: segments on a model that takes a first image.
    let clip = a.frames.unwrap_or(defaults.num_frames);
    let long_total = a
        .seconds
        .map(|s| super::extend::frames_for_seconds(s, fps))
        .transpose()?
        .filter(|&t| t > clip);
    let caps = pipeline.capabilities();
    // A diffusion-forcing model (SkyReels-V2 DF) makes any length itself, in one call.
    let native_long = caps.long_video && script_prompts.is_none();
    if let Some(total) =
        long_total.filter(|_| !caps.image && !native_long && script_prompts.is_none())
    {
        // A text-only model makes one clip, as it always has, up to twice its own length.
        if total > 2 * clip {
            bail!(
                "{model_name} makes video from text only and cannot be conditioned on a frame, so \
                 it cannot make {:.1} s ({total} frames) in segments, and one clip that long is \
                 more than twice the {clip} frames it makes; ask for at most {:.1} s, or use a \
                 model that can make long videos: {}",
                a.seconds.unwrap_or_default(),
                (2 * clip) as f64 / f64::from(fps),
                long_models(&model_name)
            );
        }
    } else if script_prompts.is_some() || (long_total.is_some() && !native_long) {
        if !references.is_empty() {
            bail!(
                "--reference keeps a subject in one clip; a long video (segments, --script) \
                 does not take reference images yet: ask for at most {clip} frames"
            );
        }
        return run_long_generate(
            &a,
            &model_name,
            &model_dir,
            &mut pipeline,
            &output,
            format,
            fps,
            script_prompts.unwrap_or_else(|| vec![prompt.clone()]),
            long_total,
            inputs,
            images,
        );
    }
    if a.resume {
        bail!(
            "--resume continues a long run (--seconds longer than the model's {clip}-frame clip, \
             or --script); this run is one clip"
        );
    }
    let num_frames = match (a.frames, a.seconds) {
        (Some(f), _) => Some(f),
        (None, Some(s)) => {
            if !(s.is_finite() && s > 0.0) {
                bail!("--seconds {s} must be a positive number");
            }
            let k = ((s * fps as f64 - 1.0) / step as f64).round().max(0.0) as usize;
            Some(k * step + 1)
        }
        (None, None) => None,
    };
    let mut req = GenerateRequest {
        prompt: prompt.clone(),
        negative_prompt: a.negative.clone(),
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        num_frames,
        num_inference_steps: a.run.steps,
        guidance_scale: a.run.guidance,
        shift: a.run.shift,
        seed: a.seed,
        ..Default::default()
    };
    if a.image.is_some() && !caps.image {
        bail!(
            "{} makes video from text only and cannot start from an image; models that take a \
             first image: {}",
            model_name,
            image_models(&model_name)
        );
    }
    if a.last_image.is_some() && !caps.last_image {
        let last = kino_engine::registry::last_image_model_names();
        bail!(
            "{} takes a first image only, not a last one; models that take a first and a last \
             image: {}",
            model_name,
            if last.is_empty() {
                "none known".to_string()
            } else {
                last.join(", ")
            }
        );
    }
    if a.video.is_some() && !caps.video {
        bail!(
            "{model_name} is an image-to-video model and cannot restyle a video; give it --image, \
             or use a text-to-video model (e.g. wan2.1-t2v-1.3b or kino-shapes) with --video"
        );
    }
    if a.image.is_none() && a.video.is_none() && !caps.text {
        bail!(
            "{model_name} is an image-to-video model: it needs a first image; pass --image FIRST.png"
        );
    }
    // Size and length: checked by the engine where it can (text-capable models); an
    // image-only model checks them with its images below.
    let (width, height, frames) = if caps.text {
        let r = pipeline.resolve(&req)?;
        (r.width, r.height, r.num_frames)
    } else {
        (
            req.width.unwrap_or(defaults.width),
            req.height.unwrap_or(defaults.height),
            req.num_frames.unwrap_or(defaults.num_frames),
        )
    };
    let (w32, h32) = (width as u32, height as u32);
    if !images.is_empty() {
        let mut fitted = Vec::with_capacity(images.len());
        for (f, img) in inputs.iter_mut().zip(&images) {
            f.fitted = describe_fit(img.width(), img.height(), w32, h32)?;
            fitted.push(rgb(kino_media::fit_crop(img, w32, h32)?)?);
        }
        let mut it = fitted.into_iter();
        let first = it
            .next()
            .context("internal: the first image went missing")?;
        req.conditioning = Conditioning::Image {
            first,
            last: it.next(),
        };
    }
    if let (Some(path), Some(sha256)) = (&a.video, video_sha) {
        let strength = a.strength.unwrap_or(0.7);
        let out_fps = Fps::integer(fps)?;
        // Read only what is needed (and one frame more), not a whole long clip.
        let seconds = out_fps.duration_of(frames) + 0.1;
        let video = kino_media::read_video_head(path, seconds)
            .map_err(|e| anyhow::anyhow!("--video: {e}"))?;
        let conformed = kino_media::conform_video(&video, w32, h32, out_fps, frames)
            .map_err(|e| anyhow::anyhow!("--video {}: {e}", path.display()))?;
        let mut f = InputFile {
            role: "video",
            path: path.clone(),
            sha256,
            width: video.width(),
            height: video.height(),
            fps: Some(video.fps()),
            fitted: String::new(),
        };
        let fit = describe_fit(video.width(), video.height(), w32, h32)?;
        f.fitted = if video.fps() == out_fps {
            format!("first {frames} frames, {fit}")
        } else {
            format!(
                "{frames} frames at {fps} fps from {} fps (nearest frame), {fit}",
                fmt_fps(video.fps())
            )
        };
        inputs.push(f);
        req.conditioning = Conditioning::Video {
            frames: conformed
                .into_iter()
                .map(rgb)
                .collect::<anyhow::Result<Vec<_>>>()?,
            strength,
        };
    }
    if !references.is_empty() {
        let imgs = super::edit::vace_references(&pipeline, &mut references)?;
        req.conditioning = super::edit::with_references(&pipeline, &req, imgs, vace_scale.clone())?;
    }
    let resolved = pipeline.resolve(&req)?;
    req.seed = Some(resolved.seed);
    for f in &inputs {
        let what = match f.role {
            "image" => "first image",
            "last_image" => "last image",
            _ => "source video",
        };
        let extra = match f.fps {
            Some(r) => format!(" at {} fps", fmt_fps(r)),
            None => String::new(),
        };
        eprintln!(
            "{what} {} {}×{}{extra} → {}",
            f.name(),
            f.width,
            f.height,
            f.fitted
        );
    }

    let cancel = cancel_flag();
    eprintln!(
        "kino: {} — {}x{}, {} frames at {fps} fps, {} steps, guidance {}, shift {}, seed {}",
        model_dir.display(),
        resolved.width,
        resolved.height,
        resolved.num_frames,
        resolved.num_inference_steps,
        resolved.guidance_scale,
        resolved.shift,
        resolved.seed
    );
    let mut view = ProgressView::new();
    let started = Instant::now();
    let result = {
        let mut progress = |e: &ProgressEvent| -> kino_engine::Result<()> {
            view.event(e);
            if cancel.load(Ordering::SeqCst) {
                return Err(kino_engine::Error::Cancelled);
            }
            Ok(())
        };
        pipeline.generate(&req, &mut progress)
    };
    view.finish();
    let out = match result {
        Ok(o) => o,
        Err(kino_engine::Error::Cancelled) => {
            eprintln!("cancelled; nothing was written");
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    let gen_secs = started.elapsed().as_secs_f64();
    let cache_meta = report_cache(&a.run, &pipeline)?;

    let r = &out.request;
    let video = kino_server::output::frames_to_video(out.frames, out.width, out.height, fps)?;
    let mut params = kino_server::output::generation_params(r, &model_name, fps);
    let mut conditioning = conditioning_metadata(&inputs, r.conditioning.as_str(), r.strength);
    if !references.is_empty() {
        let c = conditioning.get_or_insert_with(|| json!({ "kind": r.conditioning }));
        c["references"] = json!(references
            .iter()
            .map(|f| f.meta.clone())
            .collect::<Vec<_>>());
        if !vace_scale.is_empty() {
            c["conditioning_scale"] = json!(vace_scale);
        }
    }
    if let Some(c) = &conditioning {
        params.extra.insert("conditioning".into(), c.clone());
    }
    if let Some(l) = &lora_meta {
        params.extra.insert("lora".into(), l.clone());
    }
    if let Some(c) = &cache_meta {
        params.extra.insert("cache".into(), c.clone());
    }
    let t_write = Instant::now();
    let (prov, subject) = (
        kino_provenance::cli::current()?,
        kino_provenance::cli::subject(&model_dir, &output),
    );
    match format {
        Format::Mp4 => {
            let opts = Mp4Options {
                metadata: Some(params.to_value()),
                ..Default::default()
            };
            prov.write_mp4(&output, &video, &opts, &subject)?;
        }
        Format::Gif => {
            let meta = params.to_value();
            prov.write_gif(
                &output,
                &video,
                &GifOptions::default(),
                Some(&meta),
                &subject,
            )?;
        }
        Format::PngFolder => {
            prov.write_png_frames(&output, &video, Some(&params.to_value()), &subject)?;
        }
    }
    let write_secs = t_write.elapsed().as_secs_f64();
    report_written(
        &Written {
            output: &output,
            format,
            model_name: &model_name,
            model_dir: &model_dir,
            fps,
            frames: video.len(),
            duration: video.duration_secs(),
        },
        r,
        &json!(conditioning),
        (gen_secs, write_secs, &view.stage_times),
        a.json,
    )
}

/// What a single-clip run wrote, for [`report_written`].
pub(crate) struct Written<'a> {
    pub output: &'a Path,
    pub format: Format,
    pub model_name: &'a str,
    pub model_dir: &'a Path,
    pub fps: u32,
    pub frames: usize,
    pub duration: f64,
}

/// After a single-clip run (`kino generate`, `kino edit`): the "wrote …" line, and with `--json`
/// the run's summary on stdout.
pub(crate) fn report_written(
    w: &Written<'_>,
    r: &kino_engine::wan::pipeline::ResolvedRequest,
    conditioning: &serde_json::Value,
    (gen_secs, write_secs, stages): (f64, f64, &BTreeMap<&'static str, f64>),
    json_out: bool,
) -> anyhow::Result<()> {
    eprintln!(
        "wrote {} ({} frames, {:.1} s of video) in {:.1} s",
        w.output.display(),
        w.frames,
        w.duration,
        gen_secs + write_secs
    );
    if json_out {
        let summary = json!({
            "output": w.output,
            "format": w.format.name(),
            "model": w.model_name,
            "model_path": w.model_dir,
            "width": r.width,
            "height": r.height,
            "frames": r.num_frames,
            "fps": w.fps,
            "steps": r.num_inference_steps,
            "guidance": r.guidance_scale,
            "shift": r.shift,
            "seed": r.seed,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "conditioning": conditioning,
            "seconds": { "generate": gen_secs, "write": write_secs, "stages": stages },
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// `kino generate` longer than one clip, or with --script: segments on a model that takes a
/// first image (see [`super::extend::run_long`]).
#[allow(clippy::too_many_arguments)]
fn run_long_generate(
    a: &Args,
    model_name: &str,
    model_dir: &Path,
    pipeline: &mut WanPipeline,
    output: &Path,
    format: Format,
    fps: u32,
    prompts: Vec<String>,
    total_frames: Option<usize>,
    mut inputs: Vec<InputFile>,
    images: Vec<Frame>,
) -> anyhow::Result<()> {
    use kino_engine::long_video::{self, LongRequest, Start};
    if format != Format::Mp4 {
        bail!(
            "a long video (segments) is written as MP4; name the output with .mp4 (got {})",
            output.display()
        );
    }
    if a.video.is_some() {
        bail!(
            "--video restyles one clip and cannot be combined with a long video; to continue a \
             video use kino extend IN.mp4 \"what happens next\" --seconds S"
        );
    }
    if a.last_image.is_some() {
        bail!("--last-image ends one clip; a long video (segments) takes --image only");
    }
    let defaults = pipeline.defaults().clone();
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let (w, h) = size.unwrap_or((defaults.width, defaults.height));
    let start = match images.first() {
        Some(img) => {
            let f = &mut inputs[0];
            f.fitted = describe_fit(img.width(), img.height(), w as u32, h as u32)?;
            eprintln!(
                "first image {} {}×{} → {}",
                f.name(),
                f.width,
                f.height,
                f.fitted
            );
            Start::Image(rgb(kino_media::fit_crop(img, w as u32, h as u32)?)?)
        }
        None => Start::Text,
    };
    let seed = a.seed.or_else(|| {
        if a.resume {
            super::extend::resume_seed(output)
        } else {
            None
        }
    });
    let req = LongRequest {
        request: GenerateRequest {
            prompt: prompts[0].clone(),
            negative_prompt: a.negative.clone(),
            width: Some(w),
            height: Some(h),
            num_frames: a.frames,
            num_inference_steps: a.run.steps,
            guidance_scale: a.run.guidance,
            shift: a.run.shift,
            seed,
            ..Default::default()
        },
        prompts,
        total_frames,
        overlap: a.run.overlap,
        color_match: a.run.color_match.then_some(true),
    };
    let plan = long_video::plan(pipeline, &req, &start).map_err(|e| match e {
        kino_engine::Error::InvalidRequest(m) if m.contains("models that can") => {
            anyhow::anyhow!("{model_name}: {m}")
        }
        e => e.into(),
    })?;
    let conditioning = conditioning_metadata(&inputs, "image", None);
    super::extend::run_long(
        pipeline,
        &plan,
        &start,
        super::extend::LongRun {
            model_name,
            model_dir,
            output,
            fps,
            resume: a.resume,
            overwrite: a.overwrite,
            json: a.json,
            source: None,
            conditioning,
            lora: a.run.lora_metadata()?,
            cache: a.run.cache.clone(),
        },
    )
}

/// A flag that Ctrl-C sets (the run stops at the next step); a second Ctrl-C quits at once.
pub(crate) fn cancel_flag() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if c.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: stop now.
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current step… (Ctrl-C again to quit at once)");
    });
    cancel
}

fn fmt_fps(f: Fps) -> String {
    if f.den() == 1 {
        f.num().to_string()
    } else {
        format!("{:.3}", f.as_f64())
    }
}

/// What the output's metadata records about the inputs (the shape `kino serve` writes too):
/// `{"kind": "image", "image": {"name", "sha256", "size", "fitted"}, "last_image": …,
/// "video": {…, "frames", "fps"}, "strength": 0.7}`; `None` for text-to-video.
fn conditioning_metadata(
    inputs: &[InputFile],
    kind: &str,
    strength: Option<f64>,
) -> Option<serde_json::Value> {
    if inputs.is_empty() {
        return None;
    }
    let mut m = serde_json::Map::new();
    m.insert("kind".into(), json!(kind));
    for f in inputs {
        m.insert(f.role.into(), f.metadata());
    }
    if let Some(s) = strength {
        m.insert("strength".into(), json!(s));
    }
    Some(serde_json::Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_is_a_safe_file_name() {
        assert_eq!(
            slug("A corgi, surfing at sunset!"),
            "a-corgi-surfing-at-sunset"
        );
        assert_eq!(slug("  ///  "), "video");
        assert!(slug(&"word ".repeat(40)).len() <= 60);
    }

    #[test]
    fn sizes_parse_or_explain() {
        assert_eq!(parse_size("832x480").unwrap(), (832, 480));
        assert_eq!(parse_size("1280*704").unwrap(), (1280, 704));
        let e = parse_size("832").unwrap_err().to_string();
        assert!(e.contains("WIDTHxHEIGHT"), "{e}");
        let e = parse_size("0x480").unwrap_err().to_string();
        assert!(e.contains("zero"), "{e}");
        let e = parse_size("abcx480").unwrap_err().to_string();
        assert!(e.contains("not a whole number"), "{e}");
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(format_of(Path::new("a.mp4")).unwrap(), Format::Mp4);
        assert_eq!(format_of(Path::new("a.GIF")).unwrap(), Format::Gif);
        assert_eq!(format_of(Path::new("frames")).unwrap(), Format::PngFolder);
        assert!(format_of(Path::new("a.avi")).is_err());
    }
}
