//! The error-correcting code: the rate-1/3, constraint-length-7 convolutional code of LTE
//! (generators 133, 171 and 165 octal, free distance 15), zero-terminated, unpunctured, decoded
//! with a soft-decision Viterbi decoder.

const K: usize = 7;
const G: [u32; RATE] = [0o133, 0o171, 0o165];
/// Coded bits per information bit.
const RATE: usize = 3;
const STATES: usize = 1 << (K - 1);

/// Number of coded bits for `info` information bits (three per bit, with the 6-bit tail).
pub(crate) const fn coded_len(info: usize) -> usize {
    RATE * (info + K - 1)
}

fn outputs(reg: u32) -> [bool; RATE] {
    G.map(|g| (reg & g).count_ones() & 1 == 1)
}

/// Encodes `bits`, appending the tail that returns the encoder to state 0.
pub(crate) fn encode(bits: &[bool]) -> Vec<bool> {
    let mut out = Vec::with_capacity(coded_len(bits.len()));
    let mut reg = 0u32;
    for &b in bits.iter().chain(std::iter::repeat_n(&false, K - 1)) {
        reg = ((reg << 1) | u32::from(b)) & ((1 << K) - 1);
        out.extend(outputs(reg));
    }
    out
}

/// Viterbi decoding of soft values (positive means 1, larger means surer) into `info` bits.
pub(crate) fn decode(soft: &[f64], info: usize) -> Vec<bool> {
    let steps = info + K - 1;
    debug_assert_eq!(soft.len(), RATE * steps);
    let mut metric = vec![f64::NEG_INFINITY; STATES];
    metric[0] = 0.0;
    // survivors[t][state] = the previous state.
    let mut survivors = vec![[0u8; STATES]; steps];
    for t in 0..steps {
        let st = &soft[RATE * t..RATE * (t + 1)];
        let mut next = vec![f64::NEG_INFINITY; STATES];
        for (state, &m) in metric.iter().enumerate() {
            if m == f64::NEG_INFINITY {
                continue;
            }
            let inputs: &[u32] = if t >= info { &[0] } else { &[0, 1] };
            for &b in inputs {
                let reg = ((state as u32) << 1) | b;
                let bm: f64 = outputs(reg)
                    .iter()
                    .zip(st)
                    .map(|(&o, &s)| if o { s } else { -s })
                    .sum();
                let ns = (reg as usize) & (STATES - 1);
                if m + bm > next[ns] {
                    next[ns] = m + bm;
                    survivors[t][ns] = state as u8;
                }
            }
        }
        metric = next;
    }
    let mut state = 0usize;
    let mut bits = vec![false; steps];
    for t in (0..steps).rev() {
        bits[t] = state & 1 == 1;
        state = survivors[t][state] as usize;
    }
    bits.truncate(info);
    bits
}

/// List Viterbi decoding (parallel list Viterbi algorithm): the `list` most likely messages of
/// `info` bits, best first (distinct paths; fewer when the trellis has fewer). `list_decode(s,
/// info, 1)[0]` equals `decode(s, info)`.
pub(crate) fn list_decode(soft: &[f64], info: usize, list: usize) -> Vec<Vec<bool>> {
    let steps = info + K - 1;
    debug_assert_eq!(soft.len(), RATE * steps);
    let list = list.max(1);
    // Per state, up to `list` entries (metric, previous state, previous rank), best first.
    let mut metric: Vec<Vec<f64>> = vec![Vec::new(); STATES];
    metric[0].push(0.0);
    // back[t][state][rank] = (previous state, previous rank)
    let mut back: Vec<Vec<Vec<(u8, u8)>>> = Vec::with_capacity(steps);
    for t in 0..steps {
        let st = &soft[RATE * t..RATE * (t + 1)];
        let mut cand: Vec<Vec<(f64, u8, u8)>> = vec![Vec::new(); STATES];
        for (state, ms) in metric.iter().enumerate() {
            if ms.is_empty() {
                continue;
            }
            let inputs: &[u32] = if t >= info { &[0] } else { &[0, 1] };
            for &b in inputs {
                let reg = ((state as u32) << 1) | b;
                let bm: f64 = outputs(reg)
                    .iter()
                    .zip(st)
                    .map(|(&o, &s)| if o { s } else { -s })
                    .sum();
                let ns = (reg as usize) & (STATES - 1);
                for (r, &m) in ms.iter().enumerate() {
                    cand[ns].push((m + bm, state as u8, r as u8));
                }
            }
        }
        let mut next = vec![Vec::new(); STATES];
        let mut bk = vec![Vec::new(); STATES];
        for (ns, mut c) in cand.into_iter().enumerate() {
            c.sort_by(|a, b| b.0.total_cmp(&a.0));
            c.truncate(list);
            next[ns] = c.iter().map(|e| e.0).collect();
            bk[ns] = c.iter().map(|e| (e.1, e.2)).collect();
        }
        metric = next;
        back.push(bk);
    }
    let mut out = Vec::new();
    for rank in 0..metric[0].len() {
        let (mut state, mut r) = (0usize, rank);
        let mut bits = vec![false; steps];
        for t in (0..steps).rev() {
            bits[t] = state & 1 == 1;
            let (ps, pr) = back[t][state][r];
            state = ps as usize;
            r = pr as usize;
        }
        bits.truncate(info);
        out.push(bits);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrects_errors() {
        let bits: Vec<bool> = (0..64).map(|i| (i * 7 + i / 3) % 5 < 2).collect();
        let code = encode(&bits);
        assert_eq!(code.len(), coded_len(64));
        let mut soft: Vec<f64> = code.iter().map(|&b| if b { 1.0 } else { -1.0 }).collect();
        // Flip well-spread coded bits (the code's free distance is 15).
        for i in (3..soft.len()).step_by(17) {
            soft[i] = -soft[i];
        }
        assert_eq!(decode(&soft, 64), bits);
        // Too much damage is not silently "corrected" to the same message.
        let noise: Vec<f64> = (0..soft.len())
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert_ne!(decode(&noise, 64), bits);
    }

    #[test]
    fn list_decoding() {
        let bits: Vec<bool> = (0..64).map(|i| (i * 5 + i / 4) % 7 < 3).collect();
        let code = encode(&bits);
        let mut st = 12345u64;
        for trial in 0..20 {
            // Noisy soft values: the list's first entry is the Viterbi decision, entries are
            // distinct and in order of decreasing correlation with the received values.
            let soft: Vec<f64> = code
                .iter()
                .map(|&b| {
                    st = st.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1442695040888963407);
                    let u = (st >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                    (if b { 1.0 } else { -1.0 }) + 2.5 * u * (1.0 + trial as f64 / 10.0)
                })
                .collect();
            let l = list_decode(&soft, 64, 8);
            assert_eq!(l.len(), 8);
            assert_eq!(l[0], decode(&soft, 64));
            let score = |m: &Vec<bool>| -> f64 {
                encode(m)
                    .iter()
                    .zip(&soft)
                    .map(|(&c, &s)| if c { s } else { -s })
                    .sum()
            };
            for i in 1..l.len() {
                assert_ne!(l[i], l[i - 1]);
                assert!(score(&l[i]) <= score(&l[i - 1]) + 1e-9);
            }
        }
    }
}
