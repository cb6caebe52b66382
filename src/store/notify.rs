//! The notification outbox (`build_events`) and the deliveries made from it.

use super::{params, Conn, Row};
use serde::Serialize;

use super::{all, exec, one, opt, ts_string, Result, Store};
use crate::core::{BuildId, Ts};

/// A build started or finished, waiting to be turned into deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildEvent {
    pub id: i64,
    pub build: BuildId,
    /// `started` or `finished`.
    pub kind: String,
}

/// Where a finished build stands among the builds of its builder and branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// The latest result of the builds asked for before it.
    pub previous: Option<String>,
    /// A build asked for after it had already finished when it did.
    pub superseded: bool,
}

/// A delivery to make: which notifier, for which build and event, and what to send.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub notifier: String,
    pub build: BuildId,
    /// `started`, `finished` or `transition`.
    pub event: String,
    /// JSON the notifier sends (rendered when the event happened).
    pub payload: String,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: i64,
    pub notifier: String,
    pub build: BuildId,
    pub event: String,
    #[serde(skip)]
    pub payload: String,
    pub state: String,
    pub attempts: i64,
    pub next_at: String,
    pub last_error: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
}

fn delivery(r: &Row<'_>) -> Result<Delivery> {
    Ok(Delivery {
        id: r.get("id")?,
        notifier: r.get("notifier")?,
        build: r.get("build_id")?,
        event: r.get("event")?,
        payload: r.get("payload")?,
        state: r.get("state")?,
        attempts: r.get("attempts")?,
        next_at: r.get("next_at")?,
        last_error: r.get("last_error")?,
        created_at: r.get("created_at")?,
        sent_at: r.get("sent_at")?,
    })
}

/// Writes a build's start or end to the outbox, inside the transaction that records it.
pub(super) fn outbox(c: &Conn<'_>, build: BuildId, kind: &str, at: &str) -> Result<()> {
    exec(c, "INSERT INTO build_events (build_id, kind, created_at) VALUES (?, ?, ?)", params![build, kind, at])?;
    Ok(())
}

impl Store {
    /// Outbox rows not yet turned into deliveries, oldest first.
    pub async fn pending_build_events(&self, limit: i64) -> Result<Vec<BuildEvent>> {
        self.read(|c| {
            all(
                c,
                "SELECT id, build_id, kind FROM build_events WHERE processed = 0 ORDER BY id LIMIT ?",
                params![limit],
                |r| Ok(BuildEvent { id: r.get("id")?, build: r.get("build_id")?, kind: r.get("kind")? }),
            )
        })
    }

    /// Where a finished build stands on its builder and branch when it finished, in the order
    /// builds were asked for (not the order they finished: with several machines, an older
    /// change can finish after a newer one). Only builds finished before it count, so the
    /// answer is the same however late it is asked. Cancelled and retried attempts are no
    /// result. Forced builds and rebuilds are judged against the branch's line but never set
    /// it: they often build an older revision (is that failure flaky?), and must neither hide
    /// the next change's news nor be the result it is compared with.
    pub async fn standing(&self, build: BuildId) -> Result<Standing> {
        const LINE: &str = "p.state IN ('success', 'failure', 'exception')
               AND (p.finished_at < b.finished_at OR (p.finished_at = b.finished_at AND p.id < b.id))
               AND (SELECT r.scheduler FROM build_requests r WHERE r.id = p.request_id) NOT IN ('force', 'rebuild')";
        self.read(|c| {
            let previous = opt(
                c,
                &format!(
                    "SELECT p.state FROM builds b JOIN builds p ON p.builder = b.builder AND p.branch = b.branch
             WHERE b.id = ? AND p.request_id < b.request_id AND {LINE}
             ORDER BY p.request_id DESC, p.attempt DESC LIMIT 1"
                ),
                params![build],
                |r| r.get(0),
            )?;
            let superseded: bool = one(
                c,
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM builds b JOIN builds p ON p.builder = b.builder AND p.branch = b.branch
             WHERE b.id = ? AND p.request_id > b.request_id AND {LINE})"
                ),
                params![build],
                |r| r.get(0),
            )?;
            Ok(Standing { previous, superseded })
        })
    }

    /// Marks outbox rows handled with nothing to deliver (no notifier is configured).
    pub async fn skip_build_events(&self, events: &[i64]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let ids = serde_json::to_string(events).unwrap_or_else(|_| "[]".into());
        self.write(|c| {
            exec(
                c,
                &format!("UPDATE build_events SET processed = 1 WHERE id IN ({})", super::json_ids(c)),
                params![ids],
            )
        })?;
        Ok(())
    }

    /// Stores an outbox row's deliveries (a delivery already made for its key is kept as it
    /// is) and marks the row done, in one transaction.
    pub async fn plan_deliveries(&self, event: i64, deliveries: &[NewDelivery], now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        self.write(|c| {
            for d in deliveries {
                exec(
                    c,
                    "INSERT INTO deliveries (notifier, build_id, event, dedup, payload, next_at, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup) DO NOTHING",
                    params![
                        &d.notifier,
                        d.build,
                        &d.event,
                        format!("{}|{}|{}", d.notifier, d.build, d.event),
                        &d.payload,
                        &now_s,
                        &now_s
                    ],
                )?;
            }
            exec(c, "UPDATE build_events SET processed = 1 WHERE id = ?", params![event])?;
            Ok(())
        })
    }

    /// Deliveries due now, oldest first. One waits while an earlier one of the same notifier
    /// about the same builder and branch, or the same revision, is still pending: messages
    /// about one line of work arrive in order (a channel never reads "passing" before
    /// "failing", a late `pending` never overwrites a newer attempt's status).
    pub async fn due_deliveries(&self, now: Ts, limit: i64) -> Result<Vec<Delivery>> {
        self.read(|c| {
            all(
                c,
                "SELECT d.* FROM deliveries d JOIN builds b ON b.id = d.build_id
             WHERE d.state = 'pending' AND d.next_at <= ?
               AND NOT EXISTS (
                 SELECT 1 FROM deliveries e JOIN builds eb ON eb.id = e.build_id
                 WHERE e.notifier = d.notifier AND e.id < d.id AND e.state = 'pending'
                   AND ((eb.builder = b.builder AND eb.branch = b.branch) OR (eb.repo = b.repo AND eb.revision = b.revision)))
             ORDER BY d.id LIMIT ?",
                params![ts_string(now), limit],
                delivery,
            )
        })
    }

    /// The earliest time a pending delivery is due, if any.
    pub async fn next_delivery_at(&self) -> Result<Option<String>> {
        self.read(|c| one(c, "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'", params![], |r| r.get(0)))
    }

    /// A delivery went out.
    pub async fn delivery_sent(&self, id: i64, now: Ts) -> Result<()> {
        self.write(|c| {
            exec(
                c,
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL WHERE id = ?",
                params![ts_string(now), id],
            )
        })?;
        Ok(())
    }

    /// A delivery failed: try again at `retry_at`, or give up (`None`).
    pub async fn delivery_failed(&self, id: i64, error: &str, retry_at: Option<Ts>) -> Result<()> {
        let (state, next) = match retry_at {
            Some(t) => ("pending", Some(ts_string(t))),
            None => ("failed", None),
        };
        self.write(|c| {
            exec(
                c,
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, next_at = COALESCE(?, next_at)
             WHERE id = ?",
                params![state, error, next, id],
            )
        })?;
        Ok(())
    }

    /// Forgets outbox rows already planned and deliveries already sent or given up, older than
    /// `before` (pending ones are kept whatever their age). Returns how many rows went.
    pub async fn prune_notifications(&self, before: Ts) -> Result<u64> {
        let before = ts_string(before);
        let gone = self.write(|c| {
            let events = exec(c, "DELETE FROM build_events WHERE processed = 1 AND created_at < ?", params![&before])?;
            let deliveries = exec(
                c,
                "DELETE FROM deliveries WHERE state IN ('sent', 'failed') AND created_at < ?",
                params![&before],
            )?;
            Ok(events + deliveries)
        })?;
        Ok(gone as u64)
    }

    /// The newest deliveries, for the API.
    pub async fn deliveries(&self, limit: i64) -> Result<Vec<Delivery>> {
        self.read(|c| all(c, "SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", params![limit], delivery))
    }
}
