//! The Anthropic Messages API (`POST {endpoint}/v1/messages`). Structured output through a
//! forced tool call whose `input_schema` is the contract's schema.

use super::contract;
use super::llm::{Answer, Content, MissingPart, Provider, Role, Turn, usage_tokens};
use crate::model::LlmConfig;
use serde_json::{Value, json};

pub struct Anthropic;

pub const API_VERSION: &str = "2023-06-01";

/// The Messages API requires a limit; used when memory_ext.llm_max_output_tokens is 0.
const DEFAULT_MAX_TOKENS: u32 = 4096;

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn url(&self, endpoint: &str) -> String {
        // Accept the base URL with or without the version segment.
        match endpoint.strip_suffix("/v1") {
            Some(base) => format!("{base}/v1/messages"),
            None => format!("{endpoint}/v1/messages"),
        }
    }

    fn headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![("anthropic-version", API_VERSION.to_string())];
        if !api_key.is_empty() {
            h.push(("x-api-key", api_key.to_string()));
        }
        h
    }

    fn request(&self, config: &LlmConfig, turns: &[Turn]) -> Value {
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| {
                json!({
                    "role": if t.role == Role::User { "user" } else { "assistant" },
                    "content": t.text,
                })
            })
            .collect();
        let max_tokens = if config.max_output_tokens > 0 {
            config.max_output_tokens
        } else {
            DEFAULT_MAX_TOKENS
        };
        json!({
            "model": config.model,
            "max_tokens": max_tokens,
            // The stable part (tool schema, then the system prompt: rules, declared keys,
            // instructions) is marked for Anthropic's prompt cache: every request of this
            // deployment repeats it, so later ones read it at a fraction of the price.
            "system": [{
                "type": "text",
                "text": contract::system_prompt(&config.instructions, &config.fact_keys),
                "cache_control": {"type": "ephemeral"},
            }],
            "messages": messages,
            "tools": [{
                "name": contract::TOOL_NAME,
                "description": "Record the memory update for the new snippets.",
                "input_schema": contract::schema(&config.fact_keys),
            }],
            "tool_choice": {"type": "tool", "name": contract::TOOL_NAME},
        })
    }

    fn answer(&self, response: &Value) -> Result<Answer, MissingPart> {
        let blocks = response
            .get("content")
            .and_then(Value::as_array)
            .ok_or(MissingPart("no content in the answer"))?;
        let tool_input = blocks.iter().find_map(|b| {
            (b.get("type").and_then(Value::as_str) == Some("tool_use")
                && b.get("name").and_then(Value::as_str) == Some(contract::TOOL_NAME))
            .then(|| b.get("input").cloned())
            .flatten()
        });
        let content = match tool_input {
            Some(input) => Content::Json(input),
            // A model (or proxy) that ignored the tool: read its text like any other.
            None => Content::Text(
                blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|b| b.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        };
        let usage = |name: &str| usage_tokens(response, name);
        Ok(Answer {
            content,
            prompt_tokens: usage("/input_tokens")
                + usage("/cache_read_input_tokens")
                + usage("/cache_creation_input_tokens"),
            cached_prompt_tokens: usage("/cache_read_input_tokens"),
            cache_write_tokens: usage("/cache_creation_input_tokens"),
            completion_tokens: usage("/output_tokens"),
            truncated: response.get("stop_reason").and_then(Value::as_str) == Some("max_tokens"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StructuredOutput;
    use std::time::Duration;

    #[test]
    fn url_and_limits() {
        assert_eq!(
            Anthropic.url("https://api.anthropic.com"),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            Anthropic.url("https://api.anthropic.com/v1"),
            "https://api.anthropic.com/v1/messages"
        );
        let config = LlmConfig {
            summarizer: "anthropic".into(),
            endpoint: String::new(),
            model: "m".into(),
            api_key: String::new(),
            timeout: Duration::from_secs(1),
            max_output_tokens: 0,
            structured_output: StructuredOutput::None,
            mock_directives: false,
            instructions: String::new(),
            fact_keys: crate::model::FactKeys::none(),
        };
        let body = Anthropic.request(&config, &[]);
        assert_eq!(
            body["max_tokens"], DEFAULT_MAX_TOKENS,
            "the API requires a limit"
        );
        assert_eq!(
            Anthropic.headers("").len(),
            1,
            "no key, no x-api-key header"
        );
    }
}
