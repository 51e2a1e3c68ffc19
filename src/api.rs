//! The SQL functions implemented in Rust. The rest of the API is SQL (`sql/api.sql`).

use crate::batch;
use crate::error::{ApiError, ApiResult, or_raise};
use crate::queue;
use crate::settings::{self, QueuePolicy};
use crate::shmem::{self, Field};
use crate::spi;
use crate::summarizer;
use crate::tokens;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Wake the worker when the calling transaction commits, and return the typical time from then
/// to applied memory as the worker measures it: NULL when no worker serves this database
/// (nothing will process the snippet until `process_pending()` is called). One call, because
/// enqueue's hot path needs both.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_at_commit")]
fn wake_at_commit() -> Option<Interval> {
    shmem::wake_at_commit();
    let slot = shmem::get()?.this_database()?;
    if !slot.worker_alive() {
        return None;
    }
    let us = slot.latency_us.load(Ordering::Relaxed).max(1000);
    Interval::try_from(Duration::from_micros(us)).ok()
}

fn queue_status(queue_id: pgrx::Uuid) -> String {
    // memory.status() checks the id exists and belongs to the caller, raising P0002/42501 itself.
    spi::read_one::<String>("SELECT status FROM memory.status($1)", &[queue_id.into()])
        .map_err(ApiError::from)
        .map(Option::unwrap_or_default)
        .unwrap_or_else(|e| e.raise())
}

/// Was the row written by this transaction (or one of its subtransactions)? Then no other
/// process can finish it while we wait: the worker sees it only after COMMIT.
fn enqueued_here(queue_id: pgrx::Uuid) -> ApiResult<bool> {
    let xmin = spi::read_one::<i64>("SELECT memory._queue_row_xmin($1)", &[queue_id.into()])?;
    Ok(xmin.is_some_and(|x| unsafe {
        pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(x as u32))
    }))
}

/// Block until the queue row is `complete` or `failed`, or the timeout passes; return its status.
/// Sleeps on a condition variable the worker broadcasts after each apply (polling every 100 ms
/// when the library is not preloaded), so waiting costs next to nothing.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn wait(p_queue_id: pgrx::Uuid, p_timeout: default!(Interval, "'10 seconds'")) -> String {
    or_raise(wait_impl(p_queue_id, p_timeout))
}

fn wait_impl(p_queue_id: pgrx::Uuid, p_timeout: Interval) -> ApiResult<String> {
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(ApiError::FeatureNotSupported(
            "memory.wait() needs READ COMMITTED: a REPEATABLE READ snapshot never sees the \
             worker's progress"
                .into(),
        ));
    }
    let timeout = Duration::try_from(p_timeout).map_err(|_| {
        ApiError::InvalidParameter(
            "p_timeout must be a non-negative interval without months".into(),
        )
    })?;
    // A waiting call holds a (pooled) connection: bounded by a setting, not by the caller.
    let max = settings::max_wait();
    if timeout > max {
        return Err(ApiError::InvalidParameter(format!(
            "p_timeout must be at most memory_ext.max_wait ({} s)",
            max.as_secs()
        )));
    }
    let deadline = Instant::now() + timeout;
    let cv = shmem::get().map(|s| s.cv());
    let mut first = true;
    loop {
        if let Some(cv) = cv {
            // Prepare before checking, so a broadcast between the check and the sleep is kept.
            unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
        }
        // A fresh READ COMMITTED snapshot per check: read-only SPI would keep reusing the first.
        let status = unsafe {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let status = queue_status(p_queue_id);
            pg_sys::PopActiveSnapshot();
            status
        };
        let now = Instant::now();
        let done = status == "complete" || status == "failed";
        let refused = !done && first && enqueued_here(p_queue_id)?;
        if done || refused || now >= deadline {
            if cv.is_some() {
                unsafe { pg_sys::ConditionVariableCancelSleep() };
            }
            if refused {
                return Err(ApiError::WrongState(format!(
                    "snippet {p_queue_id} was enqueued in this transaction: the worker sees it \
                     only after COMMIT, so memory.wait() cannot see it complete; commit first"
                )));
            }
            return Ok(status);
        }
        first = false;
        let nap = (deadline - now).min(Duration::from_millis(100));
        match cv {
            Some(cv) => unsafe {
                pg_sys::ConditionVariableTimedSleep(
                    cv,
                    nap.as_millis() as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
            },
            None => unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    nap.as_millis() as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            },
        }
        pg_sys::check_for_interrupts!();
    }
}

/// Summarize and apply pending work in the calling backend, for servers that cannot preload the
/// library: up to `p_max` chats, one summarization each; returns the snippets applied.
///
/// It runs in the caller's transaction, so it must not hold a chat's row lock while an LLM
/// request runs (enqueues into that chat would wait for it): it summarizes what `_peek` saw with
/// no lock held, then leases and finishes each chat only if nothing changed meanwhile
/// (`_claim_exact`), through the same `_finish` as the worker.
// Definer rights: admins other than superusers (service_role) need no table privileges.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn process_pending(p_max: default!(i32, 100)) -> i32 {
    or_raise(process_pending_impl(p_max))
}

fn process_pending_impl(p_max: i32) -> ApiResult<i32> {
    if p_max < 1 {
        return Err(ApiError::InvalidParameter(
            "p_max must be at least 1".into(),
        ));
    }
    if !spi::read_one::<bool>("SELECT memory._is_admin()", &[])?.unwrap_or(false) {
        return Err(ApiError::InsufficientPrivilege(
            "memory.process_pending() processes every chat and is for admins only".into(),
        ));
    }
    let mut policy = QueuePolicy::current();
    policy.batch_chats = p_max;
    policy.fact_keys = queue::fact_keys()?;
    let mut config = <crate::model::LlmConfig as settings::FromSettings>::current()?;
    config.fact_keys = policy.fact_keys.clone();
    let summarizer = summarizer::from_config(&config)?;
    let label = summarizer.label();
    // Takes back leases of dead processes and expired ones (NO KEY UPDATE locks: enqueues into
    // those chats are not blocked while the requests below run).
    queue::reclaim(policy.max_attempts, true)?;
    queue::defer_over_budget()?;
    let mut applied_snippets = 0;
    for peeked in queue::peek(&policy)? {
        let mut result = batch::process(peeked.clone(), summarizer.as_ref(), &policy.bounds());
        let Some(lease) = queue::claim_exact(&peeked, &policy)? else {
            continue; // the chat changed or is busy elsewhere: its work is not lost, only not done here
        };
        result.lease_token = lease;
        if queue::finish(std::slice::from_ref(&result), &policy, &label)?.applied > 0 {
            applied_snippets += result.applied.len() as i32;
        }
    }
    Spi::run_with_args(
        "SELECT memory._audit('process_pending', NULL, NULL, $1)",
        &[format!("{applied_snippets} snippet(s) applied").into()],
    )?;
    if applied_snippets > 0 {
        // waiters re-check once this commits
        shmem::wake_at_commit();
    }
    Ok(applied_snippets)
}

/// The health check: is a worker serving this database, and how is it doing.
#[allow(clippy::type_complexity)] // pgrx reads the column names from this signature
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(running, bool),
        name!(pid, Option<i32>),
        name!(database, Option<String>),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(last_heartbeat, Option<TimestampWithTimeZone>),
        name!(processed, i64),
        name!(failed, i64),
        name!(last_error, Option<String>),
        name!(state, String),
    ),
> {
    let Some(sh) = shmem::get() else {
        return TableIterator::once((
            false,
            None,
            None,
            None,
            None,
            0,
            0,
            None,
            "no worker: memory_ext is not in shared_preload_libraries; call memory.process_pending() \
             or add it and restart"
                .to_string(),
        ));
    };
    let ts = |v: i64| {
        (v != 0)
            .then(|| TimestampWithTimeZone::try_from(v).ok())
            .flatten()
    };
    let here = spi::current_database();
    let Some(slot) = sh.this_database() else {
        return TableIterator::once((
            false,
            None,
            Some(here),
            None,
            None,
            0,
            0,
            None,
            unserved_reason(sh),
        ));
    };
    let running = slot.worker_alive();
    let mut state = slot.text(Field::State);
    if unsafe { pg_sys::RecoveryInProgress() } {
        state = ON_STANDBY.into();
    } else if state.is_empty() {
        state = "starting".into();
    }
    let last_error = Some(slot.text(Field::LastError)).filter(|s| !s.is_empty());
    TableIterator::once((
        running,
        running.then(|| slot.worker_pid.load(Ordering::Acquire)),
        Some(here),
        ts(slot.started_at.load(Ordering::Relaxed)),
        ts(slot.last_heartbeat.load(Ordering::Relaxed)),
        slot.processed.load(Ordering::Relaxed) as i64,
        slot.failed.load(Ordering::Relaxed) as i64,
        last_error,
        state,
    ))
}

const ON_STANDBY: &str = "idle: this server is a hot standby; the worker starts on promotion";

/// Why no worker serves the current database.
fn unserved_reason(sh: &shmem::Shared) -> String {
    if unsafe { pg_sys::RecoveryInProgress() } {
        return ON_STANDBY.into();
    }
    if !sh.launcher_alive() {
        return "no worker: the memory_ext launcher is not running (see the server log)".into();
    }
    let named = settings::databases();
    let here = spi::current_database();
    if !named.is_empty() && !named.contains(&here) {
        return format!(
            "no worker: memory_ext.database ({}) does not include \"{here}\"",
            named.join(", ")
        );
    }
    let note = sh.launcher_note();
    let left_out = note
        .rsplit_once(crate::launcher::NOT_SERVING)
        .is_some_and(|(_, list)| list.split(", ").any(|d| d == here));
    if left_out {
        return format!("no worker: {note}");
    }
    "starting: the launcher starts a worker for this database in a moment".into()
}

/// The memory as one prompt-ready text block (`crate::context`), within `p_max_tokens` when
/// given: what `memory.context()` (`sql/api.sql`) returns when the worker's rendering does not
/// fit the budget or guidance is due. Pure: no SQL.
#[pg_extern(immutable, parallel_safe, name = "_render_context")]
fn render_context(
    p_confirmed: Option<pgrx::JsonB>,
    p_inferred: Option<pgrx::JsonB>,
    p_summary: Option<&str>,
    p_guidance: Option<&str>,
    p_max_tokens: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(context, String),
        name!(token_count, i32),
        name!(truncated, bool),
    ),
> {
    let memory = memory_of(p_confirmed, p_inferred, p_summary);
    let budget = p_max_tokens.map(|n| n.max(1) as usize);
    let r = crate::context::render(&memory, p_guidance, budget, tokens::count);
    TableIterator::once((
        r.text,
        i32::try_from(r.tokens).unwrap_or(i32::MAX),
        r.truncated,
    ))
}

/// A memory from its columns (a non-object fact column reads as no facts).
fn memory_of(
    confirmed: Option<pgrx::JsonB>,
    inferred: Option<pgrx::JsonB>,
    summary: Option<&str>,
) -> crate::model::Memory {
    let object = |j: Option<pgrx::JsonB>| {
        j.and_then(|j| match j.0 {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default()
    };
    crate::model::Memory {
        user_confirmed: object(confirmed),
        llm_inferred: object(inferred),
        general_summary: summary.unwrap_or_default().to_string(),
    }
}

/// A memory's `token_count` as the worker counts it (the record's compact JSON), for versions
/// made outside the worker (`memory.rollback()`).
#[pg_extern(immutable, parallel_safe, name = "_count_memory")]
fn count_memory(
    p_confirmed: Option<pgrx::JsonB>,
    p_inferred: Option<pgrx::JsonB>,
    p_summary: Option<&str>,
) -> i32 {
    let memory = memory_of(p_confirmed, p_inferred, p_summary);
    i32::try_from(tokens::count_memory(&memory)).unwrap_or(i32::MAX)
}

/// The most `count_tokens()` takes: tokenizing is not interruptible (about 20 ms per MB), so a
/// statement_timeout must not be outrun by one call.
const COUNT_TOKENS_MAX_BYTES: usize = 1024 * 1024;

/// Tokens in `text` under cl100k_base, the tokenizer behind `token_count`.
#[pg_extern(immutable, strict, parallel_safe)]
fn count_tokens(text: &str) -> i32 {
    if text.len() > COUNT_TOKENS_MAX_BYTES {
        ApiError::InvalidParameter(format!(
            "count_tokens() takes at most {COUNT_TOKENS_MAX_BYTES} bytes, got {}",
            text.len()
        ))
        .raise();
    }
    i32::try_from(tokens::count(text)).unwrap_or(i32::MAX)
}

/// `memory_ext.debounce` in milliseconds (0: off), for the SQL that marks chats due.
#[pg_extern(stable, parallel_safe, name = "_debounce_ms")]
fn debounce_ms() -> i32 {
    settings::DEBOUNCE_MS.get()
}

/// `memory_ext.owner_daily_tokens` (0: no limit), for the budget view.
#[pg_extern(stable, parallel_safe, name = "_owner_daily_tokens")]
fn owner_daily_tokens() -> i64 {
    settings::OWNER_DAILY_TOKENS.get().into()
}

/// `memory_ext.debounce_max` in milliseconds.
#[pg_extern(stable, parallel_safe, name = "_debounce_max_ms")]
fn debounce_max_ms() -> i32 {
    settings::DEBOUNCE_MAX_MS.get()
}

/// `memory_ext.max_snippet_bytes` as a number (`current_setting` would say "64kB").
#[pg_extern(stable, parallel_safe, name = "_max_snippet_bytes")]
fn max_snippet_bytes() -> i32 {
    settings::MAX_SNIPPET_BYTES.get()
}

// Settings that SQL functions need, read through the library. With the library loaded (which
// calling these does), a setting is the real, superuser-only GUC; `current_setting()` on an
// unloaded library would read a placeholder any role may SET, or fail with 42704.

/// `memory_ext.admin_role`: members of this role are admins.
#[pg_extern(stable, parallel_safe, name = "_admin_role")]
pub fn admin_role() -> String {
    settings::string(&settings::ADMIN_ROLE)
}

/// `memory_ext.audit_reads`: also audit get() and history().
#[pg_extern(stable, parallel_safe, name = "_audit_reads")]
pub fn audit_reads() -> bool {
    settings::AUDIT_READS.get()
}

/// `memory_ext.token_limit`, for get()'s guidance.
#[pg_extern(stable, parallel_safe, name = "_token_limit")]
pub fn token_limit() -> i32 {
    settings::TOKEN_LIMIT.get()
}

/// Is the current user (the definer inside SECURITY DEFINER functions) a superuser? The API's
/// functions and the worker are; an admin role writing the tables directly is not (see the
/// audit_direct_write triggers).
#[pg_extern(stable, parallel_safe, name = "_superuser")]
fn current_user_is_superuser() -> bool {
    unsafe { pg_sys::superuser() }
}
