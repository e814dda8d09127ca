//! Custom channels: a handler function registered with
//! `fraiseql_register_channel()` runs **as the owner of that function**, as
//! pg_cron runs a job as its owner, never as the worker's superuser: inside a
//! security-restricted operation (it cannot `SET ROLE` or `RESET ROLE` its
//! way back), with a statement timeout and a lock timeout, in a transaction
//! of its own (its errors are a failed delivery, nothing else).
use crate::guc;
use pgrx::prelude::*;
use serde_json::Value;
use std::ffi::CString;

// utils/timeout.h (not in pgrx's bindings); TimeoutId is a C enum
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// What the handler said: (success, error message).
pub type Answer = (bool, Option<String>);

/// Runs in the caller's transaction (the worker opens one per call).
pub fn call(handler: &str, payload: &Value, config: &Value) -> Result<Answer, String> {
    // Resolved with the worker's search_path (pg_catalog only): the name is
    // schema-qualified, the owner read from the catalog.
    let found = Spi::get_two_with_args::<String, pg_sys::Oid>(
        "SELECT p.oid::regproc::text, p.proowner FROM pg_catalog.pg_proc p WHERE p.oid = $1::pg_catalog.regprocedure",
        &[handler.into()],
    )
    .map_err(|e| e.to_string())?;
    let (Some(name), Some(owner)) = found else {
        return Err(format!("handler {handler} does not exist"));
    };
    let timeout_ms = guc::NOTIFY_TIMEOUT_MS.get().max(1);
    let sql = format!("SELECT pg_catalog.to_jsonb(h) FROM {name}($1, $2) AS h");
    let (payload, config) = (pgrx::JsonB(payload.clone()), pgrx::JsonB(config.clone()));
    let answer = unsafe {
        let (mut saved_user, mut saved_ctx) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_ctx
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        let timeout = CString::new(timeout_ms.to_string()).unwrap_or_default();
        for (k, v) in [
            (c"lock_timeout", timeout.as_c_str()),
            // the handler's own objects resolve as in a session of its owner
            (c"search_path", c"\"$user\", public"),
        ] {
            pg_sys::set_config_option(
                k.as_ptr(),
                v.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        // SPI arms no statement timeout (only a client's statement does):
        // armed here, and disarmed whatever happens, so that it can never
        // fire later in the worker's loop. An error aborts the worker's
        // transaction, which restores the user and the settings.
        enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms);
        let r = pgrx::PgTryBuilder::new(|| {
            Spi::get_one_with_args::<pgrx::JsonB>(&sql, &[payload.into(), config.into()])
        })
        .finally(|| disable_timeout(STATEMENT_TIMEOUT, false))
        .execute();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx);
        r
    };
    let v = answer
        .map_err(|e| e.to_string())?
        .map(|j| j.0)
        .unwrap_or(Value::Null);
    let ok = v
        .get("success")
        .or_else(|| v.get("f1"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let err = v
        .get("error_message")
        .or_else(|| v.get("f2"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((ok, err))
}
