//! The cost dashboard (admins): spend per day as a stacked busy/idle/boot SVG chart, the
//! totals with the idle-waste fraction and the 30-day projection, tables by pool, builder and
//! branch, and the CSV download.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use maud::{html, Markup};
use serde::Deserialize;

use super::{dollars, duration, layout, may_view, PageError, PageResult};
use crate::accounts::Role;
use crate::cost::report::{Report, ReportQuery, Row};
use crate::runtime::Shared;
use crate::web::auth::Caller;

/// Query of `GET /cost`.
#[derive(Debug, Deserialize)]
pub struct CostPageQuery {
    since: Option<String>,
}

const BUSY: &str = "#2f6fd6";
const IDLE: &str = "#f08c00";
const BOOT: &str = "#8a93a6";

/// `GET /cost?since=30d`.
pub async fn dashboard(
    State(s): State<Arc<Shared>>,
    caller: Caller,
    uri: Uri,
    Query(q): Query<CostPageQuery>,
) -> PageResult {
    may_view(&s, &caller, &uri)?;
    if caller.user.is_none() {
        return Err(PageError::Login(uri.path().to_string()));
    }
    caller.require(&s, Role::Admin)?;
    let since = q.since.filter(|v| !v.trim().is_empty()).unwrap_or_else(|| "30d".to_string());
    let now = s.now();
    let query = |by: &str| {
        ReportQuery::parse(Some(&since), None, Some(by), Some("json"), now)
            .map_err(|e| PageError::Status(StatusCode::BAD_REQUEST, e.0))
    };
    let by_day = crate::cost::report(&s.store, &query("day")?, now).await?;
    let mut tables = Vec::new();
    for by in ["pool", "builder", "branch"] {
        tables.push((by, crate::cost::report(&s.store, &query(by)?, now).await?));
    }
    let t = &by_day.totals;
    let csv = format!("/api/cost?since={}&by=day&format=csv", super::urlencode(&since));
    let body = html! {
        form method="get" action="/cost" {
            label { "Since " input type="text" name="since" value=(since); }
            " " button type="submit" { "Show" }
            " " a #csv href=(csv) { "Download CSV" }
        }
        table.facts #cost-totals {
            tr { td { "Window" } td { (super::when(&by_day.since)) " – " (super::when(&by_day.until)) } }
            tr { td { "Spend" } td #total { (dollars(t.cost)) } }
            tr { td { "Busy / idle / boot" } td { (dollars(t.busy_cost)) " / " (dollars(t.idle_cost)) " / " (dollars(t.boot_cost)) } }
            tr { td { "Idle waste" } td #idle-waste { (percent(t.idle_waste)) } }
            tr { td { "Projected 30 days" } td #projection { (dollars(by_day.projected_30d)) } }
            tr { td { "Machines" } td { (by_day.machines) } }
            tr { td { "Builds" } td { (t.builds) @if let Some(c) = t.cost_per_build { " (" (dollars(c)) " each)" } } }
            @if by_day.unknown_price.machines > 0 {
                tr { td { "Unknown price" } td.error { (by_day.unknown_price.machines) " machines, not counted in the money" } }
            }
        }
        h2 { "Spend per day" }
        (chart(&by_day))
        @for (by, report) in &tables {
            h2 { "By " (by) }
            (table(by, report))
        }
    };
    Ok(layout(&s, &caller, "Cost", body).into_response())
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |f| format!("{:.1}%", f * 100.0))
}

fn table(by: &str, r: &Report) -> Markup {
    html! {
        table id={ "cost-by-" (by) } {
            thead {
                tr {
                    th { (by) } th.num { "Cost" } th.num { "Busy" } th.num { "Idle" } th.num { "Boot" }
                    th.num { "Idle waste" } th.num { "Builds" } th.num { "Per build" } th.num { "Billed time" }
                }
            }
            tbody {
                @for row in &r.rows {
                    tr {
                        td { (row.key) }
                        td.num { (dollars(row.cost)) }
                        td.num { (dollars(row.busy_cost)) }
                        td.num { (dollars(row.idle_cost)) }
                        td.num { (dollars(row.boot_cost)) }
                        td.num { (percent(row.idle_waste)) }
                        td.num { (row.builds) }
                        td.num { (row.cost_per_build.map(dollars).unwrap_or_default()) }
                        td.num { (duration(row.billed_seconds)) }
                    }
                }
            }
        }
    }
}

/// Every day of the window, with an empty row where nothing ran, so gaps show as gaps.
fn every_day(r: &Report) -> Vec<Row> {
    let day = |t: &str| chrono::NaiveDate::parse_from_str(t.get(..10).unwrap_or(""), "%Y-%m-%d").ok();
    let (Some(first), Some(last)) = (day(&r.since), day(&r.until)) else {
        return r.rows.clone();
    };
    let mut out = Vec::new();
    let mut d = first;
    // A window of years would draw hair-thin bars; past ~400 days show only the days with spend.
    if (last - first).num_days() > 400 {
        return r.rows.clone();
    }
    while d <= last {
        let key = d.format("%Y-%m-%d").to_string();
        out.push(r.rows.iter().find(|row| row.key == key).cloned().unwrap_or(Row { key, ..Row::default() }));
        d = d.succ_opt().unwrap_or(last + chrono::Days::new(1));
    }
    out
}

/// Chart geometry.
const W: f64 = 760.0;
const H: f64 = 220.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 30.0;

/// One bar per day, stacked busy (bottom), idle, boot; a tooltip per segment.
fn chart(r: &Report) -> Markup {
    let days = every_day(r);
    let max = days.iter().map(|d| d.busy_cost + d.idle_cost + d.boot_cost).fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { (H - BOTTOM - 10.0) / max } else { 0.0 };
    let n = days.len().max(1) as f64;
    let slot = (W - LEFT - 10.0) / n;
    let bar = (slot * 0.7).max(1.0);
    let base = H - BOTTOM;
    // Label at most ~10 days so the dates stay readable.
    let every = (days.len() / 10).max(1);
    html! {
        svg #cost-chart xmlns="http://www.w3.org/2000/svg" width=(W) height=(H) viewBox={ "0 0 " (W) " " (H) } role="img" aria-label="spend per day, stacked busy, idle and boot" {
            line x1=(LEFT) y1=(base) x2=(W - 10.0) y2=(base) stroke="#68718a" {}
            line x1=(LEFT) y1="10" x2=(LEFT) y2=(base) stroke="#68718a" {}
            text x=(LEFT - 6.0) y="16" text-anchor="end" font-size="11" { (dollars(max)) }
            text x=(LEFT - 6.0) y=(base) text-anchor="end" font-size="11" { "$0" }
            @for (i, d) in days.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
                @let busy = d.busy_cost * scale;
                @let idle = d.idle_cost * scale;
                @let boot = d.boot_cost * scale;
                g class="day" data-day=(d.key) {
                    rect class="busy" x=(x) y=(base - busy) width=(bar) height=(busy) fill=(BUSY) {
                        title { (d.key) " busy " (dollars(d.busy_cost)) }
                    }
                    rect class="idle" x=(x) y=(base - busy - idle) width=(bar) height=(idle) fill=(IDLE) {
                        title { (d.key) " idle " (dollars(d.idle_cost)) }
                    }
                    rect class="boot" x=(x) y=(base - busy - idle - boot) width=(bar) height=(boot) fill=(BOOT) {
                        title { (d.key) " boot " (dollars(d.boot_cost)) }
                    }
                    @if i % every == 0 {
                        text x=(x + bar / 2.0) y=(H - 12.0) text-anchor="middle" font-size="10" { (d.key.get(5..).unwrap_or(&d.key)) }
                    }
                }
            }
        }
        p.legend {
            span style={ "background:" (BUSY) } {} "busy"
            span style={ "background:" (IDLE) } {} "idle"
            span style={ "background:" (BOOT) } {} "boot"
        }
    }
}
