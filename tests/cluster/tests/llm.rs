//! The HTTP summarizers against a fake LLM server (both wire formats), through the real worker:
//! valid, fenced, prose-wrapped and think-prefixed answers; repair; schema violations; ungrounded
//! confirmations; 429 with Retry-After; 500 then OK; 401; timeouts; connection refused;
//! context-length splitting; concurrency; responsiveness while requests hang. Each test checks
//! the final memory, the queue rows, and that the API key leaked nowhere.

use memory_ext_cluster_tests::fake_llm::{COMPLETION_TOKENS, FakeLlm, Mode, PROMPT_TOKENS};
use memory_ext_cluster_tests::{Cluster, enqueue, enqueue_together, text, wait};
use postgres::Client;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const KEY: &str = "sk-fake-secret-key-7d41c9";

/// A cluster whose worker talks to `fake` with `provider`, fast backoff, 3 attempts.
fn start(name: &str, fake: &FakeLlm, provider: &str, extra: &[&str]) -> (Cluster, Client) {
    let endpoint = if provider == "anthropic" {
        fake.anthropic_endpoint()
    } else {
        fake.openai_endpoint()
    };
    let mut conf = vec![
        format!("memory_ext.summarizer = '{provider}'"),
        format!("memory_ext.llm_endpoint = '{endpoint}'"),
        "memory_ext.llm_model = 'fake-model'".to_string(),
        format!("memory_ext.llm_api_key = '{KEY}'"),
        "memory_ext.llm_timeout_ms = 5000".to_string(),
        "memory_ext.backoff_base_ms = 50".to_string(),
        "memory_ext.backoff_max_ms = 200".to_string(),
        "memory_ext.max_attempts = 3".to_string(),
    ];
    conf.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = conf.iter().map(String::as_str).collect();
    let pg = Cluster::start(name, &refs);
    let c = pg.client();
    (pg, c)
}

/// status/retry_count of a queue row, and its error message.
fn row(c: &mut Client, id: &str) -> (String, i32, String) {
    let r = c
        .query_one(
            "SELECT status, retry_count, coalesce(error_message, '') FROM memory.status($1::text::uuid)",
            &[&id],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn memory(c: &mut Client, chat: &str) -> (String, String, String) {
    let r = c
        .query_one(
            "SELECT user_confirmed::text, llm_inferred::text, general_summary FROM memory.get($1)",
            &[&chat],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The key is in no stored row, no worker status, no server log line.
fn assert_no_key_leak(pg: &Cluster, c: &mut Client) {
    let stored: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM memory.chat_context_queue WHERE error_message LIKE '%' || $1 || '%') \
                  + (SELECT count(*) FROM memory.chat_memory_history h WHERE h::text LIKE '%' || $1 || '%') \
                  + (SELECT count(*) FROM memory.worker_status() w WHERE w::text LIKE '%' || $1 || '%') \
                  + (SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid())",
            &[&KEY],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the API key was stored somewhere");
    assert!(!pg.log().contains(KEY), "the API key is in the server log");
}

#[test]
fn openai_valid_answer_end_to_end() {
    let fake = FakeLlm::start(Mode::Valid);
    let (pg, mut c) = start("llm_openai", &fake, "openai", &[]);
    let id = enqueue(
        &mut c,
        "c1",
        "confirmed: zip = 94110\ninferred: budget = tight\nThe user wants to move.",
    );
    assert_eq!(wait(&mut c, &id), "complete");
    assert_eq!(
        memory(&mut c, "c1"),
        (
            r#"{"zip": "94110"}"#.into(),
            r#"{"budget": "tight"}"#.into(),
            "The user wants to move.".into()
        )
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some(&*format!("Bearer {KEY}")));
    assert_eq!(r.body["model"], "fake-model");
    assert_eq!(r.body["response_format"]["type"], "json_schema");
    assert_eq!(r.body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(r.body["messages"][0]["role"], "system");
    assert!(r.last_user_text().contains(&id), "snippet ids are sent");
    // what it cost, per batch and summed
    assert_eq!(
        text(
            &mut c,
            "SELECT summarizer || '/' || llm_requests || '/' || prompt_tokens || '/' || completion_tokens \
             FROM memory.chat_memory_history WHERE chat_id = 'c1'"
        ),
        format!("openai:fake-model/1/{PROMPT_TOKENS}/{COMPLETION_TOKENS}")
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT batches_applied || '/' || llm_requests || '/' || prompt_tokens FROM memory.llm_usage \
             WHERE summarizer = 'openai:fake-model'"
        ),
        format!("1/1/{PROMPT_TOKENS}")
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn anthropic_tool_use_end_to_end() {
    let fake = FakeLlm::start(Mode::Valid);
    let (pg, mut c) = start("llm_anthropic", &fake, "anthropic", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: plan = PPO\nComparing plans.");
    assert_eq!(wait(&mut c, &id), "complete");
    assert_eq!(
        memory(&mut c, "c1"),
        (
            r#"{"plan": "PPO"}"#.into(),
            "{}".into(),
            "Comparing plans.".into()
        )
    );
    let r = &fake.requests()[0];
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(KEY));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.body["tool_choice"]["name"], "update_memory");
    assert_eq!(r.body["tools"][0]["input_schema"]["type"], "object");
    assert!(r.body["max_tokens"].as_u64().unwrap() > 0);
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn wrapped_answers_are_read_without_a_repair() {
    let fake = FakeLlm::start(Mode::Valid);
    for provider in ["openai", "anthropic"] {
        let (pg, mut c) = start(&format!("llm_wrapped_{provider}"), &fake, provider, &[]);
        for (i, mode) in [Mode::Fenced, Mode::Prose, Mode::Think]
            .into_iter()
            .enumerate()
        {
            fake.set_mode(mode.clone());
            let before = fake.request_count();
            let chat = format!("c{i}");
            let id = enqueue(&mut c, &chat, "confirmed: zip = 94110\nMoving soon.");
            assert_eq!(wait(&mut c, &id), "complete", "{provider} {mode:?}");
            assert_eq!(
                memory(&mut c, &chat).0,
                r#"{"zip": "94110"}"#,
                "{provider} {mode:?}"
            );
            assert_eq!(
                fake.request_count() - before,
                1,
                "{provider} {mode:?}: no repair needed"
            );
        }
        assert_no_key_leak(&pg, &mut c);
    }
}

#[test]
fn invalid_answer_is_repaired_once() {
    let fake = FakeLlm::start(Mode::InvalidThenValid);
    let (pg, mut c) = start("llm_repair", &fake, "openai", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110\nMoving soon.");
    assert_eq!(wait(&mut c, &id), "complete");
    assert_eq!(
        row(&mut c, &id).1,
        0,
        "a repaired answer is not a failed attempt"
    );
    assert_eq!(memory(&mut c, "c1").0, r#"{"zip": "94110"}"#);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let repair = &reqs[1];
    assert_eq!(repair.body["messages"].as_array().unwrap().len(), 4);
    assert_eq!(repair.body["messages"][2]["role"], "assistant");
    assert!(
        repair.last_user_text().contains("no JSON object found"),
        "the repair request quotes the validation error: {}",
        repair.last_user_text()
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT llm_requests::text FROM memory.chat_memory_history WHERE chat_id = 'c1'"
        ),
        "2"
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn schema_violations_fail_the_attempt_and_never_touch_memory() {
    let fake = FakeLlm::start(Mode::Valid);
    let (pg, mut c) = start("llm_schema", &fake, "openai", &[]);
    let first = enqueue(&mut c, "c1", "confirmed: zip = 94110\nMoving soon.");
    assert_eq!(wait(&mut c, &first), "complete");
    let before = memory(&mut c, "c1");
    fake.set_mode(Mode::SchemaViolating);
    let requests_before = fake.request_count();
    let id = enqueue(&mut c, "c1", "confirmed: zip = 10001\nChanged plans.");
    assert_eq!(wait(&mut c, &id), "failed");
    let (status, retries, error) = row(&mut c, &id);
    assert_eq!((status.as_str(), retries), ("failed", 3));
    assert!(
        error.contains("also after a repair request") && error.contains("\"ops\""),
        "{error}"
    );
    assert_eq!(memory(&mut c, "c1"), before, "memory unchanged");
    assert_eq!(
        fake.request_count() - requests_before,
        6,
        "each attempt: one request and one repair"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT attempts_failed || '/' || llm_requests FROM memory.llm_usage"
        ),
        "3/7",
        "failed attempts' requests are counted too"
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn ungrounded_confirmations_are_rejected_and_counted() {
    let fake = FakeLlm::start(Mode::Ungrounded);
    let (pg, mut c) = start("llm_ground", &fake, "openai", &[]);
    let id = enqueue(
        &mut c,
        "c1",
        "confirmed: zip = 94110\nconfirmed: plan = PPO\ninferred: budget = tight\nHello.",
    );
    assert_eq!(wait(&mut c, &id), "complete");
    let (confirmed, inferred, _) = memory(&mut c, "c1");
    assert_eq!(confirmed, "{}", "no invented user-confirmed facts");
    assert_eq!(
        inferred, r#"{"budget": "tight"}"#,
        "the rest of the answer applies"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT rejected_ops || '/' || (SELECT rejected_ops FROM memory.llm_usage) \
             FROM memory.chat_memory_history WHERE chat_id = 'c1'"
        ),
        "2/2"
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn rate_limit_honours_retry_after() {
    let fake = FakeLlm::start(Mode::RateLimited {
        times: 1,
        retry_after_s: 2,
    });
    let (pg, mut c) = start("llm_429", &fake, "openai", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110");
    assert_eq!(wait(&mut c, &id), "complete");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 1);
    assert!(error.contains("429"), "{error}");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at - reqs[0].at;
    // A lower bound only: the retry may come later, never sooner than the server asked.
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before Retry-After (2 s) passed"
    );
    assert_eq!(memory(&mut c, "c1").0, r#"{"zip": "94110"}"#);
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn server_error_then_ok_is_retried() {
    let fake = FakeLlm::start(Mode::ServerError { times: 1 });
    let (pg, mut c) = start("llm_500", &fake, "anthropic", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110");
    assert_eq!(wait(&mut c, &id), "complete");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 1);
    assert!(
        error.contains("500") && error.contains("The server had an error"),
        "{error}"
    );
    assert_eq!(fake.request_count(), 2);
    assert_eq!(memory(&mut c, "c1").0, r#"{"zip": "94110"}"#);
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn unauthorized_fails_at_once_without_leaking_the_key() {
    let fake = FakeLlm::start(Mode::Unauthorized);
    let (pg, mut c) = start("llm_401", &fake, "openai", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110");
    assert_eq!(wait(&mut c, &id), "failed");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 1, "permanent: no retries");
    assert_eq!(
        error,
        "LLM endpoint answered 401: Incorrect API key provided: [redacted] (invalid_api_key)"
    );
    assert_eq!(fake.request_count(), 1);
    assert_eq!(memory(&mut c, "c1").0, "{}");
    let last_error = text(&mut c, "SELECT last_error FROM memory.worker_status()");
    assert!(last_error.contains("[redacted]"), "{last_error}");
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn a_slow_endpoint_times_out_and_is_retried() {
    let fake = FakeLlm::start(Mode::Valid);
    let (pg, mut c) = start(
        "llm_timeout",
        &fake,
        "openai",
        &["memory_ext.llm_timeout_ms = 300"],
    );
    let id = enqueue(&mut c, "c1", "fake_sleep_ms: 3000\nconfirmed: zip = 94110");
    assert_eq!(wait(&mut c, &id), "failed");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 3);
    assert_eq!(error, "LLM request timed out after 300 ms");
    assert_eq!(memory(&mut c, "c1").0, "{}");
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn connection_refused_is_retried_then_failed() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pg = Cluster::start(
        "llm_refused",
        &[
            "memory_ext.summarizer = 'openai'",
            &format!("memory_ext.llm_endpoint = 'http://127.0.0.1:{port}/v1'"),
            "memory_ext.llm_model = 'm'",
            &format!("memory_ext.llm_api_key = '{KEY}'"),
            "memory_ext.backoff_base_ms = 50",
            "memory_ext.max_attempts = 2",
        ],
    );
    let mut c = pg.client();
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110");
    assert_eq!(wait(&mut c, &id), "failed");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 2);
    assert!(
        error.starts_with("could not connect to the LLM endpoint"),
        "{error}"
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn a_batch_too_long_for_the_context_is_split() {
    let fake = FakeLlm::start(Mode::ContextWindow { max_snippets: 1 });
    let (pg, mut c) = start("llm_split", &fake, "openai", &[]);
    // committed together, so claimed as one batch of three
    let batch: Vec<(String, String)> = (0..3)
        .map(|i| ("c1".into(), format!("confirmed: k{i} = v{i}\nstep {i}")))
        .collect();
    enqueue_together(&mut c, &batch);
    pg.eventually(
        &mut c,
        "SELECT count(*) = 3 FROM memory.chat_context_queue WHERE status = 'complete'",
        "all three applied",
        T,
    );
    let (confirmed, _, summary) = memory(&mut c, "c1");
    assert_eq!(confirmed, r#"{"k0": "v0", "k1": "v1", "k2": "v2"}"#);
    assert_eq!(
        summary, "step 0 | step 1 | step 2",
        "halves applied in order"
    );
    assert_eq!(
        text(
            &mut c,
            "SELECT count(*) || '/' || sum(llm_requests) || '/' || sum(cardinality(queue_ids)) \
             FROM memory.chat_memory_history WHERE chat_id = 'c1'"
        ),
        // [3] too long -> [1] ok, [2] too long -> [1] ok, [1] ok: one version, five requests
        "1/5/3"
    );
    // a single snippet that does not fit fails for good
    fake.set_mode(Mode::ContextWindow { max_snippets: 0 });
    let id = enqueue(&mut c, "c2", "far too long");
    assert_eq!(wait(&mut c, &id), "failed");
    let (_, retries, error) = row(&mut c, &id);
    assert_eq!(retries, 1);
    assert!(error.contains("does not fit"), "{error}");
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn requests_run_concurrently_up_to_the_limit_one_per_chat() {
    let fake = FakeLlm::start(Mode::Valid);
    let (pg, mut c) = start(
        "llm_concurrency",
        &fake,
        "openai",
        &["memory_ext.llm_concurrency = 4"],
    );
    let batch: Vec<(String, String)> = (0..8)
        .map(|i| {
            (
                format!("c{i}"),
                "fake_sleep_ms: 500\nconfirmed: n = 1".into(),
            )
        })
        .collect();
    enqueue_together(&mut c, &batch);
    pg.eventually(
        &mut c,
        "SELECT count(*) = 8 FROM memory.chat_context_queue WHERE status = 'complete'",
        "all applied",
        T,
    );
    assert_eq!(fake.max_in_flight(), 4, "never more than llm_concurrency");
    assert_eq!(fake.request_count(), 8);
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn a_hanging_request_never_blocks_signals_or_other_chats() {
    let fake = FakeLlm::start(Mode::Valid);
    // The key comes from a file: a reload must not print it either.
    let key_file = std::env::temp_dir().join(format!("memory_ext_key_{}", std::process::id()));
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let (pg, mut c) = start(
        "llm_hang",
        &fake,
        "openai",
        &[
            "memory_ext.llm_timeout_ms = 120000",
            &format!("memory_ext.llm_api_key = 'file:{}'", key_file.display()),
        ],
    );
    let slow = enqueue(&mut c, "slow", "fake_sleep_ms: 60000\nconfirmed: a = 1");
    pg.eventually(
        &mut c,
        "SELECT state LIKE 'summarizing: 1 LLM request(s) in flight%' FROM memory.worker_status()",
        "the slow request is in flight",
        T,
    );
    // Other chats are served meanwhile.
    let fast = enqueue(&mut c, "fast", "confirmed: b = 2");
    assert_eq!(wait(&mut c, &fast), "complete");
    assert_eq!(
        fake.requests()[1].header("authorization"),
        Some(&*format!("Bearer {KEY}")),
        "key read from the file"
    );
    // SIGHUP is handled while the request hangs: the next request uses the new model.
    c.batch_execute("ALTER SYSTEM SET memory_ext.llm_model = 'fake-model-2'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let mut n = 0;
    loop {
        n += 1;
        let id = enqueue(&mut c, &format!("after{n}"), "hello");
        assert_eq!(wait(&mut c, &id), "complete");
        if fake.requests().last().unwrap().body["model"] == "fake-model-2" {
            break;
        }
        assert!(n < 100, "the reload never reached the worker");
    }
    // SIGTERM is answered while the slow request still hangs: the worker exits, gives the lease
    // back without spending an attempt, and its successor (started by the launcher) finishes
    // the chat once the endpoint answers quickly.
    // The successor will send the slow snippet again: make it quick first (the request in
    // flight already has the old text).
    c.batch_execute(
        "UPDATE memory.chat_context_queue SET new_context_snippet = 'confirmed: a = 1' \
         WHERE chat_id = 'slow'",
    )
    .unwrap();
    let pid = pg.worker_pid(&mut c).expect("worker running");
    c.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    pg.eventually(
        &mut c,
        &format!("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {pid})"),
        "the worker exits while its request hangs",
        Duration::from_secs(10),
    );
    let (status, retries, _) = row(&mut c, &slow);
    assert!(
        status == "pending_summarization" || status == "processing",
        "{status}"
    );
    assert_eq!(retries, 0, "a released lease is not a failed attempt");
    assert_eq!(wait(&mut c, &slow), "complete");
    assert_eq!(memory(&mut c, "slow").0, r#"{"a": "1"}"#);
    assert_no_key_leak(&pg, &mut c);
    let _ = std::fs::remove_file(key_file);
}

#[test]
fn process_pending_calls_the_llm_without_a_worker() {
    let fake = FakeLlm::start(Mode::Valid);
    let endpoint = format!("memory_ext.llm_endpoint = '{}'", fake.anthropic_endpoint());
    let key = format!("memory_ext.llm_api_key = '{KEY}'");
    let pg = Cluster::start_with(
        "llm_no_preload",
        &[
            "memory_ext.summarizer = 'anthropic'",
            &endpoint,
            "memory_ext.llm_model = 'fake-model'",
            &key,
        ],
        false,
    );
    let mut c = pg.client();
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110\nMoving soon.");
    let applied: i32 = c
        .query_one("SELECT memory.process_pending()", &[])
        .unwrap()
        .get(0);
    assert_eq!(applied, 1);
    assert_eq!(row(&mut c, &id).0, "complete");
    assert_eq!(memory(&mut c, "c1").0, r#"{"zip": "94110"}"#);
    assert_eq!(
        text(
            &mut c,
            "SELECT summarizer || '/' || llm_requests FROM memory.chat_memory_history"
        ),
        "anthropic:fake-model/1"
    );
    assert_no_key_leak(&pg, &mut c);
}

#[test]
fn a_rate_limit_pauses_requests_for_every_chat() {
    let fake = FakeLlm::start(Mode::RateLimited {
        times: 1,
        retry_after_s: 2,
    });
    let (pg, mut c) = start("llm_429_all", &fake, "openai", &[]);
    let a = enqueue(&mut c, "a", "confirmed: k = 1");
    // Once the 429 is recorded, a chat enqueued afterwards must wait for the Retry-After too.
    pg.eventually(
        &mut c,
        &format!("SELECT retry_count = 1 FROM memory.status('{a}')"),
        "the 429 recorded",
        T,
    );
    let b = enqueue(&mut c, "b", "confirmed: k = 2");
    assert_eq!(wait(&mut c, &b), "complete");
    assert_eq!(wait(&mut c, &a), "complete");
    let reqs = fake.requests();
    let first = reqs[0].at;
    let for_b = reqs
        .iter()
        .find(|r| r.last_user_text().contains(&b))
        .expect("a request for chat b");
    // A lower bound only: later is fine, sooner would hammer a rate-limited endpoint.
    assert!(
        for_b.at - first >= Duration::from_millis(1900),
        "chat b was sent {:?} after the 429, before its Retry-After (2 s)",
        for_b.at - first
    );
    assert_eq!(row(&mut c, &b).1, 0, "chat b spent no attempt");
    assert_no_key_leak(&pg, &mut c);
}

/// Point 1 of the lease issue: a request that outlives its lease while newer snippets arrive.
/// The first snippet's rows must go back to pending before the chat is claimed again, so the
/// three apply in enqueue order, exactly once, and nothing is stranded in 'processing' — also
/// after the endpoint heals and the lease is raised.
#[test]
fn a_request_that_overruns_its_lease_keeps_order_and_strands_nothing() {
    let fake = FakeLlm::start(Mode::Valid);
    fake.set_delay(Duration::from_secs(4));
    let (pg, mut c) = start(
        "llm_overrun",
        &fake,
        "openai",
        &[
            "memory_ext.lease_timeout = 2",
            "memory_ext.max_attempts = 100",
        ],
    );
    let a = enqueue(&mut c, "c1", "confirmed: a = 1");
    pg.eventually(
        &mut c,
        "SELECT coalesce(lease_until < now(), false) FROM memory.chat_metadata WHERE chat_id = 'c1'",
        "the first request outlives its lease",
        T,
    );
    let b = enqueue(&mut c, "c1", "confirmed: b = 2");
    let cc = enqueue(&mut c, "c1", "confirmed: c = 3");
    // heal: a fast endpoint and a long lease
    fake.set_delay(Duration::ZERO);
    c.batch_execute("ALTER SYSTEM SET memory_ext.lease_timeout = 60")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    for id in [&a, &b, &cc] {
        assert_eq!(wait(&mut c, id), "complete", "{}", pg.diagnostics(&mut c));
    }
    assert_eq!(
        memory_ext_cluster_tests::applied_ids(&mut c, "c1"),
        vec![a.clone(), b.clone(), cc.clone()],
        "applied exactly once, in enqueue order"
    );
    assert_eq!(memory(&mut c, "c1").0, r#"{"a": "1", "b": "2", "c": "3"}"#);
    assert_eq!(
        text(
            &mut c,
            "SELECT format('%s/%s', pending, \
             (SELECT count(*) FROM memory.chat_context_queue WHERE status = 'processing')) \
             FROM memory.get('c1')"
        ),
        "0/0"
    );
}

/// Act as JWT subject `sub` on this connection (the superuser test role is an admin, so it may
/// create chats for any owner).
fn be(c: &mut Client, sub: &str) {
    c.execute(
        "SELECT set_config('request.jwt.claims', json_build_object('sub', $1::text)::text, false)",
        &[&sub],
    )
    .unwrap();
}

fn pending(c: &mut Client, chats_like: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM memory.chat_context_queue \
         WHERE chat_id LIKE $1 AND status <> 'complete'",
        &[&chats_like],
    )
    .unwrap()
    .get(0)
}

/// One chat's backlog is one claim candidate: while a chat with 60 pending snippets is being
/// summarized one snippet per request, another owner's snippet is claimed with the next free slot
/// instead of waiting behind the backlog.
#[test]
fn a_backlog_never_holds_back_another_owners_chat() {
    let fake = FakeLlm::start(Mode::Valid);
    fake.set_delay(Duration::from_millis(300));
    let (pg, mut c) = start(
        "llm_backlog",
        &fake,
        "openai",
        &[
            "memory_ext.llm_concurrency = 2",
            "memory_ext.batch_snippets = 1",
        ],
    );
    be(&mut c, "owner-x");
    let backlog: Vec<(String, String)> = (0..60)
        .map(|i| ("x-chat".to_string(), format!("step {i}")))
        .collect();
    enqueue_together(&mut c, &backlog);
    pg.eventually(
        &mut c,
        "SELECT count(*) > 0 FROM memory.chat_context_queue WHERE status = 'processing'",
        "the backlog is being summarized",
        T,
    );
    be(&mut c, "owner-y");
    let other = enqueue(&mut c, "y-chat", "confirmed: y = 1");
    assert_eq!(wait(&mut c, &other), "complete");
    let left = pending(&mut c, "x-chat");
    assert!(
        left >= 50,
        "the other owner's snippet waited for the backlog: only {left} of 60 left"
    );
}

/// Owners take turns: with one request at a time, an owner with one chat is served right after
/// the request in flight, not after another owner's twenty chats that came due earlier.
#[test]
fn owners_take_turns() {
    let fake = FakeLlm::start(Mode::Valid);
    fake.set_delay(Duration::from_millis(300));
    let (pg, mut c) = start(
        "llm_turns",
        &fake,
        "openai",
        &["memory_ext.llm_concurrency = 1"],
    );
    be(&mut c, "owner-x");
    let many: Vec<(String, String)> = (0..20)
        .map(|i| (format!("x-{i}"), format!("note {i}")))
        .collect();
    enqueue_together(&mut c, &many);
    pg.eventually(
        &mut c,
        "SELECT count(*) > 0 FROM memory.chat_context_queue WHERE status = 'processing'",
        "owner x is being served",
        T,
    );
    be(&mut c, "owner-y");
    let mine = enqueue(&mut c, "y-0", "confirmed: y = 1");
    assert_eq!(wait(&mut c, &mine), "complete");
    let left = pending(&mut c, "x-%");
    assert!(
        left >= 17,
        "owner y waited for owner x's chats: only {left} of 20 left"
    );
}

/// A request in flight when the summarizer is switched to the mock (SIGHUP) still has its answer
/// applied, spending no attempt, and the worker goes idle: answers are collected on every pass,
/// whatever the summarizer is now (found by the stress test: they were left to expire).
#[test]
fn an_answer_arriving_after_a_switch_to_the_mock_is_applied() {
    let fake = FakeLlm::start(Mode::Valid);
    fake.set_delay(Duration::from_millis(1500));
    let (pg, mut c) = start("llm_switch", &fake, "openai", &[]);
    let id = enqueue(&mut c, "c1", "confirmed: zip = 94110");
    pg.eventually(
        &mut c,
        &format!("SELECT status = 'processing' FROM memory.status('{id}')"),
        "the request is in flight",
        T,
    );
    c.batch_execute("ALTER SYSTEM SET memory_ext.summarizer = 'mock'")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert_eq!(wait(&mut c, &id), "complete");
    assert_eq!(row(&mut c, &id).1, 0, "no attempt spent");
    assert_eq!(
        text(
            &mut c,
            "SELECT summarizer FROM memory.chat_memory_history WHERE chat_id = 'c1'"
        ),
        "openai:fake-model"
    );
    pg.eventually(
        &mut c,
        "SELECT state = 'idle' FROM memory.worker_status()",
        "the worker goes idle",
        T,
    );
}

/// memory_ext.instructions reach both providers after the rules, the prompt asks to keep the
/// user's language, and non-ASCII text (Japanese, Portuguese accents, an emoji) comes back
/// unchanged through the LLM path into get() and context().
#[test]
fn instructions_and_the_users_language_reach_the_model_unchanged() {
    const INSTRUCTIONS: &str = "Domain: health insurance. Keep plan names as written.";
    let fake = FakeLlm::start(Mode::Valid);
    for provider in ["openai", "anthropic"] {
        let (_pg, mut c) = start(
            &format!("llm_instructions_{provider}"),
            &fake,
            provider,
            &[&format!("memory_ext.instructions = '{INSTRUCTIONS}'")],
        );
        let before = fake.request_count();
        let id = enqueue(
            &mut c,
            "c1",
            "confirmed: 都市 = 東京\nA usuária está à procura de um plano 😊",
        );
        assert_eq!(wait(&mut c, &id), "complete", "{provider}");
        let r = &fake.requests()[before];
        let system = if provider == "openai" {
            r.body["messages"][0]["content"].as_str()
        } else {
            r.body["system"][0]["text"].as_str()
        }
        .unwrap_or_default()
        .to_string();
        assert!(system.ends_with(INSTRUCTIONS), "{provider}: {system}");
        assert!(
            system.contains("in the language the user writes in"),
            "{provider}"
        );
        assert_eq!(
            memory(&mut c, "c1"),
            (
                r#"{"都市": "東京"}"#.into(),
                "{}".into(),
                "A usuária está à procura de um plano 😊".into()
            ),
            "{provider}"
        );
        let context: String = c
            .query_one("SELECT context FROM memory.context('c1')", &[])
            .unwrap()
            .get(0);
        assert!(
            context.contains("- 都市: 東京")
                && context.ends_with("A usuária está à procura de um plano 😊"),
            "{provider}: {context}"
        );
    }
}

#[test]
fn instructions_are_bounded() {
    let fake = FakeLlm::start(Mode::Valid);
    let (_pg, mut c) = start("llm_instructions_bound", &fake, "openai", &[]);
    let err = c
        .batch_execute(&format!(
            "SET memory_ext.instructions = '{}'",
            "x".repeat(4001)
        ))
        .unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("22023"));
    c.batch_execute(&format!(
        "SET memory_ext.instructions = '{}'",
        "x".repeat(4000)
    ))
    .unwrap();
}

/// Declared fact keys reach both providers (listed with their descriptions in the system prompt,
/// and the only values the answer's schema allows for `key`), and the merge refuses, and counts,
/// what the model proposes beyond them: an undeclared key, a confirmation of an infer-only key.
/// Keys declared while the worker runs apply from its next batch.
#[test]
fn declared_fact_keys_reach_the_model_and_bound_the_merge() {
    let fake = FakeLlm::start(Mode::Valid);
    for provider in ["openai", "anthropic"] {
        let (_pg, mut c) = start(&format!("llm_fact_keys_{provider}"), &fake, provider, &[]);
        c.batch_execute(
            "INSERT INTO memory.fact_keys (key, description, may_confirm, may_infer) VALUES
               ('mood', 'how the user feels today', false, true),
               ('city', 'where the user lives', true, true)",
        )
        .unwrap();
        let before = fake.request_count();
        let id = enqueue(
            &mut c,
            "c1",
            "confirmed: city = Lyon\nconfirmed: mood = happy\ninferred: mood = calm\n\
             confirmed: zip = 69001",
        );
        assert_eq!(wait(&mut c, &id), "complete", "{provider}");
        assert_eq!(
            memory(&mut c, "c1"),
            (
                r#"{"city": "Lyon"}"#.into(),
                r#"{"mood": "calm"}"#.into(),
                String::new()
            ),
            "{provider}"
        );
        let rejected: i32 = c
            .query_one(
                "SELECT rejected_ops FROM memory.chat_memory_history WHERE chat_id = 'c1'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(rejected, 2, "{provider}: zip and a confirmed mood");
        let r = &fake.requests()[before];
        let (system, schema) = if provider == "openai" {
            (
                &r.body["messages"][0]["content"],
                &r.body["response_format"]["json_schema"]["schema"],
            )
        } else {
            (
                &r.body["system"][0]["text"],
                &r.body["tools"][0]["input_schema"],
            )
        };
        let system = system.as_str().unwrap_or_default();
        assert!(
            system.contains(
                "- city (confirm or infer): where the user lives\n\
                 - mood (infer only): how the user feels today"
            ),
            "{provider}: {system}"
        );
        assert_eq!(
            schema["properties"]["ops"]["items"]["properties"]["key"]["enum"],
            serde_json::json!(["city", "mood"]),
            "{provider}"
        );
    }
}

/// The stable part of every request comes first and is marked for Anthropic's prompt cache; what
/// the provider reports serving from (and writing to) its cache is recorded per version and in
/// memory.llm_usage.
#[test]
fn prompt_cache_tokens_are_recorded() {
    use memory_ext_cluster_tests::fake_llm::CACHED_PROMPT_TOKENS;
    for provider in ["openai", "anthropic"] {
        let fake = FakeLlm::start(Mode::Valid);
        let (_pg, mut c) = start(
            &format!("llm_prompt_cache_{provider}"),
            &fake,
            provider,
            &[],
        );
        for text in ["confirmed: city = Lyon", "confirmed: pet = cat"] {
            let id = enqueue(&mut c, "c1", text);
            assert_eq!(wait(&mut c, &id), "complete", "{provider}");
        }
        let written = if provider == "anthropic" {
            assert_eq!(
                fake.requests()[0].body["system"][0]["cache_control"],
                serde_json::json!({"type": "ephemeral"})
            );
            CACHED_PROMPT_TOKENS as i64
        } else {
            0
        };
        let per_version: Vec<(i64, i64, i64)> = c
            .query(
                "SELECT prompt_tokens, cached_prompt_tokens, cache_write_tokens
                   FROM memory.chat_memory_history ORDER BY version",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let total = PROMPT_TOKENS as i64;
        let cached = CACHED_PROMPT_TOKENS as i64;
        assert_eq!(
            per_version,
            [(total, 0, written), (total, cached, 0)],
            "{provider}: the first request writes the cache, the second reads it"
        );
        assert_eq!(
            text(
                &mut c,
                "SELECT prompt_tokens || '/' || cached_prompt_tokens || '/' || cache_write_tokens
                   FROM memory.llm_usage"
            ),
            format!("{}/{cached}/{written}", 2 * total),
            "{provider}"
        );
    }
}

/// Per-owner daily budgets through the worker: what an owner's requests cost is counted per UTC
/// day (memory.owner_usage); once it reaches memory_ext.owner_daily_tokens their next snippets
/// are deferred (pending, with the reason), other owners go on, and an admin raising the owner's
/// budget resumes them at once.
#[test]
fn owners_over_their_daily_token_budget_are_deferred_not_failed() {
    let fake = FakeLlm::start(Mode::Valid);
    let (_pg, mut c) = start(
        "budget",
        &fake,
        "openai",
        &["memory_ext.owner_daily_tokens = 1"],
    );
    let as_owner = |c: &mut Client, sub: &str| {
        c.execute(
            "SELECT set_config('request.jwt.claims', json_build_object('sub', $1::text)::text, false)",
            &[&sub],
        )
        .unwrap();
    };
    as_owner(&mut c, "alice");
    let first = enqueue(&mut c, "a1", "confirmed: city = Lyon");
    assert_eq!(wait(&mut c, &first), "complete");
    let second = enqueue(&mut c, "a1", "confirmed: pet = cat");
    as_owner(&mut c, "bob");
    let bobs = enqueue(&mut c, "b1", "confirmed: city = Oslo");
    assert_eq!(wait(&mut c, &bobs), "complete", "another owner goes on");
    c.execute("SELECT set_config('request.jwt.claims', '', false)", &[])
        .unwrap();
    let (status, _, error) = row(&mut c, &second);
    assert_eq!(status, "pending_summarization");
    assert!(error.contains("reached their daily budget (1)"), "{error}");
    let spent = (PROMPT_TOKENS + COMPLETION_TOKENS).to_string();
    assert_eq!(
        text(
            &mut c,
            "SELECT string_agg(owner || ' ' || llm_requests || ' ' || tokens || ' ' || throttled \
                               || ' ' || deferred_chats, ', ' ORDER BY owner) FROM memory.owner_usage"
        ),
        format!("alice 1 {spent} true 1, bob 1 {spent} true 0")
    );
    c.execute("SELECT memory.set_owner_budget('alice', 0)", &[])
        .unwrap();
    assert_eq!(wait(&mut c, &second), "complete", "resumed at once");
    assert_eq!(memory(&mut c, "a1").0, r#"{"pet": "cat", "city": "Lyon"}"#);
}
