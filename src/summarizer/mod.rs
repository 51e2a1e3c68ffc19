//! The summarizer interface. A summarizer turns the current memory plus the new snippets of one
//! chat into a [`SummaryUpdate`]: operations, not a rewritten record. The extension validates the
//! update and applies it with its own merge rules (`crate::merge`), so no summarizer can erase or
//! corrupt memory by omission.
//!
//! Implementations must be `Send + Sync` and work on owned data only: HTTP summarizers may run
//! off the main thread, where nothing may touch Postgres.

pub mod mock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// A chat's memory as the summarizer sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub user_confirmed: Map<String, Value>,
    pub llm_inferred: Map<String, Value>,
    pub general_summary: String,
}

/// One accepted snippet, in enqueue order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snippet {
    pub id: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub key: String,
    pub value: Value,
}

/// What a summarizer proposes. Operations are applied in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryUpdate {
    /// Facts the user stated or confirmed.
    pub confirm: Vec<Fact>,
    /// The model's assumptions.
    pub infer: Vec<Fact>,
    /// Inferred facts to drop (confirmed facts cannot be dropped this way).
    pub drop_inferred: Vec<String>,
    /// The new general summary; `None` keeps the current one.
    pub general_summary: Option<String>,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SummarizerError {
    /// Worth retrying with backoff (network trouble, overload, a bad answer).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (bad credentials, unknown model): mark the snippets failed now.
    #[error("{0}")]
    Permanent(String),
    #[error("unknown summarizer \"{0}\" (memory_ext.summarizer accepts: mock)")]
    Unknown(String),
}

impl SummarizerError {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SummarizerError::Transient(_))
    }
}

pub trait Summarizer: Send + Sync {
    fn name(&self) -> &'static str;
    fn summarize(
        &self,
        memory: &Memory,
        snippets: &[Snippet],
    ) -> Result<SummaryUpdate, SummarizerError>;
}

/// The implementation named by `memory_ext.summarizer`.
pub fn by_name(name: &str) -> Result<Box<dyn Summarizer>, SummarizerError> {
    match name.trim().to_ascii_lowercase().as_str() {
        "mock" => Ok(Box::new(mock::Mock)),
        other => Err(SummarizerError::Unknown(other.to_string())),
    }
}
