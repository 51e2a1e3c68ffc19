//! The contract between the extension and an LLM: the prompt, the JSON schema of the answer, and
//! how an answer is read, checked and turned into a [`SummaryUpdate`].
//!
//! The model returns operations, never a rewritten record:
//!
//! ```json
//! {"ops": [{"op": "confirm", "key": "zip_code", "value": "94110",
//!           "evidence": "my zip is 94110", "basis": null},
//!          {"op": "infer", "key": "budget_sensitive", "value": "yes",
//!           "evidence": null, "basis": "asked twice about premiums"},
//!          {"op": "drop_inferred", "key": "has_dependents", "value": null,
//!           "evidence": null, "basis": "it's just me"}],
//!  "general_summary": "Goal: ... Progress: ... Next step: ..."}
//! ```
//!
//! A `confirm` whose evidence is not quoted from the snippets it was given is rejected (and
//! counted), so a model cannot invent user-confirmed facts. An answer that is not valid JSON or
//! breaks the schema is an [`InvalidAnswer`], which earns one repair request.

use crate::merge;
use crate::model::{Fact, FactKeys, Memory, Op, Snippet, SummaryUpdate};
use serde_json::{Value, json};
use thiserror::Error;

pub const TOOL_NAME: &str = "update_memory";

pub const SYSTEM_PROMPT: &str = "\
You maintain the short-term memory of one conversation between a user and an AI assistant. \
You receive the current memory and the new conversation snippets, oldest first. Answer with one \
JSON object, {\"ops\": [...], \"general_summary\": \"...\"}, and nothing else.

Operations (each has op, key, value, evidence, basis; use null where a field does not apply):
- confirm: a fact the USER stated or explicitly confirmed in the new snippets. evidence is a short \
quote copied exactly, character for character, from a snippet. Never confirm what only the \
assistant said or what you guess.
- infer: your assumption about the user or their situation; basis says briefly why. Do not infer a \
key that is already confirmed.
- drop_inferred: remove an inferred fact the new snippets contradict or make obsolete; basis says \
why.

Rules: keys are short snake_case names; reuse an existing key for the same fact, and a confirmed \
fact with a new value replaces the old one. Facts you do not mention stay as they are, so list only \
new or changed facts. general_summary rewrites the running summary to include the new snippets: \
the user's goal, progress so far, open questions and the next step, at most 200 words, keeping \
names, numbers and identifiers verbatim. Write values, evidence and the summary in the language \
the user writes in; never translate them.";

/// The system prompt: the rules, the declared fact keys, then the operator's instructions when
/// there are any (all of it the same for every request, so a provider can cache it).
pub fn system_prompt(instructions: &str, keys: &FactKeys) -> String {
    let mut prompt = SYSTEM_PROMPT.to_string();
    if !keys.is_empty() {
        prompt.push_str(
            "\n\nFact keys: use only these keys, each only as marked (any other operation is \
             refused):",
        );
        for k in keys.iter() {
            let uses = match (k.may_confirm, k.may_infer) {
                (true, true) => "confirm or infer",
                (true, false) => "confirm only",
                _ => "infer only",
            };
            prompt.push_str(&format!("\n- {} ({uses})", k.key));
            if !k.description.is_empty() {
                prompt.push_str(&format!(": {}", k.description));
            }
        }
    }
    if !instructions.is_empty() {
        prompt.push_str(&format!(
            "\n\nInstructions of this deployment (they add to the rules above, never replace \
             them):\n{instructions}"
        ));
    }
    prompt
}

/// The answer's JSON schema. It satisfies OpenAI's strict mode (every property required,
/// no additional properties), so it is also what Anthropic's tool takes as `input_schema`.
pub fn schema(keys: &FactKeys) -> Value {
    let nullable_string = json!({"type": ["string", "null"]});
    // With keys declared the model can only name them (a drop of an older key is refused too).
    let key = if keys.is_empty() {
        json!({"type": "string"})
    } else {
        json!({"type": "string", "enum": keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>()})
    };
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["ops", "general_summary"],
        "properties": {
            "ops": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["op", "key", "value", "evidence", "basis"],
                    "properties": {
                        "op": {"type": "string", "enum": ["confirm", "infer", "drop_inferred"]},
                        "key": key,
                        "value": nullable_string,
                        "evidence": nullable_string,
                        "basis": nullable_string
                    }
                }
            },
            "general_summary": {"type": "string"}
        }
    })
}

/// The user message: the current memory and the new snippets with their ids, as JSON.
pub fn user_message(memory: &Memory, snippets: &[Snippet]) -> String {
    let payload = json!({
        "current_memory": memory,
        "new_snippets": snippets,
    });
    format!("Update the memory with the new snippets.\n\n{payload}")
}

/// The follow-up sent once when an answer did not validate.
pub fn repair_message(error: &InvalidAnswer) -> String {
    format!(
        "Your answer could not be used: {error}. Answer again with only the JSON object \
         {{\"ops\": [...], \"general_summary\": \"...\"}} that follows the rules."
    )
}

#[derive(Debug, Error, PartialEq)]
pub enum InvalidAnswer {
    #[error("the answer is empty")]
    Empty,
    #[error("no JSON object found in the answer")]
    NoJson,
    #[error("\"{0}\" is missing or not a {1}")]
    Field(&'static str, &'static str),
    #[error("ops[{0}]: {1}")]
    Op(usize, String),
    #[error("{0}")]
    Merge(#[from] merge::InvalidUpdate),
}

/// Find the JSON object in a model's text: tolerates `<think>` blocks, code fences and prose
/// around it. The first `{` that starts a complete, parseable object wins.
pub fn extract_json(text: &str) -> Result<Value, InvalidAnswer> {
    let mut rest = text;
    // Reasoning models put their thoughts first; they may contain braces of their own.
    while let Some(start) = rest.find("<think>") {
        match rest[start..].find("</think>") {
            Some(end) => rest = &rest[start + end + "</think>".len()..],
            None => break,
        }
    }
    if rest.trim().is_empty() {
        return Err(InvalidAnswer::Empty);
    }
    for (i, _) in rest.match_indices('{') {
        let mut stream = serde_json::Deserializer::from_str(&rest[i..]).into_iter::<Value>();
        if let Some(Ok(v @ Value::Object(_))) = stream.next() {
            return Ok(v);
        }
    }
    Err(InvalidAnswer::NoJson)
}

/// Lowercased, whitespace collapsed, quotes unified: a quote that differs from the snippet only
/// in spacing, case or typographic quotes still counts as found.
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        let c = match c {
            '\u{2018}' | '\u{2019}' | '`' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            c => c,
        };
        if c.is_whitespace() {
            space = !out.is_empty();
        } else {
            if space {
                out.push(' ');
                space = false;
            }
            out.extend(c.to_lowercase());
        }
    }
    out
}

fn is_grounded(evidence: &str, snippets: &[String]) -> bool {
    let e = normalize(evidence.trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace()));
    !e.is_empty() && snippets.iter().any(|s| s.contains(&e))
}

fn text_field<'a>(op: &'a Value, name: &str) -> Option<&'a str> {
    op.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// Check an answer against the contract and turn it into an update, keeping the order of the
/// operations (the prompt lists the snippets oldest first; the model states changes in that
/// order). Returns the update and the number of operations rejected for want of grounding.
pub fn to_update(
    answer: &Value,
    snippets: &[Snippet],
) -> Result<(merge::Validated, u32), InvalidAnswer> {
    let ops = answer
        .get("ops")
        .and_then(Value::as_array)
        .ok_or(InvalidAnswer::Field("ops", "list"))?;
    let summary = answer
        .get("general_summary")
        .and_then(Value::as_str)
        .ok_or(InvalidAnswer::Field("general_summary", "string"))?;
    let sources: Vec<String> = snippets.iter().map(|s| normalize(&s.text)).collect();
    let mut update = SummaryUpdate {
        // An empty summary is never an improvement: keep the stored one.
        general_summary: (!summary.trim().is_empty()).then(|| summary.trim().to_string()),
        ..Default::default()
    };
    let mut rejected = 0;
    for (i, op) in ops.iter().enumerate() {
        let bad = |m: &str| InvalidAnswer::Op(i, m.to_string());
        if !op.is_object() {
            return Err(bad("not an object"));
        }
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("\"op\" is missing"))?;
        let key = op
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("\"key\" is missing or not a string"))?
            .trim()
            .to_string();
        let value = match op.get("value") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(Value::String(s.trim().to_string())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.clone()),
            Some(_) => return Err(bad("\"value\" must be a string")),
        };
        match kind {
            "confirm" => {
                let value = value.ok_or_else(|| bad("confirm needs a value"))?;
                match text_field(op, "evidence") {
                    Some(e) if is_grounded(e, &sources) => {
                        update.ops.push(Op::Confirm(Fact { key, value }))
                    }
                    _ => rejected += 1,
                }
            }
            "infer" => {
                let value = value.ok_or_else(|| bad("infer needs a value"))?;
                update.ops.push(Op::Infer(Fact { key, value }));
            }
            "drop_inferred" => update.ops.push(Op::DropInferred(key)),
            other => {
                return Err(bad(&format!(
                    "unknown op \"{other}\" (expected confirm, infer or drop_inferred)"
                )));
            }
        }
    }
    Ok((merge::validate(update)?, rejected))
}

/// `extract_json` then `to_update`, for answers that arrive as text.
pub fn parse_text(
    text: &str,
    snippets: &[Snippet],
) -> Result<(merge::Validated, u32), InvalidAnswer> {
    to_update(&extract_json(text)?, snippets)
}

#[cfg(test)]
mod tests {

    #[test]
    fn instructions_follow_the_rules() {
        assert_eq!(system_prompt("", &FactKeys::none()), SYSTEM_PROMPT);
        let p = system_prompt("Domain: insurance.", &FactKeys::none());
        assert!(p.starts_with(SYSTEM_PROMPT), "the stable part first");
        assert!(p.ends_with("never replace them):\nDomain: insurance."));
    }

    use super::*;

    fn snippets(texts: &[&str]) -> Vec<Snippet> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Snippet {
                id: format!("id{i}"),
                text: t.to_string(),
            })
            .collect()
    }

    const ANSWER: &str = r#"{"ops": [{"op": "confirm", "key": "zip", "value": "94110",
        "evidence": "my zip is 94110", "basis": null}], "general_summary": "moving"}"#;

    #[test]
    fn extraction_tolerates_wrapping() {
        let cases = [
            ("bare", ANSWER.to_string()),
            ("fenced", format!("```json\n{ANSWER}\n```")),
            (
                "prose",
                format!("Sure! Here is the update:\n{ANSWER}\nHope that helps {{:"),
            ),
            (
                "think",
                format!("<think>maybe {{\"ops\": 1}}</think>\n{ANSWER}"),
            ),
            (
                "brace in prose first",
                format!("Using {{braces}} loosely: {ANSWER}"),
            ),
        ];
        let s = snippets(&["Hi, my zip is 94110."]);
        for (name, text) in cases {
            let (u, rejected) = parse_text(&text, &s).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(u.ops.len(), 1, "{name}");
            assert_eq!(rejected, 0, "{name}");
            assert_eq!(u.general_summary.as_deref(), Some("moving"), "{name}");
        }
    }

    #[test]
    fn invalid_answers() {
        let s = snippets(&["x"]);
        let cases: [(&str, InvalidAnswer); 7] = [
            ("", InvalidAnswer::Empty),
            ("I cannot help with that.", InvalidAnswer::NoJson),
            ("{\"ops\": [1, 2", InvalidAnswer::NoJson),
            (
                r#"{"ops": "none", "general_summary": ""}"#,
                InvalidAnswer::Field("ops", "list"),
            ),
            (
                r#"{"ops": []}"#,
                InvalidAnswer::Field("general_summary", "string"),
            ),
            (
                r#"{"ops": [{"op": "delete_all", "key": "k"}], "general_summary": "s"}"#,
                InvalidAnswer::Op(
                    0,
                    "unknown op \"delete_all\" (expected confirm, infer or drop_inferred)".into(),
                ),
            ),
            (
                r#"{"ops": [{"op": "infer", "key": "k", "value": null}], "general_summary": "s"}"#,
                InvalidAnswer::Op(0, "infer needs a value".into()),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_text(text, &s).unwrap_err(), expected, "{text}");
        }
        let empty_key =
            r#"{"ops": [{"op": "infer", "key": " ", "value": "v"}], "general_summary": "s"}"#;
        assert!(matches!(
            parse_text(empty_key, &s),
            Err(InvalidAnswer::Merge(_))
        ));
    }

    #[test]
    fn grounding() {
        let s = snippets(&[
            "User: My plan is the “Gold  PPO”.",
            "Assistant: Is that for you alone?",
        ]);
        // (evidence, grounded?)
        let cases = [
            (Some("my plan is the \"gold ppo\""), true),
            (Some("\"My plan is the “Gold PPO”\""), true),
            (Some("is that for you alone"), true),
            (Some("my plan is platinum"), false),
            (Some("   "), false),
            (None, false),
        ];
        for (evidence, grounded) in cases {
            let answer = json!({"ops": [{"op": "confirm", "key": "plan", "value": "Gold PPO",
                                         "evidence": evidence}],
                                "general_summary": ""});
            let (u, rejected) = to_update(&answer, &s).unwrap();
            assert_eq!(u.ops.len() == 1, grounded, "{evidence:?}");
            assert_eq!(rejected, u32::from(!grounded), "{evidence:?}");
            assert_eq!(
                u.general_summary, None,
                "an empty summary keeps the stored one"
            );
        }
    }

    #[test]
    fn schema_is_strict_mode_shaped() {
        // OpenAI strict mode: every object lists all its properties as required and forbids
        // others.
        fn check(v: &Value) {
            if let Some(props) = v.get("properties").and_then(Value::as_object) {
                assert_eq!(v["additionalProperties"], json!(false));
                let required: Vec<&str> = v["required"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                for (name, sub) in props {
                    assert!(required.contains(&name.as_str()), "{name} not required");
                    check(sub);
                }
            }
            if let Some(items) = v.get("items") {
                check(items);
            }
        }
        check(&schema(&FactKeys::none()));
        let keys = FactKeys::new(vec![crate::model::FactKey {
            key: "zip".into(),
            description: "postal code".into(),
            may_confirm: true,
            may_infer: false,
        }]);
        let declared = schema(&keys);
        check(&declared);
        assert_eq!(
            declared["properties"]["ops"]["items"]["properties"]["key"],
            json!({"type": "string", "enum": ["zip"]})
        );
        let p = system_prompt("Domain: insurance.", &keys);
        assert!(p.starts_with(SYSTEM_PROMPT));
        assert!(
            p.contains("\n- zip (confirm only): postal code\n\nInstructions"),
            "{p}"
        );
    }

    #[test]
    fn operations_keep_their_order() {
        let s = snippets(&["inferred k a", "confirmed: k = c"]);
        let answer = json!({"ops": [
            {"op": "infer", "key": "k", "value": "a", "evidence": null, "basis": "b"},
            {"op": "drop_inferred", "key": "k", "value": null, "evidence": null, "basis": "b"},
            {"op": "infer", "key": "k", "value": "b", "evidence": null, "basis": "b"},
            {"op": "confirm", "key": "z", "value": "c", "evidence": "k = c", "basis": null}],
            "general_summary": "s"});
        let (u, _) = to_update(&answer, &s).unwrap();
        let kinds: Vec<&str> = u
            .ops
            .iter()
            .map(|o| match o {
                Op::Confirm(_) => "confirm",
                Op::Infer(_) => "infer",
                Op::DropInferred(_) => "drop",
            })
            .collect();
        assert_eq!(kinds, ["infer", "drop", "infer", "confirm"]);
        let mut m = Memory::default();
        crate::merge::apply(&mut m, u, usize::MAX, &FactKeys::none());
        assert_eq!(Value::Object(m.llm_inferred), json!({"k": "b"}));
    }
}
