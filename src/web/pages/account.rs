//! The logged-in user's own account: API tokens for scripts (made here and shown once, so a
//! committer needs no shell on the master's host), the password, and logging out everywhere.
//! Only a browser session may change these (a leaked API token must not mint new ones), and
//! making a token or changing the password asks for the password (nor may a borrowed session).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::builds::CsrfForm;
use super::login::{argon2, peer, without_session};
use super::{layout, when, PageError, PageResult};
use crate::accounts::{hash_password, new_secret, secret_hash, verify_password, TOKEN_PREFIX};
use crate::runtime::Shared;
use crate::store::UserRow;
use crate::web::auth::Caller;

/// The session's user, for a form of this page (with its CSRF token checked).
pub(super) fn owner(caller: &Caller, csrf: Option<&str>) -> Result<UserRow, PageError> {
    let Some(user) = caller.user.clone() else {
        return Err(PageError::Login("/account".into()));
    };
    if caller.session.is_none() {
        return Err(PageError::Status(
            StatusCode::FORBIDDEN,
            "your account is managed from a browser session (scripts: `paddock token` on the master's host)".into(),
        ));
    }
    if let Some(csrf) = csrf {
        caller.check_csrf(csrf).map_err(PageError::from)?;
    }
    Ok(user)
}

/// The page, with a note on top (a new token, a refusal).
async fn page(s: &Shared, caller: &Caller, user: &UserRow, note: Option<Markup>, status: StatusCode) -> PageResult {
    let tokens = s.store.tokens_of(user.id).await?;
    let csrf = caller.csrf();
    let body = html! {
        @if let Some(n) = note { (n) }
        p { "You are " strong { (user.name) } ", a " (user.role) "." }
        h2 { "API tokens" }
        p { "For scripts and the CLI: " code { "export PADDOCK_TOKEN=…" } "; a token acts as you, with your role." }
        @if tokens.is_empty() {
            p #no-tokens { "No tokens." }
        } @else {
            table #tokens {
                thead { tr { th { "Name" } th { "Created" } th { "Last used" } th {} } }
                tbody {
                    @for t in &tokens {
                        tr {
                            td { (t.name) }
                            td { (when(&t.created_at)) }
                            td { (t.last_used_at.as_deref().map(when).unwrap_or_else(|| "never".into())) }
                            td {
                                form.inline method="post" action={ "/account/tokens/" (t.id) "/revoke" } {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        form #new-token method="post" action="/account/tokens" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Name " input type="text" name="name" required maxlength="64" placeholder="laptop"; }
            " " label { "Your password " input type="password" name="password" autocomplete="current-password" required; }
            " " button type="submit" { "Create a token" }
        }
        h2 { "Password" }
        form #password method="post" action="/account/password" {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "Current password " input type="password" name="current" autocomplete="current-password" required; } }
            p { label { "New password " input type="password" name="new" autocomplete="new-password" required minlength=(crate::accounts::MIN_PASSWORD); } }
            p { label { "New password again " input type="password" name="repeat" autocomplete="new-password" required; } }
            p { label { input type="checkbox" name="revoke_tokens" value="on"; " Also revoke all my API tokens" } }
            p { button type="submit" { "Change the password" } " (this logs you out everywhere)" }
        }
        h2 { "Sessions" }
        form #logout-all method="post" action="/account/logout-all" {
            input type="hidden" name="csrf" value=(csrf);
            p { label { input type="checkbox" name="revoke_tokens" value="on"; " Also revoke all my API tokens" } }
            button type="submit" { "Log out everywhere" }
        }
    };
    Ok((status, layout(s, caller, "Your account", body)).into_response())
}

/// `GET /account`.
pub async fn show(State(s): State<Arc<Shared>>, caller: Caller) -> PageResult {
    let user = owner(&caller, None)?;
    page(&s, &caller, &user, None, StatusCode::OK).await
}

/// Checks the user's password (counted like a login, so a borrowed session cannot guess it);
/// `Err` is the refusal to show.
pub(super) async fn check_password(s: &Shared, parts: &Parts, user: &UserRow, password: &str) -> Result<(), Refusal> {
    let from = peer(parts);
    let counted =
        s.login_throttle.lock().map_or(Ok(()), |mut t| t.attempt(&user.name, from, std::time::Instant::now()));
    if counted.is_err() {
        return Err((StatusCode::TOO_MANY_REQUESTS, "too many wrong passwords; try again later".into()));
    }
    let Some((_, stored)) = s.store.user_with_hash(&user.name).await? else {
        return Err((StatusCode::NOT_FOUND, "this account no longer exists".into()));
    };
    let password = password.to_string();
    if !argon2(move || verify_password(&password, &stored)).await? {
        tracing::info!(user = %user.name, "account change refused: wrong password");
        return Err((StatusCode::UNAUTHORIZED, "the password is wrong".into()));
    }
    if let Ok(mut t) = s.login_throttle.lock() {
        t.succeeded(&user.name, from);
    }
    Ok(())
}

/// Why an account change was refused: the status and what to show.
pub(super) type Refusal = (StatusCode, String);

impl From<PageError> for (StatusCode, String) {
    fn from(e: PageError) -> Self {
        match e {
            PageError::Status(status, why) => (status, why),
            PageError::Login(_) => (StatusCode::UNAUTHORIZED, "log in again".into()),
        }
    }
}

impl From<crate::store::StoreError> for (StatusCode, String) {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::from(e).into()
    }
}

/// The page again, with the refusal on top.
async fn refused(s: &Shared, caller: &Caller, user: &UserRow, (status, why): Refusal) -> PageResult {
    let note = html! { p.error #account-error { (why) } };
    page(s, caller, user, Some(note), status).await
}

/// The new-token form.
#[derive(Debug, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
}

/// `POST /account/tokens`: the secret is in this answer only (not a redirect: it must not
/// land in a URL or the history).
pub async fn create_token(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    parts: Parts,
    Form(f): Form<TokenForm>,
) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    let name = f.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return refused(&s, &caller, &user, (StatusCode::BAD_REQUEST, "a token's name is 1 to 64 characters".into()))
            .await;
    }
    if let Err(r) = check_password(&s, &parts, &user, &f.password).await {
        return refused(&s, &caller, &user, r).await;
    }
    let secret = new_secret(TOKEN_PREFIX);
    let Some(row) = s.store.create_token(&user.name, name, &secret_hash(&secret), s.now()).await? else {
        return Err(PageError::Login("/account".into()));
    };
    tracing::info!(user = %user.name, token = row.id, "API token created");
    let note = html! {
        div.notice #new-secret {
            p { "Your new token " strong { (row.name) } ", shown only now; copy it:" }
            pre { code #secret { (secret) } }
        }
    };
    page(&s, &caller, &user, Some(note), StatusCode::OK).await
}

/// `POST /account/tokens/{id}/revoke`: only one's own.
pub async fn revoke_token(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    if !s.store.revoke_own_token(user.id, id).await? {
        return Err(PageError::Status(StatusCode::NOT_FOUND, format!("you have no token {id}")));
    }
    tracing::info!(user = %user.name, token = id, "API token revoked");
    Ok(Redirect::to("/account").into_response())
}

/// The password form.
#[derive(Debug, Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    repeat: String,
    /// `on` to revoke every API token too.
    #[serde(default)]
    revoke_tokens: Option<String>,
}

/// `POST /account/password`: the current password first; the change ends every session,
/// this one too (and, if asked, revokes every API token).
pub async fn change_password(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    parts: Parts,
    Form(f): Form<PasswordForm>,
) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    if f.new != f.repeat {
        return refused(&s, &caller, &user, (StatusCode::BAD_REQUEST, "the new passwords differ".into())).await;
    }
    if let Err(r) = check_password(&s, &parts, &user, &f.current).await {
        return refused(&s, &caller, &user, r).await;
    }
    let new = f.new.clone();
    let hash = match argon2(move || hash_password(&new)).await? {
        Ok(h) => h,
        Err(e) => return refused(&s, &caller, &user, (StatusCode::BAD_REQUEST, e.to_string())).await,
    };
    if !s.store.set_password_of(user.id, &hash).await? {
        return Err(PageError::Status(StatusCode::NOT_FOUND, "this account no longer exists".into()));
    }
    let revoked = if f.revoke_tokens.is_some() { s.store.revoke_tokens_of(user.id).await? } else { 0 };
    tracing::info!(user = %user.name, tokens_revoked = revoked, "password changed; every session ended");
    Ok(without_session(Redirect::to("/login?next=/account").into_response()))
}

/// The log-out-everywhere form.
#[derive(Debug, Deserialize)]
pub struct LogoutAllForm {
    #[serde(default)]
    csrf: String,
    /// `on` to revoke every API token too.
    #[serde(default)]
    revoke_tokens: Option<String>,
}

/// `POST /account/logout-all`: ends every session of the user, this one too (and, if asked,
/// revokes every API token).
pub async fn logout_all(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<LogoutAllForm>) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    let ended = s.store.end_sessions(user.id).await?;
    let revoked = if f.revoke_tokens.is_some() { s.store.revoke_tokens_of(user.id).await? } else { 0 };
    tracing::info!(user = %user.name, sessions = ended, tokens_revoked = revoked, "logged out everywhere");
    Ok(without_session(Redirect::to("/login").into_response()))
}
