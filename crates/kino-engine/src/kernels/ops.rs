//! candle glue of the CPU kernels: custom ops over `CpuStorage` (storage and layout checks),
//! the thread pool helpers, and the tensor-level entry points the model files call. Each entry
//! point also runs on other devices (or without a packed kernel) as plain candle ops computing
//! the same thing.

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::gemm::{self, Kernel, PackedB};
use super::{isa, portable, Isa};

// -------------------------------------------------------------------------------------------------
// Storage, layout and threads.
// -------------------------------------------------------------------------------------------------

/// Rows `[d]` of a `[b|1, n|1, d]` f32 tensor with unit stride in the last dim, indexed by
/// (batch, token) of a `[b, n, d]` tensor: the modulation broadcast without copies.
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    stride_b: usize,
    stride_n: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn new(data: &'a [f32], l: &Layout, b: usize, n: usize, d: usize) -> candle_core::Result<Self> {
        let (lb, ln, ld) = l.shape().dims3()?;
        let st = l.stride();
        if ld != d || !(lb == 1 || lb == b) || !(ln == 1 || ln == n) || (d > 1 && st[2] != 1) {
            candle_core::bail!(
                "modulation of shape {:?} (strides {st:?}) does not broadcast to [{b}, {n}, {d}]",
                l.dims()
            );
        }
        let stride_b = if lb == 1 { 0 } else { st[0] };
        let stride_n = if ln == 1 { 0 } else { st[1] };
        let last = l.start_offset() + (lb - 1) * st[0] + (ln - 1) * st[1] + d;
        if last > data.len() {
            candle_core::bail!("modulation layout out of bounds");
        }
        Ok(Self {
            data,
            offset: l.start_offset(),
            stride_b,
            stride_n,
            d,
        })
    }

    fn row(&self, bi: usize, ni: usize) -> &[f32] {
        let o = self.offset + bi * self.stride_b + ni * self.stride_n;
        &self.data[o..o + self.d]
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(data) => Ok(data),
        _ => candle_core::bail!("{what}: expected f32, got {:?}", s.dtype()),
    }
}

fn contiguous_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

thread_local! {
    /// Set while this thread runs a share of [`pool_run`] work.
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` over ranges covering `0..n_items` on candle's CPU thread pool. Nested calls (from
/// inside `f`, on any thread, the calling one included) run inline: candle's pool would
/// deadlock on its call lock if the calling thread re-entered it.
pub(crate) fn pool_run(n_items: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if IN_POOL.with(|c| c.get()) {
        f(0..n_items);
        return;
    }
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_POOL.with(|c| c.set(self.0));
        }
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, |range| {
        let _reset = Reset(IN_POOL.with(|c| c.replace(true)));
        f(range);
    });
}

/// Runs `f(row_index, row)` over the `n_rows` rows of `dst` on candle's CPU thread pool.
pub(crate) fn par_rows(dst: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 {
        return;
    }
    let n_rows = dst.len() / row_len;
    let ptr = dst.as_mut_ptr() as usize;
    pool_run(n_rows, |range| {
        for r in range {
            // SAFETY: `r < n_rows`, so the row lies inside `dst`; every row is handed to exactly
            // one worker, so the mutable slices are disjoint; `dst` outlives this call.
            let row = unsafe {
                std::slice::from_raw_parts_mut((ptr as *mut f32).add(r * row_len), row_len)
            };
            f(r, row);
        }
    });
}

// -------------------------------------------------------------------------------------------------
// Element-wise passes.
// -------------------------------------------------------------------------------------------------

/// Softmax of one row, in place.
fn softmax_row(isa: Isa, row: &mut [f32]) {
    let mut sum = [0f32];
    super::softmax_rows_unnormalized(isa, row, row.len(), &mut sum, 1.0);
    let inv = 1.0 / sum[0];
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over the last dim, in place (contiguous f32).
struct SoftmaxInPlace;

impl candle_core::InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "wan-softmax-inplace"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let d = l.dims().last().copied().unwrap_or(1);
        let data = contiguous_f32_mut(s, l, "softmax")?;
        let isa = isa();
        par_rows(data, d, |_, row| softmax_row(isa, row));
        Ok(())
    }
}

/// `x = gelu_tanh(x + bias)` in place, `x` `[.., F]` contiguous f32, `bias` `[F]`.
struct BiasGeluInPlace;

impl candle_core::InplaceOp2 for BiasGeluInPlace {
    fn name(&self) -> &'static str {
        "wan-bias-gelu-inplace"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let bias = contiguous_f32(b, bl, "gelu bias")?;
        let f = bias.len();
        if l.dims().last() != Some(&f) {
            candle_core::bail!("gelu bias {:?} does not fit {:?}", bl.dims(), l.dims());
        }
        let data = contiguous_f32_mut(s, l, "gelu input")?;
        let isa = isa();
        par_rows(data, f, |_, row| super::bias_gelu_row(isa, row, bias));
        Ok(())
    }
}

/// Softmax over the last dim; in place on the CPU (`s` must not be shared).
pub fn softmax_last_dim_owned(s: Tensor) -> candle_core::Result<Tensor> {
    if s.device().is_cpu() && s.dtype() == DType::F32 && s.is_contiguous() {
        s.inplace_op1(&SoftmaxInPlace)?;
        Ok(s)
    } else {
        candle_nn::ops::softmax_last_dim(&s)
    }
}

/// `gelu_tanh(h + bias)` of a `[.., F]` tensor and a `[F]` bias; in place on the CPU in f32
/// (`h` must not be shared).
pub fn bias_gelu_inplace(h: Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 && h.is_contiguous() {
        h.inplace_op2(bias, &BiasGeluInPlace)?;
        Ok(h)
    } else {
        h.broadcast_add(bias)?.gelu()
    }
}

/// `LayerNorm(x) * (1 + scale) + shift` (or `* scale + shift` when `one_plus` is false, i.e. an
/// affine LayerNorm), LayerNorm without affine, over the last dim of a contiguous f32
/// `[B, N, D]` tensor; `scale`/`shift` are `[B|1, N|1, D]`.
struct ModulatedLayerNorm {
    eps: f64,
    one_plus: bool,
}

impl CustomOp3 for ModulatedLayerNorm {
    fn name(&self) -> &'static str {
        "wan-modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm input")?;
        let (b, n, d) = l1.shape().dims3()?;
        let scale = Rows::new(f32_data(s2, "layer norm scale")?, l2, b, n, d)?;
        let shift = Rows::new(f32_data(s3, "layer norm shift")?, l3, b, n, d)?;
        let mut dst = vec![0f32; b * n * d];
        let (eps, one_plus) = (self.eps, self.one_plus);
        let isa = isa();
        par_rows(&mut dst, d, |r, out| {
            let src = &x[r * d..(r + 1) * d];
            let (bi, ni) = (r / n, r % n);
            let (sc, sh) = (scale.row(bi, ni), shift.row(bi, ni));
            super::modulated_layer_norm_row(isa, src, sc, sh, eps, one_plus, out);
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `x + y * gate` for contiguous f32 `[B, N, D]` `x`, `y` and a `[B|1, N|1, D]` gate.
struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "wan-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "residual")?;
        let y = contiguous_f32(s2, l2, "residual branch")?;
        let (b, n, d) = l1.shape().dims3()?;
        if l2.dims() != l1.dims() {
            candle_core::bail!("residual shapes differ: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let gate = Rows::new(f32_data(s3, "gate")?, l3, b, n, d)?;
        let mut dst = vec![0f32; b * n * d];
        let isa = isa();
        par_rows(&mut dst, d, |r, out| {
            let g = gate.row(r / n, r % n);
            let (xs, ys) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
            super::gated_residual_row(isa, xs, ys, g, out);
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `FP32LayerNorm(x.float()) * (1 + scale) + shift` in f32 (`one_plus`), or the affine
/// `FP32LayerNorm` with weight `scale` and bias `shift` (`!one_plus`). `x` is `[B, N, D]`.
pub fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    one_plus: bool,
) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if x.device().is_cpu() {
        return x.apply_op3_no_bwd(scale, shift, &ModulatedLayerNorm { eps, one_plus });
    }
    let d = x.dim(D::Minus1)?;
    let ones = Tensor::ones(d, DType::F32, x.device())?;
    let zeros = Tensor::zeros(d, DType::F32, x.device())?;
    let y = candle_nn::ops::layer_norm(&x, &ones, &zeros, eps as f32)?;
    let scale = if one_plus {
        (scale + 1.0)?
    } else {
        scale.clone()
    };
    y.broadcast_mul(&scale)?.broadcast_add(shift)
}

/// `x.float() + y.float() * gate` (f32 result).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let y = y.to_dtype(DType::F32)?.contiguous()?;
    if x.device().is_cpu() {
        return x.apply_op3_no_bwd(&y, gate, &GatedResidual);
    }
    x + y.broadcast_mul(gate)?
}

/// `torch.nn.RMSNorm` over the last dim `D` of a contiguous f32 tensor (weight `[D]`), each row
/// then rotated by the row's `cos`/`sin` (`half` values each, heads of `2 · half`) when `rope`.
struct RmsNormRope {
    eps: f32,
    rope: Option<(Tensor, Tensor)>,
}

impl CustomOp2 for RmsNormRope {
    fn name(&self) -> &'static str {
        "wan-rms-norm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "RMS norm input")?;
        let w = contiguous_f32(s2, l2, "RMS norm weight")?;
        let d = w.len();
        if l1.dims().last() != Some(&d) {
            candle_core::bail!("RMS norm of {:?} with a weight of {d}", l1.dims());
        }
        let rows = x.len() / d.max(1);
        fn table<'a>(
            s: &'a candle_core::Storage,
            l: &Layout,
            what: &str,
        ) -> candle_core::Result<&'a [f32]> {
            match s {
                candle_core::Storage::Cpu(c) => contiguous_f32(c, l, what),
                _ => candle_core::bail!("{what}: expected a CPU tensor"),
            }
        }
        // Without RoPE the tables are empty (`half` 0), which the rows take as no rotation.
        let guards =
            (self.rope.as_ref()).map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let (c, sn, half) = match &guards {
            None => (&[][..], &[][..], 0),
            Some(((cs, cl), (ss, sl))) => {
                let (c, sn) = (table(cs, cl, "RoPE cos")?, table(ss, sl, "RoPE sin")?);
                let half = c.len() / rows.max(1);
                if half == 0 || c.len() != rows * half || sn.len() != c.len() || d % (2 * half) != 0
                {
                    candle_core::bail!("RoPE tables of {} values for {rows} rows of {d}", c.len());
                }
                (c, sn, half)
            }
        };
        let mut dst = vec![0f32; x.len()];
        let (isa, eps) = (isa(), self.eps);
        par_rows(&mut dst, d, |r, out| {
            let t = r * half..(r + 1) * half;
            let (c, sn) = (&c[t.clone()], &sn[t]);
            super::rms_norm_rope_rows(isa, &x[r * d..(r + 1) * d], w, eps, c, sn, half, out)
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// `torch.nn.RMSNorm(x) · weight` over the last dim, then, with `rope` (cos and sin of
/// `rows × head_dim / 2` values for the rows of `x`), the reference's interleaved rotary embedding
/// of each head: one threaded pass over `x` on the CPU in f32. `None` for tensors it has no
/// path for (another device or dtype): the caller runs candle's ops.
pub fn rms_norm_rope(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !f32_cpu(x) || !f32_cpu(weight) || rope.is_some_and(|(c, s)| !f32_cpu(c) || !f32_cpu(s)) {
        return Ok(None);
    }
    let rope = match rope {
        Some((c, s)) => Some((c.contiguous()?, s.contiguous()?)),
        None => None,
    };
    let op = RmsNormRope { eps, rope };
    Ok(Some(
        x.contiguous()?
            .apply_op2_no_bwd(&weight.contiguous()?, &op)?,
    ))
}

// -------------------------------------------------------------------------------------------------
// Linear layers on the packed GEMM.
// -------------------------------------------------------------------------------------------------

/// Guided self-scheduling of `n` work units over the pool's threads: each grab takes about
/// `1 / (2 · threads)` of what is left, at most `cap` units and never across a multiple of
/// `boundary` (0: no boundary), so the first grabs are large and the last ones single units.
/// Threads that finish early take what the others have not reached, which keeps both the
/// imbalance of uneven work (a last tile of a few rows) and that of a core shared with another
/// process to about one unit; candle's `execute_chunked` hands out `n / (8 · threads)` units per
/// grab, a whole tile or more, and with tiles of unequal size one thread waited for the other at
/// the end of each product (`perf`: 2.4% of a Wan2.1-1.3B forward spent at the pool's barrier).
pub(crate) struct Guided {
    next: std::sync::atomic::AtomicUsize,
    n: usize,
    cap: usize,
    boundary: usize,
    threads: usize,
}

impl Guided {
    /// `n` units for `threads` threads.
    pub(crate) fn new(n: usize, cap: usize, boundary: usize, threads: usize) -> Self {
        Self {
            next: std::sync::atomic::AtomicUsize::new(0),
            n,
            cap,
            boundary,
            threads: threads.max(1),
        }
    }

    /// The next range of units, `None` when all are taken.
    pub(crate) fn next(&self) -> Option<std::ops::Range<usize>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut cur = self.next.load(Relaxed);
        loop {
            if cur >= self.n {
                return None;
            }
            let mut len = ((self.n - cur) / (2 * self.threads)).clamp(1, self.cap.max(1));
            if self.boundary > 0 {
                len = len.min(self.boundary - cur % self.boundary);
            }
            match self
                .next
                .compare_exchange_weak(cur, cur + len, Relaxed, Relaxed)
            {
                Ok(_) => return Some(cur..cur + len),
                Err(now) => cur = now,
            }
        }
    }
}

/// Runs `f(&guided)` on every thread of the pool (each taking ranges from the one [`Guided`]
/// until none are left); see [`Guided`] for `n`, `cap` and `boundary`.
pub(crate) fn par_guided(n: usize, cap: usize, boundary: usize, f: impl Fn(&Guided) + Sync) {
    if n == 0 {
        return;
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    let g = Guided::new(n, cap, boundary, threads);
    pool_run(threads, |_| f(&g));
}

/// Runs `f(rows, tj)` over an `[m, w.n]` product cut into column tiles (`NC` wide) and, within
/// each, runs of `MR`-row groups (up to an `MC` tile), on the pool by [`par_guided`]: all threads
/// work down the same column tile, so its weights are read from memory once.
fn par_tiles(m: usize, w: &gemm::PackedView, f: impl Fn(std::ops::Range<usize>, usize) + Sync) {
    let kern = w.kernel();
    let groups = m.div_ceil(kern.mr);
    let tn = w.n.div_ceil(kern.nc);
    par_guided(groups * tn, kern.mc / kern.mr, groups, |g| {
        while let Some(r) = g.next() {
            let (tj, g0) = (r.start / groups, r.start % groups);
            f(g0 * kern.mr..((g0 + r.len()) * kern.mr).min(m), tj);
        }
    });
}

/// A buffer of `len` floats that `fill(ptr)` writes whole through the pointer, returned with
/// its length set only then: no pass zeroing it first (that pass ran on the calling thread while
/// the pool's other threads waited: 1.3% of a Wan2.1-1.3B forward), and nothing reads or
/// borrows the memory before it is written.
///
/// # Safety
/// `fill` must write all `len` floats at `ptr` (and may read only what it has written).
unsafe fn written_whole(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: the capacity is `len` and the caller vouches that `fill` wrote all of it.
    v.set_len(len);
    v
}

/// `C[m, n] = A[m, k] · Wᵀ (+ bias)` on candle's CPU thread pool ([`par_tiles`]), then
/// `post(row_segment, first_column)` on each finished row segment of C (while it is in cache).
fn matmul_par(
    a: &[f32],
    m: usize,
    w: &PackedB,
    bias: Option<&[f32]>,
    post: gemm::Post,
) -> Vec<f32> {
    let n = w.n;
    assert!(a.len() >= m * w.k && bias.is_none_or(|b| b.len() >= n));
    let view = w.view();
    // SAFETY: the calls cover every row and column tile of C, each starting from the bias or
    // zero, so all m·n floats are written.
    unsafe {
        written_whole(m * n, |c| {
            let c_ptr = c as usize;
            par_tiles(m, &view, |rows, tj| {
                // SAFETY: `a` has m·k floats, C m·n, the bias n; each call writes only its own
                // rows and columns of C (and `post` sees only those, once written), so the
                // calls are disjoint; C outlives the pool call.
                let c = c_ptr as *mut f32;
                gemm::tile_rows(a.as_ptr(), w.k, rows, &view, bias, c, n, tj, post, false);
            });
        })
    }
}

/// Packs `[n, k]` weights in parallel (`from_rows`: `W[j, kk] = src[j·ld + kk]`; else
/// `W[j, kk] = src[kk·ld + j]`).
fn pack(
    kernel: &'static Kernel,
    src: &[f32],
    n: usize,
    k: usize,
    ld: usize,
    rows: bool,
) -> PackedB {
    let mut w = PackedB::zeroed(kernel, n, k);
    let nr = kernel.nr;
    let (data, len) = w.panels_mut();
    par_rows(data, len, |p, panel| {
        if rows {
            gemm::fill_rows_panel(src, n, k, ld, nr, p, panel)
        } else {
            gemm::fill_cols_panel(src, n, k, ld, nr, p, panel)
        }
    });
    w
}

/// A `torch.nn.Linear` with f32 weights packed once for a GEMM microkernel (the original
/// tensor can be dropped).
#[derive(Debug)]
pub struct PackedLinear {
    w: PackedB,
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs a contiguous f32 CPU weight `[out, in]` and its bias `[out]`.
    pub fn new(
        kernel: &'static Kernel,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let (storage, layout) = weight.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((o1, o2))) =
            (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("linear weight: expected a contiguous f32 CPU tensor");
        };
        if !kernel.supported() {
            candle_core::bail!("the {} kernel does not run on this CPU", kernel.name);
        }
        let bias = match bias {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            w: pack(kernel, &data[o1..o2], n, k, k, true),
            bias,
        })
    }

    /// The microkernel the weights are packed for.
    pub fn kernel(&self) -> &'static Kernel {
        self.w.kernel()
    }

    /// `linear(x)`, then `gelu_tanh` when `gelu` (applied as each output tile is finished).
    pub fn forward(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op1_no_bwd(&PackedLinearOp { lin: self, gelu })
    }
}

/// Runs a [`PackedLinear`], optionally with GELU(tanh) applied to the output.
struct PackedLinearOp<'a> {
    lin: &'a PackedLinear,
    gelu: bool,
}

impl CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "wan-packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "linear input")?;
        let k = self.lin.w.k;
        let dims = l.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear input {dims:?} does not end in {k}");
        }
        let m = x.len().checked_div(k).unwrap_or(0);
        let isa = isa();
        let noop = |_: &mut [f32], _: usize| {};
        let gelu = |row: &mut [f32], _: usize| super::gelu_row(isa, row);
        let post: gemm::Post = if self.gelu { &gelu } else { &noop };
        let out = matmul_par(x, m, &self.lin.w, self.lin.bias.as_deref(), post);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.lin.w.n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

// -------------------------------------------------------------------------------------------------
// Attention on the packed GEMM.
// -------------------------------------------------------------------------------------------------

/// Scaled dot-product attention without mask on the CPU in f32, blocked per (batch, head,
/// query block) on the packed GEMM of `kernel`: K and V of each (batch, head) are packed once;
/// each task walks the keys in blocks for its query rows, flash-attention style
/// ([`gemm::attention_rows`]: scores of one key block, online softmax, `P·V` accumulated), and
/// writes its rows straight into the `[B, N, H·d]` output. q/k/v are read in their
/// `[B, N, H, d]` layout through strides. Inputs: q `[B, N, H, d]`, k and v `[B, M, H, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kernel: &'static Kernel,
) -> candle_core::Result<Tensor> {
    attention_counted(q, k, v, scale, kernel, 1)
}

/// [`attention`] where the last key (and its value) stands for `last_key_count` equal keys, as
/// if it were repeated that many times at the end: what a cross-attention gets when it leaves
/// out the equal rows of a padded context ([`trailing_equal_rows`]) before its key and value
/// projections. `last_key_count` ≥ 1.
pub fn attention_counted(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    kernel: &'static Kernel,
    last_key_count: usize,
) -> candle_core::Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = PackedAttention {
        scale,
        kernel,
        last_key_count: last_key_count.max(1),
    };
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// How many rows at the end of each batch entry of `x` (`[B, M, D]`, f32 on the CPU) equal its
/// last row bit for bit, the least over the batch (at least 1; 1 for other tensors): the
/// padding of a prompt's embeddings (zeros after its own tokens, one row after the text
/// embedder), which a cross-attention can project once and count ([`attention_counted`]).
pub fn trailing_equal_rows(x: &Tensor) -> candle_core::Result<usize> {
    let (candle_core::Device::Cpu, DType::F32) = (x.device(), x.dtype()) else {
        return Ok(1);
    };
    let (b, m, d) = x.dims3()?;
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((o1, o2))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(1);
    };
    let data = &data[o1..o2];
    Ok((0..b)
        .map(|bi| trailing_repeats(&[&data[bi * m * d..]], m, d, d))
        .min()
        .unwrap_or(1))
}

struct PackedAttention {
    scale: f32,
    kernel: &'static Kernel,
    last_key_count: usize,
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "wan-packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "attention q")?;
        let k = contiguous_f32(s2, l2, "attention k")?;
        let v = contiguous_f32(s3, l3, "attention v")?;
        let (b, n, h, d) = l1.shape().dims4()?;
        let (kb, m, kh, kd) = l2.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || l3.dims() != l2.dims() {
            candle_core::bail!(
                "attention shapes q {:?} k {:?} v {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if !self.kernel.supported() {
            candle_core::bail!("the {} kernel does not run on this CPU", self.kernel.name);
        }
        let len = b * n * h * d;
        let out = if len == 0 || m == 0 {
            vec![0f32; len] // no keys: zeros
        } else {
            let threads = candle_core::utils::get_num_threads().max(1);
            let (bq, bk) = attention_blocks(b * h, n, m, threads, self.kernel.nr);
            let shape = (b, n, m, h, d);
            // SAFETY: the tasks cover every (batch, head, query block) and each writes its rows
            // of its head's columns: all of `out`.
            unsafe {
                written_whole(len, |out| {
                    let (scale, count) = (self.scale, self.last_key_count);
                    attention_packed(self.kernel, q, k, v, shape, (bq, bk), (scale, count), out)
                })
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((b, n, h * d))))
    }
}

/// One (batch, head)'s keys and values packed for [`gemm::attention_rows`]: `keys` of them, the
/// last standing for `exp(last_key_bias · scale)` identical ones (see [`trailing_repeats`]).
struct PackedKv {
    k: PackedB,
    v: PackedB,
    keys: usize,
    /// `ln(repeats) / scale`, added to the last key's score: `repeats` equal terms
    /// `exp(s·scale)` of the softmax's sums are the one term `exp(s·scale + ln repeats)`.
    last_key_bias: f32,
}

/// How many of the last rows of `m` are the same row in every matrix of `xs` (row `j` of each:
/// `x[j·ld ..][..d]`), bit for bit (at least 1). A prompt padded to its model's text length
/// (Wan: 512 tokens, zeros after the prompt's own) gives the cross-attention that many equal
/// keys and values, which [`attention_packed`] takes as one key whose score counts `repeats`
/// times: the same softmax to f32 rounding, with the scores and products of only the distinct
/// keys. Rows that differ in any bit (any other attention) stop the count at once.
pub(crate) fn trailing_repeats(xs: &[&[f32]], m: usize, d: usize, ld: usize) -> usize {
    if m == 0 {
        return 1;
    }
    let last = m - 1;
    let same = |i: usize| {
        xs.iter().all(|x| {
            x[i * ld..i * ld + d]
                .iter()
                .zip(&x[last * ld..last * ld + d])
                .all(|(a, b)| a.to_bits() == b.to_bits())
        })
    };
    let mut repeats = 1;
    while repeats < m && same(last - repeats) {
        repeats += 1;
    }
    repeats
}

/// Keys per block of [`attention_packed`], at most: a block's packed K and V (`2 · 256 · d`
/// floats, 256 KiB at d = 128) and its scores stay in a core's L2 cache while all the query rows
/// of a task use them. Rounded down to a multiple of the kernel's `NR` (240 for 48 columns).
const ATTN_KEY_BLOCK: usize = 256;

/// Query rows per task and keys per block for [`attention_packed`]: about 128 query rows
/// (a few of the microkernels' `MC` tiles, so each key block is used many times once in cache),
/// fewer if that would leave a thread without several tasks, equal-sized blocks; key blocks a
/// multiple of `nr`.
fn attention_blocks(heads: usize, n: usize, m: usize, threads: usize, nr: usize) -> (usize, usize) {
    let want_tasks = 4 * threads;
    let per_head = n.div_ceil(128).max(want_tasks.div_ceil(heads.max(1)));
    let blocks = per_head.min(n.div_ceil(16)).max(1);
    let bq = n.div_ceil(blocks).max(1);
    let bk = (ATTN_KEY_BLOCK / nr).max(1) * nr;
    (bq, bk.min(m.next_multiple_of(nr)))
}

/// The work of [`PackedAttention`], flash-attention style: a task takes `bq` query rows of one
/// (batch, head) and walks the keys in blocks of `bk`, keeping a running maximum and sum per row
/// ([`super::softmax_block_online`]) and its output rows in a buffer of its own, rescaled when
/// the maximum grows; so the scores of one key block (`bq × bk`) and that block of K and V are
/// what is in use, whatever the sequence length (before, each task held whole rows of scores,
/// and for long videos its K and V came from memory at every task).
///
/// # Safety
/// `out` must be valid for writes of `b · n · h · d` floats (row-major `[b, n, h·d]`), not
/// accessed by others meanwhile; q, k and v hold `[b, n | m, h, d]`.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_packed(
    kernel: &'static Kernel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, n, m, h, d): (usize, usize, usize, usize, usize),
    (bq, bk): (usize, usize),
    (scale, last_key_count): (f32, usize),
    out: *mut f32,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let isa = isa();
    let row = h * d; // stride between tokens in q, k, v and out
    let n_blocks = n.div_ceil(bq);
    // Each (batch, head)'s K and V are packed by the first task that needs them and freed when
    // its last query block is done, so only the heads in flight are held packed (the tasks of a
    // thread are consecutive, head after head), not all of them.
    type Packed = Arc<PackedKv>;
    let packed: Vec<Mutex<Option<Packed>>> = (0..b * h).map(|_| Mutex::new(None)).collect();
    let left: Vec<AtomicUsize> = (0..b * h).map(|_| AtomicUsize::new(n_blocks)).collect();
    let kv = |bh: usize| -> Packed {
        let mut slot = packed[bh].lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| {
            let off = (bh / h) * m * row + (bh % h) * d;
            let repeats = trailing_repeats(&[&k[off..], &v[off..]], m, d, row);
            let keys = m - repeats + 1;
            // The run of equal keys at the end is the last key counted `last_key_count` times
            // and the others once each.
            let count = repeats - 1 + last_key_count;
            // kᵀ as the weight of q·kᵀ: W[j, c] = k[j, c]; v as the weight of p·v: W[c, j] = v[j, c].
            Arc::new(PackedKv {
                k: PackedB::from_rows(kernel, &k[off..], keys, d, row),
                v: PackedB::from_cols(kernel, &v[off..], d, keys, row),
                keys,
                last_key_bias: (count as f32).ln() / scale,
            })
        })
        .clone()
    };
    let out_ptr = out as usize;
    // Up to one head's query blocks per grab, fewer towards the end.
    par_guided(b * h * n_blocks, n_blocks, 0, |g| {
        let mut scratch = gemm::AttentionScratch::new(bq, bk, d);
        for task in std::iter::from_fn(|| g.next()).flatten() {
            let (bh, blk) = (task / n_blocks, task % n_blocks);
            let pair = kv(bh);
            let softmax = |s: &mut [f32], ld: usize, cols: usize, st: gemm::SoftmaxState| {
                if pair.last_key_bias != 0.0 && st.first_key + cols == pair.keys {
                    for r in 0..st.max.len() {
                        s[r * ld + cols - 1] += pair.last_key_bias;
                    }
                }
                super::softmax_block_online(isa, s, ld, cols, scale, st.max, st.sum, st.corr)
            };
            let n0 = blk * bq;
            let rows = bq.min(n - n0);
            let q_off = ((bh / h) * n + n0) * row + (bh % h) * d;
            // SAFETY: q rows n0..n0+rows with stride `row` and d columns lie inside `q`; the
            // same rows and head columns of `out` belong to this task only, and `out` outlives
            // the pool call; K and V were packed for `kernel` from `m` keys.
            unsafe {
                gemm::attention_rows(
                    q.as_ptr().add(q_off),
                    row,
                    rows,
                    (&pair.k, &pair.v),
                    &softmax,
                    &mut scratch,
                    (out_ptr as *mut f32).add(q_off),
                    row,
                );
            }
            drop(pair);
            if left[bh].fetch_sub(1, Ordering::AcqRel) == 1 {
                *packed[bh].lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    });
}

// -------------------------------------------------------------------------------------------------
// Quantized blocks.
// -------------------------------------------------------------------------------------------------

/// `n` values from GGUF Q8_0 blocks (`raw`: `n / 32` blocks of 34 bytes), expanded to f32 in
/// parallel (rayon); `None` when the sizes do not fit.
pub fn dequantize_q8_0(raw: &[u8], n: usize) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    const BLOCK: usize = 34; // f16 scale + 32 × i8
    if !n.is_multiple_of(32) || raw.len() != n / 32 * BLOCK {
        return None;
    }
    let mut out = vec![0f32; n];
    out.par_chunks_mut(32 * 256)
        .zip(raw.par_chunks(BLOCK * 256))
        .for_each(|(o, r)| portable::dequantize_q8_0(r, o));
    Some(out)
}

/// Expands whole blocks `raw` of type `T` into `out` (as many values as the blocks hold);
/// `false` when the sizes or the alignment do not fit `T`.
fn expand_blocks<T: GgmlType>(raw: &[u8], out: &mut [f32]) -> bool {
    let size = std::mem::size_of::<T>();
    if size == 0
        || !raw.len().is_multiple_of(size)
        || !(raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || raw.len() / size * T::BLCK_SIZE != out.len()
    {
        return false;
    }
    // SAFETY: `raw` is aligned for `T` and holds a whole number of `T` (checked above); the
    // GGML block types are plain `repr(C)` integers and halfs, valid for any bit pattern.
    let blocks = unsafe { std::slice::from_raw_parts(raw.as_ptr() as *const T, raw.len() / size) };
    T::to_float(blocks, out);
    true
}

/// `raw` as 16-bit floats, when it holds exactly `n` of them and is aligned for them.
fn halfs<T: Copy>(raw: &[u8], n: usize) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if size != 2
        || raw.len() != n * size
        || !(raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: length and alignment checked above; f16 and bf16 are plain 16-bit values,
    // valid for any bit pattern.
    Some(unsafe { std::slice::from_raw_parts(raw.as_ptr() as *const T, n) })
}

/// F16 / BF16 rows widened by `half`'s slice conversion (F16C on x86-64 CPUs that have it,
/// found at run time; exact either way), not value by value as [`expand_blocks`] would.
fn expand_halfs(dtype: GgmlDType, raw: &[u8], out: &mut [f32]) -> bool {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        GgmlDType::F16 => halfs::<half::f16>(raw, out.len()).map(|h| h.convert_to_f32_slice(out)),
        GgmlDType::BF16 => halfs::<half::bf16>(raw, out.len()).map(|h| h.convert_to_f32_slice(out)),
        _ => None,
    }
    .is_some()
}

/// Expands rows of a quantized matrix (`raw`: whole rows of `dtype` blocks) into `out`; `false`
/// for a type Kino does not expand this way or sizes that do not fit.
fn expand_rows(dtype: GgmlDType, raw: &[u8], out: &mut [f32]) -> bool {
    use candle_core::quantized::k_quants as kq;
    match dtype {
        GgmlDType::Q8_0 => {
            if raw.len() != out.len() / 32 * 34 || !out.len().is_multiple_of(32) {
                return false;
            }
            portable::dequantize_q8_0(raw, out);
            true
        }
        GgmlDType::Q4_0 => expand_blocks::<kq::BlockQ4_0>(raw, out),
        GgmlDType::Q4_1 => expand_blocks::<kq::BlockQ4_1>(raw, out),
        GgmlDType::Q5_0 => expand_blocks::<kq::BlockQ5_0>(raw, out),
        GgmlDType::Q5_1 => expand_blocks::<kq::BlockQ5_1>(raw, out),
        GgmlDType::Q2K => expand_blocks::<kq::BlockQ2K>(raw, out),
        GgmlDType::Q3K => expand_blocks::<kq::BlockQ3K>(raw, out),
        GgmlDType::Q4K => expand_blocks::<kq::BlockQ4K>(raw, out),
        GgmlDType::Q5K => expand_blocks::<kq::BlockQ5K>(raw, out),
        GgmlDType::Q6K => expand_blocks::<kq::BlockQ6K>(raw, out),
        GgmlDType::F16 | GgmlDType::BF16 => expand_halfs(dtype, raw, out),
        GgmlDType::F32 => expand_blocks::<f32>(raw, out),
        _ => false,
    }
}

/// A `torch.nn.Linear` whose weight `[n, k]` stays in a GGUF file's blocks (Q8_0, Q4_K, …,
/// also F16/BF16). On a CPU with a packed GEMM kernel each forward expands the matrix strip by
/// strip (a few panels of output columns per task, straight into that task's packed panels)
/// and multiplies each strip as soon as it is expanded, so at no time is more than a strip per
/// thread held in f32: the layer's memory is its blocks. The activations keep full precision
/// (rounding them to 8 bits as candle's quantized matmul does doubled Q8_0's error). Elsewhere
/// the matrix is expanded whole for the call and multiplied by candle.
#[derive(Debug)]
pub struct QuantizedLinear {
    q: std::sync::Arc<QTensor>,
    n: usize,
    k: usize,
    bias: Option<Vec<f32>>,
    bias_tensor: Option<Tensor>,
    /// Whether the blocks expand row by row here (known type, whole blocks per row, aligned).
    expands: bool,
}

impl QuantizedLinear {
    /// `q` `[out, in]`, `bias` `[out]`.
    pub fn new(q: std::sync::Arc<QTensor>, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (n, k) = q.shape().dims2()?;
        let bias_tensor = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        let bias = match &bias_tensor {
            Some(b) if b.device().is_cpu() => Some(b.to_vec1::<f32>()?),
            _ => None,
        };
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear bias does not have {n} values");
        }
        let mut lin = Self {
            q,
            n,
            k,
            bias,
            bias_tensor,
            expands: false,
        };
        // Each row must be whole blocks, and the blocks must expand (type known, aligned):
        // checked once on the first row.
        let bs = lin.q.dtype().block_size();
        lin.expands = n > 0
            && k > 0
            && k.is_multiple_of(bs)
            && lin.q.data().is_ok_and(|raw| {
                raw.len() == n * lin.row_bytes()
                    && expand_rows(lin.q.dtype(), &raw[..lin.row_bytes()], &mut vec![0f32; k])
            });
        Ok(lin)
    }

    /// The kernel the strips run on, when this layer runs strip by strip on `x`'s device.
    fn strip_kernel(&self, x: &Tensor) -> Option<&'static Kernel> {
        if !x.device().is_cpu() || !self.expands {
            return None;
        }
        super::packed_gemm()
    }

    fn row_bytes(&self) -> usize {
        self.k / self.q.dtype().block_size() * self.q.dtype().type_size()
    }

    /// Fills one packed panel (`k1 − k0` rows of `nr` floats, every one written: the columns
    /// past `rows` with zeros) with rows `rows` (at most `nr`) of the matrix, K from `k0` to
    /// `k1` (block boundaries); `scratch` is scratch. `false` when the blocks do not expand.
    ///
    /// K goes in chunks of whole blocks, about [`EXPAND_CHUNK`] values: the chunk of each row
    /// is expanded into `scratch`, then written down its column of the panel's rows of that
    /// chunk. (Writing each expanded row of the matrix down the whole panel instead touched a
    /// new cache line with every value, `nr · 4` bytes apart.)
    fn fill_panel(
        &self,
        raw: &[u8],
        rows: std::ops::Range<usize>,
        ks: std::ops::Range<usize>,
        nr: usize,
        panel: &mut [std::mem::MaybeUninit<f32>],
        scratch: &mut Vec<f32>,
    ) -> bool {
        let dtype = self.q.dtype();
        let (bs, ts, row_bytes) = (dtype.block_size(), dtype.type_size(), self.row_bytes());
        if !ks.start.is_multiple_of(bs) || !ks.end.is_multiple_of(bs) || ks.end > self.k {
            return false;
        }
        let cols = rows.len();
        if cols > nr || panel.len() != ks.len() * nr {
            return false;
        }
        let ch = EXPAND_CHUNK.next_multiple_of(bs);
        scratch.resize(cols * ch, 0f32);
        let mut k0 = ks.start;
        while k0 < ks.end {
            // A multiple of the block size: `ks` ends on a block boundary.
            let len = ch.min(ks.end - k0);
            for (c, j) in rows.clone().enumerate() {
                let start = j * row_bytes + k0 / bs * ts;
                let end = start + len / bs * ts;
                let out = &mut scratch[c * ch..c * ch + len];
                if end > raw.len() || !expand_rows(dtype, &raw[start..end], out) {
                    return false;
                }
            }
            let chunk = &mut panel[(k0 - ks.start) * nr..][..len * nr];
            let at = chunk.as_mut_ptr() as *mut f32;
            // Row c of the chunk down column c of the panel's `len` rows (in L1 both).
            for (c, src) in scratch.chunks_exact(ch).take(cols).enumerate() {
                let mut d = at.wrapping_add(c);
                for &v in &src[..len] {
                    // SAFETY: the value kk of this row goes to `kk · nr + c`, with `kk < len`
                    // and `c < cols ≤ nr`: inside the chunk's `len · nr` floats.
                    unsafe { d.write(v) };
                    d = d.wrapping_add(nr);
                }
            }
            if cols < nr {
                for row in chunk.chunks_exact_mut(nr) {
                    for v in &mut row[cols..] {
                        v.write(0.0);
                    }
                }
            }
            k0 += len;
        }
        true
    }

    /// Rows `rows` of the matrix, K from `ks`, expanded into packed panels for `kernel`, in
    /// parallel over the panels (inline when called from a pool task); `None` when the blocks
    /// do not expand.
    fn expand_packed(
        &self,
        kernel: &'static Kernel,
        rows: std::ops::Range<usize>,
        ks: std::ops::Range<usize>,
    ) -> Option<PackedB> {
        let raw = self.q.data().ok()?;
        let nr = kernel.nr;
        let block = gemm::UnwrittenB::new(kernel, rows.len(), ks.len());
        let ok = std::sync::atomic::AtomicBool::new(true);
        pool_run(block.panels(), |range| {
            let mut scratch = Vec::new();
            for p in range {
                // SAFETY: `p < panels`; the pool's ranges are disjoint, so each panel is
                // handed out once.
                let panel = unsafe { block.panel(p) };
                let r0 = rows.start + p * nr;
                let r1 = (r0 + nr).min(rows.end);
                if !self.fill_panel(&raw, r0..r1, ks.clone(), nr, panel, &mut scratch) {
                    ok.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        // SAFETY: `fill_panel` wrote every float of its panel where it returned true.
        ok.into_inner().then(|| unsafe { block.assume_init() })
    }

    /// `linear(x)`, then `gelu_tanh` when `gelu`; the result in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let y = match self.strip_kernel(x) {
            Some(kernel) => x32.contiguous()?.apply_op1_no_bwd(&QuantizedLinearOp {
                lin: self,
                kernel,
                gelu,
            })?,
            None => {
                let w = crate::gguf::dequantize(&self.q, x.device())?;
                let mut y = x32.broadcast_matmul(&w.t()?)?;
                if let Some(b) = &self.bias_tensor {
                    y = y.broadcast_add(&b.to_device(x.device())?)?;
                }
                if gelu {
                    y.gelu()?
                } else {
                    y
                }
            }
        };
        y.to_dtype(dtype)
    }
}

struct QuantizedLinearOp<'a> {
    lin: &'a QuantizedLinear,
    kernel: &'static Kernel,
    gelu: bool,
}

impl CustomOp1 for QuantizedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "kino-quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "linear input")?;
        let lin = self.lin;
        let (n, k) = (lin.n, lin.k);
        let dims = l.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear input {dims:?} does not end in {k}");
        }
        let m = x.len() / k;
        let dtype = lin.q.dtype();
        let kern = self.kernel;
        let nr = kern.nr;
        // Strips of whole panels, at most one column tile wide, about four per thread.
        let panels = n.div_ceil(nr);
        let threads = candle_core::utils::get_num_threads().max(1);
        let per = panels.div_ceil(4 * threads).clamp(1, (kern.nc / nr).max(1));
        let strips = panels.div_ceil(per);
        let isa = isa();
        let noop = |_: &mut [f32], _: usize| {};
        let gelu = |row: &mut [f32], _: usize| super::gelu_row(isa, row);
        let post: gemm::Post = if self.gelu { &gelu } else { &noop };
        let mut out = vec![0f32; m * n];
        let c_ptr = out.as_mut_ptr() as usize;
        let failed = std::sync::atomic::AtomicBool::new(false);
        pool_run(strips, |range| {
            for s in range {
                let j0 = s * per * nr;
                let j1 = (j0 + per * nr).min(n);
                let Some(w) = lin.expand_packed(kern, j0..j1, 0..k) else {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                };
                let bias = lin.bias.as_deref().map(|b| &b[j0..j1]);
                let (tm, tn) = gemm::tiles(m, &w);
                for tj in 0..tn {
                    for ti in 0..tm {
                        // SAFETY: `x` has m·k floats; C is `[m, n]` and this strip writes only
                        // its columns j0..j1 (through the offset pointer, row stride n), so
                        // strips are disjoint; `out` outlives the pool call; the kernel was
                        // checked to run on this CPU when `w` was packed.
                        unsafe {
                            let c = (c_ptr as *mut f32).add(j0);
                            gemm::tile(x.as_ptr(), k, m, &w, bias, c, n, (ti, tj), post);
                        }
                    }
                }
            }
        });
        if failed.into_inner() {
            candle_core::bail!(
                "quantized linear: the {dtype:?} blocks do not expand to [{n}, {k}]"
            );
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// The K values of each row a panel fill expands at a time (rounded up to whole blocks):
/// 48 rows × 64 floats of scratch and of panel, 12 KB each, stay in L1.
const EXPAND_CHUNK: usize = 64;

// -------------------------------------------------------------------------------------------------
// The feed-forward, strip by strip of its hidden width.
// -------------------------------------------------------------------------------------------------

/// A linear layer of a feed-forward as [`feed_forward`] takes it.
#[derive(Clone, Copy)]
pub enum FfnLayer<'a> {
    Packed(&'a PackedLinear),
    Quantized(&'a QuantizedLinear),
}

impl FfnLayer<'_> {
    /// (outputs, inputs)
    fn dims(&self) -> (usize, usize) {
        match self {
            FfnLayer::Packed(p) => (p.w.n, p.w.k),
            FfnLayer::Quantized(q) => (q.n, q.k),
        }
    }

    fn bias(&self) -> Option<&[f32]> {
        match self {
            FfnLayer::Packed(p) => p.bias.as_deref(),
            FfnLayer::Quantized(q) => q.bias.as_deref(),
        }
    }
}

/// Width of the hidden strips, at least: 512, rounded up by [`ffn_strip`].
const FFN_STRIP: usize = 512;

/// The hidden strip width for these kernels and GGUF block size: the least multiple of both
/// kernels' `NR` and `KC` (so the second product adds the strips in the order one product over
/// all of K would) and of the block that is at least [`FFN_STRIP`]: 512 for the AVX2, NEON and
/// portable kernels (and AVX-512 before stop 54), 768 for AVX-512's 48-column panels in 128-deep
/// slices.
pub(crate) fn ffn_strip(k_in: &Kernel, k_out: &Kernel, block: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let lcm = [k_in.nr, k_in.kc, k_out.nr, k_out.kc, block]
        .into_iter()
        .fold(1, |l, x| l / gcd(l, x.max(1)) * x.max(1));
    FFN_STRIP.next_multiple_of(lcm)
}

/// `proj_out(gelu_tanh(proj_in(x)))` (diffusers' `FeedForward` with `gelu-approximate`) without
/// ever holding the hidden activations whole: for each strip of [`ffn_strip`] hidden units,
/// `h = gelu(x · W_inᵀ[strip] + b_in[strip])`, then `out += h · W_outᵀ[strip]` (`b_out` with the
/// first). The hidden `[N, ffn_dim]` tensor (1.2 GB for Wan2.1-1.3B at 480p × 81 frames) becomes
/// `[N, 512]` (768 on AVX-512), and quantized matrices are expanded strip by strip once per
/// call. Each output element is summed in the same order as the two plain products, so the
/// result is the same to the bit. `None` (the caller runs the two layers) off the CPU, for other dtypes, or for
/// layers that do not run on packed kernels.
pub fn feed_forward(
    x: &Tensor,
    proj_in: FfnLayer,
    proj_out: FfnLayer,
) -> candle_core::Result<Option<Tensor>> {
    let (f, dim) = proj_in.dims();
    let (n, f2) = proj_out.dims();
    if !x.device().is_cpu() || x.dtype() != DType::F32 || f2 != f || x.dims().last() != Some(&dim) {
        return Ok(None);
    }
    let kernel_of = |l: &FfnLayer| -> Option<&'static Kernel> {
        match l {
            FfnLayer::Packed(p) => Some(p.w.kernel()),
            FfnLayer::Quantized(q) => q.strip_kernel(x),
        }
    };
    let (Some(k_in), Some(k_out)) = (kernel_of(&proj_in), kernel_of(&proj_out)) else {
        return Ok(None);
    };
    let block = match proj_out {
        FfnLayer::Quantized(q) => q.q.dtype().block_size(),
        FfnLayer::Packed(_) => 1,
    };
    let strip = ffn_strip(k_in, k_out, block);
    let op = FeedForwardOp {
        strip,
        proj_in,
        proj_out,
        k_in,
        k_out,
        n,
        f,
        dim,
    };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct FeedForwardOp<'a> {
    /// Hidden units per strip ([`ffn_strip`]).
    strip: usize,
    proj_in: FfnLayer<'a>,
    proj_out: FfnLayer<'a>,
    k_in: &'static Kernel,
    k_out: &'static Kernel,
    n: usize,
    f: usize,
    dim: usize,
}

/// `C (+)= A · Wᵀ` over a view, tiles in parallel ([`par_tiles`]).
///
/// # Safety
/// `c` must be valid for writes (and, with `acc`, reads) of `c_len` floats, not accessed by
/// others meanwhile; with `acc` the `[m, w.n]` part of it (row stride `ldc`) must be written.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_view_par(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &gemm::PackedView,
    bias: Option<&[f32]>,
    (c, c_len): (*mut f32, usize),
    ldc: usize,
    post: gemm::Post,
    acc: bool,
) {
    assert!(m == 0 || (a.len() >= (m - 1) * lda + w.k && c_len >= (m - 1) * ldc + w.n));
    assert!(bias.is_none_or(|b| b.len() >= w.n));
    let c_ptr = c as usize;
    par_tiles(m, w, |rows, tj| {
        // SAFETY: A and C hold the rows and columns asserted above; each call writes only its
        // own rows and columns of C, so calls are disjoint; C outlives the pool call.
        unsafe {
            gemm::tile_rows(
                a.as_ptr(),
                lda,
                rows,
                w,
                bias,
                c_ptr as *mut f32,
                ldc,
                tj,
                post,
                acc,
            );
        }
    });
}

impl CustomOp1 for FeedForwardOp<'_> {
    fn name(&self) -> &'static str {
        "kino-feed-forward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "feed-forward input")?;
        let (n, f, dim) = (self.n, self.f, self.dim);
        let m = x.len() / dim.max(1);
        let isa = isa();
        let gelu = |row: &mut [f32], _: usize| super::gelu_row(isa, row);
        let noop = |_: &mut [f32], _: usize| {};
        // Neither is zeroed first: each strip's first product writes its `[m, w]` of `h` (from
        // the bias or zero) before the second reads it, and the first strip's second product
        // writes all of `out` before later strips add to it; `out`'s length is set at the end.
        let mut out = Vec::<f32>::with_capacity(m * n);
        let strip = self.strip;
        let mut h = Vec::<f32>::with_capacity(m * strip.min(f));
        let expand_failed =
            || candle_core::Error::Msg("feed-forward: GGUF blocks do not expand".into());
        for s0 in (0..f).step_by(strip) {
            let s1 = (s0 + strip).min(f);
            let w = s1 - s0;
            {
                // In a block: a quantized layer's expanded strip is freed before the second
                // layer's is made.
                let tmp_in;
                let w_in = match self.proj_in {
                    FfnLayer::Packed(p) => p.w.view_cols(s0, s1),
                    FfnLayer::Quantized(q) => {
                        tmp_in = q
                            .expand_packed(self.k_in, s0..s1, 0..dim)
                            .ok_or_else(expand_failed)?;
                        tmp_in.view()
                    }
                };
                let b_in = self.proj_in.bias().map(|b| &b[s0..s1]);
                // SAFETY: `h` has room for `[m, w]`, written here (not accumulated).
                unsafe {
                    let c = (h.as_mut_ptr(), h.capacity());
                    matmul_view_par(x, dim, m, &w_in, b_in, c, w, &gelu, false)
                };
            }
            let tmp_out;
            let w_out = match self.proj_out {
                FfnLayer::Packed(p) => p.w.view_k(s0, s1),
                FfnLayer::Quantized(q) => {
                    tmp_out = q
                        .expand_packed(self.k_out, 0..n, s0..s1)
                        .ok_or_else(expand_failed)?;
                    tmp_out.view()
                }
            };
            let b_out = if s0 == 0 { self.proj_out.bias() } else { None };
            // SAFETY: the first `m · w` floats of `h` were just written; `out` has room for
            // `[m, n]`, written whole by the first strip (acc only after it).
            unsafe {
                let h = std::slice::from_raw_parts(h.as_ptr(), m * w);
                let c = (out.as_mut_ptr(), out.capacity());
                matmul_view_par(h, w, m, &w_out, b_out, c, n, &noop, s0 > 0);
            }
        }
        if f > 0 {
            // SAFETY: the loop ran at least one strip, and the first wrote all of `[m, n]`.
            unsafe { out.set_len(m * n) };
        } else {
            out.resize(m * n, 0.0); // no hidden units: no strips (as before, zeros)
        }
        let mut out_dims = l.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}
