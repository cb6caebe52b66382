//! The schema's migrations (`migrations/NNNN_name.sql`, embedded in the binary), applied in
//! order, each in its own transaction, and recorded.
//!
//! The record is the `_sqlx_migrations` table, in the layout the sqlx driver that Paddock used
//! before wrote it (version, description, checksum = SHA-384 of the SQL): a database made by an
//! earlier Paddock opens as it is, and a migration changed after it was applied is refused.

use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha384};

use super::{Result, StoreError};

/// One migration: `migrations/{version:04}_{name}.sql`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    /// The file name's words (`report seq` for `0008_report_seq.sql`).
    pub description: &'static str,
    pub sql: &'static str,
}

/// Both lists from one: every migration exists for SQLite (`migrations/`) and for PostgreSQL
/// (`migrations/postgres/`) under the same version, or the build fails.
macro_rules! migrations {
    ($($version:literal $file:literal $description:literal),* $(,)?) => {
        /// Every migration, oldest first. A test checks this list against the folder.
        pub static MIGRATIONS: &[Migration] = &[$(Migration {
            version: $version,
            description: $description,
            sql: include_str!(concat!("../../migrations/", $file)),
        }),*];
        /// PostgreSQL's form of the same migrations: the same versions, so both kinds of
        /// database say alike how far their schema is.
        pub static POSTGRES_MIGRATIONS: &[Migration] = &[$(Migration {
            version: $version,
            description: $description,
            sql: include_str!(concat!("../../migrations/postgres/", $file)),
        }),*];
    };
}

migrations![
    1 "0001_initial.sql" "initial",
    2 "0002_cost.sql" "cost",
    3 "0003_metrics.sql" "metrics",
    4 "0004_accounts.sql" "accounts",
    5 "0005_build_requests.sql" "build requests",
    6 "0006_notify.sql" "notify",
    7 "0007_builds_line.sql" "builds line",
    8 "0008_report_seq.sql" "report seq",
    9 "0009_leases.sql" "leases",
];

impl Migration {
    pub(super) fn checksum(&self) -> Vec<u8> {
        Sha384::digest(self.sql.as_bytes()).to_vec()
    }
}

/// Refuses a database whose record of applied migrations (`version, success, checksum`) this
/// Paddock cannot go on from: a migration that failed part-way, one it does not know (a newer
/// Paddock's), or one changed since it was applied.
pub(super) fn check_applied(applied: &[(i64, bool, Vec<u8>)], known: &[Migration]) -> Result<()> {
    let fail = |why: String| Err(StoreError::Migrate(why));
    for (version, success, checksum) in applied {
        if !success {
            return fail(format!("migration {version} failed part-way earlier; restore a backup"));
        }
        match known.iter().find(|m| m.version == *version) {
            None => {
                return fail(format!(
                    "the database has migration {version}, which this Paddock does not know: it was made by a newer version"
                ))
            }
            Some(m) if m.checksum() != *checksum => {
                return fail(format!("migration {version} ({}) was changed after it was applied", m.description))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Applies the migrations `conn`'s database lacks.
pub(super) fn run(conn: &mut Connection) -> Result<()> {
    let fail = |why: String| StoreError::Migrate(why);
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
             version BIGINT PRIMARY KEY,
             description TEXT NOT NULL,
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
             success BOOLEAN NOT NULL,
             checksum BLOB NOT NULL,
             execution_time BIGINT NOT NULL
         )",
    )?;
    let applied: Vec<(i64, bool, Vec<u8>)> = {
        let mut stmt = conn.prepare("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    check_applied(&applied, MIGRATIONS)?;
    for m in MIGRATIONS.iter().filter(|m| !applied.iter().any(|(v, _, _)| *v == m.version)) {
        let context = |e: rusqlite::Error| fail(format!("migration {} ({}): {e}", m.version, m.description));
        let started = Instant::now();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(context)?;
        // Another process (a CLI command started with the master) may have applied it while
        // this one waited for the write lock.
        let done: Option<Vec<u8>> = tx
            .query_row("SELECT checksum FROM _sqlx_migrations WHERE version = ?", [m.version], |r| r.get(0))
            .optional()
            .map_err(context)?;
        match done {
            Some(sum) if sum == m.checksum() => continue,
            Some(_) => {
                return Err(fail(format!(
                    "migration {} ({}) was changed after it was applied",
                    m.version, m.description
                )))
            }
            None => {}
        }
        tx.execute_batch(m.sql).map_err(context)?;
        tx.execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (?, ?, 1, ?, ?)",
            rusqlite::params![m.version, m.description, m.checksum(), started.elapsed().as_nanos() as i64],
        )
        .map_err(context)?;
        tx.commit().map_err(context)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.sql` files of `migrations/{folder}`, sorted.
    fn sql_files(folder: &str) -> Vec<String> {
        let dir = format!("{}/migrations/{folder}", env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        files
    }

    /// The file name a migration is listed under.
    fn file_name(m: &Migration) -> String {
        format!("{:04}_{}.sql", m.version, m.description.replace(' ', "_"))
    }

    #[test]
    fn the_list_names_every_file_of_the_migrations_folder_in_order() {
        let listed: Vec<String> = MIGRATIONS.iter().map(file_name).collect();
        assert_eq!(listed, sql_files(""), "src/store/migrate.rs must list every migration file");
    }

    #[test]
    fn postgres_has_the_same_migrations_as_sqlite() {
        let listed: Vec<String> = POSTGRES_MIGRATIONS.iter().map(file_name).collect();
        assert_eq!(listed, sql_files("postgres"), "src/store/migrate.rs must list every PostgreSQL migration file");
        let sqlite: Vec<String> = MIGRATIONS.iter().map(file_name).collect();
        assert_eq!(listed, sqlite, "one PostgreSQL migration per SQLite one");
    }

    #[test]
    fn a_changed_or_unknown_migration_is_refused_and_a_second_run_is_a_no_op() {
        let mut db = Connection::open_in_memory().expect("memory db");
        run(&mut db).expect("fresh");
        run(&mut db).expect("again: nothing to do");
        let n: i64 = db.query_row("SELECT COUNT(*) FROM _sqlx_migrations", [], |r| r.get(0)).expect("count");
        assert_eq!(n, MIGRATIONS.len() as i64);
        db.execute("UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 2", []).expect("tamper");
        let err = run(&mut db).expect_err("changed").to_string();
        assert!(err.contains("migration 2 (cost) was changed"), "{err}");
        db.execute(
            "UPDATE _sqlx_migrations SET checksum = ?, version = 999 WHERE version = 2",
            [MIGRATIONS[1].checksum()],
        )
        .expect("tamper");
        let err = run(&mut db).expect_err("unknown").to_string();
        assert!(err.contains("migration 999") && err.contains("newer version"), "{err}");
    }

    /// The checksums databases made by earlier versions recorded (the same SHA-384 the sqlx
    /// driver computed). An edited released migration would make those databases refuse to
    /// open; add a line here for each new migration once it is released.
    #[test]
    fn released_migrations_are_frozen() {
        let released = [
            (1, "f7d9e61d42896c27906c5bcc8c868760482ce17ddd183a9d2575c4bd230b5d20d7f1f73149960a45ddaac72ecbd396ea"),
            (2, "8124d97cab178df558671c4504298bb2b9c22eff3bc32ed5f7563a2d918bafbbba7da703025b248b4f72fa6e076afcc6"),
            (3, "7866c16fad8549f288118d84c6d5c91ae3ec08497a358617a24525dd4b21729b9651d1fe3655cd5fa3bb25df84560130"),
            (4, "74ce93fb5a71a196128af0467ccd578bc8f3819b73ac0e83c85f3478a0dae582f0044b7accf0858efcc075d9a73764b1"),
            (5, "c399b5b003406d7cc6806c68cb5122199c53b2fdc96bee137eba37abbc4b65f82eb75baf01c5c0fef68f70dc55187827"),
            (6, "aaef6f027bb81c8c9b407b764adc2aaf030e9f13370b36115131a19fb9be374b52b7677d110b93a44c87c3fdc0b39cd0"),
            (7, "d686da0e02f7f5480c5706bcc562e8700414adae678f27427b8a4a8ce6b3526040b90345121b47e51e47f5dc18de8475"),
            (8, "cf84badc3022abb936768376499b5fa677c4a0dfe68fe7ca89da7030eba0b9c15fc749c0b1efe9c996fa23091b79505d"),
        ];
        for (version, hex_sum) in released {
            let m = MIGRATIONS.iter().find(|m| m.version == version).expect("a released migration stays listed");
            assert_eq!(hex::encode(m.checksum()), hex_sum, "migration {version} was edited after its release");
        }
    }
}
