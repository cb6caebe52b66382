//! End to end: real git repositories, the real `paddock` master binary, real agent processes
//! started by the local provisioner, a real SQLite file.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{paddock_bin, Bed};

const POOL: &str = "[pool.local]\nmax_instances = 4\nidle_timeout = \"30s\"\nboot_timeout = \"60s\"\n";

/// `pool` followed by one builder `b` with `steps` and a branch scheduler that builds it.
fn one_builder(pool: &str, steps: &str) -> String {
    format!(
        "{pool}\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n{steps}\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n"
    )
}

fn state(b: &serde_json::Value) -> &str {
    b["state"].as_str().unwrap_or("")
}

#[test]
fn a_commit_builds_only_its_branchs_builders_and_the_matrix_expands() {
    let mut bed = Bed::new(&["feature"]);
    bed.config(
        "branches = [\"main\", \"feature\"]",
        &format!(
            "{POOL}
[[builder]]
name = \"unit-{{py}}-{{db}}\"
repo = \"app\"
pool = \"local\"
branches = [\"main\"]
matrix = {{ py = [\"3.12\", \"3.13\"], db = [\"sqlite\", \"pg\"] }}
steps = [{{ run = \"echo testing {{py}} with {{db}} at $(git rev-parse HEAD)\" }}]

[[builder]]
name = \"feature-check\"
repo = \"app\"
pool = \"local\"
branches = [\"feature\"]
steps = [\"echo feature build\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"*\"]
"
        ),
    );
    bed.start(&["main", "feature"]);
    let rev = bed.commit("main", "src/a.txt", "x\n", "change on main");
    let builds = bed.wait_builds_done(4);
    let names: BTreeSet<&str> = builds.iter().map(|b| b["builder"].as_str().unwrap_or("")).collect();
    assert_eq!(names, BTreeSet::from(["unit-3.12-pg", "unit-3.12-sqlite", "unit-3.13-pg", "unit-3.13-sqlite"]));
    for b in &builds {
        assert_eq!(b["branch"], "main");
        assert_eq!(b["revision"], rev.as_str());
        assert_eq!(state(b), "success", "{b}");
    }
    let one = builds.iter().find(|b| b["builder"] == "unit-3.12-sqlite").expect("build");
    let log =
        bed.http.get(format!("{}/api/builds/{}/log", bed.url(), one["id"])).send().expect("log").text().expect("text");
    assert!(log.contains(&format!("testing 3.12 with sqlite at {rev}")), "checkout at the exact revision: {log}");

    let rev2 = bed.commit("feature", "src/b.txt", "y\n", "change on feature");
    let builds = bed.wait_builds_done(5);
    let newest = &builds[0];
    assert_eq!(newest["builder"], "feature-check");
    assert_eq!(newest["branch"], "feature");
    assert_eq!(newest["revision"], rev2.as_str());
    assert_eq!(state(newest), "success");
    let detail = bed.get(&format!("/api/builds/{}", newest["id"]));
    let steps = detail["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["name"], "checkout");
    assert!(steps.iter().all(|s| s["state"] == "success"), "{detail}");
}

#[test]
fn commits_inside_the_tree_stable_window_give_one_build_of_the_newest() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        &format!(
            "{POOL}
[[builder]]
name = \"tests\"
repo = \"app\"
pool = \"local\"
steps = [\"git log -1 --format=%s\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
tree_stable = \"3s\"
builders = [\"tests\"]
"
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "first of a burst");
    let second = bed.commit("main", "a.txt", "2\n", "second of a burst");
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["revision"], second.as_str());
    // Both changes were seen and fully scheduled, and still only one build exists.
    bed.wait("both changes scheduled", || {
        (bed.db_scalar("SELECT COUNT(*) FROM changes WHERE scheduled = 1") == Some(2)).then_some(())
    });
    assert_eq!(bed.builds().len(), 1);
}

#[test]
fn a_docs_only_commit_triggers_only_the_docs_builder() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        &format!(
            "{POOL}
[[builder]]
name = \"tests\"
repo = \"app\"
pool = \"local\"
steps = [\"true\"]

[[builder]]
name = \"docs\"
repo = \"app\"
pool = \"local\"
steps = [\"cat docs/index.md\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"tests\"]
ignore = [\"docs/**\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"docs\"]
files = [\"docs/**\"]
"
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "docs/index.md", "# Docs\n", "docs only");
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["builder"], "docs");
    bed.wait("change scheduled", || {
        (bed.db_scalar("SELECT COUNT(*) FROM changes WHERE scheduled = 1") == Some(1)).then_some(())
    });
    assert_eq!(bed.builds().len(), 1);

    bed.commit("main", "src/lib.txt", "code\n", "code only");
    let builds = bed.wait_builds_done(2);
    assert_eq!(builds[0]["builder"], "tests");
    bed.wait("both changes scheduled", || {
        (bed.db_scalar("SELECT COUNT(*) FROM changes WHERE scheduled = 1") == Some(2)).then_some(())
    });
    assert_eq!(bed.builds().len(), 2);
}

#[test]
fn six_builds_on_two_machines_never_exceed_the_limit_nor_share_a_machine() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        "[pool.local]\nmax_instances = 2\nidle_timeout = \"30s\"\n
[[builder]]
name = \"job-{n}\"
repo = \"app\"
pool = \"local\"
matrix = { n = [\"1\", \"2\", \"3\", \"4\", \"5\", \"6\"] }
steps = [\"sleep 1\", \"echo done {n}\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"job-*\"]
",
    );
    bed.start(&["main"]);
    // Count machines with a live process while the builds run.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let root = bed.path().to_path_buf();
        std::thread::spawn(move || {
            let probe = common::AgentProbe::new(&root);
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(probe.count(), Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    bed.commit("main", "a.txt", "go\n", "six builds");
    let builds = bed.wait_builds_done(6);
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    assert!(builds.iter().all(|b| state(b) == "success"), "{builds:?}");
    assert!(peak.load(Ordering::SeqCst) <= 2, "peak machines alive {}", peak.load(Ordering::SeqCst));
    assert!(peak.load(Ordering::SeqCst) >= 1);
    assert!(bed.machines().len() <= 2, "machines are reused: {:?}", bed.machines());
    // No machine ran two builds at once: its builds' intervals do not overlap.
    let mut by_machine: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    for b in &builds {
        by_machine
            .entry(b["machine"].as_i64().expect("machine"))
            .or_default()
            .push((b["started_at"].as_str().unwrap_or("").into(), b["finished_at"].as_str().unwrap_or("").into()));
    }
    for (m, mut spans) in by_machine {
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "machine {m} overlapped: {w:?}");
        }
    }
}

#[test]
fn an_idle_machine_stops_after_idle_timeout_and_min_idle_keeps_one_warm() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        "[pool.local]\nmax_instances = 2\nidle_timeout = \"2s\"\n
[[builder]]
name = \"b\"
repo = \"app\"
pool = \"local\"
steps = [\"true\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"b\"]
",
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "one build");
    bed.wait_builds_done(1);
    bed.wait("the idle machine to stop", || {
        let ms = bed.machines();
        (!ms.is_empty() && ms.iter().all(|m| m["state"] == "gone") && bed.agent_pids().is_empty()).then_some(())
    });
    let stopped = bed.get("/api/machines")["machines"][0].clone();
    assert!(stopped["terminated_at"].is_string());
    bed.stop_master();

    // Now with one machine kept warm.
    bed.config(
        "",
        "[pool.local]\nmax_instances = 2\nmin_idle = 1\nidle_timeout = \"2s\"\n
[[builder]]
name = \"b-{n}\"
repo = \"app\"
pool = \"local\"
matrix = { n = [\"1\", \"2\"] }
steps = [\"sleep 1\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"b-*\"]
",
    );
    bed.start(&["main"]);
    let warm = bed.wait("a warm machine", || bed.machines().into_iter().find(|m| m["state"] == "idle"));
    bed.commit("main", "a.txt", "2\n", "two builds");
    bed.wait_builds_done(3);
    // One of the two machines goes; one stays idle, past several idle timeouts.
    let (gone_at, keeper) = bed.wait("one machine stopped, one kept", || {
        let ms = bed.machines();
        let fresh: Vec<_> = ms.iter().filter(|m| m["id"].as_i64() > warm["id"].as_i64().map(|i| i - 1)).collect();
        let gone: Vec<_> = fresh.iter().filter(|m| m["state"] == "gone").collect();
        let idle: Vec<_> = fresh.iter().filter(|m| m["state"] == "idle").collect();
        (gone.len() == 1 && idle.len() == 1)
            .then(|| (gone[0]["terminated_at"].as_str().unwrap_or("").to_string(), idle[0]["id"].clone()))
    });
    let later = chrono_after(&gone_at, 5);
    bed.wait("five seconds after the stop", || (now_rfc3339() > later).then_some(()));
    let ms = bed.machines();
    let k = ms.iter().find(|m| m["id"] == keeper).expect("keeper");
    assert_eq!(k["state"], "idle", "min_idle keeps one warm: {ms:?}");
}

fn now_rfc3339() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.000Z"]).output().expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn chrono_after(ts: &str, secs: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("{ts} + {secs} seconds"), "+%Y-%m-%dT%H:%M:%S.000Z"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts a master whose only build blocks on its first attempt (until killed) and succeeds on
/// the next one; commits, and waits until the first attempt runs. Returns it and its machine.
fn start_hanging_build(bed: &mut Bed) -> (i64, serde_json::Value) {
    // Machines cannot leave a mark for the next attempt: the test raises a flag they can see.
    let retried = bed.flag("retried");
    let steps = format!(
        "steps = [\"if [ -e {m} ]; then echo second attempt; else echo first attempt; sleep 120; fi\"]",
        m = retried.display()
    );
    bed.config("", &one_builder(POOL, &steps));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let first = bed.wait("a running build", || bed.builds().into_iter().find(|b| state(b) == "running"));
    let id = first["id"].as_i64().expect("id");
    wait_for_log(bed, id, "first attempt");
    bed.raise("retried");
    let machine = bed.machines().into_iter().find(|m| m["id"] == first["machine"]).expect("machine");
    (id, machine)
}

/// Sends `signal` to the agent process of `machine` (inside its sandbox).
fn signal_agent(bed: &Bed, machine: &serde_json::Value, signal: &str) {
    let pid = bed.agent_of(machine["id"].as_i64().expect("id"));
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("kill");
    assert!(status.success());
}

/// After a first attempt was lost: two builds, the first `retry`, the second `success` on
/// another machine; the lost machine is gone with all its processes. Returns the lost machine.
fn assert_retried_elsewhere(bed: &Bed, id: i64) -> i64 {
    let builds = bed.wait_builds_done(2);
    let old = builds.iter().find(|b| b["id"] == id).expect("old attempt");
    let new = builds.iter().find(|b| b["id"] != id).expect("new attempt");
    assert_eq!(state(old), "retry");
    assert_eq!(state(new), "success");
    assert_eq!(new["attempt"], 2);
    assert_ne!(new["machine"], old["machine"], "retried on a new machine");
    wait_for_log(bed, new["id"].as_i64().expect("id"), "second attempt");
    let lost = old["machine"].as_i64().expect("machine");
    bed.wait("the lost machine and all its processes to be gone", || {
        let gone = bed.machines().into_iter().any(|m| m["id"] == lost && m["state"] == "gone");
        (gone && common::machine_processes(bed.path(), lost).is_empty()).then_some(())
    });
    lost
}

fn wait_for_log(bed: &Bed, build: i64, text: &str) {
    bed.wait(&format!("build {build} log to show {text:?}"), || {
        let log = bed.http.get(format!("{}/api/builds/{build}/log", bed.url())).send().ok()?.text().ok()?;
        log.contains(text).then_some(())
    });
}

#[test]
fn an_agent_killed_mid_build_is_retried_on_a_new_machine() {
    let mut bed = Bed::new(&[]);
    let (id, machine) = start_hanging_build(&mut bed);
    signal_agent(&bed, &machine, "-KILL");
    assert_retried_elsewhere(&bed, id);
}

/// Starts a master whose only build runs until the file `go` appears; commits and waits until
/// the build is running. Returns the build id, its machine and the path of `go`.
fn start_waiting_build(bed: &mut Bed) -> (i64, serde_json::Value, std::path::PathBuf) {
    let go = bed.flag("go");
    bed.config(
        "",
        &one_builder(
            POOL,
            &format!("steps = [\"echo started; while [ ! -e {} ]; do sleep 0.1; done; echo finished\"]", go.display()),
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let b = bed.wait("a running build", || bed.builds().into_iter().find(|b| state(b) == "running"));
    let id = b["id"].as_i64().expect("id");
    wait_for_log(bed, id, "started");
    let machine = bed.machines().into_iter().find(|m| m["id"] == b["machine"]).expect("machine");
    (id, machine, go)
}

#[test]
fn a_master_killed_mid_build_re_attaches_to_the_running_build() {
    let mut bed = Bed::new(&[]);
    let (id, machine, go) = start_waiting_build(&mut bed);
    let agents = bed.agent_pids();
    assert_eq!(agents.len(), 1);
    bed.kill_master();
    // The build goes on while the master is away; it says so when the master is back.
    bed.start(&["main"]);
    bed.wait("the agent to reconnect", || bed.log().contains("agent reconnected").then_some(()));
    std::fs::write(&go, "").expect("go");
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["id"], id);
    assert_eq!(state(&builds[0]), "success", "{builds:?}");
    assert_eq!(builds[0]["attempt"], 1, "nothing ran twice");
    assert_eq!(builds[0]["machine"], machine["id"], "the same machine finished it");
    wait_for_log(&bed, id, "finished");
    let log = bed.http.get(format!("{}/api/builds/{id}/log", bed.url())).send().expect("log").text().expect("text");
    assert_eq!(log.lines().filter(|l| *l == "started").count(), 1, "the step ran once:\n{log}");
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM build_requests"), Some(1), "no duplicate request");
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM changes"), Some(1), "the change was not recorded twice");
    assert_eq!(bed.agent_pids(), agents, "the same agent, no other");
}

#[test]
fn an_agent_that_dies_while_the_master_is_down_has_its_build_retried() {
    let mut bed = Bed::new(&[]);
    let (id, machine, go) = start_waiting_build(&mut bed);
    bed.kill_master();
    signal_agent(&bed, &machine, "-KILL");
    let lost = machine["id"].as_i64().expect("machine");
    bed.wait("the agent to die", || {
        common::machine_processes(bed.path(), lost).iter().all(|p| !common::is_agent(*p)).then_some(())
    });
    std::fs::write(&go, "").expect("go");
    bed.start(&["main"]);
    let builds = bed.wait_builds_done(2);
    let old = builds.iter().find(|b| b["id"] == id).expect("old attempt");
    let new = builds.iter().find(|b| b["id"] != id).expect("new attempt");
    assert_eq!(state(old), "retry");
    assert_eq!(state(new), "success");
    assert_ne!(new["machine"], old["machine"]);
    bed.wait("every process of the lost machine gone", || {
        common::machine_processes(bed.path(), lost).is_empty().then_some(())
    });
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM build_requests"), Some(1));
}

#[test]
fn a_machine_still_booting_when_the_master_dies_is_kept_and_runs_the_build() {
    let mut bed = Bed::new(&[]);
    let go = bed.flag("boot-go");
    let script = bed.path().join("slow-boot.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh
while [ ! -e {go} ]; do sleep 0.05; done
exec {bin} \"$@\"\n",
            go = go.display(),
            bin = bed.agent_binary().display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bed.config(
        "",
        &one_builder(
            &format!(
                "[pool.local]\nmax_instances = 1\nboot_timeout = \"60s\"\nagent_command = \"{}\"\n",
                script.display()
            ),
            "steps = [\"echo built\"]",
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let booting = bed.wait("a booting machine", || bed.machines().into_iter().find(|m| m["state"] == "booting"));
    bed.kill_master();
    bed.start(&["main"]);
    bed.wait("the booting machine kept", || bed.log().contains("still booting; waiting for its agent").then_some(()));
    // Its boot ends after the restart: the agent says hello with its one-time token.
    bed.raise("boot-go");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{builds:?}");
    assert_eq!(builds[0]["attempt"], 1);
    assert_eq!(builds[0]["machine"], booting["id"], "built on the machine that was booting");
    assert_eq!(bed.machines().len(), 1, "no boot wasted: {:?}", bed.machines());
}

#[test]
fn a_machine_that_never_connects_is_stopped_after_boot_timeout_and_its_build_retried() {
    let mut bed = Bed::new(&[]);
    // The first machine never connects; later ones are real agents.
    let script = bed.path().join("slow-agent.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$PADDOCK_MACHINE_ID\" = 1 ]; then exec sleep 300; fi\nexec {bin} \"$@\"\n",
            bin = bed.agent_binary().display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bed.config(
        "",
        &one_builder(
            &format!(
                "[pool.local]\nmax_instances = 1\nboot_timeout = \"2s\"\nagent_command = \"{}\"\n",
                script.display()
            ),
            "steps = [\"true\"]",
        ),
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success");
    let ms = bed.machines();
    assert!(ms.len() >= 2, "{ms:?}");
    let first = ms.iter().min_by_key(|m| m["id"].as_i64()).expect("first");
    assert_eq!(first["state"], "gone");
    assert_eq!(first["connected_at"], serde_json::Value::Null);
    assert_ne!(builds[0]["machine"], first["id"]);
    bed.wait("the never-connected machine's process to be gone", || {
        common::machine_processes(bed.path(), first["id"].as_i64().unwrap_or(0)).is_empty().then_some(())
    });
}

#[test]
fn a_step_that_prints_a_secret_leaves_no_trace_of_it() {
    let mut bed = Bed::new(&[]);
    let secret = "s3cr3t-v4lue-xyz";
    let secrets = bed.path().join("secrets.toml");
    std::fs::write(&secrets, format!("DEPLOY_KEY = \"{secret}\"\n")).expect("secrets");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let text = bed.config("", "");
    let body = std::fs::read_to_string(&text)
        .expect("read")
        .replace("[master]\n", "[master]\nsecrets_file = \"secrets.toml\"\n");
    std::fs::write(
        &text,
        format!(
            "{body}{POOL}
[[builder]]
name = \"deploy\"
repo = \"app\"
pool = \"local\"
env = {{ KEY = \"{{secret:DEPLOY_KEY}}\" }}
steps = [
  \"echo whole: {{secret:DEPLOY_KEY}}\",
  \"printf 'halves: s3cr3t-'; sleep 0.3; printf 'v4lue-xyz\\\\n'\",
  \"printf 'split: s3cr3t-'; printf 'v4lue-xyz\\\\n' >&2\",
  \"echo from env: $KEY\",
  \"env\",
]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"deploy\"]
"
        ),
    )
    .expect("config");
    // A secret of the master's own environment that no step references.
    bed.start_with_env(&["main"], &[("CLOUD_KEY_OF_THE_MASTER", "m4ster-only-k3y")]);
    bed.commit("main", "a.txt", "1\n", "go");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{builds:?}");
    let id = builds[0]["id"].as_i64().expect("id");
    let log = bed.http.get(format!("{}/api/builds/{id}/log", bed.url())).send().expect("log").text().expect("text");
    assert!(!log.contains(secret), "secret in stored log:\n{log}");
    assert_eq!(log.matches("<secret:DEPLOY_KEY>").count(), 5, "four redacted prints and the env dump:\n{log}");
    assert!(log.contains("split: <secret:DEPLOY_KEY>\n"), "half on stdout, half on stderr:\n{log}");
    assert!(!log.contains("m4ster-only-k3y"), "a machine starts with a clean environment:\n{log}");
    assert!(log.contains("PATH="), "the env step ran:\n{log}");
    let api =
        format!("{}{}{}", bed.get("/api/builds"), bed.get(&format!("/api/builds/{id}")), bed.get("/api/builders"));
    assert!(!api.contains(secret), "secret in the API");
    assert!(!bed.log().contains(secret), "secret in the master's log");
    let db = std::fs::read(bed.path().join("paddock.db")).expect("db");
    assert!(!String::from_utf8_lossy(&db).contains(secret), "secret in the database file");
}

#[test]
fn an_agent_with_a_wrong_or_reused_token_is_refused() {
    let mut bed = Bed::new(&[]);
    // The agent's log (its work directory is all a machine may write) records its token.
    let script = bed.path().join("recording-agent.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"token=$PADDOCK_AGENT_TOKEN\" >&2\nexec {} \"$@\"\n", bed.agent_binary().display()),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bed.config(
        "",
        &one_builder(&format!("[pool.local]\nagent_command = \"{}\"\n", script.display()), "steps = [\"true\"]"),
    );
    bed.start(&["main"]);
    // A made-up token.
    let out = std::process::Command::new(paddock_bin())
        .args(["agent", "--master", &bed.url(), "--token", "not-a-real-token", "--workdir"])
        .arg(bed.path())
        .output()
        .expect("agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"), "{}", String::from_utf8_lossy(&out.stderr));
    // A real token, used once already by the machine it was made for.
    bed.commit("main", "a.txt", "1\n", "go");
    bed.wait_builds_done(1);
    let machine = bed.builds()[0]["machine"].as_i64().expect("machine");
    let agent_log = std::fs::read_to_string(bed.machine_dir("local", machine).join("agent.log")).expect("agent log");
    let token = agent_log.lines().find_map(|l| l.strip_prefix("token=")).expect("token recorded").to_string();
    assert_eq!(token.len(), 64);
    let out = std::process::Command::new(paddock_bin())
        .args(["agent", "--master", &bed.url(), "--workdir"])
        .arg(bed.path())
        .env("PADDOCK_AGENT_TOKEN", &token)
        .output()
        .expect("agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    let log = bed.log();
    assert_eq!(log.matches("agent refused").count(), 2, "both refusals logged");
    assert!(!log.contains(&token), "the token is never logged");
}

#[test]
fn force_builds_logs_and_the_builds_table_through_the_cli() {
    let mut bed = Bed::new(&["topic"]);
    bed.config(
        "branches = [\"main\", \"topic\"]",
        &format!("{POOL}\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"echo forced build on $PADDOCK_BRANCH\"]\n"),
    );
    bed.start(&["main", "topic"]);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(paddock_bin())
            .args(args)
            .env("PADDOCK_MASTER", bed.url())
            .env("PADDOCK_TOKEN", bed.token())
            .output()
            .expect("cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&["force", "b", "--branch", "topic"]);
    assert!(ok, "{err}");
    assert!(out.contains("queued build"), "{out}");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success");
    assert_eq!(builds[0]["branch"], "topic");
    let (ok, out, _) = cli(&["builds", "--branch", "topic"]);
    assert!(ok);
    assert!(out.lines().next().unwrap_or("").starts_with("ID"), "{out}");
    assert!(out.contains("success") && out.contains("topic"), "{out}");
    let (ok, out, _) = cli(&["log", &builds[0]["id"].to_string()]);
    assert!(ok);
    assert!(out.contains("forced build on topic"), "{out}");
    let (ok, _, err) = cli(&["force", "nope", "--branch", "main"]);
    assert!(!ok);
    assert!(err.contains("unknown builder"), "{err}");
    let (ok, _, err) = cli(&["force", "b", "--branch", "no-such-branch"]);
    assert!(!ok);
    assert!(err.contains("no-such-branch"), "{err}");
}

#[test]
fn sigterm_lets_the_running_build_finish_then_stops_every_machine() {
    let mut bed = Bed::new(&[]);
    let (id, _, go) = start_waiting_build(&mut bed);
    // Ask the master to stop; once it says so, let the build finish within the grace period.
    let log_before = bed.log().len();
    bed.term_master();
    bed.wait("the master to start shutting down", || bed.log()[log_before..].contains("shutting down").then_some(()));
    assert_eq!(bed.db_scalar(&format!("SELECT COUNT(*) FROM builds WHERE id = {id} AND state = 'running'")), Some(1));
    let refused = bed
        .http
        .post(format!("{}/api/builds", bed.url()))
        .json(&serde_json::json!({"builder": "b", "branch": "main"}))
        .send()
        .expect("post");
    assert_eq!(refused.status().as_u16(), 503, "no new builds while shutting down");
    std::fs::write(&go, "").expect("go");
    let status = bed.wait_master_exit();
    assert!(status.success(), "master exit: {status:?}");
    assert_eq!(bed.db_scalar(&format!("SELECT COUNT(*) FROM builds WHERE id = {id} AND state = 'success'")), Some(1));
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM machines WHERE state != 'gone'"), Some(0));
    assert!(bed.agent_pids().is_empty());
}

#[test]
fn an_agent_silent_past_the_heartbeat_limit_is_lost_and_its_build_retried() {
    let mut bed = Bed::new(&[]);
    let (id, machine) = start_hanging_build(&mut bed);
    // Frozen, not dead: the connection stays open but no heartbeat comes.
    signal_agent(&bed, &machine, "-STOP");
    let lost = assert_retried_elsewhere(&bed, id);
    let events =
        bed.db_scalar(&format!("SELECT COUNT(*) FROM machine_events WHERE machine_id = {lost} AND kind = 'lost'"));
    assert_eq!(events, Some(1), "the machine was recorded as lost");
}

#[test]
fn an_ephemeral_pool_gives_every_build_a_fresh_machine() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        "[pool.local]\nmax_instances = 1\nmax_builds = 1\n
[[builder]]
name = \"e-{n}\"
repo = \"app\"
pool = \"local\"
matrix = { n = [\"1\", \"2\", \"3\"] }
steps = [\"test ! -e leftover && touch leftover\"]

[[scheduler]]
kind = \"branch\"
repo = \"app\"
builders = [\"e-*\"]
",
    );
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "three builds");
    let builds = bed.wait_builds_done(3);
    assert!(builds.iter().all(|b| state(b) == "success"), "{builds:?}");
    let machines: BTreeSet<i64> = builds.iter().map(|b| b["machine"].as_i64().expect("machine")).collect();
    assert_eq!(machines.len(), 3, "one machine per build");
    bed.wait("every ephemeral machine gone", || {
        let ms = bed.machines();
        (ms.len() == 3 && ms.iter().all(|m| m["state"] == "gone" && m["builds_run"] == 1)).then_some(())
    });
}

#[test]
fn a_build_that_keeps_killing_its_machine_gives_up_after_three_attempts() {
    let mut bed = Bed::new(&[]);
    bed.config("", &one_builder(POOL, "steps = [\"kill -KILL $PPID\"]"));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let mut builds = bed.wait_builds_done(3);
    builds.sort_by_key(|b| b["attempt"].as_i64());
    let states: Vec<&str> = builds.iter().map(state).collect();
    assert_eq!(states, ["retry", "retry", "exception"], "{builds:?}");
    assert!(builds[2]["reason"].as_str().unwrap_or("").contains("gave up after 3 attempts"), "{builds:?}");
    bed.wait("every machine gone", || bed.machines().iter().all(|m| m["state"] == "gone").then_some(()));
    assert_eq!(bed.machines().len(), 3);
}

#[test]
fn a_change_replayed_after_a_crash_is_not_requested_twice() {
    let mut bed = Bed::new(&[]);
    bed.config("", &one_builder(POOL, "steps = [\"true\"]"));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    bed.wait_builds_done(1);
    bed.kill_master();
    // As if the master had died after storing the request but before marking the change done.
    bed.db_execute("UPDATE changes SET scheduled = 0");
    bed.start(&["main"]);
    bed.wait("the replayed change to be done", || {
        (bed.db_scalar("SELECT COUNT(*) FROM changes WHERE scheduled = 1") == Some(1)).then_some(())
    });
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM build_requests"), Some(1));
    assert_eq!(bed.builds().len(), 1);
    assert!(bed.log().contains("already requested before the restart"));
}

#[test]
fn a_build_that_finishes_while_the_master_is_down_is_reported_when_it_returns() {
    let mut bed = Bed::new(&[]);
    let (id, machine, go) = start_waiting_build(&mut bed);
    bed.kill_master();
    std::fs::write(&go, "").expect("go");
    // The agent keeps the result until the master is back.
    bed.start(&["main"]);
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["id"], id);
    assert_eq!(state(&builds[0]), "success", "{builds:?}");
    assert_eq!(builds[0]["machine"], machine["id"]);
    wait_for_log(&bed, id, "finished");
}

#[test]
fn a_step_that_prints_a_nul_byte_finishes_with_its_log() {
    let mut bed = Bed::new(&[]);
    bed.config("", &one_builder(POOL, "steps = [\"printf 'before\\\\000after\\\\n'\"]"));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{builds:?}");
    wait_for_log(&bed, builds[0]["id"].as_i64().expect("id"), "before\u{2400}after");
}

/// The master's main paths again with its database on PostgreSQL: builds, limits, a lost
/// agent, a master killed mid-build and restarted, a replayed change, the CLI.
mod on_postgres {
    macro_rules! on_postgres {
        ($($name:ident),+ $(,)?) => {$(
            #[test]
            fn $name() {
                super::common::beds_on_postgres();
                super::$name();
            }
        )+};
    }
    on_postgres!(
        a_commit_builds_only_its_branchs_builders_and_the_matrix_expands,
        six_builds_on_two_machines_never_exceed_the_limit_nor_share_a_machine,
        an_idle_machine_stops_after_idle_timeout_and_min_idle_keeps_one_warm,
        an_agent_killed_mid_build_is_retried_on_a_new_machine,
        a_master_killed_mid_build_re_attaches_to_the_running_build,
        a_machine_still_booting_when_the_master_dies_is_kept_and_runs_the_build,
        force_builds_logs_and_the_builds_table_through_the_cli,
        a_change_replayed_after_a_crash_is_not_requested_twice,
        a_build_that_finishes_while_the_master_is_down_is_reported_when_it_returns,
        a_step_that_prints_a_nul_byte_finishes_with_its_log,
    );
}
