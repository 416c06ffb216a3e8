//! The keyed layout of one tile and the smooth, periodic pattern built from it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use crate::ecc;
use crate::Key;

/// Chips along a tile's side; a tile holds the whole payload once.
pub(crate) const TILE: usize = 16;
/// Chips in a tile.
pub(crate) const CHIPS: usize = TILE * TILE;
/// Chips along the frame's shorter side (so a tile is a third of the shorter side) …
pub(crate) const CHIPS_PER_SHORT_SIDE: f64 = 48.0;
/// … but never smaller than this many pixels (so half of a 256×256 frame, 2.7 px chips, is
/// still within the detector's scale search; one tile covers 48×48 px at least).
pub(crate) const MIN_CHIP_PX: f64 = 3.0;
/// The Kino marker: the first 16 payload bits.
pub(crate) const MARKER: u16 = 0x4B4E; // "KN"
/// Payload: marker + 48-bit id.
pub(crate) const INFO_BITS: usize = 64;
/// Coded bits (one chip each); the other chips of the tile carry the known sync pattern.
pub(crate) const CODED_BITS: usize = ecc::coded_len(INFO_BITS);
#[cfg(test)]
pub(crate) const SYNC_CHIPS: usize = CHIPS - CODED_BITS;

/// Chip size in pixels for a frame of this size (square chips, tied to the shorter side so a
/// uniform rescale keeps the pattern in place relative to the picture).
pub(crate) fn chip_px(width: u32, height: u32) -> f64 {
    (f64::from(width.min(height)) / CHIPS_PER_SHORT_SIDE).max(MIN_CHIP_PX)
}

/// What the key decides: each chip's sign, which chips carry sync, which carry which coded bit.
pub(crate) struct Layout {
    /// ±1 per chip (row-major, `TILE × TILE`).
    pub sign: [f32; CHIPS],
    /// `data[k]` = the chip carrying coded bit `k`.
    pub data: [usize; CODED_BITS],
    /// True for sync chips.
    pub is_sync: [bool; CHIPS],
}

impl Layout {
    pub fn new(key: &Key) -> Layout {
        let mut h = Sha256::new();
        h.update(b"kino-watermark v3 layout");
        h.update(key.to_bytes());
        let seed: [u8; 32] = h.finalize().into();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut sign = [0f32; CHIPS];
        for s in sign.iter_mut() {
            *s = if rng.random::<bool>() { 1.0 } else { -1.0 };
        }
        let mut perm: Vec<usize> = (0..CHIPS).collect();
        for i in (1..CHIPS).rev() {
            let j = rng.random_range(0..=i);
            perm.swap(i, j);
        }
        let mut data = [0usize; CODED_BITS];
        data.copy_from_slice(&perm[..CODED_BITS]);
        let mut is_sync = [true; CHIPS];
        for &c in &data {
            is_sync[c] = false;
        }
        Layout {
            sign,
            data,
            is_sync,
        }
    }

    /// Chip values (±1) of the full mark for this payload.
    pub fn chips(&self, id: u64) -> [f32; CHIPS] {
        let coded = ecc::encode(&payload_bits(id));
        let mut chips = self.sign;
        for (k, &c) in self.data.iter().enumerate() {
            if !coded[k] {
                chips[c] = -chips[c];
            }
        }
        chips
    }

    /// Chip values of the sync part only (data chips 0).
    pub fn sync_chips(&self) -> [f32; CHIPS] {
        let mut chips = self.sign;
        for (c, v) in chips.iter_mut().enumerate() {
            if !self.is_sync[c] {
                *v = 0.0;
            }
        }
        chips
    }
}

/// The 16-bit check field for an id: the Kino marker XOR the id's CRC-16 (CCITT), so a
/// decoded payload passes only if the marker *and* every id bit are right.
pub(crate) fn check_field(id: u64) -> u16 {
    let mut crc = 0xFFFFu16;
    for i in (0..6).rev() {
        crc ^= u16::from((id >> (8 * i)) as u8) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    MARKER ^ crc
}

/// The 64 payload bits, most significant first: check field (16) then the id's low 48 bits.
pub(crate) fn payload_bits(id: u64) -> Vec<bool> {
    let id = id & ((1 << 48) - 1);
    let word = (u64::from(check_field(id)) << 48) | id;
    (0..INFO_BITS).rev().map(|i| (word >> i) & 1 == 1).collect()
}

/// The inverse of [`payload_bits`]: `(marker, id)`.
pub(crate) fn unpack(bits: &[bool]) -> (u16, u64) {
    let word = bits.iter().fold(0u64, |w, &b| (w << 1) | u64::from(b));
    ((word >> 48) as u16, word & ((1 << 48) - 1))
}

/// The interpolation weight of a chip whose centre is `d` chips away (|d| < 1), a smoothstep:
/// the pattern is C¹-smooth, which keeps its energy at low and middle frequencies.
pub(crate) fn kernel(d: f64) -> f64 {
    let t = d.abs();
    if t >= 1.0 {
        0.0
    } else {
        1.0 - t * t * (3.0 - 2.0 * t)
    }
}

/// One axis of the pattern at position `u` (in chips, any real): the two chips that
/// contribute and the weight of the second.
#[derive(Clone, Copy)]
pub(crate) struct Axis {
    pub i0: usize,
    pub i1: usize,
    pub w1: f32,
}

pub(crate) fn axis(u: f64) -> Axis {
    let f = u - 0.5;
    let fl = f.floor();
    let t = f - fl;
    let i0 = (fl as i64).rem_euclid(TILE as i64) as usize;
    Axis {
        i0,
        i1: (i0 + 1) % TILE,
        w1: (t * t * (3.0 - 2.0 * t)) as f32,
    }
}

/// The pattern value at chip coordinates given by two axes.
#[inline]
pub(crate) fn value(chips: &[f32; CHIPS], ax: Axis, ay: Axis) -> f32 {
    let r0 = ay.i0 * TILE;
    let r1 = ay.i1 * TILE;
    let top = chips[r0 + ax.i0] + ax.w1 * (chips[r0 + ax.i1] - chips[r0 + ax.i0]);
    let bot = chips[r1 + ax.i0] + ax.w1 * (chips[r1 + ax.i1] - chips[r1 + ax.i0]);
    top + ay.w1 * (bot - top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrip_and_layout_is_keyed() {
        let bits = payload_bits(0xDEAD_BEEF_CAFE_1234);
        assert_eq!(
            unpack(&bits),
            (check_field(0xBEEF_CAFE_1234), 0xBEEF_CAFE_1234)
        );
        assert_ne!(check_field(1), check_field(2));
        let a = Layout::new(&Key::from_bytes(b"a"));
        let b = Layout::new(&Key::from_bytes(b"b"));
        assert_ne!(a.data, b.data);
        assert_eq!(a.is_sync.iter().filter(|&&s| s).count(), SYNC_CHIPS);
    }
}
