//! The bundled model `models/kino-shapes` runs in Kino exactly as in diffusers' `WanPipeline`.
//!
//! The component fixtures prove each class on random weights; this proves THIS folder: its
//! word-level tokenizer, its configs and its `kino.json` defaults (max_sequence_length 32, negative
//! prompt "", guidance 2) go through `WanPipeline` (`open`, `resolve`, `encode_prompt`, `denoise`,
//! `decode`) as through diffusers, and a first image (`prepare_image_condition`, `denoise_with`,
//! `generate` with `Conditioning::Image`) as through diffusers' `WanImageToVideoPipeline`. The
//! reference outputs are in `fixtures/data/kino-shapes`, made by `fixtures/gen_kino_shapes.py`
//! from the same folder; the model itself is read from `models/kino-shapes`. A missing or stale fixture FAILS, saying how to regenerate it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kino_engine::progress;
use kino_engine::testing::{fixtures_dir, json_strings, rel_error};
use kino_engine::wan::pipeline::{
    image_to_tensor, Conditioning, DenoiseInputs, GenerateRequest, PipelineOptions, RgbImage,
    WanPipeline,
};
use kino_engine::wan::text_encoder::WanTextEncoder;
use sha2::{Digest, Sha256};

const REGENERATE: &str = "run `python fixtures/gen_kino_shapes.py` (the pinned reference stack, \
                          fixtures/requirements.txt) to (re)generate fixtures/data/kino-shapes";

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/kino-shapes")
}

fn case_dir() -> PathBuf {
    fixtures_dir().join("kino-shapes")
}

fn require_model() -> PathBuf {
    let dir = model_dir();
    assert!(
        dir.join("model_index.json").is_file(),
        "the bundled model {} is missing: train it (training/train.py) or copy it there, then {REGENERATE}",
        dir.display()
    );
    dir
}

/// The fixture's `case.json` run, checked to be present and made from the model folder as it is now.
fn fixture() -> serde_json::Value {
    fixture_run("kino-shapes")
}

/// The run of `case.json` for `component` ("kino-shapes": text to video; "kino-shapes-i2v": from
/// a first image), after checking the fixture was made from this version of the folder.
fn fixture_run(component: &str) -> serde_json::Value {
    let model = require_model();
    let path = case_dir().join("case.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): {REGENERATE}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {REGENERATE}", path.display()));
    let run = v["runs"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["component"] == component))
        .cloned()
        .unwrap_or_else(|| panic!("{} has no {component} run: {REGENERATE}", path.display()));
    let want = run["model_sha256"].as_str().unwrap_or("");
    let have = model_digest(&model);
    assert_eq!(
        want,
        have,
        "fixtures/data/kino-shapes was made from another version of {} (e.g. before the trained \
         weights landed): {REGENERATE}",
        model.display()
    );
    run
}

/// `model_digest` of gen_kino_shapes.py: sha256 over kino.json, model_index.json and every file of
/// the five component folders, in order of relative path: path, NUL, length (u64 LE), bytes.
fn model_digest(root: &Path) -> String {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    let mut files: Vec<PathBuf> = ["kino.json", "model_index.json"]
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.is_file())
        .collect();
    for d in [
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ] {
        walk(&root.join(d), &mut files);
    }
    let mut rels: Vec<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    rels.sort();
    let mut h = Sha256::new();
    for rel in rels {
        let data = std::fs::read(root.join(&rel)).unwrap_or_default();
        h.update(rel.as_bytes());
        h.update([0u8]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn load(run: &serde_json::Value, key: &str) -> HashMap<String, Tensor> {
    let file = run[key].as_str().unwrap_or(key);
    let path = case_dir().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}): {REGENERATE}", path.display()))
}

fn get<'a>(ts: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    ts.get(name)
        .unwrap_or_else(|| panic!("the fixture has no tensor `{name}`: {REGENERATE}"))
}

fn open() -> WanPipeline {
    let options = PipelineOptions {
        low_memory: false,
        ..PipelineOptions::for_device(Device::Cpu)
    };
    assert_eq!(options.dtype, DType::F32);
    WanPipeline::open(&require_model(), options).expect("open models/kino-shapes")
}

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_string(),
        seed: Some(0),
        ..Default::default()
    }
}

#[test]
fn defaults_come_from_kino_json() {
    let p = open();
    let d = p.defaults();
    // What the folder's kino.json says, read independently of the engine.
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir().join("kino.json")).expect("kino.json"),
    )
    .expect("kino.json is JSON");
    let int = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("kino.json {k}")) as usize;
    assert_eq!(d.max_sequence_length, int("max_sequence_length"));
    assert_eq!(d.negative_prompt.as_deref(), j["negative_prompt"].as_str());
    let r = p.resolve(&request("a red circle")).expect("resolve");
    assert_eq!(
        (r.width, r.height, r.num_frames, r.fps as usize),
        (int("width"), int("height"), int("num_frames"), int("fps"))
    );
    assert_eq!(r.num_inference_steps, int("num_inference_steps"));
    assert_eq!(Some(r.guidance_scale), j["guidance_scale"].as_f64());
    assert_eq!(
        Some(r.negative_prompt.as_str()),
        j["negative_prompt"].as_str()
    );
    // kino.json sets no shift: the scheduler config's flow_shift.
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir().join("scheduler/scheduler_config.json"))
            .expect("scheduler_config.json"),
    )
    .expect("scheduler_config.json is JSON");
    assert_eq!(Some(r.shift), sched["flow_shift"].as_f64());
    assert_eq!(p.latent_shape(&r), [1, 4, 9, 32, 32]);
    assert_eq!(p.size_multiple(), (8, 8));
    assert_eq!(p.frame_step(), 2);
}

#[test]
fn tokens_match_the_reference_tokenizer() {
    let run = fixture();
    let max_len = run["max_sequence_length"].as_u64().unwrap_or(0) as usize;
    let model = require_model();
    let enc = WanTextEncoder::load(
        &model.join("tokenizer"),
        &model.join("text_encoder"),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load the text encoder");
    let tokens = load(&run, "tokens");
    let cases = [
        ("", vec![run["prompt"].as_str().unwrap_or("").to_string()]),
        (
            "negative_",
            vec![run["negative_prompt"].as_str().unwrap_or("").to_string()],
        ),
        ("extra_", json_strings(&run["tokenizer_prompts"])),
    ];
    for (key, prompts) in cases {
        assert!(!prompts.is_empty());
        let (ids, mask) = enc.tokenize(&prompts, max_len).expect("tokenize");
        let want_ids = get(&tokens, &format!("{key}input_ids"));
        let want_mask = get(&tokens, &format!("{key}attention_mask"));
        let ids = ids.to_vec2::<i64>().expect("ids");
        let want_ids = want_ids.to_vec2::<i64>().expect("ids");
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(ids[i], want_ids[i], "input_ids of {p:?}");
        }
        assert_eq!(
            mask.to_vec2::<i64>().expect("mask"),
            want_mask.to_vec2::<i64>().expect("mask"),
            "attention_mask of {prompts:?}"
        );
        println!("{key}tokens: {} prompt(s) equal", prompts.len());
    }
}

#[test]
fn pipeline_matches_diffusers() {
    let run = fixture();
    let tol = run["tolerance"].as_f64().unwrap_or(0.0);
    assert!(tol > 0.0 && tol <= 1e-4, "tolerance {tol}");
    let mut p = open();
    let prompt = run["prompt"].as_str().unwrap_or("");
    // Everything but the step count comes from kino.json, as `kino generate` resolves it; the
    // fixture was made with the same values.
    let r = p.resolve(&request(prompt)).expect("resolve");
    assert_eq!(
        run["negative_prompt"].as_str(),
        Some(r.negative_prompt.as_str())
    );
    assert_eq!(run["guidance_scale"].as_f64(), Some(r.guidance_scale));
    assert_eq!(
        run["max_sequence_length"].as_u64(),
        Some(p.defaults().max_sequence_length as u64)
    );
    assert_eq!(
        (
            run["width"].as_u64(),
            run["height"].as_u64(),
            run["num_frames"].as_u64()
        ),
        (
            Some(r.width as u64),
            Some(r.height as u64),
            Some(r.num_frames as u64)
        )
    );
    let steps = run["num_inference_steps"].as_u64().unwrap_or(0) as usize;
    assert_eq!(steps, 4);

    let embeds = load(&run, "prompt_embeds");
    let input = load(&run, "input");
    let expected = load(&run, "expected");
    let check = |what: &str, out: &Tensor, want: &Tensor| {
        let err = rel_error(out, want).expect("comparable shapes");
        println!("{what:<24} rel error {err:.3e} (≤ {tol:.0e})");
        assert!(err <= tol, "{what}: rel error {err:e} > {tol:e}");
    };

    let (pe, ne) = p
        .encode_prompt(&r.prompt, Some(&r.negative_prompt), &mut progress::ignore)
        .expect("encode_prompt");
    let ne = ne.expect("negative embeddings with guidance on");
    check("prompt_embeds", &pe, get(&embeds, "prompt_embeds"));
    check(
        "negative_prompt_embeds",
        &ne,
        get(&embeds, "negative_prompt_embeds"),
    );

    let latents = get(&input, "latents");
    assert_eq!(latents.dims(), &p.latent_shape(&r)[..]);
    p.set_shift(r.shift);
    let out = p
        .denoise(
            latents,
            &pe,
            Some(&ne),
            steps,
            r.guidance_scale,
            &mut progress::ignore,
        )
        .expect("denoise");
    check("latents (4 steps, CFG 4)", &out, get(&expected, "latents"));
    // Decode the reference's own final latents too, so the VAE is checked on exactly its input.
    let video = p.decode(&out, &mut progress::ignore).expect("decode");
    assert_eq!(video.dims(), &[1, 3, r.num_frames, r.height, r.width]);
    let frames: Vec<u32> = run["video_frames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    assert!(!frames.is_empty(), "case.json lists no video_frames");
    let index = Tensor::new(frames.as_slice(), &Device::Cpu).expect("index");
    let want_video = get(&expected, "video");
    check(
        "video (decoded)",
        &video.index_select(&index, 2).expect("frames"),
        want_video,
    );
    let ref_video = p
        .decode(get(&expected, "latents"), &mut progress::ignore)
        .expect("decode");
    check(
        "video (reference latents)",
        &ref_video.index_select(&index, 2).expect("frames"),
        want_video,
    );
}

/// The bundled model takes a first image the Wan2.2 TI2V way (`expand_timesteps`), exactly as
/// diffusers' `WanImageToVideoPipeline`: the image's latent is latent frame 0 at timestep 0 and is
/// blended back in at every step.
#[test]
fn image_to_video_matches_diffusers() {
    let run = fixture_run("kino-shapes-i2v");
    let tol = run["tolerance"].as_f64().unwrap_or(0.0);
    assert!(tol > 0.0 && tol <= 1e-4, "tolerance {tol}");
    let mut p = open();
    assert!(p.expand_timesteps(), "model_index.json: expand_timesteps");
    let caps = p.capabilities();
    assert!(caps.text && caps.image && !caps.last_image, "{caps:?}");
    let prompt = run["prompt"].as_str().unwrap_or("");
    let r = p.resolve(&request(prompt)).expect("resolve");
    assert_eq!(run["guidance_scale"].as_f64(), Some(r.guidance_scale));
    let steps = run["num_inference_steps"].as_u64().unwrap_or(0) as usize;
    let check = |what: &str, out: &Tensor, want: &Tensor| {
        let err = rel_error(out, want).expect("comparable shapes");
        println!("{what:<24} rel error {err:.3e} (≤ {tol:.0e})");
        assert!(err <= tol, "{what}: rel error {err:e} > {tol:e}");
    };

    let embeds = load(&run, "prompt_embeds");
    let input = load(&run, "input");
    let expected = load(&run, "expected");
    // The image is world.py's frame 0 of the first scene of world.json (uint8): Kino's
    // conversion of those bytes is the reference's preprocessed image.
    let image = get(&input, "image");
    let (w, h) = (r.width, r.height);
    let bytes = std::fs::read(case_dir().join("world-frames.bin")).expect("world-frames.bin");
    let rgb = RgbImage::new(w, h, bytes[..w * h * 3].to_vec()).expect("image");
    check(
        "image (preprocessed)",
        &image_to_tensor(&rgb, &Device::Cpu).expect("image tensor"),
        image,
    );

    let condition = p
        .prepare_image_condition(image, None, r.num_frames, &mut progress::ignore)
        .expect("prepare_image_condition");
    p.set_shift(r.shift);
    let out = p
        .denoise_with(
            DenoiseInputs {
                latents: get(&input, "latents"),
                prompt_embeds: get(&embeds, "prompt_embeds"),
                negative_prompt_embeds: Some(get(&embeds, "negative_prompt_embeds")),
                image_embeds: None,
                condition: &condition,
                num_inference_steps: steps,
                guidance_scale: r.guidance_scale,
                guidance_scale_2: None,
                t_start: 0,
            },
            &mut progress::ignore,
        )
        .expect("denoise");
    check("latents (from an image)", &out, get(&expected, "latents"));
    let frames: Vec<u32> = run["video_frames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let index = Tensor::new(frames.as_slice(), &Device::Cpu).expect("index");
    let video = p.decode(&out, &mut progress::ignore).expect("decode");
    check(
        "video (decoded)",
        &video.index_select(&index, 2).expect("frames"),
        get(&expected, "video"),
    );

    // And through the one pipeline a request goes through (`generate` with the image): frame 0
    // of the video is the image, back from the VAE.
    let out = p
        .generate(
            &GenerateRequest {
                conditioning: Conditioning::Image {
                    first: rgb.clone(),
                    last: None,
                },
                num_inference_steps: Some(steps),
                ..request(prompt)
            },
            &mut progress::ignore,
        )
        .expect("generate from an image");
    let diff = out.frames[0]
        .iter()
        .zip(&rgb.data)
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .sum::<i32>() as f64
        / rgb.data.len() as f64;
    println!("frame 0 vs the image: mean abs difference {diff:.1} / 255");
    assert!(diff < 8.0, "frame 0 is not the image: {diff}");
}
