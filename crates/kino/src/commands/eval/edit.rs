//! `kino eval --edit` and `kino eval --reference`: the VACE modes, on the shapes world.
//!
//! Both run every held-out case × seed through [`WanPipeline::generate`] with
//! [`Conditioning::Vace`] and read the result back from the pixels ([`super::analyse`]):
//!
//! - **edit** (recolour inside a mask): the case's scene ([`Scene::for_case`]) is drawn in
//!   another colour of the palette (neither the case's nor the background's) as the source
//!   clip; the mask is the object's box grown by [`EDIT_MARGIN`] px in every frame (255 =
//!   regenerate), the masked pixels gray 128 (what `kino edit` sends by default); the prompt is
//!   the case's, so it names the new colour. Scored: the object comes out in the prompted
//!   colour; and outside the mask, the PSNR of the output against the source next to the PSNR
//!   of a plain VAE round trip of the source (encode, decode) against the source: the gap
//!   (round trip − output) should be within [`PSNR_GAP_BAR`] dB, i.e. the edit leaves the rest
//!   of the frame as well as the VAE alone can.
//! - **reference**: a reference image of the case's object alone (its colour and shape, on
//!   white, or gray for a white object; another seeded size and position than any frame of the
//!   video), no video; the prompt leaves out colour and shape ("an object moving right on a
//!   black background"). Scored: the video's object has the reference's colour and shape.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use kino_engine::wan::pipeline::{
    frames_to_tensor, video_to_frames, Conditioning, GenerateOutput, GenerateRequest, GrayImage,
    RgbImage, VaceCondition, WanPipeline,
};
use kino_media::Mp4Options;

use super::analyse::{analyse, Analysis, Case, EvalSpec};
use super::mean;
use super::world::Scene;

/// Pixels the edit mask extends beyond the drawn object on each side (training/train_vace.py's
/// `EVAL_MARGIN`).
pub const EDIT_MARGIN: f64 = 3.0;
/// The gray the masked pixels get (VACE's preprocessing, `kino edit`'s default).
const GRAY: u8 = 128;
/// Issue 13's bar: outside the mask, the output within this many dB of the VAE round trip.
pub const PSNR_GAP_BAR: f64 = 2.0;
/// PSNR of identical pixels is infinite; reported as this.
const PSNR_CAP: f64 = 99.0;

/// Which VACE mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Edit,
    Reference,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Edit => "edit",
            Mode::Reference => "reference",
        }
    }
}

/// The source colour of an edit: the palette's colours other than the case's and the
/// background's, one chosen by case and seed.
fn source_colour(spec: &EvalSpec, case: &Case, index: usize, seed: u64) -> anyhow::Result<String> {
    let options: Vec<&String> = spec
        .colours
        .keys()
        .filter(|c| **c != case.colour && **c != case.background)
        .collect();
    if options.is_empty() {
        bail!(
            "the palette has no colour other than {:?} and the background {:?} to edit from",
            case.colour,
            case.background
        );
    }
    Ok(options[(index + seed as usize) % options.len()].clone())
}

/// The object's box grown by `margin` px in every frame: 255 inside, 0 outside
/// (train_vace.py's `box_masks`).
pub fn box_masks(scene: &Scene, w: usize, h: usize, frames: usize, margin: f64) -> Vec<GrayImage> {
    let r = scene.size / 2.0 + margin;
    (0..frames)
        .map(|f| {
            let (cx, cy) = scene.centre(f as f64, frames);
            let x0 = (cx - r).floor().max(0.0) as usize;
            let x1 = ((cx + r).ceil().max(0.0) as usize).min(w);
            let y0 = (cy - r).floor().max(0.0) as usize;
            let y1 = ((cy + r).ceil().max(0.0) as usize).min(h);
            let mut m = GrayImage::filled(w, h, 0);
            for y in y0..y1 {
                m.data[y * w + x0..y * w + x1.max(x0)].fill(255);
            }
            m
        })
        .collect()
}

/// PSNR (dB) of `a` against `b` over the pixels where every mask is 0 (all channels, all
/// frames); `None` if the mask leaves no pixel.
pub fn psnr_outside(a: &[Vec<u8>], b: &[Vec<u8>], masks: &[GrayImage]) -> Option<f64> {
    let (mut se, mut n) = (0f64, 0usize);
    for ((fa, fb), m) in a.iter().zip(b).zip(masks) {
        for (i, &mv) in m.data.iter().enumerate() {
            if mv != 0 {
                continue;
            }
            for c in 0..3 {
                let d = f64::from(fa[i * 3 + c]) - f64::from(fb[i * 3 + c]);
                se += d * d;
            }
            n += 3;
        }
    }
    if n == 0 {
        return None;
    }
    let mse = se / n as f64;
    Some(if mse == 0.0 {
        PSNR_CAP
    } else {
        (10.0 * (255.0f64 * 255.0 / mse).log10()).min(PSNR_CAP)
    })
}

/// One generated video of an edit or reference run.
#[derive(serde::Serialize)]
struct VaceRun {
    prompt: String,
    seed: u64,
    expected: Case,
    detected: Analysis,
    scene: Scene,
    /// Edit: the source clip's object colour.
    #[serde(skip_serializing_if = "Option::is_none")]
    source_colour: Option<String>,
    /// Reference: the reference image's scene (frame 0 is the image).
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<Scene>,
    /// Edit: PSNR outside the mask, output vs source and VAE round trip vs source, and the gap.
    #[serde(skip_serializing_if = "Option::is_none")]
    psnr_output_db: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    psnr_round_trip_db: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    psnr_gap_db: Option<f64>,
    colour_ok: bool,
    /// Reference: the reference's shape; edit: the case's (not a bar, reported).
    shape_ok: bool,
    motion_ok: bool,
    background_ok: bool,
    seconds: f64,
}

fn frames_to_images(frames: &[Vec<u8>], w: usize, h: usize) -> anyhow::Result<Vec<RgbImage>> {
    frames
        .iter()
        .map(|f| Ok(RgbImage::new(w, h, f.clone())?))
        .collect()
}

/// The VAE's own round trip of `frames` (encode, decode, 8-bit), what the best edit can keep.
fn round_trip(
    pipeline: &mut WanPipeline,
    frames: &[Vec<u8>],
    w: usize,
    h: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let x = frames_to_tensor(&frames_to_images(frames, w, h)?, &Device::Cpu)?;
    let z = pipeline.encode_latents(&x, &mut kino_engine::progress::ignore)?;
    let v = pipeline.decode(&z, &mut kino_engine::progress::ignore)?;
    Ok(video_to_frames(&v)?)
}

fn save_mp4(
    dir: &Path,
    name: &str,
    out: GenerateOutput,
    model: &str,
    fps: u32,
) -> anyhow::Result<()> {
    let path = dir.join(name);
    let params = kino_server::output::generation_params(&out.request, model, fps);
    let video = kino_server::output::frames_to_video(out.frames, out.width, out.height, fps)?;
    let opts = Mp4Options {
        metadata: Some(params.to_value()),
        ..Default::default()
    };
    kino_media::write_mp4(&path, &video, &opts)
        .with_context(|| format!("writing {}", path.display()))
}

/// How `--edit` / `--reference` condition the VACE branch beyond the case itself.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// With `--edit`: put the source back outside the mask, as `kino edit` does.
    pub composite: bool,
    /// The VACE conditioning scale (empty: the reference's 1.0), as `kino edit
    /// --conditioning-scale`.
    pub conditioning_scale: Vec<f64>,
}

/// Runs `--edit` or `--reference` over every case × seed and prints (or returns as JSON) the
/// table.
#[allow(clippy::too_many_arguments)]
pub fn run(
    pipeline: &mut WanPipeline,
    spec: &EvalSpec,
    mode: Mode,
    seeds: u64,
    sampling: super::Sampling,
    json: bool,
    model: &str,
    model_dir: &Path,
    save: Option<&Path>,
    opts: &Options,
) -> anyhow::Result<()> {
    let composite = opts.composite;
    if !pipeline.capabilities().vace {
        bail!(
            "{} is not a VACE model (its model_index.json names no WanVACEPipeline), so it takes \
             no masks or reference images; `kino eval --{}` needs one such as \
             models/kino-shapes-vace",
            model_dir.display(),
            mode.name()
        );
    }
    let fps = pipeline.defaults().fps;
    let probe = pipeline.resolve(&GenerateRequest {
        prompt: spec.cases[0].prompt.clone(),
        num_inference_steps: sampling.steps,
        guidance_scale: sampling.guidance,
        shift: sampling.shift,
        ..Default::default()
    })?;
    let (w, h, n) = (probe.width, probe.height, probe.num_frames);
    let total = spec.cases.len() as u64 * seeds;
    eprintln!(
        "kino eval --{}: {} — {} cases × {seeds} seeds, {w}x{h}, {n} frames, {} steps, guidance {}",
        mode.name(),
        model_dir.display(),
        spec.cases.len(),
        probe.num_inference_steps,
        probe.guidance_scale
    );
    let multiple = pipeline.vace_reference_multiple().max(1);
    let started = Instant::now();
    let mut runs: Vec<VaceRun> = Vec::new();
    for (i, case) in spec.cases.iter().enumerate() {
        for seed in 0..seeds {
            let t0 = Instant::now();
            let scene = Scene::for_case(spec, i, case, seed, w, h)?;
            let mut source_name = None;
            let mut reference = None;
            let mut masks = Vec::new();
            let mut source = Vec::new();
            let (prompt, condition) = match mode {
                Mode::Edit => {
                    let from = source_colour(spec, case, i, seed)?;
                    let src_scene = Scene {
                        colour: spec.colours[&from],
                        ..scene.clone()
                    };
                    source = (0..n).map(|f| src_scene.render(w, h, f, n)).collect();
                    masks = box_masks(&scene, w, h, n, EDIT_MARGIN);
                    let video: Vec<Vec<u8>> = source
                        .iter()
                        .zip(&masks)
                        .map(|(f, m)| {
                            let mut f = f.clone();
                            for (p, &mv) in m.data.iter().enumerate() {
                                if mv > 127 {
                                    f[p * 3..p * 3 + 3].fill(GRAY);
                                }
                            }
                            f
                        })
                        .collect();
                    source_name = Some(from);
                    (
                        case.prompt.clone(),
                        VaceCondition {
                            video: Some(frames_to_images(&video, w, h)?),
                            mask: Some(masks.clone()),
                            composite,
                            conditioning_scale: opts.conditioning_scale.clone(),
                            ..Default::default()
                        },
                    )
                }
                Mode::Reference => {
                    // The reference: the object alone, at the size and place another seed
                    // gives, on white (gray for a white object), at the size the reference's
                    // preprocessing snaps to (multiples of vace_reference_multiple).
                    let (rw, rh) = ((w / multiple) * multiple, (h / multiple) * multiple);
                    let mut r = Scene::for_case(spec, i, case, seed + 1000, rw.max(1), rh.max(1))?;
                    r.background = if case.colour == "white" {
                        [128, 128, 128]
                    } else {
                        [255, 255, 255]
                    };
                    let image = RgbImage::new(rw, rh, r.render(rw, rh, 0, n))?;
                    reference = Some(r);
                    (
                        format!(
                            "an object moving {} on a {} background",
                            case.motion, case.background
                        ),
                        VaceCondition {
                            reference_images: vec![image],
                            conditioning_scale: opts.conditioning_scale.clone(),
                            ..Default::default()
                        },
                    )
                }
            };
            let req = GenerateRequest {
                prompt: prompt.clone(),
                seed: Some(seed),
                num_inference_steps: sampling.steps,
                guidance_scale: sampling.guidance,
                shift: sampling.shift,
                conditioning: Conditioning::Vace(condition),
                ..Default::default()
            };
            let out = pipeline
                .generate(&req, &mut kino_engine::progress::ignore)
                .with_context(|| format!("generating {prompt:?} with seed {seed}"))?;
            let found = analyse(&out.frames, out.width, out.height, spec)?;
            let (mut psnr_out, mut psnr_rt, mut gap) = (None, None, None);
            if mode == Mode::Edit {
                psnr_out = psnr_outside(&out.frames, &source, &masks);
                let rt = round_trip(pipeline, &source, w, h)?;
                psnr_rt = psnr_outside(&rt, &source, &masks);
                gap = psnr_rt.zip(psnr_out).map(|(r, o)| r - o);
            }
            let seconds = t0.elapsed().as_secs_f64();
            let run = VaceRun {
                prompt: prompt.clone(),
                seed,
                expected: case.clone(),
                colour_ok: found.colour == case.colour,
                shape_ok: found.shape == case.shape,
                motion_ok: found.motion == case.motion,
                background_ok: found.background == case.background,
                detected: found,
                scene,
                source_colour: source_name,
                reference,
                psnr_output_db: psnr_out,
                psnr_round_trip_db: psnr_rt,
                psnr_gap_db: gap,
                seconds,
            };
            eprintln!(
                "[{}/{total}] {prompt:?} seed {seed}{}: {seconds:.1} s — {} {} {} on {}{}",
                runs.len() + 1,
                run.source_colour
                    .as_ref()
                    .map(|c| format!(" (from {c})"))
                    .unwrap_or_default(),
                run.detected.colour,
                run.detected.shape,
                run.detected.motion,
                run.detected.background,
                match (psnr_out, psnr_rt) {
                    (Some(o), Some(r)) => format!(", outside the mask {o:.1} dB (VAE {r:.1} dB)"),
                    _ => String::new(),
                }
            );
            if let Some(dir) = save {
                let name = format!(
                    "{:03}-{}-{}-seed{seed}.mp4",
                    i + 1,
                    mode.name(),
                    super::super::generate::slug(&case.prompt)
                );
                save_mp4(dir, &name, out, model, fps)?;
            }
            runs.push(run);
        }
    }
    report(
        &runs,
        mode,
        spec,
        seeds,
        &probe,
        started.elapsed().as_secs_f64(),
        json,
        model,
        opts,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    runs: &[VaceRun],
    mode: Mode,
    spec: &EvalSpec,
    seeds: u64,
    probe: &kino_engine::wan::pipeline::ResolvedRequest,
    secs: f64,
    json: bool,
    model: &str,
    opts: &Options,
) -> anyhow::Result<()> {
    let composite = opts.composite;
    let n = runs.len();
    let share = |f: &dyn Fn(&VaceRun) -> bool| runs.iter().filter(|r| f(r)).count();
    let frac = |c: usize| c as f64 / n.max(1) as f64;
    let colour = share(&|r| r.colour_ok);
    let shape = share(&|r| r.shape_ok);
    let motion = share(&|r| r.motion_ok);
    let background = share(&|r| r.background_ok);
    let psnr_out = mean(runs.iter().filter_map(|r| r.psnr_output_db));
    let psnr_rt = mean(runs.iter().filter_map(|r| r.psnr_round_trip_db));
    let gap = mean(runs.iter().filter_map(|r| r.psnr_gap_db));
    let gaps: Vec<f64> = runs.iter().filter_map(|r| r.psnr_gap_db).collect();
    let within = gaps.iter().filter(|&&g| g <= PSNR_GAP_BAR).count();
    let misses: Vec<&VaceRun> = runs
        .iter()
        .filter(|r| match mode {
            Mode::Edit => !r.colour_ok || r.psnr_gap_db.is_none_or(|g| g > PSNR_GAP_BAR),
            Mode::Reference => !r.colour_ok || !r.shape_ok,
        })
        .collect();
    let by_shape = super::shape_rows(
        runs.iter()
            .map(|r| (r.expected.shape.as_str(), r.shape_ok, &r.detected)),
    );
    if json {
        let acc = |c: usize| serde_json::json!({"correct": c, "total": n, "accuracy": frac(c)});
        let mut v = serde_json::json!({
            "model": model,
            "mode": mode.name(),
            "cases": spec.cases.len(),
            "seeds": seeds,
            "steps": probe.num_inference_steps,
            "videos": n,
            "seconds": secs,
            "accuracy": {
                "colour": acc(colour),
                "shape": acc(shape),
                "motion": acc(motion),
                "background": acc(background),
            },
            "shape_by_asked_shape": by_shape,
            "misses": misses,
            "runs": runs,
        });
        if !opts.conditioning_scale.is_empty() {
            v["conditioning_scale"] = serde_json::json!(opts.conditioning_scale);
        }
        if mode == Mode::Edit {
            v["psnr_outside_mask_db"] = serde_json::json!({
                "output": psnr_out,
                "vae_round_trip": psnr_rt,
                "gap": gap,
                "within_bar": {"correct": within, "total": gaps.len(),
                               "accuracy": within as f64 / gaps.len().max(1) as f64},
                "bar_db": PSNR_GAP_BAR,
            });
            v["edit_margin_px"] = serde_json::json!(EDIT_MARGIN);
            v["composite"] = serde_json::json!(composite);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{n} videos ({} cases × {seeds} seeds, {} steps, --{}) in {secs:.1} s",
        spec.cases.len(),
        probe.num_inference_steps,
        mode.name()
    );
    if !opts.conditioning_scale.is_empty() {
        println!("VACE conditioning scale {:?}", opts.conditioning_scale);
    }
    match mode {
        Mode::Edit => println!(
            "edit: the case's scene drawn in another colour, its box (+{EDIT_MARGIN} px) masked \
             gray; the prompt names the case's colour; outside the mask {}",
            if composite {
                "the source put back, as kino edit does (--no-composite: the model's own pixels)"
            } else {
                "the model's own pixels (--no-composite)"
            }
        ),
        Mode::Reference => println!(
            "reference: the object alone on white as the reference image; the prompt leaves out \
             colour and shape"
        ),
    }
    println!();
    println!("{:<46} {:>12} {:>10}", "measure", "value", "bar");
    let pct = |c: usize| format!("{:.1}%", 100.0 * frac(c));
    let db = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.2} dB"));
    match mode {
        Mode::Edit => {
            println!(
                "{:<46} {:>12} {:>10}",
                "colour as prompted",
                pct(colour),
                "≥ 90%"
            );
            println!(
                "{:<46} {:>12} {:>10}",
                "PSNR outside the mask: output vs source",
                db(psnr_out),
                ""
            );
            println!(
                "{:<46} {:>12} {:>10}",
                "PSNR outside the mask: VAE round trip",
                db(psnr_rt),
                ""
            );
            println!(
                "{:<46} {:>12} {:>10}",
                "gap (round trip − output), mean",
                db(gap),
                "≤ 2 dB"
            );
            println!(
                "{:<46} {:>12} {:>10}",
                "videos within 2 dB of the round trip",
                format!("{:.1}%", 100.0 * within as f64 / gaps.len().max(1) as f64),
                ""
            );
            println!("{:<46} {:>12} {:>10}", "shape as the case", pct(shape), "");
        }
        Mode::Reference => {
            println!(
                "{:<46} {:>12} {:>10}",
                "colour as the reference",
                pct(colour),
                "≥ 90%"
            );
            println!(
                "{:<46} {:>12} {:>10}",
                "shape as the reference",
                pct(shape),
                "≥ 80%"
            );
        }
    }
    println!(
        "{:<46} {:>12} {:>10}",
        "motion as prompted",
        pct(motion),
        ""
    );
    println!(
        "{:<46} {:>12} {:>10}",
        "background as prompted",
        pct(background),
        ""
    );
    println!("{}", super::shape_line(&by_shape));
    println!();
    if misses.is_empty() {
        println!("misses: none");
    } else {
        println!("misses ({}):", misses.len());
        for r in misses {
            let mut what = Vec::new();
            if !r.colour_ok {
                what.push(format!(
                    "colour {} → {}",
                    r.expected.colour, r.detected.colour
                ));
            }
            if mode == Mode::Reference && !r.shape_ok {
                what.push(format!("shape {} → {}", r.expected.shape, r.detected.shape));
            }
            if mode == Mode::Edit {
                match r.psnr_gap_db {
                    Some(g) if g > PSNR_GAP_BAR => {
                        what.push(format!("outside the mask {g:.1} dB below the round trip"))
                    }
                    None => what.push("no pixel outside the mask".into()),
                    _ => {}
                }
            }
            println!("  {:?} seed {}: {}", r.prompt, r.seed, what.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene() -> Scene {
        Scene {
            shape: "square".into(),
            colour: [220, 40, 40],
            background: [0, 0, 0],
            motion: "right".into(),
            size: 20.0,
            x0: 20.0,
            y0: 30.0,
            travel: 16.0,
        }
    }

    #[test]
    fn box_masks_cover_the_object_with_the_margin() {
        let s = scene();
        let masks = box_masks(&s, 64, 64, 17, EDIT_MARGIN);
        assert_eq!(masks.len(), 17);
        for (f, m) in masks.iter().enumerate() {
            let px = s.render(64, 64, f, 17);
            for (i, &mv) in m.data.iter().enumerate() {
                if px[i * 3] != 0 {
                    assert_eq!(mv, 255, "frame {f}: object pixel {i} outside the mask");
                }
            }
            let inside = m.data.iter().filter(|&&v| v == 255).count();
            // 20 px + 2·3 margin, rounded outwards: 26–28 px a side.
            assert!((26 * 26..=28 * 28).contains(&inside), "{inside}");
        }
    }

    #[test]
    fn psnr_outside_ignores_the_masked_pixels() {
        let a = vec![vec![10u8; 4 * 3]];
        let mut b = a.clone();
        let mask = vec![GrayImage::new(2, 2, vec![255, 0, 0, 0]).unwrap()];
        b[0][0] = 200; // inside the mask
        assert_eq!(psnr_outside(&a, &b, &mask), Some(PSNR_CAP));
        b[0][3] = 20; // outside: one channel of one pixel off by 10 (MSE 100 / 9)
        let p = psnr_outside(&a, &b, &mask).unwrap();
        let want = 10.0 * (255.0f64 * 255.0 / (100.0 / 9.0)).log10();
        assert!((p - want).abs() < 1e-9, "{p} vs {want}");
        let all = vec![GrayImage::filled(2, 2, 255)];
        assert_eq!(psnr_outside(&a, &b, &all), None);
    }
}
