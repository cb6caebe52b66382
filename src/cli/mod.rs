//! The `paddock` command line: the master, the agent, and client subcommands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::core::{BuildId, MachineId};

/// Paddock: a CI master that runs every build on small on-demand latent workers.
#[derive(Debug, Parser)]
#[command(name = "paddock", version, about)]
pub struct Cli {
    /// How log lines are written to stderr: `text`, or `json` (one object per line) for log
    /// shippers. For `paddock run` it overrides the config's `log_format`.
    #[arg(long, global = true, env = "PADDOCK_LOG_FORMAT", value_enum)]
    log_format: Option<crate::logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

mod accounts;
mod db;
mod simulate;

/// Where client subcommands find the master, and how they prove who they are.
#[derive(Debug, clap::Args)]
struct MasterArg {
    /// The master's URL.
    #[arg(long, env = "PADDOCK_MASTER", default_value = "http://127.0.0.1:8010")]
    master: String,
    /// An API token (`paddock token create`); needed for anything but reading a public master.
    #[arg(long, env = "PADDOCK_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl MasterArg {
    /// A request to `path` on the master, with the token if there is one; an https://
    /// master's certificate is checked against the system's CAs (`SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` point elsewhere).
    fn request(&self, method: reqwest::Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let url = format!("{}{path}", self.master.trim_end_matches('/'));
        let req = crate::tls::http_client(None)?.request(method, url);
        Ok(match self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => req.bearer_auth(t),
            None => req,
        })
    }

    /// Sends `req`; an unreachable master is an error that says why, down to the refused
    /// certificate (reqwest's own message stops at "error sending request").
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the master at {}: {}", self.master, crate::tls::error_chain(&e)))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the master: pollers, schedulers, the fleet, the API.
    Run {
        /// The configuration file.
        config: PathBuf,
    },
    /// Validate a configuration file and print the expanded builders with their steps.
    CheckConfig {
        /// The configuration file.
        config: PathBuf,
    },
    /// List builds, newest first.
    Builds {
        #[command(flatten)]
        master: MasterArg,
        /// Only this builder.
        #[arg(long)]
        builder: Option<String>,
        /// Only this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only this state (queued, running, success, failure, retry, cancelled, exception).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 30)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the machines cost: totals, busy/idle/boot, idle waste, cost per build, the 30-day
    /// projection, top builders and the machines running now.
    Cost {
        #[command(flatten)]
        master: MasterArg,
        /// Start of the window: a duration back from now (12h, 7d, 2w), a UTC date
        /// (2026-11-01) or an RFC 3339 time. Default: 7 days before --until.
        #[arg(long)]
        since: Option<String>,
        /// End of the window (same forms, or `now`; default now).
        #[arg(long)]
        until: Option<String>,
        /// One row per pool, builder, branch, committer, day or machine.
        #[arg(long, default_value = "pool")]
        by: String,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Print a build's log.
    Log {
        #[command(flatten)]
        master: MasterArg,
        /// The build's id.
        build: BuildId,
    },
    /// Queue a build by hand.
    Force {
        #[command(flatten)]
        master: MasterArg,
        /// The builder (its expanded name, e.g. py3.12-sqlite).
        builder: String,
        /// The branch to build.
        #[arg(long)]
        branch: String,
        /// The revision (default: the branch's head).
        #[arg(long)]
        revision: Option<String>,
    },
    /// Queue a build's builder, branch and revision again (committer).
    Rebuild {
        #[command(flatten)]
        master: MasterArg,
        /// The build's id.
        build: BuildId,
    },
    /// Cancel a queued or running build (committer): a running one's step is killed.
    Cancel {
        #[command(flatten)]
        master: MasterArg,
        /// The build's id.
        build: BuildId,
    },
    /// Stop a machine now; a build on it is retried elsewhere (admin).
    Terminate {
        #[command(flatten)]
        master: MasterArg,
        /// The machine's id (`GET /api/machines`).
        machine: MachineId,
    },
    /// Pause a pool: it starts no build and launches nothing until resumed (admin).
    Pause {
        #[command(flatten)]
        master: MasterArg,
        /// The pool's name.
        pool: String,
    },
    /// Resume a paused pool (admin).
    Resume {
        #[command(flatten)]
        master: MasterArg,
        /// The pool's name.
        pool: String,
    },
    /// Run the agent on a worker machine (started for you by the provisioner).
    Agent {
        /// The master's URL.
        #[arg(long)]
        master: String,
        /// The machine's one-time token.
        #[arg(long, env = "PADDOCK_AGENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Where checkouts live.
        #[arg(long, default_value = ".")]
        workdir: PathBuf,
        /// Instance metadata service to poll for spot interruption notices (on EC2:
        /// http://169.254.169.254). Unset: no polling, as on machines outside EC2.
        #[arg(long, env = "PADDOCK_IMDS_URL")]
        imds_url: Option<String>,
        /// Time between two metadata polls (tests shorten it).
        #[arg(long, env = "PADDOCK_IMDS_POLL", default_value = "5s", value_parser = crate::config::parse_duration, hide = true)]
        imds_poll: std::time::Duration,
    },
    /// Manage the accounts of the web UI and API (on the master's host: uses the config's
    /// database).
    User {
        #[command(subcommand)]
        action: accounts::UserCmd,
    },
    /// Work on a database: copy an installation's into a new one (SQLite to PostgreSQL).
    Db {
        #[command(subcommand)]
        action: db::DbCmd,
    },
    /// Manage API tokens for scripts (sent as `Authorization: Bearer <token>`).
    Token {
        #[command(subcommand)]
        action: accounts::TokenCmd,
    },
    /// Replay a commit history through this config's schedulers and fleet on a virtual clock:
    /// what would the pools cost, and how long would builds wait? Or, with --change, which
    /// builders one change would start.
    Simulate(Box<simulate::SimulateArgs>),
    /// Set up a demo repository and run the master on it with local workers.
    Demo {
        /// Folder for the demo repository, config and database.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Port for the master.
        #[arg(long, default_value_t = 8010)]
        port: u16,
        /// Run as root: the unprivileged user the demo's builds run as (it must exist; by
        /// default `paddock-build`, created when missing).
        #[arg(long)]
        run_as: Option<String>,
    },
}

/// Parses the command line and runs the subcommand; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `paddock run` reads its config before logging starts, so the config's `log_format`
    // applies from the first line; config errors are printed without tracing anyway.
    let preloaded = match &cli.command {
        Command::Run { config } => match crate::config::load(config) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let format = cli.log_format.or(preloaded.as_ref().map(|c| c.master.log_format)).unwrap_or_default();
    crate::logging::init(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, preloaded)) {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<crate::config::ConfigError>() {
                // Already `file:line:column: error: …` with its hint.
                Some(config_error) => eprintln!("{config_error}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs `command`; `preloaded` is the config `paddock run` already read, if any.
async fn dispatch(command: Command, preloaded: Option<crate::config::Config>) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let cfg = match preloaded {
                Some(cfg) => cfg,
                None => load_config(&config)?,
            };
            private_umask();
            run_master(cfg).await?;
        }
        Command::CheckConfig { config } => {
            let cfg = load_config(&config)?;
            crate::notify::worker::check_ca_files(&cfg)?;
            crate::web::tls::check(&cfg)?;
            print!("{}", crate::config::render_builders(&cfg));
            println!("{}: OK ({} builders)", config.display(), cfg.builders.len());
        }
        Command::Builds { master, builder, branch, state, limit, json } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(builder.map(|b| ("builder", b)));
            query.extend(branch.map(|b| ("branch", b)));
            query.extend(state.map(|s| ("state", s)));
            let body: serde_json::Value = get_json(&master, "/api/builds", &query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print!("{}", builds_table(&body));
                // Queued builds that cannot start: say why, from the pools' side.
                if let Ok(pools) = get_json(&master, "/api/pools", &[]).await {
                    for p in pools["pools"].as_array().into_iter().flatten() {
                        if let Some(why) = p["waiting_reason"].as_str() {
                            println!(
                                "pool {}: {} queued, waiting: {why}",
                                p["name"].as_str().unwrap_or("?"),
                                p["queued"]
                            );
                        }
                    }
                }
            }
        }
        Command::Cost { master, since, until, by, format } => {
            // Checked here first, so a typo is reported without a round trip; the master reads
            // the times against its own clock.
            let now = crate::clock::Clock::now(&crate::clock::SystemClock);
            let q = crate::cost::report::ReportQuery::parse(
                since.as_deref(),
                until.as_deref(),
                Some(&by),
                Some(&format),
                now,
            )?;
            let mut query = vec![("by", by), ("format", "json".to_string())];
            query.extend(since.map(|s| ("since", s)));
            query.extend(until.map(|u| ("until", u)));
            let body = get_json(&master, "/api/cost", &query).await?;
            let report: crate::cost::report::Report =
                serde_json::from_value(body).context("the master's cost report is not what this paddock expects")?;
            print!("{}", report.render(q.format));
        }
        Command::Log { master, build } => {
            let text = get_text(&master, &format!("/api/builds/{build}/log"), &[]).await?;
            print!("{text}");
        }
        Command::Force { master, builder, branch, revision } => {
            let body = serde_json::json!({ "builder": builder, "branch": branch, "revision": revision });
            print_queued(&post_json(&master, "/api/builds", Some(body)).await?);
        }
        Command::Rebuild { master, build } => {
            print_queued(&post_json(&master, &format!("/api/builds/{build}/rebuild"), None).await?);
        }
        Command::Cancel { master, build } => {
            let v = post_json(&master, &format!("/api/builds/{build}/cancel"), None).await?;
            match v["outcome"].as_str() {
                Some("stopping") => println!("build {build} is being stopped; it ends as cancelled"),
                _ => println!("build {build} cancelled"),
            }
        }
        Command::Terminate { master, machine } => {
            post_json(&master, &format!("/api/machines/{machine}/terminate"), None).await?;
            println!("machine {machine} is stopping");
        }
        Command::Pause { master, pool } => {
            post_json(&master, &format!("/api/pools/{}/pause", crate::web::path_segment(&pool)), None).await?;
            println!("pool {pool} paused: it starts no build until `paddock resume {pool}`");
        }
        Command::Resume { master, pool } => {
            post_json(&master, &format!("/api/pools/{}/resume", crate::web::path_segment(&pool)), None).await?;
            println!("pool {pool} resumed");
        }
        Command::Agent { master, token, workdir, imds_url, imds_poll } => {
            let opts = crate::agent::client::AgentOptions { master, token, workdir };
            let imds = imds_url
                .filter(|url| !url.trim().is_empty())
                .map(|url| crate::agent::client::ImdsOptions { url, poll: imds_poll });
            if let Err(e) = crate::agent::client::run_with(opts, imds).await {
                eprintln!("agent: {e}");
                return Ok(ExitCode::from(2));
            }
        }
        Command::User { action } => {
            private_umask();
            return accounts::user(action).await;
        }
        Command::Db { action } => {
            private_umask();
            return db::db(action).await;
        }
        Command::Token { action } => {
            private_umask();
            return accounts::token(action).await;
        }
        Command::Simulate(args) => simulate::run(*args).await?,
        Command::Demo { dir, port, run_as } => crate::demo::run(&dir, port, run_as.as_deref()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Files the master creates (its database, mirrors, logs) are its own: no other user, and so no
/// build running as another user, may read them. Local machines start with the usual 022.
fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

fn load_config(path: &std::path::Path) -> anyhow::Result<crate::config::Config> {
    Ok(crate::config::load(path)?)
}

/// Runs the master until SIGINT or SIGTERM.
pub async fn run_master(cfg: crate::config::Config) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("cannot find the paddock executable")?;
    let opts = crate::runtime::RunOptions::new(program, Arc::new(crate::clock::SystemClock));
    crate::runtime::run(cfg, opts, shutdown_signal()).await?;
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn get_json(master: &MasterArg, path: &str, query: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&get_text(master, path, query).await?)?)
}

/// GETs `path` from the master; the body, or the master's reason as the error.
async fn get_text(master: &MasterArg, path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
    let resp = master.send(master.request(reqwest::Method::GET, path)?.query(query)).await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{}", api_error(&text, status));
    }
    Ok(text)
}

/// POSTs to the master (with `body` as JSON, if any) and returns its JSON answer.
async fn post_json(
    master: &MasterArg,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let req = master.request(reqwest::Method::POST, path)?;
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    let resp = master.send(req).await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{}", api_error(&text, status));
    }
    Ok(serde_json::from_str(&text)?)
}

/// Prints the builds of a `{"builds": [...]}` answer as queued.
fn print_queued(value: &serde_json::Value) {
    for b in value["builds"].as_array().into_iter().flatten() {
        println!(
            "queued build {} ({} on {} at {})",
            b["id"],
            b["builder"].as_str().unwrap_or(""),
            b["branch"].as_str().unwrap_or(""),
            b["revision"].as_str().unwrap_or("")
        );
    }
}

fn api_error(text: &str, status: reqwest::StatusCode) -> String {
    let reason = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    let hint = match status {
        reqwest::StatusCode::UNAUTHORIZED => {
            " (give an API token in PADDOCK_TOKEN or --token; an admin makes one with `paddock token create`)"
        }
        _ => "",
    };
    format!("master answered {status}: {reason}{hint}")
}

/// Renders `{"builds": [...]}` as a fixed-width table.
pub fn builds_table(body: &serde_json::Value) -> String {
    let headers = ["ID", "BUILDER", "BRANCH", "REVISION", "STATE", "ATTEMPT", "MACHINE", "QUEUED"];
    let rows: Vec<[String; 8]> = body["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap_or("").to_string();
            [
                b["id"].to_string(),
                s("builder"),
                s("branch"),
                s("revision").chars().take(10).collect(),
                s("state"),
                b["attempt"].to_string(),
                if b["machine"].is_null() { "-".into() } else { b["machine"].to_string() },
                s("queued_at").chars().take(19).collect(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(widths.iter()).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        out.push_str("(no builds)\n");
    }
    out
}
