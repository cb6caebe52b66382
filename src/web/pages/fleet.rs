//! Pools and machines: what runs, where, for how long, on what it costs so far (admins), and
//! the admin's actions (terminate a machine, pause or resume a pool).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Redirect};
use axum::Form;
use maud::html;

use super::builds::CsrfForm;
use super::{dollars, duration, layout, may_act, may_view, seconds_between, when, PageResult};
use crate::accounts::Role;
use crate::core::{BuildId, MachineId};
use crate::cost::report::ReportQuery;
use crate::runtime::Shared;
use crate::web::auth::Caller;
use crate::web::{actions, api};

/// Gone machines listed below the live ones.
const RECENT_GONE: i64 = 50;

/// `GET /machines`.
pub async fn machines(State(s): State<Arc<Shared>>, caller: Caller, uri: Uri) -> PageResult {
    may_view(&s, &caller, &uri)?;
    let pools = api::pools(&s, caller.can(Role::Admin)).await?;
    let machines = s.store.recent_machines(RECENT_GONE).await?;
    let now = s.now();
    let admin = caller.can(Role::Admin);
    // Cost so far of the machines running now, from the meter (admins only).
    let mut cost: HashMap<MachineId, Option<f64>> = HashMap::new();
    let mut current: HashMap<MachineId, BuildId> = HashMap::new();
    if admin {
        let since = crate::store::ts_string(crate::core::Ts(now.0 - 1000));
        let q = ReportQuery::parse(Some(&since), None, Some("pool"), Some("json"), now)
            .map_err(|e| super::PageError::Status(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.0))?;
        let report = crate::cost::report(&s.store, &q, now).await?;
        for r in report.running {
            cost.insert(r.machine, r.cost_so_far);
            if let Some(b) = r.build {
                current.insert(r.machine, b);
            }
        }
    }
    let running = s.store.builds_in_state("running").await?;
    for b in &running {
        if let Some(m) = b.machine {
            current.insert(m, b.id);
        }
    }
    let body = html! {
        h2 { "Pools" }
        table #pools {
            thead { tr { th { "Pool" } th { "Provisioner" } th.num { "Max" } th { "Machines" } th.num { "Queued" } th { "Status" } @if admin { th { "" } } } }
            tbody {
                @for p in &pools {
                    @let name = p["name"].as_str().unwrap_or("");
                    tr {
                        td { (name) }
                        td { (p["provisioner"].as_str().unwrap_or("")) }
                        td.num { (p["max_instances"]) }
                        td {
                            @for (state, n) in p["machines"].as_object().into_iter().flatten() {
                                (state) ": " (n) " "
                            }
                        }
                        td.num { (p["queued"]) }
                        td {
                            @if let Some(by) = p["paused"]["by"].as_str() { span.error { "paused by " (by) } " " }
                            @if let Some(why) = p["waiting_reason"].as_str() { span.muted { "waiting: " (why) } }
                        }
                        @if admin {
                            td {
                                @let paused = p["paused"].is_object();
                                form.inline method="post" action={ "/pools/" (crate::web::path_segment(name)) (if paused { "/resume" } else { "/pause" }) } {
                                    input type="hidden" name="csrf" value=(caller.csrf());
                                    button type="submit" { (if paused { "Resume" } else { "Pause" }) }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Machines" }
        table #machines {
            thead {
                tr {
                    th { "#" } th { "Pool" } th { "State" } th { "Type" } th { "Lifecycle" } th { "Zone" }
                    th { "Started" } th.num { "Uptime" } th.num { "Builds" } th { "Current build" }
                    @if admin { th.num { "Cost so far" } th { "" } }
                }
            }
            tbody {
                @for m in &machines {
                    @let start = m.launched_at.as_deref().unwrap_or(&m.requested_at);
                    tr {
                        td.num { (m.id) }
                        td { (m.pool) }
                        td { span class={ "state " (m.state) } { (m.state) } }
                        td { (m.instance_type.as_deref().unwrap_or("")) }
                        td { (m.lifecycle.as_deref().unwrap_or("")) }
                        td { (m.zone.as_deref().unwrap_or("")) }
                        td { (when(start)) }
                        td.num { @if let Some(secs) = seconds_between(start, m.terminated_at.as_deref(), now) { (duration(secs)) } }
                        td.num { (m.builds_run) }
                        td { @if let Some(b) = current.get(&m.id) { a href={ "/builds/" (b) } { "build " (b) } } }
                        @if admin {
                            td.num { @if let Some(c) = cost.get(&m.id) { (c.map(dollars).unwrap_or_else(|| "unknown".into())) } }
                            td {
                                @if !matches!(m.state.as_str(), "gone" | "stopping" | "lost" | "interrupted") {
                                    form.inline method="post" action={ "/machines/" (m.id) "/terminate" } {
                                        input type="hidden" name="csrf" value=(caller.csrf());
                                        button type="submit" { "Terminate" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&s, &caller, "Pools and machines", body).into_response())
}

/// `POST /machines/{id}/terminate`.
pub async fn terminate(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<MachineId>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    may_act(&s, &caller, Role::Admin, &f.csrf, "/machines")?;
    actions::terminate(&s, &caller, id).await?;
    Ok(Redirect::to("/machines").into_response())
}

/// `POST /pools/{name}/pause`.
pub async fn pause(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    may_act(&s, &caller, Role::Admin, &f.csrf, "/machines")?;
    actions::pause(&s, &caller, &name, true).await?;
    Ok(Redirect::to("/machines").into_response())
}

/// `POST /pools/{name}/resume`.
pub async fn resume(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    may_act(&s, &caller, Role::Admin, &f.csrf, "/machines")?;
    actions::pause(&s, &caller, &name, false).await?;
    Ok(Redirect::to("/machines").into_response())
}
