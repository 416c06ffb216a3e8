// Kino's trimmed candle-flash-attn 0.11.1 (see README.md): compiles only the kernel Wan's attention
// uses, flash_fwd_hdim128_bf16_sm80 (runs on sm_80 and newer, Hopper included), plus the C glue,
// with the features Kino never asks for compiled out. Two nvcc jobs instead of 53: about 5 minutes
// on 2 cores instead of 2.5 hours.
//
// CUTLASS is not fetched from GitHub (the upstream build clones it): point CUTLASS_DIR at a
// checkout of NVIDIA/cutlass at the commit below (only `include/` and `tools/util/include/` are
// read). CANDLE_FLASH_ATTN_BUILD_DIR keeps the compiled library between builds, as upstream.
use cudaforge::{KernelBuilder, Result};
use std::{fs, path::PathBuf};

const CUTLASS_COMMIT: &str = "7d49e6c7e2f8896c47f586706e67e1fb215529dc";

const KERNEL_FILES: [&str; 2] = [
    "kernels/flash_api.cu",
    "kernels/flash_fwd_hdim128_bf16_sm80.cu",
];

const HEADER_FILES: [&str; 17] = [
    "kernels/alibi.h",
    "kernels/block_info.h",
    "kernels/dropout.h",
    "kernels/error.h",
    "kernels/flash.h",
    "kernels/flash_fwd_kernel.h",
    "kernels/flash_fwd_launch_template.h",
    "kernels/hardware_info.h",
    "kernels/kernel_helpers.h",
    "kernels/kernel_traits.h",
    "kernels/kernels.h",
    "kernels/mask.h",
    "kernels/philox.cuh",
    "kernels/rotary.h",
    "kernels/softmax.h",
    "kernels/static_switch.h",
    "kernels/utils.h",
];

fn update_hash(hash: &mut u64, bytes: &[u8]) {
    const FNV_PRIME: u64 = 1099511628211;
    for &byte in bytes {
        *hash ^= u64::from(byte);
        *hash = hash.wrapping_mul(FNV_PRIME);
    }
}

fn header_hash() -> Result<u64> {
    let mut hash = 14695981039346656037;
    for file in HEADER_FILES {
        update_hash(&mut hash, file.as_bytes());
        update_hash(&mut hash, &fs::read(file)?);
    }
    Ok(hash)
}

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CUTLASS_DIR");
    for file in KERNEL_FILES.iter().chain(HEADER_FILES.iter()) {
        println!("cargo::rerun-if-changed={file}");
    }
    let cutlass = match std::env::var("CUTLASS_DIR") {
        Ok(dir) if PathBuf::from(&dir).join("include/cute").is_dir() => PathBuf::from(dir),
        _ => panic!(
            "the flash-attn feature needs CUTLASS: set CUTLASS_DIR to a checkout of \
             https://github.com/NVIDIA/cutlass at commit {CUTLASS_COMMIT} (its include/ and \
             tools/util/include/ are enough; scripts/cuda-env.sh sets it when the toolchain \
             venv has one)"
        ),
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR not set"));
    let build_dir = match std::env::var("CANDLE_FLASH_ATTN_BUILD_DIR") {
        Err(_) => out_dir,
        Ok(dir) => PathBuf::from(&dir)
            .canonicalize()
            .unwrap_or_else(|_| panic!("CANDLE_FLASH_ATTN_BUILD_DIR {dir} does not exist")),
    };

    let header_hash_arg = format!("-DCANDLE_FLASH_ATTN_HEADER_HASH=0x{:016x}", header_hash()?);
    let builder = KernelBuilder::new()
        .source_files(KERNEL_FILES.iter())
        .out_dir(&build_dir)
        .arg(&format!("-I{}", cutlass.join("include").display()))
        .arg(&format!("-I{}", cutlass.join("tools/util/include").display()))
        .arg("-std=c++17")
        .arg("-O3")
        .arg("-U__CUDA_NO_HALF_OPERATORS__")
        .arg("-U__CUDA_NO_HALF_CONVERSIONS__")
        .arg("-U__CUDA_NO_HALF2_OPERATORS__")
        .arg("-U__CUDA_NO_BFLOAT16_CONVERSIONS__")
        // Kino calls flash_attn(q, k, v, scale, causal = false) with head dim 128: no dropout,
        // ALiBi, softcap or sliding window, and K is always a whole tile (128 = d_rounded).
        .arg("-DFLASHATTENTION_DISABLE_DROPOUT")
        .arg("-DFLASHATTENTION_DISABLE_ALIBI")
        .arg("-DFLASHATTENTION_DISABLE_SOFTCAP")
        .arg("-DFLASHATTENTION_DISABLE_LOCAL")
        .arg("-DFLASHATTENTION_DISABLE_UNEVEN_K")
        .arg("--expt-relaxed-constexpr")
        .arg("--expt-extended-lambda")
        .arg("--use_fast_math")
        .arg(&header_hash_arg)
        .arg("-Xcompiler")
        .arg("-fPIC")
        .thread_percentage(1.0);

    let out_file = build_dir.join("libflashattention.a");
    builder.build_lib(out_file)?;

    println!("cargo::rustc-link-search={}", build_dir.display());
    println!("cargo::rustc-link-lib=flashattention");
    println!("cargo::rustc-link-lib=dylib=cudart");
    println!("cargo::rustc-link-lib=dylib=stdc++");
    Ok(())
}
