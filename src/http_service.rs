//! The HTTP service: Sentry SDKs, OTLP/HTTP exporters and Prometheus talk
//! to the database directly.
//!
//! `fraiseql_obs.http_listen = 'shop@127.0.0.1:8787, billing@127.0.0.1:8788'`
//! starts one background worker per entry (server start), connected to
//! that database and listening on that address: a project's key identifies
//! the project within the database its address serves. The model is
//! omnigres' omni_httpd:
//!
//! * network threads (crates/ingest: a thread per connection under a cap,
//!   total read deadlines) read, decompress and parse each request, and
//!   never call into PostgreSQL;
//! * they hand the parsed work to the worker's main thread through a bounded
//!   queue (full: 429 with Retry-After, at once);
//! * the main thread takes what is queued, stores it in one transaction
//!   (each request in a subtransaction of its own, so one bad request fails
//!   alone), commits, and only then lets the threads reply.
//!
//! Keys are checked in that transaction, so a revoked key is refused from
//! the next request on. Events go through the capture functions: validation, scrubbing, clipping and spike
//! protection are those of SQL captures, and an event id is stored once.
use crate::guc;
use crate::worker::{in_subtransaction_or_transient, in_transaction, in_transaction_or_transient, Fault};
use fraiseql_ingest::http::{self, Request, Response};
use fraiseql_ingest::{encoding, otlp, sentry};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORKER_TYPE: &str = "fraiseql_obs http";
/// Requests waiting for the main thread; more are refused with 429 (fewer
/// than the connections, so that backpressure is felt).
const QUEUE: usize = 128;
/// Requests stored in one transaction at most: each is a subtransaction,
/// and a transaction with more than 64 subtransaction ids makes every other
/// session's snapshots slower (PGPROC_MAX_CACHED_SUBXIDS).
const BATCH: usize = 32;

/// One `database@address:port` entry of fraiseql_obs.http_listen.
fn parse_entry(entry: &str) -> Result<(String, SocketAddr), String> {
    let entry = entry.trim();
    let (db, addr) = entry
        .rsplit_once('@')
        .ok_or_else(|| format!("\"{entry}\" names no database (database@address:port)"))?;
    if db.is_empty() {
        return Err(format!("\"{entry}\" names no database"));
    }
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("\"{addr}\" is not an address:port (an IP address; IPv6 as [::1]:8787)"))?;
    Ok((db.to_string(), addr))
}

/// Registers a worker for each listener (while preloading; not in binary
/// upgrade, when nothing may write to the databases).
pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } || unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    let Some(listen) = guc::text(&guc::HTTP_LISTEN) else {
        return;
    };
    for entry in listen.split(',').filter(|e| !e.trim().is_empty()) {
        match parse_entry(entry) {
            Ok((db, addr)) => {
                // the entry travels in bgw_extra (128 bytes)
                let extra = format!("{db}@{addr}");
                if extra.len() >= 128 {
                    warning!("fraiseql_obs.http_listen: \"{entry}\" is too long; not served");
                    continue;
                }
                BackgroundWorkerBuilder::new(&format!("{WORKER_TYPE} {db}"))
                    .set_type(WORKER_TYPE)
                    .set_library("fraiseql_obs")
                    .set_function("fraiseql_obs_http_main")
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(Some(Duration::from_secs(5)))
                    .set_extra(&extra)
                    .load();
            }
            Err(why) => warning!("fraiseql_obs.http_listen: {why}; not served"),
        }
    }
}

/// What a network thread asks of the main thread.
enum Work {
    Sentry {
        project_id: i32,
        key: Option<String>,
        /// the id answered (the envelope's, else the first event's)
        event_id: Option<String>,
        items: Vec<Result<sentry::Item, String>>,
    },
    /// an OTLP request; the reply in its encoding
    Otlp {
        key: Option<String>,
        protobuf: bool,
        data: OtlpData,
    },
    Metrics {
        key: Option<String>,
    },
}

/// Spans with the project that sent them in each resource, as
/// `fraiseql.project_id`: the key's project, never one the sender wrote
/// there itself (a key may not label its spans as another project's).
fn labelled_with_project(spans: &Value, pid: i32) -> Value {
    let mut v = spans.clone();
    for rs in v.get_mut("resourceSpans").and_then(Value::as_array_mut).into_iter().flatten() {
        if !rs.is_object() {
            continue; // (refused by store_spans)
        }
        if !rs.get("resource").is_some_and(Value::is_object) {
            rs["resource"] = json!({});
        }
        let attrs = &mut rs["resource"]["attributes"];
        if !attrs.is_array() {
            *attrs = json!([]);
        }
        if let Some(a) = attrs.as_array_mut() {
            a.retain(|kv| kv.get("key").and_then(Value::as_str) != Some("fraiseql.project_id"));
            a.push(json!({"key": "fraiseql.project_id", "value": {"intValue": pid.to_string()}}));
        }
    }
    v
}

enum OtlpData {
    /// an OTLP/JSON ExportTraceServiceRequest
    Traces(Value),
    Logs(otlp::Logs),
    Metrics(Vec<otlp::Point>, Vec<String>),
}

struct Job {
    work: Work,
    reply: SyncSender<Response>,
}

/// What the network threads read and the main thread sets: the size limits
/// (at start and after a reload), and the projects' keys (so that a large
/// body with a key no project has is refused before it is decompressed or
/// parsed; the main thread checks every key again in its transaction).
struct Shared {
    event: AtomicUsize,
    envelope: AtomicUsize,
    /// the public keys, and the secret keys
    keys: std::sync::RwLock<(std::collections::HashSet<String>, std::collections::HashSet<String>)>,
    /// when the keys were last read
    keys_read: std::sync::Mutex<Option<Instant>>,
    /// a network thread met a key it does not know: read them again
    keys_wanted: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Whether a large body may be read for this key: Ok if a project has
    /// it. A key not known here is looked up again (the main thread reads
    /// the keys at its next turn, so a key made a moment ago works): 403 if
    /// it is still unknown, 503 if the main thread did not get to it in time.
    fn known_for_large(&self, key: &str, secret: bool) -> Result<(), Response> {
        let known = || {
            self.keys
                .read()
                .map(|k| if secret { k.1.contains(key) } else { k.0.contains(key) })
                .unwrap_or(false)
        };
        if known() {
            return Ok(());
        }
        let read_at = || self.keys_read.lock().ok().and_then(|t| *t);
        let before = read_at();
        self.keys_wanted.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            if read_at() != before {
                return if known() { Ok(()) } else { Err(Response::error(403, "invalid key")) };
            }
        }
        Err(Response::error(503, "try again").with_header("Retry-After", "1"))
    }
}

/// Set when the main thread refused a key: the network threads' copy of the
/// keys is read again (a revoked key stops passing their check).
static KEYS_STALE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reads every valid key (public and secret) for the network threads.
fn read_keys(shared: &Shared) {
    let keys = in_transaction(|| {
        let Some(schema) = crate::worker::extension_schema() else {
            return Vec::new();
        };
        Spi::connect(|c| {
            let t = c.select(
                &format!("SELECT k.public_key, k.secret_key FROM {schema}.tb_project_key k WHERE k.revoked_at IS NULL"),
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                if let (Some(p), Some(s)) = (r.get::<String>(1)?, r.get::<String>(2)?) {
                    out.push((p, s));
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_default()
    })
    .unwrap_or_default();
    if let Ok(mut k) = shared.keys.write() {
        *k = (keys.iter().map(|(p, _)| p.clone()).collect(), keys.into_iter().map(|(_, s)| s).collect());
    }
    if let Ok(mut t) = shared.keys_read.lock() {
        *t = Some(Instant::now());
    }
}

impl Shared {
    fn load(&self) {
        self.event.store(guc::int_value(&guc::HTTP_MAX_EVENT_KB) * 1024, Ordering::Relaxed);
        self.envelope.store(guc::int_value(&guc::HTTP_MAX_ENVELOPE_KB) * 1024, Ordering::Relaxed);
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn fraiseql_obs_http_main(_arg: pg_sys::Datum) {
    let extra = BackgroundWorker::get_extra().to_string();
    let (db, addr) = match parse_entry(&extra) {
        Ok(e) => e,
        Err(why) => error!("fraiseql_obs http: {why}"),
    };
    unsafe { crate::worker::install_signal_handlers() };
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    crate::worker::force_settings();
    // a reply says the data is stored: the commit before it must be durable
    // whatever the database's owner set for its sessions
    unsafe {
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"on".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    if held_for_drop() {
        unsafe { pg_sys::proc_exit(1) };
    }
    let appname = std::ffi::CString::new(WORKER_TYPE).unwrap_or_default();
    unsafe { pg_sys::pgstat_report_appname(appname.as_ptr()) };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            // tried again after bgw_restart_time
            log!("fraiseql_obs http: cannot listen on {addr} for database {db}: {e}");
            unsafe { pg_sys::proc_exit(1) };
        }
    };
    let sizes = Arc::new(Shared {
        event: AtomicUsize::new(0),
        envelope: AtomicUsize::new(0),
        keys: Default::default(),
        keys_read: Default::default(),
        keys_wanted: Default::default(),
    });
    sizes.load();
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let limits = http::Limits {
        max_connections: guc::int_value(&guc::HTTP_MAX_CONNECTIONS).max(1),
        max_connections_per_peer: guc::int_value(&guc::HTTP_MAX_CONNECTIONS_PER_CLIENT).max(1),
        // as sent; decompressed sizes are checked by the handlers
        max_body_bytes: guc::int_value(&guc::HTTP_MAX_ENVELOPE_KB) * 1024,
        large_body_bytes: LARGE,
        max_large_bodies: 8,
        ..http::Limits::default()
    };
    let s2 = sizes.clone();
    let handler: Arc<http::Handler> = Arc::new(move |req: Request| route(req, &tx, &s2));
    // The network threads must never run PostgreSQL's signal handlers (die,
    // SetLatch...): they inherit a mask that blocks every signal, and the
    // main thread's mask is restored after they are started.
    let server = {
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        let started = http::Server::start(listener, limits, handler);
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        started
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            log!("fraiseql_obs http: cannot start serving {addr}: {e}");
            unsafe { pg_sys::proc_exit(1) };
        }
    };
    log!("fraiseql_obs http serving database {db} on {}", server.local_addr());
    main_loop(&rx, &sizes);
}

fn main_loop(rx: &Receiver<Job>, sizes: &Shared) {
    let mut limiter = RateLimiter::default();
    read_keys(sizes);
    let mut served_since_read = false;
    loop {
        unsafe {
            // no wait: only to leave at once when the postmaster has died
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                0,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        // (only SIGTERM ends this worker: a cancel with no statement running,
        // one that arrived between requests, has nothing to cancel)
        unsafe { pg_sys::QueryCancelPending = 0 };
        pg_sys::check_for_interrupts!();
        if held_for_drop() {
            // DROP DATABASE (or RENAME, or its use as a template) is waiting
            // for us to leave; back after bgw_restart_time
            log!("fraiseql_obs http: leaving database for a DROP/RENAME DATABASE");
            unsafe { pg_sys::proc_exit(1) };
        }
        if unsafe { pg_sys::ConfigReloadPending } != 0 {
            crate::worker::reload_config_if_asked();
            sizes.load();
        }
        // the network threads' copy of the keys: read again when a thread met
        // an unknown key, when a key was refused here (at most once a
        // second), and every 30 s while requests come
        let since_read = sizes.keys_read.lock().ok().and_then(|t| *t).map(|t| t.elapsed());
        let stale = since_read.is_none_or(|d| d > Duration::from_secs(1)) && KEYS_STALE.swap(false, Ordering::SeqCst);
        let due = served_since_read && since_read.is_none_or(|d| d > Duration::from_secs(30));
        if sizes.keys_wanted.swap(false, Ordering::SeqCst) || stale || due {
            read_keys(sizes);
            served_since_read = false;
        }
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        crate::worker::report_activity(Some("fraiseql_obs http: storing requests"));
        served_since_read = true;
        let replies = store_batch(&batch, &mut limiter);
        crate::worker::report_activity(None);
        // after the commit: a reply never promises what a rollback took back
        for (job, r) in batch.into_iter().zip(replies) {
            let _ = job.reply.try_send(r);
        }
    }
}

/// Whether a command that needs this database to itself (DROP, RENAME,
/// CREATE DATABASE ... TEMPLATE) holds it (src/worker.rs, utility_hook).
fn held_for_drop() -> bool {
    let me = unsafe { pg_sys::MyDatabaseId }.to_u32();
    crate::shmem::REGISTRY.share().slots.iter().any(|s| {
        s.db_oid == me
            && s.hold_reason == crate::worker::HOLD_DROPPING
            && s.hold_until > crate::shmem::now_secs()
    })
}

/// One transaction for the batch. First without subtransactions (the
/// common case: every request stores). If that fails, the batch is stored
/// again with each request in a subtransaction of its own (a lock held
/// elsewhere is not waited for again: that batch is answered 503); and a
/// request that fails there is tried once more alone, each item in its own
/// subtransaction, so that its good items are stored and its bad ones
/// answered for. Each request has its own deadline (REQUEST_DEADLINE_MS).
fn store_batch(batch: &[Job], limiter: &mut RateLimiter) -> Vec<Response> {
    // the rate limiter counts what a rolled-back attempt accepted: put back
    let before = limiter.windows.clone();
    let lim = AssertUnwindSafe(&mut *limiter);
    let fast = in_transaction_or_transient(AssertUnwindSafe(|| {
        let lim = lim;
        let Some(plans) = begin_batch() else {
            return Err(not_installed());
        };
        let replies = batch
            .iter()
            .map(|job| {
                arm_deadline();
                handle(&plans, &job.work, &mut *lim.0, false)
            })
            .collect::<Vec<_>>();
        end_batch();
        Ok(replies)
    }));
    after_batch();
    match fast {
        Ok(Ok(replies)) => return replies,
        Ok(Err(r)) => return batch.iter().map(|_| r.clone()).collect(),
        Err((Fault::Transient, _)) => {
            limiter.windows = before;
            return batch.iter().map(|_| unavailable("the database is busy, try again")).collect();
        }
        // a request over its deadline, or one that fails: find which
        Err((Fault::Timeout | Fault::Permanent, _)) => {
            limiter.windows = before;
            // (a dropped or moved extension fails every statement: find it again)
            forget_plans();
        }
    }
    let failed: Vec<usize>;
    let lim = AssertUnwindSafe(&mut *limiter);
    let result = in_transaction(AssertUnwindSafe(|| {
        let lim = lim;
        let Some(plans) = begin_batch() else {
            return Err(not_installed());
        };
        let mut out = Vec::with_capacity(batch.len());
        let mut failed_here = Vec::new();
        for (i, job) in batch.iter().enumerate() {
            let saved = lim.0.windows.clone();
            let l = AssertUnwindSafe(&mut *lim.0);
            arm_deadline();
            match in_subtransaction_or_transient(AssertUnwindSafe(|| {
                let l = l;
                handle(&plans, &job.work, l.0, false)
            })) {
                Ok(r) => out.push(r),
                // a lock, a timeout: not now (the client retries)
                Err((f, _)) if f.transient() => {
                    lim.0.windows = saved;
                    out.push(unavailable("the database is busy, try again"));
                }
                Err(_) => {
                    lim.0.windows = saved;
                    failed_here.push(i);
                    out.push(unavailable("not stored, try again"));
                }
            }
        }
        end_batch();
        Ok((out, failed_here))
    }));
    after_batch();
    let mut replies = match result {
        Ok(Ok((out, f))) => {
            failed = f;
            out
        }
        Ok(Err(r)) => return batch.iter().map(|_| r.clone()).collect(),
        Err(e) => {
            log!("fraiseql_obs http: a batch of {} requests was not stored: {e}", batch.len());
            failed = (0..batch.len()).collect();
            batch.iter().map(|_| unavailable("not stored, try again")).collect()
        }
    };
    for i in failed {
        let saved = limiter.windows.clone();
        let lim = AssertUnwindSafe(&mut *limiter);
        let job = &batch[i];
        let r = in_transaction(AssertUnwindSafe(|| {
            let lim = lim;
            let r = match begin_batch() {
                Some(plans) => {
                    arm_deadline();
                    handle(&plans, &job.work, lim.0, true)
                }
                None => not_installed(),
            };
            end_batch();
            r
        }));
        after_batch();
        replies[i] = r.unwrap_or_else(|e| {
            limiter.windows = saved;
            log!("fraiseql_obs http: a request was not stored: {e}");
            unavailable("not stored, try again")
        });
        if held_for_drop() {
            break;
        }
    }
    replies
}

/// The statements every request runs, prepared once (not parsed and
/// planned per request), for the extension's schema as it was found; they
/// are forgotten when a batch fails, and so found again after DROP or
/// CREATE EXTENSION.
struct Plans {
    schema: String,
    limits: pgrx::spi::OwnedPreparedStatement,
    project: pgrx::spi::OwnedPreparedStatement,
    event: pgrx::spi::OwnedPreparedStatement,
}

thread_local! {
    static PLANS: std::cell::RefCell<Option<std::rc::Rc<Plans>>> = const { std::cell::RefCell::new(None) };
}

fn forget_plans() {
    PLANS.with(|p| *p.borrow_mut() = None);
}

fn prepare_plans() -> Option<std::rc::Rc<Plans>> {
    if let Some(p) = PLANS.with(|p| p.borrow().clone()) {
        return Some(p);
    }
    let schema = crate::worker::extension_schema()?;
    use pgrx::pg_sys::BuiltinOid::*;
    use pgrx::PgOid::BuiltIn;
    let plans = Spi::connect(|c| -> Result<Plans, pgrx::spi::Error> {
        Ok(Plans {
            limits: c
                .prepare("SELECT set_config('lock_timeout', '5s', true)", &[])?
                .keep(),
            project: c
                .prepare(
                    &format!(
                        "SELECT p.project_id, p.default_environment, p.rate_limit_per_minute \
                           FROM (SELECT 1) one \
                           LEFT JOIN ({schema}.tb_project_key k JOIN {schema}.tb_project p ON p.project_id = k.project_id) \
                                  ON (CASE WHEN $3 THEN k.secret_key ELSE k.public_key END) = $1 \
                                 AND k.revoked_at IS NULL AND ($2 IS NULL OR p.project_id = $2)"
                    ),
                    &[BuiltIn(TEXTOID), BuiltIn(INT4OID), BuiltIn(BOOLOID)],
                )?
                .keep(),
            // the event id is recorded and the occurrence captured in one
            // statement; an id stored before captures nothing
            event: c
                .prepare_mut(
                    &format!(
                        "WITH first AS (INSERT INTO {schema}.tb_ingest_event (project_id, event_id) VALUES ($1, $2::uuid) \
                                        ON CONFLICT DO NOTHING RETURNING 1) \
                         SELECT coalesce((SELECT CASE WHEN $3 \
                                THEN {schema}.fraiseql_capture_message(message => $5, severity => $10, context => $8, \
                                       environment => $9, release_version => $11, trace_id => $12, span_id => $13, \
                                       fingerprint => $7, occurred_at => coalesce(to_timestamp($14), now())) \
                                ELSE {schema}.fraiseql_capture_error(exception_type => $4, message => $5, stack_trace => $6, \
                                       context => $8, environment => $9, severity => $10, release_version => $11, \
                                       trace_id => $12, span_id => $13, fingerprint => $7, \
                                       occurred_at => coalesce(to_timestamp($14), now())) END IS NOT NULL \
                           FROM first), false)"
                    ),
                    &[
                        BuiltIn(INT4OID),
                        BuiltIn(TEXTOID),
                        BuiltIn(BOOLOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(JSONBOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(TEXTOID),
                        BuiltIn(FLOAT8OID),
                    ],
                )?
                .keep(),
            schema,
        })
    })
    .unwrap_or_else(|e| error!("fraiseql_obs http: preparing statements failed: {e}"));
    let plans = std::rc::Rc::new(plans);
    PLANS.with(|p| *p.borrow_mut() = Some(plans.clone()));
    Some(plans)
}

/// The prepared statements, with this transaction's lock timeout set: a
/// lock held elsewhere fails the batch (answered 503, retried by the
/// client) instead of holding every request behind it.
fn begin_batch() -> Option<std::rc::Rc<Plans>> {
    let plans = prepare_plans()?;
    Spi::connect(|c| c.select(&plans.limits, None, &[]).map(|_| ()))
        .unwrap_or_else(|e| error!("fraiseql_obs http: {e}"));
    Some(plans)
}

/// How long one request may take to store (then it is cancelled and
/// answered 503). statement_timeout is armed by a client session's
/// statement loop, which a background worker has not: the deadline is
/// armed here, before each request.
const REQUEST_DEADLINE_MS: i32 = 10_000;

fn arm_deadline() {
    crate::timeout::arm_statement_timeout(REQUEST_DEADLINE_MS);
}

/// At the end of a transaction's work, before its commit: the commit is
/// never cancelled by a deadline.
fn end_batch() {
    crate::timeout::disarm_statement_timeout();
}

/// After a transaction: a deadline that fired while interrupts were held
/// (in the commit) leaves a cancel pending that no statement is there to
/// take; it must not end the worker at its next interrupt check.
fn after_batch() {
    crate::timeout::disarm_statement_timeout();
    unsafe { pg_sys::QueryCancelPending = 0 };
}

fn not_installed() -> Response {
    let db = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) };
    unavailable(&format!(
        "the fraiseql_obs extension is not installed in database {}",
        db.to_string_lossy()
    ))
}

fn unavailable(why: &str) -> Response {
    Response::error(503, why).with_header("Retry-After", "10")
}

/// Events accepted per project and minute, against the project's limit.
#[derive(Default)]
struct RateLimiter {
    windows: HashMap<i32, (Instant, u64)>,
}

impl RateLimiter {
    /// None: accepted (and counted); Some(s): refused, try again in s seconds.
    fn check(&mut self, project: i32, limit: Option<i32>, n: u64) -> Option<u64> {
        let limit = limit? as u64;
        let now = Instant::now();
        let w = self.windows.entry(project).or_insert((now, 0));
        if now.duration_since(w.0) >= Duration::from_secs(60) {
            *w = (now, 0);
        }
        if w.1 + n > limit {
            return Some(60u64.saturating_sub(now.duration_since(w.0).as_secs()).max(1));
        }
        w.1 += n;
        None
    }
}

/// The project a key opens (None: unknown or revoked key, or another project's).
fn project(plans: &Plans, key: &str, project_id: Option<i32>, secret: bool) -> Option<(i32, Option<String>, Option<i32>)> {
    let row = Spi::connect(|c| {
        c.select(&plans.project, Some(1), &[key.into(), project_id.into(), secret.into()])?
            .first()
            .get_three::<i32, String, i32>()
    })
    .unwrap_or_else(|e| error!("fraiseql_obs http: reading the project failed: {e}"));
    if row.0.is_none() {
        KEYS_STALE.store(true, Ordering::SeqCst);
    }
    row.0.map(|id| (id, row.1, row.2))
}

/// Items of a request stored one by one (the careful pass), each in its own
/// subtransaction; past them, the request's other items are not stored.
const MAX_CAREFUL_ITEMS: usize = 60;

/// One request. `careful`: each item in a subtransaction of its own (the
/// second pass, for a request whose first pass failed); else the request's
/// items share the request's subtransaction, and an error fails it whole.
fn handle(plans: &Plans, work: &Work, limiter: &mut RateLimiter, careful: bool) -> Response {
    // an item's own subtransaction in the careful pass; else as it is. A
    // transient error (a lock or statement timeout) makes the whole request
    // one to try again later, not a bad one.
    let transient = std::cell::Cell::new(false);
    // (at most this many subtransactions in one transaction: more make
    // every other session's snapshots slower)
    let subtransactions = std::cell::Cell::new(0usize);
    let item = |f: &dyn Fn() -> Result<(), String>| -> Result<(), String> {
        // DROP DATABASE is waiting for this database: leave now
        if held_for_drop() {
            pgrx::ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
                "fraiseql_obs http: leaving the database for DROP DATABASE"
            );
        }
        if !careful {
            return f();
        }
        // the request will be answered "try again": nothing more of it
        if transient.get() {
            return Err("not stored: try again".into());
        }
        if subtransactions.get() >= MAX_CAREFUL_ITEMS {
            return Err(format!("not stored: a request with failing items stores its first {MAX_CAREFUL_ITEMS} only"));
        }
        subtransactions.set(subtransactions.get() + 1);
        match in_subtransaction_or_transient(std::panic::AssertUnwindSafe(|| f())) {
            Ok(r) => r,
            Err((fault, m)) => {
                transient.set(transient.get() || fault.transient());
                Err(m)
            }
        }
    };
    let r = handle_items(plans, work, limiter, careful, &item);
    if transient.get() {
        // nothing of a request that is answered "try again" may stay: the
        // whole request is rolled back (its transaction is its own here)
        pgrx::ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            "fraiseql_obs http: the database is busy, try again"
        );
    }
    r
}

fn handle_items(
    plans: &Plans,
    work: &Work,
    limiter: &mut RateLimiter,
    careful: bool,
    item: &dyn Fn(&dyn Fn() -> Result<(), String>) -> Result<(), String>,
) -> Response {
    let schema = plans.schema.as_str();
    match work {
        Work::Sentry { project_id, key, event_id, items } => {
            let Some(key) = key else {
                return Response::error(401, "missing authorization (sentry_key)");
            };
            let Some((pid, default_env, limit)) = project(plans, key, Some(*project_id), false) else {
                return Response::error(403, "invalid key for this project");
            };
            let events = items.iter().filter(|i| matches!(i, Ok(sentry::Item::Event(_)) | Ok(sentry::Item::Spans(_)))).count();
            if let Some(secs) = limiter.check(pid, limit, if careful { 0 } else { events as u64 }) {
                return Response::error(429, "project rate limit exceeded")
                    .with_header("Retry-After", &secs.to_string())
                    .with_header("X-Sentry-Rate-Limits", &format!("{secs}::project:project_quota"));
            }
            let mut errors = Vec::new();
            let mut first_id = None;
            let mut stored = 0;
            for it in items {
                match it {
                    Ok(sentry::Item::Event(c)) => {
                        first_id.get_or_insert_with(|| c.event_id.clone());
                        match item(&|| {
                            store_event(plans, pid, default_env.as_deref(), c);
                            Ok(())
                        }) {
                            Ok(()) => stored += 1,
                            Err(e) => errors.push(format!("event {}: {e}", c.event_id)),
                        }
                    }
                    Ok(sentry::Item::Spans(v)) => match item(&|| {
                        let r = store_spans(schema, &labelled_with_project(v, pid));
                        let stored = r.get("stored").and_then(Value::as_i64).unwrap_or(0)
                            + r.get("duplicates").and_then(Value::as_i64).unwrap_or(0);
                        if stored == 0 {
                            return Err(format!(
                                "no span stored: {}",
                                r.pointer("/partialSuccess/errorMessage").and_then(Value::as_str).unwrap_or("")
                            ));
                        }
                        Ok(())
                    }) {
                        Ok(()) => stored += 1,
                        Err(e) => errors.push(format!("transaction: {e}")),
                    },
                    Ok(sentry::Item::Skipped(_)) => {}
                    Err(e) => errors.push(e.clone()),
                }
            }
            let id = event_id.clone().or(first_id);
            if !errors.is_empty() && stored == 0 {
                return Response::error(400, &errors.join("; "));
            }
            if !errors.is_empty() {
                log!("fraiseql_obs http: part of a request was not stored: {}", errors.join("; "));
            }
            Response::json(200, &json!({ "id": id }))
        }
        Work::Otlp { key, protobuf, data } => {
            let Some(key) = key else {
                return Response::error(401, "missing authorization (Bearer <project key>)");
            };
            let Some((pid, default_env, limit)) = project(plans, key, None, true) else {
                return Response::error(403, "invalid key (OTLP takes a project's secret key)");
            };
            let (kind, rejected, message) = match data {
                OtlpData::Traces(payload) => {
                    let payload = labelled_with_project(payload, pid);
                    match in_subtransaction_or_transient(AssertUnwindSafe(|| store_spans(schema, &payload))) {
                        Ok(r) => (
                            "rejectedSpans",
                            r.get("rejected").and_then(Value::as_i64).unwrap_or(0),
                            r.pointer("/partialSuccess/errorMessage").and_then(Value::as_str).unwrap_or("").to_string(),
                        ),
                        // not now: answered 503, and retried by the exporter
                        Err((f, _)) if f.transient() => return unavailable("the database is busy, try again"),
                        Err((_, e)) => return Response::error(400, &e),
                    }
                }
                OtlpData::Logs(logs) => {
                    if let Some(secs) = limiter.check(pid, limit, if careful { 0 } else { logs.captures.len() as u64 }) {
                        return Response::error(429, "project rate limit exceeded")
                            .with_header("Retry-After", &secs.to_string());
                    }
                    let mut errors = Vec::new();
                    for c in &logs.captures {
                        if let Err(e) = item(&|| {
                            store_event(plans, pid, default_env.as_deref(), c);
                            Ok(())
                        }) {
                            errors.push(e);
                        }
                    }
                    let n = errors.len() as i64;
                    errors.truncate(20);
                    ("rejectedLogRecords", n, errors.join("; "))
                }
                OtlpData::Metrics(points, rejected) => {
                    let mut errors = rejected.clone();
                    for p in points {
                        if let Err(e) = item(&|| {
                            store_point(schema, pid, p);
                            Ok(())
                        }) {
                            errors.push(e);
                        }
                    }
                    let n = errors.len() as i64;
                    errors.truncate(20);
                    ("rejectedDataPoints", n, errors.join("; "))
                }
            };
            if *protobuf {
                Response::new(200, "application/x-protobuf", otlp::response(rejected, &message))
            } else if rejected > 0 {
                Response::json(200, &json!({ "partialSuccess": { kind: rejected, "errorMessage": message } }))
            } else {
                Response::json(200, &json!({ "partialSuccess": {} }))
            }
        }
        Work::Metrics { key } => {
            let Some(key) = key else {
                return Response::error(401, "missing authorization (Bearer <project key>)");
            };
            if project(plans, key, None, true).is_none() {
                return Response::error(403, "invalid key (the scrape takes a project's secret key)");
            }
            let text = crate::sql::one::<String>(&format!("SELECT {schema}.fraiseql_metrics_prometheus()"), &[])
                .unwrap_or_else(|e| error!("fraiseql_obs http: metrics: {e}"))
                .unwrap_or_default();
            Response::new(200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
    }
}

/// One event: its id recorded for the project, its occurrence captured
/// (through the capture functions: validation, scrubbing, clipping and spike
/// protection are those of SQL captures). False: an id stored before.
fn store_event(plans: &Plans, project_id: i32, default_env: Option<&str>, c: &sentry::Capture) -> bool {
    let environment = c.environment.clone().or_else(|| default_env.map(str::to_string));
    // groups are a project's own, as in Sentry: one project's events (a
    // public key ships in browser code) never land in another's groups
    let fingerprint = format!("p{project_id}:{}", c.fingerprint);
    let mut context = c.context.clone();
    if let Some(sentry) = context.get_mut("sentry").and_then(Value::as_object_mut) {
        sentry.insert("project_id".into(), json!(project_id));
    } else if let Some(o) = context.as_object_mut() {
        o.insert("sentry".into(), json!({ "project_id": project_id }));
    }
    // a client whose clock is off (or an event sent long after it
    // happened) is stored as received now, as Sentry does
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let timestamp = c.timestamp.filter(|t| t.is_finite() && *t <= now + 60.0 && *t >= now - 30.0 * 86400.0);
    Spi::connect_mut(|client| {
        client
            .update(
                &plans.event,
                Some(1),
                &[
                    project_id.into(),
                    c.event_id.as_str().into(),
                    c.is_message.into(),
                    c.exception_type.as_str().into(),
                    c.message.as_str().into(),
                    c.stack_trace.as_deref().into(),
                    fingerprint.as_str().into(),
                    pgrx::JsonB(context).into(),
                    environment.as_deref().into(),
                    c.severity.as_str().into(),
                    c.release.as_deref().into(),
                    c.trace_id.as_deref().into(),
                    c.span_id.as_deref().into(),
                    timestamp.into(),
                ],
            )?
            .first()
            .get_one::<bool>()
    })
    .unwrap_or_else(|e| error!("fraiseql_obs http: storing an event failed: {e}"))
    .unwrap_or(false)
}

fn store_point(schema: &str, project_id: i32, p: &otlp::Point) {
    let labels = |l: &serde_json::Map<String, Value>| pgrx::JsonB(Value::Object(l.clone()));
    let r = match p {
        otlp::Point::Sum { name, labels: l, environment, stream, start_ns, time_ns, value, delta, monotonic } => {
            Spi::run_with_args(
                &format!("SELECT {schema}._fraiseql_otlp_sum($1, $2, $3, $4, $5::numeric, $6::numeric, $7, $8, $9)"),
                &[
                    name.as_str().into(),
                    labels(l).into(),
                    environment.as_deref().into(),
                    format!("{project_id}:{stream}").as_str().into(),
                    start_ns.to_string().as_str().into(),
                    time_ns.to_string().as_str().into(),
                    (*value).into(),
                    (*delta).into(),
                    (*monotonic).into(),
                ],
            )
        }
        otlp::Point::Gauge { name, labels: l, environment, value } => Spi::run_with_args(
            &format!("SELECT {schema}._fraiseql_otlp_gauge($1, $2, $3, $4)"),
            &[name.as_str().into(), labels(l).into(), environment.as_deref().into(), (*value).into()],
        ),
        otlp::Point::Histogram { name, labels: l, environment, stream, start_ns, time_ns, bounds, counts, sum, count, delta } => {
            Spi::run_with_args(
                &format!(
                    "SELECT {schema}._fraiseql_otlp_histogram($1, $2, $3, $4, $5::numeric, $6::numeric, $7, $8, $9, $10, $11)"
                ),
                &[
                    name.as_str().into(),
                    labels(l).into(),
                    environment.as_deref().into(),
                    format!("{project_id}:{stream}").as_str().into(),
                    start_ns.to_string().as_str().into(),
                    time_ns.to_string().as_str().into(),
                    bounds.clone().into(),
                    counts.iter().map(|c| (*c).min(i64::MAX as u64) as i64).collect::<Vec<i64>>().into(),
                    (*sum).into(),
                    ((*count).min(i64::MAX as u64) as i64).into(),
                    (*delta).into(),
                ],
            )
        }
    };
    r.unwrap_or_else(|e| error!("fraiseql_obs http: storing a metric point failed: {e}"));
}

fn store_spans(schema: &str, payload: &Value) -> Value {
    Spi::get_one_with_args::<pgrx::JsonB>(
        &format!("SELECT {schema}._fraiseql_ingest_otlp_traces($1)"),
        &[pgrx::JsonB(payload.clone()).into()],
    )
    .unwrap_or_else(|e| error!("fraiseql_obs http: storing spans failed: {e}"))
    .map(|j| j.0)
    .unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------
// Network threads: no PostgreSQL call below this line
// ---------------------------------------------------------------------------

/// `.../api/<project_id>/<endpoint>/` (a DSN may carry a path prefix)
fn sentry_route(path: &str) -> Option<(i32, &str)> {
    let i = path.rfind("/api/")?;
    let mut parts = path[i + 5..].trim_end_matches('/').split('/');
    let id = parts.next()?.parse().ok()?;
    let endpoint = parts.next()?;
    parts.next().is_none().then_some((id, endpoint))
}

fn bearer(req: &Request) -> Option<String> {
    let v = req.header("authorization")?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

fn cors(r: Response) -> Response {
    r.with_header("Access-Control-Allow-Origin", "*")
        .with_header("Access-Control-Expose-Headers", "x-sentry-error, x-sentry-rate-limits, retry-after")
}

fn route(req: Request, tx: &SyncSender<Job>, sizes: &Shared) -> Response {
    let path = req.path.clone();
    if let Some((project_id, endpoint)) = sentry_route(&path) {
        if req.method == "OPTIONS" {
            return cors(Response::new(200, "text/plain", ""))
                .with_header("Access-Control-Allow-Methods", "POST, OPTIONS")
                .with_header("Access-Control-Allow-Headers", "content-type, x-sentry-auth, content-encoding, authorization");
        }
        if req.method != "POST" {
            return Response::error(405, "use POST").with_header("Allow", "POST");
        }
        return cors(match endpoint {
            "envelope" => sentry_envelope(req, project_id, tx, sizes),
            "store" => sentry_store(req, project_id, tx, sizes),
            _ => Response::error(404, "unknown Sentry endpoint"),
        });
    }
    match (req.method.as_str(), path.as_str()) {
        ("POST", "/v1/traces") => otlp_request(req, otlp::Signal::Traces, tx, sizes),
        ("POST", "/v1/metrics") => otlp_request(req, otlp::Signal::Metrics, tx, sizes),
        ("POST", "/v1/logs") => otlp_request(req, otlp::Signal::Logs, tx, sizes),
        ("GET", "/metrics") | ("HEAD", "/metrics") => match bearer(&req) {
            Some(key) => submit(tx, Work::Metrics { key: Some(key) }),
            None => Response::error(401, "missing authorization (Bearer <project secret key>)"),
        },
        ("GET", "/health") | ("HEAD", "/health") => Response::new(200, "text/plain", "ok\n"),
        (_, "/v1/traces") | (_, "/v1/metrics") | (_, "/v1/logs") | (_, "/metrics") => {
            Response::error(405, "method not allowed")
        }
        _ => Response::error(404, "not found"),
    }
}

/// Hands work to the main thread and waits for its answer, given after
/// the commit.
fn submit(tx: &SyncSender<Job>, work: Work) -> Response {
    let (reply, answer) = sync_channel(1);
    match tx.try_send(Job { work, reply }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Response::error(429, "the server is busy, try again")
                .with_header("Retry-After", "1")
                .with_header("X-Sentry-Rate-Limits", "1::organization:backpressure");
        }
        Err(TrySendError::Disconnected(_)) => return unavailable("the service is stopping"),
    }
    // Until the main thread answers: its transactions have deadlines
    // (REQUEST_DEADLINE_MS), and an answer never contradicts what was
    // committed. A worker that is gone answers 503 (the queue is dropped).
    answer.recv().unwrap_or_else(|_| unavailable("the service is stopping, try again"))
}

/// The body, decompressed. Past LARGE bytes it needs one of the server's
/// large-body permits (held until the reply), so that however many clients
/// send at once, only a few large bodies are in memory.
fn decode(req: &mut Request, max: usize, shared: &Shared, key: Option<&str>, secret: bool) -> Result<(Vec<u8>, Option<http::Permit>), Response> {
    let err = |e: encoding::DecodeError| match e {
        encoding::DecodeError::TooLarge => Response::error(413, &e.to_string()),
        encoding::DecodeError::Unsupported(_) => Response::error(415, &e.to_string()),
        encoding::DecodeError::Bad(_) => Response::error(400, &e.to_string()),
    };
    let busy = || Response::error(503, "too many large requests at once, try again").with_header("Retry-After", "2");
    // a large body is decompressed and parsed only for a key some project
    // has (parsing multiplies its size in memory)
    let known = |key: Option<&str>| match key {
        Some(k) => shared.known_for_large(k, secret),
        None => Err(Response::error(401, "a large body needs its key in a header or the query string")),
    };
    let enc = req.header("content-encoding").map(str::to_string);
    let body = std::mem::take(&mut req.body);
    let identity = enc.as_deref().is_none_or(|e| e.trim().is_empty() || e.trim().eq_ignore_ascii_case("identity"));
    if identity {
        // (the HTTP layer gave a body over LARGE a permit already)
        if body.len() > max {
            return Err(Response::error(413, "body too large"));
        }
        if req.large {
            known(key)?;
        }
        return Ok((body, None));
    }
    if req.large {
        known(key)?;
        return encoding::decode(enc.as_deref(), &body, max).map(|b| (b, None)).map_err(err);
    }
    match encoding::decode(enc.as_deref(), &body, LARGE.min(max)) {
        Ok(b) => Ok((b, None)),
        Err(encoding::DecodeError::TooLarge) if max > LARGE => {
            known(key)?;
            let permit = req.permits.as_ref().and_then(|p| p.try_acquire()).ok_or_else(busy)?;
            encoding::decode(enc.as_deref(), &body, max).map(|b| (b, Some(permit))).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Bodies up to this size (decompressed) need no permit: with every
/// connection sending one, their parsed forms stay within a few hundred MB.
const LARGE: usize = 64 * 1024;

fn sentry_key(req: &Request) -> Option<String> {
    req.header("x-sentry-auth")
        .and_then(sentry::key_from_auth_header)
        .or_else(|| req.query_param("sentry_key"))
        .or_else(|| req.header("authorization").and_then(sentry::key_from_auth_header))
}

fn sentry_envelope(mut req: Request, project_id: i32, tx: &SyncSender<Job>, sizes: &Shared) -> Response {
    let header_key = sentry_key(&req);
    let (body, _permit) = match decode(&mut req, sizes.envelope.load(Ordering::Relaxed), sizes, header_key.as_deref(), false) {
        Ok(b) => b,
        Err(r) => return r,
    };
    // framing and item headers only: the payloads are parsed once the
    // request has shown a key
    let env = match sentry::parse_envelope(&body) {
        Ok(e) => e,
        Err(why) => return Response::error(400, &format!("invalid envelope: {why}")),
    };
    let key = header_key.or_else(|| {
        env.header
            .get("dsn")
            .and_then(Value::as_str)
            .and_then(sentry::key_from_dsn)
            .map(|(k, _)| k)
    });
    let Some(key) = key else {
        return Response::error(401, "missing authorization (sentry_key)");
    };
    let event_max = sizes.event.load(Ordering::Relaxed);
    if env.items.iter().any(|(ty, _, p)| (ty == "event" || ty == "transaction") && p.len() > event_max) {
        return Response::error(413, "event too large");
    }
    let event_id = env.header.get("event_id").and_then(Value::as_str).and_then(|i| sentry::event_id(Some(i)).ok());
    let items = sentry::envelope_items(&env);
    drop(env);
    drop(body);
    submit(tx, Work::Sentry { project_id, key: Some(key), event_id, items })
}

fn sentry_store(mut req: Request, project_id: i32, tx: &SyncSender<Job>, sizes: &Shared) -> Response {
    let Some(key) = sentry_key(&req) else {
        return Response::error(401, "missing authorization (sentry_key)");
    };
    let (body, _permit) = match decode(&mut req, sizes.event.load(Ordering::Relaxed), sizes, Some(&key), false) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let item = sentry::store_item(&body);
    if let Err(why) = &item {
        return Response::error(400, why);
    }
    submit(tx, Work::Sentry { project_id, key: Some(key), event_id: None, items: vec![item] })
}

/// OTLP/HTTP: protobuf (the Collector, the Python and Go exporters) or JSON
/// (the JS exporter), decoded here into one form; the key as a bearer token.
fn otlp_request(mut req: Request, signal: otlp::Signal, tx: &SyncSender<Job>, sizes: &Shared) -> Response {
    let Some(key) = bearer(&req) else {
        return Response::error(401, "missing authorization (Bearer <project secret key>)");
    };
    let ctype = req.header("content-type").unwrap_or("").to_ascii_lowercase();
    let protobuf = ctype.starts_with("application/x-protobuf") || ctype.starts_with("application/protobuf");
    if !protobuf && !ctype.starts_with("application/json") {
        return Response::error(415, "OTLP/HTTP takes application/x-protobuf or application/json");
    }
    let (body, _permit) = match decode(&mut req, sizes.envelope.load(Ordering::Relaxed), sizes, Some(&key), true) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let payload = if protobuf {
        otlp::decode(signal, &body).map_err(|e| format!("invalid protobuf: {e}"))
    } else {
        sentry::parse_json(&body).map_err(|e| format!("invalid JSON: {e}"))
    };
    let payload = match payload {
        Ok(v) if v.is_object() => v,
        Ok(_) => return Response::error(400, "the request is not an object"),
        Err(why) => return Response::error(400, &why),
    };
    let data = match signal {
        otlp::Signal::Traces => OtlpData::Traces(payload),
        otlp::Signal::Logs => OtlpData::Logs(otlp::logs(&payload)),
        otlp::Signal::Metrics => {
            let (points, rejected) = otlp::metrics(&payload);
            OtlpData::Metrics(points, rejected)
        }
    };
    drop(body);
    submit(tx, Work::Otlp { key: Some(key), protobuf, data })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn listen_entries_and_routes() {
        assert_eq!(
            parse_entry(" shop@127.0.0.1:8787").unwrap(),
            ("shop".to_string(), "127.0.0.1:8787".parse().unwrap())
        );
        assert_eq!(parse_entry("a@b@[::1]:1").unwrap().0, "a@b");
        assert!(parse_entry("127.0.0.1:8787").is_err());
        assert!(parse_entry("shop@localhost:8787").is_err());
        assert_eq!(sentry_route("/api/7/envelope/"), Some((7, "envelope")));
        assert_eq!(sentry_route("/prefix/api/12/store"), Some((12, "store")));
        assert_eq!(sentry_route("/api/x/store/"), None);
        let mut l = RateLimiter::default();
        assert_eq!(l.check(1, Some(2), 2), None);
        assert!(l.check(1, Some(2), 1).is_some());
        assert_eq!(l.check(2, None, 1000), None);
    }
}
