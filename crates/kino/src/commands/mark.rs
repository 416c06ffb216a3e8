//! `kino mark IN -o OUT`: embeds Kino's watermark in any video and signs the result, so a clip
//! edited elsewhere (which loses the original's manifest) can be marked again.

use std::path::PathBuf;

use anyhow::{bail, Context};
use kino_media::{Mp4Options, Video};

#[derive(clap::Args)]
pub struct Args {
    /// The video to mark (MP4, MOV, WebM, MKV, … in H.264, H.265, VP9, AV1).
    input: PathBuf,
    /// The marked video (MP4).
    #[arg(long, short)]
    output: PathBuf,
    /// Replace the output if it exists.
    #[arg(long)]
    overwrite: bool,
    /// The watermark id to embed (12 hex digits). Default: from the input's SHA-256.
    #[arg(long, value_name = "HEX")]
    id: Option<String>,
    /// The model that made the input, recorded in the manifest (if known).
    #[arg(long)]
    model: Option<String>,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    provenance: kino_provenance::ProvenanceArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.output.extension().map(|e| e.to_ascii_lowercase()) != Some("mp4".into()) {
        bail!(
            "kino mark writes MP4; name the output with .mp4 (got {})",
            a.output.display()
        );
    }
    if a.output.exists() && !a.overwrite {
        bail!(
            "{} already exists; choose another name with -o, or pass --overwrite",
            a.output.display()
        );
    }
    let settings = a.provenance.settings()?;
    if !settings.sign && !settings.watermark {
        bail!("--no-sign and --no-watermark together leave nothing to do");
    }
    let watermark_on = settings.watermark;
    let mut prov = kino_provenance::Provenance::open(settings)?;
    prov.announce();
    let sha = kino_provenance::sha256_file(&a.input)?;
    let id = match &a.id {
        Some(h) => u64::from_str_radix(h.trim_start_matches("0x"), 16)
            .ok()
            .filter(|v| *v < (1 << 48))
            .with_context(|| format!("--id {h} is not up to 12 hex digits, e.g. 0123456789ab"))?,
        None => kino_provenance::watermark_id_of(&sha),
    };
    let video = kino_media::read_video(&a.input)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.input.display()))?;
    // H.264 4:2:0 needs even sides.
    let video = if video.width() % 2 == 1 || video.height() % 2 == 1 {
        let fps = video.fps();
        let frames = video
            .into_frames()
            .iter()
            .map(|f| f.crop_to_even())
            .collect::<Result<Vec<_>, _>>()?;
        eprintln!("kino mark: odd width or height; the last row/column is cropped");
        Video::new(frames, fps)?
    } else {
        video
    };
    // A clip that already carries a Kino watermark keeps its id: a second id laid over the
    // first interferes with it, and either may then fail to read back.
    let id = match (&a.id, watermark_on) {
        (None, true) => {
            let found = prov.detect_file(&a.input)?;
            match (found.detected, found.id) {
                (true, Some(existing)) => {
                    eprintln!(
                        "kino mark: {} already carries Kino watermark id {}; embedding that id \
                         again (a second id would interfere with it; --id sets one anyway)",
                        a.input.display(),
                        kino_provenance::fmt_watermark_id(existing)
                    );
                    existing
                }
                _ => id,
            }
        }
        _ => id,
    };
    let name = a
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut meta = serde_json::json!({
        "kino_version": env!("CARGO_PKG_VERSION"),
        "marked_by": "kino mark",
        "source": {"name": name, "sha256": sha},
    });
    if let Some(m) = &a.model {
        meta["model"] = serde_json::json!(m);
    }
    let subject = kino_provenance::Subject {
        model_dir: None,
        watermark_id: id,
        video_id: None,
    };
    let opts = Mp4Options {
        metadata: Some(meta.clone()),
        ..Default::default()
    };
    // Written beside the output and renamed at the end: a failure leaves no half-marked file.
    let tmp = a.output.with_extension("kino-mark.mp4");
    let marked_from = kino_provenance::DerivedFrom {
        file: name,
        sha256: sha,
    };
    let stamped = match prov.write_mp4_with(&tmp, &video, &opts, &subject, |c| {
        c.marked_from = Some(marked_from)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, &a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    eprintln!(
        "marked {} → {} ({} frames): watermark {}, C2PA {}",
        a.input.display(),
        a.output.display(),
        video.len(),
        stamped
            .watermark_id
            .as_deref()
            .map(|i| format!("id {i}"))
            .unwrap_or_else(|| "off".into()),
        if stamped.signed { "signed" } else { "off" }
    );
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": a.output,
                "frames": video.len(),
                "signed": stamped.signed,
                "watermark_id": stamped.watermark_id,
            }))?
        );
    }
    Ok(())
}
