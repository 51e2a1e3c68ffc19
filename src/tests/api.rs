// The SQL API one function at a time, bad input included: every error leaves nothing behind.

#[pg_test]
fn create_chat_rejects_bad_ids() {
    for bad in ["NULL", "''", "'   '", &format!("'{}'", "x".repeat(257))] {
        assert_eq!(sqlstate(&format!("SELECT memory.create_chat({bad})")), "22023", "{bad}");
    }
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 0);
    // the boundary: 256 characters, ASCII or not, is a valid id
    for good in ["x".repeat(256), format!("{} y", "é".repeat(254))] {
        assert_eq!(sqlstate(&format!("SELECT memory.create_chat('{good}')")), "ok", "{good}");
    }
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata"), 2);
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
fn count_tokens_matches_cl100k() {
    assert_eq!(one::<i32>("SELECT memory.count_tokens('hello world')"), Some(2));
    assert_eq!(one::<i32>("SELECT memory.count_tokens(NULL)"), None);
}

#[pg_test]
fn no_estimate_when_no_worker_serves_this_database() {
    // the test server's worker serves "postgres", not this database
    assert_eq!(
        one::<bool>("SELECT estimated_completion IS NULL FROM memory.enqueue('c1', 'x')"),
        Some(true)
    );
}

/// context(): the memory as prompt text, with get()'s ownership rules and errors, and a budget.
#[pg_test]
fn context_is_the_memory_as_prompt_text() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', E'confirmed: plan = PPO\\ninferred: budget = tight\\nCompares plans.')");
    assert_eq!(
        text("SELECT context FROM memory.context('c1')"),
        "",
        "nothing applied yet: an empty text"
    );
    assert_eq!(one::<i32>("SELECT pending FROM memory.context('c1')"), Some(1));
    run("SELECT memory.process_pending()");
    let full = text("SELECT context FROM memory.context('c1')");
    assert_eq!(
        full,
        "## Confirmed by the user\n- plan: PPO\n\n\
         ## Inferred (assumptions that may be wrong)\n- budget: tight\n\n\
         ## Conversation summary\nCompares plans."
    );
    assert_eq!(
        one::<bool>(
            "SELECT token_count = memory.count_tokens(context) AND NOT truncated AND version = 1 \
                    AND pending = 0 AND NOT needs_new_chat FROM memory.context('c1')"
        ),
        Some(true)
    );
    // a budget one token short drops the inferred fact first, and says so
    assert_eq!(
        one::<bool>(
            "SELECT truncated AND token_count < c.n AND position('budget' in context) = 0 \
                    AND position('plan: PPO' in context) > 0 \
               FROM (SELECT token_count AS n FROM memory.context('c1')) c, \
                    memory.context('c1', c.n - 1)"
        ),
        Some(true)
    );
    // the worker's rendering is what context() renders itself, budget or not
    assert_eq!(
        text("SELECT context_text FROM memory.chat_metadata WHERE chat_id = 'c1'"),
        full
    );
    run("UPDATE memory.chat_metadata SET context_text = NULL, context_tokens = NULL");
    assert_eq!(text("SELECT context FROM memory.context('c1')"), full);
    assert_eq!(
        one::<bool>(
            "SELECT truncated AND position('budget' in context) = 0                FROM (SELECT token_count AS n FROM memory.context('c1')) c,                     memory.context('c1', c.n - 1)"
        ),
        Some(true)
    );
    // over the token limit: the guidance closes the text, as get() words it
    run("UPDATE memory.chat_metadata SET needs_new_chat = true");
    assert_eq!(
        one::<bool>(
            "SELECT x.needs_new_chat AND x.context LIKE '%## Guidance\n' || g.guidance                FROM memory.context('c1') x, memory.get('c1') g"
        ),
        Some(true)
    );
    for bad in ["0", "-5"] {
        assert_eq!(sqlstate(&format!("SELECT * FROM memory.context('c1', {bad})")), "22023");
    }
    assert_eq!(sqlstate("SELECT * FROM memory.context(NULL)"), "22023");
    assert_eq!(sqlstate("SELECT * FROM memory.context('nope')"), "P0002");
    become_app_role();
    as_user("bob");
    assert_eq!(sqlstate("SELECT * FROM memory.context('c1')"), "P0002", "reads as missing");
}

/// Text in any language round-trips unchanged: enqueue, the mock, get() and context().
#[pg_test]
fn non_ascii_text_round_trips_unchanged() {
    as_user("alice");
    run("SELECT memory.enqueue('c1', E'confirmed: 都市 = 東京\\ninferred: orçamento = apertado\\nA usuária procura um plano 😊')");
    run("SELECT memory.process_pending()");
    assert_eq!(
        text("SELECT user_confirmed::text || llm_inferred::text || general_summary FROM memory.get('c1')"),
        r#"{"都市": "東京"}{"orçamento": "apertado"}A usuária procura um plano 😊"#
    );
    assert_eq!(
        text("SELECT context FROM memory.context('c1')"),
        "## Confirmed by the user\n- 都市: 東京\n\n\
         ## Inferred (assumptions that may be wrong)\n- orçamento: apertado\n\n\
         ## Conversation summary\nA usuária procura um plano 😊"
    );
}
