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
        let mut tx = self.pool.begin().await?;
        let request: i64 = sqlx::query_scalar(
            "INSERT INTO build_requests (builder, repo, branch, revision, scheduler, reason, changes, submitted_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(builder)
        .bind(repo)
        .bind(branch)
        .bind(revision)
        .bind(scheduler)
        .bind(reason)
        .bind(serde_json::to_string(changes).unwrap_or_else(|_| "[]".into()))
        .bind(&now_s)
        .fetch_one(&mut *tx)
        .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO builds (request_id, builder, repo, branch, revision, reason, queued_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {BUILD_COLUMNS}"
        ))
        .bind(request)
        .bind(builder)
        .bind(repo)
        .bind(branch)
        .bind(revision)
        .bind(reason)
        .bind(&now_s)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        build_row(&row)
    }

    /// Builds in the given state, oldest first.
    pub async fn builds_in_state(&self, state: &str) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE state = ? ORDER BY id"))
            .bind(state)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(build_row).collect()
    }

    /// One build attempt.
    pub async fn build(&self, id: BuildId) -> Result<Option<BuildRow>> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(build_row).transpose()
    }

    /// Build attempts, newest first.
    pub async fn list_builds(&self, f: &BuildFilter) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE (?1 IS NULL OR builder = ?1) AND (?2 IS NULL OR branch = ?2)
             AND (?3 IS NULL OR state = ?3) ORDER BY id DESC LIMIT ?4"
        ))
        .bind(&f.builder)
        .bind(&f.branch)
        .bind(&f.state)
        .bind(f.limit.unwrap_or(100))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(build_row).collect()
    }

    /// Marks a queued attempt running on `machine` and creates its step rows.
    pub async fn start_build(&self, build: BuildId, machine: MachineId, steps: &[String], now: Ts) -> Result<bool> {
        let now_s = ts_string(now);
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE builds SET state = 'running', machine_id = ?, started_at = ? WHERE id = ? AND state = 'queued'",
        )
        .bind(machine)
        .bind(&now_s)
        .bind(build)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for (i, name) in steps.iter().enumerate() {
            sqlx::query("INSERT INTO steps (build_id, idx, name) VALUES (?, ?, ?)")
                .bind(build)
                .bind(i as i64)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE machines SET builds_run = builds_run + 1 WHERE id = ?")
            .bind(machine)
            .execute(&mut *tx)
            .await?;
        // The meter's record of the build says what it was, so a report attributes busy time
        // from the events alone: id, builder, repository, branch and committer (the author of
        // the newest change), tab-separated.
        sqlx::query(
            "INSERT INTO machine_events (machine_id, at, kind, detail)
             SELECT ?, ?, 'build_started', b.id || char(9) || b.builder || char(9) || b.repo || char(9) || b.branch
                    || char(9) || REPLACE(REPLACE(COALESCE(c.author, ''), char(9), ' '), char(10), ' ')
             FROM builds b JOIN build_requests r ON r.id = b.request_id
             LEFT JOIN changes c ON c.id = json_extract(r.changes, '$[#-1]')
             WHERE b.id = ?",
        )
        .bind(machine)
        .bind(&now_s)
        .bind(build)
        .execute(&mut *tx)
        .await?;
        notify::outbox(&mut tx, build, "started", &now_s).await?;
        tx.commit().await?;
        self.news.notify_one();
        Ok(true)
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
        // A write lock from the start: a transaction that reads first and writes later fails
        // at once (it does not wait) if another connection wrote in between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let decided = event_in(&mut tx, build, event, now).await?;
        tx.commit().await?;
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

    /// Stores one numbered report of an agent about `build`, with the log text it carries: only
    /// if the build's stored sequence is at `after` (the report before it), and then moves it to
    /// `seq`, all in one transaction. A report already stored (or overtaken) changes nothing.
    pub async fn apply_report(
        &self,
        build: BuildId,
        after: u64,
        seq: u64,
        log: Option<(i64, &str)>,
        effect: ReportEffect<'_>,
        now: Ts,
    ) -> Result<Applied> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query("UPDATE builds SET applied_seq = ? WHERE id = ? AND applied_seq = ?")
            .bind(seq as i64)
            .bind(build)
            .bind(after as i64)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() == 0 {
            drop(tx);
            let applied: Option<i64> = sqlx::query_scalar("SELECT applied_seq FROM builds WHERE id = ?")
                .bind(build)
                .fetch_optional(&self.pool)
                .await?;
            return Ok(Applied::Stale { applied: applied.unwrap_or(0).max(0) as u64 });
        }
        if let Some((step, text)) = log.filter(|(_, t)| !t.is_empty()) {
            append_log_in(&mut tx, build, step, text, now).await?;
        }
        let ended = match effect {
            ReportEffect::None => None,
            ReportEffect::StepStarted { step } => {
                step_started_in(&mut tx, build, step, now).await?;
                None
            }
            ReportEffect::StepFinished { step, result, exit_code } => {
                step_finished_in(&mut tx, build, step, result, exit_code, now).await?;
                None
            }
            // A report about an attempt retried meanwhile is stored as text only: the new
            // attempt owns the build.
            ReportEffect::BuildFinished { machine, result } => {
                event_in(&mut tx, build, &life::BuildEvent::Reported { machine, result }, now).await?.ok()
            }
        };
        tx.commit().await?;
        if ended.is_some() {
            self.news.notify_one();
        }
        Ok(Applied::Stored { ended: ended.map(|d| d.transition) })
    }

    /// How far the reports of `build` are stored: the highest sequence number, and the bytes of
    /// log text (toward [`crate::agent::protocol::MAX_LOG_BYTES`]).
    pub async fn report_position(&self, build: BuildId) -> Result<(u64, usize)> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT b.applied_seq, COALESCE((SELECT SUM(LENGTH(CAST(text AS BLOB))) FROM log_chunks WHERE build_id = b.id), 0)
             FROM builds b WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or((0, 0), |(seq, bytes)| (seq.max(0) as u64, bytes.max(0) as usize)))
    }

    /// The changes a build was made for (the scheduler's), or else the stored commit of its
    /// revision (a forced build), newest first.
    pub async fn build_changes(&self, build: BuildId) -> Result<Vec<ChangeRow>> {
        let Some((ids, repo, revision)) = sqlx::query_as::<_, (String, String, String)>(
            "SELECT r.changes, b.repo, b.revision FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(Vec::new());
        };
        let ids: Vec<ChangeId> = serde_json::from_str(&ids).unwrap_or_default();
        let rows = if ids.is_empty() {
            sqlx::query("SELECT * FROM changes WHERE repo = ? AND revision = ? ORDER BY id DESC LIMIT 1")
                .bind(repo)
                .bind(revision)
                .fetch_all(&self.pool)
                .await?
        } else {
            sqlx::query("SELECT * FROM changes WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id DESC")
                .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
                .fetch_all(&self.pool)
                .await?
        };
        Ok(rows.iter().map(change_row).collect())
    }

    /// The change ids of a build's request (what a rebuild carries over).
    pub async fn build_change_ids(&self, build: BuildId) -> Result<Vec<ChangeId>> {
        let ids: Option<String> = sqlx::query_scalar(
            "SELECT r.changes FROM builds b JOIN build_requests r ON r.id = b.request_id WHERE b.id = ?",
        )
        .bind(build)
        .fetch_optional(&self.pool)
        .await?;
        Ok(ids.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default())
    }

    /// Marks a step running.
    pub async fn step_started(&self, build: BuildId, idx: i64, now: Ts) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        step_started_in(&mut tx, build, idx, now).await?;
        tx.commit().await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        step_finished_in(&mut tx, build, idx, result, exit_code, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Steps of a build, in order.
    pub async fn steps(&self, build: BuildId) -> Result<Vec<StepRow>> {
        let rows = sqlx::query("SELECT * FROM steps WHERE build_id = ? ORDER BY idx")
            .bind(build)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| StepRow {
                index: r.get("idx"),
                name: r.get("name"),
                state: r.get("state"),
                exit_code: r.get("exit_code"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
            })
            .collect())
    }

    /// Appends (already redacted) log text to a build's step.
    pub async fn append_log(&self, build: BuildId, idx: i64, text: &str, now: Ts) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        append_log_in(&mut tx, build, idx, text, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The whole log of a build, chunks concatenated in arrival order.
    pub async fn log(&self, build: BuildId) -> Result<String> {
        let rows = sqlx::query("SELECT text FROM log_chunks WHERE build_id = ? ORDER BY id")
            .bind(build)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>("text")).collect())
    }
}
