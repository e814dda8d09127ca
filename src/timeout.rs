//! PostgreSQL's timeouts (utils/timeout.h, not in pgrx's bindings).
//!
//! A client session's statement loop arms `statement_timeout` itself; a
//! background worker's SPI statements run outside that loop, so code that
//! needs a deadline there arms it here. Its cancel arrives as the usual
//! "canceling statement due to statement timeout" at the next interrupt
//! check.
use std::ffi::c_int;

// TimeoutId is a C enum
pub(crate) const STATEMENT_TIMEOUT: c_int = 3;
pub(crate) const USER_TIMEOUT: c_int = 12;

unsafe extern "C-unwind" {
    pub(crate) fn enable_timeout_after(id: c_int, delay_ms: c_int);
    pub(crate) fn disable_timeout(id: c_int, keep_indicator: bool);
    pub(crate) fn RegisterTimeout(id: c_int, handler: Option<unsafe extern "C-unwind" fn()>) -> c_int;
}

/// Cancels what runs after `ms` milliseconds (as statement_timeout would).
pub(crate) fn arm_statement_timeout(ms: i32) {
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        enable_timeout_after(STATEMENT_TIMEOUT, ms);
    }
}

pub(crate) fn disarm_statement_timeout() {
    unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
}
