//! Serving every database of a cluster: with `memory_ext.database` empty, one worker for each
//! database that has the extension, started at CREATE EXTENSION, gone at DROP EXTENSION and
//! DROP DATABASE (which must not wait on it); none for a database without the extension; a cap.

use memory_ext_cluster_tests::{Cluster, enqueue, pg_bin, text, wait};
use postgres::Client;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn start(name: &str, conf: &[&str]) -> Cluster {
    let mut lines = vec!["memory_ext.database = ''"];
    lines.extend_from_slice(conf);
    let pg = Cluster::init(name, &lines, true, &pg_bin(), &[]);
    pg.ctl("start");
    pg
}

/// The databases a memory_ext worker is connected to, by name.
fn served(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT datname::text FROM pg_stat_activity WHERE backend_type = 'memory_ext worker' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn eventually_served(pg: &Cluster, c: &mut Client, dbs: &[&str]) {
    let list = dbs.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>();
    let want = if list.is_empty() {
        "ARRAY[]::text[]".to_string()
    } else {
        format!("ARRAY[{}]", list.join(", "))
    };
    pg.eventually(
        c,
        &format!(
            "SELECT coalesce(array_agg(datname::text ORDER BY datname), '{{}}') = {want} \
               FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'"
        ),
        &format!("workers serving exactly {dbs:?}"),
        T,
    );
}

fn create_with_extension(pg: &Cluster, c: &mut Client, db: &str) -> Client {
    c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut d = pg.client_db(db);
    d.batch_execute("CREATE EXTENSION memory_ext").unwrap();
    d
}

/// A snippet enqueued in `db` is applied (by that database's worker: no other can see it).
fn applied_in(c: &mut Client, chat: &str) {
    let id = enqueue(c, chat, &format!("confirmed: chat = {chat}"));
    assert_eq!(wait(c, &id), "complete", "{chat}");
}

#[test]
fn every_database_with_the_extension_gets_its_own_worker() {
    let pg = start("databases", &["memory_ext.rate_limit_per_minute = 3"]);
    let mut c = pg.client();
    c.batch_execute("CREATE DATABASE plain").unwrap();
    c.batch_execute("CREATE ROLE api NOLOGIN").unwrap();
    let mut dbs: Vec<Client> = ["db_a", "db_b", "db_c"]
        .iter()
        .map(|d| create_with_extension(&pg, &mut c, d))
        .collect();
    for (i, d) in dbs.iter_mut().enumerate() {
        applied_in(d, &format!("chat-{i}"));
    }
    eventually_served(&pg, &mut c, &["db_a", "db_b", "db_c"]);
    for (d, name) in dbs.iter_mut().zip(["db_a", "db_b", "db_c"]) {
        let (running, database, processed): (bool, String, i64) = d
            .query_one(
                "SELECT running, database, processed FROM memory.worker_status()",
                &[],
            )
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap();
        assert!(running && database == name && processed == 1, "{name}");
    }

    // Rate limits, refused attempts and waits are per database: the same role in two databases
    // has two buckets, and an attempt refused in db_a is audited in db_a only.
    for d in dbs.iter_mut().take(2) {
        d.batch_execute("SELECT memory.grant_usage('api')").unwrap();
        let ok = d
            .batch_execute(
                "BEGIN; SET LOCAL ROLE api;
                 SELECT memory.enqueue('api-chat', 'one'); SELECT memory.enqueue('api-chat', 'two');
                 SELECT memory.enqueue('api-chat', 'three'); COMMIT;",
            )
            .is_ok();
        assert!(ok, "three calls in each database are within the limit");
    }
    let refused = dbs[0]
        .batch_execute("BEGIN; SET LOCAL ROLE api; SELECT memory.get('chat-0'); COMMIT;")
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("P0002"));
    dbs[0].batch_execute("ROLLBACK").unwrap();
    pg.eventually(
        &mut dbs[0],
        "SELECT count(*) = 1 FROM memory.audit_log WHERE action = 'denied:get'",
        "the refused attempt audited in its database",
        T,
    );
    assert_eq!(
        text(
            &mut dbs[1],
            "SELECT count(*)::text FROM memory.audit_log WHERE action LIKE 'denied:%'"
        ),
        "0"
    );

    // A DROP DATABASE its issuer may not run stops nothing.
    let pid_a = text(
        &mut c,
        "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'memory_ext worker' AND datname = 'db_a'",
    );
    c.batch_execute("SET ROLE api").unwrap();
    let refused = c.batch_execute("DROP DATABASE db_a").unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"));
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(
        text(
            &mut c,
            "SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'memory_ext worker' AND datname = 'db_a'",
        ),
        pid_a
    );

    // CREATE EXTENSION in a new database while running: served at once.
    let mut d = create_with_extension(&pg, &mut c, "db_d");
    applied_in(&mut d, "chat-d");

    // DROP DATABASE of a served database succeeds (its worker is stopped first); the others
    // keep being served.
    drop(dbs.remove(1));
    c.batch_execute("DROP DATABASE db_b").unwrap();
    applied_in(&mut dbs[0], "chat-0-again");
    // DROP EXTENSION: that database's worker leaves.
    dbs[1].batch_execute("DROP EXTENSION memory_ext").unwrap();
    eventually_served(&pg, &mut c, &["db_a", "db_d"]);
    // ... and comes back with CREATE EXTENSION.
    dbs[1].batch_execute("CREATE EXTENSION memory_ext").unwrap();
    applied_in(&mut dbs[1], "chat-c-again");
    eventually_served(&pg, &mut c, &["db_a", "db_c", "db_d"]);
    assert_eq!(served(&mut c).len(), 3, "none for postgres or plain");
    let log = pg.log();
    assert!(!log.contains("terminated by signal"), "{log}");
}

#[test]
fn beyond_max_workers_a_database_is_left_out_and_told_why() {
    let pg = start("workercap", &["memory_ext.max_workers = 2"]);
    let mut c = pg.client();
    let mut dbs: Vec<Client> = ["cap_a", "cap_b", "cap_c"]
        .iter()
        .map(|d| create_with_extension(&pg, &mut c, d))
        .collect();
    // Two are served; the third says why not.
    pg.eventually(
        &mut c,
        "SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'",
        "two databases served",
        T,
    );
    let served_now = served(&mut c);
    let out = ["cap_a", "cap_b", "cap_c"]
        .iter()
        .position(|d| !served_now.contains(&d.to_string()))
        .expect("one left out");
    let name = ["cap_a", "cap_b", "cap_c"][out];
    pg.eventually(
        &mut dbs[out],
        &format!(
            "SELECT NOT running AND state LIKE 'no worker: memory_ext.max_workers (2) reached: not serving %' \
                    AND '{name}' = ANY (string_to_array(split_part(state, 'not serving ', 2), ', ')) \
               FROM memory.worker_status()"
        ),
        "the database left out is told why",
        T,
    );
    // A served database's worker that dies keeps its place: restarted in its slot, while the
    // database left out stays out (the cap counts slots, not live processes).
    let victim = served_now[0].clone();
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE backend_type = 'memory_ext worker' AND datname = $1",
        &[&victim],
    )
    .unwrap();
    let victim_db = ["cap_a", "cap_b", "cap_c"]
        .iter()
        .position(|d| *d == victim)
        .unwrap();
    applied_in(&mut dbs[victim_db], "after-restart");
    assert_eq!(served(&mut c), served_now, "the same two databases served");
    let id = enqueue(&mut dbs[out], "chat", "confirmed: waits = yes");
    // A served database letting go of its worker makes room.
    let other = (out + 1) % 3;
    dbs[other]
        .batch_execute("DROP EXTENSION memory_ext")
        .unwrap();
    assert_eq!(wait(&mut dbs[out], &id), "complete");
    pg.eventually(
        &mut c,
        "SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'",
        "still two served",
        T,
    );
}

#[test]
fn a_restarted_launcher_leaves_no_database_with_two_workers() {
    let pg = start("launcher_restart", &[]);
    let mut c = pg.client();
    let mut dbs: Vec<Client> = ["lr_a", "lr_b"]
        .iter()
        .map(|d| create_with_extension(&pg, &mut c, d))
        .collect();
    for d in dbs.iter_mut() {
        applied_in(d, "before");
    }
    let launcher: i32 = c
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'memory_ext launcher'",
            &[],
        )
        .unwrap()
        .get(0);
    c.execute("SELECT pg_terminate_backend($1)", &[&launcher])
        .unwrap();
    // The postmaster starts a new launcher (after its restart time); it stops the workers the
    // old one left and starts its own: one per database, never two.
    pg.eventually(
        &mut c,
        &format!(
            "SELECT count(*) = 1 FROM pg_stat_activity \
              WHERE backend_type = 'memory_ext launcher' AND pid <> {launcher}"
        ),
        "a new launcher",
        T,
    );
    for d in dbs.iter_mut() {
        applied_in(d, "after");
    }
    eventually_served(&pg, &mut c, &["lr_a", "lr_b"]);
    let per_db: i64 = c
        .query_one(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM pg_stat_activity \
              WHERE backend_type = 'memory_ext worker' GROUP BY datname) x",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(per_db, 1);
}
