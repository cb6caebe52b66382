//! The logged-in user's own account: API tokens for scripts (made here and shown once, so a
//! committer needs no shell on the master's host), the password, and logging out everywhere.
//! Only a browser session may change these: a leaked API token must not mint new ones.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::builds::CsrfForm;
use super::login::{argon2, peer};
use super::{layout, when, PageError, PageResult};
use crate::accounts::{hash_password, new_secret, secret_hash, verify_password, TOKEN_PREFIX};
use crate::runtime::Shared;
use crate::store::UserRow;
use crate::web::auth::Caller;

/// The session's user, for a form of this page (with its CSRF token checked).
fn owner(caller: &Caller, csrf: Option<&str>) -> Result<UserRow, PageError> {
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
    let tokens: Vec<_> = s.store.tokens().await?.into_iter().filter(|t| t.user == user.name).collect();
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
            " " button type="submit" { "Create a token" }
        }
        h2 { "Password" }
        form #password method="post" action="/account/password" {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "Current password " input type="password" name="current" autocomplete="current-password" required; } }
            p { label { "New password " input type="password" name="new" autocomplete="new-password" required minlength=(crate::accounts::MIN_PASSWORD); } }
            p { label { "New password again " input type="password" name="repeat" autocomplete="new-password" required; } }
            p { button type="submit" { "Change the password" } " (this logs you out everywhere)" }
        }
        h2 { "Sessions" }
        form #logout-all method="post" action="/account/logout-all" {
            input type="hidden" name="csrf" value=(csrf);
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

/// The new-token form.
#[derive(Debug, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// `POST /account/tokens`: the secret is in this answer only (not a redirect: it must not
/// land in a URL or the history).
pub async fn create_token(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<TokenForm>) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    let name = f.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        let note = html! { p.error { "a token's name is 1 to 64 characters" } };
        return page(&s, &caller, &user, Some(note), StatusCode::BAD_REQUEST).await;
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
    let mine = s.store.tokens().await?.into_iter().any(|t| t.id == id && t.user == user.name);
    if !mine || !s.store.revoke_token(id).await? {
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
}

/// `POST /account/password`: the current password first (counted like logins, so a borrowed
/// session cannot guess it); the change ends every session, this one too.
pub async fn change_password(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    parts: Parts,
    Form(f): Form<PasswordForm>,
) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    let refuse = |why: &str| html! { p.error #password-error { (why) } };
    if f.new != f.repeat {
        return page(&s, &caller, &user, Some(refuse("the new passwords differ")), StatusCode::BAD_REQUEST).await;
    }
    let from = peer(&parts);
    let counted =
        s.login_throttle.lock().map_or(Ok(()), |mut t| t.attempt(&user.name, from, std::time::Instant::now()));
    if counted.is_err() {
        let note = refuse("too many wrong passwords; try again later");
        return page(&s, &caller, &user, Some(note), StatusCode::TOO_MANY_REQUESTS).await;
    }
    let stored = s.store.user_with_hash(&user.name).await?.map(|(_, h)| h).unwrap_or_default();
    let current = f.current.clone();
    if !argon2(move || verify_password(&current, &stored)).await? {
        tracing::info!(user = %user.name, "password change refused: wrong current password");
        return page(&s, &caller, &user, Some(refuse("the current password is wrong")), StatusCode::UNAUTHORIZED).await;
    }
    if let Ok(mut t) = s.login_throttle.lock() {
        t.succeeded(&user.name, from);
    }
    let new = f.new.clone();
    let hash = match argon2(move || hash_password(&new)).await? {
        Ok(h) => h,
        Err(e) => return page(&s, &caller, &user, Some(refuse(&e.to_string())), StatusCode::BAD_REQUEST).await,
    };
    s.store.set_password(&user.name, &hash).await?;
    tracing::info!(user = %user.name, "password changed; every session ended");
    Ok(Redirect::to("/login?next=/account").into_response())
}

/// `POST /account/logout-all`: ends every session of the user, this one too.
pub async fn logout_all(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<CsrfForm>) -> PageResult {
    let user = owner(&caller, Some(&f.csrf))?;
    let ended = s.store.end_sessions(user.id).await?;
    tracing::info!(user = %user.name, sessions = ended, "logged out everywhere");
    Ok(Redirect::to("/login").into_response())
}
