//! Claiming and applying: thin typed wrappers over the SQL functions in `sql/queue.sql`.
//! Every call here must run inside a transaction on the main thread.

use crate::settings::QueuePolicy;
use crate::summarizer::{Memory, Snippet, Usage};
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use serde_json::Value;
use std::time::Duration;

/// One leased chat with its current memory and claimed snippets (in order).
#[derive(Clone, Debug)]
pub struct Claim {
    pub chat_id: String,
    pub lease_token: pgrx::Uuid,
    pub memory: Memory,
    pub snippets: Vec<Snippet>,
}

/// A merged memory ready to be written.
#[derive(Clone, Debug)]
pub struct Applied {
    pub chat_id: String,
    pub lease_token: pgrx::Uuid,
    pub queue_ids: Vec<String>,
    pub memory: Memory,
    pub token_count: i32,
    pub needs_new_chat: bool,
    pub usage: Usage,
}

/// A failed attempt to record.
#[derive(Clone, Debug)]
pub struct Failed {
    pub chat_id: String,
    pub lease_token: pgrx::Uuid,
    pub error: String,
    pub permanent: bool,
    /// The endpoint's Retry-After: the delay to use instead of the backoff.
    pub retry_after: Option<Duration>,
    pub usage: Usage,
}

fn object(v: Option<JsonB>) -> serde_json::Map<String, Value> {
    match v.map(|j| j.0) {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

pub fn claim(policy: &QueuePolicy, exclude: &[String]) -> Result<Vec<Claim>, SpiError> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT chat_id, lease_token, user_confirmed, llm_inferred, general_summary, snippets \
             FROM memory._claim($1, $2, $3, $4)",
            None,
            &[
                policy.batch_chats.into(),
                policy.batch_snippets.into(),
                policy.lease_seconds.into(),
                exclude.to_vec().into(),
            ],
        )?;
        let mut claims = Vec::new();
        for row in rows {
            let snippets: Vec<Snippet> = row
                .get::<JsonB>(6)?
                .and_then(|j| serde_json::from_value(j.0).ok())
                .unwrap_or_default();
            claims.push(Claim {
                chat_id: row.get::<String>(1)?.unwrap_or_default(),
                lease_token: row.get::<pgrx::Uuid>(2)?.expect("lease token"),
                memory: Memory {
                    user_confirmed: object(row.get::<JsonB>(3)?),
                    llm_inferred: object(row.get::<JsonB>(4)?),
                    general_summary: row.get::<String>(5)?.unwrap_or_default(),
                },
                snippets,
            });
        }
        Ok(claims)
    })
}

pub fn apply(results: &[Applied], summarizer: &str) -> Result<i32, SpiError> {
    let payload: Vec<Value> = results
        .iter()
        .map(|a| {
            serde_json::json!({
                "chat_id": a.chat_id,
                "lease_token": a.lease_token.to_string(),
                "queue_ids": a.queue_ids,
                "user_confirmed": a.memory.user_confirmed,
                "llm_inferred": a.memory.llm_inferred,
                "general_summary": a.memory.general_summary,
                "token_count": a.token_count,
                "needs_new_chat": a.needs_new_chat,
                "llm_requests": a.usage.requests,
                "prompt_tokens": a.usage.prompt_tokens,
                "completion_tokens": a.usage.completion_tokens,
                "rejected_ops": a.usage.rejected_ops,
            })
        })
        .collect();
    Spi::get_one_with_args::<i32>(
        "SELECT memory._apply($1, $2)",
        &[JsonB(Value::Array(payload)).into(), summarizer.into()],
    )
    .map(|n| n.unwrap_or(0))
}

pub fn fail(f: &Failed, policy: &QueuePolicy, summarizer: &str) -> Result<i32, SpiError> {
    let usage = serde_json::json!({
        "llm_requests": f.usage.requests,
        "prompt_tokens": f.usage.prompt_tokens,
        "completion_tokens": f.usage.completion_tokens,
        "rejected_ops": f.usage.rejected_ops,
    });
    let retry_after_ms = f
        .retry_after
        .map(|d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    Spi::get_one_with_args::<i32>(
        "SELECT memory._fail($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            f.chat_id.as_str().into(),
            f.lease_token.into(),
            f.error.as_str().into(),
            f.permanent.into(),
            policy.max_attempts.into(),
            policy.backoff_base_ms.into(),
            policy.backoff_max_ms.into(),
            retry_after_ms.into(),
            summarizer.into(),
            JsonB(usage).into(),
        ],
    )
    .map(|n| n.unwrap_or(0))
}

/// Give a lease back untouched (the worker is stopping with the request still in flight): the
/// snippets become pending again without counting an attempt.
pub fn release(chat_id: &str, lease_token: pgrx::Uuid) -> Result<i32, SpiError> {
    Spi::get_one_with_args::<i32>(
        "SELECT memory._release($1, $2)",
        &[chat_id.into(), lease_token.into()],
    )
    .map(|n| n.unwrap_or(0))
}

pub fn reclaim(max_attempts: i32, dead_owners: bool) -> Result<i32, SpiError> {
    Spi::get_one_with_args::<i32>(
        "SELECT memory._reclaim($1, $2)",
        &[max_attempts.into(), dead_owners.into()],
    )
    .map(|n| n.unwrap_or(0))
}

pub fn cleanup(
    retention_seconds: i32,
    batch: i32,
    audit_retention_seconds: i32,
) -> Result<i32, SpiError> {
    Spi::get_one_with_args::<i32>(
        "SELECT memory._cleanup($1, $2, $3)",
        &[
            retention_seconds.into(),
            batch.into(),
            audit_retention_seconds.into(),
        ],
    )
    .map(|n| n.unwrap_or(0))
}

/// Seconds until the next scheduled retry or lease expiry (negative when overdue).
pub fn seconds_until_due() -> Result<Option<f64>, SpiError> {
    crate::spi::read_one::<f64>(
        "SELECT extract(epoch FROM memory._next_due() - clock_timestamp())::float8",
        &[],
    )
}
