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
use crate::pipeline::{self, Pipeline};
use crate::queue;
use crate::settings::LlmConfig;
use crate::settings::{self, QueuePolicy};
use crate::shmem::{self, Field};
use crate::summarizer::{self, Summarizer, Usage};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const LAUNCHER: &str = "memory_ext launcher";
const WORKER: &str = "memory_ext worker";
const RETENTION_EVERY: Duration = Duration::from_secs(60);
const RETENTION_BATCH: i32 = 1000;
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
const BUSY_POLL: Duration = Duration::from_secs(1);

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

/// Bumped at every reload: settings of a background worker change only then.
static CONFIG_GENERATION: AtomicU64 = AtomicU64::new(0);

fn reload_config_if_asked() {
    if unsafe { pg_sys::ConfigReloadPending } != 0 {
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        CONFIG_GENERATION.fetch_add(1, Ordering::Relaxed);
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

/// The summarizer for the current settings. Settings (and a `file:`/`env:` key) are read at
/// start and after each reload, not on every loop; the summarizer is rebuilt only when they
/// changed (so an HTTP client keeps its connections). A configuration error is kept as its
/// message: claimed snippets fail (transiently) with it until the settings are fixed and reloaded.
#[derive(Default)]
struct SummarizerCache {
    generation: Option<u64>,
    config: Option<LlmConfig>,
    summarizer: Option<Result<Arc<dyn Summarizer>, String>>,
}

impl SummarizerCache {
    fn current(&mut self) -> Result<Arc<dyn Summarizer>, String> {
        let generation = CONFIG_GENERATION.load(Ordering::Relaxed);
        if self.generation != Some(generation) {
            self.generation = Some(generation);
            match LlmConfig::current() {
                Ok(config) => {
                    let unchanged = self.config.as_ref() == Some(&config)
                        && matches!(self.summarizer, Some(Ok(_)));
                    if !unchanged {
                        self.summarizer =
                            Some(summarizer::from_config(&config).map_err(|e| e.to_string()));
                        self.config = Some(config);
                    }
                }
                Err(e) => {
                    self.config = None;
                    self.summarizer = Some(Err(e));
                }
            }
        }
        self.summarizer.clone().expect("set above")
    }
}

fn claim_in_transaction(policy: &QueuePolicy) -> Result<Vec<queue::Claim>, String> {
    in_transaction(|| queue::claim(policy, &[]))?.map_err(|e| e.to_string())
}

/// Claim, summarize inline and apply one batch. Returns the number of chats claimed.
pub(crate) fn drain_once(
    policy: &QueuePolicy,
    summarizer: &Result<Arc<dyn Summarizer>, String>,
) -> Result<usize, String> {
    let started = Instant::now();
    let claims = claim_in_transaction(policy)?;
    if claims.is_empty() {
        return Ok(0);
    }
    let n = claims.len();
    set_state(&format!("summarizing {n} chat(s)"));
    let (applied, failed, label) = match summarizer {
        Ok(s) => {
            let (a, f) = batch::process_all(claims, s.as_ref(), policy.token_limit);
            (a, f, s.label())
        }
        Err(e) => (
            Vec::new(),
            claims
                .into_iter()
                .map(|c| queue::Failed {
                    chat_id: c.chat_id,
                    lease_token: c.lease_token,
                    error: e.clone(),
                    permanent: false,
                    retry_after: None,
                    usage: Usage::default(),
                })
                .collect(),
            settings::string(&settings::SUMMARIZER),
        ),
    };
    if record(applied, failed, policy, &label) > 0 {
        note_latency(started.elapsed());
    }
    Ok(n)
}

/// Apply what was summarized and record what failed. Returns the number of chats applied.
pub(crate) fn record(
    applied: Vec<queue::Applied>,
    mut failed: Vec<queue::Failed>,
    policy: &QueuePolicy,
    label: &str,
) -> usize {
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
        if let Err(e) = in_transaction(|| queue::fail(f, policy, label)) {
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
        }
    }
    ok
}

/// Moving average of claim-to-applied time, the basis of enqueue's estimated_completion.
fn note_latency(d: Duration) {
    if let Some(sh) = shmem::get() {
        let us = d.as_micros() as u64;
        let old = sh.latency_us.load(Ordering::Relaxed);
        sh.latency_us.store(
            if old == 0 { us } else { (old * 7 + us) / 8 },
            Ordering::Relaxed,
        );
    }
}

/// Apply and record the answers the pipeline's threads delivered.
fn record_done(done: Vec<pipeline::Done>, policy: &QueuePolicy) {
    // Grouped by summarizer: a reload may have changed it while requests were in flight.
    let mut by_label: HashMap<String, (Vec<queue::Applied>, Vec<queue::Failed>)> = HashMap::new();
    let mut slowest = Duration::ZERO;
    for d in done {
        slowest = slowest.max(d.started.elapsed());
        let entry = by_label.entry(d.label).or_default();
        match d.outcome {
            batch::Outcome::Applied(a) => entry.0.push(a),
            batch::Outcome::Failed(f) => entry.1.push(f),
        }
    }
    for (label, (applied, failed)) in by_label {
        if record(applied, failed, policy, &label) > 0 {
            note_latency(slowest);
        }
    }
}

fn apply_failure(a: &queue::Applied, error: String) -> queue::Failed {
    queue::Failed {
        chat_id: a.chat_id.clone(),
        lease_token: a.lease_token,
        error: format!("could not apply memory: {error}"),
        permanent: false,
        retry_after: None,
        usage: a.usage,
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
    let mut last_reclaim: Option<Instant> = None;
    let mut cache = SummarizerCache::default();
    // Created on first use of a remote summarizer.
    let mut pipeline: Option<Pipeline> = None;

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

        let summarizer = cache.current();
        let remote = matches!(&summarizer, Ok(s) if s.is_remote());
        let mut claimed = 0;
        // More chats could be claimed right away (the batch size capped the last claim).
        let mut more = false;
        if remote && pipeline.is_none() {
            match Pipeline::new() {
                Ok(p) => pipeline = Some(p),
                Err(e) => record_error(&format!("cannot start LLM request threads: {e}")),
            }
        }
        if let Some(p) = pipeline.as_mut() {
            // Answers first: they free slots, and a rate limit pauses new requests.
            let done = p.finished();
            if !done.is_empty() {
                record_done(done, &policy);
            }
            if let (true, Ok(s)) = (remote, &summarizer) {
                match p.start_more(&policy, s, settings::LLM_CONCURRENCY.get() as usize, |p| {
                    claim_in_transaction(p)
                }) {
                    Ok((n, m)) => {
                        claimed = n;
                        more = m;
                    }
                    Err(e) => record_error(&e),
                }
                let in_flight = p.in_flight();
                match p.paused() {
                    Some(d) => set_state(&format!(
                        "rate limited: {in_flight} LLM request(s) in flight, new ones in {:.1} s",
                        d.as_secs_f64()
                    )),
                    None if in_flight > 0 => set_state(&format!(
                        "summarizing: {in_flight} LLM request(s) in flight"
                    )),
                    None => {}
                }
            }
        }
        if !remote {
            loop {
                match drain_once(&policy, &summarizer) {
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
        }
        let busy = pipeline.as_ref().is_some_and(|p| p.in_flight() > 0);
        if last_reclaim.is_none_or(|t| t.elapsed() >= RECLAIM_EVERY) {
            last_reclaim = Some(Instant::now());
            let _ = in_transaction(|| queue::reclaim(policy.max_attempts, false));
        }
        if last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY.min(settings::idle_timeout()))
        {
            last_retention = Some(Instant::now());
            let retention = settings::RETENTION_S.get();
            let audit = settings::AUDIT_RETENTION_S.get();
            let _ = in_transaction(|| queue::cleanup(retention, RETENTION_BATCH, audit));
        }
        unsafe { pg_sys::pgstat_report_stat(false) };
        if !busy {
            set_state("idle");
        }

        // Sleep until woken by a commit, a finished LLM request, the next scheduled retry, or
        // the safety timeout.
        let idle = settings::idle_timeout();
        let timeout = if more {
            Duration::ZERO
        } else if busy {
            // Finished requests and commits wake us; retries coming due are seen within BUSY_POLL.
            BUSY_POLL
        } else {
            let due = in_transaction(queue::seconds_until_due)
                .ok()
                .and_then(|r| r.ok())
                .flatten();
            match due {
                // Overdue work that could not be claimed (its chat is busy elsewhere): look
                // again soon.
                Some(s) if s <= 0.0 => {
                    if claimed > 0 {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(500)
                    }
                }
                Some(s) => Duration::from_secs_f64(s).min(idle),
                None => idle,
            }
        };
        // While rate limited nothing can be claimed before the pause ends.
        let timeout = match pipeline.as_ref().and_then(Pipeline::paused) {
            Some(p) if !busy => timeout.max(p.min(idle)),
            _ => timeout,
        };
        if timeout > Duration::ZERO {
            match pipeline.as_mut() {
                Some(p) => p.wait(timeout),
                None => {
                    if !BackgroundWorker::wait_latch(Some(timeout)) {
                        break;
                    }
                }
            }
        }
    }
    if let Some(p) = pipeline.as_mut() {
        // Keep the answers that arrived; give the rest back without spending an attempt.
        let done = p.finished();
        if !done.is_empty() {
            record_done(done, &QueuePolicy::current());
        }
        for (chat_id, lease) in p.abandon() {
            let _ = in_transaction(|| queue::release(&chat_id, lease));
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
