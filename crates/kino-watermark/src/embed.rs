//! Embedding: add the keyed pattern to the luma, scaled by local texture.

use kino_media::Frame;

use crate::gamut;
use crate::pattern::{self, Layout, CHIPS};
use crate::qim::{self, QimLayout, QimParams};
use crate::{ecc, Key};

/// Side of the blocks over which texture is measured.
const BLOCK: usize = 8;
/// Amplitude (8-bit levels) in flat regions, …
pub(crate) const AMP_MIN: f32 = 1.0;
/// … at most, …
pub(crate) const AMP_MAX: f32 = 6.0;
/// … and per level of texture (mean |Laplacian| / 4 of the block's luma).
pub(crate) const AMP_GAIN: f32 = 1.0;
/// Root-mean-square cap on the change per frame (levels): 10·log10(255²/2.3²) = 40.9 dB, so
/// with rounding every marked frame stays above 40 dB PSNR.
pub(crate) const RMS_CAP: f32 = 2.3;

/// Marks frames of one size with one key and payload. Build once per video; [`Embedder::mark`]
/// is cheap (a few milliseconds per 832×480 frame).
pub struct Embedder {
    width: u32,
    height: u32,
    chips: [f32; CHIPS],
    /// The coded payload bits (the QIM carrier's values).
    coded: Vec<bool>,
    qim: std::sync::Arc<QimLayout>,
    params: QimParams,
    /// The pattern (in [-1, 1]) for every pixel of a `width × height` frame.
    pattern: Vec<f32>,
    /// The full keyed sync tile's pattern (QIM frames, [`QimParams::full_sync`]).
    sync_chips: [f32; CHIPS],
    sync_pattern: Vec<f32>,
}

impl Embedder {
    /// An embedder of payload `id` (its low 48 bits; the rest is ignored) under `key`, for
    /// frames of `width × height` (frames of another size are still marked correctly, just
    /// more slowly).
    pub fn new(key: &Key, id: u64, width: u32, height: u32) -> Embedder {
        Self::with_params(key, id, width, height, QimParams::default())
    }

    /// [`Embedder::new`] with other carrier strengths: for development probes only.
    #[doc(hidden)]
    pub fn with_params(key: &Key, id: u64, width: u32, height: u32, params: QimParams) -> Embedder {
        let layout = Layout::new(key);
        let chips = layout.chips(id);
        let coded = ecc::encode(&pattern::payload_bits(id));
        Self::build(
            chips,
            layout.sign,
            coded,
            std::sync::Arc::new(QimLayout::new(key)),
            params,
            width,
            height,
        )
    }

    fn build(
        chips: [f32; CHIPS],
        sync_chips: [f32; CHIPS],
        coded: Vec<bool>,
        qim: std::sync::Arc<QimLayout>,
        params: QimParams,
        width: u32,
        height: u32,
    ) -> Embedder {
        let chip = pattern::chip_px(width.max(1), height.max(1));
        let ax: Vec<_> = (0..width)
            .map(|x| pattern::axis((f64::from(x) + 0.5) / chip))
            .collect();
        let ay: Vec<_> = (0..height)
            .map(|y| pattern::axis((f64::from(y) + 0.5) / chip))
            .collect();
        let pattern = synth(&chips, &ax, &ay);
        let sync_pattern = if params.full_sync {
            synth(&sync_chips, &ax, &ay)
        } else {
            Vec::new()
        };
        Embedder {
            width,
            height,
            chips,
            coded,
            qim,
            params,
            pattern,
            sync_chips,
            sync_pattern,
        }
    }

    /// Frame width this embedder was built for.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Frame height this embedder was built for.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Marks one frame in place. Every frame carries the same mark, so `index` does not change
    /// it (it is there so callers need not care, and for future use).
    pub fn mark(&self, frame: &mut Frame, index: usize) {
        let _ = index;
        if frame.width() != self.width || frame.height() != self.height {
            let other = Self::build(
                self.chips,
                self.sync_chips,
                self.coded.clone(),
                self.qim.clone(),
                self.params,
                frame.width(),
                frame.height(),
            );
            other.mark_same_size(frame);
        } else {
            self.mark_same_size(frame);
        }
    }

    fn mark_same_size(&self, frame: &mut Frame) {
        let w = self.width as usize;
        let h = self.height as usize;
        // Luma (BT.601 weights; adding the same amount to R, G and B changes luma by exactly
        // that amount and leaves the colour difference untouched).
        let luma: Vec<i16> = frame
            .data()
            .chunks_exact(3)
            .map(|p| {
                ((77 * i32::from(p[0]) + 150 * i32::from(p[1]) + 29 * i32::from(p[2]) + 128) >> 8)
                    as i16
            })
            .collect();
        let amp = pixel_amplitudes(&amplitude_map(&luma, w, h), w, h);
        // Which carrier gets the budget: QIM unless much of the picture cannot move its luma
        // both ways or nearly all of it is saturated ([`qim_frame`]), the chips alone (layout
        // v3) then.
        let gamut = self.params.gamut;
        let use_qim = self.params.d_max > 0.0 && qim_frame(frame.data(), &self.params);
        let share = if use_qim { self.params.sync_share } else { 1.0 };
        // QIM frames: the chips are there for the sync search alone (the full sync tile).
        let chips = if use_qim && self.params.full_sync {
            &self.sync_pattern
        } else {
            &self.pattern
        };
        if !use_qim {
            // The chips alone, every channel alike (clipped where it must be): realised through
            // the other channels they would cost more RGB change for no gain (testsrc2 at
            // 256×256, CRF 23: decoded as v4 first made, PSNR 43.4 dB; realised, not, 40.9 dB).
            // First the ends of every channel are pulled in by `headroom` levels (white 255 →
            // 254, black 0 → 1: no one sees it, and it is the same everywhere, so it draws no
            // pattern), so the chips move flat white and black both ways instead of losing their
            // brighter (darker) half to clipping; the pull's cost comes off the RMS budget.
            let pull = pull_in(frame, self.params.headroom);
            let cap = (f64::from(RMS_CAP).powi(2) - pull).max(0.0).sqrt() as f32;
            let g = ss_gain(chips, &amp, cap);
            let ss: Vec<f32> = chips.iter().zip(&amp).map(|(&p, &a)| g * a * p).collect();
            apply(frame, &ss, false);
            return;
        }
        let g = ss_gain(chips, &amp, RMS_CAP * share);
        let ss: Vec<f32> = chips.iter().zip(&amp).map(|(&p, &a)| g * a * p).collect();
        let cap = f64::from(RMS_CAP) * f64::from(RMS_CAP);
        let plain = qim::luma_f32(frame.data());
        let amp = qim::shaped(&amp, &self.params);
        // QIM on the picture as the spread-spectrum mark leaves it (as far as its pixels can
        // follow it, with `gamut`).
        let rgb = frame.data();
        let px = |i: usize| [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
        // Per pixel, the luma changes every channel takes alike (most pixels: no call into
        // `gamut` for them).
        let (lo, hi): (Vec<f32>, Vec<f32>) = if gamut {
            (0..ss.len()).map(|i| gamut::free_range(px(i))).unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        let realised = |i: usize, c: f32| {
            if c >= lo[i] && c <= hi[i] {
                c
            } else {
                gamut::realised_luma(px(i), c)
            }
        };
        let ss_eff: Vec<f32> = if gamut {
            (0..ss.len()).map(|i| realised(i, ss[i])).collect()
        } else {
            ss.clone()
        };
        let other = |i: usize, o: f32| realised(i, ss[i] + o) - ss_eff[i];
        // Where the chips' change is taken whole, a QIM change o is too while ss + o fits.
        let effect = gamut.then(|| {
            let (qlo, qhi) = (0..ss.len())
                .map(|i| {
                    if ss_eff[i] == ss[i] {
                        (lo[i] - ss[i], hi[i] - ss[i])
                    } else {
                        (f32::INFINITY, f32::NEG_INFINITY)
                    }
                })
                .unzip();
            qim::Effect {
                lo: qlo,
                hi: qhi,
                other: &other,
            }
        });
        let base: Vec<f32> = plain.iter().zip(&ss_eff).map(|(l, s)| l + s).collect();
        // The whole change within the RMS cap: the QIM carrier gives way, first by moving flat
        // cells less (a lower cap on their coefficient), last by scaling down. A pixel's cost is
        // its squared change summed over R, G and B / 3: the squared luma change, times
        // `weight` (> 1) where a saturated pixel moves some channels more to make it.
        let n = ss.len().max(1) as f64;
        let mut params = self.params;
        let mut q = Vec::new();
        let mut t = 1f32;
        for _ in 0..6 {
            q = qim::change(
                &base,
                &amp,
                w,
                h,
                &self.qim,
                &self.coded,
                &params,
                effect.as_ref(),
            );
            let weight: Vec<f32> = if gamut {
                (0..q.len())
                    .map(|i| {
                        let c = ss[i] + q[i];
                        if c == 0.0 || (c >= lo[i] && c <= hi[i]) {
                            1.0
                        } else {
                            channel_cost(px(i), c) / (c * c)
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let ms = |f: &dyn Fn(f32, f32) -> f32| -> f64 {
                ss.iter()
                    .zip(&q)
                    .enumerate()
                    .map(|(i, (&a, &b))| f64::from(f(a, b) * weight.get(i).copied().unwrap_or(1.0)))
                    .sum::<f64>()
                    / n
            };
            let (ss2, cross, q2) = (ms(&|a, _| a * a), ms(&|a, b| a * b), ms(&|_, b| b * b));
            if ss2 + 2.0 * cross + q2 <= cap || q2 <= 0.0 {
                t = 1.0;
                break;
            }
            // Largest t ≤ 1 with ss2 + 2·t·cross + t²·q2 ≤ cap.
            let disc = (cross * cross - q2 * (ss2 - cap)).max(0.0);
            t = ((-cross + disc.sqrt()) / q2).clamp(0.0, 1.0) as f32;
            params.d_max *= 0.75;
        }
        let mut total: Vec<f32> = ss.iter().zip(&q).map(|(&a, &b)| a + t * b).collect();
        if gamut {
            // The weights were taken at t = 1: check the cost as it is, and scale down if over.
            for _ in 0..3 {
                let cost = rgb_cost(frame.data(), &total);
                if cost <= cap {
                    break;
                }
                let k = (cap / cost).sqrt() as f32;
                total.iter_mut().for_each(|v| *v *= k);
            }
        }
        apply(frame, &total, gamut);
    }
}

/// The smooth pattern (in [-1, 1]) of a tile of these 256 chip values with chips of `chip_px`
/// pixels, origin at the corner, for a `width × height` frame: for development probes only.
#[doc(hidden)]
pub fn probe_pattern(chips: &[f32], chip_px: f64, width: u32, height: u32) -> Vec<f32> {
    let mut c = [0f32; CHIPS];
    c.copy_from_slice(chips);
    let ax: Vec<_> = (0..width)
        .map(|x| pattern::axis((f64::from(x) + 0.5) / chip_px))
        .collect();
    let ay: Vec<_> = (0..height)
        .map(|y| pattern::axis((f64::from(y) + 0.5) / chip_px))
        .collect();
    synth(&c, &ax, &ay)
}

/// The perceptual amplitude (levels) per pixel that [`Embedder::mark`] would use for this
/// frame before the RMS cap: for development probes only.
#[doc(hidden)]
pub fn probe_amplitude(frame: &Frame) -> Vec<f32> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let luma: Vec<i16> = frame
        .data()
        .chunks_exact(3)
        .map(|p| {
            ((77 * i32::from(p[0]) + 150 * i32::from(p[1]) + 29 * i32::from(p[2]) + 128) >> 8)
                as i16
        })
        .collect();
    pixel_amplitudes(&amplitude_map(&luma, w, h), w, h)
}

/// The pattern for every pixel from chip values and the per-column / per-row axes.
fn synth(chips: &[f32; CHIPS], ax: &[pattern::Axis], ay: &[pattern::Axis]) -> Vec<f32> {
    let mut pat = Vec::with_capacity(ax.len() * ay.len());
    for &y in ay {
        pat.extend(ax.iter().map(|&a| pattern::value(chips, a, y)));
    }
    pat
}

/// Per-pixel amplitude from the block map.
fn pixel_amplitudes(amp: &[f32], w: usize, h: usize) -> Vec<f32> {
    let bw = w.div_ceil(BLOCK);
    let bh = h.div_ceil(BLOCK);
    let col: Vec<(usize, usize, f32)> = (0..w).map(|x| interp_axis(x, bw)).collect();
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let (r0, r1, wy) = interp_axis(y, bh);
        let a0 = &amp[r0 * bw..(r0 + 1) * bw];
        let a1 = &amp[r1 * bw..(r1 + 1) * bw];
        out.extend(col.iter().map(|&(c0, c1, wx)| {
            let top = a0[c0] + wx * (a0[c1] - a0[c0]);
            let bot = a1[c0] + wx * (a1[c1] - a1[c0]);
            top + wy * (bot - top)
        }));
    }
    out
}

/// The gain on `amp · pattern` that keeps its root-mean-square within `cap` (1 if it is).
fn ss_gain(pattern: &[f32], amp: &[f32], cap: f32) -> f32 {
    let sumsq: f64 = pattern
        .iter()
        .zip(amp)
        .map(|(&p, &a)| f64::from(p * a) * f64::from(p * a))
        .sum();
    let rms = (sumsq / pattern.len().max(1) as f64).sqrt() as f32;
    if rms > cap {
        cap / rms
    } else {
        1.0
    }
}

/// Whether a frame gets the QIM carrier (else the chips alone): with `gamut`, if at most
/// `max_clipped` of its pixels cannot move their luma both ways even through the other
/// channels and at most `max_saturated` have a channel near an end; else if at most
/// `max_clipped` have a channel near an end.
fn qim_frame(rgb: &[u8], p: &QimParams) -> bool {
    // A share of 1 or more is no condition (and not worth measuring).
    let within = |max: f32, share: &dyn Fn() -> f64| max >= 1.0 || share() <= f64::from(max);
    if p.gamut {
        within(p.max_saturated, &|| qim::clipped_share(rgb))
            && within(p.max_clipped, &|| gamut::stuck_share(rgb))
    } else {
        within(p.max_clipped, &|| qim::clipped_share(rgb))
    }
}

/// Moves each pixel's luma by `change` (levels): with `gamut` as [`gamut::apply_pixel`] does,
/// else the change added to R, G and B, rounded and clamped (layout v4 as first made).
fn apply(frame: &mut Frame, change: &[f32], gamut: bool) {
    if gamut {
        for (px, &c) in frame.data_mut().chunks_exact_mut(3).zip(change) {
            gamut::apply_pixel(px, c);
        }
        return;
    }
    for (px, &c) in frame.data_mut().chunks_exact_mut(3).zip(change) {
        let di = c.round() as i16;
        if di != 0 {
            for c in px.iter_mut() {
                *c = (i16::from(*c) + di).clamp(0, 255) as u8;
            }
        }
    }
}

/// Pulls every channel of `frame` at most `levels` (rounded) from 0 or 255 to that distance, and
/// returns the mean squared change per channel (levels²).
fn pull_in(frame: &mut Frame, levels: f32) -> f64 {
    let k = levels.round().clamp(0.0, 127.0) as u8;
    if k == 0 {
        return 0.0;
    }
    let mut sum = 0u64;
    for c in frame.data_mut().iter_mut() {
        let v = (*c).clamp(k, 255 - k);
        let d = u64::from(v.abs_diff(*c));
        sum += d * d;
        *c = v;
    }
    sum as f64 / frame.data().len().max(1) as f64
}

/// Bilinear interpolation between block centres along one axis: `(block0, block1, weight1)`.
fn interp_axis(x: usize, blocks: usize) -> (usize, usize, f32) {
    let f = (x as f32 + 0.5) / BLOCK as f32 - 0.5;
    if f <= 0.0 {
        return (0, 0, 0.0);
    }
    let i0 = f.floor() as usize;
    if i0 + 1 >= blocks {
        return (blocks - 1, blocks - 1, 0.0);
    }
    (i0, i0 + 1, f - i0 as f32)
}

/// The mark's amplitude per `BLOCK × BLOCK` block: low in flat regions, higher where texture
/// hides it (perceptual masking), smoothed over the neighbouring blocks.
fn amplitude_map(luma: &[i16], w: usize, h: usize) -> Vec<f32> {
    let bw = w.div_ceil(BLOCK);
    let bh = h.div_ceil(BLOCK);
    let mut sum = vec![0u32; bw * bh];
    let mut cnt = vec![0u32; bw * bh];
    if w >= 3 && h >= 3 {
        for y in 1..h - 1 {
            let row = &luma[y * w..(y + 1) * w];
            let up = &luma[(y - 1) * w..y * w];
            let dn = &luma[(y + 1) * w..(y + 2) * w];
            let brow = (y / BLOCK) * bw;
            for x in 1..w - 1 {
                let lap = 4 * i32::from(row[x])
                    - i32::from(row[x - 1])
                    - i32::from(row[x + 1])
                    - i32::from(up[x])
                    - i32::from(dn[x]);
                let b = brow + x / BLOCK;
                sum[b] += lap.unsigned_abs();
                cnt[b] += 1;
            }
        }
    }
    let raw: Vec<f32> = sum
        .iter()
        .zip(&cnt)
        .map(|(&s, &c)| {
            let act = if c == 0 {
                0.0
            } else {
                s as f32 / (4.0 * c as f32)
            };
            (AMP_MIN + AMP_GAIN * act).min(AMP_MAX)
        })
        .collect();
    // 3×3 mean over blocks, so the amplitude changes gently from block to block.
    let mut out = vec![0f32; bw * bh];
    for by in 0..bh {
        for bx in 0..bw {
            let (mut s, mut n) = (0f32, 0f32);
            for yy in by.saturating_sub(1)..(by + 2).min(bh) {
                for xx in bx.saturating_sub(1)..(bx + 2).min(bw) {
                    s += raw[yy * bw + xx];
                    n += 1.0;
                }
            }
            out[by * bw + bx] = s / n;
        }
    }
    out
}

/// Mean squared change per channel (levels²) of moving pixel `p`'s luma by `c` as
/// [`gamut::apply_pixel`] does (before rounding): `c²` where every channel takes it alike.
fn channel_cost(p: [u8; 3], c: f32) -> f32 {
    let (lo, hi) = gamut::free_range(p);
    if (lo..=hi).contains(&c) {
        c * c
    } else {
        let d = gamut::realise(p, c);
        (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) / 3.0
    }
}

/// [`channel_cost`] over a frame, per pixel.
fn rgb_cost(rgb: &[u8], change: &[f32]) -> f64 {
    let sum: f64 = rgb
        .chunks_exact(3)
        .zip(change)
        .map(|(p, &c)| f64::from(channel_cost([p[0], p[1], p[2]], c)))
        .sum();
    sum / change.len().max(1) as f64
}

/// The shares of pixels that decide the carrier: with a channel near an end, and unable to
/// move their luma both ways (see [`QimParams::gamut`]): for development probes.
#[doc(hidden)]
pub fn probe_clipped(frame: &Frame) -> (f64, f64) {
    (
        qim::clipped_share(frame.data()),
        gamut::stuck_share(frame.data()),
    )
}
