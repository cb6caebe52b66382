//! What the cost meter and `/metrics` read: machine lives and counts.

use super::*;

impl Store {
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

    /// How many machine events are stored (the meter's size).
    pub async fn machine_event_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM machine_events").fetch_one(&self.pool).await?)
    }
}
