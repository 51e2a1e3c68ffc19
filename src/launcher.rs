//! The launcher: a background worker registered in `_PG_init` that connects to no database, so
//! it can wait calmly for `memory_ext.database` to exist. It then starts the queue-draining
//! worker (`crate::worker`) as a dynamic background worker and starts it again, with a growing
//! delay, whenever it stops.

use crate::bgw::{in_transaction, reload_config_if_asked, set_state, shutdown_requested};
use crate::settings;
use crate::shmem::{self, Field};
use crate::worker;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LAUNCHER: &str = "memory_ext launcher";

pub fn register() {
    BackgroundWorkerBuilder::new(LAUNCHER)
        .set_type(LAUNCHER)
        .set_library("memory_ext")
        .set_function("memory_ext_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// When to start the worker again after it stopped. A worker that keeps dying soon after start
/// is restarted after `min`, then twice as long each time, up to `max`; one that ran for at
/// least `stable` before stopping is restarted after `min` again.
#[derive(Debug)]
pub struct RestartBackoff {
    min: Duration,
    max: Duration,
    stable: Duration,
    next_delay: Duration,
    started_at: Option<Instant>,
}

impl RestartBackoff {
    pub fn new(min: Duration, max: Duration, stable: Duration) -> Self {
        Self {
            min,
            max,
            stable,
            next_delay: min,
            started_at: None,
        }
    }

    pub fn started(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// The worker stopped at `now`: how long to wait before starting it again.
    pub fn stopped(&mut self, now: Instant) -> Duration {
        let ran = self
            .started_at
            .take()
            .map(|t| now.saturating_duration_since(t));
        if ran.is_some_and(|r| r >= self.stable) {
            self.next_delay = self.min;
        }
        let delay = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(self.max);
        delay
    }
}

/// Does the database exist? A process connected to no database has no relcache entries for
/// catalog indexes, so this scans pg_database's heap, like the autovacuum launcher does
/// (`get_database_oid` would use an index and FATAL).
fn database_exists(name: &std::ffi::CStr) -> bool {
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = false;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()) == name {
                found = true;
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
        found
    }
}

/// Start the worker for `db`, or say why not.
fn start_worker(db: &str, db_c: &std::ffi::CStr) -> Option<DynamicBackgroundWorker> {
    if !in_transaction(|| database_exists(db_c)).unwrap_or(false) {
        set_state(&format!("waiting for database \"{db}\" to exist"));
        return None;
    }
    match worker::builder(db)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
    {
        Ok(h) => Some(h),
        Err(_) => {
            set_state("no free background worker slot (raise max_worker_processes)");
            None
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn memory_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only shared catalogs (pg_database) are readable, which is all we need.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let db = settings::string(&settings::DATABASE);
    if let Some(sh) = shmem::get() {
        sh.launcher_pid
            .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        sh.set_text(Field::Database, &db);
    }
    let db_c = std::ffi::CString::new(db.clone()).unwrap_or_default();
    let mut child: Option<DynamicBackgroundWorker> = None;
    let mut backoff = RestartBackoff::new(
        Duration::from_secs(1),
        Duration::from_secs(30),
        Duration::from_secs(60),
    );
    let mut next_start = Instant::now();

    while !shutdown_requested() {
        reload_config_if_asked();
        if let Some(handle) = &child
            && !matches!(
                handle.pid(),
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)
            )
        {
            // The worker stopped (crash, an ERROR it could not survive, or terminated).
            child = None;
            next_start = Instant::now() + backoff.stopped(Instant::now());
        }
        if child.is_none() && Instant::now() >= next_start {
            child = start_worker(&db, &db_c);
            match child {
                Some(_) => backoff.started(Instant::now()),
                None => next_start = Instant::now() + Duration::from_secs(1),
            }
        }
        // The postmaster signals us when the child starts or stops (bgw_notify_pid).
        let timeout = match child {
            Some(_) => Duration::from_secs(10),
            None => next_start
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        };
        if !BackgroundWorker::wait_latch(Some(timeout)) {
            break;
        }
    }
    if let Some(h) = child.take() {
        let _ = h.terminate();
    }
    if let Some(sh) = shmem::get() {
        sh.launcher_pid.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_worker_that_keeps_dying_backs_off_to_the_cap() {
        let mut b = RestartBackoff::new(S, 30 * S, 60 * S);
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..8 {
            b.started(now);
            now += S / 2; // dies half a second after each start
            let d = b.stopped(now);
            delays.push(d.as_secs());
            now += d;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_worker_that_ran_long_enough_restarts_quickly() {
        let mut b = RestartBackoff::new(S, 30 * S, 60 * S);
        let mut now = Instant::now();
        for _ in 0..4 {
            b.started(now);
            now += S;
            now += b.stopped(now);
        }
        b.started(now);
        now += 61 * S;
        assert_eq!(b.stopped(now), S, "stable for 61 s: back to the minimum");
        b.started(now);
        now += S;
        assert_eq!(b.stopped(now), 2 * S);
    }
}
