//! The farm's lease, carried out: a master on PostgreSQL waits as a standby until it holds the
//! lease (not listening, so a load balancer's health check sends nobody to it), then renews it
//! when [`LeaseClock`] says and stops the process when it says to give up. Its store's writes
//! are fenced with the lease meanwhile, so a master that lost it changes nothing even before
//! it notices.

use std::time::Duration;

use crate::core::lease::{LeaseClock, LeaseStep};
use crate::core::Ts;
use crate::store::{Fence, Store, StoreError, FARM};

/// How long the roll call keeps showing a master after its last heartbeat.
pub const SHOWN_FOR: Duration = Duration::from_secs(600);

/// Exit status of a master that stopped because it could no longer be sure it held the farm's
/// lease (a service manager restarts it, as a standby).
pub const LOST_LEASE_EXIT: i32 = 3;

/// Who this master is: host, boot, pid namespace, pid and a nonce, so a restarted process is
/// never taken for its predecessor, and a holder on this very host can be found dead.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// This boot and pid namespace (`boot/ns`): a holder's pid means something here only
    /// when it has the same.
    place: String,
}

impl Identity {
    pub fn of_this_process() -> Identity {
        let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "?".into());
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
        let ns: String = ns.chars().filter(char::is_ascii_digit).collect();
        let place = format!("{}/{ns}", boot.trim().split('-').next().unwrap_or(""));
        let pid = std::process::id();
        let nonce = hex::encode(rand::random::<[u8; 4]>());
        Identity { id: format!("{host}/{place}/{pid}/{nonce}"), host, pid, place }
    }

    /// Whether `holder` is a master of this host, boot and pid namespace whose process is
    /// gone (one killed and restarted here: its successor need not wait for the lease).
    pub fn knows_dead(&self, holder: &str) -> bool {
        let parts: Vec<&str> = holder.split('/').collect();
        let [host, boot, ns, pid, _nonce] = parts[..] else { return false };
        if host != self.host || format!("{boot}/{ns}") != self.place || self.place.starts_with('/') {
            return false;
        }
        let Ok(pid) = pid.parse::<i32>() else { return false };
        if pid <= 0 || pid as u32 == self.pid {
            return false;
        }
        matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
    }
}

/// Milliseconds on a monotonic clock (the lease's timing must not follow a stepped wall clock).
fn mono(origin: tokio::time::Instant) -> Ts {
    Ts(origin.elapsed().as_millis() as i64)
}

/// The farm's lease as won: the fence the master's writes carry, and when the winning request
/// was sent (the lease lasts at least the TTL from then).
#[derive(Debug, Clone)]
pub struct Held {
    pub fence: Fence,
    pub sent: tokio::time::Instant,
}

/// Waits until this master holds the farm's lease, beating in the roll call meanwhile.
pub async fn acquire(store: &Store, me: &Identity, url: &str, ttl: Duration) -> Result<Held, StoreError> {
    store.master_started(&me.id, &me.host, me.pid, url).await?;
    let mut told: Option<String> = None;
    loop {
        let sent = tokio::time::Instant::now();
        match store.acquire_lease(FARM, &me.id, ttl.as_secs_f64(), |h| me.knows_dead(h)).await {
            Ok(Some(epoch)) => {
                tracing::info!(master = %me.id, epoch, "this master holds the farm's lease: it is the active one");
                return Ok(Held { fence: Fence { scope: FARM.into(), holder: me.id.clone(), epoch }, sent });
            }
            Ok(None) => {
                let holder = store.leases().await?.into_iter().find(|l| l.scope == FARM).map(|l| l.holder);
                if told != holder {
                    tracing::info!(
                        holder = holder.as_deref().unwrap_or("?"),
                        "standby: another master holds the farm's lease; waiting for it"
                    );
                    told = holder;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot ask for the farm's lease; trying again"),
        }
        if let Err(e) = store.master_heartbeat(&me.id, None).await {
            tracing::warn!(error = %e, "cannot record this master's heartbeat");
        }
        tokio::time::sleep(ttl / 5).await;
    }
}

/// Renews the lease as `clock` says, for as long as the task runs; the process exits with
/// [`LOST_LEASE_EXIT`] once the lease can no longer be counted on.
pub fn spawn_renewer(
    store: Store,
    me: Identity,
    held: Held,
    ttl: Duration,
    url: String,
) -> tokio::task::JoinHandle<()> {
    // Times count from the sending of the winning request: the lease lasts at least the TTL
    // from then, whatever the clocks of this host and the database say.
    let origin = held.sent;
    let fence = held.fence;
    let mut clock = LeaseClock::new(ttl, Ts(0));
    tokio::spawn(async move {
        loop {
            let now = mono(origin);
            match clock.step(now) {
                LeaseStep::Wait { at } => {
                    tokio::time::sleep(at.since(now)).await;
                }
                LeaseStep::Renew => {
                    clock.sent(now);
                    let answer =
                        tokio::time::timeout(clock.renew_every(), store.renew_lease(&fence, ttl.as_secs_f64())).await;
                    let outcome = match answer {
                        Ok(Ok(held)) => Some(held),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot renew the farm's lease; trying again");
                            None
                        }
                        Err(_) => {
                            tracing::warn!("renewing the farm's lease takes too long; trying again");
                            None
                        }
                    };
                    if !clock.answered(outcome) {
                        give_up("another master took the farm's lease");
                    }
                    let _ = store.master_heartbeat(&me.id, Some(&url)).await;
                }
                LeaseStep::GiveUp => give_up("the farm's lease could not be renewed in time"),
            }
        }
    })
}

fn give_up(why: &str) -> ! {
    // Stopping at once is what keeps two masters from acting: another may take the farm over
    // shortly, and this one's machines and builds are adopted by it.
    tracing::error!("{why}: this master stops now (exit status {LOST_LEASE_EXIT}) and leaves the farm to the other");
    std::process::exit(LOST_LEASE_EXIT);
}
