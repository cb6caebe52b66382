//! Cost report benchmark: a year of a busy farm — 50,000 machines, 150,000 builds, 1,000,000
//! machine events — written through the store into a real SQLite file, then reported over the
//! whole year by pool, builder and day. The report runs in a child process, so its peak memory
//! (VmHWM) is the report's alone. Prints the figures.

mod common;

use std::time::Instant;

use common::vm_hwm_kib;

use paddock::core::MachineId;
use paddock::core::Ts;
use paddock::cost::report::ReportQuery;
use paddock::store::{MachinePrice, NewChange, Store};

const MACHINES: i64 = 50_000;
const BUILDS_PER_MACHINE: i64 = 3;
const SEC: i64 = 1_000;
const MIN: i64 = 60 * SEC;
/// 2025-11-24T00:00:00Z: a year before the report.
const YEAR_START: i64 = 1_763_942_400_000;
const YEAR_MS: i64 = 365 * 24 * 60 * MIN;

/// Writes the year through the store, as the master would: every event of every machine.
async fn generate(store: &Store) -> Result<u64, paddock::store::StoreError> {
    let step = YEAR_MS / MACHINES;
    let price = MachinePrice {
        zone: Some("us-east-1a".into()),
        hourly_price: Some(0.0416),
        price_source: Some("table".into()),
        volume_gb: Some(30),
        volume_type: Some("gp3".into()),
        volume_hourly: Some(30.0 * 0.08 / 730.0),
    };
    let mut events = 0u64;
    for id in 1..=MACHINES {
        let mut t = YEAR_START + id * step;
        let pool = if id % 4 == 0 { "large" } else { "small" };
        let token = format!("token-{id}");
        store.insert_machine(MachineId(id), pool, "ec2", &token, Ts(t)).await?;
        t += 20 * SEC;
        store
            .machine_launched(MachineId(id), &format!("i-{id:017x}"), Some("t3.medium"), "on-demand", &price, Ts(t))
            .await?;
        store.set_machine_state(MachineId(id), "booting", Ts(t)).await?;
        t += 60 * SEC;
        store.claim_token(&token, Ts(t)).await?;
        store.set_machine_state(MachineId(id), "idle", Ts(t)).await?;
        events += 5;
        for b in 0..BUILDS_PER_MACHINE {
            let n = id * BUILDS_PER_MACHINE + b;
            let (builder, branch) = (format!("py3.{}-db{}", n % 5, n % 4), format!("stable/{}", n % 5));
            let revision = format!("{n:040x}");
            let change = NewChange {
                repo: "app".into(),
                branch: branch.clone(),
                revision: revision.clone(),
                author: format!("Committer {}", n % 30),
                committed_at: None,
                message: "change".into(),
                files: vec![],
                source: "poller".into(),
            };
            let stored = store.record_changes(&[change], None, Ts(t)).await?;
            let ids: Vec<i64> = stored.iter().map(|c| c.id).collect();
            let build =
                store.create_request(&builder, "app", &branch, &revision, "branch", "bench", &ids, Ts(t)).await?;
            t += 2 * MIN;
            store.set_machine_state(MachineId(id), "busy", Ts(t)).await?;
            store.start_build(build.id, MachineId(id), &["checkout".into(), "test".into()], Ts(t)).await?;
            t += 15 * MIN;
            store.step_finished(build.id, 0, "success", Some(0), Ts(t)).await?;
            store.step_finished(build.id, 1, "success", Some(0), Ts(t)).await?;
            store.finish_build(build.id, MachineId(id), paddock::core::build::BuildState::Success, Ts(t)).await?;
            store.set_machine_state(MachineId(id), "idle", Ts(t)).await?;
            events += 4;
        }
        t += 10 * MIN;
        store.machine_event(MachineId(id), "stop_requested", "idle_timeout", Ts(t)).await?;
        store.set_machine_state(MachineId(id), "stopping", Ts(t)).await?;
        t += 5 * SEC;
        store.set_machine_state(MachineId(id), "gone", Ts(t)).await?;
        events += 3;
    }
    Ok(events)
}

/// The child: reports over the whole year and prints time per report and peak memory.
async fn report(db: &str) {
    let store = Store::open(&format!("sqlite://{db}")).await.expect("open");
    let now = Ts(YEAR_START + YEAR_MS + 24 * 60 * MIN);
    for by in ["pool", "builder", "day"] {
        let q = ReportQuery::parse(Some("2025-11-24"), Some("2026-11-25"), Some(by), Some("json"), now).expect("query");
        let started = Instant::now();
        let r = paddock::cost::report(&store, &q, now).await.expect("report");
        let took = started.elapsed();
        let json = r.render(q.format);
        println!(
            "  report by {by:<8} {:>8.1} ms   {} rows, {} machines, {} builds, total ${:.2}, {} bytes of JSON",
            took.as_secs_f64() * 1000.0,
            r.rows.len(),
            r.machines,
            r.totals.builds,
            r.totals.cost,
            json.len()
        );
    }
    println!("  report process peak memory (VmHWM): {:.1} MiB", vm_hwm_kib() as f64 / 1024.0);
}

/// The generated year, kept under `target/` between runs (rebuilt when the generator or the
/// schema changes: both are in the name).
fn cached_year() -> std::path::PathBuf {
    const GENERATOR: u32 = 2;
    let schema = paddock::store::MIGRATIONS.len();
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-data")
        .join(format!("cost-year-g{GENERATOR}-s{schema}.db"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if let Some(i) = args.iter().position(|a| a == "--report-child") {
        let db = args.get(i + 1).expect("database path");
        rt.block_on(report(db));
        return;
    }
    println!("cost report over a year of a busy farm");
    let db = cached_year();
    if db.exists() {
        println!("  using the year generated before: {}", db.display());
    } else {
        // Written in memory (tmpfs) when there is one: the store commits every event on its
        // own, and a disk makes that minutes.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir");
        let scratch = dir.path().join("year.db");
        let started = Instant::now();
        let (events, stored) = rt.block_on(async {
            let store = Store::open(&format!("sqlite://{}", scratch.display())).await.expect("open");
            let events = generate(&store).await.expect("generate");
            let stored = store.machine_event_count().await.expect("count");
            store.close().await;
            (events, stored)
        });
        println!(
            "  generated {MACHINES} machines, {} builds, {stored} machine events ({events} by the generator's count) in {:.1} s",
            MACHINES * BUILDS_PER_MACHINE,
            started.elapsed().as_secs_f64()
        );
        if let Some(parent) = db.parent() {
            std::fs::create_dir_all(parent).expect("bench-data folder");
        }
        std::fs::copy(&scratch, &db).expect("keep the generated year");
    }
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe).arg("--report-child").arg(&db).output().expect("run the report child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the report child failed");
}
