//! Automatic capture from an app's own table (`memory.watch()`, `sql/watch.sql`): the helpers its
//! SQL needs, and clearing its triggers before `DROP EXTENSION`.

use pgrx::prelude::*;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A trigger's arguments (`pg_trigger.tgargs`: each one ends with a NUL byte).
pub fn split_trigger_args(args: &[u8]) -> Vec<String> {
    args.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .take(args.iter().filter(|&&b| b == 0).count())
        .collect()
}

/// The columns a capture trigger was given, for the `memory.watched` view.
#[pg_extern(immutable, strict, parallel_safe, name = "_trigger_args")]
fn trigger_args(args: &[u8]) -> Vec<String> {
    split_trigger_args(args)
}

/// Before `DROP EXTENSION memory_ext`: drop the capture triggers on the app's tables, which
/// depend on the extension's trigger function (a plain DROP would refuse). Only where the
/// extension exists and the caller may drop it (anyone else's DROP fails on its own), and where
/// its version has watching at all (a 0.1.0 schema under this library must drop as it is).
pub fn unwatch_all_before_drop() {
    let droppable = Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension e
                         WHERE e.extname = 'memory_ext'
                           AND pg_catalog.pg_has_role(e.extowner, 'USAGE'))
                AND pg_catalog.to_regprocedure('memory._unwatch_all()') IS NOT NULL",
    );
    let cleared = match droppable {
        Ok(Some(true)) => Spi::run("SELECT memory._unwatch_all()"),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = cleared {
        error!("memory_ext: clearing the watched tables' triggers: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("hello", 10), "hello");
        assert_eq!(truncate_utf8("hello", 5), "hello");
        assert_eq!(truncate_utf8("hello", 4), "hell");
        // "é" is two bytes, "日" three, "🙂" four: a cut inside one drops it whole
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("日本", 5), "日");
        assert_eq!(truncate_utf8("🙂x", 3), "");
        assert_eq!(truncate_utf8("🙂x", 4), "🙂");
        assert_eq!(truncate_utf8("abc", 0), "");
    }

    #[test]
    fn trigger_args_split_at_nul() {
        assert_eq!(
            split_trigger_args(b"conversation_id\0content\0\0role\0"),
            ["conversation_id", "content", "", "role"]
        );
        assert_eq!(split_trigger_args("chät\0".as_bytes()), ["chät"]);
        assert!(split_trigger_args(b"").is_empty());
    }
}
