//! Merge rules. They belong to the extension, not to the summarizer:
//!
//! - a confirmed fact is never overwritten by an inferred one (such inferences are rejected);
//! - an inferred fact that gets confirmed moves to `user_confirmed`;
//! - a confirmed fact with a new value supersedes the old (the old value stays in history);
//! - nothing is deleted by omission: only an explicit drop removes an inferred fact, and
//!   confirmed facts are never removed by a summarizer;
//! - bounded: a chat holds at most `max_facts` facts (confirmed and inferred together) and no value
//!   longer than [`MAX_VALUE_CHARS`]; an operation that would add a new key beyond the bound, or
//!   store a longer value, is refused (counted), while changes to existing keys go on.
//!
//! Operations apply one by one in the order stated, so folding snippets one at a time or all
//! together gives the same memory.

use crate::model::{FactKeys, Memory, Op, SummaryUpdate};
use thiserror::Error;

pub const MAX_KEY_CHARS: usize = 200;
pub const MAX_SUMMARY_CHARS: usize = 100_000;
pub const MAX_VALUE_CHARS: usize = 1_000;

#[derive(Debug, Error, PartialEq)]
pub enum InvalidUpdate {
    #[error("fact key is empty")]
    EmptyKey,
    #[error("fact key \"{0}…\" is longer than {MAX_KEY_CHARS} characters")]
    KeyTooLong(String),
    #[error("fact \"{0}\" has a null value")]
    NullValue(String),
    #[error("general_summary is longer than {MAX_SUMMARY_CHARS} characters")]
    SummaryTooLong,
}

#[derive(Debug, Default, PartialEq)]
pub struct MergeStats {
    /// Confirmed facts whose value changed.
    pub superseded: usize,
    /// Inferred facts promoted to confirmed.
    pub promoted: usize,
    /// Inferences refused because the key is confirmed.
    pub rejected_inferences: usize,
    /// Operations refused by the bounds: a new key beyond `max_facts`, or a value too long.
    pub rejected_over_bounds: usize,
    /// Operations refused by the declared keys (`memory.fact_keys`).
    pub rejected_undeclared: usize,
}

impl MergeStats {
    /// Operations the merge refused.
    pub fn rejected(&self) -> usize {
        self.rejected_inferences + self.rejected_over_bounds + self.rejected_undeclared
    }
}

/// May `key` be set to `value` without breaking the bounds?
fn within_bounds(memory: &Memory, key: &str, value: &serde_json::Value, max_facts: usize) -> bool {
    let long = match value {
        serde_json::Value::String(s) => s.chars().count() > MAX_VALUE_CHARS,
        v => v.to_string().chars().count() > MAX_VALUE_CHARS,
    };
    let known = memory.user_confirmed.contains_key(key) || memory.llm_inferred.contains_key(key);
    let facts = memory.user_confirmed.len() + memory.llm_inferred.len();
    !long && (known || facts < max_facts)
}

fn check_key(key: &str) -> Result<(), InvalidUpdate> {
    if key.trim().is_empty() {
        return Err(InvalidUpdate::EmptyKey);
    }
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(InvalidUpdate::KeyTooLong(key.chars().take(20).collect()));
    }
    Ok(())
}

/// An update that passed [`validate`]: the only kind [`apply`] takes, so every update is checked
/// exactly once, by the summarizer that produced it, before anything is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated(SummaryUpdate);

impl std::ops::Deref for Validated {
    type Target = SummaryUpdate;
    fn deref(&self) -> &SummaryUpdate {
        &self.0
    }
}

/// Reject an update a summarizer should never have produced, before anything is applied.
pub fn validate(update: SummaryUpdate) -> Result<Validated, InvalidUpdate> {
    for op in &update.ops {
        match op {
            Op::Confirm(fact) | Op::Infer(fact) => {
                check_key(&fact.key)?;
                if fact.value.is_null() {
                    return Err(InvalidUpdate::NullValue(fact.key.clone()));
                }
            }
            Op::DropInferred(key) => check_key(key)?,
        }
    }
    if update
        .general_summary
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_SUMMARY_CHARS)
    {
        return Err(InvalidUpdate::SummaryTooLong);
    }
    Ok(Validated(update))
}

/// Apply a validated update to `memory`, one operation at a time in the order stated, keeping
/// at most `max_facts` facts, of the declared keys when there are any.
pub fn apply(
    memory: &mut Memory,
    update: Validated,
    max_facts: usize,
    keys: &FactKeys,
) -> MergeStats {
    let Validated(update) = update;
    let mut stats = MergeStats::default();
    for op in update.ops {
        match op {
            op if !keys.allows(&op) => stats.rejected_undeclared += 1,
            Op::Confirm(fact) | Op::Infer(fact)
                if !within_bounds(memory, &fact.key, &fact.value, max_facts) =>
            {
                stats.rejected_over_bounds += 1;
            }
            Op::Confirm(fact) => {
                if memory.llm_inferred.remove(&fact.key).is_some() {
                    stats.promoted += 1;
                }
                if let Some(old) = memory.user_confirmed.insert(fact.key, fact.value.clone())
                    && old != fact.value
                {
                    stats.superseded += 1;
                }
            }
            Op::Infer(fact) => {
                if memory.user_confirmed.contains_key(&fact.key) {
                    stats.rejected_inferences += 1;
                } else {
                    memory.llm_inferred.insert(fact.key, fact.value);
                }
            }
            Op::DropInferred(key) => {
                memory.llm_inferred.remove(&key);
            }
        }
    }
    if let Some(summary) = update.general_summary {
        memory.general_summary = summary;
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Fact;
    use serde_json::{Value, json};

    fn fact(k: &str, v: &str) -> Fact {
        Fact {
            key: k.into(),
            value: Value::String(v.into()),
        }
    }

    fn memory(confirmed: Value, inferred: Value) -> Memory {
        Memory {
            user_confirmed: confirmed.as_object().unwrap().clone(),
            llm_inferred: inferred.as_object().unwrap().clone(),
            general_summary: "s".into(),
        }
    }

    #[test]
    fn rules() {
        // (name, confirmed, inferred, update, expected confirmed, expected inferred)
        let cases = vec![
            (
                "inference never overwrites confirmation",
                json!({"plan": "PPO"}),
                json!({}),
                SummaryUpdate {
                    ops: vec![Op::Infer(fact("plan", "HMO"))],
                    ..Default::default()
                },
                json!({"plan": "PPO"}),
                json!({}),
            ),
            (
                "confirmation promotes an inference",
                json!({}),
                json!({"plan": "PPO"}),
                SummaryUpdate {
                    ops: vec![Op::Confirm(fact("plan", "PPO"))],
                    ..Default::default()
                },
                json!({"plan": "PPO"}),
                json!({}),
            ),
            (
                "new confirmed value supersedes",
                json!({"zip": "94103"}),
                json!({}),
                SummaryUpdate {
                    ops: vec![Op::Confirm(fact("zip", "94110"))],
                    ..Default::default()
                },
                json!({"zip": "94110"}),
                json!({}),
            ),
            (
                "nothing deleted by omission",
                json!({"a": "1"}),
                json!({"b": "2"}),
                SummaryUpdate {
                    ops: vec![Op::Confirm(fact("c", "3"))],
                    ..Default::default()
                },
                json!({"a": "1", "c": "3"}),
                json!({"b": "2"}),
            ),
            (
                "drop removes an inference only",
                json!({"a": "1"}),
                json!({"b": "2"}),
                SummaryUpdate {
                    ops: vec![Op::DropInferred("a".into()), Op::DropInferred("b".into())],
                    ..Default::default()
                },
                json!({"a": "1"}),
                json!({}),
            ),
        ];
        for (name, c, i, update, ec, ei) in cases {
            let mut m = memory(c, i);
            apply(
                &mut m,
                validate(update).unwrap(),
                usize::MAX,
                &FactKeys::default(),
            );
            assert_eq!(Value::Object(m.user_confirmed), ec, "{name}");
            assert_eq!(Value::Object(m.llm_inferred), ei, "{name}");
            assert_eq!(
                m.general_summary, "s",
                "{name}: summary kept when not given"
            );
        }
    }

    #[test]
    fn stats_and_summary() {
        let mut m = memory(json!({"zip": "1"}), json!({"plan": "x"}));
        let stats = apply(
            &mut m,
            validate(SummaryUpdate {
                ops: vec![
                    Op::Confirm(fact("zip", "2")),
                    Op::Confirm(fact("plan", "x")),
                    Op::Infer(fact("zip", "3")),
                ],
                general_summary: Some("new".into()),
            })
            .unwrap(),
            usize::MAX,
            &FactKeys::default(),
        );
        assert_eq!(
            stats,
            MergeStats {
                rejected_undeclared: 0,
                superseded: 1,
                promoted: 1,
                rejected_inferences: 1,
                rejected_over_bounds: 0,
            }
        );
        assert_eq!(m.general_summary, "new");
    }

    #[test]
    fn validation() {
        let bad = [
            (
                SummaryUpdate {
                    ops: vec![Op::Confirm(fact(" ", "v"))],
                    ..Default::default()
                },
                InvalidUpdate::EmptyKey,
            ),
            (
                SummaryUpdate {
                    ops: vec![Op::Infer(Fact {
                        key: "k".into(),
                        value: Value::Null,
                    })],
                    ..Default::default()
                },
                InvalidUpdate::NullValue("k".into()),
            ),
            (
                SummaryUpdate {
                    ops: vec![Op::DropInferred("x".repeat(201))],
                    ..Default::default()
                },
                InvalidUpdate::KeyTooLong("x".repeat(20)),
            ),
            (
                SummaryUpdate {
                    general_summary: Some("y".repeat(MAX_SUMMARY_CHARS + 1)),
                    ..Default::default()
                },
                InvalidUpdate::SummaryTooLong,
            ),
        ];
        for (u, e) in bad {
            assert_eq!(validate(u), Err(e));
        }
    }

    /// Operations over the same key in every order of three kinds: applying them one update at
    /// a time must equal applying them as one update (coalescing never changes the result).
    #[test]
    fn one_at_a_time_equals_all_at_once() {
        let kinds = [
            Op::Infer(fact("k", "a")),
            Op::DropInferred("k".into()),
            Op::Infer(fact("k", "b")),
            Op::Confirm(fact("k", "c")),
        ];
        let mut checked = 0;
        for a in &kinds {
            for b in &kinds {
                for c in &kinds {
                    let ops = vec![a.clone(), b.clone(), c.clone()];
                    let mut together = Memory::default();
                    apply(
                        &mut together,
                        validate(SummaryUpdate {
                            ops: ops.clone(),
                            ..Default::default()
                        })
                        .unwrap(),
                        usize::MAX,
                        &FactKeys::default(),
                    );
                    let mut single = Memory::default();
                    for op in ops {
                        apply(
                            &mut single,
                            validate(SummaryUpdate {
                                ops: vec![op],
                                ..Default::default()
                            })
                            .unwrap(),
                            usize::MAX,
                            &FactKeys::default(),
                        );
                    }
                    assert_eq!(together, single, "{a:?} {b:?} {c:?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 64);
        // The sequence: infer a, retract, infer b ends with b.
        let mut m = Memory::default();
        apply(
            &mut m,
            validate(SummaryUpdate {
                ops: vec![kinds[0].clone(), kinds[1].clone(), kinds[2].clone()],
                ..Default::default()
            })
            .unwrap(),
            usize::MAX,
            &FactKeys::default(),
        );
        assert_eq!(Value::Object(m.llm_inferred), json!({"k": "b"}));
    }

    /// With keys declared, only they may be set, each as declared; drops always apply.
    #[test]
    fn declared_keys_refuse_the_others() {
        use crate::model::FactKey;
        let keys = FactKeys::new(vec![
            FactKey {
                key: "mood".into(),
                description: String::new(),
                may_confirm: false,
                may_infer: true,
            },
            FactKey {
                key: "city".into(),
                description: String::new(),
                may_confirm: true,
                may_infer: false,
            },
        ]);
        let mut m = memory(json!({}), json!({"old": "1"}));
        let stats = apply(
            &mut m,
            validate(SummaryUpdate {
                ops: vec![
                    Op::Confirm(fact("city", "Lyon")),  // declared, may be confirmed
                    Op::Infer(fact("city", "Paris")),   // may not be inferred (and is confirmed)
                    Op::Confirm(fact("mood", "happy")), // may not be confirmed
                    Op::Infer(fact("mood", "calm")),    // may be inferred
                    Op::Infer(fact("zip", "69001")),    // not declared
                    Op::DropInferred("old".into()),     // drops always apply
                ],
                ..Default::default()
            })
            .unwrap(),
            usize::MAX,
            &keys,
        );
        assert_eq!(Value::Object(m.user_confirmed), json!({"city": "Lyon"}));
        assert_eq!(Value::Object(m.llm_inferred), json!({"mood": "calm"}));
        assert_eq!((stats.rejected_undeclared, stats.rejected()), (3, 3));
    }

    /// At the bound, new keys are refused (counted) while existing keys still change, and a
    /// value too long is refused; nothing already stored is evicted.
    #[test]
    fn bounds_refuse_new_keys_and_long_values() {
        let mut m = memory(json!({"a": "1"}), json!({"b": "2"}));
        let long = "x".repeat(MAX_VALUE_CHARS + 1);
        let stats = apply(
            &mut m,
            validate(SummaryUpdate {
                ops: vec![
                    Op::Confirm(fact("c", "3")),   // third fact: at the bound of 3
                    Op::Confirm(fact("d", "4")),   // a fourth: refused
                    Op::Infer(fact("e", "5")),     // refused
                    Op::Confirm(fact("a", "9")),   // an existing key changes
                    Op::Confirm(fact("b", "2")),   // promotion keeps the count
                    Op::DropInferred("x".into()),  // drops are never refused
                    Op::Confirm(fact("a", &long)), // too long: refused
                ],
                ..Default::default()
            })
            .unwrap(),
            3,
            &FactKeys::default(),
        );
        assert_eq!(stats.rejected_over_bounds, 3);
        assert_eq!(stats.rejected(), 3);
        assert_eq!(
            Value::Object(m.user_confirmed),
            json!({"a": "9", "b": "2", "c": "3"})
        );
        assert!(m.llm_inferred.is_empty());
    }
}
