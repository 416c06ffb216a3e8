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
use kino_engine::wan::pipeline::{GenerateRequest, PipelineOptions, WanPipeline};
use kino_media::{GifOptions, Mp4Options};

/// The model `kino generate` uses when none is named.
pub use kino_engine::registry::DEFAULT_MODEL;

#[derive(clap::Args)]
pub struct Args {
    /// What the video shows.
    prompt: String,
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
    /// Number of frames, 4k+1 (default: the model's, 81 for Wan2.1).
    #[arg(long, conflicts_with = "seconds")]
    frames: Option<usize>,
    /// Length in seconds (turned into the nearest valid frame count at --fps).
    #[arg(long)]
    seconds: Option<f64>,
    /// Playback frames per second (default: the model's, 16 for Wan2.1).
    #[arg(long)]
    fps: Option<u32>,
    /// Denoising steps (default: the model's, 50).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default 5; 1 or less turns guidance off).
    #[arg(long)]
    guidance: Option<f64>,
    /// Flow shift of the noise schedule (default: the model's scheduler config).
    #[arg(long)]
    shift: Option<f64>,
    /// Random seed; the same seed, settings, device and dtype give the same video.
    #[arg(long)]
    seed: Option<u64>,
    /// Output file: .mp4, .gif, or a folder (for PNG frames). Default: named after the prompt.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the output if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Run on the CPU even if a GPU is available.
    #[arg(long)]
    cpu: bool,
    /// Keep every model loaded for the whole run (faster with plenty of memory).
    #[arg(long)]
    no_low_memory: bool,
    /// Decode the video in overlapping 256-pixel tiles (less memory for large frames).
    #[arg(long)]
    vae_tiling: bool,
    /// Print a machine-readable summary (JSON) on stdout at the end.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Mp4,
    Gif,
    PngFolder,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Mp4 => "mp4",
            Format::Gif => "gif",
            Format::PngFolder => "png",
        }
    }
}

fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
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

fn format_of(path: &Path) -> anyhow::Result<Format> {
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
fn check_writable(path: &Path, format: Format, overwrite: bool) -> anyhow::Result<()> {
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
struct ProgressView {
    bar: Option<ProgressBar>,
    stage: Option<Stage>,
    last_line: Instant,
    stage_times: BTreeMap<&'static str, f64>,
}

impl ProgressView {
    fn new() -> Self {
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

    fn event(&mut self, e: &ProgressEvent) {
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

    fn finish(&self) {
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
/// `cpu`). Returns the model folder and the pipeline.
pub fn open_pipeline(
    model_name: &str,
    cpu: bool,
    low_memory: bool,
    vae_tiling: bool,
) -> anyhow::Result<(PathBuf, WanPipeline)> {
    let model_dir = kino_engine::registry::resolve(model_name)?;
    let dev = device::open(if cpu {
        DeviceChoice::Cpu
    } else {
        DeviceChoice::Auto
    })?;
    let mut opts = PipelineOptions::for_device(dev);
    opts.low_memory = low_memory;
    if vae_tiling {
        opts.vae_tiling = Some(Default::default());
    }
    let pipeline = WanPipeline::open(&model_dir, opts)
        .with_context(|| format!("opening model {}", model_dir.display()))?;
    Ok((model_dir, pipeline))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("the prompt is empty; say what the video should show, e.g. kino generate \"a corgi surfing at sunset\"");
    }
    let model_name = model_name(a.model.as_deref());
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| default_output(&a.prompt));
    let format = format_of(&output)?;
    check_writable(&output, format, a.overwrite)?;

    let (model_dir, mut pipeline) =
        open_pipeline(&model_name, a.cpu, !a.no_low_memory, a.vae_tiling)?;
    let defaults = pipeline.defaults().clone();
    let fps = a.fps.unwrap_or(defaults.fps);
    if fps == 0 || fps > 240 {
        bail!(
            "--fps {fps} is out of range; use 1 to 240 (the model's default is {})",
            defaults.fps
        );
    }
    let step = pipeline.frame_step();
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
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative.clone(),
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        num_frames,
        num_inference_steps: a.steps,
        guidance_scale: a.guidance,
        shift: a.shift,
        seed: a.seed,
    };
    let resolved = pipeline.resolve(&req)?;
    let req = GenerateRequest {
        seed: Some(resolved.seed),
        ..req
    };

    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: stop now.
                std::process::exit(130);
            }
            eprintln!("\nstopping after the current step… (Ctrl-C again to quit at once)");
        });
    }
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

    let r = &out.request;
    let video = kino_server::output::frames_to_video(out.frames, out.width, out.height, fps)?;
    let params = kino_server::output::generation_params(r, &model_name, fps);
    let t_write = Instant::now();
    match format {
        Format::Mp4 => {
            let opts = Mp4Options {
                metadata: Some(params.to_value()),
                ..Default::default()
            };
            kino_media::write_mp4(&output, &video, &opts)?;
        }
        Format::Gif => kino_media::write_gif(&output, &video, &GifOptions::default())?,
        Format::PngFolder => {
            kino_media::write_png_frames(&output, &video)?;
            std::fs::write(
                output.join("params.json"),
                serde_json::to_string_pretty(&params.to_value())?,
            )?;
        }
    }
    let write_secs = t_write.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({} frames, {:.1} s of video) in {:.1} s",
        output.display(),
        video.len(),
        video.duration_secs(),
        gen_secs + write_secs
    );
    if a.json {
        let summary = serde_json::json!({
            "output": output,
            "format": format.name(),
            "model": model_name,
            "model_path": model_dir,
            "width": r.width,
            "height": r.height,
            "frames": r.num_frames,
            "fps": fps,
            "steps": r.num_inference_steps,
            "guidance": r.guidance_scale,
            "shift": r.shift,
            "seed": r.seed,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seconds": { "generate": gen_secs, "write": write_secs, "stages": view.stage_times },
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
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
