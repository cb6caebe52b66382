//! Build requests and attempts, their steps and logs: the build lifecycle as stored.

use super::*;

impl Store {
    /// Stores a build request and its first attempt (queued); returns the attempt.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_request(
        &self,
        builder: &str,
        repo: &str,
        branch: &str,
        revision: &str,
        scheduler: &str,
        reason: &str,
        changes: &[ChangeId],
        now: Ts,
    ) -> Result<BuildRow> {
        let now_s = ts_string(now);
        let changes = serde_json::to_string(changes).unwrap_or_else(|_| "[]".into());
        self.write(|c| {
            let request: i64 = one(
                c,
                "INSERT INTO build_requests (builder, repo, branch, revision, scheduler, reason, changes, submitted_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                params![builder, repo, branch, revision, scheduler, reason, changes, &now_s],
                |r| r.get(0),
            )?;
            one(
                c,
                &format!(
                    "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {BUILD_COLUMNS}"
                ),
                params![request, builder, repo, branch, revision, reason, &now_s],
                build_row,
            )
        })
    }

    /// Builds in the given state, oldest first.
    pub async fn builds_in_state(&self, state: &str) -> Result<Vec<BuildRow>> {
        self.read(|c| {
            all(
                c,
                &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE state = ? ORDER BY id"),
                params![state],
                build_row,
            )
        })
    }

    /// One build attempt.
    pub async fn build(&self, id: BuildId) -> Result<Option<BuildRow>> {
        self.read(|c| opt(c, &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?"), params![id], build_row))
    }

    /// Build attempts, newest first.
    pub async fn list_builds(&self, f: &BuildFilter) -> Result<Vec<BuildRow>> {
        self.read(|c| {
            all(
                c,
                &format!(
                    "SELECT {BUILD_COLUMNS} FROM builds WHERE (CAST(?1 AS TEXT) IS NULL OR builder = ?1) AND (CAST(?2 AS TEXT) IS NULL OR branch = ?2)
                     AND (CAST(?3 AS TEXT) IS NULL OR state = ?3) ORDER BY id DESC LIMIT ?4"
                ),
                params![f.builder, f.branch, f.state, f.limit.unwrap_or(100)],
                build_row,
            )
        })
    }

    /// Marks a queued attempt running on `machine` and creates its step rows.
    pub async fn start_build(&self, build: BuildId, machine: MachineId, steps: &[String], now: Ts) -> Result<bool> {
        let now_s = ts_string(now);
        let started = self.write(|c| {
            let done = exec(
                c,
                "UPDATE builds SET state = 'running', machine_id = ?, started_at = ? WHERE id = ? AND state = 'queued'",
                params![machine, &now_s, build],
            )?;
            if done == 0 {
                return Ok(false);
            }
            for (i, name) in steps.iter().enumerate() {
                exec(c, "INSERT INTO steps (build_id, idx, name) VALUES (?, ?, ?)", params![build, i as i64, name])?;
            }
            exec(c, "UPDATE machines SET builds_run = builds_run + 1 WHERE id = ?", params![machine])?;
            // The meter's record of the build says what it was, so a report attributes busy time
            // from the events alone: id, builder, repository, branch and committer (the author of
            // the newest change), tab-separated.
            let (tab, newline, newest) = match c {
                Conn::Lite(_) => ("char(9)", "char(10)", "json_extract(r.changes, '$[#-1]')"),
                Conn::Pg(_) => ("chr(9)", "chr(10)", "CAST(CAST(r.changes AS json)->>-1 AS BIGINT)"),
            };
            exec(
                c,
                &format!(
                    "INSERT INTO machine_events (machine_id, at, kind, detail)
                 SELECT ?, ?, 'build_started', b.id || {tab} || b.builder || {tab} || b.repo || {tab} || b.branch
                        || {tab} || REPLACE(REPLACE(COALESCE(c.author, ''), {tab}, ' '), {newline}, ' ')
                 FROM builds b JOIN build_requests r ON r.id = b.request_id
                 LEFT JOIN changes c ON c.id = {newest}
                 WHERE b.id = ?"
                ),
                params![machine, &now_s, build],
            )?;
            notify::outbox(c, build, "started", &now_s)?;
            Ok(true)
        })?;
        if started {
            self.news.notify_one();
        }
        Ok(started)
    }

    /// Carries out what the lifecycle's rules ([`decide`]) make of `event` for attempt `build`,
    /// read and written in one transaction. The new attempt of a retry comes back with the
    /// decision.
    pub async fn build_event(
        &self,
        build: BuildId,
        event: &life::BuildEvent,
        now: Ts,
    ) -> Result<std::result::Result<Decided, Refused>> {
        let decided = self.write(|c| event_in(c, build, event, now))?;
        if decided.as_ref().is_ok_and(|d| d.transition.news) {
            self.news.notify_one();
        }
        Ok(decided)
    }

    /// Ends a running attempt as its agent on `machine` reported it, as the lifecycle decides
    /// ([`life::BuildEvent::Reported`]); `false` if the report does not apply (the attempt had
    /// ended or runs elsewhere).
    pub async fn finish_build(&self, build: BuildId, machine: MachineId, result: BuildState, now: Ts) -> Result<bool> {
        Ok(self.build_event(build, &life::BuildEvent::Reported { machine, result }, now).await?.is_ok())
    }

    /// Stores numbered reports of an agent about `build` that follow one another, with the
    /// log text they carry, in one transaction: only if the build's stored sequence is at
    /// `after` (the report before the first), and then moves it to the last one's number.
    /// Reports already stored (or overtaken) change nothing. A `BuildFinished` effect may only
    /// be the last report's: nothing of a build follows its end.
    pub async fn apply_reports(&self, build: BuildId, after: u64, reports: &[Report], now: Ts) -> Result<Applied> {
        let Some(last) = reports.last() else { return Ok(Applied::Stale { applied: after }) };
        let applied = self.write(|c| {
            let moved = exec(
                c,
                "UPDATE builds SET applied_seq = ? WHERE id = ? AND applied_seq = ?",
                params![last.seq as i64, build, after as i64],
            )?;
            if moved == 0 {
                let applied: Option<i64> =
                    opt(c, "SELECT applied_seq FROM builds WHERE id = ?", params![build], |r| r.get(0))?;
                return Ok(Applied::Stale { applied: applied.unwrap_or(0).max(0) as u64 });
            }
            let mut ended = None;
            for report in reports {
                if let Some((step, text)) = report.log.as_ref().filter(|(_, t)| !t.is_empty()) {
                    append_log_in(c, build, *step, text, now)?;
                }
                match report.effect {
                    ReportEffect::None => {}
                    ReportEffect::StepStarted { step } => step_started_in(c, build, step, now)?,
                    ReportEffect::StepFinished { step, result, exit_code } => {
                        step_finished_in(c, build, step, result, exit_code, now)?
                    }
                    // A report about an attempt retried meanwhile is stored as text only: the
                    // new attempt owns the build.
                    ReportEffect::BuildFinished { machine, result } => {
                        ended = event_in(c, build, &life::BuildEvent::Reported { machine, result }, now)?.ok();
                    }
                }
            }
            Ok(Applied::Stored { ended: ended.map(|d| d.transition) })
        })?;
        if matches!(applied, Applied::Stored { ended: Some(_) }) {
            self.news.notify_one();
        }
        Ok(applied)
    }

    /// The highest sequence number of the reports of `build` that is stored (0: none).
    pub async fn applied_seq(&self, build: BuildId) -> Result<u64> {
        let seq: Option<i64> =
            self.read(|c| opt(c, "SELECT applied_seq FROM builds WHERE id = ?", params![build], |r| r.get(0)))?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    /// How far the reports of `build` are stored: the highest sequence number, and the bytes of
    /// log text (toward [`crate::agent::protocol::MAX_LOG_BYTES`]). Reads the whole log's size.
    pub async fn report_position(&self, build: BuildId) -> Result<(u64, usize)> {
        let row: Option<(i64, i64)> = self.read_long(|c| {
            opt(
                c,
                "SELECT b.applied_seq, COALESCE((SELECT CAST(SUM(octet_length(text)) AS BIGINT) FROM log_chunks WHERE build_id = b.id), 0)
                 FROM builds b WHERE b.id = ?",
                params![build],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })?;
        Ok(row.map_or((0, 0), |(seq, bytes)| (seq.max(0) as u64, bytes.max(0) as usize)))
    }

    /// The changes a build was made for (the scheduler's), or else the stored commit of its
    /// revision (a forced build), newest first.
    pub async fn build_changes(&self, build: BuildId) -> Result<Vec<ChangeRow>> {
        self.read(|c| {
            // One snapshot: the request and its changes as of the same moment.
            snapshot(c, |tx| {
            let Some((ids, repo, revision)) = opt(
                tx,
                "SELECT r.changes, b.repo, b.revision FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
                params![build],
                |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?, r.get::<String>(2)?)),
            )?
            else {
                return Ok(Vec::new());
            };
            let ids: Vec<ChangeId> = serde_json::from_str(&ids).unwrap_or_default();
            if ids.is_empty() {
                all(
                    tx,
                    "SELECT * FROM changes WHERE repo = ? AND revision = ? ORDER BY id DESC LIMIT 1",
                    params![repo, revision],
                    change_row,
                )
            } else {
                all(
                    tx,
                    &format!("SELECT * FROM changes WHERE id IN ({}) ORDER BY id DESC", json_ids(tx)),
                    params![serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into())],
                    change_row,
                )
            }
            })
        })
    }

    /// The change ids of a build's request (what a rebuild carries over).
    pub async fn build_change_ids(&self, build: BuildId) -> Result<Vec<ChangeId>> {
        let ids: Option<String> = self.read(|c| {
            opt(
                c,
                "SELECT r.changes FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
                params![build],
                |r| r.get(0),
            )
        })?;
        Ok(ids.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default())
    }

    /// Marks a step running.
    pub async fn step_started(&self, build: BuildId, idx: i64, now: Ts) -> Result<()> {
        self.write(|c| step_started_in(c, build, idx, now))
    }

    /// Records a step's result.
    pub async fn step_finished(
        &self,
        build: BuildId,
        idx: i64,
        result: &str,
        exit_code: Option<i32>,
        now: Ts,
    ) -> Result<()> {
        self.write(|c| step_finished_in(c, build, idx, result, exit_code, now))
    }

    /// Steps of a build, in order.
    pub async fn steps(&self, build: BuildId) -> Result<Vec<StepRow>> {
        self.read(|c| {
            all(c, "SELECT * FROM steps WHERE build_id = ? ORDER BY idx", params![build], |r| {
                Ok(StepRow {
                    index: r.get("idx")?,
                    name: r.get("name")?,
                    state: r.get("state")?,
                    exit_code: r.get("exit_code")?,
                    started_at: r.get("started_at")?,
                    finished_at: r.get("finished_at")?,
                })
            })
        })
    }

    /// Appends (already redacted) log text to a build's step.
    pub async fn append_log(&self, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
        self.write(|c| append_log_in(c, build, idx, text, now))
    }

    /// The whole log of a build, chunks concatenated in arrival order.
    pub async fn log(&self, build: BuildId) -> Result<String> {
        let chunks: Vec<String> = self.read_long(|c| {
            all(c, "SELECT text FROM log_chunks WHERE build_id = ? ORDER BY id", params![build], |r| r.get(0))
        })?;
        Ok(chunks.concat())
    }
}
