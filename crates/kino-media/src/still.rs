//! Still images: reading PNG/JPEG/WebP into frames, writing frames, PNG frame folders,
//! thumbnails and spritesheets (through the `image` crate).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{MediaError, Result};
use crate::frame::{Frame, Video, MAX_SIDE};
use crate::util::write_file_atomic;

/// A still image format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// PNG (lossless).
    Png,
    /// JPEG with a quality 1–100.
    Jpeg { quality: u8 },
    /// WebP, lossless (the `image` crate writes only lossless WebP).
    WebpLossless,
}

impl Default for ImageFormat {
    fn default() -> Self {
        ImageFormat::Jpeg { quality: 85 }
    }
}

impl ImageFormat {
    /// The format for a file name's extension (`.png`, `.jpg`/`.jpeg`, `.webp`), JPEG at
    /// quality 85.
    pub fn from_path(path: &Path) -> Result<ImageFormat> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(ImageFormat::Png),
            Some("jpg" | "jpeg") => Ok(ImageFormat::default()),
            Some("webp") => Ok(ImageFormat::WebpLossless),
            _ => Err(MediaError::InvalidOption(format!(
                "cannot tell the image format of {}; name it .png, .jpg or .webp",
                path.display()
            ))),
        }
    }

    /// The usual file extension.
    pub fn extension(&self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg { .. } => "jpg",
            ImageFormat::WebpLossless => "webp",
        }
    }

    /// The MIME type.
    pub fn mime_type(&self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg { .. } => "image/jpeg",
            ImageFormat::WebpLossless => "image/webp",
        }
    }
}

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_SIDE);
    l.max_image_height = Some(MAX_SIDE);
    l.max_alloc = Some(2 << 30);
    l
}

fn image_err(e: image::ImageError) -> MediaError {
    match e {
        image::ImageError::Unsupported(u) => {
            MediaError::Unsupported(format!("{u}; PNG, JPEG and WebP images can be read"))
        }
        image::ImageError::Limits(l) => MediaError::Unsupported(format!(
            "{l}; images up to {MAX_SIDE} pixels a side can be read"
        )),
        other => MediaError::corrupt("image", other.to_string()),
    }
}

/// Decoders fill in missing image data silently in some cases; a file cut short must be an
/// error, so check for the end markers first.
fn check_complete(bytes: &[u8], format: Option<image::ImageFormat>) -> Result<()> {
    let find = |needle: &[u8]| bytes.windows(needle.len()).rposition(|w| w == needle);
    match format {
        Some(image::ImageFormat::Jpeg) => {
            // The end-of-image marker must follow the last start-of-scan.
            let sos = find(&[0xff, 0xda]).unwrap_or(0);
            if !bytes[sos..].windows(2).any(|w| w == [0xff, 0xd9]) {
                return Err(MediaError::corrupt(
                    "JPEG",
                    "the image data ends without an end-of-image marker",
                ));
            }
        }
        Some(image::ImageFormat::Png) => {
            // An IEND chunk (type and CRC) after the last IDAT.
            let idat = find(b"IDAT").unwrap_or(0);
            let complete = bytes[idat..]
                .windows(4)
                .position(|w| w == b"IEND")
                .is_some_and(|p| idat + p + 8 <= bytes.len());
            if !complete {
                return Err(MediaError::corrupt(
                    "PNG",
                    "the file ends before its IEND chunk",
                ));
            }
        }
        Some(image::ImageFormat::WebP) => {
            let riff = bytes
                .get(4..8)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if riff.is_none_or(|n| n.saturating_add(8) > bytes.len()) {
                return Err(MediaError::corrupt(
                    "WebP",
                    "the file is shorter than its RIFF header says",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Decodes PNG, JPEG or WebP bytes (format sniffed from the content) into an RGB frame;
/// alpha is dropped and 16-bit samples are reduced to 8.
pub fn decode_image(bytes: &[u8]) -> Result<Frame> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| MediaError::corrupt("image", e.to_string()))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        Some(f) => {
            return Err(MediaError::Unsupported(format!(
                "{f:?} images are not read; use PNG, JPEG or WebP"
            )))
        }
        None => {
            return Err(MediaError::Unsupported(
                "not a PNG, JPEG or WebP image (unknown signature)".to_string(),
            ))
        }
    }
    check_complete(bytes, reader.format())?;
    reader.limits(limits());
    let img = reader.decode().map_err(image_err)?.to_rgb8();
    let (w, h) = img.dimensions();
    Frame::new(w, h, img.into_raw())
}

/// Reads a PNG, JPEG or WebP file into an RGB frame.
pub fn read_image(path: impl AsRef<Path>) -> Result<Frame> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| MediaError::read(path, e))?;
    decode_image(&bytes).map_err(|e| crate::mp4::with_path(e, path))
}

/// Encodes a frame as a still image.
pub fn encode_image(frame: &Frame, format: ImageFormat) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (w, h) = (frame.width(), frame.height());
    let res = match format {
        ImageFormat::Png => {
            PngEncoder::new(&mut out).write_image(frame.data(), w, h, ExtendedColorType::Rgb8)
        }
        ImageFormat::Jpeg { quality } => {
            if !(1..=100).contains(&quality) {
                return Err(MediaError::InvalidOption(format!(
                    "JPEG quality {quality} is out of range; use 1 to 100 (85 is a good default)"
                )));
            }
            if w > 65_535 || h > 65_535 {
                return Err(MediaError::InvalidSize(format!(
                    "{w}x{h} is too large for JPEG (at most 65535 a side)"
                )));
            }
            JpegEncoder::new_with_quality(&mut out, quality).write_image(
                frame.data(),
                w,
                h,
                ExtendedColorType::Rgb8,
            )
        }
        ImageFormat::WebpLossless => WebPEncoder::new_lossless(&mut out).write_image(
            frame.data(),
            w,
            h,
            ExtendedColorType::Rgb8,
        ),
    };
    res.map_err(|e| MediaError::Image(e.to_string()))?;
    Ok(out)
}

/// Writes a frame as an image; the format follows the extension (`.png`, `.jpg`, `.webp`).
pub fn write_image(path: impl AsRef<Path>, frame: &Frame) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_image(frame, ImageFormat::from_path(path)?)?;
    write_file_atomic(path, &bytes)
}

/// Name of frame `i` in a PNG frame folder.
pub fn png_frame_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

/// Writes every frame as `dir/frame_00000.png`, `frame_00001.png`, … (creating `dir` if
/// needed) and returns the paths in order. Frames are encoded on all cores.
pub fn write_png_frames(dir: impl AsRef<Path>, video: &Video) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| MediaError::write(dir, e))?;
    let paths: Vec<PathBuf> = (0..video.len())
        .map(|i| dir.join(png_frame_name(i)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(video.len());
    let per = video.len().div_ceil(threads);
    let frames = video.frames();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = frames
            .chunks(per)
            .zip(paths.chunks(per))
            .map(|(fs, ps)| {
                s.spawn(move || -> Result<()> {
                    for (f, p) in fs.iter().zip(ps) {
                        let bytes = encode_image(f, ImageFormat::Png)?;
                        write_file_atomic(p, &bytes)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(MediaError::Image("PNG writer thread panicked".into())))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(paths)
}

/// Scales a frame to fit in `max_width × max_height` keeping its aspect ratio (never up).
pub fn fit_frame(frame: &Frame, max_width: u32, max_height: u32) -> Result<Frame> {
    if max_width == 0 || max_height == 0 {
        return Err(MediaError::InvalidOption(format!(
            "cannot fit a frame into {max_width}x{max_height}; both sides must be at least 1"
        )));
    }
    let (w, h) = (frame.width(), frame.height());
    if w <= max_width && h <= max_height {
        return Ok(frame.clone());
    }
    let scale = (f64::from(max_width) / f64::from(w)).min(f64::from(max_height) / f64::from(h));
    let nw = ((f64::from(w) * scale).round() as u32).clamp(1, max_width);
    let nh = ((f64::from(h) * scale).round() as u32).clamp(1, max_height);
    resize(frame, nw, nh)
}

/// Resizes a frame to exactly `width × height` (triangle filter).
pub fn resize(frame: &Frame, width: u32, height: u32) -> Result<Frame> {
    let img = RgbImage::from_raw(frame.width(), frame.height(), frame.data().to_vec())
        .ok_or_else(|| MediaError::InvalidSize("frame buffer does not match its size".into()))?;
    let out = image::imageops::resize(&img, width, height, image::imageops::FilterType::Triangle);
    Frame::new(width, height, out.into_raw())
}

/// Thumbnail settings (default: the middle frame, full size, JPEG quality 85).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThumbnailOptions {
    /// Which frame; `None` = the middle one.
    pub frame: Option<usize>,
    /// Longest side in pixels (never scaled up); `None` keeps the size.
    pub max_side: Option<u32>,
    /// Output format.
    pub format: ImageFormat,
}

/// Encodes one frame of a video as a thumbnail image.
pub fn thumbnail(video: &Video, opts: &ThumbnailOptions) -> Result<Vec<u8>> {
    let i = opts.frame.unwrap_or(video.len() / 2);
    let Some(frame) = video.frames().get(i) else {
        return Err(MediaError::InvalidOption(format!(
            "thumbnail frame {i} does not exist; the video has frames 0 to {}",
            video.len() - 1
        )));
    };
    let frame = match opts.max_side {
        Some(m) => fit_frame(frame, m, m)?,
        None => frame.clone(),
    };
    encode_image(&frame, opts.format)
}

/// Writes a thumbnail image to `path`.
pub fn write_thumbnail(
    path: impl AsRef<Path>,
    video: &Video,
    opts: &ThumbnailOptions,
) -> Result<()> {
    write_file_atomic(path.as_ref(), &thumbnail(video, opts)?)
}

/// Spritesheet settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpritesheetOptions {
    /// How many evenly spaced frames (first and last included); capped at the frame count.
    pub count: usize,
    /// Tiles per row; `None` = a near-square grid.
    pub columns: Option<usize>,
    /// Width of each tile in pixels (height follows the aspect ratio); never scaled up.
    pub tile_width: u32,
    /// Output format.
    pub format: ImageFormat,
}

impl Default for SpritesheetOptions {
    fn default() -> Self {
        SpritesheetOptions {
            count: 16,
            columns: None,
            tile_width: 256,
            format: ImageFormat::default(),
        }
    }
}

/// Where the tiles of a spritesheet are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpritesheetLayout {
    pub columns: usize,
    pub rows: usize,
    pub tile_width: u32,
    pub tile_height: u32,
    /// The video frame shown by each tile, row by row.
    pub frame_indices: Vec<usize>,
}

/// Evenly spaced frame indices: `count` of `0..len`, first and last included.
pub fn evenly_spaced(len: usize, count: usize) -> Vec<usize> {
    let count = count.min(len);
    match count {
        0 => vec![],
        1 => vec![0],
        _ => (0..count)
            .map(|i| ((i * (len - 1)) as f64 / (count - 1) as f64).round() as usize)
            .collect(),
    }
}

/// Builds a spritesheet image (a grid of evenly spaced frames, black where the grid has no
/// tile) and its layout.
pub fn spritesheet(video: &Video, opts: &SpritesheetOptions) -> Result<(Frame, SpritesheetLayout)> {
    if opts.count == 0 || opts.tile_width == 0 || opts.columns == Some(0) {
        return Err(MediaError::InvalidOption(format!(
            "spritesheet needs count, columns and tile_width of at least 1 (got {}, {:?}, {})",
            opts.count, opts.columns, opts.tile_width
        )));
    }
    let indices = evenly_spaced(video.len(), opts.count);
    let n = indices.len();
    let columns = opts
        .columns
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n);
    let rows = n.div_ceil(columns);
    let tw = opts.tile_width.min(video.width());
    let th = ((f64::from(video.height()) * f64::from(tw) / f64::from(video.width())).round()
        as u32)
        .max(1);
    let sheet_w = u64::from(tw) * columns as u64;
    let sheet_h = u64::from(th) * rows as u64;
    if sheet_w > u64::from(MAX_SIDE) || sheet_h > u64::from(MAX_SIDE) {
        return Err(MediaError::InvalidOption(format!(
            "spritesheet would be {sheet_w}x{sheet_h}; use fewer frames or a smaller tile_width"
        )));
    }
    let (sw, sh) = (sheet_w as u32, sheet_h as u32);
    let mut data = vec![0u8; sw as usize * sh as usize * 3];
    for (k, &fi) in indices.iter().enumerate() {
        let tile = resize(&video.frames()[fi], tw, th)?;
        let (cx, cy) = ((k % columns) as u32 * tw, (k / columns) as u32 * th);
        for y in 0..th {
            let src = &tile.data()[(y * tw * 3) as usize..((y + 1) * tw * 3) as usize];
            let dst_start = (((cy + y) * sw + cx) * 3) as usize;
            data[dst_start..dst_start + src.len()].copy_from_slice(src);
        }
    }
    let layout = SpritesheetLayout {
        columns,
        rows,
        tile_width: tw,
        tile_height: th,
        frame_indices: indices,
    };
    Ok((Frame::new(sw, sh, data)?, layout))
}

/// Writes a spritesheet to `path` and returns its layout.
pub fn write_spritesheet(
    path: impl AsRef<Path>,
    video: &Video,
    opts: &SpritesheetOptions,
) -> Result<SpritesheetLayout> {
    let (sheet, layout) = spritesheet(video, opts)?;
    write_file_atomic(path.as_ref(), &encode_image(&sheet, opts.format)?)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Fps;

    #[test]
    fn evenly_spaced_indices() {
        assert_eq!(evenly_spaced(121, 5), vec![0, 30, 60, 90, 120]);
        assert_eq!(evenly_spaced(3, 10), vec![0, 1, 2]);
        assert_eq!(evenly_spaced(10, 1), vec![0]);
    }

    #[test]
    fn image_roundtrip_png_webp_jpeg() {
        let f = Frame::from_fn(33, 17, |x, y| [(x * 7) as u8, (y * 13) as u8, 99]).unwrap();
        for fmt in [ImageFormat::Png, ImageFormat::WebpLossless] {
            let back = decode_image(&encode_image(&f, fmt).unwrap()).unwrap();
            assert_eq!(back, f, "{fmt:?}");
        }
        let back =
            decode_image(&encode_image(&f, ImageFormat::Jpeg { quality: 95 }).unwrap()).unwrap();
        assert_eq!((back.width(), back.height()), (33, 17));
        assert!(crate::frame::psnr(&f, &back).unwrap() > 30.0);
    }

    #[test]
    fn garbage_images_are_errors() {
        assert!(decode_image(b"").is_err());
        assert!(decode_image(b"hello world, not an image").is_err());
        let f = Frame::filled(8, 8, [1, 2, 3]).unwrap();
        let png = encode_image(&f, ImageFormat::Png).unwrap();
        for cut in [8, 20, png.len() / 2, png.len() - 5] {
            let e = decode_image(&png[..cut]).unwrap_err();
            assert!(matches!(e, MediaError::Corrupt { .. }), "{cut}: {e}");
        }
    }

    #[test]
    fn spritesheet_layout() {
        let frames = (0..10u8)
            .map(|i| Frame::filled(64, 32, [i * 20, 0, 0]).unwrap())
            .collect();
        let v = Video::new(frames, Fps::integer(10).unwrap()).unwrap();
        let (sheet, layout) = spritesheet(
            &v,
            &SpritesheetOptions {
                count: 4,
                tile_width: 32,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((layout.columns, layout.rows), (2, 2));
        assert_eq!((layout.tile_width, layout.tile_height), (32, 16));
        assert_eq!(layout.frame_indices, vec![0, 3, 6, 9]);
        assert_eq!((sheet.width(), sheet.height()), (64, 32));
        // Bottom-right tile shows frame 9.
        assert_eq!(sheet.pixel(48, 24).unwrap()[0], 180);
    }
}
