//! `kino bench video`: time per video at the Wan2.1-T2V-1.3B size, random weights, through the
//! real pipeline (the denoising loop with its guidance and step cache, then the VAE decode), in
//! three settings: 50 steps with guidance 5 (the model's defaults), the same with a step cache,
//! and 4 steps without guidance (what a few-step distilled adapter runs).
//!
//! The model folder (the 1.3B transformer and the Wan2.1 VAE with seeded random weights,
//! Wan2.1-T2V-1.3B's configs and scheduler) is written once and reused. The text encoder is left
//! out: every setting encodes the same two prompts once (UMT5-XXL, 5.7 B parameters, is the
//! same cost whatever the sampler does), so the rows get random 512×4096 prompt embeddings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kino_engine::loading::RandomWeights;
use kino_engine::wan::pipeline::{PipelineOptions, WanPipeline};
use kino_engine::wan::{transformer, vae};

use super::Args;

/// Wan2.1-T2V-1.3B's transformer/config.json.
fn transformer_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
        "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
        "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
        "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": true,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": null,
        "added_kv_proj_dim": null, "rope_max_seq_len": 1024
    })
}

/// Wan2.1-T2V-1.3B's scheduler/scheduler_config.json (UniPC, flow shift 3).
fn scheduler_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
        "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": true,
        "num_train_timesteps": 1000, "predict_x0": true, "prediction_type": "flow_prediction",
        "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "solver_order": 2,
        "solver_p": null, "solver_type": "bh2", "steps_offset": 0, "thresholding": false,
        "timestep_spacing": "linspace", "trained_betas": null, "use_beta_sigmas": false,
        "use_exponential_sigmas": false, "use_flow_sigmas": true, "use_karras_sigmas": false
    })
}

/// Builds a component with random weights and writes them with its config.
fn write_component(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
    build: impl FnOnce(VarBuilder<'static>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("diffusion_pytorch_model.safetensors");
    kino_engine::testing::save_random_weights(seed, &file, |vb| {
        build(vb).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    })
    .with_context(|| format!("cannot write {}", file.display()))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config)?,
    )?;
    Ok(())
}

/// The random-weight model folder, written if it is not there yet.
pub(super) fn model_folder(a: &Args) -> anyhow::Result<PathBuf> {
    let dir = a
        .model_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kino-bench-wan2.1-1.3b-random"));
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(dir);
    }
    eprintln!(
        "video: writing the random-weight Wan2.1-1.3B folder {} (about 6 GB, once)…",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tcfg = transformer_config();
    write_component(&dir.join("transformer"), &tcfg, 0, |vb| {
        let cfg: transformer::Config = serde_json::from_value(tcfg.clone())?;
        transformer::WanTransformer3DModel::new(&cfg, vb)?;
        Ok(())
    })?;
    let vcfg =
        serde_json::json!({"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1"});
    write_component(&dir.join("vae"), &vcfg, 1, |vb| {
        let cfg: vae::Config = serde_json::from_value(vcfg.clone())?;
        vae::AutoencoderKLWan::new(&cfg, vb)?;
        Ok(())
    })?;
    std::fs::create_dir_all(dir.join("scheduler"))?;
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        serde_json::to_string_pretty(&scheduler_config())?,
    )?;
    std::fs::write(
        dir.join("model_index.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": [null, null],
            "vae": ["diffusers", "AutoencoderKLWan"]
        }))?,
    )?;
    std::fs::write(&done, "")?;
    Ok(dir)
}

struct Row {
    name: String,
    steps: usize,
    guidance: f64,
    forwards: usize,
    skipped: usize,
    denoise: f64,
    decode: f64,
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let (w, h) = super::super::generate::parse_size(&a.size)?;
    if a.frames == 0 || !(a.frames - 1).is_multiple_of(4) {
        bail!("--frames {} is not 4k+1; try 17", a.frames);
    }
    let cache = super::super::generate::cache_config(Some(&a.cache), None, None)?;
    let dir = model_folder(a)?;
    let dev = Device::Cpu;
    let vb = RandomWeights::var_builder(7, DType::F32, &dev);
    let (f, lh, lw) = ((a.frames - 1) / 4 + 1, h / 8, w / 8);
    let latents = vb
        .get((16 * f * lh * lw, 1), "latents")?
        .reshape((1, 16, f, lh, lw))?;
    // Asked for as [n, 1] (fan-in 1): uniform values of unit variance.
    let prompt = vb.get((512 * 4096, 1), "prompt")?.reshape((1, 512, 4096))?;
    let negative = vb
        .get((512 * 4096, 1), "negative")?
        .reshape((1, 512, 4096))?;
    let settings: Vec<(String, usize, f64, Option<kino_engine::hooks::CacheConfig>)> = vec![
        ("50 steps, guidance 5".into(), 50, 5.0, None),
        (
            format!("50 steps, guidance 5, --cache {}", a.cache),
            50,
            5.0,
            cache,
        ),
        ("4 steps, no guidance".into(), 4, 1.0, None),
    ];
    eprintln!(
        "video: Wan2.1-1.3B (random weights), {w}x{h}, {} frames ({} video tokens, 512 text \
         tokens), f32 on the CPU, {} threads (RAYON_NUM_THREADS sets them)",
        a.frames,
        f * (lh / 2) * (lw / 2),
        candle_core::utils::get_num_threads()
    );
    let mut rows = Vec::new();
    for (name, steps, guidance, cache) in settings {
        let mut opts = PipelineOptions::for_device(dev.clone());
        opts.low_memory = false;
        opts.cache = cache;
        let mut pipe = WanPipeline::open(&dir, opts)
            .with_context(|| format!("opening the bench model {}", dir.display()))?;
        eprintln!("video: {name}…");
        let t0 = Instant::now();
        let out = pipe.denoise(
            &latents,
            &prompt,
            (guidance > 1.0).then_some(&negative),
            steps,
            guidance,
            &mut |_| Ok(()),
        )?;
        let denoise = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let video = pipe.decode(&out, &mut |_| Ok(()))?;
        let decode = t1.elapsed().as_secs_f64();
        anyhow::ensure!(
            video.dims()[2] == a.frames,
            "the decode gave {:?}, not {} frames",
            video.dims(),
            a.frames
        );
        let cfg_passes = if guidance > 1.0 { 2 } else { 1 };
        let (forwards, skipped) = match pipe.cache_stats() {
            Some(s) => (s.forwards, s.skipped),
            None => (steps * cfg_passes, 0),
        };
        rows.push(Row {
            name,
            steps,
            guidance,
            forwards,
            skipped,
            denoise,
            decode,
        });
    }
    println!(
        "{:<70} {:>6} {:>9} {:>9} {:>10} {:>9} {:>10} {:>8}",
        "setting", "steps", "guidance", "forwards", "skipped", "denoise s", "s/video", "speed-up"
    );
    let base = rows[0].denoise + rows[0].decode;
    for r in &rows {
        let total = r.denoise + r.decode;
        println!(
            "{:<70} {:>6} {:>9} {:>9} {:>10} {:>9.1} {:>10.1} {:>7.2}×",
            r.name,
            r.steps,
            r.guidance,
            r.forwards,
            r.skipped,
            r.denoise,
            total,
            base / total
        );
    }
    println!(
        "(s/video: the denoising loop and the VAE decode ({:.1} s); the text encoder is left out, \
         the same for every row)",
        rows[0].decode
    );
    Ok(())
}
