//! Opt-in profile of where a forward spends its time (`KINO_PROFILE=1`): named spans, the device
//! synchronized at both ends of each, so a GPU's times are the kernels' own and not launch times.
//! Off (the default) a span is a plain call: no synchronization, nothing recorded. Spans nest;
//! each reports its inclusive time. `kino parity` prints [`report`] at the end of a run.
//!
//! Synchronizing costs time on a GPU (the launch queue drains at every span), so the sum of the
//! spans is more than an unprofiled step: read the shares, not the absolute total.

use candle_core::Device;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ENABLED: OnceLock<bool> = OnceLock::new();
static TABLE: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Whether `KINO_PROFILE` is set to something other than `0` or empty (read once).
pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var("KINO_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Runs `f` as the span `name` on `device`.
pub fn span<T>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    record(name, start.elapsed().as_secs_f64());
    Ok(out)
}

fn record(name: &'static str, seconds: f64) {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    match table.iter_mut().find(|(n, _, _)| *n == name) {
        Some(row) => {
            row.1 += seconds;
            row.2 += 1;
        }
        None => table.push((name, seconds, 1)),
    }
}

/// The spans recorded so far, by name in first-seen order: `(name, total seconds, calls)`.
pub fn spans() -> Vec<(&'static str, f64, u64)> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The first line of [`report`]. `kino bench` finds a child's table in its output by the start,
/// `profile (KINO_PROFILE;`, which the reference's own table (`bench/cpu/reference.py`) shares.
pub const REPORT_TITLE: &str =
    "profile (KINO_PROFILE; inclusive times, device synchronized per span)";

/// A plain-text table of the spans (total, calls, per call), `None` when profiling is off or
/// nothing was recorded.
pub fn report() -> Option<String> {
    let rows = spans();
    if !enabled() || rows.is_empty() {
        return None;
    }
    let mut s = format!("{REPORT_TITLE}\n");
    s.push_str(&format!(
        "{:<28} {:>10} {:>8} {:>12}\n",
        "span", "total s", "calls", "ms per call"
    ));
    for (name, total, calls) in rows {
        s.push_str(&format!(
            "{name:<28} {total:>10.3} {calls:>8} {:>12.3}\n",
            1e3 * total / calls as f64
        ));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_accumulate_by_name() {
        record("test.a", 0.5);
        record("test.b", 0.25);
        record("test.a", 1.0);
        let rows = spans();
        let a = rows.iter().find(|r| r.0 == "test.a").unwrap();
        assert_eq!((a.1, a.2), (1.5, 2));
        let b = rows.iter().find(|r| r.0 == "test.b").unwrap();
        assert_eq!((b.1, b.2), (0.25, 1));
    }
}
