//! Per-identity rate limit on every writing call (`memory_ext.rate_limit_per_minute`): a token
//! bucket per identity in shared memory. Bursts up to the limit, refilled evenly over a minute.
//!
//! Slots are found by a hash keyed with a secret drawn at server start, so nobody can compute
//! offline which identities share a probe window; and a bucket still in deficit is never evicted
//! (that would hand its identity a full bucket): with no evictable slot the caller waits until one
//! refills.
//!
//! Shared memory rather than a table: a counter row per identity would serialize every enqueue of
//! that identity on one row lock until commit, and cost a write per call. The check is a hash, a
//! probe of at most [`PROBE`] slots and an LWLock held for a few instructions. Without
//! `shared_preload_libraries` there is no shared memory and no limit (documented).

use crate::settings;
use crate::shmem::LockGuard;
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
    /// The hash key, drawn when the segment is created.
    secret: [u8; 16],
    slots: [Slot; SLOTS],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// The segment's attach function (registered in `crate::shmem`): zeroed memory is an empty table.
pub unsafe fn attach(memory: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let p = memory.cast::<Table>();
    if !found {
        unsafe {
            (*p).lock = lock;
            // Without a strong random source the key stays zero: still a working limiter.
            let _ = pg_sys::pg_strong_random((*p).secret.as_mut_ptr().cast(), 16);
        }
    }
    TABLE.store(p, Ordering::Release);
}

fn key_of(secret: &[u8; 16], database: u32, identity: &str) -> u64 {
    // SipHash over the shared secret, the database and the identity: alike in every backend,
    // unpredictable without the secret. Each database has its own buckets: the same JWT sub in
    // two databases (two tenants' apps) is two callers.
    let mut h = std::hash::DefaultHasher::new();
    secret.hash(&mut h);
    database.hash(&mut h);
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

/// Microseconds until `slot`'s bucket is full again (0: full, so it may be recycled).
fn until_full(slot: &Slot, now: i64, limit: f64) -> i64 {
    let missing = limit - slot.tokens;
    let needed = (missing / (limit / 60e6)).ceil() as i64;
    (slot.at + needed - now).max(0)
}

/// The slot of `key` among its probe window: its own, a free one, or one whose bucket has refilled
/// (nothing is lost by recycling it). Err: every slot is another identity's bucket in deficit;
/// the microseconds until the first of them is full.
fn slot_for(slots: &mut [Slot; SLOTS], key: u64, now: i64, limit: f64) -> Result<&mut Slot, i64> {
    let start = (key as usize) % SLOTS;
    let mut free = None;
    let mut soonest = i64::MAX;
    for i in 0..PROBE {
        let j = (start + i) % SLOTS;
        if slots[j].key == key {
            return Ok(&mut slots[j]);
        }
        let wait = if slots[j].key == 0 {
            0
        } else {
            until_full(&slots[j], now, limit)
        };
        if wait == 0 && free.is_none() {
            free = Some(j);
        }
        soonest = soonest.min(wait);
    }
    let j = free.ok_or(soonest)?;
    slots[j] = Slot {
        key,
        tokens: limit,
        at: now,
    };
    Ok(&mut slots[j])
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
    let limit = limit as f64;
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    // SAFETY: the table lives in shared memory for the server's life; its lock guards the slots,
    // and nothing below can raise an ERROR while it is held.
    let wait = unsafe {
        let _held = LockGuard::exclusive((*table).lock);
        let key = key_of(&(*table).secret, pg_sys::MyDatabaseId.to_u32(), identity);
        match slot_for(&mut (*table).slots, key, now, limit) {
            Ok(slot) => take(slot, now, limit),
            Err(us) => Some(((us as f64) / 1e6).ceil().max(1.0) as u32),
        }
    };
    wait.map_or(0, |s| s as i32)
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
        let a = slot_for(&mut slots, 5, 10, 100.0).unwrap() as *const Slot;
        assert_eq!(
            slot_for(&mut slots, 5, 20, 100.0).unwrap() as *const Slot,
            a
        );
        // fill a probe window with other keys colliding on the same start
        for i in 1..PROBE as u64 {
            slot_for(&mut slots, 5 + i * SLOTS as u64, 100 + i as i64, 100.0).unwrap();
        }
        // every bucket is full: one more colliding key recycles one of them
        let b = slot_for(&mut slots, 5 + 99 * SLOTS as u64, 1000, 100.0).unwrap();
        assert_eq!(b.key, 5 + 99 * SLOTS as u64);
    }

    /// Identities whose buckets share a window cannot evict each other's deficit: the
    /// exhausted bucket stays, and a newcomer waits for a bucket to refill instead.
    #[test]
    fn a_bucket_in_deficit_is_never_evicted() {
        let mut slots = [Slot {
            key: 0,
            tokens: 0.0,
            at: 0,
        }; SLOTS];
        let limit = 60.0; // a token a second
        let keys: Vec<u64> = (0..PROBE as u64).map(|i| 7 + i * SLOTS as u64).collect();
        for &k in &keys {
            let s = slot_for(&mut slots, k, 0, limit).unwrap();
            while take(s, 0, limit).is_none() {}
        }
        let newcomer = 7 + 500 * SLOTS as u64;
        assert_eq!(
            slot_for(&mut slots, newcomer, 1_000_000, limit).map(|_| ()),
            Err(59_000_000),
            "no slot: wait until the first bucket is full (59 s)"
        );
        for &k in &keys {
            let s = slot_for(&mut slots, k, 1_000_000, limit).unwrap();
            assert!(s.tokens < 1.0, "key {k} kept its deficit");
        }
        assert!(slot_for(&mut slots, newcomer, 60_000_000, limit).is_ok());
    }

    #[test]
    fn the_hash_depends_on_the_secret_and_the_database() {
        let a = key_of(&[0; 16], 5, "alice");
        assert_eq!(a, key_of(&[0; 16], 5, "alice"));
        assert_ne!(a, key_of(&[1; 16], 5, "alice"));
        assert_ne!(
            a,
            key_of(&[0; 16], 6, "alice"),
            "another database, other buckets"
        );
    }
}
