//! Animated GIF writing: one global palette learned with NeuQuant from frames across the
//! whole clip (no palette flicker), frame delays that add up to the exact duration, and
//! inter-frame compression (each frame after the first stores only the rectangle that
//! changed, with unchanged pixels transparent).

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use color_quant::NeuQuant;
use serde::{Deserialize, Serialize};

use crate::error::{MediaError, Result};
use crate::frame::{Fps, Video};
use crate::util::write_file_atomic;

/// Palette index used for "unchanged" (transparent) pixels.
const TRANSPARENT: u8 = 255;
/// Palette colours learned (index 255 is reserved for transparency).
const COLORS: usize = 255;
/// At most this many pixels train the palette.
const TRAIN_PIXELS: usize = 1 << 21;
/// Shortest delay browsers honour (shorter ones are slowed to 1/10 s).
const MIN_DELAY_CS: u64 = 2;

/// GIF settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GifOptions {
    /// Loop forever (`true`, the default) or play once.
    pub repeat: bool,
    /// NeuQuant sampling factor 1–30: 1 learns from every training pixel (best, slowest),
    /// 10 is the default.
    pub palette_speed: i32,
}

impl Default for GifOptions {
    fn default() -> Self {
        GifOptions {
            repeat: true,
            palette_speed: 10,
        }
    }
}

/// Which frames to show and for how many centiseconds, so that delays are at least 2 cs and
/// the timestamps stay within half a centisecond of `i / fps`.
pub(crate) fn gif_schedule(frames: usize, fps: Fps) -> Vec<(usize, u16)> {
    let cs_at = |i: usize| -> u64 {
        // round(i * 100 * den / num)
        let num = u64::from(fps.num());
        let t = i as u64 * 100 * u64::from(fps.den());
        (t + num / 2) / num
    };
    let mut shown: Vec<(usize, u64)> = Vec::new();
    for i in 0..frames {
        let t = cs_at(i);
        match shown.last() {
            Some(&(_, last)) if t < last + MIN_DELAY_CS => {}
            _ => shown.push((i, t)),
        }
    }
    let end = cs_at(frames).max(shown.last().map_or(0, |&(_, t)| t + MIN_DELAY_CS));
    (0..shown.len())
        .map(|k| {
            let next = shown.get(k + 1).map_or(end, |&(_, t)| t);
            let d = (next - shown[k].1).min(u64::from(u16::MAX));
            (shown[k].0, d as u16)
        })
        .collect()
}

struct Palette {
    nq: NeuQuant,
    rgb: Vec<u8>,
    /// 7 bits per channel → palette index (u16::MAX = not yet looked up).
    cache: Vec<u16>,
}

impl Palette {
    fn learn(video: &Video, speed: i32) -> Palette {
        let frames = video.frames();
        let px_per_frame = video.width() as usize * video.height() as usize;
        let sample_frames = crate::still::evenly_spaced(frames.len(), 16);
        let total = px_per_frame * sample_frames.len();
        // An odd stride through the pixels so that patterns do not alias with it.
        let stride = (total / TRAIN_PIXELS).max(1) | 1;
        let mut train = Vec::with_capacity((total / stride + 1) * 4);
        let mut k = 0usize;
        for &fi in &sample_frames {
            let data = frames[fi].data();
            while k < px_per_frame {
                train.extend_from_slice(&data[k * 3..k * 3 + 3]);
                train.push(255);
                k += stride;
            }
            k -= px_per_frame;
        }
        let nq = NeuQuant::new(speed, COLORS, &train);
        let mut rgb = nq.color_map_rgb();
        rgb.resize(256 * 3, 0);
        Palette {
            nq,
            rgb,
            cache: vec![u16::MAX; 1 << 21],
        }
    }

    fn index(&mut self, r: u8, g: u8, b: u8) -> u8 {
        let key = (usize::from(r >> 1) << 14) | (usize::from(g >> 1) << 7) | usize::from(b >> 1);
        let cached = self.cache[key];
        if cached != u16::MAX {
            return cached as u8;
        }
        let idx = self
            .nq
            .index_of(&[r | 1, g | 1, b | 1, 255])
            .min(COLORS - 1) as u8;
        self.cache[key] = u16::from(idx);
        idx
    }
}

/// Encodes a video as an animated GIF.
pub fn encode_gif(video: &Video, opts: &GifOptions) -> Result<Vec<u8>> {
    let (w, h) = (video.width(), video.height());
    if w > u32::from(u16::MAX) || h > u32::from(u16::MAX) {
        return Err(MediaError::InvalidSize(format!(
            "{w}x{h} is too large for GIF (at most 65535 a side)"
        )));
    }
    if !(1..=30).contains(&opts.palette_speed) {
        return Err(MediaError::InvalidOption(format!(
            "GIF palette_speed {} is out of range; use 1 (best) to 30 (fastest), default 10",
            opts.palette_speed
        )));
    }
    let gif_err = |e: gif::EncodingError| MediaError::Image(format!("GIF: {e}"));
    let mut palette = Palette::learn(video, opts.palette_speed);
    let mut out = Cursor::new(Vec::new());
    {
        let mut enc =
            gif::Encoder::new(&mut out, w as u16, h as u16, &palette.rgb).map_err(gif_err)?;
        enc.set_repeat(if opts.repeat {
            gif::Repeat::Infinite
        } else {
            gif::Repeat::Finite(0)
        })
        .map_err(gif_err)?;
        let (wu, hu) = (w as usize, h as usize);
        let mut prev: Option<Vec<u8>> = None;
        for (fi, delay) in gif_schedule(video.len(), video.fps()) {
            let data = video.frames()[fi].data();
            let idx: Vec<u8> = data
                .chunks_exact(3)
                .map(|p| palette.index(p[0], p[1], p[2]))
                .collect();
            let mut frame = gif::Frame {
                delay,
                dispose: gif::DisposalMethod::Keep,
                ..gif::Frame::default()
            };
            match &prev {
                None => {
                    frame.width = w as u16;
                    frame.height = h as u16;
                    frame.buffer = Cow::Borrowed(&idx);
                    enc.write_frame(&frame).map_err(gif_err)?;
                }
                Some(p) => {
                    // Bounding box of changed pixels.
                    let (mut x0, mut y0, mut x1, mut y1) = (wu, hu, 0usize, 0usize);
                    for y in 0..hu {
                        let row = &idx[y * wu..(y + 1) * wu];
                        let prow = &p[y * wu..(y + 1) * wu];
                        if row == prow {
                            continue;
                        }
                        let first = row.iter().zip(prow).position(|(a, b)| a != b).unwrap_or(0);
                        let last = row
                            .iter()
                            .zip(prow)
                            .rposition(|(a, b)| a != b)
                            .unwrap_or(wu - 1);
                        x0 = x0.min(first);
                        x1 = x1.max(last);
                        y0 = y0.min(y);
                        y1 = y1.max(y);
                    }
                    if x0 > x1 {
                        // Nothing changed: one transparent pixel carries the delay.
                        x0 = 0;
                        y0 = 0;
                        x1 = 0;
                        y1 = 0;
                    }
                    let (cw, ch) = (x1 - x0 + 1, y1 - y0 + 1);
                    let mut buf = Vec::with_capacity(cw * ch);
                    for y in y0..=y1 {
                        for x in x0..=x1 {
                            let i = y * wu + x;
                            buf.push(if idx[i] == p[i] { TRANSPARENT } else { idx[i] });
                        }
                    }
                    frame.left = x0 as u16;
                    frame.top = y0 as u16;
                    frame.width = cw as u16;
                    frame.height = ch as u16;
                    frame.transparent = Some(TRANSPARENT);
                    frame.buffer = Cow::Owned(buf);
                    enc.write_frame(&frame).map_err(gif_err)?;
                }
            }
            prev = Some(idx);
        }
    }
    Ok(out.into_inner())
}

/// Writes a video as an animated GIF file.
pub fn write_gif(path: impl AsRef<Path>, video: &Video, opts: &GifOptions) -> Result<()> {
    write_file_atomic(path.as_ref(), &encode_gif(video, opts)?)
}

/// (width, height, frames, duration in seconds) of a GIF.
pub(crate) fn probe_gif(bytes: &[u8]) -> Result<(u32, u32, u64, f64)> {
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    opts.set_memory_limit(gif::MemoryLimit::Bytes(
        std::num::NonZeroU64::new(1 << 30).unwrap_or(std::num::NonZeroU64::MIN),
    ));
    let mut dec = opts
        .read_info(Cursor::new(bytes))
        .map_err(|e| MediaError::corrupt("GIF", e.to_string()))?;
    let (w, h) = (u32::from(dec.width()), u32::from(dec.height()));
    let mut frames = 0u64;
    let mut cs = 0u64;
    while let Some(f) = dec
        .read_next_frame()
        .map_err(|e| MediaError::corrupt("GIF", e.to_string()))?
    {
        frames += 1;
        cs += u64::from(f.delay);
    }
    if frames == 0 {
        return Err(MediaError::corrupt("GIF", "no frames"));
    }
    Ok((w, h, frames, cs as f64 / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_keeps_exact_total() {
        let s = gif_schedule(121, Fps::integer(16).unwrap());
        assert_eq!(s.len(), 121);
        let total: u64 = s.iter().map(|&(_, d)| u64::from(d)).sum();
        assert_eq!(total, 756); // 7.5625 s rounded to centiseconds
        assert!(s.iter().all(|&(_, d)| d == 6 || d == 7));
    }

    #[test]
    fn schedule_drops_frames_above_50_fps() {
        let s = gif_schedule(120, Fps::integer(60).unwrap());
        assert!(s.iter().all(|&(_, d)| d >= 2));
        let total: u64 = s.iter().map(|&(_, d)| u64::from(d)).sum();
        assert_eq!(total, 200);
        assert!(s.len() < 120 && s.len() >= 60, "{}", s.len());
    }
}
