//! Per-identity rate limit on enqueue (`memory_ext.rate_limit_per_minute`): a token bucket per
//! identity in shared memory. Bursts up to the limit, refilled evenly over a minute.
//!
//! Shared memory rather than a table: a counter row per identity would serialize every enqueue of
//! that identity on one row lock until commit, and cost a write per call. The check is a hash, a
//! probe of at most [`PROBE`] slots and an LWLock held for a few instructions. Without
//! `shared_preload_libraries` there is no shared memory and no limit (documented).

use crate::settings;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicPtr, Ordering};

pub const SHMEM_NAME: &CStr = c"memory_ext rate limit";
pub const SHMEM_SIZE: usize = size_of::<Table>();
const SLOTS: usize = 8192;
const PROBE: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    /// Hash of the identity; 0 = free.
    key: u64,
    tokens: f64,
    /// When `tokens` was computed (GetCurrentTimestamp, µs).
    at: i64,
}

#[repr(C)]
struct Table {
    lock: *mut pg_sys::LWLock,
    slots: [Slot; SLOTS],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// The segment's attach function (registered in `crate::shmem`): zeroed memory is an empty table.
pub unsafe fn attach(memory: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let p = memory.cast::<Table>();
    if !found {
        unsafe { (*p).lock = lock };
    }
    TABLE.store(p, Ordering::Release);
}

fn key_of(identity: &str) -> u64 {
    // SipHash with fixed keys: the same identity hashes alike in every backend.
    let mut h = std::hash::DefaultHasher::new();
    identity.hash(&mut h);
    h.finish().max(1)
}

/// Take one token from `slot` (refilled to `now`); `None` when allowed, else seconds to wait.
fn take(slot: &mut Slot, now: i64, limit: f64) -> Option<u32> {
    let per_us = limit / 60e6;
    let elapsed = (now - slot.at).max(0) as f64;
    slot.tokens = (slot.tokens + elapsed * per_us).min(limit);
    slot.at = now;
    if slot.tokens >= 1.0 {
        slot.tokens -= 1.0;
        None
    } else {
        Some(((1.0 - slot.tokens) / per_us / 1e6).ceil().max(1.0) as u32)
    }
}

/// The slot of `key` among its probe window: its own, a free one, or the least recently used
/// (whose bucket has most likely refilled anyway).
fn slot_for(slots: &mut [Slot; SLOTS], key: u64, now: i64, limit: f64) -> &mut Slot {
    let start = (key as usize) % SLOTS;
    let mut victim = start;
    for i in 0..PROBE {
        let j = (start + i) % SLOTS;
        if slots[j].key == key {
            return &mut slots[j];
        }
        if slots[j].key == 0 {
            victim = j;
            break;
        }
        if slots[j].at < slots[victim].at {
            victim = j;
        }
    }
    slots[victim] = Slot {
        key,
        tokens: limit,
        at: now,
    };
    &mut slots[victim]
}

/// Superusers (bulk loads, maintenance) are never limited. The invoker is SET ROLE's role or
/// the session user: inside enqueue (SECURITY DEFINER) the current user is the definer.
fn invoker_is_superuser() -> bool {
    unsafe {
        let role = pg_sys::GetCurrentRoleId();
        let invoker = if role == pg_sys::InvalidOid {
            pg_sys::GetSessionUserId()
        } else {
            role
        };
        pg_sys::superuser_arg(invoker)
    }
}

/// Seconds `identity` must wait before its next enqueue, or 0 when it may go ahead (and a token
/// was taken). Always 0 when the limit is off or the library is not preloaded.
// Runs no SQL, so no search_path to pin (and no per-call search_path switch on enqueue's path).
#[pg_extern(volatile, parallel_unsafe, strict, name = "_rate_limit")]
fn rate_limit(identity: &str) -> i32 {
    let limit = settings::RATE_LIMIT_PER_MINUTE.get();
    let table = TABLE.load(Ordering::Acquire);
    if limit <= 0 || table.is_null() || invoker_is_superuser() {
        return 0;
    }
    let key = key_of(identity);
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        pg_sys::LWLockAcquire((*table).lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let slot = slot_for(&mut (*table).slots, key, now, limit as f64);
        let wait = take(slot, now, limit as f64);
        pg_sys::LWLockRelease((*table).lock);
        wait.map_or(0, |s| s as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket() {
        let mut s = Slot {
            key: 1,
            tokens: 3.0,
            at: 0,
        };
        let limit = 3.0; // per minute: one token every 20 s
        assert_eq!(take(&mut s, 0, limit), None);
        assert_eq!(take(&mut s, 0, limit), None);
        assert_eq!(take(&mut s, 0, limit), None);
        assert_eq!(take(&mut s, 0, limit), Some(20), "empty: a token in 20 s");
        assert_eq!(
            take(&mut s, 15_000_000, limit),
            Some(5),
            "15 s later: 5 s to go"
        );
        assert_eq!(take(&mut s, 20_000_000, limit), None, "refilled one");
        assert_eq!(take(&mut s, 20_000_000, limit), Some(20));
        // a long pause refills to the limit, not beyond
        for _ in 0..3 {
            assert_eq!(take(&mut s, 3_600_000_000, limit), None);
        }
        assert!(take(&mut s, 3_600_000_000, limit).is_some());
    }

    #[test]
    fn slots_are_found_again_and_recycled() {
        let mut slots = [Slot {
            key: 0,
            tokens: 0.0,
            at: 0,
        }; SLOTS];
        let a = slot_for(&mut slots, 5, 10, 100.0) as *const Slot;
        assert_eq!(slot_for(&mut slots, 5, 20, 100.0) as *const Slot, a);
        // fill a probe window with other keys colliding on the same start
        for i in 1..PROBE as u64 {
            slot_for(&mut slots, 5 + i * SLOTS as u64, 100 + i as i64, 100.0);
        }
        // one more colliding key evicts the least recently used (key 5, at = 10)
        let b = slot_for(&mut slots, 5 + 99 * SLOTS as u64, 1000, 100.0);
        assert_eq!(b.key, 5 + 99 * SLOTS as u64);
        assert!(!slots.iter().any(|s| s.key == 5));
    }
}
