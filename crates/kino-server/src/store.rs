//! The durable job store: one SQLite file, `kino.sqlite3`, in the data directory.
//!
//! One row per video. Jobs run in arrival order (`seq`, an autoincrement). A job that was
//! `in_progress` when the process died is put back to `queued` when the store is opened by a
//! new server ([`Store::requeue_interrupted`]), so nothing queued or running is lost.
//!
//! Characters (`POST /v1/videos/characters`, [`crate::characters`]) live in the same file, one
//! row each in `characters`; their reference image is `DATA_DIR/characters/<id>/image.png`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use kino_engine::wan::pipeline::GenerateRequest;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// OpenAI's four statuses; a cancelled job is `failed` with `error.code = "cancelled"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            _ => return None,
        })
    }

    pub const ALL: [Status; 4] = [
        Status::Queued,
        Status::InProgress,
        Status::Completed,
        Status::Failed,
    ];
}

/// What the worker needs to run a job: the local model and a fully specified request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobParams {
    /// The configured model's id (not the alias the client used).
    pub model_id: String,
    /// Every field filled in (size, frames, steps, guidance, seed, negative prompt).
    pub request: GenerateRequest,
    pub fps: u32,
    /// The images or video the job starts from (files in `DATA_DIR/inputs/<id>/`); absent for
    /// text-to-video and in rows written before inputs existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<crate::inputs::JobInputs>,
    /// A video made in segments (longer than one clip, or an extension); absent for one clip.
    /// Its finished segments are kept under `DATA_DIR/videos/<id>/segments/`
    /// ([`crate::segments`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long: Option<crate::segments::LongJob>,
    /// LoRA adapters from the server's `--lora-dir` ([`crate::adapters`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<crate::adapters::JobLora>,
    /// A step cache (and, once run, its forwards / skipped counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::adapters::JobCache>,
    /// The preset the request named (`"preset": "fast"`), its settings already in `request`
    /// and `lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
}

/// One video job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub seq: i64,
    pub status: Status,
    pub progress: u8,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    /// The model name the client asked for (`sora-2`, or a local id).
    pub model: String,
    /// What is (or will be) produced, `WxH`.
    pub size: String,
    pub seconds: String,
    pub prompt: String,
    pub remixed_from_video_id: Option<String>,
    /// `(code, message)` when failed.
    pub error: Option<(String, String)>,
    pub params: JobParams,
    /// The API key's name that created it (when keys are on).
    pub owner: Option<String>,
    /// The lease attempt whose outputs are this video's (a shared store keeps each attempt's
    /// outputs under its own keys, see [`crate::storage`]); `None` in the SQLite store.
    pub output_attempt: Option<i64>,
}

/// A worker's hold on a running job: who runs it and which attempt this is. Everything a
/// worker records about its job is conditioned on still holding the lease (a shared store),
/// so a worker whose lease expired and was taken over can never complete the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub worker: String,
    pub attempt: i64,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Still ours (lease extended); `cancel` when someone asked to stop the job.
    Held { cancel: bool },
    /// Taken over, finished by someone else, or the row is gone: stop working on it.
    Lost,
}

/// The job store: SQLite ([`Store`], one machine) or Postgres ([`crate::pg::PgStore`], many).
///
/// Methods are synchronous and cheap; the Postgres store waits on its connection pool through
/// [`crate::rt::block_on`].
pub trait JobStore: Send + Sync {
    /// Adds a job; its `seq` is assigned here (arrival order).
    fn insert(&self, job: &Job) -> Result<i64, StoreError>;
    /// The job with this id.
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// One page of jobs (of `owner`, or all when `None`) after the cursor `after`.
    fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<ListResult, StoreError>;
    /// Removes a job's row. Returns whether it existed.
    fn delete(&self, id: &str) -> Result<bool, StoreError>;
    /// Leases the oldest queued job (or one whose lease expired) of one of `models` to
    /// `worker`. The flag says whether it was taken over from an expired lease.
    fn claim_next(
        &self,
        worker: &str,
        models: &[String],
    ) -> Result<Option<(Job, Lease, bool)>, StoreError>;
    /// Extends the lease (a shared store) and reports a cancel request.
    fn heartbeat(&self, id: &str, lease: &Lease) -> Result<LeaseState, StoreError>;
    /// Sets the progress of a running job (never backwards).
    fn set_progress(&self, id: &str, lease: &Lease, progress: u8) -> Result<(), StoreError>;
    /// Records a running job's live state (stage, step) for API nodes on other machines.
    fn set_live(
        &self,
        _id: &str,
        _lease: &Lease,
        _live: &serde_json::Value,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// The live state another node recorded ([`JobStore::set_live`]).
    fn live(&self, _id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        Ok(None)
    }
    /// Replaces a job's parameters (what a run measured, e.g. the step cache's counts).
    fn set_params(&self, id: &str, lease: &Lease, p: &JobParams) -> Result<(), StoreError>;
    /// Marks a running job completed, if `lease` still holds it.
    fn complete(&self, id: &str, lease: &Lease, now: i64) -> Result<bool, StoreError>;
    /// Marks a queued or running job failed (a cancel from the API).
    fn fail(&self, id: &str, code: &str, message: &str, now: i64) -> Result<bool, StoreError>;
    /// Marks a running job failed, if `lease` still holds it.
    fn fail_leased(
        &self,
        id: &str,
        lease: &Lease,
        code: &str,
        message: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Gives a running job back to the queue (its worker is stopping). The SQLite store leaves
    /// it `in_progress` until the next start ([`Store::requeue_interrupted`]).
    fn release(&self, _id: &str, _lease: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
    /// Asks whichever node runs `id` to stop it (a shared store; one process uses
    /// [`crate::worker::Shared::request_cancel`]).
    fn request_cancel(&self, _id: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Jobs per status.
    fn counts(&self) -> Result<Vec<(Status, i64)>, StoreError>;
    /// How many jobs wait ahead of `seq` (0 = next to run).
    fn queue_position(&self, seq: i64) -> Result<i64, StoreError>;
    /// Adds a character (its image file is written first, by the caller).
    fn insert_character(&self, c: &Character) -> Result<(), StoreError>;
    /// The character with this id.
    fn get_character(&self, id: &str) -> Result<Option<Character>, StoreError>;
    /// The ids of every character.
    fn character_ids(&self) -> Result<Vec<String>, StoreError>;
    /// Puts jobs that were running when the previous process died back in the queue (one
    /// machine only; a shared store relies on lease expiry instead).
    fn requeue_interrupted(&self) -> Result<usize, StoreError>;
    /// How long a lease lasts before another worker may take the job over; `None` for a
    /// store that only one process uses (no heartbeats needed).
    fn lease_duration(&self) -> Option<std::time::Duration> {
        None
    }
    /// Records that `worker` is alive and holds `models` (a shared store).
    fn register_worker(&self, _worker: &str, _models: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Removes a stopping worker's record.
    fn unregister_worker(&self, _worker: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Live workers per model (a shared store).
    fn workers_per_model(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(Vec::new())
    }
}

/// A stored character: a reference image a create can name (`"characters": ["char_…"]`).
#[derive(Debug, Clone)]
pub struct Character {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// The API key's name that created it (when keys are on).
    pub owner: Option<String>,
    pub info: crate::characters::CharacterInfo,
}

impl Character {
    /// A character from its stored row (`info` as JSON), for the SQLite and Postgres stores.
    pub(crate) fn from_row(
        (id, name, created_at, owner, info): (String, String, i64, Option<String>, String),
    ) -> Result<Character, StoreError> {
        let info = serde_json::from_str(&info).map_err(|e| StoreError::BadRow {
            id: id.clone(),
            message: e.to_string(),
        })?;
        Ok(Character {
            id,
            name,
            created_at,
            owner,
            info,
        })
    }
}

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// Result of [`Store::list`].
pub enum ListResult {
    Page {
        jobs: Vec<Job>,
        has_more: bool,
    },
    /// The `after` cursor names no video (of this owner).
    UnknownCursor,
}

/// The SQLite job store. Cheap operations only; callers may use it from async code.
pub struct Store {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "id, seq, status, progress, created_at, completed_at, expires_at, model, size, seconds, prompt, remixed_from_video_id, error_code, error_message, params, owner";

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS videos (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                status TEXT NOT NULL,
                progress INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL,
                completed_at INTEGER,
                expires_at INTEGER,
                model TEXT NOT NULL,
                size TEXT NOT NULL,
                seconds TEXT NOT NULL,
                prompt TEXT NOT NULL,
                remixed_from_video_id TEXT,
                error_code TEXT,
                error_message TEXT,
                params TEXT NOT NULL,
                owner TEXT
            );
            CREATE INDEX IF NOT EXISTS videos_status ON videos(status, seq);
            CREATE TABLE IF NOT EXISTS characters (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                name TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                owner TEXT,
                info TEXT NOT NULL
            );",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Puts jobs that were running when a previous process died back in the queue (at their
    /// original place). Returns how many.
    pub fn requeue_interrupted(&self) -> Result<usize, StoreError> {
        Ok(self.conn()?.execute(
            "UPDATE videos SET status = 'queued', progress = 0 WHERE status = 'in_progress'",
            [],
        )?)
    }

    /// Adds a job; its `seq` is assigned here (arrival order).
    pub fn insert(&self, job: &Job) -> Result<i64, StoreError> {
        let params_json = serde_json::to_string(&job.params).map_err(|e| StoreError::BadRow {
            id: job.id.clone(),
            message: e.to_string(),
        })?;
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO videos (id, status, progress, created_at, completed_at, expires_at, model, size, seconds, prompt, remixed_from_video_id, error_code, error_message, params, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                job.id,
                job.status.as_str(),
                job.progress,
                job.created_at,
                job.completed_at,
                job.expires_at,
                job.model,
                job.size,
                job.seconds,
                job.prompt,
                job.remixed_from_video_id,
                job.error.as_ref().map(|e| &e.0),
                job.error.as_ref().map(|e| &e.1),
                params_json,
                job.owner,
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The job with this id.
    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM videos WHERE id = ?1"))?;
        let row = st.query_row([id], row_to_raw).optional()?;
        row.map(RawJob::into_job).transpose()
    }

    /// One page of jobs (of `owner`, or all when `None`) after the cursor `after`.
    pub fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<ListResult, StoreError> {
        let conn = self.conn()?;
        let cursor = match after {
            None => None,
            Some(a) => {
                let seq: Option<i64> = conn
                    .query_row(
                        "SELECT seq FROM videos WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                        params![a, owner],
                        |r| r.get(0),
                    )
                    .optional()?;
                match seq {
                    Some(s) => Some(s),
                    None => return Ok(ListResult::UnknownCursor),
                }
            }
        };
        let (cmp, dir) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM videos WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR seq {cmp} ?2) ORDER BY seq {dir} LIMIT ?3"
        );
        let mut st = conn.prepare_cached(&sql)?;
        let rows = st
            .query_map(params![owner, cursor, (limit + 1) as i64], row_to_raw)?
            .collect::<Result<Vec<_>, _>>()?;
        let mut jobs = rows
            .into_iter()
            .map(RawJob::into_job)
            .collect::<Result<Vec<_>, _>>()?;
        let has_more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok(ListResult::Page { jobs, has_more })
    }

    /// Removes a job's row. Returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()?
            .execute("DELETE FROM videos WHERE id = ?1", [id])?
            > 0)
    }

    /// Takes the oldest queued job and marks it `in_progress`.
    pub fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(&format!(
            "UPDATE videos SET status = 'in_progress', progress = 0
             WHERE seq = (SELECT seq FROM videos WHERE status = 'queued' ORDER BY seq LIMIT 1)
             RETURNING {COLUMNS}"
        ))?;
        let row = st.query_row([], row_to_raw).optional()?;
        row.map(RawJob::into_job).transpose()
    }

    /// Sets the progress of a running job (never backwards).
    pub fn set_progress(&self, id: &str, progress: u8) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE videos SET progress = ?2 WHERE id = ?1 AND status = 'in_progress' AND progress < ?2",
            params![id, progress.min(100)],
        )?;
        Ok(())
    }

    /// Replaces a job's parameters (the worker records what a run measured, e.g. the step
    /// cache's counts).
    pub fn set_params(&self, id: &str, p: &JobParams) -> Result<(), StoreError> {
        let json = serde_json::to_string(p).map_err(|e| StoreError::BadRow {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        self.conn()?.execute(
            "UPDATE videos SET params = ?2 WHERE id = ?1",
            params![id, json],
        )?;
        Ok(())
    }

    /// Marks a running job completed.
    pub fn complete(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        Ok(self.conn()?.execute(
            "UPDATE videos SET status = 'completed', progress = 100, completed_at = ?2 WHERE id = ?1 AND status = 'in_progress'",
            params![id, now],
        )? > 0)
    }

    /// Marks a queued or running job failed.
    pub fn fail(&self, id: &str, code: &str, message: &str, now: i64) -> Result<bool, StoreError> {
        Ok(self.conn()?.execute(
            "UPDATE videos SET status = 'failed', completed_at = ?4, error_code = ?2, error_message = ?3
             WHERE id = ?1 AND status IN ('queued', 'in_progress')",
            params![id, code, message, now],
        )? > 0)
    }

    /// Jobs per status.
    pub fn counts(&self) -> Result<Vec<(Status, i64)>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT status, COUNT(*) FROM videos GROUP BY status")?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Status::ALL
            .iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .find(|(name, _)| name == s.as_str())
                    .map_or(0, |r| r.1);
                (*s, n)
            })
            .collect())
    }

    /// Adds a character (its image file is written first, by the caller).
    pub fn insert_character(&self, c: &Character) -> Result<(), StoreError> {
        let info = serde_json::to_string(&c.info).map_err(|e| StoreError::BadRow {
            id: c.id.clone(),
            message: e.to_string(),
        })?;
        self.conn()?.execute(
            "INSERT INTO characters (id, name, created_at, owner, info) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![c.id, c.name, c.created_at, c.owner, info],
        )?;
        Ok(())
    }

    /// The character with this id.
    pub fn get_character(&self, id: &str) -> Result<Option<Character>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT id, name, created_at, owner, info FROM characters WHERE id = ?1",
        )?;
        let row = st
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?;
        row.map(Character::from_row).transpose()
    }

    /// The ids of every character (to remove image folders whose row is gone).
    pub fn character_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT id FROM characters")?;
        let ids = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// How many jobs wait ahead of `seq` (0 = next to run).
    pub fn queue_position(&self, seq: i64) -> Result<i64, StoreError> {
        Ok(self.conn()?.query_row(
            "SELECT COUNT(*) FROM videos WHERE status = 'queued' AND seq < ?1",
            [seq],
            |r| r.get(0),
        )?)
    }
}

/// A row before its JSON and status are checked.
pub(crate) struct RawJob {
    pub(crate) id: String,
    pub(crate) seq: i64,
    pub(crate) status: String,
    pub(crate) progress: i64,
    pub(crate) created_at: i64,
    pub(crate) completed_at: Option<i64>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) model: String,
    pub(crate) size: String,
    pub(crate) seconds: String,
    pub(crate) prompt: String,
    pub(crate) remixed_from_video_id: Option<String>,
    pub(crate) error_code: Option<String>,
    pub(crate) error_message: Option<String>,
    pub(crate) params: String,
    pub(crate) owner: Option<String>,
    pub(crate) output_attempt: Option<i64>,
}

fn row_to_raw(r: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: r.get(0)?,
        seq: r.get(1)?,
        status: r.get(2)?,
        progress: r.get(3)?,
        created_at: r.get(4)?,
        completed_at: r.get(5)?,
        expires_at: r.get(6)?,
        model: r.get(7)?,
        size: r.get(8)?,
        seconds: r.get(9)?,
        prompt: r.get(10)?,
        remixed_from_video_id: r.get(11)?,
        error_code: r.get(12)?,
        error_message: r.get(13)?,
        params: r.get(14)?,
        owner: r.get(15)?,
        output_attempt: None,
    })
}

impl RawJob {
    pub(crate) fn into_job(self) -> Result<Job, StoreError> {
        let bad = |message: String| StoreError::BadRow {
            id: self.id.clone(),
            message,
        };
        let status =
            Status::parse(&self.status).ok_or_else(|| bad(format!("status `{}`", self.status)))?;
        let params: JobParams =
            serde_json::from_str(&self.params).map_err(|e| bad(e.to_string()))?;
        let error = match (self.error_code, self.error_message) {
            (Some(c), m) => Some((c, m.unwrap_or_default())),
            (None, Some(m)) => Some(("error".into(), m)),
            (None, None) => None,
        };
        Ok(Job {
            id: self.id,
            seq: self.seq,
            status,
            progress: self.progress.clamp(0, 100) as u8,
            created_at: self.created_at,
            completed_at: self.completed_at,
            expires_at: self.expires_at,
            model: self.model,
            size: self.size,
            seconds: self.seconds,
            prompt: self.prompt,
            remixed_from_video_id: self.remixed_from_video_id,
            error,
            params,
            owner: self.owner,
            output_attempt: self.output_attempt,
        })
    }
}

/// The lease of the one process that uses a SQLite store.
pub const LOCAL_WORKER: &str = "local";

impl JobStore for Store {
    fn insert(&self, job: &Job) -> Result<i64, StoreError> {
        Store::insert(self, job)
    }
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Store::get(self, id)
    }
    fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<ListResult, StoreError> {
        Store::list(self, owner, after, limit, order)
    }
    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Store::delete(self, id)
    }
    fn claim_next(
        &self,
        _worker: &str,
        _models: &[String],
    ) -> Result<Option<(Job, Lease, bool)>, StoreError> {
        // One process serves every model of its jobs; a job for a model it no longer serves
        // fails with `model_not_found` (see the worker).
        Ok(Store::claim_next(self)?.map(|j| {
            let lease = Lease {
                worker: LOCAL_WORKER.into(),
                attempt: 0,
            };
            (j, lease, false)
        }))
    }
    fn heartbeat(&self, id: &str, _lease: &Lease) -> Result<LeaseState, StoreError> {
        Ok(match Store::get(self, id)? {
            Some(j) if j.status == Status::InProgress => LeaseState::Held { cancel: false },
            _ => LeaseState::Lost,
        })
    }
    fn set_progress(&self, id: &str, _lease: &Lease, progress: u8) -> Result<(), StoreError> {
        Store::set_progress(self, id, progress)
    }
    fn set_params(&self, id: &str, _lease: &Lease, p: &JobParams) -> Result<(), StoreError> {
        Store::set_params(self, id, p)
    }
    fn complete(&self, id: &str, _lease: &Lease, now: i64) -> Result<bool, StoreError> {
        Store::complete(self, id, now)
    }
    fn fail(&self, id: &str, code: &str, message: &str, now: i64) -> Result<bool, StoreError> {
        Store::fail(self, id, code, message, now)
    }
    fn fail_leased(
        &self,
        id: &str,
        _lease: &Lease,
        code: &str,
        message: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        Store::fail(self, id, code, message, now)
    }
    fn counts(&self) -> Result<Vec<(Status, i64)>, StoreError> {
        Store::counts(self)
    }
    fn queue_position(&self, seq: i64) -> Result<i64, StoreError> {
        Store::queue_position(self, seq)
    }
    fn insert_character(&self, c: &Character) -> Result<(), StoreError> {
        Store::insert_character(self, c)
    }
    fn get_character(&self, id: &str) -> Result<Option<Character>, StoreError> {
        Store::get_character(self, id)
    }
    fn character_ids(&self) -> Result<Vec<String>, StoreError> {
        Store::character_ids(self)
    }
    fn requeue_interrupted(&self) -> Result<usize, StoreError> {
        Store::requeue_interrupted(self)
    }
}
