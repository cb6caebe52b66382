//! Spend caps: which pools may not launch, given what was spent this UTC hour and day. Pure.

use std::collections::BTreeMap;

use super::Spend;
use crate::config::{Config, SpendCaps};
use crate::core::Ts;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Start of the UTC hour holding `t`.
pub fn hour_start(t: Ts) -> Ts {
    Ts(t.0.div_euclid(HOUR_MS) * HOUR_MS)
}

/// Start of the UTC day holding `t`.
pub fn day_start(t: Ts) -> Ts {
    Ts(t.0.div_euclid(DAY_MS) * DAY_MS)
}

/// Whether any cap is configured (the master checks spend only then).
pub fn any(config: &Config) -> bool {
    config.cost.spend.any() || config.pools.iter().any(|p| p.spend.any())
}

/// Which caps are reached and which pools they hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caps {
    /// Every reached cap (`pool NAME hourly`, `overall daily`, …) with its message: the master
    /// warns once when one appears.
    pub reached: BTreeMap<String, String>,
    /// Held pools, each with the reason people see (`paddock builds`, the API): its own cap
    /// first, then the overall one.
    pub holds: BTreeMap<String, String>,
}

/// Compares the spends of the current UTC hour (`hour`) and day (`day`) with the caps; `now`
/// says when they lift.
pub fn evaluate(config: &Config, hour: &Spend, day: &Spend, now: Ts) -> Caps {
    let next_hour = crate::store::ts_string(Ts(hour_start(now).0 + HOUR_MS));
    let next_day = crate::store::ts_string(Ts(day_start(now).0 + DAY_MS));
    let mut out = Caps::default();
    let mut check = |caps: &SpendCaps, h: f64, d: f64, whose: &str| -> Option<String> {
        let mut first = None;
        if let Some(cap) = caps.hourly.filter(|cap| h >= *cap) {
            let why = format!(
                "{whose} hourly spend cap reached: ${h:.2} of ${cap:.2} this hour; no new machines until {next_hour}"
            );
            out.reached.insert(format!("{whose} hourly"), why.clone());
            first = Some(why);
        }
        if let Some(cap) = caps.daily.filter(|cap| d >= *cap) {
            let why = format!(
                "{whose} daily spend cap reached: ${d:.2} of ${cap:.2} today; no new machines until {next_day}"
            );
            out.reached.insert(format!("{whose} daily"), why.clone());
            first = first.or(Some(why));
        }
        first
    };
    let overall = check(&config.cost.spend, hour.total, day.total, "overall");
    let mut holds = BTreeMap::new();
    for p in &config.pools {
        let h = hour.by_pool.get(&p.name).copied().unwrap_or(0.0);
        let d = day.by_pool.get(&p.name).copied().unwrap_or(0.0);
        if let Some(why) = check(&p.spend, h, d, &format!("pool {}", p.name)).or_else(|| overall.clone()) {
            holds.insert(p.name.clone(), why);
        }
    }
    out.holds = holds;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("paddock.toml");
        std::fs::write(&path, text).expect("write");
        crate::config::load(&path).expect("config")
    }

    fn spend(total: f64, pools: &[(&str, f64)]) -> Spend {
        Spend { total, by_pool: pools.iter().map(|(p, v)| (p.to_string(), *v)).collect() }
    }

    // 2026-11-24T10:20:00Z
    const NOW: Ts = Ts(1_795_515_600_000);

    #[test]
    fn pool_caps_hold_their_pool_and_the_overall_cap_holds_all() {
        let c =
            config("[cost]\nmax_daily_spend = 100\n[pool.a]\nhourly_price = 1\nmax_hourly_spend = 2.5\n[pool.b]\nhourly_price = 1\nmax_daily_spend = 10\n");
        assert!(any(&c));
        let none = evaluate(&c, &spend(3.0, &[("a", 2.0), ("b", 1.0)]), &spend(9.0, &[("b", 9.0)]), NOW);
        assert_eq!(none, Caps::default());
        let caps = evaluate(&c, &spend(3.0, &[("a", 2.5)]), &spend(12.0, &[("b", 10.0)]), NOW);
        assert_eq!(caps.reached.keys().collect::<Vec<_>>(), vec!["pool a hourly", "pool b daily"]);
        let h = caps.holds;
        assert_eq!(h.len(), 2);
        assert_eq!(
            h["a"],
            "pool a hourly spend cap reached: $2.50 of $2.50 this hour; no new machines until 2026-11-24T11:00:00.000Z"
        );
        assert!(h["b"].starts_with("pool b daily spend cap reached: $10.00 of $10.00 today"), "{}", h["b"]);
        assert!(h["b"].ends_with("until 2026-11-25T00:00:00.000Z"), "{}", h["b"]);
        let caps = evaluate(&c, &spend(3.0, &[("a", 3.0)]), &spend(100.0, &[]), NOW);
        assert_eq!(caps.reached.keys().collect::<Vec<_>>(), vec!["overall daily", "pool a hourly"]);
        let all = caps.holds;
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(all["a"].starts_with("pool a hourly"), "its own cap comes first: {}", all["a"]);
        assert!(all["b"].starts_with("overall daily spend cap reached"), "{}", all["b"]);
        let caps = evaluate(&c, &spend(1.0, &[]), &spend(100.0, &[]), NOW);
        let all = caps.holds;
        assert!(all["a"].starts_with("overall daily spend cap reached"), "{}", all["a"]);
    }

    #[test]
    fn hours_and_days_start_on_utc_boundaries() {
        assert_eq!(crate::store::ts_string(hour_start(NOW)), "2026-11-24T10:00:00.000Z");
        assert_eq!(crate::store::ts_string(day_start(NOW)), "2026-11-24T00:00:00.000Z");
    }
}
