//! The OpenAI-compatible chat completions format (`POST {endpoint}/chat/completions`), served
//! by OpenAI, vLLM, Ollama, llama.cpp server and LiteLLM. Structured output through
//! `response_format` (`json_schema`, strict), or `json_object`, or the prompt alone.

use super::contract;
use super::llm::{Answer, Content, MissingPart, Provider, Role, Turn, usage_tokens};
use crate::model::LlmConfig;
use crate::model::StructuredOutput;
use serde_json::{Value, json};

pub struct OpenAi;

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn url(&self, endpoint: &str) -> String {
        format!("{endpoint}/chat/completions")
    }

    fn headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        // Local servers (Ollama, llama.cpp) need no key; send none rather than an empty one.
        if api_key.is_empty() {
            Vec::new()
        } else {
            vec![("authorization", format!("Bearer {api_key}"))]
        }
    }

    fn request(&self, config: &LlmConfig, turns: &[Turn]) -> Value {
        let mut messages = vec![
            json!({"role": "system", "content": contract::system_prompt(&config.instructions, &config.fact_keys)}),
        ];
        messages.extend(turns.iter().map(|t| {
            json!({
                "role": if t.role == Role::User { "user" } else { "assistant" },
                "content": t.text,
            })
        }));
        let mut body = json!({"model": config.model, "messages": messages});
        match config.structured_output {
            StructuredOutput::JsonSchema => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {
                        "name": contract::TOOL_NAME,
                        "strict": true,
                        "schema": contract::schema(&config.fact_keys),
                    }
                });
            }
            StructuredOutput::JsonObject => {
                body["response_format"] = json!({"type": "json_object"});
            }
            StructuredOutput::None => {}
        }
        if config.max_output_tokens > 0 {
            body["max_tokens"] = json!(config.max_output_tokens);
        }
        body
    }

    fn answer(&self, response: &Value) -> Result<Answer, MissingPart> {
        let choice = response
            .pointer("/choices/0")
            .ok_or(MissingPart("no choices in the answer"))?;
        let message = choice
            .get("message")
            .ok_or(MissingPart("no message in the first choice"))?;
        let text = match message.get("content") {
            Some(Value::String(s)) => s.clone(),
            // some servers send content parts
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => match message.get("refusal").and_then(Value::as_str) {
                Some(r) => format!("(refused: {r})"),
                None => String::new(),
            },
        };
        let usage = |name: &str| usage_tokens(response, name);
        Ok(Answer {
            content: Content::Text(text),
            prompt_tokens: usage("/prompt_tokens"),
            // OpenAI caches a long enough stable prefix by itself; it reports the hits here
            cached_prompt_tokens: usage("/prompt_tokens_details/cached_tokens"),
            cache_write_tokens: 0,
            completion_tokens: usage("/completion_tokens"),
            truncated: choice.get("finish_reason").and_then(Value::as_str) == Some("length"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(structured_output: StructuredOutput, max_output_tokens: u32) -> LlmConfig {
        LlmConfig {
            summarizer: "openai".into(),
            endpoint: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key: String::new(),
            timeout: Duration::from_secs(1),
            max_output_tokens,
            structured_output,
            mock_directives: false,
            instructions: String::new(),
            fact_keys: crate::model::FactKeys::none(),
        }
    }

    #[test]
    fn request_options() {
        let turns = [Turn {
            role: Role::User,
            text: "hi".into(),
        }];
        // (structured output, max tokens, response_format type, max_tokens)
        let cases = [
            (
                StructuredOutput::JsonSchema,
                100,
                Some("json_schema"),
                Some(100),
            ),
            (
                StructuredOutput::JsonObject,
                100,
                Some("json_object"),
                Some(100),
            ),
            (StructuredOutput::None, 0, None, None),
        ];
        for (mode, max, format, max_tokens) in cases {
            let body = OpenAi.request(&config(mode, max), &turns);
            assert_eq!(body["response_format"]["type"].as_str(), format, "{mode:?}");
            assert_eq!(body["max_tokens"].as_u64(), max_tokens, "{mode:?}");
            assert_eq!(body["messages"][0]["role"], "system");
            assert_eq!(body["messages"][1]["content"], "hi");
        }
        assert!(
            OpenAi.headers("").is_empty(),
            "no key, no Authorization header"
        );
    }
}
