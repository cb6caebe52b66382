//! Spend caps under a controlled clock: the master runs in-process with a [`ManualClock`],
//! real agents run real builds on local machines with a nominal price, and the caps stop
//! launches when reached and lift at the next hour or day — queued builds then run.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{paddock_bin, Bed, InProcessMaster};
use paddock::clock::ManualClock;
use paddock::core::Ts;

/// 2026-03-02T10:00:00Z
const START: i64 = 1_772_445_600_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// The master's log, kept to count its warnings.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn count(&self, needle: &str) -> usize {
        let text = self.0.lock().map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default();
        text.lines().filter(|l| l.contains("WARN") && l.contains(needle)).count()
    }
}

fn pool(bed: &Bed) -> serde_json::Value {
    bed.get("/api/pools")["pools"][0].clone()
}

/// Waits for the pool to be held with a reason starting with `prefix`.
fn wait_held(bed: &Bed, prefix: &str) -> String {
    bed.wait(&format!("the pool to be held: {prefix}"), || {
        pool(bed)["spend_cap"].as_str().filter(|why| why.starts_with(prefix)).map(str::to_string)
    })
}

/// Waits for one queued build, waiting for the reason `why`.
fn wait_queued_because(bed: &Bed, why: &str) {
    bed.wait(&format!("a build queued, waiting: {why}"), || {
        let p = pool(bed);
        (p["queued"] == 1 && p["waiting_reason"].as_str() == Some(why)).then_some(())
    });
}

fn wait_all_gone(bed: &Bed) {
    bed.wait("every machine stopped", || bed.machines().iter().all(|m| m["state"] == "gone").then_some(()))
}

fn requested_before(bed: &Bed, t: &str) -> usize {
    bed.machines().iter().filter(|m| m["requested_at"].as_str().is_some_and(|r| r < t)).count()
}

/// `paddock builds` as a person types it.
fn builds_cli(bed: &Bed, token: &str) -> String {
    let out = std::process::Command::new(paddock_bin())
        .args(["builds", "--master", &bed.url()])
        .env("PADDOCK_TOKEN", token)
        .output()
        .expect("paddock builds");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_spend_cap_stops_launches_and_lifts_at_the_next_hour_and_day() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    let mut bed = Bed::new(&[]);
    // $3.60/h = $0.001 per machine-second. The pool may spend $1 an hour; everything
    // together $4 a day.
    let path = bed.config(
        "",
        "[cost]\nmax_daily_spend = 4.0\n\n\
         [pool.local]\nhourly_price = 3.6\nmax_hourly_spend = 1.0\nidle_timeout = \"10m\"\n\n\
         [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
    );
    // Spend figures are for admins: the test reads as one.
    let token = bed.add_user("ada", "admin", "ada-password");
    bed.http = Bed::client(Some(&token));
    let clock = ManualClock::new(Ts(START));
    let master = InProcessMaster::start(&bed, &path, &clock);

    // 10:00 — a commit, a machine, a build.
    bed.commit("main", "a.txt", "1\n", "first");
    assert_eq!(bed.wait_builds_done(1)[0]["state"], "success");

    // 10:20 — the machine idled 20 minutes ($1.20) and is stopped: the hourly cap is reached.
    clock.set(Ts(START + 20 * MIN));
    wait_all_gone(&bed);
    let why = wait_held(&bed, "pool local hourly spend cap reached");
    assert_eq!(
        why,
        "pool local hourly spend cap reached: $1.20 of $1.00 this hour; no new machines until 2026-03-02T11:00:00.000Z"
    );

    // A new commit is queued and waits, with the reason in the API and in `paddock builds`.
    bed.commit("main", "a.txt", "2\n", "second");
    wait_queued_because(&bed, &why);
    let out = builds_cli(&bed, &token);
    assert!(out.contains(&format!("pool local: 1 queued, waiting: {why}")), "{out}");
    // Others see that a cap holds, not the money.
    let public: serde_json::Value =
        Bed::client(None).get(format!("{}/api/pools", bed.url())).send().expect("GET").json().expect("json");
    assert_eq!(public["pools"][0]["spend_cap"], "a spend cap is reached (admins see the figures)");
    assert!(builds_cli(&bed, "").contains("pool local: 1 queued, waiting: a spend cap is reached"));

    // 11:00:05 — a new hour: the cap lifts and the queued build runs on a new machine. No
    // machine was asked for while the cap held (the clock stood at 10:20 all that time).
    clock.set(Ts(START + HOUR + 5_000));
    let builds = bed.wait_builds_done(2);
    assert!(builds.iter().all(|b| b["state"] == "success"), "{builds:?}");
    assert_eq!(requested_before(&bed, "2026-03-02T11:00:00.000Z"), 1);
    assert_eq!(bed.machines().len(), 2);
    bed.wait("the hold to lift", || pool(&bed)["spend_cap"].is_null().then_some(()));

    // 11:59:01 — that machine idled until now (3536 s, $3.536 this hour): the hourly cap
    // again, and the day's $4.736 passes the overall daily cap too.
    clock.set(Ts(START + 119 * MIN + 1_000));
    wait_all_gone(&bed);
    wait_held(&bed, "pool local hourly spend cap reached: $3.54 of $1.00");
    // 12:00:05 — the hourly cap lifts, the daily one still holds.
    clock.set(Ts(START + 2 * HOUR + 5_000));
    let why = wait_held(&bed, "overall daily spend cap reached");
    assert_eq!(
        why,
        "overall daily spend cap reached: $4.74 of $4.00 today; no new machines until 2026-03-03T00:00:00.000Z"
    );
    bed.commit("main", "a.txt", "3\n", "third");
    wait_queued_because(&bed, &why);

    // A restart while held: the cap is checked before the queued build is queued again, so
    // nothing launches (a machine asked for now would be dated 12:00:05).
    master.stop();
    let master = InProcessMaster::start(&bed, &path, &clock);
    wait_queued_because(&bed, &why);

    // Next day, 00:00:05 — lifted; the build runs.
    clock.set(Ts(START + 14 * HOUR + 5_000));
    let builds = bed.wait_builds_done(3);
    assert!(builds.iter().all(|b| b["state"] == "success"), "{builds:?}");
    assert_eq!(requested_before(&bed, "2026-03-03T00:00:00.000Z"), 2);
    assert_eq!(bed.machines().len(), 3);

    // One warning per crossing, though the caps were checked every few seconds (the daily
    // one once more by the restarted master, which says why it holds).
    assert_eq!(log.count("pool local hourly spend cap reached"), 2);
    assert_eq!(log.count("overall daily spend cap reached"), 2);

    master.stop();
}
