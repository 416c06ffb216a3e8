//! RGB ↔ Y'CbCr 4:2:0 conversion (BT.709 or BT.601 matrix, limited or full range), in fixed
//! point. The writer converts with the colour space it signals in the stream (VUI) and in the
//! MP4 `colr` box; the reader converts back with whatever the file signals.

use serde::{Deserialize, Serialize};

/// The Y'CbCr matrix and range of an H.264 stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColorSpace {
    /// ITU-R BT.709 primaries, transfer and matrix, limited ("TV") range 16–235/16–240. The
    /// default: what HD video and browsers expect.
    #[default]
    Bt709,
    /// ITU-R BT.601 (SMPTE 170M) matrix, limited range (SD video).
    Bt601,
}

/// A matrix and a range; what a decoder needs to go back to RGB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct YuvMatrix {
    /// Luma weight of red.
    pub kr: f64,
    /// Luma weight of blue.
    pub kb: f64,
    /// Full range (0–255) rather than limited (16–235).
    pub full_range: bool,
}

impl YuvMatrix {
    pub const BT709: YuvMatrix = YuvMatrix {
        kr: 0.2126,
        kb: 0.0722,
        full_range: false,
    };
    pub const BT601: YuvMatrix = YuvMatrix {
        kr: 0.299,
        kb: 0.114,
        full_range: false,
    };

    /// From H.264/ISO `matrix_coefficients` (Table E-5 / ISO 23091-2) and the full-range flag.
    /// Unknown or unspecified matrices fall back to BT.709 for HD and BT.601 for SD, as
    /// players do.
    pub fn from_code(matrix: Option<u8>, full_range: bool, height: u32) -> YuvMatrix {
        let base = match matrix {
            Some(1) => Self::BT709,
            Some(5 | 6) => Self::BT601,
            Some(9 | 10) => YuvMatrix {
                kr: 0.2627,
                kb: 0.0593,
                full_range: false,
            },
            Some(7) => YuvMatrix {
                kr: 0.212,
                kb: 0.087,
                full_range: false,
            },
            _ if height >= 720 => Self::BT709,
            _ => Self::BT601,
        };
        YuvMatrix { full_range, ..base }
    }
}

impl ColorSpace {
    pub(crate) fn matrix(self) -> YuvMatrix {
        match self {
            ColorSpace::Bt709 => YuvMatrix::BT709,
            ColorSpace::Bt601 => YuvMatrix::BT601,
        }
    }

    /// (colour_primaries, transfer_characteristics, matrix_coefficients) codes.
    pub(crate) fn codes(self) -> (u8, u8, u8) {
        match self {
            ColorSpace::Bt709 => (1, 1, 1),
            ColorSpace::Bt601 => (6, 6, 6),
        }
    }
}

const SHIFT: u32 = 16;
const ONE: f64 = (1u32 << SHIFT) as f64;

fn fix(v: f64) -> i32 {
    (v * ONE).round() as i32
}

/// A planar 4:2:0 picture: Y is `width × height`, U and V are `ceil(w/2) × ceil(h/2)`.
pub(crate) struct Yuv420 {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl Yuv420 {
    pub fn chroma_width(&self) -> usize {
        self.width.div_ceil(2)
    }
}

impl openh264::formats::YUVSource for Yuv420 {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }
    fn strides(&self) -> (usize, usize, usize) {
        let cw = self.chroma_width();
        (self.width, cw, cw)
    }
    fn y(&self) -> &[u8] {
        &self.y
    }
    fn u(&self) -> &[u8] {
        &self.u
    }
    fn v(&self) -> &[u8] {
        &self.v
    }
}

struct Forward {
    yr: i32,
    yg: i32,
    yb: i32,
    y_off: i32,
    ur: i32,
    ug: i32,
    ub: i32,
    vr: i32,
    vg: i32,
    vb: i32,
}

impl Forward {
    fn new(m: YuvMatrix) -> Forward {
        let kg = 1.0 - m.kr - m.kb;
        let (ys, cs, y_off) = if m.full_range {
            (1.0, 1.0, 0.0)
        } else {
            (219.0 / 255.0, 224.0 / 255.0, 16.0)
        };
        let cb = cs / (2.0 * (1.0 - m.kb));
        let cr = cs / (2.0 * (1.0 - m.kr));
        Forward {
            yr: fix(ys * m.kr),
            yg: fix(ys * kg),
            yb: fix(ys * m.kb),
            y_off: fix(y_off + 0.5),
            // Cb = cb * (B - Y), Cr = cr * (R - Y), with Y = kr R + kg G + kb B.
            ur: fix(-cb * m.kr),
            ug: fix(-cb * kg),
            ub: fix(cb * (1.0 - m.kb)),
            vr: fix(cr * (1.0 - m.kr)),
            vg: fix(-cr * kg),
            vb: fix(-cr * m.kb),
        }
    }
}

fn clamp_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// RGB24 → planar 4:2:0; chroma is the mean over each 2×2 block (centre sited).
pub(crate) fn rgb_to_yuv420(rgb: &[u8], width: usize, height: usize, m: YuvMatrix) -> Yuv420 {
    let c = Forward::new(m);
    let cw = width.div_ceil(2);
    let ch = height.div_ceil(2);
    let mut y = vec![0u8; width * height];
    let mut u = vec![0u8; cw * ch];
    let mut v = vec![0u8; cw * ch];
    for (py, yrow) in y.chunks_exact_mut(width).enumerate() {
        let row = &rgb[py * width * 3..(py + 1) * width * 3];
        for (dst, px) in yrow.iter_mut().zip(row.chunks_exact(3)) {
            let (r, g, b) = (i32::from(px[0]), i32::from(px[1]), i32::from(px[2]));
            *dst = clamp_u8((c.yr * r + c.yg * g + c.yb * b + c.y_off) >> SHIFT);
        }
    }
    let half = fix(128.5);
    for cy in 0..ch {
        let y0 = cy * 2;
        let y1 = (y0 + 1).min(height - 1);
        let r0 = &rgb[y0 * width * 3..(y0 + 1) * width * 3];
        let r1 = &rgb[y1 * width * 3..(y1 + 1) * width * 3];
        for cx in 0..cw {
            let x0 = cx * 2;
            let x1 = (x0 + 1).min(width - 1);
            let mut s = [0i32; 3];
            for k in 0..3 {
                s[k] = i32::from(r0[x0 * 3 + k])
                    + i32::from(r0[x1 * 3 + k])
                    + i32::from(r1[x0 * 3 + k])
                    + i32::from(r1[x1 * 3 + k]);
            }
            // s is 4× the mean; divide by 4 inside the shift.
            let uu = (c.ur * s[0] + c.ug * s[1] + c.ub * s[2] + 4 * half) >> (SHIFT + 2);
            let vv = (c.vr * s[0] + c.vg * s[1] + c.vb * s[2] + 4 * half) >> (SHIFT + 2);
            u[cy * cw + cx] = clamp_u8(uu);
            v[cy * cw + cx] = clamp_u8(vv);
        }
    }
    Yuv420 {
        width,
        height,
        y,
        u,
        v,
    }
}

/// Borrowed planes of a 4:2:0 picture with strides.
pub(crate) struct YuvPlanes<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
}

impl YuvPlanes<'_> {
    /// Whether the planes hold a non-empty `width × height` picture whose chroma is subsampled
    /// by `2^shift_x` across and `2^shift_y` down (1, 1 for 4:2:0), at the given strides.
    pub(crate) fn fit(&self, shift_x: u32, shift_y: u32) -> bool {
        let (w, h) = (self.width, self.height);
        let cw = (w + (1 << shift_x) - 1) >> shift_x;
        let ch = (h + (1 << shift_y) - 1) >> shift_y;
        w > 0
            && h > 0
            && self.y_stride >= w
            && self.uv_stride >= cw
            && self.y.len() >= (h - 1) * self.y_stride + w
            && self.u.len() >= (ch - 1) * self.uv_stride + cw
            && self.v.len() >= (ch - 1) * self.uv_stride + cw
    }
}

/// Planar 4:2:0 → RGB24, with bilinear (3:1 "triangle") chroma upsampling for centre-sited
/// chroma. Returns `None` if the planes are too short for the given sizes and strides.
pub(crate) fn yuv420_to_rgb(p: &YuvPlanes<'_>, m: YuvMatrix) -> Option<Vec<u8>> {
    if !p.fit(1, 1) {
        return None;
    }
    let (w, h) = (p.width, p.height);
    let cw = w.div_ceil(2);
    let ch = h.div_ceil(2);
    let kg = 1.0 - m.kr - m.kb;
    let (ys, cs, y_off) = if m.full_range {
        (1.0, 1.0, 0)
    } else {
        (255.0 / 219.0, 255.0 / 224.0, 16)
    };
    let y_mul = fix(ys);
    let cr_r = fix(cs * 2.0 * (1.0 - m.kr));
    let cb_b = fix(cs * 2.0 * (1.0 - m.kb));
    let cb_g = fix(cs * 2.0 * (1.0 - m.kb) * m.kb / kg);
    let cr_g = fix(cs * 2.0 * (1.0 - m.kr) * m.kr / kg);
    let round = 1i32 << (SHIFT - 1);

    let mut out = vec![0u8; w * h * 3];
    // Vertically blended chroma rows, scaled by 4.
    let mut vu = vec![0i32; cw];
    let mut vv = vec![0i32; cw];
    for yy in 0..h {
        let c0 = yy / 2;
        let cn = if yy % 2 == 0 {
            c0.saturating_sub(1)
        } else {
            (c0 + 1).min(ch - 1)
        };
        let (u0, un) = (&p.u[c0 * p.uv_stride..], &p.u[cn * p.uv_stride..]);
        let (v0, vn) = (&p.v[c0 * p.uv_stride..], &p.v[cn * p.uv_stride..]);
        for i in 0..cw {
            vu[i] = 3 * i32::from(u0[i]) + i32::from(un[i]);
            vv[i] = 3 * i32::from(v0[i]) + i32::from(vn[i]);
        }
        let yrow = &p.y[yy * p.y_stride..yy * p.y_stride + w];
        let orow = &mut out[yy * w * 3..(yy + 1) * w * 3];
        for (xx, (o, &yv)) in orow.chunks_exact_mut(3).zip(yrow).enumerate() {
            let i = xx / 2;
            let j = if xx % 2 == 0 {
                i.saturating_sub(1)
            } else {
                (i + 1).min(cw - 1)
            };
            // 16× the chroma value, minus 16×128.
            let cb = 3 * vu[i] + vu[j] - 2048;
            let cr = 3 * vv[i] + vv[j] - 2048;
            let yl = (i32::from(yv) - y_off) * y_mul;
            // cb, cr carry a factor 16: divide the products by 16 (shift by 4).
            o[0] = clamp_u8((yl + ((cr_r * cr) >> 4) + round) >> SHIFT);
            o[1] = clamp_u8((yl - ((cb_g * cb) >> 4) - ((cr_g * cr) >> 4) + round) >> SHIFT);
            o[2] = clamp_u8((yl + ((cb_b * cb) >> 4) + round) >> SHIFT);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(rgb: [u8; 3], m: YuvMatrix) -> [u8; 3] {
        let data: Vec<u8> = (0..16).flat_map(|_| rgb).collect();
        let yuv = rgb_to_yuv420(&data, 4, 4, m);
        let p = YuvPlanes {
            width: 4,
            height: 4,
            y: &yuv.y,
            u: &yuv.u,
            v: &yuv.v,
            y_stride: 4,
            uv_stride: 2,
        };
        let back = yuv420_to_rgb(&p, m).unwrap();
        [back[0], back[1], back[2]]
    }

    #[test]
    fn bt709_limited_reference_values() {
        // White → Y 235, Cb/Cr 128; black → 16; pure red per BT.709: Y 63, Cb 102, Cr 240.
        let white = rgb_to_yuv420(&[255; 12], 2, 2, YuvMatrix::BT709);
        assert_eq!((white.y[0], white.u[0], white.v[0]), (235, 128, 128));
        let black = rgb_to_yuv420(&[0; 12], 2, 2, YuvMatrix::BT709);
        assert_eq!((black.y[0], black.u[0], black.v[0]), (16, 128, 128));
        let red: Vec<u8> = (0..4).flat_map(|_| [255u8, 0, 0]).collect();
        let r = rgb_to_yuv420(&red, 2, 2, YuvMatrix::BT709);
        assert_eq!((r.y[0], r.u[0], r.v[0]), (63, 102, 240));
    }

    #[test]
    fn roundtrip_is_close() {
        for m in [
            YuvMatrix::BT709,
            YuvMatrix::BT601,
            YuvMatrix {
                full_range: true,
                ..YuvMatrix::BT709
            },
        ] {
            for rgb in [[0, 0, 0], [255, 255, 255], [200, 30, 90], [12, 250, 128]] {
                let back = roundtrip(rgb, m);
                for k in 0..3 {
                    assert!(
                        (i32::from(back[k]) - i32::from(rgb[k])).abs() <= 2,
                        "{rgb:?} -> {back:?} ({m:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn short_planes_are_rejected() {
        let p = YuvPlanes {
            width: 4,
            height: 4,
            y: &[0; 15],
            u: &[0; 4],
            v: &[0; 4],
            y_stride: 4,
            uv_stride: 2,
        };
        assert!(yuv420_to_rgb(&p, YuvMatrix::BT709).is_none());
    }
}
