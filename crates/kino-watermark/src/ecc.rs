//! The error-correcting code: the standard rate-1/2, constraint-length-7 convolutional code
//! (generators 171 and 133 octal, as in 802.11 and DVB), zero-terminated, decoded with a
//! soft-decision Viterbi decoder.

const K: usize = 7;
const G0: u32 = 0o171;
const G1: u32 = 0o133;
const STATES: usize = 1 << (K - 1);

/// Number of coded bits for `info` information bits (two per bit plus the 6-bit tail).
pub(crate) const fn coded_len(info: usize) -> usize {
    2 * (info + K - 1)
}

fn outputs(reg: u32) -> (bool, bool) {
    (
        (reg & G0).count_ones() & 1 == 1,
        (reg & G1).count_ones() & 1 == 1,
    )
}

/// Encodes `bits`, appending the tail that returns the encoder to state 0.
pub(crate) fn encode(bits: &[bool]) -> Vec<bool> {
    let mut out = Vec::with_capacity(coded_len(bits.len()));
    let mut reg = 0u32;
    for &b in bits.iter().chain(std::iter::repeat_n(&false, K - 1)) {
        reg = ((reg << 1) | u32::from(b)) & ((1 << K) - 1);
        let (a, c) = outputs(reg);
        out.push(a);
        out.push(c);
    }
    out
}

/// Viterbi decoding of soft values (positive means 1, larger means surer) into `info` bits.
pub(crate) fn decode(soft: &[f64], info: usize) -> Vec<bool> {
    let steps = info + K - 1;
    debug_assert_eq!(soft.len(), 2 * steps);
    let mut metric = vec![f64::NEG_INFINITY; STATES];
    metric[0] = 0.0;
    // survivors[t][state] = the previous state.
    let mut survivors = vec![[0u8; STATES]; steps];
    for t in 0..steps {
        let (s0, s1) = (soft[2 * t], soft[2 * t + 1]);
        let mut next = vec![f64::NEG_INFINITY; STATES];
        for (state, &m) in metric.iter().enumerate() {
            if m == f64::NEG_INFINITY {
                continue;
            }
            let inputs: &[u32] = if t >= info { &[0] } else { &[0, 1] };
            for &b in inputs {
                let reg = ((state as u32) << 1) | b;
                let (a, c) = outputs(reg);
                let bm = if a { s0 } else { -s0 } + if c { s1 } else { -s1 };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrects_errors() {
        let bits: Vec<bool> = (0..64).map(|i| (i * 7 + i / 3) % 5 < 2).collect();
        let code = encode(&bits);
        assert_eq!(code.len(), coded_len(64));
        let mut soft: Vec<f64> = code.iter().map(|&b| if b { 1.0 } else { -1.0 }).collect();
        // Flip well-spread coded bits (the code's free distance is 10).
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
}
