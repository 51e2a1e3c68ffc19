//! The data model every part of memory_ext shares: a chat's memory and snippets, the operations
//! a summarizer proposes, what an attempt cost, and a claimed chat on its way from the queue
//! through the summarizer back to the tables. A leaf: it depends on no other module, and
//! `merge`, `summarizer`, `batch`, `queue`, `pipeline` and the worker depend on it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;

/// A chat's memory as the summarizer sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub user_confirmed: Map<String, Value>,
    pub llm_inferred: Map<String, Value>,
    pub general_summary: String,
}

/// One accepted snippet, in enqueue order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snippet {
    pub id: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub key: String,
    pub value: Value,
}

/// One operation on the memory's facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A fact the user stated or confirmed.
    Confirm(Fact),
    /// The model's assumption.
    Infer(Fact),
    /// Drop an inferred fact (confirmed facts cannot be dropped this way).
    DropInferred(String),
}

/// What a summarizer proposes. Operations apply strictly in the order they were stated (snippet
/// order, then line order within a snippet), so the result never depends on how snippets were
/// grouped into summarizations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryUpdate {
    pub ops: Vec<Op>,
    /// The new general summary; `None` keeps the current one.
    pub general_summary: Option<String>,
}

/// What the provider reported an attempt cost, summed over every request it took (a repair
/// request, the halves of a split batch). Recorded per applied batch and per failed attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Operations refused by the extension (an ungrounded confirmation, for one).
    pub rejected_ops: u32,
    /// Prompt tokens the provider served from its prompt cache (part of `prompt_tokens`).
    pub cached_prompt_tokens: u64,
    /// Prompt tokens the provider wrote to its prompt cache (Anthropic; part of `prompt_tokens`).
    pub cache_write_tokens: u64,
}

/// One leased chat with its current memory and claimed snippets (in order).
#[derive(Clone, Debug)]
pub struct Claim {
    pub chat_id: String,
    pub lease_token: pgrx::Uuid,
    /// The memory's version when claimed.
    pub version: i64,
    pub memory: Memory,
    pub snippets: Vec<Snippet>,
}

/// How a leased summarization ended, to be written in one transaction by [`finish`]: the
/// snippets merged into `memory` (in order), those refused on their own, and a failure for every
/// other claimed snippet.
#[derive(Clone, Debug)]
pub struct Finished {
    pub chat_id: String,
    pub lease_token: pgrx::Uuid,
    pub applied: Vec<String>,
    pub memory: Memory,
    pub token_count: i32,
    pub needs_new_chat: bool,
    /// The memory as `context()` renders it without a budget or guidance, and its token count
    /// (empty and 0 when nothing was applied).
    pub context: String,
    pub context_tokens: i32,
    /// Snippets dead-lettered alone.
    pub dead: Vec<Dead>,
    pub failure: Option<Failure>,
    pub usage: Usage,
}

/// A snippet the summarizer refused on its own.
#[derive(Clone, Debug)]
pub struct Dead {
    pub id: String,
    pub error: String,
    /// The error's class (see [`Failure::kind`]).
    pub kind: &'static str,
}

/// A failed attempt for the claimed snippets that were neither applied nor dead-lettered.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The full text, for admins: it may quote the provider.
    pub error: String,
    /// The class (`SummarizerError::kind`, or `apply`): what the snippet's owner is told.
    pub kind: &'static str,
    pub permanent: bool,
    /// The endpoint's Retry-After: the delay to use instead of the backoff.
    pub retry_after: Option<Duration>,
}

impl Finished {
    /// The whole claim failed with `error` of class `kind`, nothing applied (e.g. the summarizer
    /// could not be configured, or the result could not be written).
    pub fn failed(
        chat_id: String,
        lease_token: pgrx::Uuid,
        error: String,
        kind: &'static str,
        usage: Usage,
    ) -> Self {
        Finished {
            chat_id,
            lease_token,
            applied: Vec::new(),
            memory: Memory::default(),
            token_count: 0,
            needs_new_chat: false,
            context: String::new(),
            context_tokens: 0,
            dead: Vec::new(),
            failure: Some(Failure {
                error,
                kind,
                permanent: false,
                retry_after: None,
            }),
            usage,
        }
    }
}

/// The lease of a peeked claim, which has none yet.
pub fn no_lease() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes([0; 16])
}

/// A fact key an admin declared (`memory.fact_keys`), and what it may be used for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FactKey {
    pub key: String,
    pub description: String,
    pub may_confirm: bool,
    pub may_infer: bool,
}

/// The declared fact keys, in key order. None declared: any key goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FactKeys(Vec<FactKey>);

impl FactKeys {
    pub fn new(mut keys: Vec<FactKey>) -> Self {
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        keys.dedup_by(|a, b| a.key == b.key);
        Self(keys)
    }

    /// No keys declared: any key goes.
    pub const fn none() -> Self {
        Self(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FactKey> {
        self.0.iter()
    }

    fn get(&self, key: &str) -> Option<&FactKey> {
        let i = self.0.binary_search_by(|k| k.key.as_str().cmp(key)).ok()?;
        Some(&self.0[i])
    }

    /// May the merge apply `op`? With keys declared, a confirmation or an inference only of a
    /// declared key that may be confirmed (inferred). A drop always may: it only removes, and it
    /// can clear a fact kept from before the keys were declared.
    pub fn allows(&self, op: &Op) -> bool {
        if self.is_empty() {
            return true;
        }
        match op {
            Op::Confirm(f) => self.get(&f.key).is_some_and(|k| k.may_confirm),
            Op::Infer(f) => self.get(&f.key).is_some_and(|k| k.may_infer),
            Op::DropInferred(_) => true,
        }
    }
}

/// The bounds a merged memory must keep.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Above it the memory is flagged `needs_new_chat`.
    pub token_limit: i32,
    pub max_facts: usize,
    pub fact_keys: FactKeys,
}

/// How `openai` asks for structured output (`memory_ext.llm_structured_output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructuredOutput {
    JsonSchema,
    JsonObject,
    None,
}

/// A snapshot of the summarizer settings, owned, so helper threads can use it.
#[derive(Clone, PartialEq)]
pub struct LlmConfig {
    pub summarizer: String,
    pub endpoint: String,
    pub model: String,
    /// The resolved key (after `file:`/`env:`); never printed (see the Debug impl).
    pub api_key: String,
    pub timeout: Duration,
    pub max_output_tokens: u32,
    pub structured_output: StructuredOutput,
    /// The mock's test directives (`mock_error:` …) are honoured, not plain text.
    pub mock_directives: bool,
    /// `memory_ext.instructions`: the operator's guidance for the LLM (empty: none).
    pub instructions: String,
    /// The declared fact keys (`memory.fact_keys`), listed in the prompt and the answer's schema.
    pub fact_keys: FactKeys,
}

impl std::fmt::Debug for LlmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmConfig")
            .field("summarizer", &self.summarizer)
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("api_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}
