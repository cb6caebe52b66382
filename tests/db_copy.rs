//! `paddock db copy`: a farm's SQLite database, made by a real master running real builds,
//! copied into a new PostgreSQL database; a master started on the copy answers the API as the
//! first did, and goes on numbering builds after the copied ones. A second copy into the now
//! full database is refused and changes nothing.

mod common;

use common::db::PgBlocking;
use common::Bed;

const FARM: &str = "[pool.local]\nmax_instances = 2\nidle_timeout = \"60s\"\nboot_timeout = \"60s\"\n\n\
    [[builder]]\nname = \"b\"\nrepo = \"app\"\npool = \"local\"\nsteps = [\"echo built $(cat a.txt)\", \"true\"]\n\n\
    [[scheduler]]\nkind = \"branch\"\nrepo = \"app\"\nbuilders = [\"b\"]\n";

/// What the API says of the farm's history (machines' live parts, such as their last
/// heartbeat, left out: the copy's master has just started).
fn answers(bed: &Bed) -> Vec<serde_json::Value> {
    let builds = bed.get("/api/builds?limit=100");
    let mut out = vec![builds.clone(), bed.get("/api/changes"), bed.get("/api/deliveries")];
    for b in builds["builds"].as_array().expect("builds") {
        out.push(bed.get(&format!("/api/builds/{}", b["id"])));
        let log = bed.http.get(format!("{}/api/builds/{}/log", bed.url(), b["id"])).send().expect("GET log");
        assert!(log.status().is_success());
        out.push(serde_json::Value::String(log.text().expect("log text")));
    }
    let mut machines = bed.get("/api/machines");
    for m in machines["machines"].as_array_mut().expect("machines") {
        // Gone or not: the copy's master stops what the first left running as its own.
        m.as_object_mut()
            .expect("machine")
            .retain(|k, _| ["id", "pool", "provisioner", "requested_at", "builds_run"].contains(&k.as_str()));
    }
    out.push(machines);
    out
}

/// Runs `paddock db copy FROM TO` as an operator would, the server's password and CA in the
/// environment.
fn db_copy(bed: &Bed, from: &str, to: &str) -> std::process::Output {
    bed.command(common::paddock_bin())
        .args(["db", "copy", from, to])
        .current_dir(bed.path())
        .env("PGPASSWORD", common::db::pg_env("PGPASSWORD").unwrap_or_default())
        .env("PGSSLROOTCERT", common::db::pg_env("PGSSLROOTCERT").unwrap_or_default())
        .output()
        .expect("run paddock db copy")
}

#[test]
fn a_sqlite_farm_copied_into_postgres_serves_the_same_history_and_carries_on() {
    let mut bed = Bed::new(&[]);
    bed.config("", FARM);
    bed.start(&["main"]);
    bed.commit("main", "a.txt", "one\n", "first");
    bed.wait_builds_done(1);
    bed.commit("main", "a.txt", "two\n", "second");
    bed.wait_builds_done(2);
    let before = answers(&bed);
    let logs: Vec<&str> = before.iter().filter_map(|v| v.as_str()).collect();
    assert!(logs.iter().any(|log| log.contains("built one two")), "{logs:?}");
    bed.stop_master();

    let pg = PgBlocking::new();
    let sqlite = format!("sqlite://{}", bed.path().join("paddock.db").display());
    let out = db_copy(&bed, &sqlite, &pg.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("every table's count checked on both sides"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("builds ") && l.trim_end().ends_with(" 2")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("log_chunks ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("api_tokens ") && l.trim_end().ends_with(" 1")), "{out}");

    // Again into the same, now full, database: refused, nothing added.
    let chunks = pg.query("SELECT COUNT(*) FROM log_chunks");
    let refused = db_copy(&bed, &sqlite, &pg.url);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("the destination is not empty"), "{why}");
    assert_eq!(pg.query("SELECT COUNT(*) FROM log_chunks"), chunks);

    // A mistyped source is refused, not created and copied as nothing.
    let typo = format!("sqlite://{}", bed.path().join("paddokc.db").display());
    let refused = db_copy(&bed, &typo, &pg.url);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("does not exist"), "{why}");
    assert!(!bed.path().join("paddokc.db").exists());

    // A URL with the password in it is refused before anything is opened, and not echoed.
    let with_password = pg.url.replacen("postgres://paddock@", "postgres://paddock:hunter2@", 1);
    let refused = db_copy(&bed, &sqlite, &with_password);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("PGPASSWORD"), "{why}");
    assert!(!why.contains("hunter2"), "{why}");

    // The master on the copy: the same history, through the same API.
    bed.pg = Some(pg);
    bed.config("", FARM);
    bed.start(&["main"]);
    assert_eq!(answers(&bed), before, "the copy serves what the original served");
    // New rows are numbered after the copied ones.
    bed.commit("main", "a.txt", "three\n", "third");
    let builds = bed.wait_builds_done(3);
    assert_eq!(builds[0]["id"], 3, "{builds:?}");
    assert_eq!(builds[0]["state"], "success", "{builds:?}");
}

#[test]
fn the_copy_knows_every_table_of_the_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    drop(rt.block_on(paddock::store::Store::open(&format!("sqlite://{}", file.display()))).expect("migrate"));
    let conn = rusqlite::Connection::open(&file).expect("open");
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'")
        .expect("tables");
    let tables: std::collections::BTreeSet<String> =
        stmt.query_map([], |r| r.get(0)).expect("query").map(|r| r.expect("row")).collect();
    let copied: std::collections::BTreeSet<String> =
        paddock::store::TABLES.iter().chain(paddock::store::NOT_COPIED).map(|t| t.to_string()).collect();
    assert_eq!(copied, tables, "paddock db copy copies every table");
}

/// Tables of more rows than one INSERT takes, each way: SQLite to PostgreSQL and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rows_copy_both_ways_in_batches() {
    use paddock::core::{MachineId, Ts};
    let lite = common::db::TestDb::sqlite();
    let source = lite.open().await;
    let empty = common::db::TestDb::sqlite();
    let refused = source.copy_into(&empty.open().await, false).await.expect_err("an empty source");
    assert!(refused.to_string().contains("holds no rows"), "{refused}");
    source.copy_into(&empty.open().await, true).await.expect("unless asked");
    for i in 1..=450 {
        source.insert_machine(MachineId(i), "p", "local", &format!("token-{i}"), Ts(i * 1_000)).await.expect("machine");
    }
    let pg = common::db::TestDb::postgres().await;
    let middle = pg.open().await;
    let copied = source.copy_into(&middle, false).await.expect("into PostgreSQL");
    let count = |c: &paddock::store::Copied, t: &str| c.tables.iter().find(|(n, _)| n == t).map(|(_, n)| *n);
    assert_eq!(count(&copied, "machines"), Some(450));
    assert_eq!(count(&copied, "machine_events"), Some(450));
    let back = common::db::TestDb::sqlite();
    let last = back.open().await;
    let again = middle.copy_into(&last, false).await.expect("back into SQLite");
    assert_eq!(again, copied);
    let m = last.machine(MachineId(321)).await.expect("read").expect("copied");
    assert_eq!((m.pool.as_str(), m.requested_at.as_str()), ("p", "1970-01-01T00:05:21.000Z"));
    assert_eq!(last.list_machines(None, None).await.expect("list").len(), 450);
    drop(middle);
    pg.remove().await;
}
