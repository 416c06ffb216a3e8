//! With the `cuda` feature, compiles `src/kernels/cuda/fused.cu` to PTX (Kino's fused CUDA
//! kernels, loaded by `kernels/cuda.rs`) with the `nvcc` that candle's own CUDA build uses
//! (`$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH) for `compute_$CUDA_COMPUTE_CAP` (default 80: the
//! driver compiles the PTX for the card it runs on, any newer one included). Without the
//! feature it does nothing: CPU builds need no CUDA toolchain.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels/cuda/fused.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fused.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_start_matches("sm_").replace('.', ""))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "80".to_string());
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|r| PathBuf::from(r).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-fmad=false"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/kernels/cuda/fused.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed ({s}) on src/kernels/cuda/fused.cu"),
        Err(e) => panic!(
            "the `cuda` feature needs CUDA's nvcc ({}: {e}); `source scripts/cuda-env.sh VENV` \
             sets it up (README, Building for a GPU)",
            nvcc.display()
        ),
    }
}
