//! Videos longer than one clip, and extensions (`POST /v1/videos/extensions`), made in
//! segments: what of them is the server's.
//!
//! The segment loop is the engine's, [`kino_engine::long_video`] (the one `kino generate
//! --seconds` and `kino extend` run): segment 0 of a create starts as any video does (text, or
//! `input_reference`); every later segment, and every segment of an extension, continues the
//! end of what was made before (`Conditioning::Continue`: the last frame for first-image models,
//! with the plan's overlap cross-faded; a SkyReels-V2 diffusion-forcing model makes an
//! extension in one call, in its own windows). Segment `k` uses seed `seed + k`. This module
//! keeps the server's part: the plan stored in the job's parameters ([`LongJob`], made by the
//! API node from the model's settings alone, with the engine's pure
//! [`long_video::plan_segments`]) and the finished segments on disk.
//!
//! **Finished segments are kept.** Each one's frames go to
//! `DATA_DIR/videos/<id>/segments/segment_NNN.rgb` (raw RGB, `height × width × 3` per frame)
//! and what the next segment continues from to `segment_NNN.tail.rgb`, each written to a
//! temporary name and renamed (the tail first), so a frames file there is whole. A job started
//! again after a crash or restart skips the segments whose files are there, continues from the
//! last one's tail, and stitches source + segments into one MP4 when the last one is done; then
//! the folder is removed. A cancelled or failed job removes it too.

use std::io::Write;
use std::path::{Path, PathBuf};

use kino_engine::long_video::{self, PlanRules};
use serde::{Deserialize, Serialize};

use crate::mapping::ModelInfo;

/// One planned segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Frames asked of the model (a valid frame count).
    pub num_frames: usize,
    /// New frames it adds to the video.
    pub keep: usize,
    /// Leading frames cross-faded with the end of the segment before.
    #[serde(default)]
    pub blend: usize,
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
    /// Frames cross-faded at each seam between two segments (0: the repeated frame dropped).
    #[serde(default)]
    pub overlap: usize,
    /// Continued segments' colours matched to the frames they continue (the create or
    /// extension field `color_match`, as `kino generate --color-match`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub color_match: bool,
}

impl LongJob {
    /// Plans `new_frames` new frames on `model` (continuing its stored source when
    /// `extends`), as the engine will run them, with the engine's default overlap.
    pub fn plan(
        model: &ModelInfo,
        new_frames: usize,
        extends: bool,
        source_frames: usize,
    ) -> Result<LongJob, String> {
        let caps = model.capabilities;
        let native = caps.long_video;
        let overlap = if native {
            0
        } else {
            long_video::DEFAULT_OVERLAP
        };
        let rules = PlanRules {
            segment_frames: model.defaults.num_frames,
            frame_step: model.frame_step,
            native,
            continue_skip: long_video::continue_skip(
                caps,
                model.defaults.num_frames,
                model.frame_step,
            ),
        };
        let segs = long_video::plan_segments(
            &rules,
            extends,
            overlap,
            &[String::new()],
            Some(new_frames),
            0,
        )
        .map_err(|e| e.to_string())?;
        Ok(LongJob {
            extends,
            source_frames,
            segments: segs
                .iter()
                .map(|s| Segment {
                    num_frames: s.num_frames,
                    keep: s.keep,
                    blend: s.blend,
                })
                .collect(),
            overlap,
            color_match: false,
        })
    }

    /// Frames the segments add.
    pub fn new_frames(&self) -> usize {
        self.segments.iter().map(|s| s.keep).sum()
    }

    /// Frames of the finished video.
    pub fn total_frames(&self) -> usize {
        self.source_frames + self.new_frames()
    }

    /// Frames segment `k`'s file holds: its blended and new frames, less the ones the next
    /// segment blends ([`long_video::emitted`]).
    pub fn handed_out(&self, k: usize) -> usize {
        let s = &self.segments[k];
        let held = self.segments.get(k + 1).map_or(0, |n| n.blend);
        s.blend + s.keep - held
    }
}

/// Where a job's finished segments are kept.
pub fn segments_dir(data_dir: &Path, id: &str) -> PathBuf {
    crate::video_dir(data_dir, id).join("segments")
}

/// The file of segment `k`.
pub fn segment_file(data_dir: &Path, id: &str, k: usize) -> PathBuf {
    segments_dir(data_dir, id).join(format!("segment_{k:03}.rgb"))
}

/// The file of segment `k`'s tail (what segment `k + 1` continues from).
pub fn tail_file(data_dir: &Path, id: &str, k: usize) -> PathBuf {
    segments_dir(data_dir, id).join(format!("segment_{k:03}.tail.rgb"))
}

/// How many leading segments are finished (their frames file is there and whole, and their
/// tail too).
pub fn finished(data_dir: &Path, id: &str, job: &LongJob, frame_bytes: usize) -> usize {
    (0..job.segments.len())
        .take_while(|&k| {
            let whole = std::fs::metadata(segment_file(data_dir, id, k))
                .is_ok_and(|m| m.len() == (job.handed_out(k) * frame_bytes) as u64);
            let tail = std::fs::metadata(tail_file(data_dir, id, k))
                .is_ok_and(|m| frame_bytes > 0 && m.len() > 0 && m.len() % frame_bytes as u64 == 0);
            whole && tail
        })
        .count()
}

fn write_frames(dir: &Path, to: &Path, frames: &[&[u8]]) -> std::io::Result<()> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for fr in frames {
            f.write_all(fr)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, to)
}

/// Writes segment `k`'s frames and its tail (temporary files, then renames: the tail first).
pub fn write_segment(
    data_dir: &Path,
    id: &str,
    k: usize,
    frames: &[Vec<u8>],
    tail: &[&[u8]],
) -> std::io::Result<()> {
    let dir = segments_dir(data_dir, id);
    std::fs::create_dir_all(&dir)?;
    write_frames(&dir, &tail_file(data_dir, id, k), tail)?;
    let frames: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    write_frames(&dir, &segment_file(data_dir, id, k), &frames)
}

/// Reads segment `k`'s tail back.
pub fn read_tail(
    data_dir: &Path,
    id: &str,
    k: usize,
    frame_bytes: usize,
) -> std::io::Result<Vec<Vec<u8>>> {
    read_raw(&tail_file(data_dir, id, k), k, frame_bytes)
}

/// Reads segment `k`'s frames back.
pub fn read_segment(
    data_dir: &Path,
    id: &str,
    k: usize,
    frame_bytes: usize,
) -> std::io::Result<Vec<Vec<u8>>> {
    read_raw(&segment_file(data_dir, id, k), k, frame_bytes)
}

fn read_raw(path: &Path, k: usize, frame_bytes: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path)?;
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
    use kino_engine::wan::pipeline::{Capabilities, ModelDefaults};

    fn model(clip: usize, image: bool, long_video: bool) -> ModelInfo {
        ModelInfo {
            id: "m".into(),
            path: PathBuf::new(),
            defaults: ModelDefaults {
                num_frames: clip,
                ..Default::default()
            },
            size_multiple: (32, 32),
            frame_step: 4,
            capabilities: Capabilities {
                text: true,
                image,
                last_image: false,
                video: !image,
                long_video,
                vace: false,
            },
            num_layers: 1,
            two_experts: false,
        }
    }

    fn plan(n: usize, clip: usize, extends: bool) -> Vec<Segment> {
        let mut j = LongJob::plan(&model(clip, true, false), n, extends, 0).unwrap();
        assert_eq!(j.overlap, long_video::DEFAULT_OVERLAP);
        // The shapes below are the drop plan's; the blended plan's are checked in the engine.
        if j.overlap > 0 {
            let rules = PlanRules {
                segment_frames: clip,
                frame_step: 4,
                native: false,
                continue_skip: 1,
            };
            j.segments =
                long_video::plan_segments(&rules, extends, 0, &[String::new()], Some(n), 0)
                    .unwrap()
                    .iter()
                    .map(|s| Segment {
                        num_frames: s.num_frames,
                        keep: s.keep,
                        blend: s.blend,
                    })
                    .collect();
        }
        j.segments
    }

    #[test]
    fn plans_add_exactly_the_frames_asked() {
        let seg = |num_frames, keep| Segment {
            num_frames,
            keep,
            blend: 0,
        };
        // Tiny TI2V: 17-frame clips, step 4. 4 s at 8 fps = 33 frames: 17 + 16.
        assert_eq!(plan(33, 17, false), vec![seg(17, 17), seg(17, 16)]);
        // An extension of 32 frames: two continuations of 16 new frames each.
        let p = plan(32, 17, true);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|s| s.num_frames == 17 && s.keep == 16));
        // A short last segment asks for the smallest valid count that gives its frames.
        assert_eq!(plan(20, 17, true)[1], seg(5, 4));
        for (n, clip, ext) in [
            (81, 81, false),
            (200, 81, false),
            (7, 17, true),
            (1, 17, true),
        ] {
            let p = plan(n, clip, ext);
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
        assert_eq!(plan(17, 17, false).len(), 1);
        // A diffusion-forcing model extends in one call, in its own windows.
        let df = LongJob::plan(&model(21, false, true), 24, true, 73).unwrap();
        assert_eq!(df.segments, vec![seg(25, 24)]);
        assert_eq!(df.total_frames(), 97);
    }

    #[test]
    fn segments_round_trip_and_count_as_finished_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let id = "video_ab";
        let job = LongJob {
            extends: true,
            source_frames: 3,
            segments: plan(8, 5, true),
            overlap: 0,
            color_match: false,
        };
        assert_eq!(job.segments.len(), 2);
        assert_eq!(job.total_frames(), 11);
        let fb = 2 * 2 * 3;
        assert_eq!(finished(dir.path(), id, &job, fb), 0);
        let frames: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; fb]).collect();
        write_segment(dir.path(), id, 0, &frames, &[&frames[3]]).unwrap();
        assert_eq!(finished(dir.path(), id, &job, fb), 1);
        assert_eq!(read_segment(dir.path(), id, 0, fb).unwrap(), frames);
        assert_eq!(
            read_tail(dir.path(), id, 0, fb).unwrap(),
            [frames[3].clone()]
        );
        // A torn file does not count, nor frames without their tail.
        std::fs::write(segment_file(dir.path(), id, 1), [0u8; 5]).unwrap();
        assert_eq!(finished(dir.path(), id, &job, fb), 1);
        std::fs::write(segment_file(dir.path(), id, 1), vec![0u8; 4 * fb]).unwrap();
        assert_eq!(finished(dir.path(), id, &job, fb), 1);
        remove_segments(dir.path(), id);
        assert_eq!(finished(dir.path(), id, &job, fb), 0);
        // With an overlap, a segment's file holds its blended and new frames less the held.
        let blended = LongJob {
            extends: false,
            source_frames: 0,
            segments: vec![
                Segment {
                    num_frames: 17,
                    keep: 17,
                    blend: 0,
                },
                Segment {
                    num_frames: 17,
                    keep: 14,
                    blend: 2,
                },
            ],
            overlap: 2,
            color_match: false,
        };
        assert_eq!((blended.handed_out(0), blended.handed_out(1)), (15, 16));
    }

    #[test]
    fn progress_spans_all_segments() {
        assert_eq!(overall_percent(0, 2, 0), 0);
        assert!(overall_percent(0, 2, 97) <= overall_percent(1, 2, 0));
        assert_eq!(overall_percent(1, 2, 97), 95);
        assert!(overall_percent(1, 4, 50) < overall_percent(2, 4, 0));
    }
}
