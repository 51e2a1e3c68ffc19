//! Who is calling: `memory.current_identity()`, on every hot path (enqueue, get(), context(),
//! captured rows). It was an inlined SQL expression, which plpgsql compiles anew in every
//! transaction: that set-up alone cost get() about as much as reading the chat. The SQL
//! `memory._jwt_sub()` and `memory._invoker()` stay, and a pg_test holds this to them.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

/// The JWT `sub` claim as it is (trimmed of spaces), NULL when it poses as a role (`role:...`:
/// it could pose as one), else `role:<invoker>`. Two namespaces that never collide.
#[pg_extern(stable, parallel_safe, name = "current_identity")]
fn current_identity() -> Option<String> {
    match jwt_sub() {
        Some(sub) if sub.starts_with("role:") => None,
        Some(sub) => Some(sub),
        None => Some(format!("role:{}", invoker())),
    }
}

/// The `sub` claim of request.jwt.claims, as `memory._jwt_sub()` reads it: through
/// PostgreSQL's own jsonb input, so malformed claims raise the same error, and a number or an
/// object reads as the same text.
fn jwt_sub() -> Option<String> {
    let claims = setting(c"request.jwt.claims")?;
    if claims.is_empty() {
        return None;
    }
    // SAFETY: both are plain fmgr functions of their arguments (no flinfo); a NULL result (no
    // `sub`, JSON null, not an object) comes back as None.
    let sub = unsafe {
        let jsonb = pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[claims.into_datum()])?;
        pgrx::direct_function_call::<String>(
            pg_sys::jsonb_object_field_text,
            &[Some(jsonb), "sub".into_datum()],
        )?
    };
    let sub = sub.trim_matches(' ');
    (!sub.is_empty()).then(|| sub.to_owned())
}

/// SET ROLE's role (PostgREST's SET LOCAL ROLE from the JWT), else the session user: not
/// current_user, which is the definer inside SECURITY DEFINER functions.
fn invoker() -> String {
    if let Some(role) = setting(c"role")
        && role.to_bytes() != b"none"
    {
        return role.to_string_lossy().into_owned();
    }
    // SAFETY: the session user exists for the session's life (noerr = false raises otherwise).
    unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false)) }
        .to_string_lossy()
        .into_owned()
}

/// A setting as SHOW gives it (show hooks applied, as current_setting() does), or None when it
/// does not exist. The string is palloc'd in the current memory context: valid for this call.
fn setting<'a>(name: &CStr) -> Option<&'a CStr> {
    // SAFETY: name is NUL-terminated; missing_ok returns NULL rather than raising.
    unsafe {
        let value = pg_sys::GetConfigOptionByName(name.as_ptr(), std::ptr::null_mut(), true);
        (!value.is_null()).then(|| CStr::from_ptr(value))
    }
}
