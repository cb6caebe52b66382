//! Notifications: who hears about a build, when, and what they are told.
//!
//! A build's start and end reach an outbox in the store in the same transaction as the state
//! change. [`worker`] turns each outbox row into deliveries — one per notifier that wants the
//! event, deduplicated by (notifier, build, event) — and sends them with retries, apart from the
//! master's loop, so a notifier that is down never holds a build up. Deciding what to say is
//! pure ([`plan`]); sending is the adapters' job ([`webhook`]).

pub mod email;
pub mod github;
pub mod irc;
pub mod webhook;
pub mod worker;

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::{Notifier, NotifyOn};
use crate::store::{BuildRow, NewDelivery};

pub use crate::config::template::FIELDS;

/// The default message of each event.
pub fn default_template(event: NotifyOn) -> &'static str {
    match event {
        NotifyOn::Started => "{builder} started on {branch} at {short_revision} ({committer}): {url}",
        NotifyOn::Finished => "{builder} on {branch}: {result} at {short_revision} ({committer}): {url}",
        NotifyOn::Transition => {
            "{builder} on {branch} is now {result} (was {previous}) at {short_revision} by {committer}: {url}"
        }
    }
}

/// The default body of an email (its first line is the event's default message).
pub fn default_email(event: NotifyOn) -> String {
    format!(
        "{}\n\nBuilder: {{builder}}\nBranch: {{branch}}\nRevision: {{revision}}\nCommitters: {{committers}}\n\
         Result: {{result}} (previous: {{previous}})\nFailing step: {{failing_step}}\nBuild: {{url}}\n\n\
         The end of the log:\n{{log_tail}}\n",
        default_template(event)
    )
}

/// Whether a build's result is news: passing after failing, failing after passing, or a first
/// build that fails. Cancelled builds and retried attempts are no result.
pub fn is_transition(previous: Option<&str>, result: &str) -> bool {
    let failing = |r: &str| matches!(r, "failure" | "exception");
    match (previous, result) {
        (_, r) if !matches!(r, "success" | "failure" | "exception") => false,
        (None, r) => failing(r),
        (Some(p), r) => failing(p) != failing(r),
    }
}

/// What is known about a build when its event is planned.
#[derive(Debug, Clone)]
pub struct Facts {
    pub build: BuildRow,
    /// The previous result of its builder and branch (for finished builds): the latest of the
    /// builds asked for before this one.
    pub previous: Option<String>,
    /// A build asked for after this one, on the same builder and branch, finished first: this
    /// result is old news and no transition.
    pub superseded: bool,
    /// Authors of the build's changes, newest first, without repeats.
    pub committers: Vec<String>,
    /// The first step that did not succeed, for a failed build.
    pub failing_step: Option<String>,
    /// The build's page.
    pub url: String,
    /// The last lines of the build's log (for mail; empty when no notifier needs it).
    pub log_tail: String,
}

impl Facts {
    /// Whether this finished build changed its builder and branch between passing and failing.
    pub fn is_transition(&self) -> bool {
        !self.superseded && is_transition(self.previous.as_deref(), self.build.state.as_str())
    }

    fn fields(&self, event: NotifyOn) -> BTreeMap<String, String> {
        let b = &self.build;
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            f.insert(k.to_string(), v);
        };
        put("event", event.as_str().to_string());
        put("id", b.id.to_string());
        put("builder", b.builder.clone());
        put("repo", b.repo.clone());
        put("branch", b.branch.clone());
        put("revision", b.revision.clone());
        put("short_revision", b.revision.chars().take(10).collect());
        put("result", b.state.as_str().to_string());
        put("previous", self.previous.clone().unwrap_or_else(|| "nothing".into()));
        put("committer", self.committers.first().cloned().unwrap_or_else(|| "nobody".into()));
        put("committers", self.committers.join(", "));
        put("reason", b.reason.clone());
        put("failing_step", self.failing_step.clone().unwrap_or_default());
        put("url", self.url.clone());
        put("log_tail", self.log_tail.clone());
        f
    }
}

/// Renders a template: placeholders replaced, newlines kept.
pub fn render(template: &str, fields: &BTreeMap<String, String>) -> String {
    crate::config::template::substitute(template, fields)
}

/// Which events of `kind` (`started` or `finished`) a build gives rise to.
pub fn events_of(kind: &str, facts: &Facts) -> Vec<NotifyOn> {
    match kind {
        "started" => vec![NotifyOn::Started],
        "finished" => {
            let mut v = vec![NotifyOn::Finished];
            if facts.is_transition() {
                v.push(NotifyOn::Transition);
            }
            v
        }
        _ => Vec::new(),
    }
}

fn matches(globs: &[String], value: &str) -> bool {
    globs.is_empty() || crate::changes::git::branch_matches(globs, value)
}

/// The deliveries an outbox row of `kind` makes: one per notifier and event it wants.
pub fn plan(notifiers: &[Notifier], kind: &str, facts: &Facts) -> Vec<NewDelivery> {
    let events = events_of(kind, facts);
    let mut out = Vec::new();
    for n in notifiers {
        if !matches(&n.builders, &facts.build.builder) || !matches(&n.branches, &facts.build.branch) {
            continue;
        }
        for &event in events.iter().filter(|e| n.events.contains(e)) {
            let fields = facts.fields(event);
            let default = match n.kind {
                crate::config::NotifierKind::Email { .. } => default_email(event),
                _ => default_template(event).to_string(),
            };
            let text = render(n.template.as_deref().unwrap_or(&default), &fields);
            let mut body = payload(n, event, facts, &text);
            match &n.kind {
                crate::config::NotifierKind::GitHub { context, .. } => {
                    body["context"] = render(context, &fields).into()
                }
                crate::config::NotifierKind::Email { subject, to, committers, committer_domains, .. } => {
                    body["subject"] = render(subject, &fields).into();
                    let committers = committers.then_some(facts.committers.as_slice());
                    body["recipients"] = email::recipients(to, committers, committer_domains).into();
                }
                _ => {}
            }
            out.push(NewDelivery {
                notifier: n.name.clone(),
                build: facts.build.id,
                event: event.as_str().to_string(),
                payload: body.to_string(),
            });
        }
    }
    out
}

/// The JSON a delivery carries: the message, and the facts for receivers that want them.
fn payload(n: &Notifier, event: NotifyOn, facts: &Facts, text: &str) -> serde_json::Value {
    let b = &facts.build;
    let transition = facts.is_transition() && event != NotifyOn::Started;
    json!({
        "event": event.as_str(),
        "notifier": n.name,
        "text": text,
        "build": {
            "id": b.id,
            "builder": b.builder,
            "repo": b.repo,
            "branch": b.branch,
            "revision": b.revision,
            "state": b.state,
            "attempt": b.attempt,
            "reason": b.reason,
            "queued_at": b.queued_at,
            "started_at": b.started_at,
            "finished_at": b.finished_at,
            "url": facts.url,
        },
        "previous": facts.previous,
        "superseded": facts.superseded,
        "transition": transition.then(|| json!({"from": facts.previous, "to": b.state})),
        "committers": facts.committers,
        "failing_step": facts.failing_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{BuildId, MachineId};

    fn facts(state: &str, previous: Option<&str>) -> Facts {
        Facts {
            build: BuildRow {
                id: BuildId(42),
                request: 7,
                builder: "py3.12-sqlite".into(),
                repo: "app".into(),
                branch: "main".into(),
                revision: "0123456789abcdef0123456789abcdef01234567".into(),
                state: crate::core::build::BuildState::parse(state)
                    .unwrap_or(crate::core::build::BuildState::Exception),
                machine: Some(MachineId(3)),
                attempt: 1,
                reason: "change 9 on main".into(),
                queued_at: "2026-11-25T10:00:00.000Z".into(),
                started_at: Some("2026-11-25T10:00:05.000Z".into()),
                finished_at: Some("2026-11-25T10:03:00.000Z".into()),
                cancelled_by: None,
            },
            previous: previous.map(str::to_string),
            superseded: false,
            committers: vec!["Ada Tester <ada@example.com>".into(), "Bob <bob@example.com>".into()],
            failing_step: (state == "failure").then(|| "pytest".to_string()),
            url: "http://ci.example.com/builds/42".into(),
            log_tail: "collected 3 items\nFAILED test_x\n".into(),
        }
    }

    fn notifier(events: &[NotifyOn], template: Option<&str>) -> Notifier {
        Notifier {
            name: "hook".into(),
            kind: crate::config::NotifierKind::Webhook { url: "http://x/".into(), secret_env: None, ca_file: None },
            events: events.to_vec(),
            builders: vec![],
            branches: vec![],
            template: template.map(str::to_string),
        }
    }

    fn texts(d: &[NewDelivery]) -> Vec<String> {
        d.iter()
            .map(|d| {
                let v: serde_json::Value = serde_json::from_str(&d.payload).unwrap_or_default();
                format!("{}: {}", d.event, v["text"].as_str().unwrap_or(""))
            })
            .collect()
    }

    /// The default messages, as they read (snapshots: a change here is a change users see).
    #[test]
    fn default_messages() {
        let all = [notifier(&[NotifyOn::Started, NotifyOn::Finished, NotifyOn::Transition], None)];
        assert_eq!(
            texts(&plan(&all, "started", &facts("running", None))),
            ["started: py3.12-sqlite started on main at 0123456789 (Ada Tester <ada@example.com>): http://ci.example.com/builds/42"]
        );
        assert_eq!(
            texts(&plan(&all, "finished", &facts("failure", Some("success")))),
            [
                "finished: py3.12-sqlite on main: failure at 0123456789 (Ada Tester <ada@example.com>): http://ci.example.com/builds/42",
                "transition: py3.12-sqlite on main is now failure (was success) at 0123456789 by Ada Tester <ada@example.com>: http://ci.example.com/builds/42",
            ]
        );
        assert_eq!(
            texts(&plan(&all, "finished", &facts("failure", None))),
            [
                "finished: py3.12-sqlite on main: failure at 0123456789 (Ada Tester <ada@example.com>): http://ci.example.com/builds/42",
                "transition: py3.12-sqlite on main is now failure (was nothing) at 0123456789 by Ada Tester <ada@example.com>: http://ci.example.com/builds/42",
            ]
        );
        assert_eq!(texts(&plan(&all, "finished", &facts("success", Some("success")))).len(), 1, "no news");
    }

    /// The default mail, as it reads.
    #[test]
    fn default_mail() {
        let mail = Notifier {
            kind: crate::config::NotifierKind::Email {
                host: "mail".into(),
                port: 25,
                security: crate::config::SmtpSecurity::None,
                from: "ci@example.com".into(),
                to: vec!["dev@example.com".into()],
                committers: true,
                committer_domains: Vec::new(),
                username: None,
                password_env: None,
                subject: "{builder} on {branch}: {result}".into(),
                ca_file: None,
            },
            ..notifier(&[NotifyOn::Transition], None)
        };
        let d = plan(&[mail], "finished", &facts("failure", Some("success")));
        let v: serde_json::Value = serde_json::from_str(&d[0].payload).unwrap_or_default();
        assert_eq!(v["subject"], "py3.12-sqlite on main: failure");
        assert_eq!(v["recipients"], json!(["dev@example.com", "ada@example.com", "bob@example.com"]));
        assert_eq!(
            v["text"],
            "py3.12-sqlite on main is now failure (was success) at 0123456789 by Ada Tester <ada@example.com>: http://ci.example.com/builds/42\n\
             \n\
             Builder: py3.12-sqlite\n\
             Branch: main\n\
             Revision: 0123456789abcdef0123456789abcdef01234567\n\
             Committers: Ada Tester <ada@example.com>, Bob <bob@example.com>\n\
             Result: failure (previous: success)\n\
             Failing step: pytest\n\
             Build: http://ci.example.com/builds/42\n\
             \n\
             The end of the log:\n\
             collected 3 items\n\
             FAILED test_x\n\n"
        );
    }

    #[test]
    fn templates_filters_and_payload() {
        let custom = notifier(
            &[NotifyOn::Transition],
            Some("{builder}@{branch} {previous}->{result}; step {failing_step}; by {committers}\n{reason}"),
        );
        let d = plan(std::slice::from_ref(&custom), "finished", &facts("failure", Some("success")));
        assert_eq!(
            texts(&d),
            ["transition: py3.12-sqlite@main success->failure; step pytest; by Ada Tester <ada@example.com>, Bob <bob@example.com>\nchange 9 on main"]
        );
        let v: serde_json::Value = serde_json::from_str(&d[0].payload).unwrap_or_default();
        assert_eq!(v["transition"], json!({"from": "success", "to": "failure"}));
        assert_eq!(v["build"]["url"], "http://ci.example.com/builds/42");
        assert_eq!(v["failing_step"], "pytest");
        // Builder and branch filters.
        let only_docs = Notifier { builders: vec!["docs*".into()], ..custom.clone() };
        assert!(plan(&[only_docs], "finished", &facts("failure", Some("success"))).is_empty());
        let only_stable = Notifier { branches: vec!["stable/*".into()], ..custom };
        assert!(plan(&[only_stable], "finished", &facts("failure", Some("success"))).is_empty());
    }

    #[test]
    fn transitions_are_changes_between_passing_and_failing() {
        assert!(!is_transition(None, "success"));
        assert!(is_transition(None, "failure"));
        assert!(is_transition(Some("success"), "failure"));
        assert!(is_transition(Some("success"), "exception"));
        assert!(!is_transition(Some("failure"), "failure"));
        assert!(!is_transition(Some("failure"), "exception"), "still failing");
        assert!(is_transition(Some("exception"), "success"));
        assert!(!is_transition(Some("success"), "success"));
        assert!(!is_transition(Some("success"), "cancelled"));
        assert!(!is_transition(Some("failure"), "retry"));
    }

    /// An older change finishing after a newer one says nothing: the newer result stands.
    #[test]
    fn a_superseded_result_is_no_transition() {
        let stale = Facts { superseded: true, ..facts("failure", Some("success")) };
        assert!(!stale.is_transition());
        assert_eq!(events_of("finished", &stale), [NotifyOn::Finished]);
        let news = notifier(&[NotifyOn::Transition], None);
        assert!(plan(std::slice::from_ref(&news), "finished", &stale).is_empty());
        assert_eq!(plan(&[news], "finished", &facts("failure", Some("success"))).len(), 1);
        let all = notifier(&[NotifyOn::Finished], None);
        let d = plan(&[all], "finished", &stale);
        let v: serde_json::Value = serde_json::from_str(&d[0].payload).unwrap_or_default();
        assert_eq!((v["superseded"].clone(), v["transition"].clone()), (json!(true), json!(null)));
    }
}
