//! Reading the video files people have — MP4/MOV/WebM/MKV from phones, cameras and ffmpeg, in
//! H.264 (any profile, B-frames included), H.265, VP9, AV1 and whatever else the system's FFmpeg
//! decodes — through FFmpeg's libraries (`libavformat`, `libavcodec`, `libswscale`, via the
//! `ffmpeg-next` crate).
//!
//! What is done to a file:
//! - the best video stream is decoded (frame threads on all cores) in presentation order and
//!   converted to RGB24 with the YUV matrix and range the stream declares (BT.601 when it
//!   declares none, as the `ffmpeg` command line does);
//! - on request ([`decode_video_head_luma`]) each picture's luma as the stream codes it, before
//!   the RGB conversion rounds, clips and biases it ([`LumaPlane`], for the watermark detector);
//! - a phone's rotation (the stream's display matrix) is applied: a portrait clip stored as
//!   1920×1080 with "rotate 90" comes out 1080×1920;
//! - the frame rate is the stream's average rate; a variable-frame-rate clip is put on that
//!   constant rate by taking, for each output instant, the frame with the nearest timestamp.
//!
//! Kino's own MP4s go through FFmpeg too: it is the faster reader of them (81 frames of 832×480,
//! whole process, median of 7 on 2 cores: 0.31 s against 0.51 s for the pure-Rust
//! [`read_mp4`](crate::read_mp4), which stays for its callers).
//!
//! Every failure is one [`MediaError`] naming the file and saying what to do; no input panics.

use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::Once;

use ff::codec::threading;
use ff::format::context::{Input, StreamIo};
use ff::media::Type as MediaType;
use ff::software::scaling::{Context as Scaler, Flags as ScaleFlags};
use ffmpeg_next as ff;

use crate::color::{YuvMatrix, YuvPlanes};
use crate::error::{MediaError, Result};
use crate::frame::{Fps, Frame, Video, MAX_SIDE};
use crate::luma::LumaPlane;

/// The most RGB bytes one call decodes (6 GiB: e.g. 1000 frames of 1080p); past that the clip
/// is refused with a message saying to trim it or to read only its start.
pub const MAX_DECODED_BYTES: u64 = 6 << 30;

const WHAT: &str = "video";

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration is a no-op on FFmpeg ≥ 4 but harmless; our errors say what went wrong,
        // so FFmpeg's own log lines would only repeat it on stderr.
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Quiet);
    });
}

/// Reads a whole video file (any container and codec the system's FFmpeg reads: MP4, MOV,
/// WebM, MKV, … with H.264, H.265, VP9, AV1, …) into RGB frames and a constant frame rate.
/// Rotation metadata is applied. Clips whose frames would take more than
/// [`MAX_DECODED_BYTES`] are refused; use [`read_video_head`] to read only the start.
pub fn read_video(path: &Path) -> Result<Video> {
    read_video_head(path, f64::INFINITY)
}

/// [`read_video`] on bytes in memory (an upload, say).
pub fn decode_video(bytes: &[u8]) -> Result<Video> {
    decode_video_head(bytes, f64::INFINITY)
}

/// Reads the first `seconds` of a video file (every frame that starts before `seconds`, plus
/// the next one when there is one), otherwise as [`read_video`]. A clip shorter than `seconds`
/// is read whole, so the result's duration tells how long it is.
pub fn read_video_head(path: &Path, seconds: f64) -> Result<Video> {
    // Opened ourselves first so a missing or unreadable file gets the usual I/O message.
    let input = open_file(path)?;
    decode_input(input, seconds).map_err(|e| crate::mp4::with_path(e, path))
}

/// [`read_video_head`] on bytes in memory.
pub fn decode_video_head(bytes: &[u8], seconds: f64) -> Result<Video> {
    decode_input(open_bytes(bytes)?, seconds)
}

/// [`decode_video_head`] with each frame's luma as the stream codes it ([`LumaPlane`]: before
/// the conversion to 8-bit RGB rounds, clips and biases it), one plane per frame of the video.
pub fn decode_video_head_luma(bytes: &[u8], seconds: f64) -> Result<(Video, Vec<LumaPlane>)> {
    let out = decode(open_bytes(bytes)?, seconds, Keep::All, true)?;
    let times: Vec<Option<f64>> = out.frames.iter().map(|d| d.time).collect();
    let (fps, index) = grid(&times, out.fps_hint)?;
    let luma = index
        .iter()
        .map(|&k| {
            let d = &out.frames[k];
            d.luma
                .clone()
                .unwrap_or_else(|| LumaPlane::from_frame(&d.frame))
        })
        .collect();
    let video = Video::new(
        index.iter().map(|&k| out.frames[k].frame.clone()).collect(),
        fps,
    )?;
    Ok((video, luma))
}

fn open_bytes(bytes: &[u8]) -> Result<Input> {
    init();
    if bytes.is_empty() {
        return Err(MediaError::corrupt(WHAT, "the file is empty"));
    }
    refuse_stills(bytes)?;
    let io = StreamIo::from_read_seek(Cursor::new(bytes.to_vec()))
        .map_err(|e| MediaError::corrupt(WHAT, format!("cannot set up reading: {e}")))?;
    ff::format::input_from_stream(io, None, None).map_err(open_error)
}

/// FFmpeg would read a PNG, JPEG or WebP as a one-frame "video"; say what it is instead.
fn refuse_stills(head: &[u8]) -> Result<()> {
    use crate::probe::MediaFormat;
    let kind = match MediaFormat::sniff(head) {
        Some(MediaFormat::Png) => "PNG",
        Some(MediaFormat::Jpeg) => "JPEG",
        Some(MediaFormat::Webp) => "WebP",
        _ => return Ok(()),
    };
    Err(MediaError::Unsupported(format!(
        "it is a still {kind} image, not a video; give a video clip (MP4, MOV, WebM or MKV), or \
         use the picture as a first image instead"
    )))
}

fn open_error(e: ff::Error) -> MediaError {
    match e {
        ff::Error::InvalidData | ff::Error::Eof => MediaError::corrupt(
            WHAT,
            "FFmpeg cannot read it as a video file (unknown format, or the file is truncated or \
             damaged); MP4, MOV, WebM and MKV with H.264, H.265, VP9 or AV1 can be read",
        ),
        ff::Error::DemuxerNotFound => MediaError::Unsupported(
            "not a video container FFmpeg knows; use MP4, MOV, WebM or MKV".to_string(),
        ),
        other => MediaError::corrupt(WHAT, format!("FFmpeg cannot open it: {other}")),
    }
}

/// The stream's display rotation in degrees clockwise (0, 90, 180 or 270), from its display
/// matrix, as the `ffmpeg` command line's autorotate reads it.
fn rotation(stream: &ff::format::stream::Stream) -> u32 {
    for sd in stream.side_data() {
        if sd.kind() != ff::codec::packet::side_data::Type::DisplayMatrix {
            continue;
        }
        let d = sd.data();
        if d.len() < 36 {
            continue;
        }
        let m: Vec<i32> = d
            .chunks_exact(4)
            .take(9)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // av_display_rotation_get: counter-clockwise degrees, 16.16 fixed point.
        let fp = |v: i32| f64::from(v) / 65536.0;
        let s0 = fp(m[0]).hypot(fp(m[3]));
        let s1 = fp(m[1]).hypot(fp(m[4]));
        if s0 == 0.0 || s1 == 0.0 {
            continue;
        }
        let ccw = -(fp(m[1]) / s1).atan2(fp(m[0]) / s0).to_degrees();
        // ffmpeg's get_rotation: the clockwise angle to apply.
        let cw = -ccw;
        let cw = cw - 360.0 * (cw / 360.0 + 0.9 / 360.0).floor();
        let r = ((cw / 90.0).round() as i64).rem_euclid(4) as u32 * 90;
        return r;
    }
    0
}

fn rational_fps(r: ff::Rational) -> Option<Fps> {
    let (n, d) = (r.numerator(), r.denominator());
    if n <= 0 || d <= 0 {
        return None;
    }
    let fps = Fps::new(n as u32, d as u32).ok()?;
    // Some files report a time base (e.g. 90000/1) as a rate; nothing real is above 1000.
    (fps.as_f64() <= 1000.0).then_some(fps)
}

struct Decoded {
    frame: Frame,
    /// The picture's coded luma, when asked for and its pixel format is 8-bit planar YUV.
    luma: Option<LumaPlane>,
    /// Seconds from the stream's start, when the frame has a timestamp.
    time: Option<f64>,
}

fn decode_input(input: Input, seconds: f64) -> Result<Video> {
    let out = decode(input, seconds, Keep::All, false)?;
    to_video(out.frames, out.fps_hint)
}

/// What a decode keeps of each picture.
enum Keep<'a> {
    /// Every picture, in memory ([`read_video`]).
    All,
    /// Only the timestamps (and the first picture, for its size): [`scan_video`].
    Times,
    /// The pictures whose decoded index `wanted` holds (sorted), each handed to `each` as it is
    /// decoded and then dropped.
    Each {
        wanted: &'a [usize],
        each: &'a mut dyn FnMut(usize, Frame) -> Result<()>,
    },
}

/// What a decode gives back.
struct DecodeOut {
    /// With [`Keep::All`].
    frames: Vec<Decoded>,
    /// Every picture's timestamp, in presentation order.
    times: Vec<Option<f64>>,
    /// With [`Keep::Times`]: the first picture.
    first: Option<Frame>,
    fps_hint: Option<Fps>,
}

fn decode(mut input: Input, seconds: f64, keep: Keep<'_>, luma: bool) -> Result<DecodeOut> {
    let stream = input.streams().best(MediaType::Video).ok_or_else(|| {
        MediaError::Unsupported(
            "the file has no video stream (audio only, or not a video); give a video file"
                .to_string(),
        )
    })?;
    let index = stream.index();
    let time_base = stream.time_base();
    let tb = if time_base.numerator() > 0 && time_base.denominator() > 0 {
        f64::from(time_base.numerator()) / f64::from(time_base.denominator())
    } else {
        0.0
    };
    let start = stream.start_time();
    let nb_frames = stream.frames().max(0) as u64;
    let rotate = rotation(&stream);
    let fps_hint = rational_fps(stream.avg_frame_rate()).or_else(|| rational_fps(stream.rate()));
    let params = stream.parameters();
    let codec_id = params.id();
    if codec_id == ff::codec::Id::None {
        return Err(MediaError::corrupt(
            WHAT,
            "its video stream names no codec (the header is cut short or damaged)",
        ));
    }

    let mut ctx = ff::codec::context::Context::from_parameters(params)
        .map_err(|e| MediaError::corrupt(WHAT, format!("bad codec parameters: {e}")))?;
    ctx.set_threading(threading::Config {
        kind: threading::Type::Frame,
        count: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..Default::default()
    });
    let mut decoder = ctx.decoder().video().map_err(|e| match e {
        ff::Error::DecoderNotFound => MediaError::Unsupported(format!(
            "this FFmpeg has no decoder for its {codec_id:?} video; convert it with \
             `ffmpeg -i IN -c:v libx264 OUT.mp4`"
        )),
        other => MediaError::Unsupported(format!(
            "cannot start a decoder for its {codec_id:?} video ({other}); convert it with \
             `ffmpeg -i IN -c:v libx264 OUT.mp4`"
        )),
    })?;

    let mut state = DecodeState {
        scaler: None,
        out: Vec::new(),
        keep,
        count: 0,
        times: Vec::new(),
        first: None,
        bytes: 0,
        tb,
        start: if start == ff::ffi::AV_NOPTS_VALUE {
            None
        } else {
            Some(start)
        },
        first_ts: None,
        seconds,
        done: false,
        rotate,
        luma,
    };
    let mut bad_packets = 0usize;
    let mut packet = ff::Packet::empty();
    let mut read_error = None;
    while !state.done {
        match packet.read(&mut input) {
            Ok(()) => {}
            Err(ff::Error::Eof) => break,
            Err(ff::Error::InvalidData) => {
                bad_packets += 1;
                if bad_packets > 1000 {
                    read_error = Some("too many damaged packets".to_string());
                    break;
                }
                continue;
            }
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
        if packet.stream() != index {
            continue;
        }
        match decoder.send_packet(&packet) {
            Ok(()) => {}
            Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {}
            Err(e) => {
                return Err(MediaError::corrupt(
                    WHAT,
                    format!("picture {} cannot be decoded ({e})", state.count + 1),
                ))
            }
        }
        state.receive(&mut decoder)?;
    }
    if !state.done {
        // Drain the frames the decoder still holds (B-frame reordering, frame threads).
        if decoder.send_eof().is_ok() {
            state.receive(&mut decoder)?;
        }
    }
    let stopped_early = state.done;
    let count = state.count;
    if count == 0 {
        return Err(MediaError::corrupt(
            WHAT,
            match read_error {
                Some(e) => format!("no picture could be decoded ({e})"),
                None => "no picture could be decoded".to_string(),
            },
        ));
    }
    if !stopped_early {
        if let Some(e) = read_error {
            return Err(MediaError::corrupt(
                WHAT,
                format!("reading stopped after {count} pictures: {e}"),
            ));
        }
        if nb_frames > 0 && (count as u64) < nb_frames {
            return Err(MediaError::corrupt(
                WHAT,
                format!("the file ends after {count} of its {nb_frames} pictures"),
            ));
        }
    }
    Ok(DecodeOut {
        frames: state.out,
        times: state.times,
        first: state.first,
        fps_hint,
    })
}

struct DecodeState<'a> {
    scaler: Option<(Scaler, (ff::format::Pixel, u32, u32))>,
    out: Vec<Decoded>,
    keep: Keep<'a>,
    /// Pictures decoded so far.
    count: usize,
    times: Vec<Option<f64>>,
    first: Option<Frame>,
    bytes: u64,
    tb: f64,
    start: Option<i64>,
    first_ts: Option<i64>,
    seconds: f64,
    done: bool,
    rotate: u32,
    /// Keep each picture's coded luma too ([`decode_video_head_luma`]).
    luma: bool,
}

impl DecodeState<'_> {
    fn receive(&mut self, decoder: &mut ff::decoder::Video) -> Result<()> {
        let mut yuv = ff::frame::Video::empty();
        loop {
            if self.done {
                return Ok(());
            }
            match decoder.receive_frame(&mut yuv) {
                Ok(()) => {}
                Err(ff::Error::Eof) => return Ok(()),
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => {
                    return Ok(())
                }
                Err(e) => {
                    return Err(MediaError::corrupt(
                        WHAT,
                        format!("picture {} cannot be decoded ({e})", self.count + 1),
                    ))
                }
            }
            let time = yuv.timestamp().map(|ts| {
                let origin = *self
                    .first_ts
                    .get_or_insert(self.start.unwrap_or(ts).min(ts));
                (ts - origin) as f64 * self.tb
            });
            let idx = self.count;
            self.count += 1;
            self.times.push(time);
            let needed = match &self.keep {
                Keep::All => true,
                Keep::Times => idx == 0,
                Keep::Each { wanted, .. } => wanted.binary_search(&idx).is_ok(),
            };
            if needed {
                let frame = self.convert(&yuv)?;
                let frame = rotate(&frame, self.rotate)?;
                match &mut self.keep {
                    Keep::All => {
                        self.bytes += frame.data().len() as u64;
                        if self.bytes > MAX_DECODED_BYTES {
                            return Err(MediaError::InvalidVideo(format!(
                                "the clip is too long to decode whole: {} pictures of {}x{} \
                                 already take more than {} GiB; trim it first (e.g. `ffmpeg -i \
                                 IN -t 10 OUT.mp4`) or read only its start",
                                self.count,
                                frame.width(),
                                frame.height(),
                                MAX_DECODED_BYTES >> 30
                            )));
                        }
                        let luma = if self.luma {
                            luma_of(&yuv).map(|l| l.rotated(self.rotate))
                        } else {
                            None
                        };
                        self.out.push(Decoded { frame, luma, time });
                    }
                    Keep::Times => self.first = Some(frame),
                    Keep::Each { each, .. } => each(idx, frame)?,
                }
            }
            let past = time.is_some_and(|t| t >= self.seconds);
            if past || (time.is_none() && self.seconds.is_finite() && self.count > 100_000) {
                self.done = true;
            }
        }
    }

    fn convert(&mut self, yuv: &ff::frame::Video) -> Result<Frame> {
        let (w, h, fmt) = (yuv.width(), yuv.height(), yuv.format());
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(MediaError::Unsupported(format!(
                "pictures of {w}x{h}; sides of 1 to {MAX_SIDE} pixels can be read"
            )));
        }
        let key = (fmt, w, h);
        if self.scaler.as_ref().is_none_or(|(_, k)| *k != key) {
            let mut s = Scaler::get(
                fmt,
                w,
                h,
                ff::format::Pixel::RGB24,
                w,
                h,
                ScaleFlags::BICUBIC,
            )
            .map_err(|e| {
                MediaError::Unsupported(format!("cannot convert its {fmt:?} pictures to RGB ({e})"))
            })?;
            set_colorspace(&mut s, yuv);
            self.scaler = Some((s, key));
        }
        let Some((scaler, _)) = self.scaler.as_mut() else {
            return Err(MediaError::Codec("no scaler".into()));
        };
        let mut rgb = ff::frame::Video::empty();
        scaler
            .run(yuv, &mut rgb)
            .map_err(|e| MediaError::corrupt(WHAT, format!("colour conversion failed: {e}")))?;
        let stride = rgb.stride(0);
        let row = w as usize * 3;
        let plane = rgb.data(0);
        let mut data = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            let Some(r) = plane.get(y * stride..y * stride + row) else {
                return Err(MediaError::Codec("short RGB plane from swscale".into()));
            };
            data.extend_from_slice(r);
        }
        Frame::new(w, h, data)
    }
}

/// The coded luma of an 8-bit planar YUV picture (`None` for other pixel formats), with the
/// matrix and range it declares (BT.601 where it declares none, as for its RGB).
fn luma_of(yuv: &ff::frame::Video) -> Option<LumaPlane> {
    use ff::format::Pixel as P;
    use ff::util::color::Space;
    let (shift_x, shift_y, full) = match yuv.format() {
        P::YUV420P => (1, 1, false),
        P::YUVJ420P => (1, 1, true),
        P::YUV422P => (1, 0, false),
        P::YUVJ422P => (1, 0, true),
        P::YUV444P => (0, 0, false),
        P::YUVJ444P => (0, 0, true),
        _ => return None,
    };
    let (kr, kb) = match yuv.color_space() {
        Space::BT709 => (0.2126, 0.0722),
        Space::BT2020NCL | Space::BT2020CL => (0.2627, 0.0593),
        Space::SMPTE240M => (0.212, 0.087),
        Space::FCC => (0.30, 0.11),
        _ => (0.299, 0.114),
    };
    let full_range = full || yuv.color_range() == ff::util::color::Range::JPEG;
    let planes = YuvPlanes {
        width: yuv.width() as usize,
        height: yuv.height() as usize,
        y: yuv.data(0),
        u: yuv.data(1),
        v: yuv.data(2),
        y_stride: yuv.stride(0),
        uv_stride: yuv.stride(1),
    };
    LumaPlane::from_yuv(&planes, shift_x, shift_y, YuvMatrix { kr, kb, full_range })
}

/// Tells swscale the picture's YUV matrix and range (as `ffmpeg`'s scale filter does), so
/// BT.709 clips are not converted with BT.601 coefficients.
fn set_colorspace(s: &mut Scaler, yuv: &ff::frame::Video) {
    use ff::ffi;
    let space: ffi::AVColorSpace = yuv.color_space().into();
    let full = yuv.color_range() == ff::util::color::Range::JPEG;
    // SAFETY: the scaler pointer is valid for the scaler's lifetime; sws_getCoefficients
    // returns a pointer to a static table for any input.
    unsafe {
        let ctx = s.as_mut_ptr();
        let mut inv: *mut i32 = std::ptr::null_mut();
        let mut table: *mut i32 = std::ptr::null_mut();
        let (mut src_range, mut dst_range) = (0, 0);
        let (mut b, mut c, mut sat) = (0, 0, 0);
        if ffi::sws_getColorspaceDetails(
            ctx,
            &mut inv,
            &mut src_range,
            &mut table,
            &mut dst_range,
            &mut b,
            &mut c,
            &mut sat,
        ) < 0
        {
            return;
        }
        let coeffs = ffi::sws_getCoefficients(space as i32);
        // Formats with their own range (yuvj*) keep what swscale chose.
        let src_range = if full { 1 } else { src_range };
        ffi::sws_setColorspaceDetails(ctx, coeffs, src_range, table, dst_range, b, c, sat);
    }
}

/// `frame` turned `degrees` clockwise (0, 90, 180 or 270).
pub(crate) fn rotate(frame: &Frame, degrees: u32) -> Result<Frame> {
    let (w, h) = (frame.width(), frame.height());
    let src = frame.data();
    let px = |x: u32, y: u32| {
        let i = (y as usize * w as usize + x as usize) * 3;
        [src[i], src[i + 1], src[i + 2]]
    };
    match degrees % 360 {
        0 => Ok(frame.clone()),
        // Output (x, y) of a clockwise quarter turn comes from input (y, h-1-x).
        90 => Frame::from_fn(h, w, |x, y| px(y, h - 1 - x)),
        180 => Frame::from_fn(w, h, |x, y| px(w - 1 - x, h - 1 - y)),
        _ => Frame::from_fn(h, w, |x, y| px(w - 1 - y, x)),
    }
}

/// The constant-rate video of pictures with these timestamps: its frame rate (`fps_hint`, or
/// estimated from the timestamps, or 25) and, for each of its frames, the decoded picture it
/// shows (the pictures as they are when their timestamps are regular; for a variable frame
/// rate, the picture with the nearest timestamp at each instant of the grid).
fn grid(times: &[Option<f64>], fps_hint: Option<Fps>) -> Result<(Fps, Vec<usize>)> {
    let n = times.len();
    let times: Option<Vec<f64>> = times.iter().copied().collect();
    let fps = match (fps_hint, &times) {
        (Some(f), _) => f,
        (None, Some(t)) if t.len() > 1 && t[t.len() - 1] > t[0] => {
            Fps::approx((t.len() - 1) as f64 / (t[t.len() - 1] - t[0]))?
        }
        _ => Fps::integer(25)?,
    };
    let Some(times) = times.filter(|t| !t.is_empty()) else {
        return Ok((fps, (0..n).collect()));
    };
    let period = 1.0 / fps.as_f64();
    let t0 = times[0];
    let regular = times
        .iter()
        .enumerate()
        .all(|(k, t)| (t - t0 - k as f64 * period).abs() < 0.5 * period);
    if regular {
        return Ok((fps, (0..n).collect()));
    }
    // Variable frame rate: for each instant on the constant grid, the nearest frame.
    let last = times[times.len() - 1];
    let n_out = ((last - t0) / period).round() as usize + 1;
    let mut out = Vec::with_capacity(n_out);
    let mut k = 0usize;
    for i in 0..n_out {
        let t = t0 + i as f64 * period;
        while k + 1 < times.len() && (times[k + 1] - t).abs() <= (times[k] - t).abs() {
            k += 1;
        }
        out.push(k);
    }
    Ok((fps, out))
}

/// Frames with their timestamps onto a constant frame rate ([`grid`]).
fn to_video(frames: Vec<Decoded>, fps_hint: Option<Fps>) -> Result<Video> {
    let times: Vec<Option<f64>> = frames.iter().map(|d| d.time).collect();
    let (fps, index) = grid(&times, fps_hint)?;
    if index.len() == frames.len() && index.iter().enumerate().all(|(i, &k)| i == k) {
        return Video::new(frames.into_iter().map(|d| d.frame).collect(), fps);
    }
    Video::new(
        index.iter().map(|&k| frames[k].frame.clone()).collect(),
        fps,
    )
}

/// A video file's constant-rate layout: what [`read_video`] would give, without the pictures
/// (their size, the frame rate, how many frames, and which decoded picture each one shows).
/// Made by [`scan_video`]; [`stream_video`] and [`crate::conform_video_file`] then decode the
/// frames one at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLayout {
    pub width: u32,
    pub height: u32,
    pub fps: Fps,
    index: Vec<usize>,
}

impl VideoLayout {
    /// Frames of the constant-rate video (as [`read_video`]'s `len`).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Seconds (as [`Video::duration_secs`] of [`read_video`]'s result).
    pub fn duration_secs(&self) -> f64 {
        self.fps.duration_of(self.len())
    }

    /// The decoded picture frame `j` shows.
    pub(crate) fn picture(&self, j: usize) -> usize {
        self.index[j]
    }
}

fn open_file(path: &Path) -> Result<Input> {
    init();
    if path.is_dir() {
        return Err(MediaError::read(
            path,
            std::io::Error::other("it is a folder, not a video file"),
        ));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| MediaError::read(path, e))?;
    refuse_stills(&head).map_err(|e| crate::mp4::with_path(e, path))?;
    ff::format::input(path).map_err(|e| crate::mp4::with_path(open_error(e), path))
}

/// Reads a video file's layout ([`VideoLayout`]) by decoding it without keeping its pictures:
/// memory stays that of one picture however long the clip.
pub fn scan_video(path: &Path) -> Result<VideoLayout> {
    let input = open_file(path)?;
    let out = decode(input, f64::INFINITY, Keep::Times, false)
        .map_err(|e| crate::mp4::with_path(e, path))?;
    let first = out.first.ok_or_else(|| {
        crate::mp4::with_path(
            MediaError::corrupt(WHAT, "no picture could be decoded"),
            path,
        )
    })?;
    let (fps, index) = grid(&out.times, out.fps_hint)?;
    Ok(VideoLayout {
        width: first.width(),
        height: first.height(),
        fps,
        index,
    })
}

/// Decodes the frames `frames` (indices into the constant-rate video of `layout`, in order;
/// repeats allowed) of the file `layout` was scanned from, handing each to `each` (with its
/// index) as it is decoded: the same frames [`read_video`] would hold, one picture in memory at
/// a time.
pub fn stream_video(
    path: &Path,
    layout: &VideoLayout,
    frames: &[usize],
    each: &mut dyn FnMut(usize, &Frame) -> Result<()>,
) -> Result<()> {
    if let Some(&j) = frames.iter().find(|&&j| j >= layout.len()) {
        return Err(MediaError::InvalidOption(format!(
            "frame {j} asked of a video of {} frames",
            layout.len()
        )));
    }
    let mut wanted: Vec<usize> = frames.iter().map(|&j| layout.picture(j)).collect();
    if wanted.windows(2).any(|w| w[1] < w[0]) {
        return Err(MediaError::InvalidOption(
            "the frames of a video are streamed in order; ask for them in order".into(),
        ));
    }
    wanted.dedup();
    let mut next = 0usize;
    let input = open_file(path)?;
    let mut hand = |k: usize, frame: Frame| -> Result<()> {
        while next < frames.len() && layout.picture(frames[next]) == k {
            each(frames[next], &frame)?;
            next += 1;
        }
        Ok(())
    };
    decode(
        input,
        f64::INFINITY,
        Keep::Each {
            wanted: &wanted,
            each: &mut hand,
        },
        false,
    )
    .map_err(|e| crate::mp4::with_path(e, path))?;
    if next < frames.len() {
        return Err(crate::mp4::with_path(
            MediaError::corrupt(
                WHAT,
                format!(
                    "it changed while it was read: frame {} is missing",
                    frames[next]
                ),
            ),
            path,
        ));
    }
    Ok(())
}

/// The last `n` frames of a video file (fewer when it is shorter), as [`read_video`] would end
/// with them, holding only those: the tail decoder for continuing a long clip.
pub fn read_video_tail(path: &Path, n: usize) -> Result<Video> {
    let layout = scan_video(path)?;
    let from = layout.len().saturating_sub(n.max(1));
    let want: Vec<usize> = (from..layout.len()).collect();
    let mut frames = Vec::with_capacity(want.len());
    stream_video(path, &layout, &want, &mut |_, f| {
        frames.push(f.clone());
        Ok(())
    })?;
    Video::new(frames, layout.fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_turns_the_picture() {
        // 3×2: a red pixel at the top left.
        let f = Frame::from_fn(3, 2, |x, y| {
            if (x, y) == (0, 0) {
                [255, 0, 0]
            } else {
                [0; 3]
            }
        })
        .unwrap();
        let r = rotate(&f, 90).unwrap();
        assert_eq!((r.width(), r.height()), (2, 3));
        assert_eq!(
            r.pixel(1, 0),
            Some([255, 0, 0]),
            "clockwise: top left → top right"
        );
        let r = rotate(&f, 180).unwrap();
        assert_eq!(r.pixel(2, 1), Some([255, 0, 0]));
        let r = rotate(&f, 270).unwrap();
        assert_eq!((r.width(), r.height()), (2, 3));
        assert_eq!(
            r.pixel(0, 2),
            Some([255, 0, 0]),
            "anticlockwise: top left → bottom left"
        );
    }

    #[test]
    fn variable_rate_goes_on_a_grid() {
        let mk = |v: u8, t: f64| Decoded {
            frame: Frame::filled(2, 2, [v, 0, 0]).unwrap(),
            luma: None,
            time: Some(t),
        };
        // 10 fps declared; frames at 0, 0.1, 0.35 (a gap), 0.4.
        let v = to_video(
            vec![mk(0, 0.0), mk(1, 0.1), mk(2, 0.35), mk(3, 0.4)],
            Some(Fps::integer(10).unwrap()),
        )
        .unwrap();
        let firsts: Vec<u8> = v.frames().iter().map(|f| f.data()[0]).collect();
        assert_eq!(firsts, [0, 1, 1, 2, 3]);
        // A regular clip is kept as it is.
        let v = to_video(
            vec![mk(0, 0.0), mk(1, 0.1), mk(2, 0.2)],
            Some(Fps::integer(10).unwrap()),
        )
        .unwrap();
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn garbage_and_empty_bytes_are_clear_errors() {
        let e = decode_video(&[]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let junk: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let e = decode_video(&junk).unwrap_err().to_string();
        assert!(!e.is_empty());
    }
}
