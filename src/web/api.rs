//! `/api/…`: builds, builders, machines and changes as JSON (shapes per DESIGN.md).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::actions;
use super::auth::{Admin, Committer, Viewer};
use super::ApiError;
use crate::changes::git::{self, Mirror};
use crate::changes::hook::ChangeHook;
use crate::core::{BuildId, MachineId};
use crate::runtime::{ingest, Shared};
use crate::store::BuildFilter;

/// Query of `GET /api/builds`.
#[derive(Debug, Deserialize)]
pub struct BuildsQuery {
    builder: Option<String>,
    branch: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
}

const BUILD_STATES: &[&str] = &["queued", "running", "success", "failure", "retry", "cancelled", "exception"];

pub async fn list_builds(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Query(q): Query<BuildsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(state) = &q.state {
        if !BUILD_STATES.contains(&state.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown state {state:?}; expected one of {}",
                BUILD_STATES.join(", ")
            )));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 10000"));
    }
    let builds = s
        .store
        .list_builds(&BuildFilter { builder: q.builder, branch: q.branch, state: q.state, limit: Some(limit) })
        .await?;
    Ok(Json(json!({ "builds": builds })))
}

pub async fn get_build(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Path(id): Path<BuildId>,
) -> Result<impl IntoResponse, ApiError> {
    let build = s.store.build(id).await?.ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    let steps = s.store.steps(id).await?;
    let mut value = serde_json::to_value(&build).unwrap_or_default();
    value["steps"] = serde_json::to_value(&steps).unwrap_or_default();
    Ok(Json(value))
}

pub async fn get_log(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Path(id): Path<BuildId>,
) -> Result<impl IntoResponse, ApiError> {
    s.store.build(id).await?.ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    let log = s.store.log(id).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], log))
}

pub async fn list_builders(_: Viewer, State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let builders: Vec<_> = s
        .config
        .builders
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "repo": b.repo,
                "pool": b.pool,
                "branches": b.branches,
                "matrix": b.cell,
                "steps": b.steps.iter().map(|st| json!({"name": st.name, "run": st.run, "timeout_secs": st.timeout.as_secs(), "always": st.always})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "builders": builders }))
}

/// Query of `GET /api/machines`.
#[derive(Debug, Deserialize)]
pub struct MachinesQuery {
    pool: Option<String>,
    state: Option<String>,
}

pub async fn list_machines(
    Viewer(caller): Viewer,
    State(s): State<Arc<Shared>>,
    Query(q): Query<MachinesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let machines = s.store.list_machines(q.pool.as_deref(), q.state.as_deref()).await?;
    let mut value = json!({ "machines": machines });
    // Prices are cost data, which only admins see.
    if !caller.can(crate::accounts::Role::Admin) {
        for m in value["machines"].as_array_mut().into_iter().flatten() {
            for key in ["hourly_price", "price_source"] {
                m[key] = serde_json::Value::Null;
            }
        }
    }
    Ok(Json(value))
}

/// `GET /api/masters`: every master heard from in the last ten minutes (newest first), which
/// one is active (holds the farm's lease, on PostgreSQL), and the leases. On SQLite the one
/// master is the farm and there are no leases.
pub async fn list_masters(_: Viewer, State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    let leases = s.store.leases().await?;
    let active = leases.iter().find(|l| l.scope == crate::store::FARM && l.held).map(|l| l.holder.clone());
    let masters: Vec<serde_json::Value> = s
        .store
        .masters(crate::runtime::lease::SHOWN_FOR.as_secs_f64())
        .await?
        .into_iter()
        .map(|m| {
            let is_active = active.as_deref() == Some(m.id.as_str());
            let mut v = json!(m);
            v["active"] = json!(is_active);
            v["leases"] =
                json!(leases.iter().filter(|l| l.holder == m.id && l.held).map(|l| &l.scope).collect::<Vec<_>>());
            v
        })
        .collect();
    Ok(Json(json!({ "backend": s.store.backend(), "masters": masters, "leases": leases })))
}

/// `GET /api/pools`: each pool's machines by state, its queued builds, and why they wait when
/// the pool cannot launch (its latest launch failure, if no launch succeeded since).
pub async fn list_pools(Viewer(caller): Viewer, State(s): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({ "pools": pools(&s, caller.can(crate::accounts::Role::Admin)).await? })))
}

/// Each pool's status as `GET /api/pools` shows it (also what the machines page shows). The
/// figures of a reached spend cap are cost data: only `admin` sees them.
pub async fn pools(s: &Shared, admin: bool) -> Result<Vec<serde_json::Value>, ApiError> {
    let queued = s.store.builds_in_state("queued").await?;
    let paused: std::collections::HashMap<String, crate::store::PauseRow> =
        s.store.paused_pools().await?.into_iter().map(|p| (p.pool.clone(), p)).collect();
    let mut pools = Vec::new();
    for p in &s.config.pools {
        let status = s.store.pool_status(&p.name).await?;
        let waiting = queued
            .iter()
            .filter(|b| s.config.builder(&b.builder).is_some_and(|builder| builder.pool == p.name))
            .count();
        // RFC 3339 timestamps in one format compare as text.
        let failing = status
            .last_launch_failure
            .as_ref()
            .filter(|(at, _)| status.last_launched_at.as_deref().is_none_or(|ok| ok < at.as_str()));
        let held = s.spend_holds.lock().ok().and_then(|h| h.get(&p.name).cloned()).map(|why| match admin {
            true => why,
            false => "a spend cap is reached (admins see the figures)".to_string(),
        });
        let pause = paused.get(&p.name);
        let waiting_reason = pause
            .map(|p| format!("pool paused by {} at {}", p.paused_by, p.paused_at))
            .or_else(|| held.clone())
            .or_else(|| failing.map(|(_, why)| why.clone()))
            .filter(|_| waiting > 0);
        pools.push(json!({
            "name": p.name,
            "provisioner": match p.provisioner {
                crate::config::ProvisionerKind::Local => "local",
                crate::config::ProvisionerKind::Ec2(_) => "ec2",
            },
            "max_instances": p.max_instances,
            "machines": status.machines,
            "queued": waiting,
            "last_launch_failure": status.last_launch_failure.as_ref().map(|(at, why)| json!({"at": at, "reason": why})),
            "waiting_reason": waiting_reason,
            "spend_cap": held,
            "paused": pause.map(|p| json!({"by": p.paused_by, "at": p.paused_at})),
        }));
    }
    Ok(pools)
}

/// Query of `GET /api/cost` (the options of `paddock cost`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostQuery {
    since: Option<String>,
    until: Option<String>,
    by: Option<String>,
    format: Option<String>,
}

/// `GET /api/cost?since=7d&until=&by=pool&format=json`: the cost report (JSON by default;
/// `csv` and `table` as text).
pub async fn cost(
    _: Admin,
    State(s): State<Arc<Shared>>,
    Query(q): Query<CostQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let now = s.now();
    // `?since=&by=` (empty) means the default, as when the option is left out.
    fn given(v: &Option<String>) -> Option<&str> {
        v.as_deref().filter(|v| !v.trim().is_empty())
    }
    let query = crate::cost::report::ReportQuery::parse(
        given(&q.since),
        given(&q.until),
        given(&q.by),
        Some(given(&q.format).unwrap_or("json")),
        now,
    )
    .map_err(|e| ApiError::bad_request(e.0))?;
    let report = crate::cost::report(&s.store, &query, now).await?;
    let content_type = match query.format {
        crate::cost::report::Format::Json => "application/json",
        crate::cost::report::Format::Csv => "text/csv; charset=utf-8",
        crate::cost::report::Format::Table => "text/plain; charset=utf-8",
    };
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], report.render(query.format)))
}

/// Query of `GET /api/deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    limit: Option<i64>,
}

/// `GET /api/deliveries?limit=`: the newest notifications and how their delivery went
/// (admin: they name where messages go and why they failed).
pub async fn list_deliveries(
    _: Admin,
    State(s): State<Arc<Shared>>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 10000"));
    }
    Ok(Json(json!({ "deliveries": s.store.deliveries(limit).await? })))
}

/// Query of `GET /api/changes`.
#[derive(Debug, Deserialize)]
pub struct ChangesQuery {
    repo: Option<String>,
    branch: Option<String>,
    limit: Option<i64>,
}

pub async fn list_changes(
    _: Viewer,
    State(s): State<Arc<Shared>>,
    Query(q): Query<ChangesQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let changes =
        s.store.list_changes(q.repo.as_deref(), q.branch.as_deref(), q.limit.unwrap_or(100).clamp(1, 10_000)).await?;
    Ok(Json(json!({ "changes": changes })))
}

/// `POST /api/changes {repo, branch, revision}`: the generic change hook.
pub async fn post_change(
    _: Committer,
    State(s): State<Arc<Shared>>,
    body: Result<Json<ChangeHook>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(hook) = body.map_err(|e| ApiError::bad_request(format!("malformed change: {}", e.body_text())))?;
    hook.validate().map_err(ApiError::bad_request)?;
    let repo = s
        .config
        .repo(&hook.repo)
        .ok_or_else(|| ApiError::bad_request(format!("unknown repository {:?}", hook.repo)))?;
    if !git::branch_matches(&repo.branches, &hook.branch) {
        return Err(ApiError::bad_request(format!(
            "branch {:?} is not watched for repository {:?}",
            hook.branch, hook.repo
        )));
    }
    // One lock across fetch and store, so the poller cannot record the same commit in between.
    let _guard = s.lock_repo(&repo.name).await;
    let mirror = Mirror::new(s.mirror_dir(&repo.name), repo.url.clone());
    let fetched = async {
        mirror.ensure().await?;
        mirror.fetch(std::slice::from_ref(&hook.branch)).await?;
        let commit = mirror.commit(&hook.revision).await?;
        let tip = mirror.branch_head(&hook.branch).await?;
        Ok::<_, git::GitError>((commit, tip))
    }
    .await;
    let (commit, head) = match fetched {
        // The branch head only moves to the branch's real tip, never back to an older commit.
        Ok((commit, tip)) => {
            let head = (tip == commit.revision).then_some(tip);
            (commit, head)
        }
        Err(e) => {
            tracing::info!(repo = %repo.name, revision = %hook.revision, "change hook: commit not readable from the repository ({e}); using the hook's fields");
            (hook_commit(&hook, s.now()), None)
        }
    };
    let rows =
        ingest::commits(&s, &repo.name, &hook.branch, head.as_deref(), std::slice::from_ref(&commit), "hook").await?;
    Ok((StatusCode::CREATED, Json(json!({ "changes": rows }))))
}

/// Body of `POST /api/builds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceBody {
    builder: String,
    branch: String,
    revision: Option<String>,
    reason: Option<String>,
}

/// `POST /api/builds {builder, branch, revision?}`: a force build.
pub async fn force_build(
    Committer(caller): Committer,
    State(s): State<Arc<Shared>>,
    body: Result<Json<ForceBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(format!("malformed request: {}", e.body_text())))?;
    let build = actions::force(&s, &caller, &body.builder, &body.branch, body.revision, body.reason).await?;
    Ok((StatusCode::CREATED, Json(json!({ "builds": [build] }))))
}

/// `POST /api/builds/{id}/rebuild`: the same builder, branch and revision again, as a new
/// request carrying the same changes.
pub async fn rebuild(
    Committer(caller): Committer,
    State(s): State<Arc<Shared>>,
    Path(id): Path<BuildId>,
) -> Result<impl IntoResponse, ApiError> {
    let build = actions::rebuild(&s, &caller, id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "builds": [build] }))))
}

/// `POST /api/builds/{id}/cancel`: a queued build is cancelled at once (`"outcome":
/// "cancelled"`); a running one is stopped by its agent (`"stopping"`, then state `cancelled`).
pub async fn cancel(
    Committer(caller): Committer,
    State(s): State<Arc<Shared>>,
    Path(id): Path<BuildId>,
) -> Result<impl IntoResponse, ApiError> {
    let outcome = actions::cancel(&s, &caller, id).await?;
    let build = s.store.build(id).await?;
    let outcome = match outcome {
        crate::runtime::Cancelled::Queued => "cancelled",
        crate::runtime::Cancelled::Stopping => "stopping",
    };
    Ok(Json(json!({ "outcome": outcome, "build": build })))
}

/// `POST /api/machines/{id}/terminate`: stop a machine now; its build, if any, is retried.
pub async fn terminate_machine(
    Admin(caller): Admin,
    State(s): State<Arc<Shared>>,
    Path(id): Path<MachineId>,
) -> Result<impl IntoResponse, ApiError> {
    actions::terminate(&s, &caller, id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "machine": id, "state": "stopping" }))))
}

/// `POST /api/pools/{name}/pause`: the pool starts no build and launches nothing until resumed.
pub async fn pause_pool(
    Admin(caller): Admin,
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    actions::pause(&s, &caller, &name, true).await?;
    Ok(Json(json!({ "pool": name, "paused": true })))
}

/// `POST /api/pools/{name}/resume`.
pub async fn resume_pool(
    Admin(caller): Admin,
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    actions::pause(&s, &caller, &name, false).await?;
    Ok(Json(json!({ "pool": name, "paused": false })))
}

/// A change built from the hook's own fields, for a revision the master cannot read (yet).
fn hook_commit(hook: &ChangeHook, now: crate::core::Ts) -> git::CommitInfo {
    git::CommitInfo {
        revision: hook.revision.clone(),
        author: hook.author.clone().unwrap_or_default(),
        committed_at: chrono::DateTime::from_timestamp_millis(now.0).unwrap_or_default(),
        message: hook.message.clone().unwrap_or_default(),
        files: hook.files.clone().unwrap_or_default(),
    }
}
