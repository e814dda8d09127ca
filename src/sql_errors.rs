//! PostgreSQL's own errors as captures: with `fraiseql_obs.capture_sql_errors`
//! on, each ERROR (or FATAL; WARNING too if the minimum level says so) that a
//! client session reports becomes an occurrence, whoever raised it: a unique
//! violation, a deadlock, a statement timeout, a RAISE in a trigger.
//!
//! Through `emit_log_hook`, which runs while the error is being reported: the
//! transaction is failing and may hold buffer locks, so the hook reads no
//! catalog, runs no SQL and never raises. It builds the row in Rust from the
//! ErrorData and the session (its login role, database and application name
//! from the connection, the trace context from the settings) and puts it on
//! the autonomous queue (src/autonomous.rs), which the worker stores within
//! milliseconds; the error reaches the client unchanged. A full queue drops
//! the capture and counts it (`fraiseql_autonomous_stats().dropped`).
//!
//! What is stored: exception type = the SQLSTATE's condition name
//! (`unique_violation`; `statement_timeout` for a 57014 raised by
//! statement_timeout, `query_canceled` for one the user asked for), message,
//! the CONTEXT as the stack trace (frames: PL/pgSQL and SQL functions,
//! triggers, DO blocks) with the SQL it quotes normalized, and in the context
//! object the SQLSTATE, detail (without the key values or failing row it
//! quotes), hint, the schema/table/column/constraint the
//! error names, the statement with its constants replaced (no literal the
//! application sent is stored), the session's role, the role it SET ROLE
//! to, application_name and the backend pid (and the database's name, which
//! the worker adds: the hook cannot look it up).
//!
//! Never recursive: only client backends are hooked (not the worker, which
//! stores the rows), and an error raised while the hook runs is not captured
//! again. Costs one boolean test per message when off.
use crate::guc;
use fraiseql_fingerprint::sql::{
    normalize_sql, normalize_sql_with, scrub_pg_context, scrub_pg_detail, strip_double_quoted,
};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void, CStr};

/// Statement and internal query kept in the context, at most.
const MAX_STATEMENT_BYTES: usize = 4096;
/// A captured error's parts, at most (an entry stays under ~30 kB).
const MAX_HOOK_STACK_BYTES: usize = 16 * 1024;
const MAX_HOOK_CONTEXT_BYTES: usize = 8 * 1024;
const MAX_HOOK_MESSAGE_BYTES: usize = 4 * 1024;

/// ProcArrayLock (storage/lwlocknames.h: `&MainLWLockArray[4].lock`).
const PROC_ARRAY_LOCK: usize = 4;

static mut PREV_HOOK: pg_sys::emit_log_hook_type = None;

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    /// The parsed include and exclude lists (set by the settings' assign hooks).
    static INCLUDE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static EXCLUDE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Installs the hook (the library is preloaded: the queue exists).
pub fn install() {
    unsafe {
        PREV_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(hook);
    }
}

/// The SQLSTATE packed in an ErrorData (MAKE_SQLSTATE: six bits a character).
fn sqlstate(code: c_int) -> [u8; 5] {
    let mut s = [0u8; 5];
    for (i, c) in s.iter_mut().enumerate() {
        *c = (((code >> (6 * i)) & 0x3f) as u8) + b'0';
    }
    s
}

/// The condition name of a SQLSTATE (PL/pgSQL's), if PostgreSQL has one.
pub fn condition_name(code: &str) -> Option<&'static str> {
    crate::sqlstate_table::CONDITIONS
        .binary_search_by(|(c, _)| (*c).cmp(code))
        .ok()
        .map(|i| crate::sqlstate_table::CONDITIONS[i].1)
}

/// Names a list may hold besides the condition names: PostgreSQL reports a
/// statement timeout with the code of a cancellation; the capture tells them
/// apart.
const EXTRA_NAMES: [&str; 1] = ["statement_timeout"];

/// Parses an include/exclude list: SQLSTATEs (`23505`), classes (`23`) and
/// condition names, separated by commas or spaces. Err names the bad entry.
pub fn parse_list(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in s.split(|c: char| c == ',' || c.is_whitespace()) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let is_code = |len| {
            item.len() == len
                && item
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase() || c.is_ascii_lowercase())
                && item.as_bytes()[0].is_ascii_alphanumeric()
                && item.bytes().any(|c| c.is_ascii_digit())
        };
        // a class without a digit (XX internal errors, HV foreign data
        // wrappers) is one PostgreSQL has
        let known_class = item.len() == 2
            && item.bytes().all(|c| c.is_ascii_alphanumeric())
            && crate::sqlstate_table::CONDITIONS
                .iter()
                .any(|(c, _)| c.starts_with(&item.to_ascii_uppercase()));
        let entry = if is_code(5) || is_code(2) || known_class {
            item.to_ascii_uppercase()
        } else {
            let name = item.to_ascii_lowercase();
            let known = EXTRA_NAMES.contains(&name.as_str())
                || crate::sqlstate_table::CONDITIONS
                    .iter()
                    .any(|(_, n)| *n == name);
            if !known {
                return Err(format!(
                    "\"{item}\" is not a SQLSTATE (5 characters), a class (2) or a condition name such as unique_violation"
                ));
            }
            name
        };
        out.push(entry);
    }
    Ok(out)
}

fn matches(list: &[String], code: &str, name: &str) -> bool {
    list.iter()
        .any(|e| e == code || e == &code[..2] || e == name)
}

/// Whether an error of this code and exception type is captured, by the lists.
pub fn wanted(include: &[String], exclude: &[String], code: &str, name: &str) -> bool {
    (include.is_empty() || matches(include, code, name)) && !matches(exclude, code, name)
}

unsafe fn str_of<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        None
    } else {
        unsafe { CStr::from_ptr(p) }.to_str().ok()
    }
}

unsafe extern "C-unwind" fn hook(edata: *mut pg_sys::ErrorData) {
    unsafe {
        if guc::CAPTURE_SQL_ERRORS.get()
            && !edata.is_null()
            && (*edata).elevel >= min_elevel()
            // a PANIC resets shared memory anyway: touch nothing
            && (*edata).elevel < pg_sys::PANIC as c_int
            && !IN_HOOK.get()
        {
            IN_HOOK.set(true);
            // nothing may unwind out of an error report
            let _ = std::panic::catch_unwind(|| capture(&*edata));
            IN_HOOK.set(false);
        }
        if let Some(prev) = PREV_HOOK {
            prev(edata);
        }
    }
}

fn min_elevel() -> c_int {
    match guc::CAPTURE_SQL_ERRORS_MIN_LEVEL.get() {
        guc::SqlErrorLevel::Warning => pg_sys::WARNING as c_int,
        guc::SqlErrorLevel::Error => pg_sys::PGERROR as c_int,
        guc::SqlErrorLevel::Fatal => pg_sys::FATAL as c_int,
    }
}

/// A login role may capture `rate` errors a second in a database, in
/// bursts of ten seconds' worth: one role failing in a loop, over as many
/// sessions as it likes (a reconnect starts nothing afresh), cannot fill the
/// queue others share, nor the disk, nor make more than that many new
/// groups; what it loses is counted. A token bucket per (database, role) in
/// shared memory, one atomic word a slot (when it was last taken from, in
/// ms, and the tokens left, in sixteenths), no lock; two pairs may share a
/// slot, and then share its limit.
pub static ROLE_RATES: RoleRates = RoleRates(std::cell::UnsafeCell::new(std::ptr::null_mut()));
const ROLE_SLOTS: usize = 1024;
const TOKEN: u64 = 16;
const TOKENS_MAX: u64 = (1 << 24) - 1;

pub struct RoleRates(std::cell::UnsafeCell<*mut std::sync::atomic::AtomicU64>);
unsafe impl Sync for RoleRates {}

impl pgrx::shmem::PgSharedMemoryInitialization for RoleRates {
    type Value = u8;

    unsafe fn on_shmem_request(&'static self) {
        unsafe { pg_sys::RequestAddinShmemSpace(ROLE_SLOTS * size_of::<u64>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: u8) {
        unsafe {
            *self.0.get() = crate::shmem::zeroed_struct(
                c"fraiseql_obs_sql_error_rates",
                ROLE_SLOTS * size_of::<u64>(),
            )
            .cast();
        }
    }
}

/// The bucket's word after taking one token at `now_ms` (a fresh slot is
/// full), or None when it is empty (the word then stays as it is, so the
/// refill goes on counting from the last take).
fn take_from(word: u64, now_ms: u64, rate: u64) -> Option<u64> {
    let burst = (rate * 10 * TOKEN).min(TOKENS_MAX);
    let (at, tokens) = (word >> 24, word & TOKENS_MAX);
    // (the 40-bit clock wraps: elapsed time modulo 2^40; a clock set back
    // reads as a long wait, a full bucket, rather than none for ever)
    let elapsed = now_ms.wrapping_sub(at) & ((1 << 40) - 1);
    let tokens = if at == 0 {
        burst
    } else {
        let refill = elapsed.saturating_mul(rate * TOKEN) / 1000;
        tokens.saturating_add(refill).min(burst)
    };
    (tokens >= TOKEN).then(|| (now_ms.max(1) << 24) | (tokens - TOKEN))
}

fn take_token() -> bool {
    let rate = guc::CAPTURE_SQL_ERRORS_RATE.get();
    if rate <= 0 {
        return true;
    }
    let table = unsafe { *ROLE_RATES.0.get() };
    if table.is_null() || !crate::shmem::available() {
        return false;
    }
    let (db, role) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::GetSessionUserId().to_u32()) };
    let h = ((db as u64) << 32 | role as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let slot = unsafe { &*table.add((h >> 32) as usize % ROLE_SLOTS) };
    // (PostgreSQL's epoch, 2000: 40 bits of ms last until 2034 + 2000)
    let now_ms = (unsafe { pg_sys::GetCurrentTimestamp() } / 1000).max(1) as u64 & ((1 << 40) - 1);
    let mut word = slot.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        let Some(next) = take_from(word, now_ms, rate as u64) else {
            return false;
        };
        match slot.compare_exchange_weak(
            word,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(w) => word = w,
        }
    }
}

unsafe fn capture(e: &pg_sys::ErrorData) {
    unsafe {
        // client sessions of a database, errors their client is told about
        if pg_sys::MyBackendType != pg_sys::BackendType::B_BACKEND
            || pg_sys::MyDatabaseId == pg_sys::InvalidOid
            || !e.output_to_client
            || !guc::WORKER_ENABLED.get()
        {
            return;
        }
        let db = pg_sys::MyDatabaseId.to_u32();
        if !crate::shmem::extension_installed(db) {
            return;
        }
        let code_bytes = sqlstate(e.sqlerrcode);
        let code = std::str::from_utf8(&code_bytes).unwrap_or("XX000");
        // Out of memory: this process's own allocations could fail next, and
        // a Rust allocation failure aborts the backend (a crash restart of
        // the cluster) where PostgreSQL would only have raised an error.
        if code == "53200" {
            return;
        }
        let message = str_of(e.message).unwrap_or("");
        let message_id = str_of(e.message_id);
        let name = match (code, message_id) {
            ("57014", Some(id)) if id.contains("statement timeout") => "statement_timeout",
            _ => condition_name(code).unwrap_or("internal_error"),
        };
        let listed = INCLUDE.with_borrow(|inc| {
            EXCLUDE.with_borrow(|exc| wanted(inc, exc, code, name))
        });
        if !listed {
            return;
        }
        if !take_token() {
            crate::autonomous::count_dropped();
            return;
        }
        // smaller than a capture's limits: whoever can connect can raise
        // errors, and they share the queue
        let max_stack = guc::int_value(&guc::MAX_STACK_TRACE_BYTES).min(MAX_HOOK_STACK_BYTES);
        let stack_trace = str_of(e.context)
            .filter(|c| !c.trim().is_empty() && !e.hide_ctx)
            .map(|c| scrub_pg_context(c, max_stack));
        let statement = str_of(pg_sys::debug_query_string)
            .filter(|_| !e.hide_stmt)
            .map(|q| normalize_sql_with(q, MAX_STATEMENT_BYTES, pg_sys::standard_conforming_strings));
        // Grouping: the frames when the error has a CONTEXT; else the
        // message's template (PostgreSQL's untranslated format string, so
        // the values it quotes do not split the group; a RAISE's is "%s",
        // then its message) and the normalized statement.
        let fingerprint = match &stack_trace {
            Some(t) if !fraiseql_fingerprint::stacktrace::parse(t).grouping_frames().is_empty() => {
                fraiseql_fingerprint::default_fingerprint(name, message, Some(t))
            }
            _ => {
                let template = message_id.filter(|m| *m != "%s").unwrap_or(message);
                let key = format!("{template}\n{}", statement.as_deref().unwrap_or(""));
                fraiseql_fingerprint::default_fingerprint(name, &key, None)
            }
        };
        let mut ctx = serde_json::Map::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                ctx.insert(k.to_string(), serde_json::Value::String(v.to_string()));
            }
        };
        put("source", Some("postgres"));
        put("sqlstate", Some(code));
        put("detail", str_of(e.detail).map(scrub_pg_detail).as_deref());
        put("hint", str_of(e.hint));
        put("schema", str_of(e.schema_name));
        put("table", str_of(e.table_name));
        put("column", str_of(e.column_name));
        put("datatype", str_of(e.datatype_name));
        put("constraint", str_of(e.constraint_name));
        put("statement", statement.as_deref());
        put(
            "internal_query",
            str_of(e.internalquery)
                .map(|q| normalize_sql(q, MAX_STATEMENT_BYTES))
                .as_deref(),
        );
        // names as the settings hold them: no catalog lookup here
        let setting = |name: &CStr| str_of(pg_sys::GetConfigOption(name.as_ptr(), true, false));
        put("user", setting(c"session_authorization"));
        put("role", setting(c"role").filter(|r| *r != "none"));
        put("application_name", str_of(pg_sys::application_name));
        ctx.insert("backend_pid".into(), pg_sys::MyProcPid.into());
        // scrubbed like any capture (src/scrub.rs)
        let mut ctx = serde_json::Value::Object(ctx);
        crate::scrub::with(|s| s.json(&mut ctx));
        let serde_json::Value::Object(ctx) = ctx else { return };
        let context = crate::capture::clip_context(
            ctx,
            guc::int_value(&guc::MAX_CONTEXT_BYTES).min(MAX_HOOK_CONTEXT_BYTES),
        );
        let context = serde_json::to_vec(&context).unwrap_or_else(|_| b"{}".to_vec());
        let severity = if e.elevel >= pg_sys::FATAL as c_int {
            "critical"
        } else if e.elevel >= pg_sys::PGERROR as c_int {
            "error"
        } else {
            "warning"
        };
        // Messages that quote the input they refused (invalid input of any
        // type, a syntax error at a token, a column that is a misquoted
        // string) keep their words, not the value.
        let quotes_input = code.starts_with("22") || code == "42601" || code == "42703";
        let message = if quotes_input {
            std::borrow::Cow::Owned(strip_double_quoted(message))
        } else {
            std::borrow::Cow::Borrowed(message)
        };
        let message = crate::scrub::with(|s| s.text(&message).into_owned());
        let message = crate::capture::clip_text(
            if message.trim().is_empty() { name } else { &message },
            guc::int_value(&guc::MAX_MESSAGE_BYTES).min(MAX_HOOK_MESSAGE_BYTES),
        );
        let stack_trace = stack_trace.map(|t| crate::scrub::with(|s| s.text(&t).into_owned()));
        let environment = guc::environment();
        let id = |s, kind| {
            guc::text(s).and_then(|v| crate::capture::normalize_id(&v, kind).ok())
        };
        let trace_id = id(&guc::TRACE_ID, "trace_id");
        let span_id = id(&guc::SPAN_ID, "span_id");
        let error_id = crate::fingerprint::error_id(&fingerprint);
        let sampled_out = crate::spike::sampled_out(&error_id);
        let row = crate::autonomous::Row {
            error_id,
            occurred_at: pg_sys::GetCurrentTimestamp(),
            sampled_out,
            context_is_text: true,
            fields: [
                Some(fingerprint.as_bytes()),
                Some(name.as_bytes()),
                Some(message.as_bytes()),
                stack_trace.as_deref().filter(|_| !sampled_out).map(str::as_bytes),
                Some(if sampled_out { b"{}" } else { context.as_slice() }),
                Some(severity.as_bytes()),
                Some(environment.as_bytes()),
                None,
                trace_id.as_deref().map(str::as_bytes),
                span_id.as_deref().map(str::as_bytes),
            ],
        };
        let queued = crate::autonomous::encode(&row);
        // Waking looks the worker up under ProcArrayLock: not if this error
        // was raised while holding it (the worker then finds the entry at its
        // next round, flush_interval at most).
        let proc_array_lock = &raw mut (*pg_sys::MainLWLockArray.add(PROC_ARRAY_LOCK)).lock;
        if crate::autonomous::push_within(db, &queued, 0.5) == Some(true)
            && !pg_sys::LWLockHeldByMe(proc_array_lock)
        {
            crate::shmem::wake_fold_now();
        }
    }
}

// ---------------------------------------------------------------------------
// The include and exclude settings: checked when set (an unknown name is an
// error then, not a silent no-op), parsed once when assigned.
// ---------------------------------------------------------------------------

pub unsafe extern "C-unwind" fn check_list(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        let v = if newval.is_null() { None } else { str_of(*newval) };
        match parse_list(v.unwrap_or("")) {
            Ok(_) => true,
            Err(why) => {
                let why = std::ffi::CString::new(why).unwrap_or_default();
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(why.as_ptr());
                false
            }
        }
    }
}

fn assign(list: &'static std::thread::LocalKey<RefCell<Vec<String>>>, newval: *const c_char) {
    let parsed = unsafe { str_of(newval) }
        .and_then(|v| parse_list(v).ok())
        .unwrap_or_default();
    list.with_borrow_mut(|l| *l = parsed);
}

pub unsafe extern "C-unwind" fn assign_include(newval: *const c_char, _extra: *mut c_void) {
    assign(&INCLUDE, newval)
}

pub unsafe extern "C-unwind" fn assign_exclude(newval: *const c_char, _extra: *mut c_void) {
    assign(&EXCLUDE, newval)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn a_role_gets_its_rate_in_bursts_of_ten_seconds() {
        let (rate, t0) = (5u64, 1_000_000u64);
        let mut word = 0;
        let mut n = 0;
        while let Some(w) = take_from(word, t0, rate) {
            word = w;
            n += 1;
        }
        assert_eq!(n, 50);
        // one more a fifth of a second later, not before
        assert!(take_from(word, t0 + 100, rate).is_none());
        let w = take_from(word, t0 + 200, rate).unwrap();
        assert!(take_from(w, t0 + 200, rate).is_none());
        // the clock wrapping, or set back, leaves no bucket empty for ever
        let wrapped = ((1u64 << 40) - 10) << 24;
        assert!(take_from(wrapped, 1000, rate).is_some());
        assert!(take_from((t0 << 24) | 0, t0 - 1000, rate).is_some());
        // a minute idle refills to the burst, no more
        let mut word = w;
        let mut n = 0;
        while let Some(next) = take_from(word, t0 + 60_200, rate) {
            word = next;
            n += 1;
        }
        assert_eq!(n, 50);
    }

    #[test]
    fn sqlstates_unpack_and_name() {
        // MAKE_SQLSTATE('2','3','5','0','5')
        let pack = |s: &[u8; 5]| {
            s.iter()
                .enumerate()
                .map(|(i, c)| (((*c - b'0') & 0x3f) as c_int) << (6 * i))
                .sum::<c_int>()
        };
        assert_eq!(&sqlstate(pack(b"23505")), b"23505");
        assert_eq!(&sqlstate(pack(b"P0001")), b"P0001");
        assert_eq!(condition_name("23505"), Some("unique_violation"));
        assert_eq!(condition_name("22012"), Some("division_by_zero"));
        assert_eq!(condition_name("P0001"), Some("raise_exception"));
        assert_eq!(condition_name("ZZZZZ"), None);
    }

    #[test]
    fn lists_take_codes_classes_and_names() {
        let l = parse_list("23505, 22 query_canceled,Statement_Timeout").unwrap();
        assert_eq!(l, ["23505", "22", "query_canceled", "statement_timeout"]);
        assert!(parse_list("no_such_condition").unwrap_err().contains("no_such_condition"));
        assert_eq!(parse_list("XX, hv, P0001").unwrap(), ["XX", "HV", "P0001"]);
        assert!(parse_list("QQ").is_err());
        assert!(parse_list("").unwrap().is_empty());
        let exclude = parse_list("query_canceled").unwrap();
        assert!(!wanted(&[], &exclude, "57014", "query_canceled"));
        assert!(wanted(&[], &exclude, "57014", "statement_timeout"));
        let include = parse_list("23").unwrap();
        assert!(wanted(&include, &exclude, "23505", "unique_violation"));
        assert!(!wanted(&include, &exclude, "22012", "division_by_zero"));
    }
}
