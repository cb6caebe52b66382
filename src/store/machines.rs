//! Machines: their rows, lifecycle events, tokens and what the pools hold.

use super::*;

impl Store {
    /// The largest machine id ever used (ids are never reused: they are idempotency tokens).
    pub async fn max_machine_id(&self) -> Result<MachineId> {
        let id: Option<MachineId> = sqlx::query_scalar("SELECT MAX(id) FROM machines").fetch_one(&self.pool).await?;
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
        sqlx::query(
            "INSERT INTO machines (id, pool, provisioner, state, token_hash, requested_at) VALUES (?, ?, ?, 'requested', ?, ?)",
        )
        .bind(id)
        .bind(pool)
        .bind(provisioner)
        .bind(token_hash)
        .bind(&now_s)
        .execute(&self.pool)
        .await?;
        self.machine_event(id, "requested", "", now).await
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
             hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ? WHERE id = ?",
        )
        .bind(provider_id)
        .bind(instance_type)
        .bind(lifecycle)
        .bind(&now_s)
        .bind(&price.zone)
        .bind(price.hourly_price)
        .bind(&price.price_source)
        .bind(price.volume_gb.map(i64::from))
        .bind(&price.volume_type)
        .bind(price.volume_hourly)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut *tx, id, &now_s, "launched", provider_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Of these machines, those the store has as gone, each with the instance it recorded.
    pub async fn gone_machines(
        &self,
        ids: &[MachineId],
    ) -> Result<std::collections::HashMap<MachineId, Option<String>>> {
        let mut gone = std::collections::HashMap::new();
        for id in ids {
            let row: Option<(MachineId, Option<String>)> =
                sqlx::query_as("SELECT id, provider_id FROM machines WHERE id = ? AND state = 'gone'")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            gone.extend(row);
        }
        Ok(gone)
    }

    /// One machine's row.
    pub async fn machine(&self, id: MachineId) -> Result<Option<MachineRow>> {
        let row = sqlx::query(&format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(machine_row))
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
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE machines SET provider_id = ?, instance_type = ?, lifecycle = ?, launched_at = ?, zone = ?,
             hourly_price = ?, price_source = ?, volume_gb = ?, volume_type = ?, volume_hourly = ?, terminated_at = ?
             WHERE id = ? AND launched_at IS NULL AND state = 'gone'",
        )
        .bind(&launched.provider_id)
        .bind(launched.instance_type.as_deref())
        .bind(&launched.lifecycle)
        .bind(&from)
        .bind(&price.zone)
        .bind(price.hourly_price)
        .bind(&price.price_source)
        .bind(price.volume_gb.map(i64::from))
        .bind(&price.volume_type)
        .bind(price.volume_hourly)
        .bind(&to)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_event(&mut *tx, id, &from, "launched", &launched.provider_id).await?;
        insert_event(&mut *tx, id, &to, "gone", "late instance terminated").await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Moves a machine to a new state and records the event.
    pub async fn set_machine_state(&self, id: MachineId, state: &str, now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        // One transaction: the meter's `gone` (billing ends) and `terminated_at` agree.
        let mut tx = self.pool.begin().await?;
        if state == "gone" {
            sqlx::query("UPDATE machines SET state = ?, terminated_at = COALESCE(terminated_at, ?) WHERE id = ?")
                .bind(state)
                .bind(&now_s)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE machines SET state = ? WHERE id = ?").bind(state).bind(id).execute(&mut *tx).await?;
        }
        insert_event(&mut *tx, id, &now_s, state, "").await?;
        tx.commit().await?;
        Ok(())
    }

    /// Appends to the machine's event log (the cost meter's input).
    pub async fn machine_event(&self, id: MachineId, kind: &str, detail: &str, now: Ts) -> Result<()> {
        insert_event(&self.pool, id, &ts_string(now), kind, detail).await
    }

    /// The machine whose one-time token this is, if the token is unspent and the machine is
    /// starting: what authorises a machine to download the agent while it boots.
    pub async fn machine_for_unused_token(&self, token_hash: &str) -> Result<Option<MachineId>> {
        let id: Option<MachineId> = sqlx::query_scalar(
            "SELECT id FROM machines
             WHERE token_hash = ? AND token_used = 0 AND state IN ('requested', 'launching', 'booting')",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Spends a one-time token: returns the machine it belongs to if it was unused and the
    /// machine is not gone. A second call with the same token returns `None`.
    pub async fn claim_token(&self, token_hash: &str, now: Ts) -> Result<Option<MachineId>> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let id: Option<MachineId> = sqlx::query_scalar(
            "UPDATE machines SET token_used = 1, connected_at = ?
             WHERE token_hash = ? AND token_used = 0 AND state NOT IN ('gone', 'stopping', 'lost') RETURNING id",
        )
        .bind(&now_s)
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = id {
            // The meter's "agent connected": boot time ends here.
            insert_event(&mut *tx, id, &now_s, "connected", "").await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Records the hash of the resume token just given to a machine's agent after its Hello
    /// (no earlier resume token stays valid).
    pub async fn set_resume_hash(&self, machine: MachineId, hash: &str) -> Result<()> {
        sqlx::query("UPDATE machines SET resume_hash = ?, resume_prev = NULL WHERE id = ?")
            .bind(hash)
            .bind(machine)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Spends a resume token: if `presented` is the machine's current token (or the one before
    /// it, while its successor has not been confirmed in use: the Welcome carrying it may have
    /// been lost) and the machine is alive, `new_hash` becomes current and `presented` the one
    /// before, until [`Store::confirm_resume`] retires it.
    pub async fn claim_resume(&self, machine: MachineId, presented: &str, new_hash: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE machines SET resume_prev = ?1, resume_hash = ?2
             WHERE id = ?3 AND (resume_hash = ?1 OR resume_prev = ?1) AND state IN ('idle', 'busy')",
        )
        .bind(presented)
        .bind(new_hash)
        .bind(machine)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The agent is using the resume token whose hash is `hash` (it spoke on the connection that
    /// gave it): every token before it stops working.
    pub async fn confirm_resume(&self, machine: MachineId, hash: &str) -> Result<()> {
        sqlx::query(
            "UPDATE machines SET resume_prev = NULL WHERE id = ? AND resume_hash = ? AND resume_prev IS NOT NULL",
        )
        .bind(machine)
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Machines, newest first.
    pub async fn list_machines(&self, pool: Option<&str>, state: Option<&str>) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE (?1 IS NULL OR pool = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY id DESC"
        ))
        .bind(pool)
        .bind(state)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(machine_row).collect())
    }

    /// Machines not yet gone (left over from an earlier run, at start-up).
    pub async fn live_machines(&self) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE state != 'gone' ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(machine_row).collect())
    }

    /// A pool at a glance: its machines by state (gone ones left out), its latest launch
    /// failure (time, reason) and when a machine of it last launched.
    pub async fn pool_status(&self, pool: &str) -> Result<PoolStatus> {
        let machines: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM machines WHERE pool = ? AND state != 'gone' GROUP BY state ORDER BY state",
        )
        .bind(pool)
        .fetch_all(&self.pool)
        .await?;
        let last_launch_failure: Option<(String, String)> = sqlx::query_as(
            "SELECT e.at, e.detail FROM machine_events e JOIN machines m ON m.id = e.machine_id
             WHERE m.pool = ? AND e.kind = 'launch_failed' ORDER BY e.id DESC LIMIT 1",
        )
        .bind(pool)
        .fetch_optional(&self.pool)
        .await?;
        let last_launched_at: Option<String> =
            sqlx::query_scalar("SELECT MAX(launched_at) FROM machines WHERE pool = ?")
                .bind(pool)
                .fetch_one(&self.pool)
                .await?;
        Ok(PoolStatus { machines: machines.into_iter().collect(), last_launch_failure, last_launched_at })
    }
}
