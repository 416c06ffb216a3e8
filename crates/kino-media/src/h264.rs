//! H.264 through OpenH264 (Cisco's encoder and decoder, built from source by the `openh264`
//! crate): encoding RGB frames to length-prefixed access units, decoding them back, and the
//! Annex-B ↔ length-prefixed conversions between the codec and the MP4 container.
//!
//! OpenH264 writes the Constrained Baseline profile (no B-frames, so decode order is
//! presentation order and the MP4 needs no `ctts`). To use several cores the encoder splits
//! the clip into consecutive segments, each starting with an IDR frame, and encodes them on
//! parallel threads with identical settings; every segment therefore has identical SPS/PPS and
//! the access units are simply concatenated.

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, QpRange,
    RateControlMode, SpsPpsStrategy, UsageType, VuiConfig,
};
use openh264::formats::YUVSource;
use openh264::OpenH264API;
use serde::{Deserialize, Serialize};

use crate::color::{rgb_to_yuv420, yuv420_to_rgb, ColorSpace, YuvMatrix, YuvPlanes};
use crate::error::{MediaError, Result};
use crate::frame::{check_even, Fps, Frame};

/// Largest picture OpenH264 encodes (level 5.2).
const MAX_LONG_SIDE: u32 = 3840;
const MAX_SHORT_SIDE: u32 = 2160;
/// Smallest side OpenH264 encodes.
const MIN_SIDE: u32 = 16;

/// The rate-control target in constant-QP mode: high enough that the QP clamp decides, low
/// enough to pass OpenH264's per-level bitrate validation.
const QP_MODE_TARGET_BPS: u32 = 50_000_000;

/// How hard to compress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quality {
    /// Constant quantiser 12–51 (lower is better and bigger; OpenH264 goes no lower than
    /// 12). The default,
    /// [`Quality::DEFAULT_QP`], keeps typical generated content above 38 dB PSNR.
    Qp(u8),
    /// Target bits per second (OpenH264's bitrate rate control).
    Bitrate(u32),
}

impl Quality {
    /// The lowest quantiser OpenH264's rate control uses.
    pub const MIN_QP: u8 = 12;
    /// The default constant quantiser.
    pub const DEFAULT_QP: u8 = 18;
}

impl Default for Quality {
    fn default() -> Self {
        Quality::Qp(Self::DEFAULT_QP)
    }
}

/// Encoder settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct H264Options {
    /// Quality or bitrate.
    pub quality: Quality,
    /// Worker threads (parallel segments); 0 = one per available core.
    pub threads: usize,
    /// Frames between IDR (key) frames; 0 = about every 2 seconds.
    pub keyframe_interval: u32,
    /// Colour space written into the stream and used for RGB → YUV.
    pub color: ColorSpace,
}

impl Default for H264Options {
    fn default() -> Self {
        H264Options {
            quality: Quality::default(),
            threads: 0,
            keyframe_interval: 0,
            color: ColorSpace::Bt709,
        }
    }
}

/// One encoded frame: NAL units each prefixed with a 4-byte big-endian length.
#[derive(Clone, Debug)]
pub(crate) struct AccessUnit {
    pub data: Vec<u8>,
    pub is_idr: bool,
}

/// An encoded clip: parameter sets plus one access unit per input frame.
#[derive(Clone, Debug)]
pub(crate) struct EncodedStream {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub units: Vec<AccessUnit>,
}

/// Splits an Annex-B byte stream into NAL unit payloads (without start codes).
pub(crate) fn split_annex_b(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new(); // (start code position, payload position)
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            let sc = if i > 0 && data[i - 1] == 0 { i - 1 } else { i };
            starts.push((sc, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &(_, payload)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |&(sc, _)| sc);
        // Trailing zero bytes belong to the next start code or are padding.
        while end > payload && data[end - 1] == 0 {
            end -= 1;
        }
        if end > payload {
            out.push(&data[payload..end]);
        }
    }
    out
}

fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// OpenH264's own logging goes to stderr when `KINO_H264_DEBUG` is set.
fn debug_log() -> bool {
    std::env::var_os("KINO_H264_DEBUG").is_some()
}

fn encoder_config(opts: &H264Options, fps: Fps, keyframe_interval: u32) -> Result<EncoderConfig> {
    let (p, t, m) = opts.color.codes();
    let vui = VuiConfig::bt709()
        .color_primaries(match p {
            1 => openh264::encoder::ColorPrimaries::Bt709,
            _ => openh264::encoder::ColorPrimaries::Smpte170M,
        })
        .transfer_characteristics(match t {
            1 => openh264::encoder::TransferCharacteristics::Bt709,
            _ => openh264::encoder::TransferCharacteristics::Smpte170M,
        })
        .matrix_coefficients(match m {
            1 => openh264::encoder::MatrixCoefficients::Bt709,
            _ => openh264::encoder::MatrixCoefficients::Smpte170M,
        })
        .full_range(false);
    let base = EncoderConfig::new()
        .usage_type(UsageType::CameraVideoRealTime)
        .complexity(Complexity::Low)
        .skip_frames(false)
        .scene_change_detect(false)
        .background_detection(false)
        .adaptive_quantization(false)
        .long_term_reference(false)
        .sps_pps_strategy(SpsPpsStrategy::ConstantId)
        .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_interval))
        .max_frame_rate(FrameRate::from_hz(fps.as_f64() as f32))
        .num_threads(1)
        .debug(debug_log())
        .vui(vui);
    Ok(match opts.quality {
        Quality::Qp(qp) => {
            if !(Quality::MIN_QP..=51).contains(&qp) {
                return Err(MediaError::InvalidOption(format!(
                    "H.264 quantiser {qp} is out of range; use {} (best) to 51 (smallest), default {}",
                    Quality::MIN_QP,
                    Quality::DEFAULT_QP
                )));
            }
            // Rate control with an unreachable target and a one-value QP range is a constant
            // quantiser.
            base.rate_control_mode(RateControlMode::Quality)
                .bitrate(BitRate::from_bps(QP_MODE_TARGET_BPS))
                .qp(QpRange::new(qp, qp))
        }
        Quality::Bitrate(bps) => {
            if !(10_000..=2_000_000_000).contains(&bps) {
                return Err(MediaError::InvalidOption(format!(
                    "H.264 bitrate {bps} b/s is out of range; use 10000 to 2000000000"
                )));
            }
            base.rate_control_mode(RateControlMode::Bitrate)
                .bitrate(BitRate::from_bps(bps))
                .qp(QpRange::new(10, 51))
        }
    })
}

/// Checks that frames can be encoded as H.264 4:2:0.
pub(crate) fn check_encodable(width: u32, height: u32) -> Result<()> {
    check_even(width, height)?;
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(MediaError::InvalidSize(format!(
            "{width}x{height} is smaller than the H.264 encoder takes; each side must be at least \
             {MIN_SIDE}"
        )));
    }
    let (long, short) = (width.max(height), width.min(height));
    if long > MAX_LONG_SIDE || short > MAX_SHORT_SIDE {
        return Err(MediaError::InvalidSize(format!(
            "{width}x{height} is larger than the H.264 encoder takes (3840x2160 or 2160x3840); \
             scale the frames down"
        )));
    }
    Ok(())
}

/// Encodes frames (all of one even size) to H.264.
pub(crate) fn encode(frames: &[Frame], fps: Fps, opts: &H264Options) -> Result<EncodedStream> {
    let Some(first) = frames.first() else {
        return Err(MediaError::InvalidVideo(
            "a video needs at least one frame; got none".into(),
        ));
    };
    let (w, h) = (first.width(), first.height());
    check_encodable(w, h)?;
    if let Some((i, f)) = frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.width() != w || f.height() != h)
    {
        return Err(MediaError::InvalidVideo(format!(
            "frame {i} is {}x{} but frame 0 is {w}x{h}; all frames of a video must have one size",
            f.width(),
            f.height()
        )));
    }
    let keyframe_interval = if opts.keyframe_interval == 0 {
        ((2.0 * fps.as_f64()).round() as u32).max(1)
    } else {
        opts.keyframe_interval
    };
    let config = encoder_config(opts, fps, keyframe_interval)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    // Segments of at least 8 frames; each starts with an IDR frame.
    let segments = threads.clamp(1, 64).min(frames.len().div_ceil(8)).max(1);
    let per = frames.len().div_ceil(segments);
    let matrix = opts.color.matrix();

    let results: Vec<Result<EncodedStream>> = if segments == 1 {
        vec![encode_segment(frames, fps, config, matrix)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = frames
                .chunks(per)
                .map(|chunk| s.spawn(move || encode_segment(chunk, fps, config, matrix)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(MediaError::Codec("encoder thread panicked".into()))
                    })
                })
                .collect()
        })
    };
    let mut out: Option<EncodedStream> = None;
    for r in results {
        let seg = r?;
        match &mut out {
            None => out = Some(seg),
            Some(o) => {
                if o.sps != seg.sps || o.pps != seg.pps {
                    return Err(MediaError::Codec(
                        "encoder segments produced different parameter sets; encode with threads = 1"
                            .into(),
                    ));
                }
                o.units.extend(seg.units);
            }
        }
    }
    out.ok_or_else(|| MediaError::Codec("encoder produced nothing".into()))
}

fn encode_segment(
    frames: &[Frame],
    fps: Fps,
    config: EncoderConfig,
    matrix: YuvMatrix,
) -> Result<EncodedStream> {
    let codec_err = |e: openh264::Error| MediaError::Codec(format!("encoder error: {e}"));
    let mut enc =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(codec_err)?;
    // The wrapper sets the log level only after initialising, which happens on the first
    // frame, so parameter warnings would reach stderr. Set it now.
    let mut level: std::os::raw::c_int = if debug_log() {
        openh264_sys2::WELS_LOG_DETAIL as std::os::raw::c_int
    } else {
        openh264_sys2::WELS_LOG_QUIET as std::os::raw::c_int
    };
    // SAFETY: the encoder pointer is valid for the life of `enc`; OpenH264 accepts the trace
    // level option before initialisation and only reads the int behind the pointer.
    unsafe {
        enc.raw_api().set_option(
            openh264_sys2::ENCODER_OPTION_TRACE_LEVEL,
            (&raw mut level).cast(),
        );
    }
    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut units = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let yuv = rgb_to_yuv420(f.data(), f.width() as usize, f.height() as usize, matrix);
        let ms = (fps.duration_of(i) * 1000.0).round() as u64;
        let bs = enc
            .encode_at(&yuv, openh264::Timestamp::from_millis(ms))
            .map_err(codec_err)?;
        let annex_b = bs.to_vec();
        let mut au = Vec::with_capacity(annex_b.len() + 16);
        let mut is_idr = false;
        for nal in split_annex_b(&annex_b) {
            match nal_type(nal) {
                7 => {
                    if sps.is_none() {
                        sps = Some(nal.to_vec());
                    }
                }
                8 => {
                    if pps.is_none() {
                        pps = Some(nal.to_vec());
                    }
                }
                9 => {} // access unit delimiter: not used in MP4
                t => {
                    if t == 5 {
                        is_idr = true;
                    }
                    au.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    au.extend_from_slice(nal);
                }
            }
        }
        if au.is_empty() {
            return Err(MediaError::Codec(format!(
                "encoder produced no picture for frame {i}; try another quality setting"
            )));
        }
        units.push(AccessUnit { data: au, is_idr });
    }
    match (sps, pps) {
        (Some(sps), Some(pps)) => Ok(EncodedStream { sps, pps, units }),
        _ => Err(MediaError::Codec(
            "encoder produced no SPS/PPS parameter sets".into(),
        )),
    }
}

/// Fields of an SPS that a reader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpsInfo {
    pub profile_idc: u8,
    pub width: u32,
    pub height: u32,
    /// (matrix_coefficients, full_range) from the VUI, if present.
    pub matrix: Option<u8>,
    pub full_range: bool,
}

/// Removes emulation-prevention bytes (00 00 03 → 00 00).
fn unescape(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - (self.pos % 8))) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }
    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Some(v)
    }
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }
    fn se(&mut self) -> Option<i32> {
        let k = self.ue()?;
        Some(if k % 2 == 1 {
            k.div_ceil(2) as i32
        } else {
            -((k / 2) as i32)
        })
    }
}

fn skip_scaling_list(b: &mut Bits<'_>, size: usize) -> Option<()> {
    let mut last = 8i32;
    let mut next = 8i32;
    for _ in 0..size {
        if next != 0 {
            let delta = b.se()?;
            next = (last + delta + 256) % 256;
        }
        if next != 0 {
            last = next;
        }
    }
    Some(())
}

/// Parses the picture size and colour description of an SPS NAL unit (with header byte).
pub(crate) fn parse_sps(nal: &[u8]) -> Option<SpsInfo> {
    if nal_type(nal) != 7 {
        return None;
    }
    let raw = unescape(nal.get(1..)?);
    let mut b = Bits { data: &raw, pos: 0 };
    let profile_idc = b.bits(8)? as u8;
    b.bits(16)?; // constraint flags, level
    b.ue()?; // sps id
    let mut chroma_format_idc = 1;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = b.ue()?;
        if chroma_format_idc == 3 {
            b.bit()?;
        }
        b.ue()?;
        b.ue()?;
        b.bit()?;
        if b.bit()? == 1 {
            let n = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..n {
                if b.bit()? == 1 {
                    skip_scaling_list(&mut b, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    b.ue()?; // log2_max_frame_num
    let poc_type = b.ue()?;
    if poc_type == 0 {
        b.ue()?;
    } else if poc_type == 1 {
        b.bit()?;
        b.se()?;
        b.se()?;
        let n = b.ue()?;
        if n > 255 {
            return None;
        }
        for _ in 0..n {
            b.se()?;
        }
    }
    b.ue()?; // max_num_ref_frames
    b.bit()?;
    let mbw = b.ue()?.checked_add(1)?;
    let map_units_h = b.ue()?.checked_add(1)?;
    let frame_mbs_only = b.bit()?;
    if frame_mbs_only == 0 {
        b.bit()?;
    }
    b.bit()?; // direct_8x8_inference
    let mut width = mbw.checked_mul(16)?;
    let mut height = map_units_h
        .checked_mul(16)?
        .checked_mul(2 - frame_mbs_only)?;
    if b.bit()? == 1 {
        let (l, r, t, bo) = (b.ue()?, b.ue()?, b.ue()?, b.ue()?);
        let (cx, cy) = match chroma_format_idc {
            0 => (1, 2 - frame_mbs_only),
            1 => (2, 2 * (2 - frame_mbs_only)),
            2 => (2, 2 - frame_mbs_only),
            _ => (1, 2 - frame_mbs_only),
        };
        width = width.checked_sub(l.checked_add(r)?.checked_mul(cx)?)?;
        height = height.checked_sub(t.checked_add(bo)?.checked_mul(cy)?)?;
    }
    let mut matrix = None;
    let mut full_range = false;
    if b.bit() == Some(1) {
        // VUI
        if b.bit()? == 1 {
            let idc = b.bits(8)?;
            if idc == 255 {
                b.bits(32)?;
            }
        }
        if b.bit()? == 1 {
            b.bit()?;
        }
        if b.bit()? == 1 {
            b.bits(3)?;
            full_range = b.bit()? == 1;
            if b.bit()? == 1 {
                b.bits(16)?;
                matrix = Some(b.bits(8)? as u8);
            }
        }
    }
    Some(SpsInfo {
        profile_idc,
        width,
        height,
        matrix,
        full_range,
    })
}

/// Decodes H.264 access units (length-prefixed with `length_size` bytes) to RGB frames.
pub(crate) struct H264Decoder {
    dec: openh264::decoder::Decoder,
    length_size: usize,
    matrix: Option<YuvMatrix>,
    buf: Vec<u8>,
}

impl H264Decoder {
    /// A decoder primed with the parameter sets from `avcC`. `matrix` overrides the colour
    /// description in the SPS (e.g. from an MP4 `colr` box).
    pub fn new(
        sps: &[Vec<u8>],
        pps: &[Vec<u8>],
        length_size: usize,
        matrix: Option<YuvMatrix>,
    ) -> Result<Self> {
        let mut dec = openh264::decoder::Decoder::new()
            .map_err(|e| MediaError::Codec(format!("decoder error: {e}")))?;
        let mut head = Vec::new();
        for ps in sps.iter().chain(pps) {
            head.extend_from_slice(&[0, 0, 0, 1]);
            head.extend_from_slice(ps);
        }
        dec.decode(&head)
            .map_err(|e| MediaError::corrupt("H.264", format!("bad SPS/PPS: {e}")))?;
        Ok(H264Decoder {
            dec,
            length_size,
            matrix,
            buf: Vec::new(),
        })
    }

    fn convert(yuv: &openh264::decoder::DecodedYUV<'_>, matrix: YuvMatrix) -> Result<Frame> {
        let (w, h) = yuv.dimensions();
        let (ys, us, _vs) = yuv.strides();
        let planes = YuvPlanes {
            width: w,
            height: h,
            y: yuv.y(),
            u: yuv.u(),
            v: yuv.v(),
            y_stride: ys,
            uv_stride: us,
        };
        let rgb = yuv420_to_rgb(&planes, matrix)
            .ok_or_else(|| MediaError::corrupt("H.264", "decoded picture has short planes"))?;
        Frame::new(w as u32, h as u32, rgb)
    }

    /// Decodes one access unit; returns a frame when the decoder has one ready.
    pub fn decode(&mut self, sample: &[u8], index: usize) -> Result<Option<Frame>> {
        self.buf.clear();
        let mut pos = 0;
        while pos < sample.len() {
            let Some(len_bytes) = sample.get(pos..pos + self.length_size) else {
                return Err(MediaError::corrupt(
                    "MP4",
                    format!("sample {index} ends inside a NAL length field"),
                ));
            };
            let len = len_bytes
                .iter()
                .fold(0usize, |a, &b| (a << 8) | usize::from(b));
            pos += self.length_size;
            let Some(nal) = pos.checked_add(len).and_then(|end| sample.get(pos..end)) else {
                return Err(MediaError::corrupt(
                    "MP4",
                    format!("sample {index} has a NAL unit of {len} bytes that runs past its end"),
                ));
            };
            self.buf.extend_from_slice(&[0, 0, 0, 1]);
            self.buf.extend_from_slice(nal);
            pos += len;
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let matrix_override = self.matrix;
        let yuv = self.dec.decode(&self.buf).map_err(|e| {
            MediaError::corrupt("H.264", format!("cannot decode frame {index}: {e}"))
        })?;
        match yuv {
            Some(y) => {
                let m = matrix_override
                    .unwrap_or_else(|| YuvMatrix::from_code(None, false, y.dimensions().1 as u32));
                Ok(Some(Self::convert(&y, m)?))
            }
            None => Ok(None),
        }
    }

    /// Frames still buffered in the decoder after the last access unit.
    pub fn flush(&mut self) -> Result<Vec<Frame>> {
        let matrix = self.matrix;
        let frames = self
            .dec
            .flush_remaining()
            .map_err(|e| MediaError::corrupt("H.264", format!("cannot flush decoder: {e}")))?;
        frames
            .iter()
            .map(|y| {
                let m = matrix
                    .unwrap_or_else(|| YuvMatrix::from_code(None, false, y.dimensions().1 as u32));
                Self::convert(y, m)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annex_b_split() {
        let s = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let nals = split_annex_b(&s);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
        );
        assert!(split_annex_b(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn encoded_sps_parses() {
        let frames: Vec<Frame> = (0..3)
            .map(|t| Frame::from_fn(64, 48, |x, y| [(x * 4) as u8, (y * 5) as u8, t * 40]).unwrap())
            .collect();
        let s = encode(&frames, Fps::integer(10).unwrap(), &H264Options::default()).unwrap();
        assert_eq!(s.units.len(), 3);
        assert!(s.units[0].is_idr);
        let info = parse_sps(&s.sps).unwrap();
        assert_eq!((info.width, info.height), (64, 48));
        assert_eq!(info.matrix, Some(1));
        assert!(!info.full_range);
    }

    #[test]
    fn bad_qp_is_rejected() {
        let f = Frame::filled(16, 16, [0, 0, 0]).unwrap();
        let opts = H264Options {
            quality: Quality::Qp(60),
            ..Default::default()
        };
        let e = encode(&[f], Fps::integer(10).unwrap(), &opts).unwrap_err();
        assert!(e.to_string().contains("quantiser 60"), "{e}");
    }
}
