//! The store: every row Paddock keeps, on SQLite. All SQL lives here.
//!
//! State that matters is written before the side effect it describes (a machine row before the
//! provisioner call, a build request before the fleet sees it), so a crash loses nothing.
//!
//! SQLite is called in place, on the caller's thread: one connection writes (each call one
//! `BEGIN IMMEDIATE` transaction under the writer lock), a few more read (WAL lets them read
//! while it writes). A statement then costs microseconds; a connection thread would add a
//! thread hand-off to every statement, which was most of the master's CPU per build.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::core::build::{self as life, decide, BuildFacts, BuildState, Refused, Transition};
use crate::core::{BuildId, ChangeId, MachineId, Ts};
use crate::cost::report::MachineFacts;

mod accounts;
mod builds;
mod changes;
mod machines;
mod meter;
mod migrate;
mod notify;
pub mod postgres;
mod types;
mod views;
pub use accounts::{PauseRow, SessionRow, TokenRow, UserRow};
pub use migrate::{Migration, MIGRATIONS, POSTGRES_MIGRATIONS};
pub use notify::{BuildEvent, Delivery, NewDelivery, Standing};
pub use views::LogChunk;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("cannot apply migrations: {0}")]
    Migrate(String),
    /// Says the URL's scheme only: the rest may hold a password.
    #[error("unsupported database URL (scheme {0:?}): the store runs on sqlite:// only so far")]
    Unsupported(String),
    #[error("database URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
}

pub use crate::core::build::MAX_ATTEMPTS;

/// Result alias for store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

pub use crate::core::ts_string;

/// A handle on the database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Db>,
    /// Raised after a transaction that wrote a notification event, so the notifier's planner
    /// sleeps until there is news instead of polling.
    news: Arc<tokio::sync::Notify>,
}

/// The connections: one that writes, and idle ones that read.
struct Db {
    /// The database file; `None` for an in-memory database, which has one connection only.
    file: Option<PathBuf>,
    read_only: bool,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("file", &self.file).field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

/// How long a statement waits for another process's lock (a CLI command, a backup) to go.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept open.
const IDLE_READERS: usize = 4;

/// Where a `sqlite:` URL points: a file (and whether it is to be read only), or memory.
fn parse_url(url: &str) -> Result<(Option<PathBuf>, bool)> {
    let bad = |why: &str| StoreError::BadUrl { url: url.to_string(), why: why.to_string() };
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Unsupported(url.split(':').next().unwrap_or("").to_string()))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut read_only = false;
    for option in query.split('&').filter(|o| !o.is_empty()) {
        match option {
            "mode=ro" => read_only = true,
            "mode=rw" | "mode=rwc" => {}
            other => return Err(bad(&format!("unknown option {other:?} (known: mode=ro, mode=rw, mode=rwc)"))),
        }
    }
    if path.contains('%') {
        // Percent-escapes are not decoded: `ci%2Dprod.db` would silently be another, new file.
        return Err(bad("percent-escapes (%XX) are not decoded: write the file name as it is"));
    }
    match path {
        "" => Err(bad("no file named")),
        ":memory:" => Ok((None, read_only)),
        file => Ok((Some(PathBuf::from(file)), read_only)),
    }
}

/// Opens one connection with the settings every connection has.
fn connect(file: Option<&PathBuf>, read_only: bool) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
    };
    let conn = match file {
        Some(file) => Connection::open_with_flags(file, flags)?,
        None => Connection::open_in_memory()?,
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Every statement is prepared once per connection: the same few dozen run all day.
    conn.set_prepared_statement_cache_capacity(256);
    // Plans that never depend on the values bound: without this, SQLite marks a statement
    // with `col = ?` outside its index for re-planning when that value is rebound, and the
    // statement cache clears every statement's bindings when it takes it back, so most
    // cached statements were compiled again at every use (a fifth of the master's CPU).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
    }
    Ok(conn)
}

impl Store {
    /// Opens (creating if absent) the database at `url` and applies the migrations.
    pub async fn open(url: &str) -> Result<Store> {
        let (file, read_only) = parse_url(url)?;
        let mut writer = connect(file.as_ref(), read_only)?;
        if !read_only {
            migrate::run(&mut writer)?;
        }
        Ok(Store::with(file, read_only, writer))
    }

    /// Opens an existing database to read it only (no migrations, no writes): for tools that
    /// read an installation's history, such as `paddock simulate --from-db`.
    pub async fn open_read_only(url: &str) -> Result<Store> {
        let (file, _) = parse_url(url)?;
        if let Some(f) = file.as_ref().filter(|f| !f.exists()) {
            return Err(StoreError::BadUrl { url: url.to_string(), why: format!("{} does not exist", f.display()) });
        }
        let writer = connect(file.as_ref(), true)?;
        Ok(Store::with(file, true, writer))
    }

    fn with(file: Option<PathBuf>, read_only: bool, writer: Connection) -> Store {
        let db = Db { file, read_only, writer: Mutex::new(writer), readers: Mutex::new(Vec::new()) };
        Store { db: Arc::new(db), news: Arc::new(tokio::sync::Notify::new()) }
    }

    /// Runs `f` in one write transaction, committed if `f` returns `Ok` (rolled back if not).
    /// The transaction takes the write lock at its start: one that read first and wrote later
    /// would fail at once (not wait) if another process wrote in between. `f` must not call the
    /// store (the writer is not re-entrant).
    fn write<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        // A panic inside an earlier transaction rolled it back when it unwound (the
        // transaction's drop); the connection itself is sound.
        match self.db.writer.try_lock() {
            Ok(conn) => Self::transaction(conn, f),
            Err(TryLockError::Poisoned(p)) => Self::transaction(p.into_inner(), f),
            // Another task writes: waiting for it blocks this thread, so the worker first hands
            // its other tasks on (the loop, the agents' sockets) instead of stalling them.
            Err(TryLockError::WouldBlock) => {
                blocking(|| Self::transaction(self.db.writer.lock().unwrap_or_else(PoisonError::into_inner), f))
            }
        }
    }

    fn transaction<T>(mut conn: MutexGuard<'_, Connection>, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on a read connection (a consistent snapshot of committed data per statement,
    /// or per transaction `f` opens). An in-memory database reads on its one connection, the
    /// writer: there `f` must not call the store.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        if self.db.file.is_none() {
            let conn = self.db.writer.lock().unwrap_or_else(PoisonError::into_inner);
            return f(&conn);
        }
        let idle = self.db.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = connect(self.db.file.as_ref(), self.db.read_only)?;
                // Reads only: a write through a reader would bypass the writer lock.
                conn.pragma_update(None, "query_only", true)?;
                conn
            }
        };
        let out = f(&conn);
        let mut idle = self.db.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    /// [`Store::read`] for a read that may take long (a year of the meter, a whole log): on a
    /// multi-threaded runtime the worker first hands its other tasks to another thread, so the
    /// loop and other requests do not wait behind it. Short reads skip that hand-off: it costs
    /// more than they do.
    fn read_long<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        blocking(|| self.read(f))
    }

    /// What the notifier's planner waits on: raised after every transaction that may have
    /// written a notification event (a permit is kept when nobody waits).
    pub fn news(&self) -> Arc<tokio::sync::Notify> {
        self.news.clone()
    }

    /// Folds the write-ahead log into the database file (what closing the last connection
    /// does, for a copy of the file taken while the store stays open).
    pub async fn close(&self) {
        self.db.readers.lock().unwrap_or_else(PoisonError::into_inner).clear();
        if self.db.read_only || self.db.file.is_none() {
            return;
        }
        let conn = self.db.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "cannot fold the write-ahead log into the database file");
        }
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
    }
}

/// Runs `f`, which may block its thread for a while: on a worker of a multi-threaded runtime the
/// worker's other tasks move to another thread first (elsewhere `f` just runs).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs one statement (prepared once per connection) and says how many rows it changed.
fn exec(c: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    Ok(c.prepare_cached(sql)?.execute(params)?)
}

/// The one row a statement returns, read by `f`.
fn one<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&Row) -> rusqlite::Result<T>,
) -> Result<T> {
    Ok(c.prepare_cached(sql)?.query_row(params, f)?)
}

/// The row a statement returns, if any, read by `f`.
fn opt<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&Row) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    Ok(c.prepare_cached(sql)?.query_row(params, f).optional()?)
}

/// Every row a statement returns, each read by `f`.
fn all<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnMut(&Row) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(params, f)?;
    Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
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

fn build_row(r: &Row) -> rusqlite::Result<BuildRow> {
    Ok(BuildRow {
        id: r.get("id")?,
        request: r.get("request_id")?,
        builder: r.get("builder")?,
        repo: r.get("repo")?,
        branch: r.get("branch")?,
        revision: r.get("revision")?,
        // The schema's CHECK keeps it one of them; an unknown name (a newer schema's) is an
        // error, not a guess.
        state: r.get("state")?,
        machine: r.get("machine_id")?,
        attempt: r.get("attempt")?,
        reason: r.get("reason")?,
        queued_at: r.get("queued_at")?,
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
        cancelled_by: r.get("cancelled_by")?,
    })
}

fn machine_row(r: &Row) -> rusqlite::Result<MachineRow> {
    Ok(MachineRow {
        id: r.get("id")?,
        pool: r.get("pool")?,
        provisioner: r.get("provisioner")?,
        provider_id: r.get("provider_id")?,
        state: r.get("state")?,
        instance_type: r.get("instance_type")?,
        lifecycle: r.get("lifecycle")?,
        requested_at: r.get("requested_at")?,
        launched_at: r.get("launched_at")?,
        connected_at: r.get("connected_at")?,
        terminated_at: r.get("terminated_at")?,
        builds_run: r.get("builds_run")?,
        zone: r.get("zone")?,
        hourly_price: r.get("hourly_price")?,
        price_source: r.get("price_source")?,
        last_event: r.get("last_event")?,
    })
}

fn change_row(r: &Row) -> rusqlite::Result<ChangeRow> {
    let files: String = r.get("files")?;
    Ok(ChangeRow {
        id: r.get("id")?,
        repo: r.get("repo")?,
        branch: r.get("branch")?,
        revision: r.get("revision")?,
        author: r.get("author")?,
        committed_at: r.get("committed_at")?,
        message: r.get("message")?,
        files: serde_json::from_str(&files).unwrap_or_default(),
        source: r.get("source")?,
        created_at: r.get("created_at")?,
    })
}

/// Appends one machine event.
fn insert_event(c: &Connection, machine: MachineId, at: &str, kind: &str, detail: &str) -> Result<()> {
    exec(
        c,
        "INSERT INTO machine_events (machine_id, at, kind, detail) VALUES (?, ?, ?, ?)",
        rusqlite::params![machine, at, kind, detail],
    )?;
    Ok(())
}

/// One numbered report of an agent's about a build, as the store keeps it (see
/// [`Store::apply_reports`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Its place in the build's sequence.
    pub seq: u64,
    /// Log text it carries (already redacted), and the step it belongs to.
    pub log: Option<(i64, String)>,
    pub effect: ReportEffect,
}

/// What an agent's report does besides its log text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReportEffect {
    /// Nothing: a report of log text only.
    None,
    StepStarted {
        step: i64,
    },
    StepFinished {
        step: i64,
        result: &'static str,
        exit_code: Option<i32>,
    },
    BuildFinished {
        machine: MachineId,
        result: BuildState,
    },
}

/// How [`Store::apply_reports`] went.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Stored; `ended` says what became of the build when the report ended it (a
    /// BuildFinished for a build still running on that machine).
    Stored { ended: Option<Transition> },
    /// Not stored: the build's sequence is not where the report follows; it is at `applied`.
    Stale { applied: u64 },
}

fn append_log_in(c: &Connection, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
    exec(
        c,
        "INSERT INTO log_chunks (build_id, step_idx, text, created_at) VALUES (?, ?, ?, ?)",
        rusqlite::params![build, idx, text, ts_string(now)],
    )?;
    Ok(())
}

fn step_started_in(c: &Connection, build: BuildId, idx: i64, now: Ts) -> Result<()> {
    exec(
        c,
        "UPDATE steps SET state = 'running', started_at = ? WHERE build_id = ? AND idx = ?
         AND EXISTS (SELECT 1 FROM builds WHERE id = steps.build_id AND state = 'running')",
        rusqlite::params![ts_string(now), build, idx],
    )?;
    Ok(())
}

fn step_finished_in(
    c: &Connection,
    build: BuildId,
    idx: i64,
    result: &str,
    exit_code: Option<i32>,
    now: Ts,
) -> Result<()> {
    exec(
        c,
        "UPDATE steps SET state = ?, exit_code = ?, finished_at = ?,
         started_at = COALESCE(started_at, ?) WHERE build_id = ? AND idx = ?
         AND EXISTS (SELECT 1 FROM builds WHERE id = steps.build_id AND state = 'running')",
        rusqlite::params![
            result,
            exit_code,
            ts_string(now),
            if result == "skipped" { None } else { Some(ts_string(now)) },
            build,
            idx
        ],
    )?;
    Ok(())
}

/// What [`Store::build_event`] carried out.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub transition: Transition,
    /// The new attempt, when the transition queued one.
    pub next: Option<BuildRow>,
}

/// What the lifecycle rules need of attempt `build`, as stored; `None` if there is none.
fn facts_in(c: &Connection, build: BuildId) -> Result<Option<BuildFacts>> {
    opt(
        c,
        "SELECT b.state, b.attempt, b.machine_id, b.cancelled_by IS NOT NULL, s.idx, s.name
         FROM builds b LEFT JOIN steps s ON s.build_id = b.id AND s.idx = (SELECT MIN(idx) FROM steps
           WHERE build_id = b.id AND state IN ('pending', 'running'))
         WHERE b.id = ?",
        [build],
        |r| {
            let attempt: i64 = r.get(1)?;
            let idx: Option<i64> = r.get(4)?;
            let name: Option<String> = r.get(5)?;
            Ok(BuildFacts {
                id: build,
                state: r.get(0)?,
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                machine: r.get(2)?,
                cancel_asked: r.get(3)?,
                open_step: idx.zip(name),
            })
        },
    )
}

/// Reads attempt `build`, lets the lifecycle decide what `event` does, and writes it.
fn event_in(
    c: &Connection,
    build: BuildId,
    event: &life::BuildEvent,
    now: Ts,
) -> Result<std::result::Result<Decided, Refused>> {
    let Some(facts) = facts_in(c, build)? else { return Ok(Err(Refused::NoSuchBuild(build))) };
    let transition = match decide(&facts, event) {
        Ok(t) => t,
        Err(refused) => return Ok(Err(refused)),
    };
    let next = match apply_in(c, build, &transition, now)? {
        Some(next) => next,
        None => return Ok(Err(Refused::Raced(build))),
    };
    Ok(Ok(Decided { transition, next }))
}

/// Writes what the lifecycle decided for `build`, guarded by the state it was decided from.
/// `None` when the attempt had changed meanwhile (nothing written), else the new attempt, if
/// one was queued.
fn apply_in(c: &Connection, build: BuildId, t: &Transition, now: Ts) -> Result<Option<Option<BuildRow>>> {
    let now_s = ts_string(now);
    let done = exec(
        c,
        "UPDATE builds SET state = ?1,
           finished_at = CASE WHEN ?1 IN ('queued', 'running') THEN finished_at ELSE ?2 END,
           reason = COALESCE(?3, reason),
           cancelled_by = CASE WHEN ?4 IS NOT NULL THEN ?4 WHEN ?5 THEN NULL ELSE cancelled_by END
         WHERE id = ?6 AND state = ?7",
        rusqlite::params![t.to.as_str(), &now_s, &t.reason, &t.cancel_by, t.forget_cancel, build, t.from.as_str()],
    )?;
    if done == 0 {
        return Ok(None);
    }
    if let Some((idx, text)) = &t.note {
        append_log_in(c, build, *idx, text, now)?;
    }
    if let Some(steps) = t.open_steps {
        close_open_steps(c, build, steps.as_str())?;
    }
    if let Some(machine) = t.meter_end {
        insert_event(c, machine, &now_s, "build_finished", &format!("{build} {}", t.to))?;
    }
    if t.news {
        notify::outbox(c, build, "finished", &now_s)?;
    }
    let Some(reason) = &t.requeue else { return Ok(Some(None)) };
    let row = one(
        c,
        &format!(
            "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at, attempt)
             SELECT request_id, builder, repo, branch, revision, ?, ?, attempt + 1 FROM builds WHERE id = ?
             RETURNING {BUILD_COLUMNS}"
        ),
        rusqlite::params![reason, &now_s, build],
        build_row,
    )?;
    Ok(Some(Some(row)))
}

fn close_open_steps(c: &Connection, build: BuildId, state: &str) -> Result<()> {
    exec(
        c,
        "UPDATE steps SET state = ? WHERE build_id = ? AND state IN ('pending', 'running')",
        rusqlite::params![state, build],
    )?;
    Ok(())
}

fn set_head(c: &Connection, repo: &str, branch: &str, revision: &str, now: &str) -> Result<()> {
    exec(
        c,
        "INSERT INTO branch_heads (repo, branch, revision, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (repo, branch) DO UPDATE SET revision = excluded.revision, updated_at = excluded.updated_at",
        rusqlite::params![repo, branch, revision, now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_file_or_memory_and_unknown_options_are_refused() {
        assert_eq!(parse_url("sqlite:///var/lib/p.db").expect("abs"), (Some(PathBuf::from("/var/lib/p.db")), false));
        assert_eq!(parse_url("sqlite://p.db").expect("rel"), (Some(PathBuf::from("p.db")), false));
        assert_eq!(parse_url("sqlite:p.db?mode=rwc").expect("mode"), (Some(PathBuf::from("p.db")), false));
        assert_eq!(parse_url("sqlite:p.db?mode=ro").expect("ro"), (Some(PathBuf::from("p.db")), true));
        assert_eq!(parse_url("sqlite::memory:").expect("memory"), (None, false));
        let e = parse_url("sqlite://p.db?cache=shared").expect_err("unknown option").to_string();
        assert!(e.contains("unknown option \"cache=shared\""), "{e}");
        assert!(parse_url("sqlite://").is_err(), "no file");
        let e = parse_url("sqlite:///var/lib/ci%2Dprod.db").expect_err("escapes").to_string();
        assert!(e.contains("percent-escapes"), "{e}");
        assert!(matches!(parse_url("postgres://ci@db/ci"), Err(StoreError::Unsupported(_))));
    }

    #[test]
    fn cached_statements_are_compiled_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = connect(Some(&dir.path().join("p.db")), false).expect("connect");
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT);
             CREATE TABLE u (t_id INTEGER, idx INTEGER, s TEXT, PRIMARY KEY (t_id, idx));
             INSERT INTO t VALUES (1, 'x'); INSERT INTO u VALUES (1, 0, 'y');",
        )
        .expect("tables");
        // A join with `col = ?` outside the index: a term whose bound value SQLite's planner
        // looks at, and would compile the statement again for when it is rebound.
        let sql = "SELECT t.s, u.s FROM t LEFT JOIN u ON u.t_id = t.id WHERE t.id = ?1 AND u.idx = ?2";
        for n in 0..5 {
            opt(&conn, sql, rusqlite::params![1, n], |r| r.get::<_, String>(0)).expect("select");
        }
        let stmt = conn.prepare_cached(sql).expect("cached");
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "compiled again on reuse");
    }

    #[tokio::test]
    async fn readers_see_what_the_writer_committed_and_cannot_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::open(&url).await.expect("open");
        store.insert_machine(MachineId(1), "p", "local", "h", Ts(0)).await.expect("write");
        // More readers than are kept idle, each asked at once while others are out.
        let seen = store
            .read(|a| {
                store.read(|b| {
                    let n = |c: &Connection| one(c, "SELECT COUNT(*) FROM machines", [], |r| r.get::<_, i64>(0));
                    Ok((n(a)?, n(b)?))
                })
            })
            .expect("read");
        assert_eq!(seen, (1, 1));
        let refused = store.read(|c| exec(c, "DELETE FROM machines", []));
        assert!(refused.is_err(), "a reader refuses writes");
        assert_eq!(store.max_machine_id().await.expect("max"), MachineId(1));
    }

    #[tokio::test]
    async fn a_failed_write_leaves_nothing_behind() {
        let store = Store::open("sqlite::memory:").await.expect("open");
        let failed: Result<()> = store.write(|c| {
            exec(
                c,
                "INSERT INTO machines (id, pool, provisioner, state, token_hash, requested_at) VALUES (1, 'p', 'local', 'requested', 'h', 't')",
                [],
            )?;
            insert_event(c, MachineId(1), "t", "requested", "")?;
            Err(StoreError::Migrate("stop here".into()))
        });
        assert!(failed.is_err_and(|e| e.to_string().contains("stop here")), "the closure's own error");
        assert_eq!(store.machine_event_count().await.expect("count"), 0, "rolled back");
        assert_eq!(store.max_machine_id().await.expect("max"), MachineId(0), "rolled back");
    }

    /// Writers that meet at the lock wait their turn (off the async worker) and lose nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::open(&url).await.expect("open");
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        let id = MachineId(t * 100 + i + 1);
                        store.insert_machine(id, "p", "local", &format!("h{id}"), Ts(0)).await.expect("write");
                        assert!(store.machine(id).await.expect("read").is_some(), "read after write");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(store.list_machines(None, None).await.expect("list").len(), 200);
        assert_eq!(store.machine_event_count().await.expect("events"), 200);
    }
}
