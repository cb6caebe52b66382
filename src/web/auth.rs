//! Who is asking: a browser session (cookie), an API token (`Authorization: Bearer`), or
//! nobody. The role extractors ([`Viewer`], [`Committer`], [`Admin`]) are what API handlers take,
//! so the rule each route follows is in its signature.
//!
//! Writes made with a session cookie must carry the session's CSRF token: a form's `csrf` field
//! (pages) or the `X-CSRF-Token` header (API). Bearer tokens are not sent by browsers on their
//! own, so they need none.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};

use super::ApiError;
use crate::accounts::{same_secret, secret_hash, Role};
use crate::runtime::Shared;
use crate::store::UserRow;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "paddock_session";

/// Header carrying the CSRF token on API writes authenticated by the session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The caller of a request.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// `None`: anonymous.
    pub user: Option<UserRow>,
    /// The session, when the cookie authenticated the request.
    pub session: Option<Session>,
    /// The `X-CSRF-Token` header, if sent.
    csrf_header: Option<String>,
    /// Whether the request can change anything (not GET/HEAD/OPTIONS).
    write: bool,
}

/// A live browser session.
#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the cookie (what logout deletes).
    pub hash: String,
    /// The token every form of this session carries.
    pub csrf: String,
}

impl Caller {
    /// The user's role; `None` when anonymous.
    pub fn role(&self) -> Option<Role> {
        self.user.as_ref().map(|u| u.role)
    }

    /// Whether the caller has at least `role`.
    pub fn can(&self, role: Role) -> bool {
        self.role().is_some_and(|r| r >= role)
    }

    /// Who did it, for logs and records.
    pub fn name(&self) -> &str {
        self.user.as_ref().map_or("anonymous", |u| u.name.as_str())
    }

    /// The CSRF token forms of this session carry (empty when there is no session).
    pub fn csrf(&self) -> &str {
        self.session.as_ref().map_or("", |s| s.csrf.as_str())
    }

    /// Whether the caller may read: anyone when the UI is public, else any user.
    pub fn may_view(&self, shared: &Shared) -> bool {
        shared.config.web.public || self.user.is_some()
    }

    /// Checks that the caller has `role` (for `Viewer`, reading rights per the `[web]` access
    /// setting): 401 for nobody, 403 for too little.
    pub fn require(&self, shared: &Shared, role: Role) -> Result<(), ApiError> {
        if role == Role::Viewer && self.may_view(shared) {
            return Ok(());
        }
        match self.role() {
            None => Err(ApiError::unauthorized(match role {
                Role::Viewer => "login required: send an API token as `Authorization: Bearer …`".to_string(),
                _ => format!("this needs a {role} account: send an API token as `Authorization: Bearer …`"),
            })),
            Some(r) if r < role => {
                Err(ApiError::forbidden(format!("this needs the {role} role; {} is a {r}", self.name())))
            }
            Some(_) => Ok(()),
        }
    }

    /// Checks a form's CSRF token against the session's.
    pub fn check_csrf(&self, presented: &str) -> Result<(), ApiError> {
        match &self.session {
            Some(s) if same_secret(&s.csrf, presented) => Ok(()),
            Some(_) => Err(ApiError::forbidden("missing or wrong CSRF token; reload the page and try again")),
            // Token callers never need one; anonymous writers are refused by the role check.
            None => Ok(()),
        }
    }

    /// API writes by session cookie need the CSRF header.
    fn check_api_csrf(&self) -> Result<(), ApiError> {
        if self.write && self.session.is_some() {
            return self.check_csrf(self.csrf_header.as_deref().unwrap_or(""));
        }
        Ok(())
    }
}

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, Self::Rejection> {
        let write = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let csrf_header = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let now = shared.now();
        // Other schemes (a proxy's Basic auth in front of the master) are not ours: the session
        // cookie decides then.
        let bearer = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
                let mut words = v.split_whitespace();
                match words.next() {
                    // Scheme names are case-insensitive (RFC 9110).
                    Some(scheme) if scheme.eq_ignore_ascii_case("bearer") => Some(words.next().unwrap_or("")),
                    _ => None,
                }
            }
        };
        if let Some(token) = bearer {
            // A token that does not work is an error, never a silent fall-back to anonymous: a
            // script with a revoked token should hear so.
            let user = shared
                .store
                .token_user(&secret_hash(token), now)
                .await?
                .ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
            return Ok(Caller { user: Some(user), session: None, csrf_header, write });
        }
        if let Some(cookie) = session_cookie(parts) {
            let hash = secret_hash(&cookie);
            // An expired or unknown session is anonymous: the pages then offer a login.
            if let Some(s) = shared.store.session(&hash, now).await? {
                return Ok(Caller {
                    user: Some(s.user),
                    session: Some(Session { hash, csrf: s.csrf }),
                    csrf_header,
                    write,
                });
            }
        }
        Ok(Caller { user: None, session: None, csrf_header, write })
    }
}

/// The session cookie's value, if the request has one.
pub fn session_cookie(parts: &Parts) -> Option<String> {
    cookie_value(parts, SESSION_COOKIE)
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie_value(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Caller);

        impl FromRequestParts<Arc<Shared>> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, Self::Rejection> {
                let caller = Caller::from_request_parts(parts, shared).await?;
                caller.require(shared, $role)?;
                caller.check_api_csrf()?;
                Ok($name(caller))
            }
        }
    };
}

role_extractor!(
    /// A caller allowed to read (anyone when `[web] access = "public"`).
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// A caller with the committer role or above.
    Committer,
    Role::Committer
);
role_extractor!(
    /// A caller with the admin role.
    Admin,
    Role::Admin
);

impl ApiError {
    /// 401: no (working) credentials.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        ApiError { status: StatusCode::UNAUTHORIZED, reason: reason.into() }
    }
    /// 403: credentials, but not enough rights (or no CSRF token).
    pub fn forbidden(reason: impl Into<String>) -> Self {
        ApiError { status: StatusCode::FORBIDDEN, reason: reason.into() }
    }
}
