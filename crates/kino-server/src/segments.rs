//! Videos longer than one clip, and extensions (`POST /v1/videos/extensions`), made in
//! segments of the model's clip length.
//!
//! A job with [`LongJob`] in its parameters runs one `generate` call per segment. Segment 0 of a
//! create starts as any video does (text, or `input_reference`); every later segment — and
//! every segment of an extension — is `Conditioning::Continue` on the last frames made so far
//! (the last frame for first-image models, the last `overlap_history` frames for SkyReels-V2
//! diffusion-forcing ones), which returns only the new frames. Segment `k` uses seed `seed + k`.
//!
//! This is the server's own minimal segment loop, not `kino_engine::long_video` (which `kino
//! extend` uses): that planner conditions each segment with `Conditioning::Image` on one last
//! frame and refuses models without a first image, so it cannot continue with a
//! diffusion-forcing model's `overlap_history` frames, and its resume takes only a last frame.
//! The two should become one path once the engine's planner runs `Conditioning::Continue`.
//!
//! **Finished segments are kept.** Each one's frames go to
//! `DATA_DIR/videos/<id>/segments/segment_NNN.rgb` (raw RGB, `height × width × 3` per frame,
//! written to a temporary name and renamed, so a file there is whole). A job started again
//! after a crash or restart skips the segments whose file is there, continues from their last
//! frames, and stitches source + segments into one MP4 when the last one is done; then the
//! folder is removed. A cancelled or failed job removes it too.

use std::io::Write;
use std::path::{Path, PathBuf};

use kino_engine::wan::pipeline::RgbImage;
use serde::{Deserialize, Serialize};

/// One planned segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Frames asked of the model (a valid frame count).
    pub num_frames: usize,
    /// Frames kept: all of them for a first segment that starts the video; for a continuation
    /// at most `num_frames − 1` (the model returns only the new ones), fewer in a shortened
    /// last segment.
    pub keep: usize,
}

/// A video made in segments (stored in the job's parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongJob {
    /// The job continues its stored source video (`inputs.video`): an extension.
    pub extends: bool,
    /// Frames of the source, at the output's size and fps, that come first (extensions).
    #[serde(default)]
    pub source_frames: usize,
    pub segments: Vec<Segment>,
}

impl LongJob {
    /// Frames the segments add.
    pub fn new_frames(&self) -> usize {
        self.segments.iter().map(|s| s.keep).sum()
    }

    /// Frames of the finished video.
    pub fn total_frames(&self) -> usize {
        self.source_frames + self.new_frames()
    }

    /// Whether segment `k` continues what came before (else it starts the video).
    pub fn continues(&self, k: usize) -> bool {
        self.extends || k > 0
    }
}

/// The smallest valid frame count (`step·k + 1`) of at least `n`.
fn valid_at_least(n: usize, step: usize) -> usize {
    let step = step.max(1);
    (n.max(1) - 1).div_ceil(step) * step + 1
}

/// Segments of at most `clip` frames that add `new_frames` frames; the first starts the video
/// unless `extends` (then every segment continues).
pub fn plan(new_frames: usize, clip: usize, step: usize, extends: bool) -> Vec<Segment> {
    let clip = clip.max(step.max(1) + 1);
    let mut segs = Vec::new();
    let mut left = new_frames;
    if !extends && left > 0 {
        let n = left.min(clip);
        let n = valid_at_least(n, step).min(valid_at_least(clip, step));
        segs.push(Segment {
            num_frames: n,
            keep: n.min(left),
        });
        left -= n.min(left);
    }
    while left > 0 {
        let most = clip - 1;
        let keep = left.min(most);
        segs.push(Segment {
            num_frames: valid_at_least(keep + 1, step),
            keep,
        });
        left -= keep;
    }
    segs
}

/// Where a job's finished segments are kept.
pub fn segments_dir(data_dir: &Path, id: &str) -> PathBuf {
    crate::video_dir(data_dir, id).join("segments")
}

/// The file of segment `k`.
pub fn segment_file(data_dir: &Path, id: &str, k: usize) -> PathBuf {
    segments_dir(data_dir, id).join(format!("segment_{k:03}.rgb"))
}

/// How many leading segments are finished (their files are there and whole).
pub fn finished(data_dir: &Path, id: &str, job: &LongJob, frame_bytes: usize) -> usize {
    job.segments
        .iter()
        .enumerate()
        .take_while(|(k, s)| {
            std::fs::metadata(segment_file(data_dir, id, *k))
                .is_ok_and(|m| m.len() == (s.keep * frame_bytes) as u64)
        })
        .count()
}

/// Writes segment `k`'s frames (a temporary file, then a rename).
pub fn write_segment(
    data_dir: &Path,
    id: &str,
    k: usize,
    frames: &[Vec<u8>],
) -> std::io::Result<()> {
    let dir = segments_dir(data_dir, id);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".segment_{k:03}.rgb.tmp"));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for fr in frames {
            f.write_all(fr)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, segment_file(data_dir, id, k))
}

/// Reads segment `k`'s frames back.
pub fn read_segment(
    data_dir: &Path,
    id: &str,
    k: usize,
    frame_bytes: usize,
) -> std::io::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(segment_file(data_dir, id, k))?;
    if frame_bytes == 0 || bytes.len() % frame_bytes != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "segment {k} holds {} bytes, not whole frames of {frame_bytes}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes.chunks(frame_bytes).map(<[u8]>::to_vec).collect())
}

/// Removes a job's segments (ignoring a folder that is not there).
pub fn remove_segments(data_dir: &Path, id: &str) {
    let dir = segments_dir(data_dir, id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
    }
}

/// Keeps the last `n` frames of `tail` after appending `frames`.
pub fn push_tail(tail: &mut Vec<RgbImage>, frames: Vec<RgbImage>, n: usize) {
    tail.extend(frames);
    let n = n.max(1);
    if tail.len() > n {
        tail.drain(..tail.len() - n);
    }
}

/// The overall progress (0–95) inside segment `k` of `n` when that segment is at `pct` (0–97,
/// [`crate::worker::progress_percent`]); 95–99 is the stitching.
pub fn overall_percent(k: usize, n: usize, pct: u8) -> u8 {
    let n = n.max(1) as f64;
    let within = (f64::from(pct) / 97.0).clamp(0.0, 1.0);
    ((k as f64 + within) / n * 95.0).floor().min(95.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_add_exactly_the_frames_asked() {
        // Tiny TI2V: 17-frame clips, step 4. 4 s at 8 fps = 33 frames: 17 + 16.
        let p = plan(33, 17, 4, false);
        assert_eq!(
            p,
            vec![
                Segment {
                    num_frames: 17,
                    keep: 17
                },
                Segment {
                    num_frames: 17,
                    keep: 16
                }
            ]
        );
        // An extension of 32 frames: two continuations of 16 new frames each.
        let p = plan(32, 17, 4, true);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|s| s.num_frames == 17 && s.keep == 16));
        // A short last segment asks for the smallest valid count that gives its frames.
        let p = plan(20, 17, 4, true);
        assert_eq!(
            p[1],
            Segment {
                num_frames: 5,
                keep: 4
            }
        );
        for (n, clip, ext) in [
            (81, 81, false),
            (200, 81, false),
            (7, 17, true),
            (1, 17, true),
        ] {
            let p = plan(n, clip, 4, ext);
            assert_eq!(
                p.iter().map(|s| s.keep).sum::<usize>(),
                n,
                "{n} {clip} {ext}"
            );
            for (k, s) in p.iter().enumerate() {
                assert!(s.num_frames <= clip && (s.num_frames - 1) % 4 == 0, "{s:?}");
                let most = if ext || k > 0 {
                    s.num_frames - 1
                } else {
                    s.num_frames
                };
                assert!(s.keep <= most, "{s:?}");
            }
        }
        let one = plan(17, 17, 4, false);
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn segments_round_trip_and_count_as_finished_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let id = "video_ab";
        let job = LongJob {
            extends: true,
            source_frames: 3,
            segments: plan(8, 5, 4, true),
        };
        assert_eq!(job.segments.len(), 2);
        assert_eq!(job.total_frames(), 11);
        let fb = 2 * 2 * 3;
        assert_eq!(finished(dir.path(), id, &job, fb), 0);
        let frames: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; fb]).collect();
        write_segment(dir.path(), id, 0, &frames).unwrap();
        assert_eq!(finished(dir.path(), id, &job, fb), 1);
        assert_eq!(read_segment(dir.path(), id, 0, fb).unwrap(), frames);
        // A torn file does not count.
        std::fs::write(segment_file(dir.path(), id, 1), [0u8; 5]).unwrap();
        assert_eq!(finished(dir.path(), id, &job, fb), 1);
        remove_segments(dir.path(), id);
        assert_eq!(finished(dir.path(), id, &job, fb), 0);
    }

    #[test]
    fn progress_spans_all_segments() {
        assert_eq!(overall_percent(0, 2, 0), 0);
        assert!(overall_percent(0, 2, 97) <= overall_percent(1, 2, 0));
        assert_eq!(overall_percent(1, 2, 97), 95);
        assert!(overall_percent(1, 4, 50) < overall_percent(2, 4, 0));
    }
}
