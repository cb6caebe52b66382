//! What committers and admins can do, shared by the API and the pages' forms: force, rebuild
//! and cancel builds; terminate machines; pause and resume pools. Roles and CSRF are checked
//! by the callers (the API's extractors, the pages' form handlers).

use std::sync::atomic::Ordering;

use axum::http::StatusCode;

use super::auth::Caller;
use super::ApiError;
use crate::changes::{git, refname};
use crate::core::{BuildId, MachineId};
use crate::runtime::{ActionError, Cancelled, NewRequest, Shared};
use crate::store::BuildRow;

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::NotFound(why) => ApiError::not_found(why),
            ActionError::Conflict(why) => ApiError { status: StatusCode::CONFLICT, reason: why },
            ActionError::Stopping => loop_gone(),
            ActionError::Store(e) => e.into(),
        }
    }
}

fn draining(s: &Shared) -> Result<(), ApiError> {
    if s.draining.load(Ordering::SeqCst) {
        return Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, reason: "master is shutting down".into() });
    }
    Ok(())
}

/// The loop is gone (the master is stopping) when a reply channel closes.
fn loop_gone() -> ApiError {
    ApiError { status: StatusCode::SERVICE_UNAVAILABLE, reason: "master is shutting down".into() }
}

/// Queues a build of `builder` on `branch` at `revision` (default: the branch's head).
pub async fn force(
    s: &Shared,
    caller: &Caller,
    builder: &str,
    branch: &str,
    revision: Option<String>,
    reason: Option<String>,
) -> Result<BuildRow, ApiError> {
    draining(s)?;
    let builder =
        s.config.builder(builder).ok_or_else(|| ApiError::bad_request(format!("unknown builder {builder:?}")))?;
    let branch = branch.trim();
    if branch.is_empty() {
        return Err(ApiError::bad_request("a branch is needed"));
    }
    refname::check_branch("branch", branch).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !builder.branches.is_empty() && !git::branch_matches(&builder.branches, branch) {
        return Err(ApiError::bad_request(format!("builder {} does not build branch {branch:?}", builder.name)));
    }
    let revision = match revision.map(|r| r.trim().to_string()).filter(|r| !r.is_empty()) {
        Some(r) => {
            refname::check_revision("revision", &r).map_err(|e| ApiError::bad_request(e.to_string()))?;
            r
        }
        None => {
            let heads = s.store.heads(&builder.repo).await?;
            match heads.get(branch) {
                Some(h) => h.clone(),
                None => {
                    let url = s.config.repo(&builder.repo).map(|r| r.url.clone()).unwrap_or_default();
                    let remote = git::ls_remote(&url)
                        .await
                        .map_err(|e| ApiError::bad_request(format!("cannot resolve branch {branch:?}: {e}")))?;
                    remote.get(branch).cloned().ok_or_else(|| {
                        ApiError::bad_request(format!("unknown branch {branch:?} in repository {}", builder.repo))
                    })?
                }
            }
        }
    };
    let reason = reason.filter(|r| !r.trim().is_empty()).unwrap_or_else(|| format!("forced by {}", caller.name()));
    let request = NewRequest {
        builder: builder.name.clone(),
        repo: builder.repo.clone(),
        branch: branch.to_string(),
        revision,
        scheduler: "force",
        reason,
        changes: Vec::new(),
    };
    ask(s, request).await
}

/// Queues build `id`'s builder, branch and revision again, with the same changes.
pub async fn rebuild(s: &Shared, caller: &Caller, id: BuildId) -> Result<BuildRow, ApiError> {
    draining(s)?;
    let old = s.store.build(id).await?.ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    if s.config.builder(&old.builder).is_none() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            reason: format!("builder {} is no longer configured", old.builder),
        });
    }
    let changes = s.store.build_change_ids(id).await?;
    let reason = format!("rebuild of build {id} by {}", caller.name());
    let request = NewRequest {
        builder: old.builder,
        repo: old.repo,
        branch: old.branch,
        revision: old.revision,
        scheduler: "rebuild",
        reason,
        changes,
    };
    ask(s, request).await
}

/// Has the loop store and queue a build request.
async fn ask(s: &Shared, request: NewRequest) -> Result<BuildRow, ApiError> {
    Ok(s.master.request(request).await?)
}

/// Cancels build `id` (see [`Input::Cancel`]).
pub async fn cancel(s: &Shared, caller: &Caller, id: BuildId) -> Result<Cancelled, ApiError> {
    Ok(s.master.cancel(id, caller.name()).await?)
}

/// Stops machine `id` now.
pub async fn terminate(s: &Shared, caller: &Caller, id: MachineId) -> Result<(), ApiError> {
    Ok(s.master.stop_machine(id, caller.name()).await?)
}

/// Pauses or resumes a pool (recorded first, so a restart keeps it).
pub async fn pause(s: &Shared, caller: &Caller, pool: &str, paused: bool) -> Result<(), ApiError> {
    if s.config.pool(pool).is_none() {
        return Err(ApiError::not_found(format!("no pool {pool:?}")));
    }
    Ok(s.master.pause(pool, paused, caller.name()).await?)
}
