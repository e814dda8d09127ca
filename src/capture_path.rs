//! The capture entry points, `fraiseql_capture_error()` and
//! `fraiseql_capture_message()`, written in Rust so that a capture costs little
//! more than the INSERT of its occurrence row, which is all it does:
//! validate, fingerprint, clip, and run one saved INSERT plan. It reads no
//! table and writes no shared row, so no session ever waits for another.
//!
//! Everything else is done by the fold (`fraiseql_flush_counts`,
//! sql/capture.sql) on committed occurrences: it creates a new fingerprint's
//! group (the group's id is derived from the fingerprint, see
//! `fingerprint::error_id`, so a capture knows it without the group row),
//! counts, reopens a resolved group that recurs, raises its severity, and
//! evaluates the notification rules. The occurrence row is the outbox: a
//! rolled-back capture notifies nobody, a committed one is never lost. With
//! rules, a capture wakes the worker when it commits.
//!
//! Both functions are SECURITY DEFINER C functions without a `SET
//! search_path` (its save/restore on every call cost a fifth of the capture):
//! every statement they run names the extension's schema explicitly and uses
//! no operator, so the caller's search_path cannot redirect anything.
use crate::capture::{
    clip_context, clip_text, normalize_id, validate, MAX_ENVIRONMENT_BYTES, MAX_FINGERPRINT_BYTES,
    MAX_RELEASE_BYTES, MAX_TYPE_BYTES,
};
use crate::error::ObsError;
use crate::guc;
use pgrx::prelude::*;
use pgrx::{IntoDatum, JsonB};
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::time::{Duration, Instant};

struct State {
    /// the extension's schema and its occurrence table: a DROP/CREATE
    /// EXTENSION gives new ones (and new plans)
    namespace: pg_sys::Oid,
    occurrence_table: pg_sys::Oid,
    /// capture functions already checked against the two above
    functions: Vec<pg_sys::Oid>,
    /// whether enabled notification rules exist, and when that was read
    has_rules: Option<(Instant, bool)>,
    insert_plan: pg_sys::SPIPlanPtr,
    rules_plan: pg_sys::SPIPlanPtr,
}

impl State {
    /// still the same extension instance
    unsafe fn fresh(&self) -> bool {
        unsafe { occurrence_table(self.namespace) == self.occurrence_table }
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Called by the trigger on the rules table: this backend reads again
/// whether rules exist.
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_rules_changed() {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.has_rules = None;
        }
    });
}

/// One capture's arguments, as the SQL functions receive them.
struct Args {
    exception_type: Option<pg_sys::Datum>,
    message: Option<pg_sys::Datum>,
    stack_trace: Option<pg_sys::Datum>,
    context: Option<pg_sys::Datum>,
    environment: Option<pg_sys::Datum>,
    severity: Option<pg_sys::Datum>,
    release_version: Option<pg_sys::Datum>,
    trace_id: Option<pg_sys::Datum>,
    span_id: Option<pg_sys::Datum>,
    fingerprint: Option<pg_sys::Datum>,
    occurred_at: Option<pg_sys::Datum>,
    /// stored by the worker from the shared queue: survives the caller's rollback
    autonomous: Option<pg_sys::Datum>,
    is_message: bool,
}

/// The parameters a capture function may have, by the names its SQL
/// declaration gives them (sql/capture.sql, the one place that says which
/// argument is where): each function's positions are read from its pg_proc
/// row once per backend. A name not listed here is an error at the first
/// call, not a value read from the wrong place.
const PARAMS: [&str; 12] = [
    "exception_type",
    "message",
    "stack_trace",
    "context",
    "environment",
    "severity",
    "release_version",
    "trace_id",
    "span_id",
    "fingerprint",
    "occurred_at",
    "autonomous",
];
type Positions = [Option<usize>; PARAMS.len()];

thread_local! {
    static POSITIONS: RefCell<Vec<(pg_sys::Oid, Positions)>> = const { RefCell::new(Vec::new()) };
}

/// Where each of PARAMS is in the arguments of the function being called.
unsafe fn positions(fcinfo: pg_sys::FunctionCallInfo) -> Positions {
    unsafe {
        let fn_oid = (*(*fcinfo).flinfo).fn_oid;
        if let Some(p) = POSITIONS.with(|c| {
            c.borrow()
                .iter()
                .find(|(o, _)| *o == fn_oid)
                .map(|(_, p)| *p)
        }) {
            return p;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(fn_oid),
        );
        if tuple.is_null() {
            error!("fraiseql_obs: capture function {fn_oid:?} not found");
        }
        let mut isnull = false;
        let names = pg_sys::SysCacheGetAttr(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            tuple,
            pg_sys::Anum_pg_proc_proargnames as pg_sys::AttrNumber,
            &mut isnull,
        );
        let names = Vec::<Option<String>>::from_datum(names, isnull).unwrap_or_default();
        pg_sys::ReleaseSysCache(tuple);
        let mut p: Positions = [None; PARAMS.len()];
        for (i, name) in names.iter().enumerate() {
            let name = name.as_deref().unwrap_or("");
            match PARAMS.iter().position(|k| *k == name) {
                Some(k) => p[k] = Some(i),
                None => error!(
                    "fraiseql_obs: capture function parameter \"{name}\" is unknown to the library"
                ),
            }
        }
        POSITIONS.with(|c| c.borrow_mut().push((fn_oid, p)));
        p
    }
}

/// The argument named PARAMS[k] (None: SQL NULL, or no such parameter).
unsafe fn arg(
    fcinfo: pg_sys::FunctionCallInfo,
    p: &Positions,
    name: &str,
) -> Option<pg_sys::Datum> {
    let k = PARAMS.iter().position(|n| *n == name)?;
    unsafe { p[k].and_then(|i| pgrx::fcinfo::pg_getarg_datum(fcinfo, i)) }
}

impl Args {
    /// The arguments of the capture function being called, by name. A
    /// message has no exception type (it is "Message") and no stack trace.
    unsafe fn read(fcinfo: pg_sys::FunctionCallInfo, is_message: bool) -> Args {
        unsafe {
            let p = positions(fcinfo);
            let a = |name| arg(fcinfo, &p, name);
            Args {
                exception_type: if is_message { "Message".into_datum() } else { a("exception_type") },
                message: a("message"),
                stack_trace: if is_message { None } else { a("stack_trace") },
                context: a("context"),
                environment: a("environment"),
                severity: a("severity"),
                release_version: a("release_version"),
                trace_id: a("trace_id"),
                span_id: a("span_id"),
                fingerprint: a("fingerprint"),
                occurred_at: a("occurred_at"),
                autonomous: a("autonomous"),
                is_message,
            }
        }
    }
}

unsafe fn text_of<'a>(d: Option<pg_sys::Datum>) -> Option<&'a str> {
    d.and_then(|d| unsafe { <&str>::from_datum(d, false) })
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_fraiseql_capture_error_c() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// fraiseql_capture_error(...) -> uuid (declared in sql/capture.sql)
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn fraiseql_capture_error_c(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = Args::read(fcinfo, false);
        capture(fcinfo, args)
    }
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_fraiseql_capture_message_c() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// fraiseql_capture_message(...) -> uuid (declared in sql/capture.sql)
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn fraiseql_capture_message_c(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let args = Args::read(fcinfo, true);
        capture(fcinfo, args)
    }
}

/// The root of a jsonb value: JB_FOBJECT is set for objects only.
unsafe fn jsonb_is_object(d: pg_sys::Datum) -> bool {
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        let data = pgrx::varlena::vardata_any(v) as *const u32;
        (data.read_unaligned() & pg_sys::JB_FOBJECT) != 0
    }
}

unsafe fn capture(fcinfo: pg_sys::FunctionCallInfo, a: Args) -> pg_sys::Datum {
    unsafe {
        let exception_type = text_of(a.exception_type);
        let message = text_of(a.message);
        let stack_trace = text_of(a.stack_trace);
        let severity = text_of(a.severity);
        // only a non-object needs its kind named (in the error)
        let context_kind = match a.context {
            Some(c) if !jsonb_is_object(c) => {
                pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(c)])
            }
            Some(_) => Some("object".to_string()),
            None => None,
        };
        validate(
            exception_type,
            message,
            context_kind.as_deref(),
            severity,
            a.occurred_at.is_some(),
        )
        .unwrap_or_else(|e| e.report());
        if let Some(why) = a.occurred_at.and_then(|d| {
            crate::time_window::refusal_pg(d.value() as i64, crate::time_window::Granularity::Month)
        }) {
            ObsError::invalid("occurred_at", why).report();
        }
        let (exception_type, message, _severity) = (
            exception_type.unwrap_or_default(),
            message.unwrap_or_default(),
            severity.unwrap_or_default(),
        );
        // Every text is cut to its limit before anything else looks at it
        // (fingerprinting included); a value within it is used as given,
        // without a copy.
        let clipped = |d: Option<pg_sys::Datum>, s: Option<&str>, max: usize| match s {
            Some(s) if s.len() > max => {
                let c = clip_text(s, max).into_owned();
                (c.as_str().into_datum(), Some(c))
            }
            _ => (d, None),
        };
        let (type_d, type_c) = clipped(a.exception_type, Some(exception_type), MAX_TYPE_BYTES);
        let exception_type = type_c.as_deref().unwrap_or(exception_type);
        // Scrubbed (src/scrub.rs) before they are cut, so that no part of a
        // card number survives a cut through it; as given when clean.
        let owned = |c: std::borrow::Cow<'_, str>| match c {
            std::borrow::Cow::Owned(o) => Some(o),
            std::borrow::Cow::Borrowed(_) => None,
        };
        let message_scrubbed = owned(crate::scrub::with(|sc| sc.text(message)));
        let (message_in, message) = match &message_scrubbed {
            Some(o) => (o.as_str().into_datum(), o.as_str()),
            None => (a.message, message),
        };
        let stack_scrubbed = stack_trace.and_then(|t| owned(crate::scrub::with(|sc| sc.text(t))));
        let (stack_in, stack_trace) = match &stack_scrubbed {
            Some(o) => (o.as_str().into_datum(), Some(o.as_str())),
            None => (a.stack_trace, stack_trace),
        };
        let (message_d, message_c) = clipped(
            message_in,
            Some(message),
            guc::int_value(&guc::MAX_MESSAGE_BYTES),
        );
        let message = message_c.as_deref().unwrap_or(message);
        let (stack_d, stack_c) = clipped(
            stack_in,
            stack_trace,
            guc::int_value(&guc::MAX_STACK_TRACE_BYTES),
        );
        let stack_trace = stack_c.as_deref().or(stack_trace);
        let (release_d, _) = clipped(
            a.release_version,
            text_of(a.release_version),
            MAX_RELEASE_BYTES,
        );
        let custom_fp = text_of(a.fingerprint).map(|f| clip_text(f, MAX_FINGERPRINT_BYTES));
        let environment = text_of(a.environment)
            .filter(|e| !e.is_empty())
            .map(|e| clip_text(e, MAX_ENVIRONMENT_BYTES).into_owned())
            .unwrap_or_else(guc::environment);
        // an explicit id wins over the transaction's trace context
        let id = |given: Option<&str>, setting, kind| {
            given
                .map(str::to_string)
                .or_else(|| guc::text(setting))
                .map(|v| normalize_id(&v, kind).unwrap_or_else(|e| e.report()))
        };
        let trace_id = id(text_of(a.trace_id), &guc::TRACE_ID, "trace_id");
        let span_id = id(text_of(a.span_id), &guc::SPAN_ID, "span_id");
        let context_fingerprint = a.context.and_then(|c| {
            pgrx::direct_function_call::<JsonB>(
                pg_sys::jsonb_object_field,
                &[Some(c), "fingerprint".into_datum()],
            )
        });
        let fp = crate::fingerprint::group_fingerprint(
            exception_type,
            message,
            stack_trace,
            custom_fp.as_deref(),
            context_fingerprint,
            a.is_message,
        );
        let context_d = match a.context.map(|c| crate::scrub::context(c).unwrap_or(c)) {
            None => JsonB(serde_json::json!({})).into_datum(),
            // the raw size: a compressed datum is small on disk and whole when read
            Some(c)
                if pg_sys::toast_raw_datum_size(c) > guc::int_value(&guc::MAX_CONTEXT_BYTES) =>
            {
                match JsonB::from_datum(c, false).map(|j| j.0) {
                    Some(serde_json::Value::Object(m)) => {
                        JsonB(clip_context(m, guc::int_value(&guc::MAX_CONTEXT_BYTES))).into_datum()
                    }
                    _ => Some(c),
                }
            }
            Some(c) => Some(c),
        };
        let occurred_at = a.occurred_at.unwrap_or(pg_sys::Datum::from(0));
        let error_id = crate::fingerprint::error_id(&fp);
        // a spike: counted like any other, stored without its heavy parts
        let sampled_out = crate::spike::sampled_out(&error_id);
        let (stored_message, stored_stack, stored_context) = if sampled_out {
            let light = clip_text(message, crate::spike::LIGHT_MESSAGE_BYTES);
            (light.as_ref().into_datum(), None, None)
        } else {
            (message_d, stack_d, context_d)
        };
        let row = Row {
            error_id,
            fingerprint: fp.as_str().into_datum(),
            occurred_at,
            error_type: type_d,
            message: stored_message,
            stack_trace: stored_stack,
            context: stored_context,
            severity: a.severity,
            environment: environment.as_str().into_datum(),
            release_version: release_d,
            trace_id: trace_id.as_deref().into_datum(),
            span_id: span_id.as_deref().into_datum(),
            sampled_out,
        };
        let autonomous = a.autonomous.is_some_and(|d| d.value() != 0);
        if autonomous && crate::shmem::available() {
            // not in this transaction: into the shared queue the worker
            // stores from (src/autonomous.rs), and the worker woken now
            let queued = crate::autonomous::encode(&row.queued());
            if crate::autonomous::push(pg_sys::MyDatabaseId.to_u32(), &queued) == Some(true) {
                crate::shmem::wake_fold_now();
            } else {
                warning!(
                    "fraiseql_obs: the autonomous capture queue is full; this capture was dropped (counted in fraiseql_autonomous_stats())"
                );
            }
            return pgrx::Uuid::from_bytes(error_id)
                .into_datum()
                .unwrap_or_else(|| pg_sys::Datum::from(0));
        }
        if autonomous {
            warning!(
                "fraiseql_obs: autonomous captures need shared_preload_libraries; this one is stored in the current transaction and lost if it rolls back"
            );
        }
        let fn_oid = (*(*fcinfo).flinfo).fn_oid;
        STATE.with(|s| {
            prepare_state(&mut s.borrow_mut(), fn_oid);
        });
        insert_occurrence(row);
        // Rules are evaluated by the fold, on committed rows; with rules, the
        // worker is woken when this transaction commits, so that they are
        // evaluated at once instead of at the next flush_interval.
        if has_rules() {
            crate::shmem::wake_at_commit(crate::shmem::WakeAtCommit::Fold);
        }
        pgrx::Uuid::from_bytes(error_id)
            .into_datum()
            .unwrap_or_else(|| pg_sys::Datum::from(0))
    }
}

/// The occurrence row, as datums (NULL = None), in the INSERT's order.
struct Row {
    error_id: [u8; 16],
    fingerprint: Option<pg_sys::Datum>,
    occurred_at: pg_sys::Datum,
    error_type: Option<pg_sys::Datum>,
    message: Option<pg_sys::Datum>,
    stack_trace: Option<pg_sys::Datum>,
    context: Option<pg_sys::Datum>,
    severity: Option<pg_sys::Datum>,
    environment: Option<pg_sys::Datum>,
    release_version: Option<pg_sys::Datum>,
    trace_id: Option<pg_sys::Datum>,
    span_id: Option<pg_sys::Datum>,
    /// stored without its heavy parts (spike protection)
    sampled_out: bool,
}

/// The INSERT and its parameter types, column by column: one list, so the
/// statement, its types and the values bound cannot disagree.
const COLUMNS: [(&str, pg_sys::BuiltinOid); 13] = {
    use pg_sys::BuiltinOid::*;
    [
        ("error_id", UUIDOID),
        ("fingerprint", TEXTOID),
        ("occurred_at", TIMESTAMPTZOID),
        ("error_type", TEXTOID),
        ("message", TEXTOID),
        ("stack_trace", TEXTOID),
        ("context", JSONBOID),
        ("severity", TEXTOID),
        ("environment", TEXTOID),
        ("release_version", TEXTOID),
        ("trace_id", TEXTOID),
        ("span_id", TEXTOID),
        ("sampled_out", BOOLOID),
    ]
};

/// The bytes of a text datum (as stored: no copy when not toasted).
unsafe fn text_bytes<'a>(d: Option<pg_sys::Datum>) -> Option<&'a [u8]> {
    d.map(|d| unsafe {
        let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(v).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(v),
        )
    })
}

/// A jsonb datum's whole varlena, header included.
unsafe fn varlena_bytes<'a>(d: Option<pg_sys::Datum>) -> Option<&'a [u8]> {
    d.map(|d| unsafe {
        let v = pg_sys::pg_detoast_datum(d.cast_mut_ptr());
        std::slice::from_raw_parts(v.cast::<u8>(), pgrx::varlena::varsize_any(v))
    })
}

impl Row {
    /// The row as the autonomous queue carries it (same columns).
    unsafe fn queued(&self) -> crate::autonomous::Row<'_> {
        unsafe {
            crate::autonomous::Row {
                error_id: self.error_id,
                occurred_at: self.occurred_at.value() as i64,
                sampled_out: self.sampled_out,
                context_is_text: false,
                fields: [
                    text_bytes(self.fingerprint),
                    text_bytes(self.error_type),
                    text_bytes(self.message),
                    text_bytes(self.stack_trace),
                    varlena_bytes(self.context),
                    text_bytes(self.severity),
                    text_bytes(self.environment),
                    text_bytes(self.release_version),
                    text_bytes(self.trace_id),
                    text_bytes(self.span_id),
                ],
            }
        }
    }

    /// The values, in the order of COLUMNS.
    fn values(&self) -> [Option<pg_sys::Datum>; 13] {
        [
            Some(pg_sys::Datum::from(self.error_id.as_ptr())),
            self.fingerprint,
            Some(self.occurred_at),
            self.error_type,
            self.message,
            self.stack_trace,
            self.context,
            self.severity,
            self.environment,
            self.release_version,
            self.trace_id,
            self.span_id,
            Some(pg_sys::Datum::from(self.sampled_out)),
        ]
    }
}

/// Checks that the state belongs to this extension instance (creating it,
/// or starting afresh after DROP/CREATE EXTENSION).
unsafe fn prepare_state(s: &mut Option<State>, fn_oid: pg_sys::Oid) {
    unsafe {
        if s.as_ref().is_some_and(|st| st.functions.contains(&fn_oid)) {
            return;
        }
        let namespace = pg_sys::get_func_namespace(fn_oid);
        if let Some(st) = s
            .as_mut()
            .filter(|st| st.namespace == namespace && st.fresh())
        {
            st.functions.push(fn_oid);
            return;
        }
        if let Some(old) = s.take() {
            pg_sys::SPI_freeplan(old.insert_plan);
            if !old.rules_plan.is_null() {
                pg_sys::SPI_freeplan(old.rules_plan);
            }
        }
        // (the rules' plan is made by has_rules, once it has their lock)
        let (insert_plan, rules_plan) = (prepare_plans(namespace), std::ptr::null_mut());
        *s = Some(State {
            namespace,
            occurrence_table: occurrence_table(namespace),
            functions: vec![fn_oid],
            has_rules: None,
            insert_plan,
            rules_plan,
        });
    }
}

/// How long a backend trusts what it read about the rules' existence. Only
/// the wake-up depends on it (the fold evaluates the rules in any case): a
/// rule added in another session is served at the next flush_interval
/// until then.
const RULES_KNOWN_FOR: Duration = Duration::from_secs(1);

/// Whether enabled notification rules exist (asked at most once a second).
unsafe fn has_rules() -> bool {
    let known = STATE.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|st| st.has_rules)
            .filter(|(at, _)| at.elapsed() < RULES_KNOWN_FOR)
            .map(|(_, v)| v)
    });
    if let Some(v) = known {
        return v;
    }
    unsafe {
        // A role allowed to change the rules may hold their table locked:
        // a capture never waits for it. It then takes it that rules exist
        // (the worker is woken at commit for nothing, at worst) and asks
        // again at its next capture.
        let namespace = STATE
            .with(|s| s.borrow().as_ref().map(|st| st.namespace))
            .expect("capture state");
        let rules = pg_sys::get_relname_relid(c"tb_error_notification_config".as_ptr(), namespace);
        if rules == pg_sys::InvalidOid
            || !pg_sys::ConditionalLockRelationOid(rules, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
        {
            return true;
        }
        // (prepared here, with the lock had: preparing would wait for it)
        if plan_of(|s| s.rules_plan).is_null() {
            let schema = pg_sys::get_namespace_name(namespace);
            let schema = std::ffi::CStr::from_ptr(pg_sys::quote_identifier(schema))
                .to_string_lossy()
                .into_owned();
            let sql = CString::new(RULES_SQL.replace("{schema}", &schema)).unwrap();
            pg_sys::SPI_connect();
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), 0, std::ptr::null_mut());
            if plan.is_null() {
                error!("fraiseql_obs: cannot prepare the rules statement");
            }
            pg_sys::SPI_keepplan(plan);
            pg_sys::SPI_finish();
            STATE.with(|s| {
                if let Some(st) = s.borrow_mut().as_mut() {
                    st.rules_plan = plan;
                }
            });
        }
        let plan = plan_of(|s| s.rules_plan);
        pg_sys::SPI_connect();
        let rc = pg_sys::SPI_execute_plan(plan, std::ptr::null_mut(), std::ptr::null(), true, 1);
        if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
            error!("fraiseql_obs: reading the notification rules failed (SPI code {rc})");
        }
        let table = &*pg_sys::SPI_tuptable;
        let mut isnull = false;
        let v = pg_sys::SPI_getbinval(*table.vals, table.tupdesc, 1, &mut isnull).value() != 0;
        pg_sys::SPI_finish();
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.has_rules = Some((Instant::now(), v));
            }
        });
        v
    }
}

const RULES_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM {schema}.tb_error_notification_config c WHERE c.enabled)";

unsafe fn occurrence_table(namespace: pg_sys::Oid) -> pg_sys::Oid {
    unsafe { pg_sys::get_relname_relid(c"tb_error_occurrence".as_ptr(), namespace) }
}

/// The capture's INSERT into the extension's schema (a quoted name), and its
/// parameter types: the worker stores autonomous captures with it too.
pub fn insert_statement(schema: &str) -> (String, Vec<pg_sys::Oid>) {
    let names: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
    let params: Vec<String> = (1..=COLUMNS.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "INSERT INTO {schema}.tb_error_occurrence ({}) VALUES ({})",
        names.join(", "),
        params.join(", ")
    );
    (sql, COLUMNS.iter().map(|(_, t)| t.value()).collect())
}

unsafe fn prepare_plans(namespace: pg_sys::Oid) -> pg_sys::SPIPlanPtr {
    unsafe {
        let schema = pg_sys::get_namespace_name(namespace);
        let schema = std::ffi::CStr::from_ptr(pg_sys::quote_identifier(schema))
            .to_string_lossy()
            .into_owned();
        let (insert_sql, mut insert_types) = insert_statement(&schema);
        pg_sys::SPI_connect();
        let prepare = |sql: &str, types: &mut Vec<pg_sys::Oid>| {
            let sql = CString::new(sql).unwrap();
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if plan.is_null() {
                error!("fraiseql_obs: cannot prepare the capture statement");
            }
            pg_sys::SPI_keepplan(plan);
            plan
        };
        let plan = prepare(&insert_sql, &mut insert_types);
        pg_sys::SPI_finish();
        plan
    }
}

fn nulls(values: &[Option<pg_sys::Datum>]) -> (Vec<pg_sys::Datum>, Vec<c_char>) {
    values
        .iter()
        .map(|v| match v {
            Some(d) => (*d, b' ' as c_char),
            None => (pg_sys::Datum::from(0), b'n' as c_char),
        })
        .unzip()
}

fn plan_of(pick: fn(&State) -> pg_sys::SPIPlanPtr) -> pg_sys::SPIPlanPtr {
    STATE.with(|s| pick(s.borrow().as_ref().expect("capture state")))
}

/// The whole capture: one saved INSERT.
unsafe fn insert_occurrence(row: Row) {
    unsafe {
        let (mut values, flags) = nulls(&row.values());
        let plan = plan_of(|s| s.insert_plan);
        pg_sys::SPI_connect();
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), flags.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("fraiseql_obs: storing the occurrence failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
}
