//! Background workers: no cron needed.
//!
//! * The **launcher** (one per cluster, started with the server when the
//!   library is in shared_preload_libraries, after recovery so a standby waits
//!   for promotion) connects to no database. It lists the databases and
//!   starts a **database worker** for each one that needs one, at most
//!   `max_workers` at once: work waiting (`wanted`, set at commit by a
//!   capture that queued a notification), or due (`next_due`: maintenance, a
//!   retry, a digest window, the periodic round), longest waiting first.
//! * A **database worker** checks that the extension is installed (if not, it
//!   tells the registry to leave that database alone for a while, and exits
//!   quietly), then loops: fold the occurrence counters and refresh the
//!   dashboards' rollups every `flush_interval`, run `fraiseql_run_maintenance('worker')`
//!   when `maintenance_interval` has passed since the last run, deliver what
//!   is due. Each step is its own short transaction; an error is logged and
//!   the step retried on the next tick. It leaves when idle for
//!   `worker_idle_timeout`, or after a round when other databases wait for a
//!   slot, saying when its database is next due.
//! * SIGTERM uses PostgreSQL's own `die` handler, so it interrupts even a
//!   running query; SIGHUP reloads the configuration.
//! * `DROP DATABASE`, `ALTER DATABASE ... RENAME`, `CREATE DATABASE ...
//!   TEMPLATE` and `DROP EXTENSION` are never blocked by us: a utility hook stops that database's
//!   worker first and holds it off.
use crate::guc;
use crate::shmem::{self, REGISTRY};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker,
};
use pgrx::pg_sys;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

const LIBRARY: &str = "fraiseql_obs";
const LAUNCHER_TYPE: &str = "fraiseql_obs launcher";
const WORKER_TYPE: &str = "fraiseql_obs worker";
/// How long a database without the extension is left alone (CREATE
/// EXTENSION anywhere makes the launcher look again at once).
const NOT_INSTALLED_HOLD_S: i64 = 600;
/// A database gets a worker at least this often (its folds and rollups).
const SWEEP_S: i64 = 60;
/// How long a database being dropped or renamed is left alone.
const DROP_HOLD_S: i64 = 30;

pub const HOLD_NOT_INSTALLED: u8 = 1;
pub const HOLD_DROPPING: u8 = 2;

pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    unsafe {
        PREV_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility_hook);
    }
    // pg_upgrade runs the server in binary-upgrade mode to restore the
    // schema: no worker may write to the databases meanwhile
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_library(LIBRARY)
        .set_function("fraiseql_obs_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// PostgreSQL's own handlers: `die` turns SIGTERM into a FATAL at the next
/// interrupt check (also inside a running query); SIGHUP sets ConfigReloadPending.
pub(crate) unsafe fn install_signal_handlers() {
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(pg_die));
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(pg_config_reload));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

// The C signal handlers themselves (pgrx's wrappers are Rust functions).
unsafe extern "C-unwind" {
    #[link_name = "die"]
    fn pg_die(sig: std::os::raw::c_int);
    #[link_name = "SignalHandlerForConfigReload"]
    fn pg_config_reload(sig: std::os::raw::c_int);
}

/// Waits on our latch (set by signals, by children starting or stopping, or
/// by another backend), then handles interrupts and configuration reloads.
fn wait(timeout: Duration) {
    unsafe {
        let ms = timeout.as_millis().clamp(1, i64::MAX as u128) as i64;
        // statistics not reported yet (see in_transaction) go out before a
        // longer sleep; nothing pending costs nothing
        pg_sys::pgstat_report_stat(ms >= 1000);
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
    reload_config_if_asked();
}

pub(crate) fn reload_config_if_asked() {
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

pub(crate) fn report_activity(what: Option<&str>) {
    unsafe {
        match what {
            Some(s) => {
                let c = CString::new(s).unwrap_or_default();
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c.as_ptr());
            }
            None => {
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null())
            }
        }
    }
}

/// The message of an error caught by PgTryBuilder.
pub(crate) fn caught_message(e: pg_sys::panic::CaughtError) -> String {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}

/// As in_transaction, and what kind of error it was (fault_of).
pub(crate) fn in_transaction_or_transient<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, (Fault, String)> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| Err((fault_of(&e), caught_message(e))))
        .execute();
    unsafe {
        match result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
        // A deadline the transaction's SQL armed (the fold's rules:
        // _fraiseql_rules_deadline) ends with it; one that fired while
        // interrupts were held leaves a cancel pending that no statement is
        // there to take, which must not end the worker at its next check.
        crate::timeout::disarm_statement_timeout();
        pg_sys::QueryCancelPending = 0;
        // A background worker's table statistics reach the cumulative
        // statistics (and so autovacuum and autoanalyze) only when it
        // reports them; a client backend does it when idle. At most once a
        // second (PostgreSQL's own pacing); `wait` flushes what is left.
        pg_sys::pgstat_report_stat(false);
    }
    result
}

/// Runs `f` in its own transaction. A PostgreSQL error is caught, the
/// transaction rolled back, and the error returned as text.
pub(crate) fn in_transaction<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    in_transaction_or_transient(f).map_err(|(_, m)| m)
}

/// What kind of error was caught: one that will happen again (Permanent),
/// one that says "not now" (Transient: a lock timeout, a serialization
/// failure or deadlock, a shutdown), or a cancel (Timeout: a statement
/// timeout, or a cancel request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Permanent,
    Transient,
    Timeout,
}

impl Fault {
    pub(crate) fn transient(self) -> bool {
        self != Fault::Permanent
    }
}

pub(crate) fn fault_of(e: &pg_sys::panic::CaughtError) -> Fault {
    use pg_sys::errcodes::PgSqlErrorCode::*;
    match e {
        pg_sys::panic::CaughtError::PostgresError(r)
        | pg_sys::panic::CaughtError::ErrorReport(r)
        | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => match r.sql_error_code() {
            ERRCODE_QUERY_CANCELED => Fault::Timeout,
            ERRCODE_LOCK_NOT_AVAILABLE
            | ERRCODE_T_R_SERIALIZATION_FAILURE
            | ERRCODE_T_R_DEADLOCK_DETECTED
            | ERRCODE_ADMIN_SHUTDOWN
            | ERRCODE_CANNOT_CONNECT_NOW => Fault::Transient,
            _ => Fault::Permanent,
        },
    }
}

/// As in_subtransaction, and what kind of error it was (fault_of).
pub(crate) fn in_subtransaction_or_transient<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, (Fault, String)> {
    unsafe {
        let (context, owner) = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let result = PgTryBuilder::new(|| Ok(f()))
            .catch_others(|e| Err((fault_of(&e), caught_message(e))))
            .execute();
        match result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// Runs `f` in a subtransaction of the current transaction (a session's,
/// not the worker's loop): an error is caught, the subtransaction rolled
/// back, and the error returned as text; the transaction goes on.
pub(crate) fn in_subtransaction<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    in_subtransaction_or_transient(f).map_err(|(_, m)| m)
}

// ---------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------

struct Database {
    oid: u32,
    name: String,
}

/// Databases a worker may serve: connectable, not templates, not half-dropped.
fn list_databases() -> Vec<Database> {
    let mut out = Vec::new();
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            // GETSTRUCT(tup)
            let header = (*tup).t_data;
            let f = &*((header as *const u8).add((*header).t_hoff as usize)
                as *const pg_sys::FormData_pg_database);
            // datconnlimit -2: a database whose DROP was interrupted
            if f.datallowconn && !f.datistemplate && f.datconnlimit != -2 {
                let name = CStr::from_ptr(f.datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                out.push(Database {
                    oid: f.oid.to_u32(),
                    name,
                });
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
    out
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn fraiseql_obs_launcher_main(_arg: pg_sys::Datum) {
    unsafe { install_signal_handlers() };
    BackgroundWorker::connect_worker_to_spi(None, None);
    let my_pid = unsafe { pg_sys::MyProcPid };
    REGISTRY.exclusive().launcher_pid = my_pid;
    log!("fraiseql_obs launcher started");

    let mut children: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    // databases we already warned about (no free worker slot), to warn once
    let mut warned: std::collections::HashSet<u32> = std::collections::HashSet::new();
    loop {
        if guc::WORKER_ENABLED.get() {
            let queued_before = crate::autonomous::next_id();
            let dbs = match in_transaction(list_databases) {
                Ok(d) => {
                    let oids: Vec<u32> = d.iter().map(|d| d.oid).collect();
                    crate::autonomous::keep_only(&oids, queued_before);
                    d
                }
                Err(e) => {
                    warning!("fraiseql_obs launcher: could not list databases: {e}");
                    Vec::new()
                }
            };
            // children that stopped are forgotten (and may be started again);
            // one registered but not started yet is still ours
            children.retain(|_, h| {
                !matches!(
                    h.pid(),
                    Err(BackgroundWorkerStatus::Stopped)
                        | Err(BackgroundWorkerStatus::PostmasterDied)
                )
            });
            let now = shmem::now_secs();
            let budget = guc::MAX_WORKERS.get().max(1) as usize;
            let mut to_start = Vec::new();
            let mut not_installed = Vec::new();
            {
                let mut reg = REGISTRY.exclusive();
                let rescan = std::mem::take(&mut reg.rescan);
                // forget databases that are gone
                for s in reg.slots.iter_mut() {
                    if s.db_oid != 0 && !dbs.iter().any(|d| d.oid == s.db_oid) {
                        *s = shmem::Slot::default();
                    }
                }
                // Databases that need a worker now: work waiting (a queued
                // notification, CREATE EXTENSION) or due (maintenance, a
                // retry, a digest, the periodic round). Longest waiting first.
                let mut candidates: Vec<(i64, usize, u32, String)> = Vec::new();
                for db in &dbs {
                    if children.contains_key(&db.oid) {
                        continue;
                    }
                    let idx = match reg.slots.iter().position(|s| s.db_oid == db.oid) {
                        Some(i) => i,
                        None => match reg.slots.iter().position(|s| s.db_oid == 0) {
                            Some(i) => {
                                reg.slots[i] = shmem::Slot {
                                    db_oid: db.oid,
                                    ..Default::default()
                                };
                                i
                            }
                            None => continue, // more databases than slots
                        },
                    };
                    let slot = &mut reg.slots[idx];
                    if rescan && slot.hold_reason == HOLD_NOT_INSTALLED {
                        // installed or not: a worker will look again
                        slot.hold_until = 0;
                        slot.hold_reason = 0;
                    }
                    if slot.hold_reason == HOLD_NOT_INSTALLED {
                        not_installed.push(db.oid);
                    }
                    if slot.pid != 0 || slot.hold_until > now {
                        continue;
                    }
                    if slot.wanted || slot.fold_wanted || slot.next_due <= now {
                        if slot.waiting_since == 0 {
                            slot.waiting_since = now;
                        }
                        candidates.push((slot.waiting_since, idx, db.oid, db.name.clone()));
                    }
                }
                candidates.sort();
                let free = budget.saturating_sub(children.len());
                for (_, idx, oid, name) in candidates.iter().take(free) {
                    let slot = &mut reg.slots[*idx];
                    // the new worker's first round serves everything
                    slot.wanted = false;
                    slot.fold_wanted = false;
                    slot.waiting_since = 0;
                    to_start.push((*oid, name.clone()));
                }
                reg.waiting = candidates.len().saturating_sub(free) as u32;
            }
            // PostgreSQL errors captured (src/sql_errors.rs) in databases a
            // worker found without the extension, queued before the launcher
            // knew: nobody will store them. (Not one installed since: its
            // CREATE EXTENSION asked for the rescan that cleared the mark
            // before any capture there, and so before queued_before.)
            for oid in not_installed {
                crate::autonomous::forget(oid, queued_before);
            }
            for (oid, name) in to_start {
                let started = BackgroundWorkerBuilder::new(&format!("{WORKER_TYPE} {name}"))
                    .set_type(WORKER_TYPE)
                    .set_library(LIBRARY)
                    .set_function("fraiseql_obs_worker_main")
                    .enable_spi_access()
                    .set_start_time(BgWorkerStartTime::RecoveryFinished)
                    .set_restart_time(None)
                    .set_argument(Some(pg_sys::Datum::from(oid)))
                    .set_notify_pid(my_pid)
                    .load_dynamic();
                match started {
                    Ok(h) => {
                        children.insert(oid, h);
                        warned.remove(&oid);
                    }
                    Err(_) => {
                        // no free max_worker_processes slot: asked again next time
                        if let Some(s) = REGISTRY
                            .exclusive()
                            .slots
                            .iter_mut()
                            .find(|s| s.db_oid == oid)
                        {
                            s.wanted = true;
                        }
                        if warned.insert(oid) {
                            warning!(
                                "fraiseql_obs launcher: could not start a worker for database \"{name}\" (raise max_worker_processes, or lower fraiseql_obs.max_workers); retrying quietly"
                            );
                        }
                    }
                }
            }
        }
        // woken by a worker that exits, a capture that queued a
        // notification, CREATE EXTENSION; otherwise when the next database
        // is due
        let now = shmem::now_secs();
        let next_due = REGISTRY
            .share()
            .slots
            .iter()
            .filter(|s| s.db_oid != 0 && s.pid == 0)
            .map(|s| s.next_due.max(s.hold_until))
            .min()
            .unwrap_or(i64::MAX);
        let naptime = guc::LAUNCHER_NAPTIME_S.get().max(1) as i64;
        let nap = Duration::from_secs(next_due.saturating_sub(now).clamp(1, naptime) as u64);
        wait(nap);
    }
}

// ---------------------------------------------------------------------------
// Database worker
// ---------------------------------------------------------------------------

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    let oid = arg.value() as u32;
    let mut reg = REGISTRY.exclusive();
    let me = unsafe { pg_sys::MyProcPid };
    for s in reg.slots.iter_mut() {
        if s.db_oid == oid && s.pid == me {
            s.pid = 0;
        }
    }
}

/// The shortest time between two folds woken by commits.
const FOLD_GAP: Duration = Duration::from_millis(10);
/// ... and the longest: a busy database's folds are spaced so that the
/// worker folds at most 1/FOLD_DUTY of the time (a fold's cost is mostly
/// per statement, not per row: larger batches cost less per capture), but
/// a capture's rules are still evaluated within FOLD_GAP_MAX.
const FOLD_GAP_MAX: Duration = Duration::from_millis(100);
const FOLD_DUTY: u32 = 8;

/// When the next fold asked for by commits may run, after one that started
/// at `last` and took `took`.
fn next_fold_at(last: Instant, took: Duration) -> Instant {
    last + (took * FOLD_DUTY).clamp(FOLD_GAP, FOLD_GAP_MAX)
}

/// What commits asked of this database's worker: (notifications were
/// queued, captures wait to be folded).
fn peek_wanted(oid: u32) -> (bool, bool) {
    let reg = REGISTRY.share();
    reg.slots
        .iter()
        .find(|s| s.db_oid == oid)
        .map(|s| (s.wanted, s.fold_wanted))
        .unwrap_or((false, false))
}

/// Clears the requests a round is about to serve, before it serves them: a
/// commit meanwhile asks again.
fn take_wanted(oid: u32, deliveries: bool, fold: bool) {
    let mut reg = REGISTRY.exclusive();
    if let Some(s) = reg.slots.iter_mut().find(|s| s.db_oid == oid) {
        if deliveries {
            s.wanted = false;
        }
        if fold {
            s.fold_wanted = false;
        }
    }
}

fn set_my_slot(oid: u32, f: impl Fn(&mut shmem::Slot)) {
    let mut reg = REGISTRY.exclusive();
    if let Some(s) = reg.slots.iter_mut().find(|s| s.db_oid == oid) {
        f(s);
    }
}

/// The schema the extension is installed in, or None.
pub(crate) fn extension_schema() -> Option<String> {
    crate::sql::one::<String>(
        "SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'fraiseql_obs'",
        &[],
    )
    .ok()
    .flatten()
}

/// The worker is a superuser, and a database's owner may `ALTER DATABASE
/// ... SET` any ordinary setting for every session in it, the worker's
/// included. Those that change what the worker's SQL means or whether it
/// can run are forced here, above any such SET: names resolve only in
/// pg_catalog (and its own temporary schema), so no object another role
/// created can stand in for a built-in; no role switch; transactions
/// read-write in READ COMMITTED; no statement timeout but the ones the
/// worker arms itself, and a lock waited for 10 s at most (a role allowed
/// to lock a table the worker reads, the rules for one, holds up one step,
/// retried next round, never the worker's loop); ISO dates; no JIT (its short statements over small
/// batches carry large cost estimates on big tables, and compiling them
/// would cost more than running them).
pub(crate) fn force_settings() {
    for (name, value) in [
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"role", c"none"),
        (c"default_transaction_read_only", c"off"),
        (c"default_transaction_isolation", c"read committed"),
        (c"default_transaction_deferrable", c"off"),
        (c"statement_timeout", c"0"),
        (c"lock_timeout", c"10s"),
        (c"idle_in_transaction_session_timeout", c"0"),
        (c"DateStyle", c"ISO, MDY"),
        (c"IntervalStyle", c"postgres"),
        (c"session_replication_role", c"origin"),
        (c"jit", c"off"),
    ] {
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn fraiseql_obs_worker_main(arg: pg_sys::Datum) {
    let oid = arg.value() as u32;
    unsafe { install_signal_handlers() };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(oid)), None);
    let me = unsafe { pg_sys::MyProcPid };
    unsafe { pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(oid)) };
    // Registered, then check for a DROP DATABASE that began while we were
    // starting: it saw no pid to stop, so we step aside ourselves.
    let held_for_drop = {
        let mut reg = REGISTRY.exclusive();
        match reg.slots.iter_mut().find(|s| s.db_oid == oid) {
            Some(s) => {
                s.pid = me;
                s.hold_reason == HOLD_DROPPING && s.hold_until > shmem::now_secs()
            }
            None => false,
        }
    };
    if held_for_drop {
        return;
    }
    let installs_seen = REGISTRY.share().installs;
    let appname = CString::new(WORKER_TYPE).unwrap_or_default();
    unsafe { pg_sys::pgstat_report_appname(appname.as_ptr()) };
    force_settings();

    let queued_before = crate::autonomous::next_id();
    let schema = match in_transaction(extension_schema) {
        Ok(Some(s)) => s,
        _ => {
            crate::autonomous::forget(oid, queued_before);
            // Not installed here (yet): leave this database alone for a while.
            // CREATE EXTENSION wakes the launcher, which then comes back at
            // once; one that committed while we looked may be this
            // database's, so then no hold.
            let mut reg = REGISTRY.exclusive();
            let raced = reg.installs != installs_seen;
            if let Some(s) = reg.slots.iter_mut().find(|s| s.db_oid == oid) {
                if raced {
                    s.next_due = 0;
                } else {
                    s.hold_until = shmem::now_secs() + NOT_INSTALLED_HOLD_S;
                    s.hold_reason = HOLD_NOT_INSTALLED;
                }
                s.installed = false;
            }
            return;
        }
    };
    set_my_slot(oid, |s| {
        s.hold_reason = 0;
        s.installed = true;
    });
    // autonomous captures a predecessor took without storing them
    crate::autonomous::retake(oid);
    log!("fraiseql_obs worker serving its database (extension schema {schema})");

    let flush_sql = format!("SELECT {schema}.fraiseql_flush_counts()::text");
    let rollup_sql = format!("SELECT {schema}.fraiseql_refresh_rollups()::text");
    let maintenance_sql = format!("SELECT {schema}.fraiseql_run_maintenance('worker')::text");
    // maintenance is due by the last run's time (this worker may be one of
    // many that served the database in turn)
    let mut next_maintenance = Instant::now() + seconds(&format!(
        "SELECT greatest(0, extract(epoch FROM coalesce( \
                    (SELECT {schema}._fraiseql_next_maintenance(make_interval(secs => {every})) \
                      WHERE EXISTS (SELECT FROM {schema}.tb_maintenance_run m WHERE m.triggered_by = 'worker')), \
                    now()) - now()))::text",
        every = guc::MAINTENANCE_INTERVAL_S.get().max(1)
    ));
    let mut next_flush = Instant::now();
    let mut last_fold = Instant::now();
    let mut fold_took = Duration::ZERO;
    let mut next_rollup = Instant::now();
    // deliveries are looked for when a commit queued some, and every
    // flush_interval for retries, leases and digest windows
    let mut next_delivery = Instant::now();
    // last error of each step (flush, maintenance, delivery, rollups,
    // autonomous captures), to log each problem once
    let mut last_errors: [Option<String>; 5] = [None, None, None, None, None];
    let mut more_to_deliver = false;
    // The worker serves its database while there is work, then exits: idle
    // databases hold no worker slot, and when databases wait for a slot
    // (fraiseql_obs.max_workers) each worker makes room after a round.
    let mut last_work = Instant::now();
    let mut rounds = 0u64;

    loop {
        let flush_every = Duration::from_millis(guc::FLUSH_INTERVAL_MS.get().max(10) as u64);
        let (deliveries_asked, fold_asked) = peek_wanted(oid);
        let now = Instant::now();
        // A commit that asked (a capture while rules exist) gets its fold
        // soon: the rules are evaluated there. Folds are spaced (next_fold_at), so
        // a busy database is folded in batches, and the request stays set
        // meanwhile, so the commits in between wake nobody.
        let fold_now =
            now >= next_flush || (fold_asked && now >= next_fold_at(last_fold, fold_took));
        let deliver_now = deliveries_asked || more_to_deliver || now >= next_delivery;
        let maintain_now = now >= next_maintenance;
        if guc::WORKER_ENABLED.get() && (fold_now || deliver_now || maintain_now) {
            take_wanted(oid, deliver_now, fold_now);
            let mut failures: Vec<(usize, &str, String)> = Vec::new();
            let mut successes: Vec<usize> = Vec::new();
            let mut worked = false;
            if fold_now {
                last_fold = now;
                // autonomous captures first, so that this fold counts them
                let taken = crate::autonomous::take(oid, crate::autonomous::BATCH);
                if !taken.rows.is_empty() {
                    report_activity(Some("fraiseql_obs: storing autonomous captures"));
                    let mut stored = in_transaction(|| crate::autonomous::store(&schema, &taken));
                    if stored.is_err() && taken.rows.len() > 1 {
                        // one row that cannot be stored must not take the
                        // others with it: each alone (only after a failure)
                        let mut first_error = None;
                        for (id, row) in taken.ids.iter().zip(&taken.rows) {
                            let one = crate::autonomous::Taken {
                                ids: vec![*id],
                                rows: vec![row.clone()],
                            };
                            let r = in_transaction(|| crate::autonomous::store(&schema, &one));
                            crate::autonomous::finish(&one, r.is_ok());
                            if let Err(e) = r {
                                first_error.get_or_insert(e);
                            }
                        }
                        stored = first_error.map_or(Ok(taken.rows.len()), Err);
                    } else {
                        crate::autonomous::finish(&taken, stored.is_ok());
                    }
                    match stored {
                        Ok(_) => {
                            worked = true;
                            successes.push(4)
                        }
                        Err(e) => failures.push((4, "storing autonomous captures", e)),
                    }
                }
                let more_autonomous = taken.rows.len() >= crate::autonomous::BATCH;
                match step("flushing counters", &flush_sql) {
                    Ok(r) => {
                        worked |= r.as_deref() != Some("0");
                        successes.push(0)
                    }
                    Err(e) => failures.push((0, "flushing counters", e)),
                }
                // the dashboards' rollups, in their own transaction, every
                // flush_interval only
                if now >= next_rollup {
                    next_rollup = now + flush_every;
                    match step("rolling up", &rollup_sql) {
                        Ok(r) => {
                            worked |= !r.as_deref().is_some_and(|t| {
                                t.contains("\"spans\": 0, \"occurrences\": 0") || t.contains("busy")
                            });
                            successes.push(3)
                        }
                        Err(e) => failures.push((3, "rolling up for the dashboards", e)),
                    }
                }
                next_flush = if more_autonomous {
                    Instant::now() // more are waiting
                } else {
                    Instant::now() + flush_every
                };
            }
            if maintain_now {
                let every = Duration::from_secs(guc::MAINTENANCE_INTERVAL_S.get().max(1) as u64);
                next_maintenance = Instant::now() + every;
                match step("maintenance", &maintenance_sql) {
                    Ok(result) => {
                        successes.push(1);
                        // a step skipped for a lock (a report held the
                        // table) is tried again within a minute
                        if skipped_a_step(result.as_deref()) {
                            next_maintenance = Instant::now() + every.min(Duration::from_secs(60));
                        }
                    }
                    Err(e) => failures.push((1, "maintenance", e)),
                }
            }
            if deliver_now {
                // what a commit queued (a fold of this round that queued
                // something asked at its own commit), what is due again,
                // and at once again while batches come back full
                next_delivery = Instant::now() + flush_every;
                report_activity(Some("fraiseql_obs: delivering notifications"));
                match crate::notify::deliver_due(&schema, &query_text) {
                    Ok(n) => {
                        successes.push(2);
                        worked |= n > 0;
                        more_to_deliver = n >= guc::NOTIFY_BATCH_SIZE.get().max(1) as usize;
                    }
                    Err(e) => {
                        failures.push((2, "delivering notifications", e));
                        more_to_deliver = false;
                    }
                }
                report_activity(None);
            }
            if fold_now {
                // the round's cost, deliveries included, spaces the next fold
                fold_took = now.elapsed();
            }
            let queued_before = crate::autonomous::next_id();
            if !failures.is_empty() && !matches!(in_transaction(extension_schema), Ok(Some(_))) {
                // DROP EXTENSION: the failure was expected; stop quietly and
                // let the launcher look again later.
                crate::autonomous::forget(oid, queued_before);
                set_my_slot(oid, |s| {
                    s.hold_until = shmem::now_secs() + NOT_INSTALLED_HOLD_S;
                    s.hold_reason = HOLD_NOT_INSTALLED;
                    s.installed = false;
                });
                return;
            }
            for i in successes {
                last_errors[i] = None;
            }
            for (i, what, e) in failures {
                note_error(what, e, &mut last_errors[i]);
            }
            rounds += 1;
            if worked {
                last_work = Instant::now();
            }
            let others_wait = REGISTRY.share().waiting > 0;
            let idle = last_work.elapsed()
                >= Duration::from_secs(guc::WORKER_IDLE_TIMEOUT_S.get().max(1) as u64);
            if !more_to_deliver && ((others_wait && rounds >= 1) || idle) {
                // when to come back if nothing wakes the database before
                let due = seconds(&format!(
                    "SELECT extract(epoch FROM {schema}._fraiseql_next_due(make_interval(secs => {})) - now())::text",
                    guc::MAINTENANCE_INTERVAL_S.get().max(1)
                ));
                let due = (due.as_secs() as i64).min(SWEEP_S);
                // Leaves unless work was asked for meanwhile: decided under the
                // registry lock, which a committing capture takes to ask, so
                // no request falls between this worker and the next one.
                let leave = {
                    let mut reg = REGISTRY.exclusive();
                    match reg
                        .slots
                        .iter_mut()
                        .find(|s| s.db_oid == oid && s.pid == me)
                    {
                        Some(s) if s.wanted || s.fold_wanted => false,
                        Some(s) => {
                            s.next_due = shmem::now_secs() + due.max(0);
                            s.pid = 0;
                            true
                        }
                        None => true,
                    }
                };
                if leave {
                    return;
                }
                continue;
            }
        }
        let mut until = next_flush.min(next_maintenance).min(next_delivery);
        let (deliveries_asked, fold_asked) = peek_wanted(oid);
        if fold_asked {
            until = until.min(next_fold_at(last_fold, fold_took));
        }
        let timeout = if more_to_deliver || deliveries_asked {
            Duration::from_millis(1)
        } else {
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        // a reloaded interval takes effect at once
        let before = (
            guc::FLUSH_INTERVAL_MS.get(),
            guc::MAINTENANCE_INTERVAL_S.get(),
        );
        wait(timeout);
        let after = (
            guc::FLUSH_INTERVAL_MS.get(),
            guc::MAINTENANCE_INTERVAL_S.get(),
        );
        if before != after {
            next_flush = Instant::now();
            next_maintenance = Instant::now();
        }
    }
}

/// Runs one query returning one text value in its own transaction (the
/// notification code's access to the database; its arguments are text).
fn query_text(sql: &str, args: Vec<serde_json::Value>) -> Result<Option<String>, String> {
    let sql = sql.to_string();
    let args: Vec<Option<String>> = args
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        })
        .collect();
    in_transaction(move || {
        let datums: Vec<pgrx::datum::DatumWithOid> =
            args.iter().map(|a| a.clone().into()).collect();
        crate::sql::one::<String>(&sql, &datums)
    })
    .and_then(|r| r.map_err(|e| e.to_string()))
}

/// One step of the worker, in its own transaction: its result, or the
/// error text if it failed.
fn step(what: &str, sql: &str) -> Result<Option<String>, String> {
    report_activity(Some(&format!("fraiseql_obs: {what}")));
    let sql = sql.to_string();
    let r = in_transaction(move || crate::sql::one::<String>(&sql, &[]));
    report_activity(None);
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e),
    }
}

/// Whether a maintenance run's result lists a step skipped for a lock.
fn skipped_a_step(result: Option<&str>) -> bool {
    result
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.get("skipped")?.as_array().map(|a| !a.is_empty()))
        .unwrap_or(false)
}

/// A query's answer in seconds (0 when it fails or says nothing).
fn seconds(sql: &str) -> Duration {
    let secs = step("scheduling", sql)
        .ok()
        .flatten()
        .and_then(|t| t.parse::<f64>().ok())
        .filter(|s| s.is_finite())
        .unwrap_or(0.0);
    Duration::from_secs_f64(secs.clamp(0.0, 86400.0 * 365.0))
}

/// Logs a failure once per distinct message, so a persisting problem does not
/// fill the log; the step is retried on its next tick anyway.
fn note_error(what: &str, e: String, last_error: &mut Option<String>) {
    if last_error.as_deref() != Some(e.as_str()) {
        warning!("fraiseql_obs worker: {what} failed, retried next tick: {e}");
    }
    *last_error = Some(e);
}

// ---------------------------------------------------------------------------
// DROP DATABASE / DROP EXTENSION are never blocked by our worker
// ---------------------------------------------------------------------------

static mut PREV_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::os::raw::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        let node = (*pstmt).utilityStmt;
        if !node.is_null() && shmem::available() {
            for db in databases_this_command_stops(node, context) {
                stop_worker_of(db);
            }
        }
        match PREV_UTILITY_HOOK {
            Some(prev) => prev(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}

/// The databases whose worker must step aside for this command, which will
/// run: only commands that pass their own permission checks (made here the
/// way PostgreSQL itself makes them, before anything is touched) and are not
/// refused outright inside a transaction block. A command that a role may
/// not run never touches a worker (any login role could otherwise silence
/// alerting by failing a DROP DATABASE in a loop).
unsafe fn databases_this_command_stops(
    node: *mut pg_sys::Node,
    context: pg_sys::ProcessUtilityContext::Type,
) -> Vec<pg_sys::Oid> {
    unsafe {
        let user = pg_sys::GetUserId();
        let owns_db = |oid: pg_sys::Oid| pg_sys::pg_database_ownercheck(oid, user);
        let db_oid = |name: *const std::os::raw::c_char| -> Option<pg_sys::Oid> {
            if name.is_null() {
                return None;
            }
            let oid = pg_sys::get_database_oid(name, true);
            (oid != pg_sys::InvalidOid).then_some(oid)
        };
        // PreventInTransactionBlock's own test: such commands run only as a
        // top-level statement, outside a transaction block, subtransaction
        // or pipeline (and are refused by it otherwise)
        const XACT_FLAGS_PIPELINING: u32 = 1 << 3;
        let in_block = context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            || pg_sys::IsTransactionBlock()
            || pg_sys::IsSubTransaction()
            || pg_sys::MyXactFlags as u32 & XACT_FLAGS_PIPELINING != 0;
        let mut out = Vec::new();
        if pgrx::is_a(node, pg_sys::NodeTag::T_DropdbStmt) {
            let stmt = node as *mut pg_sys::DropdbStmt;
            if let Some(oid) = db_oid((*stmt).dbname) {
                if !in_block && oid != pg_sys::MyDatabaseId && owns_db(oid) {
                    out.push(oid);
                }
            }
        } else if pgrx::is_a(node, pg_sys::NodeTag::T_RenameStmt) {
            let stmt = node as *mut pg_sys::RenameStmt;
            if (*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE {
                if let Some(oid) = db_oid((*stmt).subname) {
                    // RenameDatabase: owner, and the right to create databases
                    if oid != pg_sys::MyDatabaseId && owns_db(oid) && have_createdb_privilege() {
                        out.push(oid);
                    }
                }
            }
        } else if pgrx::is_a(node, pg_sys::NodeTag::T_AlterDatabaseStmt) {
            // ALTER DATABASE x SET TABLESPACE t needs x to have no connections
            let stmt = node as *mut pg_sys::AlterDatabaseStmt;
            let options = pgrx::PgList::<pg_sys::DefElem>::from_pg((*stmt).options);
            let moves = options.iter_ptr().any(|o| {
                !(*o).defname.is_null() && CStr::from_ptr((*o).defname).to_bytes() == b"tablespace"
            });
            if moves && !in_block {
                if let Some(oid) = db_oid((*stmt).dbname) {
                    if oid != pg_sys::MyDatabaseId && owns_db(oid) {
                        out.push(oid);
                    }
                }
            }
        } else if pgrx::is_a(node, pg_sys::NodeTag::T_DropStmt) {
            // DROP EXTENSION fraiseql_obs: the worker would otherwise be
            // inside one of its steps, holding locks on the extension's
            // tables in an order DROP cannot know (a deadlock, one of the
            // two then fails)
            let stmt = node as *mut pg_sys::DropStmt;
            if (*stmt).removeType == pg_sys::ObjectType::OBJECT_EXTENSION {
                let objects = pgrx::PgList::<pg_sys::Node>::from_pg((*stmt).objects);
                let ours = objects.iter_ptr().any(|o| {
                    pgrx::is_a(o, pg_sys::NodeTag::T_String)
                        && CStr::from_ptr((*(o as *mut pg_sys::String)).sval).to_bytes()
                            == b"fraiseql_obs"
                });
                if ours {
                    let ext = pg_sys::get_extension_oid(c"fraiseql_obs".as_ptr(), true);
                    if ext != pg_sys::InvalidOid && pg_sys::pg_extension_ownercheck(ext, user) {
                        out.push(pg_sys::MyDatabaseId);
                    }
                }
            } else if (*stmt).removeType == pg_sys::ObjectType::OBJECT_SCHEMA
                && (*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE
            {
                // DROP SCHEMA ... CASCADE of the extension's schema drops the
                // extension too (monitoring is a member: PostgreSQL refuses it)
                let ext = pg_sys::get_extension_oid(c"fraiseql_obs".as_ptr(), true);
                if ext != pg_sys::InvalidOid {
                    // (get_extension_schema is not exported: the schema
                    // holding the extension's own tb_error_log -- a member
                    // of the extension, not any table of that name, which
                    // any schema's owner could make -- is its schema)
                    let objects = pgrx::PgList::<pg_sys::Node>::from_pg((*stmt).objects);
                    let ours = objects.iter_ptr().any(|o| {
                        if !pgrx::is_a(o, pg_sys::NodeTag::T_String) {
                            return false;
                        }
                        let nsp =
                            pg_sys::get_namespace_oid((*(o as *mut pg_sys::String)).sval, true);
                        if nsp == pg_sys::InvalidOid {
                            return false;
                        }
                        let rel = pg_sys::get_relname_relid(c"tb_error_log".as_ptr(), nsp);
                        let home = rel != pg_sys::InvalidOid
                            && pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, rel) == ext;
                        home && pg_sys::pg_namespace_ownercheck(nsp, user)
                    });
                    if ours {
                        out.push(pg_sys::MyDatabaseId);
                    }
                }
            }
        } else if pgrx::is_a(node, pg_sys::NodeTag::T_CreatedbStmt) {
            // CREATE DATABASE ... TEMPLATE x needs x to have no connections;
            // createdb: the right to create databases, and x a template or
            // owned by the caller
            let stmt = node as *mut pg_sys::CreatedbStmt;
            let options = pgrx::PgList::<pg_sys::DefElem>::from_pg((*stmt).options);
            for opt in options.iter_ptr() {
                if !(*opt).defname.is_null()
                    && CStr::from_ptr((*opt).defname).to_bytes() == b"template"
                    && !(*opt).arg.is_null()
                    && !in_block
                    && have_createdb_privilege()
                {
                    if let Some(oid) = db_oid(pg_sys::defGetString(opt)) {
                        if is_template(oid) || owns_db(oid) {
                            out.push(oid);
                        }
                    }
                }
            }
        }
        out
    }
}

unsafe extern "C-unwind" {
    // commands/dbcommands.h
    fn have_createdb_privilege() -> bool;
}

/// pg_database.datistemplate of a database.
unsafe fn is_template(oid: pg_sys::Oid) -> bool {
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tup.is_null() {
            return false;
        }
        let header = (*tup).t_data;
        let f = &*((header as *const u8).add((*header).t_hoff as usize)
            as *const pg_sys::FormData_pg_database);
        let v = f.datistemplate;
        pg_sys::ReleaseSysCache(tup);
        v
    }
}

/// Stops the worker connected to this database and keeps the launcher from
/// starting another one until the command's transaction ends (committed or
/// not); waits (at most 5 s) for it to exit.
unsafe fn stop_worker_of(oid: pg_sys::Oid) {
    let oid = oid.to_u32();
    shmem::hold_until_end_of_xact(oid);
    let pid = {
        let mut reg = REGISTRY.exclusive();
        match reg.slots.iter_mut().find(|s| s.db_oid == oid) {
            Some(s) => {
                s.hold_until = shmem::now_secs() + DROP_HOLD_S;
                s.hold_reason = HOLD_DROPPING;
                s.pid
            }
            None => 0,
        }
    };
    if pid == 0 {
        return;
    }
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..500 {
        let still = REGISTRY
            .share()
            .slots
            .iter()
            .any(|s| s.db_oid == oid && s.pid == pid);
        if !still || unsafe { libc::kill(pid, 0) } != 0 {
            break;
        }
        unsafe { pg_sys::pg_usleep(10_000) };
        pg_sys::check_for_interrupts!();
    }
}

// ---------------------------------------------------------------------------
// Wake the launcher when CREATE EXTENSION commits
// ---------------------------------------------------------------------------

/// Asks the launcher to look for databases again once this transaction
/// commits (CREATE EXTENSION calls it, so the new database is served at once).
#[pg_extern(volatile)]
fn _fraiseql_wake_launcher() -> bool {
    shmem::wake_at_commit(shmem::WakeAtCommit::Launcher)
}
