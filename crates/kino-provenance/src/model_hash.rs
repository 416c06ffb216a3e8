//! A model's identity for the manifest: SHA-256 over the files of its folder, cached by path,
//! size and modification time so that a large model is read once.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::keys::hex;
use crate::{Error, Result};

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Cache {
    /// absolute path → (size, mtime ns, sha256)
    files: BTreeMap<String, (u64, u128, String)>,
}

/// The note a single-file model's component folder holds instead of weights (kino-engine's
/// `single_file::NOTE`): `{"file": "/abs/path.safetensors", …}`.
const SINGLE_FILE_NOTE: &str = "kino-single-file.json";

/// Every file of the model as (path relative to the model, path to read), links followed; a
/// single-file note also brings in the file it points at (named `<folder>/<file name>`, so the
/// hash does not depend on where the file lives).
fn files_under(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let p = e.path();
        // Follow links (the Hugging Face cache links snapshots to blobs).
        let meta = std::fs::metadata(&p)?;
        if meta.is_dir() {
            files_under(root, &p, out)?;
        } else if meta.is_file() {
            if name == SINGLE_FILE_NOTE {
                let note: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", p.display())))?;
                if let Some(file) = note.get("file").and_then(|f| f.as_str()).map(PathBuf::from) {
                    let file_name = file.file_name().unwrap_or_default().to_string_lossy();
                    out.push((rel(&dir.join(file_name.as_ref())), file));
                }
            }
            out.push((rel(&p), p));
        }
    }
    Ok(())
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 (hex) of a model: over each file's relative path and SHA-256, sorted by path (hidden
/// files skipped). A single file (a checkpoint) is hashed as itself. File hashes are cached in
/// `cache_dir/model-hashes.json`.
pub fn model_sha256(model: &Path, cache_dir: Option<&Path>) -> Result<String> {
    let io =
        |e: std::io::Error| Error::Io(format!("cannot hash the model {}: {e}", model.display()));
    let meta = std::fs::metadata(model).map_err(io)?;
    let mut files = Vec::new();
    if meta.is_dir() {
        files_under(model, model, &mut files).map_err(io)?;
    } else {
        files.push((String::new(), model.to_path_buf()));
    }
    files.sort();
    let cache_path = cache_dir.map(|d| d.join("model-hashes.json"));
    let mut cache: Cache = cache_path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut changed = false;
    let mut top = Sha256::new();
    for (rel, f) in &files {
        let m = std::fs::metadata(f).map_err(io)?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = std::fs::canonicalize(f)
            .unwrap_or_else(|_| f.clone())
            .to_string_lossy()
            .into_owned();
        let sha = match cache.files.get(&key) {
            Some((size, t, sha)) if *size == m.len() && *t == mtime => sha.clone(),
            _ => {
                let sha = sha256_of(f).map_err(io)?;
                cache.files.insert(key, (m.len(), mtime, sha.clone()));
                changed = true;
                sha
            }
        };
        if meta.is_dir() {
            top.update(rel.as_bytes());
            top.update(b"\t");
            top.update(sha.as_bytes());
            top.update(b"\n");
        } else {
            return Ok(sha);
        }
    }
    if changed {
        if let Some(p) = &cache_path {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let tmp = p.with_extension("json.tmp");
            if let Ok(b) = serde_json::to_vec(&cache) {
                if std::fs::write(&tmp, b).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
    Ok(hex(&top.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_follows_content_and_uses_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("model");
        std::fs::create_dir_all(m.join("vae")).unwrap();
        std::fs::write(m.join("model_index.json"), b"{}").unwrap();
        std::fs::write(m.join("vae/w.safetensors"), b"weights").unwrap();
        let cache = d.path().join("cache");
        let a = model_sha256(&m, Some(&cache)).unwrap();
        assert_eq!(a.len(), 64);
        assert!(cache.join("model-hashes.json").is_file());
        assert_eq!(model_sha256(&m, Some(&cache)).unwrap(), a);
        std::fs::write(m.join("vae/w.safetensors"), b"other weights").unwrap();
        assert_ne!(model_sha256(&m, Some(&cache)).unwrap(), a);
    }

    #[test]
    fn a_single_file_note_brings_in_its_file() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("model");
        std::fs::create_dir_all(m.join("vae")).unwrap();
        let w = d.path().join("wan_vae.safetensors");
        std::fs::write(&w, b"weights").unwrap();
        let note = serde_json::json!({"file": w, "part": "vae"});
        std::fs::write(m.join("vae").join(SINGLE_FILE_NOTE), note.to_string()).unwrap();
        let a = model_sha256(&m, None).unwrap();
        std::fs::write(&w, b"other weights").unwrap();
        assert_ne!(
            model_sha256(&m, None).unwrap(),
            a,
            "the file's content counts"
        );
    }
}
