//! Login and logout. The login form carries a token matched against a short-lived cookie
//! (login CSRF); a successful login sets the session cookie (HttpOnly, SameSite=Lax, Secure
//! when the master is served over https). Failed logins are counted per name and address
//! ([`crate::web::throttle`]); past the limit, logins wait (429) without a password check.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use cookie::{Cookie, SameSite};
use maud::html;
use serde::Deserialize;

use super::builds::CsrfForm;
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

/// Where to go after logging in: a path on this master only. Browsers drop tabs and newlines
/// from URLs and read `\\` as `/`, so anything but visible ASCII is refused, as is a second
/// slash or backslash (`//host`, `/\\host`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !matches!(n.as_bytes().get(1), Some(b'/' | b'\\'))
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

/// Password checks at once: each argon2 verification holds ~19 MiB, so a flood of logins
/// queues here instead of exhausting memory.
static VERIFYING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Runs an argon2 hash or check off the async threads, at most [`VERIFYING`] at once.
pub(super) async fn argon2<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PageError> {
    let permit = VERIFYING
        .acquire()
        .await
        .map_err(|_| PageError::Status(StatusCode::SERVICE_UNAVAILABLE, "the master is shutting down".into()))?;
    // The permit goes with the work: a client that hangs up does not free it early.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|_| PageError::Status(StatusCode::INTERNAL_SERVER_ERROR, "the password check failed".into()))
}

/// `resp`, telling the browser to forget its session cookie.
pub(super) fn without_session(mut resp: Response) -> Response {
    set_cookie(
        &mut resp,
        Cookie::build((SESSION_COOKIE, "")).path("/").http_only(true).max_age(cookie::time::Duration::ZERO).build(),
    );
    resp
}

/// The address the request came from (what the login throttle counts).
pub(super) fn peer(parts: &Parts) -> IpAddr {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(peer)| peer.ip())
}

fn secure(s: &Shared) -> bool {
    s.config.master.url.starts_with("https://")
}

fn set_cookie(resp: &mut Response, c: Cookie<'_>) {
    if let Ok(v) = HeaderValue::from_str(&c.to_string()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The login page, with the visitor's login token (a fresh one if it has none, also set as a
/// cookie; kept when it has one, so two tabs with the form both work).
fn login_page(s: &Shared, parts: &Parts, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let token = cookie_value(parts, LOGIN_COOKIE).filter(|t| t.len() == 64).unwrap_or_else(|| new_secret(""));
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
pub async fn form(State(s): State<Arc<Shared>>, parts: Parts, Query(q): Query<LoginQuery>) -> Response {
    login_page(&s, &parts, &safe_next(q.next.as_deref()), None, StatusCode::OK)
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
            &parts,
            &next,
            Some("the login form expired or came from elsewhere; try again"),
            StatusCode::FORBIDDEN,
        ));
    }
    let name = f.name.trim();
    let from = peer(&parts);
    // Counted before the password is checked, so tries sent side by side cannot all slip
    // through while the first ones are being verified; a right password takes it back.
    let counted = s.login_throttle.lock().map_or(Ok(()), |mut t| t.attempt(name, from, Instant::now()));
    if let Err(wait) = counted {
        return Ok(too_many(&s, &parts, &next, wait));
    }
    let found = s.store.user_with_hash(name).await?;
    // Verify against a dummy when the user does not exist, so both take the same time.
    let stored = found.as_ref().map_or(dummy_hash(), |(_, h)| h.as_str()).to_string();
    let password = f.password.clone();
    let ok = argon2(move || verify_password(&password, &stored)).await?;
    let user = match (found, ok) {
        (Some((user, _)), true) => user,
        (found, _) => {
            // Only an account's own name is logged: whatever else was typed in the name field
            // may well be a password.
            let shown = found.as_ref().map_or("(no such account)", |(user, _)| user.name.as_str());
            tracing::info!(name = %shown, from = %from, "failed login");
            return Ok(login_page(&s, &parts, &next, Some("wrong name or password"), StatusCode::UNAUTHORIZED));
        }
    };
    if let Ok(mut t) = s.login_throttle.lock() {
        t.succeeded(name, from);
    }
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

/// The answer to a login that must wait: no password was checked, so guessing gets nowhere
/// and costs no argon2 time.
fn too_many(s: &Shared, parts: &Parts, next: &str, wait: std::time::Duration) -> Response {
    // Rounded up: a client that waits exactly this long must not be refused again.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let minutes = secs.div_ceil(60);
    let why = format!("too many failed logins; try again in {minutes} minute{}", if minutes == 1 { "" } else { "s" });
    let mut resp = login_page(s, parts, next, Some(&why), StatusCode::TOO_MANY_REQUESTS);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// `POST /logout`: ends the session and clears the cookie.
pub async fn logout(State(s): State<Arc<Shared>>, caller: Caller, Form(f): Form<CsrfForm>) -> PageResult {
    let Some(session) = &caller.session else {
        return Ok(Redirect::to("/").into_response());
    };
    caller.check_csrf(&f.csrf).map_err(PageError::from)?;
    s.store.delete_session(&session.hash).await?;
    tracing::info!(user = caller.name(), "logged out");
    Ok(without_session(Redirect::to("/").into_response()))
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_stays_on_this_master() {
        for ok in ["/", "/changes", "/builds/3?x=1&y=%2F", "/login?next=/"] {
            assert_eq!(safe_next(Some(ok)), ok);
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/x",
            "https://evil.example/",
            "evil",
            "",
            "/ a",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
