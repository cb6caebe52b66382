//! A simulation's outcome as a table for people or JSON for scripts.

use std::fmt::Write;

use serde::Serialize;

use super::{Outcome, Totals};

/// One row of a sweep: the value tried and what it gave.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// The setting's value, as given.
    pub value: String,
    /// The totals with that value.
    pub total: Totals,
    /// Per pool, with that value.
    pub pools: std::collections::BTreeMap<String, Totals>,
}

/// `{"sweep": [{"value", "total"}, …]}`.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// The setting swept, as given (`pool.NAME.KEY`).
    pub setting: String,
    /// One row per value, in the order given.
    pub sweep: Vec<SweepRow>,
}

const HEAD: &str =
    "builds     cost   busy   idle   boot  floor  over floor  billed h  wait p50  wait p95  wait max  peak  launches";

fn row(out: &mut String, name: &str, width: usize, t: &Totals) {
    let _ = writeln!(
        out,
        "{name:<width$}  {:>6} {:>8.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>11.2} {:>9.1} {:>9} {:>9} {:>9} {:>5} {:>9}",
        t.builds,
        t.cost,
        t.busy_cost,
        t.idle_cost,
        t.boot_cost,
        t.floor_cost,
        t.cost_over_floor,
        t.billed_seconds / 3600.0,
        human(t.wait_p50_s),
        human(t.wait_p95_s),
        human(t.wait_max_s),
        t.peak_machines,
        t.launches,
    );
}

/// A wait in seconds as `45s`, `3m20s`, `1h05m`.
fn human(s: f64) -> String {
    let s = s.round() as i64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The outcome as a table: the totals, each pool, each builder, and the prices used.
pub fn table(o: &Outcome) -> String {
    let width = o.pools.keys().map(|k| k.len() + 5).chain([9]).max().unwrap_or(9);
    let mut out = String::new();
    let _ = writeln!(out, "{} changes from {} to {}", o.changes, o.from, o.until);
    if o.unwatched_changes > 0 {
        let _ = writeln!(out, "({} changes on branches the repo does not watch were left out)", o.unwatched_changes);
    }
    let _ = writeln!(out, "{:<width$}  {HEAD}", "");
    row(&mut out, "TOTAL", width, &o.total);
    for (name, t) in &o.pools {
        row(&mut out, &format!("pool {name}"), width, t);
    }
    if o.total.retries > 0 || o.total.unfinished > 0 || o.total.gave_up > 0 {
        let _ = writeln!(
            out,
            "{} retried attempts ({} spot interruptions); {} builds gave up after {} attempts; {} unfinished",
            o.total.retries,
            o.total.interruptions,
            o.total.gave_up,
            crate::core::build::MAX_ATTEMPTS,
            o.total.unfinished
        );
    }
    let bw = o.builders.keys().map(|k| k.len()).chain([7]).max().unwrap_or(7);
    let _ = writeln!(out, "\n{:<bw$}  builds     cost  wait p95", "builder");
    for (name, b) in &o.builders {
        let _ = writeln!(out, "{name:<bw$}  {:>6} {:>8.2} {:>9}", b.builds, b.cost, human(b.wait_p95_s));
    }
    let _ = writeln!(out, "\nprices per machine-hour:");
    for (name, p) in &o.prices {
        match p.hourly {
            Some(h) => _ = writeln!(out, "  {name}: {h:.4} ({})", p.source),
            None => _ = writeln!(out, "  {name}: unknown, counted as 0 (set hourly_price or prices in the pool)"),
        }
    }
    out
}

/// A sweep as a table: one row per value.
pub fn sweep_table(s: &Sweep) -> String {
    let width = s.sweep.iter().map(|r| r.value.len()).chain([s.setting.len()]).max().unwrap_or(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  {HEAD}", s.setting);
    for r in &s.sweep {
        row(&mut out, &r.value, width, &r.total);
    }
    out
}
