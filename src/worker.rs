//! The queue-draining background worker, started by the launcher (`crate::launcher`) for
//! `memory_ext.database`. Each pass:
//!
//! 1. claim (short transaction): take back stale leases, then lease chats and mark their oldest
//!    pending snippets `processing` (`queue::claim`);
//! 2. summarize with no transaction open: inline for the mock, on helper threads for an LLM
//!    (`pipeline`);
//! 3. finish (`drain::finish_all`): apply, dead-letter and fail in one transaction per batch (per
//!    chat if the batch fails).
//!
//! Then housekeeping (expired leases, retention) and sleep on the latch, which enqueue sets at
//! COMMIT (`shmem::wake_at_commit`), until the next scheduled retry or `memory_ext.idle_timeout`.
//! The lease protocol these steps follow is in docs/architecture.md.

use crate::batch;
use crate::bgw::{
    CONFIG_GENERATION, in_transaction, record_error, reload_config_if_asked, set_state,
    shutdown_requested,
};
use crate::drain::{self, note_latency};
use crate::model::{FactKeys, LlmConfig};
use crate::model::{Finished, Usage};
use crate::pipeline::{self, Pipeline};
use crate::queue;
use crate::settings::{self, FromSettings, QueuePolicy};
use crate::shmem::{self, Exit, Field};
use crate::summarizer::{self, Summarizer};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use thiserror::Error;

const WORKER: &str = "memory_ext worker";

/// Why a pass could not claim or finish work (recorded in worker_status().last_error).
#[derive(Debug, Error)]
pub(crate) enum WorkerError {
    #[error(transparent)]
    Transaction(#[from] crate::bgw::TxError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

/// Why no summarizer can be built from the current settings: every claimed snippet fails
/// (transiently) with it until the settings are fixed and reloaded. Shared, so the cache clones it.
#[derive(Debug, Error)]
pub(crate) enum ConfigError {
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    #[error(transparent)]
    Summarizer(#[from] summarizer::SummarizerError),
}

pub(crate) type Configured = Result<Arc<dyn Summarizer>, Arc<ConfigError>>;
const RETENTION_EVERY: Duration = Duration::from_secs(60);
const RETENTION_BATCH: i32 = 1000;
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
const BUSY_POLL: Duration = Duration::from_secs(1);
const DEFERRED_POLL: Duration = Duration::from_millis(200);

/// The worker for database `db`, publishing in shared-memory slot `slot`, as the launcher
/// starts it.
pub fn builder(db: &str, slot: usize) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!("{WORKER} for {db}"))
        .set_type(WORKER)
        .set_library("memory_ext")
        .set_function("memory_ext_worker_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .set_extra(db)
}

fn heartbeat() {
    if let Some(slot) = shmem::mine() {
        slot.last_heartbeat.store(shmem::now(), Ordering::Relaxed);
    }
}

const LIBRARY: &str = env!("CARGO_PKG_VERSION");

/// The extension's version installed in this database.
fn installed_version() -> Result<Option<String>, String> {
    in_transaction(|| {
        Spi::get_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'memory_ext'",
        )
    })
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()))
}

/// Is the installed schema this library's (installed, and not waiting for ALTER EXTENSION
/// UPDATE)?
pub(crate) fn schema_is_current() -> bool {
    matches!(installed_version(), Ok(Some(v)) if v == LIBRARY)
}

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
pub(crate) struct SummarizerCache {
    generation: Option<u64>,
    config: Option<LlmConfig>,
    summarizer: Option<Configured>,
}

impl SummarizerCache {
    /// The summarizer for the settings and the declared `keys` (read each batch: a change to
    /// memory.fact_keys rebuilds it too).
    pub(crate) fn current(&mut self, keys: &FactKeys) -> Configured {
        let generation = CONFIG_GENERATION.load(Ordering::Relaxed);
        let keys_changed = self.config.as_ref().is_some_and(|c| c.fact_keys != *keys);
        if self.generation != Some(generation) || keys_changed {
            self.generation = Some(generation);
            match LlmConfig::current() {
                Ok(mut config) => {
                    config.fact_keys = keys.clone();
                    let unchanged = self.config.as_ref() == Some(&config)
                        && matches!(self.summarizer, Some(Ok(_)));
                    if !unchanged {
                        self.summarizer =
                            Some(summarizer::from_config(&config).map_err(|e| Arc::new(e.into())));
                        self.config = Some(config);
                    }
                }
                Err(e) => {
                    self.config = None;
                    self.summarizer = Some(Err(Arc::new(e.into())));
                }
            }
        }
        self.summarizer.clone().expect("set above")
    }
}

fn claim_in_transaction(policy: &QueuePolicy) -> Result<Vec<crate::model::Claim>, WorkerError> {
    Ok(in_transaction(|| queue::claim(policy))??)
}

/// Results whose chat a client held locked, with their summarizer's label: finished on a later
/// pass (until their lease expires, when finishing them changes nothing).
pub(crate) type Deferred = Vec<(String, Finished)>;

/// Finish `results`, keeping those whose chat was busy in `deferred`. Returns the chats applied.
fn finish_keeping_busy(
    results: Vec<Finished>,
    policy: &QueuePolicy,
    label: &str,
    deferred: &mut Deferred,
) -> usize {
    let (applied, busy) = drain::finish_all(results, policy, label);
    deferred.extend(busy.into_iter().map(|r| (label.to_string(), r)));
    applied
}

/// Claim, summarize inline and finish one batch. Returns the number of chats claimed.
pub(crate) fn drain_once(
    policy: &QueuePolicy,
    summarizer: &Configured,
    deferred: &mut Deferred,
) -> Result<usize, WorkerError> {
    let started = Instant::now();
    let claims = claim_in_transaction(policy)?;
    if claims.is_empty() {
        return Ok(0);
    }
    let n = claims.len();
    set_state(&format!("summarizing {n} chat(s)"));
    let (results, label) = match summarizer {
        Ok(s) => (
            batch::process_all(claims, s.as_ref(), &policy.bounds()),
            s.label(),
        ),
        Err(e) => (
            claims
                .into_iter()
                .map(|c| {
                    Finished::failed(
                        c.chat_id,
                        c.lease_token,
                        e.to_string(),
                        "config",
                        Usage::default(),
                    )
                })
                .collect(),
            settings::string(&settings::SUMMARIZER),
        ),
    };
    if finish_keeping_busy(results, policy, &label, deferred) > 0 {
        note_latency(started.elapsed());
    }
    Ok(n)
}

/// Finish results grouped by summarizer: a reload may have changed it while requests were in
/// flight, and deferred results may come from before it.
pub(crate) fn finish_grouped(
    results: impl IntoIterator<Item = (String, Finished)>,
    policy: &QueuePolicy,
    deferred: &mut Deferred,
) -> usize {
    let mut by_label: HashMap<String, Vec<Finished>> = HashMap::new();
    for (label, r) in results {
        by_label.entry(label).or_default().push(r);
    }
    by_label
        .into_iter()
        .map(|(label, results)| finish_keeping_busy(results, policy, &label, deferred))
        .sum()
}

/// Finish the answers the pipeline's threads delivered.
fn finish_done(done: Vec<pipeline::Done>, policy: &QueuePolicy, deferred: &mut Deferred) {
    let slowest = done.iter().map(|d| d.started.elapsed()).max();
    let results = done.into_iter().map(|d| (d.label, d.outcome));
    if finish_grouped(results, policy, deferred) > 0 {
        note_latency(slowest.unwrap_or_default());
    }
}

fn release_all(leases: Vec<(String, pgrx::Uuid)>) {
    for (chat_id, lease) in leases {
        if let Err(e) = in_transaction(|| queue::release(&chat_id, lease)) {
            record_error(&format!(
                "could not give back the lease of chat \"{chat_id}\": {e}"
            ));
        }
    }
}

/// What one pass did: how many chats it claimed, and whether more could be claimed at once.
#[derive(Default)]
struct Pass {
    claimed: usize,
    more: bool,
}

/// Everything the worker keeps between passes.
#[derive(Default)]
struct Worker {
    db: String,
    was_ready: bool,
    /// The last pass found no extension (DROP EXTENSION, or not created yet).
    extension_gone: bool,
    last_retention: Option<Instant>,
    last_reclaim: Option<Instant>,
    cache: SummarizerCache,
    /// Created on first use of a remote summarizer.
    pipeline: Option<Pipeline>,
    deferred: Deferred,
    /// This worker's shared-memory slot (helpers count into it).
    slot: usize,
    helpers: crate::helper::Helpers,
}

impl Worker {
    /// After a new library is installed and the server restarted, the database keeps the old
    /// version's functions until `ALTER EXTENSION memory_ext UPDATE`: until then the worker
    /// waits (and says so) rather than call functions that changed or do not exist yet.
    fn schema_matches_library(&self) -> bool {
        match installed_version() {
            Ok(Some(v)) if v == LIBRARY => true,
            Ok(v) => {
                set_state(&format!(
                    "waiting for ALTER EXTENSION memory_ext UPDATE in \"{}\": version {} is \
                     installed, the library is {LIBRARY}",
                    self.db,
                    v.as_deref().unwrap_or("(none)")
                ));
                false
            }
            Err(e) => {
                record_error(&e);
                false
            }
        }
    }

    /// One pass; returns how long to sleep (zero: look again at once).
    fn pass(&mut self) -> Duration {
        if unsafe { pg_sys::RecoveryInProgress() } {
            set_state("idle: server is a hot standby");
            return Duration::from_secs(5);
        }
        self.extension_gone = !extension_ready();
        if self.extension_gone {
            self.was_ready = false;
            set_state(&format!(
                "waiting for CREATE EXTENSION memory_ext in \"{}\"",
                self.db
            ));
            return Duration::from_secs(2);
        }
        if !self.was_ready && !self.schema_matches_library() {
            return Duration::from_secs(2);
        }
        let mut policy = QueuePolicy::current();
        // Declared keys bound every merge: without them no batch is summarized.
        match in_transaction(queue::fact_keys) {
            Ok(Ok(keys)) => policy.fact_keys = keys,
            Ok(Err(e)) => {
                record_error(&e.to_string());
                return Duration::from_secs(1);
            }
            Err(e) => {
                record_error(&e.to_string());
                return Duration::from_secs(1);
            }
        }
        if !self.was_ready {
            // Leases held by processes that died (a crash, a restart) are taken back at once.
            match in_transaction(|| queue::reclaim(policy.max_attempts, true)) {
                Ok(Err(e)) => record_error(&e.to_string()),
                Err(e) => record_error(&e.to_string()),
                Ok(Ok(_)) => {}
            }
            self.was_ready = true;
        }
        if !self.deferred.is_empty() {
            let deferred = std::mem::take(&mut self.deferred);
            finish_grouped(deferred, &policy, &mut self.deferred);
        }
        self.collect_answers(&policy);
        let summarizer = self.cache.current(&policy.fact_keys);
        let pass = match &summarizer {
            Ok(s) if s.is_remote() => self.drain_remote(&policy, s),
            _ => self.drain_inline(&policy, &summarizer),
        };
        self.housekeeping(&policy);
        self.sleep_time(&pass)
    }

    fn drain_inline(&mut self, policy: &QueuePolicy, summarizer: &Configured) -> Pass {
        let mut pass = Pass::default();
        while !shutdown_requested() {
            match drain_once(policy, summarizer, &mut self.deferred) {
                Ok(0) => break,
                Ok(n) => {
                    pass.claimed += n;
                    // A full batch: a backlog, which helpers drain beside this worker.
                    if n >= policy.batch_chats.max(1) as usize {
                        self.helpers.scale_up(&self.db, self.slot);
                    }
                }
                Err(e) => {
                    record_error(&e.to_string());
                    break;
                }
            }
        }
        pass
    }

    fn drain_remote(&mut self, policy: &QueuePolicy, s: &Arc<dyn Summarizer>) -> Pass {
        if self.pipeline.is_none() {
            match Pipeline::new() {
                Ok(p) => self.pipeline = Some(p),
                Err(e) => {
                    record_error(&format!("cannot start LLM request threads: {e}"));
                    return Pass::default();
                }
            }
        }
        let p = self.pipeline.as_mut().expect("created above");
        let concurrency = settings::LLM_CONCURRENCY.get() as usize;
        let asked = p
            .free_slots(concurrency)
            .min(policy.batch_chats.max(1) as usize);
        let mut pass = Pass::default();
        if asked > 0 {
            let mut limited = policy.clone();
            limited.batch_chats = asked as i32;
            match claim_in_transaction(&limited) {
                Ok(claims) => {
                    pass.claimed = claims.len();
                    pass.more = claims.len() == asked && p.in_flight() + asked < concurrency;
                    if let Err((e, unstarted)) = p.start(claims, s, &policy.bounds()) {
                        record_error(&e);
                        release_all(unstarted);
                        pass.more = false;
                    }
                }
                Err(e) => record_error(&e.to_string()),
            }
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
        pass
    }

    /// Finish the LLM answers that arrived. On every pass, whatever the summarizer is now: after a
    /// reload to the mock, requests started before it still answer, and their results must be
    /// applied (and their slots freed) rather than left to expire. Answers also free slots and
    /// carry the rate-limit pause, so this comes before claiming.
    fn collect_answers(&mut self, policy: &QueuePolicy) {
        if let Some(p) = self.pipeline.as_mut() {
            let done = p.finished();
            if !done.is_empty() {
                finish_done(done, policy, &mut self.deferred);
            }
        }
    }

    fn busy(&self) -> bool {
        self.pipeline.as_ref().is_some_and(|p| p.in_flight() > 0)
    }

    /// Expired leases every second, retention every minute (or idle timeout), refused attempts
    /// into the audit log on every pass.
    fn housekeeping(&mut self, policy: &QueuePolicy) {
        if crate::denials::pending() {
            let error = match in_transaction(crate::denials::flush) {
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
                Ok(Ok(_)) => None,
            };
            if let Some(e) = error {
                record_error(&format!("could not audit refused attempts: {e}"));
            }
        }
        if self
            .last_reclaim
            .is_none_or(|t| t.elapsed() >= RECLAIM_EVERY)
        {
            self.last_reclaim = Some(Instant::now());
            let _ = in_transaction(|| queue::reclaim(policy.max_attempts, false));
        }
        if self
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY.min(settings::idle_timeout()))
        {
            self.last_retention = Some(Instant::now());
            // Applied snippets kept for re-derivation are not retention's to delete.
            let retention =
                (!settings::KEEP_APPLIED_SNIPPETS.get()).then(|| settings::RETENTION_S.get());
            let audit = settings::AUDIT_RETENTION_S.get();
            let _ = in_transaction(|| queue::cleanup(retention, RETENTION_BATCH, audit));
        }
        unsafe { pg_sys::pgstat_report_stat(false) };
        if !self.busy() {
            set_state("idle");
        }
    }

    /// Until a commit, a finished LLM request, the next scheduled retry, or the safety timeout.
    fn sleep_time(&self, pass: &Pass) -> Duration {
        let idle = settings::idle_timeout();
        let busy = self.busy();
        let timeout = if pass.more {
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
                Some(s) if s <= 0.0 && pass.claimed > 0 => Duration::ZERO,
                Some(s) if s <= 0.0 => Duration::from_millis(500),
                Some(s) => Duration::from_secs_f64(s).min(idle),
                None => idle,
            }
        };
        // While rate limited nothing can be claimed before the pause ends.
        let timeout = match self.pipeline.as_ref().and_then(Pipeline::paused) {
            Some(p) if !busy => timeout.max(p.min(idle)),
            _ => timeout,
        };
        // Results waiting for a client's lock are tried again soon.
        if self.deferred.is_empty() {
            timeout
        } else {
            timeout.min(DEFERRED_POLL)
        }
    }

    /// Sleep on the latch (and the pipeline's socket); false when the process must exit.
    fn sleep(&mut self, timeout: Duration) -> bool {
        if timeout.is_zero() {
            return true;
        }
        match self.pipeline.as_mut() {
            Some(p) => {
                p.wait(timeout);
                true
            }
            None => BackgroundWorker::wait_latch(Some(timeout)),
        }
    }

    /// At SIGTERM: keep the answers that arrived; give the rest back without spending an
    /// attempt.
    fn stop(&mut self) {
        let policy = QueuePolicy::current();
        let mut busy = Deferred::new();
        if let Some(p) = self.pipeline.as_mut() {
            let done = p.finished();
            if !done.is_empty() {
                finish_done(done, &policy, &mut busy);
            }
            release_all(p.abandon());
        }
        self.helpers.stop();
        // Results still waiting for a client's lock: their leases expire and are reclaimed.
        let deferred = std::mem::take(&mut self.deferred);
        finish_grouped(deferred, &policy, &mut busy);
    }
}

fn announce_start() {
    if let Some(slot) = shmem::mine() {
        slot.worker_pid
            .store(unsafe { pg_sys::MyProcPid }, Ordering::SeqCst);
        slot.started_at.store(shmem::now(), Ordering::Relaxed);
        slot.exit.store(Exit::Restart as u32, Ordering::Release);
    }
}

fn announce_stop(why: Exit) {
    if let Some(slot) = shmem::mine() {
        slot.exit.store(why as u32, Ordering::Release);
        let me = unsafe { pg_sys::MyProcPid };
        let _ = slot
            .worker_pid
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        slot.set_text(Field::State, "stopped");
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn memory_ext_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    shmem::set_my_slot(arg.value());
    let db = BackgroundWorker::get_extra().to_string();
    // The pid first, then the DROP DATABASE mark (see `crate::ddl`): a worker starting while its
    // database is being dropped does not connect to it.
    announce_start();
    if shmem::mine().is_some_and(|s| s.stopped_for_ddl_at.load(Ordering::SeqCst) != 0) {
        announce_stop(Exit::Restart);
        return;
    }
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    // Renamed between the launcher's look and our connection: another database by that name.
    if shmem::mine().is_some_and(|s| {
        s.database_oid.load(Ordering::Acquire) != unsafe { pg_sys::MyDatabaseId }.to_u32()
    }) {
        announce_stop(Exit::Restart);
        return;
    }
    // Serving every database that has the extension: one that has not is left at once (the
    // launcher looks again after a CREATE EXTENSION). A database named in memory_ext.database
    // is waited for instead.
    if settings::databases().is_empty() && !extension_ready() {
        announce_stop(Exit::NoExtension);
        return;
    }
    // Load the tokenizer's vocabulary now, not in the first snippet's latency.
    crate::tokens::count("warm up");
    let mut worker = Worker {
        db,
        slot: arg.value(),
        ..Default::default()
    };
    let mut why = Exit::Restart;
    while !shutdown_requested() {
        reload_config_if_asked();
        heartbeat();
        let timeout = worker.pass();
        if worker.extension_gone && settings::databases().is_empty() {
            why = Exit::NoExtension;
            break;
        }
        if !worker.sleep(timeout) {
            break;
        }
    }
    worker.stop();
    announce_stop(why);
}
