//! What the cost meter and `/metrics` read: machine lives and counts.

use super::*;

impl Store {
    /// Every machine a cost report over `[since, until)` needs — those billed at some time in
    /// it, and every machine not gone (the report lists what runs now) — with its meter events
    /// (launched, connected, build_started, build_finished, gone), oldest machine first. `f`
    /// gets the machine and its events as lines of `at TAB kind TAB detail`, in order. One row
    /// per machine: the events are gathered by SQLite, not handed over one by one.
    pub async fn cost_lives(&self, since: Ts, until: Ts, mut f: impl FnMut(MachineFacts, &str)) -> Result<()> {
        let (since, until) = (ts_string(since), ts_string(until));
        self.read_long(|c| {
            let events = c.pick(
                "group_concat(e.at || char(9) || e.kind || char(9) || e.detail, char(10) ORDER BY e.id)",
                "string_agg(e.at || chr(9) || e.kind || chr(9) || e.detail, chr(10) ORDER BY e.id)",
            );
            let sql = format!(
                "SELECT m.id, m.pool, m.provisioner, m.state, m.instance_type, m.lifecycle, m.zone, m.hourly_price,
                    m.price_source, m.volume_hourly, m.terminated_at,
                    (SELECT {events} FROM machine_events e
                     WHERE e.machine_id = m.id
                       AND e.kind IN ('launched', 'connected', 'build_started', 'build_finished', 'gone')) AS events
             FROM machines m WHERE m.launched_at IS NOT NULL
               AND ((m.launched_at < ?2 AND (m.terminated_at IS NULL OR m.terminated_at >= ?1)) OR m.state != 'gone')
             ORDER BY m.id"
            );
            each(c, &sql, params![since, until], |r| {
                let facts = MachineFacts {
                    id: r.get("id")?,
                    pool: r.get("pool")?,
                    provisioner: r.get("provisioner")?,
                    state: r.get("state")?,
                    instance_type: r.get("instance_type")?,
                    lifecycle: r.get("lifecycle")?,
                    zone: r.get("zone")?,
                    hourly_price: r.get("hourly_price")?,
                    price_source: r.get("price_source")?,
                    volume_hourly: r.get("volume_hourly")?,
                    terminated_at: r.get("terminated_at")?,
                };
                let events: Option<String> = r.get("events")?;
                f(facts, events.as_deref().unwrap_or_default());
                Ok(true)
            })?;
            Ok(())
        })
    }

    /// Counts for `/metrics`: live machines by (pool, state), build attempts by state,
    /// machines ever launched and failed launches by pool.
    pub async fn metric_counts(&self) -> Result<MetricCounts> {
        self.read(|c| {
            let machines = all(
                c,
                "SELECT pool, state, COUNT(*) FROM machines WHERE state != 'gone' GROUP BY pool, state ORDER BY pool, state",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let builds = all(c, "SELECT state, COUNT(*) FROM builds GROUP BY state ORDER BY state", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            let launched = all(
                c,
                "SELECT pool, COUNT(*) FROM machines WHERE launched_at IS NOT NULL GROUP BY pool ORDER BY pool",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let launch_failures = all(
                c,
                "SELECT m.pool, COUNT(*) FROM machine_events e JOIN machines m ON m.id = e.machine_id
             WHERE e.kind = 'launch_failed' GROUP BY m.pool ORDER BY m.pool",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(MetricCounts { machines, builds, launched, launch_failures })
        })
    }

    /// How many machine events are stored (the meter's size).
    pub async fn machine_event_count(&self) -> Result<i64> {
        self.read(|c| one(c, "SELECT COUNT(*) FROM machine_events", params![], |r| r.get(0)))
    }
}
