//! The schema's migrations: applied in order to a fresh SQLite file with sample data after
//! each one, re-applied as a no-op, and checked for columns that would break existing rows.

use paddock::core::MachineId;
use paddock::core::Ts;
use paddock::store::{Store, MIGRATIONS};

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_keep_data_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = Store::open(&url).await.expect("open");
    let build =
        store.create_request("b", "app", "main", "abc123", "force", "test", &[], Ts(1_000)).await.expect("request");
    store.insert_machine(MachineId(1), "local", "local", "hash", Ts(2_000)).await.expect("machine");
    drop(store);
    // Opening again applies nothing new and loses nothing.
    let store = Store::open(&url).await.expect("reopen");
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

#[tokio::test]
async fn a_resume_token_works_once_and_its_predecessor_only_until_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let store = Store::open(&url).await.expect("open");
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
