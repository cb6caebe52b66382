//! `GET /agent/download`: the master serves its own binary to booting machines, so a stock
//! Linux image needs nothing baked in. Authorised by the machine's unspent one-time token.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncReadExt;

use super::ApiError;
use crate::runtime::{token_hash, Shared};

/// Streams the running executable to a machine that presents `Authorization: Bearer <token>`.
pub async fn agent_download(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let unauthorized =
        || ApiError { status: StatusCode::UNAUTHORIZED, reason: "a starting machine's token is required".into() };
    let Some(token) = token else { return Err(unauthorized()) };
    let Some(machine) = s.store.machine_for_unused_token(&token_hash(token)).await? else {
        tracing::warn!("agent download refused: unknown, spent or stale token");
        return Err(unauthorized());
    };
    let exe = std::env::current_exe().map_err(|e| {
        tracing::error!("cannot find the master's own executable: {e}");
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, reason: "agent binary unavailable".into() }
    })?;
    let file = tokio::fs::File::open(&exe).await.map_err(|e| {
        tracing::error!(path = %exe.display(), "cannot open the master's own executable: {e}");
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, reason: "agent binary unavailable".into() }
    })?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    s.store.machine_event(machine, "agent_download", "", s.now()).await?;
    tracing::info!(machine = machine.get(), "machine is downloading the agent");
    // Streamed in chunks: many machines booting at once must not each hold a copy in memory.
    let stream = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = (StatusCode::OK, Body::from_stream(stream)).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
    if let Some(len) = len {
        resp.headers_mut().insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    Ok(resp)
}
