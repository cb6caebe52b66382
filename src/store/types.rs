//! How the core's types are stored: state enums as their lowercase names (a row with a name the
//! code does not know is a decode error, never a silent default), row ids as integers.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::core::build::BuildState;
use crate::core::fleet::MachineState;
use crate::core::{BuildId, MachineId};

/// Why a stored name is not one the code knows.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {name:?}")]
struct UnknownName {
    what: &'static str,
    name: String,
}

/// Implements rusqlite's `ToSql` and `FromSql` for an enum with `as_str` and `parse`.
macro_rules! stored_as_name {
    ($t:ty, $what:literal) => {
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let name = value.as_str()?;
                <$t>::parse(name)
                    .ok_or_else(|| FromSqlError::Other(Box::new(UnknownName { what: $what, name: name.to_string() })))
            }
        }
    };
}

stored_as_name!(BuildState, "build state");
stored_as_name!(MachineState, "machine state");

/// Implements rusqlite's `ToSql` and `FromSql` for a row id, stored as its integer.
macro_rules! stored_as_integer {
    ($t:ident) => {
        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.0))
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_i64().map($t)
            }
        }
    };
}

stored_as_integer!(BuildId);
stored_as_integer!(MachineId);

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn states_go_in_and_out_by_name_and_unknown_names_are_errors() {
        let db = Connection::open_in_memory().expect("memory db");
        for s in BuildState::ALL {
            let (name, back): (String, BuildState) =
                db.query_row("SELECT ?1, ?1", [s], |r| Ok((r.get(0)?, r.get(1)?))).expect("round trip");
            assert_eq!((name.as_str(), back), (s.as_str(), s));
        }
        let back: MachineState = db.query_row("SELECT ?", [MachineState::Idle], |r| r.get(0)).expect("machine");
        assert_eq!(back, MachineState::Idle);
        let bad = db.query_row("SELECT 'done'", [], |r| r.get::<_, BuildState>(0));
        assert!(
            bad.is_err_and(|e| e.to_string().contains("unknown build state \"done\"")),
            "an unknown name is an error"
        );
        let (b, m): (BuildId, MachineId) = db
            .query_row("SELECT ?, ?", rusqlite::params![BuildId(7), MachineId(9)], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("ids");
        assert_eq!((b, m), (BuildId(7), MachineId(9)));
    }
}
