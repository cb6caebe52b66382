//! `POST /hooks/github`: GitHub push webhooks, verified with HMAC-SHA256.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::ApiError;
use crate::changes::github::{self, verify_signature};
use crate::runtime::{ingest, Shared};

pub async fn github(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let unauthorized = |reason: &str| ApiError { status: StatusCode::UNAUTHORIZED, reason: reason.to_string() };
    let Some(secret) = std::env::var(&s.config.master.github_secret_env).ok().filter(|v| !v.is_empty()) else {
        tracing::warn!(env = %s.config.master.github_secret_env, "GitHub webhook refused: no secret configured in the environment");
        return Err(unauthorized("webhook secret not configured"));
    };
    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
    if let Err(e) = verify_signature(secret.as_bytes(), &body, signature) {
        tracing::warn!("GitHub webhook refused: {e}");
        return Err(unauthorized("bad signature"));
    }
    let event = headers.get("x-github-event").and_then(|v| v.to_str().ok()).unwrap_or("push");
    if event == "ping" {
        return Ok((StatusCode::OK, Json(json!({ "ok": true, "changes": [] }))));
    }
    if event != "push" {
        return Ok((StatusCode::OK, Json(json!({ "ignored": format!("event {event}"), "changes": [] }))));
    }
    let push = github::parse_push(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let repo = s
        .config
        .repos
        .iter()
        .find(|r| github::repo_matches(&r.url, &r.name, &push))
        .ok_or_else(|| ApiError::bad_request("unknown repository"))?;
    let Some(branch) = push.branch.clone() else {
        return Ok((StatusCode::OK, Json(json!({ "ignored": "not a branch", "changes": [] }))));
    };
    if push.deleted || !crate::changes::git::branch_matches(&repo.branches, &branch) {
        return Ok((StatusCode::OK, Json(json!({ "ignored": "branch not watched or deleted", "changes": [] }))));
    }
    let skip = push.commits.len().saturating_sub(crate::runtime::poller::MAX_NEW_COMMITS);
    let _guard = s.lock_repo(&repo.name).await;
    let rows = ingest::commits(&s, &repo.name, &branch, Some(&push.after), &push.commits[skip..], "github").await?;
    Ok((StatusCode::OK, Json(json!({ "changes": rows }))))
}
