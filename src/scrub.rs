//! Server-side scrubbing settings (the scrubber itself is pure:
//! crates/fingerprint/src/scrub.rs). Applied by every capture path before
//! the row exists: SQL captures (src/capture_path.rs), autonomous ones (the
//! same code) and PostgreSQL's own errors (src/sql_errors.rs); notification
//! payloads and the delivery log are built from the stored rows.
//!
//! Superuser settings: a capturing role must not switch scrubbing off.
use fraiseql_fingerprint::scrub::{parse_keys, Scrubber};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};

thread_local! {
    /// As the settings say (kept up to date by their assign hooks).
    static SCRUBBER: RefCell<Scrubber> = RefCell::new(Scrubber { defaults: true, ..Default::default() });
}

/// Runs `f` with the session's scrubber.
pub fn with<R>(f: impl FnOnce(&Scrubber) -> R) -> R {
    SCRUBBER.with_borrow(f)
}

fn keys_of(newval: *const c_char) -> Vec<String> {
    if newval.is_null() {
        return Vec::new();
    }
    parse_keys(&unsafe { CStr::from_ptr(newval) }.to_string_lossy())
}

pub unsafe extern "C-unwind" fn assign_defaults(newval: bool, _extra: *mut c_void) {
    SCRUBBER.with_borrow_mut(|s| s.defaults = newval);
}

pub unsafe extern "C-unwind" fn assign_fields(newval: *const c_char, _extra: *mut c_void) {
    let keys = keys_of(newval);
    SCRUBBER.with_borrow_mut(|s| s.extra = keys);
}

pub unsafe extern "C-unwind" fn assign_exclude(newval: *const c_char, _extra: *mut c_void) {
    let keys = keys_of(newval);
    SCRUBBER.with_borrow_mut(|s| s.exclude = keys);
}

/// A jsonb context scrubbed: None when nothing in it needed it (the datum
/// is stored as given), else the new datum.
pub unsafe fn context(d: pg_sys::Datum) -> Option<pg_sys::Datum> {
    use pgrx::IntoDatum;
    unsafe {
        if with(|s| s.is_off()) {
            return None;
        }
        // one serialization to look (most contexts hold nothing to scrub)
        let text = pgrx::direct_function_call::<&std::ffi::CStr>(pg_sys::jsonb_out, &[Some(d)])?;
        let text = text.to_str().ok()?;
        if !with(|s| s.may_need(text)) {
            return None;
        }
        // (parsed from that text, never panicking: JsonB::from_datum would,
        // on a number out of f64's range or a nesting deeper than serde's
        // limit; such a context, if it may hold a secret, is not kept)
        let mut v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => serde_json::json!({
                "_fraiseql_scrubbed": "the context could not be read to scrub it, and was not stored"
            }),
        };
        if with(|s| s.json(&mut v)) || v.get("_fraiseql_scrubbed").is_some() {
            pgrx::JsonB(v).into_datum()
        } else {
            None
        }
    }
}
