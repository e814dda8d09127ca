//! Running a query from Rust the way a client session would.
//!
//! pgrx's `Spi::get_one` and friends run the query "as mutable": they first
//! ask for the transaction's id, assigning one if there is none. In the
//! worker that is one transaction id per call even when nothing is written
//! (an idle worker would burn hundreds a minute, and write WAL for them), and
//! on a standby it is an error. Here the statement itself decides, as in a
//! client session: it gets an id only if it writes.
use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::prelude::*;

/// The first column of the first row, or None.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect(|c| c.select(sql, Some(1), args)?.first().get_one::<T>())
}

/// The first two columns of the first row.
pub fn two<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> Result<(Option<A>, Option<B>), pgrx::spi::Error> {
    Spi::connect(|c| c.select(sql, Some(1), args)?.first().get_two::<A, B>())
}
