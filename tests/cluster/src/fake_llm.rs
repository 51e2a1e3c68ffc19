//! A fake LLM server on loopback speaking both wire formats: OpenAI-compatible
//! `POST .../chat/completions` and Anthropic `POST .../v1/messages`.
//!
//! Its "model" reads the snippets out of the request and answers by the same marker language as
//! the mock summarizer: `confirmed: k = v` (confirmed, quoting the line as evidence),
//! `inferred: k = v`, `retract: k` (heads trimmed and matched ignoring case; a directive that
//! does not parse is plain text); other lines extend the summary one by one, joined with " | ",
//! keeping the last [`SUMMARY_MAX_CHARS`] characters (from a word boundary when one is near), as
//! the mock does. `fake_sleep_ms: N` in a snippet delays that answer. A request holding a snippet
//! with a `mock_fatal:` line is input the model rejects, in every mode: 400
//! `context_length_exceeded`, so the extension isolates that snippet like the mock's
//! `mock_fatal`. The [`Mode`] decides how (and whether) the answer is delivered. Every request is
//! recorded for the tests to inspect (unless [`FakeLlm::set_recording`] turned that off).

use crate::Rng;
use crate::mock_rules::{directive, fold_summary, key_value};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PROMPT_TOKENS: u64 = 100;
pub const COMPLETION_TOKENS: u64 = 20;
pub use crate::mock_rules::SUMMARY_MAX_CHARS;

#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Structured output: the JSON itself (OpenAI) or a tool call (Anthropic).
    Valid,
    /// JSON in a ```json fence.
    Fenced,
    /// Prose before and after the JSON.
    Prose,
    /// A `<think>` block (with braces) before the JSON.
    Think,
    /// Not JSON on the first request of a conversation; valid on the repair request.
    InvalidThenValid,
    /// JSON that breaks the schema, every time.
    SchemaViolating,
    /// Confirms every `confirmed:` fact with evidence that is not in the snippets.
    Ungrounded,
    /// The first `times` requests get 429 with `Retry-After: retry_after_s`.
    RateLimited { times: usize, retry_after_s: u32 },
    /// The first `times` requests get 500.
    ServerError { times: usize },
    /// 401, with the key echoed back in the error (as some providers do).
    Unauthorized,
    /// 400 context_length_exceeded when a request carries more than `max_snippets` snippets.
    ContextWindow { max_snippets: usize },
    /// A flaky endpoint, reproducible from `seed` (the sequence restarts whenever this mode is
    /// set; one draw per request, in arrival order): each request is delayed by up to
    /// `max_delay_ms` (skewed towards short delays: `max_delay_ms` × u³), then answered 429 with
    /// probability `p_429` (`retry-after-ms` 200–800, or `Retry-After: 1`), 500 with probability
    /// `p_500`, else as [`Mode::Valid`].
    Chaos {
        seed: u64,
        p_429: f64,
        p_500: f64,
        max_delay_ms: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The text of the last message (a repair request's follow-up, or the first request).
    pub fn last_user_text(&self) -> String {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

struct State {
    mode: Mutex<Mode>,
    /// Answer delay for every request (the benchmark's fixed model latency).
    delay: Mutex<Duration>,
    requests: Mutex<Vec<Recorded>>,
    /// Whether requests are kept in `requests` (a long stress run turns it off).
    recording: AtomicBool,
    /// Responses sent, by HTTP status.
    statuses: Mutex<BTreeMap<u16, usize>>,
    /// The draws of [`Mode::Chaos`].
    rng: Mutex<Rng>,
    served: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// System prompts seen: the provider's prompt cache (see [`cache_usage`]).
    cached_prefixes: Mutex<std::collections::HashSet<String>>,
}

pub struct FakeLlm {
    pub port: u16,
    server: Arc<tiny_http::Server>,
    state: Arc<State>,
}

impl FakeLlm {
    pub fn start(mode: Mode) -> FakeLlm {
        Self::start_on(0, mode)
    }

    pub fn start_on(port: u16, mode: Mode) -> FakeLlm {
        let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("bind"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let rng = Mutex::new(Rng::new(chaos_seed(&mode)));
        let state = Arc::new(State {
            mode: Mutex::new(mode),
            delay: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            statuses: Mutex::new(BTreeMap::new()),
            rng,
            served: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            cached_prefixes: Mutex::default(),
        });
        let (srv, st) = (Arc::clone(&server), Arc::clone(&state));
        std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                let st = Arc::clone(&st);
                // One thread per request, so slow answers overlap as with a real endpoint.
                std::thread::spawn(move || handle(request, &st));
            }
        });
        FakeLlm {
            port,
            server,
            state,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        let mut m = self.state.mode.lock().unwrap();
        if let Mode::Chaos { seed, .. } = mode {
            *self.state.rng.lock().unwrap() = Rng::new(seed);
        }
        *m = mode;
    }

    /// Keep each request for [`FakeLlm::requests`] (the default) or not.
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::SeqCst);
    }

    /// How many responses were sent with each HTTP status.
    pub fn responses_by_status(&self) -> BTreeMap<u16, usize> {
        self.state.statuses.lock().unwrap().clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// The most requests that were being answered at the same moment.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// `openai` endpoint setting for this server.
    pub fn openai_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// `anthropic` endpoint setting for this server.
    pub fn anthropic_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// Run a fake server until killed (for the benchmark): `fake_llm PORT DELAY_MS`.
/// Serve until killed; with `log`, append every request's body to that file, one JSON per line
/// (the benchmark counts the prompt tokens actually sent).
pub fn serve_forever(port: u16, delay: Duration, log: Option<std::path::PathBuf>) -> ! {
    use std::io::Write;
    let f = FakeLlm::start_on(port, Mode::Valid);
    f.set_delay(delay);
    f.set_recording(log.is_some());
    println!("fake LLM listening on 127.0.0.1:{}", f.port);
    let mut logged = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let Some(path) = &log else { continue };
        let requests = f.requests();
        if requests.len() > logged {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("request log");
            for r in &requests[logged..] {
                writeln!(out, "{}", r.body).expect("request log");
            }
            logged = requests.len();
        }
    }
}

fn chaos_seed(mode: &Mode) -> u64 {
    match mode {
        Mode::Chaos { seed, .. } => *seed,
        _ => 0,
    }
}

/// What [`Mode::Chaos`] drew for one request.
struct ChaosDraw {
    delay: Duration,
    /// None: answer.
    fault: Option<Fault>,
}

enum Fault {
    /// 429 with this retry header (name, value).
    RateLimited(&'static str, String),
    /// 500.
    ServerError,
}

fn chaos_draw(rng: &Mutex<Rng>, p_429: f64, p_500: f64, max_delay_ms: u64) -> ChaosDraw {
    let mut r = rng.lock().unwrap();
    let (u_delay, u_kind, u_header) = (r.unit(), r.unit(), r.next_u64());
    let delay = Duration::from_millis((max_delay_ms as f64 * u_delay.powi(3)) as u64);
    let fault = if u_kind < p_429 {
        Some(if u_header % 2 == 0 {
            Fault::RateLimited("retry-after-ms", (200 + (u_header >> 1) % 601).to_string())
        } else {
            Fault::RateLimited("retry-after", "1".to_string())
        })
    } else if u_kind < p_429 + p_500 {
        Some(Fault::ServerError)
    } else {
        None
    };
    ChaosDraw { delay, fault }
}

fn handle(mut request: tiny_http::Request, st: &State) {
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let (body, path, key) = record(&mut request, st);
    let response = respond(st, &body, &path, &key);
    *st.statuses
        .lock()
        .unwrap()
        .entry(response.status_code().0)
        .or_default() += 1;
    let _ = request.respond(response);
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// Reads the request, records it (when recording): its body, path and API key.
fn record(request: &mut tiny_http::Request, st: &State) -> (Value, String, String) {
    let mut raw = String::new();
    let _ = request.as_reader().read_to_string(&mut raw);
    let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
    let path = request.url().to_string();
    let rec = Recorded {
        path: path.clone(),
        headers: request
            .headers()
            .iter()
            .map(|h| (h.field.as_str().to_string(), h.value.as_str().to_string()))
            .collect(),
        body: body.clone(),
        at: Instant::now(),
    };
    let key = rec
        .header("x-api-key")
        .map(str::to_string)
        .or_else(|| {
            rec.header("authorization")
                .map(|a| a.trim_start_matches("Bearer ").to_string())
        })
        .unwrap_or_default();
    if st.recording.load(Ordering::SeqCst) {
        st.requests.lock().unwrap().push(rec);
    }
    (body, path, key)
}

type Response = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn reply(status: u16, body: Value, headers: &[(&str, String)]) -> Response {
    let mut r = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
    r.add_header(tiny_http::Header::from_bytes("content-type", "application/json").unwrap());
    for (n, v) in headers {
        r.add_header(tiny_http::Header::from_bytes(*n, v.as_bytes()).unwrap());
    }
    r
}

fn error(message: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": code, "code": code}})
}

/// The answer to one request, after the mode's (or the snippets') delay.
fn respond(st: &State, body: &Value, path: &str, key: &str) -> Response {
    let n = st.served.fetch_add(1, Ordering::SeqCst);
    let mode = st.mode.lock().unwrap().clone();
    let delay = *st.delay.lock().unwrap();
    let anthropic = path.ends_with("/v1/messages");
    let chaos = match mode {
        Mode::Chaos {
            p_429,
            p_500,
            max_delay_ms,
            ..
        } => Some(chaos_draw(&st.rng, p_429, p_500, max_delay_ms)),
        _ => None,
    };

    let (memory, snippets) = conversation(body);
    let sleep = snippets
        .iter()
        .filter_map(|s| marker(s, "fake_sleep_ms"))
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .map(Duration::from_millis)
        .unwrap_or(delay + chaos.as_ref().map_or(Duration::ZERO, |c| c.delay));
    std::thread::sleep(sleep);
    // Input the model rejects: the mock's `mock_fatal`, as a context-length error.
    let rejected = snippets
        .iter()
        .any(|s| s.lines().any(|l| directive(l, "mock_fatal").is_some()));

    let fault = chaos.as_ref().and_then(|c| c.fault.as_ref());
    match mode {
        Mode::RateLimited {
            times,
            retry_after_s,
        } if n < times => reply(
            429,
            error("Rate limit reached", "rate_limit_exceeded"),
            &[("retry-after", retry_after_s.to_string())],
        ),
        Mode::ServerError { times } if n < times => {
            reply(500, error("The server had an error", "server_error"), &[])
        }
        _ if fault.is_some() => match fault {
            Some(Fault::RateLimited(name, value)) => reply(
                429,
                error("Rate limit reached", "rate_limit_exceeded"),
                &[(name, value.clone())],
            ),
            _ => reply(500, error("The server had an error", "server_error"), &[]),
        },
        Mode::Unauthorized => reply(
            401,
            error(
                &format!("Incorrect API key provided: {key}"),
                "invalid_api_key",
            ),
            &[],
        ),
        _ if rejected => too_long(),
        Mode::ContextWindow { max_snippets } if snippets.len() > max_snippets => too_long(),
        _ => success(
            &mode,
            body,
            &memory,
            &snippets,
            cache_usage(st, body, anthropic),
        ),
    }
}

/// The input is more than the model takes.
fn too_long() -> Response {
    reply(
        400,
        error(
            "This model's maximum context length is 10 tokens",
            "context_length_exceeded",
        ),
        &[],
    )
}

/// A 200 answer, delivered as the mode says.
fn success(
    mode: &Mode,
    body: &Value,
    memory: &Value,
    snippets: &[String],
    usage: Usage,
) -> Response {
    // A repair request carries the model's earlier answer.
    let repair = body["messages"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["role"] == "assistant"));
    let answer = answer(memory, snippets, *mode == Mode::Ungrounded);
    let text = match mode {
        Mode::Fenced => Some(format!("```json\n{answer}\n```")),
        Mode::Prose => Some(format!(
            "Here is the memory update you asked for:\n{answer}\nLet me know if {{anything}} else is needed."
        )),
        Mode::Think => Some(format!(
            "<think>The user said {{\"ops\": maybe}}. Let me write it.</think>\n{answer}"
        )),
        Mode::InvalidThenValid if !repair => {
            Some("Sure! The user wants to move; I'll remember that.".to_string())
        }
        Mode::SchemaViolating => Some(json!({"ops": "set everything", "summary": 42}).to_string()),
        _ => None,
    };
    reply(200, wrap(text, answer, usage), &[])
}

/// Of a request's [`PROMPT_TOKENS`], the first [`CACHED_PROMPT_TOKENS`] are its system prompt, and
/// the provider caches it as the real ones do: OpenAI by itself, Anthropic where `cache_control`
/// marks it. The first request with a system prompt writes the cache, later ones read it.
#[derive(Clone, Copy, Debug)]
struct Usage {
    anthropic: bool,
    read: u64,
    written: u64,
}

pub const CACHED_PROMPT_TOKENS: u64 = 60;

fn cache_usage(st: &State, body: &Value, anthropic: bool) -> Usage {
    let prefix = if anthropic {
        let block = &body["system"][0];
        block["cache_control"]["type"]
            .as_str()
            .and(block["text"].as_str())
    } else {
        body["messages"][0]["content"].as_str()
    };
    let (read, written) = match prefix {
        Some(p) if !st.cached_prefixes.lock().unwrap().insert(p.to_string()) => {
            (CACHED_PROMPT_TOKENS, 0)
        }
        Some(_) => (0, CACHED_PROMPT_TOKENS),
        None => (0, 0),
    };
    Usage {
        anthropic,
        read,
        written: if anthropic { written } else { 0 },
    }
}

/// The provider envelope around an answer: structured (`text` None) or as text.
fn wrap(text: Option<String>, answer: Value, usage: Usage) -> Value {
    if usage.anthropic {
        let block = match text {
            Some(t) => json!({"type": "text", "text": t}),
            None => {
                json!({"type": "tool_use", "id": "toolu_1", "name": "update_memory", "input": answer})
            }
        };
        json!({
            "id": "msg_1", "type": "message", "role": "assistant", "content": [block],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": PROMPT_TOKENS - usage.read - usage.written,
                      "cache_read_input_tokens": usage.read,
                      "cache_creation_input_tokens": usage.written,
                      "output_tokens": COMPLETION_TOKENS}
        })
    } else {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": text.unwrap_or_else(|| answer.to_string())}}],
            "usage": {"prompt_tokens": PROMPT_TOKENS,
                      "prompt_tokens_details": {"cached_tokens": usage.read},
                      "completion_tokens": COMPLETION_TOKENS}
        })
    }
}

/// The current memory and snippet texts from the first user message of the request.
fn conversation(body: &Value) -> (Value, Vec<String>) {
    let first = body["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let payload: Value = first
        .find('{')
        .and_then(|i| serde_json::from_str(&first[i..]).ok())
        .unwrap_or(Value::Null);
    let snippets = payload["new_snippets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["text"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (payload["current_memory"].clone(), snippets)
}

fn marker<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (head, rest) = l.split_once(':')?;
        (head.trim() == name).then(|| rest.trim())
    })
}

/// The "model": ops from markers (in line order), the summary extended with the other lines.
fn answer(memory: &Value, snippets: &[String], ungrounded: bool) -> Value {
    let mut ops = Vec::new();
    let mut summary = memory["general_summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for text in snippets {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some((k, v)) = directive(line, "confirmed").and_then(key_value) {
                let evidence = if ungrounded {
                    "the user said so in an earlier conversation"
                } else {
                    line
                };
                ops.push(json!({"op": "confirm", "key": k, "value": v,
                                "evidence": evidence, "basis": null}));
            } else if let Some((k, v)) = directive(line, "inferred").and_then(key_value) {
                ops.push(json!({"op": "infer", "key": k, "value": v,
                                "evidence": null, "basis": "fake model"}));
            } else if let Some(k) = directive(line, "retract").filter(|k| !k.is_empty()) {
                ops.push(json!({"op": "drop_inferred", "key": k,
                                "value": null, "evidence": null, "basis": "retracted"}));
            } else if directive(line, "fake_sleep_ms").is_none() {
                summary = fold_summary(&summary, line);
            }
        }
    }
    json!({"ops": ops, "general_summary": summary})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_rules::tail;
    use std::io::{Read, Write};

    /// POST an OpenAI request (the memory's `summary` and `snippets`): status, head, body.
    fn post(f: &FakeLlm, summary: &str, snippets: &[&str]) -> (u16, String, Value) {
        let payload = json!({
            "current_memory": {"user_confirmed": {}, "llm_inferred": {}, "general_summary": summary},
            "new_snippets": snippets.iter().enumerate()
                .map(|(i, t)| json!({"id": i.to_string(), "text": t})).collect::<Vec<_>>(),
        });
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "rules"},
            {"role": "user", "content": format!("Update the memory.\n\n{payload}")}]})
        .to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", f.port)).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (
            status,
            head.to_ascii_lowercase(),
            serde_json::from_str(body).unwrap(),
        )
    }

    fn answer_of(v: &Value) -> Value {
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn folds_the_summary_like_the_mock_and_parses_heads_like_it() {
        let f = FakeLlm::start(Mode::Valid);
        let (status, _, v) = post(
            &f,
            "earlier",
            &[
                "  Confirmed : a = 1 \nINFERRED: b = 2\nretract: c",
                "confirmed: no equals\nretract:\nconfirmed:  = x\nfake_sleep_ms: 1\nbye",
            ],
        );
        assert_eq!(status, 200);
        let a = answer_of(&v);
        let ops: Vec<(String, String)> = a["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["op"].as_str().unwrap().to_string(),
                    o["key"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            ops,
            [("confirm", "a"), ("infer", "b"), ("drop_inferred", "c")]
                .map(|(o, k)| (o.to_string(), k.to_string()))
        );
        assert_eq!(a["ops"][0]["evidence"], "Confirmed : a = 1");
        assert_eq!(
            a["general_summary"],
            "earlier | confirmed: no equals | retract: | confirmed:  = x | bye"
        );
        // capped line by line: the last 2000 characters, from a word boundary
        let long = "w ".repeat(1100);
        let (_, _, v) = post(&f, long.trim_end(), &["one more line"]);
        let s = answer_of(&v)["general_summary"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            s,
            tail(&format!("{} | one more line", long.trim_end()), 2000)
        );
        assert!(s.chars().count() <= SUMMARY_MAX_CHARS && s.ends_with("| one more line"));
    }

    #[test]
    fn rejected_input_is_a_context_length_error_in_every_mode() {
        for mode in [
            Mode::Valid,
            Mode::Fenced,
            Mode::ContextWindow { max_snippets: 9 },
        ] {
            let f = FakeLlm::start(mode);
            let (status, _, v) = post(&f, "", &["fine", "x\n Mock_Fatal : nope"]);
            assert_eq!(status, 400);
            assert_eq!(v["error"]["code"], "context_length_exceeded");
            let (status, _, _) = post(&f, "", &["fine"]);
            assert_eq!(status, 200);
        }
    }

    #[test]
    fn chaos_is_reproducible_from_its_seed() {
        let chaos = Mode::Chaos {
            seed: 42,
            p_429: 0.3,
            p_500: 0.3,
            max_delay_ms: 5,
        };
        let run = |f: &FakeLlm| -> Vec<(u16, bool)> {
            (0..40)
                .map(|_| {
                    let (status, head, _) = post(f, "", &["confirmed: a = 1"]);
                    let retry =
                        head.contains("retry-after-ms: ") || head.contains("retry-after: 1");
                    (status, retry)
                })
                .collect()
        };
        let f = FakeLlm::start(chaos.clone());
        let first = run(&f);
        f.set_mode(chaos.clone());
        assert_eq!(run(&f), first, "set_mode restarts the sequence");
        assert_eq!(run(&FakeLlm::start(chaos)), first);
        for (status, retry) in &first {
            assert!([200, 429, 500].contains(status));
            assert_eq!(*retry, *status == 429, "a 429 says when to retry");
        }
        for s in [200, 429, 500] {
            assert!(first.iter().any(|x| x.0 == s), "{s} in {first:?}");
        }
        assert_eq!(f.responses_by_status().values().sum::<usize>(), 80);
    }
}
