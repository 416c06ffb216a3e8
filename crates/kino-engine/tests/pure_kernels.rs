//! The pure kernel files (`kernels/gemm.rs`, `portable.rs` and the host's ISA file: no candle, no
//! crates, see `kernels/mod.rs`) still compile on their own, as `scripts/test-neon.sh` compiles
//! them for aarch64: checked here for the host with the `rustc` beside the `cargo` running the
//! test, so a dependency that slips into them (stop 58's `super::ops` in `gemm.rs`) fails `cargo
//! test` too, not only the emulated NEON check of `.ci/run`.

use std::path::Path;
use std::process::Command;

#[test]
fn pure_kernel_files_compile_standalone() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kernels");
    let arch_file = match std::env::consts::ARCH {
        "x86_64" => Some("x86_64"),
        "aarch64" => Some("aarch64"),
        _ => None,
    };
    let mut root = String::from("#![allow(dead_code)]\n");
    for m in ["gemm", "portable"].into_iter().chain(arch_file) {
        root += &format!(
            "#[path = {:?}]\nmod {m};\n",
            dir.join(format!("{m}.rs")).display().to_string()
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("pure.rs");
    std::fs::write(&src, root).unwrap();
    // Cargo names its compiler in `RUSTC` for build scripts only; a test takes the `rustc`
    // beside the `cargo` that runs it (`CARGO`), else the one on the PATH.
    let rustc = std::env::var_os("RUSTC")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let cargo = std::path::PathBuf::from(std::env::var_os("CARGO")?);
            let rustc = cargo.with_file_name(format!("rustc{}", std::env::consts::EXE_SUFFIX));
            rustc.is_file().then_some(rustc)
        })
        .unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "lib",
            "--emit",
            "metadata",
        ])
        .arg("--out-dir")
        .arg(tmp.path())
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", rustc.display()));
    assert!(
        out.status.success(),
        "the pure kernel files do not compile on their own:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
