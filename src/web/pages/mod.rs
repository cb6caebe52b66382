//! The web UI: server-rendered pages (maud escapes everything interpolated), forms with CSRF
//! tokens, and a little plain JavaScript for the live log. No build step.
//!
//! Pages follow the API's rules: reading needs what `[web] access` says (a logged-out visitor
//! of a login-only master is sent to the login page), actions need their role, and every form
//! carries the session's CSRF token.

mod account;
mod builds;
mod cost;
mod fleet;
mod login;
mod users;

use std::sync::Arc;

use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};

use super::auth::Caller;
use super::ApiError;
use crate::accounts::Role;
use crate::runtime::Shared;

/// The pages' routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(builds::console))
        .route("/changes", get(builds::changes))
        .route("/builders", get(builds::builders))
        .route("/builds/{id}", get(builds::build))
        .route("/builds/{id}/log/stream", get(builds::log_stream))
        .route("/builds/{id}/log.txt", get(builds::log_download))
        .route("/builds/{id}/rebuild", post(builds::rebuild))
        .route("/builds/{id}/cancel", post(builds::cancel))
        .route("/force", post(builds::force))
        .route("/machines", get(fleet::machines))
        .route("/machines/{id}/terminate", post(fleet::terminate))
        .route("/pools/{name}/pause", post(fleet::pause))
        .route("/pools/{name}/resume", post(fleet::resume))
        .route("/cost", get(cost::dashboard))
        .route("/login", get(login::form).post(login::login))
        .route("/logout", post(login::logout))
        .route("/account", get(account::show))
        .route("/account/tokens", post(account::create_token))
        .route("/account/tokens/{id}/revoke", post(account::revoke_token))
        .route("/account/password", post(account::change_password))
        .route("/account/logout-all", post(account::logout_all))
        .route("/users", get(users::list).post(users::add))
        .route("/users/{name}/role", post(users::set_role))
        .route("/users/{name}/remove", post(users::remove))
        .route("/static/paddock.css", get(css))
}

/// Why a page is not shown: a login is needed first, or a status with a reason.
#[derive(Debug)]
pub enum PageError {
    /// Send the visitor to the login page, then back to this path.
    Login(String),
    Status(StatusCode, String),
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::Status(e.status, e.reason)
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::Login(next) => Redirect::to(&format!("/login?next={}", urlencode(&next))).into_response(),
            PageError::Status(status, reason) => {
                let body = html! {
                    (DOCTYPE)
                    html lang="en" {
                        head { meta charset="utf-8"; title { "Paddock: " (status.as_u16()) } link rel="stylesheet" href="/static/paddock.css"; }
                        body {
                            main {
                                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                                p.error { (reason) }
                                p { a href="/" { "Back to the console" } }
                            }
                        }
                    }
                };
                (status, body).into_response()
            }
        }
    }
}

/// Result of a page handler.
pub type PageResult = Result<Response, PageError>;

/// Reading rights for a page at `uri`: a logged-out visitor of a login-only master is sent to
/// log in.
fn may_view(s: &Shared, caller: &Caller, uri: &Uri) -> Result<(), PageError> {
    if caller.may_view(s) {
        Ok(())
    } else {
        Err(PageError::Login(uri.path_and_query().map_or("/", |p| p.as_str()).to_string()))
    }
}

/// Rights for a form's action: the role, and the form's CSRF token.
fn may_act(s: &Shared, caller: &Caller, role: Role, csrf: &str, back: &str) -> Result<(), PageError> {
    if caller.user.is_none() {
        return Err(PageError::Login(back.to_string()));
    }
    caller.require(s, role)?;
    caller.check_csrf(csrf)?;
    Ok(())
}

/// Percent-encodes a path for a query parameter.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The page frame: navigation, who is logged in, the content.
fn layout(s: &Shared, caller: &Caller, title: &str, content: Markup) -> Markup {
    let _ = s;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Paddock: " (title) }
                link rel="stylesheet" href="/static/paddock.css";
            }
            body {
                nav {
                    a.brand href="/" { "Paddock" }
                    a href="/" { "Console" }
                    a href="/changes" { "Changes" }
                    a href="/builders" { "Builders" }
                    a href="/machines" { "Machines" }
                    @if caller.can(Role::Admin) { a href="/cost" { "Cost" } a href="/users" { "Users" } }
                    span.who {
                        @match &caller.user {
                            Some(u) => {
                                a #user href="/account" title="Your account" { (u.name) " (" (u.role) ")" }
                                form.inline method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(caller.csrf());
                                    button type="submit" { "Log out" }
                                }
                            }
                            None => { a href="/login" { "Log in" } }
                        }
                    }
                }
                main { h1 { (title) } (content) }
            }
        }
    }
}

/// A build's state as a coloured badge linking to the build.
fn badge(id: crate::core::BuildId, state: &str, title: &str) -> Markup {
    html! { a class={ "badge " (state) } href={ "/builds/" (id) } title=(title) { (state) } }
}

/// `2026-11-24T20:00:00.000Z` → `2026-11-24 20:00:00`.
fn when(ts: &str) -> String {
    ts.get(..19).map(|t| t.replace('T', " ")).unwrap_or_else(|| ts.to_string())
}

/// Seconds between two RFC 3339 times (`until` default: now).
fn seconds_between(from: &str, until: Option<&str>, now: crate::core::Ts) -> Option<f64> {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok().map(|d| d.timestamp_millis());
    let start = parse(from)?;
    let end = match until {
        Some(u) => parse(u)?,
        None => now.0,
    };
    Some((end - start).max(0) as f64 / 1000.0)
}

/// `3725` → `1h 2m 5s`.
fn duration(secs: f64) -> String {
    let s = secs.round() as i64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m {}s", s / 3600, (s % 3600) / 60, s % 60),
    }
}

/// Money as the reports print it.
fn dollars(v: f64) -> String {
    format!("${v:.4}")
}

/// The first line of a commit message.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("")
}

async fn css() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
}

const CSS: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
nav { display: flex; gap: 1em; align-items: center; padding: .6em 1em; background: #1d2330; }
nav a { color: #dfe4ee; text-decoration: none; }
nav a.brand { font-weight: bold; color: #fff; margin-right: 1em; }
nav .who { margin-left: auto; color: #dfe4ee; display: flex; gap: .6em; align-items: center; }
main { padding: 1em 1.5em; }
h1 { font-size: 1.4em; margin: .2em 0 .6em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #d9dde5; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #eef0f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; min-width: 5.5em; padding: .1em .4em; border-radius: 3px; text-align: center;
  color: #fff; text-decoration: none; font-size: .9em; background: #8a93a6; }
.success { background: #2f9e44; } .failure { background: #d9363e; } .exception { background: #9c36b5; }
.running { background: #e8a317; } .queued { background: #4c8bd6; } .retry { background: #f08c00; }
.cancelled, .skipped, .pending { background: #8a93a6; } .timeout { background: #c2255c; }
.state { color: #fff; padding: .1em .5em; border-radius: 3px; }
pre.log { background: #10141c; color: #e1e6ef; padding: .8em; overflow-x: auto; max-height: 70vh; white-space: pre-wrap; }
form.inline { display: inline; margin: 0; }
button { cursor: pointer; }
.error { color: #b42318; font-weight: bold; }
.notice { background: #fff8db; border: 1px solid #e6c200; padding: .4em .8em; margin: .6em 0; }
.notice pre { margin: .3em 0; user-select: all; }
#new-token { margin-top: .6em; }
.muted { color: #68718a; }
.facts td:first-child { font-weight: bold; background: #eef0f4; }
.legend span { display: inline-block; width: .9em; height: .9em; margin: 0 .3em 0 1em; vertical-align: middle; }
form.force input, form.force select { margin-right: .5em; }
"#;
