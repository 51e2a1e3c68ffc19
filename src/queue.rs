//! Claiming and applying: thin typed wrappers over the SQL functions in `sql/queue.sql`.
//! Every call here must run inside a transaction on the main thread.

use crate::model::{Claim, FactKey, FactKeys, Finished, Memory, Snippet, no_lease};
use crate::settings::QueuePolicy;
use pgrx::datum::JsonB;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QueueError {
    #[error(transparent)]
    Spi(#[from] SpiError),
    /// `_claim` returned a row it can never produce: a bug, not an empty batch to apply.
    #[error("malformed claim of chat \"{0}\": {1}")]
    MalformedClaim(String, &'static str),
}

/// The declared fact keys (`memory.fact_keys`), read once per batch: a change applies from the
/// next batch on.
pub fn fact_keys() -> Result<FactKeys, QueueError> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT key, description, may_confirm, may_infer FROM memory.fact_keys",
            None,
            &[],
        )?;
        let mut keys = Vec::new();
        for row in rows {
            keys.push(FactKey {
                key: row.get::<String>(1)?.unwrap_or_default(),
                description: row.get::<String>(2)?.unwrap_or_default(),
                may_confirm: row.get::<bool>(3)?.unwrap_or(false),
                may_infer: row.get::<bool>(4)?.unwrap_or(false),
            });
        }
        Ok(FactKeys::new(keys))
    })
}

/// How `_finish` reads a result.
fn finished_json(f: &Finished) -> Value {
    let failure = f.failure.as_ref().map(|fail| {
        serde_json::json!({
            "error": fail.error,
            "kind": fail.kind,
            "permanent": fail.permanent,
            "retry_after_ms": fail.retry_after.map(|d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX)),
        })
    });
    let dead: Vec<Value> = f
        .dead
        .iter()
        .map(|d| serde_json::json!({"id": d.id, "error": d.error, "kind": d.kind}))
        .collect();
    serde_json::json!({
        "chat_id": f.chat_id,
        "lease_token": f.lease_token.to_string(),
        "applied_ids": f.applied,
        "user_confirmed": f.memory.user_confirmed,
        "llm_inferred": f.memory.llm_inferred,
        "general_summary": f.memory.general_summary,
        "token_count": f.token_count,
        "needs_new_chat": f.needs_new_chat,
        "context": f.context,
        "context_tokens": f.context_tokens,
        "dead": dead,
        "failure": failure,
        "usage": {
            "llm_requests": f.usage.requests,
            "prompt_tokens": f.usage.prompt_tokens,
            "completion_tokens": f.usage.completion_tokens,
            "rejected_ops": f.usage.rejected_ops,
            "cached_prompt_tokens": f.usage.cached_prompt_tokens,
            "cache_write_tokens": f.usage.cache_write_tokens,
        },
    })
}

fn object(v: Option<JsonB>) -> serde_json::Map<String, Value> {
    match v.map(|j| j.0) {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// The snippets _claim/_peek built as JSON: a shape they cannot have is a bug, never an empty
/// batch to apply.
fn snippets(json: Option<JsonB>, chat_id: &str) -> Result<Vec<Snippet>, QueueError> {
    json.and_then(|j| serde_json::from_value::<Vec<Snippet>>(j.0).ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| QueueError::MalformedClaim(chat_id.to_string(), "no snippets"))
}

/// Claims from rows of `_claim` or `_peek` (the same columns).
fn claims_from(rows: pgrx::spi::SpiTupleTable) -> Result<Vec<Claim>, QueueError> {
    let mut claims = Vec::new();
    for row in rows {
        let chat_id = row.get::<String>(1)?.unwrap_or_default();
        claims.push(Claim {
            lease_token: row.get::<pgrx::Uuid>(2)?.unwrap_or_else(no_lease),
            version: row.get::<i64>(3)?.unwrap_or(0),
            memory: Memory {
                user_confirmed: object(row.get::<JsonB>(4)?),
                llm_inferred: object(row.get::<JsonB>(5)?),
                general_summary: row.get::<String>(6)?.unwrap_or_default(),
            },
            snippets: snippets(row.get::<JsonB>(7)?, &chat_id)?,
            chat_id,
        });
    }
    Ok(claims)
}

const COLUMNS: &str =
    "chat_id, lease_token, version, user_confirmed, llm_inferred, general_summary, snippets";

/// Take back stale leases, then lease chats and mark their oldest pending snippets. One
/// transaction: a chat whose old lease expired is claimed only after its rows went back.
pub fn claim(policy: &QueuePolicy) -> Result<Vec<Claim>, QueueError> {
    reclaim(policy.max_attempts, false)?;
    defer_over_budget()?;
    Spi::connect_mut(|client| {
        let rows = client.update(
            &format!("SELECT {COLUMNS} FROM memory._claim($1, $2, $3)"),
            None,
            &[
                policy.batch_chats.into(),
                policy.batch_snippets.into(),
                policy.lease_seconds.into(),
            ],
        )?;
        claims_from(rows)
    })
}

/// What `claim` would take, without leasing or locking anything (for process_pending): claims
/// with no lease ([`no_lease`]) until [`claim_exact`] takes them.
pub fn peek(policy: &QueuePolicy) -> Result<Vec<Claim>, QueueError> {
    Spi::connect(|client| {
        let rows = client.select(
            &format!("SELECT {COLUMNS} FROM memory._peek($1, $2)"),
            None,
            &[policy.batch_chats.into(), policy.batch_snippets.into()],
        )?;
        claims_from(rows)
    })
}

/// Lease exactly what was peeked, if nothing changed since; the lease token, or None.
pub fn claim_exact(peeked: &Claim, policy: &QueuePolicy) -> Result<Option<pgrx::Uuid>, QueueError> {
    let ids: Vec<String> = peeked.snippets.iter().map(|s| s.id.clone()).collect();
    Ok(Spi::get_one_with_args::<pgrx::Uuid>(
        "SELECT memory._claim_exact($1, $2, $3::uuid[], $4)",
        &[
            peeked.chat_id.as_str().into(),
            peeked.version.into(),
            ids.into(),
            policy.lease_seconds.into(),
        ],
    )?)
}

/// What [`finish`] did: how many chats' memory changed, and which chats it skipped because
/// another transaction holds their row (to finish later).
#[derive(Debug, Default)]
pub struct FinishOutcome {
    pub applied: usize,
    pub busy: Vec<String>,
}

/// Write how leased summarizations ended (see [`Finished`]). Results whose lease was lost
/// meanwhile change nothing; chats a client holds locked are skipped, never waited for.
pub fn finish(
    results: &[Finished],
    policy: &QueuePolicy,
    summarizer: &str,
) -> Result<FinishOutcome, SpiError> {
    let payload = Value::Array(results.iter().map(finished_json).collect());
    let outcome = Spi::get_one_with_args::<JsonB>(
        "SELECT memory._finish($1, $2, $3, $4, $5, $6)",
        &[
            JsonB(payload).into(),
            summarizer.into(),
            policy.max_attempts.into(),
            policy.backoff_base_ms.into(),
            policy.backoff_max_ms.into(),
            policy.history_versions.into(),
        ],
    )?
    .map(|j| j.0)
    .unwrap_or_default();
    Ok(FinishOutcome {
        applied: outcome["applied"].as_u64().unwrap_or(0) as usize,
        busy: outcome["busy"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
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

/// Defer the due chats of owners over their daily token budget (before a claim, same
/// transaction); how many were deferred.
pub fn defer_over_budget() -> Result<i32, SpiError> {
    Spi::get_one_with_args::<i32>(
        "SELECT memory._defer_over_budget($1)",
        &[i64::from(crate::settings::OWNER_DAILY_TOKENS.get()).into()],
    )
    .map(|n| n.unwrap_or(0))
}

/// Retention; `retention_seconds` None keeps every complete row (keep_applied_snippets).
pub fn cleanup(
    retention_seconds: Option<i32>,
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
