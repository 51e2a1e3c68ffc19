// Identity and ownership: JWT and role identities, no existence oracle, what an owner is told.

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

/// current_identity() (Rust) answers as the SQL it replaced, from `_jwt_sub()` and
/// `_invoker()`: for odd claims (numbers, objects, duplicates, escapes, not an object), under
/// SET ROLE and without; malformed claims raise the same error.
#[pg_test]
fn current_identity_answers_as_its_sql_definition() {
    let sql = "SELECT CASE WHEN memory._jwt_sub() ~~ 'role:%' THEN NULL \
                    ELSE coalesce(memory._jwt_sub(), 'role:' || memory._invoker()) END";
    let claims = [
        "", "{}", r#"{"sub": "alice"}"#, r#"{"sub": "  bob  "}"#, r#"{"sub": "role:x"}"#,
        r#"{"sub": " role:x"}"#, r#"{"sub": "role:"}"#, r#"{"sub": "ROLE:x"}"#,
        r#"{"sub": "\tx"}"#, r#"{"sub": "\u00a0x"}"#, r#"{"sub": 42}"#, r#"{"sub": 1.50}"#,
        r#"{"sub": true}"#, r#"{"sub": {"a": [1]}}"#, r#"{"sub": null}"#,
        r#"{"sub": "a", "sub": "b"}"#, r#"{"s\u0075b": "esc"}"#,
        r#"{"sub": "\u00e9t\u00e9 \ud83d\ude00"}"#, "[1, 2]", r#""sub""#, r#"{"sub": " "}"#,
    ];
    run("CREATE ROLE \"Memory Test Other\"");
    run("SELECT memory.grant_usage('\"Memory Test Other\"')");
    // a definer function owned by another role: current_user changes, the invoker does not
    run("CREATE FUNCTION pg_temp.as_definer() RETURNS text LANGUAGE sql SECURITY DEFINER \
         AS 'SELECT memory.current_identity()'");
    run("CREATE ROLE memory_test_definer");
    run("SELECT memory.grant_usage('memory_test_definer')");
    run("ALTER FUNCTION pg_temp.as_definer() OWNER TO memory_test_definer");
    let contexts = [
        "RESET ROLE",
        "SET LOCAL ROLE \"Memory Test Other\"",
        "SET SESSION AUTHORIZATION \"Memory Test Other\"",
    ];
    for context in contexts {
        run(context);
        for c in claims {
            run(&format!(
                "SELECT set_config('request.jwt.claims', {}, true)",
                pgrx::spi::quote_literal(c)
            ));
            let expected = one::<String>(sql);
            assert_eq!(one::<String>("SELECT memory.current_identity()"), expected, "{context} {c}");
            assert_eq!(one::<String>("SELECT pg_temp.as_definer()"), expected, "{context} {c}");
        }
        for malformed in ["{\"sub\": ", " ", "{'sub': 1}"] {
            run(&format!(
                "SELECT set_config('request.jwt.claims', {}, true)",
                pgrx::spi::quote_literal(malformed)
            ));
            assert_eq!(error_of("SELECT memory.current_identity()"), error_of(sql), "{malformed}");
            assert_eq!(sqlstate("SELECT memory.current_identity()"), "22P02", "{malformed}");
        }
        assert_eq!(
            text("SELECT memory._invoker()::text"),
            if context.starts_with("RESET") { text("SELECT session_user::text") } else { "Memory Test Other".into() },
        );
    }
    run("RESET SESSION AUTHORIZATION");
}

/// _is_admin() (Rust: superusers and the admin role's members without a query) answers as the
/// catalog query it asks for the rest: for a superuser, the admin role's members (directly and
/// through another role), members of the extension owner and of a grant_admin() role, and
/// everyone else.
#[pg_test]
fn is_admin_answers_as_the_catalog() {
    let owner = text("SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'memory_ext'");
    run("DO $$ BEGIN IF to_regrole('service_role') IS NULL THEN CREATE ROLE service_role; END IF; END $$");
    for r in ["plain", "svc", "svc_nested", "ops", "via_owner"] {
        run(&format!("CREATE ROLE memory_test_{r}"));
        run(&format!("SELECT memory.grant_usage('memory_test_{r}')"));
    }
    run("GRANT service_role TO memory_test_svc");
    run("GRANT memory_test_svc TO memory_test_svc_nested");
    run("CREATE ROLE memory_test_ops_group");
    run("SELECT memory.grant_admin('memory_test_ops_group')");
    run("GRANT memory_test_ops_group TO memory_test_ops");
    run(&format!("GRANT {owner} TO memory_test_via_owner"));
    let cases = [
        ("", true),
        ("memory_test_plain", false),
        ("memory_test_svc", true),
        ("memory_test_svc_nested", true),
        ("memory_test_ops", true),
        ("memory_test_via_owner", true),
    ];
    for (role, expected) in cases {
        if !role.is_empty() {
            run(&format!("SET LOCAL ROLE {role}"));
        }
        assert_eq!(one::<bool>("SELECT memory._is_admin()"), Some(expected), "{role}");
        assert_eq!(one::<bool>("SELECT memory._is_admin_catalog()"), Some(expected), "{role}");
        run("RESET ROLE");
    }
}

/// _chat_id_problem() (Rust, plain ASCII ids itself) answers as the rules in SQL for every id,
/// at the ASCII boundaries and beyond them.
#[pg_test]
fn the_chat_id_check_answers_as_its_rules() {
    let ids = [
        "NULL".to_string(), "''".into(), "' '".into(), "'a'".into(), "'~'".into(), "'!x!'".into(),
        "' a'".into(), "'a '".into(), "'a b'".into(), "E'a\\tb'".into(), "E'a\\nb'".into(),
        "'a' || chr(127)".into(), "chr(31) || 'a'".into(), "'é'".into(), "'e' || chr(769)".into(),
        "'a' || chr(8203) || 'b'".into(), "chr(160) || 'a'".into(), "'日本語'".into(),
        format!("'{}'", "x".repeat(256)), format!("'{}'", "x".repeat(257)),
        format!("'{}'", "é".repeat(256)), format!("'{}'", "é".repeat(257)),
        format!("' {}'", "x".repeat(255)),
    ];
    for id in ids {
        assert_eq!(
            one::<String>(&format!("SELECT memory._chat_id_problem({id})")),
            one::<String>(&format!("SELECT memory._chat_id_rules({id})")),
            "{id}"
        );
    }
    // every ASCII character at the start, inside and at the end, at the length limits
    let differing = text(
        "SELECT coalesce(string_agg(format('%s:%s:%s', c, n, p), ' '), '') \
           FROM generate_series(1, 127) c, (VALUES (1), (2), (255), (256), (257)) v(n), \
                LATERAL (VALUES (1, chr(c) || repeat('x', n - 1)), (2, repeat('x', n - 1) || chr(c)), \
                                (3, 'x' || chr(c) || repeat('y', greatest(n - 2, 0)))) s(p, id) \
          WHERE memory._chat_id_problem(id) IS DISTINCT FROM memory._chat_id_rules(id)",
    );
    assert_eq!(differing, "", "(character:length:position) answered differently");
    assert_eq!(one::<String>("SELECT memory._chat_id_problem('ok-id')"), None);
    assert_eq!(
        one::<String>("SELECT memory._chat_id_problem(' x')").as_deref(),
        Some("must not contain control or invisible characters, nor start or end with whitespace")
    );
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

/// A snippet's owner is told the class of an error, never the provider's text (a masked key, an
/// organisation id); admins see it in full.
#[pg_test]
fn owners_see_the_error_class_admins_the_detail() {
    as_user("alice");
    let detail = "mock error: key sk-ab***1234 of org-42 was refused";
    let id = text(
        "SELECT queue_id::text FROM memory.enqueue('c1', 'mock_error: key sk-ab***1234 of org-42 was refused')",
    );
    run("SELECT memory.process_pending()");
    let status = format!("SELECT error_message FROM memory.status('{id}')");
    assert_eq!(text(&status), detail, "an admin sees the detail");
    become_app_role();
    as_user("alice");
    assert_eq!(text(&status), "the summarizer failed; it will be retried");
}
