//! `kino extend IN.mp4 "what happens next" --seconds 8 -o OUT.mp4`, and the long-video runs
//! behind it and behind `kino generate --seconds 60` / `--script shots.txt` on a model that
//! takes a first image.
//!
//! A long run plans segments ([`kino_engine::long_video`]), streams each finished segment's
//! frames into an [`Mp4StreamWriter`] (memory stays one segment's) and keeps them as PNG files
//! in a sidecar folder `OUT.kino-partial/` with a `manifest.json` (the plan, its fingerprint,
//! the model, fps, the source's sha256, the segments done), so that `--resume` after an
//! interruption continues from the segments already made; the folder is deleted when the
//! video is written.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kino_engine::long_video::{self, LongPlan, LongProgress, LongRequest, Resume, Start};
use kino_engine::wan::pipeline::{GenerateRequest, RgbImage, WanPipeline};
use kino_media::{Fps, Frame, Mp4Options, Video};
use serde_json::json;

use super::generate::{self, ProgressView};

#[derive(clap::Args)]
pub struct Args {
    /// The video to continue (MP4, MOV, WebM, MKV: H.264, H.265, VP9, AV1, …).
    input: PathBuf,
    /// What happens next (or use --script for one prompt per segment).
    #[arg(required_unless_present = "script", conflicts_with = "script")]
    prompt: Option<String>,
    /// How many seconds to add.
    #[arg(long, required_unless_present = "script")]
    seconds: Option<f64>,
    /// A text file with one prompt per line, one segment each (blank lines and lines starting
    /// with # are skipped); with --seconds the last line repeats until the length is reached.
    #[arg(long, value_name = "shots.txt")]
    script: Option<PathBuf>,
    /// Continue an interrupted run from the segments it finished (kept in OUT.kino-partial/).
    #[arg(long)]
    resume: bool,
    /// A model that takes a first image (see `kino models`). Default: $KINO_MODEL or kino-shapes.
    #[arg(long, short)]
    model: Option<String>,
    /// What the video should not show.
    #[arg(long)]
    negative: Option<String>,
    /// Width×height of the output (default: the model's); the source is resized and
    /// centre-cropped to it.
    #[arg(long)]
    size: Option<String>,
    /// Frames per segment, 4k+1 (default: the model's clip length).
    #[arg(long)]
    frames: Option<usize>,
    /// Frames per second of the output (default: the model's); the source is re-timed to it.
    #[arg(long)]
    fps: Option<u32>,
    /// Random seed (segment k uses seed + k).
    #[arg(long)]
    seed: Option<u64>,
    /// Output MP4 (default: IN-extended.mp4 beside the input).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the output (and discard an unfinished run of it) if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a machine-readable summary (JSON) on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Sampling and device settings shared with `kino generate`.
    #[command(flatten)]
    run: generate::RunArgs,
}

/// The prompts of a `--script` file: one per non-blank line not starting with `#`.
pub fn read_script(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the --script {}; check that the file exists and is UTF-8 text",
            path.display()
        )
    })?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        bail!(
            "the --script {} has no prompts; write one prompt per line, one line per segment",
            path.display()
        );
    }
    Ok(prompts)
}

/// Frames in `seconds` at `fps` (at least one), refusing a length that is not positive.
pub fn frames_for_seconds(seconds: f64, fps: u32) -> anyhow::Result<usize> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--seconds {seconds} must be a positive number, e.g. --seconds 8");
    }
    let n = (seconds * f64::from(fps)).round();
    if n > 10_000_000.0 {
        bail!("--seconds {seconds} is too long; ask for less than a few days of video");
    }
    Ok((n as usize).max(1))
}

/// `OUT.kino-partial`: where a long run keeps its finished segments.
pub fn partial_dir(output: &Path) -> PathBuf {
    output.with_extension("kino-partial")
}

/// The sidecar folder's `manifest.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    version: u32,
    model: String,
    fps: u32,
    /// sha256 of the plan's JSON: what must match to resume.
    plan_sha256: String,
    /// For extensions: the source file's sha256.
    source_sha256: Option<String>,
    segments_done: usize,
    plan: LongPlan,
}

fn sha256_hex(bytes: &[u8]) -> String {
    kino_server::inputs::sha256_hex(bytes)
}

fn plan_sha(plan: &LongPlan) -> anyhow::Result<String> {
    Ok(sha256_hex(serde_json::to_string(plan)?.as_bytes()))
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let p = dir.join("manifest.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{} has no readable manifest.json; delete the folder (or pass --overwrite) to start \
             over",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a Kino long-run manifest; delete the folder (or pass --overwrite) to start \
             over",
            p.display()
        )
    })
}

fn write_manifest(dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let tmp = dir.join("manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(m)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("manifest.json"))
        .with_context(|| format!("cannot write the manifest in {}", dir.display()))?;
    Ok(())
}

/// The seed an unfinished run of `output` used, so `--resume` without `--seed` continues it.
pub fn resume_seed(output: &Path) -> Option<u64> {
    read_manifest(&partial_dir(output))
        .ok()
        .map(|m| m.plan.base.seed)
}

/// What differs between a stored plan and a new one, for the refusal message.
fn plan_differences(old: &Manifest, new: &LongPlan, model: &str, fps: u32) -> String {
    let mut d = Vec::new();
    let (a, b) = (&old.plan.base, &new.base);
    if old.model != model {
        d.push(format!("model {} → {model}", old.model));
    }
    if old.fps != fps {
        d.push(format!("fps {} → {fps}", old.fps));
    }
    if a.seed != b.seed {
        d.push(format!("seed {} → {}", a.seed, b.seed));
    }
    if (a.width, a.height) != (b.width, b.height) {
        d.push(format!(
            "size {}x{} → {}x{}",
            a.width, a.height, b.width, b.height
        ));
    }
    if old.plan.total_frames != new.total_frames || old.plan.segments.len() != new.segments.len() {
        d.push(format!(
            "length {} frames in {} segments → {} frames in {}",
            old.plan.total_frames,
            old.plan.segments.len(),
            new.total_frames,
            new.segments.len()
        ));
    }
    let prompts = |p: &LongPlan| {
        p.segments
            .iter()
            .map(|s| s.prompt.clone())
            .collect::<Vec<_>>()
    };
    if prompts(&old.plan) != prompts(new) {
        d.push("prompts".into());
    }
    if a.num_inference_steps != b.num_inference_steps {
        d.push(format!(
            "steps {} → {}",
            a.num_inference_steps, b.num_inference_steps
        ));
    }
    if a.guidance_scale != b.guidance_scale || a.shift != b.shift {
        d.push("guidance or shift".into());
    }
    if a.negative_prompt != b.negative_prompt {
        d.push("negative prompt".into());
    }
    if old.plan.overlap != new.overlap {
        d.push(format!("overlap {} → {}", old.plan.overlap, new.overlap));
    }
    if old.plan.color_match != new.color_match {
        d.push("--color-match".into());
    }
    if d.is_empty() {
        "settings".into()
    } else {
        d.join(", ")
    }
}

/// What a long run writes besides its frames.
pub struct LongRun<'a> {
    pub model_name: &'a str,
    pub model_dir: &'a Path,
    pub output: &'a Path,
    pub fps: u32,
    pub resume: bool,
    pub overwrite: bool,
    pub json: bool,
    /// Extensions: the source, copied into the output first (streamed, fitted to the video's
    /// size and fps).
    pub source: Option<Source>,
    /// Image-to-video start: the conditioning metadata of `kino generate --image`.
    pub conditioning: Option<serde_json::Value>,
    /// The LoRA adapters' metadata ([`generate::RunArgs::lora_metadata`]).
    pub lora: Option<serde_json::Value>,
    /// The step cache's spec (`--cache`), if any.
    pub cache: Option<String>,
}

/// An extension's source video: read frame by frame when it is copied into the output.
pub struct Source {
    pub path: PathBuf,
    pub layout: kino_media::VideoLayout,
    /// Its frames in the output (at the output's fps).
    pub frames: usize,
    /// What the metadata records about it.
    pub meta: serde_json::Value,
    pub sha256: String,
}

impl Source {
    /// Frames `range` of the source at `fps`, fitted to `w × h`, each handed to `each`.
    fn conformed(
        &self,
        w: usize,
        h: usize,
        fps: Fps,
        range: std::ops::Range<usize>,
        each: &mut dyn FnMut(Frame) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut err = None;
        let r = kino_media::conform_video_file(
            &self.path,
            &self.layout,
            w as u32,
            h as u32,
            fps,
            self.frames,
            range,
            &mut |_, f| {
                each(f).map_err(|e| {
                    let m = format!("{e:#}");
                    err = Some(e);
                    kino_media::MediaError::InvalidOption(m)
                })
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        r.map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.0} s", d.as_secs_f64().ceil())
    }
}

fn to_frames(frames: Vec<Vec<u8>>, w: usize, h: usize) -> anyhow::Result<Vec<Frame>> {
    Ok(frames
        .into_iter()
        .map(|f| Frame::new(w as u32, h as u32, f))
        .collect::<Result<Vec<_>, _>>()?)
}

fn segment_dir(partial: &Path, k: usize) -> PathBuf {
    partial.join(format!("segment-{k:04}"))
}

/// Reads `count` frames of a finished segment back from its PNG files (`tail/` under the
/// segment's folder holds what the next segment continues from).
fn read_segment(partial: &Path, k: usize, sub: &str, count: usize) -> anyhow::Result<Vec<Frame>> {
    let dir = segment_dir(partial, k).join(sub);
    (0..count)
        .map(|i| {
            let p = dir.join(kino_media::png_frame_name(i));
            kino_media::read_image(&p).with_context(|| {
                format!(
                    "segment {} of the unfinished run is incomplete ({} is missing or unreadable); \
                     delete {} (or pass --overwrite) to start over",
                    k + 1,
                    p.display(),
                    partial.display()
                )
            })
        })
        .collect()
}

/// How the plan joins its segments, for the metadata.
fn seams_text(plan: &LongPlan) -> String {
    let text = seams_joined(plan);
    if plan.color_match {
        format!("{text}; each continued segment's colours matched to the frames it continues")
    } else {
        text
    }
}

fn seams_joined(plan: &LongPlan) -> String {
    if plan.native {
        "one diffusion-forcing segment (its windows overlap by the model's overlap_history)".into()
    } else if plan.overlap == 0 {
        "each continued segment's frame 0 (a copy of the frame it continues) dropped".into()
    } else {
        format!(
            "each segment after the first continues from the frame {0} before the previous one's \
             end; the {0} frames both made are cross-faded (linear weights)",
            plan.overlap
        )
    }
}

/// Runs `plan` from `start` into `run.output` (MP4), resuming from `OUT.kino-partial/` when
/// asked; prints what it does and a summary.
pub fn run_long(
    pipeline: &mut WanPipeline,
    plan: &LongPlan,
    start: &Start,
    run: LongRun<'_>,
) -> anyhow::Result<()> {
    let output = run.output;
    let partial = partial_dir(output);
    let sha = plan_sha(plan)?;
    let source_sha = run.source.as_ref().map(|s| s.sha256.clone());
    let mut done = 0usize;
    if partial.exists() {
        if run.resume {
            let m = read_manifest(&partial)?;
            if m.plan_sha256 != sha
                || m.model != run.model_name
                || m.fps != run.fps
                || m.source_sha256 != source_sha
            {
                let what = if m.source_sha256 != source_sha {
                    "source video".to_string()
                } else {
                    plan_differences(&m, plan, run.model_name, run.fps)
                };
                bail!(
                    "cannot resume: the unfinished run in {} was made with other settings ({what} \
                     differ); run the same command as before with --resume, or pass --overwrite \
                     to start over",
                    partial.display()
                );
            }
            done = m.segments_done.min(plan.segments.len());
            eprintln!(
                "resuming: {done} of {} segments already made (in {})",
                plan.segments.len(),
                partial.display()
            );
        } else if run.overwrite {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("cannot remove {}", partial.display()))?;
        } else {
            bail!(
                "{} holds an unfinished run of {}; pass --resume to continue it, or --overwrite \
                 to start over",
                partial.display(),
                output.display()
            );
        }
    } else if run.resume {
        eprintln!(
            "no unfinished run of {} to resume; starting from the beginning",
            output.display()
        );
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut manifest = Manifest {
        version: 1,
        model: run.model_name.to_string(),
        fps: run.fps,
        plan_sha256: sha,
        source_sha256: source_sha,
        segments_done: done,
        plan: plan.clone(),
    };
    write_manifest(&partial, &manifest)?;

    let (w, h) = (plan.base.width, plan.base.height);
    let fps = Fps::integer(run.fps)?;
    let mut writer = kino_provenance::cli::current()?.stream_writer(
        output,
        w as u32,
        h as u32,
        fps,
        Mp4Options::default(),
        kino_provenance::cli::subject(run.model_dir, output),
    )?;
    let mut source_frames = 0usize;
    let mut source_meta = None;
    if let Some(src) = run.source {
        // Streamed: the source is never held whole. The writer encodes each push from a key
        // frame, so frames go to it in batches of a segment's length (one key frame per
        // segment, as the new frames get; memory stays that of one segment).
        source_frames = src.frames;
        let per_batch = plan.base.num_frames.max(1);
        let mut batch: Vec<Frame> = Vec::with_capacity(per_batch);
        src.conformed(w, h, fps, 0..src.frames, &mut |f| {
            batch.push(f);
            if batch.len() == per_batch {
                writer.push(&batch)?;
                batch.clear();
            }
            Ok(())
        })?;
        writer.push(&batch)?;
        drop(batch);
        source_meta = Some(src.meta);
    }
    for k in 0..done {
        let frames = read_segment(&partial, k, "", plan.handed_out(k))?;
        writer.push(&frames)?;
    }
    let resume = if done > 0 {
        let tail_dir = segment_dir(&partial, done - 1).join("tail");
        let count = std::fs::read_dir(&tail_dir).map(|d| d.count()).unwrap_or(0);
        let tail = read_segment(&partial, done - 1, "tail", count)?
            .into_iter()
            .map(|f| RgbImage::new(w, h, f.into_data()))
            .collect::<kino_engine::Result<Vec<_>>>()?;
        if tail.is_empty() {
            bail!(
                "segment {done} of the unfinished run in {} has no tail/ frames to continue                  from; delete the folder (or pass --overwrite) to start over",
                partial.display()
            );
        }
        Some(Resume {
            next_segment: done,
            tail,
        })
    } else {
        None
    };

    let cancel = generate::cancel_flag();
    let stop_after: Option<usize> = std::env::var("KINO_TEST_STOP_AFTER_SEGMENTS")
        .ok()
        .and_then(|v| v.parse().ok());
    let n = plan.segments.len();
    eprintln!(
        "kino: {} — {}x{} at {} fps, {} new frames ({:.1} s) in {} segment{} of up to {} frames, \
         {} steps, guidance {}, seed {} (segment k: seed + k)",
        run.model_dir.display(),
        w,
        h,
        run.fps,
        plan.total_frames,
        fps.duration_of(plan.total_frames),
        n,
        if n == 1 { "" } else { "s" },
        plan.base.num_frames,
        plan.base.num_inference_steps,
        plan.base.guidance_scale,
        plan.base.seed
    );
    let mut view = ProgressView::new();
    let started = Instant::now();
    let mut current: Option<usize> = None;
    let mut stopped_by_hook = false;
    let result = {
        let mut on_segment = |s: long_video::SegmentFrames<'_>| -> kino_engine::Result<()> {
            let k = s.segment.index;
            let frames = to_frames(s.frames, s.width, s.height)
                .map_err(|e| kino_engine::Error::InvalidRequest(format!("{e:#}")))?;
            let io = |e: anyhow::Error| kino_engine::Error::InvalidRequest(format!("{e:#}"));
            // Lossless copy first (for --resume), then into the MP4, then mark it done.
            let dir = segment_dir(&partial, k);
            let tmp = partial.join(format!("segment-{k:04}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            let video = Video::new(frames, fps).map_err(|e| io(e.into()))?;
            kino_media::write_png_frames(&tmp, &video).map_err(|e| io(e.into()))?;
            let tail = s
                .tail
                .iter()
                .map(|t| Frame::new(t.width as u32, t.height as u32, t.data.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| io(e.into()))?;
            let tail = Video::new(tail, fps).map_err(|e| io(e.into()))?;
            kino_media::write_png_frames(tmp.join("tail"), &tail).map_err(|e| io(e.into()))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir)
                .map_err(|e| io(anyhow::anyhow!("cannot keep segment {}: {e}", k + 1)))?;
            writer.push(video.frames()).map_err(|e| io(e.into()))?;
            manifest.segments_done = k + 1;
            write_manifest(&partial, &manifest).map_err(io)?;
            if stop_after == Some(k + 1) {
                stopped_by_hook = true;
                return Err(kino_engine::Error::Cancelled);
            }
            Ok(())
        };
        let mut progress = |p: &LongProgress<'_>| -> kino_engine::Result<()> {
            if current != Some(p.segment) {
                current = Some(p.segment);
                let left = p
                    .remaining
                    .map(|r| format!(", about {} left", fmt_duration(r)))
                    .unwrap_or_default();
                let seg = &plan.segments[p.segment];
                eprintln!(
                    "segment {} of {}: \"{}\" ({} new frames, seed {}; {} elapsed{left})",
                    p.segment + 1,
                    p.segments,
                    seg.prompt,
                    seg.keep,
                    seg.seed,
                    fmt_duration(p.elapsed)
                );
            }
            view.event(p.event);
            if cancel.load(Ordering::SeqCst) {
                return Err(kino_engine::Error::Cancelled);
            }
            Ok(())
        };
        long_video::generate(
            pipeline,
            plan,
            start,
            resume,
            &mut on_segment,
            &mut progress,
        )
    };
    view.finish();
    let stats = match result {
        Ok(s) => s,
        Err(kino_engine::Error::Cancelled) => {
            drop(writer);
            eprintln!(
                "stopped{}; {} of {n} segments are kept in {} — run the same command with \
                 --resume to continue",
                if stopped_by_hook {
                    " (KINO_TEST_STOP_AFTER_SEGMENTS)"
                } else {
                    ""
                },
                manifest.segments_done,
                partial.display()
            );
            std::process::exit(130);
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "the finished segments are kept in {}; fix the problem and run the same command \
                 with --resume",
                partial.display()
            )))
        }
    };
    let gen_secs = started.elapsed().as_secs_f64();

    let total = source_frames + plan.total_frames;
    let base = &plan.base;
    let mut params = kino_server::output::generation_params(base, run.model_name, run.fps);
    params.frames = Some(total as u32);
    let segments: Vec<serde_json::Value> = plan
        .segments
        .iter()
        .map(|s| {
            json!({"prompt": s.prompt, "seed": s.seed, "frames": s.keep,
                   "generated": s.num_frames, "dropped": s.skip, "blended": s.blend,
                   "first_frame": source_frames + s.first_frame})
        })
        .collect();
    params.extra.insert(
        "long_video".into(),
        json!({
            "start": plan.start,
            "segment_frames": base.num_frames,
            "new_frames": plan.total_frames,
            "segments": segments,
            "overlap": plan.overlap,
            "color_match": plan.color_match,
            "seams": seams_text(plan),
        }),
    );
    if let Some(m) = &source_meta {
        params.extra.insert("source".into(), m.clone());
    }
    if let Some(c) = &run.conditioning {
        params.extra.insert("conditioning".into(), c.clone());
    }
    if let Some(l) = &run.lora {
        params.extra.insert("lora".into(), l.clone());
    }
    if let Some(c) = &run.cache {
        params.extra.insert("cache".into(), json!({ "spec": c }));
    }
    writer.set_metadata(Some(params.to_value()))?;
    let t_write = Instant::now();
    writer.finish()?;
    std::fs::remove_dir_all(&partial).with_context(|| {
        format!(
            "wrote {} but cannot remove {}",
            output.display(),
            partial.display()
        )
    })?;
    let peak = peak_memory();
    eprintln!(
        "wrote {} ({total} frames, {:.1} s of video{}) in {:.1} s; seams: mean |Δ| {:.2} at {} \
         seam{} vs {:.2} between frames inside segments{}",
        output.display(),
        fps.duration_of(total),
        if source_frames > 0 {
            format!(
                ": {source_frames} from the source + {} new",
                plan.total_frames
            )
        } else {
            String::new()
        },
        gen_secs + t_write.elapsed().as_secs_f64(),
        stats.seam_jump,
        stats.seams,
        if stats.seams == 1 { "" } else { "s" },
        stats.within_jump,
        peak.map(|p| format!("; peak memory {:.0} MiB", p as f64 / (1 << 20) as f64))
            .unwrap_or_default()
    );
    if run.json {
        let summary = json!({
            "output": output,
            "format": "mp4",
            "model": run.model_name,
            "model_path": run.model_dir,
            "width": w,
            "height": h,
            "frames": total,
            "source_frames": source_frames,
            "new_frames": plan.total_frames,
            "fps": run.fps,
            "segments": plan.segments.len(),
            "resumed_segments": done,
            "steps": base.num_inference_steps,
            "guidance": base.guidance_scale,
            "seed": base.seed,
            "seams": stats,
            "peak_memory_bytes": peak,
            "seconds": { "generate": gen_secs },
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    // Everything a user can get wrong is checked before a model is opened.
    if let Some(s) = a.seconds {
        frames_for_seconds(s, 1)?;
    }
    let prompts = match &a.script {
        Some(p) => read_script(p)?,
        None => vec![a.prompt.clone().unwrap_or_default()],
    };
    if prompts.iter().any(|p| p.trim().is_empty()) {
        bail!("the prompt is empty; say what happens next, e.g. kino extend in.mp4 \"the ball rolls away\" --seconds 8");
    }
    let checked: Vec<&str> = prompts.iter().map(String::as_str).collect();
    kino_provenance::cli::open(&a.run.provenance, &checked, "kino extend")?;
    if a.input.is_dir() {
        bail!("{} is a folder; give a video file", a.input.display());
    }
    let source_sha = generate::sha256_file(&a.input, "the video")?;
    // Only the layout now (one picture in memory); the frames are read when needed: the last
    // ones to continue from, then all of them as they are copied into the output.
    let layout = kino_media::scan_video(&a.input)
        .map_err(|e| anyhow::anyhow!("cannot read the video {}: {e}", a.input.display()))?;
    let output = a.output.clone().unwrap_or_else(|| {
        let stem = a
            .input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "video".into());
        a.input.with_file_name(format!("{stem}-extended.mp4"))
    });
    match output
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .as_deref()
    {
        Some("mp4") => {}
        _ => bail!(
            "kino extend writes MP4; name the output with .mp4 (got {})",
            output.display()
        ),
    }
    if output.exists() && !a.overwrite {
        bail!(
            "{} already exists; choose another name with -o, or pass --overwrite",
            output.display()
        );
    }
    let size = a.size.as_deref().map(generate::parse_size).transpose()?;

    let model_name = generate::model_name(a.model.as_deref());
    a.run.apply_preset(&model_name)?;
    let (model_dir, mut pipeline) = a.run.open(&model_name)?;
    let caps = pipeline.capabilities();
    if !caps.image && !caps.long_video {
        bail!(
            "{model_name} makes video from text only and cannot continue a video (it cannot be \
             conditioned on a frame); models that can: {}",
            kino_engine::registry::continuing_model_names().join(", ")
        );
    }
    let defaults = pipeline.defaults().clone();
    let fps = a.fps.unwrap_or(defaults.fps);
    if fps == 0 || fps > 240 {
        bail!(
            "--fps {fps} is out of range; use 1 to 240 (the model's default is {})",
            defaults.fps
        );
    }
    let (w, h) = size.unwrap_or((defaults.width, defaults.height));
    let out_fps = Fps::integer(fps)?;
    let source_len = kino_media::frames_at(layout.len(), layout.fps, out_fps);
    let fit = generate::describe_fit(layout.width, layout.height, w as u32, h as u32)?;
    let name = a
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.input.display().to_string());
    let timing = if layout.fps == out_fps {
        format!("{source_len} frames")
    } else {
        format!(
            "{source_len} frames at {fps} fps from {} at {:.3} fps (nearest frame)",
            layout.len(),
            layout.fps.as_f64()
        )
    };
    let fitted = format!("{timing}, {fit}, re-encoded");
    eprintln!(
        "source {name} {}×{}, {} frames at {:.3} fps → {fitted}",
        layout.width,
        layout.height,
        layout.len(),
        layout.fps.as_f64()
    );
    let source_meta = json!({
        "name": name,
        "sha256": source_sha,
        "size": format!("{}x{}", layout.width, layout.height),
        "frames": layout.len(),
        "fps": layout.fps.as_f64(),
        "fitted": fitted,
        "frames_in_output": source_len,
    });
    let source = Source {
        path: a.input.clone(),
        layout,
        frames: source_len,
        meta: source_meta,
        sha256: source_sha,
    };
    // The end of the source: its last frame for a first-image model, its last
    // overlap_history frames for a diffusion-forcing one.
    let tail = long_video::context_frames(&pipeline);
    let mut last = Vec::with_capacity(tail);
    source.conformed(
        w,
        h,
        out_fps,
        source_len.saturating_sub(tail)..source_len,
        &mut |f| {
            last.push(RgbImage::new(w, h, f.into_data())?);
            Ok(())
        },
    )?;
    let start = Start::Continue(last);

    let seed = a
        .seed
        .or_else(|| if a.resume { resume_seed(&output) } else { None });
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
        total_frames: a.seconds.map(|s| frames_for_seconds(s, fps)).transpose()?,
        overlap: a.run.overlap,
        color_match: a.run.color_match.then_some(true),
    };
    let plan = long_video::plan(&pipeline, &req, &start)?;
    run_long(
        &mut pipeline,
        &plan,
        &start,
        LongRun {
            model_name: &model_name,
            model_dir: &model_dir,
            output: &output,
            fps,
            resume: a.resume,
            overwrite: a.overwrite,
            json: a.json,
            source: Some(source),
            conditioning: None,
            lora: a.run.lora_metadata()?,
            cache: a.run.cache.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_positive() {
        assert_eq!(frames_for_seconds(60.0, 8).unwrap(), 480);
        assert_eq!(frames_for_seconds(0.01, 8).unwrap(), 1);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = frames_for_seconds(bad, 8).unwrap_err().to_string();
            assert!(e.contains("positive"), "{e}");
        }
    }

    #[test]
    fn scripts_skip_blank_and_comment_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shots.txt");
        std::fs::write(&p, "# shots\nright\n\n  down \n").unwrap();
        assert_eq!(read_script(&p).unwrap(), ["right", "down"]);
        std::fs::write(&p, "# nothing\n\n").unwrap();
        let e = read_script(&p).unwrap_err().to_string();
        assert!(e.contains("no prompts"), "{e}");
    }

    #[test]
    fn the_sidecar_folder_is_named_after_the_output() {
        assert_eq!(
            partial_dir(Path::new("/tmp/a/long.mp4")),
            Path::new("/tmp/a/long.kino-partial")
        );
    }
}
