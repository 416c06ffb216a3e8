//! `kino eval --long K`: what breaks long videos, measured on the shapes world.
//!
//! Every held-out case is made as a long video of K segments through the engine's long-video
//! plan ([`kino_engine::long_video`]: segment 0 from the case's prompt, each later one
//! continuing the last frame made so far), the direction turning clockwise at every segment
//! (right, then down, then left, then up keeps the object in frame), the colour, shape and
//! background staying the case's. Each segment's frames are read back from the pixels
//! ([`super::analyse`]) and scored:
//!
//! - kept across segments (what long videos break; segments 1..K, each against segment 0 of
//!   its video): the object shows the colour and shape segment 0 showed, its size within
//!   ×0.8–1.25 of segment 0's; the colour drift is the RGB distance of its measured colour from
//!   segment 0's;
//! - as prompted (every segment, against the case): the colour and shape the prompt asked for
//!   (segment 0's own misses, the single-clip model's, count in every segment here);
//! - direction: the segment moves the way its prompt says;
//! - seams: the jump of the object's centre from the last frame of a segment to the first of
//!   the next, beyond the motion's own step (the median centre step between frames inside the
//!   segment before it); a seam where either frame shows no object is counted apart, not as a
//!   jump.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use kino_engine::long_video::{self, LongRequest, Start};
use kino_engine::wan::pipeline::GenerateRequest;

use super::analyse::{analyse, object_centre, Analysis, Case, EvalSpec};
use super::mean;

/// Clockwise: the direction after `d`.
fn turn(d: &str) -> &'static str {
    match d {
        "right" => "down",
        "down" => "left",
        "left" => "up",
        _ => "right",
    }
}

/// The prompts of a case's K segments: the case's own, then the grammar's plain form with the
/// direction turned clockwise each time.
pub fn segment_prompts(case: &Case, k: usize) -> (Vec<String>, Vec<String>) {
    let mut prompts = vec![case.prompt.clone()];
    let mut dirs = vec![case.motion.clone()];
    for _ in 1..k {
        let d = turn(dirs.last().map(String::as_str).unwrap_or("right")).to_string();
        prompts.push(format!(
            "a {} {} moving {d} on a {} background",
            case.colour, case.shape, case.background
        ));
        dirs.push(d);
    }
    (prompts, dirs)
}

/// Segment size within this factor of segment 0's (either way) counts as kept.
const SIZE_KEPT: f64 = 1.25;

#[derive(serde::Serialize)]
struct SegmentScore {
    direction: String,
    detected: Analysis,
    /// Against the case: the prompted colour and shape.
    colour_as_prompted: bool,
    shape_as_prompted: bool,
    /// Against segment 0 of the same video (`None` for segment 0): the same colour and shape
    /// as it showed, the size within ×1/1.25–1.25 of its size.
    colour_kept: Option<bool>,
    shape_kept: Option<bool>,
    size_kept: Option<bool>,
    direction_ok: bool,
    /// RGB distance of the object's colour from segment 0's.
    colour_drift: Option<f64>,
    /// Object size against segment 0's.
    size_ratio: Option<f64>,
    /// Into this segment from the one before: the centre's jump between the two frames either
    /// side of the seam (px), the motion's own step before it, and the jump beyond that step
    /// (segment 0 has none; `None` too where either frame shows no object).
    seam_jump: Option<f64>,
    seam_step: Option<f64>,
    seam_excess: Option<f64>,
    /// A seam (segment ≥ 1) where the last frame before or the first after shows no object.
    seam_without_object: bool,
}

#[derive(serde::Serialize)]
struct LongRun {
    prompt: String,
    seed: u64,
    segments: Vec<SegmentScore>,
    seconds: f64,
}

/// The median distance between the object's centres in consecutive frames.
fn median_step(centres: &[Option<[f64; 2]>]) -> Option<f64> {
    let mut steps: Vec<f64> = centres
        .windows(2)
        .filter_map(|w| match (w[0], w[1]) {
            (Some(a), Some(b)) => Some((a[0] - b[0]).hypot(a[1] - b[1])),
            _ => None,
        })
        .collect();
    if steps.is_empty() {
        return None;
    }
    steps.sort_by(f64::total_cmp);
    Some(steps[steps.len() / 2])
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

/// Writes a long video's frames as one PNG: a row per segment, its frames left to right.
fn contact_sheet(path: &Path, rows: &[Vec<Vec<u8>>], w: usize, h: usize) -> anyhow::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (sw, sh) = (cols * (w + 1), rows.len().max(1) * (h + 1));
    let mut px = vec![255u8; sw * sh * 3];
    for (r, frames) in rows.iter().enumerate() {
        for (c, f) in frames.iter().enumerate() {
            for y in 0..h {
                let dst = ((r * (h + 1) + y) * sw + c * (w + 1)) * 3;
                px[dst..dst + w * 3].copy_from_slice(&f[y * w * 3..(y + 1) * w * 3]);
            }
        }
    }
    let frame = kino_media::Frame::new(sw as u32, sh as u32, px)?;
    kino_media::write_image(path, &frame).with_context(|| format!("writing {}", path.display()))
}

fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f64 {
    (0..3)
        .map(|c| (f64::from(a[c]) - f64::from(b[c])).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Runs the long-video evaluation and prints (or returns as JSON) its table.
#[allow(clippy::too_many_arguments)]
pub fn run(
    pipeline: &mut kino_engine::wan::pipeline::WanPipeline,
    spec: &EvalSpec,
    segments: usize,
    seeds: u64,
    sampling: super::Sampling,
    json: bool,
    model: &str,
    save: Option<&Path>,
    overlap: Option<usize>,
    color_match: bool,
) -> anyhow::Result<()> {
    if segments < 2 {
        bail!("--long {segments}: a long video needs at least 2 segments; try --long 4");
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    let total = spec.cases.len() as u64 * seeds;
    for (i, case) in spec.cases.iter().enumerate() {
        for seed in 0..seeds {
            let t0 = Instant::now();
            let (prompts, dirs) = segment_prompts(case, segments);
            let req = LongRequest {
                request: GenerateRequest {
                    prompt: case.prompt.clone(),
                    seed: Some(seed),
                    num_inference_steps: sampling.steps,
                    guidance_scale: sampling.guidance,
                    shift: sampling.shift,
                    ..Default::default()
                },
                prompts,
                total_frames: None,
                overlap,
                color_match: Some(color_match),
            };
            let plan = long_video::plan(pipeline, &req, &Start::Text)?;
            let mut scores: Vec<SegmentScore> = Vec::new();
            let mut first: Option<Analysis> = None;
            let mut last_centre: Option<[f64; 2]> = None;
            let mut last_step: Option<f64> = None;
            let mut sheet: Vec<Vec<Vec<u8>>> = Vec::new();
            let mut size = (0, 0);
            let mut on_segment = |s: long_video::SegmentFrames<'_>| -> kino_engine::Result<()> {
                let k = s.segment.index;
                let found = analyse(&s.frames, s.width, s.height, spec)
                    .map_err(|e| kino_engine::Error::InvalidRequest(e.to_string()))?;
                let centres: Vec<Option<[f64; 2]>> = s
                    .frames
                    .iter()
                    .map(|f| object_centre(f, s.width, s.height))
                    .collect();
                // Across the seam: from the last frame before it through the blended frames
                // (with --overlap) to the first new one, the largest hop.
                let window: Option<Vec<[f64; 2]>> = std::iter::once(last_centre)
                    .chain(centres.iter().take(s.segment.blend + 1).copied())
                    .collect();
                let seam_jump = window.filter(|w| k > 0 && w.len() > 1).map(|w| {
                    w.windows(2)
                        .map(|p| (p[0][0] - p[1][0]).hypot(p[0][1] - p[1][1]))
                        .fold(0.0, f64::max)
                });
                let seam_step = if k > 0 { last_step } else { None };
                let seam_excess = seam_jump.map(|jump| (jump - seam_step.unwrap_or(0.0)).max(0.0));
                let later = k > 0;
                let base = first.get_or_insert_with(|| found.clone());
                let colour_drift = base.rgb.zip(found.rgb).map(|(a, b)| rgb_distance(a, b));
                let size_ratio = (base.size > 0.0).then(|| found.size / base.size);
                scores.push(SegmentScore {
                    direction: dirs[k].clone(),
                    colour_as_prompted: found.colour == case.colour,
                    shape_as_prompted: found.shape == case.shape,
                    colour_kept: later.then(|| found.colour == base.colour),
                    shape_kept: later.then(|| found.shape == base.shape),
                    size_kept: later.then(|| {
                        size_ratio.is_some_and(|r| (1.0 / SIZE_KEPT..=SIZE_KEPT).contains(&r))
                    }),
                    direction_ok: found.motion == dirs[k],
                    colour_drift: colour_drift.filter(|_| later),
                    size_ratio: size_ratio.filter(|_| later),
                    seam_jump,
                    seam_step,
                    seam_excess,
                    seam_without_object: later && seam_jump.is_none(),
                    detected: found,
                });
                last_centre = centres.last().copied().flatten();
                last_step = median_step(&centres);
                if save.is_some() {
                    size = (s.width, s.height);
                    sheet.push(s.frames);
                }
                Ok(())
            };
            long_video::generate(
                pipeline,
                &plan,
                &Start::Text,
                None,
                &mut on_segment,
                &mut |_| Ok(()),
            )
            .with_context(|| format!("generating {:?} with seed {seed}", case.prompt))?;
            let seconds = t0.elapsed().as_secs_f64();
            if let Some(dir) = save {
                let path = dir.join(format!(
                    "{:03}-{}-seed{seed}.png",
                    i + 1,
                    super::super::generate::slug(&case.prompt)
                ));
                contact_sheet(&path, &sheet, size.0, size.1)?;
            }
            eprintln!(
                "[{}/{total}] {:?} seed {seed}: {seconds:.1} s — {}",
                runs.len() + 1,
                case.prompt,
                scores
                    .iter()
                    .map(|s| format!(
                        "{} {} {}{}",
                        s.detected.colour,
                        s.detected.shape,
                        s.detected.motion,
                        s.seam_excess
                            .map(|e| format!(" (seam +{e:.1} px)"))
                            .unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            runs.push(LongRun {
                prompt: case.prompt.clone(),
                seed,
                segments: scores,
                seconds,
            });
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let all: Vec<&SegmentScore> = runs.iter().flat_map(|r| &r.segments).collect();
    let n = all.len();
    let total = summarise(&all);
    let per_segment: Vec<Summary> = (0..segments)
        .map(|k| {
            summarise(
                &runs
                    .iter()
                    .filter_map(|r| r.segments.get(k))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    if json {
        let v = serde_json::json!({
            "model": model,
            "mode": "long",
            "segments_per_video": segments,
            "cases": spec.cases.len(),
            "seeds": seeds,
            "segments": n,
            "seconds": secs,
            "colour_kept": total.colour_kept,
            "shape_kept": total.shape_kept,
            "size_kept": total.size_kept,
            "colour_as_prompted": total.colour_as_prompted,
            "shape_as_prompted": total.shape_as_prompted,
            "direction": total.direction,
            "mean_seam_excess_px": total.mean_seam_excess_px,
            "median_seam_excess_px": total.median_seam_excess_px,
            "seams_measured": total.seams_measured,
            "seams_without_object": total.seams_without_object,
            "mean_colour_drift": total.mean_colour_drift,
            "size_ratio": total.size_ratio,
            "per_segment": per_segment,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} long videos ({} cases × {seeds} seeds × {segments} segments, {n} segments) in {secs:.1} s",
        runs.len(),
        spec.cases.len()
    );
    println!(
        "kept: segments 1..{} against segment 0 of their video; as prompted: every segment \
         against the case",
        segments - 1
    );
    println!();
    let pct = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{:.1}%", 100.0 * x));
    let px = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.2}"));
    let one = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.1}"));
    let cols: Vec<&Summary> = std::iter::once(&total).chain(&per_segment).collect();
    let mut header = format!("{:<40} {:>9}", "measure", "all");
    for k in 0..segments {
        header += &format!(" {:>9}", format!("seg {k}"));
    }
    println!("{header}");
    let row = |name: &str, f: &dyn Fn(&Summary) -> String| {
        let mut line = format!("{name:<40}");
        for c in &cols {
            line += &format!(" {:>9}", f(c));
        }
        println!("{line}");
    };
    row("colour kept (vs segment 0)", &|c| pct(c.colour_kept));
    row("shape kept (vs segment 0)", &|c| pct(c.shape_kept));
    row("size kept (×0.8–1.25 of segment 0)", &|c| {
        pct(c.size_kept)
    });
    row("direction as prompted", &|c| pct(Some(c.direction)));
    row("mean seam jump beyond the step (px)", &|c| {
        px(c.mean_seam_excess_px)
    });
    row("median seam jump beyond the step (px)", &|c| {
        px(c.median_seam_excess_px)
    });
    row("seams without an object (of all)", &|c| {
        if c.seams_measured + c.seams_without_object == 0 {
            "—".to_string()
        } else {
            format!(
                "{}/{}",
                c.seams_without_object,
                c.seams_measured + c.seams_without_object
            )
        }
    });
    row("colour drift from segment 0 (RGB)", &|c| {
        one(c.mean_colour_drift)
    });
    row("colour as prompted", &|c| pct(Some(c.colour_as_prompted)));
    row("shape as prompted", &|c| pct(Some(c.shape_as_prompted)));
    row("object size vs segment 0", &|c| {
        c.size_ratio
            .map_or("—".to_string(), |[a, b]| format!("{a:.2}–{b:.2}"))
    });
    Ok(())
}

/// The measures over a set of segments (all of them, or segment k of every video), as
/// fractions 0–1.
#[derive(serde::Serialize)]
struct Summary {
    segments: usize,
    /// Over the segments after the first (`None` when there are none).
    colour_kept: Option<f64>,
    shape_kept: Option<f64>,
    size_kept: Option<f64>,
    colour_as_prompted: f64,
    shape_as_prompted: f64,
    direction: f64,
    mean_seam_excess_px: Option<f64>,
    median_seam_excess_px: Option<f64>,
    seams_measured: usize,
    seams_without_object: usize,
    mean_colour_drift: Option<f64>,
    /// Smallest and largest size against segment 0's.
    size_ratio: Option<[f64; 2]>,
}

fn summarise(segs: &[&SegmentScore]) -> Summary {
    let share = |f: &dyn Fn(&SegmentScore) -> Option<bool>| {
        let v: Vec<bool> = segs.iter().filter_map(|s| f(s)).collect();
        (!v.is_empty()).then(|| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64)
    };
    let seams: Vec<f64> = segs.iter().filter_map(|s| s.seam_excess).collect();
    let sizes: Vec<f64> = segs.iter().filter_map(|s| s.size_ratio).collect();
    let drift: Vec<f64> = segs.iter().filter_map(|s| s.colour_drift).collect();
    Summary {
        segments: segs.len(),
        colour_kept: share(&|s| s.colour_kept),
        shape_kept: share(&|s| s.shape_kept),
        size_kept: share(&|s| s.size_kept),
        colour_as_prompted: share(&|s| Some(s.colour_as_prompted)).unwrap_or(0.0),
        shape_as_prompted: share(&|s| Some(s.shape_as_prompted)).unwrap_or(0.0),
        direction: share(&|s| Some(s.direction_ok)).unwrap_or(0.0),
        mean_seam_excess_px: mean(seams.iter().copied()),
        median_seam_excess_px: median(&seams),
        seams_measured: seams.len(),
        seams_without_object: segs.iter().filter(|s| s.seam_without_object).count(),
        mean_colour_drift: mean(drift.iter().copied()),
        size_ratio: (!sizes.is_empty()).then(|| {
            [
                sizes.iter().copied().fold(f64::INFINITY, f64::min),
                sizes.iter().copied().fold(0.0, f64::max),
            ]
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_prompts_turn_clockwise_and_keep_the_object() {
        let case = Case {
            prompt: "blue block slides to the left, gray backdrop".into(),
            colour: "blue".into(),
            shape: "square".into(),
            motion: "left".into(),
            background: "gray".into(),
        };
        let (prompts, dirs) = segment_prompts(&case, 4);
        assert_eq!(dirs, ["left", "up", "right", "down"]);
        assert_eq!(prompts[0], case.prompt);
        assert_eq!(prompts[1], "a blue square moving up on a gray background");
    }

    #[test]
    fn median_step_skips_frames_without_an_object() {
        let c = [
            Some([0.0, 0.0]),
            Some([1.0, 0.0]),
            None,
            Some([3.0, 0.0]),
            Some([5.0, 0.0]),
        ];
        assert_eq!(median_step(&c), Some(2.0));
        assert_eq!(median_step(&[None, None]), None);
    }
}
