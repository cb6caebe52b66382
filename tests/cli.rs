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
