//! Kino's invisible video watermark: a keyed mark in the luma with two carriers of the same
//! coded payload (layout "v4").
//!
//! - **Quantisation index modulation of coarse cells** (module `qim`): each cell's mean luma is
//!   moved onto a keyed lattice of its bit, so the picture itself is no noise to the reader.
//!   This carries natural footage (photographs, textured pictures) through H.264 at CRF 28 even
//!   at 256×256. It needs pixels that can move both ways, so frames with more than half the
//!   picture stuck at black or white get only the second carrier.
//! - **Spread-spectrum chips** (layout "v3", below): a correlation against a keyed ±1 pattern.
//!   In QIM frames the chips keep 0.3 of the strength and serve the sync search alone (scale and
//!   shift after rescaling and crops): since stop 55 every chip of their tile is a sync chip
//!   there (256 instead of 46: an off-centre 10% crop at 256×256 is found in 11 of 15 clips
//!   instead of 0); in frames stuck at black or white they carry the payload at full strength,
//!   after every channel is pulled one level in from 0 and 255 (`QimParams::headroom`, since
//!   stop 61: white 255 → 254 everywhere, which no one can see), so they move a flat white or
//!   black background both ways, ±1 as on any flat region, instead of losing half of each chip
//!   to clipping (kino-shapes' 24 clips upscaled to 256×256, CRF 28: 20 → 24 detected).
//!
//! The detector reads both and reports which carrier decoded (`Detection::carrier`); marks
//! made by earlier Kino versions with layout v3 (chips only) are still detected. A decoded
//! video should be read with [`detect_luma`] and the luma planes of
//! [`kino_media::decode_video_head_luma`] (as `kino verify` does): the luma the stream codes,
//! where the luma of 8-bit RGB is clipped on saturated colour and, through swscale, 1–2 levels
//! low on coloured pixels, which cost the QIM cells most of their margin. The README's
//! Watermark section has the measured rates. What follows describes the chips; the QIM
//! carrier's design is in `qim.rs`.
//!
//! - **Luma only, same mark in every frame.** The same amount is added to R, G and B (that is
//!   exactly a luma change for BT.601/709 weights, so colours do not shift). Because every frame
//!   carries the whole payload, cutting frames or changing the frame rate (dropping or
//!   duplicating frames) changes nothing; the detector averages the residual of up to 48 frames,
//!   so moving content averages out while the mark adds up. (After H.264 this helps less than
//!   it seems: predicted frames copy the key frame's mark together with its coding errors, and
//!   at 256×256, CRF 28, the first frame alone decodes about as often as all 24.) Chroma was
//!   measured as a second carrier (`examples/wm_chroma.rs`): it holds less of the picture's
//!   interference, but libx264's 4:2:0 and chroma quantisation keep so much less of a chroma
//!   mark that per unit of PSNR it is the worse channel (per-chip SNR after CRF 28 at 256×256:
//!   luma 0.70–0.88, Cb 0.47–0.57, Cr 0.60–0.64), and in the PSNR headroom the luma mark leaves
//!   it adds under 1 dB; see the README.
//! - **Low/mid frequencies.** The mark is a grid of ±1 *chips*, smoothly interpolated (a
//!   smoothstep, C¹), 48 chips along the frame's shorter side (at least 3 px each, so a 256×256
//!   video scaled to half size keeps its grid within the scale search). At 832×480 a chip is
//!   10 px, at 1280×720 15 px: coarse enough that H.264 at CRF 28 keeps most of it and that it
//!   survives scaling to half size. (At 256×256 chips are 5.3 px, and CRF 28 leaves too little
//!   of them for reliable detection: see the README's table.)
//! - **A normalised grid for scaling.** Chip size is a fraction of the shorter side, so a
//!   uniformly rescaled video carries the mark at the same place relative to the picture.
//! - **A periodic tile, anchored sync and a synchronisation search for cropping.** The chips
//!   form a 16×16 tile (a third of the shorter side) repeated over the frame. Re-encoding,
//!   rescaling, frame cuts and frame-rate changes keep the tile's origin at the frame's top-left
//!   corner, and a centred crop keeps it at a known offset from the frame's centre (a 10% crop
//!   makes chips look 1/0.9 = 1.11 times larger); any other crop is a circular shift of the
//!   tile. The detector folds the whitened frames onto one tile at each scale from 0.8 to 1.25
//!   (0.4% steps) and correlates the fold with the keyed sync chips by phase-only FFT
//!   correlation (the fold's spectrum is flattened first, so the picture's leftover structure,
//!   strong at a few frequencies, does not drown the peak). At every scale it keeps the best
//!   shift anywhere (*free*) and the best within one bin of the two *anchored* shifts (corner,
//!   centre). Anchored hypotheses are few (2 × 9 per scale instead of 64 × 64), so a weak mark
//!   is found there long after the free search has lost it in noise.
//! - **Payload with error correction.** 64 bits (a 16-bit check field, the Kino marker XOR the
//!   id's CRC-16, then the 48-bit id) are coded with the rate-1/3, K=7 convolutional code of LTE
//!   (generators 133, 171, 165 octal, zero tail, not punctured: 210 coded bits) and decoded by a
//!   soft-decision Viterbi decoder. Each coded bit owns one chip of the tile (repeated in every
//!   tile and frame); the other 46 chips are sync. Before the payload is read, the fold is
//!   whitened: divided, frequency by frequency, by the power spectrum of folds at scales where
//!   the mark does not line up (the picture's leftover and the codec's noise).
//! - **Keyed.** Chip signs, which chips are sync, and which chip carries which coded bit all come
//!   from ChaCha20 seeded with SHA-256 of the 32-byte key (layout "v3"): without the key the
//!   pattern looks like noise and neither sync nor payload can be read. Marks of the earlier
//!   layouts (v1, v2) are not detected.
//! - **Invisible.** Perceptual masking: the amplitude follows the local texture (mean absolute
//!   Laplacian per 8×8 block, smoothed): 1 level in flat regions, up to 6 levels in texture;
//!   the frame's root-mean-square change (both carriers together) is capped at 2.3 levels, so
//!   PSNR ≥ 40 dB always. The QIM carrier is shaped by the same amplitude less 0.75, so flat
//!   regions keep the chips' ±1 level and barely any QIM change.
//! - **Plain spread spectrum.** v2 scaled each chip so the unmarked picture's own interference
//!   was cancelled (informed embedding). Measured at 256×256 (`examples/wm_snr.rs`): the
//!   picture's interference survives H.264 almost unchanged (correlation 0.74–1.0 before/after
//!   CRF 28) while the mark keeps only 17–45% of its strength in most clips, so the cancellation
//!   was lost while its cost remained; equal-strength chips decode more clips after CRF 23 and
//!   28 (`examples/wm_diag.rs`), and marking is cheaper.
//!
//! # Detection statistics
//!
//! The detector whitens each frame (luma minus a blur about one chip wide, divided by the local
//! strength of that residual), sums the frames, folds onto a tile at each of 112 scales, and
//! correlates with two sync patterns at all 64×64 shifts: the 46 sync chips (frames whose chips
//! carry the payload) and the full keyed tile (the chips of a QIM frame); a shift scores the
//! larger of its two z-scores, each measured against the spread of its correlation over all
//! shifts. The payload of at most 12 candidates is
//! decoded: the anchored corner shift at scale 1, the 6 strongest anchored peaks and the 5
//! strongest free peaks (at scales at least 3 steps apart); the mark is **detected** only when
//! a decoded payload's 16-bit check field matches (so a wrongly corrected id is refused too).
//! The QIM carrier is then read at up to 15 grids (the corner at scale 1, the anchored peaks'
//! grids, the 3 corner- or centre-anchored grids of any searched scale where the first frame's
//! cells fit the lattices best, and the 5 best-fitting grids the 24 strongest free peaks allow,
//! each moved by up to a quarter chip to where its cells fit best),
//! twice each (the first frame; the mean of up to 16 frames): 30 more decodes. A decode counts
//! only with at most 48 of its 210 coded bits corrected (random soft bits decode 50 ± 4 bits
//! from their codeword: a quarter are within 48). For an unmarked clip the decoded bits are
//! noise, so the false-positive probability is at most `42 · 2⁻¹⁶ · 0.25 ≈ 1.6·10⁻⁴` per clip
//! (1 in 6 240), for a
//! chips decode further multiplied by the chance of a sync peak that strong (`H · Q(z)`, `H` =
//! hypotheses of its kind tried); see [`Detection::false_alarm_probability`]. The README's
//! Watermark section has measured rates.
//!
//! ```
//! use kino_media::Frame;
//! use kino_watermark::{detect, Embedder, Key};
//!
//! let key = Key::from_bytes(b"example key");
//! let embedder = Embedder::new(&key, 0x1234_5678_9abc, 256, 256);
//! let mut frames: Vec<Frame> = (0..4)
//!     .map(|t| Frame::from_fn(256, 256, |x, y| {
//!         let v = ((x * 7 + y * 13 + t * 5) % 97 + (x ^ y) % 31) as u8;
//!         [v, v / 2 + 40, 200 - v]
//!     }).unwrap())
//!     .collect();
//! for (i, f) in frames.iter_mut().enumerate() {
//!     embedder.mark(f, i);
//! }
//! let d = detect(&frames, &key);
//! assert!(d.detected);
//! assert_eq!(d.id, Some(0x1234_5678_9abc));
//! assert!(!detect(&frames, &Key::from_bytes(b"other key")).detected);
//! ```

mod detect;
mod ecc;
mod embed;
mod fft;
mod gamut;
mod pattern;
mod qim;

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

pub use detect::{
    chip_soft, decode_at, detect, detect_luma, detect_with, probe_chips, qim_raw_errors, Detection,
};
pub use embed::{probe_amplitude, probe_clipped, probe_pattern, Embedder};
pub use qim::QimParams;

/// A watermark key: 32 secret bytes. Whoever holds it can mark and detect; without it the mark
/// can be neither found nor read.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// A key from bytes: exactly 32 bytes are used as they are (so `from_bytes(&k.to_bytes())`
    /// is `k`); any other length is hashed with SHA-256 (so a passphrase works too).
    pub fn from_bytes(bytes: &[u8]) -> Key {
        match <[u8; 32]>::try_from(bytes) {
            Ok(k) => Key(k),
            Err(_) => {
                let mut h = Sha256::new();
                h.update(b"kino-watermark key");
                h.update(bytes);
                Key(h.finalize().into())
            }
        }
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Key {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        Key(k)
    }

    /// The 32 key bytes (keep them secret).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrip() {
        let k = Key::generate();
        assert_eq!(Key::from_bytes(&k.to_bytes()), k);
        assert_ne!(Key::generate(), k);
        assert_eq!(Key::from_bytes(b"pass"), Key::from_bytes(b"pass"));
        assert_ne!(
            Key::from_bytes(b"pass").to_bytes(),
            *b"pass\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        assert_eq!(format!("{k:?}"), "Key(…)");
    }
}
