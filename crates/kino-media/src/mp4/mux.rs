//! A small ISO-BMFF (MP4) writer for one H.264 video track: `ftyp`, then `moov` (fast start),
//! then `mdat`. Constant frame rate with exact integer timestamps: the media timescale is
//! `fps_num * k` and every sample lasts `fps_den * k` ticks (one `stts` entry).

use crate::color::ColorSpace;
use crate::frame::Fps;

use super::{KINO_META_MEAN, KINO_META_NAME};

/// Builds boxes into a byte vector; `begin` returns the start, `end` patches the size.
pub(crate) struct BoxWriter {
    pub buf: Vec<u8>,
}

impl BoxWriter {
    pub fn new() -> Self {
        BoxWriter { buf: Vec::new() }
    }
    pub fn begin(&mut self, kind: &[u8; 4]) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0, 0, 0]);
        self.buf.extend_from_slice(kind);
        start
    }
    pub fn begin_full(&mut self, kind: &[u8; 4], version: u8, flags: u32) -> usize {
        let start = self.begin(kind);
        self.u32((u32::from(version) << 24) | (flags & 0x00ff_ffff));
        start
    }
    pub fn end(&mut self, start: usize) {
        let size = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&size.to_be_bytes());
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    pub fn zeros(&mut self, n: usize) {
        self.buf.resize(self.buf.len() + n, 0);
    }
    fn matrix(&mut self) {
        for v in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
            self.u32(v);
        }
    }
}

/// The timescale and per-sample duration for a frame rate.
pub(crate) fn timing(fps: Fps) -> (u32, u32) {
    let k = if u64::from(fps.num()) * 1000 <= u64::from(u32::MAX)
        && u64::from(fps.den()) * 1000 <= u64::from(u32::MAX)
    {
        1000
    } else {
        1
    };
    (fps.num() * k, fps.den() * k)
}

/// One sample (access unit) as the index needs it: its size and whether it is a sync sample.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SampleInfo {
    pub size: u32,
    pub is_idr: bool,
}

/// What goes into the file besides the sample data.
pub(crate) struct MuxInput<'a> {
    pub sps: &'a [u8],
    pub pps: &'a [u8],
    pub samples: &'a [SampleInfo],
    pub width: u32,
    pub height: u32,
    pub fps: Fps,
    pub color: ColorSpace,
    /// Exact JSON for our own freeform entry and the `©cmt` comment.
    pub metadata_json: Option<String>,
    /// `©too` (encoding tool).
    pub tool: String,
}

fn avcc(w: &mut BoxWriter, sps: &[u8], pps: &[u8]) {
    let s = w.begin(b"avcC");
    w.u8(1);
    w.u8(sps.get(1).copied().unwrap_or(66));
    w.u8(sps.get(2).copied().unwrap_or(0));
    w.u8(sps.get(3).copied().unwrap_or(31));
    w.u8(0xff); // 6 bits reserved + lengthSizeMinusOne = 3
    w.u8(0xe1); // 3 bits reserved + one SPS
    w.u16(sps.len() as u16);
    w.bytes(sps);
    w.u8(1);
    w.u16(pps.len() as u16);
    w.bytes(pps);
    if matches!(sps.get(1), Some(100 | 110 | 122 | 144)) {
        // High profiles: chroma_format 4:2:0, 8-bit luma and chroma, no SPS extensions.
        w.u8(0xfc | 1);
        w.u8(0xf8);
        w.u8(0xf8);
        w.u8(0);
    }
    w.end(s);
}

fn ilst_text(w: &mut BoxWriter, kind: &[u8; 4], text: &str) {
    let s = w.begin(kind);
    let d = w.begin(b"data");
    w.u32(1); // well-known type 1: UTF-8
    w.u32(0); // locale
    w.bytes(text.as_bytes());
    w.end(d);
    w.end(s);
}

fn udta(w: &mut BoxWriter, input: &MuxInput<'_>) {
    let u = w.begin(b"udta");
    let m = w.begin_full(b"meta", 0, 0);
    let h = w.begin_full(b"hdlr", 0, 0);
    w.u32(0);
    w.bytes(b"mdir");
    w.bytes(b"appl");
    w.u32(0);
    w.u32(0);
    w.u8(0);
    w.end(h);
    let l = w.begin(b"ilst");
    ilst_text(w, b"\xa9too", &input.tool);
    if let Some(json) = &input.metadata_json {
        ilst_text(w, b"\xa9cmt", json);
        // Freeform entry: our own exact JSON under a reverse-DNS "mean" and a "name".
        let f = w.begin(b"----");
        let mean = w.begin_full(b"mean", 0, 0);
        w.bytes(KINO_META_MEAN.as_bytes());
        w.end(mean);
        let name = w.begin_full(b"name", 0, 0);
        w.bytes(KINO_META_NAME.as_bytes());
        w.end(name);
        let d = w.begin(b"data");
        w.u32(1);
        w.u32(0);
        w.bytes(json.as_bytes());
        w.end(d);
        w.end(f);
    }
    w.end(l);
    w.end(m);
    w.end(u);
}

/// Writes `moov` for samples whose data starts at `mdat_data_offset` in the file.
fn moov(input: &MuxInput<'_>, mdat_data_offset: u64, co64: bool) -> Vec<u8> {
    let samples = input.samples;
    let n = samples.len() as u64;
    let (timescale, delta) = timing(input.fps);
    let duration = n * u64::from(delta);
    let v1 = duration > u64::from(u32::MAX);
    let mut w = BoxWriter::new();
    let moov = w.begin(b"moov");

    let mvhd = w.begin_full(b"mvhd", u8::from(v1), 0);
    if v1 {
        w.u64(0);
        w.u64(0);
        w.u32(timescale);
        w.u64(duration);
    } else {
        w.u32(0);
        w.u32(0);
        w.u32(timescale);
        w.u32(duration as u32);
    }
    w.u32(0x0001_0000); // rate 1.0
    w.u16(0x0100); // volume 1.0
    w.zeros(10);
    w.matrix();
    w.zeros(24);
    w.u32(2); // next track id
    w.end(mvhd);

    let trak = w.begin(b"trak");
    let tkhd = w.begin_full(b"tkhd", u8::from(v1), 3); // enabled, in movie
    if v1 {
        w.u64(0);
        w.u64(0);
        w.u32(1);
        w.u32(0);
        w.u64(duration);
    } else {
        w.u32(0);
        w.u32(0);
        w.u32(1);
        w.u32(0);
        w.u32(duration as u32);
    }
    w.zeros(8);
    w.u16(0); // layer
    w.u16(0); // alternate group
    w.u16(0); // volume
    w.u16(0);
    w.matrix();
    w.u32(input.width << 16);
    w.u32(input.height << 16);
    w.end(tkhd);

    let mdia = w.begin(b"mdia");
    let mdhd = w.begin_full(b"mdhd", u8::from(v1), 0);
    if v1 {
        w.u64(0);
        w.u64(0);
        w.u32(timescale);
        w.u64(duration);
    } else {
        w.u32(0);
        w.u32(0);
        w.u32(timescale);
        w.u32(duration as u32);
    }
    w.u16(0x55c4); // language "und"
    w.u16(0);
    w.end(mdhd);
    let hdlr = w.begin_full(b"hdlr", 0, 0);
    w.u32(0);
    w.bytes(b"vide");
    w.zeros(12);
    w.bytes(b"VideoHandler\0");
    w.end(hdlr);

    let minf = w.begin(b"minf");
    let vmhd = w.begin_full(b"vmhd", 0, 1);
    w.zeros(8);
    w.end(vmhd);
    let dinf = w.begin(b"dinf");
    let dref = w.begin_full(b"dref", 0, 0);
    w.u32(1);
    let url = w.begin_full(b"url ", 0, 1); // data in this file
    w.end(url);
    w.end(dref);
    w.end(dinf);

    let stbl = w.begin(b"stbl");
    let stsd = w.begin_full(b"stsd", 0, 0);
    w.u32(1);
    let avc1 = w.begin(b"avc1");
    w.zeros(6);
    w.u16(1); // data reference index
    w.zeros(16);
    w.u16(input.width as u16);
    w.u16(input.height as u16);
    w.u32(0x0048_0000); // 72 dpi
    w.u32(0x0048_0000);
    w.u32(0);
    w.u16(1); // frames per sample
    let mut name = [0u8; 32];
    let label = b"Kino H.264";
    name[0] = label.len() as u8;
    name[1..=label.len()].copy_from_slice(label);
    w.bytes(&name);
    w.u16(0x0018); // depth
    w.u16(0xffff); // pre_defined = -1
    avcc(&mut w, input.sps, input.pps);
    let (p, t, m) = input.color.codes();
    let colr = w.begin(b"colr");
    w.bytes(b"nclx");
    w.u16(u16::from(p));
    w.u16(u16::from(t));
    w.u16(u16::from(m));
    w.u8(0); // limited range
    w.end(colr);
    let pasp = w.begin(b"pasp");
    w.u32(1);
    w.u32(1);
    w.end(pasp);
    w.end(avc1);
    w.end(stsd);

    let stts = w.begin_full(b"stts", 0, 0);
    w.u32(1);
    w.u32(n as u32);
    w.u32(delta);
    w.end(stts);

    let sync: Vec<u32> = samples
        .iter()
        .enumerate()
        .filter(|(_, u)| u.is_idr)
        .map(|(i, _)| i as u32 + 1)
        .collect();
    if sync.len() as u64 != n {
        let stss = w.begin_full(b"stss", 0, 0);
        w.u32(sync.len() as u32);
        for s in sync {
            w.u32(s);
        }
        w.end(stss);
    }

    // Chunks of about one second.
    let per_chunk = (input.fps.as_f64().round() as u64).clamp(1, 1000);
    let chunks = n.div_ceil(per_chunk);
    let last = n - (chunks - 1) * per_chunk;
    let stsc = w.begin_full(b"stsc", 0, 0);
    if last == per_chunk || chunks == 1 {
        w.u32(1);
        w.u32(1);
        w.u32(if chunks == 1 {
            n as u32
        } else {
            per_chunk as u32
        });
        w.u32(1);
    } else {
        w.u32(2);
        w.u32(1);
        w.u32(per_chunk as u32);
        w.u32(1);
        w.u32(chunks as u32);
        w.u32(last as u32);
        w.u32(1);
    }
    w.end(stsc);

    let stsz = w.begin_full(b"stsz", 0, 0);
    w.u32(0);
    w.u32(n as u32);
    for u in samples {
        w.u32(u.size);
    }
    w.end(stsz);

    let co = w.begin_full(if co64 { b"co64" } else { b"stco" }, 0, 0);
    w.u32(chunks as u32);
    let mut offset = mdat_data_offset;
    for (i, u) in samples.iter().enumerate() {
        if (i as u64).is_multiple_of(per_chunk) {
            if co64 {
                w.u64(offset);
            } else {
                w.u32(offset as u32);
            }
        }
        offset += u64::from(u.size);
    }
    w.end(co);
    w.end(stbl);
    w.end(minf);
    w.end(mdia);
    w.end(trak);
    udta(&mut w, input);
    w.end(moov);
    w.buf
}

/// Everything before the sample data: `ftyp`, `moov` and the `mdat` header. The samples
/// follow it, back to back, in order.
pub(crate) fn header(input: &MuxInput<'_>) -> Vec<u8> {
    let mut f = BoxWriter::new();
    let ftyp = f.begin(b"ftyp");
    f.bytes(b"isom");
    f.u32(0x200);
    for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
        f.bytes(brand);
    }
    f.end(ftyp);

    let payload: u64 = input.samples.iter().map(|u| u64::from(u.size)).sum();
    let large_mdat = payload + 8 > u64::from(u32::MAX);
    let mdat_header = if large_mdat { 16 } else { 8 };
    // The moov size does not depend on the offsets, only on stco vs co64.
    let probe = moov(input, 0, false);
    let co64 =
        f.buf.len() as u64 + probe.len() as u64 + mdat_header + payload > u64::from(u32::MAX);
    let moov_len = if co64 {
        moov(input, 0, true).len()
    } else {
        probe.len()
    };
    let data_offset = f.buf.len() as u64 + moov_len as u64 + mdat_header;
    let moov_box = moov(input, data_offset, co64);
    f.bytes(&moov_box);
    if large_mdat {
        f.u32(1);
        f.bytes(b"mdat");
        f.u64(payload + 16);
    } else {
        f.u32((payload + 8) as u32);
        f.bytes(b"mdat");
    }
    f.buf
}

/// The whole file in memory: [`header`] then the samples' data.
pub(crate) fn mux(input: &MuxInput<'_>, data: &[&[u8]]) -> Vec<u8> {
    let mut f = header(input);
    let payload: usize = data.iter().map(|d| d.len()).sum();
    f.reserve(payload);
    for d in data {
        f.extend_from_slice(d);
    }
    f
}
