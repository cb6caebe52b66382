//! Reads the pages need: the console's grid, builds of recent changes, log chunks after a
//! point (for the live log), recent machines.

use sqlx::Row;

use super::{build_row, machine_row, BuildRow, MachineRow, Result, Store, BUILD_COLUMNS, MACHINE_COLUMNS};
use crate::core::BuildId;

/// A piece of a build's log: its id (to resume after), the step, the text.
#[derive(Debug, Clone, PartialEq)]
pub struct LogChunk {
    pub id: i64,
    pub step: i64,
    pub text: String,
}

impl Store {
    /// The newest build of every (builder, branch) pair, newest first.
    pub async fn latest_per_builder_branch(&self) -> Result<Vec<BuildRow>> {
        // Walks the (builder, branch, id) index once: one entry per pair.
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE id IN (SELECT MAX(id) FROM builds GROUP BY builder, branch)
             ORDER BY id DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(build_row).collect())
    }

    /// Builds of these (repo, revision) pairs, newest first.
    pub async fn builds_of_revisions(&self, revisions: &[(String, String)]) -> Result<Vec<BuildRow>> {
        if revisions.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<[&str; 2]> = revisions.iter().map(|(r, v)| [r.as_str(), v.as_str()]).collect();
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE (repo, revision) IN
             (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))
             ORDER BY id DESC"
        ))
        .bind(serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(build_row).collect())
    }

    /// Log chunks of a build after chunk `after` (0: from the start), at most `limit`.
    pub async fn log_after(&self, build: BuildId, after: i64, limit: i64) -> Result<Vec<LogChunk>> {
        let rows =
            sqlx::query("SELECT id, step_idx, text FROM log_chunks WHERE build_id = ? AND id > ? ORDER BY id LIMIT ?")
                .bind(build)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| LogChunk { id: r.get("id"), step: r.get("step_idx"), text: r.get("text") }).collect())
    }

    /// Machines not gone, then the most recent gone ones, up to `limit` in all; newest first.
    pub async fn recent_machines(&self, limit: i64) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE state != 'gone'
             UNION ALL
             SELECT * FROM (SELECT {MACHINE_COLUMNS} FROM machines WHERE state = 'gone' ORDER BY id DESC LIMIT ?)
             ORDER BY id DESC"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(machine_row).collect())
    }
}
