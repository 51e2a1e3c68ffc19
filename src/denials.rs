//! Refused cross-tenant attempts, for the audit log. A refused call raises an ERROR, which rolls
//! back any row it could write, so the attempt is noted in a ring in shared memory instead and the
//! worker of its database, woken at once, copies it into that database's `memory.audit_log`
//! (action `denied:<function>`).
//!
//! The ring holds [`CAPACITY`] attempts of all databases; beyond that they are counted (per
//! database) and the count is audited (`denied:overflow`), so a flood cannot grow anything. With
//! no worker serving the database (or without `shared_preload_libraries`) nothing would copy the
//! attempt: it goes to the server log instead.

use crate::shmem::LockGuard;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};

pub const SHMEM_NAME: &CStr = c"memory_ext denials";
pub const SHMEM_SIZE: usize = size_of::<Ring>();
const CAPACITY: usize = 256;

/// A string cut to `N` bytes at a character boundary.
#[repr(C)]
#[derive(Clone, Copy)]
struct Text<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    fn set(&mut self, s: &str) {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = n as u16;
    }

    fn get(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..self.len as usize]).into_owned()
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Entry {
    database: u32,
    at: i64,
    action: Text<32>,
    identity: Text<256>,
    role: Text<64>,
    chat_id: Text<256>,
}

#[repr(C)]
struct Ring {
    lock: *mut pg_sys::LWLock,
    /// Written: `head`; copied out: `tail` (both count from 0; the slot is `% CAPACITY`).
    head: u64,
    tail: u64,
    entries: [Entry; CAPACITY],
}

static RING: AtomicPtr<Ring> = AtomicPtr::new(std::ptr::null_mut());

/// The segment's attach function (registered in `crate::shmem`).
pub unsafe fn attach(memory: *mut u8, lock: *mut pg_sys::LWLock, found: bool) {
    let p = memory.cast::<Ring>();
    if !found {
        unsafe { (*p).lock = lock };
    }
    RING.store(p, Ordering::Release);
}

/// One refused attempt, as the audit log records it.
pub struct Denial {
    pub at: i64,
    pub action: String,
    pub identity: String,
    pub role: String,
    pub chat_id: String,
}

/// Note a refused attempt (called by the SQL functions just before they raise).
#[pg_extern(volatile, parallel_unsafe, name = "_note_denied")]
fn note_denied(p_action: &str, p_chat_id: &str, p_identity: &str, p_role: &str) {
    let ring = RING.load(Ordering::Acquire);
    let slot = crate::shmem::get().and_then(|sh| sh.this_database());
    let (false, Some(slot)) = (ring.is_null(), slot) else {
        pgrx::log!(
            "memory_ext: denied {p_action} of chat \"{p_chat_id}\" to identity \"{p_identity}\" (role {p_role})"
        );
        return;
    };
    let at = unsafe { pg_sys::GetCurrentTimestamp() };
    unsafe {
        let _held = LockGuard::exclusive((*ring).lock);
        let r = &mut *ring;
        if r.head - r.tail >= CAPACITY as u64 {
            slot.denials_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let e = &mut r.entries[(r.head % CAPACITY as u64) as usize];
        e.database = pg_sys::MyDatabaseId.to_u32();
        e.at = at;
        e.action.set(p_action);
        e.identity.set(p_identity);
        e.role.set(p_role);
        e.chat_id.set(p_chat_id);
        r.head += 1;
    }
    // Now, not at COMMIT: the refused call's transaction is about to abort.
    slot.wake_worker();
}

fn this_database() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Are there attempts of this database to copy? Checked before opening a transaction for
/// [`flush`], so an idle worker's passes cost nothing here.
pub fn pending() -> bool {
    let ring = RING.load(Ordering::Acquire);
    if ring.is_null() {
        return false;
    }
    let db = this_database();
    let dropped =
        crate::shmem::mine().is_some_and(|s| s.denials_dropped.load(Ordering::Relaxed) > 0);
    unsafe {
        let _held = LockGuard::shared((*ring).lock);
        let r = &*ring;
        dropped
            || (r.tail..r.head).any(|i| r.entries[(i % CAPACITY as u64) as usize].database == db)
    }
}

/// Take this database's noted attempts out of the ring (the others' stay, in order), and how
/// many were dropped when it was full.
fn take() -> (Vec<Denial>, u64) {
    let ring = RING.load(Ordering::Acquire);
    if ring.is_null() {
        return (Vec::new(), 0);
    }
    let db = this_database();
    let dropped = crate::shmem::mine().map_or(0, |s| s.denials_dropped.swap(0, Ordering::Relaxed));
    unsafe {
        let _held = LockGuard::exclusive((*ring).lock);
        let taken = split_off(&mut *ring, |e| e.database != db)
            .into_iter()
            .map(|e| Denial {
                at: e.at,
                action: e.action.get(),
                identity: e.identity.get(),
                role: e.role.get(),
                chat_id: e.chat_id.get(),
            })
            .collect();
        (taken, dropped)
    }
}

/// Forget the attempts noted for database `oid` (the launcher, when no worker serves it any
/// more): nothing would copy them, and they would hold ring space for good.
pub fn purge(oid: u32) {
    let ring = RING.load(Ordering::Acquire);
    if ring.is_null() || oid == 0 {
        return;
    }
    unsafe {
        let _held = LockGuard::exclusive((*ring).lock);
        split_off(&mut *ring, |e| e.database != oid);
    }
}

/// Keep the entries `keep` accepts, in their order, from the tail; return the others, in order.
/// The caller holds the ring's lock exclusively.
fn split_off(r: &mut Ring, mut keep: impl FnMut(&Entry) -> bool) -> Vec<Entry> {
    let (kept, others): (Vec<Entry>, Vec<Entry>) = (r.tail..r.head)
        .map(|i| r.entries[(i % CAPACITY as u64) as usize])
        .partition(|e| keep(e));
    r.head = r.tail + kept.len() as u64;
    for (j, e) in kept.into_iter().enumerate() {
        r.entries[((r.tail + j as u64) % CAPACITY as u64) as usize] = e;
    }
    others
}

/// Copy the noted attempts into memory.audit_log (the worker, in a transaction). If writing fails
/// they are lost, like any audit row of an aborted transaction; the error is returned.
pub fn flush() -> Result<usize, pgrx::spi::SpiError> {
    let (denials, dropped) = take();
    if denials.is_empty() && dropped == 0 {
        return Ok(0);
    }
    let rows: Vec<serde_json::Value> = denials
        .iter()
        .map(|d| {
            serde_json::json!({
                "at_us": d.at, "action": format!("denied:{}", d.action),
                "identity": d.identity, "role": d.role, "chat_id": d.chat_id,
            })
        })
        .collect();
    Spi::run_with_args(
        "INSERT INTO memory.audit_log (at, identity, role, action, chat_id, detail) \
         SELECT timestamptz '2000-01-01 00:00:00+00' + make_interval(secs => d.at_us / 1e6), \
                d.identity, d.role::name, d.action, d.chat_id, NULL \
           FROM jsonb_to_recordset($1) AS d(at_us bigint, action text, identity text, role text, \
                                            chat_id text) \
         UNION ALL \
         SELECT clock_timestamp(), 'memory_ext', current_user, 'denied:overflow', NULL, \
                format('%s refused attempts not recorded: the ring was full', $2) \
          WHERE $2 > 0",
        &[
            pgrx::datum::JsonB(serde_json::Value::Array(rows)).into(),
            (dropped as i64).into(),
        ],
    )?;
    Ok(denials.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_off_keeps_the_others_in_order_across_the_wrap() {
        // SAFETY: every field of Ring is plain data; all-zero is a valid empty ring.
        let mut r: Box<Ring> = Box::new(unsafe { std::mem::zeroed() });
        r.tail = CAPACITY as u64 - 3;
        r.head = r.tail;
        for i in 0..8u32 {
            let e = &mut r.entries[(r.head % CAPACITY as u64) as usize];
            e.database = 1 + i % 2;
            e.at = i64::from(i);
            r.head += 1;
        }
        let taken = split_off(&mut r, |e| e.database != 2);
        assert_eq!(taken.iter().map(|e| e.at).collect::<Vec<_>>(), [1, 3, 5, 7]);
        let kept: Vec<i64> = (r.tail..r.head)
            .map(|i| r.entries[(i % CAPACITY as u64) as usize].at)
            .collect();
        assert_eq!(kept, [0, 2, 4, 6], "database 1's, in order, from the tail");
        assert!(split_off(&mut r, |_| true).is_empty());
        assert_eq!(r.head - r.tail, 4);
    }
}
