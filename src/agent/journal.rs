//! The agent's journal: every report about a build, numbered and kept until the master
//! acknowledges it.
//!
//! A report written into a socket is not a report stored: the master may die with it in its
//! receive buffer. So the agent numbers each report (per build, from 1), keeps it here, sends it,
//! and forgets it only when an [`Ack`] covers it. After a reconnection everything not yet
//! acknowledged is sent again, in order; the master stores each number once.
//!
//! Memory is bounded: past [`MEMORY_BYTES`] of kept reports, new ones go to a spill file on the
//! machine's disk and come back into memory as acknowledgements make room. A build's log text is
//! capped at [`MAX_LOG_BYTES`] (the master stores no more); step and build results are always
//! kept.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::protocol::{Ack, AgentMsg, MAX_LOG_BYTES};
use crate::core::BuildId;

/// Kept reports held in memory before new ones are spilled to disk.
pub const MEMORY_BYTES: usize = 8 * 1024 * 1024;

/// One kept report, already encoded for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    build: BuildId,
    seq: u64,
    text: String,
}

/// Why the journal could not keep a report.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot encode a report: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("spill file {path}: {source}")]
    Spill { path: PathBuf, source: std::io::Error },
}

/// Reports spilled to disk, oldest first: appended at the end, read back from `read_at`.
struct Spill {
    path: PathBuf,
    file: File,
    read_at: u64,
    count: usize,
}

/// Numbered reports not yet acknowledged, in the order they were made.
pub struct Journal {
    /// Where the spill file goes when memory is full.
    spill_path: PathBuf,
    /// The number the next report of each build gets.
    next_seq: HashMap<BuildId, u64>,
    /// The highest number of each build the master has acknowledged.
    acked: HashMap<BuildId, u64>,
    /// Kept reports in memory, oldest first; after them, those in `spill`.
    memory: VecDeque<Entry>,
    memory_bytes: usize,
    spill: Option<Spill>,
    /// How many reports at the front of `memory` went out on the current connection.
    sent: usize,
    /// Log text kept per build, for the cap; and whether the cap's notice was kept.
    log_bytes: HashMap<BuildId, (usize, bool)>,
    /// Log text dropped past the cap since the last [`Journal::take_dropped`].
    dropped: usize,
    /// Builds whose BuildFinished has been kept: no report of theirs comes after it.
    finished: std::collections::HashSet<BuildId>,
}

impl Journal {
    /// An empty journal that spills to `spill_path` when memory is full.
    pub fn new(spill_path: PathBuf) -> Journal {
        Journal {
            spill_path,
            next_seq: HashMap::new(),
            acked: HashMap::new(),
            memory: VecDeque::new(),
            memory_bytes: 0,
            spill: None,
            sent: 0,
            log_bytes: HashMap::new(),
            finished: std::collections::HashSet::new(),
            dropped: 0,
        }
    }

    /// Numbers a report about a build and keeps it until acknowledged. Log text past the
    /// build's cap is dropped (once, a notice takes its place). Reports that are not about a
    /// build (heartbeats, notices) are not journaled: callers send those directly.
    pub fn push(&mut self, msg: AgentMsg) -> Result<(), JournalError> {
        let Some((build, _)) = msg.sequenced() else { return Ok(()) };
        let msg = match msg {
            AgentMsg::Log { build, step, text, .. } => {
                let (bytes, noticed) = self.log_bytes.entry(build).or_insert((0, false));
                if *bytes + text.len() > MAX_LOG_BYTES {
                    self.dropped += text.len();
                    if *noticed {
                        return Ok(());
                    }
                    *noticed = true;
                    let notice = format!("\n[paddock: log truncated at {} MiB]\n", MAX_LOG_BYTES / (1024 * 1024));
                    AgentMsg::Log { build, seq: 0, step, text: notice }
                } else {
                    *bytes += text.len();
                    AgentMsg::Log { build, seq: 0, step, text }
                }
            }
            other => other,
        };
        if matches!(msg, AgentMsg::BuildFinished { .. }) {
            self.finished.insert(build);
        }
        let next = self.next_seq.entry(build).or_insert(1);
        let seq = *next;
        *next += 1;
        let text = serde_json::to_string(&msg.with_seq(seq))?;
        self.keep(Entry { build, seq, text })
    }

    fn keep(&mut self, entry: Entry) -> Result<(), JournalError> {
        if self.spill.is_none() && self.memory_bytes + entry.text.len() <= MEMORY_BYTES {
            self.memory_bytes += entry.text.len();
            self.memory.push_back(entry);
            return Ok(());
        }
        let err = |source| JournalError::Spill { path: self.spill_path.clone(), source };
        if self.spill.is_none() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.spill_path)
                .map_err(err)?;
            self.spill = Some(Spill { path: self.spill_path.clone(), file, read_at: 0, count: 0 });
        }
        if let Some(spill) = self.spill.as_mut() {
            spill.file.seek(SeekFrom::End(0)).and_then(|_| writeln!(spill.file, "{}", entry.text)).map_err(err)?;
            spill.count += 1;
        }
        Ok(())
    }

    /// Forgets what `ack` covers, and brings spilled reports back into memory as room frees.
    pub fn ack(&mut self, ack: Ack) -> Result<(), JournalError> {
        let acked = self.acked.entry(ack.build).or_insert(0);
        *acked = (*acked).max(ack.seq);
        // Acknowledgements arrive in order, so what they cover is at the front.
        while let Some(front) = self.memory.front() {
            if self.acked.get(&front.build).is_some_and(|a| *a >= front.seq) {
                self.memory_bytes -= front.text.len();
                self.memory.pop_front();
                self.sent = self.sent.saturating_sub(1);
            } else {
                break;
            }
        }
        self.refill()
    }

    /// Moves spilled reports back into memory while there is room.
    fn refill(&mut self) -> Result<(), JournalError> {
        let Some(spill) = self.spill.as_mut() else { return Ok(()) };
        let err = |source| JournalError::Spill { path: spill.path.clone(), source };
        spill.file.seek(SeekFrom::Start(spill.read_at)).map_err(err)?;
        let mut reader = BufReader::new(&spill.file);
        while spill.count > 0 && self.memory_bytes < MEMORY_BYTES {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|source| JournalError::Spill { path: spill.path.clone(), source })?;
            if n == 0 {
                break;
            }
            spill.read_at += n as u64;
            spill.count -= 1;
            let text = line.trim_end_matches('\n').to_string();
            let (build, seq) = serde_json::from_str::<AgentMsg>(&text)?.sequenced().unwrap_or((BuildId(0), 0));
            self.memory_bytes += text.len();
            self.memory.push_back(Entry { build, seq, text });
        }
        if spill.count == 0 {
            let path = spill.path.clone();
            self.spill = None;
            if let Err(source) = std::fs::remove_file(&path) {
                return Err(JournalError::Spill { path, source });
            }
        }
        Ok(())
    }

    /// A new connection: everything kept is unsent on it.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// The next report to send on this connection, if any (memory only: spilled reports are
    /// sent once acknowledgements bring them back).
    pub fn next_unsent(&self) -> Option<&str> {
        self.memory.get(self.sent).map(|e| e.text.as_str())
    }

    /// The report [`Journal::next_unsent`] gave went out.
    pub fn mark_sent(&mut self) {
        self.sent = (self.sent + 1).min(self.memory.len());
    }

    /// Reports kept (in memory and on disk).
    pub fn len(&self) -> usize {
        self.memory.len() + self.spill.as_ref().map_or(0, |s| s.count)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Log bytes dropped past the cap since the last call.
    pub fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }

    /// Builds whose BuildFinished is kept and whose reports are all acknowledged are
    /// forgotten, so the maps stay as small as the work in flight. Not before: a job that has
    /// ended may still have reports on their way to the journal, and a forgotten build would
    /// number them from 1 again, which the master drops as already stored.
    pub fn forget_done(&mut self) {
        let kept: std::collections::HashSet<BuildId> = self.memory.iter().map(|e| e.build).collect();
        let spilled = self.spill.is_some();
        let finished = std::mem::take(&mut self.finished);
        let keep = |b: &BuildId| !finished.contains(b) || kept.contains(b) || spilled;
        self.next_seq.retain(|b, _| keep(b));
        self.acked.retain(|b, _| keep(b));
        self.log_bytes.retain(|b, _| keep(b));
        let still: std::collections::HashSet<BuildId> = finished.iter().filter(|b| keep(b)).copied().collect();
        self.finished = still;
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(spill) = self.spill.take() {
            let _ = std::fs::remove_file(&spill.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{BuildResult, StepResult};

    fn log(build: BuildId, text: &str) -> AgentMsg {
        AgentMsg::Log { build, seq: 0, step: 1, text: text.to_string() }
    }

    fn drain(j: &mut Journal) -> Vec<AgentMsg> {
        let mut out = Vec::new();
        while let Some(text) = j.next_unsent() {
            out.push(serde_json::from_str::<AgentMsg>(text).expect("decodes"));
            j.mark_sent();
        }
        out
    }

    #[test]
    fn reports_are_numbered_per_build_and_kept_until_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::new(dir.path().join("spill"));
        j.push(AgentMsg::StepStarted { build: BuildId(7), seq: 0, step: 0 }).expect("push");
        j.push(log(BuildId(7), "a\n")).expect("push");
        j.push(AgentMsg::Heartbeat).expect("not journaled");
        j.push(AgentMsg::StepFinished {
            build: BuildId(7),
            seq: 0,
            step: 0,
            result: StepResult::Success,
            exit_code: Some(0),
        })
        .expect("push");
        let sent = drain(&mut j);
        assert_eq!(
            sent.iter().map(|m| m.sequenced()).collect::<Vec<_>>(),
            [Some((BuildId(7), 1)), Some((BuildId(7), 2)), Some((BuildId(7), 3))]
        );
        assert_eq!(drain(&mut j), []);

        // The connection dies before the master acknowledged the last one: sent again.
        j.ack(Ack { build: BuildId(7), seq: 2 }).expect("ack");
        j.rewind();
        assert_eq!(drain(&mut j).iter().map(|m| m.sequenced()).collect::<Vec<_>>(), [Some((BuildId(7), 3))]);
        j.ack(Ack { build: BuildId(7), seq: 3 }).expect("ack");
        assert!(j.is_empty());

        // A new build counts from 1.
        j.push(AgentMsg::BuildFinished { build: BuildId(8), seq: 0, result: BuildResult::Success }).expect("push");
        assert_eq!(drain(&mut j).first().and_then(AgentMsg::sequenced), Some((BuildId(8), 1)));
    }

    #[test]
    fn a_build_is_forgotten_only_after_its_end_is_kept_and_acknowledged() {
        // The job ended, but its last reports are still on their way when an ack for the
        // earlier ones arrives: their numbers must carry on, not start again from 1.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::new(dir.path().join("spill"));
        j.push(AgentMsg::StepStarted { build: BuildId(7), seq: 0, step: 1 }).expect("push");
        drain(&mut j);
        j.ack(Ack { build: BuildId(7), seq: 1 }).expect("ack");
        j.forget_done();
        j.push(AgentMsg::StepFinished {
            build: BuildId(7),
            seq: 0,
            step: 1,
            result: StepResult::Success,
            exit_code: Some(0),
        })
        .expect("push");
        j.push(AgentMsg::BuildFinished { build: BuildId(7), seq: 0, result: BuildResult::Success }).expect("push");
        let sent = drain(&mut j);
        assert_eq!(
            sent.iter().map(|m| m.sequenced()).collect::<Vec<_>>(),
            [Some((BuildId(7), 2)), Some((BuildId(7), 3))]
        );
        j.ack(Ack { build: BuildId(7), seq: 3 }).expect("ack");
        j.forget_done();
        assert!(j.next_seq.is_empty() && j.finished.is_empty(), "a finished, acknowledged build is forgotten");
    }

    #[test]
    fn past_memory_reports_spill_to_disk_and_come_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = dir.path().join("spill");
        let mut j = Journal::new(spill.clone());
        let line = "x".repeat(64 * 1024);
        let n = 2 * MEMORY_BYTES / line.len();
        for _ in 0..n {
            j.push(log(BuildId(3), &line)).expect("push");
        }
        assert!(spill.exists(), "memory full: the rest went to disk");
        assert_eq!(j.len(), n);
        let mut seen = Vec::new();
        while !j.is_empty() {
            let batch = drain(&mut j);
            assert!(!batch.is_empty(), "acks bring spilled reports back");
            let last = batch.last().and_then(AgentMsg::sequenced).expect("sequenced");
            seen.extend(batch.iter().filter_map(AgentMsg::sequenced).map(|(_, s)| s));
            j.ack(Ack { build: last.0, seq: last.1 }).expect("ack");
        }
        assert_eq!(seen, (1..=n as u64).collect::<Vec<_>>());
        assert!(!spill.exists(), "the spill file goes once drained");
    }

    #[test]
    fn log_past_the_cap_is_dropped_but_results_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::new(dir.path().join("spill"));
        let chunk = "y".repeat(1024 * 1024);
        for _ in 0..(MAX_LOG_BYTES / chunk.len() + 3) {
            j.push(log(BuildId(1), &chunk)).expect("push");
        }
        j.push(AgentMsg::BuildFinished { build: BuildId(1), seq: 0, result: BuildResult::Success }).expect("push");
        assert_eq!(j.take_dropped(), 3 * chunk.len());
        // Cap's worth of chunks, one notice, the result.
        assert_eq!(j.len(), MAX_LOG_BYTES / chunk.len() + 2);
        let mut last = None;
        let mut notices = 0;
        while !j.is_empty() {
            let batch = drain(&mut j);
            for m in &batch {
                if matches!(m, AgentMsg::Log { text, .. } if text.contains("log truncated")) {
                    notices += 1;
                }
                last = Some(m.clone());
            }
            let (b, s) = batch.last().and_then(AgentMsg::sequenced).expect("sequenced");
            j.ack(Ack { build: b, seq: s }).expect("ack");
        }
        assert_eq!(notices, 1);
        assert!(matches!(last, Some(AgentMsg::BuildFinished { build: BuildId(1), .. })));
    }
}
