//! The training script of the bundled model keeps working: `training/train.py --smoke` runs a few
//! steps of every stage on a tiny batch and writes a complete model folder, which `kino generate`
//! then loads and runs like any Wan model.
//!
//! `training/train_lora.py --smoke` does the same for the adapters of the bundled model: a few
//! steps of each kind, and `kino generate --lora FILE` (with `--preset fast` for the few-step
//! one, whose file names the preset) loads what it wrote.
//!
//! Needs Python with the reference stack (`pip install -r fixtures/requirements.txt`), found as
//! $KINO_PYTHON (default `python3`); `.ci/run` installs it.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `cmd`; its exit status and stdout + stderr.
fn run_logged(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), log)
}

/// The interpreter with the reference stack, checked.
fn python() -> String {
    let python = std::env::var("KINO_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import torch, diffusers, transformers, tokenizers, peft",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{python}` ({e}); install Python 3 or set KINO_PYTHON")
        });
    assert!(
        probe.status.success(),
        "`{python}` lacks the training stack: run `{python} -m pip install -r fixtures/requirements.txt` \
         (or set KINO_PYTHON to an interpreter that has it)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

#[test]
fn training_script_runs_a_few_steps_and_kino_loads_the_result() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/train.py"))
            .args(["--smoke", "--threads", "1", "--save-every", "1", "--out"])
            .arg(&out)
            .arg("--latent-cache")
            .arg(tmp.path().join("latents.pt")),
    );
    assert!(ok, "train.py --smoke failed:\n{log}");
    assert!(
        log.contains("frames step 2/2") && log.contains("dit step 2/2"),
        "{log}"
    );

    // The shape-weighted loss found cells that tell the shapes apart: some, fewer than the
    // object's (world.shape_difference, pooled to the latent grid).
    let cells = |what: &str| -> f64 {
        let at = log
            .find(what)
            .unwrap_or_else(|| panic!("no `{what}` in:\n{log}"));
        log[at + what.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.trim_end_matches(',').parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (object, shape) = (cells("object cells "), cells("shape cells "));
    assert!(
        shape > 0.0 && shape < object,
        "object {object}, shape {shape}"
    );

    // First-frame conditioning (dit_train.image_cond): the clean latent frame 0 the training uses
    // is the one encoding the first frame alone gives (what the image-to-video pipeline encodes),
    // and the folder says it takes an image the Wan2.2 TI2V way.
    assert!(
        log.contains("latent frame 0: whole clip vs first frame alone, max difference"),
        "{log}"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["expand_timesteps"], true, "{index}");

    // The record of the run: configuration, machine, finite losses.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    for (stage, key) in [
        ("vae", "final_reconstruction_loss"),
        ("transformer", "final_flow_matching_loss"),
    ] {
        let loss = record[stage][key].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite() && loss > 0.0, "{stage}.{key} = {loss}");
    }
    assert_eq!(record["config"]["seed"], 0);
    assert!(record["config"]["dit_train"]["image_cond"].as_f64() > Some(0.0));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("kino-eval.json")).unwrap())
            .unwrap();
    assert!(eval["cases"].as_array().is_some_and(|c| !c.is_empty()));
    // A checkpoint part-way (--save-every) and the encoded clips kept for the next run.
    assert!(out
        .join("step-1/transformer/diffusion_pytorch_model.safetensors")
        .is_file());
    assert!(tmp.path().join("latents.pt").is_file());

    // Kino loads the folder and generates through the whole pipeline.
    generates_a_clip(
        &out,
        "a red circle moving right on a black background",
        &tmp.path().join("smoke.mp4"),
    );

    // The VAE stages that start from that VAE (`--vae-from`): each writes OUT/vae and a record
    // under its own key (psnr before/after, final loss). `moved` says which halves of the VAE
    // each leaves changed, checked tensor by tensor.
    let vae_stage = |stage: &str, dir: &std::path::Path, done: &str| -> serde_json::Value {
        let (ok, log) = run_logged(
            Command::new(&python)
                .arg(repo().join("training/train.py"))
                .args(["--smoke", "--threads", "1", "--stage", stage, "--vae-from"])
                .arg(out.join("vae"))
                .arg("--out")
                .arg(dir),
        );
        assert!(ok, "train.py --stage {stage} --smoke failed:\n{log}");
        assert!(log.contains(done), "{log}");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap())
                .unwrap();
        let key = stage.replace('-', "_");
        for k in [
            "psnr_db_before",
            "psnr_db_after",
            "final_reconstruction_loss",
        ] {
            let v = record[&key][k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{key}.{k} = {v}");
        }
        record[&key].clone()
    };
    let moved = |dir: &std::path::Path| -> String {
        let compare = format!(
            "from safetensors.torch import load_file as L\n\
             a = L({:?}); b = L({:?})\n\
             same = lambda p: all(a[k].equal(b[k]) for k in a if k.startswith(p))\n\
             assert a.keys() == b.keys()\n\
             print('encoder', same('encoder.') and same('quant_conv.'))\n\
             print('decoder', same('decoder.'))",
            out.join("vae/diffusion_pytorch_model.safetensors"),
            dir.join("vae/diffusion_pytorch_model.safetensors"),
        );
        let (ok, log) = run_logged(Command::new(&python).args(["-c", &compare]));
        assert!(ok, "{log}");
        log
    };

    // `--stage vae-decoder` fine-tunes the decoder of that VAE: the encoder (so the latents the
    // transformer was trained on) stays bit for bit, the decoder moves, and the record says how
    // the round trip's PSNR changed.
    let tuned = tmp.path().join("decoder");
    vae_stage("vae-decoder", &tuned, "VAE decoder done: PSNR");
    let log = moved(&tuned);
    assert!(
        log.contains("encoder True") && log.contains("decoder False"),
        "{log}"
    );

    // `--stage vae-finetune` trains the whole VAE further on clips drawn in batches: encoder and
    // decoder both move, the latent statistics are measured again, and the record has the
    // squares' fill before and after.
    let finetuned = tmp.path().join("finetune");
    let ft = vae_stage("vae-finetune", &finetuned, "VAE fine-tune done: PSNR");
    let log = moved(&finetuned);
    assert!(
        log.contains("encoder False") && log.contains("decoder False"),
        "{log}"
    );
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("vae/config.json")).unwrap())
            .unwrap()
    };
    assert_ne!(
        config(&out)["latents_mean"],
        config(&finetuned)["latents_mean"],
        "the latent statistics were not measured again"
    );
    for when in ["square_fill_before", "square_fill_after"] {
        assert_eq!(
            ft[when]["drawn"].as_f64(),
            Some(1.0),
            "{when}: {}",
            ft[when]
        );
        let v = ft[when]["round_trip"].as_f64().unwrap_or(f64::NAN);
        assert!(v > 0.0 && v <= 1.5, "{when}.round_trip = {v}");
    }
}

/// Another architecture for the bundled model (the planned fix for its squares, issue 17): a new
/// VAE with one down/up stage (2x spatial and temporal: `--stage vae-finetune --vae-scratch
/// --vae-dim-mult 1 2 --vae-temporal-downsample 1`), then a transformer with patch size (1, 4, 4)
/// started from the shipped model where the tensors fit (`--dit-init-from`): the record names
/// the fresh tensors, and Kino generates from the folder.
#[test]
fn a_new_vae_architecture_and_patch_size_train_and_run() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    let vae_dir = tmp.path().join("vae2x");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/train.py"))
            .args([
                "--smoke",
                "--threads",
                "1",
                "--stage",
                "vae-finetune",
                "--vae-scratch",
            ])
            .args(["--vae-dim-mult", "1", "2", "--vae-temporal-downsample", "1"])
            .arg("--out")
            .arg(&vae_dir),
    );
    assert!(ok, "train.py --vae-scratch failed:\n{log}");
    assert!(log.contains("2x spatial, 2x temporal"), "{log}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir.join("vae/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["dim_mult"], serde_json::json!([1, 2]), "{config}");
    assert_eq!(config["scale_factor_spatial"], 2, "{config}");

    let out = tmp.path().join("model");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/train.py"))
            .args(["--smoke", "--threads", "1", "--patch-size", "1", "4", "4"])
            .arg("--vae-from")
            .arg(vae_dir.join("vae"))
            .arg("--dit-init-from")
            .arg(repo().join("models/kino-shapes"))
            .arg("--out")
            .arg(&out),
    );
    assert!(
        ok,
        "train.py --patch-size 1 4 4 --dit-init-from failed:\n{log}"
    );
    assert!(log.contains("latents (2, 16, 9, 32, 32)"), "{log}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(
        record["transformer_initialised_from"]["fresh"],
        serde_json::json!([
            "patch_embedding.bias",
            "patch_embedding.weight",
            "proj_out.bias",
            "proj_out.weight"
        ]),
        "{}",
        record["transformer_initialised_from"]
    );

    generates_a_clip(
        &out,
        "a red square moving right on a white background",
        &tmp.path().join("2x.mp4"),
    );

    // `training/reduce_latent.py` rewrites that VAE with 4 latent channels (its principal
    // directions; a 1x4x4 patch is then 64 numbers, which the transformer's inner dim 128 can
    // see and write whole) and carries the transformer across: the encoder is exactly the
    // projection, the decoder's first layer equals the original's on the projected latent
    // wherever it reads no zero padding, and Kino generates from the carried folder.
    let reduced = tmp.path().join("vae2x4");
    let carried = tmp.path().join("model-z4");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/reduce_latent.py"))
            .args(["--threads", "1", "--clips", "8", "--square-clips", "8"])
            .arg("--vae")
            .arg(vae_dir.join("vae"))
            .arg("--out")
            .arg(&reduced)
            .arg("--transformer")
            .arg(&out)
            .arg("--transformer-out")
            .arg(&carried),
    );
    assert!(ok, "reduce_latent.py failed:\n{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reduced.join("reduce.json")).unwrap())
            .unwrap();
    let enc = report["encoder_max_error"].as_f64().unwrap();
    let first = report["conv_in_interior_max_error"].as_f64().unwrap();
    let dec = report["decoder_agreement_db"].as_f64().unwrap();
    assert!(
        enc < 1e-3,
        "encoder differs from the projection by {enc}: {report}"
    );
    assert!(
        first < 1e-4,
        "decoder's first layer differs by {first}: {report}"
    );
    // (At the padding the decoder is not exact: a smoke-trained VAE's constant lies mostly
    // outside the kept channels, so its whole-frame agreement is low; a trained one's is 42 dB.)
    assert!(
        dec.is_finite() && dec > 10.0,
        "decoder agrees to {dec} dB: {report}"
    );
    for dir in [reduced.join("vae"), carried.join("vae")] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["z_dim"], 4, "{config}");
        assert_eq!(
            config["latents_std"],
            serde_json::json!([1.0, 1.0, 1.0, 1.0]),
            "{config}"
        );
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(carried.join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&config["in_channels"], &config["out_channels"]),
        (&serde_json::json!(4), &serde_json::json!(4)),
        "{config}"
    );
    generates_a_clip(
        &carried,
        "a red square moving right on a white background",
        &tmp.path().join("2x4.mp4"),
    );
}

/// `kino generate PROMPT --model MODEL` (2 steps) writes `video`: a 64×64, 17-frame clip.
fn generates_a_clip(model: &std::path::Path, prompt: &str, video: &std::path::Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_kino"))
        .args(["generate", prompt, "--steps", "2", "--seed", "1", "-o"])
        .arg(video)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "kino generate on {} failed: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let info = kino_media::probe(video).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (64, 64, 17));
}

/// `world.render_batch` (the clips a GPU run draws in batches) gives the same pixels and shape
/// differences as `world.render` / `world.shape_difference`, clip by clip.
#[test]
fn batched_rendering_draws_the_same_clips() {
    let python = python();
    let script = format!(
        "import random, sys, numpy as np\n\
         sys.path.insert(0, {:?})\n\
         import world\n\
         rng = random.Random(11)\n\
         combos = world.combinations()\n\
         scenes = [world.sample_scene(rng.choice(combos), 48, 40, rng) for _ in range(30)]\n\
         clips, diff = world.render_batch(scenes, 48, 40, 9, 'cpu', True)\n\
         ref = np.stack([world.render(s, 48, 40, 9) for s in scenes])\n\
         rd = np.stack([world.shape_difference(s, 48, 40, 9) for s in scenes])\n\
         print('shapes', sorted({{s.shape for s in scenes}}))\n\
         print('clips', clips.shape == ref.shape and (clips.numpy() == ref).all())\n\
         print('diff', diff.shape == rd.shape and (diff.numpy() == rd).all())",
        repo().join("training")
    );
    let (ok, log) = run_logged(Command::new(&python).args(["-c", &script]));
    assert!(ok, "{log}");
    assert!(
        log.contains("shapes ['circle', 'square', 'triangle']")
            && log.contains("clips True")
            && log.contains("diff True"),
        "{log}"
    );
}

#[test]
fn adapter_training_script_runs_a_few_steps_and_kino_loads_the_adapters() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["concept", "fast"] {
        let out = tmp.path().join(format!("{kind}.safetensors"));
        let (ok, log) = run_logged(
            Command::new(&python)
                .arg(repo().join("training/train_lora.py"))
                .args([kind, "--smoke", "--threads", "1", "--out"])
                .arg(&out),
        );
        assert!(ok, "train_lora.py {kind} --smoke failed:\n{log}");
        assert!(log.contains(&format!("{kind} step 2/2")), "{log}");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        let loss = record["train"]["final_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite() && loss > 0.0, "{kind}: final loss {loss}");
        if kind == "concept" {
            let eval: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.with_extension("eval.json")).unwrap(),
            )
            .unwrap();
            assert!(
                eval["cases"].as_array().is_some_and(|c| !c.is_empty()),
                "{eval}"
            );
        }

        // Kino loads the adapter; the few-step one brings its preset.
        let video = tmp.path().join(format!("{kind}.mp4"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kino"));
        cmd.args([
            "generate",
            "a red circle moving diagonally on a black background",
        ])
        .args(["--seed", "1", "--lora"])
        .arg(&out)
        .arg("-o")
        .arg(&video)
        .arg("--model")
        .arg(repo().join("models/kino-shapes"));
        if kind == "fast" {
            cmd.args(["--preset", "fast"]);
        } else {
            cmd.args(["--steps", "2"]);
        }
        let o = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "kino generate --lora {kind}: {stderr}");
        let meta = kino_media::read_metadata(&video)
            .unwrap()
            .expect("metadata");
        assert_eq!(
            meta["lora"]["adapters"][0]["file"],
            format!("{kind}.safetensors"),
            "{meta}"
        );
        if kind == "fast" {
            assert!(
                stderr.contains("preset `fast`: 4 steps, guidance off"),
                "{stderr}"
            );
            assert_eq!(meta["steps"], 4, "{meta}");
            assert_eq!(meta["guidance"], 1.0, "{meta}");
            assert_eq!(meta["lora"]["preset"]["name"], "fast", "{meta}");
        } else {
            assert!(meta["lora"].get("preset").is_none(), "{meta}");
        }
    }
}

/// `training/train_vace.py --smoke` (kino-shapes-vace's training) runs a few steps of every task
/// with the object- and shape-weighted loss and the teacher loss on reference samples
/// (`--distill`) and other drawings of each reference (`--ref-variants`), its control latents equal to `WanVACEPipeline`'s, and writes a VACE folder that `kino generate --reference` loads and runs.
#[test]
fn vace_training_script_runs_a_few_steps_and_kino_loads_the_result() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vace");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/train_vace.py"))
            .args(["--smoke", "--threads", "1", "--object-weight", "2"])
            .args(["--shape-weight", "4", "--distill", "1", "--steps", "4"])
            .args([
                "--ref-variants",
                "2",
                "--aux-ref",
                "1",
                "--aux-min-sigma",
                "0",
            ])
            .arg("--data-cache")
            .arg(tmp.path().join("cache.pt"))
            .arg("--out")
            .arg(&out),
    );
    assert!(ok, "train_vace.py --smoke failed:\n{log}");
    // The recognition head ran on the reference samples drawn.
    assert!(log.contains("ref_shape_acc"), "{log}");
    assert!(log.contains("step 4/4"), "{log}");
    // Every task's control latents were checked against the pipeline's own (the script asserts
    // the difference; here: that the check ran for each task).
    for task in ["edit", "reference", "continue", "text", "image"] {
        assert!(
            log.contains(&format!("control latents, task {task}:")),
            "no pipeline check for {task}:\n{log}"
        );
    }
    // The weighted loss found the object's cells and, among them, fewer that tell the shapes
    // apart.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let (object, shape) = (
        record["loss_cells"]["object"].as_f64().unwrap_or(f64::NAN),
        record["loss_cells"]["shape"].as_f64().unwrap_or(f64::NAN),
    );
    assert!(
        object > 0.0 && shape > 0.0 && shape < object,
        "object {object}, shape {shape}"
    );
    assert_eq!(record["config"]["object_weight"], 2.0);
    assert_eq!(record["config"]["shape_weight"], 4.0);
    // The teacher (the main model given the full caption) ran on the reference samples drawn.
    assert_eq!(record["config"]["distill"], 1.0);
    assert_eq!(record["config"]["ref_variants"], 2);
    let distill = record["loss_per_task_last_100"]["distill"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!(
        distill.is_finite() && distill > 0.0,
        "distill loss {distill}"
    );
    let loss = record["loss_last_100"].as_f64().unwrap_or(f64::NAN);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");

    // Kino opens the folder as a VACE model and follows a reference image with it.
    let reference = tmp.path().join("ref.png");
    let o = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=red:size=64x64",
        ])
        .args(["-frames:v", "1"])
        .arg(&reference)
        .output()
        .expect("ffmpeg");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let video = tmp.path().join("ref.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_kino"))
        .args(["generate", "an object moving right on a black background"])
        .args(["--steps", "2", "--seed", "1", "--reference"])
        .arg(&reference)
        .arg("-o")
        .arg(&video)
        .arg("--model")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "kino generate --reference on {} failed: {}",
        out.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let info = kino_media::probe(&video).unwrap();
    assert_eq!((info.width, info.height, info.frame_count), (64, 64, 17));

    // `training/vace_probe.py` (how much a reference's shape and colour move the prediction,
    // against the teacher's caption) runs on the folder and prints one row per noise level.
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/vace_probe.py"))
            .args(["--samples", "1", "--sigmas", "0.9", "--model"])
            .arg(&out),
    );
    assert!(ok, "vace_probe.py failed:\n{log}");
    let row = log
        .lines()
        .find(|l| l.trim_start().starts_with("0.9 "))
        .unwrap_or_else(|| panic!("no row for sigma 0.9:\n{log}"));
    let values: Vec<f64> = row
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect();
    // Model, hints and teacher for shape, colour and place, then model vs teacher.
    assert_eq!(values.len(), 10, "{row}");
    assert!(values.iter().all(|v| v.is_finite() && *v >= 0.0), "{row}");
    // The teacher's prediction moves when its caption names another colour (a probe comparing a
    // prediction with itself would read 0 here), and not for the same object drawn elsewhere
    // (its caption is the same).
    assert!(values[5] > 0.0 && values[8] == 0.0, "{row}");

    // `training/ref_latent_probe.py` (can a classifier read the shape off the reference latents
    // the run cached?) trains its two classifiers on them and prints held-out accuracies.
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/ref_latent_probe.py"))
            .args(["--ref-variants", "2", "--epochs", "2", "--held-out", "0.5"])
            .arg("--data-cache")
            .arg(tmp.path().join("cache.pt")),
    );
    assert!(ok, "ref_latent_probe.py failed:\n{log}");
    for name in ["linear", "cnn"] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("{name}: held-out accuracy ")))
            .unwrap_or_else(|| panic!("no {name} line:\n{log}"));
        let acc: f64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&acc), "{line}");
    }

    // A run from the folder (`--init`) records the run that made it among its runs, and a
    // cache made with other settings (here the task mix) is said to be made again and replaced.
    let first = record["command"].as_str().unwrap().to_string();
    let again = tmp.path().join("again");
    let (ok, log) = run_logged(
        Command::new(&python)
            .arg(repo().join("training/train_vace.py"))
            .args(["--smoke", "--threads", "1", "--steps", "1"])
            .args(["--tasks", "reference=0.5,edit=0.5", "--init"])
            .arg(&out)
            .arg("--data-cache")
            .arg(tmp.path().join("cache.pt"))
            .arg("--out")
            .arg(&again),
    );
    assert!(ok, "train_vace.py --init failed:\n{log}");
    assert!(
        log.contains("holds samples made with other settings (tasks)"),
        "{log}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("training.json")).unwrap())
            .unwrap();
    let runs = record["runs"].as_array().unwrap();
    assert!(
        runs.iter().any(|r| r["command"] == first.as_str()),
        "{runs:?}"
    );
}

/// `training/gpu-job.sh` (the prepared device call that trains kino-shapes on the 2× VAE and
/// kino-shapes-vace's branch side by side) runs both jobs for a few steps on the CPU with
/// `SMOKE=1`, leaves what a device call can send back (at most 8 files of at most 16 MiB, one
/// folder level), and `training/gpu-unpack.sh` makes model folders of them that Kino runs,
/// checkpoints included.
#[test]
fn prepared_gpu_job_runs_in_smoke_mode_and_unpacks_into_models_kino_runs() {
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (ok, log) = run_logged(
        Command::new("bash")
            .arg(repo().join("training/gpu-job.sh"))
            .env("SMOKE", "1")
            .env("PYTHON", &python)
            .env("OUT", &out),
    );
    assert!(ok, "gpu-job.sh failed:\n{log}");
    assert!(log.contains("A exit 0, B exit 0"), "{log}");
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            assert!(meta.is_file(), "{} is not a plain file", e.path().display());
            (e.file_name().to_string_lossy().into_owned(), meta.len())
        })
        .collect();
    files.sort();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "A-steps.tar",
            "A.log",
            "A.tar",
            "B-steps.tar",
            "B.log",
            "B.tar",
            "summary.txt"
        ],
        "{files:?}"
    );
    assert!(files.iter().all(|(_, len)| *len <= 16 << 20), "{files:?}");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("saved"), "{summary}");

    let (ok, log) = run_logged(
        Command::new("bash")
            .arg(repo().join("training/gpu-unpack.sh"))
            .arg(&out),
    );
    assert!(ok, "gpu-unpack.sh failed:\n{log}");
    // A: the 2× VAE's model (32×32 latents per frame, patch 1×4×4) and its checkpoint.
    let a_vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("A/vae/config.json")).unwrap())
            .unwrap();
    assert_eq!(a_vae["dim_mult"], serde_json::json!([1, 2]), "{a_vae}");
    let prompt = "a red square moving right on a white background";
    generates_a_clip(&out.join("A"), prompt, &tmp.path().join("a.mp4"));
    generates_a_clip(&out.join("A/step-1"), prompt, &tmp.path().join("a1.mp4"));
    // B: a VACE folder on kino-shapes' VAE and text encoder, and its checkpoint.
    let b_index = std::fs::read_to_string(out.join("B/model_index.json")).unwrap();
    assert!(b_index.contains("WanVACEPipeline"), "{b_index}");
    generates_a_clip(&out.join("B"), prompt, &tmp.path().join("b.mp4"));
    generates_a_clip(&out.join("B/step-2"), prompt, &tmp.path().join("b2.mp4"));
}
