//! `paddock simulate`: the CLI edge of [`crate::sim`]: reads the config and the trace, runs
//! the simulation (once, or once per swept value) and prints the outcome.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::sim::{self, Model, Span};

/// `paddock simulate`'s options.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The config to simulate (its pools, builders and schedulers).
    pub config: PathBuf,
    /// A CSV trace: `unix_time,branch,sha,files` (files `;`-separated, or a count).
    #[arg(long, conflicts_with = "git")]
    pub trace: Option<PathBuf>,
    /// Read the history from this local git repository instead: the first-parent history of
    /// its branches that the repo's `branches` (or the schedulers') match.
    #[arg(long)]
    pub git: Option<PathBuf>,
    /// With --git: commits after this date (git's syntax: 2024-01-01, "3 months ago").
    #[arg(long, requires = "git")]
    pub since: Option<String>,
    /// With --git: commits before this date.
    #[arg(long, requires = "git")]
    pub until: Option<String>,
    /// The config's repo the trace is of (needed when it has several).
    #[arg(long)]
    pub repo: Option<String>,
    /// Boot time, launch to agent connected: `30s`, or a range `25s..40s`.
    #[arg(long, default_value = "30s")]
    pub boot: String,
    /// Build durations: `GLOB=SPAN` per builder glob (first match wins, e.g. 'py*=6m..9m'),
    /// or a bare SPAN for the rest (default 5m). Repeatable.
    #[arg(long)]
    pub duration: Vec<String>,
    /// Probability that a build attempt is cut short by a spot interruption (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub interruptions: f64,
    /// Seed of every random draw: same inputs and seed, same output.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Change one setting: `pool.NAME.KEY=VALUE`. Repeatable.
    #[arg(long)]
    pub set: Vec<String>,
    /// Try several values of one setting, a row each: `pool.NAME.KEY=v1,v2,...`.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Dry run of one change instead: `branch=main files=docs/a.md,src/x.py` says which
    /// builders it would start, and why the others would not.
    #[arg(long, conflicts_with_all = ["trace", "git", "sweep"])]
    pub change: Option<String>,
    /// table or json.
    #[arg(long, default_value = "table")]
    pub format: String,
}

/// Runs `paddock simulate`.
pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let json = match a.format.as_str() {
        "table" => false,
        "json" => true,
        f => bail!("--format {f}: use table or json"),
    };
    let config = crate::config::load_with(&a.config, &a.set)?;
    let repo = sim::pick_repo(&config, a.repo.as_deref())?;
    if let Some(change) = &a.change {
        let verdicts = sim::dry_run(&config, &repo, change).map_err(anyhow::Error::msg)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "builders": verdicts }))?);
        } else {
            let w = verdicts.iter().map(|v| v.builder.len()).max().unwrap_or(7);
            for v in &verdicts {
                println!("{:<w$}  {}  {}", v.builder, if v.starts { "starts " } else { "no     " }, v.why);
            }
        }
        return Ok(());
    }
    let model = model(&a)?;
    let trace = match (&a.trace, &a.git) {
        (Some(t), None) => sim::trace::read_csv(t)?,
        (None, Some(g)) => {
            let r = config.repo(&repo).context("the repo is configured")?;
            let mut branches = r.branches.clone();
            if branches.is_empty() {
                branches =
                    config.schedulers.iter().filter(|s| s.repo == repo).flat_map(|s| s.branches.clone()).collect();
            }
            sim::trace::read_git(g, &branches, a.since.as_deref(), a.until.as_deref())?
        }
        _ => bail!("give the history to replay: --trace FILE.csv or --git PATH (or --change for a dry run)"),
    };
    let Some(sweep) = &a.sweep else {
        let outcome = sim::simulate(&config, &repo, &trace, &model)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&outcome)?);
        } else {
            print!("{}", sim::render::table(&outcome));
        }
        return Ok(());
    };
    let (setting, values) = sweep.split_once('=').context("--sweep: write pool.NAME.KEY=v1,v2,...")?;
    let mut rows = Vec::new();
    for value in values.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        let mut set = a.set.clone();
        set.push(format!("{setting}={value}"));
        let config = crate::config::load_with(&a.config, &set)?;
        let outcome = sim::simulate(&config, &repo, &trace, &model)?;
        rows.push(sim::render::SweepRow { value: value.to_string(), total: outcome.total, pools: outcome.pools });
    }
    if rows.is_empty() {
        bail!("--sweep {sweep}: no values after `=`");
    }
    let sweep = sim::render::Sweep { setting: setting.trim().to_string(), sweep: rows };
    if json {
        println!("{}", serde_json::to_string_pretty(&sweep)?);
    } else {
        print!("{}", sim::render::sweep_table(&sweep));
    }
    Ok(())
}

fn model(a: &SimulateArgs) -> anyhow::Result<Model> {
    let mut m = Model { seed: a.seed, ..Model::default() };
    m.boot = Span::parse(&a.boot).map_err(|e| anyhow::anyhow!("--boot {}: {e}", a.boot))?;
    for d in &a.duration {
        m.add_duration(d).map_err(|e| anyhow::anyhow!("--duration {d}: {e}"))?;
    }
    if !(0.0..=1.0).contains(&a.interruptions) {
        bail!("--interruptions {}: a probability, from 0 to 1", a.interruptions);
    }
    m.interruptions = a.interruptions;
    Ok(m)
}
