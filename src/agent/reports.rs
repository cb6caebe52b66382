//! The master's side of an agent's numbered reports about one build (see [`super::protocol`]).
//!
//! Plain, synchronous bookkeeping: which report comes next, what is a repeat, and what log
//! text to store with each report. The master redacts the build's whole output once more as
//! one stream, keeping state across reports, so a secret an agent let through split over two
//! reports is still caught. Text the redactor holds back (it may be the start of a secret) is
//! not stored yet; the report it came with is stored together with the next one, so the
//! acknowledgement of a report always means "its text is in the database".

use super::protocol::{AgentMsg, MAX_LOG_BYTES};
use super::redact::Redactor;

/// Where one build's report sequence stands on this master.
#[derive(Debug, Clone)]
pub struct ReportStream {
    redactor: Redactor,
    /// The redactor as it starts, for a stream that must start again (see `resync`).
    fresh: Redactor,
    /// The last report taken in (stored, or held with its text below).
    received: u64,
    /// The last report stored.
    applied: u64,
    /// Redacted text of reports taken in but not stored yet, and its step.
    held: Option<(usize, String)>,
    /// Log bytes stored, toward the cap.
    log_bytes: usize,
    truncated: bool,
}

/// What to do with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Already taken in: acknowledge what is stored, store nothing.
    Repeat { ack: u64 },
    /// A gap: the report after `expected - 1` is missing. The connection cannot be trusted to
    /// carry the rest in order; drop it (the agent sends everything again after reconnecting).
    OutOfOrder { expected: u64 },
    /// Taken in, but its text waits for the next report; nothing to store or acknowledge yet.
    Hold,
    /// Store this report (moving the stored sequence from `after` to its own number) with
    /// `log` text, if any, at that step.
    Store { after: u64, log: Option<(usize, String)> },
}

impl ReportStream {
    /// The stream of a build whose reports are stored up to `applied`, with `log_bytes` of log
    /// text, redacting these `(name, value)` secrets.
    pub fn new(secrets: &[(String, String)], applied: u64, log_bytes: usize) -> ReportStream {
        let redactor = Redactor::new(secrets.iter().cloned());
        ReportStream {
            fresh: redactor.clone(),
            redactor,
            received: applied,
            applied,
            held: None,
            log_bytes,
            truncated: log_bytes > MAX_LOG_BYTES,
        }
    }

    /// The last report stored.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Takes in a numbered report about this build (others are the caller's business).
    pub fn accept(&mut self, msg: &AgentMsg) -> Next {
        let Some((_, seq)) = msg.sequenced() else { return Next::Repeat { ack: self.applied } };
        if seq <= self.received {
            return Next::Repeat { ack: self.applied };
        }
        if seq != self.received + 1 {
            return Next::OutOfOrder { expected: self.received + 1 };
        }
        self.received = seq;
        match msg {
            AgentMsg::Log { step, text, .. } => {
                let clean = self.redactor.push(text.as_bytes());
                let clean = self.capped(clean);
                match self.held.as_mut() {
                    Some((held_step, held)) if *held_step == *step => held.push_str(&clean),
                    // Text of another step: what was held is stored with this report, under its
                    // own step, and this report's text follows it (rare: a secret prefix at a
                    // step's very end, which the step's end report would normally flush).
                    Some((_, held)) => held.push_str(&clean),
                    None => self.held = Some((*step, clean)),
                }
                if self.redactor.holds_back() {
                    Next::Hold
                } else {
                    Next::Store { after: self.applied, log: self.held.take().filter(|(_, t)| !t.is_empty()) }
                }
            }
            // A step or the build ends or starts: nothing more of what was held can complete a
            // secret, so it all goes out with this report.
            _ => {
                let tail = self.redactor.finish();
                let tail = self.capped(tail);
                if !tail.is_empty() {
                    let step = match msg {
                        AgentMsg::StepFinished { step, .. } | AgentMsg::StepStarted { step, .. } => *step,
                        _ => self.held.as_ref().map_or(0, |(s, _)| *s),
                    };
                    self.held.get_or_insert_with(|| (step, String::new())).1.push_str(&tail);
                }
                Next::Store { after: self.applied, log: self.held.take().filter(|(_, t)| !t.is_empty()) }
            }
        }
    }

    /// The report numbered `seq` (and everything held before it) is stored.
    pub fn stored(&mut self, seq: u64) {
        self.applied = seq;
        self.received = self.received.max(seq);
    }

    /// The store says the sequence is at `applied`, not where this stream thought (another
    /// connection of the same agent stored it): start again from there.
    pub fn resync(&mut self, applied: u64) {
        self.applied = applied;
        self.received = applied;
        self.held = None;
        // What it held back belonged to reports now taken as never received.
        self.redactor = self.fresh.clone();
    }

    /// Applies the log cap to text about to be stored: past it, one notice, then nothing.
    fn capped(&mut self, text: String) -> String {
        if self.truncated {
            return String::new();
        }
        if self.log_bytes + text.len() > MAX_LOG_BYTES {
            self.truncated = true;
            return format!("\n[paddock: log truncated at {} MiB]\n", MAX_LOG_BYTES / (1024 * 1024));
        }
        self.log_bytes += text.len();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::StepResult;
    use crate::core::BuildId;

    fn log(seq: u64, text: &str) -> AgentMsg {
        AgentMsg::Log { build: BuildId(1), seq, step: 1, text: text.to_string() }
    }

    fn secrets() -> Vec<(String, String)> {
        vec![("TOKEN".to_string(), "hunter2-secret".to_string())]
    }

    #[test]
    fn reports_are_taken_once_and_in_order() {
        let mut r = ReportStream::new(&secrets(), 0, 0);
        assert_eq!(r.accept(&log(1, "a\n")), Next::Store { after: 0, log: Some((1, "a\n".into())) });
        r.stored(1);
        assert_eq!(r.accept(&log(1, "a\n")), Next::Repeat { ack: 1 });
        assert_eq!(r.accept(&log(3, "c\n")), Next::OutOfOrder { expected: 2 });
        assert_eq!(r.accept(&log(2, "b\n")), Next::Store { after: 1, log: Some((1, "b\n".into())) });
    }

    #[test]
    fn a_secret_split_over_two_reports_is_caught() {
        let mut r = ReportStream::new(&secrets(), 4, 0);
        assert_eq!(r.accept(&log(5, "token: hunter2")), Next::Hold);
        // A repeat of the held report (a new connection replays it) is not taken twice.
        assert_eq!(r.accept(&log(5, "token: hunter2")), Next::Repeat { ack: 4 });
        assert_eq!(
            r.accept(&log(6, "-secret done\n")),
            Next::Store { after: 4, log: Some((1, "token: <secret:TOKEN> done\n".into())) }
        );
        r.stored(6);
        // A false start is released at the step's end.
        assert_eq!(r.accept(&log(7, "hunter")), Next::Hold);
        let end = AgentMsg::StepFinished {
            build: BuildId(1),
            seq: 8,
            step: 1,
            result: StepResult::Success,
            exit_code: Some(0),
        };
        assert_eq!(r.accept(&end), Next::Store { after: 6, log: Some((1, "hunter".into())) });
    }

    #[test]
    fn a_stream_started_again_forgets_what_it_held_back() {
        let mut r = ReportStream::new(&secrets(), 4, 0);
        assert_eq!(r.accept(&log(5, "token hunter2")), Next::Hold);
        // Another connection stored up to 5; this one starts again from there.
        r.resync(5);
        assert_eq!(r.accept(&log(6, "ok\n")), Next::Store { after: 5, log: Some((1, "ok\n".into())) });
    }

    #[test]
    fn past_the_cap_one_notice_then_nothing() {
        let mut r = ReportStream::new(&[], 0, MAX_LOG_BYTES - 2);
        assert_eq!(r.accept(&log(1, "ab")), Next::Store { after: 0, log: Some((1, "ab".into())) });
        r.stored(1);
        match r.accept(&log(2, "cd")) {
            Next::Store { log: Some((_, text)), .. } => assert!(text.contains("log truncated"), "{text}"),
            other => panic!("expected the notice, got {other:?}"),
        }
        r.stored(2);
        assert_eq!(r.accept(&log(3, "ef")), Next::Store { after: 2, log: None });
    }
}
