//! One batch of claimed chats through the summarizer: summarize, validate, merge, count tokens.
//! Pure Rust on owned data (no Postgres calls), so it may run anywhere and is unit-testable.

use crate::merge;
use crate::queue::{Applied, Claim, Failed};
use crate::summarizer::Summarizer;
use crate::tokens;
use std::panic::{AssertUnwindSafe, catch_unwind};

pub enum Outcome {
    Applied(Applied),
    Failed(Failed),
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

/// Summarize one claimed chat. A panic in the summarizer becomes a transient failure.
pub fn process(claim: Claim, summarizer: &dyn Summarizer, token_limit: i32) -> Outcome {
    let fail = |error: String, permanent: bool| {
        Outcome::Failed(Failed {
            chat_id: claim.chat_id.clone(),
            lease_token: claim.lease_token,
            error,
            permanent,
        })
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        summarizer.summarize(&claim.memory, &claim.snippets)
    }));
    let update = match result {
        Ok(Ok(update)) => update,
        Ok(Err(e)) => return fail(e.to_string(), e.is_permanent()),
        Err(p) => {
            return fail(
                format!("summarizer panicked: {}", panic_message(&*p)),
                false,
            );
        }
    };
    if let Err(e) = merge::validate(&update) {
        return fail(format!("invalid summarizer output: {e}"), false);
    }
    let mut memory = claim.memory.clone();
    merge::apply(&mut memory, update);
    let token_count = i32::try_from(tokens::count_memory(&memory)).unwrap_or(i32::MAX);
    Outcome::Applied(Applied {
        queue_ids: claim.snippets.iter().map(|s| s.id.clone()).collect(),
        chat_id: claim.chat_id,
        lease_token: claim.lease_token,
        memory,
        token_count,
        needs_new_chat: token_count > token_limit,
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
