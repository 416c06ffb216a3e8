//! Parity tests against `fixtures/gen_vae.py` (diffusers `AutoencoderKLWan`, random weights)
//! and the errors a user can cause.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{AutoencoderKLWan, TilingConfig};
use crate::testing::{fixtures_dir, rel_error};
use crate::Error;

#[derive(Deserialize)]
struct Case {
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct Run {
    component: String,
    model: String,
    input: String,
    expected: String,
    tolerance: f64,
    #[serde(default)]
    tiling: Option<TilingConfig>,
}

fn load_case(case: &str) -> (PathBuf, Case) {
    let dir = fixtures_dir().join(case);
    let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

fn check(name: &str, out: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_error(out, expected).unwrap();
    println!("{name}: rel error {err:.3e} (tolerance {tol:e})");
    assert!(err <= tol, "{name}: rel error {err} > {tol}");
}

/// Runs the fixture run `component` of `case` through the public API.
fn run_case(case: &str, component: &str) {
    run_case_dtype(case, component, DType::F32)
}

/// [`run_case`] with the model in `dtype` (f64 and f16 take candle's conv2d path instead of
/// the CPU f32 kernel).
fn run_case_dtype(case: &str, component: &str, dtype: DType) {
    let (dir, c) = load_case(case);
    let run = c
        .runs
        .iter()
        .find(|r| r.component == component)
        .unwrap_or_else(|| panic!("{case} has no {component} run"));
    let dev = Device::Cpu;
    let mut vae = AutoencoderKLWan::load(&dir.join(&run.model), dtype, &dev).unwrap();
    vae.set_tiling(run.tiling);
    let input = candle_core::safetensors::load(dir.join(&run.input), &dev).unwrap();
    let expected = candle_core::safetensors::load(dir.join(&run.expected), &dev).unwrap();
    let name = format!("{case}/{component} {dtype:?}");
    let tol = if dtype == DType::F16 {
        1e-2
    } else {
        run.tolerance
    };
    match component {
        "vae-encode" | "vae-encode-tiled" => {
            let (mean, logvar) = vae.encode(&input["sample"]).unwrap();
            check(&format!("{name} mean"), &mean, &expected["mean"], tol);
            check(&format!("{name} logvar"), &logvar, &expected["logvar"], tol);
            if run.tiling.is_some() {
                vae.set_tiling(None);
                let (plain, _) = vae.encode(&input["sample"]).unwrap();
                let diff = rel_error(&plain, &expected["mean"]).unwrap();
                println!("{name}: untiled differs by {diff:.3e}");
                assert!(diff > 1e-3);
            }
        }
        "vae-decode" | "vae-decode-tiled" => {
            let mut calls = Vec::new();
            let out = vae
                .decode_with_progress(&input["z"], &mut |d, t| {
                    calls.push((d, t));
                    Ok(())
                })
                .unwrap();
            check(&name, &out, &expected["sample"], tol);
            let total = calls.last().map(|c| c.1).unwrap_or(0);
            assert!(total >= input["z"].dim(2).unwrap());
            assert_eq!(calls.len(), total, "progress called once per frame");
            assert!(calls.iter().enumerate().all(|(i, c)| c.0 == i + 1));
            if run.tiling.is_some() {
                // The tiles must really have been blended: untiled decoding differs.
                vae.set_tiling(None);
                let plain = vae.decode(&input["z"]).unwrap();
                let diff = rel_error(&plain, &expected["sample"]).unwrap();
                println!("{name}: untiled differs by {diff:.3e}");
                assert!(diff > 1e-3);
            }
        }
        other => panic!("unknown component {other}"),
    }
}

#[test]
fn wan21_encode() {
    run_case("vae-wan21", "vae-encode");
}

#[test]
fn wan21_decode() {
    run_case("vae-wan21", "vae-decode");
}

#[test]
fn wan21_decode_tiled() {
    run_case("vae-wan21", "vae-decode-tiled");
}

#[test]
fn wan21_encode_tiled() {
    run_case("vae-wan21", "vae-encode-tiled");
}

#[test]
fn wan22_encode() {
    run_case("vae-wan22", "vae-encode");
}

#[test]
fn wan22_decode() {
    run_case("vae-wan22", "vae-decode");
}

#[test]
fn wan22_decode_tiled() {
    run_case("vae-wan22", "vae-decode-tiled");
}

#[test]
fn generic_conv_path_f64() {
    run_case_dtype("vae-wan21", "vae-decode", DType::F64);
    run_case_dtype("vae-wan21", "vae-encode", DType::F64);
    run_case_dtype("vae-wan22", "vae-decode", DType::F64);
    run_case_dtype("vae-wan22", "vae-encode", DType::F64);
}

#[test]
fn f16_runs_close() {
    run_case_dtype("vae-wan22", "vae-decode", DType::F16);
}

/// The CPU f32 conv kernels (AVX-512 blocks of 12/4/1 pixels × 32/16 channels, and the GEMM
/// fallback for other channel counts) against candle's conv2d path in f64, with caches, zero
/// frames, temporal stride and a fused residual.
#[test]
fn cpu_conv_matches_generic() {
    use super::conv::WanCausalConv3d;
    use candle_nn::VarBuilder;
    let dev = Device::Cpu;
    // (c, co, h, w, kt, ks, stride_t, pad_t, pad_s, frames, cache frames)
    let cases = [
        (8, 48, 5, 13, 3, 3, 1, 1, 1, 3, 2),
        (16, 32, 4, 7, 3, 3, 1, 1, 1, 1, 1),
        (5, 16, 3, 3, 3, 3, 1, 1, 1, 2, 0),
        (6, 12, 4, 14, 3, 3, 1, 1, 1, 2, 2),
        (16, 16, 6, 25, 3, 1, 2, 0, 0, 5, 0),
        (24, 64, 3, 12, 1, 1, 1, 0, 0, 2, 0),
        (7, 32, 9, 30, 1, 3, 1, 0, 1, 2, 0),
    ];
    for (i, &(c, co, h, w, kt, ks, st, pt, ps, nf, nc)) in cases.iter().enumerate() {
        let wt = Tensor::randn(0f32, 0.3, (co, c, kt, ks, ks), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, co, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (nf, h, w, c), &dev).unwrap();
        let cache = Tensor::randn(0f32, 1.0, (nc, h, w, c), &dev).unwrap();
        let cache = (nc > 0).then_some(&cache);
        let build = |dtype: DType| {
            let t = HashMap::from([
                ("weight".to_string(), wt.clone()),
                ("bias".to_string(), b.clone()),
            ]);
            let vb = VarBuilder::from_tensors(t, dtype, &dev);
            WanCausalConv3d::new(c, co, (kt, ks), (st, 1), (pt, ps), vb).unwrap()
        };
        let fast = build(DType::F32).forward(&x, cache).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let c64 = cache.map(|t| t.to_dtype(DType::F64).unwrap());
        let slow = build(DType::F64).forward(&x64, c64.as_ref()).unwrap();
        let err = rel_error(&fast, &slow).unwrap();
        println!("conv case {i}: out {:?} rel error {err:.2e}", fast.dims());
        assert!(err < 1e-5, "case {i}: {err}");
        // Fused residual.
        let res = Tensor::randn(0f32, 1.0, fast.dims(), &dev).unwrap();
        let fused = build(DType::F32)
            .forward_res(&x, cache, Some(&res))
            .unwrap();
        let err = rel_error(&fused, &(fast + &res).unwrap()).unwrap();
        assert!(err < 1e-6, "case {i} residual: {err}");
    }
    // The stride-2 downsampling conv with its (0, 1, 0, 1) zero padding.
    for (i, &(c, co, h, w)) in [
        (8, 32, 8, 30),
        (16, 48, 9, 13),
        (5, 12, 4, 6),
        (16, 16, 3, 3),
    ]
    .iter()
    .enumerate()
    {
        let wt = Tensor::randn(0f32, 0.3, (co, c, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, co, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, h, w, c), &dev).unwrap();
        let build = |dtype: DType| {
            let t = HashMap::from([
                ("weight".to_string(), wt.clone()),
                ("bias".to_string(), b.clone()),
            ]);
            let vb = VarBuilder::from_tensors(t, dtype, &dev);
            WanCausalConv3d::conv2d_down(c, co, vb).unwrap()
        };
        let fast = build(DType::F32).forward(&x, None).unwrap();
        let slow = build(DType::F64)
            .forward(&x.to_dtype(DType::F64).unwrap(), None)
            .unwrap();
        // Reference: ZeroPad2d((0, 1, 0, 1)) then a stride-2 conv, in NCHW.
        let nchw = x.permute((0, 3, 1, 2)).unwrap();
        let padded = nchw
            .pad_with_zeros(2, 0, 1)
            .unwrap()
            .pad_with_zeros(3, 0, 1)
            .unwrap();
        let reference = padded
            .conv2d(&wt, 0, 2, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let err = rel_error(&fast, &reference).unwrap();
        let err64 = rel_error(&slow, &reference.to_dtype(DType::F64).unwrap()).unwrap();
        println!(
            "down case {i}: out {:?} rel error {err:.2e} / f64 path {err64:.2e}",
            fast.dims()
        );
        assert!(err < 1e-5 && err64 < 1e-5, "down case {i}: {err} {err64}");
    }
}

fn wan21() -> AutoencoderKLWan {
    AutoencoderKLWan::load(
        &fixtures_dir().join("vae-wan21/vae"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn config_and_compression() {
    let vae = wan21();
    let cfg = vae.config();
    assert_eq!(cfg.z_dim, 4);
    assert_eq!(cfg.spatial_compression(), 8);
    assert_eq!(cfg.temporal_compression(), 4);
    assert_eq!(vae.decoded_num_frames(3), 9);
    let def = super::Config::default();
    assert_eq!(def.base_dim, 96);
    assert_eq!(def.latents_mean.len(), 16);
    assert_eq!(def.spatial_compression(), 8);
    let wan22 = AutoencoderKLWan::load(
        &fixtures_dir().join("vae-wan22/vae"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(wan22.config().spatial_compression(), 16);
    assert_eq!(wan22.config().decoder_dim(), 5);
    assert_eq!(wan22.config().sample_channels(), 3);
}

#[test]
fn cancel_stops_decoding() {
    let vae = wan21();
    let z = Tensor::zeros((1, 4, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut seen = 0;
    let r = vae.decode_with_progress(&z, &mut |d, _| {
        seen = d;
        if d == 2 {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(seen, 2);
}

fn invalid(r: crate::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::InvalidRequest(m)) => {
            println!("{m}");
            assert!(m.contains(needle), "message {m:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn bad_input_shapes() {
    let vae = wan21();
    let dev = Device::Cpu;
    let x = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    invalid(vae.encode(&x(&[1, 4, 1, 16, 16])), "3 channels");
    invalid(
        vae.encode(&x(&[1, 3, 1, 20, 16])),
        "height 20 is not a multiple of 8",
    );
    invalid(vae.encode(&x(&[1, 3, 1, 16, 12])), "width 12");
    invalid(vae.encode(&x(&[1, 3, 4, 16, 16])), "1 + 4");
    invalid(vae.encode(&x(&[3, 1, 16, 16])), "got shape [3, 1, 16, 16]");
    invalid(vae.decode(&x(&[1, 5, 1, 2, 2])), "4 latent channels");
    invalid(vae.decode(&x(&[4, 1, 2, 2])), "got shape");
    invalid(vae.decode(&x(&[1, 4, 0, 2, 2])), "empty");
}

fn temp_copy(name: &str) -> PathBuf {
    let src = fixtures_dir().join("vae-wan21/vae");
    let dst = std::env::temp_dir().join(format!("kino-vae-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn weights_file(dir: &Path) -> PathBuf {
    dir.join("diffusion_pytorch_model.safetensors")
}

#[test]
fn missing_tensor_is_typed() {
    let dir = temp_copy("missing");
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(weights_file(&dir), &Device::Cpu).unwrap();
    assert!(t
        .remove("decoder.up_blocks.1.resnets.0.norm2.gamma")
        .is_some());
    candle_core::safetensors::save(&t, weights_file(&dir)).unwrap();
    let r = AutoencoderKLWan::load(&dir, DType::F32, &Device::Cpu);
    match r {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "decoder.up_blocks.1.resnets.0.norm2.gamma")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_shape_is_typed() {
    let dir = temp_copy("shape");
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(weights_file(&dir), &Device::Cpu).unwrap();
    t.insert(
        "encoder.conv_in.weight".into(),
        Tensor::zeros((4, 3, 3, 3, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, weights_file(&dir)).unwrap();
    let r = AutoencoderKLWan::load(&dir, DType::F32, &Device::Cpu);
    assert!(
        matches!(&r, Err(Error::ShapeMismatch { name, .. }) if name == "encoder.conv_in.weight"),
        "{r:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_weights_are_typed() {
    let dir = temp_copy("truncated");
    let bytes = std::fs::read(weights_file(&dir)).unwrap();
    std::fs::write(weights_file(&dir), &bytes[..bytes.len() / 2]).unwrap();
    let r = AutoencoderKLWan::load(&dir, DType::F32, &Device::Cpu);
    assert!(matches!(r, Err(Error::BadFile { .. })), "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_is_typed() {
    let dir = temp_copy("config");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("\"attn_scales\": []", "\"attn_scales\": [0.5]");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let r = AutoencoderKLWan::load(&dir, DType::F32, &Device::Cpu);
    assert!(
        matches!(&r, Err(Error::BadFile { message, .. }) if message.contains("attn_scales")),
        "{r:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Full-size decode benchmark (one run): `python fixtures/gen_vae.py --bench-setup DIR`, then
/// `KINO_VAE_BENCH_DIR=DIR /usr/bin/time -v <test binary> bench_full_decode --ignored
/// --nocapture`. Compares with `DIR/torch_sample.safetensors` when `--bench-run` made it.
/// `KINO_VAE_BENCH_FRAMES=N` decodes only the first N latent frames.
#[test]
#[ignore]
fn bench_full_decode() {
    let Ok(dir) = std::env::var("KINO_VAE_BENCH_DIR") else {
        panic!("set KINO_VAE_BENCH_DIR (see the doc comment)");
    };
    let dir = PathBuf::from(dir);
    let dev = Device::Cpu;
    let mem = || {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        s.lines()
            .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let vae = AutoencoderKLWan::load(&dir.join("vae"), DType::F32, &dev).unwrap();
    println!("after load: {}", mem());
    let mut z =
        candle_core::safetensors::load(dir.join("z.safetensors"), &dev).unwrap()["z"].clone();
    if let Ok(n) = std::env::var("KINO_VAE_BENCH_FRAMES") {
        z = z.narrow(2, 0, n.parse().unwrap()).unwrap();
    }
    let t0 = std::time::Instant::now();
    let out = vae.decode(&z).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    println!("after decode: {}", mem());
    println!(
        "kino decode {:?} -> {:?}: {dt:.2} s ({} rayon threads)",
        z.dims(),
        out.dims(),
        rayon::current_num_threads()
    );
    if let Ok(t) = candle_core::safetensors::load(dir.join("torch_sample.safetensors"), &dev) {
        if t["sample"].dims() == out.dims() {
            println!(
                "rel error vs torch: {:.3e}",
                rel_error(&out, &t["sample"]).unwrap()
            );
        }
    }
}
