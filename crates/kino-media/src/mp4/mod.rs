//! MP4 (H.264 in ISO-BMFF) writing and reading.
//!
//! Files are written with `moov` before `mdat` ("fast start"), an `avcC` built from the
//! stream's SPS/PPS, length-prefixed samples, an exact constant frame rate, a sync-sample
//! table for the IDR frames, a `colr` box that matches the VUI (BT.709 limited range by
//! default), and the generation parameters as JSON in `moov/udta/meta/ilst` twice: as the
//! `©cmt` comment (what `ffprobe` shows as `comment`) and as a freeform `----` entry
//! (`com.kino.video` / `generation`, shown by `ffprobe` as `generation`).

mod demux;
mod mux;
mod stream;

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use demux::TopBox;
pub use stream::Mp4StreamWriter;

use crate::color::ColorSpace;
use crate::error::{MediaError, Result};
use crate::frame::{Fps, Frame, Video};
use crate::h264::{self, H264Decoder, H264Options, Quality};
use crate::util::write_file_atomic;

pub(crate) use demux::{read_movie, Movie};

/// "mean" of our freeform metadata entry.
pub(crate) const KINO_META_MEAN: &str = "com.kino.video";
/// "name" of our freeform metadata entry.
pub(crate) const KINO_META_NAME: &str = "generation";

/// Settings for writing MP4.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mp4Options {
    /// Quality: a constant QP (default [`Quality::DEFAULT_QP`]) or a target bitrate.
    pub quality: Quality,
    /// Encoder threads (parallel segments); 0 = one per core.
    pub threads: usize,
    /// Frames between key frames; 0 = about every 2 seconds.
    pub keyframe_interval: u32,
    /// Colour space (default BT.709 limited range).
    pub color: ColorSpace,
    /// Generation parameters to store in the file (read back with [`read_metadata`]).
    pub metadata: Option<serde_json::Value>,
}

/// Encodes a video to MP4 bytes in memory.
pub fn encode_mp4(video: &Video, opts: &Mp4Options) -> Result<Vec<u8>> {
    let stream = h264::encode(video.frames(), video.fps(), &h264_options(opts))?;
    let metadata_json = metadata_json(opts)?;
    let samples: Vec<mux::SampleInfo> = stream
        .units
        .iter()
        .map(|u| mux::SampleInfo {
            size: u.data.len() as u32,
            is_idr: u.is_idr,
        })
        .collect();
    let data: Vec<&[u8]> = stream.units.iter().map(|u| u.data.as_slice()).collect();
    Ok(mux::mux(
        &mux::MuxInput {
            sps: &stream.sps,
            pps: &stream.pps,
            samples: &samples,
            width: video.width(),
            height: video.height(),
            fps: video.fps(),
            color: opts.color,
            metadata_json,
            tool: tool_name(),
        },
        &data,
    ))
}

/// `©too`: what wrote the file.
fn tool_name() -> String {
    format!("Kino kino-media {} (OpenH264)", env!("CARGO_PKG_VERSION"))
}

fn h264_options(opts: &Mp4Options) -> H264Options {
    H264Options {
        quality: opts.quality,
        threads: opts.threads,
        keyframe_interval: opts.keyframe_interval,
        color: opts.color,
    }
}

fn metadata_json(opts: &Mp4Options) -> Result<Option<String>> {
    opts.metadata
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| MediaError::InvalidOption(format!("metadata is not serialisable: {e}")))
}

/// Encodes a video and writes it to `path` (through a temporary file in the same folder, so
/// a failed write never leaves half a file behind).
pub fn write_mp4(path: impl AsRef<Path>, video: &Video, opts: &Mp4Options) -> Result<()> {
    let bytes = encode_mp4(video, opts)?;
    write_file_atomic(path.as_ref(), &bytes)
}

fn open(path: &Path) -> Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| MediaError::read(path, e))
}

fn movie_fps(track: &demux::VideoTrack) -> Result<Fps> {
    let n: u64 = track.sizes.len() as u64;
    let mut distinct = track.deltas.iter().filter(|(c, _)| *c > 0).map(|&(_, d)| d);
    let first = distinct.next();
    let constant = first.is_some_and(|d| distinct.all(|x| x == d));
    match first {
        Some(d) if constant && d > 0 => Fps::new(track.timescale, d),
        _ => {
            let total: u64 = track
                .deltas
                .iter()
                .map(|&(c, d)| u64::from(c) * u64::from(d))
                .sum();
            if total == 0 || n == 0 {
                return Err(MediaError::corrupt(
                    "MP4",
                    "video track has zero duration; cannot tell its frame rate",
                ));
            }
            Fps::approx(n as f64 * f64::from(track.timescale) / total as f64)
        }
    }
}

fn video_track(movie: &Movie) -> Result<&demux::VideoTrack> {
    let track = movie
        .video
        .as_ref()
        .ok_or_else(|| MediaError::Unsupported("the MP4 file has no video track".to_string()))?;
    if &track.codec != b"avc1" && &track.codec != b"avc3" {
        return Err(MediaError::Unsupported(format!(
            "video codec '{}' is not H.264 (avc1); only H.264 MP4 files can be read",
            demux::fourcc(&track.codec)
        )));
    }
    Ok(track)
}

fn decode_from<R: Read + Seek>(r: &mut R) -> Result<Video> {
    let movie = read_movie(r)?;
    let track = video_track(&movie)?;
    if track.has_ctts {
        return Err(MediaError::Unsupported(
            "the H.264 stream uses B-frames (reordered pictures), which this reader does not \
             decode; re-encode with the Baseline profile"
                .to_string(),
        ));
    }
    if track.sps.is_empty() || track.pps.is_empty() {
        return Err(MediaError::corrupt(
            "MP4",
            "the 'avcC' box has no SPS/PPS parameter sets",
        ));
    }
    let sps_info = track.sps.first().and_then(|s| h264::parse_sps(s));
    let matrix = track.matrix().or_else(|| {
        sps_info.map(|i| crate::color::YuvMatrix::from_code(i.matrix, i.full_range, i.height))
    });
    let fps = movie_fps(track)?;
    let mut dec = H264Decoder::new(&track.sps, &track.pps, track.length_size, matrix)?;
    let mut frames: Vec<Frame> = Vec::with_capacity(track.sizes.len());
    let mut buf = Vec::new();
    for i in 0..track.sizes.len() {
        demux::read_sample(r, track, movie.file_len, i, &mut buf)?;
        if let Some(f) = dec.decode(&buf, i)? {
            frames.push(f);
        }
    }
    frames.extend(dec.flush()?);
    if frames.len() != track.sizes.len() {
        return Err(MediaError::corrupt(
            "H.264",
            format!(
                "decoded {} pictures from {} samples",
                frames.len(),
                track.sizes.len()
            ),
        ));
    }
    Video::new(frames, fps)
}

/// Reads an H.264 MP4 file into frames and its frame rate.
pub fn read_mp4(path: impl AsRef<Path>) -> Result<Video> {
    let path = path.as_ref();
    decode_from(&mut open(path)?).map_err(|e| with_path(e, path))
}

/// Decodes H.264 MP4 bytes into frames and its frame rate.
pub fn decode_mp4(bytes: &[u8]) -> Result<Video> {
    decode_from(&mut Cursor::new(bytes))
}

/// Generation parameters stored in an MP4 file by [`write_mp4`] (our freeform entry, or
/// else a `©cmt` comment that parses as JSON); `None` if the file has none.
pub fn read_metadata(path: impl AsRef<Path>) -> Result<Option<serde_json::Value>> {
    let path = path.as_ref();
    let movie = read_movie(&mut open(path)?).map_err(|e| with_path(e, path))?;
    Ok(movie_metadata(&movie))
}

pub(crate) fn movie_metadata(movie: &Movie) -> Option<serde_json::Value> {
    movie
        .kino_json
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .or_else(|| {
            movie
                .comment
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok())
        })
}

/// The top-level boxes of an MP4 file in file order (e.g. to check that `moov` comes
/// before `mdat`).
pub fn mp4_boxes(path: impl AsRef<Path>) -> Result<Vec<TopBox>> {
    let path = path.as_ref();
    let movie = read_movie(&mut open(path)?).map_err(|e| with_path(e, path))?;
    Ok(movie.top)
}

pub(crate) struct Mp4Probe {
    pub width: u32,
    pub height: u32,
    pub frames: u64,
    pub fps: Fps,
    pub duration_secs: f64,
    pub metadata: Option<serde_json::Value>,
}

pub(crate) fn probe_mp4<R: Read + Seek>(r: &mut R) -> Result<Mp4Probe> {
    let movie = read_movie(r)?;
    let track = movie
        .video
        .as_ref()
        .ok_or_else(|| MediaError::Unsupported("the MP4 file has no video track".to_string()))?;
    let (mut width, mut height) = (track.width, track.height);
    if let Some(info) = track.sps.first().and_then(|s| h264::parse_sps(s)) {
        width = info.width;
        height = info.height;
    }
    Ok(Mp4Probe {
        width,
        height,
        frames: track.sizes.len() as u64,
        fps: movie_fps(track)?,
        duration_secs: track.duration as f64 / f64::from(track.timescale),
        metadata: movie_metadata(&movie),
    })
}

/// Adds the file name to a corrupt-input message.
pub(crate) fn with_path(e: MediaError, path: &Path) -> MediaError {
    match e {
        MediaError::Corrupt { format, reason } => MediaError::Corrupt {
            format,
            reason: format!("{}: {reason}", path.display()),
        },
        MediaError::Unsupported(m) => MediaError::Unsupported(format!("{}: {m}", path.display())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(w: u32, h: u32, n: u32) -> Video {
        let frames = (0..n)
            .map(|t| {
                Frame::from_fn(w, h, |x, y| {
                    [(x * 200 / w + t) as u8, (y * 150 / h + 40) as u8, 128]
                })
                .unwrap()
            })
            .collect();
        Video::new(frames, Fps::integer(12).unwrap()).unwrap()
    }

    #[test]
    fn roundtrip_odd_shapes_and_lengths() {
        let e = encode_mp4(&video(2, 2, 1), &Mp4Options::default()).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        for (w, h, n) in [(16, 16, 1), (18, 16, 3), (34, 16, 9), (64, 48, 17)] {
            let v = video(w, h, n);
            let bytes = encode_mp4(&v, &Mp4Options::default()).unwrap();
            let back = decode_mp4(&bytes).unwrap();
            assert_eq!(back.len(), n as usize, "{w}x{h}x{n}");
            assert_eq!((back.width(), back.height()), (w, h));
            assert_eq!(back.fps(), v.fps());
            let p = crate::psnr_video(v.frames(), back.frames()).unwrap();
            assert!(p > 30.0, "{w}x{h}x{n}: {p:.2}");
            let movie = read_movie(&mut Cursor::new(&bytes)).unwrap();
            let kinds: Vec<&str> = movie.top.iter().map(|b| b.kind.as_str()).collect();
            assert_eq!(kinds, ["ftyp", "moov", "mdat"]);
        }
    }

    #[test]
    fn timing_is_exact() {
        assert_eq!(mux::timing(Fps::integer(16).unwrap()), (16_000, 1_000));
        assert_eq!(
            mux::timing(Fps::new(24_000, 1001).unwrap()),
            (24_000_000, 1_001_000)
        );
    }

    #[test]
    fn metadata_roundtrip_in_memory() {
        let v = video(16, 16, 2);
        let meta = serde_json::json!({"prompt": "p", "seed": 1, "nested": {"a": [1.5, null]}});
        let opts = Mp4Options {
            metadata: Some(meta.clone()),
            ..Default::default()
        };
        let bytes = encode_mp4(&v, &opts).unwrap();
        let movie = read_movie(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(movie_metadata(&movie), Some(meta));
        let plain = encode_mp4(&v, &Mp4Options::default()).unwrap();
        let movie = read_movie(&mut Cursor::new(&plain)).unwrap();
        assert_eq!(movie_metadata(&movie), None);
    }
}
