//! `paddock db …`: moving an installation's database.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::store::Store;

/// `paddock db …`
#[derive(Debug, Subcommand)]
pub enum DbCmd {
    /// Copy every table of one database into a new, empty one, e.g.
    /// `paddock db copy sqlite://paddock.db postgres://paddock@db.example/paddock`. Stop the
    /// master first. Nothing is written unless every table's rows are all copied; the counts
    /// are checked on both sides. Passwords come from PGPASSWORD or ~/.pgpass, never the URL.
    Copy {
        /// The database to copy: it must exist and be of this version of Paddock (it is only
        /// read).
        from: String,
        /// The new database (its schema is made; it must hold no rows).
        to: String,
        /// Copy even when the source holds no rows at all (a mistyped file name would
        /// otherwise copy nothing and look done).
        #[arg(long)]
        allow_empty: bool,
    },
}

/// Runs `paddock db …`.
pub async fn db(cmd: DbCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DbCmd::Copy { from, to, allow_empty } => {
            for (which, url) in [("source", &from), ("destination", &to)] {
                if !url.starts_with("sqlite:") && crate::store::postgres::password_given(url).unwrap_or(false) {
                    // Said without the URL: it holds the password.
                    bail!(
                        "the {which} URL holds a password, which every user of this host can read in the process \
                         list: give it in PGPASSWORD or ~/.pgpass instead"
                    );
                }
            }
            let source = Store::open_read_only(&from).await.context("cannot open the source database")?;
            let dest = Store::open(&to).await.context("cannot open the destination database")?;
            let copied = source.copy_into(&dest, allow_empty).await?;
            let total: i64 = copied.tables.iter().map(|(_, n)| n).sum();
            for (table, n) in &copied.tables {
                println!("{table:<16} {n:>10}");
            }
            println!(
                "copied {total} rows in {} tables; every table's count checked on both sides",
                copied.tables.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
