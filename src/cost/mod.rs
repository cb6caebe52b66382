//! Cost metering: prices, the meter and reports.
//!
//! Every machine's price is fixed when it launches ([`price_machine`]) and stored with it; its
//! life is in `machine_events` (launched, connected, each build's start and end, gone). A
//! report folds those events into [`meter::Life`]s, one machine at a time, and sums the priced
//! stretches ([`report::Aggregator`]).

pub mod caps;
pub mod meter;
pub mod prices;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use paddock_provisioners::Launched;

use crate::config::{Pool, ProvisionerKind};
use crate::core::{BuildId, Ts};
use crate::store::{MachinePrice, Store, StoreError};
use meter::Life;
use prices::{region_of_zone, PriceTable, HOURS_PER_MONTH};
use report::{Aggregator, BuildLabel, GroupBy, Report, ReportQuery};

/// The volume type EC2 gives a root volume whose AMI mapping does not say.
const DEFAULT_VOLUME_TYPE: &str = "gp2";

/// What a machine just launched costs: the pool's configured price for its type, else the
/// pool's `hourly_price`, else (local machines) nothing; for EC2 the spot price the cloud
/// reported, or the table's on-demand price. No known price stays `None` (unknown), never 0.
pub fn price_machine(pool: &Pool, launched: &Launched, table: &PriceTable) -> MachinePrice {
    let itype = launched.instance_type.as_deref();
    let configured = itype.and_then(|t| pool.prices.get(t)).copied().or(pool.hourly_price);
    let ec2 = match &pool.provisioner {
        ProvisionerKind::Ec2(s) => Some(s),
        ProvisionerKind::Local => None,
    };
    let region =
        launched.zone.as_deref().map(|z| region_of_zone(z).to_string()).or_else(|| ec2.and_then(|s| s.region.clone()));
    let (hourly_price, source) = match (configured, ec2) {
        (Some(p), _) => (Some(p), "config"),
        (None, None) => (Some(0.0), "nominal"),
        (None, Some(_)) if launched.lifecycle == "spot" => (launched.spot_price, "spot"),
        (None, Some(_)) => {
            let p = match (region.as_deref(), itype) {
                (Some(r), Some(t)) => table.on_demand(r, t),
                _ => None,
            };
            (p, "table")
        }
    };
    if hourly_price.is_none() {
        tracing::warn!(
            pool = %pool.name,
            instance_type = itype.unwrap_or("?"),
            region = region.as_deref().unwrap_or("?"),
            lifecycle = %launched.lifecycle,
            "no known price for this machine: its cost is reported as unknown (set `prices` in the pool to fix)"
        );
    }
    let volume_type = launched.volume_type.clone().or_else(|| ec2.map(|_| DEFAULT_VOLUME_TYPE.to_string()));
    let volume_hourly = match ec2 {
        None => Some(0.0),
        Some(_) => match (region.as_deref(), launched.volume_gb, volume_type.as_deref()) {
            (Some(r), Some(gb), Some(t)) => {
                table.volume_gb_month(r, t).map(|per_month| per_month * f64::from(gb) / HOURS_PER_MONTH)
            }
            _ => None,
        },
    };
    MachinePrice {
        zone: launched.zone.clone(),
        hourly_price,
        price_source: hourly_price.map(|_| source.to_string()),
        volume_gb: launched.volume_gb,
        volume_type,
        volume_hourly,
    }
}

/// The provider's minimum billed time for machines of this provisioner (milliseconds).
fn minimum_ms(provisioner: &str) -> i64 {
    match provisioner {
        "ec2" => meter::EC2_MINIMUM_MS,
        _ => 0,
    }
}

/// Builds the report `q` asks for, as of `now`, from the store.
pub async fn report(store: &Store, q: &ReportQuery, now: Ts) -> Result<Report, StoreError> {
    build(store, q, now, Purpose::Report).await
}

/// What a fold is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A report: busy time attributed to builds; unknown prices stay unknown.
    Report,
    /// Spend against a cap: no attribution; a machine of unknown price counts at the table's
    /// on-demand price for its type and region (the most a spot machine can cost), so it
    /// cannot slip past a cap unseen.
    Caps,
}

/// The fold behind [`report`]: one machine at a time, as the store hands them over, so
/// memory follows the report's groups, not the events. `labelled`: attribute busy time to
/// builds (spend by pool does not need it).
async fn build(store: &Store, q: &ReportQuery, now: Ts, purpose: Purpose) -> Result<Report, StoreError> {
    let table = PriceTable::builtin();
    let labelled = purpose == Purpose::Report;
    let mut agg = Aggregator::new(*q, now);
    let mut names: HashSet<Arc<str>> = HashSet::new();
    let mut labels: Vec<(BuildId, BuildLabel)> = Vec::new();
    store
        .cost_lives(q.since, q.until, |mut m, events| {
            if purpose == Purpose::Caps && m.hourly_price.is_none() {
                m.hourly_price = match (m.zone.as_deref(), m.instance_type.as_deref()) {
                    (Some(zone), Some(t)) => table.on_demand(region_of_zone(zone), t),
                    _ => None,
                };
            }
            let mut life = Life { machine: m.id, minimum_ms: minimum_ms(&m.provisioner), ..Life::default() };
            labels.clear();
            for line in events.lines() {
                let mut parts = line.splitn(3, '\t');
                let (Some(at), Some(kind), detail) = (parts.next(), parts.next(), parts.next().unwrap_or_default())
                else {
                    continue;
                };
                let Some(at) = parse_ts(at) else { continue };
                apply_event(&mut life, at, kind, detail);
                if labelled && kind == "build_started" {
                    if let Some(l) = build_label(detail, &mut names) {
                        labels.push(l);
                    }
                }
            }
            if life.end.is_none() {
                // A crash between the row and its event cannot leave it billed forever.
                life.end = m.terminated_at.as_deref().and_then(parse_ts);
            }
            agg.add(&m, &life, &labels);
        })
        .await?;
    Ok(agg.finish(table.currency(), &format!("{} ({})", table.source(), table.date())))
}

/// The build a `build_started` event names: `id TAB builder TAB repo TAB branch TAB committer`
/// (names stored once per report however many builds share them).
fn build_label(detail: &str, names: &mut HashSet<Arc<str>>) -> Option<(BuildId, BuildLabel)> {
    let mut f = detail.split('\t');
    let id = f.next()?.parse().ok()?;
    let mut intern = |s: Option<&str>| -> Arc<str> {
        let s = s.unwrap_or_default();
        match names.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = s.into();
                names.insert(a.clone());
                a
            }
        }
    };
    let (builder, repo, branch, committer) = (intern(f.next()), intern(f.next()), intern(f.next()), intern(f.next()));
    Some((id, BuildLabel { builder, repo, branch, committer }))
}

/// Adds one meter event to a machine's life.
fn apply_event(l: &mut Life, at: Ts, kind: &str, detail: &str) {
    let build = || detail.split_whitespace().next().and_then(|b| b.parse::<BuildId>().ok());
    match kind {
        "launched" => l.start = l.start.or(Some(at)),
        "connected" => l.connected = l.connected.or(Some(at)),
        "build_started" => {
            if let Some(b) = build() {
                l.builds.push((b, at, None));
            }
        }
        "build_finished" => {
            if let Some(b) = build() {
                if let Some(run) = l.builds.iter_mut().find(|r| r.0 == b && r.2.is_none()) {
                    run.2 = Some(at);
                }
            }
        }
        // A `gone` before any launch ends a launch that started nothing (as far as the master
        // knew then); a launch found later starts the billed life afresh.
        "gone" if l.start.is_some() => l.end = l.end.or(Some(at)),
        _ => {}
    }
}

/// What was spent from `since` to `now`: in total and per pool (USD; unknown prices left out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spend {
    pub total: f64,
    pub by_pool: HashMap<String, f64>,
}

/// The spend since `since` (a cap's hour or day), machines still running included up to now.
pub async fn spend(store: &Store, since: Ts, now: Ts) -> Result<Spend, StoreError> {
    let q = ReportQuery { since, until: Ts(now.0.max(since.0)), by: GroupBy::Pool, format: report::Format::Json };
    let r = build(store, &q, now, Purpose::Caps).await?;
    Ok(Spend { total: r.totals.cost, by_pool: r.rows.into_iter().map(|row| (row.key, row.cost)).collect() })
}

pub use crate::core::parse_ts;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_parse_like_chrono_reads_them() {
        for ms in [0i64, 1, 86_399_999, 951_782_400_000, 1_780_000_000_123, 4_102_444_800_000] {
            let s = crate::store::ts_string(Ts(ms));
            assert_eq!(parse_ts(&s), Some(Ts(ms)), "{s}");
        }
        assert_eq!(parse_ts("2026-11-24T10:00:00+01:00"), Some(Ts(1_795_510_800_000)));
        assert_eq!(parse_ts("garbage"), None);
    }

    #[test]
    fn build_events_open_and_close_runs() {
        let mut l = Life::default();
        apply_event(&mut l, Ts(1), "launched", "i-1");
        apply_event(&mut l, Ts(2), "connected", "");
        apply_event(&mut l, Ts(3), "build_started", "7");
        apply_event(&mut l, Ts(4), "build_finished", "7 success");
        apply_event(&mut l, Ts(5), "build_started", "8");
        apply_event(&mut l, Ts(9), "gone", "");
        assert_eq!(
            (l.start, l.connected, l.end, l.builds),
            (Some(Ts(1)), Some(Ts(2)), Some(Ts(9)), vec![(BuildId(7), Ts(3), Some(Ts(4))), (BuildId(8), Ts(5), None)])
        );
    }
}
