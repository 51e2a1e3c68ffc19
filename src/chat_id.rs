//! `memory._chat_id_problem(id)`: what is wrong with a chat id, or NULL, on every hot path. The
//! rules are SQL (`memory._chat_id_rules`: not blank, at most 256 characters, no control or
//! invisible characters, no surrounding whitespace, NFC); the common case, a plain printable
//! ASCII id, which they all accept, is decided here without them. As an inlined SQL expression
//! the check cost get() a sixth of its time, most of it compiling the expression in each
//! transaction. A pg_test holds the two to the same answers.

use crate::error::ApiError;
use crate::spi;
use pgrx::prelude::*;

#[pg_extern(stable, parallel_safe, name = "_chat_id_problem")]
fn chat_id_problem(p_chat_id: Option<&str>) -> Option<String> {
    if p_chat_id.is_some_and(is_plain_ascii) {
        return None;
    }
    spi::read_one::<String>("SELECT memory._chat_id_rules($1)", &[p_chat_id.into()])
        .unwrap_or_else(|e| ApiError::from(e).raise())
}

/// 1 to 256 bytes of printable ASCII, without a space at either end: valid under every rule.
pub fn is_plain_ascii(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=256).contains(&b.len())
        && b.iter().all(|c| (b' '..=b'~').contains(c))
        && b[0] != b' '
        && b[b.len() - 1] != b' '
}
