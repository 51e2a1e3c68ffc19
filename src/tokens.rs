//! Token counting with a real BPE tokenizer: tiktoken's `cl100k_base`, whose vocabulary the
//! `tiktoken-rs` crate embeds (nothing is downloaded at run time). What is counted is the memory
//! record an agent would put in its prompt: the JSON of confirmed facts, inferred facts and
//! summary.

use crate::model::Memory;
use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

fn bpe() -> &'static CoreBPE {
    static BPE: OnceLock<CoreBPE> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::cl100k_base().expect("embedded cl100k_base vocabulary"))
}

pub fn count(text: &str) -> usize {
    bpe().encode_ordinary(text).len()
}

/// Tokens of the record as rendered for a prompt.
pub fn count_memory(memory: &Memory) -> usize {
    count(&serde_json::to_string(memory).expect("memory serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bpe_tokens_not_characters() {
        // Reference counts from OpenAI's cl100k_base.
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        assert_eq!(count("tiktoken is great!"), 6);
        // 1000 repetitions of a common word compress to far fewer tokens than bytes/4 would say.
        assert!(count(&"memory ".repeat(1000)) <= 1001);
    }
}
