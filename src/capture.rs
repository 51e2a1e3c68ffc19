//! The capture trigger of watched tables (`memory._capture()`, declared in `sql/watch.sql`): the
//! rows an INSERT or COPY puts into an app's table become snippets of their chats, in row order,
//! in the inserting transaction. It runs on every message an app stores, so it is Rust, reads
//! the transition table directly, and takes the common row (an existing chat of the row's owner)
//! with saved statements into `memory.capture_inbox` (see `sql/schema.sql`): as plpgsql reading
//! rows through to_jsonb, writing each into the queue with its audit row, a watched insert ran at
//! 0.54 of an unwatched one. Every other row goes through `memory._capture_row` (SQL), as before.

use crate::error::ApiError;
use crate::{chat_id, identity, settings, shmem, watch};
use pgrx::PgMemoryContexts;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError};
use pgrx::trigger_support::{
    trigger_fired_after, trigger_fired_by_insert, trigger_fired_for_statement,
};
use std::cell::{Cell, OnceCell};
use std::ffi::CStr;
use std::mem::ManuallyDrop;

/// A row as the trigger reads it: each watched column's text output; None for NULL, for a
/// column the table no longer has, or for text that is not UTF-8.
#[derive(Debug, Default)]
struct Row {
    chat: Option<String>,
    text: Option<String>,
    owner: Option<String>,
    role: Option<String>,
    /// a watched column's text is not UTF-8: the row is skipped (never read as another owner)
    unreadable: bool,
}

/// What becomes of a row, by the rules that need no database (the chat id's are the caller's).
#[derive(Debug, PartialEq)]
enum Capture {
    /// No text, a blank one, or no chat id: skipped (and counted in the audit).
    Skip,
    Take {
        chat: String,
        owner: Option<String>,
        text: String,
    },
}

/// A non-blank text becomes `<role>: <text>` when a role is given, cut to `max_bytes` at a
/// character boundary; the owner is the owner column's value, else the inserting identity.
fn prepare(row: Row, by_owner: bool, identity: Option<&str>, max_bytes: usize) -> Capture {
    let (Some(chat), Some(text), false) = (row.chat, row.text, row.unreadable) else {
        return Capture::Skip;
    };
    if text.trim_matches([' ', '\t', '\r', '\n']).is_empty() {
        return Capture::Skip;
    }
    let owner = match row.owner {
        Some(owner) if by_owner => Some(owner),
        _ => identity.map(str::to_owned),
    };
    let role = row
        .role
        .as_deref()
        .map(|r| r.trim_matches(' '))
        .filter(|r| !r.is_empty());
    let text = match role {
        Some(role) => format!("{role}: {text}"),
        None => text,
    };
    let text = watch::truncate_utf8(&text, max_bytes).to_owned();
    Capture::Take { chat, owner, text }
}

/// The common case: lock the chat row FOR KEY SHARE if it exists and is the owner's (before the
/// seq is drawn, as enqueue() does; a claim's FOR UPDATE then waits for this transaction), and
/// read whether it is idle and when a snippet of it may be claimed (its backoff).
const LOCK: &str = "
    SELECT m.due_at IS NULL, greatest(now(), m.retry_at)
      FROM memory.chat_metadata m
     WHERE m.chat_id = $1 AND m.owner = $2
       FOR KEY SHARE";

/// Then the row, into the inbox (its seq drawn by the column default, under the lock).
const INSERT: &str = "
    INSERT INTO memory.capture_inbox (chat_id, snippet, source, enqueued_by, identity, role,
                                      next_attempt_at)
    VALUES ($1, $2, $3, $4, $5, $6::name, $7)";

/// And an idle chat marked due (with memory_ext.debounce, memory._debounce_chat instead). A due
/// one is left alone, unlocked beyond KEY SHARE: only a claim or a return clears due_at, and both
/// need FOR UPDATE, which waits for this transaction.
const DUE: &str = "
    UPDATE memory.chat_metadata m SET due_at = $2 WHERE m.chat_id = $1 AND m.due_at IS NULL";

thread_local! {
    // Saved once per backend (SPI_keepplan): the plan cache re-plans them after DDL on their
    // tables. Three plain statements cost less than one with data-modifying CTEs.
    // Never dropped: freeing them from the thread-local's destructor at process exit would call
    // into SPI after the backend has shut down.
    static PLANS: OnceCell<ManuallyDrop<[OwnedPreparedStatement; 3]>> = const { OnceCell::new() };
}

/// The saved plans of LOCK, INSERT and DUE.
fn with_plans<R>(
    client: &mut SpiClient<'_>,
    f: impl FnOnce(&mut SpiClient<'_>, &[OwnedPreparedStatement; 3]) -> Result<R, SpiError>,
) -> Result<R, SpiError> {
    PLANS.with(|plans| {
        let plans = match plans.get() {
            Some(plans) => plans,
            None => {
                let t = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
                let ts = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
                let lock = client.prepare_mut(LOCK, &[t, t])?.keep();
                let insert = client.prepare_mut(INSERT, &[t, t, t, t, t, t, ts])?.keep();
                let due = client.prepare_mut(DUE, &[t, ts])?.keep();
                plans.get_or_init(|| ManuallyDrop::new([lock, insert, due]))
            }
        };
        f(client, plans)
    })
}

#[pg_trigger(sql = false)]
fn capture<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    let td = trigger.trigger_data();
    let event = td.tg_event;
    let statement_after_insert = trigger_fired_after(event)
        && trigger_fired_by_insert(event)
        && trigger_fired_for_statement(event);
    if !statement_after_insert || td.tg_newtable.is_null() {
        ApiError::FeatureNotSupported(
            "memory._capture() runs only as memory.watch() creates it: AFTER INSERT, \
             FOR EACH STATEMENT, with a NEW TABLE"
                .into(),
        )
        .raise();
    }
    let args = trigger.extra_args().unwrap_or_default();
    let [chat, text, owner, role] = <[String; 4]>::try_from(args).unwrap_or_else(|_| {
        ApiError::InvalidParameter("memory._capture() takes four column names".into()).raise()
    });
    let st = Statement {
        identity: identity::current_identity(),
        role: identity::invoker(),
        by_owner: !owner.is_empty(),
        max_bytes: usize::try_from(settings::MAX_SNIPPET_BYTES.get()).unwrap_or(0),
        debounce: settings::DEBOUNCE_MS.get() > 0,
        source: source(trigger),
        admin: Cell::new(None),
    };
    // SAFETY: checked above: an AFTER INSERT statement trigger with a NEW TABLE
    let mut reader = unsafe { Reader::new(td, [&chat, &text, &owner, &role]) };
    take_rows(&mut reader, &st).unwrap_or_else(|e| ApiError::from(e).raise());
    reader.finish();
    Ok(None)
}

/// `watch:<schema>.<table>` with identifiers quoted as %I quotes them, at most 64 characters.
fn source(trigger: &pgrx::PgTrigger<'_>) -> String {
    let quote = |name: String| -> String {
        let Ok(c) = std::ffi::CString::new(name.clone()) else {
            return name;
        };
        // SAFETY: quote_identifier returns its argument or a palloc'd quoted copy.
        unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    };
    let schema = quote(trigger.table_schema().unwrap_or_default());
    let table = quote(trigger.table_name().unwrap_or_default());
    format!("watch:{schema}.{table}").chars().take(64).collect()
}

/// The statement's transition table, row by row in insertion order, through a read pointer of
/// its own (other triggers may read the same tuplestore). Each row's values are read in a memory
/// context reset for the next row: a COPY of a million rows holds one row at a time.
struct Reader {
    store: *mut pg_sys::Tuplestorestate,
    pointer: i32,
    slot: *mut pg_sys::TupleTableSlot,
    outputs: [Option<(i32, pg_sys::Oid)>; 4],
    cx: PgMemoryContexts,
}

impl Reader {
    /// # Safety
    /// `td` comes from the trigger manager, for an AFTER ... FOR EACH STATEMENT trigger with a
    /// NEW TABLE: the tuplestore and the relation's tuple descriptor live until it returns.
    unsafe fn new(td: &pg_sys::TriggerData, columns: [&str; 4]) -> Reader {
        unsafe {
            let desc = (*td.tg_relation).rd_att;
            let store = td.tg_newtable;
            // transition tables are created with EXEC_FLAG_REWIND: a pointer may ask for it
            let pointer =
                pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
            pg_sys::tuplestore_select_read_pointer(store, pointer);
            pg_sys::tuplestore_rescan(store);
            Reader {
                store,
                pointer,
                slot: pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple),
                outputs: columns.map(|name| column_output(desc, name)),
                cx: PgMemoryContexts::new("memory_ext capture row"),
            }
        }
    }

    fn next(&mut self) -> Option<Row> {
        // SAFETY: as in new(); the pointer is selected again (SPI work between rows may read
        // other tuplestores, never this one, but costs nothing to be sure of).
        unsafe {
            self.cx.reset();
            pg_sys::tuplestore_select_read_pointer(self.store, self.pointer);
            if !pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) {
                return None;
            }
            let (slot, outputs) = (self.slot, self.outputs);
            Some(self.cx.switch_to(|_| {
                let [chat, text, owner, role] = outputs.map(|o| o.map(|o| value(slot, o)));
                let read = |v: Option<Result<Option<String>, ()>>| v.transpose();
                match (read(chat), read(text), read(owner), read(role)) {
                    (Ok(chat), Ok(text), Ok(owner), Ok(role)) => Row {
                        chat: chat.flatten(),
                        text: text.flatten(),
                        owner: owner.flatten(),
                        role: role.flatten(),
                        unreadable: false,
                    },
                    _ => Row {
                        unreadable: true,
                        ..Row::default()
                    },
                }
            }))
        }
    }

    fn finish(self) {
        // SAFETY: as in new(); pointer 0 is the one the trigger manager and other readers expect
        unsafe {
            pg_sys::tuplestore_select_read_pointer(self.store, 0);
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
        }
    }
}

/// A column's number and its type's output function, or None when the table has no such column.
unsafe fn column_output(desc: pg_sys::TupleDesc, name: &str) -> Option<(i32, pg_sys::Oid)> {
    if name.is_empty() {
        return None;
    }
    let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(desc) };
    let (i, att) = desc
        .iter()
        .enumerate()
        .find(|(_, a)| !a.is_dropped() && a.name() == name)?;
    let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
    unsafe { pg_sys::getTypeOutputInfo(att.atttypid, &mut output, &mut varlena) };
    Some((i32::try_from(i + 1).ok()?, output))
}

/// A column's value as its type's text output, None for NULL; Err for text that is not UTF-8.
unsafe fn value(
    slot: *mut pg_sys::TupleTableSlot,
    (attnum, output): (i32, pg_sys::Oid),
) -> Result<Option<String>, ()> {
    let mut isnull = false;
    let datum = unsafe { pg_sys::slot_getattr(slot, attnum, &mut isnull) };
    if isnull {
        return Ok(None);
    }
    let text = unsafe { CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, datum)) };
    text.to_str().map(|t| Some(t.to_owned())).map_err(|_| ())
}

/// What the trigger knows of the inserting statement.
struct Statement {
    identity: Option<String>,
    /// the role the insert runs as, for the audit row
    role: String,
    by_owner: bool,
    max_bytes: usize,
    debounce: bool,
    source: String,
    admin: Cell<Option<bool>>,
}

impl Statement {
    /// Admin status, asked once and only when a row needs it (memory._is_admin may query).
    fn admin(&self) -> bool {
        let admin = self.admin.get().unwrap_or_else(identity::is_admin);
        self.admin.set(Some(admin));
        admin
    }
}

/// Take each row in order; audit what was skipped or refused; wake the worker at commit. One SPI
/// connection per row: its tuple tables are freed with it.
fn take_rows(reader: &mut Reader, st: &Statement) -> Result<(), SpiError> {
    let (mut total, mut skipped, mut taken, mut denied) = (0usize, 0usize, 0usize, Vec::new());
    while let Some(row) = reader.next() {
        total += 1;
        let Capture::Take { chat, owner, text } =
            prepare(row, st.by_owner, st.identity.as_deref(), st.max_bytes)
        else {
            skipped += 1;
            continue;
        };
        if chat_id::chat_id_problem(Some(&chat)).is_some() {
            skipped += 1;
            continue;
        }
        let row = Taking {
            chat: &chat,
            owner: owner.as_deref(),
            text: &text,
        };
        if take_row(st, &row)? {
            taken += 1;
        } else {
            denied.push(chat);
        }
    }
    if skipped > 0 || !denied.is_empty() {
        Spi::connect_mut(|client| refused(client, st, total, skipped, denied))?;
    }
    if taken > 0 {
        shmem::wake_at_commit();
    }
    Ok(())
}

/// One row: the common case (an existing chat of the row's owner, the inserting identity's own
/// row or an admin's) into the inbox, anything else through memory._capture_row. False when the
/// row is refused.
fn take_row(st: &Statement, row: &Taking<'_>) -> Result<bool, SpiError> {
    let own = row.owner.is_some() && row.owner == st.identity.as_deref();
    let fast = row.owner.is_some() && (own || st.admin());
    Spi::connect_mut(|client| {
        if fast && take_fast(client, st, row)? {
            return Ok(true);
        }
        take_slow(client, st, row)
    })
}

/// One row on its way in.
struct Taking<'r> {
    chat: &'r str,
    owner: Option<&'r str>,
    text: &'r str,
}

fn take_fast(
    client: &mut SpiClient<'_>,
    st: &Statement,
    row: &Taking<'_>,
) -> Result<bool, SpiError> {
    let identity = st.identity.as_deref();
    with_plans(client, |client, [lock, insert, due]| {
        let locked = client.update(lock, Some(1), &[row.chat.into(), row.owner.into()])?;
        let Ok((Some(idle), Some(next))) = locked.first().get_two::<bool, TimestampWithTimeZone>()
        else {
            return Ok(false); // a new chat, or someone else's
        };
        client.update(
            insert,
            None,
            &[
                row.chat.into(),
                row.text.into(),
                st.source.as_str().into(),
                identity.or(row.owner).into(),
                identity.into(),
                st.role.as_str().into(),
                next.into(),
            ],
        )?;
        if st.debounce {
            client.update(
                "SELECT memory._debounce_chat($1, $2)",
                Some(1),
                &[row.chat.into(), next.into()],
            )?;
        } else if idle {
            client.update(due, None, &[row.chat.into(), next.into()])?;
        }
        Ok(true)
    })
}

/// memory._capture_row: a new chat, an admin's row without an owner column, or refused.
fn take_slow(
    client: &mut SpiClient<'_>,
    st: &Statement,
    row: &Taking<'_>,
) -> Result<bool, SpiError> {
    let id = client
        .update(
            "SELECT memory._capture_row($1, $2, $3, $4, $5, $6, $7)",
            Some(1),
            &[
                row.chat.into(),
                row.owner.into(),
                row.text.into(),
                st.source.as_str().into(),
                st.identity.as_deref().into(),
                st.admin().into(),
                st.by_owner.into(),
            ],
        )?
        .first()
        .get_one::<pgrx::Uuid>()?;
    Ok(id.is_some())
}

/// memory._capture_refused: the audit rows of skipped and refused rows.
fn refused(
    client: &mut SpiClient<'_>,
    st: &Statement,
    total: usize,
    skipped: usize,
    denied: Vec<String>,
) -> Result<(), SpiError> {
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    client.update(
        "SELECT memory._capture_refused($1, $2, $3, $4, $5)",
        Some(1),
        &[
            st.source.as_str().into(),
            st.identity.as_deref().into(),
            count(total).into(),
            count(skipped).into(),
            denied.into(),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(chat: Option<&str>, text: Option<&str>, owner: Option<&str>, role: Option<&str>) -> Row {
        let s = |v: Option<&str>| v.map(str::to_owned);
        Row {
            chat: s(chat),
            text: s(text),
            owner: s(owner),
            role: s(role),
            unreadable: false,
        }
    }

    fn take(chat: &str, owner: Option<&str>, text: &str) -> Capture {
        Capture::Take {
            chat: chat.into(),
            owner: owner.map(Into::into),
            text: text.into(),
        }
    }

    #[test]
    fn blank_texts_and_missing_chats_are_skipped() {
        for text in [None, Some(""), Some(" \t\r\n "), Some("\n")] {
            assert_eq!(
                prepare(row(Some("c"), text, None, None), false, Some("u"), 100),
                Capture::Skip
            );
        }
        assert_eq!(
            prepare(row(None, Some("hi"), None, None), false, Some("u"), 100),
            Capture::Skip
        );
        // other whitespace is text (btrim(' \t\r\n') in SQL, as before)
        assert_eq!(
            prepare(
                row(Some("c"), Some("\u{a0}"), None, None),
                false,
                Some("u"),
                100
            ),
            take("c", Some("u"), "\u{a0}")
        );
    }

    #[test]
    fn an_unreadable_row_is_skipped_never_read_as_the_inserters() {
        let r = Row {
            unreadable: true,
            ..row(Some("c"), Some("hi"), None, None)
        };
        assert_eq!(prepare(r, true, Some("bob"), 100), Capture::Skip);
    }

    #[test]
    fn the_owner_column_else_the_inserting_identity() {
        let r = || row(Some("c"), Some("hi"), Some("alice"), None);
        assert_eq!(
            prepare(r(), true, Some("bob"), 100),
            take("c", Some("alice"), "hi")
        );
        assert_eq!(
            prepare(r(), false, Some("bob"), 100),
            take("c", Some("bob"), "hi")
        );
        let no_owner = row(Some("c"), Some("hi"), None, None);
        assert_eq!(
            prepare(no_owner, true, Some("bob"), 100),
            take("c", Some("bob"), "hi")
        );
        let nobody = row(Some("c"), Some("hi"), None, None);
        assert_eq!(prepare(nobody, true, None, 100), take("c", None, "hi"));
    }

    #[test]
    fn a_role_prefixes_the_text_which_is_cut_to_the_limit() {
        let r = |role: Option<&str>| row(Some("c"), Some(" héllo "), None, role);
        assert_eq!(
            prepare(r(Some(" user ")), false, Some("u"), 100),
            take("c", Some("u"), "user:  héllo ")
        );
        assert_eq!(
            prepare(r(Some("  ")), false, Some("u"), 100),
            take("c", Some("u"), " héllo ")
        );
        assert_eq!(
            prepare(r(None), false, Some("u"), 100),
            take("c", Some("u"), " héllo ")
        );
        // "user:  h" is 8 bytes; the "é" (2 bytes) does not fit in 9
        assert_eq!(
            prepare(r(Some("user")), false, Some("u"), 9),
            take("c", Some("u"), "user:  h")
        );
    }
}
