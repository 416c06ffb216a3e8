//! Detection: whiten, fold onto one tile at each candidate scale, find the sync pattern by FFT
//! correlation, read the chips, decode, check the marker.

use kino_media::{Frame, LumaPlane};

use crate::ecc;
use crate::fft::{self, C64};
use crate::pattern::{self, Layout, CHIPS, CODED_BITS, INFO_BITS, TILE};
use crate::qim::{self, Grid, QimLayout, QimParams};
use crate::Key;

/// Fold resolution: samples per chip along each axis.
const R: usize = 4;
/// Side of the folded tile in samples.
const N: usize = TILE * R;
/// At most this many frames are read (evenly spread over the clip).
pub(crate) const MAX_FRAMES: usize = 48;
/// Scale search: the picture may have been cropped or scaled so that its shorter side is
/// between `1/MAX_SCALE` and `1/MIN_SCALE` of what the chip size assumes (a 10% crop is
/// 1/0.9 = 1.11), in steps of `SCALE_STEP` (log).
const MIN_SCALE: f64 = 0.8;
const MAX_SCALE: f64 = 1.25;
const SCALE_STEP: f64 = 0.004;
/// Candidates whose payload is decoded: the strongest sync peaks at distinct scales, and the
/// best shift at scale 1.
pub(crate) const CANDIDATES: usize = 12;
/// Of which this many are the strongest anchored peaks (besides the anchor at scale 1).
const ANCHORED_CANDIDATES: usize = 6;
/// Grids (anchored at the corner or the centre, at any scale of the search) the QIM carrier is
/// also read at: those where the first frame's values fit the lattices best.
const FIT_CANDIDATES: usize = 3;
/// Free sync peaks (the strongest, one per scale) whose three-by-three possible QIM grids are
/// fitted, …
const FREE_FIT_PEAKS: usize = 24;
/// … and how many of those grids, the best-fitting, are decoded, each after moving its origin
/// by up to `REFINE_STEPS` steps of 1/(4·REFINE_STEPS) chip either way, to where it fits best.
const FREE_FIT_CANDIDATES: usize = 5;
const REFINE_STEPS: i32 = 3;
/// QIM decodes at most: two readings (the first frame; the mean over frames) at the corner at
/// scale 1, at each anchored candidate's grid, at the best-fitting anchored grids and at the
/// best-fitting grids of the free peaks.
pub(crate) const QIM_DECODES: usize =
    2 * (1 + ANCHORED_CANDIDATES + FIT_CANDIDATES + FREE_FIT_CANDIDATES);
/// Payload decodes per clip at most (each a 2⁻¹⁶ chance for an unmarked clip).
pub(crate) const DECODES: usize = CANDIDATES + QIM_DECODES;
/// A decode counts only if its codeword is within this many coded bits of the hard decisions.
/// For random soft bits the Viterbi decoder's codeword lies 50 ± 4 bits away (20,000 draws:
/// 24.6% at ≤ 48), so this cuts the false positives of an unmarked clip to a quarter; marks
/// decode at 0–47 bits in the natural-looking clips of the README's bench (test cards and
/// kino-shapes' flat clips up to 55, at the code's margin). Stop 55's bench found two false
/// positives in 500 unmarked clips without it, at 51 and 55 bits.
const MAX_BIT_ERRORS: usize = 48;
/// The share of random decodes within [`MAX_BIT_ERRORS`] (measured, rounded up).
const RANDOM_WITHIN_ERRORS: f64 = 0.25;
/// Frames the QIM carrier's mean reading takes (evenly spread over those used).
const QIM_FRAMES: usize = 16;

/// What [`detect`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// The key's mark was found: a decoded payload (of the chips at a sync peak, or of the QIM
    /// cells at a grid) whose 16-bit check field (the Kino marker XOR the id's CRC-16) matches
    /// its id.
    pub detected: bool,
    /// The 48-bit id, when detected.
    pub id: Option<u64>,
    /// `1 − false_alarm_probability` when detected, 0 when not.
    pub confidence: f64,
    /// Upper bound on the probability that an unmarked video (or one marked with another key)
    /// gives a result at least this strong: `42 · 2⁻¹⁶ · 0.25 · min(1, H · Q(sync_score))` (42
    /// payloads decoded at most) with `H` the sync hypotheses of the reported candidate's kind
    /// tried (anchored: 2 · 9 per scale; free: 64 · 64 per scale; both twice, for the two
    /// sync templates: the 46 sync chips, and the full tile of a QIM frame) and `Q` the standard normal
    /// tail; for a QIM decode `42 · 2⁻¹⁶ · 0.25` (1 when not detected; 0.25: the share of random
    /// decodes within the 48 bit errors a detection may have).
    pub false_alarm_probability: f64,
    /// The reported candidate's sync peak (the detected one, else the one with the fewest
    /// `bit_errors`) in standard deviations of the correlation over all shifts (0 for a QIM
    /// grid found by its fit or the corner's).
    pub sync_score: f64,
    /// Coded bits that disagreed with the decoded codeword (corrected errors), of `coded_bits`.
    pub bit_errors: usize,
    /// Coded bits per tile.
    pub coded_bits: usize,
    /// Frames used (at most 48, evenly spread; frames of another size than the first are skipped).
    pub frames_used: usize,
    /// The scale found: the mark's chip size relative to what this frame size implies (1.0 for
    /// an unscaled or uniformly rescaled video, about 1.11 after a 10% crop).
    pub scale: f64,
    /// The 64 decoded payload bits (16-bit check field, 48-bit id) of the reported candidate,
    /// detected or not (for measuring bit accuracy).
    pub raw_payload: u64,
    /// Which carrier the reported candidate was read from: `"spread-spectrum"` (the chips of
    /// the sync tile), `"qim"` (the cells' lattice, layout v4) or `"none"` (nothing to read).
    pub carrier: &'static str,
}

impl Detection {
    fn none(frames_used: usize) -> Detection {
        Detection {
            detected: false,
            id: None,
            confidence: 0.0,
            false_alarm_probability: 1.0,
            sync_score: 0.0,
            bit_errors: 0,
            coded_bits: CODED_BITS,
            frames_used,
            scale: 1.0,
            raw_payload: 0,
            carrier: "none",
        }
    }
}

/// Decodes the payload at a given sync (scale, shift): for development probes only.
#[doc(hidden)]
pub fn decode_at(frames: &[Frame], key: &Key, scale: f64, dy: usize, dx: usize) -> Detection {
    let Some(first) = frames.first() else {
        return Detection::none(0);
    };
    let (w, h) = (first.width(), first.height());
    let used: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.width() == w && f.height() == h)
        .take(MAX_FRAMES)
        .collect();
    let c0 = pattern::chip_px(w, h);
    let b = ((c0 / 4.0).floor() as usize).max(1);
    let (wd, hd) = (w as usize / b, h as usize / b);
    let chip_ds = c0 / b as f64;
    let mut acc = vec![0f32; wd * hd];
    for f in &used {
        for (a, r) in acc.iter_mut().zip(whitened(f, b, wd, hd, chip_ds)) {
            *a += r;
        }
    }
    let layout = Layout::new(key);
    let folded = payload_fold(&acc, wd, hd, b, c0 * scale);
    let soft = read_bits(&folded, &layout, dy, dx);
    // No search, so no false-alarm figure: the probe only asks whether the payload reads.
    Detection {
        confidence: 0.0,
        false_alarm_probability: 1.0,
        sync_score: 0.0,
        ..judge(&soft, 1.0, 0.0, scale, used.len(), "spread-spectrum")
    }
}

/// Signed chip readouts (sign × matched filter, positive = agrees with the key's chip sign for a
/// 1 bit / the sync sign) of every chip at a given sync: for development probes only.
#[doc(hidden)]
pub fn chip_soft(frames: &[Frame], key: &Key, scale: f64) -> Vec<f64> {
    let (w, h) = (frames[0].width(), frames[0].height());
    let c0 = pattern::chip_px(w, h);
    let b = ((c0 / 4.0).floor() as usize).max(1);
    let (wd, hd) = (w as usize / b, h as usize / b);
    let mut acc = vec![0f32; wd * hd];
    for f in frames.iter().take(MAX_FRAMES) {
        for (a, r) in acc.iter_mut().zip(whitened(f, b, wd, hd, c0 / b as f64)) {
            *a += r;
        }
    }
    let layout = Layout::new(key);
    let v = read_chips(&fold(&acc, wd, hd, b, c0 * scale), 0, 0);
    (0..CHIPS)
        .map(|c| v[c] * f64::from(layout.sign[c]))
        .collect()
}

/// Matched-filter values of the 256 chips of a tile with chips of `chip_px` pixels, origin at
/// the frame's corner, read from plane `plane` (0: luma, 1: Cb, 2: Cr) after the detector's
/// whitening, from the plain fold (`whiten_fold` false) or the payload fold: for development
/// probes only (`examples/wm_chroma.rs`, `examples/wm_amp.rs`).
#[doc(hidden)]
pub fn probe_chips(frames: &[Frame], plane: usize, chip_px: f64, whiten_fold: bool) -> Vec<f64> {
    let (w, h) = (frames[0].width(), frames[0].height());
    let b = ((chip_px / 4.0).floor() as usize).max(1);
    let (wd, hd) = (w as usize / b, h as usize / b);
    let wt = [LUMA, CB, CR][plane];
    let mut acc = vec![0f32; wd * hd];
    for f in frames.iter().take(MAX_FRAMES) {
        for (a, r) in acc
            .iter_mut()
            .zip(whitened_plane(f, wt, b, wd, hd, chip_px / b as f64))
        {
            *a += r;
        }
    }
    let folded = if whiten_fold {
        payload_fold(&acc, wd, hd, b, chip_px)
    } else {
        fold(&acc, wd, hd, b, chip_px)
    };
    read_chips(&folded, 0, 0).to_vec()
}

/// Looks for the mark of `key` in `frames` (RGB, one video's frames in order; any subset and
/// any frame rate will do: every frame carries the whole mark). For a decoded video prefer
/// [`detect_luma`]: the luma of 8-bit RGB is rounded, clipped and (through swscale) biased.
pub fn detect(frames: &[Frame], key: &Key) -> Detection {
    detect_with(frames, None, key, &QimParams::default())
}

/// [`detect`] reading each frame's brightness from `luma` (`luma[i]` is `frames[i]`'s, as
/// [`kino_media::decode_video_head_luma`] gives it: the luma the stream codes, before the
/// conversion to RGB rounds and clips it), and its colour (what the embedder could change)
/// from the RGB frame. Planes of another size than their frame are ignored.
pub fn detect_luma(frames: &[Frame], luma: &[LumaPlane], key: &Key) -> Detection {
    detect_with(frames, Some(luma), key, &QimParams::default())
}

/// A frame as the detector reads it: its RGB and, when known, its coded luma.
#[derive(Clone, Copy)]
struct Pic<'a> {
    rgb: &'a Frame,
    luma: Option<&'a LumaPlane>,
}

impl Pic<'_> {
    /// The frame's luma (BT.601) as floats.
    fn luma(&self) -> Vec<f32> {
        match self.luma {
            Some(l) => l.to_f32(),
            None => qim::luma_f32(self.rgb.data()),
        }
    }
}

/// [`detect`] / [`detect_luma`] for marks made with other strengths: for development probes
/// only.
#[doc(hidden)]
pub fn detect_with(
    frames: &[Frame],
    luma: Option<&[LumaPlane]>,
    key: &Key,
    params: &QimParams,
) -> Detection {
    let Some(first) = frames.first() else {
        return Detection::none(0);
    };
    let (w, h) = (first.width(), first.height());
    let same: Vec<Pic> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f.width() == w && f.height() == h)
        .map(|(i, f)| Pic {
            rgb: f,
            luma: luma
                .and_then(|l| l.get(i))
                .filter(|l| l.width() == w && l.height() == h),
        })
        .collect();
    let used: Vec<Pic> = if same.len() <= MAX_FRAMES {
        same
    } else {
        (0..MAX_FRAMES)
            .map(|i| same[i * same.len() / MAX_FRAMES])
            .collect()
    };
    let c0 = pattern::chip_px(w, h);
    let b = ((c0 / 4.0).floor() as usize).max(1);
    let (wd, hd) = (w as usize / b, h as usize / b);
    if wd < 8 || hd < 8 {
        return Detection::none(0);
    }
    let chip_ds = c0 / b as f64;
    // The frames the QIM carrier reads (evenly spread); their luma is kept from the chips' pass.
    let n_q = used.len().min(QIM_FRAMES);
    let qim_frames: Vec<usize> = (0..n_q).map(|i| i * used.len() / n_q).collect();
    let mut qim_luma: Vec<Vec<f32>> = Vec::with_capacity(n_q);
    let mut acc = vec![0f32; wd * hd];
    for (j, f) in used.iter().enumerate() {
        let l = f.luma();
        let res = whitened_luma(&l, w as usize, b, wd, hd, chip_ds);
        for (a, r) in acc.iter_mut().zip(res) {
            *a += r;
        }
        if qim_frames.contains(&j) {
            qim_luma.push(l);
        }
    }
    let layout = Layout::new(key);
    // Two sync templates: the 46 sync chips of a frame whose chips carry the payload too, and
    // the full keyed tile of a QIM frame's chips (`QimParams::full_sync`).
    let template = |chips: &[f32; CHIPS]| {
        let mut t = vec![C64::default(); N * N];
        for a in 0..N {
            let ay = pattern::axis((a as f64 + 0.5) / R as f64);
            for bb in 0..N {
                let ax = pattern::axis((bb as f64 + 0.5) / R as f64);
                t[a * N + bb].re = f64::from(pattern::value(chips, ax, ay));
            }
        }
        fft::fft2(&mut t, N, false);
        t
    };
    let templates = [template(&layout.sync_chips()), template(&layout.sign)];

    let n_scales = ((MAX_SCALE / MIN_SCALE).ln() / SCALE_STEP).floor() as usize + 1;
    let scale_of = |k: usize| MIN_SCALE * (k as f64 * SCALE_STEP).exp();
    // Per scale: the best peak anywhere (an arbitrary crop), and the best within one bin of the
    // two anchored shifts: the frame's top-left corner (re-encoding, rescaling and frame edits
    // keep the mark's origin there) and the frame's centre (a centred crop keeps it).
    let mut free: Vec<Peak> = Vec::with_capacity(n_scales);
    let mut anchored: Vec<Peak> = Vec::with_capacity(2 * n_scales);
    for k in 0..n_scales {
        let s = scale_of(k);
        let folded = fold(&acc, wd, hd, b, c0 * s);
        // Each shift's z-score under either template, the larger.
        let zs: Vec<Vec<f64>> = templates
            .iter()
            .map(|t| {
                let corr = fft::xcorr_phase(&folded, t, N);
                let mean = corr.iter().sum::<f64>() / corr.len() as f64;
                let var =
                    corr.iter().map(|c| (c - mean) * (c - mean)).sum::<f64>() / corr.len() as f64;
                let sd = var.sqrt().max(1e-300);
                corr.iter().map(|c| (c - mean) / sd).collect()
            })
            .collect();
        let z = |i: usize| zs[0][i].max(zs[1][i]);
        let arg = (0..N * N).fold(0, |m, i| if z(i) > z(m) { i } else { m });
        free.push(Peak {
            z: z(arg),
            k,
            dy: arg / N,
            dx: arg % N,
            anchored: false,
        });
        for (ay, ax) in [(0, 0), centre_shift(w, h, c0, s)] {
            let mut best = Peak {
                z: f64::NEG_INFINITY,
                k,
                dy: 0,
                dx: 0,
                anchored: true,
            };
            for oy in [N - 1, 0, 1] {
                for ox in [N - 1, 0, 1] {
                    let (dy, dx) = ((ay + oy) % N, (ax + ox) % N);
                    let zz = z(dy * N + dx);
                    if zz > best.z {
                        best = Peak {
                            z: zz,
                            k,
                            dy,
                            dx,
                            anchored: true,
                        };
                    }
                }
            }
            anchored.push(best);
        }
    }
    let unit = ((1.0 / MIN_SCALE).ln() / SCALE_STEP).round() as usize;
    // The strongest free peaks for the QIM carrier's grids (see below).
    let mut free_qim = free.clone();
    free_qim.sort_by(|a, b| b.z.total_cmp(&a.z));
    free_qim.truncate(FREE_FIT_PEAKS);
    let chosen = candidates(free, anchored, unit);
    // Sync hypotheses tried: every shift at every scale, plus 9 shifts around each anchor, with
    // either template.
    let h_free = (2 * n_scales * N * N) as f64;
    let h_anchored = (2 * n_scales * 2 * 9) as f64;
    let mut best: Option<Detection> = None;
    for &Peak {
        z,
        k,
        dy,
        dx,
        anchored,
    } in &chosen
    {
        let hypotheses = if anchored { h_anchored } else { h_free };
        let folded = payload_fold(&acc, wd, hd, b, c0 * scale_of(k));
        let soft = read_bits(&folded, &layout, dy, dx);
        let p_sync = (hypotheses * normal_tail(z)).min(1.0);
        let d = judge(&soft, p_sync, z, scale_of(k), used.len(), "spread-spectrum");
        if d.detected {
            return d;
        }
        // Not detected: report the candidate whose coded bits fit a codeword best (the likeliest
        // right sync), so `raw_payload` is the best guess.
        if best.as_ref().is_none_or(|b| d.bit_errors < b.bit_errors) {
            best = Some(d);
        }
    }
    // The QIM carrier: at the corner at scale 1, and at each anchored candidate's grid.
    let cell = qim::cell_px(w, h);
    let mut grids: Vec<(Grid, f64, f64)> = vec![(
        Grid {
            ox: 0.0,
            oy: 0.0,
            cell,
        },
        1.0,
        0.0,
    )];
    for p in chosen.iter().filter(|p| p.anchored) {
        let s = scale_of(p.k);
        let near = |d: usize| d <= 1 || d >= N - 1;
        let g = if near(p.dy) && near(p.dx) {
            Grid {
                ox: 0.0,
                oy: 0.0,
                cell: cell * s,
            }
        } else {
            Grid {
                ox: f64::from(w) * (1.0 - s) / 2.0,
                oy: f64::from(h) * (1.0 - s) / 2.0,
                cell: cell * s,
            }
        };
        if grids
            .iter()
            .all(|(o, _, _)| (o.cell - g.cell).abs() > 1e-9 || o.ox != g.ox || o.oy != g.oy)
        {
            grids.push((g, s, p.z));
        }
    }
    let qlayout = QimLayout::new(key);
    let lumas: Vec<(Vec<f32>, Vec<f32>)> = qim_luma
        .into_iter()
        .zip(&qim_frames)
        .map(|(l, &j)| (l, qim::frame_shaping(used[j].rgb, params)))
        .collect();
    // Grids that fit the first frame's values best, anchored at the corner or the centre at every
    // scale of the search (a crop whose sync peak is too weak to be among the candidates).
    let mut fits: Vec<(f64, Grid, f64)> = Vec::new();
    for k in 0..n_scales {
        let s = scale_of(k);
        for centre in [false, true] {
            let g = Grid {
                ox: if centre {
                    f64::from(w) * (1.0 - s) / 2.0
                } else {
                    0.0
                },
                oy: if centre {
                    f64::from(h) * (1.0 - s) / 2.0
                } else {
                    0.0
                },
                cell: cell * s,
            };
            let (l, a) = &lumas[0];
            let fit = qim::read(l, a, w as usize, h as usize, g, &qlayout, params).1;
            fits.push((fit, g, s));
        }
    }
    fits.sort_by(|a, b| b.0.total_cmp(&a.0));
    let anchored = grids.len();
    for (_, g, s) in fits {
        if grids.len() >= anchored + FIT_CANDIDATES {
            break;
        }
        if grids
            .iter()
            .all(|(o, _, _)| (o.cell - g.cell).abs() > 1e-9 || o.ox != g.ox || o.oy != g.oy)
        {
            grids.push((g, s, 0.0));
        }
    }
    // The free peaks (an off-centre crop), more of them than the chips decode: the chips' tile
    // gives the grid's origin only up to a tile, and the QIM period is 1.5 tiles, so each peak
    // gives three origins per axis; the grids whose cells fit best are decoded.
    let mut free_fits: Vec<(f64, Grid, f64, f64)> = Vec::new();
    for p in &free_qim {
        let s = scale_of(p.k);
        let tile = TILE as f64 * c0 * s;
        let (ty, tx) = (
            p.dy as f64 / R as f64 * c0 * s,
            p.dx as f64 / R as f64 * c0 * s,
        );
        let (l, a) = &lumas[0];
        for my in 0..3 {
            for mx in 0..3 {
                let g = Grid {
                    ox: tx + mx as f64 * tile,
                    oy: ty + my as f64 * tile,
                    cell: cell * s,
                };
                let fit = qim::read(l, a, w as usize, h as usize, g, &qlayout, params).1;
                free_fits.push((fit, g, s, p.z));
            }
        }
    }
    free_fits.sort_by(|a, b| b.0.total_cmp(&a.0));
    // A free peak gives the origin to a quarter chip; a cell's mean over textured content moves
    // with a fraction of a pixel, so each grid is refined to where the cells fit best, within
    // a quarter chip either way.
    // (Measured on 15 clips at 256×256 cropped off-centre: 10 detected without, 11 with, and
    // the decoded clips' bit errors fell from 37–38 to 4–16 in the two nearest the margin.)
    for (fit0, g, s, z) in free_fits.into_iter().take(FREE_FIT_CANDIDATES) {
        let (l, a) = &lumas[0];
        let unit = c0 * s / (4.0 * f64::from(REFINE_STEPS));
        let mut best = (fit0, g);
        for my in -REFINE_STEPS..=REFINE_STEPS {
            for mx in -REFINE_STEPS..=REFINE_STEPS {
                if mx == 0 && my == 0 {
                    continue;
                }
                let gg = Grid {
                    ox: g.ox + f64::from(mx) * unit,
                    oy: g.oy + f64::from(my) * unit,
                    cell: g.cell,
                };
                let fit = qim::read(l, a, w as usize, h as usize, gg, &qlayout, params).1;
                if fit > best.0 {
                    best = (fit, gg);
                }
            }
        }
        grids.push((best.1, s, z));
    }
    for (g, s, z) in grids {
        let per: Vec<Vec<f64>> = lumas
            .iter()
            .map(|(l, a)| qim::read(l, a, w as usize, h as usize, g, &qlayout, params).0)
            .collect();
        let mut mean = vec![0f64; CODED_BITS];
        for v in &per {
            for (m, x) in mean.iter_mut().zip(v) {
                *m += x / per.len() as f64;
            }
        }
        for soft in [per[0].clone(), mean] {
            let d = judge(&soft, 1.0, z, s, used.len(), "qim");
            if d.detected {
                return d;
            }
            if best.as_ref().is_none_or(|b| d.bit_errors < b.bit_errors) {
                best = Some(d);
            }
        }
    }
    best.unwrap_or_else(|| Detection::none(used.len()))
}

/// A sync hypothesis: z-score, scale index, shift, and whether the shift was anchored.
/// Decodes soft coded bits and judges them: detected when the check field matches, with the
/// false-alarm bound of [`DECODES`] decodes times `p_sync` (the chance of a sync peak that
/// strong; 1 where none was needed).
fn judge(
    soft: &[f64],
    p_sync: f64,
    z: f64,
    scale: f64,
    frames_used: usize,
    carrier: &'static str,
) -> Detection {
    let bits = ecc::decode(soft, INFO_BITS);
    let code = ecc::encode(&bits);
    let bit_errors = soft
        .iter()
        .zip(&code)
        .filter(|(&s, &c)| (s > 0.0) != c)
        .count();
    let (marker, id) = pattern::unpack(&bits);
    let detected = marker == pattern::check_field(id) && bit_errors <= MAX_BIT_ERRORS;
    let pfa = if detected {
        DECODES as f64 * 2f64.powi(-16) * RANDOM_WITHIN_ERRORS * p_sync
    } else {
        1.0
    };
    Detection {
        detected,
        id: detected.then_some(id),
        confidence: if detected { 1.0 - pfa } else { 0.0 },
        false_alarm_probability: pfa,
        sync_score: z,
        bit_errors,
        coded_bits: CODED_BITS,
        frames_used,
        scale,
        raw_payload: (u64::from(marker) << 48) | id,
        carrier,
    }
}

#[derive(Clone, Copy, Debug)]
struct Peak {
    z: f64,
    k: usize,
    dy: usize,
    dx: usize,
    anchored: bool,
}

/// The payload candidates, at most [`CANDIDATES`]: the anchored shift at scale 1, the strongest
/// anchored peaks and the strongest free peaks (each at scales at least 3 steps apart from the
/// others of its kind), without repeats.
fn candidates(mut free: Vec<Peak>, anchored: Vec<Peak>, unit: usize) -> Vec<Peak> {
    let mut chosen: Vec<Peak> = vec![anchored[2 * unit]];
    let same = |a: &Peak, b: &Peak| a.k == b.k && a.dy == b.dy && a.dx == b.dx;
    let pick = |list: &mut Vec<Peak>, n: usize, chosen: &mut Vec<Peak>| {
        list.sort_by(|a, b| b.z.total_cmp(&a.z));
        let mut taken: Vec<usize> = Vec::new();
        for p in list.iter() {
            if taken.len() == n {
                break;
            }
            if taken.iter().all(|&k| k.abs_diff(p.k) >= 3) && chosen.iter().all(|c| !same(c, p)) {
                taken.push(p.k);
                chosen.push(*p);
            }
        }
    };
    let mut anchored = anchored;
    pick(&mut anchored, ANCHORED_CANDIDATES, &mut chosen);
    pick(&mut free, CANDIDATES - 1 - ANCHORED_CANDIDATES, &mut chosen);
    chosen
}

/// The shift (in fold bins) at which the mark's origin lies if the frame is a centred crop of
/// a frame `s` times larger (with the chip size `c0 · s` that frame implied).
fn centre_shift(w: u32, h: u32, c0: f64, s: f64) -> (usize, usize) {
    let at = |side: u32| -> usize {
        let off_chips = f64::from(side) * (s - 1.0) / (2.0 * c0 * s);
        ((-off_chips * R as f64).round() as i64).rem_euclid(N as i64) as usize
    };
    (at(h), at(w))
}

/// Luma of `f` box-downsampled by `b`, high-passed (minus a blur about one chip wide) and
/// divided by the local energy of that residual (weight 1/σ², optimal for a mark of even
/// strength in noise of varying strength), so edges and busy texture weigh little.
fn whitened(f: &Frame, b: usize, wd: usize, hd: usize, chip_ds: f64) -> Vec<f32> {
    whitened_plane(f, LUMA, b, wd, hd, chip_ds)
}

/// RGB weights of the luma plane (BT.601).
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];
/// RGB weights of the blue-difference plane Cb (BT.601, full range).
const CB: [f32; 3] = [-0.168_736, -0.331_264, 0.5];
/// RGB weights of the red-difference plane Cr (BT.601, full range).
const CR: [f32; 3] = [0.5, -0.418_688, -0.081_312];

/// [`whitened`] for any plane given by its RGB weights.
fn whitened_plane(
    f: &Frame,
    wt: [f32; 3],
    b: usize,
    wd: usize,
    hd: usize,
    chip_ds: f64,
) -> Vec<f32> {
    let w = f.width() as usize;
    let rgb = f.data();
    let mut d = vec![0f32; wd * hd];
    for y in 0..hd * b {
        let row = &rgb[y * w * 3..(y * w + wd * b) * 3];
        let drow = &mut d[(y / b) * wd..(y / b + 1) * wd];
        for (x, p) in row.chunks_exact(3).enumerate() {
            drow[x / b] +=
                wt[0] * f32::from(p[0]) + wt[1] * f32::from(p[1]) + wt[2] * f32::from(p[2]);
        }
    }
    whiten(d, b, wd, hd, chip_ds)
}

/// [`whitened`] of a luma plane `l` (`w` pixels a row).
fn whitened_luma(l: &[f32], w: usize, b: usize, wd: usize, hd: usize, chip_ds: f64) -> Vec<f32> {
    let mut d = vec![0f32; wd * hd];
    for y in 0..hd * b {
        let row = &l[y * w..y * w + wd * b];
        let drow = &mut d[(y / b) * wd..(y / b + 1) * wd];
        for (x, v) in row.iter().enumerate() {
            drow[x / b] += v;
        }
    }
    whiten(d, b, wd, hd, chip_ds)
}

/// The whitening of [`whitened`] on a plane `d` summed over `b × b` boxes.
fn whiten(mut d: Vec<f32>, b: usize, wd: usize, hd: usize, chip_ds: f64) -> Vec<f32> {
    let inv = 1.0 / (b * b) as f32;
    d.iter_mut().for_each(|v| *v *= inv);
    let r = (chip_ds.round() as usize).max(1);
    let blur = box_blur(&box_blur(&d, wd, hd, r), wd, hd, r);
    let res: Vec<f32> = d.iter().zip(&blur).map(|(a, b)| a - b).collect();
    let sq: Vec<f32> = res.iter().map(|v| v * v).collect();
    let energy = box_blur(&sq, wd, hd, 2 * r);
    res.iter()
        .zip(&energy)
        .map(|(v, e)| v / (e + 1.0))
        .collect()
}

/// Separable box blur of radius `r` (edges: mean over the part inside).
fn box_blur(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        blur_line(&src[y * w..(y + 1) * w], &mut tmp[y * w..(y + 1) * w], r);
    }
    let mut out = vec![0f32; w * h];
    let mut col = vec![0f32; h];
    let mut colo = vec![0f32; h];
    for x in 0..w {
        for y in 0..h {
            col[y] = tmp[y * w + x];
        }
        blur_line(&col, &mut colo, r);
        for y in 0..h {
            out[y * w + x] = colo[y];
        }
    }
    out
}

fn blur_line(src: &[f32], dst: &mut [f32], r: usize) {
    let n = src.len();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0f64);
    let mut s = 0f64;
    for &v in src {
        s += f64::from(v);
        prefix.push(s);
    }
    for (i, d) in dst.iter_mut().enumerate() {
        let lo = i.saturating_sub(r);
        let hi = (i + r + 1).min(n);
        *d = ((prefix[hi] - prefix[lo]) / (hi - lo) as f64) as f32;
    }
}

/// Folds the accumulated residual onto one `N × N` tile, assuming chips of `chip_px` original
/// pixels (the mean per bin; empty bins 0).
fn fold(acc: &[f32], wd: usize, hd: usize, b: usize, chip_px: f64) -> Vec<f64> {
    let bin = |x: usize| -> usize {
        let u = (x as f64 + 0.5) * b as f64 / chip_px;
        ((u * R as f64).floor() as i64).rem_euclid(N as i64) as usize
    };
    let bu: Vec<usize> = (0..wd).map(bin).collect();
    let mut sum = vec![0f64; N * N];
    let mut cnt = vec![0u32; N * N];
    for y in 0..hd {
        let row = bin(y) * N;
        for (x, &v) in acc[y * wd..(y + 1) * wd].iter().enumerate() {
            sum[row + bu[x]] += f64::from(v);
            cnt[row + bu[x]] += 1;
        }
    }
    for (s, &c) in sum.iter_mut().zip(&cnt) {
        if c > 0 {
            *s /= f64::from(c);
        }
    }
    let mean = sum.iter().sum::<f64>() / (N * N) as f64;
    sum.iter_mut().for_each(|s| *s -= mean);
    sum
}

/// Scale ratios at which the fold holds no mark (its tiles do not line up), used to measure the
/// spectrum of what is not the mark.
const OFF_SCALES: [f64; 4] = [0.77, 0.87, 1.15, 1.3];

/// The folded tile at `chip_px` for reading the payload, whitened: divided, frequency by
/// frequency, by the power spectrum of folds at scales where the mark does not add up (the
/// picture's leftover and the codec's noise), so that the chips' matched filters weigh each
/// frequency by how clean it is.
fn payload_fold(acc: &[f32], wd: usize, hd: usize, b: usize, chip_px: f64) -> Vec<f64> {
    let folded = fold(acc, wd, hd, b, chip_px);
    let mut psd = vec![0f64; N * N];
    for r in OFF_SCALES {
        let mut g: Vec<C64> = fold(acc, wd, hd, b, chip_px * r)
            .iter()
            .map(|&re| C64 { re, im: 0.0 })
            .collect();
        fft::fft2(&mut g, N, false);
        for (p, c) in psd.iter_mut().zip(&g) {
            *p += c.re * c.re + c.im * c.im;
        }
    }
    // Smooth the estimate over neighbouring frequencies (3×3, circular).
    let mut smooth = vec![0f64; N * N];
    for y in 0..N {
        for x in 0..N {
            let mut s = 0.0;
            for oy in [N - 1, 0, 1] {
                for ox in [N - 1, 0, 1] {
                    s += psd[((y + oy) % N) * N + (x + ox) % N];
                }
            }
            smooth[y * N + x] = s;
        }
    }
    let mean = smooth.iter().sum::<f64>() / (N * N) as f64;
    let mut f: Vec<C64> = folded.iter().map(|&re| C64 { re, im: 0.0 }).collect();
    fft::fft2(&mut f, N, false);
    for (c, &p) in f.iter_mut().zip(&smooth) {
        let d = p + 1e-3 * mean + 1e-300;
        c.re /= d;
        c.im /= d;
    }
    f[0] = C64::default();
    fft::fft2(&mut f, N, true);
    f.iter().map(|c| c.re).collect()
}

/// Soft coded bits from the folded tile with the sync found at shift `(dy, dx)`, normalised to
/// unit root-mean-square; positive means 1.
fn read_bits(folded: &[f64], layout: &Layout, dy: usize, dx: usize) -> Vec<f64> {
    let chip_val = read_chips(folded, dy, dx);
    let soft: Vec<f64> = layout
        .data
        .iter()
        .map(|&c| f64::from(layout.sign[c]) * chip_val[c])
        .collect();
    let rms = (soft.iter().map(|s| s * s).sum::<f64>() / soft.len() as f64).sqrt();
    if rms > 0.0 {
        soft.iter().map(|s| s / rms).collect()
    } else {
        soft
    }
}

/// Matched-filter value of every chip from a folded tile with the tile's origin at `(dy, dx)`.
fn read_chips(folded: &[f64], dy: usize, dx: usize) -> [f64; CHIPS] {
    // Bins around a chip centre: offsets -R/2 .. R + R/2 from the chip's first bin.
    let offs: Vec<(i64, f64)> = (-(R as i64) / 2..(R + R / 2) as i64)
        .map(|m| (m, pattern::kernel((m as f64 + 0.5) / R as f64 - 0.5)))
        .collect();
    let mut chip_val = [0f64; CHIPS];
    for (c, v) in chip_val.iter_mut().enumerate() {
        let (cy, cx) = (c / TILE, c % TILE);
        let mut s = 0.0;
        for &(my, ky) in &offs {
            let yy = ((cy * R + dy) as i64 + my).rem_euclid(N as i64) as usize;
            for &(mx, kx) in &offs {
                let xx = ((cx * R + dx) as i64 + mx).rem_euclid(N as i64) as usize;
                s += folded[yy * N + xx] * ky * kx;
            }
        }
        *v = s;
    }
    chip_val
}

/// Standard normal upper tail `Q(z) = P(Z > z)`.
pub(crate) fn normal_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Raw coded-bit errors of the QIM carrier for payload `id` at a grid (`(origin x, origin y,
/// cell px)`; default the corner at scale 1): per frame (the first 16), and of their mean: for
/// development probes only.
#[doc(hidden)]
pub fn qim_raw_errors(
    frames: &[Frame],
    key: &Key,
    id: u64,
    params: &QimParams,
    grid: Option<(f64, f64, f64)>,
) -> (Vec<usize>, usize) {
    let (w, h) = (frames[0].width(), frames[0].height());
    let (ox, oy, cell) = grid.unwrap_or((0.0, 0.0, qim::cell_px(w, h)));
    let g = Grid { ox, oy, cell };
    let layout = QimLayout::new(key);
    let code = ecc::encode(&pattern::payload_bits(id));
    let errs = |soft: &[f64]| {
        soft.iter()
            .zip(&code)
            .filter(|(&s, &c)| (s > 0.0) != c)
            .count()
    };
    let mut mean = vec![0f64; CODED_BITS];
    let mut per = Vec::new();
    for f in frames.iter().take(QIM_FRAMES) {
        let s = qim::read(
            &qim::luma_f32(f.data()),
            &qim::frame_shaping(f, params),
            w as usize,
            h as usize,
            g,
            &layout,
            params,
        )
        .0;
        per.push(errs(&s));
        for (m, x) in mean.iter_mut().zip(&s) {
            *m += x;
        }
    }
    (per, errs(&mean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_values() {
        assert!((normal_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_tail(3.0) - 1.349_898e-3).abs() < 1e-8);
        assert!((normal_tail(6.0) - 9.865_876e-10).abs() < 1e-15);
    }
}
