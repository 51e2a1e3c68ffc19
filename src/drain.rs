//! From summarized claims to the tables, for the worker: one transaction for the whole batch,
//! and chat by chat when it fails, so one bad chat never holds back the others. A chat whose
//! result cannot be written at all gets a failed attempt instead (its snippets are retried).

use crate::bgw::{in_transaction, record_error, set_state};
use crate::queue::{self, Finished};
use crate::settings::QueuePolicy;
use crate::shmem;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Write `results` (summarized by `label`). Returns the number of chats whose memory changed.
pub fn finish_all(results: Vec<Finished>, policy: &QueuePolicy, label: &str) -> usize {
    if results.is_empty() {
        return 0;
    }
    set_state(&format!("applying {} chat(s)", results.len()));
    let mut failed = 0u64;
    for r in &results {
        if let Some(f) = &r.failure {
            record_error(&format!("chat \"{}\": {}", r.chat_id, f.error));
        }
        if let Some((_, error)) = r.dead.last() {
            record_error(&format!("chat \"{}\": {error}", r.chat_id));
        }
        failed += u64::from(r.failure.is_some() || !r.dead.is_empty());
    }
    let applied = match in_transaction(|| queue::finish(&results, policy, label)) {
        Ok(Ok(n)) => n as usize,
        _ => results
            .into_iter()
            .map(|r| finish_one(r, policy, label))
            .sum(),
    };
    if let Some(sh) = shmem::get() {
        sh.processed.fetch_add(applied as u64, Ordering::Relaxed);
        sh.failed.fetch_add(failed, Ordering::Relaxed);
        if applied > 0 {
            sh.broadcast_applied();
        }
    }
    applied
}

/// One chat's result in its own transaction; if even that fails, a failed attempt.
fn finish_one(r: Finished, policy: &QueuePolicy, label: &str) -> usize {
    let error = match in_transaction(|| queue::finish(std::slice::from_ref(&r), policy, label)) {
        Ok(Ok(n)) => return n as usize,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e,
    };
    record_error(&format!(
        "chat \"{}\": could not apply memory: {error}",
        r.chat_id
    ));
    let failed = Finished::failed(
        r.chat_id.clone(),
        r.lease_token,
        format!("could not apply memory: {error}"),
        r.usage,
    );
    if let Err(e) = in_transaction(|| queue::finish(std::slice::from_ref(&failed), policy, label)) {
        record_error(&format!(
            "could not record failure of chat \"{}\": {e}",
            r.chat_id
        ));
    }
    0
}

/// Moving average of claim-to-applied time, the basis of enqueue's estimated_completion.
pub fn note_latency(d: Duration) {
    if let Some(sh) = shmem::get() {
        let us = d.as_micros() as u64;
        let old = sh.latency_us.load(Ordering::Relaxed);
        sh.latency_us.store(
            if old == 0 { us } else { (old * 7 + us) / 8 },
            Ordering::Relaxed,
        );
    }
}
