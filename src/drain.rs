//! From summarized claims to the tables, for the worker: one transaction for the whole batch,
//! and chat by chat when it fails, so one bad chat never holds back the others. A chat whose
//! result cannot be written at all gets a failed attempt instead (its snippets are retried). A
//! chat a client holds locked is not waited for: its result comes back to be finished later.

use crate::bgw::{in_transaction, record_error, set_state};
use crate::model::Finished;
use crate::queue;
use crate::settings::QueuePolicy;
use crate::shmem;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Write `results` (summarized by `label`). Returns the number of chats whose memory changed
/// and the results whose chat was busy (to pass again later).
pub fn finish_all(
    results: Vec<Finished>,
    policy: &QueuePolicy,
    label: &str,
) -> (usize, Vec<Finished>) {
    if results.is_empty() {
        return (0, Vec::new());
    }
    set_state(&format!("applying {} chat(s)", results.len()));
    let failed = note_failures(&results);
    let (applied, busy) = match in_transaction(|| queue::finish(&results, policy, label)) {
        Ok(Ok(outcome)) => {
            let busy = results
                .into_iter()
                .filter(|r| outcome.busy.contains(&r.chat_id))
                .collect();
            (outcome.applied, busy)
        }
        _ => {
            let mut applied = 0;
            let mut busy = Vec::new();
            for r in results {
                busy.extend(finish_one(r, policy, label, &mut applied));
            }
            (applied, busy)
        }
    };
    if let Some(slot) = shmem::mine() {
        slot.processed.fetch_add(applied as u64, Ordering::Relaxed);
        slot.failed.fetch_add(failed, Ordering::Relaxed);
    }
    if applied > 0
        && let Some(sh) = shmem::get()
    {
        sh.broadcast_applied();
    }
    (applied, busy)
}

/// Publish the errors in `results`; returns how many chats had a failed or refused snippet.
fn note_failures(results: &[Finished]) -> u64 {
    let mut failed = 0;
    for r in results {
        if let Some(f) = &r.failure {
            record_error(&format!("chat \"{}\": {}", r.chat_id, f.error));
        }
        if let Some(d) = r.dead.last() {
            record_error(&format!("chat \"{}\": {}", r.chat_id, d.error));
        }
        failed += u64::from(r.failure.is_some() || !r.dead.is_empty());
    }
    failed
}

/// One chat's result in its own transaction (adding to `applied`); if even that fails, a failed
/// attempt. Gives the result back when its chat is busy.
fn finish_one(
    r: Finished,
    policy: &QueuePolicy,
    label: &str,
    applied: &mut usize,
) -> Option<Finished> {
    let error = match in_transaction(|| queue::finish(std::slice::from_ref(&r), policy, label)) {
        Ok(Ok(outcome)) if !outcome.busy.is_empty() => return Some(r),
        Ok(Ok(outcome)) => {
            *applied += outcome.applied;
            return None;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    record_error(&format!(
        "chat \"{}\": could not apply memory: {error}",
        r.chat_id
    ));
    let failed = Finished::failed(
        r.chat_id.clone(),
        r.lease_token,
        format!("could not apply memory: {error}"),
        "apply",
        r.usage,
    );
    if let Err(e) = in_transaction(|| queue::finish(std::slice::from_ref(&failed), policy, label)) {
        record_error(&format!(
            "could not record failure of chat \"{}\": {e}",
            r.chat_id
        ));
    }
    None
}

/// Moving average of claim-to-applied time, the basis of enqueue's estimated_completion.
pub fn note_latency(d: Duration) {
    if let Some(slot) = shmem::mine() {
        let us = d.as_micros() as u64;
        let old = slot.latency_us.load(Ordering::Relaxed);
        slot.latency_us.store(
            if old == 0 { us } else { (old * 7 + us) / 8 },
            Ordering::Relaxed,
        );
    }
}
