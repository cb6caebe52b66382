//! The console, a build (with its live log), changes, builders, and the build actions' forms.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use futures_util::stream::{self, Stream, StreamExt};
use maud::{html, Markup, PreEscaped};
use serde::Deserialize;

use super::{badge, duration, first_line, layout, may_act, may_view, seconds_between, when, PageError, PageResult};
use crate::accounts::Role;
use crate::core::BuildId;
use crate::runtime::Shared;
use crate::store::{BuildFilter, BuildRow, StepRow};
use crate::web::actions;
use crate::web::auth::Caller;

/// Most log text shown in the page (the download has the rest).
const INLINE_LOG: usize = 1024 * 1024;

/// Recent changes the console shows.
const CONSOLE_CHANGES: i64 = 25;

/// `GET /`: builders × branches with the latest result of each, then the newest changes with
/// their builds per builder.
pub async fn console(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let latest = s.store.latest_per_builder_branch().await?;
    let builders: Vec<&str> = s.config.builders.iter().map(|b| b.name.as_str()).collect();
    // Branches by their newest build, newest first.
    let mut branches: Vec<&str> = Vec::new();
    let mut cell: HashMap<(&str, &str), &BuildRow> = HashMap::new();
    for b in &latest {
        if !branches.contains(&b.branch.as_str()) {
            branches.push(&b.branch);
        }
        cell.insert((b.builder.as_str(), b.branch.as_str()), b);
    }
    let changes = s.store.list_changes(None, None, CONSOLE_CHANGES).await?;
    let revisions: Vec<(String, String)> = changes.iter().map(|c| (c.repo.clone(), c.revision.clone())).collect();
    let of_changes = s.store.builds_of_revisions(&revisions).await?;
    // Newest attempt first: the first seen per (revision, builder, branch) wins.
    let mut by_change: HashMap<(&str, &str, &str), &BuildRow> = HashMap::new();
    for b in &of_changes {
        by_change.entry((b.revision.as_str(), b.builder.as_str(), b.branch.as_str())).or_insert(b);
    }
    let body = html! {
        (force_form(&s, &caller))
        h2 { "Latest build per branch" }
        @if latest.is_empty() {
            p.muted { "No builds yet. Push to a watched branch, or force a build." }
        } @else {
            table #console {
                thead { tr { th { "Branch" } @for b in &builders { th { (b) } } } }
                tbody {
                    @for br in &branches {
                        tr {
                            th { (br) }
                            @for b in &builders {
                                td {
                                    @if let Some(build) = cell.get(&(*b, *br)) {
                                        (badge(build.id, build.state.as_str(), &format!("build {} at {}", build.id, short(&build.revision))))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Newest changes" }
        @if changes.is_empty() {
            p.muted { "No changes seen yet." }
        } @else {
            table #changes {
                thead { tr { th { "Revision" } th { "Branch" } th { "Author" } th { "Message" } @for b in &builders { th { (b) } } } }
                tbody {
                    @for c in &changes {
                        tr {
                            td { code { (short(&c.revision)) } }
                            td { (c.branch) }
                            td { (c.author) }
                            td.message { (first_line(&c.message)) }
                            @for b in &builders {
                                td {
                                    @if let Some(build) = by_change.get(&(c.revision.as_str(), *b, c.branch.as_str())) {
                                        (badge(build.id, build.state.as_str(), &format!("build {}", build.id)))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&s, &caller, "Console", body).into_response())
}

fn short(rev: &str) -> &str {
    rev.get(..10).unwrap_or(rev)
}

/// The force form, for committers.
fn force_form(s: &Shared, caller: &Caller) -> Markup {
    html! {
        @if caller.can(Role::Committer) {
            form.force #force method="post" action="/force" {
                input type="hidden" name="csrf" value=(caller.csrf());
                label { "Builder " select name="builder" { @for b in &s.config.builders { option value=(b.name) { (b.name) } } } }
                label { "Branch " input type="text" name="branch" value="main" required; }
                label { "Revision " input type="text" name="revision" placeholder="branch head"; }
                button type="submit" { "Force build" }
            }
        }
    }
}

/// `GET /builds/{id}`: facts, changes, steps, log (live while running), actions.
pub async fn build(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri, Path(id): Path<BuildId>) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let b =
        s.store.build(id).await?.ok_or_else(|| PageError::Status(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let steps = s.store.steps(id).await?;
    let changes = s.store.build_changes(id).await?;
    let next_attempt = s.store.next_attempt(id).await?;
    let (chunks, cut) = s.store.log_tail(id, INLINE_LOG).await?;
    let last = chunks.last().map_or(0, |c| c.id);
    let live = b.state.is_live();
    let now = s.now();
    let body = html! {
        table.facts #facts {
            tr { td { "State" } td { span #state class={ "state " (b.state) } { (b.state) } } }
            tr { td { "Builder" } td { (b.builder) } }
            tr { td { "Branch" } td { (b.branch) } }
            tr { td { "Revision" } td { code { (b.revision) } } }
            tr { td { "Reason" } td { (b.reason) } }
            tr { td { "Attempt" } td { (b.attempt) } }
            tr { td { "Machine" } td { @if let Some(m) = b.machine { (m) } } }
            tr { td { "Queued" } td { (when(&b.queued_at)) } }
            @if let Some(t) = &b.started_at { tr { td { "Started" } td { (when(t)) } } }
            @if let Some(t) = &b.finished_at { tr { td { "Finished" } td { (when(t)) } } }
            @if let Some(who) = b.cancelled_by.as_ref().filter(|_| b.state == crate::core::build::BuildState::Cancelled) { tr { td { "Cancelled by" } td { (who) } } }
            @if let Some(next) = next_attempt { tr { td { "Retried as" } td { a #next-attempt href={ "/builds/" (next) } { "build " (next) } } } }
        }
        @if caller.can(Role::Committer) {
            p #actions {
                form.inline method="post" action={ "/builds/" (id) "/rebuild" } {
                    input type="hidden" name="csrf" value=(caller.csrf());
                    button #rebuild type="submit" { "Rebuild" }
                }
                @if live {
                    " "
                    form.inline method="post" action={ "/builds/" (id) "/cancel" } {
                        input type="hidden" name="csrf" value=(caller.csrf());
                        button #cancel type="submit" { "Cancel" }
                    }
                }
            }
        }
        h2 { "Changes" }
        @if changes.is_empty() {
            p.muted { "No recorded change for this revision." }
        } @else {
            table #build-changes {
                thead { tr { th { "Revision" } th { "Author" } th { "Message" } th { "Files" } } }
                tbody {
                    @for c in &changes {
                        tr {
                            td { code { (short(&c.revision)) } }
                            td { (c.author) }
                            td { pre.message { (c.message) } }
                            td { (c.files.len()) }
                        }
                    }
                }
            }
        }
        h2 { "Steps" }
        div #steps { (steps_table(&steps, now)) }
        h2 { "Log " a #download href={ "/builds/" (id) "/log.txt" } { "(download)" } }
        @if cut { p.muted #log-cut { "Showing the end of the log; the download has all of it." } }
        pre.log #log { @for c in &chunks { (c.text) } }
        @if live {
            script { (PreEscaped(live_js(id, last))) }
        }
    };
    Ok(layout(&s, &caller, &format!("Build {id}"), body).into_response())
}

/// The steps with their durations and results.
fn steps_table(steps: &[StepRow], now: crate::core::Ts) -> Markup {
    html! {
        table {
            thead { tr { th { "#" } th { "Step" } th { "Result" } th.num { "Duration" } } }
            tbody {
                @for st in steps {
                    tr {
                        td.num { (st.index) }
                        td { (st.name) }
                        td { span class={ "state " (st.state) } { (st.state) } }
                        td.num {
                            @if let Some(start) = &st.started_at {
                                @if let Some(secs) = seconds_between(start, st.finished_at.as_deref(), now) { (duration(secs)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Follows the log while the build runs: text appended as text (never parsed as HTML), the
/// steps table replaced by the server's rendering, and a reload once the build ends.
fn live_js(id: BuildId, after: i64) -> String {
    format!(
        r#"(function () {{
  var log = document.getElementById('log');
  var es = new EventSource('/builds/{id}/log/stream?after={after}');
  es.addEventListener('log', function (e) {{
    var follow = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    log.appendChild(document.createTextNode(JSON.parse(e.data)));
    log.scrollTop = log.scrollHeight;
    if (follow) {{ window.scrollTo(0, document.body.scrollHeight); }}
  }});
  es.addEventListener('steps', function (e) {{ document.getElementById('steps').innerHTML = e.data; }});
  es.addEventListener('state', function (e) {{
    var st = document.getElementById('state');
    st.textContent = e.data; st.className = 'state ' + e.data;
  }});
  es.addEventListener('done', function () {{ es.close(); window.location.reload(); }});
}})();"#
    )
}

/// Query of the log stream.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    after: Option<i64>,
}

/// How often the stream looks for new log text.
const STREAM_POLL: Duration = Duration::from_millis(250);
/// Log text sent per poll at most (about): a page opened on a long log catches up in slices.
const LOG_POLL_BYTES: usize = 1 << 20;

/// `GET /builds/{id}/log/stream?after=N` (server-sent events): `log` (new text, JSON string),
/// `steps` (the steps table's HTML), `state` (when it changes) and `done` (the build ended).
/// The event id is the last log chunk sent, so a reconnecting browser resumes where it was.
pub async fn log_stream(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<BuildId>,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, PageError> {
    may_view(&s, &caller, &uri)?;
    s.store.build(id).await?.ok_or_else(|| PageError::Status(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let start =
        Follow { after: resume.or(q.after).unwrap_or(0), state: String::new(), steps: String::new(), done: false };
    let stream = stream::unfold((s, start, true), move |(s, mut f, first)| async move {
        // Ended, or the master has stopped: a page left open must not hold the exit up. (While
        // it drains, running builds still log, so their pages follow on.)
        if f.done || s.web_closing.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        if !first {
            tokio::time::sleep(STREAM_POLL).await;
        }
        let mut events = Vec::new();
        let (chunks, more) = s.store.log_after(id, f.after, 1000, LOG_POLL_BYTES).await.unwrap_or_default();
        if let Some(last) = chunks.last() {
            f.after = last.id;
            let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
            events.push(Event::default().event("log").id(f.after.to_string()).data(json_string(&text)));
        }
        if let Ok(Some(b)) = s.store.build(id).await {
            let steps = steps_table(&s.store.steps(id).await.unwrap_or_default(), s.now()).into_string();
            if steps != f.steps {
                events.push(Event::default().event("steps").data(steps.clone()));
                f.steps = steps;
            }
            if b.state.as_str() != f.state {
                events.push(Event::default().event("state").data(b.state.as_str()));
                f.state = b.state.as_str().to_string();
            }
            // Ended, and every line it wrote has been sent.
            if !b.state.is_live() && !more {
                events.push(Event::default().event("done").data(b.state.as_str()));
                f.done = true;
            }
        }
        Some((stream::iter(events.into_iter().map(Ok)), (s, f, false)))
    })
    .flatten();
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where a log stream is.
struct Follow {
    after: i64,
    state: String,
    steps: String,
    done: bool,
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// `GET /builds/{id}/log.txt`: the whole log as a file.
pub async fn log_download(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    uri: Uri,
    Path(id): Path<BuildId>,
) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let b =
        s.store.build(id).await?.ok_or_else(|| PageError::Status(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let log = s.store.log(id).await?;
    let name = format!("attachment; filename=\"build-{}-{}.log\"", b.id, b.builder.replace(['"', '\\'], "_"));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()), (header::CONTENT_DISPOSITION, name)], log)
        .into_response())
}

/// `GET /changes`: the newest changes and their builds.
pub async fn changes(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let changes = s.store.list_changes(None, None, 100).await?;
    let revisions: Vec<(String, String)> = changes.iter().map(|c| (c.repo.clone(), c.revision.clone())).collect();
    let builds = s.store.builds_of_revisions(&revisions).await?;
    let mut of: HashMap<(&str, &str), Vec<&BuildRow>> = HashMap::new();
    for b in &builds {
        of.entry((b.revision.as_str(), b.branch.as_str())).or_default().push(b);
    }
    let body = html! {
        table #change-list {
            thead { tr { th { "When" } th { "Repository" } th { "Branch" } th { "Revision" } th { "Author" } th { "Message" } th { "Files" } th { "Builds" } } }
            tbody {
                @for c in &changes {
                    tr {
                        td { (when(c.committed_at.as_deref().unwrap_or(&c.created_at))) }
                        td { (c.repo) }
                        td { (c.branch) }
                        td { code { (short(&c.revision)) } }
                        td { (c.author) }
                        td.message { (first_line(&c.message)) }
                        td.num { (c.files.len()) }
                        td {
                            @for b in of.get(&(c.revision.as_str(), c.branch.as_str())).map(Vec::as_slice).unwrap_or(&[]) {
                                (badge(b.id, b.state.as_str(), &b.builder)) " "
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&s, &caller, "Changes", body).into_response())
}

/// `GET /builders`: each builder, its settings and its latest builds.
pub async fn builders(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let mut recent: BTreeMap<&str, Vec<BuildRow>> = BTreeMap::new();
    for b in &s.config.builders {
        let f = BuildFilter { builder: Some(b.name.clone()), limit: Some(10), ..Default::default() };
        recent.insert(&b.name, s.store.list_builds(&f).await?);
    }
    let body = html! {
        (force_form(&s, &caller))
        table #builder-list {
            thead { tr { th { "Builder" } th { "Repository" } th { "Pool" } th { "Branches" } th { "Steps" } th { "Latest builds" } } }
            tbody {
                @for b in &s.config.builders {
                    tr {
                        td { (b.name) }
                        td { (b.repo) }
                        td { (b.pool) }
                        td { @if b.branches.is_empty() { span.muted { "any" } } @else { (b.branches.join(", ")) } }
                        td { (b.steps.iter().map(|st| st.name.as_str()).collect::<Vec<_>>().join(" → ")) }
                        td { @for r in recent.get(b.name.as_str()).map(Vec::as_slice).unwrap_or(&[]) { (badge(r.id, r.state.as_str(), &r.branch)) " " } }
                    }
                }
            }
        }
    };
    Ok(layout(&s, &caller, "Builders", body).into_response())
}

/// The force form's fields.
#[derive(Debug, Deserialize)]
pub struct ForceForm {
    #[serde(default)]
    csrf: String,
    builder: String,
    branch: String,
    #[serde(default)]
    revision: String,
}

/// `POST /force`: queue the build, then show it.
pub async fn force(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<ForceForm>) -> PageResult {
    may_act(&s, &caller, Role::Committer, &f.csrf, "/")?;
    let build = actions::force(&s, &caller, &f.builder, &f.branch, Some(f.revision), None).await?;
    Ok(Redirect::to(&format!("/builds/{}", build.id)).into_response())
}

/// A form with only its CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// `POST /builds/{id}/rebuild`: queue it again, then show the new build.
pub async fn rebuild(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<BuildId>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    may_act(&s, &caller, Role::Committer, &f.csrf, &format!("/builds/{id}"))?;
    let build = actions::rebuild(&s, &caller, id).await?;
    Ok(Redirect::to(&format!("/builds/{}", build.id)).into_response())
}

/// `POST /builds/{id}/cancel`: cancel it, then show it.
pub async fn cancel(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<BuildId>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    may_act(&s, &caller, Role::Committer, &f.csrf, &format!("/builds/{id}"))?;
    actions::cancel(&s, &caller, id).await?;
    Ok(Redirect::to(&format!("/builds/{id}")).into_response())
}
