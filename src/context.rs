//! The memory as prompt text (`memory.context()`): plain sections an agent pastes into its prompt,
//! fitted to a token budget. Pure: the token counter is passed in.
//!
//! When the budget is short, what goes first: inferred facts (the last key first), then the
//! summary from its oldest part, then the guidance, and confirmed facts last (the last key
//! first). A section left empty loses its heading; a shortened summary starts with "…".

use crate::model::Memory;
use serde_json::Value;

pub const CONFIRMED: &str = "## Confirmed by the user";
pub const INFERRED: &str = "## Inferred (assumptions that may be wrong)";
pub const SUMMARY: &str = "## Conversation summary";
pub const GUIDANCE: &str = "## Guidance";

/// What `context()` returns besides the memory's own columns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub tokens: usize,
    pub truncated: bool,
}

/// The memory in its parts, in the order they are dropped to fit a budget.
struct Parts {
    confirmed: Vec<String>,
    inferred: Vec<String>,
    summary: Vec<String>,
    /// How the summary's parts join again.
    joiner: &'static str,
    guidance: Option<String>,
}

fn fact_line(key: &str, value: &Value) -> String {
    match value {
        Value::String(s) => format!("- {key}: {s}"),
        other => format!("- {key}: {other}"),
    }
}

fn fact_lines(facts: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<&String> = facts.keys().collect();
    keys.sort();
    keys.into_iter().map(|k| fact_line(k, &facts[k])).collect()
}

/// The summary in the parts it can lose from the front: the mock's " | " segments, else
/// sentences, else words.
fn summary_parts(summary: &str) -> (Vec<String>, &'static str) {
    let summary = summary.trim();
    if summary.is_empty() {
        return (Vec::new(), " ");
    }
    if summary.contains(" | ") {
        return (summary.split(" | ").map(String::from).collect(), " | ");
    }
    let sentences: Vec<String> = summary
        .split_inclusive(". ")
        .map(|s| s.trim_end().to_string())
        .collect();
    if sentences.len() > 1 {
        return (sentences, " ");
    }
    (summary.split_whitespace().map(String::from).collect(), " ")
}

impl Parts {
    fn new(memory: &Memory, guidance: Option<&str>) -> Parts {
        let (summary, joiner) = summary_parts(&memory.general_summary);
        Parts {
            confirmed: fact_lines(&memory.user_confirmed),
            inferred: fact_lines(&memory.llm_inferred),
            summary,
            joiner,
            guidance: guidance
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from),
        }
    }

    fn len(&self) -> usize {
        self.inferred.len() + self.summary.len() + self.guidance.iter().len() + self.confirmed.len()
    }

    /// The text with the first `drop` parts (in dropping order) left out.
    fn render(&self, mut drop: usize) -> String {
        let mut take = |n: usize| {
            let gone = drop.min(n);
            drop -= gone;
            n - gone
        };
        let inferred = take(self.inferred.len());
        let summary = take(self.summary.len());
        let guidance = take(self.guidance.iter().len());
        let confirmed = take(self.confirmed.len());
        let mut sections = Vec::new();
        if confirmed > 0 {
            sections.push(format!(
                "{CONFIRMED}\n{}",
                self.confirmed[..confirmed].join("\n")
            ));
        }
        if inferred > 0 {
            sections.push(format!(
                "{INFERRED}\n{}",
                self.inferred[..inferred].join("\n")
            ));
        }
        if summary > 0 {
            let kept = &self.summary[self.summary.len() - summary..];
            let cut = if summary < self.summary.len() {
                "… "
            } else {
                ""
            };
            sections.push(format!("{SUMMARY}\n{cut}{}", kept.join(self.joiner)));
        }
        if guidance > 0 {
            sections.push(format!(
                "{GUIDANCE}\n{}",
                self.guidance.as_deref().unwrap_or("")
            ));
        }
        sections.join("\n\n")
    }
}

/// Render the memory, within `max_tokens` when given (counted with `count`).
pub fn render(
    memory: &Memory,
    guidance: Option<&str>,
    max_tokens: Option<usize>,
    count: impl Fn(&str) -> usize,
) -> Rendered {
    let parts = Parts::new(memory, guidance);
    let full = parts.render(0);
    let tokens = count(&full);
    let Some(budget) = max_tokens.filter(|&b| tokens > b) else {
        return Rendered {
            text: full,
            tokens,
            truncated: false,
        };
    };
    // The fewest parts to drop: binary search (fewer parts, fewer tokens), then make sure.
    let fits = |drop: usize| count(&parts.render(drop)) <= budget;
    let (mut lo, mut hi) = (1, parts.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(mid) { hi = mid } else { lo = mid + 1 }
    }
    while lo < parts.len() && !fits(lo) {
        lo += 1;
    }
    let text = parts.render(lo);
    Rendered {
        tokens: count(&text),
        text,
        truncated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::count;
    use serde_json::json;

    fn memory() -> Memory {
        Memory {
            user_confirmed: json!({"plan": "PPO", "city": "Lyon", "age": 41})
                .as_object()
                .unwrap()
                .clone(),
            llm_inferred: json!({"budget": "tight", "family": "two kids"})
                .as_object()
                .unwrap()
                .clone(),
            general_summary: "Compares plans. | Asked about premiums. | Wants a low deductible."
                .into(),
        }
    }

    #[test]
    fn sections_in_a_stable_order() {
        let r = render(&memory(), None, None, count);
        assert_eq!(
            r.text,
            "## Confirmed by the user\n- age: 41\n- city: Lyon\n- plan: PPO\n\n\
             ## Inferred (assumptions that may be wrong)\n- budget: tight\n- family: two kids\n\n\
             ## Conversation summary\nCompares plans. | Asked about premiums. | Wants a low deductible."
        );
        assert_eq!(r.tokens, count(&r.text));
        assert!(!r.truncated);
    }

    #[test]
    fn an_empty_memory_is_an_empty_text() {
        let r = render(&Memory::default(), None, Some(10), count);
        assert_eq!(
            r,
            Rendered {
                text: String::new(),
                tokens: 0,
                truncated: false
            }
        );
    }

    #[test]
    fn guidance_has_its_section() {
        let r = render(&memory(), Some("Start a new chat."), None, count);
        assert!(
            r.text.ends_with("\n\n## Guidance\nStart a new chat."),
            "{}",
            r.text
        );
    }

    #[test]
    fn a_budget_of_exactly_the_full_size_keeps_everything() {
        let full = render(&memory(), None, None, count);
        assert_eq!(render(&memory(), None, Some(full.tokens), count), full);
    }

    #[test]
    fn one_token_less_drops_the_last_inferred_fact_first() {
        let full = render(&memory(), None, None, count);
        let r = render(&memory(), None, Some(full.tokens - 1), count);
        assert!(r.truncated && r.tokens < full.tokens);
        assert!(!r.text.contains("family"), "{}", r.text);
        assert!(r.text.contains("- budget: tight") && r.text.contains("- plan: PPO"));
    }

    #[test]
    fn then_the_oldest_summary_then_confirmed_facts_last() {
        let full = render(&memory(), None, None, count);
        // every budget from the full size down to nothing: each result fits, and what it keeps
        // follows the order (no inferred fact while a summary part is gone, ...)
        for budget in (0..=full.tokens).rev() {
            let r = render(&memory(), None, Some(budget), count);
            assert!(r.tokens <= budget, "budget {budget}: {}", r.text);
            assert_eq!(r.tokens, count(&r.text));
            if r.text.contains("… ") {
                assert!(!r.text.contains(INFERRED), "budget {budget}: {}", r.text);
            }
            if !r.text.contains(SUMMARY) && r.text.contains(CONFIRMED) {
                assert!(!r.text.contains(INFERRED), "budget {budget}");
            }
            if r.text.contains("Compares plans.") {
                assert!(
                    r.text.contains("- age: 41"),
                    "budget {budget}: confirmed go last"
                );
            }
        }
    }

    #[test]
    fn a_budget_smaller_than_the_headings_returns_what_fits() {
        let r = render(&memory(), None, Some(3), count);
        assert!(r.truncated && r.tokens <= 3, "{:?}", r);
        let r = render(&memory(), None, Some(0), count);
        assert_eq!((r.text.as_str(), r.tokens, r.truncated), ("", 0, true));
    }

    #[test]
    fn free_text_summaries_lose_their_first_sentences() {
        let mut m = memory();
        m.general_summary = "First point. Second point. Third point.".into();
        m.llm_inferred.clear();
        m.user_confirmed.clear();
        let full = render(&m, None, None, count);
        let r = render(&m, None, Some(full.tokens - 2), count);
        assert!(r.text.ends_with("Third point."), "{}", r.text);
        assert!(
            r.text.contains("… ") && !r.text.contains("First point."),
            "{}",
            r.text
        );
    }
}
