//! Helpers: more backends claiming and applying for one database while it has a backlog
//! (`memory_ext.workers_per_database`). The worker starts them (`Helpers::scale_up`) when a claim
//! finds a full batch, for summarizers that run in the backend (the mock: CPU-bound); an LLM
//! summarizer already keeps `llm_concurrency` requests in flight from the worker. A helper runs
//! the worker's claim → summarize → finish step until it has found nothing to claim for a second,
//! then leaves: the helpers scale down by themselves. Claims lock chats `FOR UPDATE SKIP LOCKED`, so the worker
//! and its helpers summarize disjoint chats under the same lease protocol.
//!
//! A helper registers its pid in its worker's slot before it connects, and checks the DROP
//! DATABASE mark after, as the worker does: `crate::ddl` stops the helpers with the worker.

use crate::bgw::{in_transaction, record_error, reload_config_if_asked, shutdown_requested};
use crate::queue;
use crate::settings::{self, QueuePolicy};
use crate::shmem;
use crate::worker::{self, Deferred, SummarizerCache};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const HELPER: &str = "memory_ext helper";
/// A helper leaves after finding nothing to claim for this long (not at the first empty claim:
/// a worker that finds a full batch about once a pass would start helpers over and over).
const IDLE_BEFORE_LEAVING: Duration = Duration::from_secs(1);
const IDLE_POLL: Duration = Duration::from_millis(200);
/// The worker starts helpers at most this often.
const SCALE_UP_EVERY: Duration = Duration::from_secs(1);

/// The helpers a worker started, while they run.
#[derive(Default)]
pub struct Helpers {
    running: Vec<DynamicBackgroundWorker>,
    last_scale_up: Option<Instant>,
}

impl Helpers {
    /// How many are still running (those that left are forgotten).
    pub fn count(&mut self) -> usize {
        self.running
            .retain(|h| matches!(h.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)));
        self.running.len()
    }

    /// A claim found a full batch: start helpers up to memory_ext.workers_per_database backends
    /// in all (this worker included). Best effort: without a free background worker slot the
    /// worker drains alone, as it would anyway.
    pub fn scale_up(&mut self, db: &str, slot: usize) {
        if self
            .last_scale_up
            .is_some_and(|t| t.elapsed() < SCALE_UP_EVERY)
        {
            return;
        }
        self.last_scale_up = Some(Instant::now());
        let wanted =
            (settings::WORKERS_PER_DATABASE.get().max(1) as usize - 1).min(shmem::MAX_HELPERS);
        // Registered helpers count too: those a crashed predecessor of this worker started.
        let running = self
            .count()
            .max(shmem::mine().map_or(0, |s| s.helper_count()));
        for _ in running..wanted {
            match builder(db, slot).load_dynamic() {
                Ok(h) => self.running.push(h),
                Err(_) => break,
            }
        }
    }

    /// The worker is stopping: its helpers stop too, before its slot can serve another database.
    pub fn stop(&mut self) {
        let stopping: Vec<_> = self.running.drain(..).map(|h| h.terminate()).collect();
        for h in stopping {
            let _ = h.wait_for_shutdown();
        }
    }
}

fn builder(db: &str, slot: usize) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!("{HELPER} for {db}"))
        .set_type(HELPER)
        .set_library("memory_ext")
        .set_function("memory_ext_helper_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .set_extra(db)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
}

/// Clears the helper's entry in its worker's slot however the process exits.
#[pg_guard]
unsafe extern "C-unwind" fn unregister(_code: i32, entry: pg_sys::Datum) {
    if let Some(slot) = shmem::mine() {
        slot.unregister_helper(entry.value(), unsafe { pg_sys::MyProcPid });
    }
}

/// Register in the worker's slot and connect; false when the helper must not run (no free
/// entry, its database being dropped or renamed).
fn attach(slot_index: usize, db: &str) -> bool {
    shmem::set_helper_of(slot_index);
    let Some(slot) = shmem::mine() else {
        return false;
    };
    let me = unsafe { pg_sys::MyProcPid };
    let Some(entry) = slot.register_helper(me) else {
        return false;
    };
    unsafe { pg_sys::before_shmem_exit(Some(unregister), pg_sys::Datum::from(entry)) };
    if slot.stopped_for_ddl_at.load(Ordering::SeqCst) != 0 {
        return false;
    }
    BackgroundWorker::connect_worker_to_spi(Some(db), None);
    slot.database_oid.load(Ordering::Acquire) == unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// What one step found.
enum Step {
    Claimed,
    Nothing,
    /// The summarizer is remote (the worker's pipeline serves it), the extension is not usable,
    /// or the slot serves another database now.
    Leave,
}

/// One step: claim, summarize, finish.
fn step(cache: &mut SummarizerCache, deferred: &mut Deferred) -> Step {
    let same_database = shmem::mine().is_some_and(|s| {
        s.database_oid.load(Ordering::Acquire) == unsafe { pg_sys::MyDatabaseId }.to_u32()
    });
    // No extension reads as no current schema: one query for both.
    if !same_database || !worker::schema_is_current() {
        return Step::Leave;
    }
    let mut policy = QueuePolicy::current();
    match in_transaction(queue::fact_keys) {
        Ok(Ok(keys)) => policy.fact_keys = keys,
        _ => return Step::Leave,
    }
    let summarizer = cache.current(&policy.fact_keys);
    if summarizer.as_ref().is_ok_and(|s| s.is_remote()) {
        return Step::Leave;
    }
    if !deferred.is_empty() {
        let waiting = std::mem::take(deferred);
        worker::finish_grouped(waiting, &policy, deferred);
    }
    match worker::drain_once(&policy, &summarizer, deferred) {
        Ok(0) => Step::Nothing,
        Ok(_) => Step::Claimed,
        Err(e) => {
            record_error(&e.to_string());
            Step::Leave
        }
    }
}

/// Results whose chat a client holds: tried again until they are finished, or until their
/// leases have expired (then finishing them changes nothing, and the worker's reclaim returns
/// their snippets).
fn finish_deferred(mut deferred: Deferred) {
    let until = Instant::now() + Duration::from_secs(settings::LEASE_TIMEOUT_S.get().max(1) as u64);
    while !deferred.is_empty() && Instant::now() < until && !shutdown_requested() {
        let waiting = std::mem::take(&mut deferred);
        worker::finish_grouped(waiting, &QueuePolicy::current(), &mut deferred);
        if !deferred.is_empty() && !BackgroundWorker::wait_latch(Some(IDLE_POLL)) {
            break;
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn memory_ext_helper_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    if !attach(arg.value(), &db) {
        return;
    }
    let mut cache = SummarizerCache::default();
    let mut deferred = Deferred::new();
    let mut idle_since: Option<Instant> = None;
    while !shutdown_requested() {
        reload_config_if_asked();
        match step(&mut cache, &mut deferred) {
            Step::Claimed => idle_since = None,
            Step::Leave => break,
            Step::Nothing => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= IDLE_BEFORE_LEAVING
                    || !BackgroundWorker::wait_latch(Some(IDLE_POLL))
                {
                    break;
                }
            }
        }
    }
    finish_deferred(deferred);
}
