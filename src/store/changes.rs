//! Changes, branch heads and nightly state: what the schedulers are fed and remember.

use super::*;

impl Store {
    /// Stores new commits of one branch and moves its head, in one transaction. A commit
    /// already stored for that branch is skipped; only the new changes are returned.
    pub async fn record_changes(
        &self,
        changes: &[NewChange],
        head: Option<(&str, &str, &str)>,
        now: Ts,
    ) -> Result<Vec<ChangeRow>> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(changes.len());
        for c in changes {
            let files = serde_json::to_string(&c.files).unwrap_or_else(|_| "[]".into());
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO changes (repo, branch, revision, author, committed_at, message, files, source, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repo, branch, revision) DO NOTHING RETURNING id",
            )
            .bind(&c.repo)
            .bind(&c.branch)
            .bind(&c.revision)
            .bind(&c.author)
            .bind(&c.committed_at)
            .bind(&c.message)
            .bind(files)
            .bind(&c.source)
            .bind(&now_s)
            .fetch_optional(&mut *tx)
            .await?;
            ids.extend(id);
        }
        if let Some((repo, branch, revision)) = head {
            set_head(&mut *tx, repo, branch, revision, &now_s).await?;
        }
        tx.commit().await?;
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(row) = self.change(id).await? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Records a branch head without a change (first sight of a branch).
    pub async fn set_head(&self, repo: &str, branch: &str, revision: &str, now: Ts) -> Result<()> {
        set_head(&self.pool, repo, branch, revision, &ts_string(now)).await
    }

    /// Forgets a branch that no longer exists.
    pub async fn delete_head(&self, repo: &str, branch: &str) -> Result<()> {
        sqlx::query("DELETE FROM branch_heads WHERE repo = ? AND branch = ?")
            .bind(repo)
            .bind(branch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The last known head of every branch of `repo`.
    pub async fn heads(&self, repo: &str) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT branch, revision FROM branch_heads WHERE repo = ?")
            .bind(repo)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get("branch"), r.get("revision"))).collect())
    }

    /// One change by id.
    pub async fn change(&self, id: ChangeId) -> Result<Option<ChangeRow>> {
        let row = sqlx::query("SELECT * FROM changes WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(change_row))
    }

    /// Changes, newest first.
    pub async fn list_changes(&self, repo: Option<&str>, branch: Option<&str>, limit: i64) -> Result<Vec<ChangeRow>> {
        let rows = sqlx::query(
            "SELECT * FROM changes WHERE (?1 IS NULL OR repo = ?1) AND (?2 IS NULL OR branch = ?2) ORDER BY id DESC LIMIT ?3",
        )
        .bind(repo)
        .bind(branch)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// Changes the schedulers have not finished with (replayed after a restart), oldest first.
    pub async fn unscheduled_changes(&self) -> Result<Vec<ChangeRow>> {
        let rows = sqlx::query("SELECT * FROM changes WHERE scheduled = 0 ORDER BY id").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(change_row).collect())
    }

    /// (scheduler, change) pairs already turned into build requests since `since`: a change
    /// replayed after a crash must not be requested twice by the same scheduler.
    pub async fn requested_changes(&self, since: &str) -> Result<std::collections::HashSet<(String, ChangeId)>> {
        let rows =
            sqlx::query("SELECT scheduler, changes FROM build_requests WHERE changes != '[]' AND submitted_at >= ?")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        let mut out = std::collections::HashSet::new();
        for r in rows {
            let scheduler: String = r.get("scheduler");
            let ids: Vec<ChangeId> = serde_json::from_str(&r.get::<String, _>("changes")).unwrap_or_default();
            out.extend(ids.into_iter().map(|id| (scheduler.clone(), id)));
        }
        Ok(out)
    }

    /// Marks changes as fully considered by the schedulers.
    pub async fn mark_scheduled(&self, ids: &[ChangeId]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("UPDATE changes SET scheduled = 1 WHERE id = ?").bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every nightly scheduler's saved state.
    pub async fn nightly_states(&self) -> Result<Vec<NightlyRow>> {
        let rows = sqlx::query("SELECT name, last_fire, built FROM scheduler_state").fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| NightlyRow {
                name: r.get("name"),
                last_fire: Ts(r.get("last_fire")),
                built: serde_json::from_str(&r.get::<String, _>("built")).unwrap_or_default(),
            })
            .collect())
    }

    /// Saves a nightly scheduler's state.
    pub async fn save_nightly(&self, name: &str, last_fire: Ts, built: &BTreeMap<String, String>) -> Result<()> {
        sqlx::query(
            "INSERT INTO scheduler_state (name, last_fire, built) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire, built = excluded.built",
        )
        .bind(name)
        .bind(last_fire.0)
        .bind(serde_json::to_string(built).unwrap_or_else(|_| "{}".into()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
