//! A small radix-2 complex FFT (the detector's 64×64 circular correlations need nothing more).

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct C64 {
    pub re: f64,
    pub im: f64,
}

impl C64 {
    fn mul(self, o: C64) -> C64 {
        C64 {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    pub fn conj(self) -> C64 {
        C64 {
            re: self.re,
            im: -self.im,
        }
    }
    pub fn mul_conj(self, o: C64) -> C64 {
        self.mul(o.conj())
    }
}

/// In-place FFT of `buf` (length a power of two); `inverse` computes the unnormalised inverse.
fn fft1(buf: &mut [C64], inverse: bool) {
    let n = buf.len();
    debug_assert!(n.is_power_of_two());
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            buf.swap(i, j);
        }
    }
    let sign = if inverse { 1.0 } else { -1.0 };
    let mut len = 2;
    while len <= n {
        let ang = sign * 2.0 * std::f64::consts::PI / len as f64;
        let wl = C64 {
            re: ang.cos(),
            im: ang.sin(),
        };
        for start in (0..n).step_by(len) {
            let mut w = C64 { re: 1.0, im: 0.0 };
            for k in 0..len / 2 {
                let a = buf[start + k];
                let b = buf[start + k + len / 2].mul(w);
                buf[start + k] = C64 {
                    re: a.re + b.re,
                    im: a.im + b.im,
                };
                buf[start + k + len / 2] = C64 {
                    re: a.re - b.re,
                    im: a.im - b.im,
                };
                w = w.mul(wl);
            }
        }
        len <<= 1;
    }
}

/// In-place 2-D FFT of an `n × n` row-major grid.
pub(crate) fn fft2(buf: &mut [C64], n: usize, inverse: bool) {
    for row in buf.chunks_mut(n) {
        fft1(row, inverse);
    }
    let mut col = vec![C64::default(); n];
    for x in 0..n {
        for y in 0..n {
            col[y] = buf[y * n + x];
        }
        fft1(&mut col, inverse);
        for y in 0..n {
            buf[y * n + x] = col[y];
        }
    }
}

/// Circular cross-correlation of two real `n × n` grids through the FFT of `b` given (the
/// reference for [`xcorr_phase`]'s peak position):
/// `out[dy][dx] = Σ a[(y+dy)%n][(x+dx)%n] · b[y][x]`.
#[cfg(test)]
pub(crate) fn xcorr(a: &[f64], b_fft: &[C64], n: usize) -> Vec<f64> {
    let mut fa: Vec<C64> = a.iter().map(|&re| C64 { re, im: 0.0 }).collect();
    fft2(&mut fa, n, false);
    for (x, y) in fa.iter_mut().zip(b_fft) {
        *x = x.mul_conj(*y);
    }
    fft2(&mut fa, n, true);
    let scale = 1.0 / (n * n) as f64;
    fa.iter().map(|c| c.re * scale).collect()
}

/// [`xcorr`] with `a`'s spectrum flattened first (each frequency divided by its magnitude, a
/// phase-only filter on `a`'s side): the picture's leftover structure in `a`, strong at a few
/// frequencies, no longer dominates the correlation, while the mark, spread evenly over the
/// template's band, keeps its peak.
pub(crate) fn xcorr_phase(a: &[f64], b_fft: &[C64], n: usize) -> Vec<f64> {
    let mut fa: Vec<C64> = a.iter().map(|&re| C64 { re, im: 0.0 }).collect();
    fft2(&mut fa, n, false);
    let mean_mag = fa.iter().map(|c| c.re.hypot(c.im)).sum::<f64>() / fa.len() as f64;
    let eps = 1e-3 * mean_mag + 1e-12;
    for (x, y) in fa.iter_mut().zip(b_fft) {
        let m = x.re.hypot(x.im) + eps;
        let u = C64 {
            re: x.re / m,
            im: x.im / m,
        };
        *x = u.mul_conj(*y);
    }
    fft2(&mut fa, n, true);
    let scale = 1.0 / (n * n) as f64;
    fa.iter().map(|c| c.re * scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcorr_matches_direct_sum() {
        let n = 8;
        let a: Vec<f64> = (0..n * n).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let b: Vec<f64> = (0..n * n).map(|i| ((i * 13 % 7) as f64) - 3.0).collect();
        let mut fb: Vec<C64> = b.iter().map(|&re| C64 { re, im: 0.0 }).collect();
        fft2(&mut fb, n, false);
        let c = xcorr(&a, &fb, n);
        for dy in 0..n {
            for dx in 0..n {
                let mut s = 0.0;
                for y in 0..n {
                    for x in 0..n {
                        s += a[((y + dy) % n) * n + (x + dx) % n] * b[y * n + x];
                    }
                }
                assert!(
                    (c[dy * n + dx] - s).abs() < 1e-9,
                    "{dy},{dx}: {} vs {s}",
                    c[dy * n + dx]
                );
            }
        }
    }

    #[test]
    fn phase_correlation_finds_a_shift_under_strong_structure() {
        let n = 16;
        let b: Vec<f64> = (0..n * n)
            .map(|i| {
                if (i * 7919 + i / 5) % 13 < 6 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        // `a` is `b` shifted by (3, 5) plus a strong smooth structure.
        let a: Vec<f64> = (0..n * n)
            .map(|i| {
                let (y, x) = (i / n, i % n);
                let src = ((y + n - 3) % n) * n + (x + n - 5) % n;
                b[src] + 40.0 * (x as f64 * 0.39).cos()
            })
            .collect();
        let mut fb: Vec<C64> = b.iter().map(|&re| C64 { re, im: 0.0 }).collect();
        fft2(&mut fb, n, false);
        let c = xcorr_phase(&a, &fb, n);
        let arg = (0..n * n).max_by(|&i, &j| c[i].total_cmp(&c[j])).unwrap();
        assert_eq!((arg / n, arg % n), (3, 5));
        // The plain correlation is led astray by the structure.
        let c = xcorr(&a, &fb, n);
        let arg = (0..n * n).max_by(|&i, &j| c[i].total_cmp(&c[j])).unwrap();
        assert_ne!((arg / n, arg % n), (3, 5));
    }
}
