//! `kino edit IN.mp4 "prompt" --mask MASK.png|MASK.mp4` (inpainting), `--outpaint 1.5x` /
//! `--canvas WxH` (outpainting), with `--reference subject.png`: edit a video with a VACE model
//! (`WanVACEPipeline`), through the one [`WanPipeline`].
//!
//! The source is conformed as `kino generate --video` conforms it (the model's or `--size`'s
//! size by resize-to-cover and centre crop, its first `--frames` frames at `--fps`). A mask is
//! read by [`kino_media::read_mask`] and fitted the same way ([`kino_media::conform_mask`]:
//! thresholded at 128, checked); VACE's recipe is then applied: the regenerated region is gray
//! 128 in the video the model sees (unless `--keep-masked`) with mask 255, the kept region the
//! real pixels with mask 0. Outpainting puts the source, scaled to fit, in the middle of a
//! wider gray canvas whose border is regenerated ([`kino_media::outpaint_canvas`]).
//!
//! The helpers for reference images ([`load_references`], [`vace_references`],
//! [`parse_conditioning_scale`], [`require_vace`]) serve `kino generate --reference` too.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context};
use kino_engine::progress::ProgressEvent;
use kino_engine::wan::pipeline::{
    Conditioning, GenerateRequest, GrayImage, RgbImage, VaceCondition, WanPipeline,
};
use kino_media::{Fps, Frame, GifOptions, Mp4Options, Outpaint};
use serde_json::json;

use super::generate::{self, Format, ProgressView};

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("region")
        .required(true)
        .args(["mask", "outpaint", "canvas"])
))]
pub struct Args {
    /// The video to edit (MP4, MOV, WebM, MKV: H.264, H.265, VP9, AV1, …).
    input: PathBuf,
    /// What the edited video shows (in the regenerated region).
    prompt: String,
    /// Inpainting: white = regenerate, black = keep. A picture (PNG, JPEG or WebP: the same
    /// mask on every frame) or a video (one mask per frame). It must have the source's shape;
    /// it is resized and cropped like the source and thresholded at 128.
    #[arg(long, value_name = "MASK.png|MASK.mp4")]
    mask: Option<PathBuf>,
    /// Show the model the original pixels under the mask instead of gray (VACE then changes
    /// them guided by what is there: recolouring, restyling a region). Default: gray, so the
    /// region is made anew.
    #[arg(long, requires = "mask")]
    keep_masked: bool,
    /// Keep the model's own pixels outside the mask (and, outpainting, over the source)
    /// instead of putting the source's back there. Default: the source outside the mask comes
    /// out exactly as given (diffusers' `apply_overlay`), not through the VAE.
    #[arg(long)]
    no_composite: bool,
    /// Outpainting: widen the frame by this factor, e.g. 1.5x (both sides) or 2x1 (twice as
    /// wide, as tall); the source is fitted inside the model's size (or --size) and the
    /// canvas rounded to the model's size multiple.
    #[arg(long, value_name = "1.5x|2x1")]
    outpaint: Option<String>,
    /// Outpainting to a given canvas, e.g. 832x480: the source is scaled to fit inside it,
    /// centred, and the rest is generated.
    #[arg(long, value_name = "WxH", conflicts_with = "outpaint")]
    canvas: Option<String>,
    /// A reference image (a subject, a style) for VACE to keep; repeat for several (order kept).
    #[arg(long, value_name = "subject.png")]
    reference: Vec<PathBuf>,
    /// How strongly VACE's control steers: one number for every VACE layer, or one per layer
    /// separated by commas (default 1).
    #[arg(long, value_name = "F or F,F,…")]
    conditioning_scale: Option<String>,
    /// A VACE model (see `kino models`) or folder. Default: $KINO_MODEL or kino-shapes.
    #[arg(long, short)]
    model: Option<String>,
    /// What the video should not show.
    #[arg(long)]
    negative: Option<String>,
    /// Width×height the source is fitted to (default: the model's); with --outpaint, the size
    /// the source is fitted inside before widening.
    #[arg(long)]
    size: Option<String>,
    /// Frames to edit, 4k+1 (default: the model's clip); a longer source gives its first ones.
    #[arg(long)]
    frames: Option<usize>,
    /// Frames per second of the output (default: the model's); the source is re-timed to it.
    #[arg(long)]
    fps: Option<u32>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Output: .mp4, .gif or a folder (PNG frames). Default: IN-edited.mp4 beside the input.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the output if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a machine-readable summary (JSON) on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Sampling and device settings shared with `kino generate`.
    #[command(flatten)]
    run: generate::RunArgs,
}

/// A reference image as read: its metadata record and its pixels.
pub(crate) struct Reference {
    pub meta: serde_json::Value,
    pub frame: Frame,
}

/// Reads `--reference` images (PNG, JPEG or WebP), in order.
pub(crate) fn load_references(paths: &[PathBuf]) -> anyhow::Result<Vec<Reference>> {
    paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                bail!(
                    "--reference {} is a folder; give a picture file",
                    p.display()
                );
            }
            let bytes = std::fs::read(p).with_context(|| {
                format!(
                    "cannot read the --reference {}; check that the file exists and is readable",
                    p.display()
                )
            })?;
            let frame = kino_media::decode_image(&bytes)
                .map_err(|e| anyhow::anyhow!("--reference {}: {e}", p.display()))?;
            Ok(Reference {
                meta: json!({
                    "name": file_name(p),
                    "sha256": kino_server::inputs::sha256_hex(&bytes),
                    "size": format!("{}x{}", frame.width(), frame.height()),
                }),
                frame,
            })
        })
        .collect()
}

/// `--conditioning-scale`: `F` or `F,F,…` (finite numbers).
pub(crate) fn parse_conditioning_scale(s: &str) -> anyhow::Result<Vec<f64>> {
    let v: Vec<f64> = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .with_context(|| {
                    format!(
                        "--conditioning-scale `{s}`: `{t}` is not a number; give one number \
                         (e.g. 1.0) or one per VACE layer separated by commas"
                    )
                })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(v)
}

/// Refuses a model without VACE with the engine's own message (it names the VACE models).
pub(crate) fn require_vace(pipeline: &WanPipeline, model_name: &str) -> anyhow::Result<()> {
    if pipeline.capabilities().vace {
        return Ok(());
    }
    let req = GenerateRequest {
        conditioning: Conditioning::Vace(VaceCondition::default()),
        ..Default::default()
    };
    match pipeline.resolve(&req) {
        Err(kino_engine::Error::InvalidRequest(m)) if m.contains("VACE") => {
            bail!("{model_name}: {m}")
        }
        _ => bail!(
            "{model_name}: this model takes no mask or reference images; VACE models do ({})",
            kino_engine::registry::vace_model_names().join(", ")
        ),
    }
}

/// The reference images as the engine takes them: each resized (Lanczos) to sides that are
/// multiples of [`WanPipeline::vace_reference_multiple`] when they are not already, as the
/// reference's preprocessing does. Records the fit in each `meta`.
pub(crate) fn vace_references(
    pipeline: &WanPipeline,
    refs: &mut [Reference],
) -> anyhow::Result<Vec<RgbImage>> {
    let m = pipeline.vace_reference_multiple() as u32;
    refs.iter_mut()
        .map(|r| {
            let snapped = kino_media::snap_to_multiple(&r.frame, m)?;
            let fitted =
                if (snapped.width(), snapped.height()) == (r.frame.width(), r.frame.height()) {
                    "kept as it is (letterboxed on white by the model)".to_string()
                } else {
                    format!(
                        "resized to {}×{} (multiples of {m}; letterboxed on white by the model)",
                        snapped.width(),
                        snapped.height()
                    )
                };
            eprintln!(
                "reference {} {} → {fitted}",
                r.meta["name"].as_str().unwrap_or("?"),
                r.meta["size"].as_str().unwrap_or("?"),
            );
            r.meta["fitted"] = json!(fitted);
            rgb(snapped)
        })
        .collect()
}

/// The conditioning of `kino generate --reference`: text or a first (and last) image, with
/// reference images, as one VACE condition (the images as kept frames of a gray video, VACE's
/// recipe).
pub(crate) fn with_references(
    pipeline: &WanPipeline,
    req: &GenerateRequest,
    references: Vec<RgbImage>,
    conditioning_scale: Vec<f64>,
) -> anyhow::Result<Conditioning> {
    let base = match &req.conditioning {
        Conditioning::Text => VaceCondition::default(),
        c @ Conditioning::Image { .. } => {
            let r = pipeline.resolve(req)?;
            pipeline.vace_condition(c, &r)?.into_owned()
        }
        other => bail!(
            "--reference cannot be combined with a {} input here; use kino edit IN.mp4 \
             \"…\" --mask MASK.png --reference subject.png",
            other.kind()
        ),
    };
    Ok(Conditioning::Vace(VaceCondition {
        reference_images: references,
        conditioning_scale,
        ..base
    }))
}

fn rgb(frame: Frame) -> anyhow::Result<RgbImage> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    Ok(RgbImage::new(w, h, frame.into_data())?)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn fmt_fps(f: Fps) -> String {
    if f.den() == 1 {
        f.num().to_string()
    } else {
        format!("{:.3}", f.as_f64())
    }
}

/// `IN-edited.mp4` beside the input (`-2`, `-3`, … when taken).
fn default_output(input: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into());
    let dir = input.parent().unwrap_or(Path::new(""));
    let mut p = dir.join(format!("{stem}-edited.mp4"));
    let mut i = 2;
    while p.exists() {
        p = dir.join(format!("{stem}-edited-{i}.mp4"));
        i += 1;
    }
    p
}

/// How the region to regenerate is given.
enum Region {
    Mask {
        path: PathBuf,
        sha256: String,
        mask: kino_media::MaskFrames,
    },
    Outpaint(Outpaint),
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    if a.prompt.trim().is_empty() {
        bail!(
            "the prompt is empty; say what the edited region should show, e.g. kino edit IN.mp4 \
             \"a red ball\" --mask MASK.png"
        );
    }
    kino_provenance::cli::open(&a.run.provenance, &[a.prompt.as_str()], "kino edit")?;
    let model_name = generate::model_name(a.model.as_deref());
    a.run.apply_preset(&model_name)?;
    let size = a.size.as_deref().map(generate::parse_size).transpose()?;
    let scale = a
        .conditioning_scale
        .as_deref()
        .map(parse_conditioning_scale)
        .transpose()?
        .unwrap_or_default();
    let output = a.output.clone().unwrap_or_else(|| default_output(&a.input));
    let format = generate::format_of(&output)?;

    // Everything a user can get wrong about the inputs is checked before the model opens.
    let region = match (&a.mask, &a.outpaint, &a.canvas) {
        (Some(p), _, _) => {
            let bytes = std::fs::read(p).with_context(|| {
                format!(
                    "cannot read the --mask {}; check that the file exists and is readable",
                    p.display()
                )
            })?;
            let mask = kino_media::decode_mask(&bytes)
                .map_err(|e| anyhow::anyhow!("--mask {}: {e}", p.display()))?;
            Region::Mask {
                path: p.clone(),
                sha256: kino_server::inputs::sha256_hex(&bytes),
                mask,
            }
        }
        (None, Some(f), _) => Region::Outpaint(Outpaint::parse_factor(f)?),
        (None, None, Some(c)) => {
            let (w, h) = generate::parse_size(c).map_err(|e| anyhow::anyhow!("--canvas: {e}"))?;
            Region::Outpaint(Outpaint::Canvas(w as u32, h as u32))
        }
        (None, None, None) => {
            bail!("say what to regenerate: --mask MASK.png, --outpaint 1.5x or --canvas WxH")
        }
    };
    let mut references = load_references(&a.reference)?;
    let source_sha = generate::sha256_file(&a.input, "the source video")?;
    let layout =
        kino_media::scan_video(&a.input).map_err(|e| anyhow::anyhow!("the source video: {e}"))?;
    if let Region::Mask { path, mask, .. } = &region {
        if mask.is_all_black() {
            bail!("--mask {}: {}", path.display(), kino_media::MASK_ALL_BLACK);
        }
        kino_media::check_mask_aspect(mask.width, mask.height, layout.width, layout.height)
            .map_err(|e| anyhow::anyhow!("--mask {}: {e}", path.display()))?;
    }
    generate::check_writable(&output, format, a.overwrite)?;

    let lora_meta = a.run.lora_metadata()?;
    let (model_dir, pipeline) = a.run.open(&model_name)?;
    require_vace(&pipeline, &model_name)?;
    let defaults = pipeline.defaults().clone();
    let fps = a.fps.unwrap_or(defaults.fps);
    if fps == 0 || fps > 240 {
        bail!(
            "--fps {fps} is out of range; use 1 to 240 (the model's default is {})",
            defaults.fps
        );
    }
    let out_fps = Fps::integer(fps)?;
    let frames = a.frames.unwrap_or(defaults.num_frames);
    let base = size.unwrap_or((defaults.width, defaults.height));
    // The size and frame count the engine will take (checked by it: multiples, 4k+1).
    let (width, height, plan) = match &region {
        Region::Mask { .. } => (base.0, base.1, None),
        Region::Outpaint(how) => {
            let (mw, mh) = pipeline.size_multiple();
            let plan = kino_media::outpaint_canvas(
                layout.width,
                layout.height,
                (base.0 as u32, base.1 as u32),
                *how,
                (mw as u32, mh as u32),
            )?;
            if plan.rounded() {
                eprintln!(
                    "canvas {}×{} rounded to {}×{} (this model's sizes are multiples of {mw}×{mh})",
                    plan.requested.0, plan.requested.1, plan.canvas.0, plan.canvas.1
                );
            }
            (plan.canvas.0 as usize, plan.canvas.1 as usize, Some(plan))
        }
    };
    let mut req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative.clone(),
        width: Some(width),
        height: Some(height),
        num_frames: Some(frames),
        num_inference_steps: a.run.steps,
        guidance_scale: a.run.guidance,
        shift: a.run.shift,
        seed: a.seed,
        ..Default::default()
    };
    // Size, length and steps first, with the engine's messages.
    pipeline.resolve(&req)?;

    // The source, conformed: the region the model sees (gray where it regenerates).
    let (sw, sh) = match &plan {
        Some(p) => p.inner,
        None => (width as u32, height as u32),
    };
    let mut source: Vec<Frame> = Vec::with_capacity(frames);
    kino_media::conform_video_file(
        &a.input,
        &layout,
        sw,
        sh,
        out_fps,
        frames,
        0..frames,
        &mut |_, f| {
            source.push(f);
            Ok(())
        },
    )
    .map_err(|e| {
        let e = e
            .to_string()
            .replace("--frames or --seconds", "--frames (4k+1)");
        anyhow::anyhow!("the source video {}: {e}", a.input.display())
    })?;
    let needed_note = if layout.fps != out_fps {
        format!(
            "{frames} frames at {fps} fps from {} fps (nearest frame; it has {})",
            fmt_fps(layout.fps),
            layout.len()
        )
    } else if layout.len() > frames {
        format!("its first {frames} frames (of {})", layout.len())
    } else {
        format!("all {frames} frames")
    };
    let fit = generate::describe_fit(layout.width, layout.height, sw, sh)?;
    let mut conditioning = serde_json::Map::new();
    conditioning.insert("kind".into(), json!("masked edit")); // the engine's word, set below
    let mut video_meta = json!({
        "name": file_name(&a.input),
        "sha256": source_sha,
        "size": format!("{}x{}", layout.width, layout.height),
        "frames": layout.len(),
        "fps": layout.fps.as_f64(),
        "fitted": format!("{needed_note}, {fit}"),
    });
    eprintln!(
        "source video {} {}×{} at {} fps → {needed_note}, {fit}",
        file_name(&a.input),
        layout.width,
        layout.height,
        fmt_fps(layout.fps)
    );
    let (video, masks): (Vec<Frame>, Vec<Vec<u8>>) = match (&region, &plan) {
        (Region::Mask { path, sha256, mask }, _) => {
            let (masks, report) = kino_media::conform_mask(
                mask,
                layout.width,
                layout.height,
                width as u32,
                height as u32,
                out_fps,
                frames,
            )
            .map_err(|e| anyhow::anyhow!("--mask {}: {e}", path.display()))?;
            if let Some(w) = report.warning() {
                eprintln!("warning: --mask {}: {w}", path.display());
            }
            let mut video = source;
            if !a.keep_masked {
                for (f, m) in video.iter_mut().zip(&masks) {
                    kino_media::fill_masked(f, m)?;
                }
            }
            let mask_fit = generate::describe_fit(layout.width, layout.height, sw, sh)?;
            let what = if mask.is_still() {
                "one picture for every frame".to_string()
            } else {
                format!(
                    "{} frames at {} fps",
                    mask.len(),
                    fmt_fps(mask.fps.unwrap_or(out_fps))
                )
            };
            eprintln!(
                "mask {} {}×{} ({what}) → {mask_fit}; {:.1}% of the video regenerated{}",
                file_name(path),
                mask.width,
                mask.height,
                report.white_fraction * 100.0,
                if a.keep_masked {
                    " (the model sees the original pixels there: --keep-masked)"
                } else {
                    " (gray there)"
                }
            );
            conditioning.insert(
                "mask".into(),
                json!({
                    "name": file_name(path),
                    "sha256": sha256,
                    "size": format!("{}x{}", mask.width, mask.height),
                    "frames": if mask.is_still() { json!("still") } else { json!(mask.len()) },
                    "fitted": format!("{mask_fit}, thresholded at 128"),
                    "regenerated": (report.white_fraction * 1e4).round() / 1e4,
                    "grey_fraction": (report.grey_fraction * 1e4).round() / 1e4,
                    "keep_masked": a.keep_masked,
                }),
            );
            (video, masks)
        }
        (Region::Outpaint(_), Some(p)) => {
            let video = source
                .iter()
                .map(|f| kino_media::paste_on_gray(f, p))
                .collect::<kino_media::Result<Vec<_>>>()?;
            let m = p.mask();
            eprintln!(
                "outpainting: the source {}×{} centred at ({}, {}) on a {}×{} canvas; the \
                 border is generated",
                p.inner.0, p.inner.1, p.offset.0, p.offset.1, p.canvas.0, p.canvas.1
            );
            video_meta["fitted"] = json!(format!(
                "{needed_note}, {fit}, centred on a {}x{} canvas",
                p.canvas.0, p.canvas.1
            ));
            conditioning.insert(
                "outpaint".into(),
                json!({
                    "canvas": format!("{}x{}", p.canvas.0, p.canvas.1),
                    "requested": format!("{}x{}", p.requested.0, p.requested.1),
                    "source_area": format!("{}x{} at {},{}", p.inner.0, p.inner.1, p.offset.0, p.offset.1),
                }),
            );
            (video, vec![m; frames])
        }
        (Region::Outpaint(_), None) => bail!("internal: outpainting without a plan"),
    };
    conditioning.insert("video".into(), video_meta);
    conditioning.insert("composite".into(), json!(!a.no_composite));
    let reference_images = vace_references(&pipeline, &mut references)?;
    if !references.is_empty() {
        conditioning.insert(
            "references".into(),
            json!(references
                .iter()
                .map(|r| r.meta.clone())
                .collect::<Vec<_>>()),
        );
    }
    if !scale.is_empty() {
        conditioning.insert("conditioning_scale".into(), json!(scale));
    }
    let (w, h) = (width, height);
    req.conditioning = Conditioning::Vace(VaceCondition {
        video: Some(video.into_iter().map(rgb).collect::<anyhow::Result<_>>()?),
        mask: Some(
            masks
                .into_iter()
                .map(|m| GrayImage::new(w, h, m))
                .collect::<kino_engine::Result<_>>()?,
        ),
        reference_images,
        conditioning_scale: scale,
        composite: !a.no_composite,
    });
    let resolved = pipeline.resolve(&req)?;
    conditioning.insert("kind".into(), json!(resolved.conditioning));
    req.seed = Some(resolved.seed);
    let conditioning = serde_json::Value::Object(conditioning);
    generate_and_write(
        pipeline,
        &req,
        &model_name,
        &model_dir,
        &output,
        format,
        fps,
        conditioning,
        lora_meta,
        &a.run,
        a.json,
    )
}

/// Runs the request and writes the output as `kino generate` does (same progress, same
/// writers: watermark, C2PA signing, metadata with `conditioning`).
#[allow(clippy::too_many_arguments)]
fn generate_and_write(
    mut pipeline: WanPipeline,
    req: &GenerateRequest,
    model_name: &str,
    model_dir: &Path,
    output: &Path,
    format: Format,
    fps: u32,
    conditioning: serde_json::Value,
    lora_meta: Option<serde_json::Value>,
    run: &generate::RunArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let r0 = pipeline.resolve(req)?;
    eprintln!(
        "kino: {} — {} ({}x{}, {} frames at {fps} fps, {} steps, guidance {}, shift {}, seed {})",
        model_dir.display(),
        r0.conditioning,
        r0.width,
        r0.height,
        r0.num_frames,
        r0.num_inference_steps,
        r0.guidance_scale,
        r0.shift,
        r0.seed
    );
    let cancel = generate::cancel_flag();
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
        pipeline.generate(req, &mut progress)
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
    let cache_meta = generate::report_cache(run, &pipeline)?;
    let r = &out.request;
    let video = kino_server::output::frames_to_video(out.frames, out.width, out.height, fps)?;
    let mut params = kino_server::output::generation_params(r, model_name, fps);
    params
        .extra
        .insert("conditioning".into(), conditioning.clone());
    if let Some(l) = &lora_meta {
        params.extra.insert("lora".into(), l.clone());
    }
    if let Some(c) = &cache_meta {
        params.extra.insert("cache".into(), c.clone());
    }
    let t_write = Instant::now();
    let (prov, subject) = (
        kino_provenance::cli::current()?,
        kino_provenance::cli::subject(model_dir, output),
    );
    match format {
        Format::Mp4 => {
            let opts = Mp4Options {
                metadata: Some(params.to_value()),
                ..Default::default()
            };
            prov.write_mp4(output, &video, &opts, &subject)?;
        }
        Format::Gif => {
            let meta = params.to_value();
            prov.write_gif(
                output,
                &video,
                &GifOptions::default(),
                Some(&meta),
                &subject,
            )?;
        }
        Format::PngFolder => {
            prov.write_png_frames(output, &video, Some(&params.to_value()), &subject)?;
        }
    }
    let write_secs = t_write.elapsed().as_secs_f64();
    generate::report_written(
        &generate::Written {
            output,
            format,
            model_name,
            model_dir,
            fps,
            frames: video.len(),
            duration: video.duration_secs(),
        },
        r,
        &conditioning,
        (gen_secs, write_secs, &view.stage_times),
        json_out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditioning_scales_parse_or_explain() {
        assert_eq!(parse_conditioning_scale("0.5").unwrap(), vec![0.5]);
        assert_eq!(
            parse_conditioning_scale("1, 0.5,2").unwrap(),
            vec![1.0, 0.5, 2.0]
        );
        let e = parse_conditioning_scale("1,x").unwrap_err().to_string();
        assert!(e.contains("`x` is not a number"), "{e}");
        assert!(parse_conditioning_scale("nan").is_err());
    }

    #[test]
    fn default_output_is_beside_the_input() {
        let p = default_output(Path::new("/nonexistent-dir/clip.mov"));
        assert_eq!(p, Path::new("/nonexistent-dir/clip-edited.mp4"));
    }
}
