//! CPU of an idle master: the real binary, two local pools, one repository polled once a
//! minute, no builds. Prints the master's own CPU time (user + system, from /proc) as a share
//! of one core over the measured window, and its children's (git fetch) separately.
//! `PADDOCK_BENCH_IDLE_SECS` sets the window (default 120). Target: under 0.05% of a core.

#[path = "common/master.rs"]
mod master;

use std::time::{Duration, Instant};

fn main() {
    let secs: u64 = std::env::var("PADDOCK_BENCH_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = master::new_repo(dir.path(), "a.txt");
    let port = master::free_port();
    let config = master::head(port, dir.path(), &repo, "60s")
        + r#"[pool.a]
max_instances = 2
isolation = "none"

[pool.b]
max_instances = 2
isolation = "none"

[[builder]]
name = "a"
repo = "app"
pool = "a"
steps = ["true"]

[[builder]]
name = "b"
repo = "app"
pool = "b"
steps = ["true"]

[[scheduler]]
kind = "branch"
repo = "app"
builders = ["a", "b"]
"#;
    let m = master::start_master(dir.path(), &config, port);
    // Past start-up and the first poll.
    std::thread::sleep(Duration::from_secs(5));
    let pid = m.child.id();
    let (own0, kids0) = master::cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (own1, kids1) = master::cpu_seconds(pid);
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "idle master: {:.4}% of a core over {wall:.0} s ({:.3} s CPU); its git children: {:.3} s more",
        100.0 * (own1 - own0) / wall,
        own1 - own0,
        kids1 - kids0
    );
}
