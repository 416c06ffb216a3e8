//! `kino verify FILE`: was this made by a model, by what, and has it been changed? The C2PA
//! manifest (trusted / valid but untrusted / invalid with the reason / absent, with its
//! claims) and Kino's invisible watermark (detected with its id and confidence / not detected).

use std::path::PathBuf;

use anyhow::Context;
use kino_provenance::{C2paState, Verification};

#[derive(clap::Args)]
pub struct Args {
    /// A video (MP4, MOV, WebM, …) or an image (PNG, JPEG, WebP, GIF).
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also trust signers whose certificate chains to this root (PEM); repeat for several.
    /// The local Kino root CA (made by the first `kino generate`) is always trusted.
    #[arg(long, value_name = "ROOT.pem")]
    trust: Vec<PathBuf>,
    /// The watermark key (64 hex digits). Default: the local one, or the config file's.
    #[arg(long, value_name = "FILE")]
    watermark_key: Option<PathBuf>,
    /// A provenance config file (TOML; its `trust` and `watermark_key` are used).
    #[arg(long, value_name = "FILE")]
    provenance_config: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let flags = kino_provenance::ProvenanceArgs {
        watermark_key: a.watermark_key.clone(),
        provenance_config: a.provenance_config.clone(),
        ..Default::default()
    };
    let settings = flags.settings()?;
    let data_dir = settings.data_dir().ok();
    let mut anchors = Vec::new();
    if let Some(root) = data_dir
        .as_deref()
        .and_then(kino_provenance::keys::local_root)
    {
        anchors.push(root);
    }
    for p in settings.trust.iter().chain(&a.trust) {
        anchors.push(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the trust anchor {}", p.display()))?,
        );
    }
    // The watermark key: given, or the local one if this machine has made one (verifying
    // never makes keys).
    let key_path = settings.watermark_key.clone().or_else(|| {
        data_dir
            .as_ref()
            .map(|d| kino_provenance::keys::provenance_dir(d).join("watermark.key"))
            .filter(|p| p.is_file())
    });
    let key = match &key_path {
        Some(p) => Some(kino_provenance::keys::read_watermark_key(p)?),
        None => None,
    };
    let key = key.map(|k| kino_watermark::Key::from_bytes(&k));
    let mut v = match &key {
        Some(k) => kino_provenance::verify_file(&a.file, &anchors, k)?,
        None => {
            // No key: C2PA only.
            let throwaway = kino_watermark::Key::generate();
            let mut v = kino_provenance::verify_file(&a.file, &anchors, &throwaway)?;
            v.watermark = kino_provenance::WatermarkReport {
                detected: false,
                id: None,
                confidence: 0.0,
                frames_used: 0,
                skipped: Some("no watermark key on this machine; pass --watermark-key FILE".into()),
            };
            v
        }
    };
    if v.format == "unknown" && v.watermark.skipped.is_some() {
        anyhow::bail!(
            "{} is not a video or image Kino can read ({}); give an MP4, MOV, WebM, PNG, JPEG, \
             WebP or GIF file",
            a.file.display(),
            v.watermark.skipped.take().unwrap_or_default()
        );
    }
    if a.json {
        let mut j = serde_json::to_value(&v)?;
        j["file"] = serde_json::json!(a.file);
        j["ai_generated"] = serde_json::json!(v.c2pa.ai_generated() || v.watermark.detected);
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    print_plain(&a.file, &v);
    Ok(())
}

fn print_plain(file: &std::path::Path, v: &Verification) {
    let c = &v.c2pa;
    println!("file:      {} ({})", file.display(), v.format);
    let state = match c.state {
        C2paState::Trusted => {
            "valid and trusted: intact, signed by a certificate that chains to a trusted root (the \
             local Kino root CA or a --trust anchor)"
                .to_string()
        }
        C2paState::Valid => "valid but untrusted: intact, but the signer is not one this machine \
                              trusts (pass --trust ROOT.pem to trust its root)"
            .to_string(),
        C2paState::Invalid => "INVALID: the file was changed after it was signed, or the \
                                manifest is damaged"
            .to_string(),
        C2paState::Absent => "absent: no C2PA manifest (never signed, or removed by a re-encode \
                               or an edit)"
            .to_string(),
    };
    println!("C2PA:      {state}");
    for r in &c.reasons {
        println!("           reason: {r}");
    }
    if c.state != C2paState::Absent {
        if let Some(s) = &c.signer {
            println!(
                "  signer:    {s}{}",
                c.issuer
                    .as_deref()
                    .map(|i| format!(" (issued by {i})"))
                    .unwrap_or_default()
            );
        }
        if let Some(t) = &c.signed_at {
            println!("  signed at: {t}");
        }
        if let Some(g) = &c.claim_generator {
            println!("  generator: {g}");
        }
        for act in &c.actions {
            let source = match act.digital_source_type.as_deref() {
                Some(t) if t.ends_with("/trainedAlgorithmicMedia") => {
                    " — made by a trained model (trainedAlgorithmicMedia)".to_string()
                }
                Some(t) => format!(" — source {t}"),
                None => String::new(),
            };
            let agent = act
                .software_agent
                .as_deref()
                .map(|s| format!(", by {s}"))
                .unwrap_or_default();
            println!("  action:    {}{source}{agent}", act.action);
        }
        if let Some(k) = &c.kino {
            if let Some(m) = &k.model {
                println!("  model:     {m}");
            }
            if let Some(h) = &k.model_sha256 {
                println!("  model sha256: {h}");
            }
            if let Some(t) = &k.generated_at {
                println!("  generated: {t}");
            }
            if let Some(p) = &k.prompt {
                println!("  prompt:    {p}");
            }
            if let Some(id) = &k.video_id {
                println!("  video id:  {id}");
            }
            if let Some(w) = &k.watermark_id {
                println!("  watermark id (claimed): {w}");
            }
            if let Some(d) = &k.derived_from {
                println!("  derived from: {} (sha256 {})", d.file, d.sha256);
            }
            if let Some(d) = &k.marked_from {
                println!("  marked afterwards from: {} (sha256 {})", d.file, d.sha256);
            }
        }
    }
    let w = &v.watermark;
    match (&w.skipped, w.detected) {
        (Some(why), _) => println!("watermark: not checked: {why}"),
        (None, true) => println!(
            "watermark: detected — id {}, confidence {:.3} ({} frame{} read)",
            w.id.as_deref().unwrap_or("?"),
            w.confidence,
            w.frames_used,
            if w.frames_used == 1 { "" } else { "s" }
        ),
        (None, false) => println!(
            "watermark: not detected (confidence {:.3}; {} frame{} read)",
            w.confidence,
            w.frames_used,
            if w.frames_used == 1 { "" } else { "s" }
        ),
    }
    let verdict = if c.ai_generated() && matches!(c.state, C2paState::Trusted | C2paState::Valid) {
        "AI-generated (the signed manifest says so)"
    } else if w.detected {
        "AI-generated by Kino (its watermark is in the pixels)"
    } else if c.state == C2paState::Invalid {
        "unknown: the manifest does not hold, and no watermark was found"
    } else {
        "no sign of Kino (no manifest, no watermark); it may still be generated elsewhere"
    };
    println!("verdict:   {verdict}");
}
