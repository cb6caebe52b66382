//! A push must not own the master. A build step on a local machine tries to read the master's
//! secrets, database and config, to change its database and state, to read another machine's
//! work, and to see, read and signal the master's process; every attempt fails. Checked for a
//! root master whose machines run as an unprivileged user (`run_as`, as CI runs), and for a
//! master that is itself an unprivileged user (the demo's situation). Then the start-up
//! refusals: a root master without `run_as`, no bwrap, a missing or misplaced `run_as` user, and
//! the explicit opt-out `isolation = "none"`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{is_root, Bed, TEST_USER};
use serde_json::json;

const SECRET: &str = "s3cr3t-deploy-k3y-81f2";
const MASTER_ENV_SECRET: &str = "m4ster-env-cl0ud-k3y-7c1e";
const CONFIG_MARKER: &str = "config-marker-4b9d";
const VICTIM_DATA: &str = "victim-data-d41e";

/// The hostile step: each attempt prints `LEAK: …` if it worked and `blocked: …` if not.
/// Writes cannot tell from inside whether they reached the real file (a sandbox may show an
/// empty folder there), so the test checks the host's side of them.
const HOSTILE: &str = r#"#!/bin/sh
out="$HOME/attempt.out"
try() {
  what=$1; shift
  if "$@" >"$out" 2>/dev/null; then echo "LEAK: $what"; head -c 4000 "$out"; echo; else echo "blocked: $what"; fi
}
try "read the secrets file" cat "$P_SECRETS"
try "read the secrets file as base64" base64 "$P_SECRETS"
try "read the database" base64 "$P_DB"
try "query the database" sqlite3 "file:$P_DB?mode=ro" "SELECT name, role, password_hash FROM users"
try "read the config" cat "$P_CONFIG"
try "read another machine's work" cat "$P_OTHER/src/victim/victim.txt"
try "list another machine's work" ls "$P_OTHER/src"
try "read a mirror" cat "$P_STATE/mirrors/app.git/HEAD"
try "read the master's environment" cat "/proc/$P_MASTER/environ"
try "signal the master" kill -0 "$P_MASTER"
try "ptrace the master" python3 -c 'import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
sys.exit(0 if libc.ptrace(16, int(sys.argv[1]), 0, 0) == 0 else 1)' "$P_MASTER"
# A pgrep of our own: any process that is not of this machine, and any environment holding
# the master's secrets.
for p in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
  case "$cmd" in
    *"paddock run"*) echo "LEAK: sees the master as ${p#/proc/}: $cmd"; kill -TERM "${p#/proc/}" && echo "LEAK: signalled it" ;;
  esac
  if grep -q m4ster-env "$p/environ" 2>/dev/null; then echo "LEAK: the master's environment in $p"; fi
done
echo "visible processes: $(ls -d /proc/[0-9]* | wc -l)"
# Writes: the database (with sqlite3 and plain shell), the state folder, the other machine.
sqlite3 "$P_DB" "UPDATE users SET role = 'admin' WHERE name = 'eve'" 2>&1 | head -3
echo "junk-from-the-build" >> "$P_DB" 2>&1
echo "junk-from-the-build" > "$P_DB-wal" 2>&1
rm -f "$P_DB-shm" 2>&1
touch "$P_STATE/pwned" 2>&1
mkdir "$P_STATE/mirrors/pwned" 2>&1
echo "overwritten-by-the-build" > "$P_OTHER/src/victim/victim.txt" 2>&1
kill -TERM "$P_MASTER" 2>&1
# What a build may use: its home, a private /tmp and shared memory.
touch "$HOME/cache" && t=$(mktemp) && rm "$t" && echo "scratch ok"
python3 -c 'import multiprocessing; multiprocessing.Lock()' && echo "shm ok"
echo "hostile done"
"#;

/// Runs the hostile build on `bed` (not yet started) next to a running victim build on another
/// machine, and checks that nothing of the master's was reached.
fn hostile_build_reaches_nothing(mut bed: Bed) {
    let secrets = bed.path().join("secrets.toml");
    bed.write_file(&secrets, &format!("DEPLOY_KEY = \"{SECRET}\"\n"));
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let flag = bed.flag("victim-may-end");
    bed.config_with_master(
        "secrets_file = \"secrets.toml\"",
        "",
        &format!(
            "# {CONFIG_MARKER}\n[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\n\n\
             [[builder]]\nname = \"victim\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"echo {VICTIM_DATA} > victim.txt; echo victim ready; while [ ! -e {flag} ]; do sleep 0.1; done\"]\n\n\
             [[builder]]\nname = \"hostile\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"sh hostile.sh\"]\n",
            flag = flag.display()
        ),
    );
    bed.start_with_env(&["main"], &[("CLOUD_SECRET_OF_THE_MASTER", MASTER_ENV_SECRET)]);
    bed.add_user("eve", "viewer", "eve-password");

    // The victim runs on one machine and waits.
    let force = |bed: &Bed, builder: &str, revision: Option<&str>| -> i64 {
        let resp = bed
            .http
            .post(format!("{}/api/builds", bed.url()))
            .json(&json!({"builder": builder, "branch": "main", "revision": revision}))
            .send()
            .expect("force");
        assert!(resp.status().is_success(), "force {builder}: {}", resp.status());
        let body: serde_json::Value = resp.json().expect("json");
        body["builds"][0]["id"].as_i64().expect("build id")
    };
    let victim = force(&bed, "victim", None);
    let log_of = |bed: &Bed, id: i64| -> String {
        bed.http.get(format!("{}/api/builds/{id}/log", bed.url())).send().expect("log").text().expect("text")
    };
    bed.wait("the victim to be ready", || log_of(&bed, victim).contains("victim ready").then_some(()));
    let victim_machine = bed.get(&format!("/api/builds/{victim}"))["machine"].as_i64().expect("victim's machine");
    let victim_file = bed.machine_dir("local", victim_machine).join("src/victim/victim.txt");
    assert_eq!(std::fs::read_to_string(&victim_file).expect("victim file").trim(), VICTIM_DATA);

    // A push adds the hostile step, told where everything of the master's is.
    let path = |p: std::path::PathBuf| p.display().to_string();
    let script = HOSTILE.replacen(
        "#!/bin/sh\n",
        &format!(
            "#!/bin/sh\nP_SECRETS={}\nP_DB={}\nP_CONFIG={}\nP_STATE={}\nP_OTHER={}\nP_MASTER={}\n",
            path(secrets.clone()),
            path(bed.path().join("paddock.db")),
            path(bed.path().join("paddock.toml")),
            path(bed.path().join("paddock-state")),
            path(bed.machine_dir("local", victim_machine)),
            bed.master_pid()
        ),
        1,
    );
    let rev = bed.commit("main", "hostile.sh", &script, "Add a helpful script");
    let hostile = force(&bed, "hostile", Some(&rev));
    let done = bed.wait("the hostile build to end", || {
        let b = bed.get(&format!("/api/builds/{hostile}"));
        matches!(b["state"].as_str(), Some("success" | "failure")).then_some(b)
    });
    assert_ne!(done["machine"].as_i64(), Some(victim_machine), "the hostile build ran on a machine of its own");
    let log = log_of(&bed, hostile);

    // It ran to the end and tried everything.
    assert!(log.contains("hostile done"), "the hostile step ran to its end:\n{log}");
    let tries = HOSTILE.matches("\ntry \"").count();
    assert_eq!(log.matches("blocked: ").count(), tries, "every read was tried and blocked:\n{log}");
    assert!(!log.contains("LEAK"), "a build step reached the master:\n{log}");
    // Reads: nothing of the secret, the database, the config, the master's environment.
    let secret_b64 = {
        let out = std::process::Command::new("base64").arg(&secrets).output().expect("base64");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for leaked in [SECRET, secret_b64.as_str(), MASTER_ENV_SECRET, CONFIG_MARKER, "$argon2", "U1FMaXRlIGZvcm1hdCAz"] {
        assert!(!log.contains(leaked), "{leaked:?} in the build's log:\n{log}");
    }
    assert!(log.contains("visible processes: "), "{log}");
    assert!(log.contains("scratch ok") && log.contains("shm ok"), "a build has a home, /tmp and /dev/shm:\n{log}");
    // Writes: the database row, the database file, the state folder, the other machine.
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM users WHERE name = 'eve' AND role = 'viewer'"), Some(1));
    let db = std::fs::read(bed.path().join("paddock.db")).expect("db");
    assert!(!String::from_utf8_lossy(&db).contains("junk-from-the-build"), "the build wrote into the database");
    assert!(!bed.path().join("paddock-state/pwned").exists(), "the build wrote into the state folder");
    assert!(!bed.path().join("paddock-state/mirrors/pwned").exists(), "the build wrote into the mirrors");
    assert_eq!(std::fs::read_to_string(&victim_file).expect("victim file").trim(), VICTIM_DATA);
    // Processes: the master lives and serves.
    assert!(bed.master_alive(), "the master was killed");
    assert!(!bed.log().contains("shutting down"), "the master was signalled:\n{}", bed.log());
    assert_eq!(bed.get(&format!("/api/builds/{victim}"))["state"], "running", "the victim runs on");

    bed.raise("victim-may-end");
    bed.wait("the victim to finish", || {
        (bed.get(&format!("/api/builds/{victim}"))["state"] == "success").then_some(())
    });
    assert!(bed.stop_master().success());
    assert!(bed.agent_pids().is_empty(), "no machine process is left");
}

#[test]
fn a_hostile_step_reaches_nothing_of_a_root_master_running_its_machines_as_another_user() {
    assert!(
        is_root(),
        "this test checks the run_as path, which needs a root master: run the tests as root (CI does, through .ci/test)"
    );
    // The bed makes the local pool run as TEST_USER.
    hostile_build_reaches_nothing(Bed::new(&[]));
}

#[test]
fn a_hostile_step_reaches_nothing_of_a_master_running_as_an_unprivileged_user() {
    // As root, the master (and the whole bed) runs as the test user; otherwise as ourselves.
    let bed = if is_root() { Bed::new_as(&[], TEST_USER) } else { Bed::new(&[]) };
    hostile_build_reaches_nothing(bed);
}

const POOL: &str = "[pool.local]\n";

const BUILDER: &str = "[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n";

#[test]
fn a_root_master_with_a_local_pool_and_no_run_as_refuses_to_start() {
    assert!(is_root(), "this test starts a root master: run the tests as root (CI does, through .ci/test)");
    let bed = Bed::new(&[]);
    bed.config("", &format!("{POOL}\n{BUILDER}"));
    let out = bed.master_refuses(&[]);
    assert!(out.contains("pool local: the master runs as root, and its builds must not"), "{out}");
    assert!(out.contains("useradd --system --no-create-home paddock-build"), "{out}");
    assert!(out.contains("run_as = \"paddock-build\""), "{out}");
    assert!(out.contains("isolation = \"none\""), "{out}");
}

#[test]
fn a_run_as_user_that_does_not_exist_refuses_to_start() {
    assert!(is_root(), "this test starts a root master: run the tests as root (CI does, through .ci/test)");
    let bed = Bed::new(&[]);
    bed.config("", &format!("{POOL}run_as = \"no-such-user-7f3a\"\n\n{BUILDER}"));
    let out = bed.master_refuses(&[]);
    assert!(out.contains("run_as user `no-such-user-7f3a` does not exist"), "{out}");
    assert!(out.contains("useradd --system --no-create-home no-such-user-7f3a"), "{out}");
}

#[test]
fn run_as_on_a_master_that_is_not_root_refuses_to_start() {
    let bed = if is_root() { Bed::new_as(&[], TEST_USER) } else { Bed::new(&[]) };
    bed.config("", &format!("{POOL}run_as = \"nobody\"\n\n{BUILDER}"));
    let out = bed.master_refuses(&[]);
    assert!(out.contains("run_as = \"nobody\" needs a master running as root"), "{out}");
}

#[test]
fn without_bwrap_a_sandboxed_pool_refuses_to_start_and_names_the_package() {
    let bed = Bed::new(&[]);
    bed.config("", &format!("{POOL}\n{BUILDER}"));
    common::confine_config(&bed.path().join("paddock.toml"));
    // A PATH without bwrap (the master looks it up there).
    let empty = bed.path().join("empty-path");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = bed.master_refuses(&[("PATH", empty.to_str().expect("utf-8"))]);
    assert!(out.contains("`bwrap` is not on PATH"), "{out}");
    assert!(out.contains("apt-get install bubblewrap"), "{out}");
    assert!(out.contains("isolation = \"none\""), "{out}");
}

#[test]
fn isolation_none_starts_warns_and_leaves_the_masters_files_open() {
    let mut bed = Bed::new(&[]);
    bed.config(
        "",
        &format!(
            "# {CONFIG_MARKER}\n{POOL}isolation = \"none\"\n\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
             steps = [\"cat {}\"]\n\n[[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
            bed.path().join("paddock.toml").display()
        ),
    );
    bed.start(&["main"]);
    assert!(bed.log().contains("isolation = \"none\": build steps run unsandboxed"), "{}", bed.log());
    let check = std::process::Command::new(common::paddock_bin())
        .arg("check-config")
        .arg(bed.path().join("paddock.toml"))
        .output()
        .expect("check-config");
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("isolation: none: steps run as the master's user, with access to its files"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // What "none" means: a step reads the master's config.
    let build = bed.build_file("x\n", "go");
    assert_eq!(build["state"], "success", "{build}");
    let log = bed
        .http
        .get(format!("{}/api/builds/{}/log", bed.url(), build["id"]))
        .send()
        .expect("log")
        .text()
        .expect("text");
    assert!(log.contains(CONFIG_MARKER), "{log}");
}

#[test]
fn the_master_keeps_its_state_folder_and_database_to_itself() {
    let mut bed = Bed::new(&[]);
    bed.config("", &format!("{POOL}\n{BUILDER}"));
    bed.start(&["main"]);
    let mode = |p: &str| std::fs::metadata(bed.path().join(p)).expect(p).permissions().mode() & 0o777;
    assert_eq!(mode("paddock-state"), 0o700);
    for f in ["paddock.db", "paddock.db-wal", "paddock.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
}
