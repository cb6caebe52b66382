//! Cost reports: machines' metered lives, priced, summed per pool, builder, branch, committer,
//! day or machine, and printed as a table, CSV or JSON. Pure: the store feeds it rows.
//!
//! Money is rounded to 4 decimal places in every format (sub-cent amounts matter for cost per
//! build), so the table, the CSV and the JSON carry the same numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::meter::{Life, Stretch, Use};
use crate::core::{BuildId, MachineId, Ts};

const MS_PER_HOUR: f64 = 3_600_000.0;
const DAY_MS: i64 = 86_400_000;
/// How far back "the current rate" for the 30-day projection looks.
const RECENT_MS: i64 = DAY_MS;
/// How many builders "top builders" lists.
const TOP_BUILDERS: usize = 5;

/// What rows a report is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Pool,
    Builder,
    Branch,
    Committer,
    Day,
    Machine,
}

impl GroupBy {
    const ALL: [(&'static str, GroupBy); 6] = [
        ("pool", GroupBy::Pool),
        ("builder", GroupBy::Builder),
        ("branch", GroupBy::Branch),
        ("committer", GroupBy::Committer),
        ("day", GroupBy::Day),
        ("machine", GroupBy::Machine),
    ];

    /// The option's spelling.
    pub fn as_str(self) -> &'static str {
        GroupBy::ALL.iter().find(|(_, g)| *g == self).map(|(s, _)| *s).unwrap_or("pool")
    }
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A report's options, checked: the window, the grouping and the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportQuery {
    pub since: Ts,
    pub until: Ts,
    pub by: GroupBy,
    pub format: Format,
}

/// A report option that cannot be understood; the message says which and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// Reads a time option: a duration back from now (`7d`, `12h`, `90m`, `2w`), a UTC date
/// (`2026-11-01`), `now`, or an RFC 3339 time.
pub fn parse_time(option: &str, value: &str, now: Ts) -> Result<Ts, QueryError> {
    let v = value.trim();
    if v == "now" {
        return Ok(now);
    }
    if let Some(ms) = parse_ago(v) {
        return Ok(Ts(now.0.saturating_sub(ms)));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(Ts(t.and_utc().timestamp_millis()));
        }
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(Ts(t.timestamp_millis()));
    }
    Err(QueryError(format!(
        "{option}: cannot read {value:?}; expected a duration back from now (30m, 12h, 7d, 2w), \
         a UTC date (2026-11-01), an RFC 3339 time (2026-11-01T08:00:00Z) or `now`"
    )))
}

fn parse_ago(v: &str) -> Option<i64> {
    let unit = v.chars().last()?;
    let n: i64 = v[..v.len() - unit.len_utf8()].parse().ok()?;
    let per = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => DAY_MS,
        'w' => 7 * DAY_MS,
        _ => return None,
    };
    (n >= 0).then(|| n.checked_mul(per)).flatten()
}

impl ReportQuery {
    /// Checks raw options (as typed on the command line or in a query string). Defaults: the
    /// last 7 days up to now, by pool, as a table.
    pub fn parse(
        since: Option<&str>,
        until: Option<&str>,
        by: Option<&str>,
        format: Option<&str>,
        now: Ts,
    ) -> Result<ReportQuery, QueryError> {
        let until = match until {
            Some(u) => parse_time("--until", u, now)?,
            None => now,
        };
        let since = match since {
            Some(s) => parse_time("--since", s, now)?,
            None => Ts(until.0 - 7 * DAY_MS),
        };
        if since >= until {
            return Err(QueryError(format!(
                "--since ({}) must be before --until ({})",
                crate::store::ts_string(since),
                crate::store::ts_string(until)
            )));
        }
        let by = match by {
            None => GroupBy::Pool,
            Some(b) => GroupBy::ALL.iter().find(|(s, _)| *s == b.trim()).map(|(_, g)| *g).ok_or_else(|| {
                QueryError(format!(
                    "--by: unknown grouping {b:?}; expected one of pool, builder, branch, committer, day, machine"
                ))
            })?,
        };
        let format = match format.map(str::trim) {
            None | Some("table") => Format::Table,
            Some("csv") => Format::Csv,
            Some("json") => Format::Json,
            Some(f) => return Err(QueryError(format!("--format: unknown format {f:?}; expected table, csv or json"))),
        };
        Ok(ReportQuery { since, until, by, format })
    }
}

/// What the meter needs to know of a machine besides its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachineFacts {
    pub id: MachineId,
    pub pool: String,
    pub provisioner: String,
    pub state: String,
    pub instance_type: Option<String>,
    pub lifecycle: Option<String>,
    pub zone: Option<String>,
    /// USD per hour; `None` = unknown.
    pub hourly_price: Option<f64>,
    pub price_source: Option<String>,
    /// USD per hour for the root volume; `None` = unknown (or none).
    pub volume_hourly: Option<f64>,
    /// When the store marked it gone (the meter's `gone` event says the same).
    pub terminated_at: Option<String>,
}

/// What a busy stretch is attributed to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildLabel {
    pub builder: Arc<str>,
    pub repo: Arc<str>,
    pub branch: Arc<str>,
    pub committer: Arc<str>,
}

/// One line of a report: money (USD, 4 decimals) and time (seconds, 3 decimals).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub key: String,
    /// More about the key (a machine's pool, type, lifecycle and zone).
    pub label: String,
    pub cost: f64,
    pub instance_cost: f64,
    pub volume_cost: f64,
    pub busy_cost: f64,
    pub idle_cost: f64,
    pub boot_cost: f64,
    pub billed_seconds: f64,
    pub busy_seconds: f64,
    pub idle_seconds: f64,
    pub boot_seconds: f64,
    /// Billed time of machines with no known price: in the seconds, not in the money.
    pub unknown_price_seconds: f64,
    /// Of the billed time, what the provider's minimum added to lives shorter than it.
    pub minimum_seconds: f64,
    pub builds: u64,
    pub cost_per_build: Option<f64>,
    /// Idle cost ÷ billed cost (by time when nothing in the row has a price).
    pub idle_waste: Option<f64>,
}

/// A machine running now, with what it has cost since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMachine {
    pub machine: MachineId,
    pub pool: String,
    pub state: String,
    pub instance_type: Option<String>,
    pub lifecycle: Option<String>,
    pub zone: Option<String>,
    pub started_at: String,
    pub hourly_price: Option<f64>,
    pub price_source: Option<String>,
    pub seconds: f64,
    /// `None` when its price is unknown.
    pub cost_so_far: Option<f64>,
    pub build: Option<BuildId>,
}

/// Machines whose price is not known: counted in time, left out of the money.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Unknown {
    pub machines: u64,
    pub seconds: f64,
    pub instance_types: Vec<String>,
    /// Machines whose root volume's price is unknown (their volume is left out).
    pub volume_machines: u64,
}

/// A whole report (the JSON of `GET /api/cost` and `paddock cost --format json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub generated_at: String,
    pub by: String,
    pub currency: String,
    /// Where the built-in on-demand prices come from, and their date.
    pub price_table: String,
    pub totals: Row,
    /// Machines billed in the window.
    pub machines: u64,
    /// 30 days at the rate of the window's last 24 hours.
    pub projected_30d: f64,
    pub unknown_price: Unknown,
    pub rows: Vec<Row>,
    pub top_builders: Vec<Row>,
    pub running: Vec<RunningMachine>,
}

#[derive(Debug, Default, Clone)]
struct Acc {
    label: String,
    instance_cost: f64,
    volume_cost: f64,
    cost: [f64; 3],
    ms: [i64; 3],
    unknown_ms: i64,
    minimum_ms: i64,
    /// Busy stretches: one per build (a build that runs across midnight counts on both days).
    builds: u64,
}

fn slot(u: Use) -> usize {
    match u {
        Use::Busy => 0,
        Use::Idle => 1,
        Use::Boot => 2,
    }
}

impl Acc {
    fn add(&mut self, s: &Stretch, m: &MachineFacts) {
        let i = slot(s.what);
        self.ms[i] += s.ms;
        if s.minimum {
            self.minimum_ms += s.ms;
        }
        match m.hourly_price {
            Some(p) => {
                let instance = s.ms as f64 * p / MS_PER_HOUR;
                let volume = s.ms as f64 * m.volume_hourly.unwrap_or(0.0) / MS_PER_HOUR;
                self.instance_cost += instance;
                self.volume_cost += volume;
                self.cost[i] += instance + volume;
            }
            None => self.unknown_ms += s.ms,
        }
        if s.what == Use::Busy {
            self.builds += 1;
        }
    }

    fn row(&self, key: String) -> Row {
        let cost = self.cost.iter().sum::<f64>();
        let billed_ms: i64 = self.ms.iter().sum();
        let builds = self.builds;
        let idle_waste = if cost > 0.0 {
            Some(self.cost[1] / cost)
        } else if billed_ms > 0 {
            Some(self.ms[1] as f64 / billed_ms as f64)
        } else {
            None
        };
        Row {
            key,
            label: self.label.clone(),
            cost: money(cost),
            instance_cost: money(self.instance_cost),
            volume_cost: money(self.volume_cost),
            busy_cost: money(self.cost[0]),
            idle_cost: money(self.cost[1]),
            boot_cost: money(self.cost[2]),
            billed_seconds: secs(billed_ms),
            busy_seconds: secs(self.ms[0]),
            idle_seconds: secs(self.ms[1]),
            boot_seconds: secs(self.ms[2]),
            unknown_price_seconds: secs(self.unknown_ms),
            minimum_seconds: secs(self.minimum_ms),
            builds,
            cost_per_build: (builds > 0).then(|| money(cost / builds as f64)),
            idle_waste: idle_waste.map(money),
        }
    }
}

/// Rounds to 4 decimals the way every format prints money and fractions (as text does).
pub fn money(x: f64) -> f64 {
    format!("{x:.4}").parse().unwrap_or(x)
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Sums machines' lives into a report, one machine at a time (memory stays per group, not
/// per event).
pub struct Aggregator {
    q: ReportQuery,
    now: Ts,
    groups: BTreeMap<String, Acc>,
    total: Acc,
    builders: BTreeMap<String, Acc>,
    recent: f64,
    recent_from: Ts,
    recent_to: Ts,
    machines: u64,
    unknown: Unknown,
    unknown_types: std::collections::BTreeSet<String>,
    running: Vec<RunningMachine>,
}

impl Aggregator {
    /// An empty report for `q` as of `now`.
    pub fn new(q: ReportQuery, now: Ts) -> Aggregator {
        let recent_to = Ts(q.until.0.min(now.0));
        let recent_from = Ts(q.since.0.max(recent_to.0 - RECENT_MS));
        Aggregator {
            q,
            now,
            groups: BTreeMap::new(),
            total: Acc::default(),
            builders: BTreeMap::new(),
            recent: 0.0,
            recent_from,
            recent_to,
            machines: 0,
            unknown: Unknown::default(),
            unknown_types: Default::default(),
            running: vec![],
        }
    }

    /// Adds one machine's life; busy time is attributed from `labels` (its builds).
    pub fn add(&mut self, m: &MachineFacts, life: &Life, labels: &[(BuildId, BuildLabel)]) {
        let (q, now) = (self.q, self.now);
        let mut billed = false;
        let mut stretches = vec![];
        life.stretches(q.since, q.until, now, |s| stretches.push(s));
        for s in &stretches {
            billed = true;
            self.total.add(s, m);
            let label = s.build.and_then(|b| labels.iter().find(|(id, _)| *id == b)).map(|(_, l)| l);
            if s.what == Use::Busy {
                let builder = label.map(|l| &*l.builder).unwrap_or(UNKNOWN_BUILD);
                group(&mut self.builders, builder).add(s, m);
            }
            let named = |f: fn(&BuildLabel) -> &str| -> &str {
                match s.what {
                    Use::Busy => label.map(f).unwrap_or(UNKNOWN_BUILD),
                    Use::Idle => "(idle)",
                    Use::Boot => "(boot)",
                }
            };
            match q.by {
                GroupBy::Pool => group(&mut self.groups, &m.pool).add(s, m),
                GroupBy::Machine => {
                    let acc = group(&mut self.groups, &format!("{:>8}", m.id));
                    if acc.label.is_empty() {
                        acc.label = machine_label(m);
                    }
                    acc.add(s, m)
                }
                GroupBy::Builder => group(&mut self.groups, named(|l| &l.builder)).add(s, m),
                GroupBy::Branch => {
                    let key = match (s.what, label) {
                        (Use::Busy, Some(l)) => format!("{}:{}", l.repo, l.branch),
                        _ => named(|l| &l.branch).to_string(),
                    };
                    group(&mut self.groups, &key).add(s, m)
                }
                GroupBy::Committer => {
                    let who = named(|l| &l.committer);
                    group(&mut self.groups, if who.is_empty() { "(none)" } else { who }).add(s, m)
                }
                GroupBy::Day => {
                    for part in split_days(s) {
                        group(&mut self.groups, &day_of(part.from)).add(&part, m);
                    }
                }
            }
            // The projection's "current rate": the same stretch, cut to the recent window.
            if let Some(p) = m.hourly_price {
                let ms = if s.minimum {
                    // A minimum's top-up: counted if its end time is recent.
                    if s.from >= self.recent_from && s.from < self.recent_to {
                        s.ms
                    } else {
                        0
                    }
                } else {
                    (s.to.0.min(self.recent_to.0) - s.from.0.max(self.recent_from.0)).max(0)
                };
                self.recent += ms as f64 * (p + m.volume_hourly.unwrap_or(0.0)) / MS_PER_HOUR;
            }
        }
        if billed {
            self.machines += 1;
            if m.hourly_price.is_none() {
                self.unknown.machines += 1;
                self.unknown_types.insert(m.instance_type.clone().unwrap_or_else(|| "(unknown type)".into()));
            } else if m.volume_hourly.is_none() {
                self.unknown.volume_machines += 1;
            }
        }
        if let (Some(start), None) = (life.start, life.end) {
            let ms = life.billed_ms(now);
            let rate = m.hourly_price.map(|p| p + m.volume_hourly.unwrap_or(0.0));
            self.running.push(RunningMachine {
                machine: m.id,
                pool: m.pool.clone(),
                state: m.state.clone(),
                instance_type: m.instance_type.clone(),
                lifecycle: m.lifecycle.clone(),
                zone: m.zone.clone(),
                started_at: crate::store::ts_string(start),
                hourly_price: m.hourly_price,
                price_source: m.price_source.clone(),
                seconds: secs(ms),
                cost_so_far: rate.map(|r| money(ms as f64 * r / MS_PER_HOUR)),
                build: life.builds.iter().find(|b| b.2.is_none()).map(|b| b.0),
            });
        }
    }

    /// The finished report.
    pub fn finish(mut self, currency: &str, price_table: &str) -> Report {
        let total = self.total.row("TOTAL".into());
        self.unknown.seconds = total.unknown_price_seconds;
        self.unknown.instance_types = self.unknown_types.into_iter().collect();
        let mut top: Vec<Row> = self.builders.iter().map(|(k, a)| a.row(k.clone())).collect();
        top.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(b.busy_seconds.total_cmp(&a.busy_seconds)));
        top.truncate(TOP_BUILDERS);
        let recent_hours = (self.recent_to.0 - self.recent_from.0) as f64 / MS_PER_HOUR;
        let projected = if recent_hours > 0.0 { self.recent / recent_hours * 24.0 * 30.0 } else { 0.0 };
        let machines = self.q.by == GroupBy::Machine;
        let mut rows: Vec<Row> = self
            .groups
            .iter()
            .map(|(k, a)| a.row(if machines { k.trim_start().to_string() } else { k.clone() }))
            .collect();
        if self.q.by != GroupBy::Day && self.q.by != GroupBy::Machine {
            rows.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.key.cmp(&b.key)));
        }
        self.running.sort_by_key(|r| r.machine);
        Report {
            since: crate::store::ts_string(self.q.since),
            until: crate::store::ts_string(self.q.until),
            generated_at: crate::store::ts_string(self.now),
            by: self.q.by.as_str().to_string(),
            currency: currency.to_string(),
            price_table: price_table.to_string(),
            totals: total,
            machines: self.machines,
            projected_30d: money(projected),
            unknown_price: self.unknown,
            rows,
            top_builders: top,
            running: self.running,
        }
    }
}

/// The row of a busy stretch whose build is not in the store any more.
const UNKNOWN_BUILD: &str = "(unknown build)";

/// The accumulator of `key`, made on first use (the key is copied only then).
fn group<'g>(groups: &'g mut BTreeMap<String, Acc>, key: &str) -> &'g mut Acc {
    if !groups.contains_key(key) {
        groups.insert(key.to_string(), Acc::default());
    }
    groups.get_mut(key).expect("inserted above")
}

fn machine_label(m: &MachineFacts) -> String {
    let mut parts = vec![m.pool.clone()];
    parts.extend(m.instance_type.clone());
    parts.extend(m.lifecycle.clone());
    parts.extend(m.zone.clone());
    parts.join(" ")
}

/// Cuts a stretch at UTC midnights (a minimum's top-up stays whole, on its end's day).
fn split_days(s: &Stretch) -> Vec<Stretch> {
    if s.minimum {
        return vec![*s];
    }
    let mut out = vec![];
    let mut from = s.from.0;
    while from < s.to.0 {
        let midnight = (from.div_euclid(DAY_MS) + 1) * DAY_MS;
        let to = midnight.min(s.to.0);
        out.push(Stretch { from: Ts(from), to: Ts(to), ms: to - from, ..*s });
        from = to;
    }
    out
}

fn day_of(t: Ts) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t.0) {
        Some(d) => d.format("%Y-%m-%d").to_string(),
        None => "1970-01-01".into(),
    }
}

fn opt(x: Option<f64>, places: usize) -> String {
    x.map(|v| format!("{v:.places$}")).unwrap_or_else(|| "-".into())
}

/// The columns of the CSV, in order.
pub const CSV_HEADER: &str = "key,label,cost,instance_cost,volume_cost,busy_cost,idle_cost,boot_cost,billed_seconds,\
busy_seconds,idle_seconds,boot_seconds,unknown_price_seconds,minimum_seconds,builds,cost_per_build,idle_waste";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(r: &Row) -> String {
    format!(
        "{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{}",
        csv_field(&r.key),
        csv_field(&r.label),
        r.cost,
        r.instance_cost,
        r.volume_cost,
        r.busy_cost,
        r.idle_cost,
        r.boot_cost,
        r.billed_seconds,
        r.busy_seconds,
        r.idle_seconds,
        r.boot_seconds,
        r.unknown_price_seconds,
        r.minimum_seconds,
        r.builds,
        r.cost_per_build.map(|v| format!("{v:.4}")).unwrap_or_default(),
        r.idle_waste.map(|v| format!("{v:.4}")).unwrap_or_default(),
    )
}

impl Report {
    /// The report in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.table(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(self).unwrap_or_default() + "\n",
        }
    }

    /// One CSV line per row and a last `TOTAL` line.
    pub fn csv(&self) -> String {
        let mut out = format!("{CSV_HEADER}\n");
        for r in self.rows.iter().chain(std::iter::once(&self.totals)) {
            out.push_str(&csv_row(r));
            out.push('\n');
        }
        out
    }

    /// For people: the totals, the rows, the top builders and the machines running now.
    pub fn table(&self) -> String {
        let t = &self.totals;
        let mut out = String::new();
        // The price table's full source is in the JSON (`price_table`); its date is enough here.
        let table_date = self.price_table.rsplit_once(" (").map(|(_, d)| d.trim_end_matches(')')).unwrap_or("");
        let _ = writeln!(
            out,
            "Cost from {} to {} ({}; shipped on-demand prices of {table_date})",
            self.since, self.until, self.currency
        );
        let _ = writeln!(
            out,
            "Total {:.4}   billed {:.3} s on {} machines   busy {:.4}   idle {:.4}   boot {:.4}",
            t.cost, t.billed_seconds, self.machines, t.busy_cost, t.idle_cost, t.boot_cost
        );
        let _ = writeln!(
            out,
            "Idle waste {}   builds {}   cost per build {}   projected 30 days {:.4}",
            t.idle_waste.map(|w| format!("{:.2}%", w * 100.0)).unwrap_or_else(|| "-".into()),
            t.builds,
            opt(t.cost_per_build, 4),
            self.projected_30d
        );
        let u = &self.unknown_price;
        if u.machines > 0 {
            let _ = writeln!(
                out,
                "Unknown price: {} machines, {:.3} s ({}) — counted in time, not in money",
                u.machines,
                u.seconds,
                u.instance_types.join(", ")
            );
        }
        if u.volume_machines > 0 {
            let _ = writeln!(out, "Unknown root volume price: {} machines (volume cost left out)", u.volume_machines);
        }
        out.push('\n');
        let head = ["COST", "BUSY", "IDLE", "BOOT", "IDLE%", "BUILDS", "PER-BUILD", "SECONDS"];
        let rows: Vec<&Row> = self.rows.iter().chain(std::iter::once(&self.totals)).collect();
        let key_w = rows.iter().map(|r| r.key.chars().count()).chain([self.by.len() + 3]).max().unwrap_or(8);
        let _ = write!(out, "{:<key_w$}", format!("BY {}", self.by.to_uppercase()));
        for h in head {
            let _ = write!(out, "  {h:>12}");
        }
        if self.by == "machine" {
            out.push_str("  MACHINE");
        }
        out.push('\n');
        for r in rows {
            let _ = write!(
                out,
                "{:<key_w$}  {:>12.4}  {:>12.4}  {:>12.4}  {:>12.4}  {:>12}  {:>12}  {:>12}  {:>12.3}",
                r.key,
                r.cost,
                r.busy_cost,
                r.idle_cost,
                r.boot_cost,
                r.idle_waste.map(|w| format!("{:.2}", w * 100.0)).unwrap_or_else(|| "-".into()),
                r.builds,
                opt(r.cost_per_build, 4),
                r.billed_seconds
            );
            if !r.label.is_empty() {
                let _ = write!(out, "  {}", r.label);
            }
            out.push('\n');
        }
        if !self.top_builders.is_empty() {
            out.push_str("\nTop builders by cost\n");
            for r in &self.top_builders {
                let _ = writeln!(out, "  {:<30} {:>12.4}  {} builds", r.key, r.cost, r.builds);
            }
        }
        out.push_str("\nRunning now\n");
        if self.running.is_empty() {
            out.push_str("  (none)\n");
        }
        for m in &self.running {
            let _ = writeln!(
                out,
                "  {:>6}  {:<12} {:<8} {:<12} {:<10} {:<12} since {}  {}/h  so far {}",
                m.machine,
                m.pool,
                m.state,
                m.instance_type.as_deref().unwrap_or("-"),
                m.lifecycle.as_deref().unwrap_or("-"),
                m.zone.as_deref().unwrap_or("-"),
                m.started_at,
                opt(m.hourly_price, 4),
                opt(m.cost_so_far, 4),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Ts = Ts(1_780_000_000_000);

    #[test]
    fn options_parse_and_bad_ones_say_what_is_accepted() {
        let q = ReportQuery::parse(Some("7d"), None, Some("builder"), Some("csv"), NOW).expect("ok");
        assert_eq!(q.since, Ts(NOW.0 - 7 * DAY_MS));
        assert_eq!((q.until, q.by, q.format), (NOW, GroupBy::Builder, Format::Csv));
        let q = ReportQuery::parse(Some("2026-01-01"), Some("2026-01-02T00:00:00Z"), None, None, NOW).expect("ok");
        assert_eq!(q.until.0 - q.since.0, DAY_MS);
        let e = ReportQuery::parse(Some("yesterday-ish"), None, None, None, NOW).unwrap_err().0;
        assert!(e.contains("--since") && e.contains("yesterday-ish") && e.contains("7d"), "{e}");
        let e = ReportQuery::parse(None, None, Some("team"), None, NOW).unwrap_err().0;
        assert!(e.contains("--by") && e.contains("\"team\"") && e.contains("committer"), "{e}");
        let e = ReportQuery::parse(None, None, None, Some("xml"), NOW).unwrap_err().0;
        assert!(e.contains("--format"), "{e}");
        let e = ReportQuery::parse(Some("1h"), Some("2h"), None, None, NOW).unwrap_err().0;
        assert!(e.contains("before"), "{e}");
        assert!(ReportQuery::parse(Some("-3d"), None, None, None, NOW).is_err());
    }

    #[test]
    fn a_day_report_cuts_at_midnight() {
        let s = Stretch {
            from: Ts(DAY_MS - 1000),
            to: Ts(DAY_MS + 2000),
            ms: 3000,
            what: Use::Idle,
            build: None,
            minimum: false,
        };
        let parts = split_days(&s);
        assert_eq!(parts.iter().map(|p| p.ms).collect::<Vec<_>>(), vec![1000, 2000]);
        assert_eq!(day_of(parts[1].from), "1970-01-02");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
