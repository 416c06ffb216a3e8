//! `kino eval --long K`: what breaks long videos, measured on the shapes world.
//!
//! Every held-out case is made as a long video of K segments through the engine's long-video
//! plan ([`kino_engine::long_video`]: segment 0 from the case's prompt, each later one
//! continuing the last frame made so far), the direction turning clockwise at every segment
//! (right, then down, then left, then up keeps the object in frame), the colour, shape and
//! background staying the case's. Each segment's frames are read back from the pixels
//! ([`super::analyse`]) and scored:
//!
//! - colour and shape kept: the segment's object is still the case's colour and shape; the
//!   colour drift is the RGB distance of its measured colour from segment 0's;
//! - size kept: the segment's object size against segment 0's;
//! - direction: the segment moves the way its prompt says;
//! - seams: the jump of the object's centre from the last frame of a segment to the first of
//!   the next, beyond the motion's own step (the median centre step between frames inside the
//!   segment before it).

use std::time::Instant;

use anyhow::{bail, Context};
use kino_engine::long_video::{self, LongRequest, Start};
use kino_engine::wan::pipeline::GenerateRequest;

use super::analyse::{analyse, object_centre, Analysis, Case, EvalSpec};

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

#[derive(serde::Serialize)]
struct SegmentScore {
    direction: String,
    detected: Analysis,
    colour_kept: bool,
    shape_kept: bool,
    direction_ok: bool,
    /// RGB distance of the object's colour from segment 0's.
    colour_drift: Option<f64>,
    /// Object size against segment 0's.
    size_ratio: Option<f64>,
    /// Into this segment from the one before: the centre's jump beyond the motion's own step
    /// (px; segment 0 has none).
    seam_excess: Option<f64>,
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
    steps: Option<usize>,
    json: bool,
    model: &str,
    overlap: Option<usize>,
) -> anyhow::Result<()> {
    if segments < 2 {
        bail!("--long {segments}: a long video needs at least 2 segments; try --long 4");
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    let total = spec.cases.len() as u64 * seeds;
    for case in &spec.cases {
        for seed in 0..seeds {
            let t0 = Instant::now();
            let (prompts, dirs) = segment_prompts(case, segments);
            let req = LongRequest {
                request: GenerateRequest {
                    prompt: case.prompt.clone(),
                    seed: Some(seed),
                    num_inference_steps: steps,
                    ..Default::default()
                },
                prompts,
                total_frames: None,
                overlap,
            };
            let plan = long_video::plan(pipeline, &req, &Start::Text)?;
            let mut scores: Vec<SegmentScore> = Vec::new();
            let mut first: Option<Analysis> = None;
            let mut last_centre: Option<[f64; 2]> = None;
            let mut last_step: Option<f64> = None;
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
                let seam_excess = seam_jump.map(|jump| (jump - last_step.unwrap_or(0.0)).max(0.0));
                let base = first.get_or_insert_with(|| found.clone());
                let colour_drift = base.rgb.zip(found.rgb).map(|(a, b)| rgb_distance(a, b));
                let size_ratio = (base.size > 0.0).then(|| found.size / base.size);
                scores.push(SegmentScore {
                    direction: dirs[k].clone(),
                    colour_kept: found.colour == case.colour,
                    shape_kept: found.shape == case.shape,
                    direction_ok: found.motion == dirs[k],
                    colour_drift,
                    size_ratio,
                    seam_excess,
                    detected: found,
                });
                last_centre = centres.last().copied().flatten();
                last_step = median_step(&centres);
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
    let share = |f: &dyn Fn(&SegmentScore) -> bool| {
        100.0 * all.iter().filter(|s| f(s)).count() as f64 / n.max(1) as f64
    };
    let mean = |v: Vec<f64>| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let colour = share(&|s| s.colour_kept);
    let shape = share(&|s| s.shape_kept);
    let direction = share(&|s| s.direction_ok);
    let seam = mean(all.iter().filter_map(|s| s.seam_excess).collect());
    let drift = mean(all.iter().filter_map(|s| s.colour_drift).collect());
    let sizes: Vec<f64> = all.iter().filter_map(|s| s.size_ratio).collect();
    let size_min = sizes.iter().copied().fold(f64::INFINITY, f64::min);
    let size_max = sizes.iter().copied().fold(0.0, f64::max);
    if json {
        let v = serde_json::json!({
            "model": model,
            "mode": "long",
            "segments_per_video": segments,
            "cases": spec.cases.len(),
            "seeds": seeds,
            "segments": n,
            "seconds": secs,
            "colour_kept": colour / 100.0,
            "shape_kept": shape / 100.0,
            "direction": direction / 100.0,
            "mean_seam_excess_px": seam,
            "mean_colour_drift": drift,
            "size_ratio": [size_min, size_max],
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
    println!();
    println!("{:<36} {:>9}", "measure", "value");
    println!("{:<36} {:>8.1}%", "colour kept (segments)", colour);
    println!("{:<36} {:>8.1}%", "shape kept (segments)", shape);
    println!(
        "{:<36} {:>8.1}%",
        "direction as prompted (segments)", direction
    );
    match seam {
        Some(s) => println!("{:<36} {:>7.2} px", "mean seam jump beyond the step", s),
        None => println!("{:<36} {:>9}", "mean seam jump beyond the step", "—"),
    }
    if let Some(d) = drift {
        println!("{:<36} {:>9.1}", "mean colour drift (RGB distance)", d);
    }
    if !sizes.is_empty() {
        println!(
            "{:<36} {:>4.2}–{:.2}",
            "object size vs segment 0", size_min, size_max
        );
    }
    Ok(())
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
