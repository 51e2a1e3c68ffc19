//! Read-only SPI helpers. pgrx's `Spi::get_one*` run as writable queries and assign a transaction
//! id, which fails on a hot standby and makes a read-only call write WAL at commit; reads use
//! these instead.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiError;

pub fn read_one<A: FromDatum + IntoDatum>(
    query: &str,
    args: &[DatumWithOid<'_>],
) -> Result<Option<A>, SpiError> {
    Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one())
}

/// The current database's name, without SPI.
pub fn current_database() -> String {
    unsafe {
        let p = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}
