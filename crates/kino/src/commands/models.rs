//! `kino models` and `kino pull ALIAS`.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use kino_engine::registry::{self, KNOWN_MODELS};

#[derive(clap::Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn list(a: ModelsArgs) -> anyhow::Result<()> {
    let rows: Vec<_> = KNOWN_MODELS
        .iter()
        .map(|m| (m, registry::local_snapshot(m)))
        .collect();
    let bundled = registry::bundled_dir();
    if a.json {
        let mut v = vec![serde_json::json!({
            "alias": registry::BUNDLED_MODEL, "repo": null,
            "description": registry::BUNDLED_DESCRIPTION, "size_gb": 0.02,
            "local_path": bundled, "default": registry::DEFAULT_MODEL == registry::BUNDLED_MODEL,
        })];
        v.extend(rows.iter().map(|(m, p)| {
            serde_json::json!({
                "alias": m.alias, "repo": m.repo, "description": m.description,
                "size_gb": m.size_gb, "local_path": p, "default": m.alias == registry::DEFAULT_MODEL,
            })
        }));
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<26} {:<44} {:<6} description",
        "alias", "repository", "local"
    );
    println!(
        "{:<26} {:<44} {:<6} {} (default)",
        registry::BUNDLED_MODEL,
        "(ships with Kino)",
        if bundled.is_some() { "yes" } else { "no" },
        registry::BUNDLED_DESCRIPTION
    );
    for (m, p) in &rows {
        let local = if p.is_some() { "yes" } else { "no" };
        println!(
            "{:<26} {:<44} {:<6} {}",
            m.alias, m.repo, local, m.description
        );
    }
    println!(
        "\nModels are kept in the Hugging Face cache ({}). Any folder in diffusers layout also works: --model /path/to/folder",
        registry::hub_cache().display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// A model alias from `kino models`.
    alias: String,
}

pub fn pull(a: PullArgs) -> anyhow::Result<()> {
    let Some(m) = registry::find(&a.alias) else {
        bail!(
            "unknown model `{}`; known models: {}",
            a.alias,
            KNOWN_MODELS.map(|m| m.alias).join(", ")
        );
    };
    if let Some(p) = registry::local_snapshot(m) {
        eprintln!("{} is already here: {}", m.alias, p.display());
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let host = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(&endpoint)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let addr = if host.contains(':') {
        host.clone()
    } else {
        format!("{host}:443")
    };
    // Fail at once, with the way out, when the hub can't be reached.
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(5)).is_ok())
        .unwrap_or(false);
    if !reachable {
        bail!(
            "cannot reach {host} to download {} ({}): no network access. Instead, {}",
            m.alias,
            m.repo,
            registry::manual_install_hint(m)
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .context("cannot start the hub client")?;
    let repo = api.model(m.repo.to_string());
    let info = repo
        .info()
        .with_context(|| format!("cannot list the files of {}", m.repo))?;
    let n = info.siblings.len();
    eprintln!(
        "downloading {} ({n} files, about {:.0} GB) into {}",
        m.repo,
        m.size_gb,
        registry::hub_cache().display()
    );
    for (i, s) in info.siblings.iter().enumerate() {
        eprintln!("[{}/{n}] {}", i + 1, s.rfilename);
        repo.get(&s.rfilename).with_context(|| {
            format!(
                "downloading {}; run the same command again to resume",
                s.rfilename
            )
        })?;
    }
    let path = registry::local_snapshot(m)
        .context("download finished but the folder has no model_index.json")?;
    println!("{}", path.display());
    Ok(())
}
