//! memory_ext: short-term conversation memory for AI chat applications, inside PostgreSQL.
//!
//! Modules, one per concern:
//! - `settings`: the `memory_ext.*` GUCs;
//! - `shmem`: wake-at-commit, the applied-condition variable, worker health;
//! - `api`: SQL functions written in Rust (the rest of the API is `sql/api.sql`);
//! - `queue`: claiming and applying (wrappers over `sql/queue.sql`);
//! - `batch`: summarize → validate → merge → count tokens for claimed chats;
//! - `summarizer`: the trait and its implementations (`mock`, and `openai`/`anthropic` over
//!   `llm`, `http` and `contract`); `pipeline`: concurrent LLM requests for the worker;
//! - `merge`: the merge rules; `tokens`: BPE token counting;
//! - `rate_limit`: the per-identity enqueue limit (shared memory);
//! - `identity`: who is calling (`current_identity()`, `_is_admin()`); `chat_id`: the chat id
//!   check;
//! - `watch`: capture of rows inserted into an app's table (`sql/watch.sql`);
//! - `context`: the memory as prompt text; `ddl`: the utility hook (databases, extension);
//! - `launcher`: starts and restarts the worker; `worker`: the queue-draining background
//!   worker; `helper`: more backends draining a database's backlog beside its worker; `drain`:
//!   writing their results; `bgw`: what these processes share.

use pgrx::prelude::*;

pgrx::pg_module_magic!();

mod api;
mod batch;
mod bgw;
mod capture;
mod chat_id;
mod context;
mod ddl;
mod denials;
mod drain;
mod error;
mod helper;
mod identity;
mod launcher;
mod merge;
mod model;
mod pipeline;
mod queue;
mod rate_limit;
mod settings;
mod shmem;
mod spi;
mod summarizer;
mod tokens;
mod watch;
mod worker;

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/queue.sql", name = "queue");
// api.sql's SQL-language functions are checked at CREATE time: the settings they read through
// the library must exist first.
extension_sql_file!(
    "../sql/api.sql",
    name = "api",
    requires = [
        api::admin_role,
        api::audit_reads,
        api::token_limit,
        identity::current_identity,
        identity::is_admin,
        chat_id::chat_id_problem
    ]
);
extension_sql_file!(
    "../sql/watch.sql",
    name = "watch",
    requires = ["api", watch::trigger_args]
);
extension_sql_file!(
    "../sql/budget.sql",
    name = "budget",
    requires = ["api", api::owner_daily_tokens]
);
extension_sql_file!(
    "../sql/lifecycle.sql",
    name = "lifecycle",
    requires = ["api"]
);
// Grants, RLS and revokes: after every function (SQL and Rust) exists.
extension_sql_file!("../sql/security.sql", name = "security", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pgrx attaches a captured Rust backtrace to an error's DETAIL, which reaches the client,
    // whenever RUST_BACKTRACE / RUST_LIB_BACKTRACE is set in the server's environment. Clients
    // must never see one: RUST_LIB_BACKTRACE=0 turns capturing off (panic messages in the server
    // log are unaffected). Safe here: _PG_init runs before this process starts any thread.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    settings::init(preloading);
    // Without preloading, the SQL API still works; worker_status() explains why no worker runs.
    if preloading {
        shmem::init();
        ddl::init();
        // pg_upgrade starts both servers in binary-upgrade mode: nothing may write then.
        if !unsafe { pg_sys::IsBinaryUpgrade } {
            launcher::register();
        }
    }
}

// The pg_tests, by area. One module (pgrx creates its functions in schema `tests`), its files
// beside each other in src/tests/.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests/helpers.rs");
    include!("tests/identity.rs");
    include!("tests/api.rs");
    include!("tests/summarizing.rs");
    include!("tests/settings.rs");
    include!("tests/watch.rs");
    include!("tests/lifecycle.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The worker serves another database, so in-transaction tests see a quiet queue.
        vec![
            "shared_preload_libraries = 'memory_ext'",
            "memory_ext.database = 'postgres'",
            // the tests drive failures through the mock's directives
            "memory_ext.mock_directives = on",
        ]
    }
}
