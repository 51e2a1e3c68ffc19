// Correcting and erasing memory: rollback() and forget_owner().

fn memory_of(chat: &str) -> String {
    text(&format!(
        "SELECT user_confirmed::text || ' ' || llm_inferred::text || ' ' || general_summary \
           FROM memory.get('{chat}')"
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
    let late = format!(
        "SELECT memory._finish(jsonb_build_array(jsonb_build_object('chat_id', 'c1', \
           'lease_token', '{lease}', 'applied_ids', (SELECT jsonb_agg(id) FROM \
           memory.chat_context_queue WHERE new_context_snippet = 'confirmed: b = 2'), \
           'user_confirmed', '{{\"b\": \"late\"}}'::jsonb, 'llm_inferred', '{{}}'::jsonb, \
           'general_summary', '', 'token_count', 1, 'needs_new_chat', false, 'dead', '[]'::jsonb, \
           'failure', null, 'usage', '{{}}'::jsonb)), 'test', 5, 0, 0) ->> 'applied'"
    );
    assert_eq!(text(&late), "0", "the lease was called off");
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
