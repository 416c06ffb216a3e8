//! The first images of `kino eval --image`: one scene of the shapes world per case and seed,
//! drawn exactly as `training/world.py` draws a frame (`Scene`, `_coverage`, `render`), so that
//! `kino eval` needs no Python. `fixtures/data/kino-shapes/world.json` (written by
//! `fixtures/gen_kino_shapes.py` with world.py's own renderer) checks the port byte for byte.
//!
//! The scene of a case is placed as world.py's `sample_scene` places one (size and travel
//! uniform in the world's ranges, the start such that the whole path stays inside the frame),
//! from a small seeded generator of its own: which position a case gets is not world.py's
//! random stream, only how it is drawn is world.py's.

use anyhow::bail;

use super::analyse::{Case, EvalSpec};

/// Supersampling per axis (world.py's `_SS`).
const SS: usize = 4;

/// One object of the world at frame 0 and where it goes (world.py's `Scene`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scene {
    pub shape: String,
    pub colour: [u8; 3],
    pub background: [u8; 3],
    pub motion: String,
    /// Circle diameter, square side, triangle base (= height), pixels.
    pub size: f64,
    /// The centre at frame 0, pixels.
    pub x0: f64,
    pub y0: f64,
    /// Pixels over the whole clip.
    pub travel: f64,
}

/// world.py's `DIRECTION`.
fn direction(motion: &str) -> (i32, i32) {
    match motion {
        "left" => (-1, 0),
        "right" => (1, 0),
        "up" => (0, -1),
        "down" => (0, 1),
        _ => (0, 0),
    }
}

impl Scene {
    /// The scene of `case` for `seed` in a `width × height` frame (world.py's `sample_scene`
    /// with its own generator, seeded by the case's index and the seed).
    pub fn for_case(
        spec: &EvalSpec,
        case_index: usize,
        case: &Case,
        seed: u64,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Scene> {
        let (Some(&colour), Some(&background)) = (
            spec.colours.get(&case.colour),
            spec.backgrounds.get(&case.background),
        ) else {
            bail!(
                "case {:?} names a colour or background not in the palette",
                case.prompt
            );
        };
        let mut rng = SplitMix(
            0x6b69_6e6f_7368_6170
                ^ (case_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let uniform = |rng: &mut SplitMix, [lo, hi]: [f64; 2]| lo + (hi - lo) * rng.next_f64();
        let scale = width.min(height) as f64 / 64.0;
        let size = uniform(&mut rng, spec.world.size_range) * scale;
        let travel = uniform(&mut rng, spec.world.travel_range) * scale;
        let (dx, dy) = direction(&case.motion);
        let half = size / 2.0 + 1.0;
        let mut start = |extent: usize, d: i32| {
            let (mut lo, mut hi) = (half, extent as f64 - half);
            if d > 0 {
                hi -= travel;
            } else if d < 0 {
                lo += travel;
            }
            uniform(&mut rng, [lo, hi])
        };
        let x0 = start(width, dx);
        let y0 = start(height, dy);
        Ok(Scene {
            shape: case.shape.clone(),
            colour,
            background,
            motion: case.motion.clone(),
            size,
            x0,
            y0,
            travel,
        })
    }

    /// The centre at `frame` of a `frames`-frame clip (world.py's `Scene.centre`).
    pub fn centre(&self, frame: f64, frames: usize) -> (f64, f64) {
        let (dx, dy) = direction(&self.motion);
        let p = self.travel * frame / frames.saturating_sub(1).max(1) as f64;
        (self.x0 + f64::from(dx) * p, self.y0 + f64::from(dy) * p)
    }

    /// Frame `frame` of a `frames`-frame clip, RGB `width × height × 3` (world.py's `render`:
    /// 4×4-supersampled coverage, `round(bg + a·(fg − bg))` with ties to even).
    pub fn render(&self, width: usize, height: usize, frame: usize, frames: usize) -> Vec<u8> {
        let (cx, cy) = self.centre(frame as f64, frames);
        let a = coverage(&self.shape, cx, cy, self.size, width, height);
        let mut out = Vec::with_capacity(width * height * 3);
        for a in a {
            for c in 0..3 {
                let (fg, bg) = (f64::from(self.colour[c]), f64::from(self.background[c]));
                out.push((bg + a * (fg - bg)).round_ties_even() as u8);
            }
        }
        out
    }
}

/// world.py's `_coverage`: the fraction of each pixel's 4×4 sample points inside the shape.
fn coverage(shape: &str, cx: f64, cy: f64, size: f64, width: usize, height: usize) -> Vec<f64> {
    let r = size / 2.0;
    let inside = |x: f64, y: f64| -> bool {
        match shape {
            "circle" => (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r,
            "square" => (x - cx).abs() <= r && (y - cy).abs() <= r,
            // Apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
            "triangle" => {
                let t = (y - (cy - r)) / size;
                (0.0..=1.0).contains(&t) && (x - cx).abs() <= t * r
            }
            _ => false,
        }
    };
    let sample = |i: usize| (i as f64 + 0.5) / SS as f64;
    let mut out = vec![0.0; width * height];
    for py in 0..height {
        for px in 0..width {
            let mut hits = 0u32;
            for j in 0..SS {
                for i in 0..SS {
                    hits += u32::from(inside(sample(px * SS + i), sample(py * SS + j)));
                }
            }
            out[py * width + px] = f64::from(hits) / (SS * SS) as f64;
        }
    }
    out
}

/// SplitMix64: a small seeded generator (the scenes only need to be reproducible).
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::eval::analyse::{object_centre, tests::spec};

    fn fixture_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/kino-shapes")
    }

    /// world.py's own renders (fixtures/gen_kino_shapes.py): the port gives the same bytes.
    #[test]
    fn renders_exactly_as_world_py() {
        let dir = fixture_dir();
        let text = std::fs::read_to_string(dir.join("world.json")).unwrap_or_else(|e| {
            panic!("cannot read fixtures/data/kino-shapes/world.json ({e}): run `python fixtures/gen_kino_shapes.py`")
        });
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bytes = std::fs::read(dir.join(v["frames_file"].as_str().unwrap())).unwrap();
        let (w, h, n) = (
            v["width"].as_u64().unwrap() as usize,
            v["height"].as_u64().unwrap() as usize,
            v["num_frames"].as_u64().unwrap() as usize,
        );
        let rgb = |x: &serde_json::Value| -> [u8; 3] {
            let a: Vec<u8> = serde_json::from_value(x.clone()).unwrap();
            [a[0], a[1], a[2]]
        };
        // Floats as their bit patterns: no decimal round trip.
        let float = |x: &serde_json::Value| f64::from_bits(x.as_u64().unwrap());
        let cases = v["scenes"].as_array().unwrap();
        assert!(cases.len() >= 4);
        let mut offset = 0;
        let mut shapes = std::collections::BTreeSet::new();
        for c in cases {
            let scene = Scene {
                shape: c["shape"].as_str().unwrap().into(),
                colour: rgb(&c["colour_rgb"]),
                background: rgb(&c["background_rgb"]),
                motion: c["motion"].as_str().unwrap().into(),
                size: float(&c["size_bits"]),
                x0: float(&c["x0_bits"]),
                y0: float(&c["y0_bits"]),
                travel: float(&c["travel_bits"]),
            };
            shapes.insert(scene.shape.clone());
            for f in c["frames"].as_array().unwrap() {
                let f = f.as_u64().unwrap() as usize;
                let want = &bytes[offset..offset + w * h * 3];
                offset += w * h * 3;
                let got = scene.render(w, h, f, n);
                let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{scene:?} frame {f}: {differ} bytes differ");
            }
        }
        assert_eq!(offset, bytes.len());
        assert_eq!(shapes.len(), 3, "every shape is checked");
    }

    #[test]
    fn scenes_are_reproducible_inside_the_frame_and_analysable() {
        let spec = spec();
        for (i, motion) in ["left", "right", "up", "down"].into_iter().enumerate() {
            for shape in ["circle", "square", "triangle"] {
                let case = Case {
                    prompt: format!("a red {shape} moving {motion} on a black background"),
                    colour: "red".into(),
                    shape: shape.into(),
                    motion: motion.into(),
                    background: "black".into(),
                };
                for seed in 0..4 {
                    let s = Scene::for_case(&spec, i, &case, seed, 64, 64).unwrap();
                    assert_eq!(s, Scene::for_case(&spec, i, &case, seed, 64, 64).unwrap());
                    assert!((18.0..=26.0).contains(&s.size) && (12.0..=36.0).contains(&s.travel));
                    for f in [0.0, 16.0] {
                        let (x, y) = s.centre(f, 17);
                        let half = s.size / 2.0 + 1.0;
                        assert!(x >= half - 1e-9 && x <= 64.0 - half + 1e-9, "{s:?}");
                        assert!(y >= half - 1e-9 && y <= 64.0 - half + 1e-9, "{s:?}");
                    }
                    let img = s.render(64, 64, 0, 17);
                    let [cx, cy] = object_centre(&img, 64, 64).unwrap();
                    // A triangle's centroid is below its box centre (by size / 6).
                    let dy = if shape == "triangle" {
                        s.size / 6.0
                    } else {
                        0.0
                    };
                    assert!(
                        (cx - s.x0).abs() < 0.6 && (cy - s.y0 - dy).abs() < 0.6,
                        "{s:?}: centre measured at ({cx:.2}, {cy:.2})"
                    );
                }
            }
        }
        // Seeds and cases give different scenes.
        let case = &spec.cases[0];
        let a = Scene::for_case(&spec, 0, case, 0, 64, 64).unwrap();
        assert_ne!(a, Scene::for_case(&spec, 0, case, 1, 64, 64).unwrap());
        assert_ne!(a, Scene::for_case(&spec, 1, case, 0, 64, 64).unwrap());
    }
}
