//! Concurrent summarization for remote (HTTP) summarizers.
//!
//! LLM calls take seconds, so the worker keeps up to `memory_ext.llm_concurrency` of them in
//! flight, one helper thread each (different chats; the lease keeps one per chat). The threads
//! only do HTTP, JSON and the pure-Rust merge on owned data; every database access (claiming,
//! applying, recording failures) stays on the worker's main thread, which collects results as
//! they arrive and claims more chats as slots free up.
//!
//! The main thread sleeps on a wait event set holding its latch (commits, SIGTERM, SIGHUP) and one
//! end of a socket pair the threads write a byte to when they finish, so a slow or hanging
//! endpoint never delays shutdown, reload, or applying the answers that did arrive.

use crate::batch;
use crate::model::{Bounds, Claim, Finished};
use crate::summarizer::Summarizer;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

/// One finished job, sent from its thread.
pub struct Done {
    pub outcome: Finished,
    pub label: String,
    pub started: Instant,
}

pub struct Pipeline {
    tx: Sender<Done>,
    rx: Receiver<Done>,
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    set: *mut pg_sys::WaitEventSet,
    /// Leases whose request is in flight, with their chat (released if we stop first). Keyed
    /// by lease: a chat whose lease expired may be claimed again while its old request runs.
    in_flight: HashMap<pgrx::Uuid, String>,
    /// After a 429 the endpoint is rate limited for every chat: no new requests before this.
    paused_until: Option<Instant>,
}

/// Start `f` on a new thread with every signal blocked: Postgres's handlers must only ever run
/// on the main thread (pgrx panics otherwise).
fn spawn_without_signals(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // The new thread inherits the mask in force when it is created.
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = std::thread::Builder::new()
            .name("memory_ext llm".into())
            .spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned.map(drop)
    }
}

impl Pipeline {
    /// Must be called on the worker's main thread, outside any transaction.
    pub fn new() -> std::io::Result<Self> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        let (tx, rx) = channel();
        let set = unsafe {
            // Session lifetime: not tied to a resource owner (PostgreSQL 17 replaced the
            // memory context argument with one).
            #[cfg(not(any(feature = "pg17", feature = "pg18")))]
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            #[cfg(any(feature = "pg17", feature = "pg18"))]
            let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), 3);
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                wake_rx.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            set
        };
        Ok(Self {
            tx,
            rx,
            wake_rx,
            wake_tx,
            set,
            in_flight: HashMap::new(),
            paused_until: None,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn paused(&self) -> Option<Duration> {
        self.paused_until
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Sleep until the latch is set (a commit, a signal), a job finishes, or the timeout passes.
    pub fn wait(&mut self, timeout: Duration) {
        let mut event = pg_sys::WaitEvent::default();
        unsafe {
            let n = pg_sys::WaitEventSetWait(
                self.set,
                timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long,
                &mut event,
                1,
                pg_sys::PG_WAIT_EXTENSION,
            );
            if n > 0 && event.events & pg_sys::WL_LATCH_SET != 0 {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
        }
        let mut buf = [0u8; 256];
        while matches!(self.wake_rx.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Finished jobs, without blocking.
    pub fn finished(&mut self) -> Vec<Done> {
        let done: Vec<Done> = self.rx.try_iter().collect();
        for d in &done {
            self.in_flight.remove(&d.outcome.lease_token);
            // Only a rate limit carries a Retry-After.
            if let Some(after) = d.outcome.failure.as_ref().and_then(|f| f.retry_after) {
                let until = Instant::now() + after;
                self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
            }
        }
        done
    }

    /// How many more requests may start now (none while rate limited).
    pub fn free_slots(&self, concurrency: usize) -> usize {
        if self.paused().is_some() {
            return 0;
        }
        concurrency.saturating_sub(self.in_flight.len())
    }

    /// Start one request thread per claim. On failure (no thread or socket to be had) returns
    /// the error and the leases (chat, lease) not started: the caller gives them back at once
    /// rather than letting them wait out the lease.
    pub fn start(
        &mut self,
        claims: Vec<Claim>,
        summarizer: &Arc<dyn Summarizer>,
        bounds: &Bounds,
    ) -> Result<(), (String, Vec<(String, pgrx::Uuid)>)> {
        let label = summarizer.label();
        let mut claims = claims.into_iter();
        while let Some(c) = claims.next() {
            let (chat, lease) = (c.chat_id.clone(), c.lease_token);
            let job = self.wake_tx.try_clone().map(|wake| Job {
                tx: self.tx.clone(),
                wake,
                summarizer: Arc::clone(summarizer),
                label: label.clone(),
                bounds: bounds.clone(),
            });
            let started = job.and_then(|job| spawn_without_signals(move || job.run(c)));
            if let Err(e) = started {
                let unstarted = std::iter::once((chat, lease))
                    .chain(claims.map(|c| (c.chat_id, c.lease_token)))
                    .collect();
                return Err((
                    format!("could not start an LLM request thread: {e}"),
                    unstarted,
                ));
            }
            self.in_flight.insert(lease, chat);
        }
        Ok(())
    }

    /// The leases of requests still in flight, to give back when stopping.
    pub fn abandon(&mut self) -> Vec<(String, pgrx::Uuid)> {
        self.in_flight
            .drain()
            .map(|(lease, chat)| (chat, lease))
            .collect()
    }
}

/// What one request thread needs: everything owned, nothing that touches Postgres.
struct Job {
    tx: Sender<Done>,
    wake: UnixStream,
    summarizer: Arc<dyn Summarizer>,
    label: String,
    bounds: Bounds,
}

impl Job {
    fn run(mut self, claim: Claim) {
        let started = Instant::now();
        let outcome = batch::process(claim, self.summarizer.as_ref(), &self.bounds);
        let _ = self.tx.send(Done {
            outcome,
            label: self.label,
            started,
        });
        // WouldBlock (a full buffer) means wake-ups are pending already.
        let _ = self.wake.write(&[1]);
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        unsafe { pg_sys::FreeWaitEventSet(self.set) };
    }
}
