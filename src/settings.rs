//! The `memory_ext.*` settings. Read them on the main thread only (pgrx enforces it).
//!
//! Settings that change what the worker does or what a caller may store are `SUSET`: an
//! application role must not be able to raise its own snippet limit or pick the summarizer.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static SUMMARIZER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"mock"));
pub static MAX_SNIPPET_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static TOKEN_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(8000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
pub static LEASE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static BATCH_CHATS: GucSetting<i32> = GucSetting::<i32>::new(200);
pub static BATCH_SNIPPETS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static IDLE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(60);

pub fn init(preloading: bool) {
    // A postmaster-context setting can only be defined at server start; it matters only to the
    // worker, which exists only when the library is preloaded.
    if preloading {
        GucRegistry::define_string_guc(
            c"memory_ext.database",
            c"Database the memory_ext background worker serves.",
            c"The worker waits until this database exists and has the extension. Needs a restart.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::SUPERUSER_ONLY,
        );
    }
    GucRegistry::define_string_guc(
        c"memory_ext.summarizer",
        c"Summarizer that merges snippets into memory: mock.",
        c"mock is deterministic and needs no network; see the README for its contract.",
        &SUMMARIZER,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.max_snippet_bytes",
        c"Largest snippet enqueue() accepts, in bytes.",
        c"",
        &MAX_SNIPPET_BYTES,
        1,
        64 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.token_limit",
        c"Token count of a chat's memory above which get() advises a new chat.",
        c"",
        &TOKEN_LIMIT,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.max_attempts",
        c"Summarization attempts for a snippet before it is marked failed.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.backoff_base_ms",
        c"First retry delay after a failed summarization; doubles per attempt, with jitter.",
        c"",
        &BACKOFF_BASE_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.backoff_max_ms",
        c"Cap on the retry delay.",
        c"",
        &BACKOFF_MAX_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.lease_timeout",
        c"How long a claimed chat stays leased before another claimant may take it over.",
        c"Must exceed the longest summarization; an expired lease counts as a failed attempt.",
        &LEASE_TIMEOUT_S,
        1,
        24 * 3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.retention",
        c"Age after which complete queue rows are deleted.",
        c"",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.batch_chats",
        c"Chats claimed per worker iteration.",
        c"",
        &BATCH_CHATS,
        1,
        10_000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.batch_snippets",
        c"Snippets of one chat merged in one summarization.",
        c"",
        &BATCH_SNIPPETS,
        1,
        10_000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.idle_timeout",
        c"Safety wake-up interval of the idle worker (it is normally woken at commit).",
        c"",
        &IDLE_TIMEOUT_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // Unknown memory_ext.* names are typos: make SET refuse them.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"memory_ext".as_ptr()) };
}

pub fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The policy values the queue functions need, read once per batch.
#[derive(Clone, Debug)]
pub struct QueuePolicy {
    pub batch_chats: i32,
    pub batch_snippets: i32,
    pub lease_seconds: i32,
    pub max_attempts: i32,
    pub backoff_base_ms: i32,
    pub backoff_max_ms: i32,
    pub token_limit: i32,
}

impl QueuePolicy {
    pub fn current() -> Self {
        Self {
            batch_chats: BATCH_CHATS.get(),
            batch_snippets: BATCH_SNIPPETS.get(),
            lease_seconds: LEASE_TIMEOUT_S.get(),
            max_attempts: MAX_ATTEMPTS.get(),
            backoff_base_ms: BACKOFF_BASE_MS.get(),
            backoff_max_ms: BACKOFF_MAX_MS.get(),
            token_limit: TOKEN_LIMIT.get(),
        }
    }
}

pub fn idle_timeout() -> Duration {
    Duration::from_secs(IDLE_TIMEOUT_S.get().max(1) as u64)
}
