//! `kino serve`: OpenAI's Videos API over local models, with a durable job queue.
//!
//! - HTTP (axum): `POST /v1/videos` (JSON or multipart), `GET /v1/videos/{id}`,
//!   `GET /v1/videos` (`after`, `limit`, `order`), `DELETE /v1/videos/{id}`,
//!   `GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet` (HTTP Range),
//!   `POST /v1/videos/{id}/remix`; extensions `POST /v1/videos/{id}/cancel`, `GET /health`,
//!   `GET /v1/videos/{id}/events` (SSE), `GET /v1/models`, `GET /metrics`. Every response carries `openai-poll-after-ms`; errors
//!   have OpenAI's shape (see [`error::ApiError`]). The mapping of `model`, `size` and
//!   `seconds` onto a local model is documented in [`mapping`].
//! - Jobs live in SQLite (`DATA_DIR/kino.sqlite3`, see [`store`]); outputs in
//!   `DATA_DIR/videos/<id>/{video.mp4, thumbnail.jpg, spritesheet.jpg}`, the MP4 carrying the
//!   generation parameters.
//! - On several machines: jobs in Postgres (`--database postgres://…`, [`pg`]: leases with
//!   heartbeats, completion conditioned on the lease) and outputs in an S3-compatible bucket
//!   (`--storage s3://…`, [`storage`]), with `--role api|worker|all` per node.
//! - One worker thread per device runs jobs in arrival order ([`worker`]).
//! - `input_reference` (and Kino's `last_image`) on create, and `POST /v1/videos/edits`
//!   (video-to-video), store their files with the job ([`inputs`]).
//! - On a VACE model, `POST /v1/videos/edits` edits inside an optional `mask`, and
//!   `POST /v1/videos/characters` / `GET /v1/videos/characters/{id}` store subjects that a
//!   create names with `"characters": ["char_…"]` ([`characters`], [`vace`]).
//! - `POST /v1/videos/extensions` continues a video, and `seconds` beyond one clip on create are
//!   made in segments that survive a restart ([`segments`]).
//! - `GET /` is a small web studio embedded in the binary (prompt, queue, gallery).

pub mod adapters;
pub mod api;
pub mod auth;
pub mod characters;
pub mod cli;
pub mod content;
pub mod error;
pub mod events;
pub mod inputs;
pub mod mapping;
pub mod output;
pub mod pg;
pub mod provenance;
pub mod rt;
pub mod segments;
pub mod storage;
pub mod store;
pub mod vace;
pub mod webhooks;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use kino_engine::device::DeviceChoice;

pub use error::{ApiError, ServerError};
pub use mapping::ModelInfo;
pub use worker::ModelSpec;

use storage::Outputs;
use store::{JobStore, Store};
use worker::Shared;

/// What a node does (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Takes API requests and runs jobs (one machine, or one of many).
    #[default]
    All,
    /// Takes API requests and serves outputs; runs no jobs (needs --database).
    Api,
    /// Runs jobs; answers only /health and /metrics (needs --database).
    Worker,
}

/// How long a lease lasts by default (a dead worker's job runs again within this).
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Default request body limit (room for a video upload, or an image as a base64 data URL).
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 96 * 1024 * 1024;
/// Default limit of one image input.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default limit of one source video.
pub const DEFAULT_MAX_VIDEO_BYTES: usize = 64 * 1024 * 1024;

/// Everything `kino serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:8000` (port 0: any free port).
    pub listen: String,
    pub data_dir: PathBuf,
    pub models: Vec<ModelSpec>,
    /// One worker per device.
    pub devices: Vec<DeviceChoice>,
    /// The `openai-poll-after-ms` header value.
    pub poll_after_ms: u64,
    pub max_seconds: f64,
    pub max_steps: usize,
    pub max_prompt_chars: usize,
    /// Queued videos beyond this get 429.
    pub max_queue: usize,
    /// Request bodies beyond this get 413.
    pub max_upload_bytes: usize,
    /// An image input (`input_reference`, `last_image`; upload or data URL) beyond this gets
    /// 413.
    pub max_image_bytes: usize,
    /// A source video upload (`POST /v1/videos/edits`) beyond this gets 413.
    pub max_video_bytes: usize,
    /// With keys, every endpoint but `/health` needs `Authorization: Bearer KEY`.
    pub api_keys: Vec<String>,
    /// Where to send `video.completed` / `video.failed` (see [`webhooks`]).
    pub webhook: Option<webhooks::WebhookConfig>,
    /// C2PA signing, the watermark and the prompt policy (see [`provenance`]).
    pub provenance: kino_provenance::Settings,
    /// The LoRA adapters requests may name: the `*.safetensors` files here (see [`adapters`]).
    pub lora_dir: Option<PathBuf>,
    /// MagCache calibration for `"cache": "mag:…"` requests that send no `mag_ratios`.
    pub mag_ratios: Option<Vec<f32>>,
    /// A Postgres URL: jobs live there (shared by several nodes) instead of in SQLite.
    pub database: Option<String>,
    /// `s3://BUCKET/PREFIX`: outputs go there instead of `DATA_DIR/videos`.
    pub storage: Option<String>,
    pub role: Role,
    /// How long a worker's lease on a job lasts without a heartbeat (Postgres).
    pub lease: std::time::Duration,
    /// Answer content downloads with a redirect to a presigned URL valid this long (S3).
    pub presign: Option<std::time::Duration>,
}

impl ServerConfig {
    /// Defaults for serving `models` from `data_dir` on `listen`.
    pub fn new(
        listen: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        models: Vec<ModelSpec>,
    ) -> Self {
        ServerConfig {
            listen: listen.into(),
            data_dir: data_dir.into(),
            models,
            devices: vec![DeviceChoice::Auto],
            poll_after_ms: 1000,
            max_seconds: 20.0,
            max_steps: 200,
            max_prompt_chars: 4000,
            max_queue: 1000,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            max_video_bytes: DEFAULT_MAX_VIDEO_BYTES,
            api_keys: Vec::new(),
            webhook: None,
            provenance: kino_provenance::Settings::default(),
            lora_dir: None,
            mag_ratios: None,
            database: None,
            storage: None,
            role: Role::All,
            lease: DEFAULT_LEASE,
            presign: None,
        }
    }
}

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub outputs: Arc<Outputs>,
    pub shared: Arc<Shared>,
    pub models: Arc<Vec<ModelInfo>>,
    pub config: Arc<ServerConfig>,
}

/// The current time in unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A new id: `video_` and 32 hex digits.
pub fn new_video_id() -> String {
    format!("video_{:032x}", rand::random::<u128>())
}

/// Ids are `video_` + 1 to 64 hex digits, so they can never name a path outside the data
/// directory.
pub fn valid_video_id(id: &str) -> bool {
    id.strip_prefix("video_")
        .is_some_and(|h| (1..=64).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where a video's files are.
pub fn video_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("videos").join(id)
}

async fn poll_header(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&state.config.poll_after_ms.to_string()) {
        res.headers_mut().insert("openai-poll-after-ms", v);
    }
    res
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_upload_bytes;
    if state.config.role == Role::Worker {
        return Router::new()
            .route("/health", get(api::health))
            .route("/metrics", get(api::metrics))
            .fallback(api::fallback)
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::check,
            ))
            .with_state(state);
    }
    Router::new()
        .route("/", get(api::studio))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::list_models))
        .route("/v1/videos", post(api::create_video).get(api::list_videos))
        .route("/v1/videos/edits", post(api::edit_video))
        .route("/v1/videos/characters", post(characters::create_character))
        .route("/v1/videos/characters/{id}", get(characters::get_character))
        .route(
            "/v1/videos/characters/{id}/content",
            get(characters::character_content),
        )
        .route("/v1/videos/extensions", post(api::extend_video))
        .route(
            "/v1/videos/{id}",
            get(api::get_video).delete(api::delete_video),
        )
        .route("/v1/videos/{id}/content", get(api::video_content))
        .route("/v1/videos/{id}/remix", post(api::remix_video))
        .route("/v1/videos/{id}/cancel", post(api::cancel_video))
        .route("/v1/videos/{id}/events", get(events::video_events))
        .route(
            "/v1/content_provenance_checks",
            post(provenance::create_check),
        )
        .fallback(api::fallback)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            poll_header,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A server that has opened its store and models and bound its socket.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    workers: Vec<std::thread::JoinHandle<()>>,
    webhook_rx: Option<tokio::sync::mpsc::UnboundedReceiver<webhooks::Event>>,
}

impl Server {
    /// Opens the data directory and the store (re-queueing interrupted jobs), starts one worker
    /// per device (each opens the models) and binds the socket. Call inside a tokio runtime.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        if config.models.is_empty() {
            return Err(ServerError::NoModel);
        }
        if config.role != Role::All && config.database.is_none() {
            return Err(ServerError::Role(
                "api and worker nodes share their jobs through Postgres: add --database \
                 postgres://USER:PASSWORD@HOST/DB (and --storage s3://BUCKET/PREFIX for the \
                 outputs), or leave --role out to run everything in this process"
                    .into(),
            ));
        }
        for (i, m) in config.models.iter().enumerate() {
            if config.models[..i].iter().any(|o| o.id == m.id) {
                return Err(ServerError::DuplicateModel(m.id.clone()));
            }
        }
        let videos = config.data_dir.join("videos");
        std::fs::create_dir_all(&videos).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        provenance::open(&config)?;
        if let Some(dir) = &config.lora_dir {
            if !dir.is_dir() {
                return Err(ServerError::LoraDir {
                    path: dir.clone(),
                    why: "not a directory; give the folder holding the *.safetensors adapters clients may name".into(),
                });
            }
        }
        // The shared backends first: a wrong URL or credential is one error at start-up.
        let (store, pg): (Arc<dyn JobStore>, Option<Arc<pg::PgStore>>) = match &config.database {
            None => (
                Arc::new(Store::open(&config.data_dir.join("kino.sqlite3"))?),
                None,
            ),
            Some(url) => {
                let pg = Arc::new(pg::PgStore::connect(url, config.lease)?);
                (pg.clone(), Some(pg))
            }
        };
        let outputs = Arc::new(match &config.storage {
            None => Outputs::local(&config.data_dir)?,
            Some(url) => Outputs::s3(url)?,
        });
        let requeued = store.requeue_interrupted()?;
        if requeued > 0 {
            tracing::info!("{requeued} interrupted video(s) queued again");
        }
        // Inputs stored for a request that died before its row was written.
        for id in inputs::stored_ids(&config.data_dir) {
            if store.get(&id)?.is_none() {
                inputs::remove_inputs(&config.data_dir, &id);
            }
        }
        characters::remove_orphans(&config.data_dir, &store.character_ids()?);
        if let Some(w) = &config.webhook {
            webhooks::parse_url(&w.url).map_err(ServerError::Webhook)?;
            webhooks::secret_key(&w.secret).map_err(ServerError::Webhook)?;
        }
        let shared = Arc::new(Shared::default());
        if let Some(pg) = &pg {
            let sh = shared.clone();
            pg.listen(Arc::new(move |payload: &str| sh.on_remote_event(payload)));
        }
        let webhook_rx = config.webhook.as_ref().map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            shared.set_events(tx);
            rx
        });
        let mut workers = Vec::new();
        let mut models = None;
        let devices = if config.role == Role::Api {
            // An API node runs nothing: it reads the models' settings to check requests.
            models = Some(worker::model_infos(&config.models)?);
            Vec::new()
        } else if config.devices.is_empty() {
            vec![DeviceChoice::Auto]
        } else {
            config.devices.clone()
        };
        for d in devices {
            let started = worker::spawn(
                d,
                config.models.clone(),
                store.clone(),
                outputs.clone(),
                shared.clone(),
                config.data_dir.clone(),
            );
            match started {
                Ok((h, infos)) => {
                    workers.push(h);
                    models.get_or_insert(infos);
                }
                Err(e) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    shared.notify();
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(e);
                }
            }
        }
        let listener = match tokio::net::TcpListener::bind(&config.listen).await {
            Ok(l) => l,
            Err(source) => {
                shared.stop.store(true, Ordering::SeqCst);
                shared.notify();
                return Err(ServerError::Bind {
                    addr: config.listen.clone(),
                    source,
                });
            }
        };
        let state = AppState {
            store,
            outputs,
            shared,
            models: Arc::new(models.unwrap_or_default()),
            config: Arc::new(config),
        };
        Ok(Server {
            listener,
            state,
            workers,
            webhook_rx,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// The models served.
    pub fn models(&self) -> &[ModelInfo] {
        &self.state.models
    }

    /// Serves until `shutdown` resolves, then stops the workers. A job that was running is left
    /// `in_progress` and runs again when a server next opens this data directory.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Server {
            listener,
            state,
            workers,
            webhook_rx,
        } = self;
        if let (Some(rx), Some(cfg)) = (webhook_rx, state.config.webhook.clone()) {
            tokio::spawn(webhooks::dispatch(cfg, rx));
        }
        let shared = state.shared.clone();
        let app = router(state);
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        shared.stop.store(true, Ordering::SeqCst);
        shared.notify();
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        Ok(result?)
    }
}

/// A server running on its own thread and runtime (for tests and embedding). Dropping it
/// stops the server, abandoning any running job as a crash would.
pub struct ServerHandle {
    addr: SocketAddr,
    models: Vec<ModelInfo>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
}

impl ServerHandle {
    /// Starts a server and returns once it accepts connections.
    pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kino-server".into())
            .spawn(move || -> Result<(), ServerError> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let server = match Server::bind(config).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let info = server.local_addr().map(|a| (a, server.models().to_vec()));
                    let _ = ready_tx.send(info);
                    server
                        .run(async move {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })?;
        match ready_rx.recv() {
            Ok(Ok((addr, models))) => Ok(ServerHandle {
                addr,
                models,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(ServerError::WorkerGone),
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ServerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServerError::WorkerGone),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
