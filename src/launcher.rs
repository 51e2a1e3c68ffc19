//! The launcher: a background worker registered in `_PG_init` that connects to no database (it
//! blocks no DROP DATABASE) and starts one queue-draining worker (`crate::worker`, a dynamic
//! background worker) per database it serves, starting each again with a growing delay
//! whenever it stops. Like TimescaleDB's launcher:
//! - With `memory_ext.database` empty (the default) it serves every database in which the
//!   extension is installed: it starts a worker for every connectable database it has not seen
//!   (at start, and when one is created); a worker that finds no extension leaves at once and is
//!   started again only when a `CREATE EXTENSION memory_ext` commits (`crate::ddl` tells it).
//! - With a list, it serves those databases, waiting for each to exist.
//! - At most `memory_ext.max_workers` at once; `worker_status()` in a database left out says so.
//! - A worker stopped for `DROP DATABASE` is not started again unless the database is still there
//!   [`DDL_PAUSE`] later (the drop failed).

use crate::bgw::{in_transaction, reload_config_if_asked, set_state, shutdown_requested};
use crate::settings;
use crate::shmem::{self, Exit, Field, Shared};
use crate::worker;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::BTreeMap;
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

/// In the launcher's note, before the databases left out (`worker_status()` reads it).
pub const NOT_SERVING: &str = ": not serving ";

/// How long a worker stopped for a DROP/RENAME DATABASE stays stopped.
pub const DDL_PAUSE: Duration = Duration::from_secs(10);

/// A database as pg_database has it.
struct Database {
    oid: u32,
    name: String,
    /// Not a template and allows connections: served when every database is.
    servable: bool,
}

/// Every database. A process connected to no database has no relcache entries for catalog
/// indexes, so this scans pg_database's heap, like the autovacuum launcher does
/// (`get_database_oid` would use an index and FATAL).
fn databases() -> Vec<Database> {
    let mut all = Vec::new();
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            all.push(Database {
                oid: form.oid.to_u32(),
                name: std::ffi::CStr::from_ptr(form.datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                // datconnlimit -2: left invalid by an interrupted DROP DATABASE
                servable: form.datallowconn && !form.datistemplate && form.datconnlimit != -2,
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
    }
    all
}

/// The databases to serve now: (name, oid if it exists), by name.
fn targets(existing: &[Database], named: &[String]) -> BTreeMap<String, Option<u32>> {
    if named.is_empty() {
        existing
            .iter()
            .filter(|d| d.servable)
            .map(|d| (d.name.clone(), Some(d.oid)))
            .collect()
    } else {
        named
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    existing.iter().find(|d| &d.name == n).map(|d| d.oid),
                )
            })
            .collect()
    }
}

/// The launcher's record of one database it serves.
struct Served {
    oid: Option<u32>,
    slot: Option<usize>,
    handle: Option<DynamicBackgroundWorker>,
    backoff: RestartBackoff,
    next_start: Instant,
    /// The rescan counter when the worker was started.
    started_rescan: u64,
    /// Its worker found no extension at this rescan count: not started until the count moves.
    no_extension_at: Option<u64>,
}

impl Served {
    fn new(oid: Option<u32>) -> Self {
        Served {
            oid,
            slot: None,
            handle: None,
            backoff: RestartBackoff::new(
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_secs(60),
            ),
            next_start: Instant::now(),
            started_rescan: 0,
            no_extension_at: None,
        }
    }

    fn running(&self) -> bool {
        self.handle.is_some()
    }

    /// Stop its worker and give back its slot (it is no longer served).
    fn retire(&mut self, sh: &Shared) {
        if let Some(h) = self.handle.take() {
            let _ = h.terminate().wait_for_shutdown();
        }
        if let Some(i) = self.slot.take() {
            free(sh, i);
        }
    }

    /// Has the worker exited? Then note why, and when to start it again.
    fn poll(&mut self, sh: &Shared) {
        let Some(h) = &self.handle else { return };
        if matches!(h.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)) {
            return;
        }
        self.handle = None;
        let Some(i) = self.slot else { return };
        let slot = &sh.slots[i];
        let now = Instant::now();
        if slot.exit_reason() == Exit::NoExtension {
            // Freed: a database without the extension holds no slot.
            self.no_extension_at = Some(self.started_rescan);
            self.slot = None;
            free(sh, i);
            self.next_start = now;
        } else if slot.stopped_for_ddl_at.load(Ordering::SeqCst) != 0 {
            self.next_start = now + DDL_PAUSE;
        } else {
            self.next_start = now + self.backoff.stopped(now);
        }
    }

    /// Should a worker be started now?
    fn due(&self, sh: &Shared, rescan: u64) -> bool {
        !self.running()
            && self.oid.is_some()
            && Instant::now() >= self.next_start
            && self.no_extension_at.is_none_or(|at| at != rescan)
            && !self.slot.is_some_and(|i| paused_for_ddl(&sh.slots[i]))
    }

    fn start(&mut self, sh: &Shared, name: &str, rescan: u64) -> Result<(), &'static str> {
        let oid = self.oid.ok_or("no such database")?;
        let i = match self.slot {
            Some(i) => i,
            None => {
                let Some(i) = sh.free_slot() else {
                    self.next_start = Instant::now() + Duration::from_secs(5);
                    return Err("no free slot");
                };
                sh.slots[i].assign(oid, name);
                self.slot = Some(i);
                i
            }
        };
        match worker::builder(name, i)
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic()
        {
            Ok(h) => {
                self.handle = Some(h);
                self.started_rescan = rescan;
                self.no_extension_at = None;
                self.backoff.started(Instant::now());
                Ok(())
            }
            Err(_) => {
                sh.slots[i].set_text(
                    Field::State,
                    "no free background worker slot (raise max_worker_processes)",
                );
                self.next_start = Instant::now() + Duration::from_secs(5);
                Err("no background worker slot")
            }
        }
    }
}

/// Give slot `i` back: no database, and none of its refused attempts left in the ring.
fn free(sh: &Shared, i: usize) {
    let oid = sh.slots[i].database_oid.swap(0, Ordering::AcqRel);
    crate::denials::purge(oid);
}

/// Was the slot's worker stopped for a DROP/RENAME DATABASE less than [`DDL_PAUSE`] ago? (A
/// stale mark is cleared.)
fn paused_for_ddl(slot: &shmem::Slot) -> bool {
    let at = slot.stopped_for_ddl_at.load(Ordering::SeqCst);
    if at == 0 {
        return false;
    }
    let paused = shmem::now().saturating_sub(at) < DDL_PAUSE.as_micros() as i64;
    if !paused {
        let _ = slot
            .stopped_for_ddl_at
            .compare_exchange(at, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
    paused
}

/// After a launcher that exited abnormally: stop the workers it left and free their slots, so
/// no database gets a second worker.
fn reclaim_orphans(sh: &Shared) {
    for (i, slot) in sh.slots.iter().enumerate() {
        if slot.database_oid.load(Ordering::Acquire) == 0 {
            continue;
        }
        if slot.worker_alive() {
            slot.terminate_worker(slot.worker_pid.load(Ordering::Acquire), DDL_PAUSE);
        }
        free(sh, i);
    }
}

/// Everything the launcher keeps between rounds: the databases it serves, by name.
#[derive(Default)]
struct Launcher {
    served: BTreeMap<String, Served>,
}

impl Launcher {
    /// One round: follow the databases and the settings, reap and start workers. Returns how
    /// long to sleep.
    fn round(&mut self, sh: &Shared) -> Duration {
        let named = settings::databases();
        // A failed scan says nothing about the databases: keep everything as it is.
        let Ok(existing) = in_transaction(databases) else {
            return Duration::from_secs(1);
        };
        let wanted = targets(&existing, &named);
        let rescan = sh.rescan.load(Ordering::Acquire);
        // Gone, no longer wanted, or a new database under an old name: retire.
        self.served.retain(|name, s| {
            let keep = wanted
                .get(name)
                .is_some_and(|oid| s.oid.is_none() || *oid == s.oid);
            if !keep {
                s.retire(sh);
            }
            keep
        });
        for (name, oid) in &wanted {
            let s = self
                .served
                .entry(name.clone())
                .or_insert_with(|| Served::new(*oid));
            s.oid = *oid;
        }
        for s in self.served.values_mut() {
            s.poll(sh);
        }
        // The cap counts slots held: a worker waiting out its restart delay keeps its slot.
        let cap = settings::MAX_WORKERS.get().max(1) as usize;
        let mut held = self.served.values().filter(|s| s.slot.is_some()).count();
        let mut left_out = Vec::new();
        for (name, s) in &mut self.served {
            if !s.due(sh, rescan) {
                continue;
            }
            let needs_slot = s.slot.is_none();
            if needs_slot && held >= cap {
                left_out.push(name.as_str());
                continue;
            }
            if s.start(sh, name, rescan).is_ok() && needs_slot {
                held += 1;
            }
        }
        sh.set_launcher_note(&if left_out.is_empty() {
            String::new()
        } else {
            format!(
                "memory_ext.max_workers ({cap}) reached{NOT_SERVING}{}",
                left_out.join(", ")
            )
        });
        self.next_wake()
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        // Only restarts waiting for their time: a database left out by the cap is looked at
        // again when a worker stops (the postmaster sets our latch) or after 10 s.
        self.served
            .values()
            .filter(|s| !s.running() && s.oid.is_some() && s.no_extension_at.is_none())
            .filter(|s| s.next_start > now)
            .map(|s| s.next_start.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(10))
            .clamp(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn memory_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: only shared catalogs (pg_database) are readable, which is all we need.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let Some(sh) = shmem::get() else { return };
    sh.launcher_pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    set_state("serving");
    reclaim_orphans(sh);
    let mut launcher = Launcher::default();
    while !shutdown_requested() {
        reload_config_if_asked();
        let timeout = launcher.round(sh);
        // The postmaster signals us when a worker starts or stops (bgw_notify_pid); a CREATE
        // EXTENSION sets our latch at its COMMIT.
        if !BackgroundWorker::wait_latch(Some(timeout)) {
            break;
        }
    }
    for s in launcher.served.values_mut() {
        s.retire(sh);
    }
    sh.launcher_pid.store(0, Ordering::Release);
    // Exit status 1: the postmaster starts the launcher again (after its restart time) unless
    // the server itself is shutting down. With 0 it would unregister it, and a
    // pg_terminate_backend() of the launcher would stop memory_ext until the next restart.
    unsafe { pg_sys::proc_exit(1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn db(oid: u32, name: &str, servable: bool) -> Database {
        Database {
            oid,
            name: name.into(),
            servable,
        }
    }

    #[test]
    fn which_databases_are_served() {
        let existing = [
            db(1, "template1", false),
            db(5, "postgres", true),
            db(16384, "app", true),
            db(16385, "noconn", false),
        ];
        let all = targets(&existing, &[]);
        assert_eq!(
            all.into_iter().collect::<Vec<_>>(),
            [
                ("app".to_string(), Some(16384)),
                ("postgres".to_string(), Some(5))
            ],
            "every connectable non-template database"
        );
        let named = targets(&existing, &["app".into(), "later".into()]);
        assert_eq!(
            named.into_iter().collect::<Vec<_>>(),
            [
                ("app".to_string(), Some(16384)),
                ("later".to_string(), None)
            ],
            "the named ones, waited for if missing"
        );
    }

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
