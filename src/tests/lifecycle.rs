// Correcting and erasing memory: rollback() and forget_owner().

fn memory_of(chat: &str) -> String {
    text(&format!(
        "SELECT user_confirmed::text || ' ' || llm_inferred::text || ' ' || general_summary \
           FROM memory.get('{chat}')"
    ))
}

/// A finish of chat c1 under `lease` applying `snippet` (as `{"b": "late"}`), as a worker whose
/// lease was called off would send it: how many chats it applied.
fn late_finish(lease: &str, snippet: &str) -> String {
    finish_with_usage(lease, snippet, "{}", "test")
}

/// The same, with the `usage` the summarizer (`label`) reported.
fn finish_with_usage(lease: &str, snippet: &str, usage: &str, label: &str) -> String {
    text(&format!(
        "SELECT memory._finish(jsonb_build_array(jsonb_build_object('chat_id', 'c1', \
           'lease_token', '{lease}', 'applied_ids', coalesce((SELECT jsonb_agg(id) FROM \
           memory.chat_context_queue WHERE new_context_snippet = '{snippet}'), '[]'), \
           'user_confirmed', '{{\"b\": \"late\"}}'::jsonb, 'llm_inferred', '{{}}'::jsonb, \
           'general_summary', '', 'token_count', 1, 'needs_new_chat', false, 'dead', '[]'::jsonb, \
           'failure', null, 'usage', '{usage}'::jsonb)), '{label}', 5, 0, 0) ->> 'applied'"
    ))
}

/// A rollback makes an earlier version's memory current again as a new version: history keeps
/// every version and the new one names what it restored; later snippets apply on top of it.
#[pg_test]
fn rollback_restores_an_earlier_version_as_a_new_one() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', E'confirmed: city = Lyon\\nmoved in May')");
    run("SELECT memory.process_pending()");
    let v1 = memory_of("c1");
    run("SELECT memory.enqueue('c1', E'confirmed: city = Paris\\ninferred: mood = tired')");
    run("SELECT memory.process_pending()");
    assert_eq!(one::<i64>("SELECT memory.rollback('c1', 1)"), Some(3));
    assert_eq!(memory_of("c1"), v1);
    assert_eq!(
        text("SELECT version || ' ' || restored_version || ' ' || cardinality(queue_ids) || ' ' \
                     || summarizer FROM memory.chat_memory_history WHERE version = 3"),
        "3 1 0 rollback"
    );
    assert_eq!(count("SELECT 1 FROM memory.history('c1')"), 3, "history keeps every version");
    // what the worker would have stored for that memory
    assert_eq!(
        one::<bool>(
            "SELECT m.token_count = memory._count_memory(m.user_confirmed, m.llm_inferred, \
                                                          m.general_summary) \
                    AND x.context = m.context_text AND x.token_count = m.context_tokens \
               FROM memory.chat_metadata m, memory.context('c1') x WHERE m.chat_id = 'c1'"
        ),
        Some(true)
    );
    // to version 0: the empty memory; a new snippet then applies on top
    assert_eq!(one::<i64>("SELECT memory.rollback('c1', 0)"), Some(4));
    assert_eq!(memory_of("c1"), "{} {} ");
    run("SELECT memory.enqueue('c1', 'confirmed: pet = cat')");
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"pet": "cat"} {} "#);
    assert_eq!(
        text("SELECT string_agg(action, ',' ORDER BY at) FROM memory.audit_log \
               WHERE action = 'rollback'"),
        "rollback,rollback"
    );
}

/// A rollback calls off a summarization in flight: its late finish applies nothing, and its
/// snippets are applied once, on top of the restored memory.
#[pg_test]
fn rollback_calls_off_a_summarization_in_flight() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    let lease = text("SELECT lease_token::text FROM memory._claim(10, 10, 60)");
    assert_eq!(one::<i64>("SELECT memory.rollback('c1', 0)"), Some(2));
    assert_eq!(late_finish(&lease, "confirmed: b = 2"), "0", "the lease was called off");
    assert_eq!(memory_of("c1"), "{} {} ");
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"b": "2"} {} "#);
    assert_eq!(
        count("SELECT 1 FROM memory.chat_context_queue WHERE status = 'complete'"),
        2,
        "each snippet applied once"
    );
}

#[pg_test]
fn rollback_errors_change_nothing() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 2')");
    run("SELECT memory.process_pending()");
    for v in ["NULL", "-1", "2", "3"] {
        assert_eq!(sqlstate(&format!("SELECT memory.rollback('c1', {v})")), "22023", "{v}");
    }
    assert_eq!(sqlstate("SELECT memory.rollback('nope', 0)"), "P0002");
    // a version history no longer keeps (neither its row nor the next one's old columns)
    run("DELETE FROM memory.chat_memory_history WHERE version = 1");
    assert_eq!(one::<i64>("SELECT memory.rollback('c1', 1)"), Some(3), "from v2's old side");
    run("DELETE FROM memory.chat_memory_history WHERE version IN (2, 3)");
    let e = error_of("SELECT memory.rollback('c1', 1)");
    assert!(e.starts_with("22023") && e.contains("no longer kept"), "{e}");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT memory.rollback('c1', 0)"), "P0002", "reads as missing");
    run("RESET ROLE");
    assert_eq!(one::<i64>("SELECT version FROM memory.chat_metadata"), Some(3));
}

/// forget_owner() erases every chat of one identity with its snippets and history, keeps an
/// audit row without content, and leaves other owners alone. Admins only.
#[pg_test]
fn forget_owner_erases_one_identity() {
    as_user("alice");
    run("SELECT memory.enqueue('a1', 'confirmed: secret = swordfish')");
    run("SELECT memory.enqueue('a2', 'my diary entry')");
    as_user("bob");
    run("SELECT memory.enqueue('b1', 'confirmed: pet = cat')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('a1', 'still pending')");
    become_app_role();
    as_user("alice");
    assert_eq!(sqlstate("SELECT memory.forget_owner('alice')"), "42501");
    run("RESET ROLE");
    assert_eq!(sqlstate("SELECT memory.forget_owner(' ')"), "22023");
    assert_eq!(one::<i32>("SELECT memory.forget_owner('alice')"), Some(2));
    for t in ["chat_metadata", "chat_context_queue", "chat_memory_history"] {
        assert_eq!(
            count(&format!(
                "SELECT 1 FROM memory.{t} x \
                  WHERE x::text ~ '(swordfish|diary|still pending)' OR x.chat_id IN ('a1', 'a2')"
            )),
            0,
            "{t}"
        );
    }
    assert_eq!(memory_of("b1"), r#"{"pet": "cat"} {} "#, "bob's chat stays");
    assert_eq!(
        text("SELECT detail FROM memory.audit_log WHERE action = 'forget_owner'"),
        "alice: 2 chats, 3 snippets, 2 versions erased"
    );
    assert_eq!(one::<i32>("SELECT memory.forget_owner('alice')"), Some(0));
}

fn queue_id(snippet: &str) -> String {
    text(&format!(
        "SELECT id::text FROM memory.chat_context_queue WHERE new_context_snippet = '{snippet}'"
    ))
}

/// rebuild() re-derives the memory from the applied snippets under the current settings (here:
/// fact keys declared afterwards), as one new version; until it is applied, agents read the
/// memory as it was, however many batches the rebuild takes.
#[pg_test]
fn rebuild_re_derives_the_memory_as_one_new_version() {
    as_user("alice");
    for s in ["confirmed: city = Lyon", "confirmed: pet = cat", "moved in May"] {
        run(&format!("SELECT memory.enqueue('c1', '{s}')"));
        run("SELECT memory.process_pending()");
    }
    run("SELECT memory.enqueue('c1', 'inferred: mood = calm')"); // pending: applied after
    let before = memory_of("c1");
    run("INSERT INTO memory.fact_keys (key) VALUES ('city'), ('mood')");
    let wait_for = text("SELECT memory.rebuild('c1')::text");
    assert_eq!(wait_for, queue_id("moved in May"), "wait for the last applied snippet");
    assert_eq!(one::<i32>("SELECT pending FROM memory.get('c1')"), Some(4));
    run("SET LOCAL memory_ext.batch_snippets = 1");
    for _ in 0..2 {
        run("SELECT memory.process_pending()");
        assert_eq!(memory_of("c1"), before, "the old memory until the rebuild is applied");
        assert_eq!(one::<i64>("SELECT version FROM memory.chat_metadata"), Some(3));
    }
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"city": "Lyon"} {} moved in May"#, "pet: not declared");
    assert_eq!(
        text("SELECT version || ' ' || rebuilt || ' ' || cardinality(queue_ids) || ' ' \
                     || summarizer || ' ' || (restored_version IS NULL) \
                FROM memory.chat_memory_history WHERE version = 4"),
        "4 true 3 mock true"
    );
    assert_eq!(one::<bool>("SELECT rebuild IS NULL FROM memory.chat_metadata"), Some(true));
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"city": "Lyon"} {"mood": "calm"} moved in May"#);
    assert_eq!(
        count("SELECT 1 FROM memory.chat_context_queue WHERE status = 'complete'"),
        4,
        "every snippet applied once more, none twice"
    );
    // the context agents read is the worker's rendering of the new memory
    assert_eq!(
        one::<bool>(
            "SELECT x.context = m.context_text AND x.token_count = m.context_tokens \
               FROM memory.chat_metadata m, memory.context('c1') x"
        ),
        Some(true)
    );
    assert_eq!(count("SELECT 1 FROM memory.audit_log WHERE action = 'rebuild'"), 1);
}

/// A rebuild calls off a summarization in flight (its late finish applies nothing); a chat with
/// nothing applied gets the empty memory at once; rollback waits for a rebuild to end.
#[pg_test]
fn rebuild_in_flight_empty_and_rollback() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    let lease = text("SELECT lease_token::text FROM memory._claim(10, 10, 60)");
    run("SELECT memory.rebuild('c1')");
    assert_eq!(late_finish(&lease, "confirmed: b = 2"), "0", "the lease was called off");
    let e = error_of("SELECT memory.rollback('c1', 0)");
    assert!(e.starts_with("55000") && e.contains("being rebuilt"), "{e}");
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"a": "1", "b": "2"} {} "#);
    assert_eq!(
        text("SELECT string_agg(version || ':' || rebuilt, ',' ORDER BY version) \
                FROM memory.chat_memory_history"),
        "1:false,2:true",
        "a again, and b (called off, pending again) in the same rebuilt version"
    );
    // nothing applied: the empty memory, at once, nothing to wait for
    run("SELECT memory.create_chat('c2')");
    assert_eq!(one::<bool>("SELECT memory.rebuild('c2') IS NULL"), Some(true));
    assert_eq!(
        text("SELECT version || ' ' || rebuilt FROM memory.chat_memory_history \
               WHERE chat_id = 'c2'"),
        "1 true"
    );
}

/// Once retention deleted an applied snippet the memory cannot be re-derived: rebuild() and
/// forget_snippet() of an applied snippet refuse (55000) and change nothing.
#[pg_test]
fn pruned_chats_cannot_be_re_derived() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    run("SELECT memory.process_pending()");
    run("UPDATE memory.chat_context_queue SET processed_at = now() - interval '1 day' \
          WHERE new_context_snippet = 'confirmed: a = 1'");
    assert_eq!(one::<i32>("SELECT memory._cleanup(3600, 10)"), Some(1));
    assert_eq!(one::<bool>("SELECT pruned_at IS NOT NULL FROM memory.chat_metadata"), Some(true));
    let e = error_of("SELECT memory.rebuild('c1')");
    assert!(e.starts_with("55000") && e.contains("cannot be re-derived"), "{e}");
    let b = queue_id("confirmed: b = 2");
    assert_eq!(sqlstate(&format!("SELECT memory.forget_snippet('{b}')")), "55000");
    assert_eq!(
        text("SELECT string_agg(status, ',') FROM memory.chat_context_queue"),
        "complete"
    );
    assert_eq!(memory_of("c1"), r#"{"a": "1", "b": "2"} {} "#);
    assert_eq!(count("SELECT 1 FROM memory.chat_memory_history"), 2);
    // retention skips nothing else: a younger row stays
    assert_eq!(one::<i32>("SELECT memory._cleanup(3600, 10)"), Some(0));
}

/// forget_snippet() erases an applied snippet: afterwards its text and the facts derived from it
/// are nowhere in the chat's tables, and the memory is re-derived from the other snippets. The
/// memory agents read is emptied at once. Pending and failed snippets are simply deleted.
#[pg_test]
fn forget_snippet_erases_what_was_derived_from_it() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', E'confirmed: secret = swordfish\\nmy password is swordfish')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', E'confirmed: city = Lyon\\nmoved in May')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: pet = cat')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'still pending')");
    let secret = queue_id("confirmed: secret = swordfish\nmy password is swordfish");
    let wait_for = text(&format!("SELECT memory.forget_snippet('{secret}')::text"));
    assert_eq!(wait_for, queue_id("confirmed: pet = cat"));
    assert_eq!(memory_of("c1"), "{} {} ", "emptied at once");
    assert_eq!(one::<i64>("SELECT version FROM memory.get('c1')"), Some(4));
    run("SELECT memory.process_pending()");
    assert_eq!(
        memory_of("c1"),
        r#"{"pet": "cat", "city": "Lyon"} {} moved in May | still pending"#
    );
    for t in ["chat_metadata", "chat_context_queue", "chat_memory_history", "audit_log"] {
        assert_eq!(
            count(&format!("SELECT 1 FROM memory.{t} x WHERE x::text ~ 'swordfish'")),
            0,
            "{t}"
        );
    }
    assert_eq!(
        text("SELECT string_agg(version || ':' || rebuilt, ',' ORDER BY version) \
                FROM memory.chat_memory_history"),
        "5:true",
        "every version that held its effects is gone (the pending one joined the rebuild)"
    );
    // a pending snippet: deleted, nothing to re-derive
    run("SELECT memory.enqueue('c1', 'never mind')");
    let pending = queue_id("never mind");
    assert_eq!(
        one::<bool>(&format!("SELECT memory.forget_snippet('{pending}') IS NULL")),
        Some(true)
    );
    assert_eq!(one::<i32>("SELECT pending FROM memory.get('c1')"), Some(0));
    assert_eq!(one::<i64>("SELECT version FROM memory.get('c1')"), Some(5));
    assert_eq!(
        text("SELECT string_agg(detail, ',' ORDER BY at) FROM memory.audit_log \
               WHERE action = 'forget_snippet'"),
        "applied,pending_summarization"
    );
}

/// A snippet applied long ago (its own version no longer kept) that could not be summarized again
/// when another snippet was erased is failed, but kept versions still hold its effects: erasing it
/// in turn treats it as applied, so no version keeps what it said.
#[pg_test]
fn erasing_a_snippet_that_failed_after_it_was_applied_leaves_no_version_holding_it() {
    run("SET LOCAL memory_ext.history_versions = 2");
    for s in ["confirmed: a = 1", "confirmed: b = 2", "confirmed: c = 3", "confirmed: d = 4"] {
        run(&format!("SELECT memory.enqueue('c1', '{s}')"));
        run("SELECT memory.process_pending()");
    }
    let a = queue_id("confirmed: a = 1");
    // the summarizer now refuses the first snippet
    run("UPDATE memory.chat_context_queue SET new_context_snippet = 'mock_fatal: now refused' \
          WHERE new_context_snippet = 'confirmed: a = 1'");
    run(&format!(
        "SELECT memory.forget_snippet('{}')",
        queue_id("confirmed: d = 4")
    ));
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"b": "2", "c": "3"} {} "#);
    assert_eq!(
        text(&format!(
            "SELECT status || ' ' || applied_before FROM memory.chat_context_queue WHERE id = '{a}'"
        )),
        "failed true"
    );
    let holding_a = "SELECT 1 FROM memory.chat_memory_history h WHERE h.user_confirmed ? 'a'";
    assert_eq!(count(holding_a), 1, "version 3 (a, b, c) is kept");
    assert!(
        one::<bool>(&format!("SELECT memory.forget_snippet('{a}') IS NOT NULL")).unwrap(),
        "re-derived"
    );
    run("SELECT memory.process_pending()");
    assert_eq!(count(holding_a), 0);
    assert_eq!(memory_of("c1"), r#"{"b": "2", "c": "3"} {} "#);
    assert_eq!(
        text("SELECT string_agg(detail, ',' ORDER BY at, detail) FROM memory.audit_log \
               WHERE action = 'forget_snippet'"),
        "applied,applied"
    );
}

/// Nobody rebuilds or erases another owner's chat or snippet: it reads as missing, and nothing
/// changes. Bad input gets 22023 / P0002.
#[pg_test]
fn rebuild_and_forget_snippet_check_the_owner() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    let id = queue_id("confirmed: a = 1");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT memory.rebuild('c1')"), "P0002");
    let e = error_of(&format!("SELECT memory.forget_snippet('{id}')"));
    assert_eq!(e, format!("P0002: queue row {id} not found"));
    assert_eq!(
        sqlstate("SELECT memory.forget_snippet('00000000-0000-0000-0000-000000000000')"),
        "P0002"
    );
    assert_eq!(sqlstate("SELECT memory.forget_snippet(NULL)"), "22023");
    assert_eq!(sqlstate("SELECT memory.rebuild('')"), "22023");
    as_user("alice");
    // alice's own: nothing else to re-derive from, the empty memory at once
    assert_eq!(
        one::<bool>(&format!("SELECT memory.forget_snippet('{id}') IS NULL")),
        Some(true)
    );
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 0);
    assert_eq!(memory_of("c1"), "{} {} ");
}

/// An owner whose LLM tokens today reached memory_ext.owner_daily_tokens is deferred to the next
/// UTC day, not failed: enqueue still accepts, status() says why, the owner_usage view shows it,
/// other owners go on, and an admin raising the budget resumes the chats at once.
#[pg_test]
fn owners_over_their_daily_budget_are_deferred() {
    as_user("alice");
    run("SELECT memory.enqueue('a1', 'confirmed: a = 1')");
    as_user("bob");
    run("SELECT memory.enqueue('b1', 'confirmed: b = 1')");
    run("SELECT memory._record_owner_usage('a1', \
           '{\"llm_requests\": 2, \"prompt_tokens\": 900, \"completion_tokens\": 100}')");
    run("SELECT memory._record_owner_usage('b1', \
           '{\"llm_requests\": 1, \"prompt_tokens\": 10, \"completion_tokens\": 5}')");
    run("SET LOCAL memory_ext.owner_daily_tokens = 1000");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1), "bob's only");
    let a1 = queue_id("confirmed: a = 1");
    assert_eq!(
        text(&format!("SELECT status || ': ' || error_message FROM memory.status('{a1}')")),
        format!(
            "pending_summarization: deferred until {}: the owner's LLM tokens today (1000) \
             reached their daily budget (1000)",
            text("SELECT memory._utc_tomorrow()::text")
        )
    );
    assert_eq!(
        one::<bool>("SELECT due_at = memory._utc_tomorrow() FROM memory.chat_metadata \
                      WHERE chat_id = 'a1'"),
        Some(true)
    );
    as_user("alice");
    run("SELECT memory.enqueue('a1', 'confirmed: a = 2')");
    run("SELECT memory.enqueue('a1', 'confirmed: a = 3')");
    assert_eq!(
        count("SELECT 1 FROM memory.chat_context_queue \
                WHERE chat_id = 'a1' AND next_attempt_at = memory._utc_tomorrow()"),
        3,
        "accepted, and due the next day"
    );
    run("SELECT set_config('request.jwt.claims', '', true)");
    assert_eq!(
        text("SELECT string_agg(owner || ' ' || tokens || '/' || daily_budget || ' ' || throttled \
                                || ' ' || deferred_chats, ', ' ORDER BY owner) \
                FROM memory.owner_usage"),
        "alice 1000/1000 true 1, bob 15/1000 false 0"
    );
    assert_eq!(sqlstate("SELECT memory.set_owner_budget('alice', -1)"), "22023");
    assert_eq!(sqlstate("SELECT memory.set_owner_budget(NULL, 1)"), "22023");
    run("SELECT memory.set_owner_budget('alice', 5000)");
    // resumed at once, and for good: one snippet per batch, each batch due at once
    run("SET LOCAL memory_ext.batch_snippets = 1");
    for _ in 0..3 {
        assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1), "resumed");
    }
    assert_eq!(
        count("SELECT 1 FROM memory.chat_context_queue WHERE error_public IS NOT NULL"),
        0,
        "the deferral's reason is gone"
    );
    assert_eq!(
        text("SELECT string_agg(owner || ' ' || daily_budget || ' ' || throttled, ', ' \
                                ORDER BY owner) FROM memory.owner_usage"),
        "alice 5000 false, bob 1000 false"
    );
    run("SELECT memory.set_owner_budget('alice', NULL)");
    assert_eq!(count("SELECT 1 FROM memory.owner_budgets"), 0);
    assert_eq!(count("SELECT 1 FROM memory.audit_log WHERE action = 'set_owner_budget'"), 2);
    become_app_role();
    assert_eq!(sqlstate("SELECT memory.set_owner_budget('alice', 1)"), "42501");
}

/// A rebuild() some of whose snippets cannot be summarized again (here: one the summarizer now
/// refuses) is called off: the memory stays as it was and every snippet stays applied; a newer
/// snippet that went into the rebuilt memory is applied again, onto the memory agents read.
#[pg_test]
fn a_rebuild_that_cannot_summarize_a_snippet_again_is_called_off() {
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    run("SELECT memory.process_pending()");
    run("UPDATE memory.chat_context_queue SET new_context_snippet = 'mock_fatal: now refused' \
          WHERE new_context_snippet = 'confirmed: a = 1'");
    run("SELECT memory.enqueue('c1', 'confirmed: c = 3')");
    run("SELECT memory.rebuild('c1')");
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"a": "1", "b": "2"} {} "#, "unchanged");
    assert_eq!(one::<i64>("SELECT version FROM memory.chat_metadata"), Some(2));
    assert_eq!(one::<bool>("SELECT rebuild IS NULL FROM memory.chat_metadata"), Some(true));
    assert_eq!(
        text("SELECT detail FROM memory.audit_log WHERE action = 'rebuild_failed'"),
        "1 snippet(s) could not be summarized again; the memory is unchanged"
    );
    run("SELECT memory.process_pending()");
    assert_eq!(memory_of("c1"), r#"{"a": "1", "b": "2", "c": "3"} {} "#);
    assert_eq!(
        text("SELECT string_agg(status, ',' ORDER BY seq) FROM memory.chat_context_queue"),
        "complete,complete,complete"
    );
    assert_eq!(
        text("SELECT string_agg(version || '=' || cardinality(queue_ids), ' ' ORDER BY version) \
                FROM memory.chat_memory_history"),
        "1=1 2=1 3=1",
        "c applied once, on the memory agents read"
    );
}

/// A result whose lease was called off (here by rebuild()) is dropped, but the requests it made
/// were paid for: they count toward its owner's budget and in the usage rollup, once.
#[pg_test]
fn a_dropped_result_still_counts_its_tokens() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', 'confirmed: a = 1')");
    run("SELECT memory.process_pending()");
    run("SELECT memory.enqueue('c1', 'confirmed: b = 2')");
    let lease = text("SELECT lease_token::text FROM memory._claim(10, 10, 60)");
    run("SELECT memory.rebuild('c1')");
    let usage = r#"{"llm_requests": 1, "prompt_tokens": 50, "completion_tokens": 5}"#;
    assert_eq!(
        finish_with_usage(&lease, "confirmed: b = 2", usage, "openai:m"),
        "0",
        "dropped"
    );
    run("SELECT set_config('request.jwt.claims', '', true)");
    assert_eq!(
        text("SELECT owner || ' ' || tokens || ' ' || llm_requests FROM memory.owner_usage"),
        "alice 55 1"
    );
    assert_eq!(
        text("SELECT attempts_failed || ' ' || prompt_tokens || ' ' || completion_tokens \
                FROM memory.llm_usage WHERE summarizer = 'openai:m'"),
        "1 50 5"
    );
}
