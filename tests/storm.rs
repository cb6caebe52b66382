//! The crash storm: the real master on moto behind the fault proxy, SIGKILLed again and again —
//! at random instants and at the seams where a crash used to cost something (a RunInstances
//! held by the cloud and served after the restart, mid-output, between a step's end and the
//! build's end) — while the cloud throttles, fails and loses answers. Afterwards every build has
//! ended once, with its whole log and each step's own result; the cloud never ran more than
//! `max_instances`; nothing is left running; and the cost report bills what moto says ran.
//!
//! `PADDOCK_STORM_SEED` replays a storm (the seed is printed); the default is fixed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cloud::{sample_peak, Cloud};
use common::faultproxy::{Fault, Rule};
use common::moto::AWS_ENV;
use common::Bed;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The pool's cap, which moto must never see exceeded.
const MAX_INSTANCES: usize = 3;
/// Builds forced over the storm, half `ok` (every step passes) and half `bad` (its last step
/// exits 3), plus one `gate` build for the step-end seam.
const BUILDS: usize = 16;
/// Kills at random instants, on top of the three aimed ones.
const RANDOM_KILLS: usize = 16;
/// What the report charges per second of a t3.small (an easy number to check against).
const PRICE_PER_HOUR: f64 = 3.6;
/// EC2's minimum charge per instance.
const MINIMUM_MS: i64 = 60_000;

/// The first step of `ok` and `bad`: 200 numbered lines naming the build, over about 2 s, so
/// kills land mid-output.
const OUTPUT: &str = "i=1; while [ $i -le 200 ]; do echo \"build $PADDOCK_BUILD line $i: compiling module $i\"; \
                      [ $((i % 20)) -eq 0 ] && sleep 0.2; i=$((i+1)); done";

fn expected_output(build: i64) -> String {
    (1..=200).map(|i| format!("build {build} line {i}: compiling module {i}\n")).collect()
}

fn config(cloud: &Cloud, gate_flag: &str, gate_marker: &str) -> String {
    let gate = format!(
        "echo gate-start; while [ ! -e {gate_flag} ]; do sleep 0.05; done; echo \"gate $PADDOCK_BUILD passed\"; \
         touch {gate_marker}"
    );
    format!(
        "{pool}\n\
         [[builder]]\nname = \"ok\"\nrepo = \"app\"\npool = \"ec2\"\n\
         steps = [{{ name = \"output\", run = '{OUTPUT}' }}, {{ name = \"end\", run = 'echo \"ok $PADDOCK_BUILD\"' }}]\n\n\
         [[builder]]\nname = \"bad\"\nrepo = \"app\"\npool = \"ec2\"\n\
         steps = [{{ name = \"output\", run = '{OUTPUT}' }}, {{ name = \"end\", run = 'echo \"bad $PADDOCK_BUILD\"; exit 3' }}]\n\n\
         [[builder]]\nname = \"gate\"\nrepo = \"app\"\npool = \"ec2\"\n\
         steps = [{{ name = \"gate\", run = '{gate}' }}]\n",
        pool = cloud.ec2_pool(&format!(
            "instance_types = [\"t3.small\"]\nmax_instances = {MAX_INSTANCES}\nidle_timeout = \"3s\"\n\
             boot_timeout = \"60s\"\nprices = {{ \"t3.small\" = {PRICE_PER_HOUR} }}\n"
        )),
    )
}

fn force(bed: &Bed, builder: &str) {
    let r = bed
        .http
        .post(format!("{}/api/builds", bed.url()))
        .json(&serde_json::json!({"builder": builder, "branch": "main"}))
        .send()
        .expect("force a build");
    assert!(r.status().is_success(), "forcing a {builder} build: {}", r.status());
}

/// Forces the next of the storm's builds: `ok` and `bad` in turn.
fn force_next(bed: &Bed, forced: &mut usize) {
    force(bed, if forced.is_multiple_of(2) { "ok" } else { "bad" });
    *forced += 1;
}

fn build_log(bed: &Bed, id: i64) -> String {
    bed.http
        .get(format!("{}/api/builds/{id}/log", bed.url()))
        .send()
        .ok()
        .and_then(|r| r.text().ok())
        .unwrap_or_default()
}

fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

/// The kills, counted by where they landed.
#[derive(Default, Debug)]
struct Kills {
    held_launch: usize,
    mid_output: usize,
    step_end: usize,
    random: usize,
}

impl Kills {
    fn total(&self) -> usize {
        self.held_launch + self.mid_output + self.step_end + self.random
    }
}

/// Kills the master (SIGKILL) and starts it again, waiting until it serves.
fn crash(bed: &mut Bed) {
    bed.kill_master();
    bed.start_with_env(&["main"], AWS_ENV);
}

#[test]
fn a_storm_of_master_crashes_under_cloud_faults_loses_no_build_no_log_and_no_money() {
    let seed: u64 = std::env::var("PADDOCK_STORM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261202);
    println!("storm seed {seed} (PADDOCK_STORM_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cloud = Cloud::new(true);
    cloud.boot.set_baked_agent(common::paddock_bin());
    let mut bed = Bed::new(&[]);
    let gate_flag = bed.path().join("gate-open");
    let gate_marker = bed.path().join("gate-passed");
    bed.config_with_master(
        &format!("{}heartbeat_timeout = \"30s\"\n", cloud.master()),
        "",
        &config(&cloud, &gate_flag.display().to_string(), &gate_marker.display().to_string()),
    );
    // The first launch is held by the cloud for 4 s: the master dies meanwhile and the
    // cloud serves the launch after the restart.
    cloud.proxy().add(Rule::on("RunInstances").fault(Fault::Latency(Duration::from_secs(4))).rate(1.0).limit(1));
    bed.start_with_env(&["main"], AWS_ENV);
    let (sampling, sampler) = sample_peak(&cloud);
    let started = Instant::now();
    let mut kills = Kills::default();
    let mut forced = 0;

    // Seam 1: a RunInstances in flight.
    for _ in 0..MAX_INSTANCES {
        force_next(&bed, &mut forced);
    }
    cloud.proxy().wait_calls("RunInstances", 1);
    crash(&mut bed);
    kills.held_launch += 1;

    // From here on the cloud misbehaves: ~20% of every call throttled, failed, or served with
    // its answer lost.
    cloud.proxy().add(Rule::any().fault(Fault::Throttle).rate(0.08));
    cloud.proxy().add(Rule::any().fault(Fault::ServerError).rate(0.07));
    cloud.proxy().add(Rule::any().fault(Fault::DropAfterServe).rate(0.06));

    // Seam 2: mid-output, while a build prints.
    bed.wait_long("a build printing", Duration::from_secs(120), || {
        bed.builds().iter().filter(|b| state(b) == "running").find_map(|b| {
            let id = b["id"].as_i64()?;
            let log = build_log(&bed, id);
            (log.contains(&format!("build {id} line 40:")) && !log.contains(&format!("build {id} line 200:")))
                .then_some(())
        })
    });
    crash(&mut bed);
    kills.mid_output += 1;

    // Seam 3: between a step's end and the build's end. The master is frozen while the gate
    // step ends and the agent reports it and the build's end; it dies without reading them.
    force(&bed, "gate");
    bed.wait_long("the gate step to start", Duration::from_secs(120), || {
        bed.builds().iter().filter(|b| b["builder"] == "gate" && state(b) == "running").find_map(|b| {
            let id = b["id"].as_i64()?;
            build_log(&bed, id).contains("gate-start").then_some(())
        })
    });
    bed.signal_master("-STOP");
    std::fs::write(&gate_flag, "").expect("open the gate");
    bed.wait("the gate step to end", || gate_marker.exists().then_some(()));
    bed.kill_master();
    bed.start_with_env(&["main"], AWS_ENV);
    kills.step_end += 1;

    // Then kills at random instants while the rest of the builds are forced.
    for _ in 0..RANDOM_KILLS {
        if forced < BUILDS {
            force_next(&bed, &mut forced);
        }
        // Not a wait for an event: the instant of the next crash, drawn from the seed.
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..3500)));
        crash(&mut bed);
        kills.random += 1;
    }
    while forced < BUILDS {
        force_next(&bed, &mut forced);
    }

    // Every build ends.
    let builds = bed.wait_long("every build to end", Duration::from_secs(240), || {
        let b = bed.builds();
        let ended = b.iter().all(|b| !matches!(state(b), "queued" | "running"));
        (ended && b.len() > BUILDS).then_some(b)
    });
    bed.wait_long("nothing left running", Duration::from_secs(120), || cloud.alive().is_empty().then_some(()));
    bed.wait("every booted machine's processes gone", || cloud.boot.alive().is_empty().then_some(()));
    sampling.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    let storm = started.elapsed();

    // Each build once, with its own result and its whole log.
    assert_eq!(builds.len(), BUILDS + 1, "one build per request, none retried: {builds:#?}");
    for b in &builds {
        let id = b["id"].as_i64().expect("id");
        let builder = b["builder"].as_str().expect("builder");
        assert_eq!(b["attempt"], 1, "build {id} ran once: {b}");
        let detail = bed.get(&format!("/api/builds/{id}"));
        let steps: Vec<(String, Option<i64>)> = detail["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| (state(s).to_string(), s["exit_code"].as_i64()))
            .collect();
        let ok = |s: &str| (s.to_string(), Some(0));
        match builder {
            "ok" | "bad" => {
                let (want_state, end_step, end_code) = if builder == "ok" {
                    ("success", format!("$ echo \"ok $PADDOCK_BUILD\"\nok {id}\n"), 0)
                } else {
                    ("failure", format!("$ echo \"bad $PADDOCK_BUILD\"; exit 3\nbad {id}\n*** exit code 3\n"), 3)
                };
                assert_eq!(state(b), want_state, "build {id}: {b}");
                let end_state = if end_code == 0 { "success" } else { "failure" };
                assert_eq!(
                    steps,
                    [ok("success"), ok("success"), (end_state.to_string(), Some(end_code))],
                    "build {id}'s steps each reported their own result"
                );
                let got = bed.step_log(id, 1);
                let want = format!("$ {OUTPUT}\n{}", expected_output(id));
                assert!(got == want, "build {id}: its output differs from what it printed:\n{got}");
                assert_eq!(bed.step_log(id, 2), end_step, "build {id}'s last step");
            }
            "gate" => {
                assert_eq!(state(b), "success", "{b}");
                assert_eq!(steps, [ok("success"), ok("success")], "the gate build's steps");
                let log = bed.step_log(id, 1);
                assert!(log.ends_with(&format!("gate-start\ngate {id} passed\n")), "the gate step's log: {log}");
            }
            other => panic!("a build of an unknown builder {other}"),
        }
    }

    // Never above the cap: sampled on moto, and in the store's own record.
    assert!(peak <= MAX_INSTANCES, "{peak} instances alive at once with max_instances = {MAX_INSTANCES}");
    let most = bed.db_scalar(
        "SELECT MAX(n) FROM (SELECT (SELECT COUNT(*) FROM machines b WHERE b.requested_at <= a.requested_at \
         AND (b.terminated_at IS NULL OR b.terminated_at > a.requested_at)) AS n FROM machines a)",
    );
    assert!(most.is_some_and(|n| n as usize <= MAX_INSTANCES), "store: {most:?} machines at once");

    // One instance per machine; the held launch was served and used or stopped, not leaked.
    let instances = cloud.moto.cluster_instances(&cloud.cluster);
    let mut per_machine: BTreeMap<String, Vec<&common::moto::Instance>> = BTreeMap::new();
    for i in &instances {
        per_machine.entry(i.tag("paddock:machine").expect("machine tag").to_string()).or_default().push(i);
    }
    assert!(per_machine.values().all(|v| v.len() == 1), "a machine with two instances: {per_machine:#?}");
    // The held call is whichever launch reached the cloud first (the master launches its
    // machines side by side): its machine tag says which.
    let calls = cloud.proxy().calls();
    let held = calls
        .iter()
        .find(|c| c.action == "RunInstances" && matches!(c.fault, Some(Fault::Latency(_))))
        .expect("the held RunInstances was recorded");
    let tag =
        held.params.iter().find(|(_, v)| v.as_str() == "paddock:machine").map(|(k, _)| k.replace(".Key", ".Value"));
    let held_machine = tag.and_then(|k| held.params.get(&k).cloned()).expect("the held launch names its machine");
    assert!(per_machine.contains_key(&held_machine), "the held launch (machine {held_machine}) was served");

    // The cost report bills what the cloud ran: LaunchTime to termination, 60 s minimum.
    let report: Value =
        bed.http.get(format!("{}/api/cost?since=1d&by=machine", bed.url())).send().expect("cost").json().expect("json");
    let rows: BTreeMap<String, &Value> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["key"].as_str().unwrap_or("").to_string(), r))
        .collect();
    let mut cloud_seconds = 0.0;
    for (machine, list) in &per_machine {
        let i = list[0];
        let launch = i.launch_time.expect("LaunchTime");
        let end = i.terminated_at().expect("terminated");
        let life = (end - launch).max(MINIMUM_MS) as f64 / 1000.0;
        cloud_seconds += life;
        let row = rows.get(machine).unwrap_or_else(|| panic!("machine {machine} ran in the cloud but is not billed"));
        let billed = row["billed_seconds"].as_f64().expect("billed_seconds");
        assert!((billed - life).abs() <= 3.0, "machine {machine}: billed {billed} s, lived {life} s in the cloud");
    }
    assert_eq!(rows.len(), per_machine.len(), "billed machines that never ran: {rows:#?}");
    let billed = report["totals"]["billed_seconds"].as_f64().expect("billed");
    let cost = report["totals"]["instance_cost"].as_f64().expect("cost");
    let want_cost = cloud_seconds * PRICE_PER_HOUR / 3600.0;
    assert!(
        (billed - cloud_seconds).abs() <= 0.02 * cloud_seconds,
        "billed {billed} s, the cloud ran {cloud_seconds} s"
    );
    assert!((cost - want_cost).abs() <= 0.02 * want_cost, "billed ${cost}, the cloud's lives cost ${want_cost}");
    assert!(report["running"].as_array().is_some_and(|r| r.is_empty()), "still metered as running: {report}");

    let injected: usize = ["RunInstances", "DescribeInstances", "TerminateInstances", "CreateTags"]
        .iter()
        .map(|a| cloud.proxy().injected(a))
        .sum();
    assert!(injected > 0, "the cloud misbehaved");
    assert_eq!(kills.total(), RANDOM_KILLS + 3);
    println!(
        "storm: {} kills ({kills:?}), {} builds, {} instances (peak {peak}), {injected} cloud faults injected, \
         {cloud_seconds:.0} instance-seconds billed as {billed:.0}, {:.0} s",
        kills.total(),
        builds.len(),
        instances.len(),
        storm.as_secs_f64()
    );
}
