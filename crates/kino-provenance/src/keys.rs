//! Signing identities: a key and certificate chain from the operator, or Kino's own local
//! certificate authority, made on first use in the user's data directory.
//!
//! The local identity is an ECDSA P-256 root CA ("Kino local root CA", 20 years) and an
//! end-entity certificate it issues (CA:FALSE, digitalSignature + nonRepudiation, extended key
//! usage emailProtection + documentSigning + C2PA signing), kept as PEM files in
//! `DATA/provenance/`: `root-ca.pem`, `root-ca.key` (kept only to issue a new signer),
//! `signer-chain.pem` (end-entity then root) and `signer.key` (PKCS#8). C2PA refuses a
//! self-signed CA as signer, hence two certificates.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use c2pa::SigningAlg;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::{DecodePem, EncodePem};
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;
use x509_cert::Certificate;

use crate::{Error, Result};

/// The user's Kino data directory: `$KINO_DATA_DIR`, else `$XDG_DATA_HOME/kino`, else
/// `~/.local/share/kino`.
pub fn data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("KINO_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("kino"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/kino")),
        None => Err(Error::Config(
            "cannot find a data directory for Kino's signing key: set KINO_DATA_DIR (or HOME)"
                .into(),
        )),
    }
}

/// Where the local identity and the watermark key live.
pub fn provenance_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("provenance")
}

/// A signing identity: the certificate chain (PEM, end-entity first) and its private key
/// (PKCS#8 PEM).
#[derive(Clone)]
pub struct SigningIdentity {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub alg: SigningAlg,
    /// Where it came from ("the local Kino CA in …", "--signing-cert …"), for messages.
    pub source: String,
    /// The local root CA (PEM) when this is Kino's own identity: `kino verify` trusts it.
    pub local_root_pem: Option<String>,
}

impl std::fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningIdentity")
            .field("alg", &self.alg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SigningIdentity {
    /// A signer for the `c2pa` crate.
    pub fn signer(&self) -> Result<c2pa::BoxedSigner> {
        c2pa::create_signer::from_keys(&self.chain_pem, &self.key_pem, self.alg, None).map_err(
            |e| {
                Error::Config(format!(
                    "the signing key and certificate ({}) cannot sign: {e}; check that the key \
                     belongs to the first certificate of the chain",
                    self.source
                ))
            },
        )
    }

    /// The end-entity certificate's subject common name and issuer common name.
    pub fn names(&self) -> (Option<String>, Option<String>) {
        match first_cert(&self.chain_pem) {
            Some(c) => (
                common_name(&c.tbs_certificate.subject),
                common_name(&c.tbs_certificate.issuer),
            ),
            None => (None, None),
        }
    }

    /// Loads an operator's key and certificate chain (PEM files). The algorithm follows the
    /// certificate's key (P-256 → ES256, P-384 → ES384, P-521 → ES512, Ed25519, RSA → PS256).
    pub fn from_files(key: &Path, cert: &Path) -> Result<SigningIdentity> {
        let key_pem = std::fs::read(key).map_err(|e| {
            Error::Config(format!(
                "cannot read the signing key {}: {e}; give a PKCS#8 PEM private key",
                key.display()
            ))
        })?;
        let chain_pem = std::fs::read(cert).map_err(|e| {
            Error::Config(format!(
                "cannot read the signing certificate {}: {e}; give a PEM chain, end-entity \
                 certificate first",
                cert.display()
            ))
        })?;
        let leaf = first_cert(&chain_pem).ok_or_else(|| {
            Error::Config(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the chain, \
                 end-entity certificate first",
                cert.display()
            ))
        })?;
        let alg = alg_of(&leaf.tbs_certificate.subject_public_key_info).ok_or_else(|| {
            Error::Config(format!(
                "the certificate in {} has a key type C2PA cannot sign with; use ECDSA \
                 P-256/P-384/P-521, Ed25519 or RSA",
                cert.display()
            ))
        })?;
        if !String::from_utf8_lossy(&key_pem).contains("-----BEGIN") {
            return Err(Error::Config(format!(
                "{} is not a PEM private key; convert it with `openssl pkcs8 -topk8 -nocrypt -in \
                 KEY -out key.pem`",
                key.display()
            )));
        }
        Ok(SigningIdentity {
            chain_pem,
            key_pem,
            alg,
            source: format!("{} + {}", cert.display(), key.display()),
            local_root_pem: None,
        })
    }

    /// Kino's own identity in `data_dir`, made on first use. `created` is set when it was made
    /// now (the caller says so once).
    pub fn local(data_dir: &Path) -> Result<(SigningIdentity, bool)> {
        let dir = provenance_dir(data_dir);
        let chain = dir.join("signer-chain.pem");
        let key = dir.join("signer.key");
        let root = dir.join("root-ca.pem");
        let mut created = false;
        if !(chain.is_file() && key.is_file() && root.is_file()) {
            // Several Kino processes may start at once on a fresh machine: one makes the CA,
            // the others wait for it and use the same one.
            with_lock(&dir, || {
                if !(chain.is_file() && key.is_file() && root.is_file()) {
                    create_local_ca(&dir)?;
                    created = true;
                }
                Ok(())
            })?;
        }
        let mut id = SigningIdentity::from_files(&key, &chain)?;
        id.local_root_pem = Some(
            std::fs::read_to_string(&root)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", root.display())))?,
        );
        id.source = format!("the local Kino CA in {}", dir.display());
        // A signer certificate close to its end is renewed from the same root.
        if !created && expires_within(&id.chain_pem, Duration::from_secs(30 * 86400)) {
            with_lock(&dir, || renew_signer(&dir))?;
            return SigningIdentity::local(data_dir);
        }
        Ok((id, created))
    }
}

/// The local root CA's PEM in `data_dir`, if one was made.
pub fn local_root(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(provenance_dir(data_dir).join("root-ca.pem")).ok()
}

fn first_cert(pem: &[u8]) -> Option<Certificate> {
    let text = String::from_utf8_lossy(pem);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end_tag = "-----END CERTIFICATE-----";
    let end = text[start..].find(end_tag)? + start + end_tag.len();
    Certificate::from_pem(text[start..end].as_bytes()).ok()
}

fn common_name(name: &Name) -> Option<String> {
    const CN: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == CN {
                if let Ok(s) = atv
                    .value
                    .decode_as::<x509_cert::der::asn1::Utf8StringRef<'_>>()
                {
                    return Some(s.as_str().to_string());
                }
                if let Ok(s) = atv
                    .value
                    .decode_as::<x509_cert::der::asn1::PrintableStringRef<'_>>()
                {
                    return Some(s.as_str().to_string());
                }
            }
        }
    }
    None
}

fn alg_of(spki: &SubjectPublicKeyInfoOwned) -> Option<SigningAlg> {
    use x509_cert::der::oid::ObjectIdentifier as Oid;
    const EC: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    const P521: Oid = Oid::new_unwrap("1.3.132.0.35");
    const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    const RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    const PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    let a = &spki.algorithm;
    if a.oid == EC {
        let curve: Oid = a.parameters.as_ref()?.decode_as().ok()?;
        return match curve {
            c if c == P256 => Some(SigningAlg::Es256),
            c if c == P384 => Some(SigningAlg::Es384),
            c if c == P521 => Some(SigningAlg::Es512),
            _ => None,
        };
    }
    if a.oid == ED25519 {
        return Some(SigningAlg::Ed25519);
    }
    if a.oid == RSA || a.oid == PSS {
        return Some(SigningAlg::Ps256);
    }
    None
}

fn expires_within(chain_pem: &[u8], d: Duration) -> bool {
    let Some(c) = first_cert(chain_pem) else {
        return false;
    };
    let not_after = c.tbs_certificate.validity.not_after.to_unix_duration();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    not_after < now + d
}

fn cert_error(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("cannot make the local signing certificate: {e}"))
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::new(&bytes).map_err(cert_error)
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", tmp.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600));
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}

fn user_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        });
    match host {
        Some(h) => format!("Kino on {h}"),
        None => "Kino".into(),
    }
}

/// Makes a new root CA and a signer it issues in `dir`.
fn create_local_ca(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Config(format!(
            "cannot create {} for Kino's signing key: {e}; set KINO_DATA_DIR to a writable \
             folder, or pass --signing-key and --signing-cert",
            dir.display()
        ))
    })?;
    let root_key = SigningKey::random(&mut rand_core::OsRng);
    let subject =
        Name::from_str(&format!("CN={} local root CA,O=Kino", user_name())).map_err(cert_error)?;
    let spki =
        SubjectPublicKeyInfoOwned::from_key(*root_key.verifying_key()).map_err(cert_error)?;
    let validity = Validity::from_now(Duration::from_secs(20 * 365 * 86400)).map_err(cert_error)?;
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial()?,
        validity,
        subject,
        spki,
        &root_key,
    )
    .map_err(cert_error)?;
    let root = builder.build::<DerSignature>().map_err(cert_error)?;
    let root_pem = root.to_pem(LineEnding::LF).map_err(cert_error)?;
    let root_key_pem = root_key.to_pkcs8_pem(LineEnding::LF).map_err(cert_error)?;
    write_private(&dir.join("root-ca.key"), root_key_pem.as_bytes())?;
    write_private(&dir.join("root-ca.pem"), root_pem.as_bytes())?;
    issue_signer(dir, &root, &root_key)
}

/// Issues a new end-entity certificate (2 years) from the local root.
fn issue_signer(dir: &Path, root: &Certificate, root_key: &SigningKey) -> Result<()> {
    let key = SigningKey::random(&mut rand_core::OsRng);
    let subject =
        Name::from_str(&format!("CN={} signer,O=Kino", user_name())).map_err(cert_error)?;
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).map_err(cert_error)?;
    let validity = Validity::from_now(Duration::from_secs(2 * 365 * 86400)).map_err(cert_error)?;
    let mut builder = CertificateBuilder::new(
        Profile::Leaf {
            issuer: root.tbs_certificate.subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
        },
        random_serial()?,
        validity,
        subject,
        spki,
        root_key,
    )
    .map_err(cert_error)?;
    use x509_cert::der::oid::ObjectIdentifier as Oid;
    builder
        .add_extension(&ExtendedKeyUsage(vec![
            Oid::new_unwrap("1.3.6.1.5.5.7.3.4"),     // emailProtection
            Oid::new_unwrap("1.3.6.1.5.5.7.3.36"),    // documentSigning
            Oid::new_unwrap("1.3.6.1.4.1.62558.2.1"), // C2PA signing
        ]))
        .map_err(cert_error)?;
    let cert = builder.build::<DerSignature>().map_err(cert_error)?;
    let chain = format!(
        "{}{}",
        cert.to_pem(LineEnding::LF).map_err(cert_error)?,
        root.to_pem(LineEnding::LF).map_err(cert_error)?
    );
    let key_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(cert_error)?;
    write_private(&dir.join("signer.key"), key_pem.as_bytes())?;
    write_private(&dir.join("signer-chain.pem"), chain.as_bytes())
}

fn renew_signer(dir: &Path) -> Result<()> {
    let root_pem = std::fs::read(dir.join("root-ca.pem"))
        .map_err(|e| Error::Config(format!("cannot read the local root CA: {e}")))?;
    let root = Certificate::from_pem(&root_pem).map_err(cert_error)?;
    let key_pem = std::fs::read_to_string(dir.join("root-ca.key"))
        .map_err(|e| Error::Config(format!("cannot read the local root CA's key: {e}")))?;
    let root_key = SigningKey::from_pkcs8_pem(&key_pem).map_err(cert_error)?;
    issue_signer(dir, &root, &root_key)
}

/// The watermark key in `data_dir` (64 hex digits in `provenance/watermark.key`), made on first
/// use; `created` when it was made now.
pub fn local_watermark_key(data_dir: &Path) -> Result<([u8; 32], bool)> {
    let dir = provenance_dir(data_dir);
    let path = dir.join("watermark.key");
    if path.is_file() {
        return Ok((read_watermark_key(&path)?, false));
    }
    let mut made = None;
    with_lock(&dir, || {
        if !path.is_file() {
            let mut key = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
            write_private(&path, format!("{}\n", hex(&key)).as_bytes())?;
            made = Some(key);
        }
        Ok(())
    })?;
    match made {
        Some(key) => Ok((key, true)),
        None => Ok((read_watermark_key(&path)?, false)),
    }
}

/// Runs `f` holding an exclusive lock on `dir/.lock` (an OS file lock, released if the process
/// dies), so that processes starting together make the keys once.
fn with_lock(dir: &Path, f: impl FnOnce() -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Config(format!(
            "cannot create {} for Kino's keys: {e}; set KINO_DATA_DIR to a writable folder, or \
             pass --signing-key and --signing-cert",
            dir.display()
        ))
    })?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.display())))?;
    file.lock()
        .map_err(|e| Error::Config(format!("cannot lock {}: {e}", path.display())))?;
    let result = f();
    let _ = file.unlock();
    result
}

/// Reads a watermark key file: 64 hex digits (or 32 raw bytes).
pub fn read_watermark_key(path: &Path) -> Result<[u8; 32]> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the watermark key {}: {e}",
            path.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let t = text.trim();
    if t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        return Ok(key);
    }
    if bytes.len() == 32 {
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    Err(Error::Config(format!(
        "the watermark key {} is not 64 hex digits; make one with `head -c 32 /dev/urandom | \
         xxd -p -c 64`",
        path.display()
    )))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
