//! Where provenance settings come from: command-line flags (shared by `kino generate`,
//! `kino extend`, `kino mark` and `kino serve`), then a config file, then defaults.
//!
//! The config file is `--provenance-config FILE`, else `DATA/provenance.toml` when it exists
//! (DATA: [`crate::keys::data_dir`]):
//!
//! ```toml
//! signing_key = "/etc/kino/signer.key"      # PKCS#8 PEM
//! signing_cert = "/etc/kino/signer-chain.pem" # end-entity certificate first
//! watermark_key = "/etc/kino/watermark.key" # 64 hex digits
//! sign = true
//! watermark = true
//! manifest_prompt = false                   # put the prompt in the C2PA manifest
//! policy = "/etc/kino/policy.toml"
//! trust = ["/etc/kino/partner-root.pem"]    # extra roots `kino verify` trusts
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// Provenance flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProvenanceArgs {
    /// Do not sign outputs with a C2PA manifest (the output's metadata records that it is
    /// unsigned, and a warning says so).
    #[arg(long)]
    pub no_sign: bool,
    /// Do not embed the invisible watermark (recorded in the metadata; a warning says so).
    #[arg(long)]
    pub no_watermark: bool,
    /// The C2PA signing key (PKCS#8 PEM). Default: Kino's local key, made on first use in
    /// $KINO_DATA_DIR or ~/.local/share/kino.
    #[arg(long, value_name = "KEY.pem", requires = "signing_cert")]
    pub signing_key: Option<PathBuf>,
    /// The signing certificate chain (PEM, end-entity certificate first).
    #[arg(long, value_name = "CHAIN.pem", requires = "signing_key")]
    pub signing_cert: Option<PathBuf>,
    /// The watermark key (64 hex digits). Default: the local one beside the signing key.
    #[arg(long, value_name = "FILE")]
    pub watermark_key: Option<PathBuf>,
    /// Put the prompt in the C2PA manifest (off by default: manifests are public).
    #[arg(long)]
    pub manifest_prompt: bool,
    /// A prompt policy file (TOML: [[block]] term/pattern + reason). Default:
    /// DATA/policy.toml when it exists.
    #[arg(long, value_name = "policy.toml")]
    pub policy: Option<PathBuf>,
    /// A provenance config file (TOML). Default: DATA/provenance.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub provenance_config: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    signing_key: Option<PathBuf>,
    signing_cert: Option<PathBuf>,
    watermark_key: Option<PathBuf>,
    sign: Option<bool>,
    watermark: Option<bool>,
    manifest_prompt: Option<bool>,
    policy: Option<PathBuf>,
    #[serde(default)]
    trust: Vec<PathBuf>,
}

/// Resolved provenance settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sign: bool,
    pub watermark: bool,
    pub signing_key: Option<PathBuf>,
    pub signing_cert: Option<PathBuf>,
    pub watermark_key: Option<PathBuf>,
    pub manifest_prompt: bool,
    pub policy: Option<PathBuf>,
    /// Extra trust anchors (PEM files) for verification.
    pub trust: Vec<PathBuf>,
    /// Where the local keys live (default: [`crate::keys::data_dir`]).
    pub data_dir: Option<PathBuf>,
    /// Where refusals are logged when the policy file names no log (default: DATA).
    pub audit_dir: Option<PathBuf>,
    /// Which flag turned signing / the watermark off, for the warning.
    pub off_because: (String, String),
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sign: true,
            watermark: true,
            signing_key: None,
            signing_cert: None,
            watermark_key: None,
            manifest_prompt: false,
            policy: None,
            trust: Vec::new(),
            data_dir: None,
            audit_dir: None,
            off_because: ("--no-sign".into(), "--no-watermark".into()),
        }
    }
}

fn relative_to(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p
    }
}

impl Settings {
    /// The data directory for local keys.
    pub fn data_dir(&self) -> Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => crate::keys::data_dir(),
        }
    }
}

impl ProvenanceArgs {
    /// The settings these flags describe, with the config file's values under them.
    pub fn settings(&self) -> Result<Settings> {
        let mut s = Settings::default();
        let data = crate::keys::data_dir().ok();
        let config = match &self.provenance_config {
            Some(p) => Some(p.clone()),
            None => data
                .as_ref()
                .map(|d| d.join("provenance.toml"))
                .filter(|p| p.is_file()),
        };
        if let Some(path) = &config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
            let c: ConfigFile = toml::from_str(&text).map_err(|e| {
                Error::Config(format!(
                    "the provenance config {} is not valid: {e}",
                    path.display()
                ))
            })?;
            let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            s.signing_key = c.signing_key.map(|p| relative_to(&base, p));
            s.signing_cert = c.signing_cert.map(|p| relative_to(&base, p));
            s.watermark_key = c.watermark_key.map(|p| relative_to(&base, p));
            s.policy = c.policy.map(|p| relative_to(&base, p));
            s.trust = c.trust.into_iter().map(|p| relative_to(&base, p)).collect();
            if c.sign == Some(false) {
                s.sign = false;
                s.off_because.0 = format!("sign = false in {}", path.display());
            }
            if c.watermark == Some(false) {
                s.watermark = false;
                s.off_because.1 = format!("watermark = false in {}", path.display());
            }
            s.manifest_prompt = c.manifest_prompt.unwrap_or(false);
            if s.signing_key.is_some() != s.signing_cert.is_some() {
                return Err(Error::Config(format!(
                    "{} names only one of signing_key and signing_cert; give both",
                    path.display()
                )));
            }
        }
        if self.no_sign {
            s.sign = false;
            s.off_because.0 = "--no-sign".into();
        }
        if self.no_watermark {
            s.watermark = false;
            s.off_because.1 = "--no-watermark".into();
        }
        if self.signing_key.is_some() {
            s.signing_key = self.signing_key.clone();
            s.signing_cert = self.signing_cert.clone();
        }
        if self.watermark_key.is_some() {
            s.watermark_key = self.watermark_key.clone();
        }
        if self.manifest_prompt {
            s.manifest_prompt = true;
        }
        if self.policy.is_some() {
            s.policy = self.policy.clone();
        } else if s.policy.is_none() {
            s.policy = data
                .as_ref()
                .map(|d| d.join("policy.toml"))
                .filter(|p| p.is_file());
        }
        Ok(s)
    }
}
