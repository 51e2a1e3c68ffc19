// Summarizing through process_pending(): merge rules, order, coalescing, failures, dead letters,
// bounds, usage.

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
fn a_permanent_error_fails_at_once() {
    run("SELECT memory.enqueue('c1', 'mock_fatal: bad credentials')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT status || '/' || retry_count || '/' || error_message FROM memory.chat_context_queue"),
        "failed/1/mock fatal error: bad credentials"
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

/// Retention also trims fairness bookkeeping: an owner not served for a day ranks as never served.
#[pg_test]
fn cleanup_forgets_owners_not_served_for_a_day() {
    run("INSERT INTO memory.owner_turns VALUES ('old', now() - interval '2 days'), ('recent', now())");
    run("SELECT memory._cleanup(3600, 1000, 86400)");
    assert_eq!(
        text("SELECT string_agg(owner, ',') FROM memory.owner_turns"),
        "recent"
    );
}

/// With fact keys declared, the mock's operations on other keys, and confirmations of an
/// infer-only key, are refused and counted; a drop of an older key still applies. With none
/// declared, keys are free-form again.
#[pg_test]
fn declared_fact_keys_bound_what_the_summarizer_may_set() {
    run("SELECT memory.enqueue('c1', E'inferred: legacy = x')");
    run("SELECT memory.process_pending()");
    run("INSERT INTO memory.fact_keys (key, description, may_confirm, may_infer) VALUES
           ('city', 'where the user lives', true, true), ('mood', '', false, true)");
    run("SELECT memory.enqueue('c1', E'confirmed: city = Lyon\\nconfirmed: mood = happy\\n\
         inferred: mood = calm\\nconfirmed: zip = 69001\\nretract: legacy')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT user_confirmed::text || ' ' || llm_inferred::text FROM memory.get('c1')"),
        r#"{"city": "Lyon"} {"mood": "calm"}"#
    );
    assert_eq!(
        one::<i32>("SELECT rejected_ops FROM memory.chat_memory_history WHERE version = 2"),
        Some(2)
    );
    run("DELETE FROM memory.fact_keys");
    run("SELECT memory.enqueue('c1', 'confirmed: zip = 69001')");
    run("SELECT memory.process_pending()");
    assert_eq!(text("SELECT user_confirmed->>'zip' FROM memory.get('c1')"), "69001");
}

/// Declared keys are snake_case, described briefly, usable somehow; only admins declare them.
#[pg_test]
fn fact_keys_are_checked_and_for_admins() {
    for (row, constraint) in [
        ("('Zip', '', true, true)", "fact_keys_key_check"),
        ("('', '', true, true)", "fact_keys_key_check"),
        ("('zip code', '', true, true)", "fact_keys_key_check"),
        (&format!("('{}', '', true, true)", "k".repeat(65)), "fact_keys_key_check"),
        (&format!("('zip', '{}', true, true)", "d".repeat(501)), "fact_keys_description_check"),
        ("('zip', '', false, false)", "fact_keys_some_use_check"),
    ] {
        let e = error_of(&format!("INSERT INTO memory.fact_keys VALUES {row}"));
        assert!(e.starts_with("23514") && e.contains(constraint), "{row}: {e}");
    }
    run("INSERT INTO memory.fact_keys (key) VALUES ('zip')");
    become_app_role();
    assert_eq!(sqlstate("INSERT INTO memory.fact_keys (key) VALUES ('city')"), "42501");
    assert_eq!(sqlstate("SELECT 1 FROM memory.fact_keys"), "42501");
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.fact_keys"), 1);
}

/// With memory_ext.debounce, an enqueue makes the chat due once it has been quiet that long
/// (each new snippet pushing it back), within debounce_max of its oldest pending snippet, and
/// nothing is claimed before.
#[pg_test]
fn debounce_holds_a_chat_until_it_is_quiet() {
    run("SET LOCAL memory_ext.debounce = '10s'");
    run("SET LOCAL memory_ext.debounce_max = '1min'");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    assert_eq!(
        one::<bool>("SELECT due_at = now() + interval '10 s' FROM memory.chat_metadata"),
        Some(true)
    );
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(0), "not due yet");
    // the oldest pending snippet bounds the wait
    run("UPDATE memory.chat_context_queue SET created_at = now() - interval '55 s'");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    assert_eq!(
        one::<bool>("SELECT due_at = now() + interval '5 s' FROM memory.chat_metadata"),
        Some(true)
    );
    run("UPDATE memory.chat_context_queue SET created_at = now() - interval '2 min'");
    run("SELECT memory.enqueue('c1', 'confirmed: c = 3')");
    assert_eq!(
        one::<bool>("SELECT due_at = now() FROM memory.chat_metadata"),
        Some(true),
        "past debounce_max: due now"
    );
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(3));
    assert_eq!(
        count("SELECT 1 FROM memory.chat_memory_history"),
        1,
        "one summarization for the burst"
    );
}

/// A chat whose snippets were all applied is no longer due: no claim is spent on it again (the
/// finish once marked every chat it finished due, which cost one more claim per chat).
#[pg_test]
fn a_drained_chat_is_not_due_again() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.enqueue('c2', 'mock_fatal: refused')");
    run("SELECT memory.process_pending()");
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing')"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata WHERE due_at IS NOT NULL"), 0);
}
