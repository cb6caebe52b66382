//! The store's two backends for tests: a SQLite file in a temporary folder, or a fresh
//! database on the PostgreSQL server `.ci/test` starts (named in `PADDOCK_TEST_POSTGRES`).
//! [`on_both_backends!`] runs a store test on each.

use paddock::store::Store;

/// A fresh database on the test PostgreSQL server, dropped by [`PgDatabase::drop_it`].
pub struct PgDatabase {
    pub server: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn new() -> PgDatabase {
        let server = std::env::var("PADDOCK_TEST_POSTGRES").unwrap_or_else(|_| {
            panic!(
                "PADDOCK_TEST_POSTGRES is not set: run the tests with .ci/test, which starts a PostgreSQL \
                 server (Debian's postgresql package), or set it to the URL of a server's postgres database"
            )
        });
        let name = format!("paddock_test_{}_{}", std::process::id(), unique());
        psql(&server, &format!("CREATE DATABASE {name}")).await;
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        PgDatabase { server, name, url }
    }

    pub async fn drop_it(self) {
        psql(&self.server, &format!("DROP DATABASE {} WITH (FORCE)", self.name)).await;
    }
}

/// A number no other database of this process has: the time, and a counter for tests that
/// start in the same nanosecond.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64 % 1_000_000_007);
    format!("{nanos}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The test server's password and CA, as Paddock finds them in production: in PGPASSWORD and
/// PGSSLROOTCERT.
pub fn pg_env(name: &str) -> Option<String> {
    let from = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: .ci/test sets it with the server it starts"))
    };
    match name {
        "PGPASSWORD" => Some(from("PADDOCK_TEST_POSTGRES_PASSWORD")),
        "PGSSLROOTCERT" => Some(from("PADDOCK_TEST_POSTGRES_CA")),
        _ => None,
    }
}

/// Runs `sql` on the database at `url`, returning the rows' text columns.
pub async fn psql(url: &str, sql: &str) -> Vec<Vec<String>> {
    let (client, conn) = paddock::store::postgres::connect(url, &pg_env).await.expect("connect to PostgreSQL");
    let rows = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    drop(client);
    let _ = conn.await;
    rows.into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect())
            }
            _ => None,
        })
        .collect()
}

/// One test's database, on one backend.
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(PgDatabase),
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    pub async fn postgres() -> TestDb {
        TestDb::Postgres(PgDatabase::new().await)
    }

    /// Another fresh database on the same backend.
    pub async fn another(&self) -> TestDb {
        match self {
            TestDb::Sqlite(_) => TestDb::sqlite(),
            TestDb::Postgres(_) => TestDb::postgres().await,
        }
    }

    /// The database's URL, as a config's `database` names it.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite(dir) => format!("sqlite://{}", dir.path().join("p.db").display()),
            TestDb::Postgres(pg) => pg.url.clone(),
        }
    }

    /// The store on it (migrated), opened as a master opens it.
    pub async fn open(&self) -> Store {
        match self {
            TestDb::Sqlite(_) => Store::open(&self.url()).await.expect("open SQLite"),
            TestDb::Postgres(pg) => Store::open_postgres(&pg.url, &pg_env, false).await.expect("open PostgreSQL"),
        }
    }

    /// Removes the database (a SQLite folder goes when dropped).
    pub async fn remove(self) {
        if let TestDb::Postgres(pg) = self {
            pg.drop_it().await;
        }
    }
}

/// Runs each named test, an `async fn(&TestDb)`, once on SQLite (`on_sqlite::name`) and once
/// on PostgreSQL (`on_postgres::name`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = $crate::common::db::TestDb::sqlite();
                    super::$name(&db).await;
                    db.remove().await;
                }
            )+
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = $crate::common::db::TestDb::postgres().await;
                    super::$name(&db).await;
                    db.remove().await;
                }
            )+
        }
    };
}

/// A fresh database on the test PostgreSQL server for a test without an async runtime (a
/// bed), made and read with the `psql` CLI.
pub struct PgBlocking {
    server: String,
    name: String,
    pub url: String,
}

impl PgBlocking {
    pub fn new() -> PgBlocking {
        let server = std::env::var("PADDOCK_TEST_POSTGRES").unwrap_or_else(|_| {
            panic!("PADDOCK_TEST_POSTGRES is not set: run the tests with .ci/test, which starts a PostgreSQL server")
        });
        let name = format!("paddock_bed_{}_{}", std::process::id(), unique());
        psql_cli(&server, &format!("CREATE DATABASE {name}"));
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        PgBlocking { server, name, url }
    }

    /// The rows `sql` returns, one per line, columns split by `|`.
    pub fn query(&self, sql: &str) -> String {
        psql_cli(&self.url, sql)
    }

    pub fn drop_it(self) {
        psql_cli(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// Runs `sql` with `psql` (TLS checked against the test CA), returning its unaligned output.
fn psql_cli(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .env("PGPASSWORD", pg_env("PGPASSWORD").unwrap_or_default())
        .env("PGSSLROOTCERT", pg_env("PGSSLROOTCERT").unwrap_or_default())
        .env("PGSSLMODE", "verify-full")
        .output()
        .expect("psql must be installed to run these tests (apt-get install postgresql-client)");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
