//! The `kino serve` command line (shared by the `kino` binary and the `kino-server` binary).

use std::path::{Path, PathBuf};

use kino_engine::device::DeviceChoice;

use crate::error::ServerError;
use crate::{ModelSpec, Server, ServerConfig};

/// The model served when none is named.
pub use kino_engine::registry::DEFAULT_MODEL;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, short, default_value_t = 8000)]
    pub port: u16,
    /// Where jobs (kino.sqlite3) and outputs (videos/) are kept.
    #[arg(long, default_value = "kino-data")]
    pub data_dir: PathBuf,
    /// A model alias (see `kino models`) or a model folder; repeat to serve several. The first
    /// answers to `sora-2`, the second (if any) to `sora-2-pro`. Default: $KINO_MODEL or
    /// kino-shapes (the small model that ships with Kino).
    #[arg(long, short)]
    pub model: Vec<String>,
    /// Device to run on: auto, cpu, cuda:N, metal; repeat for one worker per device.
    #[arg(long, default_value = "auto")]
    pub device: Vec<String>,
    /// Shorthand for --device cpu.
    #[arg(long)]
    pub cpu: bool,
    /// API key clients must send as `Authorization: Bearer KEY`; repeat for several.
    #[arg(long)]
    pub api_key: Vec<String>,
    /// A file with one API key per line (blank lines and # comments ignored).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Send `video.completed` / `video.failed` webhooks (Standard Webhooks) to this http:// URL.
    #[arg(long, requires = "webhook_secret")]
    pub webhook_url: Option<String>,
    /// The webhook signing secret, `whsec_` + base64 (e.g. `whsec_$(openssl rand -base64 32)`).
    #[arg(long)]
    pub webhook_secret: Option<String>,
    /// The `openai-poll-after-ms` header: how often SDK clients poll.
    #[arg(long, default_value_t = 1000)]
    pub poll_after_ms: u64,
    /// Longest video a client may ask for, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub max_seconds: f64,
    /// Most videos waiting in the queue; more get HTTP 429.
    #[arg(long, default_value_t = 1000)]
    pub max_queue: usize,
    /// Largest request body in bytes; larger get HTTP 413.
    #[arg(long, default_value_t = crate::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,
    /// Largest image input (`input_reference`, `last_image`) in bytes; larger get HTTP 413.
    #[arg(long, default_value_t = crate::DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_bytes: usize,
    /// Largest source video (`POST /v1/videos/edits`) in bytes; larger get HTTP 413.
    #[arg(long, default_value_t = crate::DEFAULT_MAX_VIDEO_BYTES)]
    pub max_video_bytes: usize,
    /// A folder of LoRA adapters (`*.safetensors`) that requests may name by file name
    /// (`"lora": ["anime", "clay:0.8"]`); without it, requests name none.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// MagCache calibration (a JSON list of ratios) for `"cache": "mag:…"` requests that send
    /// no `mag_ratios`.
    #[arg(long, value_name = "FILE")]
    pub mag_ratios: Option<PathBuf>,
    /// Keep jobs in Postgres (postgres://USER:PASSWORD@HOST:PORT/DB) instead of
    /// DATA_DIR/kino.sqlite3, so that several nodes share one queue. Create the tables first
    /// with `kino migrate --database URL`.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Keep outputs in an S3-compatible bucket (s3://BUCKET/PREFIX) instead of DATA_DIR/videos.
    /// Endpoint and credentials: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION.
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// What this node does: all (API and jobs), api (requests only) or worker (jobs only;
    /// /health and /metrics). api and worker need --database.
    #[arg(long, value_enum, default_value_t = crate::Role::All)]
    pub role: crate::Role,
    /// Seconds a worker's lease on a job lasts without a heartbeat (with --database): a job
    /// whose worker died runs again after at most this long.
    #[arg(long, default_value_t = crate::DEFAULT_LEASE.as_secs(), value_name = "SECS")]
    pub lease_secs: u64,
    /// Answer content downloads with a redirect to a presigned URL valid this many seconds
    /// (with an s3:// --storage), so that the bucket, not this node, sends the bytes.
    #[arg(long, value_name = "SECS")]
    pub presign_secs: Option<u64>,
    /// Signing, watermark and prompt-policy settings.
    #[command(flatten)]
    pub provenance: kino_provenance::ProvenanceArgs,
}

/// `kino migrate`: creates or updates the Postgres tables.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The Postgres database (postgres://USER:PASSWORD@HOST:PORT/DB).
    #[arg(long, value_name = "URL")]
    pub database: String,
}

/// Runs `kino migrate`.
pub fn migrate(args: &MigrateArgs) -> Result<(), ServerError> {
    let applied = crate::pg::migrate(&args.database)?;
    let db = crate::pg::redact(&args.database);
    if applied.is_empty() {
        eprintln!(
            "kino migrate: {db} is up to date (schema version {})",
            crate::pg::schema_version()
        );
    } else {
        for m in &applied {
            eprintln!("kino migrate: applied {m}");
        }
        eprintln!(
            "kino migrate: {db} is at schema version {}",
            crate::pg::schema_version()
        );
    }
    Ok(())
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    let s = s.trim().to_ascii_lowercase();
    Ok(match s.as_str() {
        "auto" => DeviceChoice::Auto,
        "cpu" => DeviceChoice::Cpu,
        "metal" => DeviceChoice::Metal,
        "cuda" => DeviceChoice::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => DeviceChoice::Cuda(i),
            _ => {
                return Err(format!(
                    "device `{s}` is not one of auto, cpu, cuda, cuda:N, metal"
                ))
            }
        },
    })
}

/// The name a model is served under: the alias, or the folder's name.
fn model_spec(arg: &str) -> Result<ModelSpec, ServerError> {
    let path = kino_engine::registry::resolve(arg).map_err(|source| ServerError::Model {
        name: arg.to_string(),
        source,
    })?;
    let id = if Path::new(arg).is_dir() {
        Path::new(arg)
            .canonicalize()
            .ok()
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string())
    } else {
        arg.to_string()
    };
    Ok(ModelSpec { id, path })
}

impl ServeArgs {
    /// The server configuration these arguments describe.
    pub fn to_config(&self) -> Result<ServerConfig, ServerError> {
        let names = if self.model.is_empty() {
            vec![std::env::var("KINO_MODEL").unwrap_or_else(|_| DEFAULT_MODEL.to_string())]
        } else {
            self.model.clone()
        };
        let models = names
            .iter()
            .map(|m| model_spec(m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = ServerConfig::new(
            format!("{}:{}", self.host, self.port),
            self.data_dir.clone(),
            models,
        );
        config.devices = if self.cpu {
            vec![DeviceChoice::Cpu]
        } else {
            self.device
                .iter()
                .map(|d| {
                    parse_device(d)
                        .map_err(|m| ServerError::Device(kino_engine::Error::InvalidRequest(m)))
                })
                .collect::<Result<_, _>>()?
        };
        config.poll_after_ms = self.poll_after_ms;
        config.max_seconds = self.max_seconds;
        config.max_queue = self.max_queue;
        config.max_upload_bytes = self.max_upload_bytes;
        config.max_image_bytes = self.max_image_bytes;
        config.max_video_bytes = self.max_video_bytes;
        config.api_keys = self.api_key.clone();
        config.lora_dir = self.lora_dir.clone();
        config.database = self.database.clone();
        config.storage = self.storage.clone();
        config.role = self.role;
        if self.lease_secs < 3 {
            return Err(ServerError::Role(format!(
                "--lease-secs {} is too short; heartbeats come every third of it (use 3 or more)",
                self.lease_secs
            )));
        }
        config.lease = std::time::Duration::from_secs(self.lease_secs);
        if let Some(p) = self.presign_secs {
            if self.storage.is_none() {
                return Err(ServerError::Role(
                    "--presign-secs needs an s3:// --storage (files in --data-dir have no URL)"
                        .into(),
                ));
            }
            config.presign = Some(std::time::Duration::from_secs(p));
        }
        if let Some(f) = &self.mag_ratios {
            config.mag_ratios =
                Some(kino_engine::hooks::read_mag_ratios(f).map_err(ServerError::MagRatios)?);
        }
        config.provenance = self
            .provenance
            .settings()
            .map_err(|e| ServerError::Provenance(e.to_string()))?;
        if let (Some(url), Some(secret)) = (&self.webhook_url, &self.webhook_secret) {
            config.webhook = Some(crate::webhooks::WebhookConfig {
                url: url.clone(),
                secret: secret.clone(),
                retry_base: std::time::Duration::from_secs(1),
            });
        }
        if let Some(f) = &self.api_keys_file {
            let text = std::fs::read_to_string(f)?;
            config.api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(config)
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<(), ServerError> {
    let config = args.to_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let names: Vec<&str> = server.models().iter().map(|m| m.id.as_str()).collect();
        let role = match args.role {
            crate::Role::All => "",
            crate::Role::Api => " [api node]",
            crate::Role::Worker => " [worker node: /health, /metrics]",
        };
        eprintln!(
            "kino serve: http://{addr}/v1{role} (models: {}; sora-2 → {}); Ctrl-C to stop",
            names.join(", "),
            names.first().copied().unwrap_or("?")
        );
        server.run(shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("kino serve: stopping (a running video runs again on the next start)");
}
