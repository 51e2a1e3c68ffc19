//! One claimed chat through the summarizer: summarize, validate, merge, count tokens.
//! Pure Rust on owned data (no Postgres calls), so it may run on a helper thread and is
//! unit-testable.

use crate::merge;
use crate::queue::{Applied, Claim, Failed};
use crate::summarizer::{Memory, Snippet, Summarizer, SummarizerError, Usage};
use crate::tokens;
use std::panic::{AssertUnwindSafe, catch_unwind};

pub enum Outcome {
    Applied(Applied),
    Failed(Failed),
}

impl Outcome {
    pub fn lease_token(&self) -> pgrx::Uuid {
        match self {
            Outcome::Applied(a) => a.lease_token,
            Outcome::Failed(f) => f.lease_token,
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "summarizer panicked".to_string()
    }
}

/// Merge `snippets` into `memory`. A batch too long for the model's context is split in two
/// halves, applied one after the other (order kept); a single snippet that does not fit fails
/// permanently, since retrying the same request cannot succeed.
fn summarize_into(
    summarizer: &dyn Summarizer,
    memory: &mut Memory,
    snippets: &[Snippet],
    usage: &mut Usage,
) -> Result<(), SummarizerError> {
    match summarizer.summarize(memory, snippets, usage) {
        Ok(update) => {
            merge::validate(&update).map_err(|e| {
                SummarizerError::Transient(format!("invalid summarizer output: {e}"))
            })?;
            merge::apply(memory, update);
            Ok(())
        }
        Err(SummarizerError::ContextLength(_)) if snippets.len() > 1 => {
            let (first, second) = snippets.split_at(snippets.len() / 2);
            summarize_into(summarizer, memory, first, usage)?;
            summarize_into(summarizer, memory, second, usage)
        }
        Err(SummarizerError::ContextLength(m)) => Err(SummarizerError::ContextLength(format!(
            "{m} (a single snippet with the current memory does not fit the model's context)"
        ))),
        Err(e) => Err(e),
    }
}

/// Summarize one claimed chat. A panic in the summarizer becomes a transient failure.
pub fn process(claim: Claim, summarizer: &dyn Summarizer, token_limit: i32) -> Outcome {
    let mut usage = Usage::default();
    let mut memory = claim.memory.clone();
    let result = catch_unwind(AssertUnwindSafe(|| {
        summarize_into(summarizer, &mut memory, &claim.snippets, &mut usage)
    }));
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(p) => Some(SummarizerError::Transient(format!(
            "summarizer panicked: {}",
            panic_message(&*p)
        ))),
    };
    if let Some(e) = error {
        return Outcome::Failed(Failed {
            chat_id: claim.chat_id,
            lease_token: claim.lease_token,
            error: e.to_string(),
            permanent: e.is_permanent(),
            retry_after: e.retry_after(),
            usage,
        });
    }
    let token_count = i32::try_from(tokens::count_memory(&memory)).unwrap_or(i32::MAX);
    Outcome::Applied(Applied {
        queue_ids: claim.snippets.iter().map(|s| s.id.clone()).collect(),
        chat_id: claim.chat_id,
        lease_token: claim.lease_token,
        memory,
        token_count,
        needs_new_chat: token_count > token_limit,
        usage,
    })
}

pub fn process_all(
    claims: Vec<Claim>,
    summarizer: &dyn Summarizer,
    token_limit: i32,
) -> (Vec<Applied>, Vec<Failed>) {
    let mut applied = Vec::new();
    let mut failed = Vec::new();
    for claim in claims {
        match process(claim, summarizer, token_limit) {
            Outcome::Applied(a) => applied.push(a),
            Outcome::Failed(f) => failed.push(f),
        }
    }
    (applied, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarizer::{Fact, SummaryUpdate};
    use serde_json::Value;
    use std::sync::Mutex;

    /// Fails with a context-length error for batches above `fits` snippets; confirms one fact per
    /// snippet (`k<text>` = text) otherwise, and records the batch sizes it saw.
    struct Window {
        fits: usize,
        seen: Mutex<Vec<usize>>,
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
        ) -> Result<SummaryUpdate, SummarizerError> {
            usage.requests += 1;
            self.seen.lock().unwrap().push(snippets.len());
            if snippets.len() > self.fits {
                return Err(SummarizerError::ContextLength("too long".into()));
            }
            Ok(SummaryUpdate {
                confirm: snippets
                    .iter()
                    .map(|s| Fact {
                        key: format!("k{}", s.text),
                        value: Value::String(s.text.clone()),
                    })
                    .collect(),
                general_summary: Some(snippets.last().unwrap().text.clone()),
                ..Default::default()
            })
        }
    }

    fn claim(n: usize) -> Claim {
        Claim {
            chat_id: "c".into(),
            lease_token: pgrx::Uuid::from_bytes([0; 16]),
            memory: Memory::default(),
            snippets: (0..n)
                .map(|i| Snippet {
                    id: i.to_string(),
                    text: i.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn context_length_splits_in_order() {
        let s = Window {
            fits: 2,
            seen: Mutex::new(Vec::new()),
        };
        let Outcome::Applied(a) = process(claim(5), &s, 8000) else {
            panic!("expected applied");
        };
        assert_eq!(a.memory.user_confirmed.len(), 5);
        assert_eq!(a.queue_ids.len(), 5);
        // the last summary is the last snippet's: halves applied in order
        assert_eq!(a.memory.general_summary, "4");
        assert_eq!(*s.seen.lock().unwrap(), vec![5, 2, 3, 1, 2]);
        assert_eq!(a.usage.requests, 5);
    }

    #[test]
    fn single_snippet_too_long_fails_permanently() {
        let s = Window {
            fits: 0,
            seen: Mutex::new(Vec::new()),
        };
        let Outcome::Failed(f) = process(claim(2), &s, 8000) else {
            panic!("expected failed");
        };
        assert!(f.permanent);
        assert!(f.error.contains("does not fit"), "{}", f.error);
        assert_eq!(f.usage.requests, 2, "usage of failed attempts is kept");
    }
}
