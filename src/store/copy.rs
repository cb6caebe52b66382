//! `paddock db copy`: every table of one database into another, empty one (SQLite to
//! PostgreSQL when a farm outgrows one host, or back), in one transaction of the destination,
//! with each table's rows counted on both sides before it commits.

use serde::Serialize;

use super::sql::{each, exec, one, params, Conn, Param, Value};
use super::{Result, Store, StoreError};

/// Every table copied, parents before the tables whose rows refer to them (a test checks that
/// these and [`NOT_COPIED`] are every table of the schema).
pub const TABLES: &[&str] = &[
    "changes",
    "branch_heads",
    "build_requests",
    "builds",
    "steps",
    "log_chunks",
    "machines",
    "machine_events",
    "scheduler_state",
    "users",
    "sessions",
    "api_tokens",
    "pool_pauses",
    "build_events",
    "deliveries",
];

/// Tables not copied: who holds which lease and which masters ran belong to the masters of
/// each database, not to its history.
pub const NOT_COPIED: &[&str] = &["leases", "masters"];

/// Rows written per INSERT statement, at most (and at most this many parameters in one).
const ROWS_PER_INSERT: usize = 200;
const PARAMS_PER_INSERT: usize = 2_000;

/// How many rows of each table were copied (and found on both sides).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Copied {
    pub tables: Vec<(String, i64)>,
}

/// The columns of `table`, in the schema's order.
fn columns(c: &Conn<'_>, table: &str) -> Result<Vec<String>> {
    let sql = match c {
        Conn::Lite(_) => "SELECT name FROM pragma_table_info(?) ORDER BY cid",
        Conn::Pg(_) => {
            "SELECT column_name FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position"
        }
    };
    super::all(c, sql, params![table], |r| r.get(0))
}

fn columns_have_id(c: &Conn<'_>, table: &str) -> Result<bool> {
    Ok(columns(c, table)?.iter().any(|c| c == "id"))
}

fn count(c: &Conn<'_>, table: &str) -> Result<i64> {
    one(c, &format!("SELECT COUNT(*) FROM {table}"), params![], |r| r.get(0))
}

impl Store {
    /// Copies every table of `self` into `to`, which must be empty (its schema made, by
    /// opening it); `self` must hold rows unless `allow_empty`: all of it in one transaction of `to`, committed only once every table has
    /// as many rows there as here. Ids are kept; PostgreSQL's id sequences then continue
    /// after the highest.
    pub async fn copy_into(&self, to: &Store, allow_empty: bool) -> Result<Copied> {
        if !allow_empty {
            let rows: i64 = self.read_long(|src| TABLES.iter().map(|t| count(src, t)).sum::<Result<i64>>())?;
            if rows == 0 {
                return Err(StoreError::Copy(
                    "the source holds no rows at all: is it the right database? (--allow-empty copies it anyway)"
                        .into(),
                ));
            }
        }
        let out = to.write(|dst| {
            for table in TABLES {
                let n = count(dst, table)?;
                if n > 0 {
                    return Err(StoreError::Copy(format!(
                        "the destination is not empty ({table} has {n} rows): copy into a new database"
                    )));
                }
            }
            let mut copied = Copied::default();
            for table in TABLES {
                let cols = self.read_long(|src| columns(src, table))?;
                let theirs = columns(dst, table)?;
                if cols != theirs {
                    return Err(StoreError::Copy(format!(
                        "table {table} has columns {cols:?} here and {theirs:?} there: both must run this version of Paddock"
                    )));
                }
                let rows = self.read_long(|src| copy_table(src, dst, table, &cols))?;
                let there = count(dst, table)?;
                if there != rows {
                    return Err(StoreError::Copy(format!("table {table}: {rows} rows read, {there} in the destination")));
                }
                copied.tables.push((table.to_string(), rows));
            }
            if let Conn::Pg(_) = dst {
                for table in TABLES.iter().filter(|t| columns_have_id(dst, t).unwrap_or(false)) {
                    // The next id given is past every copied one (a table whose id is no
                    // identity, such as machines', has no sequence: NULL, nothing is set).
                    one(
                        dst,
                        &format!(
                            "SELECT 1 FROM (SELECT setval(pg_get_serial_sequence(?, 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL)
                             FROM {table}) AS s"
                        ),
                        params![table],
                        |_| Ok(()),
                    )?;
                }
            }
            Ok(copied)
        })?;
        // What a notifier may now find to send lives in `to`.
        to.news.notify_one();
        Ok(out)
    }
}

/// Copies the rows of `table` from `src` to `dst` a batch at a time; how many it read.
fn copy_table(src: &Conn<'_>, dst: &Conn<'_>, table: &str, cols: &[String]) -> Result<i64> {
    let per_insert = ROWS_PER_INSERT.min(PARAMS_PER_INSERT / cols.len().max(1)).max(1);
    let select = format!("SELECT {} FROM {table}", cols.join(", "));
    let mut batch: Vec<Vec<Value>> = Vec::with_capacity(per_insert);
    let mut rows = 0i64;
    let flush = |batch: &mut Vec<Vec<Value>>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let row = format!("({})", vec!["?"; cols.len()].join(", "));
        let sql = format!("INSERT INTO {table} ({}) VALUES {}", cols.join(", "), vec![row; batch.len()].join(", "));
        let values: Vec<&dyn Param> = batch.iter().flatten().map(|v| v as &dyn Param).collect();
        exec(dst, &sql, &values).map_err(|e| StoreError::Copy(format!("table {table}: {e}")))?;
        batch.clear();
        Ok(())
    };
    each(src, &select, params![], |r| {
        let row = (0..cols.len()).map(|i| r.get::<Value>(i)).collect::<Result<Vec<_>>>()?;
        batch.push(row);
        rows += 1;
        if batch.len() == per_insert {
            flush(&mut batch)?;
        }
        Ok(true)
    })?;
    flush(&mut batch)?;
    Ok(rows)
}
