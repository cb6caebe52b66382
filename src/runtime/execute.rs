//! Carrying out the fleet's actions: persist the intent, then call the provisioner or the
//! agent, and feed the outcome back as an event.

use super::*;
use crate::core::build::{BuildEvent, BuildState};

impl Master {
    pub(super) async fn execute_all(&mut self, actions: Vec<FleetAction>, now: Ts) -> Result<(), MasterError> {
        for action in actions {
            self.execute(action, now).await?;
        }
        Ok(())
    }

    /// The provisioner of a machine's pool (while the fleet knows the machine).
    pub(super) fn provisioner_of(&self, machine: MachineId) -> Option<Arc<dyn Provisioner>> {
        self.fleet.machine_pool(machine).and_then(|pool| self.provisioners.get(pool)).cloned()
    }

    pub(super) async fn execute(&mut self, action: FleetAction, now: Ts) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        match action {
            FleetAction::SetState { machine, state } => {
                // The row is created by `Launch`, which follows.
                if state != MachineState::Requested {
                    store.set_machine_state(machine, state.as_str(), now).await?;
                }
                if state == MachineState::Gone {
                    self.agents.remove(&machine);
                    self.connecting.remove(&machine);
                }
            }
            FleetAction::Launch { machine, pool } => {
                let Some(provisioner) = self.provisioners.get(&pool).cloned() else {
                    self.pending.push_back(FleetEvent::LaunchFailed {
                        machine,
                        reason: format!("no provisioner for pool {pool}"),
                    });
                    return Ok(());
                };
                let token = new_token();
                // Intent first: the row (with the token's hash) exists before the process does.
                let kind = match self.shared.config.pool(&pool).map(|p| &p.provisioner) {
                    Some(ProvisionerKind::Ec2(_)) => "ec2",
                    _ => "local",
                };
                store.insert_machine(machine, &pool, kind, &hash_token(&token), now).await?;
                let spec = LaunchSpec { machine_id: machine.get(), pool, master_url: self.shared.url.clone(), token };
                let inputs = self.shared.master.clone();
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(LAUNCH_TIMEOUT, provisioner.launch(spec)).await {
                        Ok(Ok(l)) => LaunchOutcome::Up(l),
                        Ok(Err(e @ paddock_provisioners::ProvisionError::Unknown(_))) => {
                            LaunchOutcome::Unknown(e.to_string())
                        }
                        Ok(Err(e)) => LaunchOutcome::Failed(e.to_string()),
                        Err(_) => {
                            LaunchOutcome::Unknown(format!("the provisioner did not answer within {LAUNCH_TIMEOUT:?}"))
                        }
                    };
                    inputs.send(Input::Launched { machine, result }).await;
                });
            }
            FleetAction::Assign { machine, build } => self.assign(machine, build, now).await?,
            FleetAction::Terminate { machine, provider_id, reason } => {
                tracing::info!(machine = machine.get(), %reason, "stopping machine");
                store.machine_event(machine, "stop_requested", &reason, now).await?;
                self.terminate(machine, provider_id.unwrap_or_default());
            }
            FleetAction::Resolve { machine, requested_at } => {
                self.spawn_resolve(machine, requested_at, "the launch's outcome was unknown".to_string())
            }
            FleetAction::Accept { machine, build } => {
                if let Some(agent) = self.connecting.remove(&machine) {
                    self.agents.insert(machine, agent);
                }
                if let Some(b) = build {
                    tracing::info!(machine = machine.get(), build = b.get(), "agent reconnected; its build carries on");
                    // A cancel sent while the connection was dying may never have arrived.
                    let row = store.build(b).await?;
                    if row
                        .is_some_and(|r| r.state == crate::core::build::BuildState::Running && r.cancelled_by.is_some())
                    {
                        if let Some((_, tx)) = self.agents.get(&machine) {
                            let _ = tx.send(MasterMsg::Cancel { build: b });
                        }
                    }
                }
            }
            FleetAction::Refuse { machine, reason } => {
                if let Some((_, tx)) = self.connecting.remove(&machine) {
                    tracing::warn!(machine = machine.get(), %reason, "agent connection refused; telling it to stop");
                    let _ = tx.send(MasterMsg::Shutdown);
                }
            }
            FleetAction::Retry { build, reason } => {
                // The fleet has freed the machine already; an attempt that had ended is left be.
                if let Err(why) = self.build_event(build, BuildEvent::Lost { reason }).await? {
                    tracing::debug!(build = build.get(), "no retry: {why}");
                }
            }
        }
        Ok(())
    }

    pub(super) fn terminate(&mut self, machine: MachineId, provider_id: String) {
        if let Some((_, tx)) = self.agents.remove(&machine) {
            let _ = tx.send(MasterMsg::Shutdown);
        }
        let Some(provisioner) = self.provisioner_of(machine) else {
            self.pending.push_back(FleetEvent::MachineGone { machine });
            return;
        };
        let inputs = self.shared.master.clone();
        tokio::spawn(async move {
            // The machine is gone only once the provisioner says so; until then it stays
            // `stopping` (and counts against the pool's limit), and the stop is retried.
            let mut delay = Duration::from_secs(1);
            while let Err(e) = provisioner.terminate(machine.get(), &provider_id).await {
                tracing::error!(machine = machine.get(), retry_in = ?delay, "terminate failed: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            inputs.send(Input::Terminated { machine }).await;
        });
    }

    pub(super) async fn assign(&mut self, machine: MachineId, build: BuildId, now: Ts) -> Result<(), MasterError> {
        let store = self.shared.store.clone();
        let Some(row) = store.build(build).await? else {
            self.pending.push_back(FleetEvent::AssignRefused { machine, build });
            return Ok(());
        };
        let Some((_, tx)) = self.agents.get(&machine).cloned() else {
            // The agent vanished between connecting and now: the fleet retries the build.
            let reason = "its agent's connection is gone".to_string();
            self.pending.push_back(FleetEvent::AgentLost { machine, reason });
            return Ok(());
        };
        let job = match job::assemble(&self.shared.config, &self.shared.secrets, &row) {
            Ok(job) => job,
            Err(message) => {
                tracing::warn!(build = build.get(), %message, "build cannot start");
                if store.start_build(build, machine, &["setup".to_string()], now).await? {
                    store.append_log(build, 0, &format!("paddock: {message}\n"), now).await?;
                    store.step_finished(build, 0, "exception", None, now).await?;
                    let ended = BuildEvent::Reported { machine, result: BuildState::Exception };
                    if self.build_event(build, ended).await?.is_ok() {
                        return Ok(());
                    }
                }
                self.pending.push_back(FleetEvent::BuildFinished { machine, build });
                return Ok(());
            }
        };
        let mut names = vec!["checkout".to_string()];
        names.extend(job.steps.iter().map(|s| s.name.clone()));
        if !store.start_build(build, machine, &names, now).await? {
            // Cancelled or already taken: give the machine back.
            self.pending.push_back(FleetEvent::AssignRefused { machine, build });
            return Ok(());
        }
        let secrets: Vec<(String, String)> = job.secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.shared.running.start(build, machine, &secrets, 0, 0);
        tracing::info!(build = build.get(), machine = machine.get(), builder = %row.builder, "build started");
        if tx.send(MasterMsg::Run(Box::new(job))).is_err() {
            let reason = "its agent's connection closed as the build was sent".to_string();
            self.pending.push_back(FleetEvent::AgentLost { machine, reason });
        }
        Ok(())
    }
}
