//! What every memory_ext background process needs: signals and reloads, publishing its state,
//! and running a step in its own transaction without letting an ERROR kill the process.

use crate::shmem::{self, Field};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// What aborted a step run by [`in_transaction`].
#[derive(Debug, Error)]
pub enum TxError {
    /// An ERROR raised in the step.
    #[error("{0}")]
    Error(String),
    /// A Rust panic in the step.
    #[error("{0}")]
    Panic(String),
}

pub fn shutdown_requested() -> bool {
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

/// Bumped at every reload: settings of a background worker change only then.
pub static CONFIG_GENERATION: AtomicU64 = AtomicU64::new(0);

pub fn reload_config_if_asked() {
    if unsafe { pg_sys::ConfigReloadPending } != 0 {
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        CONFIG_GENERATION.fetch_add(1, Ordering::Relaxed);
    }
}

/// Publish what the process is doing: in worker_status() and in pg_stat_activity.query.
pub fn set_state(s: &str) {
    if let Some(slot) = shmem::mine().filter(|_| !shmem::i_am_helper()) {
        slot.set_text(Field::State, s);
    }
    let idle = s == "idle" || s.starts_with("waiting");
    let state = if idle {
        pg_sys::BackendState::STATE_IDLE
    } else {
        pg_sys::BackendState::STATE_RUNNING
    };
    if let Ok(c) = std::ffi::CString::new(s) {
        unsafe { pg_sys::pgstat_report_activity(state, c.as_ptr()) };
    }
}

pub fn record_error(msg: &str) {
    if let Some(slot) = shmem::mine() {
        slot.set_text(Field::LastError, msg);
    }
}

/// Run `f` in its own transaction. An ERROR or panic is caught, the transaction is aborted (so
/// the next one can start), and what happened is returned.
pub fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, TxError> {
    let result = PgTryBuilder::new(AssertUnwindSafe(|| {
        Ok(BackgroundWorker::transaction(AssertUnwindSafe(f)))
    }))
    .catch_others(|e| {
        Err(match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => TxError::Error(r.message().to_string()),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                TxError::Panic(ereport.message().to_string())
            }
        })
    })
    .execute();
    if result.is_err() {
        // BackgroundWorker::transaction leaves the failed transaction open.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}
