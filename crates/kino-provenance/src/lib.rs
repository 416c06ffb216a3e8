//! Kino's provenance side: every output says it was generated.
//!
//! - **C2PA** ([`manifest`]): a manifest with a `c2pa.actions` assertion (`c2pa.created`,
//!   `digitalSourceType` trainedAlgorithmicMedia, software agent "Kino x.y.z") and Kino's own
//!   assertion `org.kino.generation` (model name and SHA-256, time, watermark id, the prompt
//!   only when the operator turns it on), signed with the `c2pa` crate in pure Rust after the
//!   final mux, in place (temp file + rename). MP4, PNG, JPEG and GIF outputs are signed;
//!   thumbnails and spritesheets also name the file they were made from.
//! - **Keys** ([`keys`]): the operator's key and chain (`--signing-key`, `--signing-cert`, or
//!   the config file), else a local ECDSA P-256 root CA and end-entity certificate made on first
//!   use in the user's data directory, with the watermark key beside them.
//! - **Watermark**: [`kino_watermark`]'s keyed luma mark, embedded before encoding.
//! - **Verification** ([`verify_file`]): the C2PA state (trusted / valid / invalid with the
//!   reason / absent) and the watermark (detected with its id and confidence / not detected).
//! - **Policy** ([`policy`]): the operator's blocked terms and patterns, with reasons and an
//!   audit log of refusals.
//!
//! [`Provenance`] ties them together for `kino generate`, `kino extend`, `kino mark` and the
//! server's worker: open it once from [`Settings`], then write outputs through it.

pub mod cli;
pub mod keys;
pub mod manifest;
pub mod model_hash;
pub mod policy;
pub mod settings;

use std::path::{Path, PathBuf};

use kino_media::{Fps, Frame, GifOptions, Mp4Options, Mp4StreamWriter, Video};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

pub use keys::SigningIdentity;
pub use manifest::{C2paReport, C2paState, Claims, DerivedFrom};
pub use model_hash::model_sha256;
pub use policy::{Policy, Refusal};
pub use settings::{ProvenanceArgs, Settings};

/// What can go wrong; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Sign(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Media(#[from] kino_media::MediaError),
    /// The prompt policy refused the request.
    #[error("{0}")]
    Refused(Refusal),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What one output is: the model it came from and the watermark id it carries.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    /// The model folder (its SHA-256 goes into the manifest and the metadata).
    pub model_dir: Option<PathBuf>,
    /// The watermark payload id (low 48 bits used).
    pub watermark_id: u64,
    /// The server's video id, if any.
    pub video_id: Option<String>,
}

impl Subject {
    /// A subject whose watermark id is the first 48 bits of SHA-256 of `seed` (a video id, or
    /// the output path and time for the CLI): the operator can look it up.
    pub fn new(model_dir: Option<&Path>, seed: &str) -> Subject {
        Subject {
            model_dir: model_dir.map(Path::to_path_buf),
            watermark_id: watermark_id_of(seed),
            video_id: None,
        }
    }
}

/// The 48-bit watermark id for `seed` (first 6 bytes of its SHA-256).
pub fn watermark_id_of(seed: &str) -> u64 {
    let h = sha2::Sha256::digest(seed.as_bytes());
    h[..6].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b))
}

/// A watermark id as Kino prints it: 12 hex digits.
pub fn fmt_watermark_id(id: u64) -> String {
    format!("{:012x}", id & 0xffff_ffff_ffff)
}

/// What was applied to an output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub signed: bool,
    /// The watermark id (12 hex digits) when a watermark was embedded.
    pub watermark_id: Option<String>,
}

/// Signing and watermarking as configured, ready to stamp outputs.
#[derive(Clone)]
pub struct Provenance {
    pub settings: Settings,
    pub data_dir: PathBuf,
    /// `None` when signing is off.
    pub signing: Option<SigningIdentity>,
    /// The watermark key (also used to detect, even when embedding is off).
    pub watermark_key: kino_watermark::Key,
    pub policy: Option<Policy>,
    /// Lines to show the operator once (keys made, signing or watermark off).
    pub notices: Vec<String>,
}

impl std::fmt::Debug for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provenance")
            .field("sign", &self.signing.is_some())
            .field("watermark", &self.settings.watermark)
            .finish_non_exhaustive()
    }
}

impl Provenance {
    /// Loads (or on first use makes) the keys and the policy. What the operator should know
    /// (a key was made, signing or the watermark is off) is in [`notices`](Self::notices).
    pub fn open(settings: Settings) -> Result<Provenance> {
        let data_dir = settings.data_dir()?;
        let mut notices = Vec::new();
        let signing = if settings.sign {
            match (&settings.signing_key, &settings.signing_cert) {
                (Some(k), Some(c)) => Some(SigningIdentity::from_files(k, c)?),
                _ => {
                    let (id, created) = SigningIdentity::local(&data_dir)?;
                    if created {
                        notices.push(format!(
                            "kino: made a local C2PA signing key and certificate (a Kino root CA \
                             and a signer it issued) in {}; outputs are signed with it and \
                             `kino verify` trusts it on this machine. To sign as your \
                             organisation, pass --signing-key and --signing-cert.",
                            keys::provenance_dir(&data_dir).display()
                        ));
                    }
                    Some(id)
                }
            }
        } else {
            notices.push(format!(
                "kino: warning: C2PA signing is off ({}): outputs carry no manifest, and their \
                 metadata says so",
                settings.off_because.0
            ));
            None
        };
        let key = match &settings.watermark_key {
            Some(p) => keys::read_watermark_key(p)?,
            None => {
                let (k, created) = keys::local_watermark_key(&data_dir)?;
                if created && settings.watermark {
                    notices.push(format!(
                        "kino: made a watermark key in {} (keep it: it is needed to detect \
                         Kino's watermark)",
                        keys::provenance_dir(&data_dir)
                            .join("watermark.key")
                            .display()
                    ));
                }
                k
            }
        };
        if !settings.watermark {
            notices.push(format!(
                "kino: warning: the invisible watermark is off ({}): outputs are not marked, \
                 and their metadata says so",
                settings.off_because.1
            ));
        }
        let policy = match &settings.policy {
            Some(p) => {
                let audit = settings
                    .audit_dir
                    .clone()
                    .unwrap_or_else(|| data_dir.clone())
                    .join("policy-audit.jsonl");
                Some(Policy::load(p, &audit)?)
            }
            None => None,
        };
        Ok(Provenance {
            settings,
            data_dir,
            signing,
            watermark_key: kino_watermark::Key::from_bytes(&key),
            policy,
            notices,
        })
    }

    /// Prints the notices on stderr (once).
    pub fn announce(&mut self) {
        for n in self.notices.drain(..) {
            eprintln!("{n}");
        }
    }

    /// Checks a prompt against the policy (if any); a refusal is logged.
    pub fn check_prompt(&self, prompt: &str, source: &str) -> std::result::Result<(), Refusal> {
        match &self.policy {
            Some(p) => p.check_prompt(prompt, source),
            None => Ok(()),
        }
    }

    /// The trust anchors verification uses: the local root (if any) and the configured ones.
    pub fn trust_anchors(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if let Some(r) = keys::local_root(&self.data_dir) {
            out.push(r);
        }
        if let Some(r) = self.signing.as_ref().and_then(|s| s.local_root_pem.clone()) {
            if !out.contains(&r) {
                out.push(r);
            }
        }
        for p in &self.settings.trust {
            out.push(std::fs::read_to_string(p).map_err(|e| {
                Error::Config(format!("cannot read the trust anchor {}: {e}", p.display()))
            })?);
        }
        Ok(out)
    }

    /// The record stored in the output's metadata under `provenance`: what was applied.
    pub fn record(&self, subject: &Subject) -> Value {
        let c2pa = match &self.signing {
            Some(s) => {
                let (cn, issuer) = s.names();
                json!({"signed": true, "signer": cn, "issuer": issuer,
                       "prompt_in_manifest": self.settings.manifest_prompt})
            }
            None => {
                json!({"signed": false, "why": format!("turned off ({})", self.settings.off_because.0)})
            }
        };
        let watermark = if self.settings.watermark {
            json!({"embedded": true, "id": fmt_watermark_id(subject.watermark_id),
                   "method": "kino-watermark"})
        } else {
            json!({"embedded": false, "why": format!("turned off ({})", self.settings.off_because.1)})
        };
        json!({"c2pa": c2pa, "watermark": watermark})
    }

    fn model_hash(&self, subject: &Subject) -> Option<String> {
        let dir = subject.model_dir.as_ref()?;
        match model_sha256(dir, Some(&keys::provenance_dir(&self.data_dir))) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }

    /// Adds the provenance record and the model's hash to generation metadata.
    fn annotate(&self, metadata: &mut Option<Value>, subject: &Subject, model_hash: Option<&str>) {
        let m = metadata.get_or_insert_with(|| json!({}));
        if let Value::Object(map) = m {
            if let Some(h) = model_hash {
                map.insert("model_sha256".into(), json!(h));
            }
            map.insert("provenance".into(), self.record(subject));
        }
    }

    /// The manifest's claims for an output with `metadata` (Kino's generation parameters).
    pub fn claims(
        &self,
        metadata: Option<&Value>,
        subject: &Subject,
        model_hash: Option<&str>,
    ) -> Claims {
        let get = |k: &str| {
            metadata
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        Claims {
            model: get("model"),
            model_sha256: model_hash.map(String::from).or_else(|| get("model_sha256")),
            generated_at: Some(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            prompt: if self.settings.manifest_prompt {
                get("prompt")
            } else {
                None
            },
            watermark_id: self
                .settings
                .watermark
                .then(|| fmt_watermark_id(subject.watermark_id)),
            video_id: subject.video_id.clone().or_else(|| get("video_id")),
            derived_from: None,
            marked_from: None,
        }
    }

    /// The frames with the watermark embedded (frame `i` of the output is `first + i`).
    pub fn mark_frames(&self, frames: &mut [Frame], subject: &Subject, first: usize) {
        if !self.settings.watermark {
            return;
        }
        let Some(f0) = frames.first() else {
            return;
        };
        let e = kino_watermark::Embedder::new(
            &self.watermark_key,
            subject.watermark_id,
            f0.width(),
            f0.height(),
        );
        for (i, f) in frames.iter_mut().enumerate() {
            e.mark(f, first + i);
        }
    }

    fn marked(&self, video: &Video, subject: &Subject) -> Result<Option<Video>> {
        if !self.settings.watermark {
            return Ok(None);
        }
        let mut frames = video.frames().to_vec();
        self.mark_frames(&mut frames, subject, 0);
        Ok(Some(Video::new(frames, video.fps())?))
    }

    /// Signs `path` in place (if signing is on). On failure the unsigned file is kept and the
    /// error says so.
    pub fn sign(&self, path: &Path, claims: &Claims) -> Result<bool> {
        let Some(id) = &self.signing else {
            return Ok(false);
        };
        manifest::sign_file(id, path, claims).map_err(|e| {
            Error::Sign(format!(
                "{e}; the unsigned file is kept at {} (pass --no-sign to skip signing)",
                path.display()
            ))
        })?;
        Ok(true)
    }

    /// Marks the frames, writes the MP4 (the metadata gains `provenance` and `model_sha256`)
    /// and signs it.
    pub fn write_mp4(
        &self,
        path: &Path,
        video: &Video,
        opts: &Mp4Options,
        subject: &Subject,
    ) -> Result<Stamped> {
        self.write_mp4_with(path, video, opts, subject, |_| {})
    }

    /// [`write_mp4`](Self::write_mp4) with the claims adjusted by `edit` before signing.
    pub fn write_mp4_with(
        &self,
        path: &Path,
        video: &Video,
        opts: &Mp4Options,
        subject: &Subject,
        edit: impl FnOnce(&mut Claims),
    ) -> Result<Stamped> {
        let hash = self.model_hash(subject);
        let mut opts = opts.clone();
        let mut claims = self.claims(opts.metadata.as_ref(), subject, hash.as_deref());
        edit(&mut claims);
        self.annotate(&mut opts.metadata, subject, hash.as_deref());
        match self.marked(video, subject)? {
            Some(v) => kino_media::write_mp4(path, &v, &opts)?,
            None => kino_media::write_mp4(path, video, &opts)?,
        }
        let signed = self.sign(path, &claims)?;
        Ok(Stamped {
            signed,
            watermark_id: claims.watermark_id,
        })
    }

    /// Marks the frames, writes the GIF and signs it (C2PA supports GIF). `metadata`: the
    /// generation parameters (the claims come from them).
    pub fn write_gif(
        &self,
        path: &Path,
        video: &Video,
        opts: &GifOptions,
        metadata: Option<&Value>,
        subject: &Subject,
    ) -> Result<Stamped> {
        let hash = self.model_hash(subject);
        let claims = self.claims(metadata, subject, hash.as_deref());
        match self.marked(video, subject)? {
            Some(v) => kino_media::write_gif(path, &v, opts)?,
            None => kino_media::write_gif(path, video, opts)?,
        }
        let signed = self.sign(path, &claims)?;
        Ok(Stamped {
            signed,
            watermark_id: claims.watermark_id,
        })
    }

    /// Marks the frames, writes them as PNG files in `dir` (each signed) and `params.json`
    /// (the metadata with the provenance record).
    pub fn write_png_frames(
        &self,
        dir: &Path,
        video: &Video,
        metadata: Option<&Value>,
        subject: &Subject,
    ) -> Result<Stamped> {
        let hash = self.model_hash(subject);
        let claims = self.claims(metadata, subject, hash.as_deref());
        let files = match self.marked(video, subject)? {
            Some(v) => kino_media::write_png_frames(dir, &v)?,
            None => kino_media::write_png_frames(dir, video)?,
        };
        let mut signed = false;
        for f in &files {
            signed = self.sign(f, &claims)?;
        }
        let mut meta = metadata.cloned();
        self.annotate(&mut meta, subject, hash.as_deref());
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
        let p = dir.join("params.json");
        std::fs::write(&p, text)
            .map_err(|e| Error::Io(format!("cannot write {}: {e}", p.display())))?;
        Ok(Stamped {
            signed,
            watermark_id: claims.watermark_id,
        })
    }

    /// Signs a file made from a signed MP4 (a thumbnail, a spritesheet): same claims, plus
    /// `derived_from` (the MP4's name and SHA-256).
    pub fn sign_derived(
        &self,
        path: &Path,
        from_mp4: &Path,
        metadata: Option<&Value>,
        subject: &Subject,
    ) -> Result<bool> {
        if self.signing.is_none() {
            return Ok(false);
        }
        let mut claims = self.claims(metadata, subject, None);
        claims.model_sha256 = metadata
            .and_then(|m| m.get("model_sha256"))
            .and_then(|v| v.as_str())
            .map(String::from);
        claims.derived_from = Some(DerivedFrom {
            file: from_mp4
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: sha256_file(from_mp4)?,
        });
        self.sign(path, &claims)
    }

    /// A streaming MP4 writer that marks every frame pushed and signs the file when finished.
    pub fn stream_writer(
        &self,
        path: &Path,
        width: u32,
        height: u32,
        fps: Fps,
        opts: Mp4Options,
        subject: Subject,
    ) -> Result<StreamWriter> {
        let metadata = opts.metadata.clone();
        let inner = Mp4StreamWriter::create(path, width, height, fps, opts)?;
        let embedder = self.settings.watermark.then(|| {
            kino_watermark::Embedder::new(&self.watermark_key, subject.watermark_id, width, height)
        });
        Ok(StreamWriter {
            inner,
            embedder,
            path: path.to_path_buf(),
            prov: self.clone(),
            subject,
            metadata,
        })
    }

    /// The watermark of a video or image file, read as [`verify_file`] reads it (a video's
    /// first frames with their coded luma).
    pub fn detect_file(&self, path: &Path) -> Result<kino_watermark::Detection> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        let (frames, luma) =
            decode_frames(&bytes).map_err(|why| Error::Io(format!("{}: {why}", path.display())))?;
        Ok(detect_frames(&frames, luma.as_deref(), &self.watermark_key))
    }
}

/// [`Mp4StreamWriter`] with the watermark and the signature: frames are marked as they are
/// pushed, and [`finish`](Self::finish) signs the file.
pub struct StreamWriter {
    inner: Mp4StreamWriter,
    embedder: Option<kino_watermark::Embedder>,
    path: PathBuf,
    prov: Provenance,
    subject: Subject,
    metadata: Option<Value>,
}

impl StreamWriter {
    /// Frames written so far.
    pub fn frames(&self) -> usize {
        self.inner.frames()
    }

    /// Marks and encodes a batch of frames.
    pub fn push(&mut self, frames: &[Frame]) -> Result<()> {
        match &self.embedder {
            Some(e) => {
                let first = self.inner.frames();
                let mut marked = frames.to_vec();
                for (i, f) in marked.iter_mut().enumerate() {
                    e.mark(f, first + i);
                }
                self.inner.push(&marked)?;
            }
            None => self.inner.push(frames)?,
        }
        Ok(())
    }

    /// Replaces the generation parameters stored at [`finish`](Self::finish).
    pub fn set_metadata(&mut self, metadata: Option<Value>) -> Result<()> {
        self.metadata = metadata;
        Ok(())
    }

    /// Writes the file, then signs it.
    pub fn finish(self) -> Result<Stamped> {
        let StreamWriter {
            mut inner,
            prov,
            subject,
            mut metadata,
            path,
            ..
        } = self;
        let hash = prov.model_hash(&subject);
        let claims = prov.claims(metadata.as_ref(), &subject, hash.as_deref());
        prov.annotate(&mut metadata, &subject, hash.as_deref());
        inner.set_metadata(metadata)?;
        inner.finish()?;
        let signed = prov.sign(&path, &claims)?;
        Ok(Stamped {
            signed,
            watermark_id: claims.watermark_id,
        })
    }
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(keys::hex(&h.finalize()))
}

/// The watermark part of a verification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatermarkReport {
    pub detected: bool,
    /// The payload id (12 hex digits) when detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub confidence: f64,
    pub frames_used: usize,
    /// Why it was not checked (not a video or image Kino can decode), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A file's provenance: C2PA and the watermark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub format: String,
    pub c2pa: C2paReport,
    pub watermark: WatermarkReport,
}

/// How many frames detection reads at most (the detector averages up to 48).
const DETECT_FRAMES: usize = 48;

/// Checks `bytes` (an MP4 or other video, or a PNG/JPEG/WebP/GIF image): the C2PA manifest
/// against `trust_anchors`, and the watermark with `key`.
pub fn verify_bytes(
    bytes: &[u8],
    trust_anchors: &[String],
    key: &kino_watermark::Key,
) -> Verification {
    let c2pa = manifest::read_c2pa(bytes, trust_anchors);
    let format = manifest::mime_of(bytes).unwrap_or("unknown").to_string();
    let frames = decode_frames(bytes);
    let watermark = match frames {
        Ok((frames, luma)) => {
            let d = detect_frames(&frames, luma.as_deref(), key);
            WatermarkReport {
                detected: d.detected,
                id: d.id.filter(|_| d.detected).map(fmt_watermark_id),
                confidence: d.confidence,
                frames_used: d.frames_used,
                skipped: None,
            }
        }
        Err(why) => WatermarkReport {
            detected: false,
            id: None,
            confidence: 0.0,
            frames_used: 0,
            skipped: Some(why),
        },
    };
    Verification {
        format,
        c2pa,
        watermark,
    }
}

/// Reads a file and verifies it (see [`verify_bytes`]).
pub fn verify_file(
    path: &Path,
    trust_anchors: &[String],
    key: &kino_watermark::Key,
) -> Result<Verification> {
    if path.is_dir() {
        return Err(Error::Io(format!(
            "{} is a folder; give a video or image file",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Io(format!(
            "cannot read {}: {e}; check that the file exists and is readable",
            path.display()
        ))
    })?;
    Ok(verify_bytes(&bytes, trust_anchors, key))
}

/// The detector on decoded frames, with their coded luma when there is one.
fn detect_frames(
    frames: &[Frame],
    luma: Option<&[kino_media::LumaPlane]>,
    key: &kino_watermark::Key,
) -> kino_watermark::Detection {
    match luma {
        Some(l) => kino_watermark::detect_luma(frames, l, key),
        None => kino_watermark::detect(frames, key),
    }
}

/// Decoded frames for watermark detection: a still image is one frame; a video's first
/// [`DETECT_FRAMES`] frames (through FFmpeg, any container) with their coded luma (the
/// detector reads brightness from it: the luma of 8-bit RGB is rounded, clipped and biased).
type DecodedFrames = (Vec<Frame>, Option<Vec<kino_media::LumaPlane>>);

fn decode_frames(bytes: &[u8]) -> std::result::Result<DecodedFrames, String> {
    let mime = manifest::mime_of(bytes);
    if matches!(mime, Some("image/png" | "image/jpeg" | "image/webp")) {
        return kino_media::decode_image(bytes)
            .map(|f| (vec![f], None))
            .map_err(|e| e.to_string());
    }
    if mime == Some("image/gif") {
        return Err("GIF frames are not checked for the watermark".into());
    }
    // Videos (any container FFmpeg reads): about DETECT_FRAMES frames from the start.
    let head = |secs: f64| {
        kino_media::decode_video_head_luma(bytes, secs)
            .map_err(|e| format!("not a video or image Kino can decode ({e})"))
    };
    let (mut v, mut luma) = head(1.0)?;
    let fps = v.fps().as_f64();
    if v.len() < DETECT_FRAMES && v.duration_secs() >= 0.99 && fps > 0.0 {
        (v, luma) = head(DETECT_FRAMES as f64 / fps + 0.05)?;
    }
    let mut frames = v.into_frames();
    frames.truncate(DETECT_FRAMES);
    luma.truncate(DETECT_FRAMES);
    Ok((frames, Some(luma)))
}
