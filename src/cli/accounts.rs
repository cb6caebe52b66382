//! `paddock user …` and `paddock token …`: accounts, run on the master's host against the
//! config's database (the master may be running; SQLite's WAL lets both write).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::accounts::{self, Role};
use crate::clock::{Clock, SystemClock};
use crate::store::Store;

/// The configuration whose database holds the accounts.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The master's configuration file.
    #[arg(long, env = "PADDOCK_CONFIG", default_value = "paddock.toml")]
    config: PathBuf,
}

/// `paddock user …`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user. The password is asked for (or read from standard input when it is not a
    /// terminal, or with --password-stdin).
    Add {
        /// The login name.
        name: String,
        /// viewer (reads), committer (also forces, rebuilds, cancels) or admin (also costs,
        /// machines, pools).
        #[arg(long)]
        role: String,
        /// Read the password from standard input's first line.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the users and their roles.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user, with their sessions and API tokens.
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Set a user's password (ends their browser sessions).
    Password {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Change a user's role.
    Role {
        name: String,
        /// viewer, committer or admin.
        role: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// `paddock token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an API token for a user; it acts with that user's role. Printed once.
    Create {
        /// Whose token it is.
        user: String,
        /// A label, to tell tokens apart in `paddock token list`.
        #[arg(long, default_value = "cli")]
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the API tokens (never their values).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke a token by its id (from `paddock token list`).
    Revoke {
        id: i64,
        #[command(flatten)]
        config: ConfigArg,
    },
}

async fn open(config: &ConfigArg) -> anyhow::Result<Store> {
    let cfg = crate::config::load(&config.config)?;
    Store::open(&cfg.master.database)
        .await
        .with_context(|| format!("cannot open the database of {}", config.config.display()))
}

fn role(name: &str) -> anyhow::Result<Role> {
    Role::parse(name).ok_or_else(|| accounts::AccountError::BadRole(name.to_string()).into())
}

/// Runs `paddock user …`.
pub async fn user(cmd: UserCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCmd::Add { name, role: r, password_stdin, config } => {
            accounts::check_name(&name)?;
            let role = role(&r)?;
            let store = open(&config).await?;
            if store.user_with_hash(&name).await?.is_some() {
                bail!("user {name:?} exists already (change it with `paddock user password` or `paddock user role`)");
            }
            let hash = accounts::hash_password(&read_password(password_stdin)?)?;
            if !store.add_user(&name, role, &hash, SystemClock.now()).await? {
                bail!("user {name:?} exists already");
            }
            println!("added {role} {name}");
        }
        UserCmd::List { config } => {
            let store = open(&config).await?;
            println!("{:<24} {:<10} CREATED", "NAME", "ROLE");
            for u in store.users().await? {
                println!("{:<24} {:<10} {}", u.name, u.role, u.created_at);
            }
        }
        UserCmd::Remove { name, config } => {
            if !open(&config).await?.remove_user(&name).await? {
                bail!("no user {name:?}");
            }
            println!("removed {name} with their sessions and tokens");
        }
        UserCmd::Password { name, password_stdin, config } => {
            let store = open(&config).await?;
            if store.user_with_hash(&name).await?.is_none() {
                bail!("no user {name:?}");
            }
            let hash = accounts::hash_password(&read_password(password_stdin)?)?;
            if !store.set_password(&name, &hash).await? {
                bail!("no user {name:?}");
            }
            println!("password of {name} changed; their browser sessions are closed");
        }
        UserCmd::Role { name, role: r, config } => {
            let role = role(&r)?;
            if !open(&config).await?.set_role(&name, role).await? {
                bail!("no user {name:?}");
            }
            println!("{name} is now a {role}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `paddock token …`.
pub async fn token(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Create { user, name, config } => {
            let store = open(&config).await?;
            let secret = accounts::new_secret(accounts::TOKEN_PREFIX);
            let Some(row) =
                store.create_token(&user, &name, &accounts::secret_hash(&secret), SystemClock.now()).await?
            else {
                bail!("no user {user:?} (add one with `paddock user add`)");
            };
            // The value goes to stdout alone, so `export PADDOCK_TOKEN=$(paddock token create …)`
            // works; the rest goes to stderr.
            eprintln!("token {} ({}) for {user}; it is shown only this once", row.id, row.name);
            println!("{secret}");
        }
        TokenCmd::List { config } => {
            let store = open(&config).await?;
            println!("{:<6} {:<20} {:<20} {:<26} LAST USED", "ID", "USER", "NAME", "CREATED");
            for t in store.tokens().await? {
                println!(
                    "{:<6} {:<20} {:<20} {:<26} {}",
                    t.id,
                    t.user,
                    t.name,
                    t.created_at,
                    t.last_used_at.as_deref().unwrap_or("never")
                );
            }
        }
        TokenCmd::Revoke { id, config } => {
            if !open(&config).await?.revoke_token(id).await? {
                bail!("no token {id}");
            }
            println!("revoked token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The new password: asked twice without echo on a terminal, else the first line of stdin.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).context("cannot read the password from standard input")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = prompt_hidden("Password: ")?;
    let again = prompt_hidden("Again: ")?;
    if first != again {
        bail!("the two passwords differ");
    }
    Ok(first)
}

/// Reads a line from the terminal with echo off, restoring the terminal afterwards.
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let saved = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("cannot turn the terminal's echo off")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
