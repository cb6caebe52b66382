//! The `ec2` provisioner: each machine is an EC2 instance launched through aws-sdk-ec2,
//! bootstrapped by cloud-init user-data that fetches and starts the agent.
//!
//! Every instance carries [`TAG_CLUSTER`], [`TAG_POOL`] and [`TAG_MACHINE`]; those tags, not
//! the store, are how a launch whose answer was lost is found again and how orphans are found.

use std::collections::BTreeMap;

pub mod userdata;

/// Tag naming the Paddock cluster (one master and its store) an instance belongs to.
pub const TAG_CLUSTER: &str = "paddock:cluster";
/// Tag naming the pool an instance was launched for.
pub const TAG_POOL: &str = "paddock:pool";
/// Tag carrying the machine id (the store's id, also the idempotency token's base).
pub const TAG_MACHINE: &str = "paddock:machine";

/// Default instance metadata service address, which the agent polls for spot notices.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

/// A pool's EC2 settings, as the config file gives them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ec2Settings {
    /// Region; `None` = aws-config's chain (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// EC2 endpoint override, for tests and EC2-compatible clouds.
    pub endpoint_url: Option<String>,
    /// AMI id; required unless the launch template names one.
    pub ami: Option<String>,
    /// Launch template id (`lt-…`) or name.
    pub launch_template: Option<String>,
    /// Launch template version; default `$Default`.
    pub launch_template_version: Option<String>,
    /// Tried in order on capacity errors. May be empty when the launch template sets a type.
    pub instance_types: Vec<String>,
    /// Tried in order on capacity or zone errors. Empty = the default VPC's choice.
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    /// Instance profile name or ARN.
    pub iam_instance_profile: Option<String>,
    /// Root volume size in GiB; `None` = the AMI's.
    pub root_volume_size: Option<i32>,
    /// Root volume type (`gp3`, …); `None` = the AMI's.
    pub root_volume_type: Option<String>,
    /// Device name of the root volume; default `/dev/xvda`.
    pub root_device_name: Option<String>,
    /// Ask for spot capacity first, fall back to on-demand.
    pub spot: bool,
    /// Extra tags on instances and volumes.
    pub tags: BTreeMap<String, String>,
    /// SSH key pair name, if any.
    pub key_name: Option<String>,
    /// Metadata service address the agent polls; default [`DEFAULT_IMDS_URL`].
    pub imds_url: Option<String>,
}

pub mod throttle;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, LaunchTemplateSpecification, MarketType, ResourceType,
    ShutdownBehavior, SpotInstanceType, SpotMarketOptions, SpotPrice, Tag, TagSpecification, VolumeType,
};
use backon::{BackoffBuilder, ExponentialBuilder};

use crate::{BoxFuture, Found, LaunchSpec, Launched, Listed, ProvisionError, Provisioner};
use throttle::Buckets;

/// Error codes that mean "this type, zone or market has no room now": try the next candidate.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
    "UnsupportedOperation",
    "InvalidInstanceType",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InsufficientSpotCapacity",
];
/// Error codes that mean "slow down": the call was not served.
const THROTTLE_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];
/// Instance states in which an instance still exists (and may cost money).
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];
/// Every state, for finding an instance that may already be gone (EC2 lists terminated
/// instances for about an hour).
const ALL_STATES: &[&str] = &["pending", "running", "stopping", "stopped", "shutting-down", "terminated"];

/// One region's EC2 client with its request buckets, shared by every pool in that region.
#[derive(Debug)]
pub struct Ec2Api {
    client: aws_sdk_ec2::Client,
    buckets: Buckets,
    scope: String,
}

impl Ec2Api {
    /// The request buckets, whose counts say how many calls were made.
    pub fn buckets(&self) -> &Buckets {
        &self.buckets
    }

    /// A client on aws-config's standard chain (environment, profile, SSO, instance role).
    pub async fn connect(region: Option<&str>, endpoint_url: Option<&str>) -> Ec2Api {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_string()));
        }
        Ec2Api::from_config(&loader.load().await, endpoint_url)
    }

    /// A client on an already loaded AWS configuration (credentials and region), e.g. one an
    /// embedding program or a test built. The SDK's own retries are off: every attempt goes
    /// through Paddock's buckets and its launch retries look the machine up first.
    pub fn from_config(shared: &aws_config::SdkConfig, endpoint_url: Option<&str>) -> Ec2Api {
        let mut conf = aws_sdk_ec2::config::Builder::from(shared)
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            );
        if let Some(url) = endpoint_url {
            conf = conf.endpoint_url(url);
        }
        let region_name = shared.region().map(|r| r.to_string()).unwrap_or_default();
        Ec2Api {
            client: aws_sdk_ec2::Client::from_conf(conf.build()),
            buckets: Buckets::default(),
            scope: format!("ec2:{region_name}:{}", endpoint_url.unwrap_or("")),
        }
    }
}

/// A region (or the environment's) and an endpoint override (or the standard one).
type RegionKey = (Option<String>, Option<String>);

/// The [`Ec2Api`]s in use, one per region and endpoint.
#[derive(Debug, Default)]
pub struct Ec2Regions {
    apis: tokio::sync::Mutex<HashMap<RegionKey, Arc<Ec2Api>>>,
}

impl Ec2Regions {
    /// The shared client for this region and endpoint, created on first use.
    pub async fn api(&self, region: Option<&str>, endpoint_url: Option<&str>) -> Arc<Ec2Api> {
        let key = (region.map(String::from), endpoint_url.map(String::from));
        let mut apis = self.apis.lock().await;
        if let Some(a) = apis.get(&key) {
            return a.clone();
        }
        let api = Arc::new(Ec2Api::connect(region, endpoint_url).await);
        apis.insert(key, api.clone());
        api
    }
}

/// How a failed call is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// No room for this candidate: try the next one.
    Capacity(String),
    /// Throttled: the call was not served; wait and retry.
    Throttled(String),
    /// The call may or may not have been served (timeout, dropped answer, 5xx).
    Unknown(String),
    /// Retrying will not help (bad AMI, no permission, …).
    Fatal(String),
}

/// EC2 calls answered with a throttling error, by every provisioner of this process.
static THROTTLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many EC2 calls were throttled (RequestLimitExceeded and kin) since the process started.
pub fn throttled_calls() -> u64 {
    THROTTLED.load(std::sync::atomic::Ordering::Relaxed)
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> Failure {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("Unknown").to_string();
            let text = format!("{code}: {}", err.message().unwrap_or(""));
            if CAPACITY_CODES.contains(&code.as_str()) {
                Failure::Capacity(text)
            } else if THROTTLE_CODES.contains(&code.as_str()) {
                THROTTLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Failure::Throttled(text)
            } else if matches!(
                code.as_str(),
                "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
            ) {
                Failure::Unknown(text)
            } else {
                Failure::Fatal(text)
            }
        }
        SdkError::ConstructionFailure(_) => Failure::Fatal(format!("{}", aws_sdk_ec2::error::DisplayErrorContext(e))),
        _ => Failure::Unknown(format!("{}", aws_sdk_ec2::error::DisplayErrorContext(e))),
    }
}

/// One way to launch: an instance type (or the template's), a subnet (or the default), a market.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    instance_type: Option<String>,
    subnet: Option<String>,
    spot: bool,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} in {}",
            if self.spot { "spot" } else { "on-demand" },
            self.instance_type.as_deref().unwrap_or("(template's type)"),
            self.subnet.as_deref().unwrap_or("(default subnet)")
        )
    }
}

/// Spot first (when asked), then on-demand; within a market, types in order, and within a
/// type, subnets in order.
fn candidates(s: &Ec2Settings) -> Vec<Candidate> {
    let types: Vec<Option<String>> =
        if s.instance_types.is_empty() { vec![None] } else { s.instance_types.iter().cloned().map(Some).collect() };
    let subnets: Vec<Option<String>> =
        if s.subnets.is_empty() { vec![None] } else { s.subnets.iter().cloned().map(Some).collect() };
    let markets: &[bool] = if s.spot { &[true, false] } else { &[false] };
    let mut out = Vec::new();
    for &spot in markets {
        for t in &types {
            for sn in &subnets {
                out.push(Candidate { instance_type: t.clone(), subnet: sn.clone(), spot });
            }
        }
    }
    out
}

/// How launches and other calls retry transient failures.
#[derive(Debug, Clone)]
struct RetryPolicy {
    min_delay: Duration,
    max_delay: Duration,
    /// Retries per call (after the first attempt).
    max_retries: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Bounded so a launch gives up well inside the master's launch timeout (120 s); the
        // master then retries with its own backoff.
        RetryPolicy { min_delay: Duration::from_millis(200), max_delay: Duration::from_secs(10), max_retries: 6 }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter()
            .build()
    }
}

/// Starts machines as EC2 instances for one pool.
#[derive(Debug)]
pub struct Ec2Provisioner {
    api: Arc<Ec2Api>,
    settings: Ec2Settings,
    cluster: String,
    pool: String,
    retry: RetryPolicy,
    /// The AMI's root device (name, default size and type), looked up once: the settings
    /// name one AMI, and an AMI never changes.
    ami_root: tokio::sync::Mutex<Option<AmiRoot>>,
    /// Instances this provisioner launched lately: EC2 may not know them yet ("NotFound"
    /// right after RunInstances), so a terminate must not take that for "already gone".
    recent: std::sync::Mutex<HashMap<String, tokio::time::Instant>>,
}

/// One call's time limit (the SDK's operation attempt timeout, set in [`Ec2Api::from_config`]).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long DescribeInstances may lag behind a served RunInstances.
const LISTING_LAG: Duration = Duration::from_secs(60);
/// How long after its launch an instance may be unknown to the API without being gone.
const VISIBILITY_GRACE: Duration = Duration::from_secs(120);
/// A launch gives up (and the master retries it with its own backoff) after this long, well
/// inside the master's launch timeout, so the master never abandons a call still in flight.
const LAUNCH_BUDGET: Duration = Duration::from_secs(80);
/// The lookup by tags after an unknown outcome; budget plus lookup stay under the master's 120 s.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The most the cost facts (spot price, the AMI's volume) may add to a launch that succeeded:
/// they are nice to have, the machine is what the master waits for.
const FACTS_TIMEOUT: Duration = Duration::from_secs(10);
/// The spot products a Linux instance is billed as (EC2-Classic's and VPC's; the same price).
const SPOT_PRODUCTS: &[&str] = &["Linux/UNIX", "Linux/UNIX (Amazon VPC)"];

/// An AMI's root device as DescribeImages shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AmiRoot {
    /// Device name, where a configured root volume size or type goes.
    device: String,
    /// The root volume's size in GiB when the launch does not override it.
    size: Option<u32>,
    /// The root volume's type when the launch does not override it.
    volume_type: Option<String>,
}

/// The root volume a launch gets: the configured size and type, and for what is not
/// configured the AMI's default (`ami`, when known). With a launch template and no AMI lookup,
/// the template may set the volume, so what is not configured stays unknown.
fn root_volume(s: &Ec2Settings, ami: Option<&AmiRoot>) -> (Option<u32>, Option<String>) {
    // A negative size is rejected by the config check; here it just means "unknown".
    let size = s.root_volume_size.and_then(|n| u32::try_from(n).ok());
    let volume_type = s.root_volume_type.clone();
    let ami = if s.launch_template.is_some() { None } else { ami };
    (size.or(ami.and_then(|a| a.size)), volume_type.or(ami.and_then(|a| a.volume_type.clone())))
}

/// The newest price among `history` for `instance_type` in `zone`; other types' and zones'
/// entries (a cloud may ignore the request's filters) and unparsable prices are skipped.
fn newest_spot_price(history: &[SpotPrice], instance_type: &str, zone: &str) -> Option<f64> {
    history
        .iter()
        .filter(|p| p.instance_type().map(|t| t.as_str()) == Some(instance_type) && p.availability_zone() == Some(zone))
        .filter_map(|p| {
            let price = p.spot_price()?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)?;
            Some((p.timestamp().map(|t| (t.secs(), t.subsec_nanos())), price))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, price)| price)
}

/// An instance as a listing shows it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    state: String,
    machine: Option<i64>,
    instance_type: Option<String>,
    spot: bool,
    zone: Option<String>,
    /// The cloud's `LaunchTime`, in milliseconds since the epoch.
    launched_at: Option<i64>,
}

impl Seen {
    /// Pending or running: alive for the master's purposes.
    fn alive(&self) -> bool {
        self.state == "pending" || self.state == "running"
    }

    /// What a launch's answer would have said about this instance (before `add_facts`).
    fn launched(&self) -> Launched {
        Launched {
            provider_id: self.id.clone(),
            instance_type: self.instance_type.clone(),
            lifecycle: if self.spot { "spot" } else { "on-demand" }.to_string(),
            zone: self.zone.clone(),
            spot_price: None,
            volume_gb: None,
            volume_type: None,
            launched_at: self.launched_at,
        }
    }
}

/// An SDK time in milliseconds since the epoch.
fn millis(t: &aws_smithy_types::DateTime) -> Option<i64> {
    t.to_millis().ok()
}

impl Ec2Provisioner {
    /// A provisioner for `pool` of `cluster`, on a shared region client.
    pub fn new(api: Arc<Ec2Api>, settings: Ec2Settings, cluster: &str, pool: &str) -> Ec2Provisioner {
        Ec2Provisioner {
            api,
            settings,
            cluster: cluster.to_string(),
            pool: pool.to_string(),
            retry: RetryPolicy::default(),
            ami_root: tokio::sync::Mutex::new(None),
            recent: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn tags(&self, machine_id: i64) -> Vec<Tag> {
        let mut tags = vec![
            (TAG_CLUSTER.to_string(), self.cluster.clone()),
            (TAG_POOL.to_string(), self.pool.clone()),
            (TAG_MACHINE.to_string(), machine_id.to_string()),
            ("Name".to_string(), format!("paddock-{}-{}-{machine_id}", self.cluster, self.pool)),
        ];
        for (k, v) in &self.settings.tags {
            if !tags.iter().any(|(key, _)| key == k) {
                tags.push((k.clone(), v.clone()));
            }
        }
        tags.into_iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
    }

    /// The idempotency token for one candidate of one machine's launch: the same attempt
    /// retried carries the same token; another candidate (other parameters) needs its own.
    fn client_token(&self, machine_id: i64, candidate: usize) -> String {
        let mut t = format!("paddock-{}-{machine_id}-{candidate}", self.cluster);
        t.truncate(64);
        t
    }

    /// The device to put the configured root volume size or type on; `None` when neither is
    /// configured. Needs the AMI's root device name unless the settings give it.
    async fn root_device(&self, deadline: tokio::time::Instant) -> Result<Option<String>, ProvisionError> {
        if self.settings.root_volume_size.is_none() && self.settings.root_volume_type.is_none() {
            return Ok(None);
        }
        if let Some(d) = &self.settings.root_device_name {
            return Ok(Some(d.clone()));
        }
        // Without an AMI the config requires root_device_name, so this is not reached.
        let Some(ami) = &self.settings.ami else { return Ok(None) };
        match tokio::time::timeout_at(deadline, self.ami_root()).await {
            Ok(Ok(root)) => Ok(Some(root.device)),
            Ok(Err(e)) => Err(ProvisionError::Launch(format!("cannot look up AMI {ami}: {e}"))),
            Err(_) => Err(ProvisionError::Launch(format!(
                "cannot look up AMI {ami}: no answer within the launch's {LAUNCH_BUDGET:?}"
            ))),
        }
    }

    /// The configured AMI's root device, from DescribeImages the first time. Only an answer is
    /// kept: after a failure the next launch asks again.
    async fn ami_root(&self) -> Result<AmiRoot, String> {
        let Some(ami) = &self.settings.ami else { return Err("no AMI is configured".into()) };
        // Held across the call, so launches that start together share one lookup.
        let mut cache = self.ami_root.lock().await;
        if let Some(root) = cache.as_ref() {
            return Ok(root.clone());
        }
        let out = self
            .with_retries(
                || {
                    let req = self.api.client.describe_images().image_ids(ami);
                    async move { req.send().await }
                },
                &self.api.buckets.describe,
            )
            .await?;
        let image = out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(ami.as_str()))
            .ok_or_else(|| format!("AMI {ami} not found"))?;
        let device = image.root_device_name().ok_or_else(|| format!("AMI {ami} has no root device"))?.to_string();
        let ebs = image
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(device.as_str()))
            .and_then(|m| m.ebs());
        let root = AmiRoot {
            device,
            size: ebs.and_then(|e| e.volume_size()).and_then(|n| u32::try_from(n).ok()),
            volume_type: ebs.and_then(|e| e.volume_type()).map(|t| t.as_str().to_string()),
        };
        *cache = Some(root.clone());
        Ok(root)
    }

    /// The current spot price of `instance_type` in `zone`; `Ok(None)` when the cloud has none.
    async fn spot_price(&self, instance_type: &str, zone: &str) -> Result<Option<f64>, String> {
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now());
        let out = self
            .with_retries(
                || {
                    let req = self
                        .api
                        .client
                        .describe_spot_price_history()
                        .instance_types(InstanceType::from(instance_type))
                        .availability_zone(zone)
                        .set_product_descriptions(Some(SPOT_PRODUCTS.iter().map(|p| p.to_string()).collect()))
                        .start_time(now);
                    async move { req.send().await }
                },
                &self.api.buckets.describe,
            )
            .await?;
        Ok(newest_spot_price(out.spot_price_history(), instance_type, zone))
    }

    /// Adds the spot price and the root volume to a launched machine, for the cost meter. Both
    /// lookups run together, end by `deadline` and by [`FACTS_TIMEOUT`], and never fail the
    /// launch: what cannot be had stays `None`, with a warning.
    async fn add_facts(&self, mut l: Launched, machine_id: i64, deadline: tokio::time::Instant) -> Launched {
        let until = deadline.min(tokio::time::Instant::now() + FACTS_TIMEOUT);
        let out_of_time = tokio::time::Instant::now() >= until;
        let needs_ami = self.settings.launch_template.is_none()
            && (self.settings.root_volume_size.is_none() || self.settings.root_volume_type.is_none());
        let ami = async {
            if !needs_ami {
                return None;
            }
            // A known AMI costs no call, so it is used even when the launch has no time left.
            if let Some(root) = self.ami_root.try_lock().ok().and_then(|c| c.clone()) {
                return Some(root);
            }
            if out_of_time {
                tracing::warn!(machine = machine_id, instance = %l.provider_id, "root volume size or type unknown: the launch had no time left to look up the AMI");
                return None;
            }
            match tokio::time::timeout_at(until, self.ami_root()).await {
                Ok(Ok(root)) => Some(root),
                Ok(Err(e)) => {
                    tracing::warn!(machine = machine_id, instance = %l.provider_id, "root volume size or type unknown: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!(machine = machine_id, instance = %l.provider_id, "root volume size or type unknown: DescribeImages gave no answer in time");
                    None
                }
            }
        };
        let price = async {
            if l.lifecycle != "spot" {
                return None;
            }
            let (Some(t), Some(zone)) = (l.instance_type.as_deref(), l.zone.as_deref()) else {
                tracing::warn!(machine = machine_id, instance = %l.provider_id, "spot price unknown: the instance's type or zone is unknown");
                return None;
            };
            if out_of_time {
                tracing::warn!(machine = machine_id, instance = %l.provider_id, instance_type = t, zone, "spot price unknown: the launch had no time left to look it up");
                return None;
            }
            match tokio::time::timeout_at(until, self.spot_price(t, zone)).await {
                Ok(Ok(Some(p))) => Some(p),
                Ok(Ok(None)) => {
                    tracing::warn!(machine = machine_id, instance = %l.provider_id, instance_type = t, zone, "spot price unknown: the cloud reported no price for this type and zone");
                    None
                }
                Ok(Err(e)) => {
                    tracing::warn!(machine = machine_id, instance = %l.provider_id, instance_type = t, zone, "spot price unknown: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!(machine = machine_id, instance = %l.provider_id, instance_type = t, zone, "spot price unknown: DescribeSpotPriceHistory gave no answer in time");
                    None
                }
            }
        };
        let (ami, price) = tokio::join!(ami, price);
        let (volume_gb, volume_type) = root_volume(&self.settings, ami.as_ref());
        l.spot_price = price;
        l.volume_gb = volume_gb;
        l.volume_type = volume_type;
        l
    }

    async fn run_once(
        &self,
        spec: &LaunchSpec,
        c: &Candidate,
        token: &str,
        user_data: &str,
        root_device: Option<&str>,
    ) -> Result<
        Launched,
        SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError, aws_sdk_ec2::config::http::HttpResponse>,
    > {
        let s = &self.settings;
        let tags = self.tags(spec.machine_id);
        let mut req = self
            .api
            .client
            .run_instances()
            .min_count(1)
            .max_count(1)
            .client_token(token)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .user_data(user_data)
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Instance).set_tags(Some(tags.clone())).build(),
            )
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Volume).set_tags(Some(tags)).build(),
            );
        if let Some(ami) = &s.ami {
            req = req.image_id(ami);
        }
        if let Some(lt) = &s.launch_template {
            let spec = LaunchTemplateSpecification::builder()
                .version(s.launch_template_version.as_deref().unwrap_or("$Default"));
            let spec = if lt.starts_with("lt-") { spec.launch_template_id(lt) } else { spec.launch_template_name(lt) };
            req = req.launch_template(spec.build());
        }
        if let Some(t) = &c.instance_type {
            req = req.instance_type(t.as_str().into());
        }
        if let Some(sn) = &c.subnet {
            req = req.subnet_id(sn);
        }
        for sg in &s.security_groups {
            req = req.security_group_ids(sg);
        }
        if let Some(p) = &s.iam_instance_profile {
            let b = IamInstanceProfileSpecification::builder();
            req = req.iam_instance_profile(if p.starts_with("arn:") { b.arn(p) } else { b.name(p) }.build());
        }
        if let Some(dev) = root_device {
            let mut ebs = EbsBlockDevice::builder().delete_on_termination(true).encrypted(true);
            if let Some(size) = s.root_volume_size {
                ebs = ebs.volume_size(size);
            }
            if let Some(t) = &s.root_volume_type {
                ebs = ebs.volume_type(VolumeType::from(t.as_str()));
            }
            req = req.block_device_mappings(BlockDeviceMapping::builder().device_name(dev).ebs(ebs.build()).build());
        }
        if let Some(k) = &s.key_name {
            req = req.key_name(k);
        }
        if c.spot {
            req = req.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = req.send().await?;
        let inst = out.instances().first();
        Ok(Launched {
            provider_id: inst.and_then(|i| i.instance_id()).unwrap_or_default().to_string(),
            instance_type: inst
                .and_then(|i| i.instance_type())
                .map(|t| t.as_str().to_string())
                .or(c.instance_type.clone()),
            lifecycle: if c.spot { "spot" } else { "on-demand" }.to_string(),
            zone: inst.and_then(|i| i.placement()).and_then(|p| p.availability_zone()).map(String::from),
            // Filled in by add_facts, which must not hold up the answer's handling.
            spot_price: None,
            volume_gb: None,
            volume_type: None,
            launched_at: inst.and_then(|i| i.launch_time()).and_then(millis),
        })
    }

    /// Instances of this cluster in one of `states`, optionally only those of one machine.
    async fn describe(&self, machine_id: Option<i64>, states: &[&str]) -> Result<Vec<Seen>, String> {
        let mut filters = vec![
            Filter::builder().name(format!("tag:{TAG_CLUSTER}")).values(&self.cluster).build(),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
                .build(),
        ];
        if let Some(m) = machine_id {
            filters.push(Filter::builder().name(format!("tag:{TAG_MACHINE}")).values(m.to_string()).build());
        }
        let mut seen = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .with_retries(
                    || {
                        let req = self
                            .api
                            .client
                            .describe_instances()
                            .set_filters(Some(filters.clone()))
                            .set_next_token(next.clone());
                        let req = if machine_id.is_none() { req.max_results(1000) } else { req };
                        async move { req.send().await }
                    },
                    &self.api.buckets.describe,
                )
                .await?;
            for r in page.reservations() {
                for i in r.instances() {
                    let tag = |k: &str| {
                        i.tags().iter().find(|t| t.key() == Some(k)).and_then(|t| t.value()).map(String::from)
                    };
                    // Filters are the cloud's business; checking the tag again here means a
                    // cloud that ignores a filter can never make us touch another cluster.
                    if tag(TAG_CLUSTER).as_deref() != Some(self.cluster.as_str()) {
                        continue;
                    }
                    seen.push(Seen {
                        id: i.instance_id().unwrap_or_default().to_string(),
                        state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default(),
                        machine: tag(TAG_MACHINE).and_then(|m| m.parse().ok()),
                        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
                        spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
                        zone: i.placement().and_then(|p| p.availability_zone()).map(String::from),
                        launched_at: i.launch_time().and_then(millis),
                    });
                }
            }
            next = page.next_token().filter(|t| !t.is_empty()).map(String::from);
            if next.is_none() {
                break;
            }
        }
        Ok(seen)
    }

    /// Runs an idempotent call through a bucket, retrying throttling and transient failures.
    async fn with_retries<T, E, F, Fut>(&self, mut call: F, bucket: &throttle::TokenBucket) -> Result<T, String>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>>,
    {
        let mut backoff = self.retry.backoff();
        loop {
            bucket.acquire().await;
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => match classify(&e) {
                    Failure::Throttled(r) | Failure::Unknown(r) => match backoff.next() {
                        Some(d) => {
                            tracing::debug!(retry_in = ?d, "EC2 call failed, retrying: {r}");
                            tokio::time::sleep(d).await;
                        }
                        None => return Err(r),
                    },
                    Failure::Capacity(r) | Failure::Fatal(r) => return Err(r),
                },
            }
        }
    }

    async fn launch_inner(&self, spec: LaunchSpec) -> Result<Launched, ProvisionError> {
        let machine_id = spec.machine_id;
        let deadline = tokio::time::Instant::now() + LAUNCH_BUDGET;
        let launched = self.launch_candidates(spec, deadline).await?;
        if let Ok(mut recent) = self.recent.lock() {
            let now = tokio::time::Instant::now();
            recent.retain(|_, at| now.duration_since(*at) < VISIBILITY_GRACE);
            recent.insert(launched.provider_id.clone(), now);
        }
        Ok(self.add_facts(launched, machine_id, deadline).await)
    }

    async fn launch_candidates(
        &self,
        spec: LaunchSpec,
        deadline: tokio::time::Instant,
    ) -> Result<Launched, ProvisionError> {
        let imds = self.settings.imds_url.as_deref().unwrap_or(DEFAULT_IMDS_URL);
        let user_data = aws_smithy_types::base64::encode(userdata::render(&userdata::BootVars {
            master_url: &spec.master_url,
            token: &spec.token,
            machine_id: spec.machine_id,
            pool: &self.pool,
            cluster: &self.cluster,
            imds_url: imds,
        }));
        let root_device = self.root_device(deadline).await?;
        let mut reasons = Vec::new();
        // Once one attempt may have been served, no failure of this launch is certain: the
        // instance may still appear (the master then looks for it before giving up on it).
        let mut maybe_served = false;
        let fail = |maybe_served: bool, why: String| {
            if maybe_served {
                ProvisionError::Unknown(why)
            } else {
                ProvisionError::Launch(why)
            }
        };
        for (n, c) in candidates(&self.settings).iter().enumerate() {
            let token = self.client_token(spec.machine_id, n);
            let mut backoff = self.retry.backoff();
            loop {
                if tokio::time::Instant::now() >= deadline {
                    reasons.push(format!("{c}: not tried, the launch ran out of time"));
                    return Err(fail(maybe_served, format!("gave up after {LAUNCH_BUDGET:?}: {}", reasons.join("; "))));
                }
                if tokio::time::timeout_at(deadline, self.api.buckets.run.acquire()).await.is_err() {
                    // Nothing more was sent: the master retries later, with its own backoff.
                    return Err(fail(
                        maybe_served,
                        format!("the RunInstances rate limit kept this launch waiting past {LAUNCH_BUDGET:?}"),
                    ));
                }
                let attempt = tokio::time::timeout_at(
                    deadline,
                    self.run_once(&spec, c, &token, &user_data, root_device.as_deref()),
                );
                let err = match attempt.await {
                    Err(_) => Failure::Unknown(format!("no answer within the launch's {LAUNCH_BUDGET:?}")),
                    Ok(Ok(l)) => {
                        tracing::info!(machine = spec.machine_id, instance = %l.provider_id, candidate = %c, "instance launched");
                        return Ok(l);
                    }
                    Ok(Err(e)) => classify(&e),
                };
                let unknown = matches!(err, Failure::Unknown(_));
                maybe_served |= unknown;
                match err {
                    Failure::Capacity(r) => {
                        tracing::warn!(machine = spec.machine_id, candidate = %c, "no capacity, trying the next choice: {r}");
                        reasons.push(format!("{c}: {r}"));
                        break;
                    }
                    Failure::Fatal(r) => return Err(fail(maybe_served, format!("{c}: {r}"))),
                    Failure::Throttled(r) | Failure::Unknown(r) => {
                        // Whatever the cloud did with the token, a launch that may have been
                        // served is looked up by its tags before it is sent again.
                        if unknown {
                            let lookup =
                                tokio::time::timeout(LOOKUP_TIMEOUT, self.describe(Some(spec.machine_id), LIVE_STATES));
                            let found = lookup
                                .await
                                .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")))
                                .map_err(|e| {
                                    ProvisionError::Unknown(format!("{c}: {r}; then the lookup failed: {e}"))
                                })?;
                            if let Some(s) = found.into_iter().find(Seen::alive) {
                                tracing::info!(machine = spec.machine_id, instance = %s.id, "launch outcome was unknown; found the instance by its tags");
                                // Spot price and volume are filled in by add_facts, as for an
                                // answered launch.
                                return Ok(s.launched());
                            }
                        }
                        match backoff.next().filter(|d| tokio::time::Instant::now() + *d < deadline) {
                            Some(d) => {
                                tracing::warn!(machine = spec.machine_id, candidate = %c, retry_in = ?d, "launch failed, retrying: {r}");
                                tokio::time::sleep(d).await;
                            }
                            None => return Err(fail(maybe_served, format!("{c}: {r} (gave up after retries)"))),
                        }
                    }
                }
            }
        }
        Err(fail(maybe_served, format!("no capacity: {}", reasons.join("; "))))
    }

    async fn terminate_inner(&self, machine_id: i64, provider_id: &str) -> Result<(), ProvisionError> {
        let ids: Vec<String> = if provider_id.is_empty() {
            self.describe(Some(machine_id), LIVE_STATES)
                .await
                .map_err(ProvisionError::Terminate)?
                .into_iter()
                .map(|s| s.id)
                .collect()
        } else {
            vec![provider_id.to_string()]
        };
        if ids.is_empty() {
            return Ok(());
        }
        let result = self
            .with_retries(
                || {
                    let req = self.api.client.terminate_instances().set_instance_ids(Some(ids.clone()));
                    async move { req.send().await }
                },
                &self.api.buckets.terminate,
            )
            .await;
        let just_launched = |id: &str| {
            self.recent.lock().ok().and_then(|r| r.get(id).copied()).is_some_and(|at| at.elapsed() < VISIBILITY_GRACE)
        };
        match result {
            Ok(_) => {
                if let Ok(mut recent) = self.recent.lock() {
                    for id in &ids {
                        recent.remove(id);
                    }
                }
                Ok(())
            }
            // An instance launched moments ago may not be visible yet: try again later rather
            // than call it gone and leave it running.
            Err(e) if e.starts_with("InvalidInstanceID.NotFound") && ids.iter().any(|id| just_launched(id)) => {
                Err(ProvisionError::Terminate(format!("{e} (launched moments ago; not visible yet)")))
            }
            Err(e) if e.starts_with("InvalidInstanceID.NotFound") || e.starts_with("InvalidInstanceID.Malformed") => {
                Ok(())
            }
            Err(e) => Err(ProvisionError::Terminate(e)),
        }
    }
}

impl Provisioner for Ec2Provisioner {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched, ProvisionError>> {
        Box::pin(self.launch_inner(spec))
    }

    fn terminate(&self, machine_id: i64, provider_id: &str) -> BoxFuture<'_, Result<(), ProvisionError>> {
        let provider_id = provider_id.to_string();
        Box::pin(async move { self.terminate_inner(machine_id, &provider_id).await })
    }

    fn list(&self, known: &[(i64, String)]) -> BoxFuture<'_, Result<Vec<Listed>, ProvisionError>> {
        let known = known.to_vec();
        Box::pin(async move {
            let seen = self.describe(None, LIVE_STATES).await.map_err(ProvisionError::List)?;
            Ok(known
                .into_iter()
                .map(|(id, pid)| Listed {
                    alive: seen.iter().any(|s| s.id == pid && (s.state == "pending" || s.state == "running")),
                    provider_id: pid,
                    machine_id: Some(id),
                })
                .collect())
        })
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Option<Vec<Listed>>, ProvisionError>> {
        Box::pin(async move {
            let seen = self.describe(None, LIVE_STATES).await.map_err(ProvisionError::List)?;
            Ok(Some(
                seen.into_iter()
                    .map(|s| Listed {
                        alive: s.state == "pending" || s.state == "running",
                        provider_id: s.id,
                        machine_id: s.machine,
                    })
                    .collect(),
            ))
        })
    }

    fn scope(&self) -> String {
        format!("{}:{}", self.api.scope, self.cluster)
    }

    fn find(&self, machine_id: i64) -> BoxFuture<'_, Result<Option<Found>, ProvisionError>> {
        Box::pin(async move {
            let seen = self.describe(Some(machine_id), ALL_STATES).await.map_err(ProvisionError::List)?;
            // One intent, one instance; should there be more, the live one is the machine (the
            // reconcile loop terminates the others as orphans).
            let Some(s) = seen.iter().find(|s| s.alive()).or(seen.first()) else { return Ok(None) };
            let launched = self.add_facts(s.launched(), machine_id, tokio::time::Instant::now() + FACTS_TIMEOUT).await;
            Ok(Some(Found { launched, alive: s.alive() }))
        })
    }

    fn settle_time(&self) -> Duration {
        // The last RunInstances goes out within the launch budget and is abandoned after one
        // attempt's timeout; EC2 may serve it after that, and DescribeInstances may lag
        // RunInstances by seconds (a minute, allowed for here).
        LAUNCH_BUDGET + ATTEMPT_TIMEOUT + LISTING_LAG
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_go_type_then_subnet_then_on_demand() {
        let s = Ec2Settings {
            instance_types: vec!["a".into(), "b".into()],
            subnets: vec!["s1".into(), "s2".into()],
            spot: true,
            ..Default::default()
        };
        let got: Vec<String> = candidates(&s).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            got,
            [
                "spot a in s1",
                "spot a in s2",
                "spot b in s1",
                "spot b in s2",
                "on-demand a in s1",
                "on-demand a in s2",
                "on-demand b in s1",
                "on-demand b in s2"
            ]
        );
        let plain = candidates(&Ec2Settings::default());
        assert_eq!(plain, vec![Candidate { instance_type: None, subnet: None, spot: false }]);
    }

    fn price(ty: &str, zone: &str, price: &str, secs: i64) -> SpotPrice {
        SpotPrice::builder()
            .instance_type(InstanceType::from(ty))
            .availability_zone(zone)
            .spot_price(price)
            .timestamp(aws_smithy_types::DateTime::from_secs(secs))
            .build()
    }

    #[test]
    fn the_newest_price_of_the_type_and_zone_wins() {
        let history = [
            price("t3.small", "us-east-1a", "0.0070", 100),
            price("t3.small", "us-east-1a", "0.0072", 200),
            // Newer, but another zone, another type, or no price at all: ignored.
            price("t3.small", "us-east-1b", "0.0500", 300),
            price("t3.large", "us-east-1a", "0.0600", 300),
            price("t3.small", "us-east-1a", "n/a", 400),
        ];
        assert_eq!(newest_spot_price(&history, "t3.small", "us-east-1a"), Some(0.0072));
        assert_eq!(newest_spot_price(&history, "t3.small", "us-east-1c"), None);
        assert_eq!(newest_spot_price(&[], "t3.small", "us-east-1a"), None);
    }

    #[test]
    fn root_volume_is_the_configured_one_else_the_amis() {
        let ami = AmiRoot { device: "/dev/xvda".into(), size: Some(8), volume_type: Some("gp2".into()) };
        let plain = Ec2Settings::default();
        assert_eq!(root_volume(&plain, Some(&ami)), (Some(8), Some("gp2".into())));
        assert_eq!(root_volume(&plain, None), (None, None));
        let sized = Ec2Settings { root_volume_size: Some(30), ..Default::default() };
        assert_eq!(root_volume(&sized, Some(&ami)), (Some(30), Some("gp2".into())));
        let both =
            Ec2Settings { root_volume_size: Some(30), root_volume_type: Some("gp3".into()), ..Default::default() };
        assert_eq!(root_volume(&both, None), (Some(30), Some("gp3".into())));
        // A launch template may set its own volume: only what is configured is known.
        let templated = Ec2Settings { launch_template: Some("lt-1".into()), ..Default::default() };
        assert_eq!(root_volume(&templated, Some(&ami)), (None, None));
        let templated_sized = Ec2Settings { root_volume_size: Some(20), ..templated };
        assert_eq!(root_volume(&templated_sized, Some(&ami)), (Some(20), None));
    }
}
