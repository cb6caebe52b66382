//! Machine provisioners for Paddock: the [`Provisioner`] trait and its backends.
//!
//! A provisioner starts and stops the machines that run Paddock's agent. The master writes the
//! machine's row (with its id, which doubles as the idempotency token) before calling
//! [`Provisioner::launch`], so a crash between the two is repaired from the store.

#[cfg(feature = "ec2")]
pub mod ec2;
pub mod local;

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so provisioners can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the master asks for when it launches a machine.
#[derive(Clone)]
pub struct LaunchSpec {
    /// The machine's id in the store; also the idempotency token.
    pub machine_id: i64,
    pub pool: String,
    /// URL the agent connects back to.
    pub master_url: String,
    /// The machine's one-time token. Never log it.
    pub token: String,
}

impl std::fmt::Debug for LaunchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchSpec")
            .field("machine_id", &self.machine_id)
            .field("pool", &self.pool)
            .field("master_url", &self.master_url)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A machine the provisioner started, with what the cost meter needs to price it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Launched {
    /// The provider's id for it (a pid for `local`, an instance id for EC2).
    pub provider_id: String,
    /// Instance type (`local` for local machines), when known.
    pub instance_type: Option<String>,
    /// `on-demand`, `spot` or `local`.
    pub lifecycle: String,
    /// Availability zone (EC2), e.g. `us-east-1a`; `None` for local machines.
    pub zone: Option<String>,
    /// Spot machines: the hourly spot price (USD) for this type and zone at launch, as the cloud reported it; `None` when not spot or the price could not be had.
    pub spot_price: Option<f64>,
    /// Root volume size in GiB, when known (EC2).
    pub volume_gb: Option<u32>,
    /// Root volume type (`gp3`, `gp2`, ...), when known (EC2).
    pub volume_type: Option<String>,
    /// When the provider says the machine started running (EC2's `LaunchTime`), in
    /// milliseconds since the Unix epoch; `None` when it does not say (then the master's own
    /// clock at the answer is used). Billing starts here.
    pub launched_at: Option<i64>,
}

/// A machine found by its id (see [`Provisioner::find`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// What the provider says about it, as a launch's answer would.
    pub launched: Launched,
    /// Pending or running (not stopping, stopped or terminated).
    pub alive: bool,
}

/// A machine as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub provider_id: String,
    /// The machine id this provider tagged it with, if it can tell.
    pub machine_id: Option<i64>,
    pub alive: bool,
}

/// Why a provisioner call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The launch did not start a machine.
    #[error("launch failed: {0}")]
    Launch(String),
    /// The launch failed in a way that may still have started a machine (no answer, a lost
    /// answer, a server error after sending): the machine must be looked up with
    /// [`Provisioner::find`] before it can be called failed.
    #[error("launch outcome unknown: {0}")]
    Unknown(String),
    #[error("terminate failed: {0}")]
    Terminate(String),
    #[error("listing failed: {0}")]
    List(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Starts and stops machines for one pool.
pub trait Provisioner: Send + Sync {
    /// Start a machine that will run `paddock agent` against `spec.master_url` with `spec.token`.
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched, ProvisionError>>;
    /// Stop a machine: gracefully first, then forcibly. Stopping a machine that is already
    /// gone is not an error. `provider_id` is empty when the launch's outcome is unknown (a
    /// crash during the call): the provisioner then finds the machine by its id.
    fn terminate(&self, machine_id: i64, provider_id: &str) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// Whether a machine this provisioner started (perhaps in an earlier run) still runs.
    fn list(&self, known: &[(i64, String)]) -> BoxFuture<'_, Result<Vec<Listed>, ProvisionError>>;
    /// Every machine of this cluster that the provider knows in this provisioner's scope
    /// (for EC2: the region), for the reconcile loop. `None` = the provider cannot list what
    /// it did not start in this run; the master then checks its known machines with `list`.
    fn inventory(&self) -> BoxFuture<'_, Result<Option<Vec<Listed>>, ProvisionError>> {
        Box::pin(async { Ok(None) })
    }
    /// Provisioners with the same scope share one inventory: one listing per region and
    /// cluster, however many pools use it.
    fn scope(&self) -> String {
        String::new()
    }
    /// Looks a machine up by its id (EC2: its tags), alive or already stopped, for a launch
    /// whose outcome is unknown. `Ok(None)`: the provider knows no such machine (yet: see
    /// [`Provisioner::settle_time`]). The default knows nothing.
    fn find(&self, machine_id: i64) -> BoxFuture<'_, Result<Option<Found>, ProvisionError>> {
        let _ = machine_id;
        Box::pin(async { Ok(None) })
    }
    /// How long after a launch was first asked for a machine it started may still be missing
    /// from [`Provisioner::find`] (calls still in flight, the provider's eventual
    /// consistency). Past it, "not found" is final. The default: at once.
    fn settle_time(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}
