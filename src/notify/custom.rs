//! Custom channels: a handler function registered with
//! `fraiseql_register_channel()` runs **as the owner of that function**, as
//! pg_cron runs a job as its owner, never as the worker's superuser: inside a
//! security-restricted operation (it cannot `SET ROLE` or `RESET ROLE` its
//! way back), with a statement timeout and a lock timeout, in a transaction
//! of its own (its errors are a failed delivery, nothing else).
use crate::guc;
use pgrx::prelude::*;
use serde_json::Value;
use std::ffi::{c_int, CString};

use crate::timeout::{disable_timeout, enable_timeout_after, RegisterTimeout, STATEMENT_TIMEOUT, USER_TIMEOUT};

/// The hard deadline. PL/pgSQL can catch the statement timeout's cancel
/// (`EXCEPTION WHEN query_canceled`) and go on; a handler that does is not
/// allowed to keep the worker. At twice its timeout plus a second the
/// worker process ends exactly as on SIGTERM, by a FATAL that no handler can
/// catch; the launcher starts it again, and the delivery, whose outcome was
/// never recorded, counts as a failed attempt when its lease runs out
/// (`_fraiseql_claim_deliveries`), so a handler that always hangs fails
/// after `notify_max_attempts` like any other.
mod deadline {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::Mutex;

    static ID: AtomicI32 = AtomicI32::new(-1);
    static FIRED: AtomicBool = AtomicBool::new(false);
    /// the handler running, for the log line at exit
    static HANDLER: Mutex<String> = Mutex::new(String::new());

    /// Runs in the signal handler: only sets flags, as `die()` does.
    unsafe extern "C-unwind" fn fire() {
        FIRED.store(true, Ordering::Relaxed);
        unsafe {
            pg_sys::ProcDiePending = 1;
            pg_sys::InterruptPending = 1;
            pg_sys::SetLatch(pg_sys::MyLatch);
        }
    }

    /// At exit: says why, since the FATAL itself reads "due to
    /// administrator command".
    #[pg_guard]
    unsafe extern "C-unwind" fn explain(_code: c_int, _arg: pg_sys::Datum) {
        if FIRED.load(Ordering::Relaxed) {
            let handler = HANDLER.lock().map(|h| h.clone()).unwrap_or_default();
            log!(
                "fraiseql_obs: custom channel handler {handler} went on past its statement timeout; \
                 the worker was ended at its hard deadline (the delivery counts as a failed attempt)"
            );
        }
    }

    pub unsafe fn arm(handler: &str, timeout_ms: c_int) {
        if let Ok(mut h) = HANDLER.lock() {
            h.clear();
            h.push_str(handler);
        }
        unsafe {
            let mut id = ID.load(Ordering::Relaxed);
            if id < 0 {
                id = RegisterTimeout(USER_TIMEOUT, Some(fire));
                ID.store(id, Ordering::Relaxed);
                pg_sys::before_shmem_exit(Some(explain), pg_sys::Datum::from(0));
            }
            enable_timeout_after(id, timeout_ms.saturating_mul(2).saturating_add(1000));
        }
    }

    pub unsafe fn disarm() {
        let id = ID.load(Ordering::Relaxed);
        if id >= 0 {
            unsafe { disable_timeout(id, false) };
        }
    }
}

/// What the handler said: (success, error message).
pub type Answer = (bool, Option<String>);

/// Runs in the caller's transaction (the worker opens one per call).
pub fn call(handler: &str, payload: &Value, config: &Value) -> Result<Answer, String> {
    // Resolved with the worker's search_path (pg_catalog only): the name is
    // schema-qualified, the owner read from the catalog.
    let found = crate::sql::two::<String, pg_sys::Oid>(
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
    let timeout = CString::new(timeout_ms.to_string()).unwrap_or_default();
    let settings = [
        (c"lock_timeout", timeout.as_c_str()),
        // the handler's own objects resolve as in a session of its owner
        (c"search_path", c"\"$user\", public"),
    ];
    let answer = crate::run_as::as_role(owner, &settings, || {
        // SPI arms no statement timeout (only a client's statement does):
        // armed here, and disarmed whatever happens, so that it can never
        // fire later in the worker's loop. A handler that catches the
        // cancel (EXCEPTION WHEN query_canceled) and goes on meets the hard
        // deadline: see `deadline`.
        unsafe {
            enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms);
            deadline::arm(&name, timeout_ms);
        }
        pgrx::PgTryBuilder::new(|| {
            Spi::get_one_with_args::<pgrx::JsonB>(&sql, &[payload.into(), config.into()])
        })
        .finally(|| unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            deadline::disarm();
        })
        .execute()
    });
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
