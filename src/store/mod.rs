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

use crate::core::build::{after_loss, AfterLoss, BuildState};
use crate::core::{BuildId, ChangeId, MachineId, Ts};
use crate::cost::report::MachineFacts;

mod accounts;
mod builds;
mod changes;
mod machines;
mod meter;
mod notify;
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

fn build_row(r: &sqlx::sqlite::SqliteRow) -> BuildRow {
    BuildRow {
        id: r.get("id"),
        request: r.get("request_id"),
        builder: r.get("builder"),
        repo: r.get("repo"),
        branch: r.get("branch"),
        revision: r.get("revision"),
        // The schema's CHECK keeps it one of them; an unknown name would be a newer
        // schema's, shown as an exception rather than trusted.
        state: BuildState::parse(r.get::<&str, _>("state")).unwrap_or(BuildState::Exception),
        machine: r.get("machine_id"),
        attempt: r.get("attempt"),
        reason: r.get("reason"),
        queued_at: r.get("queued_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        cancelled_by: r.get("cancelled_by"),
    }
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
        result: &'a str,
    },
}

/// How [`Store::apply_report`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored; `finished` when it ended the build (a BuildFinished for a build still running
    /// on that machine).
    Stored { finished: bool },
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

/// Ends a running attempt with `result` if it still runs on `machine`. A build is a success
/// only if every step reported its own result: one still pending or running (its report never
/// arrived) makes it an `exception`, said in its log.
async fn finish_build_in(tx: &mut Tx<'_>, build: BuildId, machine: MachineId, result: &str, now: Ts) -> Result<bool> {
    let now_s = ts_string(now);
    let mut result = result;
    if result == "success" {
        let unreported: Option<(i64, String)> = sqlx::query_as(
            "SELECT s.idx, s.name FROM steps s JOIN builds b ON b.id = s.build_id
             WHERE s.build_id = ? AND b.state = 'running' AND b.machine_id = ? AND s.state IN ('pending', 'running')
             ORDER BY s.idx LIMIT 1",
        )
        .bind(build)
        .bind(machine)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((idx, name)) = unreported {
            let note = format!("paddock: step {name} reported no result, so the build cannot be a success\n");
            append_log_in(tx, build, idx, &note, now).await?;
            result = "exception";
        }
    }
    // A cancel that lost the race with the build's end leaves no trace on its result.
    let done = sqlx::query(
        "UPDATE builds SET state = ?1, finished_at = ?2,
           cancelled_by = CASE WHEN ?1 = 'cancelled' THEN cancelled_by ELSE NULL END
         WHERE id = ?3 AND machine_id = ?4 AND state = 'running'",
    )
    .bind(result)
    .bind(&now_s)
    .bind(build)
    .bind(machine)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        // A stale report (the attempt was retried meanwhile): the new attempt owns the build.
        return Ok(false);
    }
    close_open_steps(tx, build, "skipped").await?;
    insert_event(&mut **tx, machine, &now_s, "build_finished", &format!("{build} {result}")).await?;
    notify::outbox(tx, build, "finished", &now_s).await?;
    Ok(true)
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
