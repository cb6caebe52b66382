//! Reads the pages need: the console's grid, builds of recent changes, log chunks after a
//! point (for the live log), recent machines.

use super::{
    all, build_row, each, machine_row, opt, params, BuildRow, MachineRow, Result, Store, BUILD_COLUMNS, MACHINE_COLUMNS,
};
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
        // A loose index scan of (builder, branch, id): the recursive part jumps from one pair to
        // the next, so the cost follows the number of pairs, not of builds (a GROUP BY would
        // read every build).
        self.read(|c| {
            all(
                c,
                &format!(
                    "WITH RECURSIVE pairs(builder, branch) AS (
               SELECT * FROM (SELECT builder, branch FROM builds ORDER BY builder, branch LIMIT 1) AS first
               UNION ALL
               SELECT n.builder, n.branch FROM pairs p, builds n
               WHERE n.id = COALESCE(
                 (SELECT b.id FROM builds b WHERE b.builder = p.builder AND b.branch > p.branch
                  ORDER BY b.builder, b.branch LIMIT 1),
                 (SELECT b.id FROM builds b WHERE b.builder > p.builder ORDER BY b.builder, b.branch LIMIT 1))
             )
             SELECT {BUILD_COLUMNS} FROM builds WHERE id IN
               (SELECT (SELECT MAX(b.id) FROM builds b WHERE b.builder = p.builder AND b.branch = p.branch) FROM pairs p)
             ORDER BY id DESC"
                ),
                params![],
                build_row,
            )
        })
    }

    /// Builds of these (repo, revision) pairs, newest first.
    pub async fn builds_of_revisions(&self, revisions: &[(String, String)]) -> Result<Vec<BuildRow>> {
        if revisions.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<[&str; 2]> = revisions.iter().map(|(r, v)| [r.as_str(), v.as_str()]).collect();
        let pairs = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into());
        self.read(|c| {
            all(
                c,
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds WHERE (repo, revision) IN ({}) ORDER BY id DESC",
                    c.pick(
                        "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)",
                        "SELECT p->>0, p->>1 FROM json_array_elements(CAST(? AS json)) AS p"
                    )
                ),
                params![pairs],
                build_row,
            )
        })
    }

    /// Log chunks of a build after chunk `after` (0: from the start), at most `limit` of them
    /// and about `max_bytes` of text (always at least one chunk); `true` when more follow.
    /// A page catching up on a 64 MiB log reads it a slice per poll, not all at once.
    pub async fn log_after(
        &self,
        build: BuildId,
        after: i64,
        limit: i64,
        max_bytes: usize,
    ) -> Result<(Vec<LogChunk>, bool)> {
        self.read(|c| {
            let (mut out, mut size, mut more) = (Vec::new(), 0, false);
            // One row past the limit says whether more follow.
            each(
                c,
                "SELECT id, step_idx, text FROM log_chunks WHERE build_id = ? AND id > ? ORDER BY id LIMIT ?",
                params![build, after, limit.saturating_add(1)],
                |r| {
                    let chunk = LogChunk { id: r.get("id")?, step: r.get("step_idx")?, text: r.get("text")? };
                    if out.len() as i64 >= limit || (size + chunk.text.len() > max_bytes && !out.is_empty()) {
                        more = true;
                        return Ok(false);
                    }
                    size += chunk.text.len();
                    out.push(chunk);
                    Ok(true)
                },
            )?;
            Ok((out, more))
        })
    }

    /// The end of a build's log, at most about `max_bytes` of it, oldest chunk first; `true`
    /// when earlier chunks were left out.
    pub async fn log_tail(&self, build: BuildId, max_bytes: usize) -> Result<(Vec<LogChunk>, bool)> {
        // Newest first, a page of chunks at a time, stopping once the size is reached: a
        // 64 MiB log costs a page view no more than `max_bytes` (and a page), on PostgreSQL
        // too, where a statement's rows all come at once.
        const PAGE: i64 = 64;
        self.read_long(|c| {
            let mut size = 0;
            let mut out = Vec::new();
            let (mut cut, mut before) = (false, i64::MAX);
            'pages: loop {
                let page = all(
                    c,
                    "SELECT id, step_idx, text FROM log_chunks WHERE build_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
                    params![build, before, PAGE],
                    |r| Ok(LogChunk { id: r.get("id")?, step: r.get("step_idx")?, text: r.get("text")? }),
                )?;
                let last_page = (page.len() as i64) < PAGE;
                for chunk in page {
                    size += chunk.text.len();
                    if size > max_bytes && !out.is_empty() {
                        cut = true;
                        break 'pages;
                    }
                    before = chunk.id;
                    out.push(chunk);
                }
                if last_page {
                    break;
                }
            }
            out.reverse();
            Ok((out, cut))
        })
    }

    /// The attempt that retried this build, if one did.
    pub async fn next_attempt(&self, build: BuildId) -> Result<Option<BuildId>> {
        self.read(|c| {
            opt(
                c,
                "SELECT n.id FROM builds b JOIN builds n ON n.request_id = b.request_id AND n.attempt = b.attempt + 1
             WHERE b.id = ?",
                params![build],
                |r| r.get(0),
            )
        })
    }

    /// Machines not gone, then the most recent gone ones, up to `limit` in all; newest first.
    pub async fn recent_machines(&self, limit: i64) -> Result<Vec<MachineRow>> {
        self.read(|c| {
            all(
                c,
                &format!(
                    "SELECT {MACHINE_COLUMNS} FROM machines WHERE state != 'gone'
             UNION ALL
             SELECT * FROM (SELECT {MACHINE_COLUMNS} FROM machines WHERE state = 'gone' ORDER BY id DESC LIMIT ?) AS gone
             ORDER BY id DESC"
                ),
                params![limit],
                machine_row,
            )
        })
    }
}
