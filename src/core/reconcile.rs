//! The reconcile decision: compare what the cloud lists with what the master believes, and
//! say which cloud machines are orphans to terminate and which believed-alive machines have
//! vanished. Level-triggered: every listing is judged on its own, so a missed or repeated
//! round changes nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{MachineId, Ts};

/// One machine as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub provider_id: String,
    /// The machine id it is tagged with, if any.
    pub machine: Option<MachineId>,
    /// Pending or running (not stopping, stopped or shutting down).
    pub alive: bool,
}

/// A machine the master believes is not gone, in the listing's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Believed {
    pub machine: MachineId,
    /// `None` while the launch call has not returned.
    pub provider_id: Option<String>,
    /// When the launch returned (or the master adopted it): listings may lag behind this.
    pub launched_at: Option<Ts>,
}

/// What to do about a difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A tagged machine nobody owns, seen for at least the grace period: terminate it.
    Orphan { provider_id: String, machine: Option<MachineId> },
    /// A live instance tagged for a machine whose intent is over, and not the instance that
    /// machine recorded (a launch the cloud served too late): terminate it at once and bill it.
    Late { provider_id: String, machine: MachineId },
    /// A machine the master believes alive is gone (terminated, stopped, or missing past the
    /// grace period): mark it gone and retry its build.
    Vanished { machine: MachineId, provider_id: String },
}

/// Remembers when each unowned machine was first seen, across rounds.
#[derive(Debug, Clone, Default)]
pub struct Reconciler {
    grace: Duration,
    first_seen: HashMap<String, Ts>,
}

impl Reconciler {
    /// `grace`: how long an unowned machine may live, and how long a launched machine may be
    /// missing from listings, before anything is done about it.
    pub fn new(grace: Duration) -> Reconciler {
        Reconciler { grace, first_seen: HashMap::new() }
    }

    /// Judges one complete listing of a scope, taken at `listed_at`, against the machines
    /// believed alive in it. `elsewhere`: live machines of other scopes, which may share the
    /// listing's tags (their instances are not orphans here). `over`: machines whose intent is
    /// over (gone in the store), each with the instance it recorded, if any. Another live
    /// instance of one of them is [`Verdict::Late`]; the recorded one, still listed because the
    /// listing predates its stop, is left to the orphan grace like any unowned instance.
    pub fn judge(
        &mut self,
        listing: &[Listed],
        believed: &[Believed],
        elsewhere: &HashSet<MachineId>,
        over: &HashMap<MachineId, Option<String>>,
        listed_at: Ts,
        now: Ts,
    ) -> Vec<Verdict> {
        let mut out = Vec::new();
        let owned: HashMap<MachineId, &Believed> = believed.iter().map(|b| (b.machine, b)).collect();
        let mut unowned_now = HashSet::new();
        for l in listing {
            let owner = l.machine.and_then(|m| owned.get(&m));
            // Owned when the tag names a believed machine whose launch has not returned yet
            // (this may be its instance) or whose instance this is. A second instance for
            // the same machine is an orphan: one intent, one machine.
            let is_owned = owner.is_some_and(|b| b.provider_id.as_deref().is_none_or(|p| p == l.provider_id))
                || l.machine.is_some_and(|m| elsewhere.contains(&m));
            if is_owned {
                continue;
            }
            unowned_now.insert(l.provider_id.clone());
            let first = *self.first_seen.entry(l.provider_id.clone()).or_insert(now);
            let late = l.machine.filter(|m| {
                l.alive && over.get(m).is_some_and(|recorded| recorded.as_deref() != Some(l.provider_id.as_str()))
            });
            if let Some(machine) = late {
                out.push(Verdict::Late { provider_id: l.provider_id.clone(), machine });
            } else if now.since(first) >= self.grace {
                out.push(Verdict::Orphan { provider_id: l.provider_id.clone(), machine: l.machine });
            }
        }
        // Forget machines no longer listed (or now owned), so the map stays small.
        self.first_seen.retain(|k, _| unowned_now.contains(k));
        let by_id: HashMap<&str, &Listed> = listing.iter().map(|l| (l.provider_id.as_str(), l)).collect();
        for b in believed {
            let Some(pid) = &b.provider_id else { continue };
            match by_id.get(pid.as_str()) {
                Some(l) if l.alive => {}
                Some(_) => out.push(Verdict::Vanished { machine: b.machine, provider_id: pid.clone() }),
                None => {
                    // Just launched (or launched after the listing was taken): listings are
                    // eventually consistent, so absent is not yet gone.
                    let young = b.launched_at.is_none_or(|t| listed_at.since(t) < self.grace);
                    if !young {
                        out.push(Verdict::Vanished { machine: b.machine, provider_id: pid.clone() });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Duration = Duration::from_secs(60);

    fn l(pid: &str, machine: Option<MachineId>, alive: bool) -> Listed {
        Listed { provider_id: pid.into(), machine, alive }
    }
    fn b(machine: MachineId, pid: Option<&str>, at: i64) -> Believed {
        Believed { machine, provider_id: pid.map(String::from), launched_at: Some(Ts(at)) }
    }

    #[test]
    fn owned_machines_are_left_alone() {
        let mut r = Reconciler::new(G);
        let v = r.judge(
            &[l("i-1", Some(MachineId(1)), true)],
            &[b(MachineId(1), Some("i-1"), 0)],
            &HashSet::new(),
            &HashMap::new(),
            Ts(1_000_000),
            Ts(1_000_000),
        );
        assert!(v.is_empty());
    }

    #[test]
    fn orphan_is_terminated_only_after_the_grace_period() {
        let mut r = Reconciler::new(G);
        let listing = [l("i-9", Some(MachineId(9)), true), l("i-x", None, true)];
        assert!(r.judge(&listing, &[], &HashSet::new(), &HashMap::new(), Ts(0), Ts(0)).is_empty());
        assert!(r.judge(&listing, &[], &HashSet::new(), &HashMap::new(), Ts(59_999), Ts(59_999)).is_empty());
        let v = r.judge(&listing, &[], &HashSet::new(), &HashMap::new(), Ts(60_000), Ts(60_000));
        assert_eq!(
            v,
            vec![
                Verdict::Orphan { provider_id: "i-9".into(), machine: Some(MachineId(9)) },
                Verdict::Orphan { provider_id: "i-x".into(), machine: None }
            ]
        );
    }

    #[test]
    fn instance_of_a_launch_in_flight_is_not_an_orphan() {
        let mut r = Reconciler::new(G);
        let believed = [Believed { machine: MachineId(3), provider_id: None, launched_at: None }];
        for t in [0, 100_000, 200_000] {
            assert!(r
                .judge(&[l("i-3", Some(MachineId(3)), true)], &believed, &HashSet::new(), &HashMap::new(), Ts(t), Ts(t))
                .is_empty());
        }
    }

    #[test]
    fn a_second_instance_for_one_machine_is_an_orphan() {
        let mut r = Reconciler::new(Duration::ZERO);
        let v = r.judge(
            &[l("i-a", Some(MachineId(4)), true), l("i-b", Some(MachineId(4)), true)],
            &[b(MachineId(4), Some("i-a"), 0)],
            &HashSet::new(),
            &HashMap::new(),
            Ts(0),
            Ts(0),
        );
        assert_eq!(v, vec![Verdict::Orphan { provider_id: "i-b".into(), machine: Some(MachineId(4)) }]);
    }

    #[test]
    fn a_late_instance_of_a_stopped_intent_is_an_orphan_at_once() {
        let mut r = Reconciler::new(G);
        let over: HashMap<MachineId, Option<String>> = [(MachineId(9), None)].into_iter().collect();
        let v = r.judge(
            &[l("i-9", Some(MachineId(9)), true), l("i-x", Some(MachineId(10)), true)],
            &[],
            &HashSet::new(),
            &over,
            Ts(0),
            Ts(0),
        );
        assert_eq!(v, vec![Verdict::Late { provider_id: "i-9".into(), machine: MachineId(9) }], "no grace for 9 only");
    }

    #[test]
    fn the_recorded_instance_of_a_machine_just_stopped_is_not_late() {
        // The listing was taken before the stop was confirmed: it still shows the machine's
        // own instance alive. That is no second instance; the grace covers the stale listing.
        let mut r = Reconciler::new(G);
        let over: HashMap<MachineId, Option<String>> = [(MachineId(4), Some("i-4".to_string()))].into_iter().collect();
        let listing = [l("i-4", Some(MachineId(4)), true)];
        assert!(r.judge(&listing, &[], &HashSet::new(), &over, Ts(0), Ts(0)).is_empty());
        let v = r.judge(
            &[l("i-4", Some(MachineId(4)), true), l("i-4b", Some(MachineId(4)), true)],
            &[],
            &HashSet::new(),
            &over,
            Ts(1),
            Ts(1),
        );
        assert_eq!(
            v,
            vec![Verdict::Late { provider_id: "i-4b".into(), machine: MachineId(4) }],
            "another instance is late"
        );
        let v = r.judge(&listing, &[], &HashSet::new(), &over, Ts(60_000), Ts(60_000));
        assert_eq!(
            v,
            vec![Verdict::Orphan { provider_id: "i-4".into(), machine: Some(MachineId(4)) }],
            "alive past the grace"
        );
    }

    #[test]
    fn missing_is_gone_only_after_the_grace_window() {
        let mut r = Reconciler::new(G);
        let believed = [b(MachineId(5), Some("i-5"), 1_000)];
        assert!(
            r.judge(&[], &believed, &HashSet::new(), &HashMap::new(), Ts(30_000), Ts(30_000)).is_empty(),
            "not visible yet"
        );
        assert_eq!(
            r.judge(&[], &believed, &HashSet::new(), &HashMap::new(), Ts(61_000), Ts(61_000)),
            vec![Verdict::Vanished { machine: MachineId(5), provider_id: "i-5".into() }]
        );
    }

    #[test]
    fn a_machine_launched_after_the_listing_was_taken_is_young() {
        let mut r = Reconciler::new(G);
        let believed = [b(MachineId(5), Some("i-5"), 100_000)];
        // Listed at 90 s, judged at 200 s: the machine was not there to be listed.
        assert!(r.judge(&[], &believed, &HashSet::new(), &HashMap::new(), Ts(90_000), Ts(200_000)).is_empty());
    }

    #[test]
    fn instances_of_machines_in_other_scopes_are_not_orphans() {
        let mut r = Reconciler::new(Duration::ZERO);
        let elsewhere = HashSet::from([MachineId(8)]);
        assert!(r
            .judge(&[l("i-8", Some(MachineId(8)), true)], &[], &elsewhere, &HashMap::new(), Ts(0), Ts(0))
            .is_empty());
    }

    #[test]
    fn stopped_or_shutting_down_is_gone_at_once() {
        let mut r = Reconciler::new(G);
        let v = r.judge(
            &[l("i-6", Some(MachineId(6)), false)],
            &[b(MachineId(6), Some("i-6"), 0)],
            &HashSet::new(),
            &HashMap::new(),
            Ts(1),
            Ts(1),
        );
        assert_eq!(v, vec![Verdict::Vanished { machine: MachineId(6), provider_id: "i-6".into() }]);
    }

    #[test]
    fn first_seen_is_forgotten_when_the_orphan_goes() {
        let mut r = Reconciler::new(G);
        r.judge(&[l("i-7", None, true)], &[], &HashSet::new(), &HashMap::new(), Ts(0), Ts(0));
        r.judge(&[], &[], &HashSet::new(), &HashMap::new(), Ts(10), Ts(10));
        // Seen again later: the grace starts over.
        assert!(r
            .judge(&[l("i-7", None, true)], &[], &HashSet::new(), &HashMap::new(), Ts(70_000), Ts(70_000))
            .is_empty());
    }
}
