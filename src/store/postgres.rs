//! PostgreSQL, the database several masters share: so far its schema. The store's queries
//! run on SQLite only; this applies `migrations/postgres/` (the same versions as SQLite's)
//! and records them in `_sqlx_migrations` as on SQLite.

use std::time::Instant;

use super::migrate::{check_applied, POSTGRES_MIGRATIONS};
use super::{Result, StoreError};

/// Any number, the same in every master: masters that start together take turns to migrate.
const MIGRATION_LOCK: i64 = 0x7061_6464_6f63_6b00; // "paddock\0"

/// Connects to the database at `url` (a libpq-style `postgres://` URL or key=value string)
/// and applies the migrations it lacks, all in one transaction.
pub async fn migrate(url: &str) -> Result<()> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(pg)?;
    let conn = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection ended: {e}");
        }
    });
    let out = run(&mut client).await;
    drop(client);
    let _ = conn.await;
    out
}

async fn run(client: &mut tokio_postgres::Client) -> Result<()> {
    let tx = client.transaction().await.map_err(pg)?;
    // Held to the transaction's end: a master that starts meanwhile waits, then finds
    // everything applied (DDL is transactional here, so it sees all or nothing).
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
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

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(pg_text(&e))
}

/// The server's own message when there is one (the client's `Display` says only "db error").
fn pg_text(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_string())
}
