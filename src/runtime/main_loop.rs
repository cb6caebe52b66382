//! The loop: it sleeps until the core's next deadline or an input, turns every input into a
//! core event, and runs the periodic work (reconcile listings, spend checks).

use super::*;

impl Master {
    pub(super) async fn run_loop(
        &mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), MasterError> {
        let jumps = self.shared.clock.jumps();
        let mut reconcile = tokio::time::interval(self.shared.config.master.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut spend_check = tokio::time::interval(SPEND_CHECK);
        spend_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let capped = crate::cost::caps::any(&self.shared.config);
        let mut shutdown = Box::pin(shutdown);
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // The first look: what the pools want with nothing yet asked of them (min_idle).
        self.pending.push_back(FleetEvent::Tick);
        self.drain_pending().await?;
        loop {
            let wake = self.next_wake(drain_deadline.is_some());
            let jumped = async {
                match &jumps {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown, if drain_deadline.is_none() => {
                    tracing::info!(grace = ?self.shared.config.master.shutdown_grace, "shutting down: no new builds, waiting for running ones");
                    self.shared.draining.store(true, Ordering::SeqCst);
                    drain_deadline = Some(tokio::time::Instant::now() + self.shared.config.master.shutdown_grace);
                    self.pending.push_back(FleetEvent::Drain);
                }
                input = self.rx.recv() => match input {
                    Some(input) => {
                        if let Err(e) = self.on_input(input).await {
                            tracing::error!("cannot handle an event (it will be repaired at the next start): {e}");
                        }
                    }
                    None => break,
                },
                _ = reconcile.tick(), if drain_deadline.is_none() => self.start_listings(),
                _ = spend_check.tick(), if capped && drain_deadline.is_none() => self.start_spend_check(),
                () = jumped => self.pending.push_back(FleetEvent::Tick),
                () = tokio::time::sleep(wake) => {
                    self.pending.push_back(FleetEvent::Tick);
                    if let Err(e) = self.apply_sched(SchedEvent::Tick).await {
                        tracing::error!("scheduler tick failed: {e}");
                    }
                    if let Some(deadline) = drain_deadline {
                        let running = self.shared.store.builds_in_state("running").await.map(|r| r.len()).unwrap_or(1);
                        if running == 0 || tokio::time::Instant::now() >= deadline {
                            if let Err(e) = self.drain_pending().await {
                                tracing::error!("cannot handle an event during shutdown: {e}");
                            }
                            break;
                        }
                    }
                }
            }
            // A store error in one event must not take the master (and its machines' stops)
            // down with it: what was not written is repaired from the store at the next start.
            if let Err(e) = self.drain_pending().await {
                tracing::error!("cannot handle a fleet event (it will be repaired at the next start): {e}");
            }
        }
        // Builds that ended while the loop was stopping: their reports are stored, not left
        // in the inbox for the next start to retry builds that finished.
        while let Ok(input) = self.rx.try_recv() {
            if matches!(input, Input::Finished { .. }) {
                if let Err(e) = self.on_input(input).await {
                    tracing::error!("cannot store a build's end during shutdown: {e}");
                }
            }
        }
        self.stop_everything().await
    }

    /// How long the loop may sleep: until the fleet's or the schedulers' next deadline (a
    /// clock that jumps wakes it earlier), at most [`MAX_SLEEP`], and briefly while draining
    /// (it watches the running builds end).
    pub(super) fn next_wake(&self, draining: bool) -> Duration {
        let now = self.shared.now();
        let next = match (self.fleet.next_deadline(), self.sched.next_wakeup()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // One millisecond past the deadline: a timer never fires before its time is due.
        let wake = next.map_or(MAX_SLEEP, |t| t.since(now) + Duration::from_millis(1)).min(MAX_SLEEP);
        if draining {
            wake.min(DRAIN_POLL)
        } else {
            wake
        }
    }

    /// After the grace period: builds still running are retried by the next start; every
    /// machine is stopped.
    pub(super) async fn stop_everything(&mut self) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        let now = self.shared.now();
        for b in store.builds_in_state("running").await? {
            tracing::warn!(build = b.id.get(), "build still running at shutdown; it will be retried on the next start");
            // Stored only: the new attempt is queued by the next start, not launched for now.
            let lost = crate::core::build::BuildEvent::Lost { reason: "master shut down while it ran".into() };
            store.build_event(b.id, &lost, now).await?.ok();
        }
        for (_, tx) in self.agents.values() {
            let _ = tx.send(MasterMsg::Shutdown);
        }
        let mut stops = Vec::new();
        for m in store.live_machines().await? {
            let p = self.provisioners.get(&m.pool).cloned();
            let store = store.clone();
            let clock = self.shared.clock.clone();
            stops.push(tokio::spawn(async move {
                if let Some(p) = p {
                    if let Err(e) = p.terminate(m.id.get(), m.provider_id.as_deref().unwrap_or("")).await {
                        tracing::error!(machine = m.id.get(), "cannot stop machine; the next start tries again: {e}");
                        return;
                    }
                }
                if let Err(e) = store.set_machine_state(m.id, "gone", clock.now()).await {
                    tracing::warn!(machine = m.id.get(), "cannot record machine as gone: {e}");
                }
            }));
        }
        for s in stops {
            let _ = s.await;
        }
        Ok(())
    }

    pub(super) async fn on_input(&mut self, input: Input) -> Result<(), MasterError> {
        match input {
            Input::Fleet(ev) => self.pending.push_back(ev),
            Input::Sched(ev) => self.apply_sched(ev).await?,
            Input::Finished { machine, build, after, reports, reply } => {
                let now = self.shared.now();
                let result = match reports.last().map(|r| r.effect) {
                    Some(crate::store::ReportEffect::BuildFinished { result, .. }) => result,
                    _ => {
                        tracing::error!(build = build.get(), "reports of a build's end without its end; not stored");
                        return Ok(());
                    }
                };
                let stored = self.shared.store.apply_reports(build, after, &reports, now).await;
                if let Ok(crate::store::Applied::Stored { ended }) = &stored {
                    self.shared.running.end(build);
                    match ended {
                        Some(t) => {
                            tracing::info!(build = build.get(), machine = machine.get(), reported = %result, result = %t.to, "build finished");
                            self.follow_up(build, t, None);
                        }
                        // An attempt that had ended (retried, cancelled here): the fleet frees
                        // the machine if it still holds it for that build.
                        None => self.pending.push_back(FleetEvent::BuildFinished { machine, build }),
                    }
                }
                let _ = reply.send(stored);
            }
            Input::Interrupted { machine, detail, reply } => {
                self.interrupted(machine, &detail).await?;
                let _ = reply.send(());
            }
            Input::Request { request, reply } => {
                let answer = self.request(request).await;
                let _ = reply.send(answer);
            }
            Input::Cancel { build, by, reply } => {
                let answer = self.cancel(build, &by).await;
                let _ = reply.send(answer);
            }
            Input::StopMachine { machine, by, reply } => {
                let now = self.shared.now();
                let answer = match self.fleet.stop_machine(machine, &format!("terminated by {by}"), now) {
                    Err(e @ StopRefused::NotRunning) => Err(ActionError::NotFound(format!("machine {machine}: {e}"))),
                    Err(e @ StopRefused::Already(_)) => Err(ActionError::Conflict(format!("machine {machine}: {e}"))),
                    Ok(actions) => {
                        tracing::info!(machine = machine.get(), %by, "admin asked to stop the machine");
                        self.execute_all(actions, now).await?;
                        Ok(())
                    }
                };
                let _ = reply.send(answer);
            }
            Input::Pause { pool, paused, by, reply } => {
                let store = &self.shared.store;
                let recorded = match paused {
                    true => store.pause_pool(&pool, &by, self.shared.now()).await,
                    false => store.resume_pool(&pool).await,
                };
                let answer = match recorded {
                    Ok(()) => {
                        tracing::info!(pool, paused, %by, "pool {}", if paused { "paused" } else { "resumed" });
                        self.pending.push_back(FleetEvent::Pause { pool, paused });
                        Ok(())
                    }
                    Err(e) => Err(ActionError::Store(e)),
                };
                let _ = reply.send(answer);
            }
            Input::AgentConnected { machine, conn, tx, resumed } => {
                // The fleet accepts or refuses it (see `FleetAction::Accept`/`Refuse`).
                self.connecting.insert(machine, (conn, tx));
                self.pending.push_back(FleetEvent::AgentConnected { machine, resumed });
            }
            Input::AgentClosed { machine, conn } => {
                let ours = |m: &HashMap<MachineId, (u64, _)>| m.get(&machine).is_some_and(|(c, _)| *c == conn);
                if ours(&self.agents) || ours(&self.connecting) {
                    self.agents.remove(&machine);
                    self.connecting.remove(&machine);
                    tracing::info!(machine = machine.get(), "agent disconnected");
                    self.pending.push_back(FleetEvent::AgentDisconnected { machine });
                }
            }
            Input::Launched { machine, result } => {
                let now = self.shared.now();
                let view = self.fleet.machine_view(machine);
                let requested_at = view.as_ref().map(|v| v.requested_at);
                let pool = view.map(|v| v.pool.to_string()).unwrap_or_default();
                match result {
                    LaunchOutcome::Up(launched) => {
                        self.record_launch(machine, &pool, &launched, requested_at, now).await?;
                        let provider_id = launched.provider_id;
                        self.pending.push_back(FleetEvent::LaunchSucceeded { machine, provider_id });
                    }
                    LaunchOutcome::Ran(launched) => {
                        // It ran while nobody watched and has stopped since: billed from the
                        // provider's launch time to now, then gone.
                        tracing::warn!(machine = machine.get(), %pool, instance = %launched.provider_id, "the machine ran but had already stopped when found");
                        self.record_launch(machine, &pool, &launched, requested_at, now).await?;
                        let reason = "its instance had already stopped when found".to_string();
                        self.pending.push_back(FleetEvent::LaunchFailed { machine, reason });
                    }
                    LaunchOutcome::Unknown(reason) => {
                        tracing::warn!(machine = machine.get(), %pool, %reason, "launch outcome unknown; looking the machine up");
                        self.shared.store.machine_event(machine, "launch_unknown", &reason, now).await?;
                        self.pending.push_back(FleetEvent::LaunchUnknown { machine, reason });
                    }
                    LaunchOutcome::Failed(reason) => {
                        tracing::warn!(machine = machine.get(), %pool, %reason, "launch failed");
                        // The fleet first (the machine is gone), then the reason: a machine's
                        // last event is what the API shows as why its build still waits.
                        self.pending.push_back(FleetEvent::LaunchFailed { machine, reason: reason.clone() });
                        self.drain_pending().await?;
                        self.shared.store.machine_event(machine, "launch_failed", &reason, now).await?;
                    }
                }
            }
            Input::LateInstance { machine, launched, stopped_at } => {
                let Some(row) = self.shared.store.machine(machine).await? else { return Ok(()) };
                let price = match self.shared.config.pool(&row.pool) {
                    Some(p) => crate::cost::price_machine(p, &launched, crate::cost::prices::PriceTable::builtin()),
                    None => crate::store::MachinePrice::default(),
                };
                let requested_at = crate::cost::parse_ts(&row.requested_at).unwrap_or(stopped_at);
                let started = Ts(launched.launched_at.unwrap_or(stopped_at.0).clamp(requested_at.0, stopped_at.0));
                let recorded = self.shared.store.late_life(machine, &launched, &price, started, stopped_at).await?;
                if !recorded {
                    tracing::warn!(machine = machine.get(), instance = %launched.provider_id, "a second instance ran for this machine; the cost report does not show it");
                }
            }
            Input::Terminated { machine } => self.pending.push_back(FleetEvent::MachineGone { machine }),
            Input::SpendChecked(result) => {
                self.spend_checking = false;
                match result {
                    Ok(caps) => self.apply_caps(caps),
                    Err(e) => tracing::error!("cannot check spend caps; holds stay as they were: {e}"),
                }
            }
            Input::Listing { scope, listed_at, result } => {
                self.listing.remove(&scope);
                match result {
                    Ok(listing) => self.judge(&scope, &listing, listed_at).await?,
                    Err(e) => tracing::warn!(%scope, "reconcile: cannot list machines; trying again next round: {e}"),
                }
            }
        }
        Ok(())
    }

    /// An agent says its machine is being taken away: its build is retried elsewhere and the
    /// machine is given up. A notice for a machine the fleet has already given up (a
    /// reconnection that raced the fleet repeats it) is old news.
    pub(super) async fn interrupted(&mut self, machine: MachineId, detail: &str) -> Result<(), MasterError> {
        let state = self.fleet.machine_view(machine).map(|v| v.state);
        let live = state.is_some_and(|s| {
            !matches!(s, MachineState::Stopping | MachineState::Gone | MachineState::Lost | MachineState::Interrupted)
        });
        if !live {
            tracing::debug!(machine = machine.get(), %detail, ?state, "interruption notice for a machine already given up ignored");
            return Ok(());
        }
        tracing::warn!(machine = machine.get(), %detail, "machine is being interrupted; requeueing its build, if any");
        // From here its build belongs to the retry: what the agent still says about it (a step
        // killed by the shutdown, a BuildFinished) must not end it as that step's failure.
        self.shared.running.forget_machine(machine);
        // Acting on it matters more than recording it once.
        if let Err(e) = self.shared.store.machine_event(machine, "interrupted", detail, self.shared.now()).await {
            tracing::error!(machine = machine.get(), "cannot record the interruption: {e}");
        }
        self.pending.push_back(FleetEvent::Interrupted { machine });
        Ok(())
    }

    /// Records a machine's launch with its price. Its meter starts when the provider says the
    /// machine started (never before it was asked for, never after now), so a machine the
    /// master learns of late is billed for all the time it ran.
    pub(super) async fn record_launch(
        &self,
        machine: MachineId,
        pool: &str,
        launched: &Launched,
        requested_at: Option<Ts>,
        now: Ts,
    ) -> Result<(), MasterError> {
        let price = match self.shared.config.pool(pool) {
            Some(p) => crate::cost::price_machine(p, launched, crate::cost::prices::PriceTable::builtin()),
            None => crate::store::MachinePrice::default(),
        };
        let at = match launched.launched_at {
            Some(t) => Ts(t.clamp(requested_at.unwrap_or(Ts(t)).0, now.0)),
            None => now,
        };
        let store = &self.shared.store;
        store
            .machine_launched(
                machine,
                &launched.provider_id,
                launched.instance_type.as_deref(),
                &launched.lifecycle,
                &price,
                at,
            )
            .await?;
        Ok(())
    }

    /// The pools of each scope: pools sharing a region and cluster share one listing.
    pub(super) fn scopes(&self) -> HashMap<String, Vec<String>> {
        let mut scopes: HashMap<String, Vec<String>> = HashMap::new();
        for (pool, p) in &self.provisioners {
            let scope = p.scope();
            let scope = if scope.is_empty() { format!("pool:{pool}") } else { scope };
            scopes.entry(scope).or_default().push(pool.clone());
        }
        scopes
    }

    /// Acts on a spend check: pools that reached a cap stop launching (their machines keep
    /// working), pools below again launch. A warning is logged once per crossing.
    pub(super) fn apply_caps(&mut self, state: crate::cost::caps::Caps) {
        for (cap, why) in &state.reached {
            if !self.caps_reached.contains(cap) {
                tracing::warn!("{why}; queued builds wait, running builds finish");
            }
        }
        for cap in self.caps_reached.iter().filter(|c| !state.reached.contains_key(*c)) {
            tracing::info!("{cap} spend cap no longer reached");
        }
        self.caps_reached = state.reached.keys().cloned().collect();
        let before = match self.shared.spend_holds.lock() {
            Ok(mut h) => std::mem::replace(&mut *h, state.holds.clone().into_iter().collect()),
            Err(_) => return,
        };
        for pool in self.shared.config.pools.iter().map(|p| &p.name) {
            match (before.contains_key(pool), state.holds.contains_key(pool)) {
                (false, true) => self.pending.push_back(FleetEvent::LaunchHold { pool: pool.clone(), held: true }),
                (true, false) => {
                    tracing::info!(%pool, "spend is below the caps again; launching resumes");
                    self.pending.push_back(FleetEvent::LaunchHold { pool: pool.clone(), held: false });
                }
                _ => {}
            }
        }
    }

    /// Checks spend off the loop (a day of machines is read): the answer comes back as
    /// [`Input::SpendChecked`].
    pub(super) fn start_spend_check(&mut self) {
        if self.spend_checking {
            return;
        }
        self.spend_checking = true;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let result = spend_caps(&shared).await.map_err(|e| e.to_string());
            shared.master.send(Input::SpendChecked(result)).await;
        });
    }

    /// Starts one listing per scope (level-triggered reconcile): the cloud's inventory where
    /// the provisioner has one, else a liveness check of the machines this master knows.
    pub(super) fn start_listings(&mut self) {
        for (scope, pools) in self.scopes() {
            if !self.listing.insert(scope.clone()) {
                continue;
            }
            let Some(p) = pools.first().and_then(|pool| self.provisioners.get(pool)).cloned() else { continue };
            // The provisioner speaks plain integers: it is an adapter and knows no core types.
            let known: Vec<(i64, String)> = self
                .fleet
                .machine_views()
                .filter(|(_, v)| pools.iter().any(|p| p == v.pool))
                .filter_map(|(m, v)| v.provider_id.map(|pid| (m.get(), pid.to_string())))
                .collect();
            let inputs = self.shared.master.clone();
            let listed_at = self.shared.now();
            tokio::spawn(async move {
                let result = match p.inventory().await {
                    Ok(Some(all)) => Ok(all),
                    Ok(None) => p.list(&known).await,
                    Err(e) => Err(e),
                };
                let result = result
                    .map(|l| {
                        l.into_iter()
                            .map(|x| Listed {
                                provider_id: x.provider_id,
                                machine: x.machine_id.map(MachineId),
                                alive: x.alive,
                            })
                            .collect()
                    })
                    .map_err(|e| e.to_string());
                inputs.send(Input::Listing { scope, listed_at, result }).await;
            });
        }
    }

    /// Acts on one listing: orphans are terminated, vanished machines are gone (their builds
    /// retried).
    pub(super) async fn judge(&mut self, scope: &str, listing: &[Listed], listed_at: Ts) -> Result<(), MasterError> {
        let Some(pools) = self.scopes().remove(scope) else { return Ok(()) };
        // Live machines of other scopes: a listing by tag may include them (same region and
        // cluster through another endpoint); they are owned, never orphans.
        let ours = |pool: &str| pools.iter().any(|p| p == pool);
        let elsewhere: HashSet<MachineId> =
            self.fleet.machine_views().filter(|(_, v)| !ours(v.pool)).map(|(m, _)| m).collect();
        let believed: Vec<Believed> = self
            .fleet
            .machine_views()
            .filter(|(_, v)| ours(v.pool))
            .map(|(m, v)| Believed {
                machine: m,
                provider_id: v.provider_id.map(str::to_string),
                launched_at: v.answered_at,
            })
            .collect();
        // Tagged instances of machines the store has as gone: launches served too late.
        let strangers: Vec<MachineId> = listing
            .iter()
            .filter(|l| l.alive)
            .filter_map(|l| l.machine)
            .filter(|m| !elsewhere.contains(m) && !believed.iter().any(|b| b.machine == *m))
            .collect();
        let over = self.shared.store.gone_machines(&strangers).await?;
        let now = self.shared.now();
        let grace = self.shared.config.master.orphan_grace;
        let verdicts = self
            .reconcilers
            .entry(scope.to_string())
            .or_insert_with(|| Reconciler::new(grace))
            .judge(listing, &believed, &elsewhere, &over, listed_at, now);
        for v in verdicts {
            let (provider_id, machine, late) = match v {
                Verdict::Late { provider_id, machine } => {
                    tracing::warn!(%provider_id, machine = machine.get(), "reconcile: terminating the late instance of a machine already stopped");
                    (provider_id, Some(machine), Some(machine))
                }
                Verdict::Orphan { provider_id, machine } => {
                    tracing::warn!(%provider_id, machine = ?machine.map(MachineId::get), "reconcile: terminating an orphan (tagged as ours, owned by no machine)");
                    (provider_id, machine, None)
                }
                Verdict::Vanished { machine, provider_id } => {
                    let actions = self.fleet.handle(FleetEvent::Vanished { machine }, now);
                    if !actions.is_empty() {
                        tracing::warn!(machine = machine.get(), %provider_id, "reconcile: machine is gone from the cloud; its build (if any) is retried");
                        let detail = format!("{provider_id} no longer running");
                        self.shared.store.machine_event(machine, "vanished", &detail, now).await?;
                    }
                    self.execute_all(actions, now).await?;
                    continue;
                }
            };
            let Some(p) = pools.first().and_then(|pool| self.provisioners.get(pool)).cloned() else { continue };
            let (inputs, clock) = (self.shared.master.clone(), self.shared.clock.clone());
            tokio::spawn(async move {
                // A late instance ran for its machine: what it was and when it started,
                // so the cost report has it.
                let found = match late {
                    Some(m) => p.find(m.get()).await.ok().flatten(),
                    None => None,
                };
                if let Err(e) = p.terminate(machine.map_or(0, MachineId::get), &provider_id).await {
                    tracing::error!(%provider_id, "reconcile: cannot terminate orphan; next round tries again: {e}");
                    return;
                }
                if let (Some(machine), Some(found)) = (late, found) {
                    let stopped_at = clock.now();
                    inputs.send(Input::LateInstance { machine, launched: found.launched, stopped_at }).await;
                }
            });
        }
        Ok(())
    }

    pub(super) async fn apply_sched(&mut self, ev: SchedEvent) -> Result<(), MasterError> {
        let now = self.shared.now();
        for action in self.sched.handle(ev, now) {
            match action {
                SchedAction::Request(req)
                    if !req.changes.is_empty()
                        && req
                            .changes
                            .iter()
                            .all(|c| self.already_requested.contains(&(req.scheduler.clone(), *c))) =>
                {
                    tracing::info!(scheduler = %req.scheduler, changes = ?req.changes, "replayed changes were already requested before the restart");
                }
                SchedAction::Request(req) => {
                    if self.shared.draining.load(Ordering::SeqCst) {
                        // Still stored: the next start runs it.
                        tracing::info!(reason = %req.reason, "request stored during shutdown");
                    }
                    for builder in &req.builders {
                        let b = self
                            .shared
                            .store
                            .create_request(
                                builder,
                                &req.repo,
                                &req.branch,
                                &req.revision,
                                &req.scheduler,
                                &req.reason,
                                &req.changes,
                                now,
                            )
                            .await?;
                        tracing::info!(build = b.id.get(), builder = %b.builder, branch = %b.branch, revision = %b.revision, reason = %req.reason, "build queued");
                        self.queue(&b, false);
                    }
                }
                SchedAction::ChangesDone(ids) => self.shared.store.mark_scheduled(&ids).await?,
                SchedAction::NightlyState { scheduler, last_fire, built } => {
                    self.shared.store.save_nightly(&scheduler, last_fire, &built).await?
                }
            }
        }
        Ok(())
    }

    pub(super) async fn drain_pending(&mut self) -> Result<(), MasterError> {
        while let Some(ev) = self.pending.pop_front() {
            let now = self.shared.now();
            let actions = self.fleet.handle(ev, now);
            self.execute_all(actions, now).await?;
        }
        Ok(())
    }
}
