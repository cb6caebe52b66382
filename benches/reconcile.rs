//! Reconcile benchmark against a real EC2 emulator: 1,000 tagged instances tracked, then
//! reconcile rounds (one listing of the region for the cluster tag, judged against the 1,000
//! machines the master believes in). Prints EC2 calls per round, time per round, and this
//! process's CPU time and peak memory. Needs moto in `.venv` (`.ci/test` installs it).

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};

use common::vm_hwm_kib;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use paddock::core::reconcile::{Believed, Listed, Reconciler};
use paddock::core::MachineId;
use paddock::core::Ts;
use paddock_provisioners::ec2::{Ec2Api, Ec2Provisioner, Ec2Settings};
use paddock_provisioners::Provisioner;

const MACHINES: usize = 1_000;
const ROUNDS: usize = 20;
const CLUSTER: &str = "bench";

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc_rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF = 0.
    let rc = unsafe { getrusage(0, u.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    let u = unsafe { u.assume_init() };
    let tv = |s: i64, us: i64| s as f64 + us as f64 / 1e6;
    tv(u.utime_sec, u.utime_usec) + tv(u.stime_sec, u.stime_usec)
}

/// The head of `struct rusage` on Linux x86_64/aarch64 (two timevals), padded to its full size.
#[repr(C)]
struct libc_rusage {
    utime_sec: i64,
    utime_usec: i64,
    stime_sec: i64,
    stime_usec: i64,
    _rest: [i64; 14],
}

extern "C" {
    fn getrusage(who: i32, usage: *mut libc_rusage) -> i32;
}

fn main() {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    if !venv.exists() {
        eprintln!("moto is not installed at {}: run .ci/test once (it creates the venv)", venv.display());
        std::process::exit(1);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let mut moto = Command::new(&venv)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    // SAFETY: single-threaded at this point; the SDK's credential chain reads these.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(async {
        let api = std::sync::Arc::new(Ec2Api::connect(Some("us-east-1"), Some(&endpoint)).await);
        // 1,000 instances of our cluster plus 200 of another, launched straight on moto.
        let client = aws_sdk_ec2::Client::new(
            &aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(&endpoint)
                .load()
                .await,
        );
        let ami = client.describe_images().owners("amazon").send().await.expect("images").images()[0]
            .image_id()
            .expect("ami")
            .to_string();
        let mut ids = Vec::new();
        for (cluster, n) in [(CLUSTER, MACHINES), ("other", 200)] {
            for chunk in 0..n / 100 {
                let mut tags = TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("paddock:cluster").value(cluster).build());
                if cluster == CLUSTER {
                    tags = tags.tags(Tag::builder().key("paddock:pool").value("p").build());
                }
                let out = client
                    .run_instances()
                    .image_id(&ami)
                    .min_count(100)
                    .max_count(100)
                    .tag_specifications(tags.build())
                    .send()
                    .await
                    .expect("RunInstances on moto");
                if cluster == CLUSTER {
                    ids.extend(out.instances().iter().filter_map(|i| i.instance_id()).map(String::from));
                }
                let _ = chunk;
            }
        }
        let p = Ec2Provisioner::new(api.clone(), Ec2Settings::default(), CLUSTER, "p");
        // The master believes in all 1,000 (tag lookup by machine id is not needed here).
        let believed: Vec<Believed> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| Believed {
                machine: MachineId(n as i64 + 1),
                provider_id: Some(id.clone()),
                launched_at: Some(Ts(0)),
            })
            .collect();
        let mut reconciler = Reconciler::new(Duration::from_secs(120));
        let before_calls = api.buckets().describe.taken();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let mut listed_total = 0;
        for round in 0..ROUNDS {
            let listing = p.inventory().await.expect("inventory").expect("ec2 lists its cluster");
            listed_total = listing.len();
            let listing: Vec<Listed> = listing
                .into_iter()
                .map(|l| Listed { provider_id: l.provider_id, machine: l.machine_id.map(MachineId), alive: l.alive })
                .collect();
            let at = Ts(1_000 + round as i64);
            let verdicts =
                reconciler.judge(&listing, &believed, &HashSet::new(), &std::collections::HashMap::new(), at, at);
            assert!(verdicts.is_empty(), "all 1,000 are owned and alive: {:?}", &verdicts[..verdicts.len().min(3)]);
        }
        let wall = t0.elapsed();
        let cpu = cpu_seconds() - cpu0;
        let calls = api.buckets().describe.taken() - before_calls;
        println!("reconcile benchmark: {MACHINES} machines tracked, 200 of another cluster present, {ROUNDS} rounds");
        println!("  instances listed per round:   {listed_total}");
        println!(
            "  EC2 calls per round:          {:.1} (DescribeInstances pages; no per-instance calls)",
            calls as f64 / ROUNDS as f64
        );
        println!(
            "  wall time per round:          {:.1} ms (mostly moto answering)",
            wall.as_secs_f64() * 1e3 / ROUNDS as f64
        );
        println!(
            "  master-side CPU per round:    {:.1} ms (SDK parsing + judging, this process)",
            cpu * 1e3 / ROUNDS as f64
        );
        println!("  peak memory (VmHWM):          {:.1} MiB", vm_hwm_kib() as f64 / 1024.0);
    });
    let _ = moto.kill();
    let _ = moto.wait();
}
