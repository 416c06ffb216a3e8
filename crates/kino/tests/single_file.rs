//! `--model` from single files (issue 19, item 3): the bundled kino-shapes written as a
//! ComfyUI-style trio — a diffusion model and a VAE with the original Wan tensor names (the
//! renames below are written out here, independently of Kino's), a UMT5 text encoder in
//! transformers' names, plain or ComfyUI's `fp8_e4m3fn` "scaled" — makes the same video as the
//! diffusers folder; a ComfyUI `models/` folder works too; mistakes get one clear error each.
//!
//! Writes the files with Python and safetensors (`$KINO_PYTHON`, default `python3`, with torch;
//! `.ci/run` installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Writes `wan.safetensors`, `vae.safetensors`, `umt5.safetensors`, `umt5_fp8_scaled.safetensors`
/// and `wan_broken.safetensors` (no `head.head.weight`) from a diffusers folder.
const WRITER: &str = r#"
import re, sys, torch
from safetensors.torch import load_file, save_file

src, out = sys.argv[1], sys.argv[2]
nrb = int(sys.argv[3])  # the VAE's num_res_blocks

def transformer_original(k):
    top = {
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head",
    }
    if k == "scale_shift_table":
        return "head.modulation"
    for a, b in top.items():
        if k.startswith(a + "."):
            return b + k[len(a):]
    m = re.match(r"blocks\.(\d+)\.(.*)$", k)
    if not m:
        return k
    n, rest = m.groups()
    attn = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
    for d, o in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        if rest.startswith(d + "."):
            r = rest[len(d) + 1:]
            for a, b in attn.items():
                if r.startswith(a + "."):
                    return f"blocks.{n}.{o}.{b}{r[len(a):]}"
    if rest == "scale_shift_table":
        return f"blocks.{n}.modulation"
    rest = rest.replace("ffn.net.0.proj.", "ffn.0.").replace("ffn.net.2.", "ffn.2.")
    rest = re.sub(r"^norm2\.", "norm3.", rest)  # diffusers' norm2 is the original norm3
    return f"blocks.{n}.{rest}"

RESNET = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}

def resnet_original(r):
    for a, b in RESNET.items():
        if r.startswith(a):
            return b + r[len(a):]
    return r

def vae_original(k):
    for a, b in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if k.startswith(a):
            return b + k[len(a):]
    side, rest = k.split(".", 1)
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[8:]}"
    if rest.startswith("norm_out."):
        return f"{side}.head.0.{rest[9:]}"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[9:]}"
    m = re.match(r"mid_block\.resnets\.(\d)\.(.*)$", rest)
    if m:
        return f"{side}.middle.{2 * int(m.group(1))}.{resnet_original(m.group(2))}"
    if rest.startswith("mid_block.attentions.0."):
        return f"{side}.middle.1.{rest[len('mid_block.attentions.0.'):]}"
    m = re.match(r"down_blocks\.(\d+)\.(.*)$", rest)
    if m:
        return f"{side}.downsamples.{m.group(1)}.{resnet_original(m.group(2))}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
    if m:
        i = int(m.group(1)) * (nrb + 2) + int(m.group(2))
        return f"{side}.upsamples.{i}.{resnet_original(m.group(3))}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", rest)
    if m:
        i = int(m.group(1)) * (nrb + 2) + nrb + 1
        return f"{side}.upsamples.{i}.{m.group(2)}"
    raise SystemExit(f"no original name for {k}")

t = load_file(f"{src}/transformer/diffusion_pytorch_model.safetensors")
wan = {"model.diffusion_model." + transformer_original(k): v for k, v in t.items()}
save_file(wan, f"{out}/wan.safetensors")
broken = {k: v for k, v in wan.items() if not k.endswith("head.head.weight")}
save_file(broken, f"{out}/wan_broken.safetensors")

v = load_file(f"{src}/vae/diffusion_pytorch_model.safetensors")
vae = {vae_original(k): x for k, x in v.items()}
assert len(vae) == len(v)
save_file(vae, f"{out}/vae.safetensors")

te = load_file(f"{src}/text_encoder/model.safetensors")
save_file(te, f"{out}/umt5.safetensors")
# ComfyUI's scaled fp8: linear weights of the blocks in float8 e4m3 with a per-tensor scale,
# the rest in fp16, and a `scaled_fp8` marker.
fp8 = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
for k, x in te.items():
    if k.startswith("encoder.block.") and x.dim() == 2 and "relative_attention_bias" not in k:
        scale = x.abs().max().float() / 448.0
        fp8[k] = (x.float() / scale).to(torch.float8_e4m3fn)
        fp8[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
    else:
        fp8[k] = x.half()
save_file(fp8, f"{out}/umt5_fp8_scaled.safetensors")
"#;

fn python() -> String {
    std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn write_trio(dir: &Path) {
    write_files(&repo().join("models/kino-shapes"), dir);
}

/// The single files of the diffusers folder `src` (see `WRITER`) into `dir`.
fn write_files(src: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("write_trio.py");
    std::fs::write(&script, WRITER).unwrap();
    let o = Command::new(python())
        .arg(&script)
        .arg(src)
        .arg(dir)
        .arg("1")
        .output()
        .expect("Python runs (set KINO_PYTHON to an interpreter with torch and safetensors)");
    assert!(
        o.status.success(),
        "writing the trio failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `kino generate` into a PNG folder with a fixed seed; returns the frames.
fn generate(model: &str, out: &Path, cache: &Path) -> Result<Vec<kino_media::Frame>, String> {
    generate_prompt(model, RED, out, cache)
}

const RED: &str = "a red square moving right on a black background";

fn generate_prompt(
    model: &str,
    prompt: &str,
    out: &Path,
    cache: &Path,
) -> Result<Vec<kino_media::Frame>, String> {
    let o = run(kino()
        .args(["generate", prompt])
        .args(["--model", model, "--seed", "3", "--steps", "6"])
        .args(["--no-sign", "--no-watermark", "-o"])
        .arg(out)
        .env("KINO_CACHE", cache));
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(read_pngs(out))
}

/// The PNG frames a `kino generate -o DIR` wrote, in order.
fn read_pngs(out: &Path) -> Vec<kino_media::Frame> {
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    pngs.sort();
    pngs.iter()
        .map(|p| kino_media::read_image(p).unwrap())
        .collect()
}

/// A colour ramp as a PNG: a first image for image-to-video runs.
fn gradient_png(path: &Path, w: u32, h: u32) {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[(x * 5) as u8, (y * 7) as u8, 128]);
        }
    }
    kino_media::write_image(path, &kino_media::Frame::new(w, h, rgb).unwrap()).unwrap();
}

/// Mean and largest absolute difference in 8-bit levels.
fn diff(a: &[kino_media::Frame], b: &[kino_media::Frame]) -> (f64, u8) {
    assert_eq!(a.len(), b.len(), "frame counts differ");
    let (mut sum, mut n, mut max) = (0u64, 0u64, 0u8);
    for (x, y) in a.iter().zip(b) {
        for (&p, &q) in x.data().iter().zip(y.data()) {
            let d = p.abs_diff(q);
            sum += u64::from(d);
            n += 1;
            max = max.max(d);
        }
    }
    (sum as f64 / n as f64, max)
}

#[test]
fn a_comfyui_trio_makes_the_same_video_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    write_trio(&files);
    let cache = tmp.path().join("cache");
    let shapes = repo().join("models/kino-shapes");
    let shapes = shapes.to_str().unwrap();
    let f = |name: &str| files.join(name).display().to_string();

    let base = generate(shapes, &tmp.path().join("base"), &cache).unwrap();
    assert_eq!(base.len(), 17);

    // Original names, f32: the same numbers, so the same pixels.
    let trio = format!(
        "{},{},{},{shapes}",
        f("wan.safetensors"),
        f("umt5.safetensors"),
        f("vae.safetensors")
    );
    let same = generate(&trio, &tmp.path().join("trio"), &cache).unwrap();
    assert_eq!(diff(&base, &same), (0.0, 0), "trio with the original names");

    // A ComfyUI models/ folder with the same files.
    let models = tmp.path().join("ComfyUI/models");
    for (sub, name) in [
        ("diffusion_models", "wan.safetensors"),
        ("text_encoders", "umt5.safetensors"),
        ("vae", "vae.safetensors"),
    ] {
        std::fs::create_dir_all(models.join(sub)).unwrap();
        std::fs::copy(files.join(name), models.join(sub).join(name)).unwrap();
    }
    let comfy = generate(
        &format!("{},kino-shapes", models.display()),
        &tmp.path().join("comfy"),
        &cache,
    )
    .unwrap();
    assert_eq!(diff(&base, &comfy), (0.0, 0), "ComfyUI models folder");

    // fp8 "scaled" text encoder: the embeddings carry fp8's rounding (3 mantissa bits), so the
    // video differs by that rounding; stated, and bounded.
    let fp8 = format!(
        "{},{},{},{shapes}",
        f("wan.safetensors"),
        f("umt5_fp8_scaled.safetensors"),
        f("vae.safetensors")
    );
    let rounded = generate(&fp8, &tmp.path().join("fp8"), &cache).unwrap();
    let (mean, max) = diff(&base, &rounded);
    println!("fp8-scaled text encoder vs the folder: mean {mean:.3} levels of 255, max {max}");
    // The scales are applied: without them the fp8 values are up to 448 times too large and
    // the prompt is lost. A different prompt moves the video far more than the rounding.
    let blue = "a blue circle moving left on a white background";
    let other = generate_prompt(shapes, blue, &tmp.path().join("other"), &cache).unwrap();
    let (other_mean, _) = diff(&base, &other);
    println!("another prompt vs the folder: mean {other_mean:.3} levels");
    assert!(
        mean < 4.0 && mean * 5.0 < other_mean,
        "fp8 text encoder: mean difference {mean} levels (another prompt: {other_mean})"
    );
}

#[test]
fn single_file_mistakes_get_one_clear_error_each() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    write_trio(&files);
    let cache = tmp.path().join("cache");
    let f = |name: &str| files.join(name).display().to_string();
    let lora = repo().join("models/kino-shapes/lora/fast.safetensors");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (f("wan.safetensors"), vec!["no configs", "model alias"]),
        (
            format!(
                "{},{},kino-shapes",
                f("wan.safetensors"),
                f("wan_broken.safetensors")
            ),
            vec!["two files for a Wan diffusion model"],
        ),
        (
            format!("{},kino-shapes", lora.display()),
            vec![
                "fast.safetensors",
                "not a Wan diffusion model, a UMT5 text encoder or a Wan VAE",
            ],
        ),
        (
            format!("{},kino-shapes", f("wan_broken.safetensors")),
            vec!["proj_out.weight", "wan_broken.safetensors"],
        ),
        (
            format!("{},kino-shapes,kino-shapes", f("wan.safetensors")),
            vec!["two model folders"],
        ),
    ];
    for (model, want) in cases {
        let out = tmp.path().join("out");
        let err = generate(&model, &out, &cache).expect_err(&model);
        for w in want {
            assert!(err.contains(w), "--model {model}: want `{w}` in:\n{err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `kino quantize` writes kino-shapes' transformer and text encoder as GGUF files (Q8_0, with the
/// original / llama.cpp names), and `--model FILE.gguf,…,kino-shapes` runs them, matrices kept
/// quantized: the video stays close to the f32 folder's (stated), far closer than another prompt.
/// `--calibrate` (bias correction after short generations) writes a file that says so and runs the
/// same way; it refuses the text encoder and an empty prompt file.
#[test]
fn gguf_files_from_kino_quantize_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let quantize = |part: &str, ty: &str, out: &Path, more: &[&str]| {
        let o = run(kino()
            .args([
                "quantize",
                "--model",
                "kino-shapes",
                "--part",
                part,
                "--type",
                ty,
            ])
            .args(more)
            .arg("-o")
            .arg(out));
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let t8 = tmp.path().join("transformer-q8_0.gguf");
    let said = quantize("transformer", "q8_0", &t8, &[]);
    assert!(said.contains("wrote") && said.contains("in q8_0"), "{said}");
    let te8 = tmp.path().join("umt5-q8_0.gguf");
    quantize("text_encoder", "q8_0", &te8, &[]);
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "a red circle moving right on a white background\n\na green square moving up on a black background\n",
    )
    .unwrap();
    let t8c = tmp.path().join("transformer-q8_0-calibrated.gguf");
    let said = quantize(
        "transformer",
        "q8_0",
        &t8c,
        &[
            "--calibrate",
            "--calibration-steps",
            "4",
            "--calibration-prompts",
            prompts.to_str().unwrap(),
        ],
    );
    // Every quantized matrix of kino-shapes' transformer has a bias and was run.
    let count = |s: &str, after: &str| -> usize {
        let i = s.find(after).unwrap_or_else(|| panic!("`{after}` in {s}"));
        s[i + after.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        count(&said, "biases of"),
        count(&said, "tensors: "),
        "{said}"
    );
    // The same tensors in the same types, the matrices equal; biases moved; the file says why.
    let says = |f: &Path| {
        std::fs::read(f).unwrap()[..64 * 1024]
            .windows(b"kino.bias_correction".len())
            .any(|w| w == b"kino.bias_correction")
    };
    assert!(!says(&t8) && says(&t8c));
    let plain = kino_engine::gguf::GgufFile::open(&t8).unwrap();
    let calibrated = kino_engine::gguf::GgufFile::open(&t8c).unwrap();
    let mut names = plain.names();
    names.sort();
    assert_eq!(names.len(), calibrated.names().len());
    let mut moved = 0;
    for name in &names {
        assert_eq!(plain.dtype(name), calibrated.dtype(name), "{name}");
        let (a, b) = (
            plain.tensor(name).unwrap().flatten_all().unwrap(),
            calibrated.tensor(name).unwrap().flatten_all().unwrap(),
        );
        let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        if name.ends_with(".bias") {
            moved += usize::from(d > 0.0);
        } else {
            assert_eq!(d, 0.0, "{name} changed");
        }
    }
    assert!(
        moved >= count(&said, "biases of") / 2,
        "{moved} biases moved"
    );
    let shapes = repo().join("models/kino-shapes");
    let base = generate(shapes.to_str().unwrap(), &tmp.path().join("base"), &cache).unwrap();
    let blue = "a blue circle moving left on a white background";
    let other = generate_prompt(
        shapes.to_str().unwrap(),
        blue,
        &tmp.path().join("other"),
        &cache,
    )
    .unwrap();
    let (other_mean, _) = diff(&base, &other);
    for (name, model) in [
        ("Q8_0 transformer", format!("{},kino-shapes", t8.display())),
        (
            "Q8_0 transformer, biases corrected",
            format!("{},kino-shapes", t8c.display()),
        ),
        (
            "Q8_0 transformer + text encoder",
            format!("{},{},kino-shapes", t8.display(), te8.display()),
        ),
    ] {
        let out = tmp.path().join(name.replace([' ', '+'], "_"));
        let got = generate(&model, &out, &cache).unwrap();
        let (mean, max) = diff(&base, &got);
        println!("{name} vs f32: mean {mean:.3} levels of 255, max {max} (another prompt: {other_mean:.1})");
        assert!(mean < 4.0 && mean * 5.0 < other_mean, "{name}: mean {mean}");
    }

    // Mistakes: an unknown type, the VAE, calibrating the text encoder, an empty prompt file.
    let o = run(kino()
        .args(["quantize", "--part", "text_encoder", "--calibrate", "-o"])
        .arg(tmp.path().join("x.gguf")));
    assert!(
        !o.status.success() && stderr(&o).contains("use it with --part transformer"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&prompts, "\n  \n").unwrap();
    let o = run(kino()
        .args(["quantize", "--calibrate", "--calibration-prompts"])
        .arg(&prompts)
        .arg("-o")
        .arg(tmp.path().join("x.gguf")));
    assert!(
        !o.status.success() && stderr(&o).contains("the file has no prompts"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("x.gguf").exists());
    let o = run(kino()
        .args(["quantize", "--type", "q3", "-o"])
        .arg(tmp.path().join("x.gguf")));
    assert!(
        stderr(&o).contains("unknown quantization `q3`"),
        "{}",
        stderr(&o)
    );
    let o = run(kino()
        .args(["quantize", "--part", "vae", "-o"])
        .arg(tmp.path().join("x.gguf")));
    assert!(
        stderr(&o).contains("transformer_2 or text_encoder"),
        "{}",
        stderr(&o)
    );
}

/// A two-expert model (the tiny Wan2.2 A14B text-to-video fixture): `kino quantize --part
/// transformer` and `--part transformer_2`, each `--calibrate`d from its own steps, write files
/// named for their expert that `--model HIGH.gguf,LOW.gguf,FOLDER` runs (close to the folder's
/// video, the names deciding which is which); a file name that does not say its expert, and
/// `transformer_2` of a one-expert model, are refused before anything is written.
#[test]
fn two_expert_gguf_files_from_kino_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture with wider random experts (64-wide, so their matrices go into Q8_0 blocks):
    // its VAE, text encoder, tokenizer and scheduler, two transformers of other seeds.
    let fixture = repo().join("fixtures/data/pipeline-a14b-t2v/model");
    let model = tmp.path().join("a14b-wide");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let name = entry.unwrap().file_name();
        if !name.to_string_lossy().starts_with("transformer") {
            std::os::unix::fs::symlink(fixture.join(&name), model.join(&name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg["attention_head_dim"] = 32.into();
    cfg["ffn_dim"] = 128.into();
    for (seed, part) in [(11, "transformer"), (12, "transformer_2")] {
        let dir = model.join(part);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let c: kino_engine::wan::transformer::Config = serde_json::from_value(cfg.clone()).unwrap();
        kino_engine::testing::save_random_weights(
            seed,
            &dir.join("diffusion_pytorch_model.safetensors"),
            |vb| kino_engine::wan::transformer::WanTransformer3DModel::new(&c, vb).map(|_| ()),
        )
        .unwrap();
    }
    let folder = model.display().to_string();
    let cache = tmp.path().join("cache");
    let quantize = |part: &str, out: &Path| {
        run(kino()
            .args([
                "quantize", "--model", &folder, "--part", part, "--type", "q8_0",
            ])
            .args(["--calibrate", "--calibration-steps", "4", "-o"])
            .arg(out))
    };
    let high = tmp.path().join("wan2.2-t2v-high_noise-tiny-q8_0.gguf");
    let low = tmp.path().join("wan2.2-t2v-low_noise-tiny-q8_0.gguf");
    for (part, file) in [("transformer", &high), ("transformer_2", &low)] {
        let o = quantize(part, file);
        assert!(o.status.success(), "{}", stderr(&o));
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        // Every 64-wide matrix of the blocks (attention, feed-forward, time projection), each
        // with a bias, is in Q8_0 and corrected from its own expert's steps.
        let count = |after: &str| -> usize {
            let i = said
                .find(after)
                .unwrap_or_else(|| panic!("`{after}` in {said}"));
            said[i + after.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(count("tensors: ") >= 20, "{said}");
        assert_eq!(count("biases of"), count("tensors: "), "{said}");
    }
    // The experts' corrections differ (their own weights, their own steps).
    let (h, l) = (
        kino_engine::gguf::GgufFile::open(&high).unwrap(),
        kino_engine::gguf::GgufFile::open(&low).unwrap(),
    );
    let bias = "blocks.0.ffn.2.bias";
    let (hb, lb) = (h.tensor(bias).unwrap(), l.tensor(bias).unwrap());
    assert_ne!(
        hb.to_vec1::<f32>().unwrap(),
        lb.to_vec1::<f32>().unwrap(),
        "{bias}"
    );
    let base = generate(&folder, &tmp.path().join("base"), &cache).unwrap();
    let pair = generate(
        &format!("{},{},{folder}", low.display(), high.display()),
        &tmp.path().join("pair"),
        &cache,
    )
    .unwrap();
    let (mean, max) = diff(&base, &pair);
    println!("two calibrated Q8_0 experts vs the folder: mean {mean:.3} levels, max {max}");
    assert!(mean < 2.0, "{mean}");

    // Mistakes.
    let unnamed = tmp.path().join("experts.gguf");
    let o = quantize("transformer_2", &unnamed);
    assert!(
        !o.status.success() && stderr(&o).contains("put `low_noise` in the file name"),
        "{}",
        stderr(&o)
    );
    let o = quantize("transformer", &tmp.path().join("x-low_noise.gguf"));
    assert!(
        !o.status.success() && stderr(&o).contains("put `high_noise` in the file name"),
        "{}",
        stderr(&o)
    );
    let o = run(kino()
        .args([
            "quantize",
            "--model",
            "kino-shapes",
            "--part",
            "transformer_2",
            "-o",
        ])
        .arg(tmp.path().join("y-low_noise.gguf")));
    assert!(
        !o.status.success() && stderr(&o).contains("has one transformer"),
        "{}",
        stderr(&o)
    );
    for f in ["experts.gguf", "x-low_noise.gguf", "y-low_noise.gguf"] {
        assert!(!tmp.path().join(f).exists(), "{f} was written");
    }
}

/// An image-to-video model's calibration needs first images (`--calibration-image`), read and
/// checked before the model opens; a text-only model refuses them.
#[test]
fn calibrating_an_image_model_takes_first_images() {
    let tmp = tempfile::tempdir().unwrap();
    let i2v = repo().join("fixtures/data/pipeline-i2v-wan21/model");
    let t2v = repo().join("fixtures/data/pipeline-wan21/model");
    let image = tmp.path().join("first.png");
    gradient_png(&image, 120, 90);
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, "not a picture").unwrap();
    let out = tmp.path().join("x.gguf");
    let quantize = |model: &Path, images: &[&Path]| {
        let mut c = kino();
        c.args(["quantize", "--model"]).arg(model);
        c.args(["--type", "q8_0", "--calibrate", "--calibration-steps", "2"]);
        for i in images {
            c.arg("--calibration-image").arg(i);
        }
        run(c.arg("-o").arg(&out))
    };
    for (model, images, want) in [
        (&i2v, vec![], "add --calibration-image FILE"),
        (&i2v, vec![bad.as_path()], "not a PNG, JPEG or WebP image"),
        (&t2v, vec![image.as_path()], "does not take a first image"),
    ] {
        let o = quantize(model, &images);
        assert!(
            !o.status.success() && stderr(&o).contains(want),
            "{want}: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert!(!out.exists());
    }
    let o = quantize(&i2v, &[&image]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("calibrate: generation 4 of 4"),
        "{}",
        stderr(&o)
    );
    assert!(out.is_file());
}

/// Wan2.2 A14B as ComfyUI ships it: the high- and low-noise experts as two diffusion-model files
/// with the original names (`…_high_noise_…`, `…_low_noise_…`), beside the folder of the same
/// model (here the tiny two-expert I2V fixture), make the folder's video exactly, also from a
/// ComfyUI `models/` folder; the same files with their names swapped make another video (the
/// names are what assigns them); an unnamed pair and two files for one expert are refused.
#[test]
fn two_expert_files_make_the_same_video_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo().join("fixtures/data/pipeline-a14b-i2v/model");
    // The low-noise expert (`transformer_2`) through the same writer, as a folder whose
    // `transformer` is it.
    let low_src = tmp.path().join("low-src");
    std::fs::create_dir_all(&low_src).unwrap();
    for (link, target) in [
        ("transformer", "transformer_2"),
        ("vae", "vae"),
        ("text_encoder", "text_encoder"),
    ] {
        std::os::unix::fs::symlink(model.join(target), low_src.join(link)).unwrap();
    }
    write_files(&model, &tmp.path().join("high"));
    write_files(&low_src, &tmp.path().join("low"));
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let high = files.join("wan2.2_i2v_high_noise_tiny_fp32.safetensors");
    let low = files.join("wan2.2_i2v_low_noise_tiny_fp32.safetensors");
    std::fs::copy(tmp.path().join("high/wan.safetensors"), &high).unwrap();
    std::fs::copy(tmp.path().join("low/wan.safetensors"), &low).unwrap();

    let image = tmp.path().join("first.png");
    gradient_png(&image, 48, 32);
    let cache = tmp.path().join("cache");
    let gen = |spec: &str, name: &str| -> Result<Vec<kino_media::Frame>, String> {
        let out = tmp.path().join(name);
        let o = run(kino()
            .args(["generate", "a cat surfing"])
            .args(["--model", spec, "--seed", "3", "--steps", "4"])
            .arg("--image")
            .arg(&image)
            .args(["--no-sign", "--no-watermark", "-o"])
            .arg(&out)
            .env("KINO_CACHE", &cache));
        if !o.status.success() {
            return Err(stderr(&o));
        }
        Ok(read_pngs(&out))
    };
    let folder = model.display().to_string();
    let base = gen(&folder, "base").unwrap();
    assert!(!base.is_empty());
    let pair = gen(
        &format!("{},{},{folder}", low.display(), high.display()),
        "pair",
    )
    .unwrap();
    assert_eq!(diff(&base, &pair), (0.0, 0), "the two experts' files");

    let models = tmp.path().join("ComfyUI/models/diffusion_models");
    std::fs::create_dir_all(&models).unwrap();
    for f in [&high, &low] {
        std::fs::copy(f, models.join(f.file_name().unwrap())).unwrap();
    }
    let comfy = gen(
        &format!("{},{folder}", models.parent().unwrap().display()),
        "comfy",
    )
    .unwrap();
    assert_eq!(diff(&base, &comfy), (0.0, 0), "ComfyUI models folder");

    // The names decide which file is which expert: swapped, the video changes.
    let swapped = tmp.path().join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    let s_high = swapped.join("a_high_noise.safetensors");
    let s_low = swapped.join("a_low_noise.safetensors");
    std::fs::copy(&low, &s_high).unwrap();
    std::fs::copy(&high, &s_low).unwrap();
    let other = gen(
        &format!("{},{},{folder}", s_high.display(), s_low.display()),
        "swapped-out",
    )
    .unwrap();
    let (mean, _) = diff(&base, &other);
    assert!(mean > 0.0, "swapped experts made the same video");

    // Mistakes: files whose names do not say which expert, two files for one expert.
    let plain = swapped.join("wan.safetensors");
    std::fs::copy(&high, &plain).unwrap();
    let err = gen(&format!("{},{folder}", plain.display()), "e1").unwrap_err();
    assert!(
        err.contains("high_noise") && err.contains("does not say which"),
        "{err}"
    );
    let err = gen(
        &format!("{},{},{folder}", high.display(), s_high.display()),
        "e2",
    )
    .unwrap_err();
    assert!(err.contains("two files for the high-noise expert"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
