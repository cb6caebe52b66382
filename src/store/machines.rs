//! Machines: their rows, lifecycle events, tokens and what the pools hold.

use super::*;

impl Store {
    /// The largest machine id ever used (ids are never reused: they are idempotency tokens).
    pub async fn max_machine_id(&self) -> Result<MachineId> {
        let id: Option<MachineId> = self.read(|c| one(c, "SELECT MAX(id) FROM machines", params![], |r| r.get(0)))?;
        Ok(id.unwrap_or_default())
    }

    /// Writes a machine's row in `requested` state, before anything is launched.
    pub async fn insert_machine(
        &self,
        id: MachineId,
        pool: &str,
        provisioner: &str,
        token_hash: &str,
        now: Ts,
    ) -> Result<()> {
        let now_s = ts_string(now);
        self.write(|c| {
            exec(
                c,
                "INSERT INTO machines (id, pool, provisioner, state, token_hash, requested_at) VALUES (?, ?, ?, 'requested', ?, ?)",
                params![id, pool, provisioner, token_hash, &now_s],
            )?;
            insert_event(c, id, &now_s, "requested", "")
        })
    }

    /// Records what the provisioner said about a launched machine and what it costs; its
    /// `launched` event starts the meter.
    pub async fn machine_launched(
        &self,
        id: MachineId,
        provider_id: &str,
        instance_type: Option<&str>,
        lifecycle: &str,
        price: &MachinePrice,
        now: Ts,
    ) -> Result<()> {
        let now_s = ts_string(now);
        self.write(|c| {
            exec(
                c,
                "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
                 hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ? WHERE id = ?",
                params![
                    provider_id,
                    instance_type,
                    lifecycle,
                    &now_s,
                    price.zone,
                    price.hourly_price,
                    price.price_source,
                    price.volume_gb.map(i64::from),
                    price.volume_type,
                    price.volume_hourly,
                    id
                ],
            )?;
            insert_event(c, id, &now_s, "launched", provider_id)
        })
    }

    /// Of these machines, those the store has as gone, each with the instance it recorded.
    pub async fn gone_machines(
        &self,
        ids: &[MachineId],
    ) -> Result<std::collections::HashMap<MachineId, Option<String>>> {
        self.read(|c| {
            let mut gone = std::collections::HashMap::new();
            for id in ids {
                let row: Option<(MachineId, Option<String>)> =
                    opt(c, "SELECT id, provider_id FROM machines WHERE id = ? AND state = 'gone'", params![id], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                gone.extend(row);
            }
            Ok(gone)
        })
    }

    /// One machine's row.
    pub async fn machine(&self, id: MachineId) -> Result<Option<MachineRow>> {
        self.read(|c| opt(c, &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?"), params![id], machine_row))
    }

    /// Records the life of an instance the master learned of only after its machine was gone
    /// (a launch the cloud served too late): billed from `launched_at` to `gone_at`. Only for
    /// a machine that never recorded a launch (one intent, one instance); `false` otherwise.
    pub async fn late_life(
        &self,
        id: MachineId,
        launched: &paddock_provisioners::Launched,
        price: &MachinePrice,
        launched_at: Ts,
        gone_at: Ts,
    ) -> Result<bool> {
        let (from, to) = (ts_string(launched_at), ts_string(gone_at));
        self.write(|c| {
            let done = exec(
                c,
                "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
                 hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ?, terminated_at = ?
                 WHERE id = ? AND launched_at IS NULL AND state = 'gone'",
                params![
                    launched.provider_id,
                    launched.instance_type.as_deref(),
                    launched.lifecycle,
                    &from,
                    price.zone,
                    price.hourly_price,
                    price.price_source,
                    price.volume_gb.map(i64::from),
                    price.volume_type,
                    price.volume_hourly,
                    &to,
                    id
                ],
            )?;
            if done == 0 {
                return Ok(false);
            }
            insert_event(c, id, &from, "launched", &launched.provider_id)?;
            insert_event(c, id, &to, "gone", "late instance terminated")?;
            Ok(true)
        })
    }

    /// Moves a machine to a new state and records the event.
    pub async fn set_machine_state(&self, id: MachineId, state: &str, now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        // One transaction: the meter's `gone` (billing ends) and `terminated_at` agree.
        self.write(|c| {
            if state == "gone" {
                exec(
                    c,
                    "UPDATE machines SET state = ?, terminated_at = COALESCE(terminated_at, ?) WHERE id = ?",
                    params![state, &now_s, id],
                )?;
            } else {
                exec(c, "UPDATE machines SET state = ? WHERE id = ?", params![state, id])?;
            }
            insert_event(c, id, &now_s, state, "")
        })
    }

    /// Appends to the machine's event log (the cost meter's input).
    pub async fn machine_event(&self, id: MachineId, kind: &str, detail: &str, now: Ts) -> Result<()> {
        self.write(|c| insert_event(c, id, &ts_string(now), kind, detail))
    }

    /// The machine whose one-time token this is, if the token is unspent and the machine is
    /// starting: what authorises a machine to download the agent while it boots.
    pub async fn machine_for_unused_token(&self, token_hash: &str) -> Result<Option<MachineId>> {
        self.read(|c| {
            opt(
                c,
                "SELECT id FROM machines
                 WHERE token_hash = ? AND token_used = 0 AND state IN ('requested', 'launching', 'booting')",
                params![token_hash],
                |r| r.get(0),
            )
        })
    }

    /// Spends a one-time token: returns the machine it belongs to if it was unused and the
    /// machine is not gone. A second call with the same token returns `None`.
    pub async fn claim_token(&self, token_hash: &str, now: Ts) -> Result<Option<MachineId>> {
        let now_s = ts_string(now);
        self.write(|c| {
            let id: Option<MachineId> = opt(
                c,
                "UPDATE machines SET token_used = 1, connected_at = ?
                 WHERE token_hash = ? AND token_used = 0 AND state NOT IN ('gone', 'stopping', 'lost') RETURNING id",
                params![&now_s, token_hash],
                |r| r.get(0),
            )?;
            if let Some(id) = id {
                // The meter's "agent connected": boot time ends here.
                insert_event(c, id, &now_s, "connected", "")?;
            }
            Ok(id)
        })
    }

    /// Records the hash of the resume token just given to a machine's agent after its Hello
    /// (no earlier resume token stays valid).
    pub async fn set_resume_hash(&self, machine: MachineId, hash: &str) -> Result<()> {
        self.write(|c| {
            exec(c, "UPDATE machines SET resume_hash = ?, resume_prev = NULL WHERE id = ?", params![hash, machine])?;
            Ok(())
        })
    }

    /// Spends a resume token: if `presented` is the machine's current token (or the one before
    /// it, while its successor has not been confirmed in use: the Welcome carrying it may have
    /// been lost) and the machine is alive, `new_hash` becomes current and `presented` the one
    /// before, until [`Store::confirm_resume`] retires it.
    pub async fn claim_resume(&self, machine: MachineId, presented: &str, new_hash: &str) -> Result<bool> {
        let done = self.write(|c| {
            exec(
                c,
                "UPDATE machines SET resume_prev = ?1, resume_hash = ?2
                 WHERE id = ?3 AND (resume_hash = ?1 OR resume_prev = ?1) AND state IN ('idle', 'busy')",
                params![presented, new_hash, machine],
            )
        })?;
        Ok(done == 1)
    }

    /// The agent is using the resume token whose hash is `hash` (it spoke on the connection that
    /// gave it): every token before it stops working.
    pub async fn confirm_resume(&self, machine: MachineId, hash: &str) -> Result<()> {
        self.write(|c| {
            exec(
                c,
                "UPDATE machines SET resume_prev = NULL WHERE id = ? AND resume_hash = ? AND resume_prev IS NOT NULL",
                params![machine, hash],
            )?;
            Ok(())
        })
    }

    /// Machines, newest first.
    pub async fn list_machines(&self, pool: Option<&str>, state: Option<&str>) -> Result<Vec<MachineRow>> {
        self.read(|c| {
            all(
                c,
                &format!(
                    "SELECT {MACHINE_COLUMNS} FROM machines WHERE (CAST(?1 AS TEXT) IS NULL OR pool = ?1) AND (CAST(?2 AS TEXT) IS NULL OR state = ?2) ORDER BY id DESC"
                ),
                params![pool, state],
                machine_row,
            )
        })
    }

    /// Machines not yet gone (left over from an earlier run, at start-up).
    pub async fn live_machines(&self) -> Result<Vec<MachineRow>> {
        self.read(|c| {
            all(
                c,
                &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE state != 'gone' ORDER BY id"),
                params![],
                machine_row,
            )
        })
    }

    /// A pool at a glance: its machines by state (gone ones left out), its latest launch
    /// failure (time, reason) and when a machine of it last launched.
    pub async fn pool_status(&self, pool: &str) -> Result<PoolStatus> {
        self.read(|c| {
            snapshot(c, |tx| {
                let machines: Vec<(String, i64)> = all(
                tx,
                "SELECT state, COUNT(*) FROM machines WHERE pool = ? AND state != 'gone' GROUP BY state ORDER BY state",
                params![pool],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
                let last_launch_failure: Option<(String, String)> = opt(
                    tx,
                    "SELECT e.at, e.detail FROM machine_events e JOIN machines m ON m.id = e.machine_id
                 WHERE m.pool = ? AND e.kind = 'launch_failed' ORDER BY e.id DESC LIMIT 1",
                    params![pool],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let last_launched_at: Option<String> =
                    one(tx, "SELECT MAX(launched_at) FROM machines WHERE pool = ?", params![pool], |r| r.get(0))?;
                Ok(PoolStatus { machines: machines.into_iter().collect(), last_launch_failure, last_launched_at })
            })
        })
    }
}
