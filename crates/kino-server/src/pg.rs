//! The Postgres job store, for several machines (`kino serve --database postgres://…`).
//!
//! The same rows as the SQLite store ([`crate::store`]), plus what many workers need:
//!
//! - **Leases.** A worker takes the oldest job of a model it holds with
//!   `SELECT … FOR UPDATE SKIP LOCKED` (so two workers never take the same row), and sets
//!   `worker`, `lease_until = now() + lease` and `attempts = attempts + 1`. While it runs, a
//!   heartbeat extends `lease_until`. A job whose lease ran out (its worker died) is taken like a
//!   queued one; after [`MAX_LOST`] such take-overs it fails with `worker_lost` instead.
//! - **Completion conditioned on the lease.** `complete`, `fail_leased`, progress and parameters
//!   change the row only `WHERE worker = $me AND attempts = $my_attempt AND status =
//!   'in_progress'`: a worker that lost its lease can never finish the job, so it is completed
//!   once. The completed row records `output_attempt`: the attempt whose uploaded files are the
//!   video's ([`crate::storage`]), so files a dead attempt left are never served.
//! - **Cross-node signals.** Cancellation (`cancel_requested`, also read by every heartbeat) and
//!   progress (`live`, JSON) are in the row; a `NOTIFY kino_events` tells listening nodes at
//!   once (`cancel:ID`, `progress:ID`, `done:ID`). Notifications sent while a listener is
//!   reconnecting are lost, so heartbeats and the event stream also poll.
//! - **Workers** advertise the models they hold in `workers`; a job is only leased to a worker
//!   with its model.
//! - **Schema versions** in `kino_migrations`, applied by `kino migrate` ([`migrate`]); a server
//!   refuses to start on a database that is not at its version.
//!
//! Why not a queue library (`apalis-postgres`, `graphile_worker`): the queue rows here *are* the
//! API's video objects (listing with cursors and owners, progress, cancel, the SQLite file of
//! one-machine mode with the same behaviour), and a worker's outputs are scoped by its lease
//! attempt; a library keeps its own job table, which would have to be kept in step with
//! `videos` in the same transaction. The pattern is the one those libraries use (SKIP LOCKED,
//! heartbeats, re-queue on expiry, NOTIFY), in about 600 lines, and the tests in
//! `tests/pg_store.rs` and `tests/scaleout.rs` hold it to the durability bar.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;

use crate::error::{ServerError, StoreError};
use crate::store::{
    Character, Job, JobParams, JobStore, Lease, LeaseState, ListResult, Order, RawJob, Status,
};

/// A query built at run time from this module's constants (never from input).
macro_rules! dynsql {
    ($($t:tt)*) => {
        sqlx::AssertSqlSafe(format!($($t)*))
    };
}

/// The channel of cross-node events.
pub const EVENTS_CHANNEL: &str = "kino_events";

/// A job whose worker died this many times fails instead of running again.
pub const MAX_LOST: i64 = 3;

/// The schema, in order. Never edit a released entry: add one.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "videos, characters, workers",
    r#"
CREATE TABLE videos (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    progress BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    expires_at BIGINT,
    model TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    prompt TEXT NOT NULL,
    remixed_from_video_id TEXT,
    error_code TEXT,
    error_message TEXT,
    params TEXT NOT NULL,
    owner TEXT,
    model_id TEXT NOT NULL,
    worker TEXT,
    lease_until TIMESTAMPTZ,
    attempts BIGINT NOT NULL DEFAULT 0,
    lost BIGINT NOT NULL DEFAULT 0,
    output_attempt BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    live TEXT
);
CREATE INDEX videos_status ON videos (status, seq);
CREATE INDEX videos_model_status ON videos (model_id, status, seq);
CREATE TABLE characters (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    owner TEXT,
    info TEXT NOT NULL
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    models TEXT[] NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#,
)];

/// The schema version this build needs.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

const COLUMNS: &str = "id, seq, status, progress, created_at, completed_at, expires_at, model, size, seconds, prompt, remixed_from_video_id, error_code, error_message, params, owner, output_attempt";

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn db_error(url: &str, why: impl Into<String>) -> ServerError {
    ServerError::Database {
        url: redact(url),
        why: why.into(),
    }
}

/// A connection error in plain words, with what to check.
fn explain_connect(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => format!(
            "cannot reach the database server ({io}); is Postgres running and listening on that \
             host and port?"
        ),
        sqlx::Error::PoolTimedOut => "the database server did not answer within 5 s; is the host \
                                      right and is Postgres accepting connections?"
            .into(),
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("28P01") | Some("28000") => format!(
                "the database refused the login ({}); check the user and password in the URL",
                d.message()
            ),
            Some("3D000") => format!(
                "{}; create it (`createdb NAME`) or name an existing database in the URL",
                d.message()
            ),
            _ => d.message().to_string(),
        },
        sqlx::Error::Tls(t) => format!("TLS: {t}; add ?sslmode=disable for a server without TLS"),
        other => other.to_string(),
    }
}

async fn connect_pool(url: &str, max: u32) -> Result<PgPool, ServerError> {
    let scheme_ok = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let opts: Result<PgConnectOptions, String> = if scheme_ok {
        url.parse().map_err(|e: sqlx::Error| e.to_string())
    } else {
        Err("it does not start with postgres://".into())
    };
    let opts = opts.map_err(|e| {
        db_error(
            url,
            format!("not a Postgres URL ({e}); write postgres://USER:PASSWORD@HOST:PORT/DATABASE"),
        )
    })?;
    // One plain connection first: its error says what is wrong (a pool retries until its
    // timeout and then only says that it timed out).
    use sqlx::Connection as _;
    match tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::PgConnection::connect_with(&opts),
    )
    .await
    {
        Err(_) => return Err(db_error(url, explain_connect(&sqlx::Error::PoolTimedOut))),
        Ok(Err(e)) => return Err(db_error(url, explain_connect(&e))),
        Ok(Ok(c)) => {
            let _ = c.close().await;
        }
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|e| db_error(url, explain_connect(&e)))
}

/// The version the database's schema is at (0: no Kino tables).
async fn current_version(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = 'kino_migrations' AND table_schema = current_schema())",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(0);
    }
    let v: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM kino_migrations")
        .fetch_one(pool)
        .await?;
    Ok(v.unwrap_or(0))
}

/// `kino migrate`: brings the database at `url` to this build's schema. Returns the
/// migrations applied (`"1 videos, characters, workers"`), none when it was up to date.
/// Several nodes may run it at once: an advisory lock makes them take turns.
pub fn migrate(url: &str) -> Result<Vec<String>, ServerError> {
    crate::rt::block_on(async {
        let pool = connect_pool(url, 1).await?;
        let applied = async {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(7151420)")
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS kino_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .execute(&mut *tx)
            .await?;
            let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM kino_migrations")
                .fetch_all(&mut *tx)
                .await?;
            let mut applied = Vec::new();
            for (v, name, sql) in MIGRATIONS {
                if done.contains(v) {
                    continue;
                }
                sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO kino_migrations (version, name) VALUES ($1, $2)")
                    .bind(v)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                applied.push(format!("{v} {name}"));
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(applied)
        }
        .await
        .map_err(|e| db_error(url, format!("migration failed: {}", explain_connect(&e))));
        pool.close().await;
        applied
    })
}

/// The Postgres job store.
pub struct PgStore {
    pool: PgPool,
    lease: Duration,
}

impl PgStore {
    /// Connects and checks that the schema is at this build's version. Every failure is one
    /// sentence naming what to fix (URL, server, login, `kino migrate`).
    pub fn connect(url: &str, lease: Duration) -> Result<PgStore, ServerError> {
        crate::rt::block_on(async {
            let pool = connect_pool(url, 16).await?;
            let version = current_version(&pool)
                .await
                .map_err(|e| db_error(url, explain_connect(&e)))?;
            let want = schema_version();
            if version < want {
                let what = if version == 0 {
                    "the database has no Kino tables yet".to_string()
                } else {
                    format!("the database's schema is at version {version}, this Kino needs {want}")
                };
                return Err(db_error(
                    url,
                    format!("{what}; run `kino migrate --database URL` once, then start again"),
                ));
            }
            if version > want {
                return Err(db_error(
                    url,
                    format!(
                        "the database's schema is at version {version}, newer than this Kino's \
                         ({want}); upgrade this node"
                    ),
                ));
            }
            Ok(PgStore { pool, lease })
        })
    }

    /// Listens for cross-node events ([`EVENTS_CHANNEL`]) and passes each payload to
    /// `on_event`, reconnecting after a lost connection (events sent meanwhile are lost; the
    /// callers also poll).
    pub fn listen(&self, on_event: Arc<dyn Fn(&str) + Send + Sync>) {
        let pool = self.pool.clone();
        crate::rt::handle().spawn(async move {
            loop {
                let mut listener = match PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("LISTEN {EVENTS_CHANNEL}: {e}; polling until it is back");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
                    tracing::warn!("LISTEN {EVENTS_CHANNEL}: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    match listener.recv().await {
                        Ok(n) => on_event(n.payload()),
                        Err(e) => {
                            tracing::warn!("LISTEN {EVENTS_CHANNEL}: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    }
                }
            }
        });
    }

    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, sqlx::Error>> + Send,
    ) -> Result<T, StoreError>
    where
        T: Send,
    {
        crate::rt::block_on(f).map_err(StoreError::Postgres)
    }

    async fn notify(pool: &PgPool, payload: String) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EVENTS_CHANNEL)
            .bind(payload)
            .execute(pool)
            .await
            .map(|_| ())
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }
}

fn raw_job(r: &PgRow) -> Result<RawJob, sqlx::Error> {
    Ok(RawJob {
        id: r.try_get("id")?,
        seq: r.try_get("seq")?,
        status: r.try_get("status")?,
        progress: r.try_get("progress")?,
        created_at: r.try_get("created_at")?,
        completed_at: r.try_get("completed_at")?,
        expires_at: r.try_get("expires_at")?,
        model: r.try_get("model")?,
        size: r.try_get("size")?,
        seconds: r.try_get("seconds")?,
        prompt: r.try_get("prompt")?,
        remixed_from_video_id: r.try_get("remixed_from_video_id")?,
        error_code: r.try_get("error_code")?,
        error_message: r.try_get("error_message")?,
        params: r.try_get("params")?,
        owner: r.try_get("owner")?,
        output_attempt: r.try_get("output_attempt")?,
    })
}

fn to_job(r: &PgRow) -> Result<Job, StoreError> {
    raw_job(r)?.into_job()
}

fn json_of<T: serde::Serialize>(id: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::BadRow {
        id: id.to_string(),
        message: e.to_string(),
    })
}

/// `WHERE` for a row this lease still holds (`$1` id, `$2` worker, `$3` attempt).
const HELD: &str = "id = $1 AND worker = $2 AND attempts = $3 AND status = 'in_progress'";

impl JobStore for PgStore {
    fn insert(&self, job: &Job) -> Result<i64, StoreError> {
        let params = json_of(&job.id, &job.params)?;
        self.run(async {
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO videos (id, status, progress, created_at, completed_at, expires_at, model, size, seconds, prompt, remixed_from_video_id, error_code, error_message, params, owner, model_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING seq",
            )
            .bind(&job.id)
            .bind(job.status.as_str())
            .bind(i64::from(job.progress))
            .bind(job.created_at)
            .bind(job.completed_at)
            .bind(job.expires_at)
            .bind(&job.model)
            .bind(&job.size)
            .bind(&job.seconds)
            .bind(&job.prompt)
            .bind(&job.remixed_from_video_id)
            .bind(job.error.as_ref().map(|e| &e.0))
            .bind(job.error.as_ref().map(|e| &e.1))
            .bind(&params)
            .bind(&job.owner)
            .bind(&job.params.model_id)
            .fetch_one(&self.pool)
            .await?;
            Self::notify(&self.pool, "queued".into()).await?;
            Ok(seq)
        })
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row = self.run(
            sqlx::query(dynsql!("SELECT {COLUMNS} FROM videos WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool),
        )?;
        row.as_ref().map(to_job).transpose()
    }

    fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<ListResult, StoreError> {
        let cursor = match after {
            None => None,
            Some(a) => {
                let seq: Option<i64> = self.run(
                    sqlx::query_scalar(
                        "SELECT seq FROM videos WHERE id = $1 AND ($2::TEXT IS NULL OR owner = $2)",
                    )
                    .bind(a)
                    .bind(owner)
                    .fetch_optional(&self.pool),
                )?;
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
            "SELECT {COLUMNS} FROM videos WHERE ($1::TEXT IS NULL OR owner = $1) AND ($2::BIGINT IS NULL OR seq {cmp} $2) ORDER BY seq {dir} LIMIT $3"
        );
        let rows = self.run(
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(owner)
                .bind(cursor)
                .bind((limit + 1) as i64)
                .fetch_all(&self.pool),
        )?;
        let mut jobs = rows.iter().map(to_job).collect::<Result<Vec<_>, _>>()?;
        let has_more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok(ListResult::Page { jobs, has_more })
    }

    fn delete(&self, id: &str) -> Result<bool, StoreError> {
        self.run(async {
            let n = sqlx::query("DELETE FROM videos WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if n > 0 {
                Self::notify(&self.pool, format!("cancel:{id}")).await?;
            }
            Ok(n > 0)
        })
    }

    fn claim_next(
        &self,
        worker: &str,
        models: &[String],
    ) -> Result<Option<(Job, Lease, bool)>, StoreError> {
        let now = crate::now_unix();
        let cols: String = COLUMNS
            .split(", ")
            .map(|c| format!("v.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let row = self.run(async {
            // Jobs whose worker died: cancelled ones end here, ones that killed MAX_LOST
            // workers fail instead of taking another down.
            sqlx::query(
                "UPDATE videos SET status = 'failed', completed_at = $1, live = NULL,
                   error_code = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'worker_lost' END,
                   error_message = CASE WHEN cancel_requested THEN 'the video was cancelled before it finished'
                     ELSE 'the worker making this video stopped ' || (lost + 1) || ' times; it is not tried again' END
                 WHERE status = 'in_progress' AND lease_until < now() AND (cancel_requested OR lost + 1 >= $2)",
            )
            .bind(now)
            .bind(MAX_LOST)
            .execute(&self.pool)
            .await?;
            sqlx::query(dynsql!(
                "WITH c AS (
                   SELECT seq, status AS was FROM videos
                   WHERE model_id = ANY($2) AND NOT cancel_requested
                     AND (status = 'queued' OR (status = 'in_progress' AND lease_until < now()))
                   ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT 1)
                 UPDATE videos v SET status = 'in_progress', progress = 0, worker = $1,
                   attempts = v.attempts + 1, live = NULL,
                   lost = v.lost + CASE WHEN c.was = 'in_progress' THEN 1 ELSE 0 END,
                   lease_until = now() + make_interval(secs => $3)
                 FROM c WHERE v.seq = c.seq
                 RETURNING {cols}, v.attempts, c.was"
            ))
            .bind(worker)
            .bind(models)
            .bind(self.lease_secs())
            .fetch_optional(&self.pool)
            .await
        })?;
        let Some(row) = row else { return Ok(None) };
        let attempt: i64 = row.try_get("attempts")?;
        let was: String = row.try_get("was")?;
        let job = to_job(&row)?;
        Ok(Some((
            job,
            Lease {
                worker: worker.to_string(),
                attempt,
            },
            was == "in_progress",
        )))
    }

    fn heartbeat(&self, id: &str, lease: &Lease) -> Result<LeaseState, StoreError> {
        let cancel: Option<bool> = self.run(
            sqlx::query_scalar(dynsql!(
                "UPDATE videos SET lease_until = now() + make_interval(secs => $4) WHERE {HELD} RETURNING cancel_requested"
            ))
            .bind(id)
            .bind(&lease.worker)
            .bind(lease.attempt)
            .bind(self.lease_secs())
            .fetch_optional(&self.pool),
        )?;
        Ok(match cancel {
            Some(cancel) => LeaseState::Held { cancel },
            None => LeaseState::Lost,
        })
    }

    fn set_progress(&self, id: &str, lease: &Lease, progress: u8) -> Result<(), StoreError> {
        self.run(
            sqlx::query(dynsql!(
                "UPDATE videos SET progress = $4 WHERE {HELD} AND progress < $4"
            ))
            .bind(id)
            .bind(&lease.worker)
            .bind(lease.attempt)
            .bind(i64::from(progress.min(100)))
            .execute(&self.pool),
        )?;
        Ok(())
    }

    fn set_live(
        &self,
        id: &str,
        lease: &Lease,
        live: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.run(async {
            sqlx::query(dynsql!("UPDATE videos SET live = $4 WHERE {HELD}"))
                .bind(id)
                .bind(&lease.worker)
                .bind(lease.attempt)
                .bind(live.to_string())
                .execute(&self.pool)
                .await?;
            Self::notify(&self.pool, format!("progress:{id}")).await
        })
    }

    fn live(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let text: Option<Option<String>> = self.run(
            sqlx::query_scalar("SELECT live FROM videos WHERE id = $1 AND status = 'in_progress'")
                .bind(id)
                .fetch_optional(&self.pool),
        )?;
        Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
    }

    fn set_params(&self, id: &str, lease: &Lease, p: &JobParams) -> Result<(), StoreError> {
        let json = json_of(id, p)?;
        self.run(
            sqlx::query(dynsql!("UPDATE videos SET params = $4 WHERE {HELD}"))
                .bind(id)
                .bind(&lease.worker)
                .bind(lease.attempt)
                .bind(json)
                .execute(&self.pool),
        )?;
        Ok(())
    }

    fn complete(&self, id: &str, lease: &Lease, now: i64) -> Result<bool, StoreError> {
        self.run(async {
            let n = sqlx::query(dynsql!(
                "UPDATE videos SET status = 'completed', progress = 100, completed_at = $4,
                   output_attempt = $3, live = NULL, lease_until = NULL WHERE {HELD}"
            ))
            .bind(id)
            .bind(&lease.worker)
            .bind(lease.attempt)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n > 0 {
                Self::notify(&self.pool, format!("done:{id}")).await?;
            }
            Ok(n > 0)
        })
    }

    fn fail(&self, id: &str, code: &str, message: &str, now: i64) -> Result<bool, StoreError> {
        self.run(async {
            let n = sqlx::query(
                "UPDATE videos SET status = 'failed', completed_at = $4, error_code = $2, error_message = $3, live = NULL
                 WHERE id = $1 AND status IN ('queued', 'in_progress')",
            )
            .bind(id)
            .bind(code)
            .bind(message)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n > 0 {
                Self::notify(&self.pool, format!("cancel:{id}")).await?;
            }
            Ok(n > 0)
        })
    }

    fn fail_leased(
        &self,
        id: &str,
        lease: &Lease,
        code: &str,
        message: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.run(async {
            let n = sqlx::query(dynsql!(
                "UPDATE videos SET status = 'failed', completed_at = $4, error_code = $5, error_message = $6,
                   live = NULL, lease_until = NULL WHERE {HELD}"
            ))
            .bind(id)
            .bind(&lease.worker)
            .bind(lease.attempt)
            .bind(now)
            .bind(code)
            .bind(message)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if n > 0 {
                Self::notify(&self.pool, format!("done:{id}")).await?;
            }
            Ok(n > 0)
        })
    }

    fn release(&self, id: &str, lease: &Lease) -> Result<(), StoreError> {
        self.run(
            sqlx::query(dynsql!(
                "UPDATE videos SET status = 'queued', progress = 0, worker = NULL, lease_until = NULL, live = NULL WHERE {HELD}"
            ))
            .bind(id)
            .bind(&lease.worker)
            .bind(lease.attempt)
            .execute(&self.pool),
        )?;
        Ok(())
    }

    fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        self.run(async {
            sqlx::query(
                "UPDATE videos SET cancel_requested = true WHERE id = $1 AND status IN ('queued', 'in_progress')",
            )
            .bind(id)
            .execute(&self.pool)
            .await?;
            Self::notify(&self.pool, format!("cancel:{id}")).await
        })
    }

    fn counts(&self) -> Result<Vec<(Status, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = self.run(
            sqlx::query_as("SELECT status, COUNT(*) FROM videos GROUP BY status")
                .fetch_all(&self.pool),
        )?;
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

    fn queue_position(&self, seq: i64) -> Result<i64, StoreError> {
        self.run(
            sqlx::query_scalar("SELECT COUNT(*) FROM videos WHERE status = 'queued' AND seq < $1")
                .bind(seq)
                .fetch_one(&self.pool),
        )
    }

    fn insert_character(&self, c: &Character) -> Result<(), StoreError> {
        let info = json_of(&c.id, &c.info)?;
        self.run(
            sqlx::query(
                "INSERT INTO characters (id, name, created_at, owner, info) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&c.id)
            .bind(&c.name)
            .bind(c.created_at)
            .bind(&c.owner)
            .bind(info)
            .execute(&self.pool),
        )?;
        Ok(())
    }

    fn get_character(&self, id: &str) -> Result<Option<Character>, StoreError> {
        let row: Option<(String, String, i64, Option<String>, String)> = self.run(
            sqlx::query_as(
                "SELECT id, name, created_at, owner, info FROM characters WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pool),
        )?;
        row.map(Character::from_row).transpose()
    }

    fn character_ids(&self) -> Result<Vec<String>, StoreError> {
        self.run(sqlx::query_scalar("SELECT id FROM characters").fetch_all(&self.pool))
    }

    fn requeue_interrupted(&self) -> Result<usize, StoreError> {
        // Other nodes' running jobs are theirs; a dead node's jobs come back when their
        // leases run out.
        Ok(0)
    }

    fn lease_duration(&self) -> Option<Duration> {
        Some(self.lease)
    }

    fn register_worker(&self, worker: &str, models: &[String]) -> Result<(), StoreError> {
        self.run(
            sqlx::query(
                "INSERT INTO workers (id, models, seen_at) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET models = $2, seen_at = now()",
            )
            .bind(worker)
            .bind(models)
            .execute(&self.pool),
        )?;
        Ok(())
    }

    fn unregister_worker(&self, worker: &str) -> Result<(), StoreError> {
        self.run(
            sqlx::query("DELETE FROM workers WHERE id = $1")
                .bind(worker)
                .execute(&self.pool),
        )?;
        Ok(())
    }

    fn workers_per_model(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.run(
            sqlx::query_as(
                "SELECT m, COUNT(*) FROM workers, unnest(models) AS m
                 WHERE seen_at > now() - make_interval(secs => $1) GROUP BY m ORDER BY m",
            )
            .bind(self.lease_secs() * 2.0)
            .fetch_all(&self.pool),
        )
    }
}
