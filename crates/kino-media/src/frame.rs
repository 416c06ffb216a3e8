//! RGB frames, frame rates and videos.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{even_suggestion, MediaError, Result};

/// Largest side we accept for a frame (a guard against absurd allocations from bad input).
pub const MAX_SIDE: u32 = 16_384;

/// One picture: `width × height` pixels, RGB24 (`r, g, b` bytes per pixel, rows top to bottom,
/// no padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &self.data.len())
            .finish()
    }
}

fn check_dims(width: u32, height: u32) -> Result<usize> {
    if width == 0 || height == 0 {
        return Err(MediaError::InvalidSize(format!(
            "frame size {width}x{height} has a zero side; width and height must be at least 1"
        )));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(MediaError::InvalidSize(format!(
            "frame size {width}x{height} is too large; each side must be at most {MAX_SIDE}"
        )));
    }
    Ok(width as usize * height as usize * 3)
}

impl Frame {
    /// A frame from RGB24 bytes. Fails if a side is zero or too large, or if `data` is not
    /// exactly `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let expected = check_dims(width, height)?;
        if data.len() != expected {
            return Err(MediaError::InvalidSize(format!(
                "frame {width}x{height} RGB24 needs {expected} bytes ({width}*{height}*3) but got {}; \
                 pass tightly packed RGB rows without alpha or padding",
                data.len()
            )));
        }
        Ok(Frame {
            width,
            height,
            data,
        })
    }

    /// A frame of one colour.
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Result<Self> {
        let n = check_dims(width, height)?;
        let mut data = Vec::with_capacity(n);
        for _ in 0..n / 3 {
            data.extend_from_slice(&rgb);
        }
        Ok(Frame {
            width,
            height,
            data,
        })
    }

    /// A frame whose pixel `(x, y)` is `f(x, y)`.
    pub fn from_fn(
        width: u32,
        height: u32,
        mut f: impl FnMut(u32, u32) -> [u8; 3],
    ) -> Result<Self> {
        let n = check_dims(width, height)?;
        let mut data = Vec::with_capacity(n);
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&f(x, y));
            }
        }
        Ok(Frame {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// RGB24 bytes, `width * height * 3` of them.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Mutable RGB24 bytes (the length cannot change).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The RGB24 bytes, taken out.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// The pixel at `(x, y)`, or `None` outside the frame.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.data[i], self.data[i + 1], self.data[i + 2]])
    }

    /// Fails with an actionable message unless both sides are even (H.264 yuv420p needs that).
    pub fn check_even(&self) -> Result<()> {
        check_even(self.width, self.height)
    }

    /// A copy cropped to `width × height` starting at `(x, y)`.
    pub fn crop(&self, x: u32, y: u32, width: u32, height: u32) -> Result<Frame> {
        let n = check_dims(width, height)?;
        if x.checked_add(width).is_none_or(|r| r > self.width)
            || y.checked_add(height).is_none_or(|b| b > self.height)
        {
            return Err(MediaError::InvalidSize(format!(
                "crop {width}x{height} at ({x}, {y}) does not fit in a {}x{} frame",
                self.width, self.height
            )));
        }
        let mut data = Vec::with_capacity(n);
        let row = self.width as usize * 3;
        for yy in y..y + height {
            let start = yy as usize * row + x as usize * 3;
            data.extend_from_slice(&self.data[start..start + width as usize * 3]);
        }
        Ok(Frame {
            width,
            height,
            data,
        })
    }

    /// A copy cropped to the largest even size (drops the last column and/or row if odd).
    pub fn crop_to_even(&self) -> Result<Frame> {
        let w = self.width & !1;
        let h = self.height & !1;
        self.crop(0, 0, w, h)
    }
}

/// Fails with an actionable message unless both sides are even.
pub(crate) fn check_even(width: u32, height: u32) -> Result<()> {
    if !width.is_multiple_of(2) {
        return Err(MediaError::InvalidSize(format!(
            "width {width} is odd; H.264 yuv420p needs even sizes, try {}",
            even_suggestion(width)
        )));
    }
    if !height.is_multiple_of(2) {
        return Err(MediaError::InvalidSize(format!(
            "height {height} is odd; H.264 yuv420p needs even sizes, try {}",
            even_suggestion(height)
        )));
    }
    Ok(())
}

/// A frame rate as an exact fraction `num / den` frames per second (e.g. 16/1, 24000/1001).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawFps")]
pub struct Fps {
    num: u32,
    den: u32,
}

#[derive(Deserialize)]
struct RawFps {
    num: u32,
    den: u32,
}

impl TryFrom<RawFps> for Fps {
    type Error = MediaError;
    fn try_from(r: RawFps) -> Result<Self> {
        Fps::new(r.num, r.den)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Fps {
    /// `num / den` frames per second, reduced. Fails if either is zero or the rate is above
    /// 1000 fps.
    pub fn new(num: u32, den: u32) -> Result<Self> {
        if num == 0 || den == 0 {
            return Err(MediaError::InvalidVideo(format!(
                "frame rate {num}/{den} is not positive; use e.g. 16/1 or 24000/1001"
            )));
        }
        if u64::from(num) > 1000 * u64::from(den) {
            return Err(MediaError::InvalidVideo(format!(
                "frame rate {num}/{den} is above 1000 fps; use at most 1000"
            )));
        }
        let g = gcd(u64::from(num), u64::from(den)) as u32;
        Ok(Fps {
            num: num / g,
            den: den / g,
        })
    }

    /// A whole number of frames per second.
    pub fn integer(fps: u32) -> Result<Self> {
        Self::new(fps, 1)
    }

    /// The nearest simple fraction to `fps` (whole numbers, NTSC `n*1000/1001` rates, or
    /// thousandths).
    pub fn approx(fps: f64) -> Result<Self> {
        if !fps.is_finite() || fps <= 0.0 || fps > 1000.0 {
            return Err(MediaError::InvalidVideo(format!(
                "frame rate {fps} is not in (0, 1000]; use e.g. 16 or 24"
            )));
        }
        let r = fps.round();
        if (fps - r).abs() < 1e-6 {
            return Self::new(r as u32, 1);
        }
        let ntsc = (fps * 1.001).round();
        if (fps - ntsc / 1.001).abs() < 1e-4 {
            return Self::new(ntsc as u32 * 1000, 1001);
        }
        let milli = (fps * 1000.0).round().max(1.0);
        Self::new(milli as u32, 1000)
    }

    /// Numerator.
    pub fn num(&self) -> u32 {
        self.num
    }

    /// Denominator.
    pub fn den(&self) -> u32 {
        self.den
    }

    /// Frames per second as a float.
    pub fn as_f64(&self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }

    /// Duration of `frames` frames in seconds.
    pub fn duration_of(&self, frames: usize) -> f64 {
        frames as f64 * f64::from(self.den) / f64::from(self.num)
    }
}

impl fmt::Display for Fps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

/// A sequence of frames of one size with a frame rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    frames: Vec<Frame>,
    fps: Fps,
}

impl Video {
    /// A video from frames. Fails if there are no frames or they differ in size.
    pub fn new(frames: Vec<Frame>, fps: Fps) -> Result<Self> {
        let Some(first) = frames.first() else {
            return Err(MediaError::InvalidVideo(
                "a video needs at least one frame; got none".to_string(),
            ));
        };
        let (w, h) = (first.width, first.height);
        if let Some((i, f)) = frames
            .iter()
            .enumerate()
            .find(|(_, f)| f.width != w || f.height != h)
        {
            return Err(MediaError::InvalidVideo(format!(
                "frame {i} is {}x{} but frame 0 is {w}x{h}; all frames of a video must have one size",
                f.width, f.height
            )));
        }
        Ok(Video { frames, fps })
    }

    /// The frames.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// The frames, taken out.
    pub fn into_frames(self) -> Vec<Frame> {
        self.frames
    }

    /// The frame rate.
    pub fn fps(&self) -> Fps {
        self.fps
    }

    /// Width of every frame.
    pub fn width(&self) -> u32 {
        self.frames[0].width
    }

    /// Height of every frame.
    pub fn height(&self) -> u32 {
        self.frames[0].height
    }

    /// Number of frames (at least 1).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Always false: a video has at least one frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Duration in seconds (`frames / fps`).
    pub fn duration_secs(&self) -> f64 {
        self.fps.duration_of(self.frames.len())
    }
}

/// Peak signal-to-noise ratio in dB between two frames of one size over all RGB bytes
/// (`f64::INFINITY` when identical).
pub fn psnr(a: &Frame, b: &Frame) -> Result<f64> {
    if a.width != b.width || a.height != b.height {
        return Err(MediaError::InvalidSize(format!(
            "cannot compare a {}x{} frame with a {}x{} frame",
            a.width, a.height, b.width, b.height
        )));
    }
    Ok(psnr_from_mse(mse(&a.data, &b.data)))
}

/// PSNR in dB over all frames of two videos (mean squared error over every byte of every
/// frame, then PSNR), the way `ffmpeg -lavfi psnr` reports its average.
pub fn psnr_video(a: &[Frame], b: &[Frame]) -> Result<f64> {
    if a.len() != b.len() {
        return Err(MediaError::InvalidVideo(format!(
            "cannot compare {} frames with {} frames",
            a.len(),
            b.len()
        )));
    }
    let mut total = 0.0;
    for (fa, fb) in a.iter().zip(b) {
        psnr(fa, fb)?;
        total += mse(&fa.data, &fb.data);
    }
    Ok(psnr_from_mse(total / a.len().max(1) as f64))
}

fn mse(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = i64::from(x) - i64::from(y);
            (d * d) as u64
        })
        .sum();
    sum as f64 / a.len().max(1) as f64
}

fn psnr_from_mse(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_validates_sizes() {
        assert!(Frame::new(2, 2, vec![0; 12]).is_ok());
        let e = Frame::new(2, 2, vec![0; 11]).unwrap_err().to_string();
        assert!(e.contains("needs 12 bytes"), "{e}");
        let e = Frame::new(0, 2, vec![]).unwrap_err().to_string();
        assert!(e.contains("zero side"), "{e}");
        assert!(Frame::new(MAX_SIDE + 1, 1, vec![]).is_err());
    }

    #[test]
    fn odd_size_message_suggests_even() {
        let f = Frame::filled(833, 480, [0, 0, 0]).unwrap();
        let e = f.check_even().unwrap_err().to_string();
        assert!(
            e.contains("width 833 is odd; H.264 yuv420p needs even sizes, try 832"),
            "{e}"
        );
        let f = Frame::filled(832, 479, [0, 0, 0]).unwrap();
        assert!(f
            .check_even()
            .unwrap_err()
            .to_string()
            .contains("height 479"));
        assert_eq!(f.crop_to_even().unwrap().height(), 478);
    }

    #[test]
    fn fps_reduces_and_approximates() {
        let f = Fps::new(32, 2).unwrap();
        assert_eq!((f.num(), f.den()), (16, 1));
        assert!(Fps::new(0, 1).is_err());
        assert_eq!(Fps::approx(23.976).unwrap(), Fps::new(24000, 1001).unwrap());
        assert_eq!(Fps::approx(16.0).unwrap(), Fps::integer(16).unwrap());
        assert_eq!(Fps::approx(12.5).unwrap(), Fps::new(25, 2).unwrap());
        assert!((Fps::integer(16).unwrap().duration_of(121) - 7.5625).abs() < 1e-12);
    }

    #[test]
    fn video_rejects_mixed_sizes() {
        let a = Frame::filled(4, 4, [1, 2, 3]).unwrap();
        let b = Frame::filled(4, 2, [1, 2, 3]).unwrap();
        let e = Video::new(vec![a.clone(), b], Fps::integer(8).unwrap()).unwrap_err();
        assert!(e.to_string().contains("frame 1 is 4x2"), "{e}");
        assert!(Video::new(vec![], Fps::integer(8).unwrap()).is_err());
        let v = Video::new(vec![a.clone(), a], Fps::integer(8).unwrap()).unwrap();
        assert_eq!(v.duration_secs(), 0.25);
    }

    #[test]
    fn psnr_basic() {
        let a = Frame::filled(4, 4, [100, 100, 100]).unwrap();
        let b = Frame::filled(4, 4, [101, 101, 101]).unwrap();
        assert!(psnr(&a, &a).unwrap().is_infinite());
        let p = psnr(&a, &b).unwrap();
        assert!((p - 48.1308).abs() < 1e-3, "{p}");
    }
}
