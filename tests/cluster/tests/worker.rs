//! The background worker against real clusters: end to end, order, coalescing, failures and
//! backoff, panics and ERRORs, lease expiry, concurrent clients, DROP/CREATE EXTENSION, crashes.

use memory_ext_cluster_tests::{
    Cluster, applied_ids, enqueue, enqueue_together, enqueued_ids, text, wait,
};
use postgres::Client;
use std::collections::HashSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Every snippet of the chat is complete and applied exactly once, in enqueue order.
fn assert_applied_once_in_order(c: &mut Client, chat: &str) {
    let enq = enqueued_ids(c, chat);
    let applied = applied_ids(c, chat);
    assert_eq!(
        applied, enq,
        "chat {chat}: applied ids (in version order) must equal enqueue order"
    );
    let not_done: i64 = c
        .query_one("SELECT count(*) FROM memory.chat_context_queue WHERE chat_id = $1 AND status <> 'complete'", &[&chat])
        .unwrap()
        .get(0);
    assert_eq!(not_done, 0, "chat {chat}");
}

#[test]
fn end_to_end_create_enqueue_worker_get() {
    let pg = Cluster::start("e2e", &[]);
    let mut c = pg.client();
    c.batch_execute("SELECT memory.create_chat('c1')").unwrap();
    let q1 = enqueue(
        &mut c,
        "c1",
        "confirmed: plan = PPO\nThe user compares plans.",
    );
    let estimate: bool = c
        .query_one(
            "SELECT estimated_completion BETWEEN now() AND now() + interval '1 minute' \
             FROM memory.enqueue('c9', 'x')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(estimate, "a worker serves this database: a near estimate");
    let q2 = enqueue(
        &mut c,
        "c1",
        "inferred: budget = tight\nretract: nothing\nAsked about premiums.",
    );
    assert_eq!(wait(&mut c, &q1), "complete");
    assert_eq!(wait(&mut c, &q2), "complete");
    let row = c.query_one("SELECT user_confirmed::text, llm_inferred::text, general_summary, token_count, pending, needs_new_chat FROM memory.get('c1')", &[]).unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"plan": "PPO"}"#);
    assert_eq!(row.get::<_, String>(1), r#"{"budget": "tight"}"#);
    assert_eq!(
        row.get::<_, String>(2),
        "The user compares plans. | Asked about premiums."
    );
    assert!(row.get::<_, i32>(3) > 0);
    assert_eq!(row.get::<_, i32>(4), 0);
    assert!(!row.get::<_, bool>(5));
    assert_applied_once_in_order(&mut c, "c1");
    // A REPEATABLE READ snapshot would never see the worker's progress: refused, not a silent hang.
    let mut tx = c
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let err = tx
        .query_one("SELECT memory.wait($1::text::uuid)", &[&q1])
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
        "{err}"
    );
    drop(tx);
    pg.eventually(
        &mut c,
        "SELECT state = 'idle' FROM memory.worker_status()",
        "worker idle",
        T,
    );
    let st = c.query_one("SELECT running, processed >= 1, last_heartbeat IS NOT NULL FROM memory.worker_status()", &[]).unwrap();
    assert!(st.get::<_, bool>(0) && st.get::<_, bool>(1) && st.get::<_, bool>(2));
}

/// The commit of an enqueue wakes the idle worker: with the safety wake-up an hour away, every
/// snippet is still applied within wait()'s 30 s (on every PostgreSQL major: the latch and the
/// commit callback are version-sensitive).
#[test]
fn the_commit_of_an_enqueue_wakes_the_idle_worker() {
    let pg = Cluster::start("wake", &["memory_ext.idle_timeout = 3600"]);
    let mut c = pg.client();
    for round in 0..3 {
        pg.eventually(
            &mut c,
            "SELECT state = 'idle' FROM memory.worker_status()",
            "the worker idle",
            Duration::from_secs(30),
        );
        let id = enqueue(&mut c, "c1", &format!("confirmed: round = {round}"));
        assert_eq!(wait(&mut c, &id), "complete", "round {round}");
    }
    // Several enqueues in one transaction wake it once, at COMMIT; a rollback wakes nobody.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT memory.enqueue('c2', 'rolled back')")
        .unwrap();
    tx.rollback().unwrap();
    enqueue_together(
        &mut c,
        &[
            ("c2".into(), "confirmed: a = 1".into()),
            ("c3".into(), "confirmed: b = 2".into()),
        ],
    );
    let ids: Vec<String> = c
        .query(
            "SELECT id::text FROM memory.chat_context_queue WHERE chat_id IN ('c2', 'c3')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 2, "the rolled-back snippet is not queued");
    for id in ids {
        assert_eq!(wait(&mut c, &id), "complete");
    }
}

#[test]
fn order_and_coalescing() {
    let pg = Cluster::start("order", &[]);
    let mut c = pg.client();
    // 40 snippets committed at once are visible together: one summarization, one version.
    let batch: Vec<(String, String)> = (0..40)
        .map(|i| ("batch".into(), format!("confirmed: n = {i}\nline {i}")))
        .collect();
    enqueue_together(&mut c, &batch);
    // and 30 more one by one, in order
    let mut last = String::new();
    for i in 0..30 {
        last = enqueue(&mut c, "seq", &format!("confirmed: n = {i}\nstep {i}"));
    }
    let ids = enqueued_ids(&mut c, "batch");
    assert_eq!(wait(&mut c, ids.last().unwrap()), "complete");
    assert_eq!(wait(&mut c, &last), "complete");
    assert_eq!(
        text(&mut c, "SELECT count(*)::text FROM memory.history('batch')"),
        "1",
        "coalesced"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT user_confirmed->>'n' FROM memory.get('batch')"
        ),
        "39"
    );
    assert_eq!(
        text(&mut c, "SELECT user_confirmed->>'n' FROM memory.get('seq')"),
        "29"
    );
    let expected: Vec<String> = (0..30).map(|i| format!("step {i}")).collect();
    assert_eq!(
        text(&mut c, "SELECT general_summary FROM memory.get('seq')"),
        expected.join(" | ")
    );
    assert_applied_once_in_order(&mut c, "batch");
    assert_applied_once_in_order(&mut c, "seq");
}

#[test]
fn failures_back_off_then_fail_and_never_touch_memory() {
    let pg = Cluster::start(
        "backoff",
        &[
            "memory_ext.max_attempts = 3",
            "memory_ext.backoff_base_ms = 200",
        ],
    );
    let mut c = pg.client();
    let good = enqueue(&mut c, "c1", "confirmed: a = 1");
    assert_eq!(wait(&mut c, &good), "complete");
    let started = std::time::Instant::now();
    let bad = enqueue(
        &mut c,
        "c1",
        "confirmed: a = 2\nmock_error: upstream is down",
    );
    let other = enqueue(&mut c, "c2", "confirmed: b = 1");
    assert_eq!(
        wait(&mut c, &other),
        "complete",
        "another chat is not held up"
    );
    assert_eq!(wait(&mut c, &bad), "failed");
    // three attempts with backoff 200 ms then 400 ms, each jittered to at least half
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let row = c
        .query_one(
            "SELECT status, retry_count, error_message FROM memory.status($1::text::uuid)",
            &[&bad],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("failed".into(), 3)
    );
    assert_eq!(row.get::<_, String>(2), "mock error: upstream is down");
    assert_eq!(
        text(
            &mut c,
            "SELECT user_confirmed->>'a' || '/' || version FROM memory.get('c1')"
        ),
        "1/1"
    );
    let st = c
        .query_one("SELECT failed, last_error FROM memory.worker_status()", &[])
        .unwrap();
    assert_eq!(st.get::<_, i64>(0), 3);
    assert!(st.get::<_, String>(1).contains("upstream is down"));
}

#[test]
fn an_error_or_panic_never_kills_the_worker_or_stalls_other_chats() {
    let pg = Cluster::start(
        "poison",
        &[
            "memory_ext.max_attempts = 2",
            "memory_ext.backoff_base_ms = 10",
        ],
    );
    let mut c = pg.client();
    // An ERROR while applying one chat (a trigger a DBA added, say).
    c.batch_execute(
        "CREATE FUNCTION public.boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.chat_id = 'poison' AND NEW.version > OLD.version THEN RAISE EXCEPTION 'poisoned chat'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER boom BEFORE UPDATE ON memory.chat_metadata FOR EACH ROW EXECUTE FUNCTION public.boom();",
    )
    .unwrap();
    let pid = pg.worker_pid(&mut c).expect("worker running");
    let mut tx = c.transaction().unwrap();
    let poison: String = tx
        .query_one(
            "SELECT queue_id::text FROM memory.enqueue('poison', 'x')",
            &[],
        )
        .unwrap()
        .get(0);
    let panic_: String = tx
        .query_one(
            "SELECT queue_id::text FROM memory.enqueue('panics', 'mock_panic: bug')",
            &[],
        )
        .unwrap()
        .get(0);
    let fine: Vec<String> = (0..5)
        .map(|i| {
            tx.query_one(
                "SELECT queue_id::text FROM memory.enqueue($1, 'fine')",
                &[&format!("ok{i}")],
            )
            .unwrap()
            .get(0)
        })
        .collect();
    tx.commit().unwrap();
    for id in &fine {
        assert_eq!(wait(&mut c, id), "complete");
    }
    assert_eq!(wait(&mut c, &poison), "failed");
    assert_eq!(wait(&mut c, &panic_), "failed");
    let err: String = c
        .query_one(
            "SELECT error_message FROM memory.status($1::text::uuid)",
            &[&poison],
        )
        .unwrap()
        .get(0);
    assert!(err.contains("poisoned chat"), "{err}");
    let err: String = c
        .query_one(
            "SELECT error_message FROM memory.status($1::text::uuid)",
            &[&panic_],
        )
        .unwrap()
        .get(0);
    assert!(err.contains("mock panic: bug"), "{err}");
    assert_eq!(
        pg.worker_pid(&mut c),
        Some(pid),
        "same worker process throughout"
    );
    // and it still works
    let after = enqueue(&mut c, "ok0", "more");
    assert_eq!(wait(&mut c, &after), "complete");
}

#[test]
fn an_expired_lease_is_reclaimed_and_applied_once() {
    let pg = Cluster::start("lease", &["memory_ext.lease_timeout = 1"]);
    let mut c = pg.client();
    // The worker claims this and sleeps 3 s in the summarizer: its lease expires after 1 s.
    let id = enqueue(&mut c, "slow", "mock_sleep_ms: 3000\nconfirmed: x = 1");
    pg.eventually(
        &mut c,
        &format!("SELECT status = 'processing' FROM memory.status('{id}')"),
        "worker claims",
        T,
    );
    pg.eventually(
        &mut c,
        "SELECT lease_until < now() FROM memory.chat_metadata WHERE chat_id = 'slow'",
        "lease expires",
        T,
    );
    // Another claimant (here process_pending in this backend) takes the expired lease over.
    let n: i32 = c
        .query_one("SELECT memory.process_pending()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let row = c
        .query_one(
            "SELECT status, retry_count, error_message FROM memory.status($1::text::uuid)",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "complete");
    assert_eq!(
        row.get::<_, i32>(1),
        1,
        "the expired lease counted as an attempt"
    );
    assert!(row.get::<_, String>(2).starts_with("lease expired"));
    // Once the worker has finished its stale attempt, its late result must have been discarded.
    pg.eventually(
        &mut c,
        "SELECT state = 'idle' FROM memory.worker_status()",
        "worker done with its stale attempt",
        T,
    );
    assert_applied_once_in_order(&mut c, "slow");
    assert_eq!(
        text(&mut c, "SELECT version::text FROM memory.get('slow')"),
        "1"
    );
    assert_eq!(
        text(&mut c, "SELECT processed::text FROM memory.worker_status()"),
        "0",
        "the worker applied nothing"
    );
}

#[test]
fn many_concurrent_clients_on_one_chat() {
    let pg = Cluster::start("concurrent", &[]);
    let threads = 8;
    let per = 40;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let mut c = pg.client();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for n in 0..per {
                    ids.push(enqueue(
                        &mut c,
                        "shared",
                        &format!("confirmed: t{t} = {n}\nt{t}-{n}"),
                    ));
                }
                ids
            })
        })
        .collect();
    let per_thread: Vec<Vec<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut c = pg.client();
    for ids in &per_thread {
        assert_eq!(wait(&mut c, ids.last().unwrap()), "complete");
    }
    for ids in &per_thread {
        for id in ids {
            assert_eq!(wait(&mut c, id), "complete");
        }
    }
    let applied = applied_ids(&mut c, "shared");
    assert_eq!(applied.len(), threads * per, "each snippet applied once");
    assert_eq!(
        applied.iter().collect::<HashSet<_>>().len(),
        threads * per,
        "no duplicates"
    );
    // each client's snippets were applied in the order that client enqueued them
    let pos: std::collections::HashMap<&String, usize> =
        applied.iter().enumerate().map(|(i, id)| (id, i)).collect();
    for ids in &per_thread {
        assert!(
            ids.windows(2).all(|w| pos[&w[0]] < pos[&w[1]]),
            "per-client order"
        );
    }
    for t in 0..threads {
        assert_eq!(
            text(
                &mut c,
                &format!("SELECT user_confirmed->>'t{t}' FROM memory.get('shared')")
            ),
            (per - 1).to_string()
        );
    }
    assert_applied_once_in_order(&mut c, "shared");
}

#[test]
fn survives_drop_and_create_extension() {
    let pg = Cluster::start("dropcreate", &[]);
    let mut c = pg.client();
    let pid = pg.worker_pid(&mut c).expect("worker running");
    let id = enqueue(&mut c, "c1", "confirmed: a = 1");
    assert_eq!(wait(&mut c, &id), "complete");
    c.batch_execute("DROP EXTENSION memory_ext").unwrap();
    pg.eventually(
        &mut c,
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'",
        "worker alive without the extension",
        T,
    );
    c.batch_execute("CREATE EXTENSION memory_ext").unwrap();
    let id = enqueue(&mut c, "c1", "confirmed: a = 2");
    assert_eq!(wait(&mut c, &id), "complete");
    assert_eq!(
        text(&mut c, "SELECT user_confirmed->>'a' FROM memory.get('c1')"),
        "2"
    );
    assert_eq!(
        pg.worker_pid(&mut c),
        Some(pid),
        "the same worker served both"
    );
}

/// Enqueue `chats` × `per` snippets, crash the server mid-drain with `crash`, and check that every
/// snippet ends applied exactly once, in order.
fn crash_mid_drain(name: &str, crash: impl FnOnce(&Cluster, &mut Client)) {
    let pg = Cluster::start(name, &["memory_ext.batch_chats = 5"]);
    let mut c = pg.client();
    let (chats, per) = (40, 25);
    for round in 0..per {
        let batch: Vec<(String, String)> = (0..chats)
            .map(|chat| {
                (
                    format!("chat{chat}"),
                    format!("confirmed: n = {round}\nmock_sleep_ms: 2\nr{round}"),
                )
            })
            .collect();
        enqueue_together(&mut c, &batch);
    }
    // crash once the worker is visibly mid-drain
    pg.eventually(
        &mut c,
        "SELECT count(*) > 0 FROM memory.chat_memory_history",
        "drain started",
        T,
    );
    crash(&pg, &mut c);
    let mut c = pg.client();
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status <> 'complete'",
        "all snippets applied after the crash",
        T,
    );
    for chat in 0..chats {
        let chat = format!("chat{chat}");
        assert_applied_once_in_order(&mut c, &chat);
        assert_eq!(
            text(
                &mut c,
                &format!("SELECT user_confirmed->>'n' FROM memory.get('{chat}')")
            ),
            (per - 1).to_string()
        );
    }
}

#[test]
fn kill_9_of_the_worker_mid_drain_loses_nothing() {
    crash_mid_drain("kill9", |pg, c| {
        let pid = pg.worker_pid(c).expect("worker");
        assert!(
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    });
}

#[test]
fn immediate_shutdown_mid_drain_loses_nothing() {
    crash_mid_drain("immediate", |pg, _c| {
        pg.ctl_args(&["-m", "immediate", "stop"]);
        pg.ctl("start");
    });
}

#[test]
fn settings_reload_on_sighup() {
    let pg = Cluster::start("sighup", &["memory_ext.max_attempts = 1"]);
    let mut c = pg.client();
    let id = enqueue(&mut c, "c0", "fine");
    assert_eq!(wait(&mut c, &id), "complete");
    c.batch_execute("ALTER SYSTEM SET memory_ext.summarizer = 'nope'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The reload reaches the worker asynchronously: a snippet enqueued after it has been read fails.
    let mut n = 0;
    loop {
        n += 1;
        let id = enqueue(&mut c, &format!("c{n}"), "x");
        if wait(&mut c, &id) == "failed" {
            let err: String = c
                .query_one(
                    "SELECT error_message FROM memory.status($1::text::uuid)",
                    &[&id],
                )
                .unwrap()
                .get(0);
            assert_eq!(
                err,
                "unknown summarizer \"nope\" (memory_ext.summarizer accepts: mock, openai, anthropic)"
            );
            break;
        }
        assert!(n < 100, "the worker never picked up the new setting");
    }
    c.batch_execute("ALTER SYSTEM RESET memory_ext.summarizer")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let retried: i32 = c
        .query_one("SELECT memory.retry_failed()", &[])
        .unwrap()
        .get(0);
    assert_eq!(retried, 1);
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status <> 'complete'",
        "retried snippet applied",
        T,
    );
}

#[test]
fn waits_calmly_for_its_database_then_serves_it() {
    let pg = Cluster::start("nodb", &["memory_ext.database = 'appdb'"]);
    let mut c = pg.client();
    pg.eventually(
        &mut c,
        "SELECT state = 'no worker: memory_ext.database (appdb) does not include \"postgres\"' AND NOT running FROM memory.worker_status()",
        "this database not served",
        T,
    );
    assert_eq!(pg.worker_pid(&mut c), None);
    c.batch_execute("CREATE DATABASE appdb").unwrap();
    let mut app = pg.client_db("appdb");
    pg.eventually(&mut app, "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'memory_ext worker' AND datname = 'appdb'", "worker connected to appdb", T);
    app.batch_execute("CREATE EXTENSION memory_ext").unwrap();
    let id = enqueue(&mut app, "c1", "confirmed: served = yes");
    assert_eq!(wait(&mut app, &id), "complete");
    // the health check in each database speaks of its own
    let state: String = c
        .query_one("SELECT state FROM memory.worker_status()", &[])
        .unwrap()
        .get(0);
    assert!(state.contains("does not include \"postgres\""), "{state}");
    let served: String = app
        .query_one(
            "SELECT database FROM memory.worker_status() WHERE running",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(served, "appdb");
    let log = pg.log();
    assert!(
        !log.contains("FATAL"),
        "no crash loop while waiting:\n{log}"
    );
}

#[test]
fn a_terminated_worker_is_restarted_by_the_launcher() {
    let pg = Cluster::start("terminate", &[]);
    let mut c = pg.client();
    let pid = pg.worker_pid(&mut c).expect("worker");
    let ok: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(ok);
    pg.eventually(
        &mut c,
        &format!("SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'memory_ext worker' AND pid <> {pid}"),
        "a new worker",
        T,
    );
    let id = enqueue(&mut c, "c1", "after restart");
    assert_eq!(wait(&mut c, &id), "complete");
}

/// With memory_ext.keep_applied_snippets off, retention deletes old complete rows; the memory
/// and its history stay, and the chat is marked pruned: it can no longer be re-derived.
#[test]
fn retention_deletes_old_complete_rows() {
    let pg = Cluster::start(
        "retention",
        &[
            "memory_ext.retention = 1",
            "memory_ext.idle_timeout = 1",
            "memory_ext.keep_applied_snippets = off",
        ],
    );
    let mut c = pg.client();
    let id = enqueue(&mut c, "c1", "confirmed: a = 1");
    assert_eq!(wait(&mut c, &id), "complete");
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue",
        "complete row deleted after retention",
        T,
    );
    // the memory and its history stay
    assert_eq!(
        text(&mut c, "SELECT user_confirmed->>'a' FROM memory.get('c1')"),
        "1"
    );
    assert_eq!(
        text(&mut c, "SELECT count(*)::text FROM memory.history('c1')"),
        "1"
    );
    let e = c.execute("SELECT memory.rebuild('c1')", &[]).unwrap_err();
    assert_eq!(e.code().map(|s| s.code()), Some("55000"), "{e}");
}

/// By default applied snippets are kept however old (retention passes leave them), and
/// memory.rebuild() re-derives the memory through the worker: wait() on the snippet it returns,
/// then the memory is the same, as one new rebuilt version.
#[test]
fn applied_snippets_are_kept_and_a_rebuild_goes_through_the_worker() {
    let pg = Cluster::start(
        "rebuild",
        &[
            "memory_ext.retention = 1",
            "memory_ext.audit_retention = 1",
            "memory_ext.idle_timeout = 1",
        ],
    );
    let mut c = pg.client();
    enqueue(&mut c, "c1", "confirmed: a = 1");
    let id = enqueue(&mut c, "c1", "moved in May");
    assert_eq!(wait(&mut c, &id), "complete");
    let memory = "SELECT user_confirmed::text || llm_inferred::text || general_summary || ' v' \
                         || version FROM memory.get('c1')";
    let before = text(&mut c, memory);
    let versions: i64 = c
        .query_one("SELECT max(version) FROM memory.chat_memory_history", &[])
        .unwrap()
        .get(0);
    // an audit row written after the snippets were applied: once a retention pass has taken it,
    // that pass saw the applied rows older than the retention too
    c.execute("SELECT memory.grant_usage('pg_monitor')", &[])
        .unwrap();
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.audit_log WHERE action = 'grant_usage'",
        "a retention pass",
        T,
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM memory.chat_context_queue WHERE status = 'complete'"
        ),
        "2",
        "kept for re-derivation"
    );
    let last = text(&mut c, "SELECT memory.rebuild('c1')::text");
    assert_eq!(last, id);
    assert_eq!(wait(&mut c, &last), "complete");
    assert_eq!(
        text(&mut c, memory),
        before.replace(&format!(" v{versions}"), &format!(" v{}", versions + 1)),
        "the same memory, one version later"
    );
    assert_eq!(
        before,
        format!(r#"{{"a": "1"}}{{}}moved in May v{versions}"#)
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT rebuilt || ' ' || cardinality(queue_ids) FROM memory.chat_memory_history \
                       ORDER BY version DESC LIMIT 1"
        ),
        "true 2"
    );
}

#[test]
fn without_preload_the_api_works_and_process_pending_does_the_work() {
    let pg = Cluster::start_with("nopreload", &[], false);
    let mut c = pg.client();
    let row = c.query_one("SELECT queue_id::text, estimated_completion IS NULL FROM memory.enqueue('c1', 'confirmed: a = 1')", &[]).unwrap();
    let id: String = row.get(0);
    assert!(row.get::<_, bool>(1), "no worker: no estimate");
    let st = c
        .query_one("SELECT running, state FROM memory.worker_status()", &[])
        .unwrap();
    assert!(!st.get::<_, bool>(0));
    assert!(
        st.get::<_, String>(1)
            .contains("not in shared_preload_libraries")
    );
    assert_eq!(
        text(&mut c, &format!("SELECT memory.wait('{id}', '50 ms')")),
        "pending_summarization"
    );
    let mut other = pg.client();
    let waiter = std::thread::spawn(move || wait(&mut other, &id));
    let n: i32 = c
        .query_one("SELECT memory.process_pending()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        waiter.join().unwrap(),
        "complete",
        "wait() polls without the worker's broadcast"
    );
    assert_eq!(
        text(&mut c, "SELECT user_confirmed->>'a' FROM memory.get('c1')"),
        "1"
    );
}

#[test]
fn idle_on_a_hot_standby_and_serving_after_promotion() {
    let primary = Cluster::start("primary", &[]);
    let mut p = primary.client();
    let done = enqueue(&mut p, "c1", "confirmed: a = 1");
    let status = wait(&mut p, &done);
    assert_eq!(
        status,
        "complete",
        "{}\n{}",
        primary.diagnostics(&mut p),
        primary.log()
    );
    let standby = Cluster::standby_of(&primary, "standby");
    let mut s = standby.client();
    // Replicated memory is readable on the standby; no worker runs there.
    standby.eventually(
        &mut s,
        "SELECT user_confirmed->>'a' = '1' FROM memory.get('c1')",
        "memory replicated",
        T,
    );
    let st = s
        .query_one("SELECT running, state FROM memory.worker_status()", &[])
        .unwrap();
    assert!(!st.get::<_, bool>(0));
    assert!(
        st.get::<_, String>(1).contains("hot standby"),
        "{}",
        st.get::<_, String>(1)
    );
    assert_eq!(standby.worker_pid(&mut s), None);
    // Read-only calls work on a standby (they assign no transaction id).
    assert_eq!(wait(&mut s, &done), "complete");
    // The primary crashes while its worker is summarizing a snippet; the standby has replicated
    // that lease. After promotion the new worker takes the lease over (its holder is gone, even if
    // its pid is in use again) and applies the snippet once.
    let id = enqueue(&mut p, "c1", "mock_sleep_ms: 3000\nconfirmed: a = 2");
    standby.eventually(
        &mut s,
        &format!("SELECT status = 'processing' FROM memory.status('{id}')"),
        "lease replicated",
        T,
    );
    primary.ctl_args(&["-m", "immediate", "stop"]);
    standby.ctl("promote");
    let mut s = standby.client();
    let status = wait(&mut s, &id);
    assert_eq!(
        status,
        "complete",
        "{}\n{}",
        standby.diagnostics(&mut s),
        standby.log()
    );
    assert_eq!(
        text(&mut s, "SELECT user_confirmed->>'a' FROM memory.get('c1')"),
        "2"
    );
    assert_applied_once_in_order(&mut s, "c1");
}

#[test]
fn a_bulk_enqueue_drains_promptly_before_statistics_catch_up() {
    // Autovacuum off: the planner sees the statistics of the nearly empty queue while 20k rows
    // are pending. A claim planned as one UPDATE ... FROM once ran for minutes in this state.
    let pg = Cluster::start("stale_stats", &["autovacuum = off"]);
    let mut c = pg.client();
    c.batch_execute(
        "SELECT memory.enqueue('warm', 'x'); ANALYZE memory.chat_context_queue, memory.chat_metadata;",
    )
    .unwrap();
    c.batch_execute(
        "SELECT count(*) FROM (SELECT memory.enqueue('bulk' || (g % 2000), 'confirmed: n = ' || g) \
         FROM generate_series(0, 19999) g) x",
    )
    .unwrap();
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status <> 'complete'",
        "20k snippets applied",
        T,
    );
    assert_applied_once_in_order(&mut c, "bulk7");
}

/// Without shared_preload_libraries the library loads on first use, and until then its settings
/// are placeholders any role may SET. A role that sets `memory_ext.admin_role` to its own role
/// must not become an admin, and get() must work on a fresh connection (it once failed with
/// 42704 until some C function had loaded the library).
#[test]
fn without_preload_settings_cannot_be_spoofed() {
    let pg = Cluster::start_with("nopreload_spoof", &[], false);
    let mut c = pg.client();
    c.batch_execute(
        "CREATE ROLE authenticated NOLOGIN; SELECT memory.grant_usage('authenticated'); \
         BEGIN; SET LOCAL ROLE authenticated; \
         SELECT set_config('request.jwt.claims', '{\"sub\": \"alice\"}', true); \
         SELECT memory.enqueue('alices-chat', 'confirmed: secret = 42'); COMMIT",
    )
    .unwrap();
    // fresh connections: the library is not loaded in them yet
    let mut alice = pg.client();
    alice
        .batch_execute(
            "SET ROLE authenticated; \
             SELECT set_config('request.jwt.claims', '{\"sub\": \"alice\"}', false)",
        )
        .unwrap();
    assert_eq!(
        alice
            .query_one("SELECT pending FROM memory.get('alices-chat')", &[])
            .map(|r| r.get::<_, i32>(0))
            .map_err(|e| e.to_string()),
        Ok(1),
        "get() works on a fresh connection"
    );
    let mut bob = pg.client();
    bob.batch_execute(
        "SET ROLE authenticated; \
         SET memory_ext.admin_role = 'authenticated'; SET memory_ext.audit_reads = off; \
         SELECT set_config('request.jwt.claims', '{\"sub\": \"bob\"}', false)",
    )
    .unwrap();
    for sql in [
        "SELECT memory._is_admin()::text",
        "SELECT user_confirmed::text FROM memory.get('alices-chat')",
        "SELECT memory.forget('alices-chat')::text",
    ] {
        let got = bob
            .query_one(sql, &[])
            .map(|r| r.get::<_, String>(0))
            .map_err(|e| e.code().map(|s| s.code().to_string()).unwrap_or_default());
        assert!(
            matches!(got.as_ref().map(String::as_str), Ok("false"))
                || matches!(got.as_ref().map_err(String::as_str), Err("P0002")),
            "{sql}: {got:?}"
        );
    }
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM memory.chat_context_queue"
        ),
        "1",
        "alice's chat is untouched"
    );
}

/// With RUST_BACKTRACE set in the server's environment, an error must still carry no Rust
/// backtrace to the client.
#[test]
fn errors_carry_no_backtrace_to_the_client() {
    let pg = Cluster::start("backtrace", &[]);
    pg.restart_with_env(&["RUST_BACKTRACE=1"]);
    let mut c = pg.client();
    for sql in [
        "SELECT memory.wait(gen_random_uuid(), '-1 second')",
        "SELECT memory.count_tokens(repeat('a', 2000000))",
    ] {
        let e = c.query_one(sql, &[]).unwrap_err();
        let db = e.as_db_error().expect("an SQL error");
        assert_eq!(db.code().code(), "22023", "{sql}");
        let detail = db.detail().unwrap_or_default();
        assert!(
            !detail.contains("backtrace") && !detail.contains(".rs:"),
            "{sql}: DETAIL carries a backtrace: {detail}"
        );
    }
}

/// A client's lock never stalls the worker: an open transaction that enqueued into a chat (its
/// KEY SHARE lock) does not delay that chat's earlier snippet, and a chat row an admin holds FOR
/// UPDATE is skipped — other tenants' snippets are applied meanwhile — and finished once the lock
/// goes, without spending an attempt.
#[test]
fn a_client_holding_a_lock_never_stalls_the_worker() {
    let pg = Cluster::start("locks", &[]);
    let mut c = pg.client();
    let slow = "mock_sleep_ms: 1000\nconfirmed: a = 1";
    let open_first = enqueue(&mut c, "open", slow);
    let held = enqueue(&mut c, "held", slow);
    for id in [&open_first, &held] {
        pg.eventually(
            &mut c,
            &format!("SELECT status = 'processing' FROM memory.status('{id}')"),
            "claimed",
            T,
        );
    }
    // While both are being summarized: a client enqueues into "open" and keeps its transaction
    // open; an admin locks "held"'s row and keeps it.
    let mut client = pg.client();
    client.batch_execute("BEGIN").unwrap();
    let second: String = client
        .query_one(
            "SELECT queue_id::text FROM memory.enqueue('open', 'second')",
            &[],
        )
        .unwrap()
        .get(0);
    let mut admin = pg.client();
    admin
        .batch_execute(
            "BEGIN; SELECT 1 FROM memory.chat_metadata WHERE chat_id = 'held' FOR UPDATE",
        )
        .unwrap();
    assert_eq!(
        wait(&mut c, &open_first),
        "complete",
        "an open enqueue into the chat does not hold back its earlier snippet"
    );
    let other = enqueue(&mut c, "other", "confirmed: b = 2");
    assert_eq!(
        wait(&mut c, &other),
        "complete",
        "another tenant is served while a chat row is held"
    );
    assert_eq!(
        text(
            &mut c,
            &format!("SELECT status FROM memory.status('{held}')")
        ),
        "processing",
        "the held chat waits for its lock, and the worker does not"
    );
    admin.batch_execute("COMMIT").unwrap();
    client.batch_execute("COMMIT").unwrap();
    assert_eq!(wait(&mut c, &held), "complete");
    assert_eq!(wait(&mut c, &second), "complete");
    assert_eq!(
        text(
            &mut c,
            &format!("SELECT retry_count::text FROM memory.status('{held}')")
        ),
        "0",
        "no attempt spent"
    );
    assert_applied_once_in_order(&mut c, "open");
}

/// Refused cross-tenant attempts roll back with their ERROR, so they are noted in shared memory
/// and the worker writes them into the audit log: an admin can see who probed whose chats.
#[test]
fn refused_cross_tenant_attempts_reach_the_audit_log() {
    let pg = Cluster::start("denials", &["memory_ext.idle_timeout = 1"]);
    let mut c = pg.client();
    c.batch_execute(
        "CREATE ROLE authenticated NOLOGIN; SELECT memory.grant_usage('authenticated')",
    )
    .unwrap();
    let as_user = |c: &mut Client, sub: &str, sql: &str| -> Result<(), String> {
        let mut tx = c.transaction().unwrap();
        tx.batch_execute(&format!(
            "SET LOCAL ROLE authenticated; \
             SELECT set_config('request.jwt.claims', '{{\"sub\": \"{sub}\"}}', true)"
        ))
        .unwrap();
        let r = tx.batch_execute(sql).map_err(|e| {
            e.as_db_error()
                .map(|d| d.code().code().to_string())
                .unwrap_or_default()
        });
        let _ = tx.rollback();
        r
    };
    let mut alice = pg.client();
    alice
        .batch_execute(
            "SELECT set_config('request.jwt.claims', '{\"sub\": \"alice\"}', false); \
             SELECT memory.create_chat('alices-chat')",
        )
        .unwrap();
    for (sql, code) in [
        ("SELECT * FROM memory.get('alices-chat')", "P0002"),
        ("SELECT memory.forget('alices-chat')", "P0002"),
        ("SELECT memory.enqueue('alices-chat', 'x')", "42501"),
        ("SELECT * FROM memory.get('no-such-chat')", "P0002"),
    ] {
        assert_eq!(as_user(&mut c, "bob", sql), Err(code.to_string()), "{sql}");
    }
    pg.eventually(
        &mut c,
        "SELECT coalesce(array_agg(action ORDER BY at) = ARRAY['denied:get', 'denied:forget', \
         'denied:enqueue'], false) FROM memory.audit_log WHERE identity = 'bob'",
        "bob's three refused attempts on alice's chat audited (a missing chat is no attempt)",
        T,
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT string_agg(DISTINCT role || ' ' || chat_id, ',') FROM memory.audit_log \
             WHERE identity = 'bob'"
        ),
        "authenticated alices-chat"
    );
}

/// memory_ext.debounce: a burst of turns, each committed on its own, becomes one summarization
/// no sooner than the debounce after the last of them; debounce_max bounds the wait of a chat
/// that never goes quiet (here 2 s, against a 60 s debounce that wait() would outlast).
#[test]
fn debounce_turns_a_burst_into_one_summarization() {
    let pg = Cluster::start(
        "debounce",
        &[
            "memory_ext.debounce = '3s'",
            "memory_ext.debounce_max = '30s'",
        ],
    );
    let mut c = pg.client();
    let estimate: bool = c
        .query_one(
            "SELECT estimated_completion >= now() + interval '3 s'
               FROM memory.enqueue('c1', 'confirmed: turn = start')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(estimate, "the estimate counts the debounce");
    let mut last = String::new();
    for i in 0..5 {
        last = enqueue(&mut c, "c1", &format!("confirmed: turn = {i}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(wait(&mut c, &last), "complete");
    assert_applied_once_in_order(&mut c, "c1");
    let (versions, held): (i64, bool) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM memory.chat_memory_history WHERE chat_id = 'c1'),
                        (SELECT min(h.changed_at) FROM memory.chat_memory_history h)
                          >= (SELECT max(q.created_at) FROM memory.chat_context_queue q)
                             + interval '3 s'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(versions, 1, "one summarization for the burst");
    assert!(
        held,
        "applied no sooner than the debounce after the last turn"
    );

    for sql in [
        "ALTER SYSTEM SET memory_ext.debounce = '60s'",
        "ALTER SYSTEM SET memory_ext.debounce_max = '2s'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).unwrap();
    }
    pg.eventually(
        &mut c,
        "SELECT current_setting('memory_ext.debounce_max') = '2s'",
        "the reload",
        T,
    );
    let first = enqueue(&mut c, "c2", "confirmed: a = 1");
    enqueue(&mut c, "c2", "confirmed: b = 2");
    let r: String = c
        .query_one(
            "SELECT memory.wait($1::text::uuid, '20 seconds')",
            &[&first],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        r, "complete",
        "debounce_max, not the 60 s debounce, decided"
    );
}

/// With memory_ext.workers_per_database, a backlog is drained by the worker and the helpers it
/// starts, each summarizing other chats: every snippet applied once, in order, with the memory
/// it must give; the helpers leave once nothing is left; DROP DATABASE stops them with the
/// worker.
#[test]
fn helpers_drain_a_backlog_beside_the_worker_and_leave_when_idle() {
    let pg = Cluster::start(
        "helpers",
        &[
            "memory_ext.workers_per_database = 4",
            "memory_ext.batch_chats = 10",
            "memory_ext.database = 'postgres, busy'",
            "max_worker_processes = 16",
        ],
    );
    let mut c = pg.client();
    let helpers = |db: &str| {
        format!(
            "(SELECT count(*) FROM pg_stat_activity \
              WHERE backend_type = 'memory_ext helper' AND datname = '{db}')"
        )
    };
    // 300 chats × 3 snippets, each summarization sleeping 5 ms: seconds of work for one backend
    let backlog = "SELECT count(*) FROM generate_series(0, 899) g, \
                     LATERAL memory.enqueue('c' || g % 300, \
                       format(E'confirmed: k%s = v%s\\nmock_sleep_ms: 5', g / 300, g)) e";
    c.batch_execute(backlog).unwrap();
    pg.eventually(
        &mut c,
        &format!("SELECT {} > 0", helpers("postgres")),
        "helpers started",
        T,
    );
    pg.eventually(
        &mut c,
        "SELECT count(*) = 0 FROM memory.chat_context_queue WHERE status <> 'complete'",
        "the backlog drained",
        T,
    );
    // I4 for every chat: its versions' snippets, in version order, are its complete rows in
    // seq order; and the memory holds each chat's three facts
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*)::text FROM memory.chat_metadata m \
              WHERE (SELECT array_agg(u.id ORDER BY h.version, u.o) \
                       FROM memory.chat_memory_history h, unnest(h.queue_ids) WITH ORDINALITY u(id, o) \
                      WHERE h.chat_id = m.chat_id) \
                    = (SELECT array_agg(q.id ORDER BY q.seq) FROM memory.chat_context_queue q \
                        WHERE q.chat_id = m.chat_id) \
                AND m.user_confirmed = jsonb_build_object( \
                      'k0', 'v' || substr(m.chat_id, 2), \
                      'k1', 'v' || (substr(m.chat_id, 2)::int + 300), \
                      'k2', 'v' || (substr(m.chat_id, 2)::int + 600))"
        ),
        "300"
    );
    pg.eventually(
        &mut c,
        &format!("SELECT {} = 0", helpers("postgres")),
        "helpers left, idle",
        T,
    );

    // DROP DATABASE while helpers drain it
    c.batch_execute("CREATE DATABASE busy").unwrap();
    let mut b = pg.client_db("busy");
    b.batch_execute("CREATE EXTENSION memory_ext").unwrap();
    b.batch_execute(backlog).unwrap();
    pg.eventually(
        &mut c,
        &format!("SELECT {} > 0", helpers("busy")),
        "helpers in busy",
        T,
    );
    drop(b);
    c.batch_execute("DROP DATABASE busy").unwrap();
    assert_eq!(
        text(&mut c, &format!("SELECT {}::text", helpers("busy"))),
        "0"
    );
}
