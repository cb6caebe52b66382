//! Accounts for admins: who may use this master and with which role, without a shell on its
//! host (`paddock user …` does the same there). An admin cannot remove or demote themselves,
//! so a master always keeps the admin who is using the page. Only a browser session may change
//! accounts, and adding a user or setting a role asks for the admin's own password: neither a
//! leaked admin token nor an unattended browser can mint a lasting admin account.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use maud::{html, Markup};
use serde::Deserialize;

use super::account::check_password;
use super::builds::CsrfForm;
use super::login::argon2;
use super::{layout, may_act, may_view, when, PageError, PageResult};
use crate::accounts::{check_name, hash_password, Role};
use crate::runtime::Shared;
use crate::store::UserRow;
use crate::web::auth::Caller;

const ROLES: [Role; 3] = [Role::Viewer, Role::Committer, Role::Admin];

/// The page, with a note on top (a refusal, a new user).
async fn page(s: &Shared, caller: &Caller, note: Option<Markup>, status: StatusCode) -> PageResult {
    let users = s.store.users().await?;
    let tokens = s.store.tokens().await?;
    let csrf = caller.csrf();
    let me = caller.name();
    let body = html! {
        @if let Some(n) = note { (n) }
        table #users {
            thead { tr { th { "Name" } th { "Role" } th { "Since" } th.num { "API tokens" } th {} } }
            tbody {
                @for u in &users {
                    tr {
                        td { (u.name) }
                        td {
                            @if u.name == me {
                                (u.role) " (you)"
                            } @else {
                                form.inline method="post" action={ "/users/" (u.name) "/role" } {
                                    input type="hidden" name="csrf" value=(csrf);
                                    select name="role" {
                                        @for r in ROLES {
                                            option value=(r.as_str()) selected[r == u.role] { (r) }
                                        }
                                    }
                                    " " input type="password" name="password" placeholder="your password" autocomplete="current-password" required;
                                    " " button type="submit" { "Set" }
                                }
                            }
                        }
                        td { (when(&u.created_at)) }
                        td.num { (tokens.iter().filter(|t| t.user == u.name).count()) }
                        td {
                            @if u.name != me {
                                form.inline method="post" action={ "/users/" (u.name) "/remove" } {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Remove" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Add a user" }
        form #add-user method="post" action="/users" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Name " input type="text" name="name" required maxlength="64" pattern="[A-Za-z0-9._@-]+"; }
            " " label { "Role " select name="role" { @for r in ROLES { option value=(r.as_str()) { (r) } } } }
            " " label { "Their password " input type="password" name="new_password" autocomplete="new-password" required minlength=(crate::accounts::MIN_PASSWORD); }
            " " label { "Your password " input type="password" name="password" autocomplete="current-password" required; }
            " " button type="submit" { "Add" }
        }
        p { "They change the password on their account page; removing a user ends their sessions and revokes their tokens." }
    };
    Ok((status, layout(s, caller, "Users", body)).into_response())
}

/// The acting admin, for a form of this page: the role, the form's CSRF token, a session.
fn admin(s: &Shared, caller: &Caller, csrf: &str) -> Result<UserRow, PageError> {
    may_act(s, caller, Role::Admin, csrf, "/users")?;
    match (&caller.user, &caller.session) {
        (Some(u), Some(_)) => Ok(u.clone()),
        _ => Err(PageError::Status(
            StatusCode::FORBIDDEN,
            "accounts are changed from a browser session (scripts: `paddock user` on the master's host)".into(),
        )),
    }
}

async fn refused(s: &Shared, caller: &Caller, status: StatusCode, why: String) -> PageResult {
    page(s, caller, Some(html! { p.error #users-error { (why) } }), status).await
}

/// `GET /users` (admin).
pub async fn list(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri) -> PageResult {
    may_view(&s, &caller, &uri)?;
    if caller.user.is_none() {
        return Err(PageError::Login("/users".into()));
    }
    caller.require(&s, Role::Admin)?;
    page(&s, &caller, None, StatusCode::OK).await
}

/// The add-user form.
#[derive(Debug, Deserialize)]
pub struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    /// The new user's first password.
    #[serde(default)]
    new_password: String,
    /// The acting admin's own.
    #[serde(default)]
    password: String,
}

/// `POST /users` (admin).
pub async fn add(State(s): State<Arc<Shared>>, caller: Caller, parts: Parts, Form(f): Form<AddForm>) -> PageResult {
    let me = admin(&s, &caller, &f.csrf)?;
    if let Err((status, why)) = check_password(&s, &parts, &me, &f.password).await {
        return refused(&s, &caller, status, why).await;
    }
    let name = f.name.trim().to_string();
    if let Err(e) = check_name(&name) {
        return refused(&s, &caller, StatusCode::BAD_REQUEST, e.to_string()).await;
    }
    let Some(role) = Role::parse(&f.role) else {
        return refused(&s, &caller, StatusCode::BAD_REQUEST, format!("unknown role {:?}", f.role)).await;
    };
    let password = f.new_password.clone();
    let hash = match argon2(move || hash_password(&password)).await? {
        Ok(h) => h,
        Err(e) => return refused(&s, &caller, StatusCode::BAD_REQUEST, e.to_string()).await,
    };
    if !s.store.add_user(&name, role, &hash, s.now()).await? {
        return refused(&s, &caller, StatusCode::CONFLICT, format!("{name} exists already")).await;
    }
    tracing::info!(user = %name, %role, by = caller.name(), "user added");
    Ok(Redirect::to("/users").into_response())
}

/// The role form.
#[derive(Debug, Deserialize)]
pub struct RoleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    role: String,
    /// The acting admin's own.
    #[serde(default)]
    password: String,
}

/// Why a change to `name` by `me` did not happen: no such user, or `me` is no longer an admin.
async fn not_done(s: &Shared, name: &str) -> PageError {
    match s.store.user_with_hash(name).await {
        Ok(Some(_)) => PageError::Status(StatusCode::CONFLICT, "you are no longer an admin".into()),
        Ok(None) => PageError::Status(StatusCode::NOT_FOUND, format!("no user {name:?}")),
        Err(e) => e.into(),
    }
}

/// `POST /users/{name}/role` (admin; not oneself).
pub async fn set_role(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    parts: Parts,
    Path(name): Path<String>,
    Form(f): Form<RoleForm>,
) -> PageResult {
    let me = admin(&s, &caller, &f.csrf)?;
    if name == me.name {
        return refused(&s, &caller, StatusCode::CONFLICT, "you cannot change your own role".into()).await;
    }
    let Some(role) = Role::parse(&f.role) else {
        return refused(&s, &caller, StatusCode::BAD_REQUEST, format!("unknown role {:?}", f.role)).await;
    };
    if let Err((status, why)) = check_password(&s, &parts, &me, &f.password).await {
        return refused(&s, &caller, status, why).await;
    }
    if !s.store.set_role_by(&me.name, &name, role).await? {
        return Err(not_done(&s, &name).await);
    }
    tracing::info!(user = %name, %role, by = caller.name(), "role changed");
    Ok(Redirect::to("/users").into_response())
}

/// `POST /users/{name}/remove` (admin; not oneself).
pub async fn remove(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    let me = admin(&s, &caller, &f.csrf)?;
    if name == me.name {
        return refused(&s, &caller, StatusCode::CONFLICT, "you cannot remove yourself".into()).await;
    }
    if !s.store.remove_user_by(&me.name, &name).await? {
        return Err(not_done(&s, &name).await);
    }
    tracing::info!(user = %name, by = caller.name(), "user removed");
    Ok(Redirect::to("/users").into_response())
}
