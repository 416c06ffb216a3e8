//! A small ISO-BMFF (MP4/MOV) reader: top-level boxes, the first H.264 video track's sample
//! table, and the `udta/meta/ilst` metadata. It reads `moov` into memory and seeks to samples,
//! so `probe` and `read_metadata` never touch `mdat`.

use std::io::{Read, Seek, SeekFrom};

use crate::color::YuvMatrix;
use crate::error::{MediaError, Result};

use super::{KINO_META_MEAN, KINO_META_NAME};

const FMT: &str = "MP4";
/// Largest `moov` we read (a guard against garbage sizes).
const MAX_MOOV: u64 = 512 << 20;
/// Largest single sample we read.
const MAX_SAMPLE: u64 = 256 << 20;

fn corrupt(reason: impl Into<String>) -> MediaError {
    MediaError::corrupt(FMT, reason)
}

/// A bounds-checked big-endian reader over a byte slice.
pub(crate) struct Rd<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Rd<'a> {
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Rd { data, pos: 0, what }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| corrupt(format!("'{}' box is too short", self.what)))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.data[self.pos..];
        self.pos = self.data.len();
        s
    }
    /// A count of entries of `entry_size` bytes each, checked against the bytes left.
    pub fn count(&mut self, entry_size: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.checked_mul(entry_size)
            .is_none_or(|bytes| bytes > self.remaining())
        {
            return Err(corrupt(format!(
                "'{}' box claims {n} entries but is too short for them",
                self.what
            )));
        }
        Ok(n)
    }
}

/// The child boxes of a box payload: (type, payload).
pub(crate) fn children(data: &[u8]) -> Result<Vec<([u8; 4], &[u8])>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        if data.len() - pos < 8 {
            // Some writers pad with a few zero bytes; anything else is damage.
            if data[pos..].iter().all(|&b| b == 0) {
                break;
            }
            return Err(corrupt("a box header is cut off"));
        }
        let size32 = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&data[pos + 4..pos + 8]);
        let (header, size) = match size32 {
            0 => (8usize, (data.len() - pos) as u64),
            1 => {
                if data.len() - pos < 16 {
                    return Err(corrupt("a large box header is cut off"));
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(&data[pos + 8..pos + 16]);
                (16usize, u64::from_be_bytes(a))
            }
            s => (8usize, u64::from(s)),
        };
        if size < header as u64 || size > (data.len() - pos) as u64 {
            return Err(corrupt(format!(
                "box '{}' has size {size} but only {} bytes are left",
                fourcc(&kind),
                data.len() - pos
            )));
        }
        out.push((kind, &data[pos + header..pos + size as usize]));
        pos += size as usize;
    }
    Ok(out)
}

fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<Option<&'a [u8]>> {
    Ok(children(data)?
        .into_iter()
        .find(|(k, _)| k == kind)
        .map(|(_, d)| d))
}

pub(crate) fn fourcc(k: &[u8; 4]) -> String {
    k.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// One top-level box as found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopBox {
    /// Four-character type, e.g. "moov".
    pub kind: String,
    /// Offset of the box header in the file.
    pub offset: u64,
    /// Size including the header.
    pub size: u64,
}

/// The video track of a file.
#[derive(Clone, Debug)]
pub(crate) struct VideoTrack {
    pub codec: [u8; 4],
    pub width: u32,
    pub height: u32,
    pub timescale: u32,
    pub duration: u64,
    pub sizes: Vec<u32>,
    pub offsets: Vec<u64>,
    /// (count, delta) runs from `stts`.
    pub deltas: Vec<(u32, u32)>,
    pub sps: Vec<Vec<u8>>,
    pub pps: Vec<Vec<u8>>,
    pub length_size: usize,
    /// From `colr` nclx: (matrix, full range).
    pub colr: Option<(u8, bool)>,
    /// A `ctts` box is present (B-frames: presentation order differs from decode order).
    pub has_ctts: bool,
}

impl VideoTrack {
    pub fn matrix(&self) -> Option<YuvMatrix> {
        self.colr
            .map(|(m, full)| YuvMatrix::from_code(Some(m), full, self.height))
    }
}

/// What `moov` says.
#[derive(Clone, Debug, Default)]
pub(crate) struct Movie {
    pub top: Vec<TopBox>,
    pub major_brand: Option<String>,
    pub video: Option<VideoTrack>,
    pub tracks: usize,
    /// Our freeform JSON entry.
    pub kino_json: Option<String>,
    /// `©cmt`.
    pub comment: Option<String>,
    pub file_len: u64,
}

/// Lists the top-level boxes and parses `ftyp` and `moov`.
pub(crate) fn read_movie<R: Read + Seek>(r: &mut R) -> Result<Movie> {
    let io = |e: std::io::Error| corrupt(format!("read error: {e}"));
    let file_len = r.seek(SeekFrom::End(0)).map_err(io)?;
    let mut movie = Movie {
        file_len,
        ..Movie::default()
    };
    let mut pos = 0u64;
    let mut moov: Option<Vec<u8>> = None;
    while pos < file_len {
        if file_len - pos < 8 {
            return Err(corrupt(format!(
                "{} stray bytes at the end of the file",
                file_len - pos
            )));
        }
        r.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut h = [0u8; 16];
        r.read_exact(&mut h[..8]).map_err(io)?;
        let size32 = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&h[4..8]);
        if !kind
            .iter()
            .all(|c| c.is_ascii_graphic() || *c == b' ' || *c == 0xa9)
        {
            return Err(corrupt(format!(
                "no valid box at byte {pos}; this is not an MP4 file or it is damaged"
            )));
        }
        let (header, size) = match size32 {
            0 => (8, file_len - pos),
            1 => {
                if file_len - pos < 16 {
                    return Err(corrupt("a large box header is cut off"));
                }
                r.read_exact(&mut h[8..16]).map_err(io)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(&h[8..16]);
                (16, u64::from_be_bytes(a))
            }
            s => (8, u64::from(s)),
        };
        if size < header {
            return Err(corrupt(format!(
                "box '{}' at byte {pos} has an impossible size {size}",
                fourcc(&kind)
            )));
        }
        if size > file_len - pos {
            return Err(corrupt(format!(
                "box '{}' at byte {pos} needs {size} bytes but the file ends after {} (truncated?)",
                fourcc(&kind),
                file_len - pos
            )));
        }
        movie.top.push(TopBox {
            kind: fourcc(&kind),
            offset: pos,
            size,
        });
        if &kind == b"ftyp" || &kind == b"moov" {
            if size > MAX_MOOV {
                return Err(MediaError::Unsupported(format!(
                    "'{}' box of {size} bytes is larger than this reader accepts",
                    fourcc(&kind)
                )));
            }
            let mut buf = vec![0u8; (size - header) as usize];
            r.read_exact(&mut buf).map_err(io)?;
            if &kind == b"ftyp" {
                if buf.len() >= 4 {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&buf[..4]);
                    movie.major_brand = Some(fourcc(&b));
                }
            } else if moov.is_none() {
                moov = Some(buf);
            }
        }
        pos += size;
    }
    if movie.top.first().map(|b| b.kind.as_str()) != Some("ftyp") && movie.major_brand.is_none() {
        // Old QuickTime files may lack ftyp; accept them if they have moov.
        if moov.is_none() {
            return Err(corrupt("no 'ftyp' or 'moov' box; this is not an MP4 file"));
        }
    }
    let Some(moov) = moov else {
        return Err(corrupt(
            "no 'moov' box (the file index); the file is truncated or was not finished",
        ));
    };
    parse_moov(&moov, &mut movie)?;
    Ok(movie)
}

fn parse_moov(moov: &[u8], movie: &mut Movie) -> Result<()> {
    for (kind, data) in children(moov)? {
        match &kind {
            b"trak" => {
                movie.tracks += 1;
                if movie.video.is_none() {
                    movie.video = parse_trak(data)?;
                }
            }
            b"udta" => parse_udta(data, movie)?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_udta(udta: &[u8], movie: &mut Movie) -> Result<()> {
    let Some(meta) = child(udta, b"meta")? else {
        return Ok(());
    };
    // ISO `meta` is a full box; QuickTime's is not. Tell them apart by what follows.
    let body = if meta.len() >= 8 && &meta[4..8] == b"hdlr" {
        meta
    } else {
        meta.get(4..)
            .ok_or_else(|| corrupt("'meta' box is too short"))?
    };
    let Some(ilst) = child(body, b"ilst")? else {
        return Ok(());
    };
    for (kind, item) in children(ilst)? {
        if &kind == b"----" {
            let mut mean = None;
            let mut name = None;
            let mut value = None;
            for (k, d) in children(item)? {
                match &k {
                    b"mean" => mean = d.get(4..).map(|s| String::from_utf8_lossy(s).into_owned()),
                    b"name" => name = d.get(4..).map(|s| String::from_utf8_lossy(s).into_owned()),
                    b"data" => value = data_text(d),
                    _ => {}
                }
            }
            if mean.as_deref() == Some(KINO_META_MEAN) && name.as_deref() == Some(KINO_META_NAME) {
                movie.kino_json = value;
            }
        } else if &kind == b"\xa9cmt" {
            if let Some(d) = child(item, b"data")? {
                movie.comment = data_text(d);
            }
        }
    }
    Ok(())
}

fn data_text(d: &[u8]) -> Option<String> {
    let ty = u32::from_be_bytes([*d.first()?, *d.get(1)?, *d.get(2)?, *d.get(3)?]);
    if ty != 1 {
        return None;
    }
    String::from_utf8(d.get(8..)?.to_vec()).ok()
}

fn parse_trak(trak: &[u8]) -> Result<Option<VideoTrack>> {
    let Some(mdia) = child(trak, b"mdia")? else {
        return Ok(None);
    };
    let Some(hdlr) = child(mdia, b"hdlr")? else {
        return Ok(None);
    };
    if hdlr.get(8..12) != Some(b"vide") {
        return Ok(None);
    }
    let mdhd = child(mdia, b"mdhd")?.ok_or_else(|| corrupt("video track has no 'mdhd' box"))?;
    let mut r = Rd::new(mdhd, "mdhd");
    let version = r.u8()?;
    r.skip(3)?;
    let (timescale, duration) = if version == 1 {
        r.skip(16)?;
        (r.u32()?, r.u64()?)
    } else {
        r.skip(8)?;
        (r.u32()?, u64::from(r.u32()?))
    };
    if timescale == 0 {
        return Err(corrupt("video track has timescale 0"));
    }
    let stbl = child(mdia, b"minf")?
        .map(|minf| child(minf, b"stbl"))
        .transpose()?
        .flatten()
        .ok_or_else(|| corrupt("video track has no sample table ('minf/stbl')"))?;

    // Sample description.
    let stsd = child(stbl, b"stsd")?.ok_or_else(|| corrupt("no 'stsd' box"))?;
    let mut r = Rd::new(stsd, "stsd");
    r.skip(4)?;
    if r.u32()? == 0 {
        return Err(corrupt("'stsd' has no sample description"));
    }
    let entries = children(r.rest())?;
    let Some((codec, entry)) = entries.first().copied() else {
        return Err(corrupt("'stsd' has no sample description"));
    };
    let mut r = Rd::new(entry, "stsd entry");
    r.skip(24)?;
    let width = u32::from(r.u16()?);
    let height = u32::from(r.u16()?);
    r.skip(50)?;
    let ext = children(r.rest())?;
    let mut sps = Vec::new();
    let mut pps = Vec::new();
    let mut length_size = 4;
    let mut colr = None;
    for (k, d) in &ext {
        match k {
            b"avcC" => {
                let mut a = Rd::new(d, "avcC");
                a.skip(4)?;
                length_size = usize::from(a.u8()? & 3) + 1;
                let nsps = a.u8()? & 0x1f;
                for _ in 0..nsps {
                    let n = usize::from(a.u16()?);
                    sps.push(a.take(n)?.to_vec());
                }
                let npps = a.u8()?;
                for _ in 0..npps {
                    let n = usize::from(a.u16()?);
                    pps.push(a.take(n)?.to_vec());
                }
            }
            b"colr" => {
                let mut c = Rd::new(d, "colr");
                let ty = c.take(4)?;
                if ty == b"nclx" || ty == b"nclc" {
                    c.skip(4)?;
                    let m = c.u16()?;
                    let full = ty == b"nclx" && c.u8().map(|f| f & 0x80 != 0).unwrap_or(false);
                    colr = Some((m.min(255) as u8, full));
                }
            }
            _ => {}
        }
    }

    // Timing.
    let stts = child(stbl, b"stts")?.ok_or_else(|| corrupt("no 'stts' box"))?;
    let mut r = Rd::new(stts, "stts");
    r.skip(4)?;
    let n = r.count(8)?;
    let mut deltas = Vec::with_capacity(n);
    for _ in 0..n {
        deltas.push((r.u32()?, r.u32()?));
    }

    // Sizes.
    let stsz = child(stbl, b"stsz")?.ok_or_else(|| corrupt("no 'stsz' box"))?;
    let mut r = Rd::new(stsz, "stsz");
    r.skip(4)?;
    let fixed = r.u32()?;
    let sizes = if fixed != 0 {
        let n = r.u32()? as usize;
        if n > 100_000_000 {
            return Err(corrupt(format!("'stsz' claims {n} samples")));
        }
        vec![fixed; n]
    } else {
        let n = r.count(4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(r.u32()?);
        }
        v
    };

    // Chunk offsets.
    let chunk_offsets: Vec<u64> = if let Some(stco) = child(stbl, b"stco")? {
        let mut r = Rd::new(stco, "stco");
        r.skip(4)?;
        let n = r.count(4)?;
        (0..n)
            .map(|_| r.u32().map(u64::from))
            .collect::<Result<_>>()?
    } else if let Some(co64) = child(stbl, b"co64")? {
        let mut r = Rd::new(co64, "co64");
        r.skip(4)?;
        let n = r.count(8)?;
        (0..n).map(|_| r.u64()).collect::<Result<_>>()?
    } else {
        return Err(corrupt("no 'stco' or 'co64' box"));
    };

    // Samples per chunk.
    let stsc = child(stbl, b"stsc")?.ok_or_else(|| corrupt("no 'stsc' box"))?;
    let mut r = Rd::new(stsc, "stsc");
    r.skip(4)?;
    let n = r.count(12)?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let first = r.u32()?;
        let per = r.u32()?;
        r.skip(4)?;
        runs.push((first, per));
    }
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut sample = 0usize;
    for (ci, &chunk_offset) in chunk_offsets.iter().enumerate() {
        let chunk = ci as u64 + 1;
        let per = runs
            .iter()
            .rev()
            .find(|(first, _)| u64::from(*first) <= chunk)
            .map_or(0, |&(_, p)| p as usize);
        let mut off = chunk_offset;
        for _ in 0..per {
            let Some(&size) = sizes.get(sample) else {
                break;
            };
            offsets.push(off);
            off = off.saturating_add(u64::from(size));
            sample += 1;
        }
    }
    if offsets.len() != sizes.len() {
        return Err(corrupt(format!(
            "the chunk tables place {} samples but 'stsz' lists {}",
            offsets.len(),
            sizes.len()
        )));
    }
    let timed: u64 = deltas.iter().map(|&(c, _)| u64::from(c)).sum();
    if timed != sizes.len() as u64 {
        return Err(corrupt(format!(
            "'stts' times {timed} samples but 'stsz' lists {}",
            sizes.len()
        )));
    }
    let has_ctts = child(stbl, b"ctts")?.is_some();
    Ok(Some(VideoTrack {
        codec,
        width,
        height,
        timescale,
        duration,
        sizes,
        offsets,
        deltas,
        sps,
        pps,
        length_size,
        colr,
        has_ctts,
    }))
}

/// Reads sample `i` of a track.
pub(crate) fn read_sample<R: Read + Seek>(
    r: &mut R,
    track: &VideoTrack,
    file_len: u64,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (Some(&off), Some(&size)) = (track.offsets.get(i), track.sizes.get(i)) else {
        return Err(corrupt(format!("no sample {i}")));
    };
    let size = u64::from(size);
    if size > MAX_SAMPLE {
        return Err(corrupt(format!("sample {i} claims {size} bytes")));
    }
    if off.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(corrupt(format!(
            "sample {i} lies at bytes {off}..{} but the file has only {file_len} bytes (truncated?)",
            off.saturating_add(size)
        )));
    }
    let io = |e: std::io::Error| corrupt(format!("read error in sample {i}: {e}"));
    r.seek(SeekFrom::Start(off)).map_err(io)?;
    buf.resize(size as usize, 0);
    r.read_exact(buf).map_err(io)
}
