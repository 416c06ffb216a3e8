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

    /// The same microkernel with other blocking (`kc`, `mc`, `nc`), for probes that compare
    /// blockings on one machine (`examples/gemm_blocking.rs`): the packing does not depend on
    /// them, and each output element still sums its k in order. `None` unless `mc` is a
    /// positive multiple of `MR`, `nc` of `NR` and `kc` positive.
    pub fn reblocked(&self, kc: usize, mc: usize, nc: usize) -> Option<Self> {
        let fits = |x: usize, unit: usize| x > 0 && x.is_multiple_of(unit);
        (kc > 0 && fits(mc, self.mr) && fits(nc, self.nr)).then_some(Self {
            kc,
            mc,
            nc,
            ..*self
        })
    }
}

/// Weights `[n, k]` (a PyTorch `Linear` weight) as `NR`-column panels of `Wᵀ`:
/// `data[p·k·NR + kk·NR + c] = W[p·NR + c, kk]`, zero-padded to a multiple of `NR` columns,
/// for one [`Kernel`] (whose `supported()` held when it was made).
pub struct PackedB {
    data: Lines,
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
        Self {
            data: Lines::for_panels(kernel, n, k, true),
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

    /// From `W[j, kk] = src[j·ld + kk]` (a row-major `[n, k]` weight when `ld = k`), serially,
    /// panel by panel ([`fill_rows_panel`] into each panel as it is appended: no zeroing pass
    /// over the whole buffer first; the attention packs its K and V this way for every head of
    /// every call).
    pub fn from_rows(kernel: &'static Kernel, src: &[f32], n: usize, k: usize, ld: usize) -> Self {
        Self::build(kernel, n, k, |panel, p| {
            fill_rows_panel(src, n, k, ld, kernel.nr, p, panel)
        })
    }

    /// From `W[j, kk] = src[kk·ld + j]` (`Wᵀ` stored row-major with row stride `ld`), serially,
    /// as [`PackedB::from_rows`] with [`fill_cols_panel`].
    pub fn from_cols(kernel: &'static Kernel, src: &[f32], n: usize, k: usize, ld: usize) -> Self {
        Self::build(kernel, n, k, |panel, p| {
            fill_cols_panel(src, n, k, ld, kernel.nr, p, panel)
        })
    }

    /// Panels appended one at a time, each filled by `fill(panel, p)` while it is in cache.
    fn build(
        kernel: &'static Kernel,
        n: usize,
        k: usize,
        mut fill: impl FnMut(&mut [f32], usize),
    ) -> Self {
        let block = UnwrittenB::new(kernel, n, k);
        for p in 0..block.panels() {
            // SAFETY: one slice of panel `p` at a time; it is zeroed (while it is in cache)
            // before it is read as floats.
            let panel = unsafe {
                let panel = block.panel(p);
                std::ptr::write_bytes(panel.as_mut_ptr(), 0, panel.len());
                &mut *(panel as *mut [std::mem::MaybeUninit<f32>] as *mut [f32])
            };
            fill(panel, p);
        }
        // SAFETY: every panel was zeroed, then filled.
        unsafe { block.assume_init() }
    }
}

/// A [`PackedB`]'s block before its panels are written: handed out panel by panel (from any
/// thread; [`PackedB::build`] serially, GGUF layers in parallel on the kernels' pool, `ops.rs`),
/// then declared written. No zeroing pass over the whole block first (`calloc` of a reused block
/// is a `memset` on one thread).
pub struct UnwrittenB {
    data: Lines,
    n: usize,
    k: usize,
    kernel: &'static Kernel,
}

impl UnwrittenB {
    /// The block for `[n, k]` weights. Panics if the CPU cannot run `kernel`.
    pub fn new(kernel: &'static Kernel, n: usize, k: usize) -> Self {
        Self {
            data: Lines::for_panels(kernel, n, k, false),
            n,
            k,
            kernel,
        }
    }

    /// How many panels (`NR` columns each) the block holds.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(self.kernel.nr)
    }

    /// Panel `p` (`k · NR` floats, padding columns included), not yet written.
    ///
    /// # Safety
    /// `p < self.panels()`, and no other slice of panel `p` is alive while this one is.
    // `&self` on purpose: threads take disjoint panels of one shared block (the caller's
    // contract above stands in for the borrow checker).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn panel(&self, p: usize) -> &mut [std::mem::MaybeUninit<f32>] {
        debug_assert!(p < self.panels());
        let len = self.k * self.kernel.nr;
        // SAFETY: panel `p` lies inside the block (caller), and is not aliased (caller).
        unsafe {
            let at = self.data.ptr.as_ptr().add(p * len) as *mut std::mem::MaybeUninit<f32>;
            std::slice::from_raw_parts_mut(at, len)
        }
    }

    /// The packed weights.
    ///
    /// # Safety
    /// Every float of every panel (the padding columns too, with zeros) has been written.
    pub unsafe fn assume_init(self) -> PackedB {
        PackedB {
            data: self.data,
            n: self.n,
            k: self.k,
            kernel: self.kernel,
        }
    }
}

/// f32s (zeroed, or written panel by panel) starting on a 64-byte boundary: a packed panel's
/// vector loads (64 or 32 bytes, `NR · 4` bytes apart per k) then never straddle two cache
/// lines, for every kernel whose `NR` is a multiple of 16 (AVX-512, AVX2, NEON). A `Vec<f32>` is only
/// 16-byte aligned (glibc: a large block sits 16 bytes past a page), so on an Intel core every
/// zmm load of B was a split load.
struct Lines {
    /// The block as allocated (16-byte aligned) …
    base: *mut u8,
    /// … and the first cache line in it.
    ptr: std::ptr::NonNull<f32>,
    len: usize,
}

// SAFETY: `Lines` owns its block like a `Vec<f32>` does.
unsafe impl Send for Lines {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for Lines {}

impl Lines {
    const LINE: usize = 64;

    /// `len` floats and a line's slack, at the allocator's own alignment: `alloc_zeroed` is then
    /// `calloc` (fresh zero pages for a large block, no pass over it), where asking for 64-byte
    /// alignment would make it `posix_memalign` and a `memset` of the whole block.
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len * 4 + Self::LINE, 16)
            .expect("a packed weight's size")
    }

    /// The block of `[n, k]` weights packed for `kernel` (whole `NR`-column panels): zeros, or
    /// not yet written ([`UnwrittenB`]: the caller writes every float before the block is
    /// read). Panics if the CPU cannot run `kernel`.
    fn for_panels(kernel: &'static Kernel, n: usize, k: usize, zeroed: bool) -> Self {
        assert!(
            kernel.supported(),
            "the {} kernel does not run on this CPU",
            kernel.name
        );
        Self::alloc(n.div_ceil(kernel.nr) * kernel.nr * k, zeroed)
    }

    fn alloc(len: usize, zeroed: bool) -> Self {
        if len == 0 {
            return Self {
                base: std::ptr::null_mut(),
                ptr: std::ptr::NonNull::dangling(),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let base = unsafe {
            if zeroed {
                std::alloc::alloc_zeroed(layout)
            } else {
                std::alloc::alloc(layout)
            }
        };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let skip = base.align_offset(Self::LINE);
        // SAFETY: `skip < 64`, so the `len` floats from there lie inside the block.
        let ptr = unsafe { std::ptr::NonNull::new_unchecked(base.add(skip) as *mut f32) };
        Self { base, ptr, len }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `alloc` with this layout.
            unsafe { std::alloc::dealloc(self.base, Self::layout(self.len)) }
        }
    }
}

impl std::ops::Deref for Lines {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` initialised floats at `ptr` (or none).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, owned exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Panel `p` (`k · nr` floats, zeroed: columns `p·nr + c ≥ n` stay zero) of `W[j, kk] =
/// src[j·ld + kk]`, written in order (k by k, the panel's rows of `src` read side by side).
pub fn fill_rows_panel(
    src: &[f32],
    n: usize,
    k: usize,
    ld: usize,
    nr: usize,
    p: usize,
    panel: &mut [f32],
) {
    let cols = nr.min(n - p * nr);
    let rows: Vec<&[f32]> = (0..cols).map(|c| &src[(p * nr + c) * ld..][..k]).collect();
    for (kk, dst) in panel.chunks_exact_mut(nr).take(k).enumerate() {
        for (d, r) in dst.iter_mut().zip(&rows) {
            *d = r[kk];
        }
    }
}

/// Panel `p` (`k · nr` floats, zeroed: columns `p·nr + c ≥ n` stay zero) of `W[j, kk] =
/// src[kk·ld + j]`.
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

impl PackedView<'_> {
    /// The microkernel the panels are packed for.
    pub fn kernel(&self) -> &'static Kernel {
        self.kernel
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
    let i0 = (ti * w.kernel.mc).min(m);
    let rows = i0..(i0 + w.kernel.mc).min(m);
    tile_rows(a, lda, rows, w, bias, c, ldc, tj, post, acc)
}

/// Rows `rows` (any range of A's rows: a whole `MC` tile or part of one) of column tile `tj`
/// (columns from `tj·NC`), as [`tile_of`]: each output element is summed in the same order
/// however the rows are cut, so a scheduler may cut them as it likes.
///
/// # Safety
/// As [`tile`], for these rows of A and C.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_rows(
    a: *const f32,
    lda: usize,
    rows: std::ops::Range<usize>,
    w: &PackedView,
    bias: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
    tj: usize,
    post: Post,
    acc: bool,
) {
    let kern = w.kernel;
    let (mr, nr) = (kern.mr, kern.nr);
    let (n, k) = (w.n, w.k);
    let (i0, i1) = (rows.start, rows.end);
    let j0 = tj * kern.nc;
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

/// A task's buffers for [`attention_rows`]: the scores of one block of keys, the output rows
/// accumulated so far, and each row's running maximum, sum and correction.
pub struct AttentionScratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    corr: Vec<f32>,
    bq: usize,
    bk: usize,
    d: usize,
}

impl AttentionScratch {
    /// For up to `bq` query rows, blocks of `bk` keys (a multiple of the kernel's `NR`) and
    /// head dimension `d`.
    pub fn new(bq: usize, bk: usize, d: usize) -> Self {
        Self {
            scores: vec![0.0; bq * bk],
            acc: vec![0.0; bq * d],
            max: vec![0.0; bq],
            sum: vec![0.0; bq],
            corr: vec![0.0; bq],
            bq,
            bk,
            d,
        }
    }
}

/// The per-row state an online softmax ([`super::portable::softmax_block_online`]) updates,
/// and which keys the block holds.
pub struct SoftmaxState<'a> {
    pub max: &'a mut [f32],
    pub sum: &'a mut [f32],
    pub corr: &'a mut [f32],
    /// The index of the block's first key (its column 0) among all the keys.
    pub first_key: usize,
}

/// The online softmax [`attention_rows`] applies to a block of scores: `(scores, row stride,
/// columns, state)`.
pub type BlockSoftmax<'a> = &'a dyn Fn(&mut [f32], usize, usize, SoftmaxState);

/// `rows` query rows of one attention head, flash-attention style: the keys in blocks of
/// `scratch.bk`, each block's scores `q·kᵀ` (on the microkernel, K packed as the weight `W[j, c]
/// = k[j, c]`), `softmax(scores, ld, cols, state)` turning them into `exp` values against the
/// running maximum (see [`super::portable::softmax_block_online`]), the output rows so far
/// rescaled by the correction where the maximum grew, and `p·v` added (V packed as `W[c, j] =
/// v[j, c]`); at the end each row divided by its sum into `out` (row stride `ldo`). Only one key
/// block's scores and packed K and V are in use at a time, whatever the number of keys.
///
/// # Safety
/// `q` must hold `rows` rows of `d` floats with row stride `ldq` and `out` the same shape with
/// row stride `ldo`, not accessed by others meanwhile; `k` (`[m, d]`) and `v` (`[d, m]`) packed
/// for the same kernel; `rows ≤ scratch.bq`, `d = scratch.d`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_rows(
    q: *const f32,
    ldq: usize,
    rows: usize,
    (k, v): (&PackedB, &PackedB),
    softmax: BlockSoftmax,
    scratch: &mut AttentionScratch,
    out: *mut f32,
    ldo: usize,
) {
    let (bk, d, m) = (scratch.bk, scratch.d, k.n);
    assert!(
        rows <= scratch.bq
            && k.k == d
            && v.n == d
            && v.k == m
            && std::ptr::eq(k.kernel, v.kernel)
            && bk.is_multiple_of(k.kernel.nr),
        "attention_rows: shapes do not fit"
    );
    let noop = |_: &mut [f32], _: usize| {};
    scratch.max[..rows].fill(f32::NEG_INFINITY);
    scratch.sum[..rows].fill(0.0);
    let mut j0 = 0;
    while j0 < m {
        let j1 = (j0 + bk).min(m);
        let (kb, vb) = (k.view_cols(j0, j1), v.view_k(j0, j1));
        // Scores [rows, j1 - j0], row stride bk.
        let (tm, tn) = tiles_of(rows, &kb);
        for tj in 0..tn {
            for ti in 0..tm {
                tile_of(
                    q,
                    ldq,
                    rows,
                    &kb,
                    None,
                    scratch.scores.as_mut_ptr(),
                    bk,
                    (ti, tj),
                    &noop,
                    false,
                );
            }
        }
        let state = SoftmaxState {
            max: &mut scratch.max[..rows],
            sum: &mut scratch.sum[..rows],
            corr: &mut scratch.corr[..rows],
            first_key: j0,
        };
        softmax(&mut scratch.scores, bk, j1 - j0, state);
        let first = j0 == 0;
        if !first {
            for (r, &f) in scratch.corr[..rows].iter().enumerate() {
                if f != 1.0 {
                    for x in &mut scratch.acc[r * d..(r + 1) * d] {
                        *x *= f;
                    }
                }
            }
        }
        // acc [rows, d] (+)= p [rows, j1 - j0] · v [j1 - j0, d].
        let (tm, tn) = tiles_of(rows, &vb);
        for tj in 0..tn {
            for ti in 0..tm {
                tile_of(
                    scratch.scores.as_ptr(),
                    bk,
                    rows,
                    &vb,
                    None,
                    scratch.acc.as_mut_ptr(),
                    d,
                    (ti, tj),
                    &noop,
                    !first,
                );
            }
        }
        j0 = j1;
    }
    for (r, &sum) in scratch.sum[..rows].iter().enumerate() {
        let inv = 1.0 / sum;
        let o = std::slice::from_raw_parts_mut(out.add(r * ldo), d);
        for (x, &a) in o.iter_mut().zip(&scratch.acc[r * d..(r + 1) * d]) {
            *x = a * inv;
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

#[cfg(test)]
mod alignment {
    use super::*;

    /// A packed block starts on a cache line whatever the sizes, and so (for the kernels whose
    /// `NR` is a multiple of 16) does every panel and every `KC` slice of one, so the
    /// microkernels' vector loads of B never split across two lines.
    #[test]
    fn packed_panels_start_on_cache_lines() {
        let k_all = [1usize, 7, 128, 300];
        let kernels = super::super::Isa::ALL
            .into_iter()
            .filter_map(super::super::gemm_kernel)
            .chain([&super::super::portable::KERNEL]);
        for kernel in kernels {
            for &k in &k_all {
                for n in [1usize, 5, kernel.nr + 3] {
                    let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
                    let p = PackedB::from_rows(kernel, &w, n, k, k);
                    let z = PackedB::zeroed(kernel, n, k);
                    for (what, b) in [("from_rows", &p), ("zeroed", &z)] {
                        let v = b.view();
                        assert_eq!(
                            v.data.as_ptr() as usize % 64,
                            0,
                            "{what} {kernel:?} {n}x{k}"
                        );
                        if kernel.nr % 16 == 0 && n > kernel.nr {
                            let c = b.view_cols(kernel.nr, n);
                            assert_eq!(c.data.as_ptr() as usize % 64, 0, "{kernel:?} panel 1");
                        }
                        if k > kernel.kc && (kernel.kc * kernel.nr) % 16 == 0 {
                            let s = b.view_k(kernel.kc, k);
                            assert_eq!(s.data.as_ptr() as usize % 64, 0, "{kernel:?} slice 1");
                        }
                    }
                    // The data is the packing's: W[j, kk] at panel j / NR, row kk, column j % NR.
                    let v = p.view();
                    for j in 0..n {
                        for kk in 0..k {
                            let at =
                                (j / kernel.nr) * v.panel_stride + kk * kernel.nr + j % kernel.nr;
                            assert_eq!(v.data[at], w[j * k + kk]);
                        }
                    }
                }
            }
        }
    }
}
