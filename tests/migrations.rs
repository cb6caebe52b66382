//! The schema's migrations: applied in order to a fresh SQLite file with sample data after
//! each one, re-applied as a no-op, and checked for columns that would break existing rows;
//! PostgreSQL's, on a real server, make the same tables, columns and indexes.

use paddock::core::MachineId;
use paddock::core::Ts;
use paddock::store::{Store, MIGRATIONS};

mod common;

use common::db::{pg_env, psql, PgDatabase, TestDb};

on_both_backends!(
    migrations_apply_to_a_fresh_database_and_keep_data_on_reopen,
    a_resume_token_works_once_and_its_predecessor_only_until_then,
);

async fn migrations_apply_to_a_fresh_database_and_keep_data_on_reopen(db: &TestDb) {
    let store = db.open().await;
    let build =
        store.create_request("b", "app", "main", "abc123", "force", "test", &[], Ts(1_000)).await.expect("request");
    store.insert_machine(MachineId(1), "local", "local", "hash", Ts(2_000)).await.expect("machine");
    drop(store);
    // Opening again applies nothing new and loses nothing.
    let store = db.open().await;
    let again = store.build(build.id).await.expect("read").expect("build kept");
    assert_eq!(again.state, paddock::core::build::BuildState::Queued);
    assert_eq!(again.queued_at, "1970-01-01T00:00:01.000Z");
    assert_eq!(store.max_machine_id().await.expect("max"), MachineId(1));
}

#[test]
fn later_migrations_never_add_a_not_null_column_without_a_default() {
    // A NOT NULL column without a DEFAULT cannot be added to a table that has rows.
    for m in MIGRATIONS {
        let sql = m.sql.to_ascii_uppercase();
        for stmt in sql.split(';').filter(|s| s.contains("ALTER TABLE") && s.contains("ADD COLUMN")) {
            assert!(
                !stmt.contains("NOT NULL") || stmt.contains("DEFAULT"),
                "migration {} adds a NOT NULL column without a DEFAULT: {stmt}",
                m.version
            );
        }
    }
    assert!(!MIGRATIONS.is_empty());
}

async fn a_resume_token_works_once_and_its_predecessor_only_until_then(db: &TestDb) {
    let store = db.open().await;
    store.insert_machine(MachineId(7), "local", "local", "one-time", Ts(0)).await.expect("machine");
    store.set_machine_state(MachineId(7), "busy", Ts(1)).await.expect("busy");
    store.set_resume_hash(MachineId(7), "a").await.expect("first token");
    assert!(!store.claim_resume(MachineId(7), "wrong", "b").await.expect("claim"), "an unknown token is refused");
    assert!(!store.claim_resume(MachineId(8), "a", "b").await.expect("claim"), "a token works only for its machine");
    assert!(store.claim_resume(MachineId(7), "a", "b").await.expect("claim"));
    // The Welcome carrying "b" was lost: "a" still works once more.
    assert!(store.claim_resume(MachineId(7), "a", "c").await.expect("claim"));
    // "c" arrived and is used: from then on "a" and "b" are dead.
    assert!(store.claim_resume(MachineId(7), "c", "d").await.expect("claim"));
    assert!(!store.claim_resume(MachineId(7), "a", "x").await.expect("claim"));
    assert!(!store.claim_resume(MachineId(7), "b", "x").await.expect("claim"));
    // A machine that is gone cannot be resumed.
    store.set_machine_state(MachineId(7), "gone", Ts(2)).await.expect("gone");
    assert!(!store.claim_resume(MachineId(7), "d", "e").await.expect("claim"));
}

#[tokio::test]
async fn postgres_migrations_make_the_tables_columns_and_indexes_of_sqlite() {
    let pg = PgDatabase::new().await;
    // Three masters starting at once: one applies, the others then find nothing to do.
    let (a, b, c) = tokio::join!(
        paddock::store::postgres::migrate_with(&pg.url, &pg_env),
        paddock::store::postgres::migrate_with(&pg.url, &pg_env),
        paddock::store::postgres::migrate_with(&pg.url, &pg_env)
    );
    for r in [a, b, c] {
        r.expect("migrate PostgreSQL");
    }
    paddock::store::postgres::migrate_with(&pg.url, &pg_env).await.expect("again: nothing to do");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.db");
    drop(Store::open(&format!("sqlite://{}", file.display())).await.expect("migrate SQLite"));
    let lite = rusqlite::Connection::open(&file).expect("open SQLite");
    let lite_rows = |sql: &str| -> std::collections::BTreeSet<Vec<String>> {
        let mut stmt = lite.prepare(sql).expect("prepare");
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, String>(i)).collect::<rusqlite::Result<Vec<_>>>())
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    };
    let pg_rows = |rows: Vec<Vec<String>>| rows.into_iter().collect::<std::collections::BTreeSet<_>>();

    // Every column: its type, whether it may be NULL, its default. The migration record is
    // each backend's own (its types differ by design); only its columns' names are compared.
    let columns = lite_rows(
        "SELECT m.name, p.name,
           CASE WHEN m.name = '_sqlx_migrations' THEN '' WHEN upper(p.type) IN ('INTEGER', 'BIGINT') THEN 'bigint'
                WHEN upper(p.type) = 'REAL' THEN 'double precision' ELSE lower(p.type) END,
           CASE WHEN m.name = '_sqlx_migrations' THEN '' WHEN p.\"notnull\" OR p.pk > 0 THEN 'NO' ELSE 'YES' END,
           CASE WHEN m.name = '_sqlx_migrations' THEN '' ELSE COALESCE(p.dflt_value, '') END
         FROM sqlite_master m JOIN pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
    );
    let pg_columns = pg_rows(
        psql(
            &pg.url,
            "SELECT table_name, column_name,
               CASE WHEN table_name = '_sqlx_migrations' THEN '' ELSE data_type END,
               CASE WHEN table_name = '_sqlx_migrations' THEN '' ELSE is_nullable END,
               CASE WHEN table_name = '_sqlx_migrations' THEN ''
                    ELSE replace(COALESCE(column_default, ''), '::text', '') END
             FROM information_schema.columns WHERE table_schema = 'public'",
        )
        .await,
    );
    assert!(columns.len() > 50, "{columns:?}");
    assert_eq!(pg_columns, columns, "PostgreSQL's tables and columns are SQLite's");
    let collations = psql(
        &pg.url,
        "SELECT DISTINCT COALESCE(collation_name, 'default') FROM information_schema.columns
         WHERE table_schema = 'public' AND data_type = 'text' AND table_name <> '_sqlx_migrations'",
    )
    .await;
    assert_eq!(collations, [["C".to_string()]], "text compares byte by byte, as in SQLite");

    // The indexes made by name (not those behind primary keys and UNIQUE constraints): their
    // table, columns in order, uniqueness and whether they are partial.
    let indexes = lite_rows(
        "SELECT m.name, l.name,
           (SELECT group_concat(i.name, ',' ORDER BY i.seqno) FROM pragma_index_info(l.name) i),
           CASE l.\"unique\" WHEN 1 THEN 'true' ELSE 'false' END, CASE l.partial WHEN 1 THEN 'true' ELSE 'false' END
         FROM sqlite_master m JOIN pragma_index_list(m.name) l WHERE m.type = 'table' AND l.origin = 'c'",
    );
    let pg_indexes = pg_rows(
        psql(
            &pg.url,
            "SELECT t.relname, i.relname,
               (SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM unnest(x.indkey) WITH ORDINALITY k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum),
               x.indisunique::text, (x.indpred IS NOT NULL)::text
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = 'public' AND i.relname NOT IN (SELECT conname FROM pg_constraint)",
        )
        .await,
    );
    assert!(indexes.len() > 15, "{indexes:?}");
    assert_eq!(pg_indexes, indexes, "PostgreSQL's indexes are SQLite's");

    let record = "SELECT CAST(version AS TEXT), description FROM _sqlx_migrations";
    assert_eq!(pg_rows(psql(&pg.url, record).await), lite_rows(record), "the same migrations recorded");

    // A changed migration is refused, as on SQLite, and nothing is applied.
    psql(&pg.url, "UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 2").await;
    let err = paddock::store::postgres::migrate_with(&pg.url, &pg_env).await.expect_err("changed").to_string();
    assert!(err.contains("migration 2 (cost) was changed"), "{err}");
    pg.drop_it().await;
}

#[tokio::test]
async fn the_postgres_password_comes_from_a_password_file_and_a_wrong_one_is_refused_by_the_server() {
    let pg = PgDatabase::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pgpass");
    let password = pg_env("PGPASSWORD").unwrap_or_default();
    std::fs::write(&file, format!("127.0.0.1:*:{}:paddock:{password}\n", pg.name)).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let from_file = |name: &str| match name {
        "PGPASSFILE" => Some(file.display().to_string()),
        "PGSSLROOTCERT" => pg_env(name),
        _ => None,
    };
    paddock::store::postgres::migrate_with(&pg.url, &from_file).await.expect("migrate with the password file");
    let wrong = |name: &str| match name {
        "PGPASSWORD" => Some("not-the-password".to_string()),
        _ => pg_env(name),
    };
    let err = paddock::store::postgres::migrate_with(&pg.url, &wrong).await.expect_err("wrong password").to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    pg.drop_it().await;
}

#[tokio::test]
async fn postgres_connections_use_tls_as_sslmode_asks_and_check_the_servers_certificate() {
    let pg = PgDatabase::new().await;
    let tls_in_use = |url: String| async move {
        let (client, conn) = paddock::store::postgres::connect(&url, &pg_env).await.expect("connect");
        let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.expect("ask");
        drop(client);
        let _ = conn.await;
        row.get::<_, bool>(0)
    };
    assert!(tls_in_use(pg.url.clone()).await, "the default (prefer) takes the TLS the server offers");
    assert!(tls_in_use(format!("{}?sslmode=require", pg.url)).await);
    assert!(!tls_in_use(format!("{}?sslmode=disable", pg.url)).await);
    // A server whose certificate no trusted CA signed is refused, not used unchecked.
    let system_cas_only = |name: &str| if name == "PGSSLROOTCERT" { None } else { pg_env(name) };
    let err = paddock::store::postgres::migrate_with(&format!("{}?sslmode=require", pg.url), &system_cas_only)
        .await
        .expect_err("an unknown CA")
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    pg.drop_it().await;
}
