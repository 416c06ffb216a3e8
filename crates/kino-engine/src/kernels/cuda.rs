//! Kino's fused CUDA kernels (feature `cuda`): `cuda/fused.cu`, compiled to PTX by
//! kino-engine's build.rs and loaded once per device. Each op here replaces a chain of candle
//! element-wise ops on the transformer's hot path (the modulated LayerNorms, the gated
//! residuals, a Linear layer's bias and the FFN's GELU, RoPE) with one pass, keeping the
//! reference's arithmetic (f32 maths, one rounding per stored value as PyTorch does).
//!
//! [`enabled`] says whether they run: on a CUDA device, unless `KINO_FUSED=0` (the candle ops then
//! run instead, e.g. to compare the two on a card). Callers go through the device-independent
//! functions in [`super`] (`modulated_layer_norm_to`, `gated_residual_to`, `bias_act`,
//! `rope_i`), which fall back to candle ops everywhere else.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use std::sync::{Arc, OnceLock};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "kino_fused";

/// Whether the fused kernels run for tensors on `device`: a CUDA device, and `KINO_FUSED` is not
/// `0` (read once).
pub fn enabled(device: &Device) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    device.is_cuda() && !*OFF.get_or_init(|| std::env::var("KINO_FUSED").is_ok_and(|v| v == "0"))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        d => candle_core::bail!("Kino's fused CUDA kernels take bf16, f16 or f32, not {d:?}"),
    })
}

fn elementwise_config(numel: usize) -> LaunchConfig {
    let blocks = numel.div_ceil(256).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Batch and token strides (elements) of a modulation row tensor `[B|1, N|1, D]` with unit
/// stride along D; 0 where the dimension is 1 (broadcast).
fn row_strides(l: &Layout, what: &str, (b, n, d): (usize, usize, usize)) -> Result<(i64, i64)> {
    let dims = l.dims();
    let st = l.stride();
    if dims.len() != 3
        || dims[2] != d
        || (d > 1 && st[2] != 1)
        || (dims[0] != 1 && dims[0] != b)
        || (dims[1] != 1 && dims[1] != n)
    {
        candle_core::bail!("fused kernel: {what} must be [{b}|1, {n}|1, {d}] with unit stride along the last dim, got {dims:?} / {st:?}")
    }
    let b = if dims[0] == 1 { 0 } else { st[0] as i64 };
    let n = if dims[1] == 1 { 0 } else { st[1] as i64 };
    Ok((b, n))
}

fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
}

fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("fused kernel: {what} must be contiguous"),
    }
}

fn cpu_only() -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("Kino's fused CUDA kernels run on CUDA devices only")
}

/// The element type's kernel `{base}_{bf16|f16|f32}` of fused.cu (the module loaded once per
/// device) and the device's stream to launch it on (`stream.launch_builder(&function)`).
fn func<T: WithDType>(dev: &CudaDevice, base: &str) -> Result<(Arc<CudaStream>, CudaFunction)> {
    let f = dev.get_or_load_custom_func(&format!("{base}_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
    Ok((dev.cuda_stream(), f.into_cuda_function()))
}

/// A fused op with three tensor inputs, for one element type (the first input's): the output
/// has the first input's shape. [`custom_op3!`] makes it a candle `CustomOp3`.
trait Fused3 {
    const NAME: &'static str;
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
    ) -> Result<CudaStorage>;
}

/// [`Fused3`] with two inputs.
trait Fused2 {
    const NAME: &'static str;
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage>;
}

/// Dispatches on `$dtype` to `$op.run::<T>($args)` for bf16, f16 and f32.
macro_rules! by_dtype {
    ($op:expr, $name:expr, $dtype:expr, $($arg:expr),*) => {
        match $dtype {
            DType::BF16 => $op.run::<bf16>($($arg),*),
            DType::F16 => $op.run::<f16>($($arg),*),
            DType::F32 => $op.run::<f32>($($arg),*),
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $name),
        }
    };
}

macro_rules! custom_op3 {
    ($t:ty) => {
        impl candle_core::CustomOp3 for $t {
            fn name(&self) -> &'static str {
                <$t as Fused3>::NAME
            }
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                cpu_only()
            }
            fn cuda_fwd(
                &self,
                a: &CudaStorage,
                al: &Layout,
                b: &CudaStorage,
                bl: &Layout,
                c: &CudaStorage,
                cl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                let out = by_dtype!(self, self.name(), a.dtype(), a, al, b, bl, c, cl)?;
                Ok((out, al.shape().clone()))
            }
        }
    };
}

macro_rules! custom_op2 {
    ($t:ty) => {
        impl candle_core::CustomOp2 for $t {
            fn name(&self) -> &'static str {
                <$t as Fused2>::NAME
            }
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                cpu_only()
            }
            fn cuda_fwd(
                &self,
                a: &CudaStorage,
                al: &Layout,
                b: &CudaStorage,
                bl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                let out = by_dtype!(self, self.name(), a.dtype(), a, al, b, bl)?;
                Ok((out, al.shape().clone()))
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------

struct ModulatedLayerNorm {
    eps: f32,
    one_plus: bool,
}

impl Fused3 for ModulatedLayerNorm {
    const NAME: &'static str = "kino-modulated-layer-norm";
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        scale: &CudaStorage,
        sl: &Layout,
        shift: &CudaStorage,
        hl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (b, n, d) = xl.shape().dims3()?;
        let (sc_b, sc_n) = row_strides(sl, "scale", (b, n, d))?;
        let (sh_b, sh_n) = row_strides(hl, "shift", (b, n, d))?;
        let xs = contiguous_view::<T>(x, xl, "x")?;
        let sc = f32_view(scale, sl)?;
        let sh = f32_view(shift, hl)?;
        let rows = b * n;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * d)? };
        let (stream, f) = func::<T>(&dev, "modulated_layer_norm")?;
        let threads = if d >= 256 { 256 } else { 32 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs);
        bld.arg(&out);
        bld.arg(&sc);
        bld.arg(&sh);
        candle_core::builder_arg!(
            bld,
            rows as i64,
            n as i64,
            d as i64,
            sc_b,
            sc_n,
            sh_b,
            sh_n,
            self.eps,
            self.one_plus as i32
        );
        // SAFETY: the argument list matches the kernel's signature in fused.cu.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
custom_op3!(ModulatedLayerNorm);

/// `T(LayerNorm(x.float()) * (1 + scale) + shift)` (`one_plus`) or `… * scale + shift`, in x's
/// dtype. `x`: `[B, N, D]`; `scale`, `shift`: f32 `[B|1, N|1, D]`.
pub fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    one_plus: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    suffix(x.dtype())?;
    x.apply_op3_no_bwd(
        &scale.to_dtype(DType::F32)?,
        &shift.to_dtype(DType::F32)?,
        &ModulatedLayerNorm {
            eps: eps as f32,
            one_plus,
        },
    )
}

// ---------------------------------------------------------------------------------------------

struct GatedResidual;

impl Fused3 for GatedResidual {
    const NAME: &'static str = "kino-gated-residual";
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
        gate: &CudaStorage,
        gl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (b, n, d) = xl.shape().dims3()?;
        if yl.dims() != xl.dims() {
            candle_core::bail!("gated residual: {:?} vs {:?}", xl.dims(), yl.dims())
        }
        let (g_b, g_n) = row_strides(gl, "gate", (b, n, d))?;
        let xs = contiguous_view::<T>(x, xl, "x")?;
        let ys = contiguous_view::<T>(y, yl, "y")?;
        let g = f32_view(gate, gl)?;
        let numel = xl.shape().elem_count();
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(numel)? };
        let (stream, f) = func::<T>(&dev, "gated_residual")?;
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs);
        bld.arg(&ys);
        bld.arg(&g);
        bld.arg(&out);
        candle_core::builder_arg!(bld, numel as i64, n as i64, d as i64, g_b, g_n);
        // SAFETY: the argument list matches the kernel's signature in fused.cu.
        unsafe { bld.launch(elementwise_config(numel)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
custom_op3!(GatedResidual);

/// `T(x.float() + y.float() * gate)` in x's dtype. `x`, `y`: `[B, N, D]` of one dtype; `gate`:
/// f32 `[B|1, N|1, D]`.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    suffix(x.dtype())?;
    let y = y.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(&y, &gate.to_dtype(DType::F32)?, &GatedResidual)
}

// ---------------------------------------------------------------------------------------------

struct BiasAct {
    gelu: bool,
}

impl Fused2 for BiasAct {
    const NAME: &'static str = "kino-bias-act";
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        y: &CudaStorage,
        yl: &Layout,
        bias: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = y.device().clone();
        let d = yl.dims().last().copied().unwrap_or(1);
        if bl.dims() != [d] {
            candle_core::bail!("bias: expected [{d}], got {:?}", bl.dims())
        }
        let ys = contiguous_view::<T>(y, yl, "y")?;
        let bs = contiguous_view::<T>(bias, bl, "bias")?;
        let numel = yl.shape().elem_count();
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(numel)? };
        let (stream, f) = func::<T>(&dev, "bias_act")?;
        let mut bld = stream.launch_builder(&f);
        bld.arg(&ys);
        bld.arg(&bs);
        bld.arg(&out);
        candle_core::builder_arg!(bld, numel as i64, d as i64, self.gelu as i32);
        // SAFETY: the argument list matches the kernel's signature in fused.cu.
        unsafe { bld.launch(elementwise_config(numel)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
custom_op2!(BiasAct);

/// `T(y + bias)`, then `T(gelu_tanh(·))` when `gelu`. `bias`: `[D]`, y's dtype.
pub fn bias_act(y: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    let y = y.contiguous()?;
    suffix(y.dtype())?;
    let bias = bias.to_dtype(y.dtype())?.contiguous()?;
    y.apply_op2_no_bwd(&bias, &BiasAct { gelu })
}

// ---------------------------------------------------------------------------------------------

struct RopeI {
    heads: usize,
}

impl Fused3 for RopeI {
    const NAME: &'static str = "kino-rope-i";
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let heads = self.heads;
        let numel = xl.shape().elem_count();
        let dim = xl.dims().last().copied().unwrap_or(0);
        let rows = numel / dim.max(1);
        let half = dim / heads / 2;
        if dim != heads * half * 2 || cl.shape().elem_count() != rows * half {
            candle_core::bail!(
                "rope: x {:?} with {heads} heads vs cos {:?}",
                xl.dims(),
                cl.dims()
            )
        }
        let xs = contiguous_view::<T>(x, xl, "x")?;
        let c = contiguous_view::<f32>(cos, cl, "cos")?;
        let s = contiguous_view::<f32>(sin, sl, "sin")?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(numel)? };
        let (stream, f) = func::<T>(&dev, "rope_i")?;
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs);
        bld.arg(&c);
        bld.arg(&s);
        bld.arg(&out);
        candle_core::builder_arg!(bld, rows as i64, heads as i64, half as i64);
        // SAFETY: the argument list matches the kernel's signature in fused.cu.
        unsafe { bld.launch(elementwise_config(numel / 2)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
custom_op3!(RopeI);

/// Interleaved RoPE in f32 maths, x's dtype out. `x`: `[B, N, heads * head_dim]`; `cos`, `sin`:
/// f32, `B * N * head_dim / 2` values (token-major).
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    suffix(x.dtype())?;
    x.apply_op3_no_bwd(
        &cos.to_dtype(DType::F32)?.contiguous()?,
        &sin.to_dtype(DType::F32)?.contiguous()?,
        &RopeI { heads },
    )
}
