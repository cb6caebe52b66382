//! What the EC2 provisioner tells the cost meter about each machine it launches: its zone, the
//! spot price at launch and its root volume. The real `Ec2Provisioner` and aws-sdk-ec2 against
//! a real EC2 emulator (moto_server), with the fault-injecting proxy in between where the cloud
//! must misbehave. Every expected value is read back from moto, never guessed.

mod common;

use std::sync::Arc;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use common::faultproxy::{Fault, FaultProxy, Rule};
use common::moto::{Moto, REGION};
use paddock_provisioners::ec2::{Ec2Api, Ec2Provisioner, Ec2Settings};
use paddock_provisioners::{LaunchSpec, Launched, Provisioner};

const TYPE: &str = "t3.small";
/// A zone where moto offers `TYPE`.
const ZONE: &str = "us-east-1a";

/// moto, optionally the proxy in front of it, and a runtime for the provisioner's futures.
struct World {
    moto: Moto,
    proxy: Option<FaultProxy>,
    rt: tokio::runtime::Runtime,
    cluster: String,
}

impl World {
    fn new(proxied: bool) -> World {
        let moto = Moto::start();
        let proxy = proxied.then(|| FaultProxy::start(&moto.endpoint()));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        World { moto, proxy, rt, cluster: format!("facts{}", common::free_port()) }
    }

    fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("this test's world has a proxy")
    }

    /// Pool settings launching `TYPE` from moto's AMI in a subnet of `ZONE` (moto offers
    /// `TYPE` only in some zones, and has spot prices only where it offers it; subnet ids are
    /// random, so "the first subnet" would be a random zone).
    fn settings(&self, spot: bool) -> Ec2Settings {
        let subnets = self
            .moto
            .block_on(
                self.moto
                    .client
                    .describe_subnets()
                    .filters(aws_sdk_ec2::types::Filter::builder().name("availability-zone").values(ZONE).build())
                    .send(),
            )
            .expect("DescribeSubnets on moto");
        let subnet = subnets.subnets().first().and_then(|s| s.subnet_id()).expect("moto has a subnet in the zone");
        Ec2Settings {
            region: Some(REGION.into()),
            ami: Some(self.moto.ami()),
            instance_types: vec![TYPE.into()],
            subnets: vec![subnet.to_string()],
            spot,
            ..Default::default()
        }
    }

    /// The provisioner under test, talking to the proxy when there is one, else to moto.
    fn provisioner(&self, settings: Ec2Settings) -> Ec2Provisioner {
        let endpoint = self.proxy.as_ref().map(|p| p.endpoint()).unwrap_or_else(|| self.moto.endpoint());
        // Static test credentials, handed over directly: the process environment is shared by
        // every test thread and is not this test's to change.
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "testing", "testing", None, None, "tests",
            )))
            .build();
        let api = Arc::new(Ec2Api::from_config(&shared, Some(&endpoint)));
        let settings = Ec2Settings { endpoint_url: Some(endpoint), ..settings };
        Ec2Provisioner::new(api, settings, &self.cluster, "facts")
    }

    /// Launches machine `machine_id`; the launch must succeed.
    fn launch(&self, p: &Ec2Provisioner, machine_id: i64) -> Launched {
        let spec = LaunchSpec {
            machine_id,
            pool: "facts".into(),
            master_url: "http://127.0.0.1:9".into(),
            token: "not-a-secret".into(),
        };
        self.rt.block_on(p.launch(spec)).expect("the launch succeeds")
    }

    /// The zone DescribeInstances reports for `instance`.
    fn zone_of(&self, instance: &str) -> String {
        let out = self
            .moto
            .block_on(self.moto.client.describe_instances().instance_ids(instance).send())
            .expect("DescribeInstances on moto");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance))
            .and_then(|i| i.placement())
            .and_then(|p| p.availability_zone())
            .expect("moto reports the instance's zone")
            .to_string()
    }

    /// The spot price moto reports for `TYPE` in `zone`, newest entry first.
    fn moto_spot_price(&self, zone: &str) -> f64 {
        let out = self
            .moto
            .block_on(
                self.moto
                    .client
                    .describe_spot_price_history()
                    .instance_types(TYPE.into())
                    .availability_zone(zone)
                    .send(),
            )
            .expect("DescribeSpotPriceHistory on moto");
        let newest = out
            .spot_price_history()
            .iter()
            .filter(|p| p.instance_type().map(|t| t.as_str()) == Some(TYPE) && p.availability_zone() == Some(zone))
            .max_by_key(|p| p.timestamp().map(|t| (t.secs(), t.subsec_nanos())))
            .expect("moto has a spot price for the type and zone");
        newest.spot_price().expect("a price").parse().expect("a number")
    }

    /// The size and type of the AMI's root volume, as DescribeImages shows them.
    fn ami_root_volume(&self) -> (Option<u32>, Option<String>) {
        let ami = self.moto.ami();
        let out = self
            .moto
            .block_on(self.moto.client.describe_images().image_ids(&ami).send())
            .expect("DescribeImages on moto");
        let image = out.images().first().expect("moto knows its AMI");
        let root = image.root_device_name().expect("the AMI has a root device");
        let ebs = image
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root))
            .and_then(|m| m.ebs())
            .expect("the AMI maps its root device to EBS");
        (ebs.volume_size().and_then(|n| u32::try_from(n).ok()), ebs.volume_type().map(|t| t.as_str().to_string()))
    }
}

#[test]
fn an_on_demand_launch_reports_its_zone_and_the_configured_root_volume() {
    let w = World::new(false);
    let settings =
        Ec2Settings { root_volume_size: Some(12), root_volume_type: Some("gp3".into()), ..w.settings(false) };
    let p = w.provisioner(settings);
    let l = w.launch(&p, 1);
    assert!(l.provider_id.starts_with("i-"), "{l:?}");
    assert_eq!(l.lifecycle, "on-demand");
    assert_eq!(l.instance_type.as_deref(), Some(TYPE));
    assert_eq!(l.zone.as_deref(), Some(w.zone_of(&l.provider_id).as_str()));
    assert_eq!(l.spot_price, None, "no spot price for an on-demand machine");
    assert_eq!(l.volume_gb, Some(12));
    assert_eq!(l.volume_type.as_deref(), Some("gp3"));
}

#[test]
fn without_a_configured_root_volume_the_amis_is_reported_and_looked_up_once() {
    let w = World::new(true);
    let p = w.provisioner(w.settings(false));
    let (size, kind) = w.ami_root_volume();
    assert!(size.is_some() && kind.is_some(), "moto's AMI should say its root volume: {size:?} {kind:?}");
    let first = w.launch(&p, 1);
    assert_eq!((first.volume_gb, first.volume_type.clone()), (size, kind.clone()), "{first:?}");
    assert_eq!(first.zone.as_deref(), Some(w.zone_of(&first.provider_id).as_str()));
    let second = w.launch(&p, 2);
    assert_eq!((second.volume_gb, second.volume_type), (size, kind));
    assert_eq!(w.proxy().count("DescribeImages"), 1, "the AMI is looked up once per provisioner, not per launch");
}

#[test]
fn a_spot_launch_reports_the_spot_price_of_its_type_and_zone() {
    let w = World::new(false);
    let p = w.provisioner(w.settings(true));
    let l = w.launch(&p, 1);
    assert_eq!(l.lifecycle, "spot", "{l:?}");
    let zone = w.zone_of(&l.provider_id);
    assert_eq!(l.zone.as_deref(), Some(zone.as_str()));
    assert_eq!(l.spot_price, Some(w.moto_spot_price(&zone)));
}

#[test]
fn a_failing_spot_price_lookup_leaves_the_price_unknown_and_the_launch_standing() {
    let w = World::new(true);
    w.proxy().add(Rule::on("DescribeSpotPriceHistory").fault(Fault::ServerError).rate(1.0));
    let p = w.provisioner(w.settings(true));
    let l = w.launch(&p, 1);
    assert_eq!(l.lifecycle, "spot", "{l:?}");
    assert!(l.provider_id.starts_with("i-"), "{l:?}");
    assert_eq!(l.zone.as_deref(), Some(w.zone_of(&l.provider_id).as_str()));
    assert_eq!(l.spot_price, None);
    let calls = w.proxy().count("DescribeSpotPriceHistory");
    // One attempt plus the provisioner's retries (6) at most: the lookup gives up, it does not
    // hold the launch. (How long that takes is the provisioner's 10 s bound, not asserted here.)
    assert!((1..=7).contains(&calls), "{calls} DescribeSpotPriceHistory calls");
    let alive = w.moto.cluster_instances(&w.cluster).into_iter().filter(|i| i.alive()).count();
    assert_eq!(alive, 1, "the machine stays up");
}

#[test]
fn a_launch_found_by_its_tags_after_a_lost_answer_reports_the_same_facts() {
    let w = World::new(true);
    // moto starts the instance, but its answer never arrives: the provisioner finds it by tags.
    w.proxy().add(Rule::on("RunInstances").fault(Fault::DropAfterServe).limit(1));
    let settings = Ec2Settings { root_volume_size: Some(12), root_volume_type: Some("gp3".into()), ..w.settings(true) };
    let p = w.provisioner(settings);
    let l = w.launch(&p, 1);
    assert_eq!(w.proxy().injected("RunInstances"), 1, "the answer was dropped");
    assert_eq!(w.moto.cluster_instances(&w.cluster).len(), 1, "one instance: {:?}", w.moto.instances());
    assert_eq!(l.lifecycle, "spot", "{l:?}");
    let zone = w.zone_of(&l.provider_id);
    assert_eq!(l.zone.as_deref(), Some(zone.as_str()));
    assert_eq!(l.spot_price, Some(w.moto_spot_price(&zone)));
    assert_eq!((l.volume_gb, l.volume_type.as_deref()), (Some(12), Some("gp3")));
}
