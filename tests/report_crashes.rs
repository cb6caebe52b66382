//! A master that dies never costs a build its output or its steps' results: the agent keeps
//! every report until the master has stored it, and a restarted master stores each one once.
//! Killed at chosen seams through the real binary: while the agent's reports sit unread in a
//! frozen master's socket, and between a step's end and the build's end.

mod common;

use common::Bed;

/// A pool whose agents may be away from a master for 30 s and still carry on.
const MASTER: &str = "heartbeat_timeout = \"30s\"\n";
const POOL: &str = "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n";

fn builder(steps: &[(&str, &str)]) -> String {
    let steps: Vec<String> =
        steps.iter().map(|(name, run)| format!("{{ name = \"{name}\", run = '{run}' }}")).collect();
    format!(
        "{POOL}\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [{}]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
        steps.join(", ")
    )
}

/// A shell loop printing `n` numbered lines of build-like output with `prefix`.
fn lines(prefix: &str, n: u32) -> String {
    format!("i=1; while [ $i -le {n} ]; do echo \"{prefix} $i: compiling module $i of the project\"; i=$((i+1)); done")
}

/// What the agent prints for those lines.
fn expected_lines(prefix: &str, n: u32) -> String {
    (1..=n).map(|i| format!("{prefix} {i}: compiling module {i} of the project\n")).collect()
}

fn wait_file(path: &std::path::Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.05; done", path.display())
}

/// Whether a file called `name` exists anywhere under the local pool's machine folders (where a
/// sandboxed step may write: its own work folder).
fn step_wrote(bed: &Bed, name: &str) -> bool {
    fn walk(dir: &std::path::Path, name: &str) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else { return false };
        entries.flatten().any(|e| {
            let path = e.path();
            e.file_name() == name || (path.is_dir() && !path.is_symlink() && walk(&path, name))
        })
    }
    walk(&bed.path().join("paddock-state").join("machines"), name)
}

fn build_log(bed: &Bed, id: i64) -> String {
    bed.http.get(format!("{}/api/builds/{id}/log", bed.url())).send().expect("log").text().expect("text")
}

fn steps(bed: &Bed, id: i64) -> Vec<(String, Option<i64>)> {
    bed.get(&format!("/api/builds/{id}"))["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["state"].as_str().unwrap_or("").to_string(), s["exit_code"].as_i64()))
        .collect()
}

#[test]
fn reports_left_unread_in_a_frozen_masters_socket_are_stored_after_it_is_killed() {
    let mut bed = Bed::new(&[]);
    let go = bed.flag("go");
    let first = format!("echo begin; {}; {}", wait_file(&go), lines("line", 2000));
    bed.config_with_master(MASTER, "", &builder(&[("first", &first), ("second", "echo second step")]));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let running = bed.wait("a running build", || bed.builds().into_iter().find(|b| b["state"] == "running"));
    let id = running["id"].as_i64().expect("id");
    bed.wait("the first step to begin", || build_log(&bed, id).contains("begin").then_some(()));

    // The master freezes: the kernel still takes what the agent sends, nobody reads it.
    bed.signal_master("-STOP");
    bed.raise("go");
    bed.wait("the agent's reports to pile up unread at the frozen master", || {
        (bed.unread_bytes_at_master() >= 32 * 1024).then_some(())
    });
    // It dies with them.
    bed.kill_master();
    bed.start(&["main"]);

    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["id"], id);
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
    assert_eq!(builds[0]["attempt"], 1, "nothing ran twice");
    let want = format!("$ {first}\nbegin\n{}", expected_lines("line", 2000));
    let got = bed.step_log(id, 1);
    assert!(got == want, "step 1's stored log differs from what it printed ({} vs {} bytes)", got.len(), want.len());
    assert_eq!(bed.step_log(id, 2), "$ echo second step\nsecond step\n");
    let states = steps(&bed, id);
    assert_eq!(
        states,
        [("success".into(), Some(0)), ("success".into(), Some(0)), ("success".into(), Some(0))],
        "every step reported its own result"
    );
}

#[test]
fn kills_mid_output_and_between_a_steps_end_and_the_builds_end_lose_nothing() {
    let mut bed = Bed::new(&[]);
    let (go1, go2) = (bed.flag("go1"), bed.flag("go2"));
    let first = format!("echo a-start; {}; {}; touch done1", wait_file(&go1), lines("a", 500));
    let second = format!("{}; {}; touch done2; exit 3", wait_file(&go2), lines("b", 500));
    bed.config_with_master(MASTER, "", &builder(&[("first", &first), ("second", &second)]));
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "1\n", "go");
    let running = bed.wait("a running build", || bed.builds().into_iter().find(|b| b["state"] == "running"));
    let id = running["id"].as_i64().expect("id");
    bed.wait("the first step to begin", || build_log(&bed, id).contains("a-start").then_some(()));

    // Killed while the first step prints and ends: its output and its end happen with no master.
    bed.kill_master();
    bed.raise("go1");
    bed.wait("the first step to end", || step_wrote(&bed, "done1").then_some(()));
    bed.start(&["main"]);
    bed.wait("the first step's output to be stored", || build_log(&bed, id).contains("a 500:").then_some(()));

    // Killed again; the second step prints, fails, and the build ends with no master.
    bed.kill_master();
    bed.raise("go2");
    bed.wait("the second step to end", || step_wrote(&bed, "done2").then_some(()));
    bed.start(&["main"]);

    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["state"], "failure", "{builds:?}");
    assert_eq!(builds[0]["attempt"], 1);
    assert_eq!(bed.step_log(id, 1), format!("$ {first}\na-start\n{}", expected_lines("a", 500)));
    assert_eq!(bed.step_log(id, 2), format!("$ {second}\n{}*** exit code 3\n", expected_lines("b", 500)));
    assert_eq!(
        steps(&bed, id),
        [("success".into(), Some(0)), ("success".into(), Some(0)), ("failure".into(), Some(3))],
        "each step's own result, exit codes included"
    );
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM builds"), Some(1), "no retry");
}
