//! File helpers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{MediaError, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh `.NAME.PID-N.SUFFIX` beside `path` (for writing through a rename); the folder must
/// exist.
pub(crate) fn sibling_temp(path: &Path, suffix: &str) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(MediaError::write(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("folder {} does not exist", parent.display()),
            ),
        ));
    }
    let Some(name) = path.file_name() else {
        return Err(MediaError::write(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path has no file name",
            ),
        ));
    };
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    tmp.push(format!(".{}-{n}.{suffix}", std::process::id()));
    Ok(parent.join(tmp))
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename, so readers never
/// see half a file and a failed write leaves nothing behind.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling_temp(path, "tmp")?;
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(MediaError::write(path, e));
    }
    Ok(())
}
