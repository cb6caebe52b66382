//! `paddock simulate` at scale: 10,000 commits × 10 builders (about 100,000 builds) through
//! the real schedulers and fleet, in this process. Prints wall time, builds per second and the
//! process's peak resident memory (VmHWM). Target: under 10 s and 200 MB.

use std::time::Instant;

use paddock::sim::{self, Files, Model, TraceChange};

const COMMITS: i64 = 10_000;

const CONFIG: &str = r#"
[master]
cluster = "bench"

[[repo]]
name = "app"
url = "https://git.example.com/app.git"
branches = ["main", "*.x"]

[pool.small]
provisioner = "ec2"
region = "us-east-1"
ami = "ami-0123456789abcdef0"
instance_types = ["t3.small"]
subnets = ["subnet-0aaa"]
security_groups = ["sg-0123"]
spot = true
max_instances = 40
idle_timeout = "5m"

[pool.big]
hourly_price = 0.4
max_instances = 8
idle_timeout = "2m"

[[builder]]
name = "py{v}-{db}"
repo = "app"
pool = "small"
matrix = { v = ["3.10", "3.11", "3.12", "3.13"], db = ["sqlite", "postgres"] }
steps = ["tox"]

[[builder]]
name = "docs"
repo = "app"
pool = "big"
steps = ["make docs"]

[[builder]]
name = "lint"
repo = "app"
pool = "big"
steps = ["make lint"]

[[scheduler]]
name = "all"
kind = "branch"
repo = "app"
builders = ["py*", "docs", "lint"]
"#;

mod common;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, CONFIG).expect("write config");
    let config = paddock::config::load(&path).expect("valid config");
    // A busy year: a commit every ~3 minutes on average, in bursts, over main and two
    // release branches.
    let mut t = 1_700_000_000_000i64;
    let trace: Vec<TraceChange> = (0..COMMITS)
        .map(|i| {
            t += 1_000 * (30 + (i * 7919) % 330);
            let branch = match i % 10 {
                0 => "1.x",
                1 => "2.x",
                _ => "main",
            };
            TraceChange {
                at: paddock::core::Ts(t),
                branch: branch.into(),
                sha: format!("{i:040x}"),
                files: Files::Listed(vec![format!("src/m{}.py", i % 50)]),
            }
        })
        .collect();
    let mut model = Model { seed: 1, ..Model::default() };
    model.boot = sim::Draw::Range(sim::Span::parse("25s..40s").expect("span"));
    model.add_duration("py*=6m..9m").expect("rule");
    model.add_duration("docs=1m").expect("rule");
    model.add_duration("lint=30s").expect("rule");
    model.interruptions = 0.02;
    let start = Instant::now();
    let outcome = sim::simulate(&config, "app", &trace, &model).expect("simulate");
    let took = start.elapsed();
    let builds = outcome.total.builds;
    println!(
        "simulate: {COMMITS} commits, {builds} builds, {} launches in {:.2} s ({:.0} builds/s); peak RSS {:.1} MB",
        outcome.total.launches,
        took.as_secs_f64(),
        builds as f64 / took.as_secs_f64(),
        common::vm_hwm_kib() as f64 / 1024.0
    );
    println!(
        "  cost {:.2} (floor {:.2}), wait p95 {:.0} s, peak {} machines, {} unfinished",
        outcome.total.cost,
        outcome.total.floor_cost,
        outcome.total.wait_p95_s,
        outcome.total.peak_machines,
        outcome.total.unfinished
    );
}
