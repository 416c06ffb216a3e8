//! The packed f32 matmul `C = A · Wᵀ (+ bias)` of the linear layers and the attention, for any
//! microkernel: the weights are packed once (at load) into `NR`-column panels of `Wᵀ`; C is cut
//! into `MC × NC` tiles (run in parallel by the caller, see `ops.rs`), each walked in `KC`-deep
//! slices of K, `MR` rows of A × `NR` columns at a time by the ISA's microkernel, which keeps
//! that register tile in registers for the whole slice. A is read in place (row stride `lda`),
//! not packed.
//!
//! Pure: no `std::arch`, no crate dependencies; compiles standalone (`neon_check.rs`).

/// How a register tile starts: from the bias (first slice), zero, or from C (later slices).
#[derive(Clone, Copy)]
pub enum Init {
    /// `bias[0..cols]` on every row.
    Bias(*const f32),
    Zero,
    Load,
}

/// A microkernel: `C[rows, cols] = init + A[rows, kc] · B[kc, cols]`, with `rows ≤ MR`,
/// `cols ≤ NR`; `a` has row stride `lda`, `b` is a packed panel at the slice start (stride `NR`
/// per k, `NR` readable floats per k), `c` has row stride `ldc`.
pub type MicroKernel = unsafe fn(
    rows: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    init: Init,
    cols: usize,
);

/// A microkernel and its blocking.
pub struct Kernel {
    pub name: &'static str,
    pub mr: usize,
    pub nr: usize,
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
    run: MicroKernel,
    supported: fn() -> bool,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}x{})", self.name, self.mr, self.nr)
    }
}

impl Kernel {
    /// # Safety
    /// `run` must honour the [`MicroKernel`] contract on every CPU where `supported()` holds.
    /// `mc` must be a multiple of `mr` and `nc` of `nr`.
    #[allow(clippy::too_many_arguments)]
    pub const unsafe fn new(
        name: &'static str,
        mr: usize,
        nr: usize,
        kc: usize,
        mc: usize,
        nc: usize,
        run: MicroKernel,
        supported: fn() -> bool,
    ) -> Self {
        Self {
            name,
            mr,
            nr,
            kc,
            mc,
            nc,
            run,
            supported,
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(&self) -> bool {
        (self.supported)()
    }
}

/// Weights `[n, k]` (a PyTorch `Linear` weight) as `NR`-column panels of `Wᵀ`:
/// `data[p·k·NR + kk·NR + c] = W[p·NR + c, kk]`, zero-padded to a multiple of `NR` columns,
/// for one [`Kernel`] (whose `supported()` held when it was made).
pub struct PackedB {
    data: Vec<f32>,
    pub n: usize,
    pub k: usize,
    kernel: &'static Kernel,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({}x{}, {:?})", self.n, self.k, self.kernel)
    }
}

impl PackedB {
    /// Zeroed panels for `[n, k]` weights, to be filled panel by panel ([`PackedB::panels_mut`]
    /// with [`fill_rows_panel`] or [`fill_cols_panel`]). Panics if the CPU cannot run `kernel`.
    pub fn zeroed(kernel: &'static Kernel, n: usize, k: usize) -> Self {
        assert!(
            kernel.supported(),
            "the {} kernel does not run on this CPU",
            kernel.name
        );
        Self {
            data: vec![0f32; n.div_ceil(kernel.nr) * kernel.nr * k],
            n,
            k,
            kernel,
        }
    }

    /// The panel data and the length of one panel (`k · NR`).
    pub fn panels_mut(&mut self) -> (&mut [f32], usize) {
        let len = self.k * self.kernel.nr;
        (&mut self.data, len)
    }

    pub fn kernel(&self) -> &'static Kernel {
        self.kernel
    }

    /// From `W[j, kk] = src[j·ld + kk]` (a row-major `[n, k]` weight when `ld = k`), serially.
    pub fn from_rows(kernel: &'static Kernel, src: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut w = Self::zeroed(kernel, n, k);
        let nr = kernel.nr;
        let (data, len) = w.panels_mut();
        for (p, panel) in data.chunks_mut(len.max(1)).enumerate() {
            fill_rows_panel(src, n, k, ld, nr, p, panel);
        }
        w
    }

    /// From `W[j, kk] = src[kk·ld + j]` (`Wᵀ` stored row-major with row stride `ld`), serially.
    pub fn from_cols(kernel: &'static Kernel, src: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut w = Self::zeroed(kernel, n, k);
        let nr = kernel.nr;
        let (data, len) = w.panels_mut();
        for (p, panel) in data.chunks_mut(len.max(1)).enumerate() {
            fill_cols_panel(src, n, k, ld, nr, p, panel);
        }
        w
    }
}

/// Panel `p` (`k · nr` floats) of `W[j, kk] = src[j·ld + kk]`.
pub fn fill_rows_panel(
    src: &[f32],
    n: usize,
    k: usize,
    ld: usize,
    nr: usize,
    p: usize,
    panel: &mut [f32],
) {
    for c in 0..nr.min(n - p * nr) {
        let j = p * nr + c;
        for (kk, &v) in src[j * ld..j * ld + k].iter().enumerate() {
            panel[kk * nr + c] = v;
        }
    }
}

/// Panel `p` (`k · nr` floats) of `W[j, kk] = src[kk·ld + j]`.
pub fn fill_cols_panel(
    src: &[f32],
    n: usize,
    k: usize,
    ld: usize,
    nr: usize,
    p: usize,
    panel: &mut [f32],
) {
    let cols = nr.min(n - p * nr);
    for kk in 0..k {
        let s = kk * ld + p * nr;
        panel[kk * nr..kk * nr + cols].copy_from_slice(&src[s..s + cols]);
    }
}

/// A finished row segment of C: `post(row_segment, first_column)`.
pub type Post<'a> = &'a (dyn Fn(&mut [f32], usize) + Sync);

/// Number of `MC × NC` tiles of an `[m, w.n]` product: (rows of tiles, columns of tiles).
pub fn tiles(m: usize, w: &PackedB) -> (usize, usize) {
    (m.div_ceil(w.kernel.mc), w.n.div_ceil(w.kernel.nc))
}

/// Tile `(ti, tj)` of C (rows from `ti·MC`, columns from `tj·NC`), all of K, then `post` on
/// its finished row segments. A is `[m, w.k]` with row stride `lda`, C `[m, w.n]` with row
/// stride `ldc`.
///
/// # Safety
/// `a` and `c` must be valid for those shapes and strides (`bias`, if any, has `w.n` floats),
/// and no other thread may access this tile of C meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile(
    a: *const f32,
    lda: usize,
    m: usize,
    w: &PackedB,
    bias: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    (ti, tj): (usize, usize),
    post: Post,
) {
    tile_of(a, lda, m, &w.view(), bias, c, ldc, (ti, tj), post, false)
}

/// Packed weights as [`tile_of`] reads them: `n` columns × `k` of `Wᵀ` in `NR`-column panels
/// `panel_stride` floats apart, each panel `NR` floats per k from `data` on. A whole
/// [`PackedB`] ([`PackedB::view`]), a run of its panels ([`PackedB::view_cols`]) or a slice of
/// its K ([`PackedB::view_k`]).
#[derive(Clone, Copy)]
pub struct PackedView<'a> {
    data: &'a [f32],
    pub n: usize,
    pub k: usize,
    panel_stride: usize,
    kernel: &'static Kernel,
}

impl PackedB {
    /// All of it.
    pub fn view(&self) -> PackedView<'_> {
        PackedView {
            data: &self.data,
            n: self.n,
            k: self.k,
            panel_stride: self.k * self.kernel.nr,
            kernel: self.kernel,
        }
    }

    /// Columns `j0..j1` (`j0` a multiple of `NR`; `j1` one too, or `n`).
    pub fn view_cols(&self, j0: usize, j1: usize) -> PackedView<'_> {
        let nr = self.kernel.nr;
        assert!(
            j0.is_multiple_of(nr) && j0 <= j1 && j1 <= self.n,
            "columns {j0}..{j1}"
        );
        let len = self.k * nr;
        PackedView {
            data: &self.data[j0 / nr * len..j1.div_ceil(nr) * len],
            n: j1 - j0,
            k: self.k,
            panel_stride: len,
            kernel: self.kernel,
        }
    }

    /// All columns, K from `k0` to `k1`.
    pub fn view_k(&self, k0: usize, k1: usize) -> PackedView<'_> {
        assert!(k0 <= k1 && k1 <= self.k, "k {k0}..{k1}");
        let nr = self.kernel.nr;
        PackedView {
            data: &self.data[k0 * nr..],
            n: self.n,
            k: k1 - k0,
            panel_stride: self.k * nr,
            kernel: self.kernel,
        }
    }
}

/// [`tiles`] of a view.
pub fn tiles_of(m: usize, w: &PackedView) -> (usize, usize) {
    (m.div_ceil(w.kernel.mc), w.n.div_ceil(w.kernel.nc))
}

/// [`tile`] over a view; with `acc` the tile adds to C as it is (no bias, for a sum over slices
/// of K made one call after another: the same additions in the same order as one call over all
/// of K, when each slice starts at a multiple of `KC`).
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_of(
    a: *const f32,
    lda: usize,
    m: usize,
    w: &PackedView,
    bias: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    (ti, tj): (usize, usize),
    post: Post,
    acc: bool,
) {
    let kern = w.kernel;
    let (mr, nr) = (kern.mr, kern.nr);
    let (n, k) = (w.n, w.k);
    let (i0, j0) = (ti * kern.mc, tj * kern.nc);
    let i1 = (i0 + kern.mc).min(m);
    let j1 = (j0 + kern.nc).min(n);
    let mut pc = 0;
    loop {
        let kc = kern.kc.min(k - pc);
        let mut j = j0;
        while j < j1 {
            let cols = (j1 - j).min(nr);
            let init = if pc > 0 || acc {
                Init::Load
            } else {
                match bias {
                    Some(b) => Init::Bias(b.as_ptr().add(j)),
                    None => Init::Zero,
                }
            };
            let bp = w.data.as_ptr().add((j / nr) * w.panel_stride + pc * nr);
            let mut i = i0;
            while i < i1 {
                let rows = (i1 - i).min(mr);
                let (ai, ci) = (a.add(i * lda + pc), c.add(i * ldc + j));
                // SAFETY: the kernel's `supported()` held when the weights were packed; the
                // caller vouches for A and C; the panel has `NR` floats per k.
                (kern.run)(rows, kc, ai, lda, bp, ci, ldc, init, cols);
                i += mr;
            }
            j += nr;
        }
        pc += kc;
        if pc >= k {
            break;
        }
    }
    if j1 > j0 {
        for i in i0..i1 {
            let row = std::slice::from_raw_parts_mut(c.add(i * ldc + j0), j1 - j0);
            post(row, j0);
        }
    }
}

/// `C = A · Wᵀ` on the calling thread; A `[m, w.k]` with row stride `lda`, C `[m, w.n]` with row
/// stride `ldc`.
///
/// # Safety
/// `a` and `c` must be valid for those shapes and strides, and C not accessed meanwhile.
pub unsafe fn gemm_serial(
    a: *const f32,
    lda: usize,
    m: usize,
    w: &PackedB,
    c: *mut f32,
    ldc: usize,
) {
    let noop = |_: &mut [f32], _: usize| {};
    let (tm, tn) = tiles(m, w);
    for tj in 0..tn {
        for ti in 0..tm {
            tile(a, lda, m, w, None, c, ldc, (ti, tj), &noop);
        }
    }
}

/// `A[m, w.k] · Wᵀ (+ bias)` on the calling thread (row-major A and result).
pub fn matmul_serial(a: &[f32], m: usize, w: &PackedB, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(
        a.len() >= m * w.k,
        "matmul: A is shorter than [{m}, {}]",
        w.k
    );
    assert!(
        bias.is_none_or(|b| b.len() >= w.n),
        "matmul: bias shorter than {}",
        w.n
    );
    let mut c = vec![0f32; m * w.n];
    let noop = |_: &mut [f32], _: usize| {};
    let (tm, tn) = tiles(m, w);
    for tj in 0..tn {
        for ti in 0..tm {
            // SAFETY: A has m·k floats, C m·n, the bias n; one thread.
            unsafe {
                tile(
                    a.as_ptr(),
                    w.k,
                    m,
                    w,
                    bias,
                    c.as_mut_ptr(),
                    w.n,
                    (ti, tj),
                    &noop,
                )
            };
        }
    }
    c
}
