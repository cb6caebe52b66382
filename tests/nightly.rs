//! The nightly scheduler under a controlled clock: the master runs in-process with a
//! [`ManualClock`], against a real repository, real agents and a real SQLite file.

mod common;

use std::time::Duration;

use common::{Bed, InProcessMaster};
use paddock::clock::ManualClock;
use paddock::core::Ts;

/// 2026-03-01T02:59:00Z
const START: i64 = 1_772_333_940_000;

#[test]
fn a_nightly_fires_at_its_time_and_skips_an_unchanged_branch() {
    let bed = Bed::new(&[]);
    let path = bed.config(
        "",
        "[pool.local]\nidle_timeout = \"1h\"\n
[[builder]]
name = \"nightly-suite\"
repo = \"app\"
pool = \"local\"
steps = [\"git rev-parse HEAD\"]

[[scheduler]]
kind = \"nightly\"
repo = \"app\"
cron = \"0 3 * * *\"
only_if_changed = true
builders = [\"nightly-suite\"]
",
    );
    let clock = ManualClock::new(Ts(START));
    let master = InProcessMaster::start(&bed, &path, &clock);
    let head = bed.git(&["rev-parse", "main"]);
    assert!(bed.builds().is_empty(), "nothing before 03:00");

    // 03:00:30 — the nightly fires for main's head.
    clock.set(Ts(START + 90_000));
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["revision"], head.as_str());
    assert_eq!(builds[0]["state"], "success");
    assert_eq!(builds[0]["queued_at"], "2026-03-01T03:00:30.000Z", "timestamps come from the injected clock");

    // Next night, nothing changed: the nightly runs but skips main.
    let day = Duration::from_secs(86_400);
    clock.advance(day);
    let night2 = START + 90_000 + 86_400_000;
    bed.wait("the second nightly to run", || {
        bed.db_scalar(&format!("SELECT COUNT(*) FROM scheduler_state WHERE last_fire >= {night2}")).filter(|n| *n == 1)
    });
    assert_eq!(bed.builds().len(), 1, "an unchanged branch is skipped");

    // A commit during the day; the third night builds it.
    let rev = bed.commit("main", "a.txt", "new\n", "daytime work");
    bed.wait("the commit to be recorded", || {
        bed.db_scalar(&format!("SELECT COUNT(*) FROM changes WHERE revision = '{rev}' AND scheduled = 1"))
            .filter(|n| *n == 1)
    });
    assert_eq!(bed.builds().len(), 1, "a nightly-only config does not build on commit");
    clock.advance(day);
    let builds = bed.wait_builds_done(2);
    assert_eq!(builds[0]["revision"], rev.as_str());
    assert_eq!(builds[0]["state"], "success");

    master.stop();
}
