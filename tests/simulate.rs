//! `paddock simulate` driven as a user runs it: the binary, a config file, a CSV trace or a
//! real git repository, and its table or JSON output.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::Bed;
use serde_json::Value;

fn paddock(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paddock")).args(args).output().expect("run paddock");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let (code, out, err) = paddock(&all);
    assert_eq!(code, 0, "paddock {all:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

const LOCAL: &str = r#"
[[repo]]
name = "app"
url = "https://git.example.com/app.git"
branches = ["main", "*.x"]

[pool.p]
max_instances = 1
idle_timeout = "30s"
hourly_price = 3.6

[[builder]]
name = "b"
repo = "app"
pool = "p"
steps = ["true"]

[[scheduler]]
kind = "branch"
repo = "app"
builders = ["b"]
"#;

const EC2: &str = r#"
[master]
cluster = "sim"

[[repo]]
name = "app"
url = "https://git.example.com/app.git"

[pool.p]
provisioner = "ec2"
region = "us-east-1"
ami = "ami-0123456789abcdef0"
instance_types = ["t3.small"]
subnets = ["subnet-0aaa"]
security_groups = ["sg-0123"]
prices = { "t3.small" = 3.6 }
max_instances = 1
idle_timeout = "10s"

[[builder]]
name = "b"
repo = "app"
pool = "p"
steps = ["true"]

[[scheduler]]
kind = "branch"
repo = "app"
builders = ["b"]
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8 path").to_string()
}

fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or(f64::NAN);
    assert!((got - want).abs() < 1e-9, "{got} != {want}");
}

#[test]
fn a_history_worked_out_by_hand_costs_what_the_meter_bills() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "p.toml", LOCAL);
    // Two pushes ten minutes apart, one to a branch the repo does not watch.
    // (a1 pushed twice is one change, as the master stores it.)
    let trace = write(
        tmp.path(),
        "t.csv",
        "unix_time,branch,sha,files\n1000,main,a1,src/x.py\n1000,main,a1,src/x.py\n1300,feature/x,f1,src/y.py\n1600,main,a2,3\n",
    );
    let o = json(&["simulate", &config, "--trace", &trace, "--boot", "10s", "--duration", "60s"]);
    // Each: launched at the push, 10 s boot, 60 s build, 30 s idle, then stopped: 100 s
    // billed at 3.6 an hour (0.001 a second).
    let t = &o["total"];
    assert_eq!(t["builds"], 2, "{o}");
    assert_eq!(o["changes"], 2);
    assert_eq!(o["unwatched_changes"], 1);
    close(&t["cost"], 0.2);
    close(&t["busy_cost"], 0.12);
    close(&t["idle_cost"], 0.06);
    close(&t["boot_cost"], 0.02);
    close(&t["floor_cost"], 0.12);
    close(&t["cost_over_floor"], 0.08);
    close(&t["billed_seconds"], 200.0);
    close(&t["busy_seconds"], 120.0);
    for k in ["wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s"] {
        close(&t[k], 10.0);
    }
    assert_eq!((t["peak_machines"].as_u64(), t["launches"].as_u64()), (Some(1), Some(2)));
    assert_eq!(o["pools"]["p"], o["total"], "one pool: its totals are the total");
    assert_eq!(o["builders"]["b"]["builds"], 2);
    close(&o["builders"]["b"]["cost"], 0.12);
    close(&o["builders"]["b"]["wait_p95_s"], 10.0);

    // A longer idle timeout keeps the machine warm between the pushes: one launch, no
    // second boot, the ten minutes between paid as idle.
    let o = json(&[
        "simulate",
        &config,
        "--trace",
        &trace,
        "--boot",
        "10s",
        "--duration",
        "60s",
        "--set",
        "pool.p.idle_timeout=15m",
    ]);
    let t = &o["total"];
    assert_eq!(t["launches"], 1, "{o}");
    // 1000 → 1010 boot, 1010 → 1070 busy, 1070 → 1600 idle, 1600 → 1660 busy, then 15 min idle.
    close(&t["boot_cost"], 0.01);
    close(&t["busy_cost"], 0.12);
    close(&t["idle_cost"], 0.53 + 0.9);
    close(&t["wait_p50_s"], 0.0);
    close(&t["wait_max_s"], 10.0);
}

#[test]
fn an_ec2_pool_pays_the_sixty_second_minimum() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "p.toml", EC2);
    let trace = write(tmp.path(), "t.csv", "unix_time,branch,sha,files\n1000,main,a1,x\n2000,main,a2,y\n");
    let o = json(&["simulate", &config, "--trace", &trace, "--boot", "5s", "--duration", "10s"]);
    let t = &o["total"];
    // 5 s boot + 10 s build + 10 s idle = 25 s lived, 60 s billed: the 35 s missing are idle.
    close(&t["billed_seconds"], 120.0);
    close(&t["cost"], 0.12);
    close(&t["boot_cost"], 0.01);
    close(&t["busy_cost"], 0.02);
    close(&t["idle_cost"], 0.09);
    assert_eq!(o["prices"]["p"]["source"], "config", "{o}");
}

/// A synthetic history: `n` pushes a few minutes apart over two branches, some touching docs.
fn history(n: u32) -> String {
    let mut s = String::from("unix_time,branch,sha,files\n");
    for i in 0..n {
        let branch = if i % 5 == 0 { "1.x" } else { "main" };
        let files = if i % 3 == 0 { "doc/index.rst".to_string() } else { format!("src/m{i}.py;tests/t{i}.py") };
        s.push_str(&format!("{},{branch},{i:040x},{files}\n", 1_700_000_000 + i * (97 + i % 400)));
    }
    s
}

const FARM: &str = r#"
[master]
cluster = "sim"

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
max_instances = 4
idle_timeout = "5m"

[pool.big]
hourly_price = 0.4
max_instances = 2
idle_timeout = "2m"

[[builder]]
name = "py{v}"
repo = "app"
pool = "small"
matrix = { v = ["3.11", "3.12", "3.13"] }
steps = ["tox"]

[[builder]]
name = "docs"
repo = "app"
pool = "big"
branches = ["main"]
steps = ["make docs"]

[[scheduler]]
name = "tests"
kind = "branch"
repo = "app"
builders = ["py*"]
ignore = ["doc/**"]
tree_stable = "1m"

[[scheduler]]
name = "docs"
kind = "branch"
repo = "app"
builders = ["docs"]
files = ["doc/**"]
"#;

#[test]
fn the_same_inputs_give_the_same_outcome_in_the_documented_shape() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "farm.toml", FARM);
    let trace = write(tmp.path(), "t.csv", &history(300));
    let args = [
        "simulate",
        &config,
        "--trace",
        &trace,
        "--boot",
        "25s..40s",
        "--duration",
        "py*=6m..9m",
        "--duration",
        "docs=1m",
        "--interruptions",
        "0.05",
        "--seed",
        "7",
    ];
    let a = json(&args);
    assert_eq!(a, json(&args), "deterministic");
    let keys = [
        "builds",
        "cost",
        "busy_cost",
        "idle_cost",
        "boot_cost",
        "floor_cost",
        "cost_over_floor",
        "billed_seconds",
        "busy_seconds",
        "wait_p50_s",
        "wait_p95_s",
        "wait_p99_s",
        "wait_max_s",
        "peak_machines",
        "launches",
    ];
    for k in keys {
        assert!(a["total"][k].is_number(), "total.{k} in {}", a["total"]);
        for pool in ["small", "big"] {
            assert!(a["pools"][pool][k].is_number(), "pools.{pool}.{k}");
        }
    }
    for b in ["py3.11", "py3.12", "py3.13", "docs"] {
        for k in ["builds", "cost", "wait_p95_s"] {
            assert!(a["builders"][b][k].is_number(), "builders.{b}.{k} in {}", a["builders"]);
        }
    }
    // Docs build only on main and only for doc changes: 100 doc pushes, 20 of them on 1.x.
    assert_eq!(a["builders"]["docs"]["builds"], 80, "{}", a["builders"]);
    assert!(a["total"]["interruptions"].as_u64() > Some(0), "5% of attempts are interrupted: {}", a["total"]);
    assert_eq!(a["total"]["unfinished"], 0);
    let cost = a["total"]["cost"].as_f64().unwrap_or(0.0);
    let parts =
        ["busy_cost", "idle_cost", "boot_cost"].iter().map(|k| a["total"][k].as_f64().unwrap_or(0.0)).sum::<f64>();
    assert!((cost - parts).abs() < 0.001, "cost {cost} is its parts {parts}");
    assert!(a["total"]["peak_machines"].as_u64() <= Some(6), "max_instances 4 + 2");
    // A different seed draws differently.
    let mut other = args.to_vec();
    let last = other.len() - 1;
    other[last] = "8";
    assert_ne!(json(&other)["total"], a["total"]);

    // A sweep: one row per value, in the order given, each as the run with --set would be.
    let mut sweep = args.to_vec();
    sweep.extend(["--sweep", "pool.small.idle_timeout=1m,5m,30m"]);
    let s = json(&sweep);
    let rows = s["sweep"].as_array().expect("rows");
    let values: Vec<&str> = rows.iter().filter_map(|r| r["value"].as_str()).collect();
    assert_eq!(values, ["1m", "5m", "30m"]);
    assert_eq!(rows[1]["total"], a["total"], "5m is the config's own value");
    let idle = |r: &Value| r["total"]["idle_cost"].as_f64().unwrap_or(0.0);
    assert!(idle(&rows[0]) < idle(&rows[1]) && idle(&rows[1]) < idle(&rows[2]), "{s}");
    let (code, table, err) = paddock(&sweep[..sweep.len()]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("pool.small.idle_timeout") && table.lines().count() == 4, "{table}");
}

#[test]
fn a_history_read_from_a_git_repository_replays_its_branches_first_parent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).expect("mkdir");
    let git = |args: &[&str], date: &str| {
        let out = Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "Ada")
            .env("GIT_AUTHOR_EMAIL", "ada@example.com")
            .env("GIT_COMMITTER_NAME", "Ada")
            .env("GIT_COMMITTER_EMAIL", "ada@example.com")
            .env("GIT_AUTHOR_DATE", date)
            .env("GIT_COMMITTER_DATE", date)
            .output()
            .expect("git must be installed to run these tests (apt-get install git)");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let commit = |file: &str, date: &str| {
        let p = repo.join(file);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, date).expect("write");
        git(&["add", "-A"], date);
        git(&["commit", "-q", "-m", file], date);
    };
    git(&["init", "-q", "-b", "main"], "2024-01-01T00:00:00Z");
    commit("src/a.py", "2024-01-01T10:00:00Z");
    commit("doc/index.rst", "2024-01-01T11:00:00Z");
    git(&["checkout", "-q", "-b", "1.x"], "2024-01-01T11:00:00Z");
    commit("src/fix.py", "2024-01-02T10:00:00Z");
    git(&["checkout", "-q", "main"], "2024-01-02T10:00:00Z");
    git(&["checkout", "-q", "-b", "feature/x"], "2024-01-02T10:00:00Z");
    commit("src/wip.py", "2024-01-03T10:00:00Z");
    let config = write(tmp.path(), "farm.toml", FARM);
    let repo_s = repo.to_str().expect("utf-8");
    let o = json(&["simulate", &config, "--git", repo_s]);
    // main: 2 commits (tests for src/a.py, docs for the doc); 1.x: its own commit (the history
    // it shares with main is main's); feature/x is not watched.
    assert_eq!(o["changes"], 3, "{o}");
    assert_eq!(o["builders"]["docs"]["builds"], 1, "{}", o["builders"]);
    assert_eq!(o["builders"]["py3.12"]["builds"], 2, "{}", o["builders"]);
    assert_eq!(o["from"], "2024-01-01T10:00:00.000Z");
    let o = json(&["simulate", &config, "--git", repo_s, "--since", "2024-01-02T00:00:00Z"]);
    assert_eq!(o["changes"], 1, "{o}");
}

#[test]
fn a_dry_run_says_which_builders_a_change_starts_and_why_not_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "farm.toml", FARM);
    let (code, out, err) = paddock(&["simulate", &config, "--change", "branch=main files=doc/a.rst"]);
    assert_eq!(code, 0, "{err}");
    let line = |b: &str| out.lines().find(|l| l.starts_with(&format!("{b} "))).unwrap_or("").to_string();
    assert!(line("docs").contains("starts") && line("docs").contains("scheduler docs"), "{out}");
    assert!(line("py3.12").contains("no ") && line("py3.12").contains("in its ignore (\"doc/**\")"), "{out}");
    let v = json(&["simulate", &config, "--change", "branch=1.x files=src/a.py,doc/a.rst"]);
    let verdicts = v["builders"].as_array().expect("verdicts");
    let of = |b: &str| verdicts.iter().find(|x| x["builder"] == b).cloned().unwrap_or_default();
    assert_eq!(of("py3.13")["starts"], true, "{v}");
    assert!(of("py3.13")["why"].as_str().unwrap_or("").contains("quiet for 1m"), "{v}");
    assert_eq!(of("docs")["starts"], false);
    assert!(of("docs")["why"].as_str().unwrap_or("").contains("builds only branches \"main\""), "{v}");
    let v = json(&["simulate", &config, "--change", "branch=feature/x"]);
    assert!(v["builders"][0]["why"].as_str().unwrap_or("").contains("is never seen"), "{v}");
}

#[test]
fn bad_input_says_what_and_where() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "p.toml", LOCAL);
    let trace = write(tmp.path(), "t.csv", "unix_time,branch,sha,files\n1000,main,a1,x\nlater,main,a2,y\n");
    let (code, _, err) = paddock(&["simulate", &config, "--trace", &trace]);
    assert_eq!(code, 1);
    assert!(err.contains("t.csv:3: unix_time \"later\" is not a number of seconds"), "{err}");
    let good = write(tmp.path(), "g.csv", "unix_time,branch,sha,files\n1000,main,a1,x\n");
    for (args, want) in [
        (vec!["--set", "pool.p.max_instances=0"], "--set:1:"),
        (vec!["--set", "pool.q.max_instances=2"], "the config has no table `q`"),
        (vec!["--boot", "fast"], "--boot fast"),
        (vec!["--duration", "b=9m..1m"], "the range ends before it starts"),
        (vec!["--interruptions", "2"], "a probability"),
        (vec!["--sweep", "pool.p.idle_timeout"], "--sweep"),
        (vec!["--repo", "other"], "--repo other: the config has no such repo"),
    ] {
        let mut all = vec!["simulate", &config, "--trace", &good];
        all.extend(args.iter().copied());
        let (code, out, err) = paddock(&all);
        assert_eq!(code, 1, "{all:?}: {out}");
        assert!(err.contains(want), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A boot that always outlasts the boot timeout would retry forever: refused.
    let (code, _, err) = paddock(&["simulate", &config, "--trace", &good, "--boot", "5m"]);
    assert_eq!(code, 1);
    assert!(err.contains("--boot 5m: pool p's boot_timeout is 5m"), "{err}");
    // A swept value that is wrong is named as such.
    let (code, _, err) = paddock(&["simulate", &config, "--trace", &good, "--sweep", "pool.p.max_instances=1,0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--sweep pool.p.max_instances=0: `max_instances` must be at least 1"), "{err}");
    // Nothing on a watched branch: said so.
    let other = write(tmp.path(), "o.csv", "unix_time,branch,sha,files\n1000,feature/x,a1,x\n");
    let (code, _, err) = paddock(&["simulate", &config, "--trace", &other]);
    assert_eq!(code, 1);
    assert!(err.contains("none of the trace's 1 changes is on a branch repo app watches (main, *.x)"), "{err}");
    let (code, _, err) = paddock(&["simulate", &config]);
    assert_eq!(code, 1);
    assert!(err.contains("--trace FILE.csv, --git PATH or --from-db"), "{err}");
    // No installation here: its history is not made up, nor an empty database left behind.
    let (code, _, err) = paddock(&["simulate", &config, "--from-db"]);
    assert_eq!(code, 1);
    assert!(err.contains("paddock.db is not a file"), "{err}");
    assert!(!tmp.path().join("paddock.db").exists());
    // Reading history writes nothing, even to a file that is no database.
    std::fs::write(tmp.path().join("paddock.db"), "").expect("empty file");
    let (code, _, err) = paddock(&["simulate", &config, "--from-db"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::metadata(tmp.path().join("paddock.db")).map(|m| m.len()).ok(), Some(0));
}

#[test]
fn builds_that_lose_every_spot_machine_give_up_after_three_attempts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write(tmp.path(), "p.toml", EC2);
    let trace = write(tmp.path(), "t.csv", "unix_time,branch,sha,files\n1000,main,a1,x\n5000,main,a2,y\n");
    // Only spot machines are reclaimed: on demand, nothing is interrupted.
    let o = json(&["simulate", &config, "--trace", &trace, "--interruptions", "1"]);
    assert_eq!((o["total"]["interruptions"].as_u64(), o["total"]["gave_up"].as_u64()), (Some(0), Some(0)), "{o}");
    let o = json(&["simulate", &config, "--trace", &trace, "--interruptions", "1", "--set", "pool.p.spot=true"]);
    let t = &o["total"];
    assert_eq!((t["gave_up"].as_u64(), t["retries"].as_u64()), (Some(2), Some(4)), "{o}");
    assert_eq!((t["interruptions"].as_u64(), t["launches"].as_u64()), (Some(6), Some(6)), "{o}");
    close(&t["floor_cost"], 0.0);
}

fn secs_between(from: &Value, to: &Value) -> f64 {
    let t = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or("")).map(|d| d.timestamp_millis()).unwrap_or(0)
    };
    (t(to) - t(from)) as f64 / 1000.0
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get((v.len().max(1) - 1) / 2).copied().unwrap_or(0.0)
}

#[test]
fn the_simulation_of_a_real_run_predicts_its_builds_launches_bill_and_waits() {
    // The real master: a local pool whose machines take 2 s to boot, steps that sleep 3 s.
    let mut bed = Bed::new(&[]);
    let script = bed.path().join("boot.sh");
    let bin = common::paddock_bin();
    std::fs::write(&script, format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", bin.display())).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pool = format!(
        "[pool.local]\nmax_instances = 2\nidle_timeout = \"4s\"\nboot_timeout = \"60s\"\nhourly_price = 3.6\n\
         agent_command = \"{}\"\n",
        script.display()
    );
    let config = bed.config(
        "",
        &format!(
            "{pool}\n[[builder]]\nname = \"b{{n}}\"\nrepo = \"app\"\npool = \"local\"\nmatrix = {{ n = [\"1\", \"2\"] }}\n\
             steps = [\"sleep 3\"]\n\n[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b*\"]\n"
        ),
    );
    bed.start(&["main"]);
    // A short history, replayed in real time: a push; a second while its builds run (it waits
    // for those machines, which take it warm); a third once every machine has timed out.
    bed.commit("main", "a.txt", "1\n", "one");
    bed.wait("the first builds running", || {
        (bed.builds().iter().filter(|b| b["state"] == "running").count() == 2).then_some(())
    });
    bed.commit("main", "a.txt", "2\n", "two");
    bed.wait_builds_done(4);
    bed.wait("every machine timed out", || {
        let ms = bed.machines();
        (ms.len() == 2 && ms.iter().all(|m| m["state"] == "gone")).then_some(())
    });
    bed.commit("main", "a.txt", "3\n", "three");
    let builds = bed.wait_builds_done(6);
    bed.wait("every machine timed out again", || {
        let ms = bed.machines();
        (ms.len() == 4 && ms.iter().all(|m| m["state"] == "gone")).then_some(())
    });
    assert!(builds.iter().all(|b| b["state"] == "success"), "{builds:?}");
    let real_waits: Vec<f64> = builds.iter().map(|b| secs_between(&b["queued_at"], &b["started_at"])).collect();
    let cost = bed.get("/api/cost?since=1d&format=json");
    let real_billed = cost["totals"]["billed_seconds"].as_f64().expect("billed seconds");
    bed.stop_master();

    // The same history, simulated from the installation's own records.
    let cfg = config.to_str().expect("utf-8");
    let o = json(&["simulate", cfg, "--from-db", "--durations-from-db", "--boot", "db"]);
    let t = &o["total"];
    assert_eq!(o["changes"], 3, "{o}");
    assert_eq!(t["builds"], 6, "the same builds: {o}");
    assert_eq!(t["launches"], 4, "the same launches: {o}");
    let billed = t["billed_seconds"].as_f64().unwrap_or(0.0);
    eprintln!(
        "fidelity: billed {billed} s simulated, {real_billed} s real; waits {:?} real, sim p50 {} max {}",
        real_waits, t["wait_p50_s"], t["wait_max_s"]
    );
    assert!((billed - real_billed).abs() <= 0.02 * real_billed, "billed {billed} s, really {real_billed} s");
    let (sim_p50, real_p50) = (t["wait_p50_s"].as_f64().unwrap_or(0.0), p50(real_waits.clone()));
    let sim_max = t["wait_max_s"].as_f64().unwrap_or(0.0);
    let real_max = real_waits.iter().copied().fold(0.0, f64::max);
    for (sim, real) in [(sim_p50, real_p50), (sim_max, real_max)] {
        assert!(
            (sim - real).abs() <= (0.05 * real).max(1.0),
            "waits: simulated {sim} s, really {real} s ({real_waits:?})"
        );
    }
}
