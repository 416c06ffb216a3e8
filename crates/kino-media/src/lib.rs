//! Kino's frames side: RGB frames in, video files out, and back.
//!
//! Knows nothing of tensors. A [`Frame`] is an RGB24 buffer with a width and a height; a
//! [`Video`] is frames of one size plus an exact frame rate ([`Fps`]).
//!
//! - MP4/H.264 ([`write_mp4`], [`encode_mp4`], [`Mp4StreamWriter`] for long videos pushed a
//!   segment at a time, [`read_mp4`], [`decode_mp4`], [`read_metadata`]): Constrained Baseline H.264 4:2:0 8-bit from OpenH264 (built from
//!   source, no ffmpeg), in an MP4 written by our own muxer with `moov` before `mdat`,
//!   BT.709 limited range signalled in both the VUI and a `colr` box, and the generation
//!   parameters as JSON in `udta`.
//! - Animated GIF ([`write_gif`]), PNG frame folders ([`write_png_frames`]), thumbnails
//!   ([`write_thumbnail`]) and spritesheets ([`write_spritesheet`]).
//! - Still images in ([`read_image`], [`decode_image`]) and [`probe`] for any of these
//!   formats.
//! - Video files people have, in ([`read_video`], [`decode_video`], [`read_video_head`]):
//!   MP4/MOV/WebM/MKV with H.264 (B-frames too), H.265, VP9, AV1, … through FFmpeg's
//!   libraries, rotation applied.
//! - Fitting inputs to a model: [`fit_crop`] (resize to cover, centre-crop, as diffusers'
//!   `VaeImageProcessor` `resize_mode="crop"`) and [`conform_video`] (frame rate, length, size).
//!
//! Every error is a [`MediaError`] that says what was wrong and what to do.

mod color;
mod conform;
mod error;
mod frame;
mod gif;
mod h264;
mod luma;
mod mask;
mod meta;
mod mp4;
mod probe;
mod still;
mod util;
mod video_in;

pub use color::ColorSpace;
pub use conform::{conform_video, conform_video_file, fit_crop, frames_at, FitCrop};
pub use error::{MediaError, Result};
pub use frame::{psnr, psnr_video, Fps, Frame, Video, MAX_SIDE};
pub use gif::{encode_gif, write_gif, GifOptions};
pub use h264::Quality;
pub use luma::LumaPlane;
pub use mask::{
    check_mask_aspect, conform_mask, decode_mask, fill_masked, outpaint_canvas, outpaint_frame,
    paste_on_gray, read_mask, snap_to_multiple, MaskFrames, MaskReport, Outpaint, OutpaintPlan,
    MASK_ALL_BLACK, MASK_FILL_GRAY,
};
pub use meta::GenerationParams;
pub use mp4::{
    decode_mp4, encode_mp4, mp4_boxes, read_metadata, read_mp4, write_mp4, Mp4Options,
    Mp4StreamWriter, TopBox,
};
pub use probe::{probe, MediaFormat, MediaInfo};
pub use still::{
    decode_image, encode_image, evenly_spaced, fit_frame, png_frame_name, read_image, resize,
    spritesheet, thumbnail, write_image, write_png_frames, write_spritesheet, write_thumbnail,
    ImageFormat, SpritesheetLayout, SpritesheetOptions, ThumbnailOptions,
};
pub use video_in::{
    decode_video, decode_video_head, decode_video_head_luma, read_video, read_video_head,
    read_video_tail, scan_video, stream_video, VideoLayout, MAX_DECODED_BYTES,
};
