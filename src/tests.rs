// In-transaction tests of every SQL function, bad input included. They run inside a transaction
// that is rolled back, so the worker never sees these rows: work is driven with
// `memory.process_pending()`. Worker behaviour is tested against a real cluster in
// `tests/cluster`.

use pgrx::prelude::*;

fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn text(sql: &str) -> String {
    one::<String>(sql).unwrap_or_default()
}

fn count(sql: &str) -> i64 {
    one::<i64>(&format!("SELECT count(*) FROM ({sql}) x")).unwrap()
}

/// "SQLSTATE: message" of the error `sql` raises ("ok" if it succeeds), in a subtransaction.
fn error_of(sql: &str) -> String {
    if one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NULL").unwrap() {
        run("CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS \
             $$ BEGIN EXECUTE q; RETURN 'ok'; \
                EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$");
    }
    one::<String>(&format!(
        "SELECT pg_temp.error_of({})",
        pgrx::spi::quote_literal(sql)
    ))
    .unwrap()
}

/// The SQLSTATE `sql` fails with ("ok" if it succeeds). Runs in a subtransaction, like a client
/// statement: a failed call must leave nothing behind, which the callers then check.
fn sqlstate(sql: &str) -> String {
    let e = error_of(sql);
    if e == "ok" { e } else { e[..5].to_string() }
}

/// Act as another identity, the way PostgREST does.
fn as_user(sub: &str) {
    run(&format!(
        "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{sub}\"}}', true)"
    ));
}

/// A non-superuser role allowed to call the API, so ownership checks apply to it.
fn become_app_role() {
    run("CREATE ROLE memory_test_app");
    run("SELECT memory.grant_usage('memory_test_app')");
    run("SET LOCAL ROLE memory_test_app");
}

#[pg_test]
fn current_identity_prefers_jwt_sub() {
    // Two namespaces that never collide: a JWT sub as it is, a role as `role:<name>`.
    let me = Some(format!("role:{}", text("SELECT current_user::text")));
    let cases = [
        (None, me.clone()),
        (Some(""), me.clone()),
        (Some(r#"{"role": "authenticated"}"#), me.clone()),
        (Some(r#"{"sub": ""}"#), me.clone()),
        (Some(r#"{"sub": null}"#), me.clone()),
        (Some(r#"{"sub": "  "}"#), me.clone()),
        (Some(r#"{"sub": "user-123", "role": "authenticated"}"#), Some("user-123".to_string())),
        (Some(r#"{"sub": "role:postgres"}"#), None),
    ];
    for (claims, expected) in cases {
        if let Some(c) = claims {
            run(&format!("SELECT set_config('request.jwt.claims', '{c}', true)"));
        }
        assert_eq!(one::<String>("SELECT memory.current_identity()"), expected, "{claims:?}");
    }
}

/// A JWT without a usable sub must not act as its role (every such user would share one
/// identity), and a sub may not pose as a role: both get 42501 and create nothing. Admins
/// (a backend with the service role and no sub) act as their role.
#[pg_test]
fn a_jwt_without_a_usable_sub_cannot_own_chats() {
    become_app_role();
    for claims in [r#"{"role": "authenticated"}"#, r#"{"sub": ""}"#, r#"{"sub": "role:memory_test_app"}"#] {
        run(&format!("SELECT set_config('request.jwt.claims', '{claims}', true)"));
        for f in ["SELECT memory.create_chat('c1')", "SELECT 1 FROM memory.enqueue('c1', 'x')"] {
            assert_eq!(sqlstate(f), "42501", "{claims} {f}");
        }
    }
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 0, "nothing created");
    run(r#"SELECT set_config('request.jwt.claims', '{"role": "service_role"}', true)"#);
    run("SELECT memory.create_chat('c2')");
    assert_eq!(
        text("SELECT owner FROM memory.chat_metadata WHERE chat_id = 'c2'"),
        format!("role:{}", text("SELECT current_user::text")),
        "an admin without a sub acts as its role"
    );
}

#[pg_test]
fn create_chat_is_idempotent_per_owner() {
    as_user("alice");
    assert_eq!(text("SELECT memory.create_chat('c1')"), "c1");
    assert_eq!(text("SELECT memory.create_chat('c1')"), "c1");
    assert_eq!(text("SELECT owner FROM memory.chat_metadata WHERE chat_id = 'c1'"), "alice");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT memory.create_chat('c1')"), "42501");
    // the application role has no table privileges at all
    assert_eq!(sqlstate("SELECT 1 FROM memory.chat_metadata"), "42501");
    run("RESET ROLE");
    assert_eq!(text("SELECT owner FROM memory.chat_metadata WHERE chat_id = 'c1'"), "alice");
}

#[pg_test]
fn create_chat_rejects_bad_ids() {
    for bad in ["NULL", "''", "'   '", &format!("'{}'", "x".repeat(257))] {
        assert_eq!(sqlstate(&format!("SELECT memory.create_chat({bad})")), "22023", "{bad}");
    }
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 0);
}

#[pg_test]
fn enqueue_accepts_and_creates_the_chat() {
    as_user("alice");
    run("SET LOCAL memory_ext.max_snippet_bytes = 100");
    let status = text("SELECT status FROM memory.enqueue('c1', 'hello', 'webhook')");
    assert_eq!(status, "pending_summarization");
    assert_eq!(text("SELECT owner FROM memory.chat_metadata WHERE chat_id = 'c1'"), "alice");
    assert_eq!(
        text("SELECT trigger_source || '/' || enqueued_by || '/' || retry_count \
              FROM memory.chat_context_queue"),
        "webhook/alice/0"
    );
    // exactly max_snippet_bytes is accepted (multi-byte characters count as bytes)
    assert_eq!(sqlstate(&format!("SELECT memory.enqueue('c1', '{}')", "é".repeat(50))), "ok");
}

#[pg_test]
fn enqueue_rejects_bad_input_and_leaves_nothing() {
    run("SET LOCAL memory_ext.max_snippet_bytes = 100");
    let cases = [
        ("NULL", "22023"),
        ("''", "22023"),
        ("E' \\n\\t '", "22023"),
        (&format!("'{}'", "a".repeat(101)), "22023"),
        (&format!("'{}'", "é".repeat(51)), "22023"),
    ];
    for (snippet, state) in cases {
        assert_eq!(sqlstate(&format!("SELECT memory.enqueue('new', {snippet})")), state, "{snippet}");
    }
    assert_eq!(sqlstate("SELECT memory.enqueue(NULL, 'x')"), "22023");
    assert_eq!(sqlstate("SELECT memory.enqueue('new', 'x', '')"), "22023");
    assert_eq!(sqlstate("SELECT memory.enqueue('new', 'x', NULL)"), "22023");
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 0, "no chat created by a rejected call");
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 0);
}

#[pg_test]
fn enqueue_into_someone_elses_chat_is_refused() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', 'mine')");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT memory.enqueue('c1', 'not mine')"), "42501");
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 1);
}

#[pg_test]
fn get_returns_the_empty_record_then_the_memory() {
    as_user("alice");
    run("SELECT memory.create_chat('c1')");
    let (version, pending) = (
        one::<i64>("SELECT version FROM memory.get('c1')").unwrap(),
        one::<i32>("SELECT pending FROM memory.get('c1')").unwrap(),
    );
    assert_eq!((version, pending), (0, 0));
    assert_eq!(text("SELECT user_confirmed::text || llm_inferred::text || general_summary FROM memory.get('c1')"), "{}{}");
    run("SELECT memory.enqueue('c1', E'confirmed: plan = PPO\\ninferred: budget = low\\nwants a cheap plan')");
    assert_eq!(one::<i32>("SELECT pending FROM memory.get('c1')"), Some(1));
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
    assert_eq!(
        text("SELECT format('%s|%s|%s|%s|%s', user_confirmed, llm_inferred, general_summary, version, pending) FROM memory.get('c1')"),
        r#"{"plan": "PPO"}|{"budget": "low"}|wants a cheap plan|1|0"#
    );
    assert_eq!(one::<bool>("SELECT needs_new_chat FROM memory.get('c1')"), Some(false));
    assert_eq!(one::<String>("SELECT guidance FROM memory.get('c1')"), None);
}

#[pg_test]
fn get_errors() {
    as_user("alice");
    run("SELECT memory.create_chat('c1')");
    assert_eq!(sqlstate("SELECT * FROM memory.get('nope')"), "P0002");
    assert_eq!(sqlstate("SELECT * FROM memory.get(NULL)"), "22023");
    assert_eq!(sqlstate(&format!("SELECT * FROM memory.get('{}')", "x".repeat(257))), "22023");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT * FROM memory.get('c1')"), "P0002", "reads as missing");
}

/// Chat ids that look alike are not distinct ids: control and invisible characters, surrounding
/// whitespace and non-NFC forms are refused by every function, and nothing is created.
#[pg_test]
fn chat_ids_that_only_look_alike_are_refused() {
    let bad = [
        ("E'\\t'", "control or invisible"),
        ("E'a\\tb'", "control or invisible"),
        ("E'chat\\u200b'", "control or invisible"),
        ("E'\\ufeffchat'", "control or invisible"),
        ("' chat'", "start or end with whitespace"),
        ("'chat '", "start or end with whitespace"),
        ("E'cafe\\u0301'", "normalization form NFC"),
    ];
    for (id, message) in bad {
        for f in ["SELECT memory.create_chat({})", "SELECT 1 FROM memory.enqueue({}, 'x')",
                  "SELECT 1 FROM memory.get({})", "SELECT memory.forget({})"] {
            let e = error_of(&f.replace("{}", id));
            assert!(e.starts_with("22023: chat_id ") && e.contains(message), "{f} {id}: {e}");
        }
    }
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 0, "nothing created");
    // the NFC form of the same id is fine
    run("SELECT memory.create_chat(E'caf\\u00e9')");
    assert_eq!(sqlstate("SELECT memory.create_chat('chat-42 with inner spaces')"), "ok");
}

/// Calls that hold a connection or a CPU are bounded, with clear errors.
#[pg_test]
fn wait_and_count_tokens_are_bounded() {
    let id = text("SELECT queue_id::text FROM memory.enqueue('c1', 'x')");
    run("SELECT memory.process_pending()");
    let e = error_of(&format!("SELECT memory.wait('{id}', '100000000 days')"));
    assert!(e.starts_with("22023: ") && e.contains("memory_ext.max_wait (300 s)"), "{e}");
    assert_eq!(sqlstate(&format!("SELECT memory.wait('{id}', '5 minutes')")), "ok");
    let e = error_of("SELECT memory.count_tokens(repeat('a', 1048577))");
    assert!(e.starts_with("22023: count_tokens() takes at most 1048576 bytes"), "{e}");
    assert!(one::<i32>("SELECT memory.count_tokens(repeat('a ', 524288))").unwrap() > 0);
}

/// get() of another owner's chat answers before it reads the chat's queue rows: its time cannot
/// tell how long another user's backlog is. (Counted with this transaction's own scan counters.)
#[pg_test]
fn get_of_another_owners_chat_reads_no_queue_rows() {
    as_user("alice");
    for i in 0..50 {
        run(&format!("SELECT memory.enqueue('busy', 'line {i}')"));
    }
    let scans = "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)), 0)::bigint \
                 FROM pg_stat_xact_user_tables WHERE relname = 'chat_context_queue'";
    let before = one::<i64>(scans).unwrap();
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT pending FROM memory.get('busy')"), "P0002");
    run("RESET ROLE");
    assert_eq!(one::<i64>(scans).unwrap(), before, "the queue was not read");
    // the owner's own get() does read it (the counter works)
    as_user("alice");
    assert_eq!(one::<i32>("SELECT pending FROM memory.get('busy')"), Some(50));
    assert!(one::<i64>(scans).unwrap() > before);
}

/// A caller who does not own a chat (or queue row) gets exactly the error of one that does not
/// exist, from every function that takes an id: no way to enumerate other users' chats.
#[pg_test]
fn no_existence_oracle() {
    as_user("alice");
    let id = text("SELECT queue_id::text FROM memory.enqueue('secret', 'x')");
    become_app_role();
    as_user("bob");
    let missing = "00000000-0000-0000-0000-000000000000";
    for f in ["SELECT * FROM memory.get('{}')", "SELECT * FROM memory.history('{}')",
              "SELECT memory.forget('{}')", "SELECT memory.retry_failed('{}')"] {
        let theirs = error_of(&f.replace("{}", "secret"));
        let absent = error_of(&f.replace("{}", "nope"));
        assert!(theirs.starts_with("P0002"), "{f}: {theirs}");
        assert_eq!(theirs.replace("secret", "X"), absent.replace("nope", "X"), "{f}");
    }
    for f in ["SELECT * FROM memory.status('{}')", "SELECT memory.wait('{}', '1 ms')"] {
        let theirs = error_of(&f.replace("{}", &id));
        let absent = error_of(&f.replace("{}", missing));
        assert!(theirs.starts_with("P0002"), "{f}: {theirs}");
        assert_eq!(theirs.replace(&id, "X"), absent.replace(missing, "X"), "{f}");
    }
}

#[pg_test]
fn token_count_is_bpe_of_the_record_and_limit_sets_guidance() {
    run("SET LOCAL memory_ext.token_limit = 10");
    run("SELECT memory.enqueue('c1', E'confirmed: name = Ada Lovelace\\nshe asks about analytical engines and their programs')");
    run("SELECT memory.process_pending()");
    let tokens = one::<i32>("SELECT token_count FROM memory.get('c1')").unwrap();
    // what is counted: the record's compact JSON, as an agent would put it in a prompt
    let expected = one::<i32>(
        r#"SELECT memory.count_tokens('{"user_confirmed":{"name":"Ada Lovelace"},"llm_inferred":{},"general_summary":"she asks about analytical engines and their programs"}')"#,
    )
    .unwrap();
    assert_eq!(tokens, expected);
    assert!(tokens > 10);
    assert_eq!(one::<bool>("SELECT needs_new_chat FROM memory.get('c1')"), Some(true));
    let guidance = text("SELECT guidance FROM memory.get('c1')");
    assert!(guidance.contains("start a new chat"), "{guidance}");
    // summary and facts are kept
    assert_eq!(text("SELECT user_confirmed->>'name' FROM memory.get('c1')"), "Ada Lovelace");
}

#[pg_test]
fn merge_rules_hold_end_to_end() {
    run("SELECT memory.enqueue('c1', E'inferred: plan = HMO\\ninferred: kids = 2')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', E'confirmed: plan = PPO\\ninferred: plan = EPO\\nretract: kids')");
    run("SELECT memory.enqueue('c1', 'confirmed: zip = 94103')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: zip = 94110')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT user_confirmed::text || ' ' || llm_inferred::text FROM memory.get('c1')"),
        r#"{"zip": "94110", "plan": "PPO"} {}"#
    );
    // the superseded value is in history; two snippets were coalesced into version 2
    assert_eq!(text("SELECT old_user_confirmed->>'zip' FROM memory.chat_memory_history WHERE version = 3"), "94103");
    assert_eq!(one::<i32>("SELECT cardinality(queue_ids) FROM memory.history('c1') WHERE version = 2"), Some(2));
    assert_eq!(count("SELECT 1 FROM memory.history('c1')"), 3);
}

#[pg_test]
fn failed_attempts_back_off_then_fail_without_touching_memory() {
    run("SET LOCAL memory_ext.max_attempts = 2");
    run("SET LOCAL memory_ext.backoff_base_ms = 0");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    let id = text("SELECT memory.enqueue('c1', E'mock_error: upstream down\\nconfirmed: a = 2')::text");
    let id = id.trim_start_matches('(').split(',').next().unwrap().to_string();
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(0));
    assert_eq!(
        text(&format!("SELECT status || '/' || retry_count || '/' || error_message FROM memory.status('{id}')")),
        "pending_summarization/1/mock error: upstream down"
    );
    assert_eq!(text("SELECT user_confirmed->>'a' FROM memory.get('c1')"), "1", "memory unchanged");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(0));
    assert_eq!(text(&format!("SELECT status FROM memory.status('{id}')")), "failed");
    assert!(one::<bool>(&format!("SELECT processed_at IS NOT NULL FROM memory.status('{id}')")).unwrap());
    assert_eq!(one::<i64>("SELECT version FROM memory.get('c1')"), Some(1));
    assert_eq!(text(&format!("SELECT memory.wait('{id}', '1 ms')")), "failed");

    // retry_failed puts it back with a fresh budget
    run("UPDATE memory.chat_context_queue SET new_context_snippet = 'confirmed: a = 2' WHERE status = 'failed'");
    assert_eq!(one::<i32>("SELECT memory.retry_failed('c1')"), Some(1));
    assert_eq!(text(&format!("SELECT status || retry_count FROM memory.status('{id}')")), "pending_summarization0");
    run("SELECT memory.process_pending()");
    assert_eq!(text("SELECT user_confirmed->>'a' FROM memory.get('c1')"), "2");
    assert_eq!(text(&format!("SELECT memory.wait('{id}')")), "complete");
}

/// The issue's sequence, applied one snippet per summarization, coalesced into one, and as one
/// snippet: the memory is the same, because operations apply in the order stated.
#[pg_test]
fn coalescing_never_changes_the_memory() {
    let lines = ["inferred: k = a", "retract: k", "inferred: k = b"];
    for l in lines {
        run(&format!("SELECT memory.enqueue('one', '{l}')"));
        run("SELECT memory.process_pending()");
    }
    for l in lines {
        run(&format!("SELECT memory.enqueue('together', '{l}')"));
    }
    run(&format!("SELECT memory.enqueue('single', E'{}')", lines.join("\\n")));
    run("SELECT memory.process_pending()");
    for chat in ["one", "together", "single"] {
        assert_eq!(
            text(&format!("SELECT llm_inferred::text FROM memory.get('{chat}')")),
            r#"{"k": "b"}"#,
            "{chat}"
        );
    }
    assert_eq!(one::<i64>("SELECT version FROM memory.get('one')"), Some(3));
    assert_eq!(one::<i64>("SELECT version FROM memory.get('together')"), Some(1));
}

/// A snippet the summarizer refuses is failed alone, in either position; its neighbour applies.
#[pg_test]
fn a_refused_snippet_is_dead_lettered_alone() {
    for (chat, texts) in [("c1", ["mock_fatal: no", "confirmed: a = 1"]),
                          ("c2", ["confirmed: a = 1", "mock_fatal: no"])] {
        for t in texts {
            run(&format!("SELECT memory.enqueue('{chat}', '{t}')"));
        }
        assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1), "{chat}");
        assert_eq!(
            text(&format!("SELECT string_agg(status || ':' || coalesce(error_message, ''), ',' \
                           ORDER BY seq) FROM memory.chat_context_queue WHERE chat_id = '{chat}' \
                           AND new_context_snippet LIKE 'mock_fatal%'")),
            "failed:mock fatal error: no"
        );
        assert_eq!(text(&format!("SELECT user_confirmed->>'a' FROM memory.get('{chat}')")), "1");
        assert_eq!(one::<i64>(&format!("SELECT version FROM memory.get('{chat}')")), Some(1));
        assert_eq!(one::<i32>(&format!("SELECT pending FROM memory.get('{chat}')")), Some(0));
    }
}

/// A re-queued snippet goes to the end of its chat's queue: applied after what was applied
/// before it, never between.
#[pg_test]
fn retry_failed_requeues_at_the_end() {
    let failed = text("SELECT queue_id::text FROM memory.enqueue('c1', 'mock_fatal: later')");
    let ok = text("SELECT queue_id::text FROM memory.enqueue('c1', 'confirmed: x = 1')");
    run("SELECT memory.process_pending()");
    run("UPDATE memory.chat_context_queue SET new_context_snippet = 'confirmed: x = 0' \
         WHERE status = 'failed'");
    assert_eq!(one::<i32>("SELECT memory.retry_failed('c1')"), Some(1));
    assert!(one::<bool>(&format!(
        "SELECT (SELECT seq FROM memory.chat_context_queue WHERE id = '{failed}') > \
                (SELECT seq FROM memory.chat_context_queue WHERE id = '{ok}')"
    )).unwrap());
    run("SELECT memory.process_pending()");
    assert_eq!(text("SELECT user_confirmed->>'x' FROM memory.get('c1')"), "0");
    assert_eq!(
        text("SELECT string_agg(queue_ids::text, ',' ORDER BY version) FROM memory.history('c1')"),
        format!("{{{ok}}},{{{failed}}}")
    );
}

/// A chat's memory and history are bounded: at memory_ext.max_facts new keys are refused
/// (counted) while existing keys still change; only the newest memory_ext.history_versions
/// versions are kept.
#[pg_test]
fn memory_and_history_are_bounded() {
    run("SET LOCAL memory_ext.max_facts = 3");
    run("SET LOCAL memory_ext.history_versions = 2");
    run("SELECT memory.enqueue('c1', E'confirmed: a = 1\\nconfirmed: b = 2\\ninferred: c = 3\\nconfirmed: d = 4')");
    run("SELECT memory.process_pending()");
    assert_eq!(one::<i32>("SELECT rejected_ops FROM memory.chat_memory_history"), Some(1));
    run("SELECT memory.enqueue('c1', E'confirmed: a = 9\\nconfirmed: c = 3\\ninferred: e = 5')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT user_confirmed::text || llm_inferred::text FROM memory.get('c1')"),
        r#"{"a": "9", "b": "2", "c": "3"}{}"#,
        "a changed, c promoted, e refused"
    );
    for i in 0..3 {
        run(&format!("SELECT memory.enqueue('c1', 'step {i}')"));
        run("SELECT memory.process_pending()");
    }
    assert_eq!(
        text("SELECT string_agg(version::text, ',' ORDER BY version) FROM memory.history('c1')"),
        "4,5"
    );
    assert_eq!(one::<i64>("SELECT version FROM memory.get('c1')"), Some(5));
}

/// Inferences the merge refuses (the key is confirmed) are counted in rejected_ops.
#[pg_test]
fn refused_inferences_count_as_rejected_ops() {
    run("SELECT memory.enqueue('c1', E'confirmed: plan = PPO\\ninferred: plan = HMO')");
    run("SELECT memory.process_pending()");
    assert_eq!(one::<i32>("SELECT rejected_ops FROM memory.chat_memory_history"), Some(1));
    assert_eq!(text("SELECT user_confirmed->>'plan' FROM memory.get('c1')"), "PPO");
}

#[pg_test]
fn backoff_holds_back_the_chats_newer_snippets() {
    run("SET LOCAL memory_ext.backoff_base_ms = 60000");
    run("SELECT memory.enqueue('c1', 'mock_error: flaky')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: later = yes')");
    run("SELECT memory.enqueue('c2', 'confirmed: other = chat')");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1), "only c2 is due");
    assert_eq!(one::<i64>("SELECT version FROM memory.get('c1')"), Some(0));
    assert!(one::<bool>(
        "SELECT bool_and(next_attempt_at > now() + interval '20 seconds') \
         FROM memory.chat_context_queue WHERE chat_id = 'c1'"
    ).unwrap());
}

/// The mock's test directives are plain text unless a superuser turns them on: no caller can make
/// the worker sleep, fail or panic.
#[pg_test]
fn mock_directives_are_text_unless_a_superuser_enables_them() {
    run("SET LOCAL memory_ext.mock_directives = off");
    run("SELECT memory.enqueue('c1', E'mock_sleep_ms: 60000\\nmock_panic: x\\nmock_fatal: y')");
    let started = std::time::Instant::now();
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "did not sleep");
    assert_eq!(
        text("SELECT general_summary FROM memory.get('c1')"),
        "mock_sleep_ms: 60000 | mock_panic: x | mock_fatal: y"
    );
    become_app_role();
    assert_eq!(sqlstate("SET memory_ext.mock_directives = on"), "42501");
}

/// A snippet's owner is told the class of an error, never the provider's text (a masked key, an
/// organisation id); admins see it in full.
#[pg_test]
fn owners_see_the_error_class_admins_the_detail() {
    as_user("alice");
    let detail = "mock error: key sk-ab***1234 of org-42 was refused";
    let id = text(&format!(
        "SELECT queue_id::text FROM memory.enqueue('c1', 'mock_error: key sk-ab***1234 of org-42 was refused')"
    ));
    run("SELECT memory.process_pending()");
    let status = format!("SELECT error_message FROM memory.status('{id}')");
    assert_eq!(text(&status), detail, "an admin sees the detail");
    become_app_role();
    as_user("alice");
    assert_eq!(text(&status), "the summarizer failed; it will be retried");
}

#[pg_test]
fn a_summarizer_panic_is_a_failed_attempt() {
    run("SELECT memory.enqueue('c1', 'mock_panic: bug')");
    run("SELECT memory.enqueue('c2', 'fine')");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
    assert_eq!(
        text("SELECT error_message FROM memory.chat_context_queue WHERE chat_id = 'c1'"),
        "summarizer panicked: mock panic: bug"
    );
}

#[pg_test]
fn status_and_wait_errors() {
    assert_eq!(sqlstate("SELECT * FROM memory.status(NULL)"), "22023");
    assert_eq!(sqlstate("SELECT * FROM memory.status(gen_random_uuid())"), "P0002");
    assert_eq!(sqlstate("SELECT memory.wait(gen_random_uuid())"), "P0002");
    assert_eq!(sqlstate("SELECT memory.wait(NULL)"), "ok", "strict: NULL in, NULL out");
    let id = text("SELECT queue_id::text FROM memory.enqueue('c1', 'x')");
    assert_eq!(sqlstate(&format!("SELECT memory.wait('{id}', '-1 second')")), "22023");
    // A row this transaction enqueued can never complete while it waits: refused at once, not
    // after the timeout. (Timing out on a committed row is tested on a real cluster.)
    let started = std::time::Instant::now();
    let e = error_of(&format!("SELECT memory.wait('{id}', '10 s')"));
    assert!(e.starts_with("55000: ") && e.contains("commit first"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "did not sleep out the timeout");
    // once finished in this transaction (process_pending), its status comes back at once
    run("SELECT memory.process_pending()");
    assert_eq!(text(&format!("SELECT memory.wait('{id}', '1 ms')")), "complete");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate(&format!("SELECT * FROM memory.status('{id}')")), "P0002");
    assert_eq!(sqlstate(&format!("SELECT memory.wait('{id}', '1 ms')")), "P0002");
}

#[pg_test]
fn forget_removes_everything_of_the_chat_only() {
    run("SELECT memory.enqueue('c1', 'a')");
    run("SELECT memory.enqueue('c2', 'b')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'pending')");
    run("SELECT memory.forget('c1')");
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata WHERE chat_id = 'c1'"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue WHERE chat_id = 'c1'"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_memory_history WHERE chat_id = 'c1'"), 0);
    assert_eq!(count("SELECT 1 FROM memory.history('c2')"), 1);
    assert_eq!(sqlstate("SELECT memory.forget('c1')"), "P0002");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT memory.forget('c2')"), "P0002");
    assert_eq!(sqlstate("SELECT memory.retry_failed('c2')"), "P0002");
    assert_eq!(sqlstate("SELECT * FROM memory.history('c2')"), "P0002");
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata WHERE chat_id = 'c2'"), 1, "untouched");
}

#[pg_test]
fn process_pending_is_for_admins_and_validates() {
    assert_eq!(sqlstate("SELECT memory.process_pending(0)"), "22023");
    become_app_role();
    assert_eq!(sqlstate("SELECT memory.process_pending()"), "42501");
}

#[pg_test]
fn process_pending_respects_p_max_and_batch_size() {
    run("SET LOCAL memory_ext.batch_snippets = 2");
    for c in ["a", "b", "c"] {
        for i in 0..3 {
            run(&format!("SELECT memory.enqueue('{c}', 'line {i}')"));
        }
    }
    // two chats, two snippets each (the third waits for the next call)
    assert_eq!(one::<i32>("SELECT memory.process_pending(2)"), Some(4));
    // one summarization per chat and call: a and b's last, c's first two
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(4));
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(0));
    assert_eq!(text("SELECT general_summary FROM memory.get('a')"), "line 0 | line 1 | line 2");
}

#[pg_test]
fn unknown_summarizer_is_a_clear_error() {
    run("SELECT memory.enqueue('c1', 'x')");
    run("SET LOCAL memory_ext.summarizer = 'gpt'");
    assert_eq!(sqlstate("SELECT memory.process_pending()"), "22023");
}

#[pg_test]
fn queue_stats_counts_per_status() {
    run("SELECT memory.enqueue('c1', 'a')");
    run("SELECT memory.enqueue('c1', 'b')");
    run("SELECT memory.enqueue('c2', 'mock_error: x')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c3', 'c')");
    assert_eq!(
        text("SELECT string_agg(status || '=' || count, ',' ORDER BY status) FROM memory.queue_stats"),
        "complete=2,failed=0,pending_summarization=2,processing=0"
    );
    assert!(one::<bool>("SELECT oldest_pending_age >= interval '0' FROM memory.queue_stats WHERE status = 'pending_summarization'").unwrap());
}

#[pg_test]
fn worker_status_explains_itself() {
    assert_eq!(count("SELECT 1 FROM memory.worker_status()"), 1);
    let state = text("SELECT state FROM memory.worker_status()");
    assert!(state.contains("serves database \"postgres\""), "{state}");
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
        "memory.admin_roles,memory.audit_log,memory.chat_context_queue,\
         memory.chat_context_queue_seq,memory.chat_memory_history,memory.chat_metadata,\
         memory.llm_usage_daily"
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

#[pg_test]
fn llm_usage_counts_applied_batches_and_failed_attempts() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.enqueue('c2', 'mock_fatal: nope')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT summarizer || '/' || batches_applied || '/' || attempts_failed || '/' || llm_requests \
              FROM memory.llm_usage"),
        "mock/1/1/0"
    );
    assert_eq!(
        one::<i32>("SELECT llm_requests FROM memory.chat_memory_history WHERE chat_id = 'c1'"),
        Some(0)
    );
}

#[pg_test]
fn an_unconfigured_llm_summarizer_is_a_clear_error() {
    run("SELECT memory.enqueue('c1', 'hello')");
    let llm = "SET LOCAL memory_ext.llm_endpoint = 'http://127.0.0.1:9/v1'; \
               SET LOCAL memory_ext.llm_model = 'm'";
    // (settings, process_pending's SQLSTATE, error message start)
    let cases = [
        ("SET LOCAL memory_ext.summarizer = 'openai'".to_string(), "22023", "memory_ext.summarizer is openai but memory_ext.llm_endpoint is not set"),
        ("SET LOCAL memory_ext.summarizer = 'gpt'".to_string(), "22023", "unknown summarizer \"gpt\""),
        (
            format!("SET LOCAL memory_ext.summarizer = 'anthropic'; {llm}; SET LOCAL memory_ext.llm_api_key = 'file:/no/such/key'"),
            "22023",
            "memory_ext.llm_api_key: cannot read key file",
        ),
    ];
    for (set, state, message) in cases {
        run("RESET ALL");
        run(&set);
        let err = error_of("SELECT memory.process_pending()");
        assert!(err.starts_with(&format!("{state}: {message}")), "{set}: {err}");
        assert_eq!(
            text("SELECT status FROM memory.chat_context_queue"),
            "pending_summarization",
            "{set}: nothing changed"
        );
    }
    // A bad value is refused when it is set, not at the next summarization.
    assert_eq!(sqlstate("SET memory_ext.llm_structured_output = 'yaml'"), "22023");
    // The mock needs no key: a broken key setting does not stop it.
    run("RESET ALL");
    run("SET LOCAL memory_ext.llm_api_key = 'file:/no/such/key'");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
}

#[pg_test]
fn count_tokens_matches_cl100k() {
    assert_eq!(one::<i32>("SELECT memory.count_tokens('hello world')"), Some(2));
    assert_eq!(one::<i32>("SELECT memory.count_tokens(NULL)"), None);
}

#[pg_test]
fn a_permanent_error_fails_at_once() {
    run("SELECT memory.enqueue('c1', 'mock_fatal: bad credentials')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT status || '/' || retry_count || '/' || error_message FROM memory.chat_context_queue"),
        "failed/1/mock fatal error: bad credentials"
    );
}

#[pg_test]
fn no_estimate_when_no_worker_serves_this_database() {
    // the test server's worker serves "postgres", not this database
    assert_eq!(
        one::<bool>("SELECT estimated_completion IS NULL FROM memory.enqueue('c1', 'x')"),
        Some(true)
    );
}

#[pg_test]
fn cleanup_deletes_old_complete_rows_in_batches() {
    run("SELECT memory.enqueue('c1', 'a'), memory.enqueue('c1', 'b'), memory.enqueue('c1', 'c')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'still pending')");
    run("UPDATE memory.chat_context_queue SET processed_at = now() - interval '2 hours' WHERE status = 'complete'");
    assert_eq!(one::<i32>("SELECT memory._cleanup(3 * 3600, 10)"), Some(0), "younger than retention");
    assert_eq!(one::<i32>("SELECT memory._cleanup(3600, 2)"), Some(2));
    assert_eq!(one::<i32>("SELECT memory._cleanup(3600, 2)"), Some(1));
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 1, "pending rows are never deleted");
    assert_eq!(count("SELECT 1 FROM memory.history('c1')"), 1, "history stays");
}
