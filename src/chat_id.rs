//! `memory._chat_id_problem(id)`: what is wrong with a chat id, or NULL, on every hot path. The
//! rules are SQL (`memory._chat_id_rules`: not blank, at most 256 characters, no control or
//! invisible characters, no surrounding whitespace, NFC); the common case, a plain printable
//! ASCII id, which they all accept, is decided here without them. As an inlined SQL expression
//! the check cost get() a sixth of its time, most of it compiling the expression in each
//! transaction. A pg_test holds the two to the same answers.

use pgrx::pg_sys;
use pgrx::prelude::*;

#[pg_extern(stable, parallel_safe, name = "_chat_id_problem")]
pub fn chat_id_problem(p_chat_id: Option<&str>) -> Option<String> {
    if p_chat_id.is_some_and(is_plain_ascii) {
        return None;
    }
    rules(p_chat_id)
}

/// 1 to 256 bytes of printable ASCII, without a space at either end: valid under every rule.
pub fn is_plain_ascii(id: &str) -> bool {
    let b = id.as_bytes();
    (1..=256).contains(&b.len())
        && b.iter().all(|c| (b' '..=b'~').contains(c))
        && b[0] != b' '
        && b[b.len() - 1] != b' '
}

/// memory._chat_id_rules(id), called through fmgr rather than SPI: no query to parse, nothing
/// that would need a command counter or a snapshot, so the check stays STABLE and parallel safe.
fn rules(id: Option<&str>) -> Option<String> {
    // SAFETY: the function is looked up by its full signature (it exists while the extension
    // does); the call info is set up as fmgr's InitFunctionCallInfoData would, for one argument,
    // with the default collation its regex and btrim need; a NULL result is read from isnull.
    unsafe {
        let oid = pgrx::direct_function_call::<pg_sys::Oid>(
            pg_sys::regprocedurein,
            &[c"memory._chat_id_rules(text)".into_datum()],
        )?;
        let mut flinfo = std::mem::MaybeUninit::<pg_sys::FmgrInfo>::zeroed();
        pg_sys::fmgr_info(oid, flinfo.as_mut_ptr());
        let fcinfo = pg_sys::palloc0(
            std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>()
                + std::mem::size_of::<pg_sys::NullableDatum>(),
        )
        .cast::<pg_sys::FunctionCallInfoBaseData>();
        (*fcinfo).flinfo = flinfo.as_mut_ptr();
        (*fcinfo).fncollation = pg_sys::DEFAULT_COLLATION_OID;
        (*fcinfo).nargs = 1;
        let arg = std::ptr::addr_of_mut!((*fcinfo).args).cast::<pg_sys::NullableDatum>();
        *arg = pg_sys::NullableDatum {
            value: id.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            isnull: id.is_none(),
        };
        let call = (*flinfo.as_ptr()).fn_addr.expect("fmgr_info sets fn_addr");
        // an ERROR inside becomes a Rust panic here, not a longjmp across these frames
        let result = pg_sys::ffi::pg_guard_ffi_boundary(|| call(fcinfo));
        if (*fcinfo).isnull {
            None
        } else {
            String::from_datum(result, false)
        }
    }
}
