//! The worker: one `std::thread` per device that opens every configured model once and runs
//! jobs from the store in arrival order. The engine is synchronous, so it never runs on the
//! async runtime.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kino_engine::device::DeviceChoice;
use kino_engine::long_video::{self, LongRequest, Resume, Start};
use kino_engine::progress::{ProgressEvent, Stage};
use kino_engine::wan::pipeline::{
    Conditioning, PipelineOptions, ResolvedRequest, RgbImage, WanPipeline,
};
use kino_media::{ImageFormat, Mp4Options, SpritesheetOptions, ThumbnailOptions, Video};

use crate::error::ServerError;
use crate::mapping::ModelInfo;
use crate::storage::Outputs;
use crate::store::{Job, JobStore, Lease, LeaseState};
use crate::{now_unix, video_dir};

/// A model to serve: the name clients use and its folder.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: String,
    pub path: PathBuf,
}

/// Live state of a running job (for progress events and metrics).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Live {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
    pub progress: u8,
    /// The segment running (1-based) and how many there are (1 of 1 for a one-clip video).
    pub segment: usize,
    pub segments: usize,
    /// Estimated seconds left for the whole job (from the progress so far in this run), once
    /// there is some progress to go by.
    pub remaining_secs: Option<u64>,
}

/// State shared between the HTTP side and the workers.
#[derive(Default)]
pub struct Shared {
    wake: Condvar,
    wake_lock: Mutex<u64>,
    /// Set when the server stops: workers abandon their job (left `in_progress`, so a new
    /// server runs it again) and exit.
    pub stop: AtomicBool,
    /// Ids whose run should stop (cancel or delete).
    cancel: Mutex<HashSet<String>>,
    /// Running jobs' stage and step.
    live: Mutex<HashMap<String, Live>>,
    /// Total denoising steps run and their total time in microseconds (for /metrics).
    pub denoise_steps: AtomicU64,
    pub denoise_micros: AtomicU64,
    pub jobs_run: AtomicU64,
    /// Webhook events go here when webhooks are on.
    events: Mutex<Option<tokio::sync::mpsc::UnboundedSender<crate::webhooks::Event>>>,
    /// Jobs running on this node.
    running: Mutex<HashSet<String>>,
    /// Woken when another node reports a change (Postgres NOTIFY), so event streams answer at
    /// once instead of at their next poll.
    pub changed: tokio::sync::Notify,
    /// Jobs this node took over from a worker whose lease ran out.
    pub lease_expiries: AtomicU64,
    /// Jobs this node lost to another worker (its lease ran out while it ran them).
    pub leases_lost: AtomicU64,
    /// How long the jobs this node finished took.
    pub durations: Mutex<Histogram>,
}

/// A Prometheus histogram of job durations in seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// Count per bound (not cumulative), plus one for `+Inf`.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
        let n = bounds.len() + 1;
        Histogram {
            bounds,
            counts: vec![0; n],
            sum: 0.0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += secs;
    }
}

impl Shared {
    /// Wakes the workers (a job was queued, or the server stops).
    pub fn notify(&self) {
        if let Ok(mut g) = self.wake_lock.lock() {
            *g = g.wrapping_add(1);
        }
        self.wake.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        if let Ok(g) = self.wake_lock.lock() {
            let seen = *g;
            let _ = self.wake.wait_timeout_while(g, timeout, |g| {
                *g == seen && !self.stop.load(Ordering::SeqCst)
            });
        }
    }

    /// Turns on webhook events.
    pub fn set_events(&self, tx: tokio::sync::mpsc::UnboundedSender<crate::webhooks::Event>) {
        if let Ok(mut e) = self.events.lock() {
            *e = Some(tx);
        }
    }

    /// Queues a webhook (`video.completed` / `video.failed`) if webhooks are on.
    pub fn emit(&self, kind: &'static str, video_id: &str) {
        if let Ok(e) = self.events.lock() {
            if let Some(tx) = e.as_ref() {
                let _ = tx.send(crate::webhooks::Event {
                    kind,
                    video_id: video_id.to_string(),
                });
            }
        }
    }

    /// Asks the run of `id` (if any) to stop at its next step.
    pub fn request_cancel(&self, id: &str) {
        if let Ok(mut c) = self.cancel.lock() {
            c.insert(id.to_string());
        }
    }

    fn take_cancel(&self, id: &str) -> bool {
        self.cancel
            .lock()
            .map(|mut c| c.remove(id))
            .unwrap_or(false)
    }

    fn is_cancelled(&self, id: &str) -> bool {
        self.stop.load(Ordering::SeqCst)
            || self.cancel.lock().map(|c| c.contains(id)).unwrap_or(false)
    }

    /// An event from another node (`cancel:ID`, `progress:ID`, `done:ID`, `queued`).
    pub fn on_remote_event(&self, payload: &str) {
        if let Some(id) = payload.strip_prefix("cancel:") {
            let here = self.running.lock().map(|r| r.contains(id)).unwrap_or(false);
            if here {
                self.request_cancel(id);
            }
        }
        if payload == "queued" {
            self.notify();
        }
        self.changed.notify_waiters();
    }

    fn set_running(&self, id: &str, on: bool) {
        if let Ok(mut r) = self.running.lock() {
            if on {
                r.insert(id.to_string());
            } else {
                r.remove(id);
            }
        }
    }

    /// The live state of a running job.
    pub fn live(&self, id: &str) -> Option<Live> {
        self.live.lock().ok().and_then(|l| l.get(id).copied())
    }

    fn set_live(&self, id: &str, live: Option<Live>) {
        if let Ok(mut l) = self.live.lock() {
            match live {
                Some(v) => {
                    l.insert(id.to_string(), v);
                }
                None => {
                    l.remove(id);
                }
            }
        }
    }
}

/// Overall progress (0–99) for an event: each stage owns a slice of the bar.
pub fn progress_percent(e: &ProgressEvent) -> u8 {
    let (lo, hi) = match e.stage {
        Stage::LoadTextEncoder => (0.0, 3.0),
        Stage::EncodePrompt => (3.0, 6.0),
        Stage::EncodeImage => (6.0, 8.0),
        Stage::LoadTransformer => (8.0, 12.0),
        Stage::Denoise => (12.0, 85.0),
        Stage::LoadVae => (85.0, 87.0),
        Stage::DecodeVae => (87.0, 97.0),
    };
    let frac = if e.total == 0 {
        1.0
    } else {
        (e.step as f64 / e.total as f64).clamp(0.0, 1.0)
    };
    (lo + (hi - lo) * frac).floor() as u8
}

/// Starts one worker thread for `device`; returns once it has opened the models (or failed
/// to).
pub fn spawn(
    device: DeviceChoice,
    models: Vec<ModelSpec>,
    store: Arc<dyn JobStore>,
    outputs: Arc<Outputs>,
    shared: Arc<Shared>,
    data_dir: PathBuf,
) -> Result<(std::thread::JoinHandle<()>, Vec<ModelInfo>), ServerError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("kino-worker-{device:?}"))
        .spawn(move || {
            let (pipelines, base) = match open_models(device, &models) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let infos = pipelines.iter().map(|(info, _)| info.clone()).collect();
            if tx.send(Ok(infos)).is_err() {
                return;
            }
            let keys = vec![options_key(&[], None); pipelines.len()];
            let mut w = Worker {
                name: worker_name(device),
                pipelines,
                keys,
                base,
                store,
                outputs,
                shared,
                data_dir,
            };
            w.run();
        })?;
    match rx.recv() {
        Ok(Ok(infos)) => Ok((handle, infos)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err(ServerError::WorkerGone),
    }
}

/// A name for this worker that no other worker has: host, process, device and a random tag.
fn worker_name(device: DeviceChoice) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kino".into());
    let dev = match device {
        DeviceChoice::Auto => "auto".to_string(),
        DeviceChoice::Cpu => "cpu".to_string(),
        DeviceChoice::Metal => "metal".to_string(),
        DeviceChoice::Cuda(i) => format!("cuda{i}"),
    };
    format!(
        "{host}-{}-{dev}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Keeps a shared store's lease alive while a job runs (a heartbeat every third of the lease)
/// and turns a cancel request or a lost lease into a stop request for the run.
struct LeaseKeeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    fn start(
        store: Arc<dyn JobStore>,
        shared: Arc<Shared>,
        id: String,
        lease: Lease,
        every: Duration,
        models: Vec<String>,
    ) -> LeaseKeeper {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kino-lease".into())
            .spawn(move || loop {
                match rx.recv_timeout(every) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                match store.heartbeat(&id, &lease) {
                    Ok(LeaseState::Held { cancel: false }) => {}
                    Ok(LeaseState::Held { cancel: true }) => shared.request_cancel(&id),
                    Ok(LeaseState::Lost) => {
                        tracing::warn!(
                            id,
                            "lease lost (taken over, cancelled or deleted); stopping"
                        );
                        shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                        shared.request_cancel(&id);
                        return;
                    }
                    Err(e) => tracing::warn!(id, "heartbeat failed: {e}; retrying"),
                }
                // The worker stays listed as alive while it runs a long job.
                if let Err(e) = store.register_worker(&lease.worker, &models) {
                    tracing::warn!("worker: cannot register: {e}");
                }
            })
            .ok();
        LeaseKeeper {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The options a pipeline was opened with beyond the device's defaults (adapters, cache), as a
/// comparable key.
fn options_key(
    lora: &[crate::adapters::JobLora],
    cache: Option<&crate::adapters::JobCache>,
) -> String {
    let lora: Vec<_> = lora.iter().map(|l| (&l.path, l.scale)).collect();
    let cache = cache.map(|c| (&c.spec, &c.mag_ratios));
    serde_json::to_string(&(lora, cache)).unwrap_or_default()
}

/// Whether a folder is a two-expert one (`transformer_2` in its model_index.json).
fn has_transformer_2(root: &Path) -> bool {
    std::fs::read_to_string(root.join("model_index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("transformer_2").cloned())
        .is_some_and(|t| match t {
            serde_json::Value::Array(a) => a.first().is_some_and(|x| !x.is_null()),
            serde_json::Value::Null => false,
            _ => true,
        })
}

type Opened = (Vec<(ModelInfo, WanPipeline)>, PipelineOptions);

/// The models' settings without running anything (an API node checks requests against them;
/// opening a pipeline reads its configuration, the weights load when a job runs).
pub fn model_infos(models: &[ModelSpec]) -> Result<Vec<ModelInfo>, ServerError> {
    Ok(open_models(DeviceChoice::Cpu, models)?
        .0
        .into_iter()
        .map(|(info, _)| info)
        .collect())
}

fn open_models(device: DeviceChoice, models: &[ModelSpec]) -> Result<Opened, ServerError> {
    let dev = kino_engine::device::open(device).map_err(ServerError::Device)?;
    let base = PipelineOptions::for_device(dev.clone());
    let opened = models
        .iter()
        .map(|m| {
            let p = WanPipeline::open(&m.path, PipelineOptions::for_device(dev.clone())).map_err(
                |source| ServerError::Model {
                    name: m.id.clone(),
                    source,
                },
            )?;
            let info = ModelInfo {
                id: m.id.clone(),
                path: m.path.clone(),
                defaults: p.defaults().clone(),
                size_multiple: p.size_multiple(),
                frame_step: p.frame_step(),
                capabilities: p.capabilities(),
                num_layers: p.transformer_config().num_layers,
                two_experts: has_transformer_2(&m.path),
            };
            Ok((info, p))
        })
        .collect::<Result<Vec<_>, ServerError>>()?;
    Ok((opened, base))
}

/// Turns engine progress events into the job's live state and stored progress, and answers
/// cancellation. `segment` is `(k, n)` (0-based k) for a video made in segments.
struct ProgressSink<'a> {
    shared: &'a Shared,
    store: &'a dyn JobStore,
    lease: &'a Lease,
    id: &'a str,
    /// When the live state was last recorded in the store (for other nodes).
    live_sent: Option<Instant>,
    last_pct: u8,
    segment: (usize, usize),
    /// When this run began and the progress it began at (a resumed job starts past 0).
    started: Instant,
    start_pct: u8,
}

/// Seconds left when `pct` of 100 is done, `start_pct` of it before `elapsed` began.
fn remaining_secs(elapsed: Duration, start_pct: u8, pct: u8) -> Option<u64> {
    let done = f64::from(pct.saturating_sub(start_pct));
    if done < 1.0 {
        return None;
    }
    let left = f64::from(100u8.saturating_sub(pct));
    Some((elapsed.as_secs_f64() * left / done).ceil() as u64)
}

impl ProgressSink<'_> {
    fn on(&mut self, e: &ProgressEvent) -> kino_engine::Result<()> {
        let (k, n) = self.segment;
        let pct = if n > 1 || k > 0 {
            crate::segments::overall_percent(k, n, progress_percent(e))
        } else {
            progress_percent(e)
        };
        let live = Live {
            stage: e.stage,
            step: e.step,
            total: e.total,
            progress: pct.max(self.last_pct),
            segment: k + 1,
            segments: n.max(1),
            remaining_secs: remaining_secs(
                self.started.elapsed(),
                self.start_pct,
                pct.max(self.last_pct),
            ),
        };
        self.shared.set_live(self.id, Some(live));
        if self.store.lease_duration().is_some()
            && self
                .live_sent
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
        {
            self.live_sent = Some(Instant::now());
            if let Ok(v) = serde_json::to_value(live) {
                if let Err(err) = self.store.set_live(self.id, self.lease, &v) {
                    tracing::warn!(id = self.id, "cannot store live progress: {err}");
                }
            }
        }
        if e.stage == Stage::Denoise && e.step == e.total && e.total > 0 {
            self.shared
                .denoise_steps
                .fetch_add(e.total as u64, Ordering::Relaxed);
            self.shared
                .denoise_micros
                .fetch_add(e.elapsed.as_micros() as u64, Ordering::Relaxed);
        }
        if pct > self.last_pct {
            self.last_pct = pct;
            if let Err(err) = self.store.set_progress(self.id, self.lease, pct) {
                tracing::warn!(id = self.id, "cannot store progress: {err}");
            }
        }
        if self.shared.is_cancelled(self.id) {
            return Err(kino_engine::Error::Cancelled);
        }
        Ok(())
    }
}

/// An engine error as a job outcome.
fn engine_outcome(shared: &Shared, e: kino_engine::Error) -> Outcome {
    if let kino_engine::Error::Cancelled = e {
        return if shared.stop.load(Ordering::SeqCst) {
            Outcome::Stopped
        } else {
            Outcome::Cancelled
        };
    }
    let code = match e {
        kino_engine::Error::InvalidRequest(_) => "invalid_request",
        kino_engine::Error::OutOfMemory(_) => "out_of_memory",
        _ => "generation_failed",
    };
    Outcome::Failed(code.into(), e.to_string())
}

struct Worker {
    /// This worker's name in leases.
    name: String,
    /// One open pipeline per model, and the adapters / cache it was opened with
    /// ([`options_key`]): a job with other ones reopens it (at most one per model).
    pipelines: Vec<(ModelInfo, WanPipeline)>,
    keys: Vec<String>,
    /// The device's default options.
    base: PipelineOptions,
    store: Arc<dyn JobStore>,
    outputs: Arc<Outputs>,
    shared: Arc<Shared>,
    data_dir: PathBuf,
}

enum Outcome {
    Done,
    Cancelled,
    Stopped,
    Failed(String, String),
}

impl Worker {
    /// The model ids this worker holds (a shared store leases it only their jobs).
    fn model_ids(&self) -> Vec<String> {
        self.pipelines.iter().map(|(i, _)| i.id.clone()).collect()
    }

    /// With a shared store, outputs go under the lease attempt's own keys.
    fn output_attempt(&self, lease: &Lease) -> Option<i64> {
        self.store.lease_duration().map(|_| lease.attempt)
    }

    fn run(&mut self) {
        let models = self.model_ids();
        let beat = self.store.lease_duration().map(|d| d / 3);
        let mut registered: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::SeqCst) {
            if let Some(every) = beat {
                if registered.is_none_or(|t| t.elapsed() >= every) {
                    match self.store.register_worker(&self.name, &models) {
                        Ok(()) => registered = Some(Instant::now()),
                        Err(e) => tracing::warn!("worker: cannot register: {e}"),
                    }
                }
            }
            let (job, lease, took_over) = match self.store.claim_next(&self.name, &models) {
                Ok(Some(j)) => j,
                Ok(None) => {
                    self.shared.wait(Duration::from_millis(500));
                    continue;
                }
                Err(e) => {
                    tracing::error!("worker: cannot read the queue: {e}");
                    self.shared.wait(Duration::from_secs(1));
                    continue;
                }
            };
            let id = job.id.clone();
            if took_over {
                self.shared.lease_expiries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    id,
                    attempt = lease.attempt,
                    "taking over a job whose worker stopped answering (its lease ran out)"
                );
            }
            tracing::info!(id, prompt = %job.prompt, worker = self.name, "job started");
            self.shared.set_running(&id, true);
            let keeper = beat.map(|every| {
                LeaseKeeper::start(
                    self.store.clone(),
                    self.shared.clone(),
                    id.clone(),
                    lease.clone(),
                    every,
                    models.clone(),
                )
            });
            let started = Instant::now();
            // A panic in the engine fails this job instead of killing the worker.
            let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_job(&job, &lease)
            })) {
                Ok(o) => o,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    remove_outputs(&self.data_dir, &id);
                    Outcome::Failed(
                        "internal_error".into(),
                        format!("the generation crashed: {msg}"),
                    )
                }
            };
            drop(keeper);
            self.shared.set_running(&id, false);
            self.shared.set_live(&id, None);
            let was_cancelled = self.shared.take_cancel(&id);
            let now = now_unix();
            let event = if matches!(outcome, Outcome::Done) {
                "video.completed"
            } else {
                "video.failed"
            };
            let done = matches!(outcome, Outcome::Done);
            let stored = match outcome {
                Outcome::Done => self.store.complete(&id, &lease, now),
                Outcome::Stopped => {
                    if let Err(e) = self.store.release(&id, &lease) {
                        tracing::warn!(id, "cannot give the job back: {e}");
                    }
                    tracing::info!(id, "server stopping; the job runs again (here on restart, or on another worker)");
                    return;
                }
                Outcome::Cancelled => self.store.fail_leased(
                    &id,
                    &lease,
                    "cancelled",
                    "the video was cancelled before it finished",
                    now,
                ),
                Outcome::Failed(code, msg) => {
                    tracing::warn!(id, "job failed: {msg}");
                    self.store.fail_leased(&id, &lease, &code, &msg, now)
                }
            };
            self.shared.jobs_run.fetch_add(1, Ordering::Relaxed);
            let attempt = self.output_attempt(&lease);
            if attempt.is_some() {
                // This machine's copy of the inputs (the bucket keeps them).
                crate::inputs::remove_inputs(&self.data_dir, &id);
            }
            match stored {
                Ok(true) => {
                    let secs = started.elapsed().as_secs_f64();
                    tracing::info!(id, secs, cancelled = was_cancelled, "job finished");
                    if let Ok(mut h) = self.shared.durations.lock() {
                        h.observe(secs);
                    }
                    self.shared.emit(event, &id);
                    // What earlier attempts (killed or overtaken workers) left behind.
                    if done && attempt.is_some() {
                        if let Err(e) = crate::rt::block_on(self.outputs.remove_video(&id, attempt))
                        {
                            tracing::warn!(id, "cannot remove earlier attempts' files: {e}");
                        }
                    }
                }
                // The row is gone (the video was deleted while it ran), or, with a shared
                // store, another worker holds the job now: this attempt's files are not the
                // video's.
                Ok(false) => {
                    if let Some(a) = attempt {
                        if let Err(e) = crate::rt::block_on(self.outputs.remove_attempt(&id, a)) {
                            tracing::warn!(id, "cannot remove this attempt's files: {e}");
                        }
                        if matches!(self.store.get(&id), Ok(None)) {
                            let _ = crate::rt::block_on(self.outputs.remove_video(&id, None));
                            crate::inputs::remove_inputs(&self.data_dir, &id);
                        }
                    } else {
                        remove_outputs(&self.data_dir, &id);
                        crate::inputs::remove_inputs(&self.data_dir, &id);
                    }
                }
                Err(e) => tracing::error!(id, "cannot record the job's end: {e}"),
            }
        }
        if beat.is_some() {
            if let Err(e) = self.store.unregister_worker(&self.name) {
                tracing::warn!("worker: cannot unregister: {e}");
            }
        }
    }

    /// Reopens pipeline `i` with the job's adapters and step cache when they differ from the
    /// ones it has.
    fn prepare(&mut self, i: usize, job: &Job) -> Result<(), Outcome> {
        let key = options_key(&job.params.lora, job.params.cache.as_ref());
        if self.keys[i] == key {
            return Ok(());
        }
        let mut opts = self.base.clone();
        opts.lora = job
            .params
            .lora
            .iter()
            .map(|l| kino_engine::lora::LoraSpec {
                path: l.path.clone(),
                scale: l.scale,
            })
            .collect();
        if let Some(c) = &job.params.cache {
            match c.config() {
                Ok(cfg) => opts.cache = Some(cfg),
                Err(e) => {
                    return Err(Outcome::Failed(
                        "invalid_request".into(),
                        format!("cache `{}`: {e}", c.spec),
                    ))
                }
            }
        }
        let path = self.pipelines[i].0.path.clone();
        match WanPipeline::open(&path, opts) {
            Ok(p) => {
                tracing::info!(
                    model = self.pipelines[i].0.id,
                    adapters = job.params.lora.len(),
                    cache = job.params.cache.as_ref().map(|c| c.spec.as_str()),
                    "model reopened with the job's adapters / step cache"
                );
                self.pipelines[i].1 = p;
                self.keys[i] = key;
                Ok(())
            }
            Err(e) => Err(Outcome::Failed(
                "invalid_request".into(),
                format!("cannot use the job's adapters or step cache: {e}"),
            )),
        }
    }

    /// With a shared store, the job's input files were stored in the bucket by the API node
    /// that took the request: fetch the ones this machine lacks.
    fn fetch_inputs(&self, job: &Job) -> Result<(), String> {
        let Some(inputs) = &job.params.inputs else {
            return Ok(());
        };
        if self.store.lease_duration().is_none() {
            return Ok(());
        }
        let dir = crate::inputs::inputs_dir(&self.data_dir, &job.id);
        for stored in inputs.all_files() {
            if dir.join(&stored.file).is_file() {
                continue;
            }
            let key = self.outputs.input_key(&job.id, &stored.file);
            let bytes = crate::rt::block_on(self.outputs.read(&key))?;
            crate::inputs::write_input(&self.data_dir, &job.id, &stored.file, &bytes)
                .map_err(|e| format!("cannot keep the input {}: {e}", stored.file))?;
        }
        Ok(())
    }

    fn run_job(&mut self, job: &Job, lease: &Lease) -> Outcome {
        let Some(i) = self
            .pipelines
            .iter()
            .position(|(i, _)| i.id == job.params.model_id)
        else {
            return Outcome::Failed(
                "model_not_found".into(),
                format!(
                    "model `{}` is no longer served by this server; start it with --model {}",
                    job.params.model_id, job.params.model_id
                ),
            );
        };
        if let Err(o) = self.prepare(i, job) {
            return o;
        }
        if let Err(msg) = self.fetch_inputs(job) {
            return Outcome::Failed("invalid_input".into(), msg);
        }
        let (info, pipeline) = &mut self.pipelines[i];
        if let Some(long) = &job.params.long {
            let shared = self.shared.clone();
            let store = self.store.clone();
            let target = OutputTarget {
                outputs: &self.outputs,
                attempt: self.store.lease_duration().map(|_| lease.attempt),
            };
            let outcome = run_long(
                &self.data_dir,
                &shared,
                &*store,
                lease,
                &target,
                info,
                pipeline,
                job,
                long,
            );
            if !matches!(outcome, Outcome::Stopped) {
                crate::segments::remove_segments(&self.data_dir, &job.id);
            }
            if let Outcome::Failed(..) = outcome {
                remove_outputs(&self.data_dir, &job.id);
            }
            return outcome;
        }
        let id = job.id.as_str();
        let mut sink = ProgressSink {
            shared: &self.shared,
            store: &*self.store,
            lease,
            live_sent: None,
            id,
            last_pct: 0,
            segment: (0, 1),
            started: Instant::now(),
            start_pct: 0,
        };
        let mut progress = |e: &ProgressEvent| sink.on(e);
        let mut request = job.params.request.clone();
        let vace = job.params.inputs.as_ref().is_some_and(|i| i.vace);
        let conditioning = if vace {
            crate::vace::conditioning(&self.data_dir, job, pipeline)
        } else {
            crate::inputs::conditioning(&self.data_dir, job)
        };
        match conditioning {
            Ok(c) => request.conditioning = c,
            Err(msg) => return Outcome::Failed("invalid_input".into(), msg),
        }
        let out = match pipeline.generate(&request, &mut progress) {
            Ok(o) => o,
            Err(e) => return engine_outcome(&self.shared, e),
        };
        let _ = self.store.set_progress(id, lease, 97);
        // Record what the step cache skipped (video object and metadata).
        let mut job = job.clone();
        if let (Some(c), Some(st)) = (job.params.cache.as_mut(), out.cache_stats) {
            c.forwards = Some(st.forwards);
            c.skipped = Some(st.skipped);
            tracing::info!(id, "{}", st.message());
            if let Err(e) = self.store.set_params(id, lease, &job.params) {
                tracing::warn!(id, "cannot record the cache's counts: {e}");
            }
        }
        let target = OutputTarget {
            outputs: &self.outputs,
            attempt: self.store.lease_duration().map(|_| lease.attempt),
        };
        let written =
            crate::output::frames_to_video(out.frames, out.width, out.height, job.params.fps)
                .map_err(|e| e.to_string())
                .and_then(|video| {
                    target.write(&self.data_dir, &job, |dir| {
                        write_outputs(dir, info, &job, &video, &out.request, None)
                    })
                });
        match written {
            Ok(()) => Outcome::Done,
            Err(msg) => {
                remove_outputs(&self.data_dir, id);
                Outcome::Failed("output_failed".into(), msg)
            }
        }
    }
}

/// Runs a video made in segments ([`crate::segments`]) through the engine's segment loop
/// ([`long_video::generate`]): skips the segments a previous run finished (continuing from the
/// last one's stored tail), keeps each new one on disk as it finishes, then stitches the
/// source (for an extension) and every segment into one MP4.
#[allow(clippy::too_many_arguments)]
fn run_long(
    data_dir: &Path,
    shared: &Shared,
    store: &dyn JobStore,
    lease: &Lease,
    target: &OutputTarget<'_>,
    info: &ModelInfo,
    pipeline: &mut WanPipeline,
    job: &Job,
    long: &crate::segments::LongJob,
) -> Outcome {
    use crate::segments;
    let id = job.id.as_str();
    let r = &job.params.request;
    let (Some(w), Some(h)) = (r.width, r.height) else {
        return Outcome::Failed("invalid_request".into(), "the job has no size".into());
    };
    let fps = job.params.fps;
    let frame_bytes = w * h * 3;
    let n = long.segments.len();
    let fail = |code: &str, msg: String| Outcome::Failed(code.into(), msg);
    let rgb = |data: Vec<u8>| RgbImage::new(w, h, data).map_err(|e| e.to_string());
    let context = long_video::context_frames(pipeline);
    // What the video starts from: the source's last frames (an extension), or the create's
    // own start (text or input_reference).
    let mut source: Vec<Vec<u8>> = Vec::new();
    let start = if long.extends {
        match read_source(data_dir, job, w, h, fps, long.source_frames) {
            Ok(frames) => source = frames,
            Err(msg) => return fail("invalid_input", msg),
        }
        let from = source.len().saturating_sub(context);
        match source[from..].iter().cloned().map(rgb).collect() {
            Ok(t) => Start::Continue(t),
            Err(msg) => return fail("invalid_input", msg),
        }
    } else {
        match crate::inputs::conditioning(data_dir, job) {
            Ok(Conditioning::Text) => Start::Text,
            Ok(Conditioning::Image { first, last: None }) => Start::Image(first),
            Ok(_) => {
                return fail(
                    "invalid_request",
                    "a video longer than one clip starts from text or one input_reference \
                     image; a last image or a source video ends or restyles one clip"
                        .into(),
                )
            }
            Err(msg) => return fail("invalid_input", msg),
        }
    };
    // The engine plans the segments again from the same settings: the same plan as the API
    // node's (a pure function of the model's settings), checked.
    let mut request = r.clone();
    request.num_frames = None;
    let req = LongRequest {
        prompts: vec![r.prompt.clone()],
        total_frames: Some(long.new_frames()),
        overlap: Some(long.overlap),
        color_match: Some(long.color_match),
        request,
    };
    let plan = match long_video::plan(pipeline, &req, &start) {
        Ok(p) => p,
        Err(e) => return engine_outcome(shared, e),
    };
    let shapes: Vec<_> = plan
        .segments
        .iter()
        .map(|s| (s.num_frames, s.keep, s.blend))
        .collect();
    let stored: Vec<_> = long
        .segments
        .iter()
        .map(|s| (s.num_frames, s.keep, s.blend))
        .collect();
    if shapes != stored {
        return fail(
            "invalid_request",
            format!(
                "the model's settings changed since the job was queued (segments {stored:?} \
                 planned, {shapes:?} now); submit it again"
            ),
        );
    }
    let done = segments::finished(data_dir, id, long, frame_bytes);
    let resume = if done > 0 {
        tracing::info!(
            id,
            finished = done,
            segments = n,
            "resuming at segment {} of {n}; {done} finished segment(s) kept",
            done + 1
        );
        let tail = match segments::read_tail(data_dir, id, done - 1, frame_bytes) {
            Ok(t) => t,
            Err(e) => {
                return fail(
                    "output_failed",
                    format!("cannot read segment {}: {e}", done),
                )
            }
        };
        match tail.into_iter().map(rgb).collect() {
            Ok(tail) => Some(Resume {
                next_segment: done,
                tail,
            }),
            Err(msg) => return fail("output_failed", msg),
        }
    } else {
        None
    };
    let base_seed = plan.base.seed;
    let mut last_request: Option<ResolvedRequest> = None;
    let mut sink = ProgressSink {
        shared,
        store,
        lease,
        live_sent: None,
        id,
        last_pct: segments::overall_percent(done, n, 0),
        segment: (done, n),
        started: Instant::now(),
        start_pct: segments::overall_percent(done, n, 0),
    };
    let _ = store.set_progress(id, lease, sink.last_pct);
    let mut keep_failed: Option<String> = None;
    let result = long_video::generate(
        pipeline,
        &plan,
        &start,
        resume,
        &mut |s| {
            let k = s.segment.index;
            let tail: Vec<&[u8]> = s.tail.iter().map(|t| t.data.as_slice()).collect();
            if let Err(e) = segments::write_segment(data_dir, id, k, &s.frames, &tail) {
                keep_failed = Some(format!("cannot keep segment {}: {e}", k + 1));
                return Err(kino_engine::Error::Cancelled);
            }
            tracing::info!(id, segment = k + 1, segments = n, "segment finished");
            last_request = Some(s.request);
            Ok(())
        },
        &mut |p| {
            sink.segment = (p.segment, p.segments);
            sink.on(p.event)
        },
    );
    if let Some(msg) = keep_failed {
        return fail("output_failed", msg);
    }
    if let Err(e) = result {
        return engine_outcome(shared, e);
    }
    // Stitch: the source, then every segment.
    let _ = store.set_progress(id, lease, 96);
    let mut all = source;
    for k in 0..n {
        match segments::read_segment(data_dir, id, k, frame_bytes) {
            Ok(f) => all.extend(f),
            Err(e) => {
                return fail(
                    "output_failed",
                    format!("cannot read segment {}: {e}", k + 1),
                )
            }
        }
    }
    let mut request = match last_request {
        Some(q) => q,
        None => plan.base.clone(),
    };
    request.num_frames = all.len();
    request.seed = base_seed;
    if long.extends {
        request.conditioning = "continuation".into();
    }
    let segs = serde_json::json!({
        "count": n,
        "frames": long.segments.iter().map(|s| s.keep).collect::<Vec<_>>(),
        "source_frames": long.source_frames,
        "seeds": format!("{base_seed} + segment index"),
        "overlap": long.overlap,
        "color_match": long.color_match,
    });
    let written = crate::output::frames_to_video(all, w, h, fps)
        .map_err(|e| e.to_string())
        .and_then(|video| {
            target.write(data_dir, job, |dir| {
                write_outputs(dir, info, job, &video, &request, Some(segs))
            })
        });
    match written {
        Ok(()) => Outcome::Done,
        Err(msg) => fail("output_failed", msg),
    }
}

/// The stored source video of an extension: `frames` frames at `fps`, fitted to `w × h`.
fn read_source(
    data_dir: &Path,
    job: &Job,
    w: usize,
    h: usize,
    fps: u32,
    frames: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let stored = job
        .params
        .inputs
        .as_ref()
        .and_then(|i| i.video.as_ref())
        .ok_or("the extension has no stored source video")?;
    let path = crate::inputs::inputs_dir(data_dir, &job.id).join(&stored.file);
    let video = kino_media::read_video(&path)
        .map_err(|e| format!("cannot read the source video {}: {e}", path.display()))?;
    Ok(
        crate::inputs::conform(&video, w as u32, h as u32, fps, frames)?
            .into_iter()
            .map(kino_media::Frame::into_data)
            .collect(),
    )
}

/// The files a finished video has.
pub const OUTPUT_FILES: [&str; 3] = ["video.mp4", "thumbnail.jpg", "spritesheet.jpg"];

/// Where a finished video's files go: straight into `DATA_DIR/videos/<id>/` (outputs in the
/// data directory, one process), or a staging folder that is then uploaded under the video's
/// (attempt's) keys ([`crate::storage`]). Either way this happens before the job is completed.
struct OutputTarget<'a> {
    outputs: &'a Outputs,
    attempt: Option<i64>,
}

impl OutputTarget<'_> {
    fn write(
        &self,
        data_dir: &Path,
        job: &Job,
        make: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.outputs.is_local() && self.attempt.is_none() {
            return make(&video_dir(data_dir, &job.id));
        }
        let stage =
            data_dir
                .join("staging")
                .join(format!("{}-a{}", job.id, self.attempt.unwrap_or(0)));
        let made = make(&stage).and_then(|()| {
            crate::rt::block_on(
                self.outputs
                    .publish(&job.id, self.attempt, &stage, &OUTPUT_FILES),
            )
        });
        let _ = std::fs::remove_dir_all(&stage);
        made
    }
}

fn write_outputs(
    dir: &Path,
    info: &ModelInfo,
    job: &Job,
    video: &Video,
    request: &ResolvedRequest,
    segments: Option<serde_json::Value>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let fps = job.params.fps;
    let (width, height) = (video.width(), video.height());
    let mut params = crate::output::generation_params(request, &info.id, fps);
    if let Some(s) = segments {
        params.extra.insert("segments".into(), s);
    }
    params
        .extra
        .insert("video_id".into(), serde_json::json!(job.id));
    params
        .extra
        .insert("requested_model".into(), serde_json::json!(job.model));
    if let Some(inputs) = &job.params.inputs {
        params
            .extra
            .insert("conditioning".into(), inputs.metadata(width, height));
    }
    if let Some(l) = crate::adapters::lora_metadata(&job.params.lora)? {
        params.extra.insert("lora".into(), l);
    }
    if let Some(p) = &job.params.preset {
        params.extra.insert("preset".into(), serde_json::json!(p));
    }
    if let Some(c) = &job.params.cache {
        params
            .extra
            .insert("cache".into(), crate::adapters::cache_value(c, true));
    }
    if let Some(src) = &job.remixed_from_video_id {
        params
            .extra
            .insert("remixed_from_video_id".into(), serde_json::json!(src));
    }
    let opts = Mp4Options {
        metadata: Some(params.to_value()),
        ..Default::default()
    };
    let mp4 = dir.join("video.mp4");
    crate::provenance::write_video(&mp4, video, &opts, &info.path, &job.id)?;
    kino_media::write_thumbnail(
        dir.join("thumbnail.jpg"),
        video,
        &ThumbnailOptions {
            frame: None,
            max_side: None,
            format: ImageFormat::Jpeg { quality: 85 },
        },
    )
    .map_err(|e| e.to_string())?;
    kino_media::write_spritesheet(
        dir.join("spritesheet.jpg"),
        video,
        &SpritesheetOptions {
            format: ImageFormat::Jpeg { quality: 85 },
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    for derived in ["thumbnail.jpg", "spritesheet.jpg"] {
        crate::provenance::sign_derived(&dir.join(derived), &mp4, &job.id)?;
    }
    Ok(())
}

/// Deletes a video's output folder (ignoring one that is not there).
pub fn remove_outputs(data_dir: &Path, id: &str) {
    let dir = video_dir(data_dir, id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
    }
}
