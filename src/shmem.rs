//! Shared memory (every segment of the extension is registered here): how backends wake the
//! worker at COMMIT, how `wait()` sleeps until the worker
//! applies something, and the worker's health record for `worker_status()`.
//!
//! It exists only when the library is in `shared_preload_libraries`; every accessor returns
//! `None` otherwise, and the SQL API degrades to polling / `process_pending()`.

use pgrx::pg_sys;
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering,
};

const NAME: &CStr = c"memory_ext";
const TEXT: usize = 256;

#[repr(C)]
pub struct Shared {
    /// Guards the text fields below; counters are atomics.
    lock: *mut pg_sys::LWLock,
    /// Broadcast after every committed apply, so `wait()` re-checks without polling.
    pub applied_cv: pg_sys::ConditionVariable,
    pub worker_pid: AtomicI32,
    pub launcher_pid: AtomicI32,
    /// The database the worker serves (0 until it connected).
    pub database_oid: AtomicU32,
    pub started_at: AtomicI64,
    pub last_heartbeat: AtomicI64,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    /// Recent enqueue-to-applied latency, microseconds (exponential moving average).
    pub latency_us: AtomicU64,
    // Written through `&self` under `lock`: interior mutability, made explicit.
    state: UnsafeCell<[u8; TEXT]>,
    database: UnsafeCell<[u8; TEXT]>,
    last_error: UnsafeCell<[u8; TEXT]>,
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

impl Shared {
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

    pub fn cv(&self) -> *mut pg_sys::ConditionVariable {
        &self.applied_cv as *const _ as *mut _
    }

    pub fn broadcast_applied(&self) {
        unsafe { pg_sys::ConditionVariableBroadcast(self.cv()) }
    }

    /// Set the worker's latch. Safe in a commit callback: it cannot raise an ERROR.
    pub fn wake_worker(&self) {
        let pid = self.worker_pid.load(Ordering::Acquire);
        if pid > 0 {
            unsafe {
                let proc_ = pg_sys::BackendPidGetProc(pid);
                if !proc_.is_null() {
                    pg_sys::SetLatch(&raw mut (*proc_).procLatch);
                }
            }
        }
    }
}

// ---- wake at COMMIT ----------------------------------------------------------------------
// Like pg_net: an enqueue marks the transaction, and only its COMMIT sets the worker's latch.
// A rolled-back enqueue wakes nobody; a burst of enqueues in one transaction wakes once.

static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            if WAKE_PENDING.swap(false, Ordering::Relaxed) =>
        {
            if let Some(s) = get() {
                s.wake_worker();
            }
        }
        // PREPARE TRANSACTION: the rows commit later elsewhere; the idle timeout covers them.
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => WAKE_PENDING.store(false, Ordering::Relaxed),
        _ => {}
    }
}

/// Arrange for the worker to be woken when the current transaction commits.
pub fn wake_at_commit() {
    if get().is_none() {
        return;
    }
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
    WAKE_PENDING.store(true, Ordering::Relaxed);
}

pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}
