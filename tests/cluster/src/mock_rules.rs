//! The mock summarizer's text rules as the tests understand them, written independently of the
//! extension's `summarizer::mock` (a test model that shared its code could not catch its bugs).
//! Both the fake LLM's "model" and the stress suite's reference model are built on these.

/// The summary keeps its last this many characters (as the mock summarizer's).
pub const SUMMARY_MAX_CHARS: usize = 2000;

/// `line` is the directive `name` (its head before the first ':' trimmed, any case): the rest,
/// trimmed.
pub fn directive<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let colon = line.find(':')?;
    let matches = line[..colon].trim().to_lowercase() == name.to_lowercase();
    matches.then(|| line[colon + 1..].trim())
}

/// `key = value`, both trimmed, the key not empty.
pub fn key_value(rest: &str) -> Option<(String, String)> {
    let eq = rest.find('=')?;
    let key = rest[..eq].trim();
    if key.is_empty() {
        return None;
    }
    Some((key.to_owned(), rest[eq + 1..].trim().to_owned()))
}

/// The last `max` characters; when the cut has a space within its first 40 bytes, from after it.
pub fn tail(s: &str, max: usize) -> String {
    let total = s.chars().count();
    let start = match s.char_indices().nth(total.saturating_sub(max)) {
        Some((byte, _)) if total > max => byte,
        _ => return s.to_owned(),
    };
    let cut = &s[start..];
    match cut.find(' ').filter(|&i| i < 40) {
        Some(i) => cut[i + 1..].to_owned(),
        None => cut.to_owned(),
    }
}

/// The summary with one more line: joined with " | ", then cut to [`SUMMARY_MAX_CHARS`].
pub fn fold_summary(summary: &str, line: &str) -> String {
    let joined = match summary {
        "" => line.to_owned(),
        _ => [summary, line].join(" | "),
    };
    tail(&joined, SUMMARY_MAX_CHARS)
}
