//! The LLM summarizer, generic over the wire format ([`Provider`]): one request with the current
//! memory and the new snippets, and, when the answer breaks the contract, one repair request
//! that quotes the validation error. If the repaired answer is no better, the attempt fails and
//! the memory stays as it was.

use super::contract::{self, InvalidAnswer};
use super::http::Client;
use super::{Summarizer, SummarizerError};
use crate::merge::Validated;
use crate::model::LlmConfig;
use crate::model::{Memory, Snippet, Usage};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// One message of the conversation sent to the model (the system prompt goes separately).
#[derive(Clone, Debug)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// What the model answered: structured (a tool call's input) or text that should hold JSON.
#[derive(Debug)]
pub enum Content {
    Json(Value),
    Text(String),
}

#[derive(Debug)]
pub struct Answer {
    pub content: Content,
    /// Every prompt token, cached or not.
    pub prompt_tokens: u64,
    /// Of those, read from the provider's prompt cache, and written to it.
    pub cached_prompt_tokens: u64,
    pub cache_write_tokens: u64,
    pub completion_tokens: u64,
    /// The model stopped at the output token limit.
    pub truncated: bool,
}

impl Answer {
    fn parse(&self, snippets: &[Snippet]) -> Result<(Validated, u32), InvalidAnswer> {
        match &self.content {
            Content::Json(v) => contract::to_update(v, snippets),
            Content::Text(t) => contract::parse_text(t, snippets),
        }
    }

    fn as_text(&self) -> String {
        match &self.content {
            Content::Json(v) => v.to_string(),
            Content::Text(t) => t.clone(),
        }
    }
}

/// A 2xx answer without the part its wire format puts the model's answer in.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MissingPart(pub &'static str);

/// A token count from the response's `usage` object (0 when the provider sent none).
/// A token count in the answer's `usage` object, by JSON pointer below it (`/prompt_tokens`).
pub fn usage_tokens(response: &Value, pointer: &str) -> u64 {
    response
        .get("usage")
        .and_then(|u| u.pointer(pointer))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A wire format: OpenAI-compatible chat completions or Anthropic messages.
pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn url(&self, endpoint: &str) -> String;
    fn headers(&self, api_key: &str) -> Vec<(&'static str, String)>;
    fn request(&self, config: &LlmConfig, turns: &[Turn]) -> Value;
    /// Read a 2xx response; an Err is a response of the wrong shape.
    fn answer(&self, response: &Value) -> Result<Answer, MissingPart>;
}

pub struct Llm<P> {
    provider: P,
    config: LlmConfig,
    client: Client,
}

impl<P: Provider> Llm<P> {
    pub fn new(provider: P, config: LlmConfig) -> Result<Self, SummarizerError> {
        if config.endpoint.is_empty() {
            return Err(SummarizerError::Config(format!(
                "memory_ext.summarizer is {} but memory_ext.llm_endpoint is not set",
                provider.name()
            )));
        }
        if config.model.is_empty() {
            return Err(SummarizerError::Config(format!(
                "memory_ext.summarizer is {} but memory_ext.llm_model is not set",
                provider.name()
            )));
        }
        let client = Client::new(config.timeout);
        Ok(Self {
            provider,
            config,
            client,
        })
    }

    fn call(&self, turns: &[Turn], usage: &mut Usage) -> Result<Answer, SummarizerError> {
        let key = self.config.api_key.as_str();
        let url = self.provider.url(&self.config.endpoint);
        let body = self.provider.request(&self.config, turns);
        usage.requests += 1;
        let response = self
            .client
            .post_json(&url, &self.provider.headers(key), &body)
            .map_err(|e| e.into_summarizer_error(key))?;
        let answer = self.provider.answer(&response).map_err(|e| {
            SummarizerError::Transient(super::http::scrub(
                &format!("unexpected answer from the LLM endpoint: {e}"),
                key,
            ))
        })?;
        usage.prompt_tokens += answer.prompt_tokens;
        usage.cached_prompt_tokens += answer.cached_prompt_tokens;
        usage.cache_write_tokens += answer.cache_write_tokens;
        usage.completion_tokens += answer.completion_tokens;
        Ok(answer)
    }
}

impl<P: Provider> Summarizer for Llm<P> {
    fn label(&self) -> String {
        format!("{}:{}", self.provider.name(), self.config.model)
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn summarize(
        &self,
        memory: &Memory,
        snippets: &[Snippet],
        usage: &mut Usage,
    ) -> Result<Validated, SummarizerError> {
        let mut turns = vec![Turn {
            role: Role::User,
            text: contract::user_message(memory, snippets),
        }];
        let answer = self.call(&turns, usage)?;
        let first_error = match answer.parse(snippets) {
            Ok((update, rejected)) => {
                usage.rejected_ops += rejected;
                return Ok(update);
            }
            Err(e) => e,
        };
        turns.push(Turn {
            role: Role::Assistant,
            text: answer.as_text(),
        });
        turns.push(Turn {
            role: Role::User,
            text: contract::repair_message(&first_error),
        });
        let repaired = self.call(&turns, usage)?;
        match repaired.parse(snippets) {
            Ok((update, rejected)) => {
                usage.rejected_ops += rejected;
                Ok(update)
            }
            Err(e) => {
                let cut = if repaired.truncated {
                    " (the answer was cut off at memory_ext.llm_max_output_tokens)"
                } else {
                    ""
                };
                Err(SummarizerError::Transient(format!(
                    "invalid answer from the model, also after a repair request: {e}{cut} \
                     (first answer: {first_error})"
                )))
            }
        }
    }
}
