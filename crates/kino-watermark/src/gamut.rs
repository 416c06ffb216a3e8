//! Luma changes in saturated pixels.
//!
//! The mark is a change of luma, made by adding the same amount to R, G and B (which leaves the
//! colour difference untouched). A saturated pixel has a channel at 0 or 255 (pure red
//! `(255, 0, 0)`, the bars of a test card, a fully coloured gradient), and adding to it clips:
//! red can still go up through G and B and down through R, but not by the same amount in every
//! channel. Layout v4 therefore gave frames with many such pixels the chips alone (QIM must move
//! a cell's mean both ways). Here the luma change is *realised* instead: what a clipped channel
//! cannot take is taken by the channels that can, in proportion to their luma weight, each
//! channel moving at most [`CHANNEL_MAX`] levels (or the change itself, if larger). An
//! unclipped pixel gets exactly what it got before (the change, rounded, on all three).
//!
//! Only pixels at the ends of every channel that could help stay put: black cannot get darker,
//! white cannot get brighter, and a yellow `(255, 255, 0)` brightens (a blue `(0, 0, 255)` darkens)
//! only through blue (weight 0.114, so by 1.4 levels at most). [`stuck_share`] counts the pixels that cannot move their luma
//! by half of [`STUCK_PROBE`] levels either way: the frames the chips still carry alone.

/// Luma weights (BT.601), as the mark measures luma.
const W: [f32; 3] = [0.299, 0.587, 0.114];

/// The most a channel moves to make up for a clipped one (levels), unless the change itself is
/// larger. Small against the colour: 12 levels of blue added to a yellow `(255, 255, 0)` is 0.4%
/// of its light (the low end of the sRGB curve), 12 levels off a pure red's 255 about 10% of its
/// red and the luma change asked for.
pub(crate) const CHANNEL_MAX: f32 = 12.0;

/// The luma changes `c` that pixel `v` takes on every channel alike, without clipping:
/// `lo ≤ c ≤ hi`. Inside it [`realise`] gives `[c; 3]`; the callers skip it there.
pub(crate) fn free_range(v: [u8; 3]) -> (f32, f32) {
    let (mn, mx) = (v[0].min(v[1]).min(v[2]), v[0].max(v[1]).max(v[2]));
    (-f32::from(mn), 255.0 - f32::from(mx))
}

/// Channel changes (levels, unrounded) that move the luma of pixel `v` by `c`, or as near as
/// the channels allow (see the module's documentation).
pub(crate) fn realise(v: [u8; 3], c: f32) -> [f32; 3] {
    if c == 0.0 {
        return [0.0; 3];
    }
    let lim = c.abs().max(CHANNEL_MAX);
    let lo = v.map(|x| (-f32::from(x)).max(-lim));
    let hi = v.map(|x| (255.0 - f32::from(x)).min(lim));
    let mut d = [0f32; 3];
    for i in 0..3 {
        d[i] = c.clamp(lo[i], hi[i]);
    }
    // Each round frees at least one channel's share or ends: three rounds suffice.
    for _ in 0..3 {
        let short = c - (W[0] * d[0] + W[1] * d[1] + W[2] * d[2]);
        if short.abs() < 1e-3 {
            break;
        }
        let free = [0, 1, 2].map(|i| {
            if short > 0.0 {
                d[i] < hi[i]
            } else {
                d[i] > lo[i]
            }
        });
        let wsum: f32 = (0..3).filter(|&i| free[i]).map(|i| W[i]).sum();
        if wsum <= 0.0 {
            break;
        }
        for i in (0..3).filter(|&i| free[i]) {
            d[i] = (d[i] + short / wsum).clamp(lo[i], hi[i]);
        }
    }
    d
}

/// The luma change [`realise`] achieves for pixel `v` asked for `c`.
pub(crate) fn realised_luma(v: [u8; 3], c: f32) -> f32 {
    let d = realise(v, c);
    W[0] * d[0] + W[1] * d[1] + W[2] * d[2]
}

/// Pixel `v` with its luma moved by `c` (levels): `round(c)` on every channel where that fits
/// (as the mark always did), else [`realise`]d, each channel rounded.
pub(crate) fn apply_pixel(px: &mut [u8], c: f32) {
    let di = c.round() as i16;
    if di == 0 {
        return;
    }
    let (lo, hi) = free_range([px[0], px[1], px[2]]);
    if (lo..=hi).contains(&f32::from(di)) {
        for x in px.iter_mut() {
            *x = (i16::from(*x) + di) as u8;
        }
        return;
    }
    let d = realise([px[0], px[1], px[2]], c);
    for (x, dc) in px.iter_mut().zip(d) {
        *x = (f32::from(*x) + dc).round().clamp(0.0, 255.0) as u8;
    }
}

/// The luma change [`stuck_share`] asks of a pixel both ways (levels).
pub(crate) const STUCK_PROBE: f32 = 3.0;

/// The share of pixels that cannot move their luma by half of [`STUCK_PROBE`] both ways, even
/// through the other channels: near black, near white, and the few colours whose free channels
/// weigh too little (yellow brightening, blue darkening).
pub(crate) fn stuck_share(rgb: &[u8]) -> f64 {
    crate::qim::pixel_share(rgb, |v| {
        // Most pixels: every channel has the room.
        let (lo, hi) = free_range(v);
        if lo <= -STUCK_PROBE && hi >= STUCK_PROBE {
            return false;
        }
        realised_luma(v, STUCK_PROBE) < STUCK_PROBE / 2.0
            || realised_luma(v, -STUCK_PROBE) > -STUCK_PROBE / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luma(v: [u8; 3]) -> f32 {
        W[0] * f32::from(v[0]) + W[1] * f32::from(v[1]) + W[2] * f32::from(v[2])
    }

    #[test]
    fn unclipped_pixels_move_every_channel_alike() {
        let mut p = [100u8, 120, 90];
        apply_pixel(&mut p, 2.6);
        assert_eq!(p, [103, 123, 93]);
        let mut p = [100u8, 120, 90];
        apply_pixel(&mut p, -0.4);
        assert_eq!(p, [100, 120, 90]);
    }

    #[test]
    fn saturated_pixels_move_their_luma_through_the_free_channels() {
        for (v, c) in [
            ([255u8, 0, 0], 3.0f32),
            ([255, 0, 0], -3.0),
            ([0, 0, 255], 2.0),
            ([0, 0, 255], -1.2),
            ([255, 255, 0], -4.0),
            ([0, 255, 255], 3.0),
            ([254, 10, 1], -5.0),
        ] {
            let got = realised_luma(v, c);
            assert!((got - c).abs() < 1e-3, "{v:?} by {c}: {got}");
            let mut p = v;
            apply_pixel(&mut p, c);
            let moved = luma(p) - luma(v);
            assert!(
                (moved - c).abs() <= 0.6,
                "{v:?} by {c}: rounded {p:?}, {moved}"
            );
            for (a, b) in p.iter().zip(v) {
                assert!((i16::from(*a) - i16::from(b)).abs() <= CHANNEL_MAX as i16);
            }
        }
    }

    #[test]
    fn black_white_and_yellow_are_limited() {
        assert_eq!(realised_luma([0, 0, 0], -3.0), 0.0);
        assert_eq!(realised_luma([255, 255, 255], 3.0), 0.0);
        let y = realised_luma([255, 255, 0], 5.0);
        assert!((y - W[2] * CHANNEL_MAX).abs() < 1e-4, "{y}");
        let b = realised_luma([0, 0, 255], -5.0);
        assert!((b + W[2] * CHANNEL_MAX).abs() < 1e-4, "{b}");
        let grey = vec![128u8; 30];
        assert_eq!(stuck_share(&grey), 0.0);
        let mut mixed = vec![255u8, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 0];
        mixed.extend([40, 200, 90]);
        // Red moves both ways; black, white and yellow are stuck one way.
        assert!((stuck_share(&mixed) - 0.6).abs() < 1e-9);
        assert_eq!(stuck_share(&[]), 0.0);
    }
}
