//! Settings (GUCs). All are `fraiseql_obs.*`; see README "Settings".
//!
//! Worker timing settings are reloadable (SIGHUP / pg_reload_conf()).
//! Retention and limits can also be SET by a superuser in a session, which
//! the manual maintenance functions then honour.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

pub static ENVIRONMENT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"production"));
pub static TRACE_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SPAN_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub static WORKER_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static MAINTENANCE_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static LAUNCHER_NAPTIME_S: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(4);
pub static WORKER_IDLE_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(30);

pub static PREMAKE_MONTHS: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static PREMAKE_DAYS: GucSetting<i32> = GucSetting::<i32>::new(7);
pub static ERROR_RETENTION_MONTHS: GucSetting<i32> = GucSetting::<i32>::new(6);
pub static NOTIFICATION_LOG_RETENTION_MONTHS: GucSetting<i32> = GucSetting::<i32>::new(6);
pub static TRACE_RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static METRIC_RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(7);
pub static DDL_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static RULES_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

pub static NOTIFY_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static NOTIFY_RETRY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static NOTIFY_CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static NOTIFY_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static NOTIFY_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static NOTIFY_ALLOWED_EMAIL_DOMAINS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"*"));
pub static NOTIFY_ALLOWED_HOSTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"*"));

pub static TLS_CA_DIRECTORY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_MESSAGE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);
pub static MAX_STACK_TRACE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(256 * 1024);
pub static MAX_CONTEXT_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static SPIKE_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static AUTONOMOUS_QUEUE_KB: GucSetting<i32> = GucSetting::<i32>::new(4096);

// The HTTP service (src/http_service.rs)
pub static HTTP_LISTEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static HTTP_PUBLIC_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static HTTP_MAX_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static HTTP_MAX_CONNECTIONS_PER_CLIENT: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static HTTP_MAX_EVENT_KB: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static HTTP_MAX_ENVELOPE_KB: GucSetting<i32> = GucSetting::<i32>::new(20 * 1024);

// Server-side scrubbing (src/scrub.rs)
pub static SCRUB_DEFAULTS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static SCRUB_FIELDS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static SCRUB_EXCLUDE_FIELDS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));

// PostgreSQL's own errors as captures (src/sql_errors.rs)
pub static CAPTURE_SQL_ERRORS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static CAPTURE_SQL_ERRORS_RATE: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static CAPTURE_SQL_ERRORS_MIN_LEVEL: GucSetting<SqlErrorLevel> =
    GucSetting::<SqlErrorLevel>::new(SqlErrorLevel::Error);
pub static CAPTURE_SQL_ERRORS_INCLUDE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static CAPTURE_SQL_ERRORS_EXCLUDE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"query_canceled, admin_shutdown"));

#[derive(Clone, Copy, PartialEq, Eq, pgrx::PostgresGucEnum)]
pub enum SqlErrorLevel {
    #[name = c"warning"]
    Warning,
    #[name = c"error"]
    Error,
    #[name = c"fatal"]
    Fatal,
}

fn int(
    name: &'static CStr,
    desc: &'static CStr,
    s: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    ctx: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_int_guc(name, desc, desc, s, min, max, ctx, flags);
}

pub fn define() {
    GucRegistry::define_string_guc(
        c"fraiseql_obs.environment",
        c"Environment recorded with captures that do not name one.",
        c"Environment recorded with captures that do not name one.",
        &ENVIRONMENT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fraiseql_obs.trace_id",
        c"Trace id of the current transaction (set by fraiseql_set_trace_context).",
        c"Trace id of the current transaction (set by fraiseql_set_trace_context).",
        &TRACE_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fraiseql_obs.span_id",
        c"Span id of the current transaction (set by fraiseql_set_trace_context).",
        c"Span id of the current transaction (set by fraiseql_set_trace_context).",
        &SPAN_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"fraiseql_obs.worker_enabled",
        c"Whether the background worker runs maintenance and flushes counters.",
        c"Whether the background worker runs maintenance and flushes counters.",
        &WORKER_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.maintenance_interval",
        c"Time between two maintenance runs of the worker.",
        &MAINTENANCE_INTERVAL_S,
        1,
        7 * 86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    int(
        c"fraiseql_obs.flush_interval",
        c"Time between two folds of the occurrence counters.",
        &FLUSH_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    int(
        c"fraiseql_obs.launcher_naptime",
        c"How often the launcher looks for databases to serve.",
        &LAUNCHER_NAPTIME_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    int(
        c"fraiseql_obs.max_workers",
        c"Database workers running at once, over all databases (each takes a max_worker_processes slot).",
        &MAX_WORKERS,
        1,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.worker_idle_timeout",
        c"A database worker with nothing to do for this long exits (its database is served again when needed).",
        &WORKER_IDLE_TIMEOUT_S,
        1,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    int(
        c"fraiseql_obs.premake_months",
        c"Monthly partitions created ahead of the current month.",
        &PREMAKE_MONTHS,
        0,
        120,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.premake_days",
        c"Daily partitions created ahead of the current day.",
        &PREMAKE_DAYS,
        0,
        366,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.error_retention_months",
        c"Months of error occurrences kept (0 keeps forever).",
        &ERROR_RETENTION_MONTHS,
        0,
        1200,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.notification_log_retention_months",
        c"Months of notification log kept (0 keeps forever).",
        &NOTIFICATION_LOG_RETENTION_MONTHS,
        0,
        1200,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.trace_retention_days",
        c"Days of spans kept (0 keeps forever).",
        &TRACE_RETENTION_DAYS,
        0,
        36600,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.metric_retention_days",
        c"Days of raw metric values kept (0 keeps forever); series totals are kept regardless.",
        &METRIC_RETENTION_DAYS,
        0,
        36600,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(c"fraiseql_obs.ddl_lock_timeout", c"lock_timeout of maintenance DDL; a table whose lock is not had in time is retried next run.",
        &DDL_LOCK_TIMEOUT_MS, 1, 600_000, GucContext::Suset, GucFlags::UNIT_MS);
    int(c"fraiseql_obs.rules_timeout",
        c"Time the worker's fold gives the notification rules (all of them, then each alone if they ran out); a rule past it is skipped for that fold.",
        &RULES_TIMEOUT_MS, 100, 3_600_000, GucContext::Sighup, GucFlags::UNIT_MS);
    int(
        c"fraiseql_obs.notification_max_attempts",
        c"Attempts per notification before it is logged as failed.",
        &NOTIFY_MAX_ATTEMPTS,
        1,
        100,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.notification_retry_interval",
        c"Wait before the first retry; doubles at each attempt (at most 1 h).",
        &NOTIFY_RETRY_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    int(
        c"fraiseql_obs.notification_connect_timeout",
        c"Connect timeout of a delivery.",
        &NOTIFY_CONNECT_TIMEOUT_MS,
        10,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    int(
        c"fraiseql_obs.notification_timeout",
        c"Total timeout of a delivery: a hung endpoint delays others by no more.",
        &NOTIFY_TIMEOUT_MS,
        10,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    int(
        c"fraiseql_obs.notification_batch_size",
        c"Deliveries claimed per round.",
        &NOTIFY_BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fraiseql_obs.notification_allowed_hosts",
        c"Hosts notifications may be sent to: * for any, or a comma-separated list (*.example.com for a domain).",
        c"Hosts notifications may be sent to: * for any, or a comma-separated list (*.example.com for a domain).",
        &NOTIFY_ALLOWED_HOSTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fraiseql_obs.notification_allowed_email_domains",
        c"Domains e-mail notifications may be sent to: * for any, or a comma-separated list (*.example.com for its subdomains too).",
        c"A rule writer chooses its recipients; with the channel's SMTP login it sends as the team: this keeps that within the team's domains.",
        &NOTIFY_ALLOWED_EMAIL_DOMAINS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"fraiseql_obs.tls_ca_directory",
        c"Directory of CA files that e-mail rules may name by tls_ca_file (file names only). Empty: none.",
        c"Only a superuser sets it (postgresql.conf): rules never name a path on the server.",
        &TLS_CA_DIRECTORY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    int(
        c"fraiseql_obs.max_message_bytes",
        c"Messages longer than this are truncated, with a marker.",
        &MAX_MESSAGE_BYTES,
        256,
        100 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.max_stack_trace_bytes",
        c"Stack traces longer than this are truncated, with a marker.",
        &MAX_STACK_TRACE_BYTES,
        1024,
        100 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.max_context_bytes",
        c"Contexts larger than this are reduced, with a marker.",
        &MAX_CONTEXT_BYTES,
        256,
        100 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.spike_threshold",
        c"Occurrences of one group per minute stored whole; beyond, 1 in 100 (all are counted). 0: no limit.",
        &SPIKE_THRESHOLD,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    // Scrubbing: superuser settings, so that a capturing role cannot turn
    // it off for its own captures.
    unsafe {
        GucRegistry::define_bool_guc_with_hooks(
            c"fraiseql_obs.scrub_defaults",
            c"Scrub keys named like passwords, secrets, tokens, cookies and sessions, and card numbers, before storing.",
            c"Scrub keys named like passwords, secrets, tokens, cookies and sessions, and card numbers, before storing.",
            &SCRUB_DEFAULTS,
            GucContext::Suset,
            GucFlags::default(),
            None,
            Some(crate::scrub::assign_defaults),
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"fraiseql_obs.scrub_fields",
            c"More key names (substrings) whose values are scrubbed before storing.",
            c"More key names (substrings) whose values are scrubbed before storing.",
            &SCRUB_FIELDS,
            GucContext::Suset,
            GucFlags::default(),
            None,
            Some(crate::scrub::assign_fields),
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"fraiseql_obs.scrub_exclude_fields",
            c"Key names (exact) never scrubbed.",
            c"Key names (exact) never scrubbed.",
            &SCRUB_EXCLUDE_FIELDS,
            GucContext::Suset,
            GucFlags::default(),
            None,
            Some(crate::scrub::assign_exclude),
            None,
        );
    }
    // Superuser settings (ALTER DATABASE / ALTER ROLE ... SET by a
    // superuser, or GRANT SET ON PARAMETER): a role must not switch off the
    // capture of its own errors, nor flood the queue others share.
    GucRegistry::define_bool_guc(
        c"fraiseql_obs.capture_sql_errors",
        c"Capture the errors PostgreSQL reports to client sessions (needs shared_preload_libraries).",
        c"Capture the errors PostgreSQL reports to client sessions (needs shared_preload_libraries).",
        &CAPTURE_SQL_ERRORS,
        GucContext::Suset,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.capture_sql_errors_rate_limit",
        c"PostgreSQL errors one login role may capture per second in a database, over all its sessions (bursts of ten seconds' worth); beyond, counted as dropped. 0: no limit.",
        &CAPTURE_SQL_ERRORS_RATE,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"fraiseql_obs.capture_sql_errors_min_level",
        c"Lowest level captured by capture_sql_errors: warning, error or fatal.",
        c"Lowest level captured by capture_sql_errors: warning, error or fatal.",
        &CAPTURE_SQL_ERRORS_MIN_LEVEL,
        GucContext::Suset,
        GucFlags::default(),
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"fraiseql_obs.capture_sql_errors_include",
            c"SQLSTATEs, classes or condition names captured by capture_sql_errors (empty: all).",
            c"SQLSTATEs, classes or condition names captured by capture_sql_errors (empty: all).",
            &CAPTURE_SQL_ERRORS_INCLUDE,
            GucContext::Suset,
            GucFlags::default(),
            Some(crate::sql_errors::check_list),
            Some(crate::sql_errors::assign_include),
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"fraiseql_obs.capture_sql_errors_exclude",
            c"SQLSTATEs, classes or condition names capture_sql_errors ignores.",
            c"SQLSTATEs, classes or condition names capture_sql_errors ignores.",
            &CAPTURE_SQL_ERRORS_EXCLUDE,
            GucContext::Suset,
            GucFlags::default(),
            Some(crate::sql_errors::check_list),
            Some(crate::sql_errors::assign_exclude),
            None,
        );
    }
    // (a server-start setting can only be defined while preloading; loaded
    // later, the library has no queue anyway)
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        int(
            c"fraiseql_obs.autonomous_queue_size",
            c"Shared memory for autonomous captures waiting for the worker, in kB (server start).",
            &AUTONOMOUS_QUEUE_KB,
            64,
            1024 * 1024,
            GucContext::Postmaster,
            GucFlags::UNIT_KB,
        );
    }
    GucRegistry::define_string_guc(
        c"fraiseql_obs.http_public_url",
        c"The URL SDKs reach this database's HTTP service by (behind a proxy or TLS terminator); DSNs are made with it.",
        c"The URL SDKs reach this database's HTTP service by (behind a proxy or TLS terminator); DSNs are made with it.",
        &HTTP_PUBLIC_URL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    int(
        c"fraiseql_obs.http_max_event_size",
        c"Largest Sentry event accepted, decompressed, in kB (413 above).",
        &HTTP_MAX_EVENT_KB,
        1,
        64 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    int(
        c"fraiseql_obs.http_max_envelope_size",
        c"Largest Sentry envelope or OTLP request accepted, decompressed, in kB (413 above).",
        &HTTP_MAX_ENVELOPE_KB,
        1,
        256 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"fraiseql_obs.http_listen",
            c"HTTP service listeners, database@address:port, comma separated (server start; empty: off).",
            c"HTTP service listeners, database@address:port, comma separated (server start; empty: off).",
            &HTTP_LISTEN,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        int(
            c"fraiseql_obs.http_max_connections",
            c"Open connections each HTTP listener serves at once; more are answered 503 (server start).",
            &HTTP_MAX_CONNECTIONS,
            1,
            10_000,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        int(
            c"fraiseql_obs.http_max_connections_per_client",
            c"Open connections one client address may hold on an HTTP listener; more are answered 503 (server start; behind a proxy every client has the proxy's address).",
            &HTTP_MAX_CONNECTIONS_PER_CLIENT,
            1,
            10_000,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"fraiseql_obs".as_ptr());
    }
}

/// A string setting's value; None when unset or empty.
pub fn text(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get()
        .and_then(|c| c.into_string().ok())
        .filter(|v| !v.is_empty())
}

/// The environment recorded when a caller names none.
pub fn environment() -> String {
    // cut like an environment given to a capture: any role may set this,
    // and a value too long for the occurrence table's index would fail the
    // insert (in the worker, the batch of autonomous captures it is in)
    let e = text(&ENVIRONMENT).unwrap_or_else(|| "production".into());
    crate::capture::clip_text(&e, crate::capture::MAX_ENVIRONMENT_BYTES).into_owned()
}

pub fn int_value(s: &GucSetting<i32>) -> usize {
    s.get().max(0) as usize
}

/// The current value of a setting, as SHOW prints it. Being a function of this
/// library, calling it guarantees that the settings above are defined.
#[pg_extern(stable, parallel_safe)]
fn fraiseql_setting(name: &str) -> Option<String> {
    let cname = CString::new(name).ok()?;
    unsafe {
        let v = pg_sys::GetConfigOptionByName(cname.as_ptr(), std::ptr::null_mut(), false);
        if v.is_null() {
            None
        } else {
            Some(CStr::from_ptr(v).to_string_lossy().into_owned())
        }
    }
}
