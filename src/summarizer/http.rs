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
                status: 429,
                retry_after,
                ..
            } => SummarizerError::RateLimited {
                message,
                retry_after,
            },
            HttpError::Status { status, detail, .. }
                if (status == 400 || status == 413) && is_context_length(&detail) =>
            {
                SummarizerError::ContextLength(message)
            }
            // 408 request timeout, 409 conflict (Anthropic uses it for transient states),
            // 5xx and Anthropic's 529 overloaded: the same request may well work later.
            HttpError::Status { status, .. } if status == 408 || status == 409 || status >= 500 => {
                SummarizerError::Transient(message)
            }
            // 400, 401, 403, 404, 422...: this request will never work as configured.
            HttpError::Status { .. } | HttpError::BadUrl(_) => SummarizerError::Permanent(message),
            HttpError::Connect(_) | HttpError::Timeout(_) | HttpError::Body(_) => {
                SummarizerError::Transient(message)
            }
        }
    }
}

/// Providers word it differently: OpenAI `context_length_exceeded`, vLLM "maximum context
/// length", Anthropic "prompt is too long", llama.cpp "exceeds the available context size",
/// Ollama "exceeds the context length".
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

/// The provider's own error text out of its JSON error body (OpenAI and Anthropic both use
/// `{"error": {"message": ...}}`), or the body itself, shortened.
fn detail(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let e = v.get("error")?;
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
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    if text.chars().count() > MAX_DETAIL_CHARS {
        let cut: String = text.chars().take(MAX_DETAIL_CHARS).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// Retry-After in seconds (fractions allowed), or OpenAI's `retry-after-ms`. HTTP dates are
/// rare from APIs and fall back to the regular backoff.
fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let d = if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::try_from_secs_f64(ms / 1000.0).ok()
    } else {
        get("retry-after")
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
    };
    d.map(|d| d.min(MAX_RETRY_AFTER))
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
        serde_json::from_str(&text).map_err(|e| HttpError::Body(format!("not JSON ({e})")))
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
            let got = match e.into_summarizer_error("") {
                SummarizerError::Transient(_) => "transient",
                SummarizerError::RateLimited { .. } => "rate",
                SummarizerError::ContextLength(_) => "split",
                SummarizerError::Permanent(_) => "permanent",
                SummarizerError::Config(_) => "config",
            };
            assert_eq!(got, expected, "{shown}");
        }
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
