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
