//! The shapes-world pixel analyser: what a clip of the "kino-shapes" world shows.
//!
//! The world (see `kino-eval.json` in the model folder) is one filled, anti-aliased shape
//! (circle, axis-aligned square, or isosceles triangle with its apex up) of 18–26 px, moving in a
//! straight line at constant speed on one flat background colour. [`analyse`] recovers, from RGB
//! frames alone:
//!
//! - **background**: the per-channel median of a 2-px border over all frames → the nearest
//!   background of the palette;
//! - **object**: per frame, the pixels whose RGB distance from that background exceeds a
//!   threshold (half of the frame's 99th-percentile distance, at least 40), largest 8-connected
//!   component only (so specks of noise are ignored); frames whose component is tiny have none;
//! - **colour**: the per-channel median of the component pixels farthest from the background
//!   (the interior, not the anti-aliased rim) over all frames → the nearest palette colour. The
//!   mask is then recomputed at half the measured object/background contrast, which puts its edge
//!   where the anti-aliased shape's edge is;
//! - **motion**: the least-squares slope of the mask centroid over time, times the clip length,
//!   gives the displacement (dx, dy) in pixels (image y grows downward); the dominant axis and its
//!   sign name the motion, "none" under [`MIN_DISPLACEMENT`] px. When the spec's motions include
//!   [`DIAGONAL`] ("diagonally": up and to the right, the kino-shapes concept adapter's motion), a
//!   displacement within 22.5° of (1, −1) is that instead (halfway to the neighbouring axes);
//! - **shape**: two medians over frames: `fill` = object area / bounding-box area (≈1 square,
//!   ≈π/4 circle, ≈½ triangle), measured on coverage (distance / contrast) rather than on the
//!   mask, so that blur, which rounds a thresholded square's corners, leaves it alone; and
//!   `taper` = mask area in the top half of the bounding box / area in the bottom half (≈1 for
//!   circle and square, ≈⅓ for an apex-up triangle; blur changes it little). Taper under
//!   [`TRIANGLE_TAPER`] or fill under [`TRIANGLE_FILL`] is a triangle; else fill from
//!   [`SQUARE_FILL`] up is a square, and below it a circle. (Measured on rendered clips with blur
//!   σ ≤ 1.6 px and noise σ ≤ 16: fill circle 0.78–0.87, square 0.96–1.03; taper triangle
//!   0.33–0.62, circle and square 0.88–1.15.)
//!
//! Colour, shape and motion are "none" when no object is found in at least half the frames.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};

/// What the analyser reports for an attribute it cannot see.
pub const NONE: &str = "none";
/// The shapes the analyser can tell apart.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// The motions the analyser can tell apart (image y grows downward: "down" is +y).
pub const MOTIONS: [&str; 4] = ["left", "right", "up", "down"];
/// A motion the analyser also tells apart when a spec lists it: up and to the right at 45°.
pub const DIAGONAL: &str = "diagonally";
/// Below this displacement (px over the clip) the motion is "none".
pub const MIN_DISPLACEMENT: f64 = 4.0;
/// Taper (top-half area / bottom-half area) under which a shape is a triangle.
pub const TRIANGLE_TAPER: f64 = 0.75;
/// Fill (area / bounding box) under which a shape is a triangle.
pub const TRIANGLE_FILL: f64 = 0.64;
/// Fill from which a (not tapered) shape is a square rather than a circle.
pub const SQUARE_FILL: f64 = 0.91;
/// The smallest object threshold (RGB distance from the background).
const MIN_THRESHOLD: f32 = 40.0;
/// Width of the border the background is measured on, in pixels.
const BORDER: usize = 2;

/// One held-out prompt and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Case {
    pub prompt: String,
    pub colour: String,
    pub shape: String,
    pub motion: String,
    pub background: String,
}

impl Case {
    /// The asked-for value of an attribute ("colour", "shape", "motion", "background").
    pub fn get(&self, attribute: &str) -> &str {
        match attribute {
            "colour" => &self.colour,
            "shape" => &self.shape,
            "motion" => &self.motion,
            "background" => &self.background,
            _ => NONE,
        }
    }
}

/// `kino-eval.json`: the world's palette and names, and the held-out cases.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalSpec {
    /// Object colours by name, RGB.
    pub colours: BTreeMap<String, [u8; 3]>,
    /// Background colours by name, RGB.
    pub backgrounds: BTreeMap<String, [u8; 3]>,
    #[serde(default = "default_shapes")]
    pub shapes: Vec<String>,
    #[serde(default = "default_motions")]
    pub motions: Vec<String>,
    #[serde(default)]
    pub cases: Vec<Case>,
    /// The world's object sizes and travel (where `kino eval --image` places its first images).
    #[serde(default)]
    pub world: WorldSpec,
}

/// `"world"` in `kino-eval.json`: pixel ranges at 64×64 (training/world.py's `SIZE_RANGE` and
/// `TRAVEL_RANGE`); older files without it get the current world's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorldSpec {
    /// Object size (circle diameter, square side, triangle base = height), pixels.
    pub size_range: [f64; 2],
    /// Travel over the whole clip, pixels.
    pub travel_range: [f64; 2],
}

impl Default for WorldSpec {
    fn default() -> Self {
        Self {
            size_range: [18.0, 26.0],
            travel_range: [12.0, 36.0],
        }
    }
}

fn default_shapes() -> Vec<String> {
    SHAPES.map(String::from).to_vec()
}

fn default_motions() -> Vec<String> {
    MOTIONS.map(String::from).to_vec()
}

impl EvalSpec {
    /// Parses and checks a `kino-eval.json` text; errors say what to fix.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let spec: EvalSpec = serde_json::from_str(text).context(
            "expected {\"colours\": {NAME: [R, G, B], …}, \"backgrounds\": {…}, \"shapes\": […], \
             \"motions\": […], \"cases\": [{\"prompt\", \"colour\", \"shape\", \"motion\", \"background\"}, …]}",
        )?;
        spec.check()?;
        Ok(spec)
    }

    /// Reads and checks a `kino-eval.json` file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text)
            .with_context(|| format!("{} is not a valid kino-eval.json", path.display()))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.colours.is_empty() {
            bail!("\"colours\" is empty; list the object colours, e.g. \"red\": [220, 40, 40]");
        }
        if self.backgrounds.is_empty() {
            bail!(
                "\"backgrounds\" is empty; list the background colours, e.g. \"black\": [0, 0, 0]"
            );
        }
        for (what, names, known) in [
            ("shape", &self.shapes, &SHAPES[..]),
            (
                "motion",
                &self.motions,
                &[&MOTIONS[..], &[DIAGONAL]].concat()[..],
            ),
        ] {
            if let Some(n) = names.iter().find(|n| !known.contains(&n.as_str())) {
                bail!(
                    "{what} `{n}` is not one the analyser can recognise; use {}",
                    known.join(", ")
                );
            }
        }
        for (i, c) in self.cases.iter().enumerate() {
            let at = || format!("case {} ({:?})", i + 1, c.prompt);
            if c.prompt.trim().is_empty() {
                bail!("{} has an empty prompt", at());
            }
            let check = |what: &str, plural: &str, name: &str, known: Vec<&str>| {
                if known.contains(&name) {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "{} names {what} `{name}`, which is not in \"{plural}\"; use one of {}",
                        at(),
                        known.join(", ")
                    ))
                }
            };
            check(
                "colour",
                "colours",
                &c.colour,
                self.colours.keys().map(|s| s.as_str()).collect(),
            )?;
            check(
                "background",
                "backgrounds",
                &c.background,
                self.backgrounds.keys().map(|s| s.as_str()).collect(),
            )?;
            check(
                "shape",
                "shapes",
                &c.shape,
                self.shapes.iter().map(|s| s.as_str()).collect(),
            )?;
            check(
                "motion",
                "motions",
                &c.motion,
                self.motions.iter().map(|s| s.as_str()).collect(),
            )?;
        }
        Ok(())
    }
}

/// What [`analyse`] saw in a clip: the four attributes (palette names, or "none") and the raw
/// measures they were decided from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Analysis {
    pub colour: String,
    pub shape: String,
    pub motion: String,
    pub background: String,
    /// Displacement over the clip in pixels, +x right.
    pub dx: f64,
    /// Displacement over the clip in pixels, +y down.
    pub dy: f64,
    /// Median over frames of mask area / bounding-box area.
    pub fill: f64,
    /// Measured object colour (`None` when no object was found).
    pub rgb: Option<[u8; 3]>,
    /// Median over frames of mask area in the top half of the bounding box / in the bottom half.
    pub taper: f64,
    /// Measured background colour.
    pub background_rgb: [u8; 3],
    /// Median object size: the larger side of the bounding box, in pixels.
    pub size: f64,
    /// Frames in which an object was found.
    pub frames_with_object: usize,
}

impl Analysis {
    /// The detected value of an attribute ("colour", "shape", "motion", "background").
    pub fn get(&self, attribute: &str) -> &str {
        match attribute {
            "colour" => &self.colour,
            "shape" => &self.shape,
            "motion" => &self.motion,
            "background" => &self.background,
            _ => NONE,
        }
    }
}

/// The mask measures of one frame's object.
struct Blob {
    cx: f64,
    cy: f64,
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
    top: f64,
    bottom: f64,
    /// Soft area / (soft width · soft height), see [`soft_fill`].
    fill: f64,
}

/// Analyses RGB frames (each `w·h·3` bytes, row-major) against the palette of `spec`.
pub fn analyse<F: AsRef<[u8]>>(
    frames: &[F],
    w: usize,
    h: usize,
    spec: &EvalSpec,
) -> anyhow::Result<Analysis> {
    if frames.is_empty() {
        bail!("the video has no frames");
    }
    if w < 2 * BORDER + 1 || h < 2 * BORDER + 1 {
        bail!("frames of {w}x{h} are too small to analyse; need at least 5x5");
    }
    for (i, f) in frames.iter().enumerate() {
        if f.as_ref().len() != w * h * 3 {
            bail!(
                "frame {i} has {} bytes; a {w}x{h} RGB frame has {}",
                f.as_ref().len(),
                w * h * 3
            );
        }
    }
    let n = frames.len();

    // Background: per-channel median of the border over all frames.
    let mut border: [Vec<u8>; 3] = Default::default();
    for f in frames {
        let f = f.as_ref();
        for y in 0..h {
            for x in 0..w {
                if x < BORDER || y < BORDER || x >= w - BORDER || y >= h - BORDER {
                    let p = &f[(y * w + x) * 3..][..3];
                    for c in 0..3 {
                        border[c].push(p[c]);
                    }
                }
            }
        }
    }
    let bg = border.map(|mut v| median_u8(&mut v));
    let background = nearest(&spec.backgrounds, bg);

    // Distance of every pixel from the background.
    let bgf = bg.map(f32::from);
    let dist: Vec<Vec<f32>> = frames
        .iter()
        .map(|f| {
            f.as_ref()
                .chunks_exact(3)
                .map(|p| {
                    let d: f32 = (0..3).map(|c| (f32::from(p[c]) - bgf[c]).powi(2)).sum();
                    d.sqrt()
                })
                .collect()
        })
        .collect();
    let min_area = (w * h / 500).max(8);

    // Pass 1: an adaptive threshold per frame; the object's interior colour.
    let mut interior: [Vec<u8>; 3] = Default::default();
    let mut found = 0;
    for (f, d) in frames.iter().zip(&dist) {
        let thr = (0.5 * percentile(d, 0.99)).max(MIN_THRESHOLD);
        let Some(pixels) = largest_component(d, w, h, thr) else {
            continue;
        };
        if pixels.len() < min_area {
            continue;
        }
        found += 1;
        let ds: Vec<f32> = pixels.iter().map(|&i| d[i]).collect();
        let mid = percentile(&ds, 0.5);
        for &i in pixels.iter().filter(|&&i| d[i] >= mid) {
            for (c, channel) in interior.iter_mut().enumerate() {
                channel.push(f.as_ref()[i * 3 + c]);
            }
        }
    }
    let none = |frames_with_object| Analysis {
        colour: NONE.into(),
        shape: NONE.into(),
        motion: NONE.into(),
        background: background.clone(),
        dx: 0.0,
        dy: 0.0,
        fill: 0.0,
        rgb: None,
        taper: 0.0,
        background_rgb: bg,
        size: 0.0,
        frames_with_object,
    };
    if found == 0 || 2 * found < n {
        return Ok(none(found));
    }
    let rgb = interior.map(|mut v| median_u8(&mut v));
    let colour = nearest(&spec.colours, rgb);

    // Pass 2: the mask at half the object/background contrast (the anti-aliased edge).
    let contrast: f32 = (0..3)
        .map(|c| (f32::from(rgb[c]) - bgf[c]).powi(2))
        .sum::<f32>()
        .sqrt();
    let thr = (0.5 * contrast).max(MIN_THRESHOLD * 0.5);
    // The noise level: the median distance of border pixels from the background.
    let mut border_dist: Vec<f32> = Vec::new();
    for d in &dist {
        for y in 0..h {
            for x in 0..w {
                if x < BORDER || y < BORDER || x >= w - BORDER || y >= h - BORDER {
                    border_dist.push(d[y * w + x]);
                }
            }
        }
    }
    let floor = percentile(&border_dist, 0.5).min(0.5 * thr);
    let mut blobs: Vec<(usize, Blob)> = Vec::new();
    for (t, d) in dist.iter().enumerate() {
        let Some(pixels) = largest_component(d, w, h, thr) else {
            continue;
        };
        if pixels.len() >= min_area {
            let mut b = measure(&pixels, w);
            b.fill = soft_fill(d, w, h, &b, floor, contrast);
            blobs.push((t, b));
        }
    }
    if blobs.len() < 2 || 2 * blobs.len() < n {
        return Ok(none(blobs.len()));
    }

    // Motion: least-squares slope of the centroid over time.
    let ts: Vec<f64> = blobs.iter().map(|(t, _)| *t as f64).collect();
    let dx = slope(&ts, &blobs.iter().map(|(_, b)| b.cx).collect::<Vec<_>>()) * (n - 1) as f64;
    let dy = slope(&ts, &blobs.iter().map(|(_, b)| b.cy).collect::<Vec<_>>()) * (n - 1) as f64;
    // cos 22.5°: the displacement's angle to (1, −1) is under 22.5°.
    let diagonal = spec.motions.iter().any(|m| m == DIAGONAL)
        && (dx - dy) / (std::f64::consts::SQRT_2 * dx.hypot(dy)) > 0.923_879_532_5;
    let motion = if dx.abs().max(dy.abs()) < MIN_DISPLACEMENT {
        NONE
    } else if diagonal {
        DIAGONAL
    } else if dx.abs() >= dy.abs() {
        if dx > 0.0 {
            "right"
        } else {
            "left"
        }
    } else if dy > 0.0 {
        "down"
    } else {
        "up"
    };

    // Shape: fill and taper.
    let mut fills: Vec<f64> = blobs.iter().map(|(_, b)| b.fill).collect();
    let mut tapers: Vec<f64> = blobs
        .iter()
        .map(|(_, b)| b.top / b.bottom.max(1.0))
        .collect();
    let mut sizes: Vec<f64> = blobs
        .iter()
        .map(|(_, b)| (b.x1 - b.x0 + 1).max(b.y1 - b.y0 + 1) as f64)
        .collect();
    let fill = median_f64(&mut fills);
    let taper = median_f64(&mut tapers);
    let shape = if taper < TRIANGLE_TAPER || fill < TRIANGLE_FILL {
        "triangle"
    } else if fill >= SQUARE_FILL {
        "square"
    } else {
        "circle"
    };

    Ok(Analysis {
        colour,
        shape: shape.into(),
        motion: motion.into(),
        background,
        dx,
        dy,
        fill,
        rgb: Some(rgb),
        taper,
        background_rgb: bg,
        size: median_f64(&mut sizes),
        frames_with_object: blobs.len(),
    })
}

/// The object's centre in one RGB frame (`w·h·3` bytes), +x right, +y down, pixels from the
/// top-left corner; `None` when the frame shows no object. Measured as [`analyse`] measures each
/// frame: the background from the border, the largest component over the adaptive threshold,
/// its interior colour, then the centroid of the mask at half the object/background contrast.
pub fn object_centre(frame: &[u8], w: usize, h: usize) -> Option<[f64; 2]> {
    if w < 2 * BORDER + 1 || h < 2 * BORDER + 1 || frame.len() != w * h * 3 {
        return None;
    }
    let mut border: [Vec<u8>; 3] = Default::default();
    for y in 0..h {
        for x in 0..w {
            if x < BORDER || y < BORDER || x >= w - BORDER || y >= h - BORDER {
                for (c, channel) in border.iter_mut().enumerate() {
                    channel.push(frame[(y * w + x) * 3 + c]);
                }
            }
        }
    }
    let bgf = border.map(|mut v| f32::from(median_u8(&mut v)));
    let dist = |p: &[u8]| -> f32 {
        (0..3)
            .map(|c| (f32::from(p[c]) - bgf[c]).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let d: Vec<f32> = frame.chunks_exact(3).map(dist).collect();
    let min_area = (w * h / 500).max(8);
    let thr = (0.5 * percentile(&d, 0.99)).max(MIN_THRESHOLD);
    let pixels = largest_component(&d, w, h, thr).filter(|p| p.len() >= min_area)?;
    let ds: Vec<f32> = pixels.iter().map(|&i| d[i]).collect();
    let mid = percentile(&ds, 0.5);
    let mut interior: [Vec<u8>; 3] = Default::default();
    for &i in pixels.iter().filter(|&&i| d[i] >= mid) {
        for (c, channel) in interior.iter_mut().enumerate() {
            channel.push(frame[i * 3 + c]);
        }
    }
    let rgb = interior.map(|mut v| median_u8(&mut v));
    let contrast = dist(&rgb);
    let thr = (0.5 * contrast).max(MIN_THRESHOLD * 0.5);
    let pixels = largest_component(&d, w, h, thr).filter(|p| p.len() >= min_area)?;
    let b = measure(&pixels, w);
    Some([b.cx, b.cy])
}

/// The palette name nearest to `rgb` (Euclidean RGB distance; ties go to the first name).
fn nearest(palette: &BTreeMap<String, [u8; 3]>, rgb: [u8; 3]) -> String {
    let d = |p: &[u8; 3]| -> i32 {
        (0..3)
            .map(|c| (i32::from(p[c]) - i32::from(rgb[c])).pow(2))
            .sum()
    };
    palette
        .iter()
        .min_by_key(|(_, p)| d(p))
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| NONE.into())
}

fn median_u8(v: &mut [u8]) -> u8 {
    if v.is_empty() {
        return 0;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable(mid).1
}

fn median_f64(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// The `q`-quantile (0..1) of `v` (nearest rank), reordering a copy.
fn percentile(v: &[f32], q: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    let k = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

/// Pixel indices of the largest 8-connected region with `d > thr`, if any.
fn largest_component(d: &[f32], w: usize, h: usize, thr: f32) -> Option<Vec<usize>> {
    let mut seen = vec![false; d.len()];
    let mut best: Option<Vec<usize>> = None;
    let mut stack = Vec::new();
    for start in 0..d.len() {
        if seen[start] || d[start] <= thr {
            continue;
        }
        let mut region = Vec::new();
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for (ox, oy) in [
                (-1, -1),
                (0, -1),
                (1, -1),
                (-1, 0),
                (1, 0),
                (-1, 1),
                (0, 1),
                (1, 1),
            ] {
                let (nx, ny) = (x + ox, y + oy);
                if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if !seen[j] && d[j] > thr {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if best.as_ref().is_none_or(|b| region.len() > b.len()) {
            best = Some(region);
        }
    }
    best
}

/// Area, centroid, bounding box and top/bottom-half areas of a non-empty region.
fn measure(pixels: &[usize], w: usize) -> Blob {
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    let (mut sx, mut sy) = (0.0, 0.0);
    for &i in pixels {
        let (x, y) = (i % w, i / w);
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
    }
    let area = pixels.len();
    // Rows above / below the box's middle; a row straddling it counts half to each.
    let mid = (y0 + y1 + 1) as f64 / 2.0;
    let (mut top, mut bottom) = (0.0, 0.0);
    for &i in pixels {
        let yc = (i / w) as f64 + 0.5;
        if yc < mid {
            top += 1.0;
        } else if yc > mid {
            bottom += 1.0;
        } else {
            top += 0.5;
            bottom += 0.5;
        }
    }
    Blob {
        cx: sx / area as f64,
        cy: sy / area as f64,
        x0,
        x1,
        y0,
        y1,
        top,
        bottom,
        fill: area as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64,
    }
}

/// Margin around a blob's mask box that [`soft_fill`] looks at (blur spreads an edge this far).
const SOFT_MARGIN: usize = 2;

/// Area / bounding box measured on coverage rather than on a thresholded mask, so blur (which
/// rounds a square's thresholded corners) hardly changes it. Coverage of a pixel =
/// `(distance − floor) / (contrast − floor)` clamped to 0..1 (an anti-aliased or blurred pixel
/// that is α object has distance α·contrast); area = Σ coverage; width = the largest row sum of
/// coverage (the widest chord: a blurred edge keeps its sum), height = the largest column sum;
/// all within the mask box plus [`SOFT_MARGIN`]. (Sums rather than per-column maxima keep pixel
/// noise from inflating the box.)
fn soft_fill(d: &[f32], w: usize, h: usize, b: &Blob, floor: f32, contrast: f32) -> f64 {
    let x0 = b.x0.saturating_sub(SOFT_MARGIN);
    let y0 = b.y0.saturating_sub(SOFT_MARGIN);
    let x1 = (b.x1 + SOFT_MARGIN).min(w - 1);
    let y1 = (b.y1 + SOFT_MARGIN).min(h - 1);
    let span = (contrast - floor).max(1.0);
    let mut col_sum = vec![0.0f64; x1 - x0 + 1];
    let mut row_sum = vec![0.0f64; y1 - y0 + 1];
    for y in y0..=y1 {
        for x in x0..=x1 {
            let c = f64::from(((d[y * w + x] - floor) / span).clamp(0.0, 1.0));
            col_sum[x - x0] += c;
            row_sum[y - y0] += c;
        }
    }
    let area: f64 = row_sum.iter().sum();
    let width = row_sum.iter().copied().fold(0.0, f64::max);
    let height = col_sum.iter().copied().fold(0.0, f64::max);
    if width * height > 0.0 {
        area / (width * height)
    } else {
        0.0
    }
}

/// Least-squares slope of `y` against `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A palette like the shapes world's.
    pub(crate) fn spec() -> EvalSpec {
        EvalSpec::parse(
            r#"{
              "colours": {"red": [220, 40, 40], "green": [40, 180, 60], "blue": [50, 90, 230],
                          "yellow": [235, 215, 40], "purple": [150, 60, 200], "orange": [245, 140, 30]},
              "backgrounds": {"black": [0, 0, 0], "white": [255, 255, 255], "gray": [128, 128, 128]},
              "shapes": ["circle", "square", "triangle"],
              "motions": ["left", "right", "up", "down"],
              "cases": [{"prompt": "a red circle moving right on a black background",
                         "colour": "red", "shape": "circle", "motion": "right", "background": "black"}]
            }"#,
        )
        .unwrap()
    }

    /// A small deterministic generator (xorshift) for test noise.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Roughly normal, unit variance.
        fn normal(&mut self) -> f64 {
            (0..12).map(|_| self.next()).sum::<f64>() - 6.0
        }
    }

    /// Whether (x, y) is inside a shape of `size` centred at (cx, cy).
    fn inside(shape: &str, size: f64, cx: f64, cy: f64, x: f64, y: f64) -> bool {
        let r = size / 2.0;
        match shape {
            "circle" => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            "square" => (x - cx).abs() <= r && (y - cy).abs() <= r,
            // Apex at the top centre, base at the bottom: width = height = size.
            "triangle" => {
                let top = cy - r;
                y >= top && y <= cy + r && (x - cx).abs() <= (y - top) / 2.0
            }
            _ => false,
        }
    }

    pub(crate) struct Clip {
        pub shape: &'static str,
        pub colour: [u8; 3],
        pub background: [u8; 3],
        pub motion: &'static str,
        pub size: f64,
        pub displacement: f64,
        pub blur: f64,
        pub noise: f64,
        pub seed: u64,
    }

    /// Renders a clip of the world: anti-aliased (4×4 supersampling), then optional Gaussian
    /// blur and Gaussian noise. `w × h`, 17 frames.
    pub(crate) fn render(c: &Clip, w: usize, h: usize) -> Vec<Vec<u8>> {
        let n = 17;
        let mut rng = Rng(c.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let r = c.size / 2.0;
        let (ux, uy) = match c.motion {
            "left" => (-1.0, 0.0),
            "right" => (1.0, 0.0),
            "up" => (0.0, -1.0),
            "down" => (0.0, 1.0),
            DIAGONAL => (
                std::f64::consts::FRAC_1_SQRT_2,
                -std::f64::consts::FRAC_1_SQRT_2,
            ),
            _ => (0.0, 0.0),
        };
        // A start point that keeps the whole path inside the frame (1 px margin).
        let mut span = |len: f64, u: f64| {
            let lo = r + 1.0 - (u * c.displacement).min(0.0);
            let hi = len - r - 1.0 - (u * c.displacement).max(0.0);
            lo + (hi - lo) * rng.next()
        };
        let (sx, sy) = (span(w as f64, ux), span(h as f64, uy));
        let mut frames = Vec::new();
        for t in 0..n {
            let k = t as f64 / (n - 1) as f64 * c.displacement;
            let (cx, cy) = (sx + ux * k, sy + uy * k);
            let mut cov = vec![0.0f64; w * h];
            for y in 0..h {
                for x in 0..w {
                    let (fx, fy) = (x as f64, y as f64);
                    if fx + 1.0 < cx - r || fx > cx + r || fy + 1.0 < cy - r || fy > cy + r {
                        continue;
                    }
                    let mut hits = 0;
                    for j in 0..4 {
                        for i in 0..4 {
                            let px = fx + (i as f64 + 0.5) / 4.0;
                            let py = fy + (j as f64 + 0.5) / 4.0;
                            hits += inside(c.shape, c.size, cx, cy, px, py) as u32;
                        }
                    }
                    cov[y * w + x] = hits as f64 / 16.0;
                }
            }
            if c.blur > 0.0 {
                cov = blur(&cov, w, h, c.blur);
            }
            let mut f = Vec::with_capacity(w * h * 3);
            for a in cov {
                for ch in 0..3 {
                    let v = f64::from(c.background[ch]) * (1.0 - a)
                        + f64::from(c.colour[ch]) * a
                        + c.noise * rng.normal();
                    f.push(v.round().clamp(0.0, 255.0) as u8);
                }
            }
            frames.push(f);
        }
        frames
    }

    fn blur(v: &[f64], w: usize, h: usize, sigma: f64) -> Vec<f64> {
        let rad = (3.0 * sigma).ceil() as isize;
        let k: Vec<f64> = (-rad..=rad)
            .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
            .collect();
        let ks: f64 = k.iter().sum();
        let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
            let mut out = vec![0.0; w * h];
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let mut s = 0.0;
                    for (o, kv) in (-rad..=rad).zip(&k) {
                        let (xx, yy) = if horizontal { (x + o, y) } else { (x, y + o) };
                        if xx >= 0 && yy >= 0 && xx < w as isize && yy < h as isize {
                            s += kv * src[yy as usize * w + xx as usize];
                        }
                    }
                    out[y as usize * w + x as usize] = s / ks;
                }
            }
            out
        };
        pass(&pass(v, true), false)
    }

    #[test]
    fn recovers_every_shape_colour_motion_and_background() {
        let spec = spec();
        let colours: Vec<(&String, &[u8; 3])> = spec.colours.iter().collect();
        let mut misses = Vec::new();
        let mut k = 0u64;
        for shape in SHAPES {
            for motion in MOTIONS {
                for (bg_name, bg) in &spec.backgrounds {
                    for degrade in [false, true] {
                        k += 1;
                        let (colour_name, colour) = colours[k as usize % colours.len()];
                        let clip = Clip {
                            shape,
                            colour: *colour,
                            background: *bg,
                            motion,
                            size: 12.0 + (k * 7 % 15) as f64,
                            displacement: 12.0 + (k * 5 % 25) as f64,
                            blur: if degrade { 0.8 } else { 0.0 },
                            noise: if degrade { 8.0 } else { 0.0 },
                            seed: k,
                        };
                        let frames = render(&clip, 64, 64);
                        let a = analyse(&frames, 64, 64, &spec).unwrap();
                        let want = [colour_name.as_str(), shape, motion, bg_name.as_str()];
                        let got = [&a.colour, &a.shape, &a.motion, &a.background];
                        if want.iter().zip(got).any(|(w, g)| *w != g) {
                            misses.push(format!(
                                "size {} blur {} noise {}: want {want:?}, got {a:?}",
                                clip.size, clip.blur, clip.noise
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            misses.is_empty(),
            "{} of {k} missed:\n{}",
            misses.len(),
            misses.join("\n")
        );
    }

    #[test]
    fn shape_measures_keep_clear_of_the_thresholds() {
        // fill: circle ≈ π/4, square ≈ 1; taper: triangle ≈ ⅓, circle and square ≈ 1; over
        // sizes, sub-pixel positions, palettes, blur and noise.
        let spec = spec();
        let mut bad = Vec::new();
        for shape in SHAPES {
            for (blur, noise) in [(0.0, 0.0), (1.6, 0.0), (0.0, 16.0), (1.2, 12.0)] {
                for size in [12.0, 16.5, 22.0, 26.0] {
                    for seed in 0..2 {
                        for (bg, colour) in [
                            ([0u8, 0, 0], [220u8, 40, 40]),
                            ([128, 128, 128], [40, 180, 60]),
                            ([255, 255, 255], [50, 90, 230]),
                        ] {
                            let clip = Clip {
                                shape,
                                colour,
                                background: bg,
                                motion: "right",
                                size,
                                displacement: 20.0,
                                blur,
                                noise,
                                seed,
                            };
                            let a = analyse(&render(&clip, 64, 64), 64, 64, &spec).unwrap();
                            let ok = match shape {
                                "circle" => {
                                    a.fill < SQUARE_FILL - 0.02 && a.taper > TRIANGLE_TAPER + 0.1
                                }
                                "square" => {
                                    a.fill > SQUARE_FILL + 0.03 && a.taper > TRIANGLE_TAPER + 0.1
                                }
                                _ => a.taper < TRIANGLE_TAPER - 0.1,
                            };
                            if !ok {
                                bad.push(format!(
                                    "{shape} size {size} blur {blur} noise {noise} on {bg:?}: fill {:.3} taper {:.3}",
                                    a.fill, a.taper
                                ));
                            }
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn measures_are_in_pixels() {
        let spec = spec();
        let frames = render(
            &Clip {
                shape: "square",
                colour: [220, 40, 40],
                background: [0, 0, 0],
                motion: "up",
                size: 20.0,
                displacement: 24.0,
                blur: 0.0,
                noise: 0.0,
                seed: 3,
            },
            64,
            64,
        );
        let a = analyse(&frames, 64, 64, &spec).unwrap();
        assert!((a.dy + 24.0).abs() < 1.0 && a.dx.abs() < 0.5, "{a:?}");
        assert!(a.fill > 0.9 && (a.taper - 1.0).abs() < 0.1, "{a:?}");
        assert!((a.size - 20.0).abs() <= 1.0, "{a:?}");
        assert_eq!(a.rgb, Some([220, 40, 40]));
        assert_eq!((a.background_rgb, a.frames_with_object), ([0, 0, 0], 17));
    }

    #[test]
    fn heavy_blur_and_noise_still_read() {
        // Blurrier and noisier than a well-trained model's output should be.
        let spec = spec();
        for (i, shape) in SHAPES.iter().enumerate() {
            let frames = render(
                &Clip {
                    shape,
                    colour: [40, 180, 60],
                    background: [128, 128, 128],
                    motion: "left",
                    size: 16.0,
                    displacement: 20.0,
                    blur: 1.2,
                    noise: 12.0,
                    seed: 40 + i as u64,
                },
                64,
                64,
            );
            let a = analyse(&frames, 64, 64, &spec).unwrap();
            assert_eq!(
                (
                    a.colour.as_str(),
                    a.shape.as_str(),
                    a.motion.as_str(),
                    a.background.as_str()
                ),
                ("green", *shape, "left", "gray"),
                "{a:?}"
            );
        }
    }

    #[test]
    fn diagonal_motion_is_told_apart_only_when_the_spec_lists_it() {
        let axes = spec();
        let mut with = spec();
        with.motions.push(DIAGONAL.into());
        for (motion, seed) in [(DIAGONAL, 3), ("right", 4), ("up", 5)] {
            let frames = render(
                &Clip {
                    shape: "square",
                    colour: [220, 40, 40],
                    background: [0, 0, 0],
                    motion,
                    size: 20.0,
                    displacement: 24.0,
                    blur: 0.8,
                    noise: 4.0,
                    seed,
                },
                64,
                64,
            );
            let a = analyse(&frames, 64, 64, &with).unwrap();
            assert_eq!(a.motion, motion, "{a:?}");
            // Without "diagonally" in the spec: one of the axes, as before.
            let b = analyse(&frames, 64, 64, &axes).unwrap();
            assert!(MOTIONS.contains(&b.motion.as_str()), "{b:?}");
        }
        let e = EvalSpec::parse(r#"{"colours": {"red": [220, 40, 40]}, "backgrounds": {"black": [0, 0, 0]}, "motions": ["sideways"], "cases": []}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("diagonally"), "{e}");
    }

    #[test]
    fn a_still_object_has_no_motion_and_a_flat_clip_has_no_object() {
        let spec = spec();
        let frames = render(
            &Clip {
                shape: "circle",
                colour: [50, 90, 230],
                background: [255, 255, 255],
                motion: "right",
                size: 18.0,
                displacement: 1.0,
                blur: 0.0,
                noise: 2.0,
                seed: 9,
            },
            64,
            64,
        );
        let a = analyse(&frames, 64, 64, &spec).unwrap();
        assert_eq!((a.colour.as_str(), a.shape.as_str()), ("blue", "circle"));
        assert_eq!(a.motion, NONE, "{a:?}");

        for (bg, name) in [([0u8, 0, 0], "black"), ([128, 128, 128], "gray")] {
            let mut rng = Rng(5);
            let flat: Vec<Vec<u8>> = (0..17)
                .map(|_| {
                    (0..64 * 64 * 3)
                        .map(|i| {
                            (f64::from(bg[i % 3]) + 6.0 * rng.normal()).clamp(0.0, 255.0) as u8
                        })
                        .collect()
                })
                .collect();
            let a = analyse(&flat, 64, 64, &spec).unwrap();
            assert_eq!(
                (
                    a.colour.as_str(),
                    a.shape.as_str(),
                    a.motion.as_str(),
                    a.background.as_str()
                ),
                (NONE, NONE, NONE, name),
                "{a:?}"
            );
            assert_eq!((a.rgb, a.frames_with_object), (None, 0));
        }
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let spec = spec();
        let e = analyse(&[vec![0u8; 10]], 64, 64, &spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("frame 0 has 10 bytes") && e.contains("12288"),
            "{e}"
        );
        let e = analyse::<Vec<u8>>(&[], 64, 64, &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no frames"), "{e}");
        let e = analyse(&[vec![0u8; 12]], 2, 2, &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn spec_errors_say_what_to_fix() {
        let base = serde_json::to_value(spec()).unwrap();
        let err = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base.clone();
            edit(&mut v);
            format!("{:#}", EvalSpec::parse(&v.to_string()).unwrap_err())
        };
        let e = err(&|v| v["cases"][0]["colour"] = "pink".into());
        assert!(
            e.contains("case 1") && e.contains("colour `pink`") && e.contains("red"),
            "{e}"
        );
        let e = err(&|v| v["cases"][0]["motion"] = "spin".into());
        assert!(e.contains("motion `spin`") && e.contains("left"), "{e}");
        let e = err(&|v| v["shapes"][0] = "star".into());
        assert!(e.contains("shape `star`") && e.contains("triangle"), "{e}");
        let e = err(&|v| v["colours"]["red"] = serde_json::json!([300, 0, 0]));
        assert!(e.contains("300") && e.contains("u8"), "{e}");
        let e = err(&|v| v["backgrounds"] = serde_json::json!({}));
        assert!(e.contains("\"backgrounds\" is empty"), "{e}");
        let e = err(&|v| v["cases"][0]["prompt"] = " ".into());
        assert!(e.contains("empty prompt"), "{e}");
        let e = format!("{:#}", EvalSpec::parse("{").unwrap_err());
        assert!(e.contains("expected {\"colours\""), "{e}");
        // Shapes and motions may be left out; cases too (enough for --video).
        let s = EvalSpec::parse(
            r#"{"colours": {"red": [255, 0, 0]}, "backgrounds": {"black": [0, 0, 0]}}"#,
        )
        .unwrap();
        assert_eq!((s.shapes.len(), s.motions.len(), s.cases.len()), (3, 4, 0));
    }
}
