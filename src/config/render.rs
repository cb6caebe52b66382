//! The human-readable listing printed by `paddock check-config`.

use std::fmt::Write as _;

use super::duration::format_duration;
use super::model::*;

fn list(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(", ")
    }
}

/// Every expanded builder with its steps, then the pools and schedulers, for `check-config`.
pub fn render_builders(cfg: &Config) -> String {
    // Writing to a String cannot fail, so the fmt::Results below are safely ignored.
    let mut out = String::new();
    let _ = writeln!(out, "builders ({}):", cfg.builders.len());
    for b in &cfg.builders {
        let _ = writeln!(out, "  {}", b.name);
        let _ = writeln!(out, "    repo: {}   pool: {}", b.repo, b.pool);
        let _ = writeln!(out, "    branches: {}", list(&b.branches, "any"));
        if !b.cell.is_empty() {
            let cell: Vec<String> = b.cell.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "    matrix: {}", cell.join(", "));
        }
        if !b.env.is_empty() {
            let _ = writeln!(out, "    env:");
            for (k, v) in &b.env {
                let _ = writeln!(out, "      {k}={v}");
            }
        }
        let _ = writeln!(out, "    steps:");
        for (i, s) in b.steps.iter().enumerate() {
            let mut flags = format!("timeout {}", format_duration(s.timeout));
            if s.always {
                flags.push_str(", always");
            }
            if let Some(w) = &s.workdir {
                flags.push_str(&format!(", workdir {w}"));
            }
            if s.name == s.run {
                // A default name is the command itself; printing it twice is noise.
                let _ = writeln!(out, "      {}. $ {}  ({flags})", i + 1, s.run);
            } else {
                let _ = writeln!(out, "      {}. {}  ({flags})", i + 1, s.name);
                for line in s.run.lines() {
                    let _ = writeln!(out, "         $ {line}");
                }
            }
            for (k, v) in &s.env {
                let _ = writeln!(out, "         env {k}={v}");
            }
        }
    }
    let _ = writeln!(out, "pools ({}):", cfg.pools.len());
    for p in &cfg.pools {
        let kind = match p.provisioner {
            ProvisionerKind::Local => "local",
            ProvisionerKind::Ec2(_) => "ec2",
        };
        let max_builds = if p.max_builds == 0 { "unlimited".to_string() } else { p.max_builds.to_string() };
        let _ = writeln!(
            out,
            "  {}: {kind}, max_instances {}, min_idle {}, idle_timeout {}, boot_timeout {}, builds per machine {max_builds}",
            p.name,
            p.max_instances,
            p.min_idle,
            format_duration(p.idle_timeout),
            format_duration(p.boot_timeout),
        );
        if let Some(cmd) = &p.agent_command {
            let _ = writeln!(out, "    agent_command: {}", cmd.display());
        }
        if p.provisioner == ProvisionerKind::Local {
            let who = match &p.run_as {
                Some(user) => format!("as user {user}"),
                None => "as the master's user".to_string(),
            };
            let how = match p.isolation {
                Isolation::Sandbox => format!("sandbox (bubblewrap), {who}"),
                Isolation::None => "none: steps run as the master's user, with access to its files".to_string(),
            };
            let _ = writeln!(out, "    isolation: {how}");
        }
        if let ProvisionerKind::Ec2(e) = &p.provisioner {
            let image = match (&e.ami, &e.launch_template) {
                (Some(ami), _) => ami.clone(),
                (None, Some(lt)) => format!("launch template {lt}"),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                out,
                "    ec2: region {}, {image}, types [{}], subnets [{}], {}",
                e.region.as_deref().unwrap_or("(from the environment)"),
                e.instance_types.join(", "),
                e.subnets.join(", "),
                if e.spot { "spot, falling back to on-demand" } else { "on-demand" }
            );
        }
        let _ = writeln!(out, "    cost: {}{}", pool_prices(p), caps(&p.spend));
    }
    if cfg.cost.spend.any() {
        let _ = writeln!(out, "spend caps over all pools: {}", caps(&cfg.cost.spend).trim_start_matches("; "));
    }
    let _ = writeln!(out, "schedulers ({}):", cfg.schedulers.len());
    for s in &cfg.schedulers {
        let detail = match &s.kind {
            SchedulerKind::Branch { tree_stable, files, ignore } => {
                let mut d = "branch".to_string();
                if let Some(t) = tree_stable {
                    d.push_str(&format!(", tree_stable {}", format_duration(*t)));
                }
                if !files.is_empty() {
                    d.push_str(&format!(", files {}", files.join(" ")));
                }
                if !ignore.is_empty() {
                    d.push_str(&format!(", ignore {}", ignore.join(" ")));
                }
                d
            }
            SchedulerKind::Nightly { cron, only_if_changed } => {
                format!("nightly, cron \"{cron}\"{}", if *only_if_changed { ", only if changed" } else { "" })
            }
        };
        let _ = writeln!(out, "  {}: {detail}; repo {}, branches {}", s.name, s.repo, list(&s.branches, "all"));
        let _ = writeln!(out, "    builders: {}", s.builders.join(", "));
    }
    out
}

/// What a pool's machines will be priced at, as the meter will decide at launch.
fn pool_prices(p: &crate::config::Pool) -> String {
    let table = crate::cost::prices::PriceTable::builtin();
    let priced = |t: &str, region: Option<&str>| -> String {
        if let Some(v) = p.prices.get(t).copied().or(p.hourly_price) {
            return format!("{t} ${v}/h (config)");
        }
        match region.and_then(|r| table.on_demand(r, t)) {
            Some(v) => format!("{t} ${v}/h (table)"),
            None => format!("{t} unknown price (add it to `prices`)"),
        }
    };
    match &p.provisioner {
        ProvisionerKind::Local => format!("${}/h per machine (nominal)", p.hourly_price.unwrap_or(0.0)),
        ProvisionerKind::Ec2(e) => {
            let mut parts: Vec<String> = e.instance_types.iter().map(|t| priced(t, e.region.as_deref())).collect();
            if parts.is_empty() {
                parts.push("the launch template's type, priced at launch".into());
            }
            if e.spot {
                parts.push("spot machines at the spot price of their launch".into());
            }
            parts.join(", ")
        }
    }
}

fn caps(c: &crate::config::SpendCaps) -> String {
    let mut out = String::new();
    if let Some(h) = c.hourly {
        out.push_str(&format!("; at most ${h:.2} per hour"));
    }
    if let Some(d) = c.daily {
        out.push_str(&format!("; at most ${d:.2} per day"));
    }
    out
}
