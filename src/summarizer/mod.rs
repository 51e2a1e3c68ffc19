//! The summarizer interface. A summarizer turns the current memory plus the new snippets of one
//! chat into a [`SummaryUpdate`]: operations, not a rewritten record. The extension validates the
//! update and applies it with its own merge rules (`crate::merge`), so no summarizer can erase or
//! corrupt memory by omission.
//!
//! Implementations must be `Send + Sync` and work on owned data only: HTTP summarizers may run
//! off the main thread, where nothing may touch Postgres.

pub mod anthropic;
pub mod contract;
pub mod http;
pub mod llm;
pub mod mock;
pub mod openai;

use crate::merge::Validated;
use crate::model::{LlmConfig, Memory, Snippet, Usage};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SummarizerError {
    /// Worth retrying with backoff (network trouble, overload, a bad answer).
    #[error("{0}")]
    Transient(String),
    /// The endpoint asked us to slow down; retry no sooner than `retry_after` when it said.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request did not fit the model's context window: split the batch, do not retry it.
    #[error("{0}")]
    ContextLength(String),
    /// The summarizer refuses this input (not the service as a whole): split the batch so the
    /// snippet at fault is dead-lettered alone and the others go on.
    #[error("{0}")]
    Refused(String),
    /// Retrying cannot help (bad credentials, unknown model): mark the snippets failed now.
    #[error("{0}")]
    Permanent(String),
    /// A misconfiguration (unknown summarizer, missing endpoint): retried, so fixing the
    /// setting and reloading resumes the work.
    #[error("{0}")]
    Config(String),
}

impl SummarizerError {
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SummarizerError::Permanent(_)
                | SummarizerError::ContextLength(_)
                | SummarizerError::Refused(_)
        )
    }

    /// Does the error concern the snippets sent (so a smaller batch may succeed), rather than
    /// the service?
    pub fn is_about_input(&self) -> bool {
        matches!(
            self,
            SummarizerError::ContextLength(_) | SummarizerError::Refused(_)
        )
    }

    /// The class of the error, all an end user is shown (`memory._public_error` words it); the
    /// full text, which may quote the provider, is for admins.
    pub fn kind(&self) -> &'static str {
        match self {
            SummarizerError::Transient(_) => "transient",
            SummarizerError::RateLimited { .. } => "rate_limited",
            SummarizerError::ContextLength(_) => "too_long",
            SummarizerError::Refused(_) => "refused",
            SummarizerError::Permanent(_) => "permanent",
            SummarizerError::Config(_) => "config",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SummarizerError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

pub trait Summarizer: Send + Sync {
    /// Recorded with every applied batch, e.g. `mock` or `openai:gpt-4o-mini`.
    fn label(&self) -> String;

    /// Does a call leave the process (and so belong on a helper thread)? The mock answers in
    /// microseconds and is run inline.
    fn is_remote(&self) -> bool {
        false
    }

    /// Propose an update. `usage` accumulates what the calls cost, also when they fail.
    fn summarize(
        &self,
        memory: &Memory,
        snippets: &[Snippet],
        usage: &mut Usage,
    ) -> Result<Validated, SummarizerError>;
}

/// The implementation named by `memory_ext.summarizer`, configured from a settings snapshot.
pub fn from_config(config: &LlmConfig) -> Result<Arc<dyn Summarizer>, SummarizerError> {
    match config.summarizer.trim().to_ascii_lowercase().as_str() {
        "mock" => Ok(Arc::new(mock::Mock {
            directives: config.mock_directives,
        })),
        "openai" => Ok(Arc::new(llm::Llm::new(openai::OpenAi, config.clone())?)),
        "anthropic" => Ok(Arc::new(llm::Llm::new(
            anthropic::Anthropic,
            config.clone(),
        )?)),
        other => Err(SummarizerError::Config(format!(
            "unknown summarizer \"{other}\" (memory_ext.summarizer accepts: mock, openai, anthropic)"
        ))),
    }
}
