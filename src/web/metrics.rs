//! `/metrics` in the Prometheus text format (version 0.0.4), and `/readyz`.
//!
//! Everything is read at scrape time from the store and the process's counters, so a
//! restarted master reports the same totals (they live in the database).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use super::ApiError;
use crate::runtime::Shared;

/// The exposition being written: one family (HELP, TYPE, samples) at a time.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `GET /metrics`.
pub async fn metrics(_: super::auth::Admin, State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    let counts = s.store.metric_counts().await?;
    let queued = s.store.builds_in_state("queued").await?;
    let now = s.now();
    let hour = crate::cost::spend(&s.store, crate::cost::caps::hour_start(now), now).await?;
    let day = crate::cost::spend(&s.store, crate::cost::caps::day_start(now), now).await?;
    let mut out = Exposition::default();

    out.family("paddock_queue_depth", "gauge", "Builds waiting for a machine, per pool.");
    let mut depth: BTreeMap<&str, usize> = s.config.pools.iter().map(|p| (p.name.as_str(), 0)).collect();
    for b in &queued {
        if let Some(n) = s.config.builder(&b.builder).and_then(|builder| depth.get_mut(builder.pool.as_str())) {
            *n += 1;
        }
    }
    for (pool, n) in &depth {
        out.sample("paddock_queue_depth", &[("pool", pool)], *n as f64);
    }

    out.family("paddock_machines", "gauge", "Machines not yet gone, per pool and state.");
    for (pool, state, n) in &counts.machines {
        out.sample("paddock_machines", &[("pool", pool), ("state", state)], *n as f64);
    }

    out.family("paddock_builds", "gauge", "Build attempts in the database, per state (result, for ended ones).");
    for (state, n) in &counts.builds {
        out.sample("paddock_builds", &[("state", state)], *n as f64);
    }

    out.family("paddock_machines_launched_total", "counter", "Machines launched, per pool.");
    for (pool, n) in &counts.launched {
        out.sample("paddock_machines_launched_total", &[("pool", pool)], *n as f64);
    }

    out.family("paddock_launch_failures_total", "counter", "Failed launches, per pool.");
    for (pool, n) in &counts.launch_failures {
        out.sample("paddock_launch_failures_total", &[("pool", pool)], *n as f64);
    }

    out.family(
        "paddock_cloud_throttled_calls_total",
        "counter",
        "Cloud API calls answered with a throttling error since the master started.",
    );
    out.sample(
        "paddock_cloud_throttled_calls_total",
        &[("provider", "ec2")],
        paddock_provisioners::ec2::throttled_calls() as f64,
    );

    out.family(
        "paddock_spend_dollars",
        "gauge",
        "USD spent on machines in the current UTC hour and day, per pool (what the spend caps compare).",
    );
    for p in &s.config.pools {
        for (window, spend) in [("hour", &hour), ("day", &day)] {
            let v = spend.by_pool.get(&p.name).copied().unwrap_or(0.0);
            out.sample("paddock_spend_dollars", &[("pool", &p.name), ("window", window)], v);
        }
    }

    out.family("paddock_spend_capped", "gauge", "1 while a reached spend cap stops the pool from launching.");
    let holds = s.spend_holds.lock().map(|h| h.clone()).unwrap_or_default();
    for p in &s.config.pools {
        out.sample("paddock_spend_capped", &[("pool", &p.name)], if holds.contains_key(&p.name) { 1.0 } else { 0.0 });
    }

    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out.0))
}

/// `GET /readyz`: 200 while the database answers and the master takes builds; 503 (with why)
/// while it shuts down or cannot reach its database.
pub async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down: no new builds\n".to_string());
    }
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("database unreachable: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_in_the_text_format_with_escaped_labels() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "An example.");
        e.sample("x_total", &[("pool", "a\"b\\c\nd")], 3.0);
        e.sample("x_total", &[], 0.5);
        assert_eq!(
            e.0,
            "# HELP x_total An example.\n# TYPE x_total counter\nx_total{pool=\"a\\\"b\\\\c\\nd\"} 3\nx_total 0.5\n"
        );
    }
}
