//! The deterministic mock summarizer (the default). Its contract, which tests and clients rely
//! on, is documented in the README:
//!
//! - `confirmed: <key> = <value>` confirms a fact, `inferred: <key> = <value>` infers one
//!   (key and value trimmed; the value is stored as a JSON string);
//! - `retract: <key>` drops an inferred fact;
//! - only when `memory_ext.mock_directives` is on (a superuser-only test setting; otherwise they
//!   are plain text, so no caller can make the worker fail, panic or sleep):
//!   `mock_error: <message>` fails the attempt (transient, retried), `mock_fatal: <message>`
//!   refuses the snippet (it is dead-lettered alone; the chat's other snippets go on),
//!   `mock_panic: <message>` panics, `mock_sleep_ms: <n>` sleeps (at most
//!   [`MAX_SLEEP_MS`] in all per summarization): hooks to exercise the worker's failure handling;
//! - every other non-blank line feeds a rolling `general_summary`, lines joined with " | ",
//!   keeping the last [`SUMMARY_MAX_CHARS`] characters.
//!
//! Lines take effect one at a time (the summary is cut after each line), so summarizing
//! snippets one by one or all together gives the same memory.

use super::{Summarizer, SummarizerError};
use crate::merge::Validated;
use crate::model::{Fact, Memory, Op, Snippet, SummaryUpdate, Usage};
use serde_json::Value;

pub const SUMMARY_MAX_CHARS: usize = 2000;
/// Total sleep of one summarization: the mock runs on the worker's main thread.
pub const MAX_SLEEP_MS: u64 = 5_000;

pub struct Mock {
    /// Honour the test directives (`memory_ext.mock_directives`).
    pub directives: bool,
}

fn directive<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (head, rest) = line.split_once(':')?;
    head.trim().eq_ignore_ascii_case(name).then(|| rest.trim())
}

fn key_value(rest: &str) -> Option<(String, String)> {
    let (k, v) = rest.split_once('=')?;
    let k = k.trim();
    (!k.is_empty()).then(|| (k.to_string(), v.trim().to_string()))
}

/// Keep the last `max` characters, starting at a word boundary when one is near.
fn tail(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        return s.to_string();
    }
    let cut: String = s.chars().skip(count - max).collect();
    match cut.find(' ') {
        Some(i) if i < 40 => cut[i + 1..].to_string(),
        _ => cut,
    }
}

/// The summary after one more line: appended, then cut to the last [`SUMMARY_MAX_CHARS`].
fn fold_line(summary: &str, line: &str) -> String {
    if summary.is_empty() {
        tail(line, SUMMARY_MAX_CHARS)
    } else {
        tail(&format!("{summary} | {line}"), SUMMARY_MAX_CHARS)
    }
}

impl Summarizer for Mock {
    fn label(&self) -> String {
        "mock".to_string()
    }

    fn summarize(
        &self,
        memory: &Memory,
        snippets: &[Snippet],
        _usage: &mut Usage,
    ) -> Result<Validated, SummarizerError> {
        let mut update = SummaryUpdate::default();
        let mut summary: Option<String> = None;
        let mut slept_ms = 0;
        for snippet in snippets {
            for line in snippet
                .text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                if let Some(rest) = directive(line, "confirmed") {
                    if let Some((key, value)) = key_value(rest) {
                        update.ops.push(Op::Confirm(Fact {
                            key,
                            value: Value::String(value),
                        }));
                        continue;
                    }
                } else if let Some(rest) = directive(line, "inferred") {
                    if let Some((key, value)) = key_value(rest) {
                        update.ops.push(Op::Infer(Fact {
                            key,
                            value: Value::String(value),
                        }));
                        continue;
                    }
                } else if let Some(key) = directive(line, "retract") {
                    if !key.is_empty() {
                        update.ops.push(Op::DropInferred(key.to_string()));
                        continue;
                    }
                } else if !self.directives {
                    // test directives are plain text
                } else if let Some(msg) = directive(line, "mock_error") {
                    return Err(SummarizerError::Transient(format!("mock error: {msg}")));
                } else if let Some(msg) = directive(line, "mock_fatal") {
                    return Err(SummarizerError::Refused(format!("mock fatal error: {msg}")));
                } else if let Some(msg) = directive(line, "mock_panic") {
                    panic!("mock panic: {msg}");
                } else if let Some(Ok(ms)) = directive(line, "mock_sleep_ms").map(str::parse::<u64>)
                {
                    let ms = ms.min(MAX_SLEEP_MS - slept_ms);
                    slept_ms += ms;
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    continue;
                }
                let current = summary.as_deref().unwrap_or(&memory.general_summary);
                summary = Some(fold_line(current, line));
            }
        }
        update.general_summary = summary;
        crate::merge::validate(update)
            .map_err(|e| SummarizerError::Transient(format!("invalid summarizer output: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(memory: &Memory, texts: &[&str]) -> Result<Validated, SummarizerError> {
        let snippets: Vec<Snippet> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Snippet {
                id: i.to_string(),
                text: t.to_string(),
            })
            .collect();
        Mock { directives: true }.summarize(memory, &snippets, &mut Usage::default())
    }

    #[test]
    fn directives_and_text() {
        let cases: &[(&str, usize, usize, usize, Option<&str>)] = &[
            ("confirmed: plan = PPO", 1, 0, 0, None),
            ("  Inferred :  budget =  low  ", 0, 1, 0, None),
            ("retract: budget", 0, 0, 1, None),
            ("hello there", 0, 0, 0, Some("hello there")),
            // malformed directives are plain text
            (
                "confirmed: no equals sign",
                0,
                0,
                0,
                Some("confirmed: no equals sign"),
            ),
            ("confirmed:  = value", 0, 0, 0, Some("confirmed:  = value")),
            ("retract:", 0, 0, 0, Some("retract:")),
            ("   \n\n  ", 0, 0, 0, None),
        ];
        for (text, c, i, d, summary) in cases {
            let u = run(&Memory::default(), &[text]).unwrap();
            let count = |f: fn(&Op) -> bool| u.ops.iter().filter(|o| f(o)).count();
            assert_eq!(
                (
                    count(|o| matches!(o, Op::Confirm(_))),
                    count(|o| matches!(o, Op::Infer(_))),
                    count(|o| matches!(o, Op::DropInferred(_)))
                ),
                (*c, *i, *d),
                "{text}"
            );
            assert_eq!(u.general_summary.as_deref(), *summary, "{text}");
        }
        let u = run(&Memory::default(), &["  Inferred :  budget =  low  "]).unwrap();
        assert_eq!(
            u.ops[0],
            Op::Infer(Fact {
                key: "budget".into(),
                value: Value::String("low".into())
            })
        );
    }

    #[test]
    fn summary_rolls_in_order_and_is_bounded() {
        let m = Memory {
            general_summary: "start".into(),
            ..Default::default()
        };
        let u = run(&m, &["one", "two\nthree"]).unwrap();
        assert_eq!(
            u.general_summary.as_deref(),
            Some("start | one | two | three")
        );
        let long = "word ".repeat(2000);
        let u = run(&m, &[&long, "last line"]).unwrap();
        let s = u.general_summary.clone().unwrap();
        assert!(s.chars().count() <= SUMMARY_MAX_CHARS);
        assert!(s.ends_with("last line"));
    }

    #[test]
    fn mock_error_fails_transiently() {
        let e = run(&Memory::default(), &["ok", "mock_error: boom"]).unwrap_err();
        assert_eq!(e, SummarizerError::Transient("mock error: boom".into()));
        assert!(!e.is_permanent());
    }

    #[test]
    fn mock_fatal_refuses_the_input() {
        let e = run(&Memory::default(), &["ok", "mock_fatal: no"]).unwrap_err();
        assert_eq!(e, SummarizerError::Refused("mock fatal error: no".into()));
        assert!(e.is_about_input() && e.is_permanent());
    }

    /// Summarizing snippets one at a time (each on the memory the previous one produced) or all
    /// together gives the same memory, also when the summary is cut.
    #[test]
    fn batching_never_changes_the_result() {
        let long = "word ".repeat(390);
        let texts = [
            "inferred: k = a",
            "retract: k",
            "inferred: k = b\nconfirmed: z = 1",
            long.as_str(),
            "inferred: z = 2\nsome text",
            long.as_str(),
            "confirmed: k = c\nmore text",
        ];
        let fold = |memory: &mut Memory, texts: &[&str]| {
            let u = run(memory, texts).unwrap();
            crate::merge::apply(memory, u, usize::MAX, &crate::model::FactKeys::none());
        };
        let mut together = Memory::default();
        fold(&mut together, &texts);
        for size in 1..texts.len() {
            let mut chunked = Memory::default();
            for chunk in texts.chunks(size) {
                fold(&mut chunked, chunk);
            }
            assert_eq!(chunked, together, "chunks of {size}");
        }
        assert!(together.general_summary.chars().count() <= SUMMARY_MAX_CHARS);
        assert!(together.general_summary.ends_with("more text"));
        assert_eq!(together.user_confirmed["k"], "c");
        assert!(together.llm_inferred.is_empty());
    }

    /// Without memory_ext.mock_directives, test directives are plain text: no caller can make
    /// the worker fail, panic or sleep.
    #[test]
    fn directives_are_plain_text_unless_enabled() {
        let snippets = [Snippet {
            id: "0".into(),
            text: "mock_panic: x\nmock_fatal: y\nmock_error: z\nmock_sleep_ms: 60000".into(),
        }];
        let started = std::time::Instant::now();
        let u = Mock { directives: false }
            .summarize(&Memory::default(), &snippets, &mut Usage::default())
            .unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            u.general_summary.as_deref(),
            Some("mock_panic: x | mock_fatal: y | mock_error: z | mock_sleep_ms: 60000")
        );
    }

    #[test]
    fn sleeping_is_capped_per_summarization() {
        let started = std::time::Instant::now();
        let lines = "mock_sleep_ms: 2000\n".repeat(3) + "mock_sleep_ms: 60000";
        let many: Vec<&str> = vec![&lines];
        let _ = run(&Memory::default(), &many);
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(MAX_SLEEP_MS));
        assert!(
            took < std::time::Duration::from_millis(MAX_SLEEP_MS + 2000),
            "{took:?}"
        );
    }
}
