//! Leases and the masters' roll call: which master may act for a scope (the farm), fenced by
//! an epoch that grows at every change of holder, and every master that started on this
//! database with its last heartbeat. Times are the database's clock, so masters whose clocks
//! disagree still agree on who holds what.

use serde::Serialize;

use super::sql::{all, exec, one, opt, params, Conn};
use super::{Result, Store};

/// The scope of the whole farm: its holder is the active master.
pub const FARM: &str = "farm";

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseRow {
    pub scope: String,
    pub holder: String,
    pub epoch: i64,
    pub acquired_at: String,
    pub renewed_at: String,
    pub expires_at: String,
    /// Whether it has not expired yet (on the database's clock).
    pub held: bool,
}

/// A lease this master holds: what its writes are fenced with.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    pub scope: String,
    pub holder: String,
    pub epoch: i64,
}

/// A master that started on this database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MasterRow {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub url: String,
    pub started_at: String,
    pub heartbeat_at: String,
    pub stopped_at: Option<String>,
}

/// The database's clock `?` seconds (a real) ahead, as a stored time (RFC 3339, UTC, ms).
pub(super) fn db_time(c: &Conn<'_>) -> &'static str {
    match c {
        Conn::Lite(_) => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', CAST(? AS TEXT) || ' seconds')",
        Conn::Pg(_) => {
            "to_char((clock_timestamp() + make_interval(secs => ?)) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        }
    }
}

/// Whether `fence` is still held: the same holder and epoch, not expired.
pub(super) fn fence_holds(c: &Conn<'_>, fence: &Fence) -> Result<bool> {
    let now = db_time(c);
    let n: i64 = one(
        c,
        &format!("SELECT COUNT(*) FROM leases WHERE scope = ? AND holder = ? AND epoch = ? AND expires_at > {now}"),
        params![fence.scope, fence.holder, fence.epoch, 0.0],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

impl Store {
    /// Takes the lease of `scope` for `holder` for `ttl_secs`, when nobody holds it, it has
    /// expired, `holder` holds it already, or `stale` says its holder is dead (a process of
    /// this host that is gone); the epoch it is held with. `None`: someone else holds it.
    pub async fn acquire_lease(
        &self,
        scope: &str,
        holder: &str,
        ttl_secs: f64,
        stale: impl Fn(&str) -> bool,
    ) -> Result<Option<i64>> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            let current: Option<(String, i64, bool)> = opt(
                c,
                &format!("SELECT holder, epoch, expires_at > {now} FROM leases WHERE scope = ?"),
                params![0.0, scope],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let epoch = match current {
                None => {
                    exec(
                        c,
                        &format!(
                            "INSERT INTO leases (scope, holder, epoch, acquired_at, renewed_at, expires_at)
                             VALUES (?, ?, 1, {now}, {now}, {now})"
                        ),
                        params![scope, holder, 0.0, 0.0, ttl_secs],
                    )?;
                    return Ok(Some(1));
                }
                Some((h, epoch, true)) if h == holder => epoch,
                Some((h, epoch, live)) if !live || stale(&h) => epoch + 1,
                Some(_) => return Ok(None),
            };
            exec(
                c,
                &format!(
                    "UPDATE leases SET holder = ?, acquired_at = CASE WHEN epoch = ? THEN acquired_at ELSE {now} END,
                       epoch = ?, renewed_at = {now}, expires_at = {now} WHERE scope = ?"
                ),
                params![holder, epoch, 0.0, epoch, 0.0, ttl_secs, scope],
            )?;
            Ok(Some(epoch))
        })
    }

    /// Extends `fence`'s lease by `ttl_secs` from now, if it is still held; `false` when it
    /// was lost (expired, or taken).
    pub async fn renew_lease(&self, fence: &Fence, ttl_secs: f64) -> Result<bool> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            let done = exec(
                c,
                &format!(
                    "UPDATE leases SET renewed_at = {now}, expires_at = {now}
                     WHERE scope = ? AND holder = ? AND epoch = ? AND expires_at > {now}"
                ),
                params![0.0, ttl_secs, fence.scope, fence.holder, fence.epoch, 0.0],
            )?;
            Ok(done > 0)
        })
    }

    /// Gives `fence`'s lease up now (a master stopping), so a standby takes over at once.
    pub async fn release_lease(&self, fence: &Fence) -> Result<()> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            exec(
                c,
                &format!("UPDATE leases SET expires_at = {now} WHERE scope = ? AND holder = ? AND epoch = ?"),
                params![0.0, fence.scope, fence.holder, fence.epoch],
            )?;
            Ok(())
        })
    }

    /// Every lease, by scope.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>> {
        self.read(|c| {
            let now = db_time(c);
            all(
                c,
                &format!(
                    "SELECT scope, holder, epoch, acquired_at, renewed_at, expires_at, expires_at > {now} AS held
                     FROM leases ORDER BY scope"
                ),
                params![0.0],
                |r| {
                    Ok(LeaseRow {
                        scope: r.get("scope")?,
                        holder: r.get("holder")?,
                        epoch: r.get("epoch")?,
                        acquired_at: r.get("acquired_at")?,
                        renewed_at: r.get("renewed_at")?,
                        expires_at: r.get("expires_at")?,
                        held: r.get("held")?,
                    })
                },
            )
        })
    }

    /// Records (or records again) master `id` as started and beating now.
    pub async fn master_started(&self, id: &str, host: &str, pid: u32, url: &str) -> Result<()> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            exec(
                c,
                &format!(
                    "INSERT INTO masters (id, host, pid, url, started_at, heartbeat_at) VALUES (?, ?, ?, ?, {now}, {now})
                     ON CONFLICT (id) DO UPDATE SET url = excluded.url, heartbeat_at = excluded.heartbeat_at, stopped_at = NULL"
                ),
                params![id, host, pid, url, 0.0, 0.0],
            )?;
            Ok(())
        })
    }

    /// Master `id` is alive now (and, when it is known by then, serves `url`).
    pub async fn master_heartbeat(&self, id: &str, url: Option<&str>) -> Result<()> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            exec(
                c,
                &format!("UPDATE masters SET heartbeat_at = {now}, url = COALESCE(?, url) WHERE id = ?"),
                params![0.0, url, id],
            )?;
            Ok(())
        })
    }

    /// Master `id` stopped (cleanly).
    pub async fn master_stopped(&self, id: &str) -> Result<()> {
        self.write_unfenced(|c| {
            let now = db_time(c);
            exec(c, &format!("UPDATE masters SET stopped_at = {now} WHERE id = ?"), params![0.0, id])?;
            Ok(())
        })
    }

    /// The masters heard from within the last `within_secs`, newest first: the live ones and
    /// the recently gone (older rows are history, not shown).
    pub async fn masters(&self, within_secs: f64) -> Result<Vec<MasterRow>> {
        self.read(|c| {
            let now = db_time(c);
            all(
                c,
                &format!(
                    "SELECT id, host, pid, url, started_at, heartbeat_at, stopped_at FROM masters
                     WHERE heartbeat_at > {now} ORDER BY started_at DESC, id"
                ),
                params![-within_secs],
                |r| {
                    Ok(MasterRow {
                        id: r.get("id")?,
                        host: r.get("host")?,
                        pid: r.get("pid")?,
                        url: r.get("url")?,
                        started_at: r.get("started_at")?,
                        heartbeat_at: r.get("heartbeat_at")?,
                        stopped_at: r.get("stopped_at")?,
                    })
                },
            )
        })
    }
}
