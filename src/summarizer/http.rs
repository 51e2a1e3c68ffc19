//! HTTP for the LLM summarizers: one JSON POST with a time limit, and the classification of
//! what went wrong into retry / rate limited / split / give up. Runs on helper threads: nothing
//! here may touch Postgres. Every message that leaves this module has the API key scrubbed.

use super::SummarizerError;
use serde_json::Value;
use std::time::Duration;
use thiserror::Error;

/// Longest provider error text kept in a message (they can be whole HTML pages).
const MAX_DETAIL_CHARS: usize = 300;
/// Longest answer body read; a summarizer answer is a few kilobytes.
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// A Retry-After beyond this is treated as this (a misbehaving proxy must not park work for days).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("could not connect to the LLM endpoint ({0})")]
    Connect(String),
    #[error("LLM request timed out after {0} ms")]
    Timeout(u128),
    #[error("LLM endpoint answered {status}: {detail}")]
    Status {
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that holds an error object instead of an answer (gateways such as LiteLLM
    /// pass a provider's error through that way).
    #[error("LLM endpoint answered {status} with an error: {detail}")]
    ErrorBody {
        status: u16,
        detail: String,
        /// The status a provider would have sent this error with; drives the classification.
        like_status: u16,
        retry_after: Option<Duration>,
    },
    #[error("LLM endpoint sent an unreadable answer: {0}")]
    Body(String),
    #[error("invalid LLM endpoint URL ({0}); check memory_ext.llm_endpoint")]
    BadUrl(String),
}

impl HttpError {
    /// What the worker should do about it.
    pub fn into_summarizer_error(self, key: &str) -> SummarizerError {
        let message = scrub(&self.to_string(), key);
        match self {
            HttpError::Status {
                status,
                detail,
                retry_after,
            }
            | HttpError::ErrorBody {
                like_status: status,
                detail,
                retry_after,
                ..
            } => by_status(status, &detail, retry_after, message),
            HttpError::BadUrl(_) => SummarizerError::Permanent(message),
            HttpError::Connect(_) | HttpError::Timeout(_) | HttpError::Body(_) => {
                SummarizerError::Transient(message)
            }
        }
    }
}

/// The worker's reaction to an error status, or to the status an error body stands for.
fn by_status(
    status: u16,
    detail: &str,
    retry_after: Option<Duration>,
    message: String,
) -> SummarizerError {
    match status {
        429 => SummarizerError::RateLimited {
            message,
            retry_after,
        },
        400 | 413 if is_context_length(detail) => SummarizerError::ContextLength(message),
        // 408 request timeout, 409 conflict (Anthropic uses it for transient states),
        // 5xx and Anthropic's 529 overloaded: the same request may well work later.
        408 | 409 | 500.. => SummarizerError::Transient(message),
        // 400, 401, 403, 404, 422...: this request will never work as configured.
        _ => SummarizerError::Permanent(message),
    }
}

/// Providers word it differently: OpenAI `context_length_exceeded`, vLLM "maximum context
/// length", Anthropic "prompt is too long", llama.cpp "exceeds the available context size",
/// Ollama "exceeds the context length", LiteLLM `ContextWindowExceededError`.
fn is_context_length(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "context_length_exceeded",
        "context length",
        "context size",
        "context window",
        "prompt is too long",
        "too many tokens",
        "exceed_context_size",
        "contextwindowexceeded",
    ]
    .iter()
    .any(|p| d.contains(p))
}

/// Replace every occurrence of the key with `[redacted]` (providers echo a wrong key back).
pub fn scrub(text: &str, key: &str) -> String {
    if key.len() < 4 {
        return text.to_string();
    }
    text.replace(key, "[redacted]")
}

/// The provider's own error text out of its JSON error body, or the body itself, shortened.
fn detail(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| json_detail(&v));
    shorten(from_json.unwrap_or_else(|| body.trim().to_string()))
}

/// OpenAI and Anthropic both use `{"error": {"message": ...}}`; some servers send
/// `{"error": "..."}`.
fn json_detail(body: &Value) -> Option<String> {
    let e = body.get("error")?;
    let msg = e
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| e.as_str())?;
    let code = e
        .get("code")
        .or_else(|| e.get("type"))
        .and_then(Value::as_str);
    Some(match code {
        Some(c) if !msg.contains(c) => format!("{msg} ({c})"),
        _ => msg.to_string(),
    })
}

/// Provider error texts can be whole HTML pages.
fn shorten(text: String) -> String {
    if text.chars().count() > MAX_DETAIL_CHARS {
        let cut: String = text.chars().take(MAX_DETAIL_CHARS).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// A gateway (LiteLLM, for one) may answer 2xx with the provider's error object in place of an
/// answer; reading it as an answer would report "no content" and hide the provider's reason.
/// Both wire formats arrive here, so both are recognised: Anthropic's
/// `{"type": "error", "error": {...}}` and OpenAI's `{"error": {...}}`.
fn error_in_body(
    status: u16,
    body: &Value,
    text: &str,
    retry_after: Option<Duration>,
) -> Option<HttpError> {
    let error = body.get("error").filter(|e| match e {
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => false, // `"error": null` beside a real answer
    });
    if error.is_none() && body.get("type").and_then(Value::as_str) != Some("error") {
        return None;
    }
    let detail = shorten(json_detail(body).unwrap_or_else(|| text.trim().to_string()));
    // Unknown errors count as server errors (retried), unless they say the prompt is too long.
    let like_status = equivalent_status(body, error)
        .unwrap_or_else(|| if is_context_length(&detail) { 400 } else { 500 });
    Some(HttpError::ErrorBody {
        status,
        detail,
        like_status,
        retry_after,
    })
}

/// The status a provider would have sent with this error: a numeric `code` or `status` (LiteLLM
/// puts the provider's status in `code`, as a string), else the one its type implies.
fn equivalent_status(body: &Value, error: Option<&Value>) -> Option<u16> {
    let field = |name: &str| error.and_then(|e| e.get(name));
    let numeric = [field("code"), field("status"), body.get("status")]
        .into_iter()
        .flatten()
        .find_map(|v| {
            let n = v.as_u64().or_else(|| v.as_str()?.trim().parse().ok())?;
            (400..600).contains(&n).then_some(n as u16)
        });
    if numeric.is_some() {
        return numeric;
    }
    let names = [field("type"), field("code")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    // Anthropic's and OpenAI's error types (and codes), with the statuses they come with; the
    // first match wins, so `invalid_request_error` with a more precise code takes the code's.
    const BY_TYPE: [(&str, u16); 9] = [
        ("rate_limit", 429),
        ("overloaded", 529),
        ("api_error", 500),
        ("server_error", 500),
        ("authentication", 401),
        ("permission", 403),
        ("not_found", 404),
        ("request_too_large", 413),
        ("invalid_request", 400),
    ];
    BY_TYPE
        .iter()
        .find(|(name, _)| names.contains(name))
        .map(|&(_, status)| status)
}

/// Retry-After in seconds (fractions allowed), or OpenAI's `retry-after-ms`; behind LiteLLM the
/// provider's arrive as `llm_provider-retry-after(-ms)`. The first readable one wins. HTTP dates
/// are rare from APIs and fall back to the regular backoff.
fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    const HEADERS: [(&str, f64); 4] = [
        ("retry-after-ms", 1000.0),
        ("retry-after", 1.0),
        ("llm_provider-retry-after-ms", 1000.0),
        ("llm_provider-retry-after", 1.0),
    ];
    HEADERS.iter().find_map(|&(name, per_second)| {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        let seconds = value / per_second;
        // Capped before converting, so a huge value is the cap rather than unreadable.
        (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(MAX_RETRY_AFTER.as_secs_f64())))
    })
}

/// A connection-reusing client. Cheap to share between threads.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    timeout: Duration,
}

impl Client {
    pub fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent(concat!("memory_ext/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { agent, timeout }
    }

    /// POST `body` as JSON; a 2xx answer's JSON, or what went wrong.
    pub fn post_json(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &Value,
    ) -> Result<Value, HttpError> {
        let mut request = self
            .agent
            .post(url)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let mut response = request
            .send(body.to_string().as_bytes())
            .map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|e| match self.transport_error(e) {
                HttpError::Connect(m) => HttpError::Body(m),
                other => other,
            })?;
        if !(200..300).contains(&status) {
            return Err(HttpError::Status {
                status,
                detail: detail(&text),
                retry_after,
            });
        }
        let value: Value =
            serde_json::from_str(&text).map_err(|e| HttpError::Body(format!("not JSON ({e})")))?;
        match error_in_body(status, &value, &text, retry_after) {
            Some(error) => Err(error),
            None => Ok(value),
        }
    }

    fn transport_error(&self, e: ureq::Error) -> HttpError {
        match e {
            ureq::Error::Timeout(_) => HttpError::Timeout(self.timeout.as_millis()),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                HttpError::Timeout(self.timeout.as_millis())
            }
            ureq::Error::BadUri(u) => HttpError::BadUrl(u),
            ureq::Error::Http(h) => HttpError::BadUrl(h.to_string()),
            other => HttpError::Connect(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let status = |status: u16, detail: &str| HttpError::Status {
            status,
            detail: detail.into(),
            retry_after: None,
        };
        let cases: Vec<(HttpError, &str)> = vec![
            (status(500, "boom"), "transient"),
            (status(503, "busy"), "transient"),
            (status(529, "overloaded"), "transient"),
            (status(408, "slow"), "transient"),
            (status(429, "slow down"), "rate"),
            (status(400, "bad request"), "permanent"),
            (status(401, "bad key"), "permanent"),
            (status(403, "forbidden"), "permanent"),
            (status(404, "no such model"), "permanent"),
            (
                status(400, "This model's maximum context length is 8192 tokens"),
                "split",
            ),
            (status(400, "prompt is too long: 210000 tokens"), "split"),
            (status(413, "context_length_exceeded"), "split"),
            (HttpError::Connect("refused".into()), "transient"),
            (HttpError::Timeout(10), "transient"),
            (HttpError::Body("garbage".into()), "transient"),
            (HttpError::BadUrl("x".into()), "permanent"),
        ];
        for (e, expected) in cases {
            let shown = e.to_string();
            assert_eq!(kind(&e.into_summarizer_error("")), expected, "{shown}");
        }
    }

    fn kind(e: &SummarizerError) -> &'static str {
        match e {
            SummarizerError::Transient(_) => "transient",
            SummarizerError::RateLimited { .. } => "rate",
            SummarizerError::ContextLength(_) => "split",
            SummarizerError::Permanent(_) => "permanent",
            SummarizerError::Config(_) => "config",
            // Variants added to SummarizerError later are never produced here.
            #[allow(unreachable_patterns)]
            _ => "other",
        }
    }

    /// A 200 answer's body as post_json sees it: its error, if it holds one.
    fn body_error(body: &str, retry_after: Option<Duration>) -> Option<HttpError> {
        let value: Value = serde_json::from_str(body).unwrap();
        error_in_body(200, &value, body, retry_after)
    }

    #[test]
    fn error_objects_in_2xx_answers() {
        // One case a line: the expected classification, then a 200 answer's body.
        let cases = r#"
            # Anthropic shape
            transient {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}
            transient {"type":"error","error":{"type":"api_error","message":"Internal"}}
            rate      {"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}
            permanent {"type":"error","error":{"type":"authentication_error","message":"bad key"}}
            permanent {"type":"error","error":{"type":"permission_error","message":"no"}}
            permanent {"type":"error","error":{"type":"not_found_error","message":"model: x"}}
            permanent {"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: required"}}
            split     {"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens"}}
            transient {"type":"error","error":{"type":"some_new_error","message":"?"}}
            transient {"type":"error"}
            # OpenAI shape
            rate      {"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}
            transient {"error":{"message":"The server had an error","type":"server_error","code":null}}
            permanent {"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}
            split     {"error":{"message":"maximum context length is 8192","type":"invalid_request_error","code":"context_length_exceeded"}}
            permanent {"error":{"message":"no model x","type":"invalid_request_error","code":"model_not_found"}}
            # a numeric status in code or status, as LiteLLM and others pass it through
            rate      {"error":{"message":"litellm.RateLimitError: busy","type":"None","param":null,"code":"429"}}
            transient {"error":{"message":"upstream down","code":503}}
            transient {"error":{"message":"Anthropic overloaded","code":"529"}}
            permanent {"error":{"message":"no such key","status":401}}
            rate      {"error":"slow down","status":429}
            split     {"error":{"message":"litellm.ContextWindowExceededError: too long","code":"400"}}
            # no type, no status: the wording decides, else retried
            split     {"error":"the request exceeds the available context size"}
            transient {"error":"something broke"}
        "#;
        let cases = cases.lines().map(str::trim);
        for line in cases.filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (expected, body) = line.split_once(' ').unwrap();
            let e = body_error(body.trim(), None).unwrap_or_else(|| panic!("no error in {body}"));
            let shown = e.to_string();
            assert!(
                shown.starts_with("LLM endpoint answered 200 with an error: "),
                "{shown}"
            );
            assert_eq!(kind(&e.into_summarizer_error("")), expected, "{shown}");
        }
    }

    #[test]
    fn answers_are_not_errors() {
        for body in [
            r#"{"choices":[{"message":{"content":"{}"}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"message":{"content":"{}"}}],"error":null}"#,
            r#"{"choices":[{"message":{"content":"{}"}}],"error":{}}"#,
            r#"{"type":"message","content":[{"type":"text","text":"{}"}]}"#,
        ] {
            assert!(body_error(body, None).is_none(), "{body}");
        }
    }

    #[test]
    fn error_object_message_and_retry_after() {
        let body = r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-ant-secret-9"}}"#;
        let e = body_error(body, None)
            .unwrap()
            .into_summarizer_error("sk-ant-secret-9");
        assert_eq!(
            e.to_string(),
            "LLM endpoint answered 200 with an error: invalid x-api-key [redacted] (authentication_error)"
        );
        let body = r#"{"error":{"message":"slow down","code":"429"}}"#;
        let e = body_error(body, Some(Duration::from_secs(9)))
            .unwrap()
            .into_summarizer_error("");
        assert_eq!(
            e.retry_after(),
            Some(Duration::from_secs(9)),
            "the pause reaches the worker"
        );
    }

    /// Answer one request on a local port with `status`, `header` and `body`; the URL to use.
    fn serve_once(status: u16, header: &'static str, body: &'static str) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            // Read the whole request first: closing on unread data would reset the connection.
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line.trim().is_empty() {
                    break;
                }
            }
            reader.read_exact(&mut vec![0; length]).unwrap();
            let answer = format!(
                "HTTP/1.1 {status} X\r\n{header}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            reader.get_mut().write_all(answer.as_bytes()).unwrap();
        });
        url
    }

    #[test]
    fn through_a_gateway() {
        let client = Client::new(Duration::from_secs(5));
        let post = |url: String| client.post_json(&url, &[], &Value::Null).unwrap_err();
        // The error object of a 200 answer, with the provider's pause as LiteLLM forwards it.
        let url = serve_once(
            200,
            "llm_provider-retry-after: 3",
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        );
        let e = post(url).into_summarizer_error("");
        assert_eq!(kind(&e), "rate", "{e}");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        // A 429 whose only pause is the provider's, in milliseconds.
        let url = serve_once(429, "llm_provider-retry-after-ms: 1200", "{}");
        let e = post(url).into_summarizer_error("");
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1200)), "{e}");
    }

    #[test]
    fn details_and_scrubbing() {
        assert_eq!(
            detail(r#"{"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}"#),
            "Incorrect API key (invalid_api_key)"
        );
        assert_eq!(
            detail(
                r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#
            ),
            "Overloaded (overloaded_error)"
        );
        assert_eq!(
            detail(&"x".repeat(1000)).chars().count(),
            MAX_DETAIL_CHARS + 1
        );
        let e = HttpError::Status {
            status: 401,
            detail: "key sk-secret-123 is wrong".into(),
            retry_after: None,
        };
        let msg = e.into_summarizer_error("sk-secret-123").to_string();
        assert_eq!(msg, "LLM endpoint answered 401: key [redacted] is wrong");
    }

    #[test]
    fn retry_after_precedence_and_cap() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = ureq::http::HeaderMap::new();
            for (name, value) in pairs {
                h.insert(*name, value.parse().unwrap());
            }
            retry_after(&h)
        };
        let all = [
            ("retry-after-ms", "1500"),
            ("retry-after", "7"),
            ("llm_provider-retry-after-ms", "2500"),
            ("llm_provider-retry-after", "11"),
        ];
        // Each header wins over those after it.
        let expected = [1500, 7000, 2500, 11000].map(Duration::from_millis);
        for (i, want) in expected.into_iter().enumerate() {
            assert_eq!(headers(&all[i..]), Some(want), "{:?}", all[i]);
        }
        // A LiteLLM proxy sends only the provider's headers.
        assert_eq!(
            headers(&[("llm_provider-retry-after", "0.5")]),
            Some(Duration::from_millis(500))
        );
        // Unreadable values give way to the next header.
        assert_eq!(
            headers(&[
                ("retry-after", "soon"),
                ("llm_provider-retry-after-ms", "300")
            ]),
            Some(Duration::from_millis(300))
        );
        assert_eq!(headers(&[("retry-after-ms", "-5")]), None);
        // Every header is capped, however large.
        for name in all.map(|(name, _)| name) {
            assert_eq!(headers(&[(name, "1e30")]), Some(MAX_RETRY_AFTER), "{name}");
        }
    }

    #[test]
    fn retry_after_header() {
        let mut h = ureq::http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.remove("retry-after-ms");
        h.insert("retry-after", "999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
