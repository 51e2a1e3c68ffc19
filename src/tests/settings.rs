// Settings, secrets and the health check.

#[pg_test]
fn worker_status_explains_itself() {
    assert_eq!(count("SELECT 1 FROM memory.worker_status()"), 1);
    let state = text("SELECT state FROM memory.worker_status()");
    assert!(
        state.contains("memory_ext.database (postgres) does not include"),
        "{state}"
    );
}

/// A literal key in ALTER DATABASE / ALTER ROLE settings would be readable by every role in
/// pg_db_role_setting: refused, with a hint; file:/env: forms are fine.
#[pg_test]
fn a_literal_key_is_refused_in_database_and_role_settings() {
    let database = format!("DATABASE {}", text("SELECT quote_ident(current_database())"));
    for target in [database.as_str(), "ROLE CURRENT_USER"] {
        let e = error_of(&format!("ALTER {target} SET memory_ext.llm_api_key = 'sk-literal-1234'"));
        assert!(
            e.starts_with("22023: ") && e.contains("readable by every role"),
            "{target}: {e}"
        );
        assert_eq!(
            sqlstate(&format!("ALTER {target} SET memory_ext.llm_api_key = 'file:/etc/memory/key'")),
            "ok",
            "{target}"
        );
    }
    assert_eq!(
        count("SELECT 1 FROM pg_db_role_setting, unnest(setconfig) c WHERE c LIKE '%sk-literal%'"),
        0
    );
    // a session may still set one for itself (superuser only)
    assert_eq!(sqlstate("SET LOCAL memory_ext.llm_api_key = 'sk-literal-1234'"), "ok");
}

#[pg_test]
fn tables_are_dumped_and_settings_guarded() {
    assert_eq!(
        text("SELECT string_agg(c::regclass::text, ',' ORDER BY c::regclass::text) \
              FROM pg_extension, unnest(extconfig) c WHERE extname = 'memory_ext'"),
        "memory.admin_roles,memory.audit_log,memory.capture_inbox,memory.chat_context_queue,\
         memory.chat_context_queue_seq,memory.chat_memory_history,memory.chat_metadata,\
         memory.fact_keys,memory.llm_usage_daily,memory.owner_budgets,memory.owner_usage_daily"
    );
    assert_eq!(sqlstate("SET memory_ext.no_such_setting = 1"), "42602");
    run("SET LOCAL memory_ext.llm_api_key = 'sk-test-secret-4242'");
    // SHOW ALL never lists the key, not even for a superuser.
    assert_eq!(count("SELECT 1 FROM pg_settings WHERE setting LIKE '%sk-test-secret%'"), 0);
    become_app_role();
    for s in [
        "summarizer = 'mock'",
        "max_snippet_bytes = 1000000",
        "token_limit = 1",
        "llm_endpoint = 'http://169.254.169.254'",
        "llm_api_key = 'mine'",
        "llm_model = 'x'",
        "llm_concurrency = 100",
        "llm_timeout_ms = 1000",
        "llm_structured_output = 'none'",
    ] {
        assert_eq!(sqlstate(&format!("SET memory_ext.{s}")), "42501", "{s}");
    }
    // An application role can neither read the key nor see the endpoint.
    assert_eq!(sqlstate("SHOW memory_ext.llm_api_key"), "42501");
    assert_eq!(sqlstate("SELECT current_setting('memory_ext.llm_api_key')"), "42501");
    assert_eq!(sqlstate("SHOW memory_ext.llm_endpoint"), "42501");
    assert_eq!(
        count("SELECT 1 FROM pg_settings WHERE name IN ('memory_ext.llm_api_key', 'memory_ext.llm_endpoint')"),
        0
    );
}
