//! A test's EC2 cloud: moto, optionally the fault-injecting proxy in front of it, and the boot
//! emulator playing cloud-init for one cluster's instances.

use std::time::Duration;

use super::boot::BootEmulator;
use super::faultproxy::FaultProxy;
use super::moto::Moto;

/// A test's cloud: moto, optionally the proxy in front of it, and the boot emulator.
pub struct Cloud {
    pub moto: Moto,
    pub proxy: Option<FaultProxy>,
    pub boot: BootEmulator,
    pub cluster: String,
}

impl Cloud {
    /// Starts moto, the proxy when `proxied` (seeded, so its faults repeat), and the emulator.
    pub fn new(proxied: bool) -> Cloud {
        let moto = Moto::start();
        let proxy = proxied.then(|| FaultProxy::with_seed(&moto.endpoint(), 7));
        let cluster = format!("t{}", super::free_port());
        let boot = BootEmulator::start(moto.endpoint(), cluster.clone(), Duration::from_millis(500));
        Cloud { moto, proxy, boot, cluster }
    }

    /// What the master's SDK talks to.
    pub fn endpoint(&self) -> String {
        self.proxy.as_ref().map(|p| p.endpoint()).unwrap_or_else(|| self.moto.endpoint())
    }

    /// The fault proxy (panics for a cloud made without one).
    pub fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("this test's cloud has a proxy")
    }

    /// `[master]` lines: this cloud's cluster, fast reconcile rounds.
    pub fn master(&self) -> String {
        format!("cluster = \"{}\"\nreconcile_interval = \"1s\"\norphan_grace = \"3s\"\n", self.cluster)
    }

    /// An EC2 pool `ec2` on this cloud with `pool_extra` lines.
    pub fn ec2_pool(&self, pool_extra: &str) -> String {
        format!(
            "[pool.ec2]\nprovisioner = \"ec2\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nami = \"{ami}\"\n\
             {pool_extra}\n",
            endpoint = self.endpoint(),
            ami = self.moto.ami(),
        )
    }

    /// An EC2 pool `ec2` and one builder `b` with `steps`, built on every commit.
    pub fn pool(&self, pool_extra: &str, steps: &str) -> String {
        format!(
            "{}\n[[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"ec2\"\n{steps}\n\n\
             [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
            self.ec2_pool(pool_extra)
        )
    }

    /// Instances of this cluster that are pending or running.
    pub fn alive(&self) -> Vec<super::moto::Instance> {
        self.moto.cluster_instances(&self.cluster).into_iter().filter(|i| i.alive()).collect()
    }
}

/// Samples how many of the cluster's instances are alive at once, every 100 ms, until the
/// returned flag is set; the thread's result is the peak.
pub fn sample_peak(cloud: &Cloud) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<usize>) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop, endpoint, cluster) = (done.clone(), cloud.moto.endpoint(), cloud.cluster.clone());
    let thread = std::thread::spawn(move || {
        let probe = super::moto::Probe::new(&endpoint);
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(probe.alive(&cluster));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    (done, thread)
}
