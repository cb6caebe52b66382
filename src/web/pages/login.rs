//! Login and logout. The login form carries a token matched against a short-lived cookie
//! (login CSRF); a successful login sets the session cookie (HttpOnly, SameSite=Lax, Secure
//! when the master is served over https).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use cookie::{Cookie, SameSite};
use maud::html;
use serde::Deserialize;

use super::{layout, PageError, PageResult};
use crate::accounts::{dummy_hash, new_secret, same_secret, secret_hash, verify_password};
use crate::runtime::Shared;
use crate::web::auth::{cookie_value, Caller, SESSION_COOKIE};

/// Cookie holding the login form's CSRF token.
const LOGIN_COOKIE: &str = "paddock_login";

/// Query of `GET /login`.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// Where to go after logging in: a path on this master only (never `//host` or a URL).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

fn secure(s: &Shared) -> bool {
    s.config.master.url.starts_with("https://")
}

fn set_cookie(resp: &mut Response, c: Cookie<'_>) {
    if let Ok(v) = HeaderValue::from_str(&c.to_string()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The login page, with a fresh login token (also set as a cookie).
fn login_page(s: &Shared, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let token = new_secret("");
    let body = html! {
        @if let Some(e) = error { p.error #login-error { (e) } }
        form #login method="post" action="/login" {
            input type="hidden" name="csrf" value=(token);
            input type="hidden" name="next" value=(next);
            p { label { "Name " input #name type="text" name="name" autocomplete="username" required autofocus; } }
            p { label { "Password " input #password type="password" name="password" autocomplete="current-password" required; } }
            p { button type="submit" { "Log in" } }
        }
    };
    let mut resp = (status, layout(s, &Caller::default(), "Log in", body)).into_response();
    let c = Cookie::build((LOGIN_COOKIE, token))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure(s))
        .path("/login")
        .max_age(cookie::time::Duration::hours(1))
        .build();
    set_cookie(&mut resp, c);
    resp
}

/// `GET /login?next=/path`.
pub async fn form(State(s): State<Arc<Shared>>, Query(q): Query<LoginQuery>) -> Response {
    login_page(&s, &safe_next(q.next.as_deref()), None, StatusCode::OK)
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
    #[serde(default)]
    next: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /login`.
pub async fn login(State(s): State<Arc<Shared>>, parts: Parts, Form(f): Form<LoginForm>) -> PageResult {
    let next = safe_next(Some(&f.next));
    let expected = cookie_value(&parts, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_secret(&expected, &f.csrf) {
        return Ok(login_page(
            &s,
            &next,
            Some("the login form expired or came from elsewhere; try again"),
            StatusCode::FORBIDDEN,
        ));
    }
    let found = s.store.user_with_hash(f.name.trim()).await?;
    // Verify against a dummy when the user does not exist, so both take the same time.
    let stored = found.as_ref().map_or(dummy_hash(), |(_, h)| h.as_str()).to_string();
    let password = f.password.clone();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &stored)).await.unwrap_or(false);
    let user = match (found, ok) {
        (Some((user, _)), true) => user,
        _ => {
            tracing::info!(name = %f.name.trim(), "failed login");
            return Ok(login_page(&s, &next, Some("wrong name or password"), StatusCode::UNAUTHORIZED));
        }
    };
    let session = new_secret("");
    let csrf = new_secret("");
    let now = s.now();
    let lifetime = s.config.web.session_lifetime;
    let expires = crate::core::Ts(now.0 + lifetime.as_millis() as i64);
    s.store.create_session(user.id, &secret_hash(&session), &csrf, now, expires).await?;
    tracing::info!(user = %user.name, role = %user.role, "logged in");
    let mut resp = Redirect::to(&next).into_response();
    let c = Cookie::build((SESSION_COOKIE, session))
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(secure(&s))
        .path("/")
        .max_age(cookie::time::Duration::seconds(lifetime.as_secs() as i64))
        .build();
    set_cookie(&mut resp, c);
    set_cookie(
        &mut resp,
        Cookie::build((LOGIN_COOKIE, "")).path("/login").max_age(cookie::time::Duration::ZERO).build(),
    );
    Ok(resp)
}

/// The logout form's field.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`: ends the session and clears the cookie.
pub async fn logout(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<CsrfForm>) -> PageResult {
    let Some(session) = &caller.session else {
        return Ok(Redirect::to("/").into_response());
    };
    caller.check_csrf(&f.csrf).map_err(PageError::from)?;
    s.store.delete_session(&session.hash).await?;
    tracing::info!(user = caller.name(), "logged out");
    let mut resp = Redirect::to("/").into_response();
    set_cookie(
        &mut resp,
        Cookie::build((SESSION_COOKIE, "")).path("/").http_only(true).max_age(cookie::time::Duration::ZERO).build(),
    );
    Ok(resp)
}
