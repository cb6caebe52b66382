//! The store: every row Paddock keeps, on SQLite through sqlx. All SQL lives here.
//!
//! State that matters is written before the side effect it describes (a machine row before the
//! provisioner call, a build request before the fleet sees it), so a crash loses nothing.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::core::build::{self as life, decide, BuildFacts, BuildState, Refused, Transition};
use crate::core::{BuildId, ChangeId, MachineId, Ts};
use crate::cost::report::MachineFacts;

mod accounts;
mod builds;
mod changes;
mod machines;
mod meter;
mod notify;
mod types;
mod views;
pub use accounts::{PauseRow, SessionRow, TokenRow, UserRow};
pub use notify::{BuildEvent, Delivery, NewDelivery, Standing};
pub use views::LogChunk;

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: only sqlite:// is supported in this build")]
    Unsupported(String),
}

pub use crate::core::build::MAX_ATTEMPTS;

/// Result alias for store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

pub use crate::core::ts_string;

/// A handle on the database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Raised after a transaction that wrote a notification event, so the notifier's planner
    /// sleeps until there is news instead of polling.
    news: Arc<tokio::sync::Notify>,
}

/// A change about to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChange {
    pub repo: String,
    pub branch: String,
    pub revision: String,
    pub author: String,
    pub committed_at: Option<String>,
    pub message: String,
    pub files: Vec<String>,
    pub source: String,
}

/// A stored change, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangeRow {
    pub id: ChangeId,
    pub repo: String,
    pub branch: String,
    pub revision: String,
    pub author: String,
    pub committed_at: Option<String>,
    pub message: String,
    pub files: Vec<String>,
    pub source: String,
    pub created_at: String,
}

/// A build attempt, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildRow {
    pub id: BuildId,
    pub request: i64,
    pub builder: String,
    pub repo: String,
    pub branch: String,
    pub revision: String,
    pub state: BuildState,
    pub machine: Option<MachineId>,
    pub attempt: i64,
    pub reason: String,
    pub queued_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Who cancelled it, when someone did.
    pub cancelled_by: Option<String>,
}

/// A step of a build, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRow {
    pub index: i64,
    pub name: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// A machine, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineRow {
    pub id: MachineId,
    pub pool: String,
    pub provisioner: String,
    pub provider_id: Option<String>,
    pub state: String,
    pub instance_type: Option<String>,
    pub lifecycle: Option<String>,
    pub requested_at: String,
    pub launched_at: Option<String>,
    pub connected_at: Option<String>,
    pub terminated_at: Option<String>,
    pub builds_run: i64,
    pub zone: Option<String>,
    /// USD per hour, fixed at launch; `None` = unknown.
    pub hourly_price: Option<f64>,
    /// Where the price came from: `table`, `spot`, `config` or `nominal`.
    pub price_source: Option<String>,
    /// The machine's latest event (`kind: detail`), e.g. why its launch failed.
    pub last_event: Option<String>,
}

/// What a machine costs, decided when it launched (see [`Store::machine_launched`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachinePrice {
    pub zone: Option<String>,
    /// USD per hour; `None` when no price is known.
    pub hourly_price: Option<f64>,
    /// `table`, `spot`, `config` or `nominal`.
    pub price_source: Option<String>,
    pub volume_gb: Option<u32>,
    pub volume_type: Option<String>,
    /// USD per hour for the root volume; `None` when unknown.
    pub volume_hourly: Option<f64>,
}

/// What [`Store::metric_counts`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricCounts {
    /// (pool, state, machines), gone ones left out.
    pub machines: Vec<(String, String, i64)>,
    /// (state, build attempts).
    pub builds: Vec<(String, i64)>,
    /// (pool, machines ever launched).
    pub launched: Vec<(String, i64)>,
    /// (pool, failed launches).
    pub launch_failures: Vec<(String, i64)>,
}

/// What [`Store::pool_status`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStatus {
    /// Machine state -> how many (gone ones left out).
    pub machines: BTreeMap<String, i64>,
    /// The latest failed launch: when (RFC 3339) and why.
    pub last_launch_failure: Option<(String, String)>,
    /// When a machine of the pool last launched (RFC 3339).
    pub last_launched_at: Option<String>,
}

/// Filters for [`Store::list_builds`].
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub builder: Option<String>,
    pub branch: Option<String>,
    pub state: Option<String>,
    pub limit: Option<i64>,
}

/// A nightly scheduler's persisted state.
#[derive(Debug, Clone, PartialEq)]
pub struct NightlyRow {
    pub name: String,
    pub last_fire: Ts,
    pub built: BTreeMap<String, String>,
}

const BUILD_COLUMNS: &str = "id, request_id, builder, repo, branch, revision, state, machine_id, attempt, reason, queued_at, started_at, finished_at, cancelled_by";
const MACHINE_COLUMNS: &str = "id, pool, provisioner, provider_id, state, instance_type, lifecycle, requested_at, launched_at, connected_at, terminated_at, builds_run, zone, hourly_price, price_source, \
     (SELECT e.kind || CASE WHEN e.detail = '' THEN '' ELSE ': ' || e.detail END FROM machine_events e \
      WHERE e.machine_id = machines.id ORDER BY e.id DESC LIMIT 1) AS last_event";

fn build_row(r: &sqlx::sqlite::SqliteRow) -> Result<BuildRow> {
    Ok(BuildRow {
        id: r.get("id"),
        request: r.get("request_id"),
        builder: r.get("builder"),
        repo: r.get("repo"),
        branch: r.get("branch"),
        revision: r.get("revision"),
        // The schema's CHECK keeps it one of them; an unknown name (a newer schema's) is an
        // error, not a guess.
        state: r.try_get("state")?,
        machine: r.get("machine_id"),
        attempt: r.get("attempt"),
        reason: r.get("reason"),
        queued_at: r.get("queued_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        cancelled_by: r.get("cancelled_by"),
    })
}

fn machine_row(r: &sqlx::sqlite::SqliteRow) -> MachineRow {
    MachineRow {
        id: r.get("id"),
        pool: r.get("pool"),
        provisioner: r.get("provisioner"),
        provider_id: r.get("provider_id"),
        state: r.get("state"),
        instance_type: r.get("instance_type"),
        lifecycle: r.get("lifecycle"),
        requested_at: r.get("requested_at"),
        launched_at: r.get("launched_at"),
        connected_at: r.get("connected_at"),
        terminated_at: r.get("terminated_at"),
        builds_run: r.get("builds_run"),
        zone: r.get("zone"),
        hourly_price: r.get("hourly_price"),
        price_source: r.get("price_source"),
        last_event: r.get("last_event"),
    }
}

fn change_row(r: &sqlx::sqlite::SqliteRow) -> ChangeRow {
    let files: String = r.get("files");
    ChangeRow {
        id: r.get("id"),
        repo: r.get("repo"),
        branch: r.get("branch"),
        revision: r.get("revision"),
        author: r.get("author"),
        committed_at: r.get("committed_at"),
        message: r.get("message"),
        files: serde_json::from_str(&files).unwrap_or_default(),
        source: r.get("source"),
        created_at: r.get("created_at"),
    }
}

impl Store {
    /// Opens (creating if absent) the database at `url` and applies the migrations.
    pub async fn open(url: &str) -> Result<Store> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::Unsupported(url.to_string()));
        }
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool, news: Arc::new(tokio::sync::Notify::new()) })
    }

    /// Opens an existing database to read it only (no migrations, no writes): for tools that
    /// read an installation's history, such as `paddock simulate --from-db`.
    pub async fn open_read_only(url: &str) -> Result<Store> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::Unsupported(url.to_string()));
        }
        let opts = SqliteConnectOptions::from_str(url)?.read_only(true).busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(opts).await?;
        Ok(Store { pool, news: Arc::new(tokio::sync::Notify::new()) })
    }

    /// What the notifier's planner waits on: raised after every transaction that may have
    /// written a notification event (a permit is kept when nobody waits).
    pub fn news(&self) -> Arc<tokio::sync::Notify> {
        self.news.clone()
    }

    /// Closes every connection (SQLite folds its write-ahead log into the file).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Appends one machine event, on a pool or inside a transaction.
async fn insert_event<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(
    ex: E,
    machine: MachineId,
    at: &str,
    kind: &str,
    detail: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO machine_events (machine_id, at, kind, detail) VALUES (?, ?, ?, ?)")
        .bind(machine)
        .bind(at)
        .bind(kind)
        .bind(detail)
        .execute(ex)
        .await?;
    Ok(())
}

/// Gives the steps of an ended attempt that had not finished their final state.
/// What an agent's report does besides its log text (see [`Store::apply_report`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReportEffect<'a> {
    /// Nothing: a report of log text only.
    None,
    StepStarted {
        step: i64,
    },
    StepFinished {
        step: i64,
        result: &'a str,
        exit_code: Option<i32>,
    },
    BuildFinished {
        machine: MachineId,
        result: BuildState,
    },
}

/// How [`Store::apply_report`] went.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Stored; `ended` says what became of the build when the report ended it (a
    /// BuildFinished for a build still running on that machine).
    Stored { ended: Option<Transition> },
    /// Not stored: the build's sequence is not where the report follows; it is at `applied`.
    Stale { applied: u64 },
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

async fn append_log_in(tx: &mut Tx<'_>, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
    sqlx::query("INSERT INTO log_chunks (build_id, step_idx, text, created_at) VALUES (?, ?, ?, ?)")
        .bind(build)
        .bind(idx)
        .bind(text)
        .bind(ts_string(now))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn step_started_in(tx: &mut Tx<'_>, build: BuildId, idx: i64, now: Ts) -> Result<()> {
    sqlx::query(
        "UPDATE steps SET state = 'running', started_at = ? WHERE build_id = ? AND idx = ?
         AND EXISTS (SELECT 1 FROM builds WHERE id = steps.build_id AND state = 'running')",
    )
    .bind(ts_string(now))
    .bind(build)
    .bind(idx)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn step_finished_in(
    tx: &mut Tx<'_>,
    build: BuildId,
    idx: i64,
    result: &str,
    exit_code: Option<i32>,
    now: Ts,
) -> Result<()> {
    sqlx::query(
        "UPDATE steps SET state = ?, exit_code = ?, finished_at = ?,
         started_at = COALESCE(started_at, ?) WHERE build_id = ? AND idx = ?
         AND EXISTS (SELECT 1 FROM builds WHERE id = steps.build_id AND state = 'running')",
    )
    .bind(result)
    .bind(exit_code)
    .bind(ts_string(now))
    .bind(if result == "skipped" { None } else { Some(ts_string(now)) })
    .bind(build)
    .bind(idx)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What [`Store::build_event`] carried out.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub transition: Transition,
    /// The new attempt, when the transition queued one.
    pub next: Option<BuildRow>,
}

/// State, attempt, machine, cancel asked, and the first open step's index and name.
type FactsRow = (BuildState, i64, Option<MachineId>, bool, Option<i64>, Option<String>);

/// What the lifecycle rules need of attempt `build`, as stored; `None` if there is none.
async fn facts_in(tx: &mut Tx<'_>, build: BuildId) -> Result<Option<BuildFacts>> {
    let row: Option<FactsRow> = sqlx::query_as(
        "SELECT b.state, b.attempt, b.machine_id, b.cancelled_by IS NOT NULL, s.idx, s.name
         FROM builds b LEFT JOIN steps s ON s.build_id = b.id AND s.idx = (SELECT MIN(idx) FROM steps
           WHERE build_id = b.id AND state IN ('pending', 'running'))
         WHERE b.id = ?",
    )
    .bind(build)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((state, attempt, machine, cancel_asked, idx, name)) = row else { return Ok(None) };
    Ok(Some(BuildFacts {
        id: build,
        state,
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        machine,
        cancel_asked,
        open_step: idx.zip(name),
    }))
}

/// Reads attempt `build`, lets the lifecycle decide what `event` does, and writes it.
async fn event_in(
    tx: &mut Tx<'_>,
    build: BuildId,
    event: &life::BuildEvent,
    now: Ts,
) -> Result<std::result::Result<Decided, Refused>> {
    let Some(facts) = facts_in(tx, build).await? else { return Ok(Err(Refused::NoSuchBuild(build))) };
    let transition = match decide(&facts, event) {
        Ok(t) => t,
        Err(refused) => return Ok(Err(refused)),
    };
    let next = match apply_in(tx, build, &transition, now).await? {
        Some(next) => next,
        None => return Ok(Err(Refused::Raced(build))),
    };
    Ok(Ok(Decided { transition, next }))
}

/// Writes what the lifecycle decided for `build`, guarded by the state it was decided from.
/// `None` when the attempt had changed meanwhile (nothing written), else the new attempt, if
/// one was queued.
async fn apply_in(tx: &mut Tx<'_>, build: BuildId, t: &Transition, now: Ts) -> Result<Option<Option<BuildRow>>> {
    let now_s = ts_string(now);
    let done = sqlx::query(
        "UPDATE builds SET state = ?1,
           finished_at = CASE WHEN ?1 IN ('queued', 'running') THEN finished_at ELSE ?2 END,
           reason = COALESCE(?3, reason),
           cancelled_by = CASE WHEN ?4 IS NOT NULL THEN ?4 WHEN ?5 THEN NULL ELSE cancelled_by END
         WHERE id = ?6 AND state = ?7",
    )
    .bind(t.to.as_str())
    .bind(&now_s)
    .bind(&t.reason)
    .bind(&t.cancel_by)
    .bind(t.forget_cancel)
    .bind(build)
    .bind(t.from.as_str())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    if let Some((idx, text)) = &t.note {
        append_log_in(tx, build, *idx, text, now).await?;
    }
    if let Some(steps) = t.open_steps {
        close_open_steps(tx, build, steps.as_str()).await?;
    }
    if let Some(machine) = t.meter_end {
        insert_event(&mut **tx, machine, &now_s, "build_finished", &format!("{build} {}", t.to)).await?;
    }
    if t.news {
        notify::outbox(tx, build, "finished", &now_s).await?;
    }
    let Some(reason) = &t.requeue else { return Ok(Some(None)) };
    let row = sqlx::query(&format!(
        "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at, attempt)
         SELECT request_id, builder, repo, branch, revision, ?, ?, attempt + 1 FROM builds WHERE id = ?
         RETURNING {BUILD_COLUMNS}"
    ))
    .bind(reason)
    .bind(&now_s)
    .bind(build)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Some(Some(build_row(&row)?)))
}

async fn close_open_steps(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, build: BuildId, state: &str) -> Result<()> {
    sqlx::query("UPDATE steps SET state = ? WHERE build_id = ? AND state IN ('pending', 'running')")
        .bind(state)
        .bind(build)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn set_head<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(
    exec: E,
    repo: &str,
    branch: &str,
    revision: &str,
    now: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO branch_heads (repo, branch, revision, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (repo, branch) DO UPDATE SET revision = excluded.revision, updated_at = excluded.updated_at",
    )
    .bind(repo)
    .bind(branch)
    .bind(revision)
    .bind(now)
    .execute(exec)
    .await?;
    Ok(())
}
