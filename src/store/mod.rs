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

use crate::core::build::{after_loss, AfterLoss};
use crate::core::{BuildId, ChangeId, MachineId, Ts};
use crate::cost::report::MachineFacts;

mod accounts;
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

/// Formats a time the way the API and the database want it: RFC 3339, UTC, milliseconds.
pub fn ts_string(ts: Ts) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ts.0) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

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
    pub state: String,
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
        state: r.get("state"),
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

    /// What the notifier's planner waits on: raised after every transaction that may have
    /// written a notification event (a permit is kept when nobody waits).
    pub fn news(&self) -> Arc<tokio::sync::Notify> {
        self.news.clone()
    }

    /// Stores new commits of one branch and moves its head, in one transaction. A commit
    /// already stored for that branch is skipped; only the new changes are returned.
    pub async fn record_changes(
        &self,
        changes: &[NewChange],
        head: Option<(&str, &str, &str)>,
        now: Ts,
    ) -> Result<Vec<ChangeRow>> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(changes.len());
        for c in changes {
            let files = serde_json::to_string(&c.files).unwrap_or_else(|_| "[]".into());
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO changes (repo, branch, revision, author, committed_at, message, files, source, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repo, branch, revision) DO NOTHING RETURNING id",
            )
            .bind(&c.repo)
            .bind(&c.branch)
            .bind(&c.revision)
            .bind(&c.author)
            .bind(&c.committed_at)
            .bind(&c.message)
            .bind(files)
            .bind(&c.source)
            .bind(&now_s)
            .fetch_optional(&mut *tx)
            .await?;
            ids.extend(id);
        }
        if let Some((repo, branch, revision)) = head {
            set_head(&mut *tx, repo, branch, revision, &now_s).await?;
        }
        tx.commit().await?;
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(row) = self.change(id).await? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Records a branch head without a change (first sight of a branch).
    pub async fn set_head(&self, repo: &str, branch: &str, revision: &str, now: Ts) -> Result<()> {
        set_head(&self.pool, repo, branch, revision, &ts_string(now)).await
    }

    /// Forgets a branch that no longer exists.
    pub async fn delete_head(&self, repo: &str, branch: &str) -> Result<()> {
        sqlx::query("DELETE FROM branch_heads WHERE repo = ? AND branch = ?")
            .bind(repo)
            .bind(branch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The last known head of every branch of `repo`.
    pub async fn heads(&self, repo: &str) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT branch, revision FROM branch_heads WHERE repo = ?")
            .bind(repo)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get("branch"), r.get("revision"))).collect())
    }

    /// One change by id.
    pub async fn change(&self, id: ChangeId) -> Result<Option<ChangeRow>> {
        let row = sqlx::query("SELECT * FROM changes WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(change_row))
    }

    /// Changes, newest first.
    pub async fn list_changes(&self, repo: Option<&str>, branch: Option<&str>, limit: i64) -> Result<Vec<ChangeRow>> {
        let rows = sqlx::query(
            "SELECT * FROM changes WHERE (?1 IS NULL OR repo = ?1) AND (?2 IS NULL OR branch = ?2) ORDER BY id DESC LIMIT ?3",
        )
        .bind(repo)
        .bind(branch)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// Changes the schedulers have not finished with (replayed after a restart), oldest first.
    pub async fn unscheduled_changes(&self) -> Result<Vec<ChangeRow>> {
        let rows = sqlx::query("SELECT * FROM changes WHERE scheduled = 0 ORDER BY id").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// (scheduler, change) pairs already turned into build requests since `since`: a change
    /// replayed after a crash must not be requested twice by the same scheduler.
    pub async fn requested_changes(&self, since: &str) -> Result<std::collections::HashSet<(String, ChangeId)>> {
        let rows =
            sqlx::query("SELECT scheduler, changes FROM build_requests WHERE changes != '[]' AND submitted_at >= ?")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        let mut out = std::collections::HashSet::new();
        for r in rows {
            let scheduler: String = r.get("scheduler");
            let ids: Vec<ChangeId> = serde_json::from_str(&r.get::<String, _>("changes")).unwrap_or_default();
            out.extend(ids.into_iter().map(|id| (scheduler.clone(), id)));
        }
        Ok(out)
    }

    /// Marks changes as fully considered by the schedulers.
    pub async fn mark_scheduled(&self, ids: &[ChangeId]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("UPDATE changes SET scheduled = 1 WHERE id = ?").bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stores a build request and its first attempt (queued); returns the attempt.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_request(
        &self,
        builder: &str,
        repo: &str,
        branch: &str,
        revision: &str,
        scheduler: &str,
        reason: &str,
        changes: &[ChangeId],
        now: Ts,
    ) -> Result<BuildRow> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let request: i64 = sqlx::query_scalar(
            "INSERT INTO build_requests (builder, repo, branch, revision, scheduler, reason, changes, submitted_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(builder)
        .bind(repo)
        .bind(branch)
        .bind(revision)
        .bind(scheduler)
        .bind(reason)
        .bind(serde_json::to_string(changes).unwrap_or_else(|_| "[]".into()))
        .bind(&now_s)
        .fetch_one(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {BUILD_COLUMNS}"
        ))
        .bind(request)
        .bind(builder)
        .bind(repo)
        .bind(branch)
        .bind(revision)
        .bind(reason)
        .bind(&now_s)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(build_row(&row))
    }

    /// Builds in the given state, oldest first.
    pub async fn builds_in_state(&self, state: &str) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE state = ? ORDER BY id"))
            .bind(state)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(build_row).collect())
    }

    /// One build attempt.
    pub async fn build(&self, id: BuildId) -> Result<Option<BuildRow>> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(build_row))
    }

    /// Build attempts, newest first.
    pub async fn list_builds(&self, f: &BuildFilter) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE (?1 IS NULL OR builder = ?1) AND (?2 IS NULL OR branch = ?2)
             AND (?3 IS NULL OR state = ?3) ORDER BY id DESC LIMIT ?4"
        ))
        .bind(&f.builder)
        .bind(&f.branch)
        .bind(&f.state)
        .bind(f.limit.unwrap_or(100))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(build_row).collect())
    }

    /// Marks a queued attempt running on `machine` and creates its step rows.
    pub async fn start_build(&self, build: BuildId, machine: MachineId, steps: &[String], now: Ts) -> Result<bool> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE builds SET state = 'running', machine_id = ?, started_at = ? WHERE id = ? AND state = 'queued'",
        )
        .bind(machine)
        .bind(&now_s)
        .bind(build)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for (i, name) in steps.iter().enumerate() {
            sqlx::query("INSERT INTO steps (build_id, idx, name) VALUES (?, ?, ?)")
                .bind(build)
                .bind(i as i64)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE machines SET builds_run = builds_run + 1 WHERE id = ?")
            .bind(machine)
            .execute(&mut *tx)
            .await?;
        // The meter's record of the build says what it was, so a report attributes busy time
        // from the events alone: id, builder, repository, branch and committer (the author of
        // the newest change), tab-separated.
        sqlx::query(
            "INSERT INTO machine_events (machine_id, at, kind, detail)
             SELECT ?, ?, 'build_started', b.id || char(9) || b.builder || char(9) || b.repo || char(9) || b.branch
                    || char(9) || REPLACE(REPLACE(COALESCE(c.author, ''), char(9), ' '), char(10), ' ')
             FROM builds b JOIN build_requests r ON r.id = b.request_id
             LEFT JOIN changes c ON c.id = json_extract(r.changes, '$[#-1]')
             WHERE b.id = ?",
        )
        .bind(machine)
        .bind(&now_s)
        .bind(build)
        .execute(&mut *tx)
        .await?;
        notify::outbox(&mut tx, build, "started", &now_s).await?;
        tx.commit().await?;
        self.news.notify_one();
        Ok(true)
    }

    /// Ends a running attempt with its result, if it is still running on that machine.
    pub async fn finish_build(&self, build: BuildId, machine: MachineId, result: &str, now: Ts) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = finish_build_in(&mut tx, build, machine, result, now).await?;
        tx.commit().await?;
        self.news.notify_one();
        Ok(done)
    }

    /// Stores one numbered report of an agent about `build`, with the log text it carries: only
    /// if the build's stored sequence is at `after` (the report before it), and then moves it to
    /// `seq`, all in one transaction. A report already stored (or overtaken) changes nothing.
    pub async fn apply_report(
        &self,
        build: BuildId,
        after: u64,
        seq: u64,
        log: Option<(i64, &str)>,
        effect: ReportEffect<'_>,
        now: Ts,
    ) -> Result<Applied> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query("UPDATE builds SET applied_seq = ? WHERE id = ? AND applied_seq = ?")
            .bind(seq as i64)
            .bind(build)
            .bind(after as i64)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() == 0 {
            drop(tx);
            let applied: Option<i64> = sqlx::query_scalar("SELECT applied_seq FROM builds WHERE id = ?")
                .bind(build)
                .fetch_optional(&self.pool)
                .await?;
            return Ok(Applied::Stale { applied: applied.unwrap_or(0).max(0) as u64 });
        }
        if let Some((step, text)) = log.filter(|(_, t)| !t.is_empty()) {
            append_log_in(&mut tx, build, step, text, now).await?;
        }
        let finished = match effect {
            ReportEffect::None => false,
            ReportEffect::StepStarted { step } => {
                step_started_in(&mut tx, build, step, now).await?;
                false
            }
            ReportEffect::StepFinished { step, result, exit_code } => {
                step_finished_in(&mut tx, build, step, result, exit_code, now).await?;
                false
            }
            ReportEffect::BuildFinished { machine, result } => {
                finish_build_in(&mut tx, build, machine, result, now).await?
            }
        };
        tx.commit().await?;
        if finished {
            self.news.notify_one();
        }
        Ok(Applied::Stored { finished })
    }

    /// How far the reports of `build` are stored: the highest sequence number, and the bytes of
    /// log text (toward [`crate::agent::protocol::MAX_LOG_BYTES`]).
    pub async fn report_position(&self, build: BuildId) -> Result<(u64, usize)> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT b.applied_seq, COALESCE((SELECT SUM(LENGTH(CAST(text AS BLOB))) FROM log_chunks WHERE build_id = b.id), 0)
             FROM builds b WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or((0, 0), |(seq, bytes)| (seq.max(0) as u64, bytes.max(0) as usize)))
    }

    /// Marks an attempt `retry` and queues the next attempt of the same request, in one
    /// transaction. Returns the new attempt, or `None` if the attempt had already ended.
    pub async fn retry_build(&self, build: BuildId, reason: &str, now: Ts) -> Result<Option<BuildRow>> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let attempt: Option<(i64, Option<i64>, String, Option<String>)> = sqlx::query_as(
            "SELECT attempt, machine_id, state, cancelled_by FROM builds WHERE id = ? AND state IN ('queued', 'running')",
        )
        .bind(build)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempt, machine, was, cancelled_by)) = attempt else {
            return Ok(None);
        };
        let decision = after_loss(u32::try_from(attempt).unwrap_or(u32::MAX), cancelled_by.is_some());
        if decision == AfterLoss::Cancelled {
            // Someone cancelled it and its machine went away before saying so: it ends
            // cancelled, never runs again.
            sqlx::query("UPDATE builds SET state = 'cancelled', finished_at = ? WHERE id = ?")
                .bind(&now_s)
                .bind(build)
                .execute(&mut *tx)
                .await?;
            close_open_steps(&mut tx, build, "cancelled").await?;
            if let (Some(machine), "running") = (machine, was.as_str()) {
                insert_event(&mut *tx, machine, &now_s, "build_finished", &format!("{build} cancelled")).await?;
                notify::outbox(&mut tx, build, "finished", &now_s).await?;
            }
            tx.commit().await?;
            self.news.notify_one();
            return Ok(None);
        }
        // A build that keeps killing its machine must not launch machines forever.
        let give_up = decision == AfterLoss::GiveUp;
        let (state, why) = match give_up {
            true => ("exception", format!("gave up after {MAX_ATTEMPTS} attempts; the last one: {reason}")),
            false => ("retry", reason.to_string()),
        };
        sqlx::query("UPDATE builds SET state = ?, reason = ?, finished_at = ? WHERE id = ?")
            .bind(state)
            .bind(why)
            .bind(&now_s)
            .bind(build)
            .execute(&mut *tx)
            .await?;
        close_open_steps(&mut tx, build, "cancelled").await?;
        if let (Some(machine), "running") = (machine, was.as_str()) {
            insert_event(&mut *tx, machine, &now_s, "build_finished", &format!("{build} {state}")).await?;
        }
        if give_up {
            // Its end is news like any other (a pending commit status must not stay pending).
            notify::outbox(&mut tx, build, "finished", &now_s).await?;
            tx.commit().await?;
            self.news.notify_one();
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at, attempt)
             SELECT request_id, builder, repo, branch, revision, ?, ?, attempt + 1 FROM builds WHERE id = ?
             RETURNING {BUILD_COLUMNS}"
        ))
        .bind(format!("retry of build {build}: {reason}"))
        .bind(&now_s)
        .bind(build)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(build_row(&row)))
    }

    /// Cancels a build that has not started; `false` if it was no longer queued.
    pub async fn cancel_queued(&self, build: BuildId, by: &str, now: Ts) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE builds SET state = 'cancelled', cancelled_by = ?, finished_at = ? WHERE id = ? AND state = 'queued'",
        )
        .bind(by)
        .bind(ts_string(now))
        .bind(build)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Notes who asked to cancel a running build (its agent then reports it `cancelled`);
    /// `false` if it was no longer running.
    pub async fn cancel_requested(&self, build: BuildId, by: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE builds SET cancelled_by = ? WHERE id = ? AND state = 'running'")
            .bind(by)
            .bind(build)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The changes a build was made for (the scheduler's), or else the stored commit of its
    /// revision (a forced build), newest first.
    pub async fn build_changes(&self, build: BuildId) -> Result<Vec<ChangeRow>> {
        let Some((ids, repo, revision)) = sqlx::query_as::<_, (String, String, String)>(
            "SELECT r.changes, b.repo, b.revision FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(Vec::new());
        };
        let ids: Vec<ChangeId> = serde_json::from_str(&ids).unwrap_or_default();
        let rows = if ids.is_empty() {
            sqlx::query("SELECT * FROM changes WHERE repo = ? AND revision = ? ORDER BY id DESC LIMIT 1")
                .bind(repo)
                .bind(revision)
                .fetch_all(&self.pool)
                .await?
        } else {
            sqlx::query("SELECT * FROM changes WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id DESC")
                .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
                .fetch_all(&self.pool)
                .await?
        };
        Ok(rows.iter().map(change_row).collect())
    }

    /// The change ids of a build's request (what a rebuild carries over).
    pub async fn build_change_ids(&self, build: BuildId) -> Result<Vec<ChangeId>> {
        let ids: Option<String> = sqlx::query_scalar(
            "SELECT r.changes FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?;
        Ok(ids.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default())
    }

    /// Ends a queued attempt that can never run, as `exception` with the reason.
    pub async fn abandon_build(&self, build: BuildId, reason: &str, now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE builds SET state = 'exception', reason = ?, finished_at = ? WHERE id = ? AND state = 'queued'",
        )
        .bind(reason)
        .bind(&now_s)
        .bind(build)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            notify::outbox(&mut tx, build, "finished", &now_s).await?;
        }
        tx.commit().await?;
        self.news.notify_one();
        Ok(())
    }

    /// Marks a step running.
    pub async fn step_started(&self, build: BuildId, idx: i64, now: Ts) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        step_started_in(&mut tx, build, idx, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a step's result.
    pub async fn step_finished(
        &self,
        build: BuildId,
        idx: i64,
        result: &str,
        exit_code: Option<i32>,
        now: Ts,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        step_finished_in(&mut tx, build, idx, result, exit_code, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Steps of a build, in order.
    pub async fn steps(&self, build: BuildId) -> Result<Vec<StepRow>> {
        let rows = sqlx::query("SELECT * FROM steps WHERE build_id = ? ORDER BY idx")
            .bind(build)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| StepRow {
                index: r.get("idx"),
                name: r.get("name"),
                state: r.get("state"),
                exit_code: r.get("exit_code"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
            })
            .collect())
    }

    /// Appends (already redacted) log text to a build's step.
    pub async fn append_log(&self, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        append_log_in(&mut tx, build, idx, text, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The whole log of a build, chunks concatenated in arrival order.
    pub async fn log(&self, build: BuildId) -> Result<String> {
        let rows = sqlx::query("SELECT text FROM log_chunks WHERE build_id = ? ORDER BY id")
            .bind(build)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>("text")).collect())
    }

    /// The largest machine id ever used (ids are never reused: they are idempotency tokens).
    pub async fn max_machine_id(&self) -> Result<MachineId> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM machines").fetch_one(&self.pool).await?;
        Ok(id.unwrap_or(0))
    }

    /// Writes a machine's row in `requested` state, before anything is launched.
    pub async fn insert_machine(
        &self,
        id: MachineId,
        pool: &str,
        provisioner: &str,
        token_hash: &str,
        now: Ts,
    ) -> Result<()> {
        let now_s = ts_string(now);
        sqlx::query(
            "INSERT INTO machines (id, pool, provisioner, state, token_hash, requested_at) VALUES (?, ?, ?, 'requested', ?, ?)",
        )
        .bind(id)
        .bind(pool)
        .bind(provisioner)
        .bind(token_hash)
        .bind(&now_s)
        .execute(&self.pool)
        .await?;
        self.machine_event(id, "requested", "", now).await
    }

    /// Records what the provisioner said about a launched machine and what it costs; its
    /// `launched` event starts the meter.
    pub async fn machine_launched(
        &self,
        id: MachineId,
        provider_id: &str,
        instance_type: Option<&str>,
        lifecycle: &str,
        price: &MachinePrice,
        now: Ts,
    ) -> Result<()> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
             hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ? WHERE id = ?",
        )
        .bind(provider_id)
        .bind(instance_type)
        .bind(lifecycle)
        .bind(&now_s)
        .bind(&price.zone)
        .bind(price.hourly_price)
        .bind(&price.price_source)
        .bind(price.volume_gb.map(i64::from))
        .bind(&price.volume_type)
        .bind(price.volume_hourly)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut *tx, id, &now_s, "launched", provider_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Of these machines, those the store has as gone, each with the instance it recorded.
    pub async fn gone_machines(
        &self,
        ids: &[MachineId],
    ) -> Result<std::collections::HashMap<MachineId, Option<String>>> {
        let mut gone = std::collections::HashMap::new();
        for id in ids {
            let row: Option<(i64, Option<String>)> =
                sqlx::query_as("SELECT id, provider_id FROM machines WHERE id = ? AND state = 'gone'")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            gone.extend(row);
        }
        Ok(gone)
    }

    /// One machine's row.
    pub async fn machine(&self, id: MachineId) -> Result<Option<MachineRow>> {
        let row = sqlx::query(&format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(machine_row))
    }

    /// Records the life of an instance the master learned of only after its machine was gone
    /// (a launch the cloud served too late): billed from `launched_at` to `gone_at`. Only for
    /// a machine that never recorded a launch (one intent, one instance); `false` otherwise.
    pub async fn late_life(
        &self,
        id: MachineId,
        launched: &paddock_provisioners::Launched,
        price: &MachinePrice,
        launched_at: Ts,
        gone_at: Ts,
    ) -> Result<bool> {
        let (from, to) = (ts_string(launched_at), ts_string(gone_at));
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
             hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ?, terminated_at = ?
             WHERE id = ? AND launched_at IS NULL AND state = 'gone'",
        )
        .bind(&launched.provider_id)
        .bind(launched.instance_type.as_deref())
        .bind(&launched.lifecycle)
        .bind(&from)
        .bind(&price.zone)
        .bind(price.hourly_price)
        .bind(&price.price_source)
        .bind(price.volume_gb.map(i64::from))
        .bind(&price.volume_type)
        .bind(price.volume_hourly)
        .bind(&to)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_event(&mut *tx, id, &from, "launched", &launched.provider_id).await?;
        insert_event(&mut *tx, id, &to, "gone", "late instance terminated").await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Moves a machine to a new state and records the event.
    pub async fn set_machine_state(&self, id: MachineId, state: &str, now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        // One transaction: the meter's `gone` (billing ends) and `terminated_at` agree.
        let mut tx = self.pool.begin().await?;
        if state == "gone" {
            sqlx::query("UPDATE machines SET state = ?, terminated_at = COALESCE(terminated_at, ?) WHERE id = ?")
                .bind(state)
                .bind(&now_s)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE machines SET state = ? WHERE id = ?").bind(state).bind(id).execute(&mut *tx).await?;
        }
        insert_event(&mut *tx, id, &now_s, state, "").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Appends to the machine's event log (the cost meter's input).
    pub async fn machine_event(&self, id: MachineId, kind: &str, detail: &str, now: Ts) -> Result<()> {
        insert_event(&self.pool, id, &ts_string(now), kind, detail).await
    }

    /// The machine whose one-time token this is, if the token is unspent and the machine is
    /// starting: what authorises a machine to download the agent while it boots.
    pub async fn machine_for_unused_token(&self, token_hash: &str) -> Result<Option<MachineId>> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM machines
             WHERE token_hash = ? AND token_used = 0 AND state IN ('requested', 'launching', 'booting')",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Spends a one-time token: returns the machine it belongs to if it was unused and the
    /// machine is not gone. A second call with the same token returns `None`.
    pub async fn claim_token(&self, token_hash: &str, now: Ts) -> Result<Option<MachineId>> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar(
            "UPDATE machines SET token_used = 1, connected_at = ?
             WHERE token_hash = ? AND token_used = 0 AND state NOT IN ('gone', 'stopping', 'lost') RETURNING id",
        )
        .bind(&now_s)
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = id {
            // The meter's "agent connected": boot time ends here.
            insert_event(&mut *tx, id, &now_s, "connected", "").await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Records the hash of the resume token just given to a machine's agent after its Hello
    /// (no earlier resume token stays valid).
    pub async fn set_resume_hash(&self, machine: MachineId, hash: &str) -> Result<()> {
        sqlx::query("UPDATE machines SET resume_hash = ?, resume_prev = NULL WHERE id = ?")
            .bind(hash)
            .bind(machine)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Spends a resume token: if `presented` is the machine's current token (or the one before
    /// it, while its successor has not been confirmed in use: the Welcome carrying it may have
    /// been lost) and the machine is alive, `new_hash` becomes current and `presented` the one
    /// before, until [`Store::confirm_resume`] retires it.
    pub async fn claim_resume(&self, machine: MachineId, presented: &str, new_hash: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE machines SET resume_prev = ?1, resume_hash = ?2
             WHERE id = ?3 AND (resume_hash = ?1 OR resume_prev = ?1) AND state IN ('idle', 'busy')",
        )
        .bind(presented)
        .bind(new_hash)
        .bind(machine)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The agent is using the resume token whose hash is `hash` (it spoke on the connection that
    /// gave it): every token before it stops working.
    pub async fn confirm_resume(&self, machine: MachineId, hash: &str) -> Result<()> {
        sqlx::query(
            "UPDATE machines SET resume_prev = NULL WHERE id = ? AND resume_hash = ? AND resume_prev IS NOT NULL",
        )
        .bind(machine)
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Machines, newest first.
    pub async fn list_machines(&self, pool: Option<&str>, state: Option<&str>) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE (?1 IS NULL OR pool = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY id DESC"
        ))
        .bind(pool)
        .bind(state)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(machine_row).collect())
    }

    /// Machines not yet gone (left over from an earlier run, at start-up).
    pub async fn live_machines(&self) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE state != 'gone' ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(machine_row).collect())
    }

    /// A pool at a glance: its machines by state (gone ones left out), its latest launch
    /// failure (time, reason) and when a machine of it last launched.
    pub async fn pool_status(&self, pool: &str) -> Result<PoolStatus> {
        let machines: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM machines WHERE pool = ? AND state != 'gone' GROUP BY state ORDER BY state",
        )
        .bind(pool)
        .fetch_all(&self.pool)
        .await?;
        let last_launch_failure: Option<(String, String)> = sqlx::query_as(
            "SELECT e.at, e.detail FROM machine_events e JOIN machines m ON m.id = e.machine_id
             WHERE m.pool = ? AND e.kind = 'launch_failed' ORDER BY e.id DESC LIMIT 1",
        )
        .bind(pool)
        .fetch_optional(&self.pool)
        .await?;
        let last_launched_at: Option<String> =
            sqlx::query_scalar("SELECT MAX(launched_at) FROM machines WHERE pool = ?")
                .bind(pool)
                .fetch_one(&self.pool)
                .await?;
        Ok(PoolStatus { machines: machines.into_iter().collect(), last_launch_failure, last_launched_at })
    }

    /// Every machine a cost report over `[since, until)` needs — those billed at some time in
    /// it, and every machine not gone (the report lists what runs now) — with its meter events
    /// (launched, connected, build_started, build_finished, gone), oldest machine first. `f`
    /// gets the machine and its events as lines of `at TAB kind TAB detail`, in order. One row
    /// per machine: the events are gathered by SQLite, not handed over one by one.
    pub async fn cost_lives(&self, since: Ts, until: Ts, mut f: impl FnMut(MachineFacts, &str)) -> Result<()> {
        use futures_util::TryStreamExt;
        let mut rows = sqlx::query(
            "SELECT m.id, m.pool, m.provisioner, m.state, m.instance_type, m.lifecycle, m.zone, m.hourly_price,
                    m.price_source, m.volume_hourly, m.terminated_at,
                    (SELECT group_concat(e.at || char(9) || e.kind || char(9) || e.detail, char(10) ORDER BY e.id)
                     FROM machine_events e
                     WHERE e.machine_id = m.id
                       AND e.kind IN ('launched', 'connected', 'build_started', 'build_finished', 'gone')) AS events
             FROM machines m WHERE m.launched_at IS NOT NULL
               AND ((m.launched_at < ?2 AND (m.terminated_at IS NULL OR m.terminated_at >= ?1)) OR m.state != 'gone')
             ORDER BY m.id",
        )
        .bind(ts_string(since))
        .bind(ts_string(until))
        .fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            let facts = MachineFacts {
                id: r.try_get("id")?,
                pool: r.try_get("pool")?,
                provisioner: r.try_get("provisioner")?,
                state: r.try_get("state")?,
                instance_type: r.try_get("instance_type")?,
                lifecycle: r.try_get("lifecycle")?,
                zone: r.try_get("zone")?,
                hourly_price: r.try_get("hourly_price")?,
                price_source: r.try_get("price_source")?,
                volume_hourly: r.try_get("volume_hourly")?,
                terminated_at: r.try_get("terminated_at")?,
            };
            let events: Option<&str> = r.try_get("events")?;
            f(facts, events.unwrap_or_default());
        }
        Ok(())
    }

    /// Closes every connection (SQLite folds its write-ahead log into the file).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Counts for `/metrics`: live machines by (pool, state), build attempts by state,
    /// machines ever launched and failed launches by pool.
    pub async fn metric_counts(&self) -> Result<MetricCounts> {
        let machines = sqlx::query_as(
            "SELECT pool, state, COUNT(*) FROM machines WHERE state != 'gone' GROUP BY pool, state ORDER BY pool, state",
        )
        .fetch_all(&self.pool)
        .await?;
        let builds = sqlx::query_as("SELECT state, COUNT(*) FROM builds GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await?;
        let launched = sqlx::query_as(
            "SELECT pool, COUNT(*) FROM machines WHERE launched_at IS NOT NULL GROUP BY pool ORDER BY pool",
        )
        .fetch_all(&self.pool)
        .await?;
        let launch_failures = sqlx::query_as(
            "SELECT m.pool, COUNT(*) FROM machine_events e JOIN machines m ON m.id = e.machine_id
             WHERE e.kind = 'launch_failed' GROUP BY m.pool ORDER BY m.pool",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(MetricCounts { machines, builds, launched, launch_failures })
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// How many machine events are stored (the meter's size).
    pub async fn machine_event_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM machine_events").fetch_one(&self.pool).await?)
    }

    /// Every nightly scheduler's saved state.
    pub async fn nightly_states(&self) -> Result<Vec<NightlyRow>> {
        let rows = sqlx::query("SELECT name, last_fire, built FROM scheduler_state").fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| NightlyRow {
                name: r.get("name"),
                last_fire: Ts(r.get("last_fire")),
                built: serde_json::from_str(&r.get::<String, _>("built")).unwrap_or_default(),
            })
            .collect())
    }

    /// Saves a nightly scheduler's state.
    pub async fn save_nightly(&self, name: &str, last_fire: Ts, built: &BTreeMap<String, String>) -> Result<()> {
        sqlx::query(
            "INSERT INTO scheduler_state (name, last_fire, built) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire, built = excluded.built",
        )
        .bind(name)
        .bind(last_fire.0)
        .bind(serde_json::to_string(built).unwrap_or_else(|_| "{}".into()))
        .execute(&self.pool)
        .await?;
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
