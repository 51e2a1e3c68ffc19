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

use crate::batch::{self, Outcome};
use crate::queue;
use crate::settings::QueuePolicy;
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
    pub outcome: Outcome,
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
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
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
            self.in_flight.remove(&d.outcome.lease_token());
            // Only a rate limit carries a Retry-After.
            if let Outcome::Failed(f) = &d.outcome
                && let Some(after) = f.retry_after
            {
                let until = Instant::now() + after;
                self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
            }
        }
        done
    }

    /// Claim chats for the free slots and start their requests. Returns how many were claimed
    /// and whether more may be claimable right away.
    pub fn start_more(
        &mut self,
        policy: &QueuePolicy,
        summarizer: &Arc<dyn Summarizer>,
        concurrency: usize,
        claim: impl FnOnce(&QueuePolicy) -> Result<Vec<queue::Claim>, String>,
    ) -> Result<(usize, bool), String> {
        let free = concurrency.saturating_sub(self.in_flight.len());
        if free == 0 || self.paused().is_some() {
            return Ok((0, false));
        }
        let asked = free.min(policy.batch_chats.max(1) as usize);
        let mut p = policy.clone();
        p.batch_chats = asked as i32;
        let claims = claim(&p)?;
        let n = claims.len();
        let label = summarizer.label();
        for c in claims {
            self.in_flight.insert(c.lease_token, c.chat_id.clone());
            let tx = self.tx.clone();
            let mut wake = self.wake_tx.try_clone().map_err(|e| e.to_string())?;
            let summarizer = Arc::clone(summarizer);
            let label = label.clone();
            let token_limit = policy.token_limit;
            let started = Instant::now();
            let lease = c.lease_token;
            if let Err(e) = spawn_without_signals(move || {
                let outcome = batch::process(c, summarizer.as_ref(), token_limit);
                let _ = tx.send(Done {
                    outcome,
                    label,
                    started,
                });
                // WouldBlock (a full buffer) means wake-ups are pending already.
                let _ = wake.write(&[1]);
            }) {
                // Could not start a thread (resource limits): the lease expires and is retried.
                self.in_flight.remove(&lease);
                return Err(format!("could not start an LLM request thread: {e}"));
            }
        }
        Ok((n, n == asked && self.in_flight.len() < concurrency))
    }

    /// The leases of requests still in flight, to give back when stopping.
    pub fn abandon(&mut self) -> Vec<(String, pgrx::Uuid)> {
        self.in_flight
            .drain()
            .map(|(lease, chat)| (chat, lease))
            .collect()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        unsafe { pg_sys::FreeWaitEventSet(self.set) };
    }
}
