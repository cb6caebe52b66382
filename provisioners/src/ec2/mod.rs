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
