//! A seeded, randomized stress test of the worker's guarantees under chaos, checked against a
//! reference model written here (independent of the extension's code).
//!
//! Four clients enqueue random snippets (facts on colliding keys, summary lines, now and then a
//! snippet the summarizer rejects) into 24 chats, alone or several per transaction, while a chaos
//! thread switches the summarizer between `mock` and `openai` (a flaky fake LLM: 429s, 500s,
//! answers slower than the lease), changes batch sizes and the lease timeout, terminates or
//! `kill -9`s the worker (a crash-restart of every backend), forgets chats, rebuilds them
//! (`memory.rebuild()`: the memory must end as if it had not been) and erases single snippets
//! (`memory.forget_snippet()`: the model folds the chat without them). Then the system
//! heals (a healthy endpoint, a long lease) and, once nothing is pending, every surviving chat
//! must hold each accepted snippet exactly once, applied in enqueue order, with the memory the
//! reference model folds from them; rejected snippets alone are `failed`. Throughout, every
//! chat holding an open snippet must be due or leased (else the worker would never see it, and
//! `get()` reports its pending count from that).
//!
//! Every random choice comes from one seed (printed at the start and in every failure):
//!
//! ```sh
//! MEMORY_EXT_STRESS_SEED=N MEMORY_EXT_STRESS_SECS=60 \
//!     cargo test --manifest-path tests/cluster/Cargo.toml --test stress
//! ```
//!
//! Thread timing is not reproducible, but each thread's schedule of actions is.

use memory_ext_cluster_tests::fake_llm::{FakeLlm, Mode};
use memory_ext_cluster_tests::mock_rules::{
    SUMMARY_MAX_CHARS, directive, fold_summary, key_value, tail,
};
use memory_ext_cluster_tests::{Cluster, Rng, enqueued_ids};
use postgres::Client;
use postgres::error::SqlState;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHATS: u64 = 24;
const CLIENTS: u64 = 4;
const KEYS: u64 = 5;
/// At most this many chats are forgotten, so most survive to be checked.
const MAX_FORGETS: usize = 6;
/// At most this many snippets are erased (forget_snippet): each re-derives a chat.
const MAX_ERASURES: usize = 8;
const DEFAULT_SECS: u64 = 60;
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// The fake LLM's chaos: probabilities of 429 and 500, and the longest answer delay.
const P_429: f64 = 0.04;
const P_500: f64 = 0.08;
const MAX_DELAY_MS: u64 = 2500;
const FATAL_LINE: &str = "mock_fatal: rejected";

fn chat_name(i: usize) -> String {
    format!("stress-{i}")
}

fn seed_from_env() -> u64 {
    match std::env::var("MEMORY_EXT_STRESS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MEMORY_EXT_STRESS_SEED={s:?} is not a u64")),
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
        }
    }
}

fn secs_from_env() -> u64 {
    std::env::var("MEMORY_EXT_STRESS_SECS")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("MEMORY_EXT_STRESS_SECS={s:?} is not a number"))
        })
        .unwrap_or(DEFAULT_SECS)
}

fn rerun(seed: u64) -> String {
    format!(
        "seed {seed} (rerun: MEMORY_EXT_STRESS_SEED={seed} cargo test --manifest-path tests/cluster/Cargo.toml --test stress)"
    )
}

// ---- the reference model ----------------------------------------------------------------------

/// A snippet the summarizer rejects as input: it is dead-lettered alone and changes nothing.
fn is_rejected(text: &str) -> bool {
    text.lines()
        .any(|l| directive(l.trim(), "mock_fatal").is_some())
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    confirmed: BTreeMap<String, String>,
    inferred: BTreeMap<String, String>,
    summary: String,
}

impl Model {
    /// Fold one accepted snippet into the memory, line by line.
    fn apply(&mut self, text: &str) {
        if is_rejected(text) {
            return;
        }
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let confirmed = directive(line, "confirmed").map(key_value);
            let inferred = directive(line, "inferred").map(key_value);
            let retract = directive(line, "retract").filter(|k| !k.is_empty());
            match (confirmed, inferred, retract) {
                (Some(Some((k, v))), _, _) => {
                    self.inferred.remove(&k);
                    self.confirmed.insert(k, v);
                }
                (_, Some(Some((k, v))), _) => {
                    if !self.confirmed.contains_key(&k) {
                        self.inferred.insert(k, v);
                    }
                }
                (_, _, Some(k)) => {
                    self.inferred.remove(k);
                }
                _ => self.summary = fold_summary(&self.summary, line),
            }
        }
    }
}

fn json_object(m: &BTreeMap<String, String>) -> Value {
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

// ---- shared state -----------------------------------------------------------------------------

/// What a client knows about one of its enqueues.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// COMMIT returned Ok.
    Accepted,
    /// The connection died during COMMIT: looked up after healing.
    Unknown,
}

#[derive(Clone, Debug)]
struct Entry {
    id: String,
    text: String,
    fate: Fate,
    /// The client transaction (client << 32 | number): a transaction commits all or nothing.
    tx: u64,
}

/// One chat as the clients saw it. Its mutex is held across each enqueue transaction touching
/// the chat and across `forget`, so `entries` is in commit order, which must be seq order.
#[derive(Debug, Default)]
struct ChatLog {
    forgotten: bool,
    /// A snippet of it was erased (forget_snippet): versions are no longer 1..n.
    erased: bool,
    entries: Vec<Entry>,
}

struct Shared {
    seed: u64,
    start: Instant,
    deadline: Instant,
    chats: Vec<Mutex<ChatLog>>,
    /// Errors that a healthy connection should never see (violations).
    problems: Mutex<Vec<String>>,
    /// The chaos schedule as it happened, for failure messages.
    events: Mutex<Vec<String>>,
    /// The most helpers (memory_ext.workers_per_database) the chaos thread saw draining at once.
    max_helpers: std::sync::atomic::AtomicI64,
    /// The largest batch_chats the chaos thread sets.
    max_batch: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn problem(&self, msg: String) {
        lock(&self.problems).push(msg);
    }

    fn event(&self, msg: String) {
        let ms = self.start.elapsed().as_millis();
        lock(&self.events).push(format!("{ms:>7} ms  {msg}"));
    }
}

/// A connection, retried for a minute (a crash-restart takes a few seconds); a failure names the
/// seed and shows the end of the server log.
fn connect(pg: &Cluster, seed: u64) -> Client {
    pg.try_client_db("postgres", Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "memory_ext stress: cannot connect for 60 s: {e}; postmaster running: {}\n\
                 --- server log (last 80 lines) ---\n{}\n{}",
                pg.running(),
                pg.log_tail(80),
                rerun(seed)
            )
        })
}

/// The error means the connection is gone (a crash-restart, a terminated backend), not a bug.
fn connection_lost(c: &Client, e: &postgres::Error) -> bool {
    c.is_closed()
        || e.is_closed()
        || e.code().is_some_and(|code| {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        })
}

// ---- clients ----------------------------------------------------------------------------------

/// A random snippet of 1–4 lines; about 2 % hold a line the summarizer rejects.
fn snippet(rng: &mut Rng, client: u64, note: &mut u64) -> String {
    let mut lines: Vec<String> = (0..rng.range(1, 4))
        .map(|_| {
            let (k, v) = (rng.below(KEYS), rng.below(1000));
            match rng.below(100) {
                0..=29 => format!("confirmed: k{k} = v{v}"),
                30..=54 => format!("inferred: k{k} = v{v}"),
                55..=69 => format!("retract: k{k}"),
                _ => {
                    *note += 1;
                    format!("note {note} from client {client}")
                }
            }
        })
        .collect();
    if rng.chance(0.02) {
        let at = rng.below(lines.len() as u64 + 1) as usize;
        lines.insert(at, FATAL_LINE.to_string());
    }
    lines.join("\n")
}

enum TxResult {
    Committed(Vec<String>),
    /// The connection died during COMMIT.
    Unknown(Vec<String>),
    RolledBack(postgres::Error),
}

/// A captured row's id: the newest of its chat, queued (a new chat) or in the capture inbox.
/// This client alone writes the chat (its lock), and no claim or move sees the row before COMMIT.
const CAPTURED_ID: &str = "SELECT id::text FROM ( \
       SELECT id, seq FROM memory.capture_inbox WHERE chat_id = $1 \
       UNION ALL SELECT id, seq FROM memory.chat_context_queue WHERE chat_id = $1) x \
     ORDER BY seq DESC LIMIT 1";

/// Enqueue `items` (chat index, snippet, captured) in one transaction: through enqueue(), or
/// captured from an insert into the watched table stress_msgs.
fn run_tx(c: &mut Client, items: &[Item]) -> TxResult {
    let mut tx = match c.transaction() {
        Ok(tx) => tx,
        Err(e) => return TxResult::RolledBack(e),
    };
    let mut ids = Vec::new();
    for (chat, text, captured) in items {
        let chat = chat_name(*chat);
        let row = if *captured {
            tx.execute(
                "INSERT INTO public.stress_msgs (chat, body) VALUES ($1, $2)",
                &[&chat, text],
            )
            .and_then(|_| tx.query_one(CAPTURED_ID, &[&chat]))
        } else {
            tx.query_one(
                "SELECT queue_id::text FROM memory.enqueue($1, $2)",
                &[&chat, text],
            )
        };
        match row {
            Ok(row) => ids.push(row.get(0)),
            Err(e) => return TxResult::RolledBack(e),
        }
    }
    match tx.commit() {
        Ok(()) => TxResult::Committed(ids),
        Err(e) => {
            if connection_lost(c, &e) {
                TxResult::Unknown(ids)
            } else {
                TxResult::RolledBack(e)
            }
        }
    }
}

/// (chat index, snippet, captured from the watched table rather than enqueued)
type Item = (usize, String, bool);

/// One client transaction: its items in enqueue order, then a pause.
struct Plan {
    items: Vec<Item>,
    pause: Duration,
    /// Earlier tries lost with their connection before COMMIT.
    tries: u32,
}

fn client(sh: &Shared, pg: &Cluster, t: u64) {
    let mut rng = Rng::derived(sh.seed, 1 + t);
    let mut c = connect(pg, sh.seed);
    let (mut n_tx, mut note) = (0u64, 0u64);
    // A transaction lost with its connection before COMMIT is tried again (twice at most).
    // The pause after it is drawn with it, so the sequence of draws does not depend on timing.
    let mut again: Option<Plan> = None;
    while Instant::now() < sh.deadline {
        let Plan {
            mut items,
            pause,
            tries,
        } = match again.take() {
            Some(x) => x,
            None => {
                let chats: Vec<usize> = match rng.below(10) {
                    0..=6 => vec![rng.below(CHATS) as usize],
                    7..=8 => vec![rng.below(CHATS) as usize; rng.range(2, 3) as usize],
                    _ => (0..rng.range(2, 4))
                        .map(|_| rng.below(CHATS) as usize)
                        .collect(),
                };
                let mut items: Vec<Item> = chats
                    .into_iter()
                    .map(|ch| {
                        let text = snippet(&mut rng, t, &mut note);
                        (ch, text, rng.chance(0.3))
                    })
                    .collect();
                // by chat (stable: a chat's snippets keep their order)
                items.sort_by_key(|(ch, _, _)| *ch);
                Plan {
                    items,
                    pause: Duration::from_millis(rng.range(20, 100)),
                    tries: 0,
                }
            }
        };
        {
            // Lock the chats in index order (no deadlock with other clients or forget).
            let mut guards: BTreeMap<usize, MutexGuard<ChatLog>> = BTreeMap::new();
            for (ch, _, _) in &items {
                guards.entry(*ch).or_insert_with(|| lock(&sh.chats[*ch]));
            }
            items.retain(|(ch, _, _)| !guards[ch].forgotten);
            if !items.is_empty() {
                n_tx += 1;
                let tx = (t << 32) | n_tx;
                let record = |guards: &mut BTreeMap<usize, MutexGuard<ChatLog>>,
                              ids: Vec<String>,
                              fate: Fate| {
                    for ((ch, text, _), id) in items.iter().zip(ids) {
                        guards.get_mut(ch).unwrap().entries.push(Entry {
                            id,
                            text: text.clone(),
                            fate,
                            tx,
                        });
                    }
                };
                match run_tx(&mut c, &items) {
                    TxResult::Committed(ids) => record(&mut guards, ids, Fate::Accepted),
                    TxResult::Unknown(ids) => record(&mut guards, ids, Fate::Unknown),
                    TxResult::RolledBack(e) => {
                        if connection_lost(&c, &e) {
                            if tries < 2 {
                                again = Some(Plan {
                                    items,
                                    pause,
                                    tries: tries + 1,
                                });
                            }
                        } else {
                            sh.problem(format!(
                                "client {t}: enqueue failed on a live connection: {e} ({:?})",
                                e.code()
                            ));
                        }
                    }
                }
            }
        }
        if c.is_closed() {
            c = connect(pg, sh.seed);
        }
        std::thread::sleep(pause);
    }
}

// ---- chaos ------------------------------------------------------------------------------------

fn alter(c: &mut Client, name: &str, value: &str) -> Result<(), postgres::Error> {
    c.batch_execute(&format!("ALTER SYSTEM SET memory_ext.{name} = '{value}'"))?;
    c.batch_execute("SELECT pg_reload_conf()")
}

fn worker_pid(c: &mut Client) -> Result<Option<i32>, postgres::Error> {
    Ok(c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'",
        &[],
    )?
    .map(|r| r.get(0)))
}

/// Forget chat `ch` (marked forgotten first, its lock held throughout); retried until done.
fn forget(sh: &Shared, pg: &Cluster, c: &mut Client, ch: usize) {
    let mut log = lock(&sh.chats[ch]);
    log.forgotten = true;
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match c.execute("SELECT memory.forget($1)", &[&chat_name(ch)]) {
            Ok(_) => return,
            // never enqueued into, or a forget whose COMMIT we did not see went through
            Err(e) if e.code() == Some(&SqlState::NO_DATA_FOUND) => return,
            Err(e) => {
                if connection_lost(c, &e) {
                    *c = connect(pg, sh.seed);
                } else {
                    sh.problem(format!(
                        "forget({}) failed on a live connection: {e} ({:?})",
                        chat_name(ch),
                        e.code()
                    ));
                }
                if Instant::now() > give_up {
                    sh.problem(format!("forget({}) never succeeded", chat_name(ch)));
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn chaos(sh: &Shared, pg: &Cluster) {
    let mut rng = Rng::derived(sh.seed, 1000);
    let mut c = connect(pg, sh.seed);
    let mut forgets = 0;
    let mut erasures = 0;
    loop {
        std::thread::sleep(Duration::from_millis(rng.range(100, 1200)));
        if Instant::now() >= sh.deadline {
            return;
        }
        // not a random choice: the schedule stays the seed's
        if let Ok(r) = c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'memory_ext helper'",
            &[],
        ) {
            sh.max_helpers
                .fetch_max(r.get::<_, i64>(0), std::sync::atomic::Ordering::Relaxed);
        }
        // No lost wake-up, at any moment: a chat with an open snippet is due or leased (one
        // snapshot). get() and context() count a chat's pending snippets only then.
        if let Ok(r) = c.query_one(
            "SELECT string_agg(m.chat_id, ', ') FROM memory.chat_metadata m \
             WHERE m.due_at IS NULL AND m.lease_token IS NULL AND (EXISTS ( \
                   SELECT 1 FROM memory.chat_context_queue q WHERE q.chat_id = m.chat_id \
                      AND q.status IN ('pending_summarization', 'processing')) \
                OR EXISTS (SELECT 1 FROM memory.capture_inbox i WHERE i.chat_id = m.chat_id))",
            &[],
        ) && let Some(idle) = r.get::<_, Option<String>>(0)
        {
            sh.problem(format!(
                "open snippets in chats neither due nor leased: {idle}"
            ));
        }
        let roll = rng.below(100);
        let result = match roll {
            0..=19 => {
                let s = if rng.chance(0.5) { "mock" } else { "openai" };
                sh.event(format!("summarizer = {s}"));
                alter(&mut c, "summarizer", s)
            }
            20..=34 => {
                let n = rng.range(3, sh.max_batch).to_string();
                sh.event(format!("batch_chats = {n}"));
                alter(&mut c, "batch_chats", &n)
            }
            35..=49 => {
                let n = rng.range(1, 10).to_string();
                sh.event(format!("batch_snippets = {n}"));
                alter(&mut c, "batch_snippets", &n)
            }
            50..=61 => {
                let n = rng.range(1, 3).to_string();
                sh.event(format!("lease_timeout = {n} s"));
                alter(&mut c, "lease_timeout", &n)
            }
            62..=71 => {
                sh.event("pg_terminate_backend(worker)".into());
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE backend_type = 'memory_ext worker'",
                    &[],
                )
                .map(drop)
            }
            72..=76 => match worker_pid(&mut c) {
                Ok(Some(pid)) => {
                    sh.event(format!("kill -9 worker {pid} (crash-restart)"));
                    let ok = std::process::Command::new("kill")
                        .args(["-9", &pid.to_string()])
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        sh.event(format!("kill -9 {pid} failed (already gone?)"));
                    }
                    Ok(())
                }
                Ok(None) => {
                    sh.event("kill -9: no worker running".into());
                    Ok(())
                }
                Err(e) => Err(e),
            },
            77..=82 => {
                let ch = rng.below(CHATS) as usize;
                if forgets < MAX_FORGETS && !lock(&sh.chats[ch]).forgotten {
                    forgets += 1;
                    sh.event(format!("forget({})", chat_name(ch)));
                    forget(sh, pg, &mut c, ch);
                    sh.event(format!("forget({}) done", chat_name(ch)));
                }
                Ok(())
            }
            83..=90 => {
                let ch = rng.below(CHATS) as usize;
                sh.event(format!("rebuild({})", chat_name(ch)));
                rebuild(sh, &mut c, ch)
            }
            91..=96 => {
                let (ch, pick) = (rng.below(CHATS) as usize, rng.next_u64());
                if erasures < MAX_ERASURES {
                    erasures += 1;
                    forget_snippet(sh, pg, &mut c, ch, pick);
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            if connection_lost(&c, &e) {
                sh.event(format!("chaos connection lost: {e}"));
            } else {
                sh.problem(format!(
                    "chaos action failed on a live connection: {e} ({:?})",
                    e.code()
                ));
            }
        }
        if c.is_closed() {
            c = connect(pg, sh.seed);
        }
    }
}

/// Re-derive chat `ch` (memory.rebuild()): its memory must end as if it had not been rebuilt.
fn rebuild(sh: &Shared, c: &mut Client, ch: usize) -> Result<(), postgres::Error> {
    let _log = lock(&sh.chats[ch]);
    match c.execute("SELECT memory.rebuild($1)", &[&chat_name(ch)]) {
        // never enqueued into, or forgotten
        Err(e) if e.code() == Some(&SqlState::NO_DATA_FOUND) => Ok(()),
        r => r.map(drop),
    }
}

/// Erase one accepted snippet of chat `ch` (memory.forget_snippet()), its lock held throughout:
/// the model then folds the chat without it. A call whose COMMIT we did not see is decided by
/// whether the row still exists.
fn forget_snippet(sh: &Shared, pg: &Cluster, c: &mut Client, ch: usize, pick: u64) {
    let mut log = lock(&sh.chats[ch]);
    let known: Vec<usize> = (0..log.entries.len())
        .filter(|&i| log.entries[i].fate == Fate::Accepted)
        .collect();
    if log.forgotten || known.is_empty() {
        return;
    }
    let i = known[pick as usize % known.len()];
    let id = log.entries[i].id.clone();
    sh.event(format!("forget_snippet({}, #{i})", chat_name(ch)));
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match c.execute("SELECT memory.forget_snippet($1::text::uuid)", &[&id]) {
            Ok(_) => break,
            Err(e) if connection_lost(c, &e) => {
                *c = connect(pg, sh.seed);
                let gone: bool = c
                    .query_one(
                        "SELECT NOT EXISTS (SELECT 1 FROM memory.chat_context_queue \
                          WHERE id = $1::text::uuid)",
                        &[&id],
                    )
                    .map(|r| r.get(0))
                    .unwrap_or(false);
                if gone {
                    break;
                }
            }
            Err(e) => {
                sh.problem(format!(
                    "forget_snippet({id}) failed on a live connection: {e}"
                ));
                return;
            }
        }
        if Instant::now() > give_up {
            sh.problem(format!("forget_snippet({id}) never succeeded"));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log.entries.remove(i);
    log.erased = true;
}

// ---- checking ---------------------------------------------------------------------------------

/// Where two strings first differ, with some context.
fn str_diff(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<char>, Vec<char>) = (expected.chars().collect(), actual.chars().collect());
    let i = e.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let window = |v: &[char]| -> String {
        v[i.saturating_sub(60)..(i + 60).min(v.len())]
            .iter()
            .collect()
    };
    format!(
        "lengths {} (expected) vs {} (actual), first difference at char {i}:\n      expected …{}…\n      actual   …{}…",
        e.len(),
        a.len(),
        window(&e),
        window(&a)
    )
}

/// Two id sequences that should be equal: where they part, what is missing, extra, repeated.
fn seq_diff(expected: &[String], actual: &[String], label: &HashMap<String, String>) -> String {
    let name = |id: &String| label.get(id).cloned().unwrap_or_else(|| format!("?{id}"));
    let i = expected
        .iter()
        .zip(actual)
        .take_while(|(x, y)| x == y)
        .count();
    let around = |v: &[String]| -> String {
        v[i.saturating_sub(3)..(i + 4).min(v.len())]
            .iter()
            .map(name)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (es, as_): (HashSet<&String>, HashSet<&String>) =
        (expected.iter().collect(), actual.iter().collect());
    let missing: Vec<String> = expected
        .iter()
        .filter(|id| !as_.contains(id))
        .map(name)
        .collect();
    let extra: Vec<String> = actual
        .iter()
        .filter(|id| !es.contains(id))
        .map(name)
        .collect();
    let mut seen = HashSet::new();
    let repeated: Vec<String> = actual
        .iter()
        .filter(|id| !seen.insert(*id))
        .map(name)
        .collect();
    format!(
        "lengths {} (expected) vs {} (actual), first difference at {i}: expected [{}] actual [{}]; \
         missing {missing:?}, unexpected {extra:?}, repeated {repeated:?}",
        expected.len(),
        actual.len(),
        around(expected),
        around(actual)
    )
}

/// Check one chat that was never forgotten; violations are appended to `v`.
fn check_chat(c: &mut Client, ch: usize, log: &ChatLog, v: &mut Vec<String>) {
    let (accepted, erased) = (&log.entries[..], log.erased);
    let chat = chat_name(ch);
    let mut bad = |msg: String| v.push(format!("{chat}: {msg}"));
    // #n = the n-th accepted snippet of the chat in commit order; (R) = rejected
    let label: HashMap<String, String> = accepted
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let r = if is_rejected(&e.text) { "(R)" } else { "" };
            (e.id.clone(), format!("#{i}{r}"))
        })
        .collect();
    let accepted_ids: Vec<String> = accepted.iter().map(|e| e.id.clone()).collect();
    let good_ids: Vec<String> = accepted
        .iter()
        .filter(|e| !is_rejected(&e.text))
        .map(|e| e.id.clone())
        .collect();

    // 1. every accepted snippet once, nothing else, in seq order = commit order; statuses
    let rows = c
        .query(
            "SELECT id::text, new_context_snippet, status FROM memory.chat_context_queue \
             WHERE chat_id = $1 ORDER BY seq",
            &[&chat],
        )
        .unwrap();
    let by_seq = enqueued_ids(c, &chat);
    if by_seq != accepted_ids {
        bad(format!(
            "queue rows in seq order != accepted snippets in commit order: {}",
            seq_diff(&accepted_ids, &by_seq, &label)
        ));
    }
    let texts: HashMap<&str, &str> = accepted
        .iter()
        .map(|e| (e.id.as_str(), e.text.as_str()))
        .collect();
    let mut complete_by_seq = Vec::new();
    for r in &rows {
        let (id, text, status): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if let Some(t) = texts.get(id.as_str())
            && *t != text
        {
            bad(format!("row {id}: text {text:?}, enqueued {t:?}"));
        }
        let want = if is_rejected(&text) {
            "failed"
        } else {
            "complete"
        };
        if status != want {
            let err: Option<String> = c
                .query_one(
                    "SELECT error_message FROM memory.chat_context_queue WHERE id = $1::text::uuid",
                    &[&id],
                )
                .unwrap()
                .get(0);
            bad(format!(
                "row {} is {status}, expected {want} (error_message {err:?}; text {text:?})",
                label.get(&id).cloned().unwrap_or(id.clone())
            ));
        }
        if status == "complete" {
            complete_by_seq.push(id);
        }
    }

    // 2. versions 1..n (an erasure deletes versions: then increasing), each consuming snippets
    // in order, exactly once; a rebuilt version consumed every snippet applied so far again
    let versions: Vec<(i64, Vec<String>, bool)> = c
        .query(
            "SELECT version, queue_ids::text[], rebuilt FROM memory.chat_memory_history \
             WHERE chat_id = $1 ORDER BY version",
            &[&chat],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let numbers: Vec<i64> = versions.iter().map(|x| x.0).collect();
    let n = numbers.last().copied().unwrap_or(0);
    if !erased && numbers != (1..=n).collect::<Vec<_>>() {
        bad(format!("versions are {numbers:?}, not 1..={n}"));
    }
    if numbers.windows(2).any(|w| w[0] >= w[1]) {
        bad(format!("versions are {numbers:?}, not increasing"));
    }
    if let Some((ver, ..)) = versions
        .iter()
        .find(|(_, ids, rebuilt)| ids.is_empty() && !rebuilt)
    {
        bad(format!("version {ver} consumed no snippet"));
    }
    // what the memory was folded from: the last rebuilt version's snippets, then later ones
    let from = versions.iter().rposition(|v| v.2).unwrap_or(0);
    let applied: Vec<String> = versions[from.min(versions.len())..]
        .iter()
        .flat_map(|v| v.1.clone())
        .collect();
    if applied != good_ids {
        bad(format!(
            "applied ids (history, in version order) != accepted non-rejected snippets in commit order: {}",
            seq_diff(&good_ids, &applied, &label)
        ));
    }
    if complete_by_seq != good_ids {
        bad(format!(
            "complete rows in seq order != accepted non-rejected snippets in commit order: {}",
            seq_diff(&good_ids, &complete_by_seq, &label)
        ));
    }
    let meta_version: Option<i64> = c
        .query_opt(
            "SELECT version FROM memory.chat_metadata WHERE chat_id = $1",
            &[&chat],
        )
        .unwrap()
        .map(|r| r.get(0));
    let Some(meta_version) = meta_version else {
        if !accepted.is_empty() {
            bad(format!(
                "no chat_metadata row, yet {} snippets were accepted",
                accepted.len()
            ));
        }
        return;
    };
    if meta_version != n {
        bad(format!(
            "chat_metadata.version = {meta_version}, history has {n} versions"
        ));
    }

    // 3. the memory is the reference model folded over the accepted snippets in order
    let mut model = Model::default();
    for e in accepted {
        model.apply(&e.text);
    }
    let row = c
        .query_one(
            "SELECT user_confirmed::text, llm_inferred::text, general_summary, pending, version \
             FROM memory.get($1)",
            &[&chat],
        )
        .unwrap();
    let confirmed: Value = serde_json::from_str(&row.get::<_, String>(0)).unwrap();
    let inferred: Value = serde_json::from_str(&row.get::<_, String>(1)).unwrap();
    let summary: String = row.get(2);
    let (pending, version): (i32, i64) = (row.get(3), row.get(4));
    if pending != 0 {
        bad(format!("get() says pending = {pending}"));
    }
    if version != n {
        bad(format!("get() says version {version}, history has {n}"));
    }
    let want_confirmed = json_object(&model.confirmed);
    if confirmed != want_confirmed {
        bad(format!(
            "user_confirmed\n      expected {want_confirmed}\n      actual   {confirmed}"
        ));
    }
    let want_inferred = json_object(&model.inferred);
    if inferred != want_inferred {
        bad(format!(
            "llm_inferred\n      expected {want_inferred}\n      actual   {inferred}"
        ));
    }
    if summary != model.summary {
        bad(format!(
            "general_summary: {}",
            str_diff(&model.summary, &summary)
        ));
    }
}

/// Poll until nothing is pending, processing or leased and the worker is idle; false at timeout.
fn healed(pg: &Cluster, c: &mut Client, seed: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if c.is_closed() {
            *c = connect(pg, seed);
        }
        let done: bool = c
            .query_one(
                "SELECT coalesce(NOT EXISTS (SELECT 1 FROM memory.chat_context_queue \
                                     WHERE status IN ('pending_summarization', 'processing')) \
                    AND NOT EXISTS (SELECT 1 FROM memory.chat_metadata WHERE lease_token IS NOT NULL) \
                    AND (SELECT running AND state = 'idle' FROM memory.worker_status()), false)",
                &[],
            )
            .map(|r| r.get(0))
            .unwrap_or(false);
        if done {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Retry `f` over reconnections for up to 30 s (the server may still be crash-restarting).
fn with_reconnect<T>(
    pg: &Cluster,
    c: &mut Client,
    what: &str,
    seed: u64,
    mut f: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f(c) {
            Ok(x) => return x,
            Err(e) if connection_lost(c, &e) && Instant::now() < deadline => {
                *c = connect(pg, seed);
            }
            Err(e) => panic!("{what}: {e}\n{}", rerun(seed)),
        }
    }
}

#[test]
fn stress_chaos_keeps_order_exactly_once_and_isolates_rejected_snippets() {
    let seed = seed_from_env();
    let secs = secs_from_env();
    eprintln!("memory_ext stress: {}, {secs} s", rerun(seed));
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("memory_ext stress: {}", rerun(seed));
    }));

    let mut rng = Rng::derived(seed, 0);
    let fake = FakeLlm::start(Mode::Chaos {
        seed: Rng::derived(seed, 2000).next_u64(),
        p_429: P_429,
        p_500: P_500,
        max_delay_ms: MAX_DELAY_MS,
    });
    fake.set_recording(false);
    let first_summarizer = if rng.chance(0.5) { "mock" } else { "openai" };
    // Half the seeds drain with helpers beside the worker (memory_ext.workers_per_database),
    // with batches small enough that claims find full batches and start them.
    let mut knobs = Rng::derived(seed, 4000);
    let helpers = knobs.chance(0.5).then(|| knobs.range(2, 4));
    let max_batch = if helpers.is_some() { 6 } else { 50 };
    let mut conf = vec![
        format!("memory_ext.summarizer = '{first_summarizer}'"),
        format!("memory_ext.llm_endpoint = '{}'", fake.openai_endpoint()),
        "memory_ext.llm_model = 'fake-model'".into(),
        "memory_ext.llm_timeout_ms = 10000".into(),
        "memory_ext.llm_concurrency = 4".into(),
        "memory_ext.max_attempts = 1000".into(),
        "memory_ext.backoff_base_ms = 20".into(),
        "memory_ext.backoff_max_ms = 300".into(),
        "memory_ext.lease_timeout = 1".into(),
        "memory_ext.rate_limit_per_minute = 0".into(),
        "memory_ext.retention = '30d'".into(),
        // the invariants read every version's queue_ids
        "memory_ext.history_versions = 0".into(),
        format!("memory_ext.batch_chats = {}", rng.range(3, max_batch)),
        format!("memory_ext.batch_snippets = {}", rng.range(1, 10)),
    ];
    // Half the seeds hold chats back with a debounce (its own draws: the schedule stays the
    // seed's); debounce_max keeps every chat due within a fraction of a second.
    let mut knobs = Rng::derived(seed, 3000);
    if knobs.chance(0.5) {
        let ms = knobs.range(20, 200);
        eprintln!("memory_ext stress: debounce {ms} ms, debounce_max 400 ms");
        conf.push(format!("memory_ext.debounce = {ms}"));
        conf.push("memory_ext.debounce_max = 400".into());
    }
    if let Some(n) = helpers {
        eprintln!("memory_ext stress: workers_per_database {n}, batch_chats at most {max_batch}");
        conf.push(format!("memory_ext.workers_per_database = {n}"));
        conf.push("max_worker_processes = 16".into());
    }
    let refs: Vec<&str> = conf.iter().map(String::as_str).collect();
    let pg = Cluster::start("stress", &refs);
    // a third of the snippets arrive as rows of a watched table (memory.watch)
    connect(&pg, seed)
        .batch_execute(
            "CREATE TABLE public.stress_msgs (id bigint GENERATED ALWAYS AS IDENTITY, chat text, \
                                              body text); \
             SELECT memory.watch('public.stress_msgs', 'chat', 'body')",
        )
        .unwrap();

    let start = Instant::now();
    let sh = Shared {
        seed,
        start,
        deadline: start + Duration::from_secs(secs),
        chats: (0..CHATS).map(|_| Mutex::new(ChatLog::default())).collect(),
        problems: Mutex::new(Vec::new()),
        events: Mutex::new(vec![format!("start: {conf:?}")]),
        max_helpers: std::sync::atomic::AtomicI64::new(0),
        max_batch,
    };
    std::thread::scope(|s| {
        let mut handles: Vec<(String, _)> = (0..CLIENTS)
            .map(|t| {
                let (sh, pg) = (&sh, &pg);
                (format!("client {t}"), s.spawn(move || client(sh, pg, t)))
            })
            .collect();
        handles.push(("chaos".into(), s.spawn(|| chaos(&sh, &pg))));
        for (name, h) in handles {
            if let Err(e) = h.join() {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                sh.problem(format!("{name} panicked: {msg}"));
            }
        }
    });
    let run_time = start.elapsed();

    // Heal: a healthy endpoint, a lease longer than any request, moderate batches.
    fake.set_mode(Mode::Valid);
    fake.set_delay(Duration::ZERO);
    let heal_summarizer = if rng.chance(0.5) { "mock" } else { "openai" };
    sh.event(format!("heal: summarizer = {heal_summarizer}"));
    let mut c = connect(&pg, seed);
    for (name, value) in [
        ("lease_timeout", "30"),
        ("batch_chats", "50"),
        ("batch_snippets", "10"),
        ("summarizer", heal_summarizer),
    ] {
        with_reconnect(&pg, &mut c, "heal settings", seed, |c| {
            alter(c, name, value)
        });
    }
    let heal_start = Instant::now();
    let is_healed = healed(&pg, &mut c, seed, HEAL_TIMEOUT);
    let heal_time = heal_start.elapsed();

    let events = lock(&sh.events).clone();
    let events_tail = events[events.len().saturating_sub(60)..].join("\n");
    let report = |c: &mut Client, violations: &[String], headline: &str| -> String {
        let diag = pg.diagnostics(c);
        format!(
            "memory_ext stress FAILED: {headline}\n{}\n\n{}\n\n--- diagnostics ---\n{diag}\n\
             fake LLM responses by status: {:?}\n\n--- chaos schedule (last 60) ---\n{events_tail}\n\n\
             --- server log (last 150 lines) ---\n{}\n\n{}",
            rerun(seed),
            violations.join("\n"),
            fake.responses_by_status(),
            pg.log_tail(150),
            rerun(seed)
        )
    };
    if !is_healed {
        let queue: String = c
            .query_one(
                "SELECT coalesce(json_agg(x)::text, '[]') FROM (SELECT chat_id, status, count(*), \
                 max(retry_count) AS max_retries, max(error_message) AS an_error \
                 FROM memory.chat_context_queue WHERE status IN ('pending_summarization', 'processing') \
                 GROUP BY 1, 2 ORDER BY 1, 2) x",
                &[],
            )
            .map(|r| r.get(0))
            .unwrap_or_else(|e| format!("({e})"));
        let r = report(
            &mut c,
            &[format!("unfinished work: {queue}")],
            &format!(
                "not healed within {HEAL_TIMEOUT:?} (nothing pending/processing/leased and the worker idle)"
            ),
        );
        panic!("{r}");
    }

    // Resolve the enqueues whose COMMIT outcome was lost with the connection.
    let mut logs: Vec<ChatLog> = sh
        .chats
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let mut violations: Vec<String> = lock(&sh.problems)
        .iter()
        .map(|p| format!("during the run: {p}"))
        .collect();
    let (mut unknown_in, mut unknown_out) = (0, 0);
    let mut tx_fate: HashMap<u64, HashSet<bool>> = HashMap::new();
    for log in logs.iter_mut().filter(|l| !l.forgotten) {
        for e in log.entries.iter_mut().filter(|e| e.fate == Fate::Unknown) {
            let exists: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM memory.chat_context_queue WHERE id = $1::text::uuid)",
                    &[&e.id],
                )
                .unwrap()
                .get(0);
            tx_fate.entry(e.tx).or_default().insert(exists);
            if exists {
                e.fate = Fate::Accepted;
                unknown_in += 1;
            } else {
                unknown_out += 1;
            }
        }
        log.entries.retain(|e| e.fate == Fate::Accepted);
    }
    for (tx, fates) in &tx_fate {
        if fates.len() > 1 {
            violations.push(format!(
                "transaction {}/{} committed only partly",
                tx >> 32,
                tx & 0xffff_ffff
            ));
        }
    }

    // Check every chat.
    let (mut accepted, mut rejected, mut forgotten) = (0, 0, 0);
    for (ch, log) in logs.iter().enumerate() {
        if log.forgotten {
            forgotten += 1;
            let left: i64 = c
                .query_one(
                    "SELECT (SELECT count(*) FROM memory.chat_metadata WHERE chat_id = $1) \
                          + (SELECT count(*) FROM memory.chat_context_queue WHERE chat_id = $1) \
                          + (SELECT count(*) FROM memory.chat_memory_history WHERE chat_id = $1)",
                    &[&chat_name(ch)],
                )
                .unwrap()
                .get(0);
            if left != 0 {
                violations.push(format!(
                    "{}: forgotten, yet {left} rows of it remain",
                    chat_name(ch)
                ));
            }
            continue;
        }
        accepted += log.entries.len();
        rejected += log.entries.iter().filter(|e| is_rejected(&e.text)).count();
        check_chat(&mut c, ch, log, &mut violations);
    }

    // 4. nothing failed but rejected snippets, nothing from elsewhere, the worker runs
    let known: HashSet<String> = logs
        .iter()
        .flat_map(|l| l.entries.iter().map(|e| e.id.clone()))
        .collect();
    for r in c
        .query(
            "SELECT chat_id, id::text, new_context_snippet, coalesce(error_message, '') \
             FROM memory.chat_context_queue WHERE status = 'failed' ORDER BY seq",
            &[],
        )
        .unwrap()
    {
        let (chat, id, text, err): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if !is_rejected(&text) && !known.contains(&id) {
            violations.push(format!(
                "{chat}: failed row {id} ({err}) that no client accepted: {text:?}"
            ));
        }
    }
    let strays: Vec<String> = c
        .query(
            "SELECT DISTINCT chat_id FROM memory.chat_context_queue \
             WHERE chat_id NOT LIKE 'stress-%' OR NOT (id::text = ANY ($1)) ORDER BY 1",
            &[&known.iter().cloned().collect::<Vec<_>>()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !strays.is_empty() {
        violations.push(format!(
            "queue rows no client accepted, in chats {strays:?}"
        ));
    }
    let running: bool = c
        .query_one("SELECT running FROM memory.worker_status()", &[])
        .unwrap()
        .get(0);
    if !running {
        violations.push("worker_status().running is false at the end".into());
    }

    let count = |what: &str| events.iter().filter(|e| e.contains(what)).count();
    let retried: String = c
        .query_one(
            "SELECT format('%s retried, %s after an expired lease', \
                    count(*) FILTER (WHERE retry_count > 0), \
                    count(*) FILTER (WHERE error_message LIKE 'lease expired%')) \
             FROM memory.chat_context_queue",
            &[],
        )
        .unwrap()
        .get(0);
    let stats = format!(
        "{accepted} snippets accepted ({rejected} rejected by the summarizer, {unknown_in} of \
         {} with a lost COMMIT went through; {retried}) in {} surviving chats, {forgotten} chats \
         forgotten; run {run_time:.1?}, healed in {heal_time:.1?}; fake LLM responses by status \
         {:?}; chaos: {} events, {} switches to openai, {} worker terminations, {} kill -9, \
         {} rebuilds, {} snippets erased; at most {} helpers at once",
        unknown_in + unknown_out,
        logs.len() - forgotten,
        fake.responses_by_status(),
        events.len(),
        count("summarizer = openai"),
        count("pg_terminate_backend"),
        count("(crash-restart)"),
        count("rebuild("),
        count("forget_snippet("),
        sh.max_helpers.load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!("memory_ext stress: {stats}");
    if !violations.is_empty() {
        let headline = format!("{} violation(s); {stats}", violations.len());
        let shown: Vec<String> = violations.iter().take(40).cloned().collect();
        let r = report(&mut c, &shown, &headline);
        panic!("{r}");
    }
}

/// The reference model itself (no cluster needed).
#[test]
fn reference_model_rules() {
    let mut m = Model::default();
    m.apply("inferred: a = 1\nconfirmed: b = 2\nhello\n  Inferred :  c =  3  ");
    m.apply("confirmed: a = 9\ninferred: b = 7\nretract: c\nconfirmed: no equals\nretract:");
    m.apply("confirmed: z = 1\nMOCK_FATAL: nope\nignored");
    m.apply("confirmed:  = x\n\n   \nbye");
    assert_eq!(
        json_object(&m.confirmed).to_string(),
        r#"{"a":"9","b":"2"}"#
    );
    assert_eq!(json_object(&m.inferred).to_string(), "{}");
    assert_eq!(
        m.summary,
        "hello | confirmed: no equals | retract: | confirmed:  = x | bye"
    );
    // the tail: the last 2000 characters, from after a space in the first 40 bytes of the cut
    let long = format!("{} tail", "x".repeat(3000));
    assert_eq!(tail(&long, 2000).chars().count(), 2000);
    // the cut starts "ab ab …" (char 1100 of 3100): its first space is at byte 2
    let spaced = format!("{}{}", "y".repeat(100), " ab".repeat(1000));
    assert_eq!(tail(&spaced, 2000), " ab".repeat(1000)[1003..]);
    let no_space_near = format!("{} {}", "z".repeat(10), "w".repeat(2100));
    assert_eq!(tail(&no_space_near, 2000), "w".repeat(2000));
    let mut s = Model::default();
    for i in 0..300 {
        s.apply(&format!("note {i} from client 0"));
    }
    assert!(s.summary.chars().count() <= SUMMARY_MAX_CHARS);
    assert!(s.summary.ends_with("| note 299 from client 0"));
    // the generator's snippets are well formed and about 2 % are rejected
    let mut rng = Rng::new(7);
    let mut note = 0;
    let rejected = (0..10_000)
        .filter(|_| is_rejected(&snippet(&mut rng, 0, &mut note)))
        .count();
    assert!((100..=300).contains(&rejected), "{rejected}");
}
