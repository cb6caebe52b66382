//! How the core's types are stored: state enums as their lowercase names (a row with a name the
//! code does not know is a decode error, never a silent default), row ids as integers.

use super::sql::{Cell, CellError, FromCell, Param};
use crate::core::build::BuildState;
use crate::core::fleet::MachineState;
use crate::core::{BuildId, MachineId};

/// Implements [`Param`] and [`FromCell`] for an enum with `as_str` and `parse`.
macro_rules! stored_as_name {
    ($t:ty, $what:literal) => {
        impl Param for $t {
            fn cell(&self) -> Cell<'_> {
                Cell::Text(self.as_str())
            }
        }

        impl FromCell for $t {
            fn from_cell(cell: Cell<'_>) -> Result<Self, CellError> {
                let name = String::from_cell(cell)?;
                <$t>::parse(&name).ok_or_else(|| CellError(format!("unknown {} {name:?}", $what)))
            }
        }
    };
}

stored_as_name!(BuildState, "build state");
stored_as_name!(MachineState, "machine state");

/// Implements [`Param`] and [`FromCell`] for a row id, stored as its integer.
macro_rules! stored_as_integer {
    ($t:ident) => {
        impl Param for $t {
            fn cell(&self) -> Cell<'_> {
                Cell::Int(self.0)
            }
        }

        impl FromCell for $t {
            fn from_cell(cell: Cell<'_>) -> Result<Self, CellError> {
                i64::from_cell(cell).map($t)
            }
        }
    };
}

stored_as_integer!(BuildId);
stored_as_integer!(MachineId);

#[cfg(test)]
mod tests {
    use super::super::sql::{one, params, Conn};
    use super::*;

    #[test]
    fn states_go_in_and_out_by_name_and_unknown_names_are_errors() {
        let db = rusqlite::Connection::open_in_memory().expect("memory db");
        let c = Conn::Lite(&db);
        for s in BuildState::ALL {
            let (name, back): (String, BuildState) =
                one(&c, "SELECT ?1, ?1", params![s], |r| Ok((r.get(0)?, r.get(1)?))).expect("round trip");
            assert_eq!((name.as_str(), back), (s.as_str(), s));
        }
        let back: MachineState = one(&c, "SELECT ?", params![MachineState::Idle], |r| r.get(0)).expect("machine");
        assert_eq!(back, MachineState::Idle);
        let bad = one(&c, "SELECT 'done'", params![], |r| r.get::<BuildState>(0));
        assert!(
            bad.is_err_and(|e| e.to_string().contains("unknown build state \"done\"")),
            "an unknown name is an error"
        );
        let (b, m): (BuildId, MachineId) =
            one(&c, "SELECT ?, ?", params![BuildId(7), MachineId(9)], |r| Ok((r.get(0)?, r.get(1)?))).expect("ids");
        assert_eq!((b, m), (BuildId(7), MachineId(9)));
    }
}
