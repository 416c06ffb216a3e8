//! The second carrier of layout v4: the same coded bits by quantisation index modulation (QIM)
//! of the mean luma of coarse, keyed cells.
//!
//! Spread spectrum reads a bit as a correlation, so the picture itself is noise to it, and at
//! 256×256 after CRF 28 that noise is as large as what the codec leaves of the mark. QIM reads a
//! bit from *where* a measured value lies on a keyed lattice: the embedder moves the value onto
//! the nearest lattice point of the bit, so the picture is no noise at all, only what the codec
//! changes. The value is the weighted mean luma of a coarse cell (1/32 of the shorter side, 8 px
//! at 256×256, smoothly weighted like the chips), which libx264 at CRF 28 keeps at 63–100% of a
//! change where it keeps 17–45% of a chip (`examples/qim_probe.py`).
//!
//! Layout: the frame is a grid of cells anchored at its top-left corner, their size tied to the
//! shorter side like the chips (so a uniform rescale keeps the grid). Cells form a periodic
//! `PERIOD × PERIOD` layout; the key assigns each coded bit one cell of the period (so every
//! period repeats the payload) and each bit a dither of its lattice. A cell's value is
//! `a = Σ φ·y / Σ φ²` (φ the cell's smoothstep weights, y the luma): the least-squares amplitude
//! of the cell in the picture, in luma levels. Bit `b` is carried by lattice
//! `STEP · (ℤ + dither + b/2)`, and *every cell* is put on its bit's lattice on its own
//! ([`QimParams::per_cell`]): a crop that cuts some of a bit's cells leaves the others where the
//! embedder put them (with one value per bit over all its cells, a 10% crop broke a third of the
//! bits), and at 256×256 after CRF 28 it decoded 45 of 45 panned photographs against 32–34 for
//! one value per bit. The reader averages a bit's cells, weighed by size and by how far the
//! embedder could move them.
//!
//! The change is shaped like the spread-spectrum mark: `m(p) · Σ d_cell φ_cell(p)` with `m` the
//! perceptual amplitude less a floor (so flat regions barely change), so a textured cell moves
//! its value cheaply and a flat one expensively; each cell's coefficient is capped at
//! `d_max` (a cell that cannot reach its lattice point is left to the error-correcting code, and
//! the reader gives it little weight).
//!
//! Every frame is marked for its own picture (QIM needs to know the value it moves). After
//! H.264 the first frame, a key frame in any encode, carries the mark best: predicted frames
//! copy their references' marks onto moving content. The detector therefore reads the first
//! frame alone and the mean of up to 16 frames, at the corner of the frame at scale 1
//! (re-encoding, rescaling, frame cuts), at the anchored sync peaks of the spread-spectrum
//! search, and at the corner- or centre-anchored grids of any searched scale where the first
//! frame fits the lattices best (crops: see [`read`]).
//!
//! Which frames get it: QIM moves a cell's mean either way. A saturated pixel (a channel at 0 or
//! 255) still can, through its other channels (`gamut.rs`: what the clipped channel cannot take,
//! the others take by their luma weight), so only pixels that cannot move their luma both ways
//! even so (near black, near white; yellow brightening, blue darkening) count against it: a
//! frame with more than `max_clipped` (half) of those gets the chips alone at full strength, as
//! layout v3 did; any other frame gets QIM with the chips at `sync_share` of the budget, for
//! the sync search. The frames that fall back are flat black or white backgrounds (68–87% of
//! kino-shapes' pixels there), where a mark that can only go one way shows as a faint mottling
//! on black and decodes no better; saturated colour (gradients 19–36% stuck, test cards 15%)
//! keeps QIM. History: until stop 53 a frame needed at most 30% of its pixels saturated (the
//! fractals failed at 256×256 after CRF 28; with QIM they pass); until stop 55 a frame with
//! more than 90% saturated or 30% stuck got the chips alone, because the detector read luma from
//! decoded 8-bit RGB, which clips saturated colour and (swscale) sits 1–2 levels low on colour;
//! since it reads the coded luma ([`crate::detect_luma`]) the test cards and gradients decode
//! better with QIM (at 256×256 after CRF 28, 45 clips: 36 of 45 with those rules, 41 without).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::pattern::CODED_BITS;
use crate::Key;

/// Cells along the frame's shorter side …
pub(crate) const CELLS_PER_SHORT_SIDE: f64 = 32.0;
/// … but never smaller than this many pixels.
pub(crate) const MIN_CELL_PX: f64 = 4.0;
/// Cells along a side of the periodic layout.
pub(crate) const PERIOD: usize = 16;
/// Cells in a period (each carries one coded bit or nothing).
pub(crate) const SLOTS: usize = PERIOD * PERIOD;

/// The QIM carrier's strengths and choices (the defaults are layout v4's; probes change them).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QimParams {
    /// Lattice step in luma levels: a cell's value must stay within `step / 4` of its point.
    pub step: f32,
    /// Cap on a cell's coefficient (levels at perceptual amplitude 1).
    pub d_max: f32,
    /// Refinement passes of the embedding (neighbouring cells overlap).
    pub passes: usize,
    /// The QIM change is shaped by `max(amp - q_floor, 0.05)`.
    pub q_floor: f32,
    /// A frame gets the QIM carrier only if at most this share of its pixels is clipped: with
    /// `gamut`, cannot move its luma both ways (`gamut::stuck_share`), else has a channel near
    /// an end ([`clipped_share`]); otherwise it gets the spread-spectrum mark alone, at full
    /// strength. 1 or more: every frame gets QIM.
    pub max_clipped: f32,
    /// Each cell carries its bit on its own (else a slot's cells together).
    pub per_cell: bool,
    /// In a QIM frame, the share of the RMS budget the chips keep (for the sync search).
    pub sync_share: f32,
    /// Saturated pixels move their luma through the channels that can (`gamut.rs`), and
    /// `max_clipped` counts the pixels that cannot move both ways even so (else layout v4 as
    /// first made: every channel alike, clipped, and `max_clipped` counts pixels with any
    /// channel near an end).
    pub gamut: bool,
    /// In QIM frames the chips form the full keyed sync tile (every chip at its key's sign,
    /// 256 chips of sync) instead of the 46 sync chips and 210 payload chips: the QIM cells
    /// carry the payload there, and the chips' only job is the sync search (else layout v4 as
    /// made until stop 55).
    pub full_sync: bool,
    /// With `gamut`, a frame also needs at most this share of its pixels with a channel near
    /// an end ([`clipped_share`]) for the QIM carrier (1, the default: no such condition; stop
    /// 53–54 used 0.9, for test cards, when the detector read luma from decoded RGB).
    pub max_saturated: f32,
    /// In frames the chips carry alone, every channel is first pulled this many levels in from
    /// 0 and 255 (0: not at all, as until stop 61), so the chips on flat black or white move
    /// both ways around a level the eye cannot tell from the original instead of clipping on
    /// one side (see `embed.rs`).
    pub headroom: f32,
}

impl Default for QimParams {
    fn default() -> Self {
        QimParams {
            step: 16.0,
            d_max: 8.0,
            passes: 3,
            q_floor: 0.75,
            max_clipped: 0.5,
            per_cell: true,
            sync_share: 0.3,
            gamut: true,
            max_saturated: 1.0,
            full_sync: true,
            headroom: 1.0,
        }
    }
}

/// Cell size in pixels for a frame of this size.
pub(crate) fn cell_px(width: u32, height: u32) -> f64 {
    (f64::from(width.min(height)) / CELLS_PER_SHORT_SIDE).max(MIN_CELL_PX)
}

/// What the key decides for the QIM carrier.
pub(crate) struct QimLayout {
    /// `bit[slot]`: the coded bit a slot of the period carries, if any.
    pub bit: [Option<u16>; SLOTS],
    /// Each coded bit's lattice dither, in [0, 1) steps.
    pub dither: [f32; CODED_BITS],
}

impl QimLayout {
    pub fn new(key: &Key) -> QimLayout {
        let mut h = Sha256::new();
        h.update(b"kino-watermark v4 qim layout");
        h.update(key.to_bytes());
        let seed: [u8; 32] = h.finalize().into();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut perm: Vec<usize> = (0..SLOTS).collect();
        for i in (1..SLOTS).rev() {
            let j = rng.random_range(0..=i);
            perm.swap(i, j);
        }
        let mut bit = [None; SLOTS];
        for (k, &slot) in perm.iter().take(CODED_BITS).enumerate() {
            bit[slot] = Some(k as u16);
        }
        let mut dither = [0f32; CODED_BITS];
        for d in dither.iter_mut() {
            *d = rng.random::<f32>();
        }
        QimLayout { bit, dither }
    }

    /// The lattice offset (levels) of coded bit `k` carrying `value`.
    fn offset(&self, k: usize, value: bool, step: f32) -> f32 {
        (self.dither[k] + if value { 0.5 } else { 0.0 }) * step
    }
}

/// Where the grid lies in a frame: its origin (pixels, may be outside the frame) and cell size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Grid {
    pub ox: f64,
    pub oy: f64,
    pub cell: f64,
}

/// One axis: the two cells a pixel belongs to (cell indices, any integer) and their weights.
#[derive(Clone, Copy)]
struct Ax {
    c0: i64,
    w0: f32,
    w1: f32,
}

fn axes(n: usize, origin: f64, cell: f64) -> Vec<Ax> {
    (0..n)
        .map(|x| {
            let g = (x as f64 + 0.5 - origin) / cell - 0.5;
            let fl = g.floor();
            let t = g - fl;
            let s = (t * t * (3.0 - 2.0 * t)) as f32;
            Ax {
                c0: fl as i64,
                w0: 1.0 - s,
                w1: s,
            }
        })
        .collect()
}

fn slot(cy: i64, cx: i64) -> usize {
    cy.rem_euclid(PERIOD as i64) as usize * PERIOD + cx.rem_euclid(PERIOD as i64) as usize
}

/// What one QIM value is measured over: all the cells of a slot in the frame together, or (with
/// [`QimParams::per_cell`]) each cell on its own, so a crop that cuts some of a slot's cells
/// leaves the others' values where the embedder put them.
struct Units {
    per_cell: bool,
    cx0: i64,
    cy0: i64,
    nx: usize,
    ny: usize,
}

impl Units {
    fn new(ax: &[Ax], ay: &[Ax], per_cell: bool) -> Units {
        let span = |a: &[Ax]| match (a.first(), a.last()) {
            (Some(f), Some(l)) => (f.c0, (l.c0 + 2 - f.c0) as usize),
            _ => (0, 0),
        };
        let (cx0, nx) = span(ax);
        let (cy0, ny) = span(ay);
        Units {
            per_cell,
            cx0,
            cy0,
            nx,
            ny,
        }
    }

    fn len(&self) -> usize {
        if self.per_cell {
            self.nx * self.ny
        } else {
            SLOTS
        }
    }

    fn of(&self, cy: i64, cx: i64) -> usize {
        if self.per_cell {
            (cy - self.cy0) as usize * self.nx + (cx - self.cx0) as usize
        } else {
            slot(cy, cx)
        }
    }

    fn slot(&self, u: usize) -> usize {
        if self.per_cell {
            slot(
                (u / self.nx) as i64 + self.cy0,
                (u % self.nx) as i64 + self.cx0,
            )
        } else {
            u
        }
    }
}

/// Per unit: `Σ φ·v`, `Σ φ²` and (with `wt`) `Σ φ²·wt` over a plane.
fn project(
    v: &[f32],
    wt: Option<&[f32]>,
    w: usize,
    ax: &[Ax],
    ay: &[Ax],
    units: &Units,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut s = vec![0f64; units.len()];
    let mut q = vec![0f64; units.len()];
    let mut qm = vec![0f64; if wt.is_some() { units.len() } else { 0 }];
    for (y, a) in ay.iter().enumerate() {
        let row = &v[y * w..(y + 1) * w];
        let wrow = wt.map(|t| &t[y * w..(y + 1) * w]);
        for (cy, wy) in [(a.c0, a.w0), (a.c0 + 1, a.w1)] {
            if wy == 0.0 {
                continue;
            }
            for (x, b) in ax.iter().enumerate() {
                for (cx, wx) in [(b.c0, b.w0), (b.c0 + 1, b.w1)] {
                    let phi = wy * wx;
                    if phi == 0.0 {
                        continue;
                    }
                    let k = units.of(cy, cx);
                    s[k] += f64::from(phi * row[x]);
                    q[k] += f64::from(phi * phi);
                    if let Some(r) = wrow {
                        qm[k] += f64::from(phi * phi * r[x]);
                    }
                }
            }
        }
    }
    (s, q, qm)
}

/// The luma change pixels really make when asked for `o`: `o` itself where `lo[i] ≤ o ≤ hi[i]`,
/// else `other(i, o)`.
pub(crate) struct Effect<'a> {
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
    pub other: &'a dyn Fn(usize, f32) -> f32,
}

/// The QIM change (levels, per pixel) that puts every coded bit of `coded` on its lattice in
/// `luma` (the frame's luma with whatever else is added already), shaped by the perceptual
/// amplitude `amp`. `effect`, where given, tells the luma change a pixel really makes when asked
/// for one (a saturated pixel makes less): the passes then make up for it elsewhere.
#[allow(clippy::too_many_arguments)]
pub(crate) fn change(
    luma: &[f32],
    amp: &[f32],
    w: usize,
    h: usize,
    layout: &QimLayout,
    coded: &[bool],
    p: &QimParams,
    effect: Option<&Effect>,
) -> Vec<f32> {
    let cell = cell_px(w as u32, h as u32);
    let ax = axes(w, 0.0, cell);
    let ay = axes(h, 0.0, cell);
    let units = Units::new(&ax, &ay, p.per_cell);
    let (s, q, qm) = project(luma, Some(amp), w, &ax, &ay, &units);
    // Target: the bit's nearest lattice point.
    let mut target = vec![f64::NAN; units.len()];
    for (j, t) in target.iter_mut().enumerate() {
        if let (Some(k), true) = (layout.bit[units.slot(j)], q[j] > 0.0) {
            let k = usize::from(k);
            let a = s[j] / q[j];
            let off = f64::from(layout.offset(k, coded[k], p.step));
            let st = f64::from(p.step);
            *t = ((a - off) / st).round() * st + off;
        }
    }
    let mut d = vec![0f32; units.len()];
    let mut out = vec![0f32; w * h];
    let mut cur = luma.to_vec();
    for pass in 0..p.passes.max(1) {
        let s2 = if pass == 0 {
            s.clone()
        } else {
            project(&cur, None, w, &ax, &ay, &units).0
        };
        for j in 0..units.len() {
            if target[j].is_nan() || qm[j] <= 0.0 {
                continue;
            }
            let a = s2[j] / q[j];
            // A coefficient d moves the value by d · Σ φ² m / Σ φ².
            let nd = d[j] + ((target[j] - a) * q[j] / qm[j]) as f32;
            d[j] = nd.clamp(-p.d_max, p.d_max);
        }
        // Synthesize m · Σ d φ.
        let u = |cy, cx| d[units.of(cy, cx)];
        for (y, a) in ay.iter().enumerate() {
            for (x, b) in ax.iter().enumerate() {
                let v = a.w0 * (b.w0 * u(a.c0, b.c0) + b.w1 * u(a.c0, b.c0 + 1))
                    + a.w1 * (b.w0 * u(a.c0 + 1, b.c0) + b.w1 * u(a.c0 + 1, b.c0 + 1));
                out[y * w + x] = amp[y * w + x] * v;
            }
        }
        match effect {
            Some(e) => {
                for (i, ((c, &l), &o)) in cur.iter_mut().zip(luma).zip(&out).enumerate() {
                    *c = l + if o >= e.lo[i] && o <= e.hi[i] {
                        o
                    } else {
                        (e.other)(i, o)
                    };
                }
            }
            None => {
                for ((c, &l), &o) in cur.iter_mut().zip(luma).zip(&out) {
                    *c = l + o;
                }
            }
        }
    }
    out
}

/// Levels from 0 or 255 within which a channel counts as clipped.
const CLIP_LEVELS: u8 = 3;

/// The share of pixels with a channel within [`CLIP_LEVELS`] of 0 or 255 (saturated or clipped).
/// Pictures almost wholly saturated (flat synthetic graphics) carry the spread-spectrum chips
/// better ([`QimParams::max_saturated`]). Measured on the bench's clips: test cards 0.96–0.97,
/// gradients with noise 1.00, fractals 0.40–0.78, photographs ≤ 0.17, cellular automata 0.00.
/// Of those, unable to move their luma both ways (`gamut::stuck_share`): test cards 0.15,
/// gradients 0.23–0.31, fractals and cellular automata 0.00.
pub(crate) fn clipped_share(rgb: &[u8]) -> f64 {
    pixel_share(rgb, |p| p.iter().any(|&c| c.min(255 - c) < CLIP_LEVELS))
}

/// The share of an RGB frame's pixels for which `test` holds (0 for no pixels).
pub(crate) fn pixel_share(rgb: &[u8], test: impl Fn([u8; 3]) -> bool) -> f64 {
    let n = rgb.len() / 3;
    if n == 0 {
        return 0.0;
    }
    let hits = rgb
        .chunks_exact(3)
        .filter(|p| test([p[0], p[1], p[2]]))
        .count();
    hits as f64 / n as f64
}

/// The QIM change's shaping per pixel: the perceptual amplitude less `q_floor` (at least 0.05).
pub(crate) fn shaped(amp: &[f32], p: &QimParams) -> Vec<f32> {
    amp.iter().map(|&a| (a - p.q_floor).max(0.05)).collect()
}

/// The perceptual amplitude of a frame, shaped for the QIM carrier ([`shaped`]).
pub(crate) fn frame_shaping(frame: &kino_media::Frame, p: &QimParams) -> Vec<f32> {
    shaped(&crate::embed::probe_amplitude(frame), p)
}

/// Soft coded bits (in [-1, 1], positive = 1) read from a luma plane with the grid at `g`, and
/// how well the grid fits: the mean `|soft|`. Where the grid is wrong (or there is no mark) a
/// bit's cells read values anywhere on the lattices and their soft values partly cancel; on the
/// embedder's grid they agree. The fit needs no payload, so the detector can try many grids with
/// it and decode only the best (a cell on its own is too noisy after a re-encode for this: it is
/// the agreement between a bit's cells that tells).
/// `shaping` is the frame's [`shaped`] amplitude.
pub(crate) fn read(
    luma: &[f32],
    shaping: &[f32],
    w: usize,
    h: usize,
    g: Grid,
    layout: &QimLayout,
    p: &QimParams,
) -> (Vec<f64>, f64) {
    let step = p.step;
    let ax = axes(w, g.ox, g.cell);
    let ay = axes(h, g.oy, g.cell);
    let units = Units::new(&ax, &ay, p.per_cell);
    // How likely the embedder could move this unit onto its lattice: it moves a value by at most
    // d_max · (mean shaping weight of its cells), against offsets spread over ±step/2. A unit it
    // could hardly move is read as nearly an erasure instead of a confident guess.
    let (s, q, qm) = project(luma, Some(shaping), w, &ax, &ay, &units);
    let mut soft = vec![0f64; CODED_BITS];
    let mut weight = vec![0f64; CODED_BITS];
    let st = f64::from(step);
    for j in 0..units.len() {
        let Some(k) = layout.bit[units.slot(j)] else {
            continue;
        };
        if q[j] <= 0.0 {
            continue;
        }
        let k = usize::from(k);
        let a = s[j] / q[j];
        // Distance to the nearest point of each bit's lattice, in steps (0 … 0.5).
        let dist = |b: bool| {
            let o = f64::from(layout.offset(k, b, step));
            let r = ((a - o) / st).rem_euclid(1.0);
            r.min(1.0 - r)
        };
        let reach = f64::from(p.d_max) * qm[j] / q[j];
        let reliable = (2.0 * reach / st).min(1.0);
        // d0 - d1 in [-0.5, 0.5] ⇒ scaled to [-1, 1], times that reliability; a bit's units are
        // weighed by their size (cells cut by the frame's edge count less).
        soft[k] += q[j] * 2.0 * (dist(false) - dist(true)) * reliable;
        weight[k] += q[j];
    }
    for (s, w) in soft.iter_mut().zip(&weight) {
        if *w > 0.0 {
            *s /= w;
        }
    }
    let fit = soft.iter().map(|s| s.abs()).sum::<f64>() / soft.len() as f64;
    (soft, fit)
}

/// Luma (BT.601, as floats) of an RGB frame.
pub(crate) fn luma_f32(rgb: &[u8]) -> Vec<f32> {
    rgb.chunks_exact(3)
        .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecc;
    use crate::embed::Embedder;
    use crate::pattern;
    use kino_media::Frame;

    /// A textured, unclipped picture: smooth value noise in 40..216.
    fn textured(w: u32, h: u32, seed: u64) -> Frame {
        let mut st = seed | 1;
        let mut next = move || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (st >> 40) as f32 / (1u64 << 24) as f32
        };
        let gw = (w / 6 + 2) as usize;
        let grid: Vec<f32> = (0..gw * (h / 6 + 2) as usize).map(|_| next()).collect();
        Frame::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / 6.0, y as f32 / 6.0);
            let (ix, iy) = (fx as usize, fy as usize);
            let (tx, ty) = (fx - ix as f32, fy - iy as f32);
            let g = |i: usize, j: usize| grid[j * gw + i];
            let v = (g(ix, iy) * (1.0 - tx) + g(ix + 1, iy) * tx) * (1.0 - ty)
                + (g(ix, iy + 1) * (1.0 - tx) + g(ix + 1, iy + 1) * tx) * ty;
            let l = (40.0 + 176.0 * v) as u8;
            [l, l.saturating_sub(10), l / 2 + 60]
        })
        .unwrap()
    }

    /// Wrong coded bits read from `luma` at the embedder's grid (the corner, scale 1).
    fn wrong_bits(
        luma: &[f32],
        shaping: &[f32],
        (w, h): (u32, u32),
        layout: &QimLayout,
        code: &[bool],
        p: &QimParams,
    ) -> usize {
        let grid = Grid {
            ox: 0.0,
            oy: 0.0,
            cell: cell_px(w, h),
        };
        read(luma, shaping, w as usize, h as usize, grid, layout, p)
            .0
            .iter()
            .zip(code)
            .filter(|(&s, &c)| (s > 0.0) != c)
            .count()
    }

    #[test]
    fn clipped_share_counts_pixels_near_the_ends() {
        let grey = Frame::from_fn(8, 8, |_, _| [128, 128, 128]).unwrap();
        assert_eq!(clipped_share(grey.data()), 0.0);
        let half =
            Frame::from_fn(8, 8, |x, _| if x < 4 { [200, 254, 90] } else { [3, 9, 9] }).unwrap();
        assert_eq!(clipped_share(half.data()), 0.5);
        assert_eq!(clipped_share(&[]), 0.0);
    }

    #[test]
    fn saturated_texture_carries_the_qim_bits_through_the_free_channels() {
        // Half the picture saturated (red at 255, the texture in green and blue): 50% of its
        // pixels have a channel at an end, none is stuck. Layout v4 as first made gave such a
        // frame the chips alone; with `gamut` it carries the QIM bits, within the PSNR budget.
        let key = Key::from_bytes(b"qim gamut test");
        let id = 0x0a0b_0c0d_0e0f;
        let (w, h) = (256u32, 192u32);
        let base = textured(w, h, 11);
        let f0 = Frame::from_fn(w, h, |x, y| {
            let p = base.data()[((y * w + x) * 3) as usize..][..3].to_vec();
            if x < w / 2 {
                [255, p[0] / 2, p[2]]
            } else {
                [p[0], p[1], p[2]]
            }
        })
        .unwrap();
        assert!((clipped_share(f0.data()) - 0.5).abs() < 0.01);
        assert_eq!(crate::gamut::stuck_share(f0.data()), 0.0);
        let layout = QimLayout::new(&key);
        let code = ecc::encode(&pattern::payload_bits(id));
        let errors = |p: QimParams| {
            let mut f = f0.clone();
            Embedder::with_params(&key, id, w, h, p).mark(&mut f, 0);
            let psnr = kino_media::psnr(&f0, &f).unwrap();
            let shaping = frame_shaping(&f, &p);
            let e = wrong_bits(&luma_f32(f.data()), &shaping, (w, h), &layout, &code, &p);
            (e, psnr)
        };
        let (with, psnr) = errors(QimParams::default());
        assert!(with <= code.len() / 10, "{with} of {} wrong", code.len());
        assert!(psnr >= 40.0, "PSNR {psnr}");
        // Layout v4 as first made: channels moved alike and clipped, the chips alone in a
        // frame with more than 30% of its pixels near an end.
        let (without, _) = errors(QimParams {
            gamut: false,
            max_clipped: 0.3,
            ..QimParams::default()
        });
        assert!(
            without > code.len() / 4,
            "{without} of {} wrong",
            code.len()
        );
    }

    #[test]
    fn a_textured_frame_carries_every_coded_bit_on_its_lattice() {
        let key = Key::from_bytes(b"qim unit test");
        let id = 0x0123_4567_89ab;
        let (w, h) = (256u32, 192u32);
        let mut f = textured(w, h, 7);
        let plain = luma_f32(f.data());
        assert!(clipped_share(f.data()) < 0.01);
        Embedder::new(&key, id, w, h).mark(&mut f, 0);
        let layout = QimLayout::new(&key);
        let code = ecc::encode(&pattern::payload_bits(id));
        let grid = Grid {
            ox: 0.0,
            oy: 0.0,
            cell: cell_px(w, h),
        };
        let p = QimParams::default();
        let amp = frame_shaping(&f, &p);
        let errors = |l: &[f32], layout: &QimLayout| wrong_bits(l, &amp, (w, h), layout, &code, &p);
        let read_errors = |l: &[f32]| errors(l, &layout);
        // Marked: most bits on their lattice (slots in smooth parts cannot move far enough, and
        // the change is rounded to whole levels; the code corrects the rest).
        let marked = read_errors(&luma_f32(f.data()));
        let fit = |l: &[f32]| read(l, &amp, w as usize, h as usize, grid, &layout, &p).1;
        let shifted = Grid { ox: 3.0, ..grid };
        let (on, off) = (fit(&luma_f32(f.data())), fit(&plain));
        assert!(on > 0.6 && off < 0.3, "fit marked {on}, unmarked {off}");
        let moved = read(
            &luma_f32(f.data()),
            &amp,
            w as usize,
            h as usize,
            shifted,
            &layout,
            &p,
        )
        .1;
        assert!(moved < 0.4, "fit 3 px off the grid {moved}");
        assert!(
            marked <= code.len() / 10,
            "{marked} of {} wrong",
            code.len()
        );
        // Unmarked: the values lie anywhere, about half the bits wrong.
        let unmarked = read_errors(&plain);
        assert!(
            unmarked > code.len() / 4,
            "{unmarked} of {} wrong",
            code.len()
        );
        // Another key reads noise from the marked frame.
        let other = QimLayout::new(&Key::from_bytes(b"another key"));
        let errs = errors(&luma_f32(f.data()), &other);
        assert!(errs > code.len() / 4, "{errs} of {} wrong", code.len());
    }
}
