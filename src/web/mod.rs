//! The master's HTTP side (axum): the JSON API, the agent WebSocket, webhooks, health.

mod actions;
mod agent_ws;
pub(crate) mod api;
pub mod auth;
mod download;
mod hooks;
mod metrics;
mod pages;
pub mod serve;
pub mod throttle;
pub mod tls;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::runtime::Shared;

/// Every route the master serves.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/builds", get(api::list_builds).post(api::force_build))
        .route("/api/builds/{id}", get(api::get_build))
        .route("/api/builds/{id}/log", get(api::get_log))
        .route("/api/builds/{id}/rebuild", post(api::rebuild))
        .route("/api/builds/{id}/cancel", post(api::cancel))
        .route("/api/builders", get(api::list_builders))
        .route("/api/machines", get(api::list_machines))
        .route("/api/machines/{id}/terminate", post(api::terminate_machine))
        .route("/api/pools", get(api::list_pools))
        .route("/api/masters", get(api::list_masters))
        .route("/api/pools/{name}/pause", post(api::pause_pool))
        .route("/api/pools/{name}/resume", post(api::resume_pool))
        .route("/api/cost", get(api::cost))
        .route("/api/deliveries", get(api::list_deliveries))
        .route("/api/changes", get(api::list_changes).post(api::post_change))
        .route("/hooks/github", post(hooks::github))
        .route("/agent/ws", get(agent_ws::upgrade))
        .route("/agent/download", get(download::agent_download))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(metrics::readyz))
        .route("/metrics", get(metrics::metrics))
        .merge(pages::routes())
        .layer(axum::middleware::map_response(protective_headers))
        .with_state(shared)
}

/// Headers every response gets: no framing (the pages have one-click actions), no content
/// sniffing (logs are text), no caching of pages (they carry the session's CSRF token).
async fn protective_headers(mut resp: Response) -> Response {
    use axum::http::{header, HeaderValue};
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    let html = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/html"));
    if html {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("frame-ancestors 'none'"));
        h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    }
    resp
}

/// Percent-encodes one path segment (a pool's name, say), leaving only unreserved characters.
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An API error: a status and a reason, sent as `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub reason: String,
}

impl ApiError {
    /// 400 with a reason.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, reason: reason.into() }
    }
    /// 404 with a reason.
    pub fn not_found(reason: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, reason: reason.into() }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("store error while serving a request: {e}");
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, reason: "internal error".into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(serde_json::json!({ "error": self.reason }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"paddock\""),
            );
        }
        resp
    }
}
