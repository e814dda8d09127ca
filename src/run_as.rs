//! Running a piece of work as another role, the way PostgreSQL's own
//! maintenance commands (VACUUM, REFRESH MATERIALIZED VIEW) run user code as a
//! table's owner: a security-restricted operation, so the code cannot
//! `SET ROLE`/`RESET ROLE` its way back, with settings of our choosing, and
//! every setting the code changes (even with a session-level `SET`) undone
//! when it returns. Otherwise a handler's `SET default_transaction_read_only
//! = on` would outlive it and break the worker's next transaction.
use pgrx::prelude::*;
use std::ffi::CStr;

/// Runs `f` as `role`, with `settings` (name, value) applied at a new GUC
/// nest level. On error the transaction's abort restores both the user and
/// the settings; the `finally` restores them on every path anyway.
pub fn as_role<R>(role: pg_sys::Oid, settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    unsafe {
        let (mut saved_user, mut saved_ctx) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
            .finally(|| {
                // false: discard what the code set, SET and SET LOCAL alike
                pg_sys::AtEOXact_GUC(false, nest);
                pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx);
            })
            .execute()
    }
}
