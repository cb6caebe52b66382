//! Two masters on one PostgreSQL behind a health-checking TCP load balancer (the URL agents
//! and users know): one is active, holding the farm's lease; the other waits as a standby.
//! When the active one dies (SIGKILL) or freezes (SIGSTOP, its lease left to expire), the
//! standby takes the farm over: the running build finishes on its machine, reported to the new
//! master through the balancer; the queued one starts; neither runs twice. A frozen master that
//! wakes up finds its lease gone, writes nothing, and exits with status 3.

use std::process::{Child, Stdio};
use std::time::Instant;

mod common;

use common::lb::Balancer;
use common::{paddock_bin, Bed};

const TTL_SECS: u64 = 3;

/// The second master: started on its own config (its own port), killed when dropped.
struct Standby {
    child: Child,
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Farm {
    bed: Bed,
    _lb: Balancer,
    standby: Standby,
}

/// A bed on PostgreSQL with master A active and B standby behind the balancer, one machine at
/// most, and a build running (blocked until the flag `go`) with another queued behind it.
fn farm() -> (Farm, i64, serde_json::Value) {
    common::beds_on_postgres();
    let mut bed = Bed::new(&[]);
    let (a_port, b_port) = (common::free_port(), common::free_port());
    let lb = Balancer::start(bed.port, vec![a_port, b_port]);
    let go = bed.flag("go");
    let rest = format!(
        "[pool.local]\nmax_instances = 1\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
         [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\n\
         steps = [\"echo started $(cat a.txt); while [ ! -e {go} ]; do sleep 0.1; done; echo finished\"]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
        go = go.display()
    );
    let a_config =
        bed.config_with_master(&format!("listen = \"127.0.0.1:{a_port}\"\nlease_ttl = \"{TTL_SECS}s\""), "", &rest);
    bed.start(&["main"]);
    // B's config is A's as the bed runs it (with its build user, when the tests run as root),
    // listening on its own port.
    let text = std::fs::read_to_string(&a_config).expect("config");
    let b_config = bed.path().join("paddock-b.toml");
    std::fs::write(&b_config, text.replace(&format!("127.0.0.1:{a_port}\""), &format!("127.0.0.1:{b_port}\"")))
        .expect("config b");
    let log = std::fs::File::create(bed.path().join("master-b.log")).expect("log");
    let child = bed
        .command(paddock_bin())
        .arg("run")
        .arg(&b_config)
        .current_dir(bed.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start master b");
    let standby = Standby { child };
    let a_pid = bed.master_pid() as i64;
    let b_pid = standby.child.id() as i64;
    bed.wait("b registered as a standby", || {
        let m = bed.get("/api/masters");
        let masters = m["masters"].as_array()?;
        let active: Vec<i64> =
            masters.iter().filter(|x| x["active"] == true).filter_map(|x| x["pid"].as_i64()).collect();
        let pids: Vec<i64> = masters.iter().filter_map(|x| x["pid"].as_i64()).collect();
        (active == [a_pid] && pids.contains(&b_pid)).then_some(())
    });

    bed.commit("main", "a.txt", "1\n", "first");
    let running = bed.wait("a running build", || bed.builds().into_iter().find(|b| b["state"] == "running"));
    let id = running["id"].as_i64().expect("id");
    bed.wait("its first step's output", || build_log(&bed, id).filter(|l| l.contains("started 1")));
    bed.commit("main", "a.txt", "2\n", "second");
    bed.wait("a second build queued behind it", || {
        bed.builds().iter().any(|b| b["state"] == "queued" && b["id"] != running["id"]).then_some(())
    });
    (Farm { bed, _lb: lb, standby }, id, running)
}

/// A build's whole log, through the API.
fn build_log(bed: &Bed, build: i64) -> Option<String> {
    let r = bed.http.get(format!("{}/api/builds/{build}/log", bed.url())).send().ok()?;
    r.status().is_success().then(|| r.text().ok()).flatten()
}

/// Seconds from `since` (wall clock) to the standby's first act as the active master: the
/// time its log says it took the farm's lease.
fn lease_taken_after(farm: &Farm, since: std::time::SystemTime) -> f64 {
    let log = std::fs::read_to_string(farm.bed.path().join("master-b.log")).unwrap_or_default();
    let line =
        log.lines().find(|l| l.contains("this master holds the farm's lease")).expect("the standby took the lease");
    let at = chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next().unwrap_or("")).expect("a timestamp");
    let since: chrono::DateTime<chrono::Utc> = since.into();
    (at.with_timezone(&chrono::Utc) - since).num_milliseconds() as f64 / 1000.0
}

/// Waits until the standby serves the API through the balancer as the active master; the
/// time from `since`.
fn wait_for_takeover(farm: &Farm, since: Instant) -> f64 {
    let b_pid = farm.standby.child.id() as i64;
    let bed = &farm.bed;
    let active = || {
        // A short timeout: a request the balancer sent to the frozen master before its health
        // check noticed must not hold the measurement up.
        let r = bed
            .http
            .get(format!("{}/api/masters", bed.url()))
            .timeout(std::time::Duration::from_secs(1))
            .send()
            .ok()?;
        let m: serde_json::Value = r.json().ok()?;
        m["masters"].as_array()?.iter().any(|x| x["active"] == true && x["pid"] == b_pid).then_some(())
    };
    while active().is_none() {
        if since.elapsed() > std::time::Duration::from_secs(60) {
            let log = std::fs::read_to_string(bed.path().join("master-b.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!("the standby did not take the farm over; its log (newest first):\n{}", tail.join("\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    since.elapsed().as_secs_f64()
}

/// Both builds end once, in success, each on its first attempt; the running one on the machine
/// it started on, with its whole log.
fn both_builds_end_once(farm: &Farm, first: i64, machine: &serde_json::Value) {
    let bed = &farm.bed;
    bed.raise("go");
    let builds = bed.wait_builds_done(2);
    assert_eq!(builds.len(), 2, "no attempt ran twice: {builds:?}");
    for b in &builds {
        assert_eq!((b["state"].as_str(), b["attempt"].as_i64()), (Some("success"), Some(1)), "{builds:?}");
    }
    let b1 = builds.iter().find(|b| b["id"] == first).expect("the first build");
    assert_eq!(&b1["machine"], machine, "finished on its machine");
    let log = build_log(bed, first).expect("the log");
    let lines = |text: &str| log.lines().filter(|l| *l == text).count();
    assert_eq!((lines("started 1"), lines("finished")), (1, 1), "{log}");
}

#[test]
fn the_standby_takes_over_when_the_active_master_is_killed() {
    let (mut farm, first, running) = farm();
    let (killed, wall) = (Instant::now(), std::time::SystemTime::now());
    farm.bed.kill_master();
    let took = wait_for_takeover(&farm, killed);
    let leader = lease_taken_after(&farm, wall);
    println!(
        "failover after SIGKILL of the active master: the standby took the lease {leader:.2} s after the kill, served the API through the balancer after {took:.2} s"
    );
    both_builds_end_once(&farm, first, &running["machine"]);
    assert!(took < 2.0 * TTL_SECS as f64 + 10.0, "took {took:.1} s");
}

#[test]
fn a_frozen_master_loses_the_farm_to_the_standby_and_stops_when_it_wakes() {
    let (mut farm, first, running) = farm();
    let (frozen, wall) = (Instant::now(), std::time::SystemTime::now());
    farm.bed.signal_master("-STOP");
    let took = wait_for_takeover(&farm, frozen);
    let leader = lease_taken_after(&farm, wall);
    println!(
        "failover after SIGSTOP of the active master: the standby took the lease {leader:.2} s after the freeze (lease {TTL_SECS} s), served the API through the balancer after {took:.2} s"
    );
    assert!(leader >= TTL_SECS as f64 * 0.5, "the lease was waited for: {leader:.2} s");
    farm.bed.signal_master("-CONT");
    let status = farm.bed.wait_master_exit();
    assert_eq!(status.code(), Some(3), "the woken master stops: {status:?}");
    let log = farm.bed.log();
    assert!(log.contains("this master stops now"), "{log}");
    both_builds_end_once(&farm, first, &running["machine"]);
}

#[test]
fn a_standby_stops_at_once_when_asked_and_says_so() {
    let (mut farm, _, _) = farm();
    let b_pid = farm.standby.child.id();
    let status = std::process::Command::new("kill").args(["-TERM", &b_pid.to_string()]).status().expect("kill");
    assert!(status.success());
    let exited = farm.bed.wait("the standby to exit", || farm.standby.child.try_wait().ok().flatten());
    assert!(exited.success(), "{exited:?}");
    let masters = farm.bed.get("/api/masters");
    let b = masters["masters"].as_array().expect("masters").iter().find(|m| m["pid"] == b_pid).cloned().expect("b");
    assert!(b["stopped_at"].is_string() && b["active"] == false, "{b}");
    let log = std::fs::read_to_string(farm.bed.path().join("master-b.log")).unwrap_or_default();
    assert!(log.contains("standby master stopped"), "{log}");
}
