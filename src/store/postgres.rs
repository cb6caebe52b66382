//! PostgreSQL, the database several masters share: connecting to it, and its schema. This
//! applies `migrations/postgres/` (the same versions as SQLite's) and records them in
//! `_sqlx_migrations` as on SQLite; the store's queries run on it through [`super::sql`].
//!
//! The password is never in the config: it comes from `PGPASSWORD` or a password file
//! (`PGPASSFILE`, else `~/.pgpass`), read by libpq's rules, as `psql` and `pg_dump` read them.
//! Connections use TLS as `sslmode` asks, checking the server against `PGSSLROOTCERT`'s CAs
//! or the system's.

use std::time::Instant;

use super::migrate::{check_applied, POSTGRES_MIGRATIONS};
use super::{Result, StoreError};

/// How connections make TLS (or not), as `sslmode` asks.
pub(super) type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// Any number, the same in every master: masters that start together take turns to migrate.
const MIGRATION_LOCK: i64 = 0x7061_6464_6f63_6b00; // "paddock\0"

/// Looks up an environment variable: the process's ([`process_env`]), or a test's own.
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The process's environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Connects to the database at `url` (a libpq-style `postgres://` URL or key=value string)
/// and applies the migrations it lacks, all in one transaction.
pub async fn migrate(url: &str) -> Result<()> {
    migrate_with(url, &process_env).await
}

/// [`migrate`], with the password and the CAs looked up in `env`.
pub async fn migrate_with(url: &str, env: Env<'_>) -> Result<()> {
    let (mut client, connection) = connect(url, env).await?;
    let out = run(&mut client).await;
    drop(client);
    let _ = connection.await;
    out
}

/// One connection to the database at `url` (password and CAs from `env`, TLS as its
/// `sslmode` asks); the task that carries it ends once the client is dropped.
pub async fn connect(url: &str, env: Env<'_>) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    connect_with(&connect_config(url, env)?, tls(env)?).await
}

/// One connection as `config` says, over `tls`; the task that carries it runs on the current
/// runtime and ends once the client is dropped.
pub(super) async fn connect_with(
    config: &tokio_postgres::Config,
    tls: Tls,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let (client, connection) = config.connect(tls).await.map_err(pg)?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection ended: {e}");
        }
    });
    Ok((client, task))
}

async fn run(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await.map_err(pg)?;
    // Held to the transaction's end: a master that starts meanwhile waits, then finds
    // everything applied (DDL is transactional here, so it sees all or nothing).
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    // A migration's ALTER TABLE waits for the tables' users, and everything after it waits
    // for it: past this, the migration gives up (and says so) rather than stall the farm.
    // The server's notices ("already exists, skipping") are not news for the master's log.
    tx.batch_execute("SET LOCAL lock_timeout = '30s'; SET LOCAL client_min_messages = warning").await.map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
             version BIGINT PRIMARY KEY,
             description TEXT NOT NULL,
             installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
             success BOOLEAN NOT NULL,
             checksum BYTEA NOT NULL,
             execution_time BIGINT NOT NULL
         )",
    )
    .await
    .map_err(pg)?;
    let applied: Vec<(i64, bool, Vec<u8>)> = tx
        .query("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    check_applied(&applied, POSTGRES_MIGRATIONS)?;
    for m in POSTGRES_MIGRATIONS.iter().filter(|m| !applied.iter().any(|(v, _, _)| *v == m.version)) {
        let started = Instant::now();
        let context = |e: tokio_postgres::Error| {
            StoreError::Migrate(format!("migration {} ({}): {}", m.version, m.description, pg_text(&e)))
        };
        tx.batch_execute(m.sql).await.map_err(context)?;
        let took = started.elapsed().as_nanos() as i64;
        tx.execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, true, $3, $4)",
            &[&m.version, &m.description, &m.checksum(), &took],
        )
        .await
        .map_err(context)?;
    }
    tx.commit().await.map_err(pg)?;
    Ok(())
}

/// TLS for the connection, as its `sslmode` asks (`prefer`, the default: when the server
/// offers it; `require`: always; `disable`: never). The server's certificate and name are
/// always checked (rustls checks nothing less), against the CAs of `PGSSLROOTCERT` when set,
/// else the system's.
pub(super) fn tls(env: Env<'_>) -> Result<Tls> {
    let ca = match env("PGSSLROOTCERT").filter(|f| !f.is_empty()) {
        Some(file) => Some(
            crate::tls::read_ca_file(std::path::Path::new(&file))
                .map_err(|why| StoreError::Postgres(format!("PGSSLROOTCERT {file}: {why}")))?,
        ),
        None => None,
    };
    let config = crate::tls::client_config(ca.as_deref()).map_err(|e| StoreError::Postgres(e.to_string()))?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Whether a connection string carries a password, read as the client reads it (user info,
/// query parameters, percent escapes, key=value); `Err` with the client's reason when it
/// cannot read it (the reason names an option, never a value).
pub fn password_given(url: &str) -> std::result::Result<bool, String> {
    url.parse::<tokio_postgres::Config>().map(|c| c.get_password().is_some()).map_err(|e| e.to_string())
}

/// The connection settings of `url`, with the password from `PGPASSWORD`, else from the first
/// line of the password file that matches the host, port, database and user.
pub fn connect_config(url: &str, env: Env<'_>) -> Result<tokio_postgres::Config> {
    // The message of a parse error names the option, never the string (it may hold secrets).
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| StoreError::Postgres(format!("cannot read the connection string: {e}")))?;
    // A server that stops answering (a host gone, a network cut) is noticed in seconds, not
    // after TCP's two-hour keepalive: the store's calls wait on it, and so would the farm.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(std::time::Duration::from_secs(30));
    }
    if config.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(std::time::Duration::from_secs(15));
        config.keepalives_interval(std::time::Duration::from_secs(5));
        config.keepalives_retries(3);
    }
    if config.get_user().is_none() {
        // As the client would (the name of the user this process runs as), but said here so
        // the password file is searched for the same user the connection logs in as.
        let me = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten();
        if let Some(me) = me {
            config.user(me.name);
        }
    }
    if config.get_password().is_some() {
        return Ok(config);
    }
    if let Some(password) = env("PGPASSWORD").filter(|p| !p.is_empty()) {
        config.password(password);
        return Ok(config);
    }
    let file = match env("PGPASSFILE") {
        Some(f) => std::path::PathBuf::from(f),
        None => match env("HOME") {
            Some(home) => std::path::Path::new(&home).join(".pgpass"),
            None => return Ok(config),
        },
    };
    let Ok(meta) = std::fs::metadata(&file) else { return Ok(config) };
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            // libpq's rule: a file others may read is not trusted with passwords.
            tracing::warn!(file = %file.display(), "password file ignored: others may read it (chmod 0600 it)");
            return Ok(config);
        }
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| StoreError::Postgres(format!("cannot read the password file {}: {e}", file.display())))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        // libpq matches a socket connection as localhost.
        _ => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let db = config.get_dbname().map_or_else(|| user.clone(), str::to_string);
    if let Some(password) = pgpass_lookup(&text, [&host, &port, &db, &user]) {
        config.password(password);
    }
    Ok(config)
}

/// The password of the first line of a `.pgpass` text whose fields (host, port, database,
/// user; `*` matches anything) match `want`. Fields are `:`-separated; `\:` and `\\` escape.
fn pgpass_lookup(text: &str, want: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => field.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        fields.push(field);
        if fields.len() != 5 {
            continue;
        }
        if fields[..4].iter().zip(want).all(|(f, w)| f == "*" || f == w) {
            return fields.pop();
        }
    }
    None
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(pg_text(&e))
}

/// The server's own message when there is one (the client's `Display` says only "db error").
pub(super) fn pg_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    // The client's own errors say what failed; their sources say why (a TLS handshake: which
    // certificate check).
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_line_matches_field_by_field_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:ci:ci:first\n\
                    *:5432:*:ci:second\n\
                    db.example:*:ci:ro:has\\:colon\\\\and backslash\n\
                    short:line\n";
        assert_eq!(pgpass_lookup(text, ["db.example", "5432", "ci", "ci"]).as_deref(), Some("first"));
        assert_eq!(pgpass_lookup(text, ["other", "5432", "x", "ci"]).as_deref(), Some("second"));
        assert_eq!(
            pgpass_lookup(text, ["db.example", "6543", "ci", "ro"]).as_deref(),
            Some("has:colon\\and backslash")
        );
        assert_eq!(pgpass_lookup(text, ["db.example", "6543", "ci", "ci"]), None);
    }

    #[test]
    fn the_password_comes_from_the_environment_then_the_password_file_and_never_from_a_loose_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "db.example:5433:ci:ci:from-file\n").expect("write");
        let url = "postgres://ci@db.example:5433/ci";
        let password = |vars: &[(&str, String)]| {
            let env = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
            connect_config(url, &env).expect("config").get_password().map(|p| String::from_utf8_lossy(p).into_owned())
        };
        let passfile = ("PGPASSFILE", file.display().to_string());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(password(&[("PGPASSWORD", "from-env".into()), passfile.clone()]).as_deref(), Some("from-env"));
        assert_eq!(password(std::slice::from_ref(&passfile)).as_deref(), Some("from-file"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(password(&[passfile]), None, "a file others may read is ignored");
        assert_eq!(password(&[]), None);
    }
}
