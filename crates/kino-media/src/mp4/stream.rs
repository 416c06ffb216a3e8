//! A streaming MP4 writer: frames are pushed a batch at a time (e.g. one generated segment of a
//! long video), encoded at once and their samples appended to a temporary data file beside the
//! output, so memory holds one batch, never the whole video. [`Mp4StreamWriter::finish`]
//! writes `ftyp`, `moov` and the `mdat` header (fast start, as [`write_mp4`](super::write_mp4))
//! into a second temporary file, appends the data and renames it over the output; a writer
//! dropped unfinished removes its temporary files and leaves no output.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::mux::{self, SampleInfo};
use super::{h264_options, metadata_json, tool_name, Mp4Options};
use crate::error::{MediaError, Result};
use crate::frame::{Fps, Frame};
use crate::h264;

/// Writes an H.264 MP4 file from batches of frames (see the module docs).
///
/// ```no_run
/// # use kino_media::{Fps, Frame, Mp4Options, Mp4StreamWriter};
/// let mut w = Mp4StreamWriter::create("long.mp4", 64, 64, Fps::integer(8)?, Mp4Options::default())?;
/// for segment in 0..4u8 {
///     let frames: Vec<Frame> = (0..16).map(|_| Frame::filled(64, 64, [segment * 60, 0, 0])).collect::<Result<_, _>>()?;
///     w.push(&frames)?; // encoded now; only sizes are kept in memory
/// }
/// w.finish()?;
/// # Ok::<(), kino_media::MediaError>(())
/// ```
pub struct Mp4StreamWriter {
    path: PathBuf,
    data_path: PathBuf,
    data: Option<BufWriter<File>>,
    width: u32,
    height: u32,
    fps: Fps,
    opts: Mp4Options,
    sps: Vec<u8>,
    pps: Vec<u8>,
    samples: Vec<SampleInfo>,
}

use crate::util::sibling_temp;

impl Mp4StreamWriter {
    /// Starts a file of `width`×`height` frames at `fps`. Nothing appears at `path` until
    /// [`finish`](Self::finish).
    pub fn create(
        path: impl AsRef<Path>,
        width: u32,
        height: u32,
        fps: Fps,
        opts: Mp4Options,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        h264::check_encodable(width, height)?;
        // Checks the options now, not after the first batch.
        metadata_json(&opts)?;
        let data_path = sibling_temp(&path, "mdat.tmp")?;
        let file = File::create(&data_path).map_err(|e| MediaError::write(&data_path, e))?;
        Ok(Self {
            path,
            data_path,
            data: Some(BufWriter::new(file)),
            width,
            height,
            fps,
            opts,
            sps: Vec::new(),
            pps: Vec::new(),
            samples: Vec::new(),
        })
    }

    /// Frames written so far.
    pub fn frames(&self) -> usize {
        self.samples.len()
    }

    /// Replaces the generation parameters stored at [`finish`](Self::finish) (e.g. once the
    /// whole run is known).
    pub fn set_metadata(&mut self, metadata: Option<serde_json::Value>) -> Result<()> {
        let old = std::mem::replace(&mut self.opts.metadata, metadata);
        if let Err(e) = metadata_json(&self.opts) {
            self.opts.metadata = old;
            return Err(e);
        }
        Ok(())
    }

    /// Encodes `frames` (each of the writer's size) and appends them. Each batch starts with
    /// a key frame.
    pub fn push(&mut self, frames: &[Frame]) -> Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        if let Some((i, f)) = frames
            .iter()
            .enumerate()
            .find(|(_, f)| (f.width(), f.height()) != (self.width, self.height))
        {
            return Err(MediaError::InvalidVideo(format!(
                "frame {} is {}x{} but this video is {}x{}; all frames of a video must have one size",
                self.samples.len() + i,
                f.width(),
                f.height(),
                self.width,
                self.height
            )));
        }
        let stream = h264::encode(frames, self.fps, &h264_options(&self.opts))?;
        if self.samples.is_empty() {
            self.sps = stream.sps.clone();
            self.pps = stream.pps.clone();
        } else if self.sps != stream.sps || self.pps != stream.pps {
            return Err(MediaError::Codec(
                "the encoder produced different parameter sets for a later batch of frames".into(),
            ));
        }
        let data = self
            .data
            .as_mut()
            .ok_or_else(|| MediaError::Codec("the writer is already finished".into()))?;
        for u in &stream.units {
            data.write_all(&u.data)
                .map_err(|e| MediaError::write(&self.data_path, e))?;
            self.samples.push(SampleInfo {
                size: u.data.len() as u32,
                is_idr: u.is_idr,
            });
        }
        Ok(())
    }

    /// Writes the file: `ftyp`, `moov`, `mdat` (through a temporary file and a rename).
    pub fn finish(mut self) -> Result<()> {
        if self.samples.is_empty() {
            return Err(MediaError::InvalidVideo(
                "a video needs at least one frame; got none".into(),
            ));
        }
        if let Some(mut d) = self.data.take() {
            d.flush()
                .map_err(|e| MediaError::write(&self.data_path, e))?;
        }
        let header = mux::header(&mux::MuxInput {
            sps: &self.sps,
            pps: &self.pps,
            samples: &self.samples,
            width: self.width,
            height: self.height,
            fps: self.fps,
            color: self.opts.color,
            metadata_json: metadata_json(&self.opts)?,
            tool: tool_name(),
        });
        let out_tmp = sibling_temp(&self.path, "tmp")?;
        let result = (|| -> std::io::Result<()> {
            let mut out = BufWriter::new(File::create(&out_tmp)?);
            out.write_all(&header)?;
            let mut data = File::open(&self.data_path)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = data.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
            let f = out.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&out_tmp, &self.path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&out_tmp);
            return Err(MediaError::write(&self.path, e));
        }
        Ok(())
    }
}

impl Drop for Mp4StreamWriter {
    fn drop(&mut self) {
        self.data = None;
        let _ = std::fs::remove_file(&self.data_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Video;

    fn frames(w: u32, h: u32, n: u32, start: u32) -> Vec<Frame> {
        (start..start + n)
            .map(|t| {
                Frame::from_fn(w, h, |x, y| {
                    [(x * 200 / w + t * 3) as u8, (y * 150 / h + 40) as u8, 128]
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn batches_make_one_fast_start_file_equal_to_the_frames() {
        let dir = tempfile_dir("stream");
        let path = dir.join("long.mp4");
        let fps = Fps::integer(8).unwrap();
        let meta = serde_json::json!({"segments": 3});
        let mut w = Mp4StreamWriter::create(
            &path,
            32,
            32,
            fps,
            Mp4Options {
                metadata: Some(serde_json::json!({"early": true})),
                ..Default::default()
            },
        )
        .unwrap();
        let mut all = Vec::new();
        for (k, n) in [17u32, 16, 5].into_iter().enumerate() {
            let f = frames(32, 32, n, k as u32 * 20);
            w.push(&f).unwrap();
            all.extend(f);
        }
        assert_eq!(w.frames(), 38);
        assert!(!path.exists(), "nothing at the output before finish");
        let e = w.push(&frames(16, 16, 1, 0)).unwrap_err();
        assert!(e.to_string().contains("16x16"), "{e}");
        w.set_metadata(Some(meta.clone())).unwrap();
        w.finish().unwrap();
        let back = crate::read_mp4(&path).unwrap();
        assert_eq!(back.len(), 38);
        assert_eq!(back.fps(), fps);
        let p = crate::psnr_video(&all, back.frames()).unwrap();
        assert!(p > 30.0, "{p:.2}");
        let kinds: Vec<String> = crate::mp4_boxes(&path)
            .unwrap()
            .into_iter()
            .map(|b| b.kind)
            .collect();
        assert_eq!(kinds, ["ftyp", "moov", "mdat"]);
        assert_eq!(crate::read_metadata(&path).unwrap(), Some(meta));
        // Only the output is left in the folder.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("long.mp4")]);
        // The same frames in one batch give a file of the same length in frames.
        let one =
            crate::encode_mp4(&Video::new(all, fps).unwrap(), &Mp4Options::default()).unwrap();
        assert_eq!(crate::decode_mp4(&one).unwrap().len(), 38);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dropped_unfinished_leaves_nothing() {
        let dir = tempfile_dir("drop");
        let path = dir.join("x.mp4");
        let fps = Fps::integer(8).unwrap();
        {
            let mut w = Mp4StreamWriter::create(&path, 16, 16, fps, Mp4Options::default()).unwrap();
            w.push(&frames(16, 16, 3, 0)).unwrap();
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let w = Mp4StreamWriter::create(&path, 16, 16, fps, Mp4Options::default()).unwrap();
        let e = w.finish().unwrap_err();
        assert!(e.to_string().contains("at least one frame"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let e = Mp4StreamWriter::create(&path, 15, 16, fps, Mp4Options::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("15"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "kino-media-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
