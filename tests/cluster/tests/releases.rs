//! Releases: `ALTER EXTENSION memory_ext UPDATE` from every released version keeps every row and
//! leaves the catalog exactly as a fresh install makes it; pg_dump/pg_restore keeps every chat;
//! pg_upgrade to a newer PostgreSQL major keeps them and the worker resumes.

use memory_ext_cluster_tests::{Cluster, applied_ids, enqueue, enqueued_ids, pg_bin, text, wait};
use postgres::Client;
use std::time::Duration;

/// Everything memory_ext defines, one line per property (tests/cluster/sql/catalog.sql).
const CATALOG: &str = include_str!("../sql/catalog.sql");

/// The rows of every table pg_dump saves, as JSON, in a stable order.
const DUMPED_ROWS: &str = "SELECT json_build_object(
    'chats', (SELECT json_agg(c ORDER BY c.chat_id) FROM memory.chat_metadata c),
    'queue', (SELECT json_agg(q ORDER BY q.seq) FROM memory.chat_context_queue q),
    'history', (SELECT json_agg(h ORDER BY h.chat_id, h.version) FROM memory.chat_memory_history h),
    'audit', (SELECT json_agg(a ORDER BY a.at, a.action) FROM memory.audit_log a),
    'usage', (SELECT json_agg(u ORDER BY u.day, u.summarizer) FROM memory.llm_usage_daily u),
    'admins', (SELECT json_agg(r ORDER BY r.role) FROM memory.admin_roles r),
    'seq', (SELECT last_value FROM memory.chat_context_queue_seq))::text";

/// What an update must not change, whatever columns it adds (owners are checked on their own).
const KEPT_ROWS: &str = "SELECT json_build_object(
    'chats', (SELECT json_agg(json_build_array(c.chat_id, c.user_confirmed, c.llm_inferred,
                 c.general_summary, c.token_count, c.version, c.created_at) ORDER BY c.chat_id)
                FROM memory.chat_metadata c),
    'queue', (SELECT json_agg(json_build_array(q.id, q.seq, q.chat_id, q.new_context_snippet,
                 q.status, q.retry_count, q.error_message, q.created_at) ORDER BY q.seq)
                FROM memory.chat_context_queue q),
    'history', (SELECT json_agg(to_jsonb(h) - ARRAY['restored_version', 'cached_prompt_tokens',
                                                     'cache_write_tokens', 'rebuilt']
                                ORDER BY h.chat_id, h.version)
                  FROM memory.chat_memory_history h),
    'audit', (SELECT json_agg(a ORDER BY a.at, a.action) FROM memory.audit_log a),
    'usage', (SELECT json_agg(to_jsonb(u) - ARRAY['cached_prompt_tokens', 'cache_write_tokens']
                              ORDER BY u.day, u.summarizer) FROM memory.llm_usage_daily u),
    'admins', (SELECT json_agg(r ORDER BY r.role) FROM memory.admin_roles r))::text";

fn catalog(c: &mut Client) -> Vec<String> {
    c.query(CATALOG, &[])
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} | {} | {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect()
}

/// Panic with the lines that differ (not two 1,600-line lists).
fn assert_same_catalog(left: &[String], right: &[String], what: &str) {
    let only_left: Vec<&String> = left.iter().filter(|l| !right.contains(l)).collect();
    let only_right: Vec<&String> = right.iter().filter(|l| !left.contains(l)).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty() && !left.is_empty(),
        "{what}: catalogs differ\n--- only in the first ---\n{}\n--- only in the second ---\n{}",
        only_left
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        only_right
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Supabase's roles, an API role and an admin role (cluster-wide).
fn create_roles(c: &mut Client) {
    c.batch_execute(
        "CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN;
         CREATE ROLE service_role NOLOGIN; CREATE ROLE api NOLOGIN; CREATE ROLE ops NOLOGIN;",
    )
    .unwrap();
}

fn db_error(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} ({})", d.message(), d.code().code()))
        .unwrap_or_else(|| e.to_string())
}

fn as_role(c: &mut Client, role: &str, sql: &str) {
    c.batch_execute(&format!("BEGIN; SET LOCAL ROLE {role}; {sql}; COMMIT;"))
        .unwrap_or_else(|e| panic!("as {role}: {sql}: {}", db_error(&e)));
}

fn as_jwt_user(c: &mut Client, sub: &str, sql: &str) {
    c.batch_execute(&format!(
        "BEGIN; SET LOCAL ROLE authenticated;
         SELECT set_config('request.jwt.claims', '{{\"sub\": \"{sub}\"}}', true); {sql}; COMMIT;"
    ))
    .unwrap_or_else(|e| panic!("as {sub}: {sql}: {}", db_error(&e)));
}

/// pg_dump -Fc database `db`, restore it into a new database `into` (pg_restore must succeed),
/// and check both hold the same rows and catalog.
fn dump_and_restore(pg: &Cluster, db: &str, into: &str) {
    let file = pg.dir.join(format!("{db}.dump")).display().to_string();
    pg.run("pg_dump", &["-Fc", "-f", &file, db]);
    pg.run("createdb", &[into]);
    pg.run("pg_restore", &["--exit-on-error", "-d", into, &file]);
    let mut source = pg.client_db(db);
    let mut restored = pg.client_db(into);
    assert_eq!(
        text(&mut restored, DUMPED_ROWS),
        text(&mut source, DUMPED_ROWS),
        "the restored database holds other rows than the dumped one"
    );
    assert_same_catalog(
        &catalog(&mut source),
        &catalog(&mut restored),
        "dumped vs restored",
    );
}

/// A 0.1.0 database as its users left it: chats of a role and of a JWT user, snippets in every
/// status (one 'processing' under the lease of a worker that is gone), history, usage, audit.
fn fill_0_1_0(c: &mut Client) {
    c.batch_execute("SELECT memory.grant_usage('api'); SELECT memory.grant_admin('ops');")
        .unwrap();
    as_role(
        c,
        "api",
        "SELECT memory.create_chat('c-role');
         SELECT memory.enqueue('c-role', 'confirmed: plan = PPO');
         SELECT memory.enqueue('c-role', 'inferred: budget = tight');
         SELECT memory.enqueue('c-role', 'The user compares plans.');
         SELECT memory.enqueue('c-role', 'confirmed: city = Lyon');
         SELECT memory.enqueue('c-role', 'confirmed: pet = cat')",
    );
    as_jwt_user(
        c,
        "user-1",
        "SELECT memory.enqueue('c-jwt', 'confirmed: language = Rust');
         SELECT memory.enqueue('c-jwt', 'The user writes an extension.')",
    );
    // What the 0.1.0 worker left: the first snippet applied (with its history version), the
    // second failed for good, the third claimed by a worker that died (lease expired).
    c.batch_execute(
        "WITH first AS (SELECT id FROM memory.chat_context_queue WHERE chat_id = 'c-role' ORDER BY seq LIMIT 1)
         UPDATE memory.chat_context_queue SET status = 'complete', processed_at = now()
          WHERE id IN (SELECT id FROM first);
         UPDATE memory.chat_metadata SET user_confirmed = '{\"plan\": \"PPO\"}', version = 1,
                general_summary = 'compares plans', token_count = 9 WHERE chat_id = 'c-role';
         INSERT INTO memory.chat_memory_history (chat_id, version, queue_ids, old_user_confirmed,
                old_llm_inferred, old_general_summary, user_confirmed, llm_inferred, general_summary,
                token_count, summarizer)
         SELECT 'c-role', 1, array_agg(id), '{}', '{}', '', '{\"plan\": \"PPO\"}', '{}',
                'compares plans', 9, 'mock'
           FROM (SELECT id FROM memory.chat_context_queue WHERE chat_id = 'c-role' ORDER BY seq LIMIT 1) f;
         UPDATE memory.chat_context_queue SET status = 'failed', retry_count = 5,
                error_message = 'HTTP 401 from api.openai.com: invalid key sk-...abcd', processed_at = now()
          WHERE id = (SELECT id FROM memory.chat_context_queue WHERE chat_id = 'c-role' ORDER BY seq OFFSET 1 LIMIT 1);
         UPDATE memory.chat_context_queue SET status = 'processing', claim_token = gen_random_uuid(),
                claimed_at = now() - interval '10 minutes', lease_expires_at = now() - interval '5 minutes'
          WHERE id = (SELECT id FROM memory.chat_context_queue WHERE chat_id = 'c-role' ORDER BY seq OFFSET 2 LIMIT 1);
         UPDATE memory.chat_metadata SET lease_token = gen_random_uuid(), lease_owner = 999999,
                lease_owner_start = now() - interval '1 hour', lease_until = now() - interval '5 minutes'
          WHERE chat_id = 'c-role';
         INSERT INTO memory.llm_usage_daily (day, summarizer, batches_applied, attempts_failed, llm_requests)
         VALUES (current_date - 1, 'openai:gpt-4o-mini', 3, 7, 3);",
    )
    .unwrap();
}

/// A started cluster with memory_ext 0.1.0 holding `fill_0_1_0`'s rows.
fn cluster_at_0_1_0(name: &str) -> (Cluster, Client) {
    let pg = Cluster::init(name, &[], true, &pg_bin(), &[]);
    pg.ctl("start");
    let mut c = pg.client();
    create_roles(&mut c);
    c.batch_execute("CREATE EXTENSION memory_ext VERSION '0.1.0'")
        .unwrap();
    fill_0_1_0(&mut c);
    (pg, c)
}

/// 0.1.0's retention deleted applied snippets: after the update such a chat is marked pruned
/// (its memory cannot be re-derived: rebuild() refuses), a chat with all its snippets is not.
#[test]
fn updating_marks_chats_whose_applied_snippets_retention_deleted() {
    let (_pg, mut c) = cluster_at_0_1_0("upgrade_pruned");
    c.batch_execute(
        "DELETE FROM memory.chat_context_queue WHERE chat_id = 'c-role' AND status = 'complete';
         ALTER EXTENSION memory_ext UPDATE;",
    )
    .unwrap();
    assert_eq!(
        text(
            &mut c,
            "SELECT string_agg(chat_id || '=' || (pruned_at IS NOT NULL), ',' ORDER BY chat_id) \
               FROM memory.chat_metadata"
        ),
        "c-jwt=false,c-role=true"
    );
    let e = c
        .execute("SELECT memory.rebuild('c-role')", &[])
        .unwrap_err();
    assert_eq!(
        e.code().map(|s| s.code()),
        Some("55000"),
        "{}",
        db_error(&e)
    );
}

#[test]
fn updating_from_0_1_0_keeps_every_row_and_ends_equal_to_a_fresh_install() {
    let (pg, mut c) = cluster_at_0_1_0("upgrade");
    // The 0.2.0 worker does not touch a 0.1.0 schema: it waits, and says why.
    pg.eventually(
        &mut c,
        "SELECT state LIKE 'waiting for ALTER EXTENSION memory_ext UPDATE%' FROM memory.worker_status()",
        "the worker waiting for the update",
        Duration::from_secs(30),
    );
    let before = text(&mut c, KEPT_ROWS);

    // Checked in the update's own transaction, before the worker can see (and change) it.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("ALTER EXTENSION memory_ext UPDATE")
        .unwrap();
    let after: String = tx.query_one(KEPT_ROWS, &[]).unwrap().get(0);
    let owners: String = tx
        .query_one(
            "SELECT string_agg(chat_id || '=' || owner, ',' ORDER BY chat_id) FROM memory.chat_metadata",
            &[],
        )
        .unwrap()
        .get(0);
    let pruned: String = tx
        .query_one(
            "SELECT string_agg(chat_id || '=' || (pruned_at IS NOT NULL), ',' ORDER BY chat_id) \
               FROM memory.chat_metadata",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert_eq!(after, before, "ALTER EXTENSION UPDATE changed rows");
    assert_eq!(
        pruned, "c-jwt=false,c-role=false",
        "every applied snippet is still there"
    );
    assert_eq!(
        owners, "c-jwt=user-1,c-role=role:api",
        "a role's chats move to its role: identity, a JWT user's stay"
    );

    // The worker resumes: the pending and the orphaned 'processing' snippets are applied, in
    // order, after the one applied under 0.1.0; the failed one stays failed.
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing')",
        "every snippet applied after the update",
        Duration::from_secs(30),
    );
    let ids: Vec<String> = c
        .query(
            "SELECT id::text FROM memory.chat_context_queue WHERE chat_id = 'c-role' AND status = 'complete' ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(applied_ids(&mut c, "c-role"), ids);
    assert_eq!(
        text(
            &mut c,
            "SELECT user_confirmed::text FROM memory.chat_metadata WHERE chat_id = 'c-role'"
        ),
        r#"{"pet": "cat", "city": "Lyon", "plan": "PPO"}"#
    );

    // The API works for the role and the JWT user, on their own chats.
    as_role(
        &mut c,
        "api",
        "DO $$ BEGIN ASSERT (SELECT user_confirmed ->> 'city' FROM memory.get('c-role')) = 'Lyon'; END $$",
    );
    as_jwt_user(
        &mut c,
        "user-1",
        "DO $$ BEGIN ASSERT (SELECT user_confirmed ->> 'language' FROM memory.get('c-jwt')) = 'Rust'; END $$",
    );
    let id = enqueue(&mut c, "c-role", "confirmed: color = green");
    assert_eq!(wait(&mut c, &id), "complete");
    let failed = text(
        &mut c,
        "SELECT id::text FROM memory.chat_context_queue WHERE status = 'failed'",
    );
    as_role(
        &mut c,
        "api",
        &format!(
            "DO $$ BEGIN ASSERT (SELECT error_message FROM memory.status('{failed}'))
                                = 'the summarization failed'; END $$"
        ),
    );

    // The catalog equals a fresh install's with the same grants.
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = pg.client_db("fresh");
    fresh
        .batch_execute(
            "CREATE EXTENSION memory_ext;
             SELECT memory.grant_usage('api'); SELECT memory.grant_admin('ops');",
        )
        .unwrap();
    assert_same_catalog(
        &catalog(&mut c),
        &catalog(&mut fresh),
        "updated from 0.1.0 vs fresh 0.2.0",
    );

    // A dump of the updated database restores, and its grants work there.
    dump_and_restore(&pg, "postgres", "restored");
    let mut restored = pg.client_db("restored");
    as_role(
        &mut restored,
        "api",
        "DO $$ BEGIN ASSERT memory.current_identity() = 'role:api';
                     ASSERT (SELECT user_confirmed ->> 'color' FROM memory.get('c-role')) = 'green'; END $$",
    );
}

#[test]
fn a_dump_of_a_supabase_database_restores_every_chat() {
    let pg = Cluster::init("dump", &[], true, &pg_bin(), &[]);
    pg.ctl("start");
    let mut c = pg.client();
    create_roles(&mut c);
    c.batch_execute(
        "CREATE EXTENSION memory_ext;
         SELECT memory.grant_usage('api'); SELECT memory.grant_admin('ops');",
    )
    .unwrap();
    as_role(
        &mut c,
        "api",
        "SELECT memory.enqueue('c-1', 'confirmed: plan = PPO');
         SELECT memory.enqueue('c-1', 'inferred: budget = tight')",
    );
    as_jwt_user(
        &mut c,
        "user-1",
        "SELECT memory.enqueue('c-2', 'confirmed: language = Rust')",
    );
    // a watched app table: its trigger is dumped with the table, after the data
    c.batch_execute(
        "CREATE TABLE public.messages (chat text, body text);
         SELECT memory.watch('public.messages', 'chat', 'body');
         INSERT INTO public.messages VALUES ('m-1', 'captured before the dump');",
    )
    .unwrap();
    let failed = enqueue(&mut c, "c-3", "mock_fatal: refused");
    assert_eq!(wait(&mut c, &failed), "failed");
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status <> 'complete' AND status <> 'failed'",
        "every snippet applied",
        Duration::from_secs(30),
    );
    // and one left pending, behind a day-long backoff (as a failed attempt leaves its chat)
    c.batch_execute(
        "BEGIN;
         UPDATE memory.chat_metadata SET retry_at = now() + interval '1 day',
                due_at = now() + interval '1 day' WHERE chat_id = 'c-2';
         SELECT memory.enqueue('c-2', 'The user writes an extension.');
         COMMIT;",
    )
    .unwrap();

    dump_and_restore(&pg, "postgres", "restored");
    let mut restored = pg.client_db("restored");
    restored
        .batch_execute(
            "DO $$ BEGIN
                 ASSERT (SELECT count(*) FROM memory.chat_context_queue WHERE chat_id = 'm-1') = 1,
                        'restoring the table captured nothing again';
                 ASSERT (SELECT source::text FROM memory.watched) = 'messages';
             END $$;
             INSERT INTO public.messages VALUES ('m-1', 'captured after the restore');
             DO $$ BEGIN
                 -- queued, or captured into the chat's inbox until its next claim
                 ASSERT (SELECT count(*) FROM memory.chat_context_queue WHERE chat_id = 'm-1')
                        + (SELECT count(*) FROM memory.capture_inbox WHERE chat_id = 'm-1') = 2;
             END $$;",
        )
        .unwrap();
    as_jwt_user(
        &mut restored,
        "user-1",
        "DO $$ BEGIN ASSERT (SELECT pending FROM memory.get('c-2')) = 1;
                     ASSERT (SELECT user_confirmed ->> 'language' FROM memory.get('c-2')) = 'Rust'; END $$",
    );
    as_role(
        &mut restored,
        "ops",
        "DO $$ BEGIN ASSERT (SELECT count(DISTINCT chat_id) FROM memory.chat_memory_history) = 3; END $$",
    );
}

/// pg_upgrade from the previous major's cluster (MEMORY_EXT_OLD_PG_BIN, set by scripts/test.sh
/// once memory_ext is installed into both) to this one: every row kept, and the worker resumes
/// on the new cluster where the old one stopped, in order.
#[test]
fn pg_upgrade_to_a_new_major_keeps_every_chat_and_the_worker_resumes() {
    let Ok(old_bin) = std::env::var("MEMORY_EXT_OLD_PG_BIN") else {
        eprintln!("MEMORY_EXT_OLD_PG_BIN is not set: scripts/test.sh runs this test");
        return;
    };
    let old = Cluster::init("pg_upgrade_old", &[], true, &old_bin, &[]);
    old.ctl("start");
    let mut c = old.client();
    create_roles(&mut c);
    c.batch_execute("CREATE EXTENSION memory_ext; SELECT memory.grant_usage('api');")
        .unwrap();
    let first = enqueue(&mut c, "c-1", "confirmed: plan = PPO");
    assert_eq!(wait(&mut c, &first), "complete");
    let failed = enqueue(&mut c, "c-2", "mock_fatal: refused");
    assert_eq!(wait(&mut c, &failed), "failed");
    // Left pending behind a backoff, as a failed attempt leaves a chat.
    c.batch_execute(
        "BEGIN;
         UPDATE memory.chat_metadata SET retry_at = now() + interval '1 day',
                due_at = now() + interval '1 day' WHERE chat_id = 'c-1';
         SELECT memory.enqueue('c-1', 'confirmed: city = Lyon');
         SELECT memory.enqueue('c-1', 'confirmed: pet = cat');
         COMMIT;",
    )
    .unwrap();
    let before = text(&mut c, DUMPED_ROWS);
    // Debian's 15.20 security release gives every column of every table an attribute option,
    // pg_attver, that PostgreSQL 18.6 does not know: pg_upgrade (and a 15 -> 18 dump) fails on
    // the first table, memory_ext's or not. Taken out here, as a DBA would before upgrading.
    c.batch_execute(
        "UPDATE pg_catalog.pg_attribute
            SET attoptions = nullif(array(SELECT o FROM unnest(attoptions) o
                                           WHERE o NOT LIKE 'pg_attver=%'), '{}')
          WHERE attoptions::text LIKE '%pg_attver=%'",
    )
    .unwrap();
    drop(c);
    old.ctl("stop");

    // PostgreSQL 18's initdb turns data checksums on by default; pg_upgrade needs them alike.
    let new = Cluster::init(
        "pg_upgrade_new",
        &[],
        true,
        &pg_bin(),
        &["--no-data-checksums"],
    );
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{}/pg_upgrade", new.bin))
        .args([
            "-b",
            &old_bin,
            "-B",
            &new.bin,
            "-d",
            &old.data(),
            "-D",
            &new.data(),
        ])
        .args([
            "-U",
            "postgres",
            "--socketdir",
            &new.dir.display().to_string(),
        ])
        .current_dir(&new.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    new.ctl("start");
    let mut c = new.client();
    assert_eq!(text(&mut c, DUMPED_ROWS), before, "pg_upgrade changed rows");
    // The backoff has passed: the worker applies what the old cluster left, then new snippets.
    c.batch_execute(
        "UPDATE memory.chat_metadata SET retry_at = NULL, due_at = now() WHERE chat_id = 'c-1';
         UPDATE memory.chat_context_queue SET next_attempt_at = now() WHERE chat_id = 'c-1';",
    )
    .unwrap();
    let last = enqueue(&mut c, "c-1", "confirmed: color = green");
    assert_eq!(wait(&mut c, &last), "complete");
    let ids = enqueued_ids(&mut c, "c-1");
    assert_eq!(
        applied_ids(&mut c, "c-1"),
        ids,
        "applied once each, in order"
    );
    assert_eq!(
        text(&mut c, "SELECT user_confirmed::text FROM memory.get('c-1')"),
        r#"{"pet": "cat", "city": "Lyon", "plan": "PPO", "color": "green"}"#
    );
}

/// The 0.2.0 library drops a 0.1.0 schema (which has no watching): DROP EXTENSION before an
/// update must not fail on what only 0.2.0 defines.
#[test]
fn an_old_schema_drops_under_the_new_library() {
    let pg = Cluster::init("drop_old", &[], true, &pg_bin(), &[]);
    pg.ctl("start");
    let mut c = pg.client();
    c.batch_execute("CREATE EXTENSION memory_ext VERSION '0.1.0'")
        .unwrap();
    c.batch_execute("DROP EXTENSION memory_ext").unwrap();
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM pg_extension WHERE extname = 'memory_ext'"
        ),
        "0"
    );
}
