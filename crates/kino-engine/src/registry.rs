//! Known models: short aliases mapped to Hugging Face hub repositories, and where their folders
//! live locally. A local folder path works everywhere an alias does.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A model Kino knows by name.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct KnownModel {
    pub alias: &'static str,
    /// Hub repository in diffusers layout.
    pub repo: &'static str,
    pub description: &'static str,
    /// Approximate download size in GB.
    pub size_gb: f64,
    /// Starts from a first image (`--image`).
    pub takes_image: bool,
    /// Takes a last image too (`--last-image`).
    pub takes_last_image: bool,
    /// A VACE model: masked edits (`kino edit --mask`), outpainting, reference subjects
    /// (`--reference`), and continuing from several frames.
    pub takes_vace: bool,
}

/// The models Kino knows.
pub const KNOWN_MODELS: [KnownModel; 12] = [
    KnownModel {
        alias: "wan2.1-t2v-1.3b",
        repo: "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        description: "Wan2.1 text-to-video 1.3B: 832×480, 81 frames at 16 fps",
        size_gb: 29.0,
        takes_image: false,
        takes_last_image: false,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.2-ti2v-5b",
        repo: "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        description: "Wan2.2 text/image-to-video 5B: 1280×704, 121 frames at 24 fps",
        size_gb: 34.0,
        takes_image: true,
        takes_last_image: false,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.1-i2v-14b-480p",
        repo: "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        description: "Wan2.1 image-to-video 14B (CLIP image tokens): 832×480, 81 frames at 16 fps",
        size_gb: 82.0,
        takes_image: true,
        takes_last_image: false,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.1-i2v-14b-720p",
        repo: "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        description: "Wan2.1 image-to-video 14B (CLIP image tokens): 1280×720, 81 frames at 16 fps",
        size_gb: 82.0,
        takes_image: true,
        takes_last_image: false,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.1-flf2v-14b-720p",
        repo: "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers",
        description: "Wan2.1 first–last-frame-to-video 14B: 1280×720, 81 frames at 16 fps",
        size_gb: 82.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.2-t2v-a14b",
        repo: "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        description: "Wan2.2 text-to-video, two 14B experts (high/low noise): 1280×720, 81 frames at 16 fps",
        size_gb: 136.0,
        takes_image: false,
        takes_last_image: false,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.2-i2v-a14b",
        repo: "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        description: "Wan2.2 image-to-video (first and last frame), two 14B experts: 1280×720, 81 frames at 16 fps",
        size_gb: 136.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: false,
    },
    KnownModel {
        alias: "skyreels-v2-df-1.3b-540p",
        repo: "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers",
        description: "SkyReels-V2 diffusion forcing 1.3B (Wan2.1 architecture): long videos in 97-frame windows, 960×544 at 24 fps",
        size_gb: 29.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: false,
    },
    KnownModel {
        alias: "skyreels-v2-df-14b-540p",
        repo: "Skywork/SkyReels-V2-DF-14B-540P-Diffusers",
        description: "SkyReels-V2 diffusion forcing 14B: long videos in 97-frame windows, 960×544 at 24 fps",
        size_gb: 80.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: false,
    },
    KnownModel {
        alias: "skyreels-v2-df-14b-720p",
        repo: "Skywork/SkyReels-V2-DF-14B-720P-Diffusers",
        description: "SkyReels-V2 diffusion forcing 14B: long videos, 1280×720 at 24 fps (--size 1280x720)",
        size_gb: 80.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: false,
    },
    KnownModel {
        alias: "wan2.1-vace-1.3b",
        repo: "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
        description: "Wan2.1 VACE 1.3B: edit inside a mask, outpaint, keep a subject from reference images; 832×480, 81 frames at 16 fps",
        size_gb: 33.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: true,
    },
    KnownModel {
        alias: "wan2.1-vace-14b",
        repo: "Wan-AI/Wan2.1-VACE-14B-diffusers",
        description: "Wan2.1 VACE 14B: edit inside a mask, outpaint, reference subjects; 1280×720, 81 frames at 16 fps",
        size_gb: 75.0,
        takes_image: true,
        takes_last_image: true,
        takes_vace: true,
    },
];

/// The models that start from an image: the bundled one and the known aliases that take one.
pub fn image_model_names() -> Vec<&'static str> {
    let mut v = vec![BUNDLED_MODEL];
    v.extend(
        KNOWN_MODELS
            .iter()
            .filter(|m| m.takes_image)
            .map(|m| m.alias),
    );
    v
}

/// The known models that take VACE conditioning (masks, references).
pub fn vace_model_names() -> Vec<&'static str> {
    KNOWN_MODELS
        .iter()
        .filter(|m| m.takes_vace)
        .map(|m| m.alias)
        .collect()
}

/// The models that can continue a video: those that take a first image (the
/// diffusion-forcing ones among them, which continue from several frames).
pub fn continuing_model_names() -> Vec<&'static str> {
    image_model_names()
}

/// The known models that take a first and a last image.
pub fn last_image_model_names() -> Vec<&'static str> {
    KNOWN_MODELS
        .iter()
        .filter(|m| m.takes_last_image)
        .map(|m| m.alias)
        .collect()
}

/// The model that ships inside the Kino repository (`models/kino-shapes`, 14 MB): Kino's own
/// small Wan-architecture model, trained by `training/train.py`. It is the default model, so a
/// first `kino generate` works with nothing downloaded.
pub const BUNDLED_MODEL: &str = "kino-shapes";

/// What `kino models` says about the bundled model.
pub const BUNDLED_DESCRIPTION: &str =
    "Kino's own small model: one coloured shape moving on a plain background, 64×64, 17 frames at 8 fps";

/// The model `kino generate` and `kino serve` use without `--model` (or `$KINO_MODEL`).
pub const DEFAULT_MODEL: &str = BUNDLED_MODEL;

/// Where the bundled model may live, in order: `$KINO_BUNDLED_MODEL`; next to the executable
/// (`models/kino-shapes`, `../share/kino/models/kino-shapes`, and the repository root two levels
/// above `target/release/kino`); the repository this binary was built from.
pub fn bundled_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("KINO_BUNDLED_MODEL") {
        out.push(PathBuf::from(p));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(exe_dir.join("models").join(BUNDLED_MODEL));
        out.push(exe_dir.join("../share/kino/models").join(BUNDLED_MODEL));
        out.push(exe_dir.join("../../models").join(BUNDLED_MODEL));
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models")
            .join(BUNDLED_MODEL),
    );
    out
}

/// The bundled model's folder, if one of [`bundled_candidates`] holds it.
pub fn bundled_dir() -> Option<PathBuf> {
    bundled_candidates()
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
}

/// Looks up an alias (case-insensitive).
pub fn find(alias: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.alias.eq_ignore_ascii_case(alias))
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/huggingface/hub")
}

/// `models--Org--Name` folder of a repository in the hub cache.
pub fn repo_cache_dir(repo: &str) -> PathBuf {
    hub_cache().join(format!("models--{}", repo.replace('/', "--")))
}

/// The local snapshot of a known model, if it has been downloaded completely enough to have a
/// `model_index.json`.
pub fn local_snapshot(model: &KnownModel) -> Option<PathBuf> {
    let dir = repo_cache_dir(model.repo);
    let rev = std::fs::read_to_string(dir.join("refs/main")).ok();
    let snapshots = dir.join("snapshots");
    if let Some(rev) = rev {
        let p = snapshots.join(rev.trim());
        if p.join("model_index.json").exists() {
            return Some(p);
        }
    }
    let entries = std::fs::read_dir(&snapshots).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("model_index.json").exists())
}

/// How to put a model folder in place by hand (for machines without network access).
pub fn manual_install_hint(model: &KnownModel) -> String {
    format!(
        "on a machine with network access run `kino pull {alias}` (or `huggingface-cli download {repo}`), then copy the folder here and pass its path with --model /path/to/{name}; any folder in diffusers layout works",
        alias = model.alias,
        repo = model.repo,
        name = model.repo.rsplit('/').next().unwrap_or(model.repo)
    )
}

/// Kino's own cache: `$KINO_CACHE`, else `$XDG_CACHE_HOME/kino`, else `~/.cache/kino`.
pub fn kino_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("KINO_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("kino");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/kino")
}

/// Resolves `--model`: an existing folder, a known alias that has been pulled, or single files
/// (comma-separated `.safetensors` pieces or a ComfyUI `models/` folder, with a folder or alias
/// for the configs; see `crate::single_file`).
pub fn resolve(model: &str) -> Result<PathBuf> {
    if crate::single_file::is_single_file_spec(model) {
        return crate::single_file::layout(model, &kino_cache(), &resolve_folder);
    }
    resolve_folder(model)
}

/// [`resolve`] for one folder or alias.
fn resolve_folder(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if model.eq_ignore_ascii_case(BUNDLED_MODEL) {
        return bundled_dir().ok_or_else(|| {
            let tried: Vec<String> = bundled_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            Error::InvalidRequest(format!(
                "the bundled model `{BUNDLED_MODEL}` was not found (looked in {}); it lives in the Kino repository at models/{BUNDLED_MODEL}: copy that folder next to the kino binary, set KINO_BUNDLED_MODEL=/path/to/{BUNDLED_MODEL}, or pass --model DIR",
                tried.join(", ")
            ))
        });
    }
    if let Some(m) = find(model) {
        return local_snapshot(m).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "model `{}` is not downloaded yet: run `kino pull {}` ({:.0} GB); without network access, {}",
                m.alias,
                m.alias,
                m.size_gb,
                manual_install_hint(m)
            ))
        });
    }
    let looks_like_path = model.contains('/') || model.contains('\\') || model.starts_with('.');
    if looks_like_path {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "no such model folder".into(),
        });
    }
    Err(Error::InvalidRequest(format!(
        "unknown model `{model}`; known models: {BUNDLED_MODEL}, {}; or give the path of a model folder",
        KNOWN_MODELS.map(|m| m.alias).join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_alias_lists_known_ones() {
        let e = resolve("sora-3").unwrap_err().to_string();
        assert!(e.contains("unknown model `sora-3`"), "{e}");
        assert!(
            e.contains("wan2.1-t2v-1.3b") && e.contains("wan2.2-ti2v-5b"),
            "{e}"
        );
    }

    #[test]
    fn missing_path_names_it() {
        let e = resolve("./no/such/folder").unwrap_err().to_string();
        assert!(e.contains("no/such/folder"), "{e}");
    }

    #[test]
    fn known_alias_not_pulled_says_how() {
        std::env::set_var("HF_HUB_CACHE", "/nonexistent-kino-test-cache");
        let e = resolve("wan2.1-t2v-1.3b").unwrap_err().to_string();
        assert!(e.contains("kino pull wan2.1-t2v-1.3b"), "{e}");
        assert!(e.contains("--model"), "{e}");
    }

    #[test]
    fn bundled_model_is_found_in_the_repository() {
        let dir = resolve(BUNDLED_MODEL).unwrap();
        assert!(dir.join("model_index.json").is_file(), "{}", dir.display());
        assert!(dir.ends_with("models/kino-shapes"), "{}", dir.display());
        assert_eq!(resolve("Kino-Shapes").unwrap(), dir);
    }

    #[test]
    fn existing_folder_resolves_to_itself() {
        let dir = crate::testing::fixtures_dir();
        assert_eq!(resolve(dir.to_str().unwrap()).unwrap(), dir);
    }
}
