//! A picture's luma as its file codes it, for readers that measure small changes of brightness
//! (Kino's watermark detector).
//!
//! Converting a decoded YUV picture to 8-bit RGB loses some of its luma: every channel is
//! rounded, saturated colours clip at 0 or 255 (a red bar whose chroma the codec blurred comes
//! out darker), and FFmpeg's swscale, which [`crate::read_video`] uses, is itself biased by one
//! to two levels on coloured pixels (measured on libx264 streams: the BT.601 luma of its RGB is
//! 1.3 levels below the coded luma on average). [`LumaPlane`] keeps the luma instead: the BT.601
//! weights of the RGB the YUV stands for, computed in floating point before any rounding or
//! clipping. For a BT.601 stream that is the Y plane itself, rescaled to 0–255; for other
//! matrices (BT.709, …) the chroma adds its share, read at the nearest chroma sample.

use crate::color::{YuvMatrix, YuvPlanes};
use crate::frame::Frame;

/// BT.601 luma weights of R, G and B.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];
/// Stored as `(level + OFFSET) × SCALE` in a `u16`: 1/64 of a level from −64 to 959.
const OFFSET: f32 = 64.0;
const SCALE: f32 = 64.0;

/// One picture's luma (BT.601, levels 0–255 and a little beyond where the stream codes values
/// outside RGB's range), 1/64 level resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct LumaPlane {
    width: u32,
    height: u32,
    data: Vec<u16>,
}

fn store(l: f32) -> u16 {
    ((l + OFFSET) * SCALE)
        .round()
        .clamp(0.0, f32::from(u16::MAX)) as u16
}

impl LumaPlane {
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The levels, row by row.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data
            .iter()
            .map(|&v| f32::from(v) / SCALE - OFFSET)
            .collect()
    }

    /// The luma of an RGB picture (for stills, and for streams whose pixel format has no 8-bit
    /// YUV planes to read).
    pub fn from_frame(f: &Frame) -> LumaPlane {
        LumaPlane {
            width: f.width(),
            height: f.height(),
            data: f
                .data()
                .chunks_exact(3)
                .map(|p| {
                    store(
                        LUMA[0] * f32::from(p[0])
                            + LUMA[1] * f32::from(p[1])
                            + LUMA[2] * f32::from(p[2]),
                    )
                })
                .collect(),
        }
    }

    /// The luma of an 8-bit planar YUV picture with matrix `m`, its chroma subsampled by
    /// `2^shift_x` across and `2^shift_y` down; `None` when its planes are shorter than its size
    /// says.
    pub(crate) fn from_yuv(
        p: &YuvPlanes<'_>,
        shift_x: u32,
        shift_y: u32,
        m: YuvMatrix,
    ) -> Option<LumaPlane> {
        if !p.fit(shift_x, shift_y) {
            return None;
        }
        let (w, h) = (p.width, p.height);
        let (kr, kb) = (m.kr as f32, m.kb as f32);
        let (ys, cs, y_off) = if m.full_range {
            (1.0, 1.0, 0.0)
        } else {
            (255.0 / 219.0, 255.0 / 224.0, 16.0)
        };
        let kg = 1.0 - kr - kb;
        // R = Y' + 2(1-kr)·Cr, B = Y' + 2(1-kb)·Cb, G = Y' - (2(1-kb)kb·Cb + 2(1-kr)kr·Cr)/kg;
        // the BT.601 luma of that is Y' + a·Cr + b·Cb (a = b = 0 for a BT.601 matrix).
        let a = 2.0 * (1.0 - kr) * (LUMA[0] - LUMA[1] * kr / kg) * cs;
        let b = 2.0 * (1.0 - kb) * (LUMA[2] - LUMA[1] * kb / kg) * cs;
        let chroma = a.abs() > 1e-4 || b.abs() > 1e-4;
        let mut data = Vec::with_capacity(w * h);
        for yy in 0..h {
            let yrow = &p.y[yy * p.y_stride..yy * p.y_stride + w];
            let crow = (yy >> shift_y) * p.uv_stride;
            for (xx, &yv) in yrow.iter().enumerate() {
                let mut l = (f32::from(yv) - y_off) * ys;
                if chroma {
                    let c = crow + (xx >> shift_x);
                    l += a * (f32::from(p.v[c]) - 128.0) + b * (f32::from(p.u[c]) - 128.0);
                }
                data.push(store(l));
            }
        }
        Some(LumaPlane {
            width: w as u32,
            height: h as u32,
            data,
        })
    }

    /// The plane turned `degrees` clockwise (0, 90, 180 or 270), as [`crate::read_video`]
    /// turns a phone's pictures.
    pub(crate) fn rotated(self, degrees: u32) -> LumaPlane {
        let (w, h) = (self.width as usize, self.height as usize);
        let at = |x: usize, y: usize| self.data[y * w + x];
        let (nw, nh, data): (usize, usize, Vec<u16>) = match degrees % 360 {
            0 => return self,
            // Output (x, y) of a clockwise quarter turn comes from input (y, h-1-x).
            90 => (
                h,
                w,
                (0..w)
                    .flat_map(|y| (0..h).map(move |x| (x, y)))
                    .map(|(x, y)| at(y, h - 1 - x))
                    .collect(),
            ),
            180 => (
                w,
                h,
                (0..h)
                    .flat_map(|y| (0..w).map(move |x| (x, y)))
                    .map(|(x, y)| at(w - 1 - x, h - 1 - y))
                    .collect(),
            ),
            _ => (
                h,
                w,
                (0..w)
                    .flat_map(|y| (0..h).map(move |x| (x, y)))
                    .map(|(x, y)| at(w - 1 - y, x))
                    .collect(),
            ),
        };
        LumaPlane {
            width: nw as u32,
            height: nh as u32,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(y: &'a [u8], u: &'a [u8], v: &'a [u8]) -> YuvPlanes<'a> {
        YuvPlanes {
            width: 4,
            height: 2,
            y,
            u,
            v,
            y_stride: 4,
            uv_stride: 2,
        }
    }

    fn matrix(kr: f64, kb: f64) -> YuvMatrix {
        YuvMatrix {
            kr,
            kb,
            full_range: false,
        }
    }

    /// BT.601 luma of the unclipped RGB of (Y, Cb, Cr) under matrix (kr, kb), limited range.
    fn reference(y: u8, cb: u8, cr: u8, kr: f32, kb: f32) -> f32 {
        let kg = 1.0 - kr - kb;
        let yl = (f32::from(y) - 16.0) * 255.0 / 219.0;
        let (cb, cr) = (
            (f32::from(cb) - 128.0) * 255.0 / 224.0,
            (f32::from(cr) - 128.0) * 255.0 / 224.0,
        );
        let r = yl + 2.0 * (1.0 - kr) * cr;
        let b = yl + 2.0 * (1.0 - kb) * cb;
        let g = (yl - kr * r - kb * b) / kg;
        LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    }

    #[test]
    fn luma_is_the_coded_rgb_before_clipping() {
        let y = [16, 100, 235, 250, 30, 60, 90, 120];
        let (u, v) = ([60, 200], [240, 20]);
        for (kr, kb) in [(0.299, 0.114), (0.2126, 0.0722)] {
            let l = LumaPlane::from_yuv(&view(&y, &u, &v), 1, 1, matrix(kr, kb))
                .unwrap()
                .to_f32();
            for (i, &got) in l.iter().enumerate() {
                let (x, row) = (i % 4, i / 4);
                let want = reference(y[i], u[x / 2], v[x / 2], kr as f32, kb as f32);
                assert!(
                    (got - want).abs() <= 1.0 / 64.0,
                    "{kr} pixel {row},{x}: {got} vs {want}"
                );
            }
        }
        // BT.601: the Y plane rescaled, whatever the chroma (a saturated pixel that RGB clips
        // keeps its luma here: Y 250 is 272 levels).
        let l = LumaPlane::from_yuv(&view(&y, &u, &v), 1, 1, YuvMatrix::BT601)
            .unwrap()
            .to_f32();
        assert!(
            (l[3] - (250.0 - 16.0) * 255.0 / 219.0).abs() < 0.01,
            "{}",
            l[3]
        );
    }

    #[test]
    fn short_planes_are_refused_and_rotation_moves_pixels() {
        let y = [0u8; 7];
        assert!(LumaPlane::from_yuv(&view(&y, &[0, 0], &[0, 0]), 1, 1, YuvMatrix::BT601).is_none());
        let f = Frame::from_fn(3, 2, |x, y| {
            let v = (10 * x + 100 * y) as u8;
            [v, v, v]
        })
        .unwrap();
        let p = LumaPlane::from_frame(&f);
        let r = p.clone().rotated(90).to_f32();
        let rf = crate::video_in::rotate(&f, 90).unwrap();
        let want = LumaPlane::from_frame(&rf).to_f32();
        assert_eq!(r, want);
        assert_eq!(
            p.clone().rotated(180).to_f32(),
            LumaPlane::from_frame(&crate::video_in::rotate(&f, 180).unwrap()).to_f32()
        );
        assert_eq!(
            p.clone().rotated(270).to_f32(),
            LumaPlane::from_frame(&crate::video_in::rotate(&f, 270).unwrap()).to_f32()
        );
        assert_eq!(p.rotated(0).width(), 3);
    }
}
