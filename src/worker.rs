//! The background worker.
//!
//! A *launcher* (registered in `_PG_init`) connects to no database, so it can wait calmly for
//! `memory_ext.database` to exist. It then starts and supervises the *worker*, a dynamic
//! background worker connected to that database, which drains the queue:
//!
//! 1. claim (short transaction): lease chats and mark their pending snippets `processing`;
//! 2. summarize with no transaction open;
//! 3. apply (one transaction per batch; per chat if the batch fails), or record the failure
//!    in a fresh transaction.
//!
//! It sleeps on its latch, which enqueue sets at COMMIT (`shmem::wake_at_commit`), with
//! `memory_ext.idle_timeout` as a safety net, and wakes early for scheduled retries.

use crate::batch;
use crate::queue;
use crate::settings::{self, QueuePolicy};
use crate::shmem::{self, Field};
use crate::summarizer;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LAUNCHER: &str = "memory_ext launcher";
const WORKER: &str = "memory_ext worker";
const RETENTION_EVERY: Duration = Duration::from_secs(60);
const RETENTION_BATCH: i32 = 1000;

pub fn register_launcher() {
    BackgroundWorkerBuilder::new(LAUNCHER)
        .set_type(LAUNCHER)
        .set_library("memory_ext")
        .set_function("memory_ext_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn shutdown_requested() -> bool {
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

fn reload_config_if_asked() {
    if unsafe { pg_sys::ConfigReloadPending } != 0 {
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Publish what the process is doing: in worker_status() and in pg_stat_activity.query.
fn set_state(s: &str) {
    if let Some(sh) = shmem::get() {
        sh.set_text(Field::State, s);
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

fn record_error(msg: &str) {
    if let Some(sh) = shmem::get() {
        sh.set_text(Field::LastError, msg);
    }
}

fn heartbeat() {
    if let Some(sh) = shmem::get() {
        sh.last_heartbeat.store(shmem::now(), Ordering::Relaxed);
    }
}

/// Run `f` in its own transaction. An ERROR or panic is caught, the transaction is aborted (so
/// the next one can start), and the message is returned.
fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let result = PgTryBuilder::new(AssertUnwindSafe(|| {
        Ok(BackgroundWorker::transaction(AssertUnwindSafe(f)))
    }))
    .catch_others(|e| {
        Err(match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
        })
    })
    .execute();
    if result.is_err() {
        // BackgroundWorker::transaction leaves the failed transaction open.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

// ---- launcher ---------------------------------------------------------------------------------

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
    let db_c = db_c.as_c_str();
    let mut child: Option<pgrx::bgworkers::DynamicBackgroundWorker> = None;
    let mut restart_delay = Duration::from_secs(1);
    let mut next_start = Instant::now();

    while !shutdown_requested() {
        reload_config_if_asked();
        if let Some(handle) = &child {
            match handle.pid() {
                Ok(_) | Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted) => {}
                Err(_) => {
                    // The worker stopped (crash, ERROR it could not survive, or terminated):
                    // start it again, backing off if it keeps dying.
                    child = None;
                    next_start = Instant::now() + restart_delay;
                    restart_delay = (restart_delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        if child.is_none() && Instant::now() >= next_start {
            let exists = in_transaction(|| database_exists(db_c)).unwrap_or(false);
            if exists {
                match BackgroundWorkerBuilder::new(WORKER)
                    .set_type(WORKER)
                    .set_library("memory_ext")
                    .set_function("memory_ext_worker_main")
                    .enable_spi_access()
                    .set_restart_time(None)
                    .set_extra(&db)
                    .set_notify_pid(unsafe { pg_sys::MyProcPid })
                    .load_dynamic()
                {
                    Ok(h) => {
                        child = Some(h);
                        if restart_delay > Duration::from_secs(1) {
                            // reset the backoff once a worker has stayed up for a while
                            next_start = Instant::now();
                        }
                    }
                    Err(_) => {
                        set_state("no free background worker slot (raise max_worker_processes)");
                        next_start = Instant::now() + Duration::from_secs(10);
                    }
                }
            } else {
                set_state(&format!("waiting for database \"{db}\" to exist"));
            }
        }
        // The postmaster signals us when the child starts or stops (bgw_notify_pid).
        let timeout = if child.is_some() {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(1)
        };
        if !BackgroundWorker::wait_latch(Some(timeout)) {
            break;
        }
        if child.is_some() {
            restart_delay = Duration::from_secs(1).max(restart_delay / 2);
        }
    }
    if let Some(h) = child.take() {
        let _ = h.terminate();
    }
    if let Some(sh) = shmem::get() {
        sh.launcher_pid.store(0, Ordering::Release);
    }
}

// ---- worker -------------------------------------------------------------------------------

/// Is the extension installed in this database (it may be dropped and re-created any time)?
fn extension_ready() -> bool {
    in_transaction(|| unsafe {
        pg_sys::get_extension_oid(c"memory_ext".as_ptr(), true) != pg_sys::InvalidOid
    })
    .unwrap_or(false)
}

/// Claim, summarize and apply one batch. Returns the number of chats claimed.
pub(crate) fn drain_once(policy: &QueuePolicy) -> Result<usize, String> {
    let started = Instant::now();
    let summarizer_name = settings::string(&settings::SUMMARIZER);
    let claims = in_transaction(|| queue::claim(policy, &[]))?.map_err(|e| e.to_string())?;
    if claims.is_empty() {
        return Ok(0);
    }
    let n = claims.len();
    set_state(&format!("summarizing {n} chat(s)"));
    let summarizer = summarizer::by_name(&summarizer_name);
    let (applied, mut failed) = match &summarizer {
        Ok(s) => batch::process_all(claims, s.as_ref(), policy.token_limit),
        Err(e) => (
            Vec::new(),
            claims
                .into_iter()
                .map(|c| queue::Failed {
                    chat_id: c.chat_id,
                    lease_token: c.lease_token,
                    error: e.to_string(),
                    permanent: false,
                })
                .collect(),
        ),
    };
    let label = summarizer.as_ref().map(|s| s.name()).unwrap_or("unknown");

    // Results whose lease was lost meanwhile are skipped by _apply and not counted.
    let mut ok = 0usize;
    if !applied.is_empty() {
        set_state(&format!("applying {} chat(s)", applied.len()));
        // Fast path: the whole batch in one transaction. If anything in it fails, apply chat by
        // chat so one bad chat cannot hold back the others.
        match in_transaction(|| queue::apply(&applied, label)) {
            Ok(Ok(k)) => ok = k as usize,
            _ => {
                for a in &applied {
                    match in_transaction(|| queue::apply(std::slice::from_ref(a), label)) {
                        Ok(Ok(k)) => ok += k as usize,
                        Ok(Err(e)) => failed.push(apply_failure(a, e.to_string())),
                        Err(e) => failed.push(apply_failure(a, e)),
                    }
                }
            }
        }
    }
    for f in &failed {
        record_error(&format!("chat \"{}\": {}", f.chat_id, f.error));
        if let Err(e) = in_transaction(|| queue::fail(f, policy)) {
            record_error(&format!(
                "could not record failure of chat \"{}\": {e}",
                f.chat_id
            ));
        }
    }
    if let Some(sh) = shmem::get() {
        sh.processed.fetch_add(ok as u64, Ordering::Relaxed);
        sh.failed.fetch_add(failed.len() as u64, Ordering::Relaxed);
        if ok > 0 {
            sh.broadcast_applied();
            // moving average of claim-to-applied time, the basis of estimated_completion
            let us = started.elapsed().as_micros() as u64;
            let old = sh.latency_us.load(Ordering::Relaxed);
            sh.latency_us.store(
                if old == 0 { us } else { (old * 7 + us) / 8 },
                Ordering::Relaxed,
            );
        }
    }
    Ok(n)
}

fn apply_failure(a: &queue::Applied, error: String) -> queue::Failed {
    queue::Failed {
        chat_id: a.chat_id.clone(),
        lease_token: a.lease_token,
        error: format!("could not apply memory: {error}"),
        permanent: false,
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn memory_ext_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    if let Some(sh) = shmem::get() {
        sh.worker_pid
            .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        sh.database_oid
            .store(unsafe { pg_sys::MyDatabaseId }.to_u32(), Ordering::Release);
        sh.started_at.store(shmem::now(), Ordering::Relaxed);
        sh.set_text(Field::Database, &db);
    }
    // Load the tokenizer's vocabulary now, not in the first snippet's latency.
    crate::tokens::count("warm up");
    let mut was_ready = false;
    let mut last_retention: Option<Instant> = None;

    while !shutdown_requested() {
        reload_config_if_asked();
        heartbeat();
        if unsafe { pg_sys::RecoveryInProgress() } {
            set_state("idle: server is a hot standby");
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(5))) {
                break;
            }
            continue;
        }
        if !extension_ready() {
            was_ready = false;
            set_state(&format!(
                "waiting for CREATE EXTENSION memory_ext in \"{db}\""
            ));
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(2))) {
                break;
            }
            continue;
        }
        let policy = QueuePolicy::current();
        if !was_ready {
            // Leases held by processes that died (a crash, a restart) are taken back at once.
            if let Err(e) = in_transaction(|| queue::reclaim(policy.max_attempts, true)) {
                record_error(&e);
            }
            was_ready = true;
        }

        let mut claimed = 0;
        loop {
            match drain_once(&policy) {
                Ok(0) => break,
                Ok(n) => claimed += n,
                Err(e) => {
                    record_error(&e);
                    break;
                }
            }
            if shutdown_requested() {
                break;
            }
        }
        let _ = in_transaction(|| queue::reclaim(policy.max_attempts, false));
        if last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY.min(settings::idle_timeout()))
        {
            last_retention = Some(Instant::now());
            let retention = settings::RETENTION_S.get();
            let _ = in_transaction(|| queue::cleanup(retention, RETENTION_BATCH));
        }
        unsafe { pg_sys::pgstat_report_stat(false) };
        set_state("idle");

        // Sleep until woken by a commit, the next scheduled retry, or the safety timeout.
        let idle = settings::idle_timeout();
        let due = in_transaction(queue::seconds_until_due)
            .ok()
            .and_then(|r| r.ok())
            .flatten();
        let timeout = match due {
            // Overdue work that could not be claimed (its chat is busy elsewhere): look again soon.
            Some(s) if s <= 0.0 => {
                if claimed > 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(500)
                }
            }
            Some(s) => Duration::from_secs_f64(s).min(idle),
            None => idle,
        };
        if timeout > Duration::ZERO && !BackgroundWorker::wait_latch(Some(timeout)) {
            break;
        }
    }
    if let Some(sh) = shmem::get() {
        let me = unsafe { pg_sys::MyProcPid };
        let _ = sh
            .worker_pid
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        sh.set_text(Field::State, "stopped");
    }
}
