//! How the process's allocator (glibc's malloc on Linux) holds memory, in two phases. The *lean*
//! phase ([`lean`]: while weights load, and around the VAE) hands large buffers straight back to
//! the system when freed, so loading leaves no holes among the weights that stay, and the VAE's
//! few, large frame buffers are not kept; the *run* phase (everything else: the transformer's
//! steps) keeps freed buffers for the next step's, so each step does not fault fresh pages in.
//!
//! Measured on the 2-core Zen 4 box, 2 threads. One Wan2.1-1.3B transformer forward at 1,280 +
//! 512 tokens (`kino bench transformer --child --format f32|f16|q8_0`): with every buffer of 256
//! KiB or more mapped and unmapped (what `kino` did for all phases before), 22.8–23.0 s in f32
//! and 25.0 s in F16 and Q8_0, about 15% of the time in page faults (`perf`: zeroing fresh
//! pages, and TLB shootdowns between the two threads); with glibc's own dynamic settings, 19.6,
//! 19.8 and 20.5 s, but 108 MB more at peak in F16 and 60 MB in Q8_0 (holes left by the loading);
//! with the loading lean and the forward in the run phase, 19.9 s in F16 and 20.5 s in Q8_0 at
//! +5 MB. One Wan2.1 VAE decode (17 frames at 256 × 256, `kino bench vae --child`): 30.1–31.7 s
//! at 1.84 GB peak in the run phase, 32.6–34.4 s at 1.64–1.65 GB lean, so the VAE runs lean.
//!
//! Only a program that opts in ([`manage`], called first thing by `kino`) has its allocator
//! changed; the library alone (tests, embedders) leaves it as it is.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

static MANAGED: AtomicBool = AtomicBool::new(false);
/// Lean phases in progress (they may nest or overlap: `kino serve` runs jobs on several threads).
static LEAN: Mutex<usize> = Mutex::new(0);
static SWITCHES: AtomicUsize = AtomicUsize::new(0);

/// Buffers from this size up are mapped on their own in the lean phase (and unmapped when freed).
const LEAN_MMAP_THRESHOLD: i32 = 256 * 1024;
/// glibc's default: free memory at the heap's top beyond this goes back to the system.
const LEAN_TRIM_THRESHOLD: i32 = 128 * 1024;
/// The run phase: buffers up to glibc's own dynamic maximum (32 MiB on 64-bit) come from its
/// heaps and are reused, and up to 64 MiB of free memory stays at the heap's top.
const RUN_MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;
const RUN_TRIM_THRESHOLD: i32 = 64 * 1024 * 1024;

fn set(mmap: i32, trim: i32) {
    SWITCHES.fetch_add(1, Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation parameters (under its arena lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap, trim);
}

/// Opt in: from now on the allocator is in the run phase, and in the lean phase while a
/// [`lean`] closure runs. Call it before any thread starts.
pub fn manage() {
    if !MANAGED.swap(true, Ordering::SeqCst) {
        set(RUN_MMAP_THRESHOLD, RUN_TRIM_THRESHOLD);
    }
}

/// Runs `f` (loading a model's weights, or the VAE) in the lean phase, if [`manage`] was called.
pub fn lean<R>(f: impl FnOnce() -> R) -> R {
    if !MANAGED.load(Ordering::SeqCst) {
        return f();
    }
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            let mut n = LEAN.lock().unwrap_or_else(|e| e.into_inner());
            *n -= 1;
            if *n == 0 {
                set(RUN_MMAP_THRESHOLD, RUN_TRIM_THRESHOLD);
            }
        }
    }
    {
        let mut n = LEAN.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            set(LEAN_MMAP_THRESHOLD, LEAN_TRIM_THRESHOLD);
        }
        *n += 1;
    }
    let _done = Done;
    f()
}

/// How many times the settings changed (`tests/memory.rs`).
pub fn switches() -> usize {
    SWITCHES.load(Ordering::Relaxed)
}
