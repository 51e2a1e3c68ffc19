//! memory.watch() on a real cluster: a Supabase-style message table written the way PostgREST
//! writes it (request transactions with JWT claims, RLS on the app's table), rollbacks, COPY, the
//! worker woken at COMMIT, and DROP EXTENSION with a table still watched.

use memory_ext_cluster_tests::mock_rules::fold_summary;
use memory_ext_cluster_tests::{Cluster, text};
use postgres::{Client, Transaction};
use std::io::Write;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const ALICE: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const BOB: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const CONV_A: &str = "c0000000-0000-4000-8000-00000000000a";
const CONV_B: &str = "c0000000-0000-4000-8000-00000000000b";

/// The app: `authenticated` may call the API; its users see and insert only their own messages.
const APP: &str = "
CREATE ROLE authenticated NOLOGIN;
SELECT memory.grant_usage('authenticated');
CREATE TABLE public.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id uuid NOT NULL,
    user_id uuid NOT NULL,
    role text NOT NULL,
    content text NOT NULL);
ALTER TABLE public.messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_messages ON public.messages FOR ALL TO authenticated
    USING (user_id = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid)
    WITH CHECK (user_id = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')::uuid);
GRANT SELECT, INSERT ON public.messages TO authenticated;
SELECT memory.watch('public.messages', 'conversation_id', 'content', 'user_id', 'role');
";

fn start(name: &str, conf: &[&str]) -> (Cluster, Client) {
    let pg = Cluster::start(name, conf);
    let mut c = pg.client();
    c.batch_execute(APP).unwrap();
    (pg, c)
}

/// A PostgREST request transaction of user `sub`.
fn request<'a>(c: &'a mut Client, sub: &str) -> Transaction<'a> {
    let mut tx = c.transaction().unwrap();
    tx.execute("SET LOCAL ROLE authenticated", &[]).unwrap();
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&format!(r#"{{"sub": "{sub}", "role": "authenticated"}}"#)],
    )
    .unwrap();
    tx
}

fn insert(tx: &mut Transaction, conv: &str, user: &str, role: &str, content: &str) {
    tx.execute(
        "INSERT INTO public.messages (conversation_id, user_id, role, content)
         VALUES ($1::text::uuid, $2::text::uuid, $3, $4)",
        &[&conv, &user, &role, &content],
    )
    .unwrap();
}

/// The chat's memory once the worker has applied everything of it.
fn applied_summary(pg: &Cluster, c: &mut Client, chat: &str) -> String {
    pg.eventually(
        c,
        &format!(
            "SELECT count(*) > 0 AND count(*) FILTER (WHERE status <> 'complete') = 0
               FROM memory.chat_context_queue WHERE chat_id = '{chat}'"
        ),
        &format!("every snippet of {chat} applied"),
        T,
    );
    text(
        c,
        &format!("SELECT general_summary FROM memory.get('{chat}')"),
    )
}

/// What a user's own request reads back through the API.
fn summary_as(c: &mut Client, sub: &str, chat: &str) -> String {
    let mut tx = request(c, sub);
    let s = tx
        .query_one("SELECT general_summary FROM memory.get($1)", &[&chat])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    s
}

/// Messages a user inserts in one request become snippets at its COMMIT: the worker (idle for an
/// hour otherwise) applies them in row order; a rolled-back request enqueues nothing.
#[test]
fn a_users_request_is_captured_at_commit_in_row_order() {
    let (pg, mut c) = start("watch_commit", &["memory_ext.idle_timeout = 3600"]);
    let mut tx = request(&mut c, ALICE);
    insert(&mut tx, CONV_A, ALICE, "user", "Olá! Moro em Lisboa 🙂");
    tx.execute(
        "INSERT INTO public.messages (conversation_id, user_id, role, content)
         VALUES ($1::text::uuid, $2::text::uuid, 'assistant', 'Anotado.'),
                ($1::text::uuid, $2::text::uuid, 'user', '日本語も話します')",
        &[&CONV_A, &ALICE],
    )
    .unwrap();
    tx.commit().unwrap();
    let mut tx = request(&mut c, ALICE);
    insert(
        &mut tx,
        CONV_A,
        ALICE,
        "user",
        "rolled back: never captured",
    );
    tx.rollback().unwrap();
    let want = "user: Olá! Moro em Lisboa 🙂 | assistant: Anotado. | user: 日本語も話します";
    assert_eq!(applied_summary(&pg, &mut c, CONV_A), want);
    assert_eq!(summary_as(&mut c, ALICE, CONV_A), want);
    assert_eq!(
        text(
            &mut c,
            &format!("SELECT owner FROM memory.chat_metadata WHERE chat_id = '{CONV_A}'")
        ),
        ALICE
    );
}

/// The app's RLS keeps a user from posing as another; where the app lets a user's message into
/// someone else's conversation, memory does not: the row is kept by the app, skipped by memory
/// and audited, and the other user's memory stays theirs.
#[test]
fn a_user_cannot_write_into_another_users_memory() {
    let (pg, mut c) = start("watch_owners", &[]);
    let mut tx = request(&mut c, ALICE);
    insert(&mut tx, CONV_A, ALICE, "user", "alice's own message");
    tx.commit().unwrap();
    assert_eq!(
        applied_summary(&pg, &mut c, CONV_A),
        "user: alice's own message"
    );

    let mut tx = request(&mut c, BOB);
    let posing = tx.execute(
        "INSERT INTO public.messages (conversation_id, user_id, role, content)
         VALUES ($1::text::uuid, $2::text::uuid, 'user', 'posing as alice')",
        &[&CONV_A, &ALICE],
    );
    assert_eq!(
        posing.unwrap_err().code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "the app's own policy"
    );
    drop(tx);
    let mut tx = request(&mut c, BOB);
    insert(
        &mut tx,
        CONV_A,
        BOB,
        "user",
        "bob into alice's conversation",
    );
    insert(&mut tx, CONV_B, BOB, "user", "bob's own");
    tx.commit().unwrap();
    assert_eq!(applied_summary(&pg, &mut c, CONV_B), "user: bob's own");
    assert_eq!(
        summary_as(&mut c, ALICE, CONV_A),
        "user: alice's own message"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM public.messages WHERE content LIKE 'bob into%'"
        ),
        "1",
        "the app's insert succeeded"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT string_agg(identity || ' ' || chat_id, ',') FROM memory.audit_log
              WHERE action = 'denied:watch'"
        ),
        format!("{BOB} {CONV_A}")
    );
}

/// COPY into a watched table is captured like an INSERT: one pass, rows in file order.
#[test]
fn copy_into_a_watched_table_is_captured() {
    let (pg, mut c) = start("watch_copy", &[]);
    let mut w = c
        .copy_in("COPY public.messages (conversation_id, user_id, role, content) FROM STDIN")
        .unwrap();
    for i in 1..=200 {
        writeln!(w, "{CONV_A}\t{ALICE}\tuser\tline {i}").unwrap();
    }
    w.finish().unwrap();
    let summary = applied_summary(&pg, &mut c, CONV_A);
    let want = (1..=200).fold(String::new(), |s, i| {
        fold_summary(&s, &format!("user: line {i}"))
    });
    assert_eq!(summary, want);
}

/// DROP EXTENSION without CASCADE succeeds with a table watched: the capture triggers go first,
/// and the app's table keeps working without memory_ext.
#[test]
fn drop_extension_leaves_the_app_table_working() {
    let (_pg, mut c) = start("watch_drop", &[]);
    c.batch_execute("DROP EXTENSION memory_ext").unwrap();
    let mut tx = c.transaction().unwrap();
    insert(&mut tx, CONV_A, ALICE, "user", "after the drop");
    tx.commit().unwrap();
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM pg_trigger WHERE tgrelid = 'public.messages'::regclass"
        ),
        "0"
    );
    c.batch_execute("CREATE EXTENSION memory_ext").unwrap();
    assert_eq!(
        text(&mut c, "SELECT count(*)::text FROM memory.watched"),
        "0"
    );
}
