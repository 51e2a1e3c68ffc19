//! One claimed chat through the summarizer: summarize, validate, merge, count tokens.
//! Pure Rust on owned data (no Postgres calls), so it may run on a helper thread and is
//! unit-testable.
//!
//! Snippets are summarized in order. A batch the summarizer refuses as input (too long for the
//! model's context, or refused outright) is split in halves, applied one after the other; a
//! single snippet it refuses is dead-lettered alone and the rest go on. Any other error stops
//! the batch there: what was merged before it is applied, the rest is retried later.

use crate::context;
use crate::merge;
use crate::model::{Bounds, Claim, Dead, Failure, Finished, Memory, Snippet, Usage};
use crate::summarizer::{Summarizer, SummarizerError};
use crate::tokens;
use std::panic::{AssertUnwindSafe, catch_unwind};

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "summarizer panicked".to_string()
    }
}

/// What summarizing a claim achieved so far.
#[derive(Default)]
struct Progress {
    memory: Memory,
    applied: Vec<String>,
    dead: Vec<Dead>,
    usage: Usage,
}

/// Merge `snippets` into `progress`, in order, splitting on input errors.
fn summarize_into(
    summarizer: &dyn Summarizer,
    progress: &mut Progress,
    snippets: &[Snippet],
    bounds: &Bounds,
) -> Result<(), SummarizerError> {
    match summarizer.summarize(&progress.memory, snippets, &mut progress.usage) {
        Ok(update) => {
            let stats = merge::apply(
                &mut progress.memory,
                update,
                bounds.max_facts,
                &bounds.fact_keys,
            );
            progress.usage.rejected_ops += stats.rejected() as u32;
            progress
                .applied
                .extend(snippets.iter().map(|s| s.id.clone()));
            Ok(())
        }
        Err(e) if e.is_about_input() && snippets.len() > 1 => {
            let (first, second) = snippets.split_at(snippets.len() / 2);
            summarize_into(summarizer, progress, first, bounds)?;
            summarize_into(summarizer, progress, second, bounds)
        }
        Err(e) if e.is_about_input() => {
            let error = match &e {
                SummarizerError::ContextLength(m) => format!(
                    "{m} (a single snippet with the current memory does not fit the model's \
                     context)"
                ),
                e => e.to_string(),
            };
            progress.dead.push(Dead {
                id: snippets[0].id.clone(),
                error,
                kind: e.kind(),
            });
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn failure(e: &SummarizerError) -> Failure {
    Failure {
        error: e.to_string(),
        kind: e.kind(),
        permanent: e.is_permanent(),
        retry_after: e.retry_after(),
    }
}

/// Summarize one claimed chat. A panic in the summarizer fails the whole claim (transiently):
/// nothing of a batch that panicked is applied.
pub fn process(claim: Claim, summarizer: &dyn Summarizer, bounds: &Bounds) -> Finished {
    let mut progress = Progress {
        memory: claim.memory.clone(),
        ..Default::default()
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        summarize_into(summarizer, &mut progress, &claim.snippets, bounds)
    }));
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(failure(&e)),
        Err(p) => {
            let usage = progress.usage;
            progress = Progress {
                usage,
                ..Default::default()
            };
            Some(failure(&SummarizerError::Transient(format!(
                "summarizer panicked: {}",
                panic_message(&*p)
            ))))
        }
    };
    // What the memory costs to store and to read: counted here, off the read path.
    let (token_count, context) = if progress.applied.is_empty() {
        (0, context::Rendered::default())
    } else {
        (
            i32::try_from(tokens::count_memory(&progress.memory)).unwrap_or(i32::MAX),
            context::render(&progress.memory, None, None, tokens::count),
        )
    };
    Finished {
        chat_id: claim.chat_id,
        lease_token: claim.lease_token,
        applied: progress.applied,
        memory: progress.memory,
        token_count,
        needs_new_chat: token_count > bounds.token_limit,
        context: context.text,
        context_tokens: i32::try_from(context.tokens).unwrap_or(i32::MAX),
        dead: progress.dead,
        failure,
        usage: progress.usage,
    }
}

pub fn process_all(
    claims: Vec<Claim>,
    summarizer: &dyn Summarizer,
    bounds: &Bounds,
) -> Vec<Finished> {
    claims
        .into_iter()
        .map(|c| process(c, summarizer, bounds))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fact, FactKeys, Op, SummaryUpdate};
    use serde_json::Value;
    use std::sync::Mutex;

    /// Fails with a context-length error for batches above `fits` snippets (or holding "huge"),
    /// with a transient error for a batch holding "flaky"; confirms one fact per snippet
    /// (`k<text>` = text) otherwise, and records the batch sizes it saw.
    struct Window {
        fits: usize,
        seen: Mutex<Vec<usize>>,
    }

    impl Window {
        fn new(fits: usize) -> Self {
            Self {
                fits,
                seen: Mutex::new(Vec::new()),
            }
        }
    }

    impl Summarizer for Window {
        fn label(&self) -> String {
            "window".into()
        }
        fn summarize(
            &self,
            _memory: &Memory,
            snippets: &[Snippet],
            usage: &mut Usage,
        ) -> Result<crate::merge::Validated, SummarizerError> {
            usage.requests += 1;
            self.seen.lock().unwrap().push(snippets.len());
            if snippets.len() > self.fits || snippets.iter().any(|s| s.text == "huge") {
                return Err(SummarizerError::ContextLength("too long".into()));
            }
            if snippets.iter().any(|s| s.text == "flaky") {
                return Err(SummarizerError::Transient("try later".into()));
            }
            Ok(crate::merge::validate(SummaryUpdate {
                ops: snippets
                    .iter()
                    .map(|s| {
                        Op::Confirm(Fact {
                            key: format!("k{}", s.text),
                            value: Value::String(s.text.clone()),
                        })
                    })
                    .collect(),
                general_summary: Some(snippets.last().unwrap().text.clone()),
            })
            .unwrap())
        }
    }

    const TEST_BOUNDS: &Bounds = &Bounds {
        token_limit: 8000,
        max_facts: usize::MAX,
        fact_keys: FactKeys::none(),
    };

    fn claim(texts: &[&str]) -> Claim {
        Claim {
            chat_id: "c".into(),
            lease_token: crate::model::no_lease(),
            version: 0,
            memory: Memory::default(),
            snippets: texts
                .iter()
                .enumerate()
                .map(|(i, t)| Snippet {
                    id: i.to_string(),
                    text: t.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn context_length_splits_in_order() {
        let s = Window::new(2);
        let f = process(claim(&["0", "1", "2", "3", "4"]), &s, TEST_BOUNDS);
        assert!(f.failure.is_none() && f.dead.is_empty());
        assert_eq!(f.memory.user_confirmed.len(), 5);
        assert_eq!(f.applied, ["0", "1", "2", "3", "4"]);
        // the last summary is the last snippet's: halves applied in order
        assert_eq!(f.memory.general_summary, "4");
        assert_eq!(*s.seen.lock().unwrap(), vec![5, 2, 3, 1, 2]);
        assert_eq!(f.usage.requests, 5);
    }

    #[test]
    fn a_snippet_that_never_fits_is_dead_lettered_alone() {
        for texts in [["a", "huge"], ["huge", "a"]] {
            let f = process(claim(&texts), &Window::new(8), TEST_BOUNDS);
            let huge = texts.iter().position(|t| *t == "huge").unwrap().to_string();
            let other = texts.iter().position(|t| *t == "a").unwrap().to_string();
            assert!(f.failure.is_none(), "{texts:?}");
            assert_eq!(f.applied, [other], "{texts:?}");
            assert_eq!(f.dead.len(), 1);
            assert_eq!(f.dead[0].id, huge);
            assert_eq!(f.dead[0].kind, "too_long");
            assert!(
                f.dead[0].error.contains("does not fit"),
                "{}",
                f.dead[0].error
            );
            assert_eq!(f.memory.general_summary, "a");
        }
    }

    #[test]
    fn a_transient_error_keeps_the_applied_prefix_and_retries_the_rest() {
        let f = process(
            claim(&["0", "1", "flaky", "3"]),
            &Window::new(2),
            TEST_BOUNDS,
        );
        assert_eq!(f.applied, ["0", "1"]);
        let failure = f.failure.expect("the rest fails");
        assert!(!failure.permanent);
        assert_eq!(failure.error, "try later");
        assert_eq!(f.usage.requests, 3, "usage of failed attempts is kept");
    }

    #[test]
    fn inferences_refused_by_the_merge_count_as_rejected() {
        let m = crate::summarizer::mock::Mock { directives: true };
        let f = process(
            claim(&["confirmed: plan = PPO", "inferred: plan = HMO"]),
            &m,
            TEST_BOUNDS,
        );
        assert_eq!(f.usage.rejected_ops, 1);
        assert_eq!(f.memory.user_confirmed["plan"], "PPO");
    }

    #[test]
    fn a_panic_applies_nothing() {
        let m = crate::summarizer::mock::Mock { directives: true };
        let f = process(
            claim(&["confirmed: a = 1", "mock_panic: boom"]),
            &m,
            TEST_BOUNDS,
        );
        assert!(f.applied.is_empty());
        assert!(f.failure.unwrap().error.contains("boom"));
    }
}
