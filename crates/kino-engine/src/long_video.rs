//! Long videos: a plan of segments of the model's clip length, run one after the other through
//! [`WanPipeline::generate`], each after the first continuing what came before through
//! `Conditioning::Continue` with the last frames made so far (as many as the model takes:
//! [`context_frames`], 1 for first-image models such as Wan2.2 TI2V / Wan2.1 I2V / kino-shapes,
//! about a quarter of the clip for VACE models (5 of 17 frames, 21 of 81: kept frames of a
//! masked video, not output again), `overlap_history` for SkyReels-V2 diffusion-forcing ones,
//! which make the whole length in one segment, in their own windows). This is the only segment loop: `kino generate --seconds`,
//! `kino extend` and the server's long jobs and extensions all run it; where finished segments
//! go (the CLI's `OUT.kino-partial/`, the server's `DATA_DIR/videos/<id>/segments/`) is the
//! caller's, through the `on_segment` callback, and a run resumes from what it stored
//! ([`Resume`]). Planning is a pure function of the model's clip and frame rules
//! ([`plan_segments`]), so a server node plans without loading a model.
//!
//! The seam, two ways (the plan's `overlap`):
//!
//! - **drop** (`overlap` 0): a continued segment is conditioned on the last frame made; its
//!   frame 0 reproduces that frame and the engine drops it, so the segment's frame 1 follows;
//! - **overlap and blend** (`overlap` M > 0): it is conditioned on the frame M before the end,
//!   so it makes again the M frames the previous segment ended with; those M frames are
//!   cross-faded, linearly (the new segment's weight (i+1)/(M+1) on the i-th), instead of
//!   dropping either. The previous segment's last M frames are held back until then.
//!
//! Measured on kino-shapes (`kino eval --long 4 --overlap M`; the table is in the README):
//! drop joins better, so it is the default ([`DEFAULT_OVERLAP`]).
//! [`SeamStats`] measures the seams of any run (the largest frame-to-frame change across each
//! seam against the changes inside segments, and how much two segments disagree on the frames
//! they both made). An extension's source is never blended: its first segment continues the
//! source's last frame(s) and drops the repeat.
//!
//! Determinism: segment `k` (0-based) uses seed `seed + k` (wrapping), its prompt is
//! `prompts[k]` (the last prompt repeats when there are fewer prompts than segments), and its
//! condition is the end of what was made before it. The same plan, start and settings give the
//! same video, also when resumed from finished segments (given back their [`SegmentFrames::tail`]
//! exactly, e.g. from a lossless file).

use std::time::{Duration, Instant};

use crate::progress::{ProgressEvent, Stage};
use crate::wan::pipeline::{
    Capabilities, Conditioning, GenerateRequest, ResolvedRequest, RgbImage, WanPipeline,
};
use crate::wan::pipeline_vace::vace_context_frames;
use crate::{Error, Result};

/// Frames cross-faded at each seam when a request does not say: none, the repeated frame is
/// dropped. Measured on kino-shapes (`kino eval --long 4 --seeds 2 --overlap {0,1,2,4}`, 12 of
/// the 24 held-out cases, 72 seams each way; the README's long-video section has the table):
/// blending made the object's jump across a seam larger at more seams than it made it smaller
/// (38–46 against 13–19; median jump beyond the motion's step 0.75 px with drop, 1.8–2.7 px
/// blended), and blending 4 frames cost direction as prompted (98% → 86%); it did keep the
/// colour closer to segment 0 (drift 14.6 → 5.8–11.0), as it continues from a frame before the
/// end.
pub const DEFAULT_OVERLAP: usize = 0;

/// Whether continued segments are colour-matched to what they continue when a request does
/// not say ([`match_colours`]).
pub const DEFAULT_COLOR_MATCH: bool = false;

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
    /// Frames cross-faded at each seam between two segments (`None`: [`DEFAULT_OVERLAP`]; 0
    /// drops the repeated frame instead).
    pub overlap: Option<usize>,
    /// Colour-match every continued segment to the frames it continues ([`match_colours`];
    /// `None`: [`DEFAULT_COLOR_MATCH`]).
    pub color_match: Option<bool>,
}

/// One segment of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// 0-based.
    pub index: usize,
    pub prompt: String,
    pub seed: u64,
    /// Frames asked of the model (a valid frame count).
    pub num_frames: usize,
    /// Leading frames the model makes that repeat the frame it continues (1 for a continued
    /// segment); the engine drops them, so it returns `num_frames − skip` frames.
    pub skip: usize,
    /// Leading frames (after the skipped ones) that make again the previous segment's last
    /// frames and are cross-faded with them (the plan's overlap; 0 for the first segment).
    #[serde(default)]
    pub blend: usize,
    /// New frames it adds to the video (fewer than it could in a shortened last segment).
    pub keep: usize,
    /// Where its first new frame lands among the frames the run adds (its blended frames are
    /// the `blend` before).
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
    /// own windows, and continues a video from its last frames.
    #[serde(default)]
    pub native: bool,
    /// Frames cross-faded at each seam between two segments of this run.
    #[serde(default)]
    pub overlap: usize,
    /// Frames a continuation is conditioned on ([`context_frames`]; a VACE model's context
    /// frames are also the ones a continued segment does not output again).
    #[serde(default = "one")]
    pub context: usize,
    /// Every continued segment's colours are matched to the frames it continues
    /// ([`match_colours`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub color_match: bool,
}

fn one() -> usize {
    1
}

impl LongPlan {
    /// The request of segment `k` with this conditioning.
    pub fn segment_request(&self, k: usize, conditioning: Conditioning) -> GenerateRequest {
        let s = &self.segments[k];
        let b = &self.base;
        GenerateRequest {
            conditioning,
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

    /// How many frames [`generate`] hands to `on_segment` for segment `k`: its blended
    /// frames and its new ones, less the last ones held back for the next segment's blend.
    pub fn handed_out(&self, k: usize) -> usize {
        emitted(&self.segments, k)
    }
}

/// Frames handed out for segment `k` of `segments` (see [`LongPlan::handed_out`]).
pub fn emitted(segments: &[Segment], k: usize) -> usize {
    let s = &segments[k];
    let held = segments.get(k + 1).map_or(0, |n| n.blend);
    s.blend + s.keep - held
}

/// Frames a continuation of `pipeline`'s model is conditioned on: the last `overlap_history`
/// (17 unless its config says) for a diffusion-forcing model, a VACE model's context (about a
/// quarter of its clip, [`WanPipeline::vace_context_frames`]), else the last one.
pub fn context_frames(pipeline: &WanPipeline) -> usize {
    let caps = pipeline.capabilities();
    if caps.long_video {
        pipeline.defaults().overlap_history.unwrap_or(17).max(1)
    } else {
        continue_skip(caps, pipeline.defaults().num_frames, pipeline.frame_step())
    }
}

/// Frames a continued segment of `segment_frames` keeps from what came before and does not
/// output again: a VACE model's context ([`vace_context_frames`]), else 1 (the first-image
/// models' frame 0, which repeats the frame they continue). Pure, for API nodes.
pub fn continue_skip(caps: Capabilities, segment_frames: usize, frame_step: usize) -> usize {
    if caps.vace {
        vace_context_frames(segment_frames, frame_step)
    } else {
        1
    }
}

/// The models that can continue a video, for messages.
fn conditioned_models() -> String {
    crate::registry::image_model_names().join(", ")
}

/// The smallest valid frame count (`step·k + 1`) of at least `n`.
fn valid_at_least(n: usize, step: usize) -> usize {
    let step = step.max(1);
    (n.max(1) - 1).div_ceil(step) * step + 1
}

/// A model's rules a plan depends on: all a server node needs to plan without the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRules {
    /// Frames of a full segment: the request's or the model's clip (a valid count).
    pub segment_frames: usize,
    /// Valid frame counts are `frame_step · k + 1`.
    pub frame_step: usize,
    /// A diffusion-forcing model: one segment of the whole length, in its own windows.
    pub native: bool,
    /// Frames a continued segment keeps from before and does not output ([`continue_skip`]):
    /// 1, or a VACE model's context. Continued segments of a VACE model are always asked for
    /// the full `segment_frames` (so the model keeps the same context), and a shortened last
    /// segment is cut after it is made.
    pub continue_skip: usize,
}

/// The segments that add `total_frames` frames (`None`: one full segment per prompt) under
/// `rules`, continuing a video when `continues` (else the first segment starts it), with
/// `overlap` frames cross-faded at each seam between two segments. A pure function: the
/// engine's [`plan`] and the server's API node both use it.
pub fn plan_segments(
    rules: &PlanRules,
    continues: bool,
    overlap: usize,
    prompts: &[String],
    total_frames: Option<usize>,
    seed: u64,
) -> Result<Vec<Segment>> {
    if prompts.is_empty() {
        return Err(Error::InvalidRequest(
            "a long video needs a prompt; give every segment one".into(),
        ));
    }
    if total_frames == Some(0) {
        return Err(Error::InvalidRequest(
            "a long video needs at least one frame; ask for a positive length".into(),
        ));
    }
    let step = rules.frame_step.max(1);
    let seg_len = rules.segment_frames;
    if rules.native {
        if prompts.len() > 1 {
            return Err(Error::InvalidRequest(format!(
                "a diffusion-forcing model makes the whole video from one prompt; a script of \
                 several shots needs a model that continues from a frame: {}",
                conditioned_models()
            )));
        }
        let skip = usize::from(continues);
        let total = total_frames.unwrap_or_else(|| seg_len.saturating_sub(skip).max(1));
        return Ok(vec![Segment {
            index: 0,
            prompt: prompts[0].clone(),
            seed,
            num_frames: valid_at_least(total + skip, step),
            skip,
            blend: 0,
            keep: total,
            first_frame: 0,
        }]);
    }
    let mut segments = Vec::new();
    let mut made = 0usize;
    let mut k = 0usize;
    loop {
        let skip = if k > 0 || continues {
            rules.continue_skip.max(1)
        } else {
            0
        };
        let blend = if k > 0 { overlap } else { 0 };
        let full_keep = seg_len.saturating_sub(skip + blend);
        let keep = match total_frames {
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
            return Err(Error::InvalidRequest(if overlap > 0 {
                format!(
                    "segments of {seg_len} frames cannot overlap by {overlap} (a continued \
                     segment repeats one frame and blends {overlap}); use a smaller overlap or \
                     longer segments"
                )
            } else {
                format!(
                    "segments of {seg_len} frame cannot continue a video (their only frame \
                     repeats the one before); use segments of at least {} frames",
                    step + 1
                )
            }));
        }
        segments.push(Segment {
            index: k,
            prompt: prompts[k.min(prompts.len() - 1)].clone(),
            seed: seed.wrapping_add(k as u64),
            num_frames: if skip > 1 {
                seg_len
            } else {
                valid_at_least(keep + skip + blend, step)
            },
            skip,
            blend,
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
    // Every segment but the last holds back its last `overlap` frames and is continued from
    // the frame before them, which must be one it made.
    if overlap > 0 && segments.len() > 1 {
        let short = segments[..segments.len() - 1]
            .iter()
            .any(|s| s.keep <= overlap);
        if short {
            return Err(Error::InvalidRequest(format!(
                "an overlap of {overlap} frames needs segments of at least {} frames (the next \
                 segment continues from the frame {overlap} before the end, one this segment \
                 made); segments here are {seg_len}: use an overlap of at most {} or longer \
                 segments",
                2 * overlap + 2,
                seg_len.saturating_sub(2) / 2
            )));
        }
    }
    Ok(segments)
}

/// Plans the segments of `req` starting from `start` on `pipeline`'s model. A plan of more
/// than one segment, or one that continues a video, needs a model that takes a first image
/// or a diffusion-forcing one; any other is refused in plain words with the models that can
/// named.
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
    let native = caps.long_video;
    let overlap = if native {
        0
    } else {
        req.overlap.unwrap_or(DEFAULT_OVERLAP)
    };
    let mut first = req.request.clone();
    first.prompt = prompts[0].clone();
    first.conditioning = match start {
        Start::Continue(frames) if native => Conditioning::Continue {
            frames: frames.clone(),
        },
        _ => match start.image() {
            Some(img) if caps.image => Conditioning::Image {
                first: img.clone(),
                last: None,
            },
            _ => Conditioning::Text,
        },
    };
    if !caps.image && !native && !matches!(start, Start::Text) {
        return Err(Error::InvalidRequest(format!(
            "this model makes video from text only, so it cannot continue a video or start \
             from a picture; models that can: {}",
            conditioned_models()
        )));
    }
    let continues = matches!(start, Start::Continue(_));
    let resolved = pipeline.resolve(&first)?;
    let rules = PlanRules {
        segment_frames: resolved.num_frames,
        frame_step: pipeline.frame_step(),
        native,
        continue_skip: continue_skip(caps, resolved.num_frames, pipeline.frame_step()),
    };
    let segments = plan_segments(
        &rules,
        continues,
        overlap,
        &prompts,
        req.total_frames,
        resolved.seed,
    )?;
    let needs_condition = segments.len() > 1 || continues;
    if needs_condition && !caps.image && !native {
        return Err(Error::InvalidRequest(format!(
            "this model makes one clip of at most {} frames from text and cannot be \
             conditioned on a frame, so it cannot make a longer video in segments; models that \
             can: {}",
            rules.segment_frames,
            conditioned_models()
        )));
    }
    let base = if native {
        // The one segment's own length.
        first.num_frames = Some(segments[0].num_frames);
        first.seed = Some(resolved.seed);
        pipeline.resolve(&first)?
    } else {
        resolved
    };
    let total_frames = segments.iter().map(|s| s.keep).sum();
    Ok(LongPlan {
        start: start.kind().to_string(),
        base,
        segments,
        total_frames,
        native,
        overlap,
        context: if native {
            context_frames(pipeline)
        } else {
            rules.continue_skip
        },
        color_match: req.color_match.unwrap_or(DEFAULT_COLOR_MATCH) && !native,
    })
}

/// The frames one finished segment hands out, for the caller to store.
pub struct SegmentFrames<'a> {
    pub segment: &'a Segment,
    /// The video's next frames ([`LongPlan::handed_out`] of them), RGB u8 `height × width × 3`
    /// each: the segment's `blend` cross-faded frames first, then its new ones, less the last
    /// `overlap` held back for the next segment to blend (the last segment holds none back).
    pub frames: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    /// The resolved request this segment ran with.
    pub request: ResolvedRequest,
    /// What the next segment continues from (the end of the video so far, the held-back
    /// frames as made): store it to resume after this segment ([`Resume::tail`]).
    pub tail: &'a [RgbImage],
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

/// Where a resumed run picks up: the next segment to make and the [`SegmentFrames::tail`] of
/// the last one made (exactly as handed out, e.g. read back from a lossless file).
#[derive(Debug, Clone)]
pub struct Resume {
    pub next_segment: usize,
    pub tail: Vec<RgbImage>,
}

/// How well the segments join, over the frames this run made (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SeamStats {
    /// Seams measured (joins between two segments made in this run, or to the start frame).
    pub seams: usize,
    /// Mean over the seams of the largest mean absolute pixel difference (0–255) between
    /// consecutive frames across the seam: from the last frame before it through its blended
    /// frames to the first new one.
    pub seam_jump: f64,
    /// The same between consecutive frames inside segments (the motion's own step).
    pub within_jump: f64,
    /// With an overlap: the mean absolute difference between the two segments' versions of
    /// the frames they both made (how much they disagree where they are blended).
    pub overlap_disagreement: f64,
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

/// `(1 − w)·a + w·b`, rounded.
pub fn cross_fade(a: &[u8], b: &[u8], w: f64) -> Vec<u8> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((1.0 - w) * f64::from(x) + w * f64::from(y)).round() as u8)
        .collect()
}

/// Matches the colours of `frames` (RGB, 8-bit) to those of `reference`, channel by channel:
/// one look-up table per channel maps each level of the frames (pooled) to the level at the
/// same quantile of the reference (pooled), interpolated between levels, and is applied to
/// every frame (one map per segment, so it cannot flicker). This is the histogram variant of
/// the colour matching long-video tools apply to keep a continuation from drifting away from
/// what it continues (e.g. the "ColorMatch" node that ComfyUI workflows put after each Wan
/// extension); it changes levels, never positions. Frames of another size than the
/// reference's are matched all the same (the histograms are normalised).
pub fn match_colours(frames: &mut [Vec<u8>], reference: &[Vec<u8>]) {
    let hist = |bufs: &mut dyn Iterator<Item = &[u8]>| {
        let mut h = [[0u64; 256]; 3];
        for b in bufs {
            for px in b.chunks_exact(3) {
                for c in 0..3 {
                    h[c][px[c] as usize] += 1;
                }
            }
        }
        h
    };
    let src = hist(&mut frames.iter().map(Vec::as_slice));
    let dst = hist(&mut reference.iter().map(Vec::as_slice));
    let mut luts = [[0u8; 256]; 3];
    for c in 0..3 {
        luts[c] = quantile_map(&src[c], &dst[c]);
    }
    for f in frames.iter_mut() {
        for px in f.chunks_exact_mut(3) {
            for c in 0..3 {
                px[c] = luts[c][px[c] as usize];
            }
        }
    }
}

/// The level map taking histogram `src` to histogram `dst`: level `v` goes to the level of
/// `dst` at the quantile of `v`'s middle in `src` (identity where either is empty).
fn quantile_map(src: &[u64; 256], dst: &[u64; 256]) -> [u8; 256] {
    let mut lut = [0u8; 256];
    let (ns, nd) = (src.iter().sum::<u64>(), dst.iter().sum::<u64>());
    if ns == 0 || nd == 0 {
        for (v, l) in lut.iter_mut().enumerate() {
            *l = v as u8;
        }
        return lut;
    }
    // The reference's levels as a piecewise-linear quantile function: level u covers the
    // quantiles [cum(u−1), cum(u)), its centre at the middle.
    let mut centres: Vec<(f64, f64)> = Vec::new();
    let mut cum = 0u64;
    for (u, &n) in dst.iter().enumerate() {
        if n > 0 {
            centres.push(((cum as f64 + n as f64 / 2.0) / nd as f64, u as f64));
            cum += n;
        }
    }
    let mut cum = 0u64;
    for (v, &n) in src.iter().enumerate() {
        let q = (cum as f64 + n as f64 / 2.0) / ns as f64;
        cum += n;
        let i = centres.partition_point(|&(cq, _)| cq < q);
        let u = if i == 0 {
            centres[0].1
        } else if i == centres.len() {
            centres[i - 1].1
        } else {
            let ((q0, u0), (q1, u1)) = (centres[i - 1], centres[i]);
            u0 + (u1 - u0) * (q - q0) / (q1 - q0)
        };
        lut[v] = u.round().clamp(0.0, 255.0) as u8;
    }
    lut
}

#[derive(Default)]
struct SeamAcc {
    seam: (f64, usize),
    within: (f64, usize),
    disagree: (f64, usize),
}

/// Runs `plan` from `start` (or from `resume`), handing each finished segment's frames (and
/// what a resumed run would continue from) to `on_segment` before the next begins. Returning
/// `Err` from either callback stops the run (e.g. [`Error::Cancelled`]).
pub fn generate(
    pipeline: &mut WanPipeline,
    plan: &LongPlan,
    start: &Start,
    resume: Option<Resume>,
    on_segment: &mut dyn FnMut(SegmentFrames<'_>) -> Result<()>,
    progress: &mut dyn FnMut(&LongProgress<'_>) -> Result<()>,
) -> Result<SeamStats> {
    let n = plan.segments.len();
    let context = plan.context.max(1);
    let (first_k, mut tail) = match resume {
        Some(r) => {
            if r.next_segment > n {
                return Err(Error::InvalidRequest(format!(
                    "cannot resume at segment {} of a plan of {n}",
                    r.next_segment + 1
                )));
            }
            if r.next_segment > 0 && r.tail.is_empty() {
                return Err(Error::InvalidRequest(
                    "cannot resume without the frames the last finished segment ended with".into(),
                ));
            }
            (r.next_segment, r.tail)
        }
        None => match start {
            Start::Continue(frames) => (0, frames.clone()),
            _ => (0, Vec::new()),
        },
    };
    // The tail keeps the frames a continuation and a blend need.
    let keep_tail = |len: usize| len.saturating_sub(context + plan.overlap);
    let t0 = Instant::now();
    let mut acc = SeamAcc::default();
    for k in first_k..n {
        let seg = &plan.segments[k];
        if seg.blend > tail.len() {
            return Err(Error::InvalidRequest(format!(
                "segment {} blends {} frames but only {} came before it",
                k + 1,
                seg.blend,
                tail.len()
            )));
        }
        let upto = tail.len() - seg.blend;
        let conditioning = match start {
            Start::Text if k == 0 => Conditioning::Text,
            Start::Image(img) if k == 0 => Conditioning::Image {
                first: img.clone(),
                last: None,
            },
            _ => {
                let from = upto.saturating_sub(context);
                if upto == 0 {
                    return Err(Error::InvalidRequest(format!(
                        "segment {} has no frame to continue from",
                        k + 1
                    )));
                }
                Conditioning::Continue {
                    frames: tail[from..upto].to_vec(),
                }
            }
        };
        // What a continued segment's colours are matched to: the frames it continues.
        let reference: Vec<Vec<u8>> = match &conditioning {
            Conditioning::Continue { frames } if plan.color_match => {
                frames.iter().map(|f| f.data.clone()).collect()
            }
            _ => Vec::new(),
        };
        let req = plan.segment_request(k, conditioning);
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
        let (w, h) = (out.width, out.height);
        let mut made = out.frames;
        if made.len() < seg.blend + seg.keep {
            return Err(Error::InvalidRequest(format!(
                "segment {} made {} frames, fewer than the {} planned",
                k + 1,
                made.len(),
                seg.blend + seg.keep
            )));
        }
        made.truncate(seg.blend + seg.keep);
        if !reference.is_empty() {
            match_colours(&mut made, &reference);
        }
        let fresh = made.split_off(seg.blend);
        // Cross-fade the frames both segments made: the new one's weight grows (i+1)/(M+1).
        let held = tail.split_off(upto);
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(seg.blend + fresh.len());
        for (i, (old, new)) in held.iter().zip(&made).enumerate() {
            acc.disagree.0 += mean_abs_diff(&old.data, new);
            acc.disagree.1 += 1;
            let wt = (i + 1) as f64 / (seg.blend + 1) as f64;
            frames.push(cross_fade(&old.data, new, wt));
        }
        drop(made);
        drop(held);
        let hold = plan.segments.get(k + 1).map_or(0, |s| s.blend);
        if hold > fresh.len() {
            return Err(Error::InvalidRequest(format!(
                "segment {} made {} new frames, fewer than the {hold} the next one blends",
                k + 1,
                fresh.len()
            )));
        }
        for p in fresh.windows(2) {
            acc.within.0 += mean_abs_diff(&p[0], &p[1]);
            acc.within.1 += 1;
        }
        // Moved, not copied: memory stays that of one segment.
        let mut fresh = fresh;
        let held_new = fresh.split_off(fresh.len() - hold);
        frames.extend(fresh);
        // Seams: from the last frame before this segment through its blended frames to its
        // first new one; inside: between its new frames.
        if let Some(before) = tail.last() {
            let mut window: Vec<&[u8]> = vec![&before.data];
            window.extend(frames.iter().take(seg.blend + 1).map(Vec::as_slice));
            if window.len() > 1 {
                let jump = window
                    .windows(2)
                    .map(|p| mean_abs_diff(p[0], p[1]))
                    .fold(0.0, f64::max);
                acc.seam.0 += jump;
                acc.seam.1 += 1;
            }
        }
        // The new tail: the video so far, with this segment's held-back frames as made.
        let total_len = tail.len() + frames.len() + held_new.len();
        let skip_n = keep_tail(total_len);
        let mut next_tail: Vec<RgbImage> = Vec::new();
        let so_far = tail
            .iter()
            .map(|i| i.data.as_slice())
            .chain(frames.iter().map(Vec::as_slice))
            .chain(held_new.iter().map(Vec::as_slice));
        for f in so_far.skip(skip_n) {
            next_tail.push(RgbImage::new(w, h, f.to_vec())?);
        }
        drop(held_new);
        tail = next_tail;
        on_segment(SegmentFrames {
            segment: seg,
            frames,
            width: w,
            height: h,
            request: out.request,
            tail: &tail,
        })?;
    }
    let mean = |(s, c): (f64, usize)| if c == 0 { 0.0 } else { s / c as f64 };
    Ok(SeamStats {
        seams: acc.seam.1,
        seam_jump: mean(acc.seam),
        within_jump: mean(acc.within),
        overlap_disagreement: mean(acc.disagree),
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
            overlap: Some(0),
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
        assert!(pl.segments.iter().all(|s| s.blend == 0));
        assert_eq!(pl.context, 1);

        // Overlap 2: each continued segment makes 8 frames, 2 of them blended with the end of
        // the one before, 6 new; the next continues from the frame 2 before the end.
        let ov = LongRequest {
            overlap: Some(2),
            ..req.clone()
        };
        let pl = plan(&p, &ov, &Start::Text).unwrap();
        let shapes: Vec<_> = pl
            .segments
            .iter()
            .map(|s| (s.num_frames, s.skip, s.blend, s.keep))
            .collect();
        assert_eq!(
            shapes,
            [
                (9, 0, 0, 9),
                (9, 1, 2, 6),
                (9, 1, 2, 6),
                (9, 1, 2, 6),
                (9, 1, 2, 3)
            ]
        );
        assert_eq!(pl.total_frames, 30);
        let handed: Vec<_> = (0..pl.segments.len()).map(|k| pl.handed_out(k)).collect();
        assert_eq!(handed, [7, 6, 6, 6, 5]);
        assert_eq!(handed.iter().sum::<usize>(), 30);
        // The same plan from the pure function a server node calls without the model.
        let rules = PlanRules {
            segment_frames: 9,
            frame_step: 4,
            native: false,
            continue_skip: 1,
        };
        let pure = plan_segments(&rules, false, 2, &["a".into()], Some(30), 7).unwrap();
        assert_eq!(pure, pl.segments);
        // An overlap the segments cannot hold is refused, saying what fits.
        let e = plan(
            &p,
            &LongRequest {
                overlap: Some(4),
                ..req.clone()
            },
            &Start::Text,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("at least 10 frames") && e.contains("at most 3"),
            "{e}"
        );

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
    fn a_diffusion_forcing_model_starts_a_long_video_from_an_image_in_one_segment() {
        let Some(mut p) = open("pipeline-df") else {
            eprintln!("pipeline-df fixture missing; skipped");
            return;
        };
        let (w, h) = (p.defaults().width, p.defaults().height);
        let img = RgbImage::new(w, h, (0..w * h * 3).map(|i| (i % 251) as u8).collect()).unwrap();
        let req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                num_inference_steps: Some(2),
                seed: Some(5),
                ..Default::default()
            },
            // Two 21-frame windows overlapping by 5 make 37; 29 ends with a short window,
            // which the engine makes as 37 and cuts.
            total_frames: Some(29),
            ..Default::default()
        };
        let start = Start::Image(img);
        let plan = plan(&p, &req, &start).unwrap();
        assert!(plan.native);
        assert_eq!(plan.segments.len(), 1);
        assert_eq!(plan.total_frames, 29);
        let mut got = 0;
        generate(
            &mut p,
            &plan,
            &start,
            None,
            &mut |s: SegmentFrames<'_>| {
                got += s.frames.len();
                assert!(s.frames.iter().all(|f| f.len() == w * h * 3));
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(got, 29);
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
            overlap: Some(0),
            color_match: None,
        };
        let pl = plan(&p, &req, &Start::Text).unwrap();
        let mut all: Vec<Vec<u8>> = Vec::new();
        let mut order = Vec::new();
        let mut seen_segments = std::collections::BTreeSet::new();
        let mut tails = Vec::new();
        let stats = generate(
            &mut p,
            &pl,
            &Start::Text,
            None,
            &mut |s| {
                order.push((s.segment.index, s.frames.len(), s.request.seed));
                all.extend(s.frames);
                tails.push(s.tail.to_vec());
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

        // The tail is the last frame made; resume at segment 2 from segment 1's tail: the
        // same frames as before.
        assert_eq!(tails[1].len(), 1);
        assert_eq!(tails[1][0].data, all[16]);
        let mut tail: Vec<Vec<u8>> = Vec::new();
        generate(
            &mut p,
            &pl,
            &Start::Text,
            Some(Resume {
                next_segment: 2,
                tail: tails[1].clone(),
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
    fn overlapping_segments_blend_between_both_and_resume_the_same() {
        let Some(mut p) = open("pipeline-ti2v") else {
            eprintln!("pipeline-ti2v fixture missing; skipped");
            return;
        };
        let req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                seed: Some(5),
                num_inference_steps: Some(2),
                ..Default::default()
            },
            prompts: vec!["a".into(), "b".into(), "c".into()],
            total_frames: None,
            overlap: Some(2),
            color_match: None,
        };
        let pl = plan(&p, &req, &Start::Text).unwrap();
        assert_eq!(pl.total_frames, 9 + 6 + 6);
        let mut all: Vec<Vec<u8>> = Vec::new();
        let mut tails = Vec::new();
        let stats = generate(
            &mut p,
            &pl,
            &Start::Text,
            None,
            &mut |s| {
                assert_eq!(s.frames.len(), pl.handed_out(s.segment.index));
                all.extend(s.frames);
                tails.push(s.tail.to_vec());
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(all.len(), pl.total_frames);
        assert_eq!(stats.seams, 2);
        assert!(stats.overlap_disagreement > 0.0, "{stats:?}");
        // Segment 0's tail: the frame segment 1 continues from (the last handed out) and the
        // two held back, as made.
        assert_eq!(tails[0].len(), 3);
        assert_eq!(tails[0][0].data, all[6]);
        // Segment 1 on its own (Continue from that frame): its first two frames are blended
        // with the held ones, each blended frame lying between the two versions.
        let cont = pl.segment_request(
            1,
            Conditioning::Continue {
                frames: vec![tails[0][0].clone()],
            },
        );
        let own = p.generate(&cont, &mut |_| Ok(())).unwrap().frames;
        for i in 0..2 {
            let (old, new, mixed) = (&tails[0][1 + i].data, &own[i], &all[7 + i]);
            let wt = (i + 1) as f64 / 3.0;
            assert_eq!(mixed, &cross_fade(old, new, wt));
            assert!(old
                .iter()
                .zip(new)
                .zip(mixed)
                .all(|((&a, &b), &m)| a.min(b) <= m && m <= a.max(b)));
        }
        // Then its new frames as made.
        assert_eq!(all[9..13], own[2..6]);
        // Resumed after segment 1: the same frames.
        let mut rest: Vec<Vec<u8>> = Vec::new();
        generate(
            &mut p,
            &pl,
            &Start::Text,
            Some(Resume {
                next_segment: 2,
                tail: tails[1].clone(),
            }),
            &mut |s| {
                rest.extend(s.frames);
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        let before: usize = (0..2).map(|k| pl.handed_out(k)).sum();
        assert_eq!(rest, all[before..]);
    }

    #[test]
    fn a_vace_model_continues_from_several_frames() {
        let Some(mut p) = open("pipeline-vace") else {
            eprintln!("pipeline-vace fixture missing; skipped");
            return;
        };
        // 17-frame segments: each continued one keeps the last 5 frames and adds 12.
        let req = LongRequest {
            request: GenerateRequest {
                prompt: "a".into(),
                seed: Some(5),
                num_frames: Some(17),
                num_inference_steps: Some(2),
                ..Default::default()
            },
            total_frames: Some(25),
            overlap: Some(0),
            ..Default::default()
        };
        let pl = plan(&p, &req, &Start::Text).unwrap();
        assert_eq!(pl.context, 5);
        let shapes: Vec<_> = pl
            .segments
            .iter()
            .map(|s| (s.num_frames, s.skip, s.keep))
            .collect();
        // The shortened last segment still runs the whole clip, so its context stays 5.
        assert_eq!(shapes, [(17, 0, 17), (17, 5, 8)]);
        let rules = PlanRules {
            segment_frames: 17,
            frame_step: 4,
            native: false,
            continue_skip: continue_skip(p.capabilities(), 17, 4),
        };
        let pure = plan_segments(&rules, false, 0, &["a".into()], Some(25), 5).unwrap();
        assert_eq!(pure, pl.segments);
        let mut all: Vec<Vec<u8>> = Vec::new();
        let mut tails = Vec::new();
        generate(
            &mut p,
            &pl,
            &Start::Text,
            None,
            &mut |s| {
                all.extend(s.frames);
                tails.push(s.tail.to_vec());
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(all.len(), 25);
        // What the next segment would continue from: the last 5 frames made.
        assert_eq!(tails[0].len(), 5);
        assert_eq!(tails[0][4].data, all[16]);
        assert_eq!(tails[0][0].data, all[12]);
        // Extending a video continues from its last 5 frames.
        let source: Vec<RgbImage> = all[..17]
            .iter()
            .map(|f| RgbImage::new(p.defaults().width, p.defaults().height, f.clone()).unwrap())
            .collect();
        let ext = plan(&p, &req, &Start::Continue(source.clone())).unwrap();
        assert!(ext.segments.iter().all(|s| s.skip == 5));
        let mut n = 0;
        generate(
            &mut p,
            &ext,
            &Start::Continue(source),
            None,
            &mut |s| {
                n += s.frames.len();
                Ok(())
            },
            &mut |_| Ok(()),
        )
        .unwrap();
        assert_eq!(n, 25);
    }

    /// A frame of `bg` with a `size`² square of `obj` at (x, y), 3 channels.
    fn scene(w: usize, bg: [u8; 3], obj: [u8; 3], x: usize, y: usize, size: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(w * w * 3);
        for j in 0..w {
            for i in 0..w {
                let inside = (x..x + size).contains(&i) && (y..y + size).contains(&j);
                f.extend_from_slice(if inside { &obj } else { &bg });
            }
        }
        f
    }

    #[test]
    fn colour_matching_brings_a_drifted_object_back_and_keeps_positions() {
        // The reference: a purple square on dark gray; the continuation drew it bluer, moving.
        let reference = vec![scene(32, [20, 20, 20], [150, 60, 200], 4, 4, 8)];
        let mut frames: Vec<Vec<u8>> = (0..5)
            .map(|t| scene(32, [20, 20, 20], [90, 60, 230], 6 + 2 * t, 4, 8))
            .collect();
        match_colours(&mut frames, &reference);
        for (t, f) in frames.iter().enumerate() {
            assert_eq!(
                f,
                &scene(32, [20, 20, 20], [150, 60, 200], 6 + 2 * t, 4, 8),
                "frame {t}: the object takes the reference's colour where it now is"
            );
        }
        // Frames that already match are left as they are.
        let mut same = reference.clone();
        match_colours(&mut same, &reference);
        assert_eq!(same, reference);
    }

    #[test]
    fn quantile_map_is_monotone_and_the_identity_on_equal_histograms() {
        let mut h = [0u64; 256];
        for (v, n) in h.iter_mut().enumerate() {
            *n = (v as u64 * 37) % 11;
        }
        let id = quantile_map(&h, &h);
        for v in 0..256 {
            if h[v] > 0 {
                assert_eq!(id[v] as usize, v);
            }
        }
        // A histogram shifted by +20 levels maps back by −20.
        let (mut low, mut shifted) = ([0u64; 256], [0u64; 256]);
        low[..200].copy_from_slice(&h[..200]);
        shifted[20..220].copy_from_slice(&h[..200]);
        let back = quantile_map(&shifted, &low);
        for v in 20..220 {
            if shifted[v] > 0 {
                assert_eq!(back[v] as usize, v - 20, "level {v}");
            }
        }
        assert!(back.windows(2).all(|p| p[0] <= p[1]), "{back:?}");
        // An empty side maps nothing.
        assert_eq!(quantile_map(&[0; 256], &h)[77], 77);
    }

    #[test]
    fn cross_fade_weights_linearly() {
        assert_eq!(
            cross_fade(&[0, 100, 255], &[255, 100, 0], 0.0),
            [0, 100, 255]
        );
        assert_eq!(
            cross_fade(&[0, 100, 255], &[255, 100, 0], 1.0),
            [255, 100, 0]
        );
        assert_eq!(cross_fade(&[0, 10], &[100, 20], 1.0 / 3.0), [33, 13]);
    }

    #[test]
    fn mean_abs_diff_is_per_byte() {
        assert_eq!(mean_abs_diff(&[0, 10, 20], &[10, 0, 20]), 20.0 / 3.0);
        assert_eq!(mean_abs_diff(&[], &[]), 0.0);
    }
}
