//! `kino eval`: how well a model of the shapes world follows prompts it never saw in training.
//!
//! Generates every held-out case of the model's `kino-eval.json` with a few seeds, reads back
//! from the pixels what each video shows ([`analyse`]) and scores colour, shape, motion and
//! background against what the prompt asked for. `--image` gives each case a first image drawn
//! by the world ([`world`]) and also scores whether the video starts where the image put the
//! object. `--long K` makes each case a long video of K segments and scores what breaks long
//! videos ([`long`]). `--edit` and `--reference` score a VACE model's masked recolouring and
//! reference images ([`edit`]). `--video` analyses one existing MP4 instead.

pub mod analyse;
pub mod edit;
pub mod long;
pub mod world;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use kino_engine::wan::pipeline::{Conditioning, GenerateRequest, RgbImage};
use kino_media::Mp4Options;

use analyse::{analyse, object_centre, Analysis, Case, EvalSpec};
use world::Scene;

use super::generate;

/// The file in a model folder that lists the held-out cases and the world's palette.
pub const EVAL_FILE: &str = "kino-eval.json";

/// The attributes scored, in table order.
const ATTRIBUTES: [&str; 4] = ["colour", "shape", "motion", "background"];
/// With `--image`, also: the object's centre in frame 0 within [`START_TOLERANCE`] px of the
/// given image's.
const START: &str = "start";
/// Pixels the object's centre in the video's frame 0 may be from the first image's.
pub const START_TOLERANCE: f64 = 3.0;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  kino eval --model models/kino-shapes --seeds 2\n  kino eval --image --seeds 4\n  kino eval --edit --model models/kino-shapes-vace --seeds 4\n  kino eval --video clip.mp4 --json\n\n\
    The model folder's kino-eval.json lists the held-out prompts (\"cases\": prompt, colour, shape, \
    motion, background) and the world's palette (\"colours\", \"backgrounds\" as RGB). Every case is \
    generated with seeds 0..N and the model's defaults; the video's background, object colour, \
    shape and motion are read from its pixels and compared with the case. Accuracy is reported per \
    attribute, then every miss.\n\n\
    --image: every case and seed also gets a first image, one scene of the world (the case's \
    colour, shape and background, a size and a start position drawn per case and seed as the \
    training world draws them), and the video must keep that object and move as the prompt says; \
    \"start\" scores whether the object's centre in the video's first frame is within 3 px of the \
    image's.\n\n\
    --edit / --reference (VACE models such as models/kino-shapes-vace): --edit draws each case's \
    scene in another colour, masks the object's box (+3 px, gray) and asks for the case's colour; \
    it scores the colour and the PSNR outside the mask against a plain VAE round trip of the source \
    (bar: within 2 dB). --reference gives the object alone as a reference image and a prompt \
    without colour or shape, and scores whether the video takes both from the reference."
)]
pub struct Args {
    /// A model alias or folder whose kino-eval.json lists the cases. Default: $KINO_MODEL or
    /// `kino generate`'s default model.
    #[arg(long, short)]
    model: Option<String>,
    /// A kino-eval.json to use instead of the model folder's.
    #[arg(long, value_name = "FILE")]
    cases: Option<PathBuf>,
    /// Seeds per case: each case is generated with seeds 0..N.
    #[arg(long, default_value_t = 2, value_name = "N")]
    seeds: u64,
    /// Denoising steps (default: the model's).
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// Also write every generated video to this folder as MP4 (with --long: each long video
    /// as one PNG, a row of frames per segment).
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Analyse this MP4 instead of generating: print what it shows.
    #[arg(long, value_name = "FILE.mp4", conflicts_with_all = ["seeds", "steps", "save"])]
    video: Option<PathBuf>,
    /// Image-to-video: give every case a first image drawn by the world and also score the
    /// start position (the model must take a first image).
    #[arg(long, conflicts_with = "video")]
    image: bool,
    /// Long videos: make every case a video of K segments (each continuing the last frame, the
    /// direction turning clockwise each segment) and score colour, shape and size kept, the
    /// direction per segment and the jumps at the seams (the model must take a first image).
    #[arg(long, value_name = "K", conflicts_with_all = ["video", "image"])]
    long: Option<usize>,
    /// VACE edit: recolour each case's object inside a mask (its box, the source drawn in
    /// another colour), the new colour from the prompt; scores the colour and the PSNR outside
    /// the mask against a plain VAE round trip (the model must be a VACE one).
    #[arg(long, conflicts_with_all = ["video", "image", "long", "reference"])]
    edit: bool,
    /// VACE reference: each case's object alone as a reference image, the prompt leaving out
    /// colour and shape; scores whether the video takes the reference's colour and shape.
    #[arg(long, conflicts_with_all = ["video", "image", "long"])]
    reference: bool,
    /// With --long: frames cross-faded at each seam (0 drops the repeated frame; default: the
    /// engine's).
    #[arg(long, value_name = "M", requires = "long")]
    overlap: Option<usize>,
    /// With --long: match each continued segment's colours to the frames it continues (as
    /// `kino generate --color-match`).
    #[arg(long, requires = "long")]
    color_match: bool,
    /// With --edit: score the model's own pixels outside the mask, as `kino edit
    /// --no-composite` makes them (default: as `kino edit` makes them, the source's put back).
    #[arg(long)]
    no_composite: bool,
    /// With --edit or --reference: how strongly the VACE branch steers, one number or one per
    /// VACE layer (default 1), as `kino edit --conditioning-scale`.
    #[arg(long, value_name = "S[,S…]")]
    conditioning_scale: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Run on the CPU even if a GPU is available.
    #[arg(long)]
    cpu: bool,
    /// Load each model just before its stage and free it after (less memory, much slower: every
    /// video reloads the models).
    #[arg(long)]
    low_memory: bool,
    /// Score the model with LoRA adapters (FILE[:SCALE], repeatable), as `kino generate --lora`.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// Score the model with a step cache, as `kino generate --cache` (the forwards run and
    /// skipped over all videos are printed).
    #[arg(long, value_name = "SPEC")]
    cache: Option<String>,
    /// MagCache: the model's magnitude ratios (a JSON list from a mag:calibrate run).
    #[arg(long, value_name = "FILE")]
    mag_ratios: Option<PathBuf>,
    /// Classifier-free guidance scale (default: the model's; 1 or less turns guidance off).
    #[arg(long)]
    guidance: Option<f64>,
    /// Flow shift of the noise schedule (default: the model's).
    #[arg(long)]
    shift: Option<f64>,
    /// A named preset, as `kino generate --preset` (e.g. `fast` with a few-step adapter).
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
}

/// The sampling settings every generated video of a run gets (`None`: the model's).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampling {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub shift: Option<f64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.video.clone() {
        Some(video) => run_video(&a, &video),
        None => run_generate(&a),
    }
}

/// Reads `--cases FILE`, or the model folder's kino-eval.json.
fn load_spec(
    cases: Option<&Path>,
    model_dir: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<(EvalSpec, PathBuf)> {
    let path = match cases {
        Some(p) => {
            if !p.is_file() {
                bail!("--cases {}: no such file", p.display());
            }
            p.to_path_buf()
        }
        None => {
            let dir = model_dir()?;
            let p = dir.join(EVAL_FILE);
            if !p.is_file() {
                bail!(
                    "the model folder {} has no {EVAL_FILE} (the held-out prompts and the palette \
                     `kino eval` checks against); pass --cases FILE to supply one",
                    dir.display()
                );
            }
            p
        }
    };
    Ok((EvalSpec::read(&path)?, path))
}

fn run_video(a: &Args, video: &Path) -> anyhow::Result<()> {
    let (spec, _) = load_spec(a.cases.as_deref(), || {
        Ok(kino_engine::registry::resolve(&generate::model_name(
            a.model.as_deref(),
        ))?)
    })?;
    if !video.is_file() {
        bail!("--video {}: no such file", video.display());
    }
    let v = kino_media::read_mp4(video).with_context(|| {
        format!(
            "reading {} (kino eval --video reads MP4 files)",
            video.display()
        )
    })?;
    let frames: Vec<&[u8]> = v.frames().iter().map(|f| f.data()).collect();
    let found = analyse(&frames, v.width() as usize, v.height() as usize, &spec)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    let rgb = |c: Option<[u8; 3]>| match c {
        Some([r, g, b]) => format!("{r},{g},{b}"),
        None => "-".into(),
    };
    println!("colour:     {} (measured {})", found.colour, rgb(found.rgb));
    println!(
        "shape:      {} (fill {:.2}, taper {:.2}, size {:.0} px)",
        found.shape, found.fill, found.taper, found.size
    );
    println!(
        "motion:     {} (dx {:+.1} px, dy {:+.1} px)",
        found.motion, found.dx, found.dy
    );
    println!(
        "background: {} (measured {})",
        found.background,
        rgb(Some(found.background_rgb))
    );
    println!(
        "object in {} of {} frames",
        found.frames_with_object,
        frames.len()
    );
    Ok(())
}

/// One generated video: the case, the seed, what was seen.
#[derive(serde::Serialize)]
struct Run {
    prompt: String,
    seed: u64,
    expected: Case,
    detected: Analysis,
    /// With `--image`: the scene of the first image.
    #[serde(skip_serializing_if = "Option::is_none")]
    scene: Option<Scene>,
    /// With `--image`: the object's centre in the first image and in the video's frame 0, and
    /// how far apart they are (px; `None` when either shows no object).
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<Start>,
    /// The attributes detected wrongly.
    wrong: Vec<&'static str>,
    seconds: f64,
}

#[derive(serde::Serialize)]
struct Start {
    image: Option<[f64; 2]>,
    video: Option<[f64; 2]>,
    distance: Option<f64>,
}

impl Start {
    fn measure(image: &[u8], frame0: &[u8], w: usize, h: usize) -> Start {
        let image = object_centre(image, w, h);
        let video = object_centre(frame0, w, h);
        let distance = image
            .zip(video)
            .map(|(a, b)| (a[0] - b[0]).hypot(a[1] - b[1]));
        Start {
            image,
            video,
            distance,
        }
    }

    fn ok(&self) -> bool {
        self.distance.is_some_and(|d| d <= START_TOLERANCE)
    }

    /// "2.1 px" or "no object".
    fn describe(&self) -> String {
        match self.distance {
            Some(d) => format!("{d:.1} px"),
            None if self.image.is_none() => "no object in the image".into(),
            None => "no object in frame 0".into(),
        }
    }
}

fn wrong_attributes(case: &Case, found: &Analysis, start: Option<&Start>) -> Vec<&'static str> {
    let mut wrong: Vec<&'static str> = ATTRIBUTES
        .into_iter()
        .filter(|&attr| found.get(attr) != case.get(attr))
        .collect();
    if start.is_some_and(|s| !s.ok()) {
        wrong.push(START);
    }
    wrong
}

fn run_generate(a: &Args) -> anyhow::Result<()> {
    if a.seeds == 0 {
        bail!("--seeds 0 generates nothing; use 1 or more");
    }
    if a.conditioning_scale.is_some() && !(a.edit || a.reference) {
        bail!(
            "--conditioning-scale steers a VACE model's branch; use it with --edit or --reference"
        );
    }
    let conditioning_scale = match &a.conditioning_scale {
        Some(s) => super::edit::parse_conditioning_scale(s)?,
        None => Vec::new(),
    };
    let model_name = generate::model_name(a.model.as_deref());
    let (spec, spec_path) = load_spec(a.cases.as_deref(), || {
        Ok(kino_engine::registry::resolve(&model_name)?)
    })?;
    if spec.cases.is_empty() {
        bail!(
            "{} lists no cases; add held-out prompts under \"cases\"",
            spec_path.display()
        );
    }
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the --save folder {}", dir.display()))?;
    }
    let mut lora = a
        .lora
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<kino_engine::lora::LoraSpec>, _>>()?;
    let mut sampling = Sampling {
        steps: a.steps,
        guidance: a.guidance,
        shift: a.shift,
    };
    let mut preset_meta = None;
    if let Some(name) = &a.preset {
        let dir = kino_engine::registry::resolve(&model_name)?;
        let p = kino_engine::preset::find(&dir, &lora, name)?;
        sampling.steps = sampling.steps.or(p.num_inference_steps);
        sampling.guidance = sampling.guidance.or(p.guidance_scale);
        sampling.shift = sampling.shift.or(p.shift);
        lora.extend(p.lora.iter().cloned());
        eprintln!("kino eval: preset `{name}`: {}", p.describe());
        preset_meta = Some(serde_json::json!({ "name": name, "settings": p.describe() }));
    } else {
        for hint in kino_engine::preset::hints(&lora) {
            eprintln!("kino eval: note: {hint}");
        }
    }
    let cache = generate::cache_config(a.cache.as_deref(), a.mag_ratios.as_deref(), None)?;
    let (model_dir, mut pipeline) = generate::open_pipeline_with(
        &model_name,
        a.cpu,
        a.low_memory,
        false,
        (lora, Vec::new(), false),
        cache,
    )?;
    // Transformer forwards run and skipped over every video (with --cache).
    let mut forwards = (0usize, 0usize);
    let fps = pipeline.defaults().fps;
    if a.edit || a.reference {
        let mode = if a.edit {
            edit::Mode::Edit
        } else {
            edit::Mode::Reference
        };
        return edit::run(
            &mut pipeline,
            &spec,
            mode,
            a.seeds,
            sampling,
            a.json,
            &model_name,
            &model_dir,
            a.save.as_deref(),
            &edit::Options {
                composite: !a.no_composite,
                conditioning_scale,
            },
        );
    }
    if let Some(k) = a.long {
        if !pipeline.capabilities().image {
            bail!(
                "{} takes no first image, so it cannot continue its own clips; `kino eval --long` \
                 needs a model such as kino-shapes",
                model_dir.display()
            );
        }
        eprintln!(
            "kino eval --long {k}: {} — {} cases × {} seeds",
            model_dir.display(),
            spec.cases.len(),
            a.seeds
        );
        return long::run(
            &mut pipeline,
            &spec,
            k,
            a.seeds,
            sampling,
            a.json,
            &model_name,
            a.save.as_deref(),
            a.overlap,
            a.color_match,
        );
    }
    if a.image && !pipeline.capabilities().image {
        bail!(
            "{} takes no image (its model_index.json has no `expand_timesteps` and its \
             transformer no image channels); `kino eval --image` needs an image-to-video model \
             such as kino-shapes",
            model_dir.display()
        );
    }
    let request = |case: &Case, seed: u64, image: Option<RgbImage>| GenerateRequest {
        prompt: case.prompt.clone(),
        seed: Some(seed),
        num_inference_steps: sampling.steps,
        guidance_scale: sampling.guidance,
        shift: sampling.shift,
        conditioning: match image {
            Some(first) => Conditioning::Image { first, last: None },
            None => Conditioning::Text,
        },
        ..Default::default()
    };
    // Check the settings before spending minutes on the first video.
    let first = pipeline.resolve(&request(&spec.cases[0], 0, None))?;
    let (w, h) = (first.width, first.height);
    let attributes: Vec<&str> = ATTRIBUTES
        .into_iter()
        .chain(a.image.then_some(START))
        .collect();
    let total = spec.cases.len() as u64 * a.seeds;
    eprintln!(
        "kino eval{}: {} — {} cases × {} seeds, {}x{}, {} frames, {} steps, guidance {}",
        if a.image { " --image" } else { "" },
        model_dir.display(),
        spec.cases.len(),
        a.seeds,
        first.width,
        first.height,
        first.num_frames,
        first.num_inference_steps,
        first.guidance_scale
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    for (i, case) in spec.cases.iter().enumerate() {
        for seed in 0..a.seeds {
            let t0 = Instant::now();
            let scene = match a.image {
                true => Some(Scene::for_case(&spec, i, case, seed, w, h)?),
                false => None,
            };
            let image = scene.as_ref().map(|s| s.render(w, h, 0, first.num_frames));
            let conditioning = image
                .clone()
                .map(|px| RgbImage::new(w, h, px))
                .transpose()?;
            let out = pipeline
                .generate(
                    &request(case, seed, conditioning),
                    &mut kino_engine::progress::ignore,
                )
                .with_context(|| format!("generating {:?} with seed {seed}", case.prompt))?;
            if let Some(st) = pipeline.cache_stats() {
                forwards.0 += st.forwards;
                forwards.1 += st.skipped;
            }
            let found = analyse(&out.frames, out.width, out.height, &spec)?;
            let start = image
                .as_ref()
                .map(|img| Start::measure(img, &out.frames[0], out.width, out.height));
            let seconds = t0.elapsed().as_secs_f64();
            if let Some(dir) = &a.save {
                let path = dir.join(format!(
                    "{:03}-{}-seed{seed}.mp4",
                    i + 1,
                    generate::slug(&case.prompt)
                ));
                let params = kino_server::output::generation_params(&out.request, &model_name, fps);
                let video =
                    kino_server::output::frames_to_video(out.frames, out.width, out.height, fps)?;
                let opts = Mp4Options {
                    metadata: Some(params.to_value()),
                    ..Default::default()
                };
                kino_media::write_mp4(&path, &video, &opts)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            let wrong = wrong_attributes(case, &found, start.as_ref());
            eprintln!(
                "[{}/{total}] {:?} seed {seed}: {seconds:.1} s — {} {} {} on {}{}{}",
                runs.len() + 1,
                case.prompt,
                found.colour,
                found.shape,
                found.motion,
                found.background,
                start
                    .as_ref()
                    .map(|s| format!(", start {}", s.describe()))
                    .unwrap_or_default(),
                if wrong.is_empty() {
                    String::new()
                } else {
                    format!(" (wrong: {})", wrong.join(", "))
                }
            );
            runs.push(Run {
                prompt: case.prompt.clone(),
                seed,
                expected: case.clone(),
                detected: found,
                scene,
                start,
                wrong,
                seconds,
            });
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let n = runs.len();
    let correct = |attr: &str| runs.iter().filter(|r| !r.wrong.contains(&attr)).count();
    let all = runs.iter().filter(|r| r.wrong.is_empty()).count();
    let pct = |c: usize| 100.0 * c as f64 / n as f64;
    let by_shape = shape_rows(runs.iter().map(|r| {
        (
            r.expected.shape.as_str(),
            !r.wrong.contains(&"shape"),
            &r.detected,
        )
    }));

    if a.json {
        let mut accuracy = serde_json::Map::new();
        for &attr in &attributes {
            let c = correct(attr);
            accuracy.insert(
                attr.into(),
                serde_json::json!({"correct": c, "total": n, "accuracy": c as f64 / n as f64}),
            );
        }
        accuracy.insert(
            "all".into(),
            serde_json::json!({"correct": all, "total": n, "accuracy": all as f64 / n as f64}),
        );
        let misses: Vec<&Run> = runs.iter().filter(|r| !r.wrong.is_empty()).collect();
        let v = serde_json::json!({
            "shape_by_asked_shape": by_shape,
            "model": model_name,
            "model_path": model_dir,
            "mode": if a.image { "image" } else { "text" },
            "cases_file": spec_path,
            "cases": spec.cases.len(),
            "seeds": a.seeds,
            "steps": first.num_inference_steps,
            "guidance": first.guidance_scale,
            "shift": first.shift,
            "preset": preset_meta,
            "videos": n,
            "seconds": secs,
            "accuracy": accuracy,
            "lora": a.lora,
            "cache": a.cache,
            "transformer_forwards": {"run": forwards.0 - forwards.1, "skipped": forwards.1, "total": forwards.0},
            "misses": misses,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{n} videos ({} cases × {} seeds, {} steps{}) in {secs:.1} s",
        spec.cases.len(),
        a.seeds,
        first.num_inference_steps,
        if a.image {
            ", each from a first image"
        } else {
            ""
        }
    );
    println!();
    println!(
        "{:<12} {:>7} {:>6} {:>9}",
        "attribute", "correct", "total", "accuracy"
    );
    for &attr in &attributes {
        let c = correct(attr);
        println!("{attr:<12} {c:>7} {n:>6} {:>8.1}%", pct(c));
    }
    let all_label = if a.image { "all five" } else { "all four" };
    println!("{all_label:<12} {all:>7} {n:>6} {:>8.1}%", pct(all));
    println!("{}", shape_line(&by_shape));
    if let Some(c) = &a.cache {
        let run = forwards.0 - forwards.1;
        println!(
            "cache {c}: skipped {} of {} transformer forwards ({:.2}× fewer)",
            forwards.1,
            forwards.0,
            forwards.0 as f64 / run.max(1) as f64
        );
    }
    if !a.lora.is_empty() {
        println!("adapters: {}", a.lora.join(", "));
    }
    if a.image {
        println!("(start: the object's centre in frame 0 within {START_TOLERANCE} px of the first image's)");
    }
    println!();
    let misses: Vec<&Run> = runs.iter().filter(|r| !r.wrong.is_empty()).collect();
    if misses.is_empty() {
        println!("misses: none");
    } else {
        println!("misses ({}):", misses.len());
        for r in misses {
            let what: Vec<String> = r
                .wrong
                .iter()
                .map(|&attr| match (attr, &r.start) {
                    (START, Some(s)) => format!("start off by {}", s.describe()),
                    _ => format!("{attr} {} → {}", r.expected.get(attr), r.detected.get(attr)),
                })
                .collect();
            println!("  {:?} seed {}: {}", r.prompt, r.seed, what.join(", "));
        }
    }
    Ok(())
}

/// The mean of some numbers (`None` for none).
pub(crate) fn mean(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Shape accuracy for one asked shape, with the mean fill (area / bounding box) and size of the
/// objects the videos showed: where a model's shape misses are (squares drawn round, say).
#[derive(Debug, serde::Serialize)]
pub(crate) struct ShapeRow {
    shape: String,
    correct: usize,
    total: usize,
    /// Over the videos that showed an object (`None` if none did).
    mean_fill: Option<f64>,
    mean_size_px: Option<f64>,
}

/// [`ShapeRow`]s, one per asked shape in the order first seen, from (asked shape, read right,
/// what the video showed) per video.
pub(crate) fn shape_rows<'a>(
    videos: impl IntoIterator<Item = (&'a str, bool, &'a Analysis)>,
) -> Vec<ShapeRow> {
    let mut rows: Vec<(ShapeRow, Vec<f64>, Vec<f64>)> = Vec::new();
    for (asked, ok, seen) in videos {
        let i = match rows.iter().position(|r| r.0.shape == asked) {
            Some(i) => i,
            None => {
                rows.push((
                    ShapeRow {
                        shape: asked.to_string(),
                        correct: 0,
                        total: 0,
                        mean_fill: None,
                        mean_size_px: None,
                    },
                    Vec::new(),
                    Vec::new(),
                ));
                rows.len() - 1
            }
        };
        let (row, fills, sizes) = &mut rows[i];
        row.total += 1;
        row.correct += usize::from(ok);
        if seen.shape != "none" {
            fills.push(seen.fill);
            sizes.push(seen.size);
        }
    }
    rows.into_iter()
        .map(|(mut row, fills, sizes)| {
            row.mean_fill = mean(fills);
            row.mean_size_px = mean(sizes);
            row
        })
        .collect()
}

/// The rows of [`shape_rows`] as one line: `shape by asked shape: circle 36/36 (fill 0.80,
/// 24 px), …`.
pub(crate) fn shape_line(rows: &[ShapeRow]) -> String {
    let parts: Vec<String> = rows
        .iter()
        .map(|r| {
            let seen = match (r.mean_fill, r.mean_size_px) {
                (Some(f), Some(s)) => format!(" (fill {f:.3}, {s:.1} px)"),
                _ => String::new(),
            };
            format!("{} {}/{}{seen}", r.shape, r.correct, r.total)
        })
        .collect();
    format!("shape by asked shape: {}", parts.join(", "))
}
