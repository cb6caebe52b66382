//! Start-up after a crash or kill: what the previous run left is adopted, kept, looked up or
//! stopped, and what it was doing is queued again.

use super::*;
use crate::core::build::BuildEvent;

impl Master {
    /// Repairs what a crash or kill of the previous master left: adopts machines still running
    /// a build (their agents reconnect), stops the other machines, retries the builds whose
    /// machine is gone, re-queues queued builds and replays unscheduled changes.
    pub(super) async fn recover(&mut self) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        if crate::cost::caps::any(&self.shared.config) {
            // Before any build is queued: a cap reached before the restart still holds.
            let caps = spend_caps(&self.shared).await?;
            self.apply_caps(caps);
        }
        // Before any build is queued too: a pool paused before the restart stays paused.
        for p in store.paused_pools().await? {
            self.pending.push_back(FleetEvent::Pause { pool: p.pool, paused: true });
        }
        let running = store.builds_in_state("running").await?;
        let live = store.live_machines().await?;
        let listed = self.alive_machines(&live).await;
        let mut keep = Vec::new();
        for mut m in live {
            let Some(state) = MachineState::parse(&m.state) else {
                self.stop_leftover(&m).await?;
                continue;
            };
            let mut left = LeftOver {
                state,
                launched: m.provider_id.is_some(),
                alive: listed.get(&m.id).copied().unwrap_or(Liveness::Dead),
                running_build: running.iter().any(|b| b.machine == Some(m.id)),
                looked_up: false,
            };
            if recovery(left) == Recovery::LookUp {
                if let Some(found) = self.find_unnamed(&m).await? {
                    m.provider_id = Some(found.launched.provider_id.clone());
                    left.launched = true;
                    left.alive = if found.alive { Liveness::Alive } else { Liveness::Dead };
                }
                left.looked_up = true;
            }
            match recovery(left) {
                Recovery::AdoptBusy => match self.adoptable(&m, &running) {
                    Some(a) => keep.push(a),
                    None => self.stop_leftover(&m).await?,
                },
                Recovery::KeepBooting => self.keep_booting(&m).await?,
                Recovery::Resolve => self.resolve_launch(&m),
                // (`LookUp` comes only before the lookup above.)
                Recovery::Stop | Recovery::LookUp => self.stop_leftover(&m).await?,
            }
        }
        // Adopted machines' timers start now, after the leftovers were stopped, so a slow
        // stop does not eat into the time their agents have to reconnect.
        let now = self.shared.now();
        let mut adopted = HashSet::new();
        for mut a in keep {
            (a.applied, a.log_bytes) = store.report_position(a.build.id).await?;
            if self.adopt(&a, now) {
                adopted.insert(a.build.id);
            } else {
                self.stop_leftover(&a.machine).await?;
            }
        }
        for b in running.iter().filter(|b| !adopted.contains(&b.id)) {
            // The new attempt is queued with the other queued builds below.
            let lost = BuildEvent::Lost { reason: "its machine was lost while the master was down".into() };
            store.build_event(b.id, &lost, now).await?.ok();
        }
        for b in store.builds_in_state("queued").await? {
            if self.shared.config.builder(&b.builder).is_none() {
                let reason = format!("builder {} is no longer configured", b.builder);
                tracing::warn!(build = b.id.get(), %reason, "queued build abandoned");
                store.build_event(b.id, &BuildEvent::Abandon { reason }, now).await?.ok();
                continue;
            }
            self.queue(&b, false);
        }
        let config = self.shared.config.clone();
        for repo in &config.repos {
            for (branch, revision) in store.heads(&repo.name).await? {
                self.apply_sched(SchedEvent::Head { repo: repo.name.clone(), branch, revision }).await?;
            }
        }
        let replay = store.unscheduled_changes().await?;
        if let Some(oldest) = replay.iter().map(|c| c.created_at.as_str()).min() {
            self.already_requested = store.requested_changes(oldest).await?;
        }
        for c in replay {
            self.apply_sched(SchedEvent::Change(change_info(&c))).await?;
        }
        self.drain_pending().await?;
        Ok(())
    }

    /// Stops a machine of the previous run and records it gone when the stop is confirmed (its
    /// meter ends then). Even without a provider id the provisioner finds the machine by its
    /// id. If the stop fails, the row is left as it is: the next start tries again rather than
    /// forget it.
    pub(super) async fn stop_leftover(&mut self, m: &crate::store::MachineRow) -> Result<(), MasterError> {
        if let Some(p) = self.provisioners.get(&m.pool) {
            let pid = m.provider_id.as_deref().unwrap_or("");
            tracing::info!(machine = m.id.get(), provider_id = pid, "stopping machine left by the previous run");
            if let Err(e) = p.terminate(m.id.get(), pid).await {
                tracing::error!(machine = m.id.get(), "cannot stop leftover machine: {e}");
                return Ok(());
            }
        }
        self.shared.store.set_machine_state(m.id, "gone", self.shared.now()).await?;
        Ok(())
    }

    /// Keeps a machine of the previous run that was launched but whose agent had not connected
    /// yet: its agent says hello with its one-time token, within `boot_timeout` of its launch.
    pub(super) async fn keep_booting(&mut self, m: &crate::store::MachineRow) -> Result<(), MasterError> {
        let now = self.shared.now();
        let launched_at = m.launched_at.as_deref().and_then(crate::cost::parse_ts).unwrap_or(now);
        let builds_run = m.builds_run.max(0) as u32;
        let pid = m.provider_id.clone();
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Booting, None, builds_run, pid, launched_at);
        if self.fleet.machine_state(m.id) != Some(MachineState::Booting) {
            return self.stop_leftover(m).await;
        }
        if m.state != MachineState::Booting.as_str() {
            self.shared.store.set_machine_state(m.id, MachineState::Booting.as_str(), now).await?;
        }
        tracing::info!(
            machine = m.id.get(),
            "keeping a machine of the previous run that is still booting; waiting for its agent"
        );
        Ok(())
    }

    /// Takes in a machine of the previous run whose launch call was in flight when it died:
    /// the fleet counts it (launching) against the pool's limit while the provider is asked
    /// for it by its id, until the answer is final.
    pub(super) fn resolve_launch(&mut self, m: &crate::store::MachineRow) {
        let requested_at = crate::cost::parse_ts(&m.requested_at).unwrap_or_else(|| self.shared.now());
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Launching, None, 0, None, requested_at);
        tracing::info!(
            machine = m.id.get(),
            "the previous run died while launching this machine; asking the provider for it"
        );
        self.spawn_resolve(m.id, requested_at, "the master restarted during the launch".to_string());
    }

    /// Asks the provider for a machine whose launch outcome is unknown, until it is found or
    /// the provider's settle time since the request has passed; the answer comes back as an
    /// [`Input::Launched`]. Errors from the provider are retried: until it answers, the machine
    /// keeps counting against the pool's limit.
    pub(super) fn spawn_resolve(&mut self, machine: MachineId, requested_at: Ts, why: String) {
        let Some(p) = self.provisioner_of(machine) else {
            self.pending.push_back(FleetEvent::LaunchFailed { machine, reason: format!("no provisioner ({why})") });
            return;
        };
        let final_at = requested_at.plus(p.settle_time());
        let (inputs, clock) = (self.shared.master.clone(), self.shared.clock.clone());
        tokio::spawn(async move {
            let result = loop {
                match p.find(machine.get()).await {
                    Ok(Some(found)) if found.alive => break LaunchOutcome::Up(found.launched),
                    Ok(Some(found)) => break LaunchOutcome::Ran(found.launched),
                    Ok(None) if clock.now() >= final_at => {
                        break LaunchOutcome::Failed(format!("{why}; no machine was started (none found by its id)"))
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(machine = machine.get(), "cannot look the machine up yet; trying again: {e}")
                    }
                }
                tokio::time::sleep(RESOLVE_POLL).await;
            };
            inputs.send(Input::Launched { machine, result }).await;
        });
    }

    /// What the providers say of the previous run's launched machines: one listing per pool
    /// (not one per machine), tried a few times, since a machine wrongly thought dead is
    /// stopped. A machine missing from the answer is dead.
    pub(super) async fn alive_machines(&self, live: &[crate::store::MachineRow]) -> HashMap<MachineId, Liveness> {
        let mut alive = HashMap::new();
        for (pool, p) in &self.provisioners {
            let known: Vec<(i64, String)> = live
                .iter()
                .filter(|m| &m.pool == pool)
                .filter_map(|m| m.provider_id.clone().map(|pid| (m.id.get(), pid)))
                .collect();
            if known.is_empty() {
                continue;
            }
            let mut listed_ok = false;
            for attempt in 1..=3u32 {
                match p.list(&known).await {
                    Ok(listed) => {
                        let up = listed.iter().filter(|l| l.alive).filter_map(|l| l.machine_id).map(MachineId);
                        alive.extend(up.map(|m| (m, Liveness::Alive)));
                        listed_ok = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%pool, attempt, "cannot list the previous run's machines: {e}");
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    }
                }
            }
            if !listed_ok {
                tracing::warn!(%pool, "the provider did not answer: the previous run's machines are taken as alive until their agents say otherwise");
                alive.extend(known.iter().map(|(m, _)| (MachineId(*m), Liveness::Unknown)));
            }
        }
        alive
    }

    /// Looks up, by its id, a machine of the previous run that no launch answer named, and
    /// records what the provider says of it (its id, its launch time) before anything is
    /// decided about it. `None` when the provider does not know it (after a few tries).
    pub(super) async fn find_unnamed(
        &self,
        m: &crate::store::MachineRow,
    ) -> Result<Option<paddock_provisioners::Found>, MasterError> {
        let Some(p) = self.provisioners.get(&m.pool).cloned() else { return Ok(None) };
        for attempt in 1..=3u32 {
            match p.find(m.id.get()).await {
                Ok(Some(found)) => {
                    let now = self.shared.now();
                    let requested_at = crate::cost::parse_ts(&m.requested_at);
                    self.record_launch(m.id, &m.pool, &found.launched, requested_at, now).await?;
                    tracing::info!(machine = m.id.get(), instance = %found.launched.provider_id, "found a machine of the previous run that no launch answer named");
                    return Ok(Some(found));
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::warn!(machine = m.id.get(), attempt, "cannot look up a machine of the previous run: {e}");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        }
        Ok(None)
    }

    /// A busy machine of the previous run that can be taken back (see [`recovery`]): its build,
    /// still running in the store, is still buildable.
    pub(super) fn adoptable(&self, m: &crate::store::MachineRow, running: &[BuildRow]) -> Option<Adoption> {
        let build = running.iter().find(|b| b.machine == Some(m.id))?;
        let pid = m.provider_id.clone()?;
        let job = job::assemble(&self.shared.config, &self.shared.secrets, build).ok()?;
        Some(Adoption {
            machine: m.clone(),
            build: build.clone(),
            pid,
            secrets: job.secrets.into_iter().collect(),
            applied: 0,
            log_bytes: 0,
        })
    }

    /// Takes back an adoptable machine: the fleet counts it busy with its build, and the agent,
    /// which keeps the build going while the master is away, reconnects with its resume token.
    /// If it does not within the heartbeat limit, the fleet declares it lost and the build is
    /// retried.
    pub(super) fn adopt(&mut self, a: &Adoption, now: Ts) -> bool {
        let m = &a.machine;
        // The store counted the running build when it started; the fleet counts it when it ends.
        let builds_run = (m.builds_run - 1).max(0) as u32;
        let pid = Some(a.pid.clone());
        self.fleet.restore_machine(m.id, &m.pool, MachineState::Busy, Some(a.build.id), builds_run, pid, now);
        if self.fleet.machine_build(m.id) != Some(a.build.id) {
            tracing::error!(machine = m.id.get(), build = a.build.id.get(), "the fleet refused to adopt the machine");
            return false;
        }
        self.shared.running.start(a.build.id, m.id, &a.secrets, a.applied, a.log_bytes);
        tracing::info!(
            machine = m.id.get(),
            build = a.build.id.get(),
            "adopting a machine still running a build; waiting for its agent"
        );
        true
    }
}
