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

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use serde::Serialize;

use crate::core::build::{self as life, decide, BuildFacts, BuildState, Refused, Transition};
use crate::core::{BuildId, ChangeId, MachineId, Ts};
use crate::cost::report::MachineFacts;

mod accounts;
mod builds;
mod changes;
mod copy;
mod leases;
mod machines;
mod meter;
mod migrate;
mod notify;
pub mod postgres;
mod sql;
mod types;
mod views;
pub use accounts::{PauseRow, SessionRow, TokenRow, UserRow};
pub use copy::{Copied, NOT_COPIED, TABLES};
pub use leases::{Fence, LeaseRow, MasterRow, FARM};
pub use migrate::{Migration, MIGRATIONS, POSTGRES_MIGRATIONS};
pub use notify::{BuildEvent, Delivery, NewDelivery, Standing};
pub use views::LogChunk;

use sql::{all, each, exec, one, opt, params, snapshot, Conn, PgConn, Row};

/// A query of the ids in a JSON array given as the one parameter (`[1, 2, 3]`), for `IN (…)`.
fn json_ids(c: &Conn<'_>) -> &'static str {
    match c {
        Conn::Lite(_) => "SELECT value FROM json_each(?)",
        Conn::Pg(_) => "SELECT CAST(value AS BIGINT) FROM json_array_elements_text(CAST(? AS json))",
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A stored value is not what the code reads (a schema newer than the code, a query bug).
    #[error("cannot read a row: {0}")]
    Column(String),
    #[error("cannot apply migrations: {0}")]
    Migrate(String),
    /// This master no longer holds the lease its writes are fenced with: another master
    /// acts for the farm now, and nothing was written.
    #[error("this master lost the lease of {0:?}: another master acts for it now")]
    Fenced(String),
    /// A database copy that was refused or failed (nothing of it was committed).
    #[error("cannot copy the database: {0}")]
    Copy(String),
    /// Says the URL's scheme only: the rest may hold a password.
    #[error("unsupported database URL (scheme {0:?}): the store runs on sqlite: or PostgreSQL")]
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
    /// The lease every write on PostgreSQL checks first, once this master holds one (see
    /// [`Store::set_fence`]).
    fence: Arc<Mutex<Option<Fence>>>,
}

/// The database, on one backend or the other.
#[derive(Debug)]
enum Db {
    Lite(LiteDb),
    // Boxed: its connection settings are large, and there is one per store.
    Pg(Box<PgDb>),
}

/// SQLite's connections: one that writes, and idle ones that read.
struct LiteDb {
    /// The database file; `None` for an in-memory database, which has one connection only.
    file: Option<PathBuf>,
    read_only: bool,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for LiteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiteDb").field("file", &self.file).field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

/// PostgreSQL's connections, made again when one breaks (a server restart, a failover): one
/// that writes, and idle ones that read. They run on a runtime of their own.
struct PgDb {
    /// The connection settings, password included (never shown).
    config: tokio_postgres::Config,
    tls: postgres::Tls,
    read_only: bool,
    runtime: PgRuntime,
    writer: Mutex<Option<PgConn>>,
    readers: Mutex<Vec<PgConn>>,
    /// Reads under way, at most [`PG_READERS`]: a burst waits for a connection instead of
    /// opening one each until the server refuses more.
    reading: (Mutex<usize>, std::sync::Condvar),
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the config: it holds the password.
        f.debug_struct("PgDb").field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

/// A thread running the runtime that carries the store's PostgreSQL connections, so a store
/// call can wait for its answer on any thread (even the only thread of a runtime, which then
/// could not carry the connection itself). It ends with the store.
struct PgRuntime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl PgRuntime {
    fn start() -> Result<PgRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot start the connections' runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("paddock-postgres".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start the connections' thread: {e}")))?;
        Ok(PgRuntime { handle, _stop: stop })
    }
}

impl PgDb {
    /// A new connection (a reader's refuses writes).
    fn connect(&self, reader: bool) -> Result<PgConn> {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let client = sql::wait(self.runtime.handle.spawn(async move { postgres::connect_with(&config, tls).await }))
            .map_err(|e| StoreError::Postgres(format!("connecting: {e}")))??
            .0;
        let conn = PgConn::new(client);
        if reader || self.read_only {
            conn.batch("SET default_transaction_read_only = on")?;
        }
        Ok(conn)
    }
}

/// How long a statement waits for another process's lock (a CLI command, a backup) to go.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept open.
const IDLE_READERS: usize = 4;
/// Read connections open at once on PostgreSQL, at most (each is a server process).
const PG_READERS: usize = 16;
/// The lock every write transaction on PostgreSQL holds, whichever master it comes from:
/// writes are one at a time, as on SQLite, so every transaction sees the ones before it whole.
const WRITE_LOCK: i64 = 0x7061_6464_6f63_6b01;

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

/// Whether `url` names a SQLite database (anything else is a PostgreSQL connection string).
fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
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
    /// Opens (creating if absent) the database at `url` and applies the migrations: a
    /// `sqlite:` file, or the PostgreSQL database of a connection string (password and CAs
    /// from the environment, see [`postgres`]).
    pub async fn open(url: &str) -> Result<Store> {
        if !is_sqlite(url) {
            return Store::open_postgres(url, &postgres::process_env, false).await;
        }
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
        if !is_sqlite(url) {
            return Store::open_postgres(url, &postgres::process_env, true).await;
        }
        let (file, _) = parse_url(url)?;
        if let Some(f) = file.as_ref().filter(|f| !f.exists()) {
            return Err(StoreError::BadUrl { url: url.to_string(), why: format!("{} does not exist", f.display()) });
        }
        let writer = connect(file.as_ref(), true)?;
        Ok(Store::with(file, true, writer))
    }

    /// Opens the PostgreSQL database of `url`, with the password and the CAs looked up in
    /// `env` (the process's environment in production), migrating it unless `read_only`.
    pub async fn open_postgres(url: &str, env: postgres::Env<'_>, read_only: bool) -> Result<Store> {
        if !read_only {
            postgres::migrate_with(url, env).await?;
        }
        let pg = PgDb {
            config: postgres::connect_config(url, env)?,
            tls: postgres::tls(env)?,
            read_only,
            runtime: PgRuntime::start()?,
            writer: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            reading: (Mutex::new(0), std::sync::Condvar::new()),
        };
        let store = Store {
            db: Arc::new(Db::Pg(Box::new(pg))),
            news: Arc::new(tokio::sync::Notify::new()),
            fence: Arc::default(),
        };
        // Connects now, so a wrong password or an unreachable server is an error of the open.
        store.ping().await?;
        Ok(store)
    }

    fn with(file: Option<PathBuf>, read_only: bool, writer: Connection) -> Store {
        let db = LiteDb { file, read_only, writer: Mutex::new(writer), readers: Mutex::new(Vec::new()) };
        Store { db: Arc::new(Db::Lite(db)), news: Arc::new(tokio::sync::Notify::new()), fence: Arc::default() }
    }

    /// Which backend this store runs on: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match *self.db {
            Db::Lite(_) => "sqlite",
            Db::Pg(_) => "postgres",
        }
    }

    /// Runs `f` in one write transaction, committed if `f` returns `Ok` (rolled back if not).
    /// The transaction takes the write lock at its start: one that read first and wrote later
    /// would fail at once (not wait) if another process wrote in between. `f` must not call the
    /// store (the writer is not re-entrant).
    fn write<T>(&self, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        let lite = match &*self.db {
            Db::Lite(lite) => lite,
            Db::Pg(pg) => {
                let fence = self.fence.lock().unwrap_or_else(PoisonError::into_inner).clone();
                return blocking(|| Self::pg_write(pg, fence.as_ref(), f));
            }
        };
        // A panic inside an earlier transaction rolled it back when it unwound (the
        // transaction's drop); the connection itself is sound.
        match lite.writer.try_lock() {
            Ok(conn) => Self::transaction(conn, f),
            Err(TryLockError::Poisoned(p)) => Self::transaction(p.into_inner(), f),
            // Another task writes: waiting for it blocks this thread, so the worker first hands
            // its other tasks on (the loop, the agents' sockets) instead of stalling them.
            Err(TryLockError::WouldBlock) => {
                blocking(|| Self::transaction(lite.writer.lock().unwrap_or_else(PoisonError::into_inner), f))
            }
        }
    }

    fn transaction<T>(mut conn: MutexGuard<'_, Connection>, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&Conn::Lite(&tx))?;
        tx.commit()?;
        Ok(out)
    }

    /// [`Store::write`] without the lease check: for the lease's own renewal and the
    /// masters' roll call, which a master does whether it holds the lease or not.
    fn write_unfenced<T>(&self, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        match &*self.db {
            Db::Lite(_) => self.write(f),
            Db::Pg(pg) => blocking(|| Self::pg_write(pg, None, f)),
        }
    }

    /// From now on, every write on PostgreSQL first checks that `fence` still holds (the
    /// same holder and epoch, unexpired), and fails with [`StoreError::Fenced`] when it does
    /// not, changing nothing. (SQLite has one master by nature: it ignores the fence.)
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(PoisonError::into_inner) = fence;
    }

    fn pg_write<T>(pg: &PgDb, fence: Option<&Fence>, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        if pg.read_only {
            return Err(StoreError::Postgres("this store was opened to read only".into()));
        }
        let mut writer = pg.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if writer.as_ref().is_none_or(PgConn::is_broken) {
            *writer = Some(pg.connect(false)?);
        }
        let Some(conn) = writer.as_ref() else { unreachable!("connected just above") };
        // Rolls the transaction back unless it committed: also when `f` panics, so the next
        // write never commits what the panicking one left (SQLite's transaction does this on
        // its drop). A connection that cannot roll back is not used again.
        struct Open<'c>(&'c PgConn, bool);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                if !self.1 && (self.0.is_broken() || self.0.batch("ROLLBACK").is_err()) {
                    self.0.discard();
                }
            }
        }
        let mut open = Open(conn, false);
        let out = conn
            .begin(&format!("SELECT pg_advisory_xact_lock({WRITE_LOCK})"))
            .and_then(|()| match fence {
                // Checked under the write lock: a takeover is a write too, so it either
                // committed before this check or waits until this transaction ends.
                Some(fence) if !leases::fence_holds(&Conn::Pg(conn), fence)? => {
                    Err(StoreError::Fenced(fence.scope.clone()))
                }
                _ => Ok(()),
            })
            .and_then(|()| f(&Conn::Pg(conn)));
        let out = match out {
            Ok(v) => {
                // Whatever COMMIT says, the transaction is over (committed or rolled back).
                open.1 = true;
                conn.commit().map(|()| v)
            }
            Err(e) => Err(e),
        };
        drop(open);
        if conn.is_broken() {
            *writer = None;
        }
        out
    }

    /// Runs `f` on a read connection (a consistent snapshot of committed data per statement,
    /// or per transaction `f` opens). An in-memory database reads on its one connection, the
    /// writer: there `f` must not call the store.
    fn read<T>(&self, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        let lite = match &*self.db {
            Db::Lite(lite) => lite,
            Db::Pg(pg) => return blocking(|| Self::pg_read(pg, f)),
        };
        if lite.file.is_none() {
            let conn = lite.writer.lock().unwrap_or_else(PoisonError::into_inner);
            return f(&Conn::Lite(&conn));
        }
        let idle = lite.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = connect(lite.file.as_ref(), lite.read_only)?;
                // Reads only: a write through a reader would bypass the writer lock.
                conn.pragma_update(None, "query_only", true)?;
                conn
            }
        };
        let out = f(&Conn::Lite(&conn));
        let mut idle = lite.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    fn pg_read<T>(pg: &PgDb, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
        /// A read's place among the [`PG_READERS`], given back when it ends (even by a panic).
        struct Slot<'p>(&'p PgDb);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                let (count, freed) = &self.0.reading;
                *count.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                freed.notify_one();
            }
        }
        {
            let (count, freed) = &pg.reading;
            let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
            while *n >= PG_READERS {
                n = freed.wait(n).unwrap_or_else(PoisonError::into_inner);
            }
            *n += 1;
        }
        let _slot = Slot(pg);
        let idle = pg.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle.filter(|c| !c.is_broken()) {
            Some(conn) => conn,
            None => pg.connect(true)?,
        };
        let out = f(&Conn::Pg(&conn));
        if conn.is_broken() {
            // The connection broke under this read. What broke it (a server restart, an
            // administrator) most likely ended the idle ones too: they go, so the next read
            // starts on a new connection instead of meeting the same break.
            pg.readers.lock().unwrap_or_else(PoisonError::into_inner).clear();
            return out;
        }
        let mut idle = pg.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    /// [`Store::read`] for a read that may take long (a year of the meter, a whole log): on a
    /// multi-threaded runtime the worker first hands its other tasks to another thread, so the
    /// loop and other requests do not wait behind it. Short reads skip that hand-off: it costs
    /// more than they do.
    fn read_long<T>(&self, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
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
        let Db::Lite(lite) = &*self.db else { return };
        lite.readers.lock().unwrap_or_else(PoisonError::into_inner).clear();
        if lite.read_only || lite.file.is_none() {
            return;
        }
        let conn = lite.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "cannot fold the write-ahead log into the database file");
        }
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.read(|c| one(c, "SELECT 1", params![], |_| Ok(())))
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

fn build_row(r: &Row<'_>) -> Result<BuildRow> {
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

fn machine_row(r: &Row<'_>) -> Result<MachineRow> {
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

fn change_row(r: &Row<'_>) -> Result<ChangeRow> {
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
fn insert_event(c: &Conn<'_>, machine: MachineId, at: &str, kind: &str, detail: &str) -> Result<()> {
    exec(
        c,
        "INSERT INTO machine_events (machine_id, at, kind, detail) VALUES (?, ?, ?, ?)",
        params![machine, at, kind, detail],
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

fn append_log_in(c: &Conn<'_>, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
    exec(
        c,
        "INSERT INTO log_chunks (build_id, step_idx, text, created_at) VALUES (?, ?, ?, ?)",
        params![build, idx, text, ts_string(now)],
    )?;
    Ok(())
}

fn step_started_in(c: &Conn<'_>, build: BuildId, idx: i64, now: Ts) -> Result<()> {
    exec(
        c,
        "UPDATE steps SET state = 'running', started_at = ? WHERE build_id = ? AND idx = ?
         AND EXISTS (SELECT 1 FROM builds WHERE id = steps.build_id AND state = 'running')",
        params![ts_string(now), build, idx],
    )?;
    Ok(())
}

fn step_finished_in(
    c: &Conn<'_>,
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
        params![
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
fn facts_in(c: &Conn<'_>, build: BuildId) -> Result<Option<BuildFacts>> {
    opt(
        c,
        "SELECT b.state, b.attempt, b.machine_id, b.cancelled_by IS NOT NULL, s.idx, s.name
         FROM builds b LEFT JOIN steps s ON s.build_id = b.id AND s.idx = (SELECT MIN(idx) FROM steps
           WHERE build_id = b.id AND state IN ('pending', 'running'))
         WHERE b.id = ?",
        params![build],
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
    c: &Conn<'_>,
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
fn apply_in(c: &Conn<'_>, build: BuildId, t: &Transition, now: Ts) -> Result<Option<Option<BuildRow>>> {
    let now_s = ts_string(now);
    let done = exec(
        c,
        "UPDATE builds SET state = ?1,
           finished_at = CASE WHEN ?1 IN ('queued', 'running') THEN finished_at ELSE ?2 END,
           reason = COALESCE(?3, reason),
           cancelled_by = CASE WHEN CAST(?4 AS TEXT) IS NOT NULL THEN ?4 WHEN ?5 = 1 THEN NULL ELSE cancelled_by END
         WHERE id = ?6 AND state = ?7",
        params![t.to.as_str(), &now_s, &t.reason, &t.cancel_by, t.forget_cancel, build, t.from.as_str()],
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
        params![reason, &now_s, build],
        build_row,
    )?;
    Ok(Some(Some(row)))
}

fn close_open_steps(c: &Conn<'_>, build: BuildId, state: &str) -> Result<()> {
    exec(
        c,
        "UPDATE steps SET state = ? WHERE build_id = ? AND state IN ('pending', 'running')",
        params![state, build],
    )?;
    Ok(())
}

fn set_head(c: &Conn<'_>, repo: &str, branch: &str, revision: &str, now: &str) -> Result<()> {
    exec(
        c,
        "INSERT INTO branch_heads (repo, branch, revision, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (repo, branch) DO UPDATE SET revision = excluded.revision, updated_at = excluded.updated_at",
        params![repo, branch, revision, now],
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
            opt(&Conn::Lite(&conn), sql, params![1, n], |r| r.get::<String>(0)).expect("select");
        }
        let stmt = conn.prepare_cached(sql).expect("cached");
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "compiled again on reuse");
    }

    /// A fresh database on the tests' PostgreSQL server (`.ci/test` starts it and names it in
    /// `PADDOCK_TEST_POSTGRES`), opened as a store. It is left for the server's end: the
    /// server is the test run's own.
    async fn postgres_store() -> Store {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests with .ci/test, which starts a PostgreSQL server")
            })
        };
        let server = var("PADDOCK_TEST_POSTGRES");
        let env = |name: &str| match name {
            "PGPASSWORD" => std::env::var("PADDOCK_TEST_POSTGRES_PASSWORD").ok(),
            "PGSSLROOTCERT" => std::env::var("PADDOCK_TEST_POSTGRES_CA").ok(),
            _ => None,
        };
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "paddock_unit_{}_{}_{}",
            std::process::id(),
            crate::clock::Clock::now(&crate::clock::SystemClock).0,
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (client, conn) = postgres::connect(&server, &env).await.expect("connect");
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        drop(client);
        let _ = conn.await;
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        Store::open_postgres(&format!("{base}/{name}"), &env, false).await.expect("open")
    }

    /// Another store on the same PostgreSQL database as `store` (another master's).
    async fn postgres_store_on(store: &Store) -> Store {
        let Db::Pg(pg) = &*store.db else { panic!("a PostgreSQL store") };
        let other = PgDb {
            config: pg.config.clone(),
            tls: pg.tls.clone(),
            read_only: false,
            runtime: PgRuntime::start().expect("runtime"),
            writer: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            reading: (Mutex::new(0), std::sync::Condvar::new()),
        };
        Store { db: Arc::new(Db::Pg(Box::new(other))), news: Arc::default(), fence: Arc::default() }
    }

    /// Each backend's store for a test: a SQLite file (in `dir`) and a PostgreSQL database.
    async fn both(dir: &tempfile::TempDir) -> [Store; 2] {
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        [Store::open(&url).await.expect("open"), postgres_store().await]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_what_the_writer_committed_and_cannot_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        for store in both(&dir).await {
            let backend = store.backend();
            store.insert_machine(MachineId(1), "p", "local", "h", Ts(0)).await.expect("write");
            // More readers than are kept idle, each asked at once while others are out.
            let seen = store
                .read(|a| {
                    store.read(|b| {
                        let n = |c: &Conn<'_>| one(c, "SELECT COUNT(*) FROM machines", params![], |r| r.get::<i64>(0));
                        Ok((n(a)?, n(b)?))
                    })
                })
                .expect("read");
            assert_eq!(seen, (1, 1), "{backend}");
            let refused = store.read(|c| exec(c, "DELETE FROM machines", params![]));
            assert!(refused.is_err(), "{backend}: a reader refuses writes");
            assert_eq!(store.max_machine_id().await.expect("max"), MachineId(1), "{backend}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_leaves_nothing_behind_and_the_next_one_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [lite, pg] = both(&dir).await;
        for store in [Store::open("sqlite::memory:").await.expect("open"), lite, pg] {
            let backend = store.backend();
            let insert = "INSERT INTO machines (id, pool, provisioner, state, token_hash, requested_at) VALUES (1, 'p', 'local', 'requested', 'h', 't')";
            let failed: Result<()> = store.write(|c| {
                exec(c, insert, params![])?;
                insert_event(c, MachineId(1), "t", "requested", "")?;
                Err(StoreError::Migrate("stop here".into()))
            });
            assert!(failed.is_err_and(|e| e.to_string().contains("stop here")), "{backend}: the closure's own error");
            assert_eq!(store.machine_event_count().await.expect("count"), 0, "{backend}: rolled back");
            assert_eq!(store.max_machine_id().await.expect("max"), MachineId(0), "{backend}: rolled back");
            // A statement the database refuses (the same id twice) fails its transaction whole.
            let refused = store.write(|c| {
                exec(c, insert, params![])?;
                exec(c, insert, params![])
            });
            assert!(refused.is_err(), "{backend}: a duplicate id is refused");
            assert_eq!(store.max_machine_id().await.expect("max"), MachineId(0), "{backend}: rolled back");
            store.insert_machine(MachineId(2), "p", "local", "h", Ts(0)).await.expect("the next write works");
            assert_eq!(store.max_machine_id().await.expect("max"), MachineId(2), "{backend}");
        }
    }

    /// A connection the server ends (a restart, an administrator) is made again: at most the
    /// call that met the break fails, and the one after it works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_connection_that_breaks_is_made_again() {
        let store = postgres_store().await;
        store.insert_machine(MachineId(1), "p", "local", "h1", Ts(0)).await.expect("write");
        assert!(store.machine(MachineId(1)).await.expect("read").is_some());
        for round in 0..3 {
            // From the writer: every other connection of the store's database (its readers).
            end_others(&store, true).await;
            let first = store.machine(MachineId(1)).await;
            let second = store.machine(MachineId(1)).await.expect("the read after a break works");
            assert!(second.is_some(), "round {round}");
            if let Err(e) = first {
                assert!(e.to_string().contains("PostgreSQL"), "{e}");
            }
        }
        // From a reader: the writer's connection.
        end_others(&store, false).await;
        let first = store.insert_machine(MachineId(2), "p", "local", "h2", Ts(0)).await;
        store.insert_machine(MachineId(3), "p", "local", "h3", Ts(0)).await.expect("the write after a break works");
        let expected = if first.is_ok() { 3 } else { 2 };
        assert_eq!(store.list_machines(None, None).await.expect("list").len(), expected);
    }

    /// Ends every connection to the store's database but the one this runs on (the writer's
    /// when `from_writer`, else a reader's), and waits until the server has ended them: its
    /// `pg_terminate_backend` only asks.
    async fn end_others(store: &Store, from_writer: bool) {
        let others = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let run = |sql: String| {
            let f = |c: &Conn<'_>| all(c, &sql, params![], |r| r.get::<i64>(0));
            if from_writer {
                store.write(f)
            } else {
                store.read(f)
            }
        };
        let pids = run(others.to_string()).expect("the others");
        assert!(!pids.is_empty(), "there are other connections to end");
        let list = pids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        run(format!(
            "SELECT pid FROM (SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN ({list})) AS t"
        ))
        .expect("end them");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !run(format!("SELECT pid FROM pg_stat_activity WHERE pid IN ({list})")).expect("ask").is_empty() {
            assert!(std::time::Instant::now() < deadline, "the server did not end the connections");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn change(message: &str) -> NewChange {
        NewChange {
            repo: "app".into(),
            branch: "main".into(),
            revision: format!("{:040x}", message.len()),
            author: "Ada".into(),
            committed_at: None,
            message: message.into(),
            files: vec![],
            source: "webhook".into(),
        }
    }

    /// A NUL in text (a build's output, a commit message) is kept as U+2400 on both backends:
    /// PostgreSQL refuses NUL in text, and a refused report would be sent again forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nul_in_text_is_stored_as_its_sign_on_both_backends() {
        let dir = tempfile::tempdir().expect("tempdir");
        for store in both(&dir).await {
            let backend = store.backend();
            store.record_changes(&[change("before\0after")], None, Ts(0)).await.expect("stored");
            let got = store.list_changes(None, None, 10).await.expect("list");
            assert_eq!(got[0].message, "before\u{2400}after", "{backend}");
        }
    }

    /// A write whose closure panics leaves nothing, and the next write works, on both backends
    /// (on PostgreSQL its transaction, and the write lock, must not outlive it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_panics_leaves_nothing_and_releases_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        for store in both(&dir).await {
            let backend = store.backend();
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _: Result<()> = store.write(|c| {
                    insert_event(c, MachineId(1), "t", "x", "")?;
                    panic!("a bug in a write");
                });
            }));
            assert!(panicked.is_err());
            store.insert_machine(MachineId(2), "p", "local", "h", Ts(0)).await.expect("the next write works");
            assert_eq!(
                store.machine_event_count().await.expect("count"),
                1,
                "{backend}: only the second write's event"
            );
        }
        // On PostgreSQL, another session can take the write lock at once.
        let store = postgres_store().await;
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Result<()> = store.write(|_| panic!("a bug in a write"));
        }));
        let other = postgres_store_on(&store).await;
        other
            .read(|c| {
                exec(c, "SET lock_timeout = '2s'", params![])?;
                one(c, &format!("SELECT pg_try_advisory_xact_lock({WRITE_LOCK})"), params![], |r| r.get::<bool>(0))
            })
            .map(|free| assert!(free, "the write lock is free"))
            .expect("ask for the lock");
    }

    /// On PostgreSQL a statement that failed spoils its transaction: a closure that carries on
    /// after it gets an error at the commit, not a silent rollback reported as success.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_statement_caught_inside_a_write_is_an_error_at_commit_on_postgres() {
        let store = postgres_store().await;
        let out = store.write(|c| {
            insert_event(c, MachineId(1), "t", "x", "")?;
            let _ = exec(c, "INSERT INTO no_such_table VALUES (1)", params![]);
            Ok(())
        });
        let e = out.expect_err("the commit says it did not commit");
        assert!(e.to_string().contains("nothing of it was committed"), "{e}");
        assert_eq!(store.machine_event_count().await.expect("count"), 0);
        store.insert_machine(MachineId(2), "p", "local", "h", Ts(0)).await.expect("the next write works");
    }

    /// A table changed by another process (a newer master's migration) under a prepared
    /// statement fails that statement once; then it is prepared again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_are_prepared_again_after_a_table_changed_under_them() {
        let store = postgres_store().await;
        store.record_changes(&[change("one")], None, Ts(0)).await.expect("stored");
        assert_eq!(store.list_changes(None, None, 10).await.expect("list").len(), 1);
        let other = postgres_store_on(&store).await;
        other.write(|c| exec(c, "ALTER TABLE changes ADD COLUMN extra BIGINT", params![])).expect("alter");
        let mut failures = 0;
        for _ in 0..4 {
            match store.list_changes(None, None, 10).await {
                Ok(rows) => assert_eq!(rows.len(), 1),
                Err(_) => failures += 1,
            }
        }
        assert!(failures <= 1, "{failures} reads failed");
    }

    /// A burst of reads waits for the capped connections instead of opening one each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_of_reads_shares_a_capped_number_of_connections() {
        let store = postgres_store().await;
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.read(|c| one(c, "SELECT COUNT(*) FROM pg_sleep(0.05)", params![], |r| r.get::<i64>(0)))
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("every read is served");
        }
        let open: i64 = store
            .write(|c| {
                one(c, "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()", params![], |r| {
                    r.get(0)
                })
            })
            .expect("count");
        assert!(open as usize <= PG_READERS + 1, "{open} connections");
    }

    /// Writers that meet at the lock wait their turn (off the async worker) and lose nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_all_land() {
        let dir = tempfile::tempdir().expect("tempdir");
        for store in both(&dir).await {
            let backend = store.backend();
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
            assert_eq!(store.list_machines(None, None).await.expect("list").len(), 200, "{backend}");
            assert_eq!(store.machine_event_count().await.expect("events"), 200, "{backend}");
        }
    }
}
