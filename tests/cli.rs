//! The command line as a user meets it: `check-config` on good and bad files, `--help`.

mod common;

use std::process::Command;

use common::paddock_bin;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(paddock_bin()).args(args).output().expect("run paddock");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_config_prints_the_expanded_builders_of_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/paddock.toml");
    let (code, out, err) = run(&["check-config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("test-py3.12-sqlite"), "{out}");
    assert!(out.contains("test-py3.13-postgres"), "{out}");
    assert!(out.contains("OK ("), "{out}");
}

#[test]
fn check_config_shows_what_the_shipped_ec2_example_will_launch() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ec2.toml");
    let (code, out, err) = run(&["check-config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("test-stable") && out.contains("test-beta"), "{out}");
    assert!(
        out.contains(
            "ec2: region eu-west-1, ami-0123456789abcdef0, types [t3.small, t3a.small], subnets [subnet-0aaa, subnet-0bbb], spot, falling back to on-demand"
        ),
        "{out}"
    );
    // What its machines will cost, and its caps, before anything runs.
    assert!(
        out.contains(
            "    cost: t3.small $0.0228/h (table), t3a.small $0.0204/h (table), spot machines at the spot price of their launch; at most $2.50 per hour"
        ),
        "{out}"
    );
    assert!(out.contains("spend caps over all pools: at most $40.00 per day"), "{out}");
}

#[test]
fn check_config_points_at_the_mistake_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[pool.small]\nmax_instances = 2\nidle_timout = \"5m\"\n").expect("write");
    let (code, out, err) = run(&["check-config", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.starts_with(&format!("{}:3:1: error: unknown key `idle_timout`", path.display())), "{err}");
    assert!(err.contains("hint: did you mean `idle_timeout`?"), "{err}");
    let (code, _, err) = run(&["check-config", "/nonexistent/paddock.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/paddock.toml"), "{err}");
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "run",
        "check-config",
        "builds",
        "log",
        "force",
        "rebuild",
        "cancel",
        "terminate",
        "pause",
        "resume",
        "cost",
        "user",
        "token",
        "agent",
        "demo",
    ] {
        let (code, out, err) = run(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}: {err}");
        assert!(out.contains("Usage: paddock"), "{sub}: {out}");
    }
}

#[test]
fn client_commands_say_when_the_master_is_unreachable() {
    let port = common::free_port();
    let (code, _, err) = run(&["builds", "--master", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the master"), "{err}");
}

/// Runs `paddock demo` in `dir` (as `user`, when given) with `args`, waits for the builds of its
/// two commits to succeed, stops it with SIGTERM and checks that it ends cleanly with no machine
/// process left.
fn demo_builds_and_stops(dir: &std::path::Path, user: Option<(u32, u32)>, args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let port = common::free_port();
    let mut bin = paddock_bin();
    if user.is_some() {
        // Another user may not reach the build's own binary: a checkout in a private folder
        // (mktemp -d makes them 0700) is closed to it. It runs a copy in its own folder.
        let copy = dir.with_extension("bin");
        std::fs::copy(&bin, &copy).expect("copy the paddock binary where the demo's user can run it");
        bin = copy;
    }
    let mut cmd = Command::new(&bin);
    cmd.arg("demo").arg("--dir").arg(dir).args(["--port", &port.to_string()]).args(args);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid).env("HOME", dir);
    }
    let log = std::fs::File::create(dir.with_extension("log")).expect("log");
    let mut demo =
        cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("demo");
    let http = common::blocking_client().timeout(std::time::Duration::from_secs(10)).build().expect("client");
    let start = std::time::Instant::now();
    loop {
        let builds: Vec<serde_json::Value> = http
            .get(format!("http://127.0.0.1:{port}/api/builds"))
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .and_then(|v| v["builds"].as_array().cloned())
            .unwrap_or_default();
        let failed: Vec<&serde_json::Value> = builds.iter().filter(|b| b["state"] == "failure").collect();
        assert!(failed.is_empty(), "a demo build failed: {failed:?}");
        if builds.iter().filter(|b| b["state"] == "success").count() == 4 {
            break;
        }
        if start.elapsed() > common::DEADLINE || matches!(demo.try_wait(), Ok(Some(_))) {
            let _ = demo.kill();
            panic!(
                "the demo's four builds did not succeed: {builds:?}\n{}",
                std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let start = std::time::Instant::now();
    let status = loop {
        if let Ok(Some(status)) = demo.try_wait() {
            break status;
        }
        assert!(start.elapsed() < common::DEADLINE, "the demo did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "demo exit: {status:?}");
    assert_eq!(common::AgentProbe::new(dir).count(), 0, "no machine process is left");
}

#[test]
fn the_demo_builds_its_commits_sandboxed_for_a_normal_user() {
    common::require_sandbox();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    // As root, the demo runs as the test user, in a folder of its own.
    let user = common::is_root().then(|| common::user_ids(common::TEST_USER));
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).expect("chown");
    }
    demo_builds_and_stops(&dir, user, &[]);
    let config = std::fs::read_to_string(dir.join("paddock.toml")).expect("config");
    assert!(!config.contains("isolation = \"none\"") && !config.contains("run_as"), "{config}");
}

#[test]
fn the_demo_as_root_runs_its_builds_as_an_unprivileged_user_or_says_what_to_do() {
    common::require_sandbox();
    assert!(common::is_root(), "this test runs the demo as root: run the tests as root (CI does, through .ci/test)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let (code, _, err) = run(&["demo", "--dir", dir.to_str().expect("utf-8"), "--run-as", "no-such-user-7f3a"]);
    assert_eq!(code, 1);
    assert!(err.contains("the demo runs as root, and its builds must not"), "{err}");
    assert!(err.contains("useradd --system --no-create-home no-such-user-7f3a"), "{err}");
    demo_builds_and_stops(&dir, None, &["--run-as", common::TEST_USER]);
    let config = std::fs::read_to_string(dir.join("paddock.toml")).expect("config");
    assert!(config.contains(&format!("run_as = \"{}\"", common::TEST_USER)), "{config}");
    // Named by nobody, the build user is the demo's own, made when missing: on a fresh machine
    // `cargo run -- demo` as root needs no other step.
    let dir = tmp.path().join("default-user");
    demo_builds_and_stops(&dir, None, &[]);
    let config = std::fs::read_to_string(dir.join("paddock.toml")).expect("config");
    assert!(config.contains("run_as = \"paddock-build\""), "{config}");
    let user = nix::unistd::User::from_name("paddock-build").expect("user lookup").expect("the demo made its user");
    assert!(!user.uid.is_root());
}

#[test]
fn check_config_shows_how_local_machines_are_confined() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("p.toml");
    std::fs::write(&path, "[pool.a]\nrun_as = \"paddock-build\"\n[pool.b]\n[pool.c]\nisolation = \"none\"\n")
        .expect("write");
    let (code, out, err) = run(&["check-config", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  a: local,") && out.contains("    isolation: sandbox (bubblewrap), as user paddock-build"),
        "{out}"
    );
    assert!(out.contains("    isolation: sandbox (bubblewrap), as the master's user"), "{out}");
    assert!(out.contains("    isolation: none: steps run as the master's user, with access to its files"), "{out}");
}

#[test]
fn without_bubblewrap_the_demo_opts_out_of_the_sandbox_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    // A PATH with git and nothing else: no bwrap.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let git = String::from_utf8(Command::new("sh").args(["-c", "command -v git"]).output().expect("sh").stdout)
        .expect("utf-8");
    std::os::unix::fs::symlink(git.trim(), bin.join("git")).expect("symlink git");
    let port = common::free_port();
    let out = tmp.path().join("demo.out");
    let mut demo = Command::new(paddock_bin())
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .args(["--port", &port.to_string()])
        .env("PATH", &bin)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("demo");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&out).unwrap_or_default().contains("Paddock demo: master at") {
        if start.elapsed() > common::DEADLINE || matches!(demo.try_wait(), Ok(Some(_))) {
            let _ = demo.kill();
            panic!("the demo did not start: {}", std::fs::read_to_string(&out).unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let printed = std::fs::read_to_string(&out).expect("out");
    assert_eq!(printed.matches("bubblewrap is not installed").count(), 1, "{printed}");
    assert!(printed.contains("apt-get install bubblewrap"), "{printed}");
    let config = std::fs::read_to_string(dir.join("paddock.toml")).expect("config");
    assert!(
        config.contains("# bubblewrap (bwrap) was not found") && config.contains("\nisolation = \"none\"\n"),
        "{config}"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let start = std::time::Instant::now();
    while matches!(demo.try_wait(), Ok(None)) {
        assert!(start.elapsed() < common::DEADLINE, "the demo did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
