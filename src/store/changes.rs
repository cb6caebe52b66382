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
        self.write(|c| {
            let mut ids = Vec::with_capacity(changes.len());
            for ch in changes {
                let files = serde_json::to_string(&ch.files).unwrap_or_else(|_| "[]".into());
                let id: Option<i64> = opt(
                    c,
                    "INSERT INTO changes (repo, branch, revision, author, committed_at, message, files, source, created_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repo, branch, revision) DO NOTHING RETURNING id",
                    params![
                        ch.repo,
                        ch.branch,
                        ch.revision,
                        ch.author,
                        ch.committed_at,
                        ch.message,
                        files,
                        ch.source,
                        &now_s
                    ],
                    |r| r.get(0),
                )?;
                ids.extend(id);
            }
            if let Some((repo, branch, revision)) = head {
                set_head(c, repo, branch, revision, &now_s)?;
            }
            let mut rows = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(row) = opt(c, "SELECT * FROM changes WHERE id = ?", params![id], change_row)? {
                    rows.push(row);
                }
            }
            Ok(rows)
        })
    }

    /// Records a branch head without a change (first sight of a branch).
    pub async fn set_head(&self, repo: &str, branch: &str, revision: &str, now: Ts) -> Result<()> {
        let now_s = ts_string(now);
        self.write(|c| set_head(c, repo, branch, revision, &now_s))
    }

    /// Forgets a branch that no longer exists.
    pub async fn delete_head(&self, repo: &str, branch: &str) -> Result<()> {
        self.write(|c| {
            exec(c, "DELETE FROM branch_heads WHERE repo = ? AND branch = ?", params![repo, branch])?;
            Ok(())
        })
    }

    /// The last known head of every branch of `repo`.
    pub async fn heads(&self, repo: &str) -> Result<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = self.read(|c| {
            all(c, "SELECT branch, revision FROM branch_heads WHERE repo = ?", params![repo], |r| {
                Ok((r.get("branch")?, r.get("revision")?))
            })
        })?;
        Ok(rows.into_iter().collect())
    }

    /// One change by id.
    pub async fn change(&self, id: ChangeId) -> Result<Option<ChangeRow>> {
        self.read(|c| opt(c, "SELECT * FROM changes WHERE id = ?", params![id], change_row))
    }

    /// Changes, newest first.
    pub async fn list_changes(&self, repo: Option<&str>, branch: Option<&str>, limit: i64) -> Result<Vec<ChangeRow>> {
        self.read(|c| {
            all(
                c,
                "SELECT * FROM changes WHERE (CAST(?1 AS TEXT) IS NULL OR repo = ?1) AND (CAST(?2 AS TEXT) IS NULL OR branch = ?2) ORDER BY id DESC LIMIT ?3",
                params![repo, branch, limit],
                change_row,
            )
        })
    }

    /// Changes the schedulers have not finished with (replayed after a restart), oldest first.
    pub async fn unscheduled_changes(&self) -> Result<Vec<ChangeRow>> {
        self.read(|c| all(c, "SELECT * FROM changes WHERE scheduled = 0 ORDER BY id", params![], change_row))
    }

    /// (scheduler, change) pairs already turned into build requests since `since`: a change
    /// replayed after a crash must not be requested twice by the same scheduler.
    pub async fn requested_changes(&self, since: &str) -> Result<std::collections::HashSet<(String, ChangeId)>> {
        let rows: Vec<(String, String)> = self.read(|c| {
            all(
                c,
                "SELECT scheduler, changes FROM build_requests WHERE changes != '[]' AND submitted_at >= ?",
                params![since],
                |r| Ok((r.get("scheduler")?, r.get("changes")?)),
            )
        })?;
        let mut out = std::collections::HashSet::new();
        for (scheduler, changes) in rows {
            let ids: Vec<ChangeId> = serde_json::from_str(&changes).unwrap_or_default();
            out.extend(ids.into_iter().map(|id| (scheduler.clone(), id)));
        }
        Ok(out)
    }

    /// Marks changes as fully considered by the schedulers.
    pub async fn mark_scheduled(&self, ids: &[ChangeId]) -> Result<()> {
        self.write(|c| {
            for id in ids {
                exec(c, "UPDATE changes SET scheduled = 1 WHERE id = ?", params![id])?;
            }
            Ok(())
        })
    }

    /// Every nightly scheduler's saved state.
    pub async fn nightly_states(&self) -> Result<Vec<NightlyRow>> {
        self.read(|c| {
            all(c, "SELECT name, last_fire, built FROM scheduler_state", params![], |r| {
                let built: String = r.get("built")?;
                Ok(NightlyRow {
                    name: r.get("name")?,
                    last_fire: Ts(r.get("last_fire")?),
                    built: serde_json::from_str(&built).unwrap_or_default(),
                })
            })
        })
    }

    /// Saves a nightly scheduler's state.
    pub async fn save_nightly(&self, name: &str, last_fire: Ts, built: &BTreeMap<String, String>) -> Result<()> {
        let built = serde_json::to_string(built).unwrap_or_else(|_| "{}".into());
        self.write(|c| {
            exec(
                c,
                "INSERT INTO scheduler_state (name, last_fire, built) VALUES (?, ?, ?)
                 ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire, built = excluded.built",
                params![name, last_fire.0, built],
            )?;
            Ok(())
        })
    }
}
