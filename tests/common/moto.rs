//! A real EC2 emulator for tests: one `moto_server` process per test on a free loopback port,
//! and a blocking EC2 client (the real aws-sdk-ec2) to look at and act on it directly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};

/// Region every test uses.
pub const REGION: &str = "us-east-1";

/// Environment for a process (the master) that talks to moto through aws-config's chain.
pub const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", REGION),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// Where `.ci/test` installs moto.
pub fn moto_server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
}

/// A running moto server.
pub struct Moto {
    child: Child,
    pub port: u16,
    rt: tokio::runtime::Runtime,
    pub client: aws_sdk_ec2::Client,
}

/// An instance as moto reports it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub state: String,
    pub instance_type: String,
    pub subnet: String,
    pub lifecycle: String,
    pub tags: Vec<(String, String)>,
    /// Availability zone.
    pub zone: String,
    /// `LaunchTime`, in milliseconds since the epoch.
    pub launch_time: Option<i64>,
    /// `StateTransitionReason`; moto writes "User initiated (YYYY-MM-DD HH:MM:SS UTC)" when it
    /// terminates an instance.
    pub transition_reason: String,
}

impl Instance {
    /// The value of tag `key`.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    /// When the instance was terminated, as its state transition reason says (whole seconds).
    pub fn terminated_at(&self) -> Option<i64> {
        let inside = self.transition_reason.split_once('(')?.1.strip_suffix(')')?;
        let text = inside.trim_end_matches(" UTC").trim_end_matches(" GMT");
        let t = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").ok()?;
        Some(t.and_utc().timestamp_millis())
    }
    /// Pending or running.
    pub fn alive(&self) -> bool {
        self.state == "pending" || self.state == "running"
    }
}

impl Moto {
    /// Starts `moto_server` on a free port and waits until it answers.
    pub fn start() -> Moto {
        let bin = moto_server_bin();
        assert!(
            bin.exists(),
            "moto is not installed at {}: run .ci/test once (it creates the venv), or \
             `python3 -m venv .venv && .venv/bin/pip install 'moto[ec2,server]'`",
            bin.display()
        );
        let port = super::free_port();
        let log = std::env::temp_dir().join(format!("paddock-moto-{port}.log"));
        let out = std::fs::File::create(&log).expect("moto log");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start moto_server");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let moto = Moto { child, port, rt, client: client(&format!("http://127.0.0.1:{port}")) };
        let start = Instant::now();
        let http = super::blocking_client().build().expect("client");
        while http.get(format!("{}/moto-api/", moto.endpoint())).send().is_err() {
            assert!(start.elapsed() < super::DEADLINE, "moto_server did not start; see {}", log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// The endpoint URL to give the SDK.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs an SDK future to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Every instance moto knows (any state).
    pub fn instances(&self) -> Vec<Instance> {
        let pages = self.block_on(self.client.describe_instances().into_paginator().items().send().collect::<Vec<_>>());
        let mut out = Vec::new();
        for r in pages {
            let r = r.expect("DescribeInstances on moto");
            for i in r.instances() {
                out.push(Instance {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
                    instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
                    subnet: i.subnet_id().unwrap_or_default().to_string(),
                    lifecycle: i.instance_lifecycle().map(|l| l.as_str().to_string()).unwrap_or("on-demand".into()),
                    zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
                    launch_time: i.launch_time().map(|t| t.secs() * 1000 + i64::from(t.subsec_nanos() / 1_000_000)),
                    transition_reason: i.state_transition_reason().unwrap_or_default().to_string(),
                    tags: i
                        .tags()
                        .iter()
                        .map(|t| (t.key().unwrap_or_default().to_string(), t.value().unwrap_or_default().to_string()))
                        .collect(),
                });
            }
        }
        out
    }

    /// Instances carrying `paddock:cluster = cluster`.
    pub fn cluster_instances(&self, cluster: &str) -> Vec<Instance> {
        self.instances().into_iter().filter(|i| i.tag("paddock:cluster") == Some(cluster)).collect()
    }

    /// The default VPC's subnets (moto creates one per zone).
    pub fn subnets(&self) -> Vec<String> {
        let r = self.block_on(self.client.describe_subnets().send()).expect("DescribeSubnets on moto");
        let mut s: Vec<String> = r.subnets().iter().filter_map(|s| s.subnet_id().map(String::from)).collect();
        s.sort();
        s
    }

    /// An AMI id moto knows.
    pub fn ami(&self) -> String {
        let r = self.block_on(self.client.describe_images().owners("amazon").send()).expect("DescribeImages on moto");
        r.images().iter().filter_map(|i| i.image_id()).next().expect("moto has an AMI").to_string()
    }

    /// Terminates an instance behind Paddock's back.
    pub fn terminate(&self, id: &str) {
        self.block_on(self.client.terminate_instances().instance_ids(id).send()).expect("TerminateInstances on moto");
    }
}

/// A second, independent client on the same moto server, for sampling from another thread.
pub struct Probe {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_ec2::Client,
}

impl Probe {
    /// A client for the moto server at `endpoint`.
    pub fn new(endpoint: &str) -> Probe {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Probe { rt, client: client(endpoint) }
    }

    /// How many instances of `cluster` are pending or running now.
    pub fn alive(&self, cluster: &str) -> usize {
        let filter = aws_sdk_ec2::types::Filter::builder().name("tag:paddock:cluster").values(cluster).build();
        let state = aws_sdk_ec2::types::Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .build();
        let pages = self.rt.block_on(
            self.client
                .describe_instances()
                .filters(filter)
                .filters(state)
                .into_paginator()
                .items()
                .send()
                .collect::<Vec<_>>(),
        );
        pages.into_iter().filter_map(Result::ok).map(|r| r.instances().len()).sum()
    }
}

/// An SDK client for moto at `endpoint`, with the tests' static credentials.
pub fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
