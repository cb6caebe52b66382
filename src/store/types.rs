//! How the core's types are stored: state enums as their lowercase names (a row with a name the
//! code does not know is a decode error, never a silent default), row ids as integers.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{Sqlite, SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};

use crate::core::build::BuildState;
use crate::core::fleet::MachineState;
use crate::core::{BuildId, MachineId};

/// Implements sqlx's `Type`, `Encode` and `Decode` for an enum with `as_str` and `parse`.
macro_rules! stored_as_name {
    ($t:ty, $what:literal) => {
        impl sqlx::Type<Sqlite> for $t {
            fn type_info() -> SqliteTypeInfo {
                <str as sqlx::Type<Sqlite>>::type_info()
            }
            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <str as sqlx::Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, Sqlite> for $t {
            fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<'q, Sqlite>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Sqlite> for $t {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                let name = <&str as sqlx::Decode<'r, Sqlite>>::decode(value)?;
                <$t>::parse(name).ok_or_else(|| format!(concat!("unknown ", $what, " {:?}"), name).into())
            }
        }
    };
}

stored_as_name!(BuildState, "build state");
stored_as_name!(MachineState, "machine state");

/// Implements sqlx's `Type`, `Encode` and `Decode` for a row id, stored as its integer.
macro_rules! stored_as_integer {
    ($t:ident) => {
        impl sqlx::Type<Sqlite> for $t {
            fn type_info() -> SqliteTypeInfo {
                <i64 as sqlx::Type<Sqlite>>::type_info()
            }
            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <i64 as sqlx::Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, Sqlite> for $t {
            fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
                <i64 as sqlx::Encode<'q, Sqlite>>::encode(self.0, buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Sqlite> for $t {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                <i64 as sqlx::Decode<'r, Sqlite>>::decode(value).map($t)
            }
        }
    };
}

stored_as_integer!(BuildId);
stored_as_integer!(MachineId);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn states_go_in_and_out_by_name_and_unknown_names_are_errors() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.expect("memory db");
        for s in BuildState::ALL {
            let (name, back): (String, BuildState) =
                sqlx::query_as("SELECT ?1, ?1").bind(s).fetch_one(&pool).await.expect("round trip");
            assert_eq!((name.as_str(), back), (s.as_str(), s));
        }
        let back: MachineState =
            sqlx::query_scalar("SELECT ?").bind(MachineState::Idle).fetch_one(&pool).await.expect("machine");
        assert_eq!(back, MachineState::Idle);
        let bad = sqlx::query_scalar::<_, BuildState>("SELECT 'done'").fetch_one(&pool).await;
        assert!(bad.is_err_and(|e| e.to_string().contains("unknown build state \"done\"")));
        let (b, m): (BuildId, MachineId) =
            sqlx::query_as("SELECT ?, ?").bind(BuildId(7)).bind(MachineId(9)).fetch_one(&pool).await.expect("ids");
        assert_eq!((b, m), (BuildId(7), MachineId(9)));
    }
}
