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
}
