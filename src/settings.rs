//! The `memory_ext.*` settings. Read them on the main thread only (pgrx enforces it).
//!
//! Settings that change what the worker does or what a caller may store are `SUSET`: an
//! application role must not be able to raise its own snippet limit or pick the summarizer.

use crate::model::{LlmConfig, StructuredOutput};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use thiserror::Error;

/// A setting that cannot be used as it is. The message names the setting, never a key.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("memory_ext.llm_api_key: cannot read key file: {0}")]
    KeyFile(std::io::Error),
    #[error("memory_ext.llm_api_key: environment variable {0} is not set")]
    KeyEnv(String),
}
use std::ffi::CString;
use std::time::Duration;

pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static WORKERS_PER_DATABASE: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static INSTRUCTIONS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The longest `memory_ext.instructions` (bytes): it is sent with every request.
pub const MAX_INSTRUCTIONS_BYTES: usize = 4000;
pub static SUMMARIZER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"mock"));
pub static MAX_SNIPPET_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static TOKEN_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(8000);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
pub static DEBOUNCE_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static DEBOUNCE_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static LEASE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static KEEP_APPLIED_SNIPPETS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static OWNER_DAILY_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static BATCH_CHATS: GucSetting<i32> = GucSetting::<i32>::new(200);
pub static BATCH_SNIPPETS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static IDLE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static MAX_WAIT_S: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static MAX_FACTS: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static HISTORY_VERSIONS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static LLM_ENDPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LLM_MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LLM_API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static LLM_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static LLM_MAX_OUTPUT_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(2048);
pub static LLM_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static ADMIN_ROLE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"service_role"));
pub static RATE_LIMIT_PER_MINUTE: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static AUDIT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 3600);
pub static AUDIT_READS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static MOCK_DIRECTIVES: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static LLM_STRUCTURED_OUTPUT: GucSetting<StructuredOutputSetting> =
    GucSetting::<StructuredOutputSetting>::new(StructuredOutputSetting::JsonSchema);

pub fn init(preloading: bool) {
    // They matter only to the launcher and its workers, which exist only when preloading.
    if preloading {
        GucRegistry::define_string_guc(
            c"memory_ext.database",
            c"Databases the memory_ext workers serve (comma-separated; empty: every database \
              with the extension).",
            c"Empty (the default): one worker for every database in which memory_ext is \
              installed, started at CREATE EXTENSION. A list: those databases only, each waited \
              for until it exists and has the extension.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
        );
        GucRegistry::define_int_guc(
            c"memory_ext.max_workers",
            c"Databases served at once, at most (one background worker each).",
            c"Each worker takes one of max_worker_processes; databases beyond the cap are \
              not served, and worker_status() there says so.",
            &MAX_WORKERS,
            1,
            crate::shmem::MAX_SLOTS as i32,
            GucContext::Sighup,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"memory_ext.workers_per_database",
            c"Backends that claim and apply for one database while it has a backlog.",
            c"The worker starts helpers up to this many backends in all when a claim finds more \
              work than one batch, for summarizers that run in the backend (the mock); each \
              helper leaves after a second with nothing to claim.",
            &WORKERS_PER_DATABASE,
            1,
            crate::shmem::MAX_HELPERS as i32 + 1,
            GucContext::Sighup,
            GucFlags::default(),
        );
    }
    GucRegistry::define_string_guc(
        c"memory_ext.summarizer",
        c"Summarizer that merges snippets into memory: mock, openai or anthropic.",
        c"mock is deterministic and needs no network; openai speaks the OpenAI-compatible \
          chat completions format (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM); anthropic the \
          Messages API.",
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
        c"memory_ext.debounce",
        c"A chat's pending snippets wait until the chat has been quiet this long (0: off).",
        c"A burst of turns becomes one summarization; memory_ext.debounce_max bounds the wait.",
        &DEBOUNCE_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.debounce_max",
        c"With memory_ext.debounce, the longest a chat's oldest pending snippet waits.",
        c"",
        &DEBOUNCE_MAX_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
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
    GucRegistry::define_bool_guc(
        c"memory_ext.keep_applied_snippets",
        c"Keep applied snippets while their chat exists, so its memory can be re-derived.",
        c"memory.rebuild() and memory.forget_snippet() need them; off: memory_ext.retention \
          deletes them.",
        &KEEP_APPLIED_SNIPPETS,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.owner_daily_tokens",
        c"LLM tokens an owner's chats may use per UTC day before they are deferred (0: no limit).",
        c"memory.set_owner_budget() sets one owner's own budget.",
        &OWNER_DAILY_TOKENS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.retention",
        c"Age after which complete queue rows are deleted (with keep_applied_snippets off).",
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
    // Test hooks that make the mock fail, panic or sleep: off, so no caller's snippet can stall
    // the worker; superuser-only, so only a test or demo setup turns them on.
    GucRegistry::define_bool_guc(
        c"memory_ext.mock_directives",
        c"Honour the mock summarizer's test directives (mock_error, mock_fatal, mock_panic, mock_sleep_ms).",
        c"Off: those lines are plain text. For tests only.",
        &MOCK_DIRECTIVES,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.max_facts",
        c"Most facts (confirmed and inferred together) one chat's memory holds.",
        c"At the bound new keys are refused (counted in rejected_ops); existing keys still change.",
        &MAX_FACTS,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.history_versions",
        c"Memory versions kept per chat in memory.chat_memory_history (0: all).",
        c"Older versions are deleted as new ones are applied.",
        &HISTORY_VERSIONS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.max_wait",
        c"Longest timeout memory.wait() accepts.",
        c"A waiting call holds its connection; larger timeouts are refused.",
        &MAX_WAIT_S,
        0,
        24 * 3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
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
    // Where the worker sends snippets and with which credentials: superuser only, so no
    // application role can point the worker at an internal address or read the key.
    GucRegistry::define_string_guc(
        c"memory_ext.llm_endpoint",
        c"Base URL of the LLM API, e.g. https://api.openai.com/v1 or https://api.anthropic.com.",
        c"openai posts to {endpoint}/chat/completions, anthropic to {endpoint}/v1/messages.",
        &LLM_ENDPOINT,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"memory_ext.llm_model",
        c"Model name sent with every LLM request.",
        c"",
        &LLM_MODEL,
        GucContext::Suset,
        GucFlags::empty(),
    );
    // SAFETY: the hook cannot panic (pg_guard'ed all the same) and only reads its arguments.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"memory_ext.llm_api_key",
            c"API key for the LLM endpoint, or file:/path or env:NAME to read it from there.",
            c"Prefer file: or env:: a literal key set in postgresql.conf is printed by the \
              postmaster's own 'parameter changed' message on reload.",
            &LLM_API_KEY,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_api_key),
            None,
            None,
        );
    }
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"memory_ext.instructions",
            c"Deployment-specific guidance added to the LLM summarizers' system prompt.",
            c"E.g. the assistant's domain, what matters to remember, the language facts are kept \
              in. At most 4000 bytes; the rules of the prompt (what may be confirmed) stay.",
            &INSTRUCTIONS,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_instructions),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"memory_ext.llm_timeout_ms",
        c"Time limit of one LLM request, connecting included.",
        c"",
        &LLM_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"memory_ext.llm_max_output_tokens",
        c"Output token limit sent with each LLM request (0 sends none).",
        c"",
        &LLM_MAX_OUTPUT_TOKENS,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.llm_concurrency",
        c"LLM requests the worker keeps in flight at once (different chats).",
        c"",
        &LLM_CONCURRENCY,
        1,
        256,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"memory_ext.llm_structured_output",
        c"How openai asks for JSON: json_schema (strict), json_object, or none (prompt only).",
        c"Use json_object or none for servers without JSON-schema support.",
        &LLM_STRUCTURED_OUTPUT,
        GucContext::Suset,
        GucFlags::empty(),
    );
    // Security (sql/security.sql): who is an admin, how fast an identity may enqueue, what is
    // audited and for how long. All superuser-only: an application role must not widen them.
    GucRegistry::define_string_guc(
        c"memory_ext.admin_role",
        c"Members of this role (when it exists) may act on every chat.",
        c"Supabase's service_role by default; superusers, the extension owner and roles given \
          memory.grant_admin() are admins too.",
        &ADMIN_ROLE,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.rate_limit_per_minute",
        c"Snippets one identity may enqueue per minute (0 = no limit).",
        c"A token bucket per identity in shared memory: bursts up to the limit, refilled evenly.",
        &RATE_LIMIT_PER_MINUTE,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"memory_ext.audit_retention",
        c"Age after which memory.audit_log rows are deleted.",
        c"",
        &AUDIT_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"memory_ext.audit_reads",
        c"Whether get() and history() calls are written to memory.audit_log.",
        c"Writes are always audited.",
        &AUDIT_READS,
        GucContext::Suset,
        GucFlags::empty(),
    );
    // Unknown memory_ext.* names are typos: make SET refuse them.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"memory_ext".as_ptr()) };
}

/// The databases `memory_ext.database` names; empty: serve every database with the extension.
pub fn databases() -> Vec<String> {
    parse_database_list(&string(&DATABASE))
}

pub fn parse_database_list(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
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
    pub max_facts: i32,
    pub history_versions: i32,
    /// Not a setting: the declared keys (`memory.fact_keys`), filled in by the caller.
    pub fact_keys: crate::model::FactKeys,
}

impl QueuePolicy {
    /// The bounds a merged memory must keep.
    pub fn bounds(&self) -> crate::model::Bounds {
        crate::model::Bounds {
            token_limit: self.token_limit,
            max_facts: self.max_facts.max(1) as usize,
            fact_keys: self.fact_keys.clone(),
        }
    }

    pub fn current() -> Self {
        Self {
            batch_chats: BATCH_CHATS.get(),
            batch_snippets: BATCH_SNIPPETS.get(),
            lease_seconds: LEASE_TIMEOUT_S.get(),
            max_attempts: MAX_ATTEMPTS.get(),
            backoff_base_ms: BACKOFF_BASE_MS.get(),
            backoff_max_ms: BACKOFF_MAX_MS.get(),
            token_limit: TOKEN_LIMIT.get(),
            max_facts: MAX_FACTS.get(),
            history_versions: HISTORY_VERSIONS.get(),
            fact_keys: crate::model::FactKeys::none(),
        }
    }
}

pub fn idle_timeout() -> Duration {
    Duration::from_secs(IDLE_TIMEOUT_S.get().max(1) as u64)
}

pub fn max_wait() -> Duration {
    Duration::from_secs(MAX_WAIT_S.get().max(0) as u64)
}

/// `memory_ext.llm_structured_output` (the GUC's own enum; the summarizers get
/// `model::StructuredOutput`).
#[derive(PostgresGucEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructuredOutputSetting {
    #[name = c"json_schema"]
    JsonSchema,
    #[name = c"json_object"]
    JsonObject,
    #[name = c"none"]
    None,
}

/// Reading the summarizer settings (main thread only).
pub trait FromSettings: Sized {
    fn current() -> Result<Self, SettingsError>;
}

impl FromSettings for LlmConfig {
    /// Read the settings (main thread only). A key that cannot be resolved is an error message
    /// that names the setting, never the key; the mock needs no key, so it is not read then.
    fn current() -> Result<Self, SettingsError> {
        let summarizer = string(&SUMMARIZER);
        let api_key = if summarizer.trim().eq_ignore_ascii_case("mock") {
            String::new()
        } else {
            resolve_key(&string(&LLM_API_KEY))?
        };
        Ok(Self {
            summarizer,
            endpoint: string(&LLM_ENDPOINT)
                .trim()
                .trim_end_matches('/')
                .to_string(),
            model: string(&LLM_MODEL).trim().to_string(),
            api_key,
            timeout: Duration::from_millis(LLM_TIMEOUT_MS.get().max(1) as u64),
            max_output_tokens: LLM_MAX_OUTPUT_TOKENS.get().max(0) as u32,
            structured_output: match LLM_STRUCTURED_OUTPUT.get() {
                StructuredOutputSetting::JsonSchema => StructuredOutput::JsonSchema,
                StructuredOutputSetting::JsonObject => StructuredOutput::JsonObject,
                StructuredOutputSetting::None => StructuredOutput::None,
            },
            mock_directives: MOCK_DIRECTIVES.get(),
            instructions: string(&INSTRUCTIONS).trim().to_string(),
            // filled in by the caller, from memory.fact_keys
            fact_keys: crate::model::FactKeys::none(),
        })
    }
}

/// Is this a key itself, rather than where to read one (`file:`, `env:`) or nothing?
fn is_literal_key(raw: &str) -> bool {
    let raw = raw.trim();
    !(raw.is_empty() || raw.starts_with("file:") || raw.starts_with("env:"))
}

/// Refuse instructions longer than [`MAX_INSTRUCTIONS_BYTES`] when they are set.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_instructions(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    let len = unsafe { newval.as_ref().filter(|p| !p.is_null()) }.map_or(0, |p| {
        unsafe { std::ffi::CStr::from_ptr(*p) }.to_bytes().len()
    });
    if len > MAX_INSTRUCTIONS_BYTES {
        unsafe {
            pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(
                c"memory_ext.instructions is sent with every LLM request: at most 4000 bytes."
                    .as_ptr(),
            );
        }
        return false;
    }
    true
}

/// Refuse a literal key set with `ALTER DATABASE`/`ALTER ROLE ... SET` (validated with source
/// PGC_S_TEST, applied at connection with the database/role sources): those values are stored in
/// `pg_db_role_setting`, which every role can read. `ALTER SYSTEM` and postgresql.conf are not
/// readable by other roles; `file:`/`env:` are fine everywhere.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_api_key(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    use pgrx::pg_sys::GucSource;
    let from_catalog = matches!(
        source,
        GucSource::PGC_S_TEST
            | GucSource::PGC_S_DATABASE
            | GucSource::PGC_S_USER
            | GucSource::PGC_S_DATABASE_USER
    );
    let value = unsafe { newval.as_ref().filter(|p| !p.is_null()) }
        .map(|p| {
            unsafe { std::ffi::CStr::from_ptr(*p) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if from_catalog && is_literal_key(&value) {
        unsafe {
            pgrx::pg_sys::GUC_check_errmsg_string = pgrx::pg_sys::pstrdup(
                c"a literal memory_ext.llm_api_key set with ALTER DATABASE or ALTER ROLE would be \
                  readable by every role (pg_db_role_setting)"
                    .as_ptr(),
            );
            pgrx::pg_sys::GUC_check_errhint_string = pgrx::pg_sys::pstrdup(
                c"Use ALTER SYSTEM SET memory_ext.llm_api_key = 'file:/path/to/key' (or 'env:NAME')."
                    .as_ptr(),
            );
        }
        return false;
    }
    true
}

/// `file:/path` reads the key from a file (trimmed), `env:NAME` from the server's environment,
/// anything else is the key itself.
pub fn resolve_key(raw: &str) -> Result<String, SettingsError> {
    let raw = raw.trim();
    if let Some(path) = raw.strip_prefix("file:") {
        std::fs::read_to_string(path.trim())
            .map(|k| k.trim().to_string())
            .map_err(SettingsError::KeyFile)
    } else if let Some(name) = raw.strip_prefix("env:") {
        std::env::var(name.trim())
            .map(|k| k.trim().to_string())
            .map_err(|_| SettingsError::KeyEnv(name.trim().to_string()))
    } else {
        Ok(raw.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_database_list, resolve_key};

    #[test]
    fn database_lists() {
        assert!(parse_database_list("").is_empty(), "empty: every database");
        assert!(parse_database_list(" , ").is_empty());
        assert_eq!(parse_database_list("app"), ["app"]);
        assert_eq!(parse_database_list(" app , staging,"), ["app", "staging"]);
    }

    #[test]
    fn key_indirection() {
        let dir = std::env::temp_dir().join(format!("memory_ext_key_{}", std::process::id()));
        std::fs::write(&dir, "  sk-from-file\n").unwrap();
        let path = dir.display().to_string();
        let path_env = std::env::var("PATH").unwrap();
        // (setting, resolved key or the start of the error)
        let cases = [
            ("sk-literal", Ok("sk-literal".to_string())),
            ("", Ok(String::new())),
            (&*format!("file:{path}"), Ok("sk-from-file".to_string())),
            (
                "file:/no/such/file",
                Err("memory_ext.llm_api_key: cannot read key file"),
            ),
            ("env:PATH", Ok(path_env)),
            (
                "env:MEMORY_EXT_NO_SUCH_VARIABLE",
                Err("memory_ext.llm_api_key: environment variable MEMORY_EXT_NO_SUCH_VARIABLE"),
            ),
        ];
        for (raw, expected) in cases {
            match (resolve_key(raw), expected) {
                (Ok(k), Ok(e)) => assert_eq!(k, e, "{raw}"),
                (Err(m), Err(e)) => assert!(m.to_string().starts_with(e), "{raw}: {m}"),
                (got, e) => panic!("{raw}: got {got:?}, expected {e:?}"),
            }
        }
        std::fs::remove_file(dir).unwrap();
    }
}
