//! `paddock simulate`: the CLI edge of [`crate::sim`]: reads the config and the trace, runs
//! the simulation (once, or once per swept value) and prints the outcome.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::sim::{self, Draw, Model, Span};

/// `paddock simulate`'s options.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The config to simulate (its pools, builders and schedulers).
    pub config: PathBuf,
    /// A CSV trace: `unix_time,branch,sha,files` (files `;`-separated, or a count).
    #[arg(long, conflicts_with_all = ["git", "from_db"])]
    pub trace: Option<PathBuf>,
    /// Replay the installation's own changes instead, from the config's database, at the
    /// times the master recorded them.
    #[arg(long, conflicts_with = "git")]
    pub from_db: bool,
    /// Draw each builder's build durations from its finished builds in the config's database
    /// (builders with none use --duration).
    #[arg(long)]
    pub durations_from_db: bool,
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
    /// Boot time, launch to agent connected: `30s`, a range `25s..40s`, or `db` to draw from
    /// the boot times of the machines in the config's database.
    #[arg(long, default_value = "30s")]
    pub boot: String,
    /// Build durations: `GLOB=SPAN` per builder glob (first match wins, e.g. 'py*=6m..9m'),
    /// or a bare SPAN for the rest (default 5m). Repeatable.
    #[arg(long)]
    pub duration: Vec<String>,
    /// Probability that a build attempt on a spot pool is cut short by a spot interruption
    /// (0 to 1).
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
pub async fn run(a: SimulateArgs) -> anyhow::Result<()> {
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
    let needs_db = a.from_db || a.durations_from_db || a.boot == "db";
    if needs_db {
        // Reading history must not create an empty database where none was.
        let file = config.master.database.strip_prefix("sqlite://").map(|f| f.split('?').next().unwrap_or(f));
        if let Some(file) = file.filter(|f| !std::path::Path::new(f).is_file()) {
            bail!("--from-db, --durations-from-db and --boot db read the config's database, and {file} is not a file");
        }
    }
    let store = match needs_db {
        true => Some(
            crate::store::Store::open_read_only(&config.master.database)
                .await
                .with_context(|| format!("cannot open the config's database {}", config.master.database))?,
        ),
        false => None,
    };
    let mut model = model(&a)?;
    if let Some(store) = &store {
        history_into(&mut model, store, &a).await?;
    }
    let trace = match (&a.trace, &a.git, &store) {
        (_, _, Some(store)) if a.from_db => sim::trace::from_store(store, &repo).await?,
        (Some(t), None, _) => sim::trace::read_csv(t)?,
        (None, Some(g), _) => {
            let r = config.repo(&repo).context("the repo is configured")?;
            let mut branches = r.branches.clone();
            if branches.is_empty() {
                branches =
                    config.schedulers.iter().filter(|s| s.repo == repo).flat_map(|s| s.branches.clone()).collect();
            }
            let t = sim::trace::read_git(g, &branches, a.since.as_deref(), a.until.as_deref())?;
            if t.is_empty() {
                bail!(
                    "--git {}: no commits on the branches {} between --since and --until",
                    g.display(),
                    if branches.is_empty() { "(all)".to_string() } else { branches.join(", ") }
                );
            }
            t
        }
        _ => bail!("give the history to replay: --trace FILE.csv, --git PATH or --from-db (or --change for a dry run)"),
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
        let sweep_err = |e: String| anyhow::anyhow!("--sweep {setting}={value}: {e}");
        let config = crate::config::load_with(&a.config, &set).map_err(|e| sweep_err(e.message.clone()))?;
        let outcome = sim::simulate(&config, &repo, &trace, &model).map_err(|e| sweep_err(e.to_string()))?;
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

/// Boot times and build durations from the store's history, where asked for.
async fn history_into(m: &mut Model, store: &crate::store::Store, a: &SimulateArgs) -> anyhow::Result<()> {
    if a.boot == "db" {
        let boots = sim::trace::boot_times(store).await?;
        if boots.is_empty() {
            bail!("--boot db: the database has no machine whose agent connected; give --boot 30s or a range");
        }
        m.boot = Draw::Observed(boots);
    }
    if a.durations_from_db {
        m.observed = sim::trace::build_durations(store).await?;
    }
    Ok(())
}

fn model(a: &SimulateArgs) -> anyhow::Result<Model> {
    let mut m = Model { seed: a.seed, ..Model::default() };
    if a.boot != "db" {
        m.boot = Draw::Range(Span::parse(&a.boot).map_err(|e| anyhow::anyhow!("--boot {}: {e}", a.boot))?);
    }
    for d in &a.duration {
        m.add_duration(d).map_err(|e| anyhow::anyhow!("--duration {d}: {e}"))?;
    }
    if !(0.0..=1.0).contains(&a.interruptions) {
        bail!("--interruptions {}: a probability, from 0 to 1", a.interruptions);
    }
    m.interruptions = a.interruptions;
    Ok(m)
}
