//! What memory_ext does around other DDL, in every backend (a ProcessUtility hook installed
//! while preloading):
//! - `CREATE EXTENSION memory_ext` tells the launcher at COMMIT to look for databases to serve,
//!   so the new database gets its worker at once; `ALTER EXTENSION memory_ext UPDATE` and
//!   `DROP EXTENSION memory_ext` wake the database's worker, which then serves the new schema or
//!   leaves.
//! - `DROP DATABASE` and `ALTER DATABASE ... RENAME` need every other session gone: the
//!   database's worker is stopped first (and not started again for a while), so they neither
//!   wait on it nor fail because of it.

use crate::{shmem, watch};
use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

static mut PREV_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// How long a backend waits for the worker it stopped to exit.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Called from `_PG_init` while preloading.
pub fn init() {
    unsafe {
        PREV_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// What a statement means to memory_ext.
enum Ddl {
    CreateExtension,
    ChangeExtension,
    DropExtension,
    /// Drop or rename of the database with this name.
    Database(String),
    Other,
}

unsafe fn cstr(p: *const std::ffi::c_char) -> Option<&'static str> {
    (!p.is_null())
        .then(|| unsafe { CStr::from_ptr(p) }.to_str().ok())
        .flatten()
}

/// Does a DROP's object list (String nodes for extensions) name memory_ext?
unsafe fn names_memory_ext(objects: *mut pg_sys::List) -> bool {
    if objects.is_null() {
        return false;
    }
    unsafe {
        let list = &*objects;
        (0..list.length as usize).any(|i| {
            let node = (*list.elements.add(i)).ptr_value.cast::<pg_sys::Node>();
            pgrx::is_a(node, pg_sys::NodeTag::T_String)
                && cstr((*node.cast::<pg_sys::String>()).sval) == Some("memory_ext")
        })
    }
}

unsafe fn classify(stmt: *mut pg_sys::Node) -> Ddl {
    use pg_sys::NodeTag::*;
    unsafe {
        if pgrx::is_a(stmt, T_CreateExtensionStmt) {
            let s = &*stmt.cast::<pg_sys::CreateExtensionStmt>();
            if cstr(s.extname) == Some("memory_ext") {
                return Ddl::CreateExtension;
            }
        } else if pgrx::is_a(stmt, T_AlterExtensionStmt) {
            let s = &*stmt.cast::<pg_sys::AlterExtensionStmt>();
            if cstr(s.extname) == Some("memory_ext") {
                return Ddl::ChangeExtension;
            }
        } else if pgrx::is_a(stmt, T_DropStmt) {
            let s = &*stmt.cast::<pg_sys::DropStmt>();
            if s.removeType == pg_sys::ObjectType::OBJECT_EXTENSION && names_memory_ext(s.objects) {
                return Ddl::DropExtension;
            }
        } else if pgrx::is_a(stmt, T_DropdbStmt) {
            let s = &*stmt.cast::<pg_sys::DropdbStmt>();
            if let Some(name) = cstr(s.dbname) {
                return Ddl::Database(name.to_string());
            }
        } else if pgrx::is_a(stmt, T_RenameStmt) {
            let s = &*stmt.cast::<pg_sys::RenameStmt>();
            if s.renameType == pg_sys::ObjectType::OBJECT_DATABASE
                && let Some(name) = cstr(s.subname)
            {
                return Ddl::Database(name.to_string());
            }
        }
    }
    Ddl::Other
}

/// May the current user drop or rename the database (its owner, or a superuser)?
fn owns_database(oid: pg_sys::Oid) -> bool {
    let me = unsafe { pg_sys::GetUserId() };
    #[cfg(feature = "pg15")]
    return unsafe { pg_sys::pg_database_ownercheck(oid, me) };
    #[cfg(not(feature = "pg15"))]
    return unsafe { pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, me) };
}

/// Stop the worker serving database `name` and wait (at most [`STOP_WAIT`]) until it is gone.
fn stop_worker_of(name: &str) {
    let Some(sh) = shmem::get() else { return };
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return;
    };
    let oid = unsafe { pg_sys::get_database_oid(c_name.as_ptr(), true) };
    // Only for whoever may drop or rename it: a refused attempt must not stop anything.
    if oid == pg_sys::InvalidOid || !owns_database(oid) {
        return;
    }
    let Some(slot) = sh.serving(oid.to_u32()) else {
        return;
    };
    // Marked before the pid is read; a starting worker publishes its pid before it reads the
    // mark (both SeqCst): either we see its pid, or it sees the mark and does not connect.
    slot.stopped_for_ddl_at
        .store(shmem::now(), Ordering::SeqCst);
    let pid = slot.worker_pid.load(Ordering::SeqCst);
    // The slot may have been given to another database meanwhile: then leave its worker be.
    if slot.database_oid.load(Ordering::Acquire) == oid.to_u32() {
        slot.terminate_worker(pid, STOP_WAIT);
        // and its helpers, which registered before they connected (the same protocol)
        slot.terminate_helpers(STOP_WAIT);
    }
}

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)] // the hook's signature
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let ddl = unsafe { classify((*pstmt).utilityStmt) };
    match &ddl {
        Ddl::Database(name) => stop_worker_of(name),
        Ddl::DropExtension => watch::unwatch_all_before_drop(),
        _ => {}
    }
    // The previous hook, else the standard processing: one of them must run the statement.
    macro_rules! run_with {
        ($next:expr) => {
            $next(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            )
        };
    }
    unsafe {
        match PREV_HOOK {
            Some(prev) => run_with!(prev),
            None => run_with!(pg_sys::standard_ProcessUtility),
        }
    }
    match ddl {
        Ddl::CreateExtension => {
            shmem::rescan_at_commit();
            shmem::wake_at_commit();
        }
        Ddl::ChangeExtension | Ddl::DropExtension => shmem::wake_at_commit(),
        _ => {}
    }
}
