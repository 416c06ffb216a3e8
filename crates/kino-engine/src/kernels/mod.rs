//! Kino's kernels, all in one place: the CPU ones with run-time dispatch per instruction set, and
//! (feature `cuda`) fused CUDA kernels for the transformer's element-wise passes ([`fused_gpu`],
//! [`modulated_layer_norm_to`], [`gated_residual_to`]; `cuda::bias_act`, `cuda::rope_i`). The
//! model files call them by what they compute (`kernels::modulated_layer_norm`, `PackedLinear`,
//! `kernels::attention`, `conv::causal_conv`, ...). The CPU layout follows llama.cpp's ggml-cpu:
//!
//! | file            | what                                                               |
//! |-----------------|--------------------------------------------------------------------|
//! | `mod.rs`        | [`Isa`], its detection and the `KINO_CPU_ISA` cap; the dispatch     |
//! | `portable.rs`   | plain-Rust kernels: element-wise passes, reference microkernels      |
//! | `gemm.rs`       | the packed matmul (packing, tiling) over any microkernel            |
//! | `x86_64.rs`     | AVX-512F and AVX2+FMA GEMM microkernels                              |
//! | `aarch64.rs`    | NEON microkernels (GEMM, direct conv)                                |
//! | `ops.rs`        | candle glue: custom ops, storage/layout helpers, the thread pool    |
//! | `conv.rs`       | the VAE's causal conv (scratch bands, tasks) and RMS norm + SiLU     |
//! | `neon_check.rs` | a `main` that checks the NEON paths against the portable ones       |
//! | `cuda.rs`, `cuda/fused.cu` | GPU (feature `cuda`): fused transformer kernels as candle custom ops |
//!
//! `portable.rs`, `gemm.rs`, `x86_64.rs` and `aarch64.rs` are pure (slices in, slices out; no
//! candle, no crates) and compile standalone, which is how the NEON code is tested on x86-64
//! machines: `scripts/test-neon.sh` cross-compiles `neon_check.rs` for aarch64 and runs it under
//! qemu-user; `tests/pure_kernels.rs` compiles the host's set on its own in every `cargo test`.
//!
//! Which paths run ([`isa`]): the best the CPU has (AVX-512F, else AVX2+FMA on x86-64; NEON on
//! aarch64; else portable), capped by the environment variable `KINO_CPU_ISA`
//! (`avx512|avx2|neon|portable`), e.g. `KINO_CPU_ISA=avx2` to run an AVX-512 machine as an
//! AVX2-only one. An ISA the CPU lacks is refused with a warning (the best one it has runs
//! instead); unsupported instructions never run.
//!
//! | kernel                        | AVX-512          | AVX2+FMA         | NEON             | portable |
//! |-------------------------------|------------------|------------------|------------------|----------|
//! | packed GEMM (linear layers)   | 12×32 microkernel| 6×16 microkernel | 6×16 microkernel | candle's matmul |
//! | blocked attention             | on the GEMM      | on the GEMM      | on the GEMM      | candle, chunked |
//! | VAE conv                      | 3×3 stride 1: Winograd F(2×2, 3×3) on the 12×32 microkernel; other stride 1: implicit GEMM on it; else `gemm` crate | the same on the 6×16 microkernel | 6×16 direct row | implicit GEMM (`gemm` crate) |
//! | softmax, bias+GELU, modulated LayerNorm, gated residual, RMS norm (+ RoPE) of q and k, the VAE's RMS norm+SiLU and Winograd transforms | compiled for it | compiled for it | baseline (NEON) | baseline |
//! | GGUF block expansion (Q8_0, K-quants, F16/BF16) | portable code (F16/BF16 by `half`'s slice conversion: F16C where the CPU has it), panels in parallel | | | |
//!
//! The `gemm` crate (candle's matmul, and the VAE's implicit GEMM here) is built without its
//! `x86-v4` feature, so on x86-64 it runs its AVX2+FMA kernels on every CPU that has them, AVX-512
//! ones included, and never AVX-512: the `KINO_CPU_ISA=avx2` cap holds for it too. On x86-64 the
//! implicit GEMM decodes faster than the direct conv rows Kino had (AVX-512 12×32 and AVX2 6×16;
//! removed, see `conv.rs`), which swept all of a layer's weights for every block of pixels; and
//! Winograd's F(2×2, 3×3) (`conv.rs`) takes the 3×3 convs, nearly all of the VAE's work, to 16
//! multiplications per 2×2 output pixels instead of 36 (`KINO_CPU_CONV=implicit-gemm` runs them
//! by implicit GEMM instead, for timing one against the other).

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
mod ops;
pub mod portable;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

pub use conv::rms_norm_silu;
pub use ops::trailing_equal_rows;
pub use ops::{
    attention, attention_counted, bias_gelu_inplace, dequantize_q8_0, feed_forward, gated_residual,
    modulated_layer_norm, rms_norm_rope, softmax_last_dim_owned, FfnLayer, PackedLinear,
    QuantizedLinear,
};

/// An instruction set the kernels have a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX-512F.
    Avx512,
    /// x86-64 with AVX2 and FMA.
    Avx2Fma,
    /// aarch64 Advanced SIMD.
    Neon,
    /// Plain Rust and candle's own kernels.
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2Fma, Isa::Neon, Isa::Portable];

    /// The name `KINO_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        let s = s.trim().to_ascii_lowercase();
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run the ISA's kernels.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best ISA this CPU has.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Portable)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The ISA to run given the value of `KINO_CPU_ISA` (if set), which ISAs the CPU supports and
/// the best of them: the requested one when the CPU has it, else `best` with a warning to log.
pub fn select(
    request: Option<&str>,
    supported: impl Fn(Isa) -> bool,
    best: Isa,
) -> (Isa, Option<String>) {
    let Some(req) = request.map(str::trim).filter(|r| !r.is_empty()) else {
        return (best, None);
    };
    match Isa::parse(req) {
        Some(isa) if supported(isa) => (isa, None),
        Some(isa) => (
            best,
            Some(format!(
                "KINO_CPU_ISA={req}: this CPU cannot run {isa} instructions; using {best}, the \
                 best it has"
            )),
        ),
        None => (
            best,
            Some(format!(
                "KINO_CPU_ISA={req} is not one of avx512, avx2, neon, portable; using {best}"
            )),
        ),
    }
}

static ISA: OnceLock<Isa> = OnceLock::new();

#[cfg(test)]
thread_local! {
    /// Set by tests ([`with_isa`]) to run other paths on this thread.
    static FORCED: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// The ISA whose kernels run: detected once, capped by `KINO_CPU_ISA`. Never one the CPU
/// lacks.
pub fn isa() -> Isa {
    #[cfg(test)]
    if let Some(isa) = FORCED.with(|f| f.get()) {
        return isa;
    }
    *ISA.get_or_init(|| {
        let request = std::env::var("KINO_CPU_ISA").ok();
        let (isa, warning) = select(request.as_deref(), Isa::supported, Isa::best());
        if let Some(w) = warning {
            tracing::warn!("{w}");
            eprintln!("warning: {w}");
        }
        tracing::debug!("CPU kernels: {isa}");
        isa
    })
}

/// Runs `f` with the kernels of `isa` chosen on this thread (decisions taken on other threads,
/// e.g. inside the pool, follow the calling thread's). Panics if the CPU lacks `isa`.
#[cfg(test)]
pub(crate) fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isa.supported(), "{isa} is not supported here");
    struct Reset(Option<Isa>);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCED.with(|f| f.set(self.0));
        }
    }
    let _reset = Reset(FORCED.with(|f| f.replace(Some(isa))));
    f()
}

/// The packed-GEMM microkernel of `isa`, if it has one (the portable ISA uses candle's matmul).
pub fn gemm_kernel(isa: Isa) -> Option<&'static gemm::Kernel> {
    if !isa.supported() {
        return None;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(&x86_64::AVX512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => Some(&x86_64::AVX2),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Some(&aarch64::NEON),
        _ => None,
    }
}

/// The packed-GEMM microkernel of [`isa`], if it has one: the linear layers pack their weights
/// for it and the attention runs on it.
pub fn packed_gemm() -> Option<&'static gemm::Kernel> {
    gemm_kernel(isa())
}

/// Defines `fn $name(isa, args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when `isa`
/// is one of them (the body's loops auto-vectorize to that width), else for the baseline target
/// (on aarch64 that includes NEON).
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match isa {
                    // SAFETY: `Isa::supported` checked, the CPU has the features.
                    Isa::Avx512 if isa.supported() => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Isa::Avx2Fma if isa.supported() => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            let _ = isa;
            imp($($arg),*)
        }
    };
}

multiversion! {
    /// [`portable::softmax_rows_unnormalized`] compiled for `isa`.
    fn softmax_rows_unnormalized(rows: &mut [f32], m: usize, sums: &mut [f32], scale: f32) {
        portable::softmax_rows_unnormalized(rows, m, sums, scale)
    }
}

multiversion! {
    /// [`portable::softmax_block_online`] compiled for `isa`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_block_online(
        s: &mut [f32],
        ld: usize,
        cols: usize,
        scale: f32,
        max: &mut [f32],
        sum: &mut [f32],
        corr: &mut [f32],
    ) {
        portable::softmax_block_online(s, ld, cols, scale, max, sum, corr)
    }
}

multiversion! {
    /// [`portable::rms_norm_silu_rows`] compiled for `isa`.
    fn rms_norm_silu_rows(src: &[f32], g: &[f32], out: &mut [f32]) {
        portable::rms_norm_silu_rows(src, g, out)
    }
}

multiversion! {
    /// [`portable::rms_norm_rope_rows`] compiled for `isa`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_rope_rows(
        src: &[f32],
        w: &[f32],
        eps: f32,
        cos: &[f32],
        sin: &[f32],
        half: usize,
        out: &mut [f32],
    ) {
        portable::rms_norm_rope_rows(src, w, eps, cos, sin, half, out)
    }
}

multiversion! {
    /// [`portable::modulated_layer_norm_row`] compiled for `isa`.
    fn modulated_layer_norm_row(
        src: &[f32],
        scale: &[f32],
        shift: &[f32],
        eps: f64,
        one_plus: bool,
        out: &mut [f32],
    ) {
        portable::modulated_layer_norm_row(src, scale, shift, eps, one_plus, out)
    }
}

multiversion! {
    /// [`portable::gated_residual_row`] compiled for `isa`.
    fn gated_residual_row(x: &[f32], y: &[f32], gate: &[f32], out: &mut [f32]) {
        portable::gated_residual_row(x, y, gate, out)
    }
}

multiversion! {
    /// [`portable::winograd_input`] compiled for `isa`.
    fn winograd_input(dst: &mut [f32], x: [&[f32]; 4], s: f32, sj: f32) {
        portable::winograd_input(dst, x, s, sj)
    }
}

multiversion! {
    /// [`portable::winograd_output`] compiled for `isa`.
    fn winograd_output(m: [&[f32]; 16], y: [&mut [f32]; 4]) {
        portable::winograd_output(m, y)
    }
}

multiversion! {
    /// [`portable::bias_gelu_row`] compiled for `isa`.
    fn bias_gelu_row(row: &mut [f32], bias: &[f32]) {
        portable::bias_gelu_row(row, bias)
    }
}

multiversion! {
    /// [`portable::gelu_row`] compiled for `isa`.
    fn gelu_row(row: &mut [f32]) {
        portable::gelu_row(row)
    }
}

/// The direct convolution of one row with the kernel of `isa`, if it has one for these channel
/// counts (NEON; else `None`: the caller takes the implicit-GEMM path, as AVX-512, AVX2 and
/// portable always do).
pub fn conv_row(isa: Isa, p: &portable::ConvRow, out: &mut [f32]) -> Option<()> {
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && p.co.is_multiple_of(4) {
        aarch64::conv_row_neon(p, out);
        return Some(());
    }
    let _ = (isa, p, out);
    None
}

// -------------------------------------------------------------------------------------------------
// Device-independent entry points of the fused CUDA kernels (`cuda.rs`, feature `cuda`): on a CUDA
// device they run one kernel; elsewhere (and with KINO_FUSED=0) the same maths as candle ops.
// -------------------------------------------------------------------------------------------------

/// Whether the fused CUDA kernels serve tensors on `device` (see [`cuda::enabled`]).
pub fn fused_gpu(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::enabled(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// [`modulated_layer_norm`] rounded to `dtype` (diffusers' `(norm(x.float()) * (1 + scale) +
/// shift).type_as(x)`): one kernel on a CUDA device when `dtype` is x's.
pub fn modulated_layer_norm_to(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    one_plus: bool,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_gpu(x.device()) && x.dtype() == dtype {
        return cuda::modulated_layer_norm(x, scale, shift, eps, one_plus);
    }
    modulated_layer_norm(x, scale, shift, eps, one_plus)?.to_dtype(dtype)
}

/// [`gated_residual`] rounded to `dtype` (`(x.float() + y * gate).type_as(x)`): one kernel on a
/// CUDA device when `dtype` is x's and y's.
pub fn gated_residual_to(
    x: &Tensor,
    y: &Tensor,
    gate: &Tensor,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused_gpu(x.device()) && x.dtype() == dtype && y.dtype() == dtype {
        return cuda::gated_residual(x, y, gate);
    }
    gated_residual(x, y, gate)?.to_dtype(dtype)
}
