//! A fake LLM server on loopback speaking both wire formats: OpenAI-compatible
//! `POST .../chat/completions` and Anthropic `POST .../v1/messages`.
//!
//! Its "model" reads the snippets out of the request and answers by the same marker language as
//! the mock summarizer: `confirmed: k = v` (confirmed, quoting the line as evidence),
//! `inferred: k = v`, `retract: k`; other lines extend the summary. `fake_sleep_ms: N` in a
//! snippet delays that answer. The [`Mode`] decides how (and whether) the answer is delivered.
//! Every request is recorded for the tests to inspect.

use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PROMPT_TOKENS: u64 = 100;
pub const COMPLETION_TOKENS: u64 = 20;

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
    served: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
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
        let state = Arc::new(State {
            mode: Mutex::new(mode),
            delay: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
            served: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
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
        *self.state.mode.lock().unwrap() = mode;
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
pub fn serve_forever(port: u16, delay: Duration) -> ! {
    let f = FakeLlm::start_on(port, Mode::Valid);
    f.set_delay(delay);
    println!("fake LLM listening on 127.0.0.1:{}", f.port);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn handle(mut request: tiny_http::Request, st: &State) {
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
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
    st.requests.lock().unwrap().push(rec);
    let n = st.served.fetch_add(1, Ordering::SeqCst);
    let mode = st.mode.lock().unwrap().clone();
    let delay = *st.delay.lock().unwrap();
    let anthropic = path.ends_with("/v1/messages");

    let (memory, snippets) = conversation(&body);
    let sleep = snippets
        .iter()
        .filter_map(|s| marker(s, "fake_sleep_ms"))
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .map(Duration::from_millis)
        .unwrap_or(delay);
    std::thread::sleep(sleep);

    // A repair request carries the model's earlier answer.
    let repair = body["messages"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["role"] == "assistant"));
    let reply = |status: u16, body: Value, headers: &[(&str, String)]| {
        let mut r = tiny_http::Response::from_string(body.to_string()).with_status_code(status);
        r.add_header(tiny_http::Header::from_bytes("content-type", "application/json").unwrap());
        for (n, v) in headers {
            r.add_header(tiny_http::Header::from_bytes(*n, v.as_bytes()).unwrap());
        }
        r
    };
    let error = |message: &str, code: &str| json!({"error": {"message": message, "type": code, "code": code}});
    let response = match mode {
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
        Mode::Unauthorized => reply(
            401,
            error(
                &format!("Incorrect API key provided: {key}"),
                "invalid_api_key",
            ),
            &[],
        ),
        Mode::ContextWindow { max_snippets } if snippets.len() > max_snippets => reply(
            400,
            error(
                "This model's maximum context length is 10 tokens",
                "context_length_exceeded",
            ),
            &[],
        ),
        _ => {
            let answer = answer(&memory, &snippets, mode == Mode::Ungrounded);
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
                Mode::SchemaViolating => {
                    Some(json!({"ops": "set everything", "summary": 42}).to_string())
                }
                _ => None,
            };
            reply(200, wrap(anthropic, text, answer), &[])
        }
    };
    let _ = request.respond(response);
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// The provider envelope around an answer: structured (`text` None) or as text.
fn wrap(anthropic: bool, text: Option<String>, answer: Value) -> Value {
    if anthropic {
        let block = match text {
            Some(t) => json!({"type": "text", "text": t}),
            None => {
                json!({"type": "tool_use", "id": "toolu_1", "name": "update_memory", "input": answer})
            }
        };
        json!({
            "id": "msg_1", "type": "message", "role": "assistant", "content": [block],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS}
        })
    } else {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": text.unwrap_or_else(|| answer.to_string())}}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
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

/// The "model": ops from markers, the summary extended with the other lines.
fn answer(memory: &Value, snippets: &[String], ungrounded: bool) -> Value {
    let mut ops = Vec::new();
    let mut lines: Vec<String> = memory["general_summary"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|s| vec![s.to_string()])
        .unwrap_or_default();
    for text in snippets {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let kv = |rest: &str| {
                rest.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            };
            let (head, rest) = line.split_once(':').unwrap_or(("", ""));
            match head.trim() {
                "confirmed" => {
                    if let Some((k, v)) = kv(rest) {
                        let evidence = if ungrounded {
                            "the user said so in an earlier conversation"
                        } else {
                            line
                        };
                        ops.push(json!({"op": "confirm", "key": k, "value": v,
                                        "evidence": evidence, "basis": null}));
                    }
                }
                "inferred" => {
                    if let Some((k, v)) = kv(rest) {
                        ops.push(json!({"op": "infer", "key": k, "value": v,
                                        "evidence": null, "basis": "fake model"}));
                    }
                }
                "retract" => ops.push(json!({"op": "drop_inferred", "key": rest.trim(),
                                             "value": null, "evidence": null, "basis": "retracted"})),
                "fake_sleep_ms" => {}
                _ => lines.push(line.to_string()),
            }
        }
    }
    json!({"ops": ops, "general_summary": lines.join(" | ")})
}
