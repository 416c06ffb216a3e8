//! The `kino` binary's provenance for one run: opened once (keys made on first use, notices
//! printed, the prompts checked against the policy), then used by every writer of that run.

use std::path::Path;
use std::sync::OnceLock;

use crate::{Error, Provenance, ProvenanceArgs, Result, Subject};

static CURRENT: OnceLock<Provenance> = OnceLock::new();

/// Opens the run's provenance from the flags, prints its notices once, and checks `prompts`
/// against the policy (a refusal is logged and returned with its reason). `source` names the
/// command in the audit log ("kino generate").
pub fn open(args: &ProvenanceArgs, prompts: &[&str], source: &str) -> Result<&'static Provenance> {
    if CURRENT.get().is_none() {
        let mut p = Provenance::open(args.settings()?)?;
        p.announce();
        let _ = CURRENT.set(p);
    }
    let p = current()?;
    for prompt in prompts {
        p.check_prompt(prompt, source).map_err(Error::Refused)?;
    }
    Ok(p)
}

/// The run's provenance ([`open`]ed earlier, or opened now with the defaults and config file).
pub fn current() -> Result<&'static Provenance> {
    if let Some(p) = CURRENT.get() {
        return Ok(p);
    }
    let mut p = Provenance::open(ProvenanceArgs::default().settings()?)?;
    p.announce();
    let _ = CURRENT.set(p);
    CURRENT
        .get()
        .ok_or_else(|| Error::Config("internal: provenance not set".into()))
}

/// The subject of a CLI output: the model folder, and a watermark id from the output path and
/// the time (printed and stored in the metadata so it can be looked up).
pub fn subject(model_dir: &Path, output: &Path) -> Subject {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Subject::new(Some(model_dir), &format!("{}\n{now}", output.display()))
}
