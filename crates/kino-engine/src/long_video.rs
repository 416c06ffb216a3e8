//! Long videos from a first-image model: a plan of segments of the model's clip length, each
//! after the first conditioned on the last frame made so far (`Conditioning::Image { first:
//! last_frame, last: None }`, the Wan2.2 TI2V / Wan2.1 I2V way), run one after the other through
//! [`WanPipeline::generate`], their frames handed to a callback as each segment finishes (so the
//! caller streams them into a writer and memory stays that of one segment).
//!
//! The seam: a conditioned segment's frame 0 reproduces the frame it was given (after a VAE
//! round trip), so it is dropped and the segment's frame 1 follows the previous segment's last
//! frame. The alternative, overlap and blend, has nothing to blend here: the first-image
//! models take exactly one frame (latent frame 0 is one pixel frame), so the overlap is one
//! frame that already equals the one before it, and blending it only adds a repeated (still)
//! frame at every seam. [`SeamStats`] measures the seams of a run (mean absolute pixel jump
//! at each seam against the jumps between frames inside segments, and how far the dropped
//! frame 0 was from the condition), so the choice can be checked on any model.
//!
//! Determinism: segment `k` (0-based) uses seed `seed + k` (wrapping), its prompt is
//! `prompts[k]` (the last prompt repeats when there are fewer prompts than segments), and its
//! condition is the last frame of segment `k − 1` (or what the caller started from). The same
//! plan, start and settings give the same video, also when resumed from finished segments
//! (given their last frame exactly, e.g. from a lossless file).

use std::time::{Duration, Instant};

use crate::progress::{ProgressEvent, Stage};
use crate::wan::pipeline::{Conditioning, GenerateRequest, ResolvedRequest, RgbImage, WanPipeline};
use crate::{Error, Result};

/// What a long video starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// The first segment from text alone; later ones continue it.
    Text,
    /// The first segment starts from this picture, which stays the video's first frame
    /// (image-to-video); later ones continue it.
    Image(RgbImage),
    /// Continue an existing video whose last frames these are (extension; at least one):
    /// every segment is conditioned, the first on the last of these frames (a
    /// diffusion-forcing model on its last `overlap_history` ones), and no segment repeats it.
    Continue(Vec<RgbImage>),
}

impl Start {
    /// "text", "image" or "continue".
    pub fn kind(&self) -> &'static str {
        match self {
            Start::Text => "text",
            Start::Image(_) => "image",
            Start::Continue(_) => "continue",
        }
    }

    fn image(&self) -> Option<&RgbImage> {
        match self {
            Start::Text => None,
            Start::Image(i) => Some(i),
            Start::Continue(frames) => frames.last(),
        }
    }
}

/// What a long video asks for.
#[derive(Debug, Clone, Default)]
pub struct LongRequest {
    /// Settings of every segment: size, `num_frames` (the segment length; default the model's
    /// clip), steps, guidance, shift, negative prompt, `seed` (segment k uses seed + k).
    /// `prompt` is used when `prompts` is empty; `conditioning` is ignored (see [`Start`]).
    pub request: GenerateRequest,
    /// One prompt per segment (a sequence of shots); the last one repeats.
    pub prompts: Vec<String>,
    /// Frames the run adds in all; `None`: one full segment per prompt.
    pub total_frames: Option<usize>,
}

/// One segment of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// 0-based.
    pub index: usize,
    pub prompt: String,
    pub seed: u64,
    /// Frames generated (a valid frame count for the model).
    pub num_frames: usize,
    /// Leading frames dropped (1 for a segment conditioned on the frame before it: its frame 0
    /// repeats that frame).
    pub skip: usize,
    /// Frames kept after the skipped ones (fewer than generated in a shortened last segment).
    pub keep: usize,
    /// Where its first kept frame lands among the frames the run adds.
    pub first_frame: usize,
}

/// A long video's segments and settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LongPlan {
    /// "text", "image" or "continue" ([`Start::kind`]).
    pub start: String,
    /// The resolved settings of a full segment (prompt and seed of segment 0; `num_frames` the
    /// segment length).
    pub base: ResolvedRequest,
    pub segments: Vec<Segment>,
    /// Frames the run adds (the sum of the segments' `keep`).
    pub total_frames: usize,
    /// A diffusion-forcing model (SkyReels-V2 DF) makes the whole video in one segment, in its
    /// own windows, and continues a video from its last frames (`Conditioning::Continue`).
    #[serde(default)]
    pub native: bool,
}

impl LongPlan {
    /// The request of segment `k`, conditioned on `condition` (the last frame so far).
    pub fn segment_request(&self, k: usize, condition: Option<RgbImage>) -> GenerateRequest {
        let s = &self.segments[k];
        let b = &self.base;
        GenerateRequest {
            conditioning: match condition {
                Some(first) => Conditioning::Image { first, last: None },
                None => Conditioning::Text,
            },
            prompt: s.prompt.clone(),
            negative_prompt: Some(b.negative_prompt.clone()),
            width: Some(b.width),
            height: Some(b.height),
            num_frames: Some(s.num_frames),
            num_inference_steps: Some(b.num_inference_steps),
            guidance_scale: Some(b.guidance_scale),
            shift: Some(b.shift),
            seed: Some(s.seed),
        }
    }
}

/// The models that can continue a video, for messages.
fn conditioned_models() -> String {
    crate::registry::image_model_names().join(", ")
}

/// Plans the segments of `req` starting from `start` on `pipeline`'s model. A plan of more
/// than one segment, or one that continues a video, needs a model that takes a first image;
/// any other is refused in plain words with the models that can named.
pub fn plan(pipeline: &WanPipeline, req: &LongRequest, start: &Start) -> Result<LongPlan> {
    let caps = pipeline.capabilities();
    let prompts: Vec<String> = if req.prompts.is_empty() {
        vec![req.request.prompt.clone()]
    } else {
        req.prompts.clone()
    };
    if let Some((i, _)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.trim().is_empty())
    {
        return Err(Error::InvalidRequest(format!(
            "prompt {} of {} is empty; give every segment a prompt",
            i + 1,
            prompts.len()
        )));
    }
    if req.total_frames == Some(0) {
        return Err(Error::InvalidRequest(
            "a long video needs at least one frame; ask for a positive length".into(),
        ));
    }
    let mut first = req.request.clone();
    first.prompt = prompts[0].clone();
    if caps.long_video && !caps.image {
        return plan_native(pipeline, req, start, first, &prompts);
    }
    first.conditioning = match start.image() {
        Some(img) if caps.image => Conditioning::Image {
            first: img.clone(),
            last: None,
        },
        _ => Conditioning::Text,
    };
    if !caps.image && !matches!(start, Start::Text) {
        return Err(Error::InvalidRequest(format!(
            "this model makes video from text only, so it cannot continue a video or start \
             from a picture; models that can: {}",
            conditioned_models()
        )));
    }
    let base = pipeline.resolve(&first)?;
    let seg_len = base.num_frames;
    let step = pipeline.frame_step();
    let valid_at_least = |n: usize| -> usize { (n.max(1) - 1).div_ceil(step) * step + 1 };

    let mut segments = Vec::new();
    let mut made = 0usize;
    let mut k = 0usize;
    loop {
        let skip = usize::from(k > 0 || matches!(start, Start::Continue(_)));
        let full_keep = seg_len - skip;
        let keep = match req.total_frames {
            Some(total) => {
                if made >= total {
                    break;
                }
                full_keep.min(total - made)
            }
            None => {
                if k >= prompts.len() {
                    break;
                }
                full_keep
            }
        };
        if full_keep == 0 {
            return Err(Error::InvalidRequest(format!(
                "segments of {seg_len} frame cannot continue a video (their only frame repeats \
                 the one before); use segments of at least {} frames",
                step + 1
            )));
        }
        segments.push(Segment {
            index: k,
            prompt: prompts[k.min(prompts.len() - 1)].clone(),
            seed: base.seed.wrapping_add(k as u64),
            num_frames: valid_at_least(keep + skip),
            skip,
            keep,
            first_frame: made,
        });
        made += keep;
        k += 1;
        if k > 100_000 {
            return Err(Error::InvalidRequest(
                "that is more than 100000 segments; ask for a shorter video".into(),
            ));
        }
    }
    let needs_condition = segments.len() > 1 || matches!(start, Start::Continue(_));
    if needs_condition && !caps.image {
        return Err(Error::InvalidRequest(format!(
            "this model makes one clip of at most {seg_len} frames from text and cannot be \
             conditioned on a frame, so it cannot make a longer video in segments; models that \
             can: {}",
            conditioned_models()
        )));
    }
    Ok(LongPlan {
        start: start.kind().to_string(),
        base,
        segments,
        total_frames: made,
        native: false,
    })
}

/// The plan of a diffusion-forcing model: one segment of the whole length (one more frame when
/// continuing, as the engine drops the one that repeats the given frame).
fn plan_native(
    pipeline: &WanPipeline,
    req: &LongRequest,
    start: &Start,
    mut first: GenerateRequest,
    prompts: &[String],
) -> Result<LongPlan> {
    if prompts.len() > 1 {
        return Err(Error::InvalidRequest(format!(
            "a diffusion-forcing model makes the whole video from one prompt; a script of \
             several shots needs a model that continues from a frame: {}",
            conditioned_models()
        )));
    }
    let continuing =
        match start {
            Start::Text => false,
            Start::Continue(_) => true,
            Start::Image(_) => return Err(Error::InvalidRequest(
                "Kino runs diffusion-forcing models from text or to continue a video; starting \
                 from a picture (SkyReels-V2's image-to-video pipeline) is not ported yet"
                    .into(),
            )),
        };
    let step = pipeline.frame_step();
    let total = match req.total_frames {
        Some(t) => t,
        None => pipeline.resolve(&first)?.num_frames - usize::from(continuing),
    };
    let num_frames = (total + usize::from(continuing)).max(1);
    let num_frames = (num_frames - 1).div_ceil(step) * step + 1;
    first.num_frames = Some(num_frames);
    if let Start::Continue(frames) = start {
        first.conditioning = Conditioning::Continue {
            frames: frames.clone(),
        };
    }
    let base = pipeline.resolve(&first)?;
    Ok(LongPlan {
        start: start.kind().to_string(),
        segments: vec![Segment {
            index: 0,
            prompt: prompts[0].clone(),
            seed: base.seed,
            num_frames,
            skip: 0,
            keep: total,
            first_frame: 0,
        }],
        base,
        total_frames: total,
        native: true,
    })
}

/// The frames one finished segment adds, handed to the caller.
pub struct SegmentFrames<'a> {
    pub segment: &'a Segment,
    /// The kept frames (`segment.keep` of them), RGB u8 `height × width × 3` each.
    pub frames: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    /// The resolved request this segment ran with.
    pub request: ResolvedRequest,
}

/// Progress of a long run: an engine event inside segment `segment` (0-based) of `segments`.
pub struct LongProgress<'a> {
    pub segment: usize,
    pub segments: usize,
    pub event: &'a ProgressEvent,
    /// Since this run began.
    pub elapsed: Duration,
    /// Estimated time left for the whole run, once some denoising has been timed.
    pub remaining: Option<Duration>,
}

/// Where a resumed run picks up: the next segment to make and the last frame of the ones
/// already made (exactly as made, e.g. read back from a lossless file).
#[derive(Debug, Clone)]
pub struct Resume {
    pub next_segment: usize,
    pub last_frame: RgbImage,
}

/// How well the segments join, over the frames this run made (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SeamStats {
    /// Seams measured (joins between two segments made in this run, or to the start frame).
    pub seams: usize,
    /// Mean absolute pixel difference (0–255) from the last frame before a seam to the first
    /// kept frame after it.
    pub seam_jump: f64,
    /// The same between consecutive frames inside segments (the motion's own step).
    pub within_jump: f64,
    /// Mean absolute difference between a conditioned segment's (dropped) frame 0 and the
    /// frame it was conditioned on: how exactly the model reproduces its condition.
    pub repeat_error: f64,
}

/// Mean absolute difference of two equal-length u8 buffers (0–255).
pub fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    sum as f64 / a.len() as f64
}

#[derive(Default)]
struct SeamAcc {
    seam: (f64, usize),
    within: (f64, usize),
    repeat: (f64, usize),
}

/// Runs `plan` from `start` (or from `resume`), handing each finished segment's kept frames to
/// `on_segment` before the next begins. Returning `Err` from either callback stops the run
/// (e.g. [`Error::Cancelled`]).
pub fn generate(
    pipeline: &mut WanPipeline,
    plan: &LongPlan,
    start: &Start,
    resume: Option<Resume>,
    on_segment: &mut dyn FnMut(SegmentFrames<'_>) -> Result<()>,
    progress: &mut dyn FnMut(&LongProgress<'_>) -> Result<()>,
) -> Result<SeamStats> {
    let n = plan.segments.len();
    let (first_k, mut condition) = match resume {
        Some(r) => {
            if r.next_segment > n {
                return Err(Error::InvalidRequest(format!(
                    "cannot resume at segment {} of a plan of {n}",
                    r.next_segment + 1
                )));
            }
            (r.next_segment, Some(r.last_frame))
        }
        None => (0, start.image().cloned()),
    };
    let t0 = Instant::now();
    let mut acc = SeamAcc::default();
    for k in first_k..n {
        let seg = &plan.segments[k];
        // Segment 0 of a text start has no condition; every other one continues.
        let cond = if k == 0 && matches!(start, Start::Text) {
            None
        } else {
            condition.clone()
        };
        let mut req = plan.segment_request(k, cond.clone());
        if plan.native {
            // One call; the engine continues from the last frames itself and returns only the
            // new ones.
            req.conditioning = match start {
                Start::Continue(frames) => Conditioning::Continue {
                    frames: frames.clone(),
                },
                _ => Conditioning::Text,
            };
        }
        let out = {
            let mut inner = |e: &ProgressEvent| -> Result<()> {
                let elapsed = t0.elapsed();
                let within = match e.stage {
                    Stage::Denoise if e.total > 0 => e.step as f64 / e.total as f64,
                    Stage::LoadVae | Stage::DecodeVae => 1.0,
                    _ => 0.0,
                };
                let done = (k - first_k) as f64 + within;
                let remaining = (done > 0.0)
                    .then(|| elapsed.mul_f64(((n - first_k) as f64 - done).max(0.0) / done));
                progress(&LongProgress {
                    segment: k,
                    segments: n,
                    event: e,
                    elapsed,
                    remaining,
                })
            };
            pipeline.generate(&req, &mut inner)?
        };
        let mut frames = out.frames;
        if frames.len() < seg.skip + seg.keep {
            return Err(Error::InvalidRequest(format!(
                "segment {} made {} frames, fewer than the {} planned",
                k + 1,
                frames.len(),
                seg.skip + seg.keep
            )));
        }
        if let (Some(c), true) = (&cond, seg.skip > 0) {
            acc.repeat.0 += mean_abs_diff(&frames[0], &c.data);
            acc.repeat.1 += 1;
        }
        frames.truncate(seg.skip + seg.keep);
        let kept: Vec<Vec<u8>> = frames.drain(seg.skip..).collect();
        drop(frames);
        if let (Some(c), Some(f)) = (&condition, kept.first()) {
            if seg.skip > 0 {
                acc.seam.0 += mean_abs_diff(&c.data, f);
                acc.seam.1 += 1;
            }
        }
        for w in kept.windows(2) {
            acc.within.0 += mean_abs_diff(&w[0], &w[1]);
            acc.within.1 += 1;
        }
        let last = kept
            .last()
            .map(|f| RgbImage::new(out.width, out.height, f.clone()))
            .transpose()?;
        on_segment(SegmentFrames {
            segment: seg,
            frames: kept,
            width: out.width,
            height: out.height,
            request: out.request,
        })?;
        condition = last.or(condition);
    }
    let mean = |(s, c): (f64, usize)| if c == 0 { 0.0 } else { s / c as f64 };
    Ok(SeamStats {
        seams: acc.seam.1,
        seam_jump: mean(acc.seam),
        within_jump: mean(acc.within),
        repeat_error: mean(acc.repeat),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device;
    use crate::wan::pipeline::PipelineOptions;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Option<PathBuf> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/data")
            .join(name)
            .join("model");
        p.join("model_index.json").is_file().then_some(p)
    }

    fn open(name: &str) -> Option<WanPipeline> {
        let dir = fixture(name)?;
        let dev = device::open(device::DeviceChoice::Cpu).ok()?;
        WanPipeline::open(&dir, PipelineOptions::for_device(dev)).ok()
    }

    #[test]
    fn plans_cover_the_length_with_segments_that_drop_the_repeated_frame() {
        let Some(p) = open("pipeline-ti2v") else {
            eprintln!("pipeline-ti2v fixture missing; skipped");
            return;
        };
        // The fixture's clip is 9 frames (frame step 4).
        let mut req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                seed: Some(7),
                ..Default::default()
            },
            total_frames: Some(30),
            ..Default::default()
        };
        let pl = plan(&p, &req, &Start::Text).unwrap();
        let keeps: Vec<_> = pl
            .segments
            .iter()
            .map(|s| (s.num_frames, s.skip, s.keep))
            .collect();
        // 9 + 8 + 8 = 25, then 5 more from a 9-frame segment (4k+1 ≥ 6).
        assert_eq!(keeps, [(9, 0, 9), (9, 1, 8), (9, 1, 8), (9, 1, 5)]);
        assert_eq!(pl.total_frames, 30);
        let seeds: Vec<_> = pl.segments.iter().map(|s| s.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 10]);
        let firsts: Vec<_> = pl.segments.iter().map(|s| s.first_frame).collect();
        assert_eq!(firsts, [0, 9, 17, 25]);

        // One full segment per prompt; the prompts follow the segments.
        req.total_frames = None;
        req.prompts = vec!["right".into(), "down".into(), "left".into()];
        let img = RgbImage::new(64, 64, vec![0; 64 * 64 * 3]).unwrap();
        let pl = plan(&p, &req, &Start::Continue(vec![img.clone()])).unwrap();
        assert_eq!(pl.segments.len(), 3);
        assert!(pl.segments.iter().all(|s| s.skip == 1 && s.keep == 8));
        assert_eq!(pl.segments[2].prompt, "left");
        // A short extension makes a shorter segment, not a full one.
        req.prompts.clear();
        req.total_frames = Some(3);
        let pl = plan(&p, &req, &Start::Continue(vec![img])).unwrap();
        assert_eq!(
            pl.segments
                .iter()
                .map(|s| (s.num_frames, s.keep))
                .collect::<Vec<_>>(),
            [(5, 3)]
        );
        req.total_frames = Some(0);
        let e = plan(&p, &req, &Start::Text).unwrap_err().to_string();
        assert!(e.contains("at least one frame"), "{e}");
    }

    #[test]
    fn a_text_only_model_says_it_cannot_go_long_and_names_the_ones_that_can() {
        let Some(p) = open("pipeline-wan21") else {
            eprintln!("pipeline-wan21 fixture missing; skipped");
            return;
        };
        assert!(!p.capabilities().image);
        let clip = p.defaults().num_frames;
        let req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                ..Default::default()
            },
            total_frames: Some(clip * 3),
            ..Default::default()
        };
        let e = plan(&p, &req, &Start::Text).unwrap_err().to_string();
        assert!(
            e.contains("cannot be conditioned") && e.contains("kino-shapes"),
            "{e}"
        );
        // One clip is fine.
        let one = LongRequest {
            total_frames: Some(clip),
            ..req.clone()
        };
        assert_eq!(plan(&p, &one, &Start::Text).unwrap().segments.len(), 1);
        let img = RgbImage::new(
            p.defaults().width,
            p.defaults().height,
            vec![0; p.defaults().width * p.defaults().height * 3],
        )
        .unwrap();
        let e = plan(&p, &one, &Start::Continue(vec![img]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot continue a video") && e.contains("wan2.2-ti2v-5b"),
            "{e}"
        );
    }

    #[test]
    fn segments_stream_in_order_and_a_resumed_run_makes_the_same_frames() {
        let Some(mut p) = open("pipeline-ti2v") else {
            eprintln!("pipeline-ti2v fixture missing; skipped");
            return;
        };
        let req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                seed: Some(3),
                num_inference_steps: Some(2),
                ..Default::default()
            },
            prompts: vec!["a".into(), "b".into(), "c".into()],
            total_frames: None,
        };
        let pl = plan(&p, &req, &Start::Text).unwrap();
        let mut all: Vec<Vec<u8>> = Vec::new();
        let mut order = Vec::new();
        let mut seen_segments = std::collections::BTreeSet::new();
        let stats = generate(
            &mut p,
            &pl,
            &Start::Text,
            None,
            &mut |s| {
                order.push((s.segment.index, s.frames.len(), s.request.seed));
                all.extend(s.frames);
                Ok(())
            },
            &mut |e| {
                seen_segments.insert((e.segment, e.segments));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(order, [(0, 9, 3), (1, 8, 4), (2, 8, 5)]);
        assert_eq!(all.len(), pl.total_frames);
        assert_eq!(
            seen_segments.into_iter().collect::<Vec<_>>(),
            [(0, 3), (1, 3), (2, 3)]
        );
        assert_eq!(stats.seams, 2);
        assert!(stats.within_jump > 0.0, "{stats:?}");
        eprintln!("seams (random weights): {stats:?}");

        // Resume at segment 2 from segment 1's last frame: the same frames as before.
        let last = RgbImage::new(64, 64, all[16].clone()).unwrap();
        let mut tail: Vec<Vec<u8>> = Vec::new();
        generate(
            &mut p,
            &pl,
            &Start::Text,
            Some(Resume {
                next_segment: 2,
                last_frame: last,
            }),
            &mut |s| {
                tail.extend(s.frames);
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(tail, all[17..]);

        // Cancelling from the progress callback stops the run.
        let e = generate(&mut p, &pl, &Start::Text, None, &mut |_| Ok(()), &mut |e| {
            if e.segment == 1 {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled));
    }

    #[test]
    fn mean_abs_diff_is_per_byte() {
        assert_eq!(mean_abs_diff(&[0, 10, 20], &[10, 0, 20]), 20.0 / 3.0);
        assert_eq!(mean_abs_diff(&[], &[]), 0.0);
    }
}
