//! The whole master under load: the real binary, 4 warm local machines, 200 builds (20 pushes
//! × 10 builders, one `true` step each). Prints the master process's own CPU time (user +
//! system, from /proc; the agents are separate processes) per build, and the wall time.
//! Target: at most 1.5 ms of master CPU per build. With `PADDOCK_BENCH_DATABASE` naming an
//! empty PostgreSQL database, the master runs on it, and the server's CPU is printed too.

#[path = "common/master.rs"]
mod master;

use std::time::{Duration, Instant};

const PUSHES: usize = 20;
const BUILDERS: usize = 10;

fn wait(what: &str, dir: &std::path::Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; see {}", dir.join("master.log").display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = master::new_repo(dir.path(), "n.txt");
    let port = master::free_port();
    let config = master::head(port, dir.path(), &repo, "1s")
        + r#"[pool.warm]
max_instances = 4
min_idle = 4
idle_timeout = "30m"
isolation = "none"

[[builder]]
name = "b{n}"
repo = "app"
pool = "warm"
matrix = { n = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] }
steps = ["true"]

[[scheduler]]
kind = "branch"
repo = "app"
builders = ["b*"]
"#;
    let m = master::start_master(dir.path(), &config, port);
    let idle = || {
        let ms = master::get(&format!("{}/api/machines", m.url));
        ms["machines"].as_array().map_or(0, |a| a.iter().filter(|x| x["state"] == "idle").count())
    };
    wait("4 warm machines", dir.path(), || idle() == 4);
    // Progress is read from the database, not the API: the master's CPU is what is measured.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = master::database(dir.path());
    let pg_name = db.starts_with("postgres").then(|| db.rsplit('/').next().unwrap_or("").to_string());
    let pg_cpu = || pg_name.as_deref().map_or(0.0, master::postgres_cpu_seconds);
    let store = rt.block_on(paddock::store::Store::open(&db)).expect("the master's database");
    let filter = paddock::store::BuildFilter { limit: Some(1000), ..Default::default() };
    let builds = || rt.block_on(store.list_builds(&filter)).expect("builds");
    let pid = m.child.id();
    // What the master costs with nothing to build (the 1 s poll, the agents' heartbeats): the
    // part of the figure below that is not the builds' own.
    let (idle0, _) = master::cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(10));
    let (idle1, _) = master::cpu_seconds(pid);
    let idle_per_s = (idle1 - idle0) / 10.0;
    let (cpu0, _) = master::cpu_seconds(pid);
    let pg0 = pg_cpu();
    let t0 = Instant::now();
    for n in 1..=PUSHES {
        std::fs::write(repo.join("n.txt"), format!("{n}\n")).expect("write");
        master::git(&repo, &["commit", "-q", "-am", &format!("push {n}")]);
        // One push per poll, as pushes arrive in life.
        wait("the push to be seen", dir.path(), || builds().len() >= n * BUILDERS);
    }
    let total = PUSHES * BUILDERS;
    wait("every build to finish", dir.path(), || {
        let b = builds();
        b.len() == total && b.iter().all(|x| x.state == paddock::core::build::BuildState::Success)
    });
    let (cpu1, _) = master::cpu_seconds(pid);
    let pg1 = pg_cpu();
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "master: {total} builds on 4 warm machines in {wall:.1} s; master CPU {:.3} s = {:.2} ms per build",
        cpu1 - cpu0,
        1000.0 * (cpu1 - cpu0) / total as f64
    );
    if pg_name.is_some() {
        // The bench's own reads of the builds table are in this figure too.
        println!(
            "PostgreSQL server processes of the database: CPU {:.3} s = {:.2} ms per build",
            pg1 - pg0,
            1000.0 * (pg1 - pg0) / total as f64
        );
    }
    println!(
        "idle master (4 agents, 1 s poll): {:.1} ms CPU per second; over the {wall:.1} s above that is {:.2} ms per build",
        1000.0 * idle_per_s,
        1000.0 * idle_per_s * wall / total as f64
    );
}
