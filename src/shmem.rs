//! Shared memory (every segment of the extension is registered here): how backends wake the
//! worker of their database at COMMIT, how `wait()` sleeps until a worker applies something, how
//! the launcher learns of a new `CREATE EXTENSION`, and each worker's health record for
//! `worker_status()` — one [`Slot`] per database served.
//!
//! It exists only when the library is in `shared_preload_libraries`; every accessor returns
//! `None` otherwise, and the SQL API degrades to polling / `process_pending()`.

use pgrx::pg_sys;
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

const NAME: &CStr = c"memory_ext";
const TEXT: usize = 256;
/// Databases served at once, at most (`memory_ext.max_workers` is capped to it).
pub const MAX_SLOTS: usize = 64;
/// Helpers a database's worker may start (memory_ext.workers_per_database - 1 at most).
pub const MAX_HELPERS: usize = 15;

/// Why a worker last exited, as it tells the launcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Exit {
    /// A crash, an ERROR it could not survive, a terminate: start it again (with backoff).
    Restart = 0,
    /// The extension is not installed in its database: start it again only when a
    /// `CREATE EXTENSION memory_ext` somewhere tells the launcher to look again.
    NoExtension = 1,
}

/// The worker of one database: who it is and how it is doing. The launcher assigns a slot to a
/// database before it starts the worker, which finds it by the index it is started with.
#[repr(C)]
pub struct Slot {
    /// Guards the text fields (the one lock of the segment); counters are atomics.
    lock: *mut pg_sys::LWLock,
    /// The database served (0: the slot is free).
    pub database_oid: AtomicU32,
    pub worker_pid: AtomicI32,
    pub started_at: AtomicI64,
    pub last_heartbeat: AtomicI64,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    /// Recent enqueue-to-applied latency, microseconds (exponential moving average).
    pub latency_us: AtomicU64,
    /// An [`Exit`], written by the worker just before it exits.
    pub exit: AtomicU32,
    /// When a backend stopped the worker to drop or rename its database (0: never): the launcher
    /// does not start it again for a while.
    pub stopped_for_ddl_at: AtomicI64,
    /// Refused attempts not noted because the ring was full (see `crate::denials`).
    pub denials_dropped: AtomicU64,
    /// The helpers draining the same database (0: a free entry). Each registers itself before it
    /// connects and clears its entry as it exits, so DROP DATABASE can stop them all.
    pub helper_pids: [AtomicI32; MAX_HELPERS],
    // Written through `&self` under `lock`: interior mutability, made explicit.
    state: UnsafeCell<[u8; TEXT]>,
    database: UnsafeCell<[u8; TEXT]>,
    last_error: UnsafeCell<[u8; TEXT]>,
}

#[repr(C)]
pub struct Shared {
    lock: *mut pg_sys::LWLock,
    /// Broadcast after every committed apply, so `wait()` re-checks without polling.
    pub applied_cv: pg_sys::ConditionVariable,
    pub launcher_pid: AtomicI32,
    /// Bumped at the COMMIT of every `CREATE EXTENSION memory_ext`: the launcher then looks
    /// again at databases whose worker found no extension.
    pub rescan: AtomicU64,
    /// Why databases are not served (the worker cap), for `worker_status()`.
    launcher_note: UnsafeCell<[u8; TEXT]>,
    pub slots: [Slot; MAX_SLOTS],
}

/// An LWLock held for the guard's life, so it cannot be left held by an early return. (An ERROR
/// while it is held is released by Postgres' own abort processing.) Hold it only around code that
/// cannot raise an ERROR.
pub struct LockGuard(*mut pg_sys::LWLock);

impl LockGuard {
    pub fn exclusive(lock: *mut pg_sys::LWLock) -> Self {
        unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        LockGuard(lock)
    }

    pub fn shared(lock: *mut pg_sys::LWLock) -> Self {
        unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED) };
        LockGuard(lock)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// A named shared-memory segment with one LWLock of its own. `attach` runs in the postmaster
/// (and in EXEC_BACKEND children) with the zeroed memory on first creation (`found` = false).
struct Segment {
    name: &'static CStr,
    size: usize,
    attach: unsafe fn(memory: *mut u8, lock: *mut pg_sys::LWLock, found: bool),
}

/// Every segment of the extension: this module's, the rate limiter's buckets, and the ring of
/// refused attempts.
const SEGMENTS: [Segment; 3] = [
    Segment {
        name: NAME,
        size: size_of::<Shared>(),
        attach: attach_shared,
    },
    Segment {
        name: crate::rate_limit::SHMEM_NAME,
        size: crate::rate_limit::SHMEM_SIZE,
        attach: crate::rate_limit::attach,
    },
    Segment {
        name: crate::denials::SHMEM_NAME,
        size: crate::denials::SHMEM_SIZE,
        attach: crate::denials::attach,
    },
];

/// Called from `_PG_init` while preloading.
pub fn init() {
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        for s in &SEGMENTS {
            pg_sys::RequestAddinShmemSpace(s.size);
            pg_sys::RequestNamedLWLockTranche(s.name.as_ptr(), 1);
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        // AddinShmemInitLock is MainLWLockArray[21] (a macro in C).
        let _held = LockGuard::exclusive(&raw mut (*pg_sys::MainLWLockArray.add(21)).lock);
        for s in &SEGMENTS {
            let mut found = false;
            let p = pg_sys::ShmemInitStruct(s.name.as_ptr(), s.size, &mut found).cast::<u8>();
            if !found {
                std::ptr::write_bytes(p, 0, s.size);
            }
            let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(s.name.as_ptr())).lock;
            (s.attach)(p, lock, found);
        }
    }
}

unsafe fn attach_shared(memory: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let p = memory.cast::<Shared>();
    unsafe {
        if !found {
            (*p).lock = lock;
            for slot in &mut (*p).slots {
                slot.lock = lock;
            }
            pg_sys::ConditionVariableInit(&raw mut (*p).applied_cv);
        }
    }
    SHARED.store(p, Ordering::Release);
}

pub fn get() -> Option<&'static Shared> {
    let p = SHARED.load(Ordering::Acquire);
    // SAFETY: set once in the postmaster's shmem startup, inherited by every child.
    unsafe { p.as_ref() }
}

fn write_text(dst: &mut [u8; TEXT], s: &str) {
    let mut n = s.len().min(TEXT - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    dst[n] = 0;
}

fn read_text(src: &[u8; TEXT]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(TEXT);
    String::from_utf8_lossy(&src[..end]).into_owned()
}

pub enum Field {
    State,
    Database,
    LastError,
}

impl Slot {
    fn field(&self, f: Field) -> &UnsafeCell<[u8; TEXT]> {
        match f {
            Field::State => &self.state,
            Field::Database => &self.database,
            Field::LastError => &self.last_error,
        }
    }

    pub fn set_text(&self, f: Field, s: &str) {
        let _held = LockGuard::exclusive(self.lock);
        // SAFETY: the exclusive lock makes this the only access to the field.
        write_text(unsafe { &mut *self.field(f).get() }, s);
    }

    pub fn text(&self, f: Field) -> String {
        let _held = LockGuard::shared(self.lock);
        // SAFETY: writers hold the lock exclusively.
        read_text(unsafe { &*self.field(f).get() })
    }

    /// Is its worker running (a live process with the pid it announced)?
    pub fn worker_alive(&self) -> bool {
        let pid = self.worker_pid.load(Ordering::Acquire);
        pid > 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
    }

    /// SIGTERM the worker with pid `pid` (read by the caller, who checked it belongs here) and
    /// wait, at most `within`, until it is gone. Interruptible.
    pub fn terminate_worker(&self, pid: i32, within: std::time::Duration) {
        if pid <= 0 {
            return;
        }
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + within;
        while self.worker_alive() && std::time::Instant::now() < deadline {
            unsafe {
                pg_sys::pg_usleep(10_000);
                pgrx::check_for_interrupts!();
            }
        }
    }

    /// Take a free helper entry for `pid`; None when every entry is taken.
    pub fn register_helper(&self, pid: i32) -> Option<usize> {
        self.helper_pids.iter().position(|p| {
            p.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    /// Give entry `i` back, if `pid` still holds it.
    pub fn unregister_helper(&self, i: usize, pid: i32) {
        if let Some(p) = self.helper_pids.get(i) {
            let _ = p.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// How many helper entries are taken (a helper clears its own as it exits, whatever the
    /// reason, before its pid can be reused; a crash-restart rebuilds the segment).
    pub fn helper_count(&self) -> usize {
        self.helper_pids
            .iter()
            .filter(|p| p.load(Ordering::SeqCst) != 0)
            .count()
    }

    /// SIGTERM every registered helper, also one still connecting (not yet in the proc array),
    /// and wait, at most `within`, until every entry is clear. Interruptible.
    pub fn terminate_helpers(&self, within: std::time::Duration) {
        for p in &self.helper_pids {
            let pid = p.load(Ordering::SeqCst);
            if pid > 0 {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = std::time::Instant::now() + within;
        while self.helper_count() > 0 && std::time::Instant::now() < deadline {
            unsafe {
                pg_sys::pg_usleep(10_000);
                pgrx::check_for_interrupts!();
            }
        }
    }

    /// Set the worker's latch. Safe in a commit callback: it cannot raise an ERROR.
    pub fn wake_worker(&self) {
        set_latch_of(self.worker_pid.load(Ordering::Acquire));
    }

    /// Make the slot serve `database` afresh (the launcher, before starting its worker).
    pub fn assign(&self, oid: u32, database: &str) {
        self.set_text(Field::Database, database);
        self.set_text(Field::State, "starting");
        self.set_text(Field::LastError, "");
        for counter in [
            &self.processed,
            &self.failed,
            &self.latency_us,
            &self.denials_dropped,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.worker_pid.store(0, Ordering::Release);
        self.started_at.store(0, Ordering::Relaxed);
        self.last_heartbeat.store(0, Ordering::Relaxed);
        self.stopped_for_ddl_at.store(0, Ordering::SeqCst);
        self.exit.store(Exit::Restart as u32, Ordering::Relaxed);
        self.database_oid.store(oid, Ordering::Release);
    }

    pub fn exit_reason(&self) -> Exit {
        match self.exit.load(Ordering::Acquire) {
            1 => Exit::NoExtension,
            _ => Exit::Restart,
        }
    }
}

fn set_latch_of(pid: i32) {
    if pid > 0 {
        unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            if !proc_.is_null() {
                pg_sys::SetLatch(&raw mut (*proc_).procLatch);
            }
        }
    }
}

impl Shared {
    /// The slot serving database `oid`, if any.
    pub fn serving(&self, oid: u32) -> Option<&Slot> {
        (oid != 0)
            .then(|| {
                self.slots
                    .iter()
                    .find(|s| s.database_oid.load(Ordering::Acquire) == oid)
            })
            .flatten()
    }

    /// The slot serving the current database, if any.
    pub fn this_database(&self) -> Option<&Slot> {
        self.serving(unsafe { pg_sys::MyDatabaseId }.to_u32())
    }

    /// A free slot (the launcher's, which alone assigns and frees them).
    pub fn free_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.database_oid.load(Ordering::Acquire) == 0)
    }

    pub fn set_launcher_note(&self, s: &str) {
        let _held = LockGuard::exclusive(self.lock);
        // SAFETY: as in `Slot::set_text`.
        write_text(unsafe { &mut *self.launcher_note.get() }, s);
    }

    pub fn launcher_note(&self) -> String {
        let _held = LockGuard::shared(self.lock);
        read_text(unsafe { &*self.launcher_note.get() })
    }

    pub fn launcher_alive(&self) -> bool {
        let pid = self.launcher_pid.load(Ordering::Acquire);
        pid > 0 && unsafe { !pg_sys::BackendPidGetProc(pid).is_null() }
    }

    pub fn cv(&self) -> *mut pg_sys::ConditionVariable {
        &self.applied_cv as *const _ as *mut _
    }

    pub fn broadcast_applied(&self) {
        unsafe { pg_sys::ConditionVariableBroadcast(self.cv()) }
    }
}

// ---- wake at COMMIT ----------------------------------------------------------------------
// Like pg_net: an enqueue marks the transaction, and only its COMMIT sets the latch of the worker
// serving this database. A rolled-back enqueue wakes nobody; a burst of enqueues in one
// transaction wakes once. `CREATE EXTENSION` likewise tells the launcher at its COMMIT.

static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
static RESCAN_PENDING: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            let wake = WAKE_PENDING.swap(false, Ordering::Relaxed);
            let rescan = RESCAN_PENDING.swap(false, Ordering::Relaxed);
            if let Some(s) = get() {
                if wake && let Some(slot) = s.this_database() {
                    slot.wake_worker();
                }
                if rescan {
                    s.rescan.fetch_add(1, Ordering::AcqRel);
                    set_latch_of(s.launcher_pid.load(Ordering::Acquire));
                }
            }
        }
        // PREPARE TRANSACTION: the rows commit later elsewhere; the idle timeout covers them.
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_PENDING.store(false, Ordering::Relaxed);
            RESCAN_PENDING.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

fn at_commit(flag: &AtomicBool) {
    if get().is_none() {
        return;
    }
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
    flag.store(true, Ordering::Relaxed);
}

/// Arrange for this database's worker to be woken when the current transaction commits.
pub fn wake_at_commit() {
    at_commit(&WAKE_PENDING);
}

/// Arrange for the launcher to look for databases to serve when the current transaction commits.
pub fn rescan_at_commit() {
    at_commit(&RESCAN_PENDING);
}

// ---- the worker's own slot -----------------------------------------------------------------

static MY_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);

static I_AM_HELPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Called by a worker at start with the slot the launcher gave it.
pub fn set_my_slot(index: usize) {
    MY_SLOT.store(index, Ordering::Release);
}

/// Called by a helper at start: it counts into its worker's slot (processed, failed, latency)
/// but leaves the worker's state and heartbeat to the worker.
pub fn set_helper_of(index: usize) {
    I_AM_HELPER.store(true, Ordering::Release);
    MY_SLOT.store(index, Ordering::Release);
}

pub fn i_am_helper() -> bool {
    I_AM_HELPER.load(Ordering::Acquire)
}

/// The slot of this process, if it is a worker.
pub fn mine() -> Option<&'static Slot> {
    let i = MY_SLOT.load(Ordering::Acquire);
    get().and_then(|s| s.slots.get(i))
}

pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}
