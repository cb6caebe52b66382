//! One way to run the store's SQL on either backend: statements written once, in SQLite's
//! dialect with `?` / `?N` placeholders, run on SQLite in place or on PostgreSQL (placeholders
//! rewritten to `$N`, each statement prepared once per connection). Values cross as a few plain
//! kinds (integer, real, text, bytes, null), the kinds both schemas use; the few statements whose
//! dialects differ choose their text with [`Conn::pick`].
//!
//! PostgreSQL is called synchronously too: its connections are carried by a runtime of the
//! store's own (see [`PgRuntime`]), and a call waits for its answer on the caller's thread, so the
//! store's transactions are the same closures on both backends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;

use bytes::BytesMut;
use rusqlite::types::{ToSqlOutput, ValueRef};
use tokio_postgres::types::{IsNull, ToSql as PgToSql, Type};

use super::{Result, StoreError};

/// A value going into or coming out of a statement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Cell<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Bool(bool),
    Blob(&'a [u8]),
}

impl Cell<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Cell::Null => "null",
            Cell::Int(_) => "integer",
            Cell::Real(_) => "real",
            Cell::Text(_) => "text",
            Cell::Bool(_) => "boolean",
            Cell::Blob(_) => "bytes",
        }
    }
}

/// A value owned: a row copied from one database to another.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Param for Value {
    fn cell(&self) -> Cell<'_> {
        match self {
            Value::Null => Cell::Null,
            Value::Int(v) => Cell::Int(*v),
            Value::Real(v) => Cell::Real(*v),
            Value::Text(s) => Cell::Text(s),
            Value::Blob(b) => Cell::Blob(b),
        }
    }
}

impl FromCell for Value {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        Ok(match cell {
            Cell::Null => Value::Null,
            Cell::Int(v) => Value::Int(v),
            Cell::Real(v) => Value::Real(v),
            Cell::Text(s) => Value::Text(s.to_string()),
            // Flags are 0/1 integers in both schemas.
            Cell::Bool(b) => Value::Int(i64::from(b)),
            Cell::Blob(b) => Value::Blob(b.to_vec()),
        })
    }
}

/// Why a column's value is not what the code reads it as.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct CellError(pub String);

impl CellError {
    pub(super) fn wrong(want: &str, got: Cell<'_>) -> CellError {
        CellError(format!("expected {want}, found {}", got.kind()))
    }
}

/// A statement parameter.
pub(super) trait Param {
    fn cell(&self) -> Cell<'_>;
}

/// A value read from a column.
pub(super) trait FromCell: Sized {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError>;
}

impl<T: Param + ?Sized> Param for &T {
    fn cell(&self) -> Cell<'_> {
        (**self).cell()
    }
}

impl<T: Param> Param for Option<T> {
    fn cell(&self) -> Cell<'_> {
        self.as_ref().map_or(Cell::Null, Param::cell)
    }
}

impl Param for str {
    fn cell(&self) -> Cell<'_> {
        Cell::Text(self)
    }
}

impl Param for String {
    fn cell(&self) -> Cell<'_> {
        Cell::Text(self)
    }
}

impl Param for [u8] {
    fn cell(&self) -> Cell<'_> {
        Cell::Blob(self)
    }
}

impl Param for Vec<u8> {
    fn cell(&self) -> Cell<'_> {
        Cell::Blob(self)
    }
}

impl Param for f64 {
    fn cell(&self) -> Cell<'_> {
        Cell::Real(*self)
    }
}

impl Param for bool {
    fn cell(&self) -> Cell<'_> {
        // Flags are 0/1 integers in both schemas.
        Cell::Int(i64::from(*self))
    }
}

macro_rules! integer_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn cell(&self) -> Cell<'_> {
                Cell::Int(i64::from(*self))
            }
        }
    )*};
}
integer_param!(i64, i32, u32, u16, u8);

impl Param for usize {
    fn cell(&self) -> Cell<'_> {
        Cell::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl Param for u64 {
    fn cell(&self) -> Cell<'_> {
        Cell::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Null => Ok(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

impl FromCell for i64 {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Int(v) => Ok(v),
            Cell::Bool(b) => Ok(i64::from(b)),
            other => Err(CellError::wrong("an integer", other)),
        }
    }
}

macro_rules! narrow_integer {
    ($($t:ty),*) => {$(
        impl FromCell for $t {
            fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
                let v = i64::from_cell(cell)?;
                <$t>::try_from(v).map_err(|_| CellError(format!("{v} is out of range for {}", stringify!($t))))
            }
        }
    )*};
}
narrow_integer!(i32, u32, u64, usize, u16, u8);

impl FromCell for f64 {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Real(v) => Ok(v),
            // SQLite keeps a whole number in a REAL column as a real, but an expression may
            // give an integer.
            Cell::Int(v) => Ok(v as f64),
            other => Err(CellError::wrong("a number", other)),
        }
    }
}

impl FromCell for bool {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Bool(b) => Ok(b),
            Cell::Int(v) => Ok(v != 0),
            other => Err(CellError::wrong("a flag", other)),
        }
    }
}

impl FromCell for String {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Text(s) => Ok(s.to_string()),
            other => Err(CellError::wrong("text", other)),
        }
    }
}

impl FromCell for Vec<u8> {
    fn from_cell(cell: Cell<'_>) -> std::result::Result<Self, CellError> {
        match cell {
            Cell::Blob(b) => Ok(b.to_vec()),
            Cell::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(CellError::wrong("bytes", other)),
        }
    }
}

/// Statement parameters: `params![a, b, c]`.
macro_rules! params {
    () => { &[] as &[&dyn $crate::store::sql::Param] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::store::sql::Param),+] as &[&dyn $crate::store::sql::Param] };
}
pub(super) use params;

/// A column, by position or by name.
pub(super) trait Col: Copy + std::fmt::Display + rusqlite::RowIndex {
    fn pg(self, r: &tokio_postgres::Row) -> Option<usize>;
}

impl Col for usize {
    fn pg(self, r: &tokio_postgres::Row) -> Option<usize> {
        Some(self).filter(|i| *i < r.len())
    }
}

impl Col for &str {
    fn pg(self, r: &tokio_postgres::Row) -> Option<usize> {
        r.columns().iter().position(|c| c.name() == self)
    }
}

/// One row of a result, on either backend.
pub(super) enum Row<'a> {
    Lite(&'a rusqlite::Row<'a>),
    Pg(&'a tokio_postgres::Row),
}

impl Row<'_> {
    /// Column `col` read as `T`.
    pub(super) fn get<T: FromCell>(&self, col: impl Col) -> Result<T> {
        let bad = |why: String| StoreError::Column(format!("column {col}: {why}"));
        match self {
            Row::Lite(r) => {
                let v = r.get_ref(col)?;
                let cell = match v {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(i) => Cell::Int(i),
                    ValueRef::Real(f) => Cell::Real(f),
                    ValueRef::Text(t) => Cell::Text(std::str::from_utf8(t).map_err(|e| bad(e.to_string()))?),
                    ValueRef::Blob(b) => Cell::Blob(b),
                };
                T::from_cell(cell).map_err(|e| bad(e.0))
            }
            Row::Pg(r) => {
                let idx = col.pg(r).ok_or_else(|| bad("no such column".into()))?;
                let ty = r.columns()[idx].type_().clone();
                let pg = |e: tokio_postgres::Error| bad(super::postgres::pg_text(&e));
                let cell = match ty {
                    Type::INT8 => r.try_get::<_, Option<i64>>(idx).map_err(pg)?.map(Cell::Int),
                    Type::INT4 => r.try_get::<_, Option<i32>>(idx).map_err(pg)?.map(|v| Cell::Int(v.into())),
                    Type::INT2 => r.try_get::<_, Option<i16>>(idx).map_err(pg)?.map(|v| Cell::Int(v.into())),
                    Type::FLOAT8 => r.try_get::<_, Option<f64>>(idx).map_err(pg)?.map(Cell::Real),
                    Type::FLOAT4 => r.try_get::<_, Option<f32>>(idx).map_err(pg)?.map(|v| Cell::Real(v.into())),
                    Type::BOOL => r.try_get::<_, Option<bool>>(idx).map_err(pg)?.map(Cell::Bool),
                    Type::BYTEA => r.try_get::<_, Option<&[u8]>>(idx).map_err(pg)?.map(Cell::Blob),
                    Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                        r.try_get::<_, Option<&str>>(idx).map_err(pg)?.map(Cell::Text)
                    }
                    other => return Err(bad(format!("its type {other} is not one the store reads (cast it)"))),
                };
                T::from_cell(cell.unwrap_or(Cell::Null)).map_err(|e| bad(e.0))
            }
        }
    }
}

/// A connection inside the store's transaction (or a reader's), on either backend.
#[derive(Clone, Copy)]
pub(super) enum Conn<'a> {
    Lite(&'a rusqlite::Connection),
    Pg(&'a PgConn),
}

impl<'a> Conn<'a> {
    /// The statement text for this backend: SQLite's or PostgreSQL's, where they differ.
    pub(super) fn pick(&self, sqlite: &'a str, postgres: &'a str) -> &'a str {
        match self {
            Conn::Lite(_) => sqlite,
            Conn::Pg(_) => postgres,
        }
    }
}

/// What stands for a NUL character in stored text: PostgreSQL refuses NUL in text, so both
/// backends store this instead (a build printing one, a commit message holding one).
const NUL_SIGN: &str = "\u{2400}";

struct Lite<'a>(&'a dyn Param);

impl rusqlite::ToSql for Lite<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        if let Cell::Text(s) = self.0.cell() {
            if s.contains('\0') {
                return Ok(ToSqlOutput::Owned(rusqlite::types::Value::Text(s.replace('\0', NUL_SIGN))));
            }
        }
        Ok(ToSqlOutput::Borrowed(match self.0.cell() {
            Cell::Null => ValueRef::Null,
            Cell::Int(v) => ValueRef::Integer(v),
            Cell::Real(v) => ValueRef::Real(v),
            Cell::Text(s) => ValueRef::Text(s.as_bytes()),
            Cell::Bool(b) => ValueRef::Integer(i64::from(b)),
            Cell::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// A parameter as PostgreSQL takes it: in the type the server inferred for its place.
#[derive(Debug)]
struct Pg<'a>(Cell<'a>);

impl PgToSql for Pg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let text = matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN);
        match self.0 {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::FLOAT8 => (v as f64).to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                _ if text => v.to_string().as_str().to_sql(ty, out),
                _ => Err(format!("an integer given for a parameter of type {ty}").into()),
            },
            Cell::Bool(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                _ => Pg(Cell::Int(i64::from(b))).to_sql(ty, out),
            },
            Cell::Real(v) => match *ty {
                Type::FLOAT8 => v.to_sql(ty, out),
                Type::FLOAT4 => (v as f32).to_sql(ty, out),
                _ => Err(format!("a real given for a parameter of type {ty}").into()),
            },
            Cell::Text(s) if s.contains('\0') => Pg(Cell::Text(&s.replace('\0', NUL_SIGN))).to_sql(ty, out),
            Cell::Text(s) => match *ty {
                _ if text => s.to_sql(ty, out),
                // JSON's binary form is its text (JSONB's after a version byte).
                Type::JSON => {
                    out.extend_from_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSONB => {
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                _ => Err(format!("text given for a parameter of type {ty}").into()),
            },
            Cell::Blob(b) => match *ty {
                Type::BYTEA => b.to_sql(ty, out),
                _ => Err(format!("bytes given for a parameter of type {ty}").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A PostgreSQL connection of the store's, with the statements it prepared.
pub(super) struct PgConn {
    client: tokio_postgres::Client,
    statements: RefCell<HashMap<String, tokio_postgres::Statement>>,
    /// Set when a call failed because the connection is gone or going (the server ended it):
    /// the connection is not used again.
    broken: std::cell::Cell<bool>,
    /// Set when a statement failed since the transaction began: PostgreSQL then answers COMMIT
    /// with a rollback, which must not pass for a commit (SQLite would have committed the
    /// statements that worked).
    failed_in_tx: std::cell::Cell<bool>,
}

impl PgConn {
    pub(super) fn new(client: tokio_postgres::Client) -> PgConn {
        PgConn {
            client,
            statements: RefCell::new(HashMap::new()),
            broken: std::cell::Cell::new(false),
            failed_in_tx: std::cell::Cell::new(false),
        }
    }

    /// Begins a transaction (`BEGIN` followed by `then`, both without parameters).
    pub(super) fn begin(&self, then: &str) -> Result<()> {
        self.failed_in_tx.set(false);
        self.batch(&format!("BEGIN; {then}"))
    }

    /// Commits the transaction; an error, and a rollback, if any of its statements failed.
    pub(super) fn commit(&self) -> Result<()> {
        if self.failed_in_tx.get() {
            let _ = self.batch("ROLLBACK");
            return Err(StoreError::Postgres(
                "a statement of this transaction failed, so nothing of it was committed".into(),
            ));
        }
        self.batch("COMMIT")
    }

    /// Marks the connection unusable (its transaction's state is unknown).
    pub(super) fn discard(&self) {
        self.broken.set(true);
    }

    /// Whether the connection can no longer be used: closed, or a call found it ending.
    pub(super) fn is_broken(&self) -> bool {
        self.broken.get() || self.client.is_closed()
    }

    /// `e` as a store error, noting first whether it means the connection is gone: closed, or
    /// a connection exception (class 08) or an operator intervention (class 57: the server
    /// shutting down, the backend terminated).
    fn failed(&self, e: &tokio_postgres::Error, sql: &str) -> StoreError {
        let ending = e.code().is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57"));
        if e.is_closed() || ending {
            self.broken.set(true);
        }
        if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) {
            // "cached plan must not change result type": a table changed under a prepared
            // statement (a newer master migrated). Every statement is prepared again.
            self.statements.borrow_mut().clear();
        }
        self.failed_in_tx.set(true);
        StoreError::Postgres(statement_error(e, sql))
    }

    /// `sql` (SQLite's placeholders) prepared on this connection, once.
    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let text = placeholders(sql);
        let stmt = wait(self.client.prepare(&text)).map_err(|e| self.failed(&e, &text))?;
        self.statements.borrow_mut().insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }

    /// Runs statements that take no parameters (BEGIN, COMMIT, SET …).
    pub(super) fn batch(&self, sql: &str) -> Result<()> {
        wait(self.client.batch_execute(sql)).map_err(|e| self.failed(&e, sql))
    }

    fn query(&self, sql: &str, params: &[&dyn Param]) -> Result<Vec<tokio_postgres::Row>> {
        let stmt = self.statement(sql)?;
        let values: Vec<Pg<'_>> = params.iter().map(|p| Pg(p.cell())).collect();
        let refs: Vec<&(dyn PgToSql + Sync)> = values.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        wait(self.client.query(&stmt, &refs)).map_err(|e| self.failed(&e, sql))
    }

    fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<u64> {
        let stmt = self.statement(sql)?;
        let values: Vec<Pg<'_>> = params.iter().map(|p| Pg(p.cell())).collect();
        let refs: Vec<&(dyn PgToSql + Sync)> = values.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        wait(self.client.execute(&stmt, &refs)).map_err(|e| self.failed(&e, sql))
    }
}

/// A PostgreSQL error with the statement it came from (statements hold no secrets: values are
/// parameters).
fn statement_error(e: &tokio_postgres::Error, sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("{} (in: {one_line})", super::postgres::pg_text(e))
}

/// Waits on this thread for a PostgreSQL call; the connection's I/O runs on the store's own
/// runtime, so this works on any thread, inside an async runtime or not.
pub(super) fn wait<F: std::future::Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

/// `sql` with SQLite's placeholders (`?` and `?N`) rewritten as PostgreSQL's (`$N`), outside
/// quoted text. A bare `?` is one past the largest number so far, as SQLite counts.
pub(super) fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut largest = 0u32;
    while let Some(ch) = chars.next() {
        match (quote, ch) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, c @ ('\'' | '"')) => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = if digits.is_empty() { largest + 1 } else { digits.parse().unwrap_or(largest + 1) };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            (None, c) => out.push(c),
        }
    }
    out
}

/// Runs one statement and says how many rows it changed.
pub(super) fn exec(c: &Conn<'_>, sql: &str, params: &[&dyn Param]) -> Result<usize> {
    match c {
        Conn::Lite(c) => {
            Ok(c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params.iter().map(|p| Lite(*p))))?)
        }
        Conn::Pg(c) => Ok(usize::try_from(c.execute(sql, params)?).unwrap_or(usize::MAX)),
    }
}

/// The rows a statement returns, each handed to `f` in order until it says `false` (stop).
/// SQLite reads no further than that; PostgreSQL has sent them all by then.
pub(super) fn each(
    c: &Conn<'_>,
    sql: &str,
    params: &[&dyn Param],
    mut f: impl FnMut(&Row<'_>) -> Result<bool>,
) -> Result<()> {
    match c {
        Conn::Lite(c) => {
            let mut stmt = c.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(|p| Lite(*p))))?;
            while let Some(r) = rows.next()? {
                if !f(&Row::Lite(r))? {
                    break;
                }
            }
            Ok(())
        }
        Conn::Pg(c) => {
            for r in c.query(sql, params)? {
                if !f(&Row::Pg(&r))? {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// Runs `f` in one read-only transaction: every statement sees the database as of the same
/// moment.
pub(super) fn snapshot<T>(c: &Conn<'_>, f: impl FnOnce(&Conn<'_>) -> Result<T>) -> Result<T> {
    match c {
        Conn::Lite(c) => {
            let tx = c.unchecked_transaction()?;
            let out = f(&Conn::Lite(&tx))?;
            tx.commit()?;
            Ok(out)
        }
        Conn::Pg(pg) => {
            pg.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let out = f(c);
            if pg.batch(if out.is_ok() { "COMMIT" } else { "ROLLBACK" }).is_err() {
                // Left inside a transaction, the reader is not used again.
                pg.discard();
            }
            out
        }
    }
}

/// Every row a statement returns, each read by `f`.
pub(super) fn all<T>(
    c: &Conn<'_>,
    sql: &str,
    params: &[&dyn Param],
    mut f: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    each(c, sql, params, |r| {
        out.push(f(r)?);
        Ok(true)
    })?;
    Ok(out)
}

/// The row a statement returns, if any, read by `f`.
pub(super) fn opt<T>(
    c: &Conn<'_>,
    sql: &str,
    params: &[&dyn Param],
    f: impl FnOnce(&Row<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut f = Some(f);
    let mut out = None;
    each(c, sql, params, |r| {
        if let Some(f) = f.take() {
            out = Some(f(r)?);
        }
        Ok(false)
    })?;
    Ok(out)
}

/// The one row a statement returns, read by `f`.
pub(super) fn one<T>(
    c: &Conn<'_>,
    sql: &str,
    params: &[&dyn Param],
    f: impl FnOnce(&Row<'_>) -> Result<T>,
) -> Result<T> {
    opt(c, sql, params, f)?.ok_or(StoreError::Db(rusqlite::Error::QueryReturnedNoRows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_as_sqlite_numbers_them_and_quoted_text_is_left_alone() {
        assert_eq!(placeholders("SELECT ?, ?"), "SELECT $1, $2");
        assert_eq!(placeholders("a = ?1 OR b = ?1 AND c = ?2"), "a = $1 OR b = $1 AND c = $2");
        assert_eq!(placeholders("a = ?3, b = ?"), "a = $3, b = $4");
        assert_eq!(placeholders("x = '?' AND y = ? AND z = \"a?\""), "x = '?' AND y = $1 AND z = \"a?\"");
        assert_eq!(placeholders("x = 'it''s ?' AND y = ?"), "x = 'it''s ?' AND y = $1");
    }

    #[test]
    fn cells_convert_both_ways_and_say_what_they_found() {
        assert_eq!(i64::from_cell(Cell::Bool(true)).expect("flag as int"), 1);
        assert!(bool::from_cell(Cell::Int(0)).is_ok_and(|b| !b));
        assert_eq!(Option::<String>::from_cell(Cell::Null).expect("null"), None);
        let e = String::from_cell(Cell::Int(3)).expect_err("int is not text");
        assert_eq!(e.to_string(), "expected text, found integer");
        assert!(u32::from_cell(Cell::Int(-1)).is_err());
        assert_eq!(true.cell(), Cell::Int(1));
        assert_eq!(Some("a").cell(), Cell::Text("a"));
        assert_eq!(None::<i64>.cell(), Cell::Null);
    }
}
