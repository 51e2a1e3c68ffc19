//! Who is calling: `memory.current_identity()` and `memory._is_admin()`, on every hot path
//! (enqueue, get(), context(), captured rows, the RLS policies). current_identity() was an
//! inlined SQL expression, which plpgsql compiles anew in every transaction: that set-up alone
//! cost get() about as much as reading the chat; _is_admin() was a plpgsql query of the catalog,
//! a seventh of a captured insert. The SQL stays the reference (`_jwt_sub()`, `_invoker()`,
//! `_is_admin_catalog()`), and pg_tests hold these to it.

use crate::api;
use crate::error::ApiError;
use crate::spi;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// The JWT `sub` claim as it is (trimmed of spaces), NULL when it poses as a role (`role:...`:
/// it could pose as one), else `role:<invoker>`. Two namespaces that never collide.
#[pg_extern(stable, parallel_safe, name = "current_identity")]
pub fn current_identity() -> Option<String> {
    match jwt_sub() {
        Some(sub) if sub.starts_with("role:") => None,
        Some(sub) => Some(sub),
        None => Some(format!("role:{}", invoker())),
    }
}

/// Admins see and act on every chat: superusers and members of memory_ext.admin_role (default
/// service_role) are answered here, without a query; the extension owner's members and members
/// of roles given grant_admin() by `memory._is_admin_catalog()`, which reads the catalog and
/// memory.admin_roles with definer rights. Membership as pg_has_role(..., 'MEMBER') has it.
#[pg_extern(stable, parallel_safe, name = "_is_admin")]
pub fn is_admin() -> bool {
    let role = role_oid(&invoker());
    if role != pg_sys::InvalidOid {
        // SAFETY: plain catalog lookups of existing roles.
        if unsafe { pg_sys::superuser_arg(role) } {
            return true;
        }
        let admin = role_oid(&api::admin_role());
        if admin != pg_sys::InvalidOid && unsafe { pg_sys::is_member_of_role(role, admin) } {
            return true;
        }
    }
    spi::read_one::<bool>("SELECT memory._is_admin_catalog()", &[])
        .unwrap_or_else(|e| ApiError::from(e).raise())
        .unwrap_or(false)
}

/// A role's oid, or InvalidOid when there is no such role.
fn role_oid(name: &str) -> pg_sys::Oid {
    match CString::new(name) {
        // SAFETY: missing_ok returns InvalidOid rather than raising.
        Ok(name) if !name.is_empty() => unsafe { pg_sys::get_role_oid(name.as_ptr(), true) },
        _ => pg_sys::InvalidOid,
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
    // SAFETY: both are plain fmgr functions of their arguments (no flinfo, no collation); a NULL
    // result (no `sub`, JSON null, not an object) comes back as None. The text they return is
    // checked to be UTF-8 before it is read as a str.
    let sub = unsafe {
        let jsonb = pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[claims.into_datum()])?;
        let sub = pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_object_field_text,
            &[Some(jsonb), "sub".into_datum()],
        )?;
        utf8(
            pgrx::varlena::text_to_rust_str(sub.cast_mut_ptr()).ok(),
            "the JWT sub claim",
        )
    };
    let sub = sub.trim_matches(' ');
    (!sub.is_empty()).then(|| sub.to_owned())
}

/// SET ROLE's role (PostgREST's SET LOCAL ROLE from the JWT), else the session user: not
/// current_user, which is the definer inside SECURITY DEFINER functions.
pub fn invoker() -> String {
    let role = match setting(c"role") {
        Some(role) if role.to_bytes() != b"none" => role,
        // SAFETY: the session user exists for the session's life (noerr = false raises otherwise).
        _ => unsafe {
            CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false))
        },
    };
    utf8(role.to_str().ok(), "the role name").to_owned()
}

/// Identities are compared as text: bytes that are not UTF-8 (a role name made in a database of
/// another encoding) are refused rather than mapped, so two names can never read as one.
fn utf8<'a>(s: Option<&'a str>, what: &'static str) -> &'a str {
    s.unwrap_or_else(|| ApiError::NotUtf8(what).raise())
}

/// A setting as SHOW gives it (show hooks applied, as current_setting() does), or None when it
/// does not exist. The string is palloc'd in the current memory context: valid for this call,
/// which is all the callers above keep it.
fn setting(name: &CStr) -> Option<&CStr> {
    // SAFETY: name is NUL-terminated; missing_ok returns NULL rather than raising.
    unsafe {
        let value = pg_sys::GetConfigOptionByName(name.as_ptr(), std::ptr::null_mut(), true);
        (!value.is_null()).then(|| CStr::from_ptr(value))
    }
}
