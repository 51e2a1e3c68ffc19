// memory.watch(): rows inserted into an app's own table become snippets of their chat.

/// A Supabase-style message table, watched with owner and role columns; the API role may insert.
fn watched_messages(owner: bool, role: bool) {
    run("CREATE TABLE public.messages (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             conversation_id text NOT NULL, user_id text, role text, content text)");
    run(&format!(
        "SELECT memory.watch('public.messages', 'conversation_id', 'content', {}, {})",
        if owner { "'user_id'" } else { "NULL" },
        if role { "'role'" } else { "NULL" },
    ));
}

fn snippets(chat: &str) -> Vec<String> {
    Spi::connect(|c| {
        c.select(
            // queued, or captured and waiting in the inbox for the next claim to move it
            "SELECT s FROM (SELECT new_context_snippet AS s, seq FROM memory.chat_context_queue
                             WHERE chat_id = $1
                            UNION ALL
                            SELECT snippet, seq FROM memory.capture_inbox WHERE chat_id = $1) x
              ORDER BY seq",
            None,
            &[chat.into()],
        )
        .unwrap()
        .map(|r| r.get::<String>(1).unwrap().unwrap())
        .collect()
    })
}

#[pg_test]
fn watch_a_multi_row_insert_enqueues_in_row_order() {
    watched_messages(true, true);
    run("INSERT INTO public.messages (conversation_id, user_id, role, content) VALUES
           ('c1', 'alice', 'user', 'I moved to Lisbon'),
           ('c2', 'bob', 'user', 'hello'),
           ('c1', 'alice', 'assistant', 'Noted: Lisbon.'),
           ('c1', 'alice', NULL, 'no role'),
           ('c1', 'alice', 'user', '  '),
           ('c1', 'alice', 'user', NULL)");
    assert_eq!(
        snippets("c1"),
        ["user: I moved to Lisbon", "assistant: Noted: Lisbon.", "no role"]
    );
    assert_eq!(snippets("c2"), ["user: hello"]);
    // The first row of each chat created it (through the queue); the later rows of c1 found it
    // theirs and wait in the inbox until a claim of the chat moves them, with their audit rows,
    // keeping id and seq.
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 2);
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 2);
    assert_eq!(text("SELECT memory._take_captured(ARRAY['c1', 'c2'])::text"), "2");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 4);
    assert_eq!(
        snippets("c1"),
        ["user: I moved to Lisbon", "assistant: Noted: Lisbon.", "no role"]
    );
    // each chat belongs to its rows' owner, is due, and every snippet is audited
    assert_eq!(
        text("SELECT string_agg(chat_id || '=' || owner, ',' ORDER BY chat_id)
                FROM memory.chat_metadata WHERE due_at IS NOT NULL"),
        "c1=alice,c2=bob"
    );
    assert_eq!(
        count("SELECT 1 FROM memory.audit_log WHERE action = 'enqueue'
                  AND detail = 'watch:public.messages'"),
        4
    );
    assert_eq!(
        text("SELECT detail FROM memory.audit_log WHERE action = 'watch_skipped'"),
        "watch:public.messages: 2 of 6 rows without a text or a valid chat id"
    );
    assert_eq!(
        text("SELECT string_agg(DISTINCT trigger_source, ',') FROM memory.chat_context_queue"),
        "watch:public.messages"
    );
}

/// Captured rows are ordinary snippets: the summarizer applies them in order, and get() and
/// context() show the result to the row's owner.
#[pg_test]
fn watch_captured_rows_are_summarized_like_enqueued_ones() {
    watched_messages(true, false);
    run("INSERT INTO public.messages (conversation_id, user_id, content) VALUES
           ('c1', 'alice', 'confirmed: city = Lisboa'), ('c1', 'alice', 'Olá, tudo bem? 🙂')");
    run("INSERT INTO public.messages (conversation_id, user_id, content)
         VALUES ('c1', 'alice', 'confirmed: city = Porto')");
    run("SELECT memory.process_pending()");
    as_user("alice");
    assert_eq!(
        text("SELECT user_confirmed->>'city' || ' / ' || general_summary FROM memory.get('c1')"),
        "Porto / Olá, tudo bem? 🙂"
    );
}

/// A captured row of an existing chat waits in memory.capture_inbox until the chat is next held
/// (a claim, a finish, forget): meanwhile it is pending everywhere a queued one would be.
#[pg_test]
fn watch_captured_rows_in_the_inbox_are_pending_and_can_be_erased() {
    watched_messages(false, false);
    run("SELECT memory.create_chat('c')");
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('c', 'one'), ('c', 'two')");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 2);
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 0);
    assert_eq!(text("SELECT pending::text FROM memory.get('c')"), "2");
    assert_eq!(text("SELECT pending::text FROM memory.context('c')"), "2");
    assert_eq!(
        text("SELECT count::text FROM memory.queue_stats WHERE status = 'pending_summarization'"),
        "2"
    );
    let two = text("SELECT id::text FROM memory.capture_inbox WHERE snippet = 'two'");
    assert_eq!(
        text(&format!("SELECT status FROM memory.status('{two}')")),
        "pending_summarization"
    );
    // erasing it moves the chat's captured rows into the queue first, then erases it there
    run(&format!("SELECT memory.forget_snippet('{two}')"));
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
    assert_eq!(snippets("c"), ["one"]);
    assert_eq!(sqlstate(&format!("SELECT memory.status('{two}')")), "P0002");
    // forget() erases captured rows with the chat, audited as enqueued first
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('c', 'three')");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 1);
    let three = text("SELECT id::text FROM memory.capture_inbox");
    run("SELECT memory.forget('c')");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 0);
    assert_eq!(
        count(&format!(
            "SELECT 1 FROM memory.audit_log WHERE action = 'enqueue' AND queue_id = '{three}'"
        )),
        1
    );
    // a chat deleted directly (an admin with table rights) takes its captured rows along: they
    // can never reach a later chat of the same id, whoever creates it
    run("SELECT memory.create_chat('d')");
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('d', 'private')");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 1);
    run("DELETE FROM memory.chat_metadata WHERE chat_id = 'd'");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
}

/// wait() on a captured row of the caller's own transaction refuses at once (55000), as for an
/// enqueued one: nothing can complete it before COMMIT.
#[pg_test]
fn watch_wait_on_a_row_captured_in_this_transaction_is_refused() {
    watched_messages(false, false);
    run("SELECT memory.create_chat('c')");
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('c', 'one')");
    let one = text("SELECT id::text FROM memory.capture_inbox");
    assert_eq!(
        sqlstate(&format!("SELECT memory.wait('{one}', '1 second')")),
        "55000"
    );
}

/// The budget deferral takes a deferred chat's captured rows into the queue first, so they are
/// held and marked like its queued ones, and a raised budget resumes them.
#[pg_test]
fn watch_captured_rows_of_an_owner_over_budget_are_deferred_with_the_chat() {
    watched_messages(true, false);
    as_user("alice");
    run("SELECT memory.create_chat('a1')");
    run("SELECT set_config('request.jwt.claims', '', true)");
    run("INSERT INTO public.messages (conversation_id, user_id, content)
         VALUES ('a1', 'alice', 'confirmed: a = 1')");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 1);
    run("SELECT memory._record_owner_usage('a1', \
           '{\"llm_requests\": 1, \"prompt_tokens\": 1000, \"completion_tokens\": 0}')");
    run("SET LOCAL memory_ext.owner_daily_tokens = 1000");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(0));
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
    assert_eq!(
        count("SELECT 1 FROM memory.chat_context_queue WHERE chat_id = 'a1' \
                 AND next_attempt_at = memory._utc_tomorrow() AND error_public IS NOT NULL"),
        1
    );
    run("SELECT memory.set_owner_budget('alice', 5000)");
    assert_eq!(one::<i32>("SELECT memory.process_pending()"), Some(1));
}

/// memory._capture() is only a statement trigger with a NEW TABLE, as watch() creates it.
#[pg_test]
fn watch_the_capture_function_refuses_other_trigger_uses() {
    run("CREATE TABLE public.other (chat text, body text)");
    run("CREATE TRIGGER t AFTER INSERT ON public.other FOR EACH ROW
         EXECUTE FUNCTION memory._capture('chat', 'body', '', '')");
    assert_eq!(sqlstate("INSERT INTO public.other VALUES ('c', 'x')"), "0A000");
    run("DROP TRIGGER t ON public.other");
    run("CREATE TRIGGER t AFTER INSERT ON public.other REFERENCING NEW TABLE AS n
         FOR EACH STATEMENT EXECUTE FUNCTION memory._capture('chat')");
    assert_eq!(sqlstate("INSERT INTO public.other VALUES ('c', 'x')"), "22023");
    assert_eq!(count("SELECT 1 FROM memory.capture_inbox"), 0);
}

/// A chat's owner comes from the owner column, and a user inserting rows writes only as itself
/// into its own chats: other rows are skipped (the insert succeeds) and audited as denied.
#[pg_test]
fn watch_a_user_cannot_capture_into_another_owners_chat() {
    watched_messages(true, false);
    run("INSERT INTO public.messages (conversation_id, user_id, content)
         VALUES ('bobs', 'bob', 'bob''s secret')");
    become_app_role();
    run("RESET ROLE");
    run("GRANT INSERT ON public.messages TO memory_test_app");
    run("SET LOCAL ROLE memory_test_app");
    as_user("alice");
    run("INSERT INTO public.messages (conversation_id, user_id, content) VALUES
           ('bobs', 'bob', 'posing as bob'),
           ('bobs', 'alice', 'into bob''s chat'),
           ('new', 'bob', 'a new chat for bob'),
           ('mine', 'alice', 'mine'),
           ('mine2', NULL, 'no owner value: the inserting identity')");
    run("RESET ROLE");
    assert_eq!(snippets("bobs"), ["bob's secret"]);
    assert_eq!(snippets("mine"), ["mine"]);
    assert_eq!(snippets("mine2"), ["no owner value: the inserting identity"]);
    // a request whose JWT has no usable sub owns nothing: no chat is created for it
    run("SET LOCAL ROLE memory_test_app");
    run(r#"SELECT set_config('request.jwt.claims', '{"role": "authenticated"}', true)"#);
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('nosub', 'x')");
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata WHERE chat_id = 'nosub'"), 0);
    assert_eq!(count("SELECT 1 FROM memory.chat_metadata WHERE chat_id = 'new'"), 0);
    assert_eq!(
        text("SELECT string_agg(chat_id || ':' || identity || ':' || detail, ' | ' ORDER BY chat_id)
                FROM memory.audit_log WHERE action = 'denied:watch'"),
        "bobs:alice:watch:public.messages: 2 rows not captured (another owner's chat, or not \
         the inserting identity's row) | new:alice:watch:public.messages: 1 rows not captured \
         (another owner's chat, or not the inserting identity's row) | \
         nosub:role:memory_test_app:watch:public.messages: 1 rows not captured (another \
         owner's chat, or not the inserting identity's row)"
    );
}

/// An admin (a backend with the service role) writes rows into their owner's chats; without an
/// owner column, the inserting identity owns new chats and an admin may write into any chat.
#[pg_test]
fn watch_admins_capture_on_the_owners_behalf() {
    watched_messages(true, false);
    run("INSERT INTO public.messages (conversation_id, user_id, content) VALUES
           ('c1', 'alice', 'from alice'), ('c1', 'bob', 'bob into alice''s chat')");
    assert_eq!(snippets("c1"), ["from alice"]);
    assert_eq!(count("SELECT 1 FROM memory.audit_log WHERE action = 'denied:watch'"), 1);
    run("SELECT memory.unwatch('public.messages')");
    run("SELECT memory.watch('public.messages', 'conversation_id', 'content')");
    run("INSERT INTO public.messages (conversation_id, user_id, content) VALUES
           ('c1', 'bob', 'an admin writes into any chat'), ('c9', 'bob', 'new')");
    assert_eq!(snippets("c1"), ["from alice", "an admin writes into any chat"]);
    assert_eq!(
        text("SELECT owner FROM memory.chat_metadata WHERE chat_id = 'c9'"),
        text("SELECT 'role:' || current_user")
    );
}

/// A text over memory_ext.max_snippet_bytes is cut at a character boundary, not refused: the
/// app's insert must not fail because memory cannot take a row.
#[pg_test]
fn watch_an_oversized_text_is_cut_to_the_limit() {
    watched_messages(true, true);
    let max = one::<i32>("SELECT memory._max_snippet_bytes()").unwrap();
    // "é" is two bytes: "user: " (6) + 'é' × (max/2) is over the limit by 6 bytes
    run(&format!(
        "INSERT INTO public.messages (conversation_id, user_id, role, content)
         VALUES ('c1', 'alice', 'user', repeat('é', {}))",
        max / 2
    ));
    let s = &snippets("c1")[0];
    assert!(s.len() <= max as usize && s.len() > max as usize - 2, "{}", s.len());
    assert!(s.starts_with("user: éé") && s.ends_with('é'));
}

#[pg_test]
fn watch_insert_select_is_captured() {
    watched_messages(true, false);
    run("INSERT INTO public.messages (conversation_id, user_id, content)
         SELECT 'c1', 'alice', 'line ' || i FROM generate_series(1, 50) i");
    let got = snippets("c1");
    assert_eq!(got.len(), 50);
    assert!(got.iter().enumerate().all(|(i, s)| *s == format!("line {}", i + 1)));
}

#[pg_test]
fn watch_errors() {
    run("CREATE TABLE public.t (chat text, body text, n int)");
    run("CREATE VIEW public.v AS SELECT * FROM public.t");
    for (sql, state) in [
        ("SELECT memory.watch('public.v', 'chat', 'body')", "42809"),
        ("SELECT memory.watch('public.t', 'chat', 'nope')", "42703"),
        ("SELECT memory.watch('public.t', 'chat', 'body', 'nope')", "42703"),
        ("SELECT memory.watch('public.t', 'chat', 'chat')", "22023"),
        ("SELECT memory.watch(NULL, 'chat', 'body')", "22023"),
        ("SELECT memory.watch('public.t', NULL, 'body')", "22023"),
        ("SELECT memory.watch('memory.chat_metadata', 'chat_id', 'owner')", "22023"),
        ("SELECT memory.watch('public.nope', 'chat', 'body')", "42P01"),
        ("SELECT memory.unwatch('public.t')", "22023"),
    ] {
        assert_eq!(sqlstate(sql), state, "{sql}");
    }
    run("CREATE FUNCTION public.tf() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'");
    run("CREATE TRIGGER memory_ext_capture AFTER INSERT ON public.t
         FOR EACH STATEMENT EXECUTE FUNCTION public.tf()");
    assert_eq!(sqlstate("SELECT memory.watch('public.t', 'chat', 'body')"), "42710");
    assert_eq!(count("SELECT 1 FROM memory.watched"), 0);
    assert_eq!(count("SELECT 1 FROM memory.audit_log"), 0, "a refused call writes nothing");
}

/// Only admins watch, and only tables they could put a trigger on and read (watching copies the
/// columns into memory, which admins read).
#[pg_test]
fn only_admins_with_the_tables_rights_watch() {
    run("CREATE TABLE public.t (chat text, body text, secret text)");
    become_app_role();
    assert_eq!(sqlstate("SELECT memory.watch('public.t', 'chat', 'body')"), "42501");
    run("RESET ROLE");
    run("CREATE ROLE memory_test_admin");
    run("SELECT memory.grant_admin('memory_test_admin')");
    run("SET LOCAL ROLE memory_test_admin");
    assert_eq!(sqlstate("SELECT memory.watch('public.t', 'chat', 'body')"), "42501");
    run("RESET ROLE");
    run("GRANT TRIGGER ON public.t TO memory_test_admin");
    run("GRANT SELECT (chat, body) ON public.t TO memory_test_admin");
    run("SET LOCAL ROLE memory_test_admin");
    assert_eq!(sqlstate("SELECT memory.watch('public.t', 'chat', 'secret')"), "42501");
    assert_eq!(sqlstate("SELECT memory.watch('public.t', 'chat', 'body')"), "ok");
    assert_eq!(
        text("SELECT source::text || ' ' || chat_column || ' ' || text_column FROM memory.watched"),
        "t chat body"
    );
    run("RESET ROLE");
    run("SET LOCAL ROLE memory_test_app");
    assert_eq!(sqlstate("SELECT memory.unwatch('public.t')"), "42501");
    assert_eq!(sqlstate("SELECT 1 FROM memory.watched"), "42501");
    run("RESET ROLE");
    assert_eq!(count("SELECT 1 FROM memory.watched"), 1);
}

#[pg_test]
fn unwatch_and_drop_table_stop_the_capture() {
    watched_messages(false, false);
    run("SELECT memory.watch('public.messages', 'conversation_id', 'content', 'user_id', 'role')");
    assert_eq!(
        text("SELECT concat_ws(',', chat_column, text_column, owner_column, role_column, enabled)
                FROM memory.watched"),
        "conversation_id,content,user_id,role,t",
        "watching again replaces the columns"
    );
    run("SELECT memory.unwatch('public.messages')");
    run("INSERT INTO public.messages (conversation_id, content) VALUES ('c1', 'not captured')");
    assert_eq!(count("SELECT 1 FROM memory.chat_context_queue"), 0);
    assert_eq!(count("SELECT 1 FROM memory.watched"), 0);
    run("SELECT memory.watch('public.messages', 'conversation_id', 'content')");
    run("DROP TABLE public.messages");
    assert_eq!(count("SELECT 1 FROM memory.watched"), 0);
    assert_eq!(
        text("SELECT string_agg(action, ',' ORDER BY at) FROM memory.audit_log"),
        "watch,watch,unwatch,watch"
    );
}
