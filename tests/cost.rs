//! Cost accuracy: scripted machine lives on a virtual clock, written through the real store
//! into a real SQLite file and a real PostgreSQL database, reported by the real report code, and compared with costs worked
//! out by hand (in the comments) — to the cent, and to the 4 decimals the report prints.

use paddock::core::{BuildId, MachineId, Ts};
use paddock::cost::report::{Report, ReportQuery, Row};
use paddock::store::{MachinePrice, NewChange, Store};
use paddock_provisioners::Launched;

/// 2026-11-02T10:00:00Z, a Monday.
const T: i64 = 1_793_613_600_000;
const SEC: i64 = 1_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;

fn at(offset_ms: i64) -> Ts {
    Ts(T + offset_ms)
}

fn cents(x: f64) -> i64 {
    (x * 100.0).round() as i64
}

mod common;

use common::db::TestDb;

on_both_backends!(
    the_60_second_minimum_is_charged_once_the_machine_ends,
    partial_hours_split_into_boot_busy_and_idle,
    spot_and_on_demand_are_priced_from_what_the_cloud_reported_and_the_table,
    a_machine_still_running_costs_what_it_has_run_so_far,
    a_window_that_cuts_a_life_in_two_charges_each_side_its_part,
    a_day_report_cuts_at_midnight_and_the_minimum_lands_on_the_last_day,
    the_root_volume_is_billed_per_gb_month_prorated,
    a_machine_of_unknown_price_counts_against_caps_at_the_on_demand_price,
    a_late_instance_of_a_machine_thought_never_launched_is_billed_for_its_whole_life,
);

/// A farm's database with a virtual clock: every call says when it happens.
struct Farm {
    store: Store,
}

/// A price fixed at launch, in USD per hour.
fn price(hourly: f64) -> MachinePrice {
    MachinePrice {
        hourly_price: Some(hourly),
        price_source: Some("config".into()),
        volume_hourly: Some(0.0),
        ..Default::default()
    }
}

impl Farm {
    async fn new(db: &TestDb) -> Farm {
        Farm { store: db.open().await }
    }

    /// Machine `id` of `pool` is requested 10 s before `launched`, runs from `launched`,
    /// its agent connects at `connected`.
    async fn machine(&self, id: MachineId, pool: &str, provisioner: &str, p: &MachinePrice, launched: Ts) {
        let token = format!("token-{id}");
        self.store.insert_machine(id, pool, provisioner, &token, Ts(launched.0 - 10 * SEC)).await.expect("insert");
        let itype = if provisioner == "ec2" { Some("c5.xlarge") } else { Some("local") };
        self.store.machine_launched(id, &format!("i-{id}"), itype, "on-demand", p, launched).await.expect("launched");
    }

    async fn connect(&self, id: MachineId, when: Ts) {
        assert_eq!(self.store.claim_token(&format!("token-{id}"), when).await.expect("claim"), Some(id));
        self.store.set_machine_state(id, "idle", when).await.expect("idle");
    }

    /// A build of `builder` on `branch` whose newest change is by `committer`, run on machine
    /// `id` from `start` to `end`.
    async fn build(&self, id: MachineId, builder: &str, branch: &str, committer: &str, start: Ts, end: Ts) -> BuildId {
        let rev = format!("{builder}-{branch}-{}", start.0);
        let change = NewChange {
            repo: "app".into(),
            branch: branch.into(),
            revision: rev.clone(),
            author: committer.into(),
            committed_at: None,
            message: "work".into(),
            files: vec![],
            source: "test".into(),
        };
        let stored = self.store.record_changes(&[change], None, start).await.expect("change");
        let b = self
            .store
            .create_request(builder, "app", branch, &rev, "branch", "test", &[stored[0].id], Ts(start.0 - SEC))
            .await
            .expect("request");
        assert!(self.store.start_build(b.id, id, &["checkout".into()], start).await.expect("start"));
        self.store.set_machine_state(id, "busy", start).await.expect("busy");
        self.store.step_finished(b.id, 0, "success", Some(0), end).await.expect("step");
        assert!(self
            .store
            .finish_build(b.id, id, paddock::core::build::BuildState::Success, end)
            .await
            .expect("finish"));
        self.store.set_machine_state(id, "idle", end).await.expect("idle");
        b.id
    }

    async fn stop(&self, id: MachineId, when: Ts) {
        self.store.machine_event(id, "stop_requested", "idle_timeout", when).await.expect("stop");
        self.store.set_machine_state(id, "gone", when).await.expect("gone");
    }

    async fn report(&self, since: Ts, until: Ts, by: &str, now: Ts) -> Report {
        let (s, u) = (paddock::store::ts_string(since), paddock::store::ts_string(until));
        let q = ReportQuery::parse(Some(&s), Some(&u), Some(by), Some("json"), now).expect("query");
        paddock::cost::report(&self.store, &q, now).await.expect("report")
    }
}

fn row<'a>(r: &'a Report, key: &str) -> &'a Row {
    r.rows.iter().find(|x| x.key == key).unwrap_or_else(|| panic!("no row {key} in {:#?}", r.rows))
}

async fn the_60_second_minimum_is_charged_once_the_machine_ends(db: &TestDb) {
    let farm = Farm::new(db).await;
    // EC2 at $3.60/h = $0.001 per second. Runs 20 s (5 s boot, 15 s idle), billed 60 s:
    // $0.06, of which boot $0.005 and idle 15 s + the 40 s top-up = $0.055.
    farm.machine(MachineId(1), "ec2pool", "ec2", &price(3.60), at(0)).await;
    farm.connect(MachineId(1), at(5 * SEC)).await;
    farm.stop(MachineId(1), at(20 * SEC)).await;
    // A local machine has no minimum: 20 s at the same nominal price is $0.02.
    farm.machine(MachineId(2), "localpool", "local", &price(3.60), at(0)).await;
    farm.connect(MachineId(2), at(5 * SEC)).await;
    farm.stop(MachineId(2), at(20 * SEC)).await;

    let r = farm.report(at(-HOUR), at(HOUR), "pool", at(HOUR)).await;
    let ec2 = row(&r, "ec2pool");
    assert_eq!((ec2.cost, ec2.boot_cost, ec2.idle_cost, ec2.busy_cost), (0.06, 0.005, 0.055, 0.0));
    assert_eq!((ec2.billed_seconds, ec2.boot_seconds, ec2.idle_seconds), (60.0, 5.0, 55.0));
    assert_eq!(cents(ec2.cost), 6);
    let local = row(&r, "localpool");
    assert_eq!((local.cost, local.billed_seconds), (0.02, 20.0));
    assert_eq!(r.totals.cost, 0.08);
    assert_eq!(r.machines, 2);
}

async fn partial_hours_split_into_boot_busy_and_idle(db: &TestDb) {
    let farm = Farm::new(db).await;
    // $1.53/h for 1 h 30 min 15 s = 5415 s: 5415 x 1.53 / 3600 = $2.301375 → $2.30.
    // Boot 92 s = $0.0391; one build of exactly 1 h = $1.53; idle 8 s before it and
    // 1715 s after it = 1723 s = $0.732275.
    farm.machine(MachineId(1), "big", "ec2", &price(1.53), at(0)).await;
    farm.connect(MachineId(1), at(92 * SEC)).await;
    farm.build(MachineId(1), "tests", "main", "Ada Lovelace", at(100 * SEC), at(100 * SEC + HOUR)).await;
    farm.stop(MachineId(1), at(5415 * SEC)).await;

    let r = farm.report(at(0), at(2 * HOUR), "builder", at(2 * HOUR)).await;
    let t = &r.totals;
    assert_eq!(cents(t.cost), 230);
    assert_eq!((t.cost, t.boot_cost, t.busy_cost, t.idle_cost), (2.3014, 0.0391, 1.53, 0.7323));
    assert_eq!((t.boot_seconds, t.busy_seconds, t.idle_seconds, t.billed_seconds), (92.0, 3600.0, 1723.0, 5415.0));
    // Idle waste = idle ÷ billed = 0.732275 / 2.301375 = 0.31819…
    assert_eq!(t.idle_waste, Some(0.3182));
    assert_eq!((t.builds, t.cost_per_build), (1, Some(2.3014)));
    // By builder: the build's row holds the busy money, idle and boot have rows of their own.
    assert_eq!(row(&r, "tests").cost, 1.53);
    assert_eq!(row(&r, "(idle)").cost, 0.7323);
    assert_eq!(row(&r, "(boot)").cost, 0.0391);
    assert_eq!(r.top_builders[0].key, "tests");
    // By committer and branch, the same money lands on Ada and on app:main.
    let r = farm.report(at(0), at(2 * HOUR), "committer", at(2 * HOUR)).await;
    assert_eq!(row(&r, "Ada Lovelace").busy_cost, 1.53);
    let r = farm.report(at(0), at(2 * HOUR), "branch", at(2 * HOUR)).await;
    assert_eq!(row(&r, "app:main").builds, 1);
}

async fn spot_and_on_demand_are_priced_from_what_the_cloud_reported_and_the_table(db: &TestDb) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paddock.toml");
    std::fs::write(
        &path,
        "[master]\ncluster = \"t\"\n[pool.ec2]\nprovisioner = \"ec2\"\nregion = \"us-east-1\"\nami = \"ami-12345678\"\n\
         instance_types = [\"c5.xlarge\"]\n",
    )
    .expect("config");
    let config = paddock::config::load(&path).expect("load");
    let pool = config.pool("ec2").expect("pool");
    let table = paddock::cost::prices::PriceTable::builtin();
    let on_demand_rate = table.on_demand("us-east-1", "c5.xlarge").expect("c5.xlarge is in the table");
    assert_eq!(on_demand_rate, 0.17, "the table's us-east-1 c5.xlarge price");
    let launched = |lifecycle: &str, spot: Option<f64>| Launched {
        provider_id: "i-1".into(),
        instance_type: Some("c5.xlarge".into()),
        lifecycle: lifecycle.into(),
        zone: Some("us-east-1b".into()),
        spot_price: spot,
        volume_gb: None,
        volume_type: None,
        launched_at: None,
    };
    let on_demand = paddock::cost::price_machine(pool, &launched("on-demand", None), table);
    let spot = paddock::cost::price_machine(pool, &launched("spot", Some(0.0612)), table);
    assert_eq!((on_demand.hourly_price, on_demand.price_source.as_deref()), (Some(0.17), Some("table")));
    assert_eq!((spot.hourly_price, spot.price_source.as_deref()), (Some(0.0612), Some("spot")));
    // A spot machine whose price could not be had is unknown, never free.
    let unknown = paddock::cost::price_machine(pool, &launched("spot", None), table);
    assert_eq!(unknown.hourly_price, None);

    let farm = Farm::new(db).await;
    // Each runs exactly 2 h: on-demand 2 x 0.17 = $0.34; spot 2 x 0.0612 = $0.1224 → $0.12.
    for (id, p) in [(MachineId(1), &on_demand), (MachineId(2), &spot), (MachineId(3), &unknown)] {
        let p = MachinePrice { volume_hourly: Some(0.0), ..p.clone() };
        farm.machine(id, "ec2", "ec2", &p, at(0)).await;
        farm.connect(id, at(MIN)).await;
        farm.stop(id, at(2 * HOUR)).await;
    }
    let r = farm.report(at(0), at(3 * HOUR), "machine", at(3 * HOUR)).await;
    assert_eq!(row(&r, "1").cost, 0.34);
    assert_eq!(row(&r, "2").cost, 0.1224);
    assert_eq!(cents(row(&r, "2").cost), 12);
    let unknown_row = row(&r, "3");
    assert_eq!((unknown_row.cost, unknown_row.unknown_price_seconds), (0.0, 7200.0));
    assert_eq!(r.unknown_price.machines, 1);
    assert_eq!(r.unknown_price.instance_types, vec!["c5.xlarge".to_string()]);
    assert_eq!(r.totals.cost, 0.4624);
    let table_text = r.table();
    assert!(table_text.contains("Unknown price: 1 machines"), "{table_text}");
}

async fn a_machine_still_running_costs_what_it_has_run_so_far(db: &TestDb) {
    let farm = Farm::new(db).await;
    // $2.00/h, running for 45 min at report time: $1.50 so far, in the totals and in the
    // "running now" list, with its current build.
    farm.machine(MachineId(1), "p", "ec2", &price(2.0), at(0)).await;
    farm.connect(MachineId(1), at(MIN)).await;
    let b = farm.build(MachineId(1), "lint", "main", "Grace", at(2 * MIN), at(10 * MIN)).await;
    let running = farm
        .store
        .create_request("tests", "app", "main", "abc", "force", "test", &[], at(29 * MIN))
        .await
        .expect("request");
    assert!(farm.store.start_build(running.id, MachineId(1), &["checkout".into()], at(30 * MIN)).await.expect("start"));
    let now = at(45 * MIN);
    let r = farm.report(at(-HOUR), now, "builder", now).await;
    assert_eq!(r.totals.cost, 1.5);
    assert_eq!(r.running.len(), 1);
    let m = &r.running[0];
    assert_eq!((m.machine, m.cost_so_far, m.seconds, m.build), (MachineId(1), Some(1.5), 2700.0, Some(running.id)));
    // 8 min of lint ($0.2667) and 15 min of the running tests build ($0.50).
    assert_eq!(row(&r, "lint").cost, 0.2667);
    assert_eq!(row(&r, "tests").cost, 0.5);
    assert_ne!(b, running.id);
    // Young and still running: no minimum yet (it is owed only when the machine ends).
    farm.machine(MachineId(2), "p", "ec2", &price(3.6), at(45 * MIN - 30 * SEC)).await;
    let r = farm.report(at(-HOUR), now, "machine", now).await;
    assert_eq!(row(&r, "2").cost, 0.03);
    // 30 days at the rate of the window's last 24 h: the window covers only 1 h 45 min, in
    // which $1.53 was spent.
    let covered_hours = 1.75;
    assert_eq!(cents(r.projected_30d), cents((1.5 + 0.03) / covered_hours * 720.0));
}

async fn a_window_that_cuts_a_life_in_two_charges_each_side_its_part(db: &TestDb) {
    let farm = Farm::new(db).await;
    // $1.00/h from 10:00 to 13:00, a build 10:30–11:30.
    farm.machine(MachineId(1), "p", "ec2", &price(1.0), at(0)).await;
    farm.connect(MachineId(1), at(0)).await;
    farm.build(MachineId(1), "tests", "main", "Ada", at(30 * MIN), at(90 * MIN)).await;
    farm.stop(MachineId(1), at(3 * HOUR)).await;
    let now = at(10 * HOUR);
    let before = farm.report(at(-HOUR), at(HOUR), "pool", now).await;
    let after = farm.report(at(HOUR), at(4 * HOUR), "pool", now).await;
    let whole = farm.report(at(-HOUR), at(4 * HOUR), "pool", now).await;
    // Before 11:00: 1 h = $1.00 (30 min idle, 30 min busy). After: 2 h = $2.00 (30 min busy).
    assert_eq!((before.totals.cost, before.totals.busy_cost, before.totals.idle_cost), (1.0, 0.5, 0.5));
    assert_eq!((after.totals.cost, after.totals.busy_cost, after.totals.idle_cost), (2.0, 0.5, 1.5));
    assert_eq!(whole.totals.cost, 3.0);
    assert_eq!(before.totals.cost + after.totals.cost, whole.totals.cost);
    // The build straddles the cut: each side counts it once.
    assert_eq!((before.totals.builds, after.totals.builds, whole.totals.builds), (1, 1, 1));
}

async fn a_day_report_cuts_at_midnight_and_the_minimum_lands_on_the_last_day(db: &TestDb) {
    let farm = Farm::new(db).await;
    // $2.40/h = $0.04/min, from 23:00 to 01:00 the next day: 1 h ($2.40) on each day.
    let ten_pm = at(13 * HOUR); // 23:00Z
    farm.machine(MachineId(1), "p", "ec2", &price(2.4), ten_pm).await;
    farm.connect(MachineId(1), ten_pm).await;
    farm.stop(MachineId(1), Ts(ten_pm.0 + 2 * HOUR)).await;
    // And a 10 s machine at 00:30: billed 60 s = $0.04 on the second day.
    farm.machine(MachineId(2), "p", "ec2", &price(2.4), Ts(ten_pm.0 + 90 * MIN)).await;
    farm.stop(MachineId(2), Ts(ten_pm.0 + 90 * MIN + 10 * SEC)).await;
    let r = farm.report(at(0), at(2 * 24 * HOUR), "day", at(2 * 24 * HOUR)).await;
    assert_eq!(row(&r, "2026-11-02").cost, 2.4);
    assert_eq!(row(&r, "2026-11-03").cost, 2.44);
    assert_eq!(r.rows.len(), 2);
}

async fn the_root_volume_is_billed_per_gb_month_prorated(db: &TestDb) {
    let table = paddock::cost::prices::PriceTable::builtin();
    let gp3 = table.volume_gb_month("us-east-1", "gp3").expect("gp3 in the table");
    assert_eq!(gp3, 0.08);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("paddock.toml");
    std::fs::write(
        &path,
        "[master]\ncluster = \"t\"\n[pool.ec2]\nprovisioner = \"ec2\"\nami = \"ami-12345678\"\n\
         instance_types = [\"t3.micro\"]\n",
    )
    .expect("config");
    let config = paddock::config::load(&path).expect("load");
    let launched = Launched {
        provider_id: "i-1".into(),
        instance_type: Some("t3.micro".into()),
        lifecycle: "on-demand".into(),
        zone: Some("us-east-1a".into()),
        spot_price: None,
        volume_gb: Some(100),
        volume_type: Some("gp3".into()),
        launched_at: None,
    };
    let p = paddock::cost::price_machine(config.pool("ec2").expect("pool"), &launched, table);
    assert_eq!(p.hourly_price, Some(0.0104));
    let farm = Farm::new(db).await;
    // 73 h: t3.micro 73 x 0.0104 = $0.7592; 100 GB gp3 at $0.08/GB-month for 73/730 of a
    // month = $0.80. Total $1.5592 → $1.56.
    farm.machine(MachineId(1), "ec2", "ec2", &p, at(0)).await;
    farm.connect(MachineId(1), at(0)).await;
    farm.stop(MachineId(1), at(73 * HOUR)).await;
    let r = farm.report(at(0), at(100 * HOUR), "pool", at(100 * HOUR)).await;
    assert_eq!((r.totals.instance_cost, r.totals.volume_cost, r.totals.cost), (0.7592, 0.8, 1.5592));
    assert_eq!(cents(r.totals.cost), 156);
}

async fn a_machine_of_unknown_price_counts_against_caps_at_the_on_demand_price(db: &TestDb) {
    let farm = Farm::new(db).await;
    // A spot machine whose price lookup failed: unknown in reports, but a cap counts it at the
    // table's on-demand price for c5.xlarge in us-east-1 ($0.17/h): 2 h = $0.34.
    let unknown = MachinePrice { zone: Some("us-east-1b".into()), volume_hourly: Some(0.0), ..Default::default() };
    farm.machine(MachineId(1), "ec2", "ec2", &unknown, at(0)).await;
    farm.stop(MachineId(1), at(2 * HOUR)).await;
    let r = farm.report(at(0), at(3 * HOUR), "pool", at(3 * HOUR)).await;
    assert_eq!((r.totals.cost, r.unknown_price.machines), (0.0, 1));
    let spend = paddock::cost::spend(&farm.store, at(0), at(3 * HOUR)).await.expect("spend");
    assert_eq!(spend.total, 0.34);
    assert_eq!(spend.by_pool.get("ec2"), Some(&0.34));
}

async fn a_late_instance_of_a_machine_thought_never_launched_is_billed_for_its_whole_life(db: &TestDb) {
    let farm = Farm::new(db).await;
    // The launch's outcome was unknown; when the answer became final nothing had been found,
    // so the machine ended with no launch (billed nothing)...
    farm.store.insert_machine(MachineId(1), "ec2pool", "ec2", "token-1", at(0)).await.expect("insert");
    farm.store.set_machine_state(MachineId(1), "gone", at(200 * SEC)).await.expect("gone");
    let r = farm.report(at(-HOUR), at(HOUR), "pool", at(HOUR)).await;
    assert!(r.rows.is_empty(), "nothing billed yet: {:#?}", r.rows);
    // ...then its instance showed up after all, launched by the cloud at 100 s, and was
    // terminated at 400 s: 300 s at $3.60/h = $0.30, all boot (its agent never connected).
    let launched = Launched {
        provider_id: "i-late".into(),
        instance_type: Some("c5.xlarge".into()),
        lifecycle: "on-demand".into(),
        zone: Some("us-east-1a".into()),
        spot_price: None,
        volume_gb: None,
        volume_type: None,
        launched_at: Some(at(100 * SEC).0),
    };
    assert!(farm
        .store
        .late_life(MachineId(1), &launched, &price(3.60), at(100 * SEC), at(400 * SEC))
        .await
        .expect("late"));
    let r = farm.report(at(-HOUR), at(HOUR), "pool", at(HOUR)).await;
    let ec2 = row(&r, "ec2pool");
    assert_eq!((ec2.cost, ec2.billed_seconds, ec2.boot_seconds), (0.3, 300.0, 300.0));
    // One intent, one instance: a second one is not billed over the first.
    assert!(!farm
        .store
        .late_life(MachineId(1), &launched, &price(3.60), at(500 * SEC), at(600 * SEC))
        .await
        .expect("again"));
}
