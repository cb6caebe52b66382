//! The fleet's rules as the real master loop carries them out, with an in-process fake
//! provisioner (scripted launch outcomes, real agents) and a manual clock: launch backoff
//! decided by the core and slept by the loop, a launch whose answer was lost found and used
//! (also by the next master, when the master died with the launch out), and a stop decided
//! while a launch is out carried out once it answers.

mod common;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{paddock_bin, Bed, InProcessMaster};
use paddock::clock::{Clock, ManualClock};
use paddock::core::Ts;
use paddock_provisioners::{BoxFuture, Found, LaunchSpec, Launched, Listed, ProvisionError, Provisioner};

/// 2026-03-02T10:00:00Z
const START: i64 = 1_772_445_600_000;

/// What one launch call does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    /// Starts the agent and answers with an id.
    Up,
    /// Starts nothing and says so.
    Fail,
    /// Starts the agent, but the answer is lost: the master must look it up.
    Lost,
    /// Waits for `release()`, then as `Up`.
    Held,
}

#[derive(Default)]
struct State {
    script: VecDeque<Script>,
    /// (machine, the master's clock at the call).
    launches: Vec<(i64, Ts)>,
    /// What each launch was asked for, tokens included.
    specs: Vec<LaunchSpec>,
    terminated: Vec<(i64, String)>,
    agents: HashMap<i64, Child>,
    lost: HashMap<i64, Launched>,
}

/// A provisioner that does what its script says and runs real agents as plain processes.
struct Fake {
    state: Mutex<State>,
    clock: ManualClock,
    work: PathBuf,
    release: tokio::sync::Semaphore,
}

impl Fake {
    fn new(script: &[Script], clock: &ManualClock, work: PathBuf) -> Arc<Fake> {
        let state = State { script: script.iter().copied().collect(), ..State::default() };
        Arc::new(Fake { state: Mutex::new(state), clock: clock.clone(), work, release: tokio::sync::Semaphore::new(0) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("fake provisioner state"))
    }

    fn launches(&self) -> Vec<(i64, Ts)> {
        self.with(|s| s.launches.clone())
    }

    fn terminated(&self) -> Vec<(i64, String)> {
        self.with(|s| s.terminated.clone())
    }

    fn start_agent(&self, spec: &LaunchSpec) -> Launched {
        let dir = self.work.join(format!("m{}", spec.machine_id));
        std::fs::create_dir_all(&dir).expect("agent folder");
        let child = Command::new(paddock_bin())
            .args(["agent", "--master", &spec.master_url, "--workdir"])
            .arg(&dir)
            .env("PADDOCK_AGENT_TOKEN", &spec.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent");
        self.with(|s| s.agents.insert(spec.machine_id, child));
        Launched {
            provider_id: format!("fake-{}", spec.machine_id),
            instance_type: Some("local".into()),
            lifecycle: "local".into(),
            zone: None,
            spot_price: None,
            volume_gb: None,
            volume_type: None,
            launched_at: None,
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.with(|s| {
            for child in s.agents.values_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        });
    }
}

impl Provisioner for Fake {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched, ProvisionError>> {
        Box::pin(async move {
            let step = self.with(|s| {
                s.launches.push((spec.machine_id, self.clock.now()));
                s.specs.push(spec.clone());
                s.script.pop_front().unwrap_or(Script::Up)
            });
            match step {
                Script::Fail => Err(ProvisionError::Launch("scripted failure".into())),
                Script::Up => Ok(self.start_agent(&spec)),
                Script::Held => {
                    self.release.acquire().await.expect("release").forget();
                    Ok(self.start_agent(&spec))
                }
                Script::Lost => {
                    let launched = self.start_agent(&spec);
                    self.with(|s| s.lost.insert(spec.machine_id, launched));
                    Err(ProvisionError::Unknown("scripted: the answer was lost".into()))
                }
            }
        })
    }

    fn terminate(&self, machine_id: i64, provider_id: &str) -> BoxFuture<'_, Result<(), ProvisionError>> {
        let provider_id = provider_id.to_string();
        Box::pin(async move {
            self.with(|s| {
                s.terminated.push((machine_id, provider_id));
                if let Some(mut child) = s.agents.remove(&machine_id) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            });
            Ok(())
        })
    }

    fn list(&self, known: &[(i64, String)]) -> BoxFuture<'_, Result<Vec<Listed>, ProvisionError>> {
        let known = known.to_vec();
        Box::pin(async move {
            Ok(self.with(|s| {
                known
                    .iter()
                    .map(|(m, pid)| Listed {
                        provider_id: pid.clone(),
                        machine_id: Some(*m),
                        alive: s.agents.get_mut(m).is_some_and(|c| matches!(c.try_wait(), Ok(None))),
                    })
                    .collect()
            }))
        })
    }

    fn find(&self, machine_id: i64) -> BoxFuture<'_, Result<Option<Found>, ProvisionError>> {
        Box::pin(async move {
            Ok(self.with(|s| s.lost.get(&machine_id).cloned()).map(|launched| Found { launched, alive: true }))
        })
    }
}

fn config(bed: &Bed) -> PathBuf {
    bed.config(
        "",
        "[pool.local]\nmax_instances = 1\nidle_timeout = \"10m\"\nisolation = \"none\"\n\n\
         [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"true\"]\n\n\
         [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n",
    )
}

fn start(bed: &Bed, fake: &Arc<Fake>, clock: &ManualClock) -> InProcessMaster {
    let path = config(bed);
    let provisioner: Arc<dyn Provisioner> = fake.clone();
    InProcessMaster::start_with(bed, &path, clock, HashMap::from([("local".to_string(), provisioner)]))
}

#[test]
fn launch_failures_back_off_by_the_core_and_the_loop_wakes_when_the_backoff_ends() {
    let bed = Bed::new(&[]);
    let clock = ManualClock::new(Ts(START));
    let fake = Fake::new(&[Script::Fail, Script::Fail, Script::Fail, Script::Up], &clock, bed.path().join("fake"));
    let master = start(&bed, &fake, &clock);
    bed.commit("main", "a.txt", "1\n", "one");
    bed.wait("the first launch", || (!fake.launches().is_empty()).then_some(()));
    // Time moves on in quarter seconds; every launch records the master's clock. The loop is
    // asleep until the backoff's end: each jump of the clock wakes it to look again.
    let deadline = Instant::now() + common::DEADLINE;
    while fake.launches().len() < 4 {
        assert!(Instant::now() < deadline, "launches: {:?}", fake.launches());
        clock.advance(Duration::from_millis(250));
        std::thread::sleep(Duration::from_millis(20));
    }
    let at: Vec<i64> = fake.launches().iter().map(|(_, t)| t.0).collect();
    // 1 s, then 2 s, then 4 s after each failure in a row (paddock::core::fleet::launch_backoff).
    for (i, want) in [1_000, 2_000, 4_000].iter().enumerate() {
        assert!(
            at[i + 1] - at[i] >= *want,
            "launch {} came {} ms after the failure before it: {at:?}",
            i + 2,
            at[i + 1] - at[i]
        );
    }
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
    master.stop();
}

#[test]
fn a_launch_whose_answer_was_lost_is_found_by_its_id_and_runs_the_build() {
    let bed = Bed::new(&[]);
    let clock = ManualClock::new(Ts(START));
    let fake = Fake::new(&[Script::Lost], &clock, bed.path().join("fake"));
    let master = start(&bed, &fake, &clock);
    bed.commit("main", "a.txt", "1\n", "one");
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
    // One launch: the machine it started was looked up, never launched again nor stopped.
    assert_eq!(fake.launches().len(), 1, "{:?}", fake.launches());
    assert!(fake.terminated().is_empty(), "{:?}", fake.terminated());
    let m = &bed.machines()[0];
    assert_eq!((m["state"].as_str(), m["provider_id"].as_str()), (Some("idle"), Some("fake-1")), "{m}");
    master.stop();
}

#[test]
fn a_stop_decided_while_the_launch_is_out_is_carried_out_when_it_answers() {
    let bed = Bed::new(&[]);
    config(&bed);
    let token = bed.add_user("ada", "admin", "ada-password");
    let admin = Bed::client(Some(&token));
    let clock = ManualClock::new(Ts(START));
    let fake = Fake::new(&[Script::Held], &clock, bed.path().join("fake"));
    let master = start(&bed, &fake, &clock);
    bed.commit("main", "a.txt", "1\n", "one");
    bed.wait("the launch to be out", || (!fake.launches().is_empty()).then_some(()));
    // An admin stops the machine whose launch has not answered: nothing to stop yet.
    let r = admin.post(format!("{}/api/machines/1/terminate", bed.url())).send().expect("terminate");
    assert!(r.status().is_success(), "{:?}", r.text());
    bed.wait("the machine on its way out", || {
        bed.machines().iter().any(|m| m["id"] == 1 && m["state"] == "stopping").then_some(())
    });
    assert!(fake.terminated().is_empty(), "nothing was started yet: {:?}", fake.terminated());
    // The launch answers: the machine it started is stopped by the id it answered with, and
    // the queued build gets a machine of its own.
    fake.release.add_permits(1);
    bed.wait("the stop carried out", || (fake.terminated() == [(1, "fake-1".to_string())]).then_some(()));
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
    assert_eq!(builds[0]["machine"], 2, "{builds:?}");
    master.stop();
}

/// A master whose first launch is out (held) when it dies: its runtime goes, the call with it.
/// What it recorded first (the machine, as requested) is all the next master has. Returns the
/// bed, the clock and the dead master's provisioner.
fn a_master_dies_with_a_launch_out() -> (Bed, ManualClock, Arc<Fake>) {
    let bed = Bed::new(&[]);
    let clock = ManualClock::new(Ts(START));
    let fake = Fake::new(&[Script::Held], &clock, bed.path().join("fake"));
    let master = start(&bed, &fake, &clock);
    bed.commit("main", "a.txt", "1\n", "one");
    bed.wait("the launch to be out", || (!fake.launches().is_empty()).then_some(()));
    drop(master);
    (bed, clock, fake)
}

#[test]
fn a_master_that_dies_while_a_launch_is_out_looks_for_it_after_the_restart_and_builds_once() {
    let (bed, clock, _dead) = a_master_dies_with_a_launch_out();
    let again = Fake::new(&[], &clock, bed.path().join("fake2"));
    let master = start(&bed, &again, &clock);
    // The provider has no machine 1 (the launch never went through): it is given up, and the
    // queued build gets a machine of its own, launched once. Time moves on meanwhile, in case
    // the master waits for any of it.
    let deadline = Instant::now() + common::DEADLINE;
    while again.launches().is_empty() {
        assert!(Instant::now() < deadline, "no new launch; machines: {:?}", bed.machines());
        clock.advance(Duration::from_millis(250));
        std::thread::sleep(Duration::from_millis(20));
    }
    let builds = bed.wait_builds_done(1);
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
    assert_eq!(builds[0]["machine"], 2, "{builds:?}");
    assert_eq!(again.launches().iter().map(|(m, _)| *m).collect::<Vec<_>>(), [2], "{:?}", again.launches());
    let first = bed.machines().into_iter().find(|m| m["id"] == 1).expect("machine 1 is recorded");
    assert_eq!(first["state"], "gone", "{first}");
    let why = first["last_event"].as_str().unwrap_or("");
    assert!(why.contains("restarted during the launch") && why.contains("none found by its id"), "{first}");
    master.stop();
}

#[test]
fn a_launch_that_went_through_while_the_master_was_dead_is_found_and_used_after_the_restart() {
    let (bed, clock, fake) = a_master_dies_with_a_launch_out();
    // The provider did start machine 1 (its answer died with the master): the next master
    // finds it by its id, and its agent builds. Nothing is launched again or stopped.
    let spec = fake.with(|s| s.specs.pop()).expect("the launch's spec");
    let again = Fake::new(&[], &clock, bed.path().join("fake2"));
    let launched = again.start_agent(&spec);
    again.with(|s| s.lost.insert(1, launched));
    let master = start(&bed, &again, &clock);
    let builds = bed.wait_builds_done(1);
    assert_eq!((builds[0]["state"].as_str(), builds[0]["machine"].as_i64()), (Some("success"), Some(1)), "{builds:?}");
    assert!(again.launches().is_empty(), "{:?}", again.launches());
    assert!(again.terminated().is_empty(), "{:?}", again.terminated());
    master.stop();
}
