//! EC2 latent workers end to end: the real `paddock` master and the real aws-sdk-ec2 against a
//! real EC2 emulator (moto_server), with the boot emulator playing cloud-init and, where a
//! test needs the cloud to misbehave, the fault-injecting proxy in between.

mod common;

use std::time::Duration;

use common::cloud::{sample_peak, Cloud};
use common::faultproxy::{Fault, Rule};
use common::moto::AWS_ENV;
use common::Bed;
use serde_json::Value;

fn start(bed: &mut Bed) {
    bed.start_with_env(&["main"], AWS_ENV);
}

fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

#[test]
fn a_commit_boots_an_instance_that_builds_and_is_terminated_when_idle() {
    let cloud = Cloud::new(false);
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool(
            "instance_types = [\"t3.small\"]\nmax_instances = 2\nidle_timeout = \"4s\"\ntags = { team = \"ci\" }\n",
            "steps = [\"echo built on $(hostname) at $(git rev-parse HEAD)\"]",
        ),
    );
    start(&mut bed);
    let rev = bed.commit("main", "a.txt", "x\n", "first");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{}", builds[0]);
    assert_eq!(builds[0]["revision"], rev.as_str());

    let machines = bed.machines();
    assert_eq!(machines.len(), 1, "{machines:?}");
    let m = &machines[0];
    assert_eq!(m["provisioner"], "ec2");
    assert_eq!(m["instance_type"], "t3.small");
    assert_eq!(m["lifecycle"], "on-demand");
    let instance_id = m["provider_id"].as_str().expect("instance id").to_string();
    assert!(instance_id.starts_with("i-"), "{m}");

    // The instance as the cloud sees it: tagged, IMDSv2 only, terminating on shutdown.
    let all = cloud.moto.cluster_instances(&cloud.cluster);
    assert_eq!(all.len(), 1, "one machine, one instance: {all:?}");
    let i = &all[0];
    assert_eq!(i.id, instance_id);
    assert_eq!(i.tag("paddock:pool"), Some("ec2"));
    assert_eq!(i.tag("paddock:machine"), Some(m["id"].to_string().as_str()));
    assert_eq!(i.tag("team"), Some("ci"));
    assert_eq!(i.tag("Name").map(|n| n.starts_with("paddock-")), Some(true));
    let described = cloud
        .moto
        .block_on(cloud.moto.client.describe_instances().instance_ids(&instance_id).send())
        .expect("describe");
    let inst = &described.reservations()[0].instances()[0];
    let md = inst.metadata_options().expect("metadata options");
    assert_eq!(md.http_tokens().map(|t| t.as_str()), Some("required"), "IMDSv2 required");
    assert_eq!(md.http_put_response_hop_limit(), Some(1));
    let shutdown = cloud
        .moto
        .block_on(
            cloud
                .moto
                .client
                .describe_instance_attribute()
                .instance_id(&instance_id)
                .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
                .send(),
        )
        .expect("attribute");
    assert_eq!(shutdown.instance_initiated_shutdown_behavior().and_then(|v| v.value()), Some("terminate"));

    // The machine booted from user-data alone: the agent came from the master.
    assert_eq!(cloud.boot.booted(), vec![instance_id.clone()]);
    let events = bed.db_scalar(&format!(
        "SELECT COUNT(*) FROM machine_events WHERE machine_id = {} AND kind = 'agent_download'",
        m["id"]
    ));
    assert_eq!(events, Some(1), "the agent was downloaded from the master once");

    // Idle past idle_timeout: terminated in the cloud, gone in the store, processes ended.
    bed.wait("the idle instance terminated", || {
        let i = cloud.moto.instances().into_iter().find(|i| i.id == instance_id)?;
        (!i.alive()).then_some(())
    });
    bed.wait("the machine gone", || (state(&bed.machines()[0]) == "gone").then_some(()));
    bed.wait("the instance's processes ended", || cloud.boot.alive().is_empty().then_some(()));

    // What it cost agrees with the cloud: the seconds moto saw between launch and termination,
    // at the price table's figure for t3.small in us-east-1.
    let i = cloud.moto.instances().into_iter().find(|i| i.id == instance_id).expect("the instance");
    let launched = i.launch_time.expect("moto's LaunchTime");
    let ended = i.terminated_at().unwrap_or_else(|| panic!("no termination time in {:?}", i.transition_reason));
    let cloud_seconds = (ended - launched) as f64 / 1000.0;
    let price = paddock::cost::prices::PriceTable::builtin().on_demand("us-east-1", "t3.small").expect("t3.small");
    let m = &bed.machines()[0];
    assert_eq!((m["hourly_price"].as_f64(), m["price_source"].as_str()), (Some(price), Some("table")), "{m}");
    assert_eq!(m["zone"].as_str(), Some(i.zone.as_str()));
    let report = bed.get("/api/cost?since=1h&by=machine");
    let row = &report["rows"][0];
    let billed = row["billed_seconds"].as_f64().expect("billed");
    let ran = billed - row["minimum_seconds"].as_f64().expect("minimum");
    // moto's times are whole seconds; Paddock's are taken as the calls return.
    assert!((ran - cloud_seconds).abs() <= 2.0, "metered {ran} s, moto saw {cloud_seconds} s");
    let cloud_billed = cloud_seconds.max(60.0);
    assert!((billed - cloud_billed).abs() <= 2.0, "billed {billed} s, moto's times give {cloud_billed} s");
    let expected = cloud_billed * price / 3600.0;
    let instance_cost = row["instance_cost"].as_f64().expect("instance cost");
    assert!((instance_cost - expected).abs() <= 0.0001 + 2.0 * price / 3600.0, "{instance_cost} vs {expected}");
    assert_eq!((instance_cost * 100.0).round(), (expected * 100.0).round(), "to the cent");
    let total = row["cost"].as_f64().expect("cost");
    assert!((total - instance_cost - row["volume_cost"].as_f64().expect("volume")).abs() < 0.00015, "{row}");
    assert_eq!(report["unknown_price"]["machines"], 0);

    // Secrets never reach the master's log: no token, no user-data.
    let log = bed.log();
    assert!(!log.contains("PADDOCK_AGENT_TOKEN="), "token leaked into the master log");
    assert!(!log.contains("#cloud-config"), "user-data leaked into the master log");
}

#[test]
fn a_launch_whose_answer_is_lost_yields_exactly_one_instance() {
    let cloud = Cloud::new(true);
    // The first RunInstances is served by the cloud, but its answer never arrives.
    cloud.proxy().add(Rule::on("RunInstances").fault(Fault::DropAfterServe).rate(1.0).limit(1));
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool("instance_types = [\"t3.small\"]\nmax_instances = 2\n", "steps = [\"true\"]"),
    );
    start(&mut bed);
    bed.commit("main", "a.txt", "x\n", "first");
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{}", builds[0]);
    assert_eq!(cloud.proxy().injected("RunInstances"), 1, "the fault was injected");
    let all = cloud.moto.cluster_instances(&cloud.cluster);
    assert_eq!(all.len(), 1, "one intent, one instance: {all:?}");
    assert_eq!(bed.machines().len(), 1);
    assert_eq!(bed.machines()[0]["provider_id"], all[0].id.as_str());
    assert!(bed.log().contains("found the instance by its tags"), "the retry looked the instance up first");
}

#[test]
fn capacity_falls_back_across_types_subnets_then_on_demand_and_waits_when_all_fail() {
    let cloud = Cloud::new(true);
    let subnets = cloud.moto.subnets();
    assert!(subnets.len() >= 2, "moto's default VPC has a subnet per zone: {subnets:?}");
    let (a, b) = (subnets[0].clone(), subnets[1].clone());
    // Nothing fits at first: every launch fails for capacity.
    cloud.proxy().add(Rule::on("RunInstances").fault(Fault::Capacity).rate(1.0));
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool(
            &format!(
                "instance_types = [\"t3.small\", \"t3a.small\"]\nsubnets = [\"{a}\", \"{b}\"]\nspot = true\nmax_instances = 1\n"
            ),
            "steps = [\"true\"]",
        ),
    );
    start(&mut bed);
    bed.commit("main", "a.txt", "x\n", "first");
    // The build waits, and why is visible in the API.
    let reason = bed.wait("a launch failure reason in the API", || {
        bed.machines()
            .iter()
            .find_map(|m| m["last_event"].as_str().filter(|e| e.contains("no capacity")).map(String::from))
    });
    assert!(reason.contains("InsufficientInstanceCapacity"), "{reason}");
    assert_eq!(state(&bed.builds()[0]), "queued");
    assert!(cloud.alive().is_empty());
    // The pool says why its build waits, and so does `paddock builds`.
    let pool = bed.get("/api/pools")["pools"][0].clone();
    assert_eq!(pool["queued"], 1, "{pool}");
    assert!(pool["waiting_reason"].as_str().is_some_and(|w| w.contains("no capacity")), "{pool}");
    let out = std::process::Command::new(common::paddock_bin())
        .args(["builds", "--master", &bed.url()])
        .output()
        .expect("paddock builds");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("pool ec2: 1 queued, waiting: launch failed: no capacity"), "{out}");

    // Now: no spot anywhere, no t3.small, no t3a.small in the first subnet.
    cloud.proxy().clear();
    cloud.proxy().add(
        Rule::on("RunInstances").when("InstanceMarketOptions.MarketType", "spot").fault(Fault::SpotCapacity).rate(1.0),
    );
    cloud.proxy().add(Rule::on("RunInstances").when("InstanceType", "t3.small").fault(Fault::Capacity).rate(1.0));
    cloud.proxy().add(
        Rule::on("RunInstances")
            .when("InstanceType", "t3a.small")
            .when("SubnetId", &a)
            .fault(Fault::Unsupported)
            .rate(1.0),
    );
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{}", builds[0]);
    let all = cloud.moto.cluster_instances(&cloud.cluster);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].instance_type, "t3a.small");
    assert_eq!(all[0].subnet, b);
    assert_eq!(all[0].lifecycle, "on-demand");
    let m = bed.machines().into_iter().find(|m| m["provider_id"] == all[0].id.as_str()).expect("machine");
    assert_eq!(m["lifecycle"], "on-demand");
    assert_eq!(m["instance_type"], "t3a.small");
    assert!(bed.get("/api/pools")["pools"][0]["waiting_reason"].is_null(), "no longer waiting");
    // The order tried by the successful launch: spot first, types in order, subnets in order.
    let launches: Vec<_> = cloud.proxy().calls().into_iter().filter(|c| c.action == "RunInstances").collect();
    let tried: Vec<String> = launches[launches.len().saturating_sub(8)..]
        .iter()
        .map(|c| {
            format!(
                "{} {} {}",
                c.params.get("InstanceMarketOptions.MarketType").map(String::as_str).unwrap_or("on-demand"),
                c.params.get("InstanceType").map(String::as_str).unwrap_or(""),
                if c.params.get("SubnetId") == Some(&a) { "a" } else { "b" }
            )
        })
        .collect();
    assert_eq!(
        tried,
        [
            "spot t3.small a",
            "spot t3.small b",
            "spot t3a.small a",
            "spot t3a.small b",
            "on-demand t3.small a",
            "on-demand t3.small b",
            "on-demand t3a.small a",
            "on-demand t3a.small b"
        ]
    );
}

#[test]
fn orphans_of_our_cluster_are_terminated_and_other_clusters_left_alone() {
    let cloud = Cloud::new(true);
    let run = |cluster: &str| -> String {
        let tag = aws_sdk_ec2::types::Tag::builder().key("paddock:cluster").value(cluster).build();
        let spec = aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
            .tags(tag)
            .tags(aws_sdk_ec2::types::Tag::builder().key("paddock:machine").value("999").build())
            .build();
        let out = cloud
            .moto
            .block_on(
                cloud
                    .moto
                    .client
                    .run_instances()
                    .image_id(cloud.moto.ami())
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(spec)
                    .send(),
            )
            .expect("RunInstances on moto");
        out.instances()[0].instance_id().expect("id").to_string()
    };
    let ours = run(&cloud.cluster);
    let theirs = run("someone-else");
    let mut bed = Bed::new(&[]);
    bed.config_with_master(&cloud.master(), "", &cloud.pool("instance_types = [\"t3.small\"]\n", "steps = [\"true\"]"));
    start(&mut bed);
    bed.wait("our orphan terminated", || {
        cloud.moto.instances().iter().find(|i| i.id == ours).filter(|i| !i.alive()).map(|_| ())
    });
    assert!(bed.log().contains("orphan"), "logged as an orphan");
    // Several more reconcile rounds (each one DescribeInstances) leave the other cluster's alone.
    let rounds = cloud.proxy().count("DescribeInstances");
    cloud.proxy().wait_calls("DescribeInstances", rounds + 3);
    let other = cloud.moto.instances().into_iter().find(|i| i.id == theirs).expect("other instance");
    assert!(other.alive(), "another cluster's instance was touched: {other:?}");
    assert!(cloud
        .proxy()
        .calls()
        .iter()
        .filter(|c| c.action == "TerminateInstances")
        .all(|c| !c.params.values().any(|v| *v == theirs)));
}

#[test]
fn an_instance_terminated_behind_paddocks_back_has_its_build_retried() {
    terminated_behind_our_back(false);
}

#[test]
fn an_instance_that_dies_without_a_clean_shutdown_is_found_gone_by_reconcile() {
    let bed = terminated_behind_our_back(true);
    assert!(bed.log().contains("reconcile: machine is gone from the cloud"), "found by the reconcile loop");
}

/// Terminates a busy instance straight through moto; `hard`: its processes get SIGKILL only
/// (no agent left to tell the master anything).
fn terminated_behind_our_back(hard: bool) -> Bed {
    let cloud = Cloud::new(false);
    cloud.boot.set_hard_kill(hard);
    let mut bed = Bed::new(&[]);
    let gate = bed.path().join("gate");
    // With a long heartbeat limit, only the reconcile loop can notice a silent death in time.
    let master = if hard { format!("{}heartbeat_timeout = \"600s\"\n", cloud.master()) } else { cloud.master() };
    bed.config_with_master(
        &master,
        "",
        &cloud.pool(
            "instance_types = [\"t3.small\"]\nmax_instances = 2\n",
            &format!("steps = [\"while [ ! -e {} ]; do sleep 0.2; done\"]", gate.display()),
        ),
    );
    start(&mut bed);
    bed.commit("main", "a.txt", "x\n", "first");
    let first =
        bed.wait("the build running", || bed.builds().into_iter().find(|b| state(b) == "running" && b["attempt"] == 1));
    let machine = first["machine"].clone();
    let m = bed.machines().into_iter().find(|m| m["id"] == machine).expect("machine");
    let instance = m["provider_id"].as_str().expect("instance").to_string();
    cloud.moto.terminate(&instance);
    bed.wait("a second attempt", || bed.builds().into_iter().find(|b| b["attempt"] == 2).map(|_| ()));
    std::fs::write(&gate, "").expect("open the gate");
    let builds = bed.wait_builds_done(2);
    let retried = builds.iter().find(|b| b["attempt"] == 1).expect("attempt 1");
    assert_eq!(state(retried), "retry", "{retried}");
    let second = builds.iter().find(|b| b["attempt"] == 2).expect("attempt 2");
    assert_eq!(state(second), "success", "{second}");
    assert_ne!(second["machine"], machine, "retried on another machine");
    bed
}

#[test]
fn a_master_killed_during_run_instances_leaks_nothing_after_restart() {
    let cloud = Cloud::new(true);
    // The launch is slow to answer, so the master dies while the call is in flight (after
    // the machine row was written); the cloud still serves it.
    cloud.proxy().add(Rule::on("RunInstances").fault(Fault::Latency(Duration::from_secs(3))).rate(1.0).limit(1));
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud
            .pool("instance_types = [\"t3.small\"]\nmax_instances = 2\nidle_timeout = \"3s\"\n", "steps = [\"true\"]"),
    );
    start(&mut bed);
    bed.commit("main", "a.txt", "x\n", "first");
    cloud.proxy().wait_calls("RunInstances", 1);
    assert_eq!(bed.db_scalar("SELECT COUNT(*) FROM machines WHERE provider_id IS NULL"), Some(1), "row first");
    bed.kill_master();
    // The delayed call lands in the cloud after the master is gone.
    bed.wait("the orphaned launch served", || (!cloud.moto.cluster_instances(&cloud.cluster).is_empty()).then_some(()));
    start(&mut bed);
    // After reconciling, the dead master's machine has no live instance (stopped at start or
    // reaped as an orphan), and the build runs on a fresh machine.
    bed.wait("the dead launch's instance terminated", || {
        let all = cloud.moto.cluster_instances(&cloud.cluster);
        all.iter().filter(|i| i.tag("paddock:machine") == Some("1")).all(|i| !i.alive()).then_some(())
    });
    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{}", builds[0]);
    for i in cloud.moto.cluster_instances(&cloud.cluster) {
        let machine = i.tag("paddock:machine").and_then(|m| m.parse::<i64>().ok()).expect("machine tag");
        let n = cloud
            .moto
            .cluster_instances(&cloud.cluster)
            .iter()
            .filter(|j| j.tag("paddock:machine") == i.tag("paddock:machine"))
            .count();
        assert_eq!(n, 1, "machine {machine} has one instance at most");
    }
    // Idle machines go; nothing is left running.
    bed.wait("nothing left running", || cloud.alive().is_empty().then_some(()));
}

#[test]
fn a_launch_in_flight_at_a_crash_counts_against_the_limit_and_its_late_instance_builds() {
    let cloud = Cloud::new(true);
    cloud.boot.set_baked_agent(common::paddock_bin());
    // The cloud holds the launch; the master dies meanwhile; the cloud serves it after the
    // restart, with the machine's one-time token in its user-data.
    cloud.proxy().add(Rule::on("RunInstances").fault(Fault::Latency(Duration::from_secs(4))).rate(1.0).limit(1));
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool(
            "instance_types = [\"t3.small\"]\nmax_instances = 1\nidle_timeout = \"3s\"\nboot_timeout = \"60s\"\n",
            "steps = [\"echo built\"]",
        ),
    );
    start(&mut bed);
    let (done, sampler) = sample_peak(&cloud);
    bed.commit("main", "a.txt", "x\n", "first");
    cloud.proxy().wait_calls("RunInstances", 1);
    bed.kill_master();
    start(&mut bed);

    let builds = bed.wait_builds_done(1);
    assert_eq!(state(&builds[0]), "success", "{}", builds[0]);
    assert_eq!(builds[0]["attempt"], 1);
    assert_eq!(builds[0]["machine"], 1, "built on the machine whose launch was in flight: no boot wasted");
    bed.wait("nothing left running", || cloud.alive().is_empty().then_some(()));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    assert!(peak <= 1, "{peak} instances alive at once with max_instances = 1");
    let instances = cloud.moto.cluster_instances(&cloud.cluster);
    assert_eq!(instances.len(), 1, "no second instance while the first was unknown: {instances:?}");
    assert_eq!(cloud.proxy().count("RunInstances"), 1, "never launched again");

    // Billed from the cloud's own launch time to the stop the cloud confirmed. The master
    // records the stop after the cloud reports it, so on a loaded machine it may come later.
    let machine = bed.wait("machine 1 recorded as stopped", || {
        bed.machines().into_iter().find(|m| m["id"] == 1 && !m["terminated_at"].is_null())
    });
    let ms = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a time")).expect("rfc3339").timestamp_millis()
    };
    let launch = instances[0].launch_time.expect("LaunchTime");
    let stop = instances[0].terminated_at().expect("terminated");
    assert!((ms(&machine["launched_at"]) - launch).abs() <= 1500, "meter starts at LaunchTime: {machine}");
    assert!((ms(&machine["terminated_at"]) - stop).abs() <= 2500, "meter ends at the termination: {machine}");
    assert!(bed.log().contains("asking the provider for it"), "the restart looked the launch up");
}

#[test]
fn a_storm_of_builds_stays_within_max_instances_and_the_run_instances_bucket() {
    let cloud = Cloud::new(true);
    cloud.boot.set_baked_agent(common::paddock_bin());
    cloud.proxy().add(Rule::any().fault(Fault::Throttle).rate(0.2));
    let mut bed = Bed::new(&[]);
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool(
            "instance_types = [\"t3.small\"]\nmax_instances = 50\nidle_timeout = \"20s\"\n",
            // Builds that take a second: the queue then outlasts the launches the bucket allows
            // (5 at once, 2 a second), so the storm reaches many machines however fast the
            // first ones boot and build. With `true` a quick master drained the queue on 9.
            "steps = [\"sleep 1\"]",
        ),
    );
    start(&mut bed);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done, endpoint, cluster) =
            (peak.clone(), done.clone(), cloud.moto.endpoint(), cloud.cluster.clone());
        std::thread::spawn(move || {
            let probe = common::moto::Probe::new(&endpoint);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let alive = probe.alive(&cluster);
                peak.fetch_max(alive, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for _ in 0..200 {
        let r = bed
            .http
            .post(format!("{}/api/builds", bed.url()))
            .json(&serde_json::json!({"builder": "b", "branch": "main"}))
            .send()
            .expect("force");
        assert!(r.status().is_success(), "{}", r.status());
    }
    let builds = bed.wait_long("200 builds done", Duration::from_secs(600), || {
        let b = bed.builds();
        (b.iter().filter(|b| state(b) == "success").count() == 200).then_some(b)
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sampler.join();
    assert!(builds.iter().filter(|b| b["attempt"] == 1).count() >= 200, "no build lost");
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 50, "{peak} instances alive at once");
    assert!(peak >= 10, "the storm used many machines at once ({peak})");
    // The store agrees: never more than 50 machines between launch request and termination.
    let most = bed.db_scalar(
        "SELECT MAX(n) FROM (SELECT (SELECT COUNT(*) FROM machines b WHERE b.requested_at <= a.requested_at \
         AND (b.terminated_at IS NULL OR b.terminated_at > a.requested_at)) AS n FROM machines a)",
    );
    assert!(most.unwrap_or(999) <= 50, "store: {most:?} machines at once");
    assert!(cloud.proxy().injected("RunInstances") > 0, "throttling was injected on launches");
    for secs in [1u64, 3, 10] {
        let w = Duration::from_secs(secs);
        let most = cloud.proxy().max_in_window("RunInstances", w);
        let allowed = 5 + 2 * secs as usize + 1;
        assert!(most <= allowed, "{most} RunInstances within {secs}s (bucket allows {allowed})");
    }
}

/// A fake instance metadata service (IMDSv2): tokens first; once armed, the spot notice goes
/// to the agents whose token was issued before arming (the machine being reclaimed), never
/// to machines booted after.
struct Imds {
    port: u16,
    armed_after: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Imds {
    fn start() -> Imds {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        type Shared = (std::sync::Arc<std::sync::Mutex<Option<u64>>>, std::sync::Arc<std::sync::atomic::AtomicU64>);
        let armed_after = std::sync::Arc::new(std::sync::Mutex::new(None::<u64>));
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let state: Shared = (armed_after.clone(), issued);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            rt.block_on(async move {
                async fn token(State((_, issued)): State<Shared>, h: HeaderMap) -> Result<String, StatusCode> {
                    if !h.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                        return Err(StatusCode::BAD_REQUEST);
                    }
                    Ok(format!("tok-{}", issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))
                }
                async fn action(State((armed, _)): State<Shared>, h: HeaderMap) -> Result<String, StatusCode> {
                    let n: u64 = h
                        .get("x-aws-ec2-metadata-token")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|t| t.strip_prefix("tok-"))
                        .and_then(|n| n.parse().ok())
                        .ok_or(StatusCode::UNAUTHORIZED)?;
                    match *armed.lock().expect("lock") {
                        Some(limit) if n < limit => {
                            let at = chrono::Utc::now() + chrono::Duration::seconds(120);
                            Ok(format!(
                                "{{\"action\": \"terminate\", \"time\": \"{}\"}}",
                                at.format("%Y-%m-%dT%H:%M:%SZ")
                            ))
                        }
                        _ => Err(StatusCode::NOT_FOUND),
                    }
                }
                async fn none() -> StatusCode {
                    StatusCode::NOT_FOUND
                }
                let app = axum::Router::new()
                    .route("/latest/api/token", put(token))
                    .route("/latest/meta-data/spot/instance-action", get(action))
                    .route("/latest/meta-data/events/recommendations/rebalance", get(none))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        Imds { port, armed_after, _thread: thread }
    }

    /// From now on, agents holding a token issued so far see the notice.
    fn arm(&self, tokens_issued: u64) {
        *self.armed_after.lock().expect("lock") = Some(tokens_issued);
    }
}

#[test]
fn a_spot_interruption_notice_requeues_the_build_before_the_instance_goes() {
    let cloud = Cloud::new(false);
    let imds = Imds::start();
    let mut bed = Bed::new(&[]);
    let gate = bed.path().join("gate");
    bed.config_with_master(
        &cloud.master(),
        "",
        &cloud.pool(
            &format!(
                "instance_types = [\"t3.small\"]\nspot = true\nmax_instances = 2\nimds_url = \"http://127.0.0.1:{}\"\n",
                imds.port
            ),
            &format!("steps = [\"while [ ! -e {} ]; do sleep 0.2; done\"]", gate.display()),
        ),
    );
    start(&mut bed);
    bed.commit("main", "a.txt", "x\n", "first");
    let first = bed.wait("the build running on a spot machine", || {
        bed.builds().into_iter().find(|b| state(b) == "running" && b["attempt"] == 1)
    });
    let machine = first["machine"].as_i64().expect("machine");
    let m = bed.machines().into_iter().find(|m| m["id"] == machine).expect("machine row");
    assert_eq!(m["lifecycle"], "spot");
    let instance = m["provider_id"].as_str().expect("instance").to_string();
    // Only the first machine's agent has a token now: the notice is for it alone.
    imds.arm(1);
    let retried = bed.wait("the build requeued on the notice", || {
        bed.builds().into_iter().find(|b| b["attempt"] == 1 && state(b) == "retry")
    });
    assert_eq!(retried["id"], first["id"]);
    let detail = bed.wait("the notice recorded", || {
        bed.db_scalar(&format!(
            "SELECT COUNT(*) FROM machine_events WHERE machine_id = {machine} AND kind = 'interrupted' AND detail LIKE 'spot-interruption%'"
        ))
        .filter(|n| *n >= 1)
    });
    assert!(detail >= 1);
    // The master acted on the notice itself: the notice's two minutes had not run out, and
    // the instance was stopped by Paddock after the build was requeued.
    std::fs::write(&gate, "").expect("open the gate");
    let builds = bed.wait_builds_done(2);
    let second = builds.iter().find(|b| b["attempt"] == 2).expect("attempt 2");
    assert_eq!(state(second), "success", "{second}");
    assert_ne!(second["machine"], machine);
    let inst = cloud.moto.instances().into_iter().find(|i| i.id == instance).expect("instance");
    assert!(!inst.alive(), "the interrupted instance was terminated: {inst:?}");
    let order = bed.db_scalar(&format!(
        "SELECT (SELECT MIN(id) FROM machine_events WHERE machine_id = {machine} AND kind = 'interrupted') < \
                (SELECT MIN(id) FROM machine_events WHERE machine_id = {machine} AND kind = 'stop_requested')"
    ));
    assert_eq!(order, Some(1), "interrupted, then stopped");
}
