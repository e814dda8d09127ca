//! Shared memory: the registry of running workers, so that any backend can
//! wake the launcher (after CREATE EXTENSION commits) or stop the worker of a
//! database that is about to be dropped.
use crate::autonomous::QUEUE as AUTONOMOUS_QUEUE;
use crate::spike::RATES as SPIKE_RATES;
use crate::sql_errors::ROLE_RATES as SQL_ERROR_RATES;
use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use std::sync::atomic::{AtomicBool, Ordering};

pub const MAX_DATABASES: usize = 256;

#[derive(Copy, Clone, Default)]
pub struct Slot {
    pub db_oid: u32,
    /// pid of the database's worker, 0 when none runs
    pub pid: i32,
    /// unix seconds before which the launcher must not start a worker here
    /// (the extension is not installed, or the database is being dropped)
    pub hold_until: i64,
    /// why it is held: 1 = extension not installed (CREATE EXTENSION lifts it)
    pub hold_reason: u8,
    /// the database's worker found the extension (and has not seen it go)
    pub installed: bool,
    /// work is waiting (a notification was queued): serve it when a slot is free
    pub wanted: bool,
    /// captures committed while rules exist: fold them soon (the rules are
    /// evaluated there). Set until the worker folds, so that the commits
    /// meanwhile find it set and wake nobody.
    pub fold_wanted: bool,
    /// unix seconds when the database next needs a worker if nothing wakes it
    /// (maintenance, a retry, a digest window; 0: now)
    pub next_due: i64,
    /// unix seconds since when it waits for a worker slot (0: not waiting)
    pub waiting_since: i64,
}

#[derive(Copy, Clone)]
pub struct Registry {
    pub launcher_pid: i32,
    /// set by CREATE EXTENSION: forget the hold times and look again
    pub rescan: bool,
    /// CREATE EXTENSION commits so far: a worker that found no extension
    /// holds its database off only if none committed since it looked
    pub installs: u64,
    /// databases due or wanted that wait for a worker slot: a worker that
    /// has served a round then makes room
    pub waiting: u32,
    pub slots: [Slot; MAX_DATABASES],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            launcher_pid: 0,
            rescan: false,
            installs: 0,
            waiting: 0,
            slots: [Slot::default(); MAX_DATABASES],
        }
    }
}

unsafe impl PGRXSharedMemory for Registry {}

pub static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"fraiseql_obs_registry") };

/// Set in the postmaster when loaded through shared_preload_libraries and
/// inherited by every backend it forks.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(REGISTRY);
        pg_shmem_init!(SPIKE_RATES = 0);
        pg_shmem_init!(SQL_ERROR_RATES = 0);
        pg_shmem_init!(AUTONOMOUS_QUEUE = 0);
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

/// AddinShmemInitLock (storage/lwlocknames.h: `&MainLWLockArray[21].lock`),
/// which serializes ShmemInitStruct calls; pgrx does not bind the macro.
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// A named block of shared memory, zeroed when first created (at startup,
/// from on_shmem_startup).
pub unsafe fn zeroed_struct(name: &std::ffi::CStr, size: usize) -> *mut u8 {
    unsafe {
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let p = pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found).cast::<u8>();
        if !found {
            std::ptr::write_bytes(p, 0, size);
        }
        pg_sys::LWLockRelease(init_lock);
        p
    }
}

/// Whether the registry exists (the library was preloaded).
pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether database `db`'s worker found the extension there. (A database no
/// worker has looked at yet -- just created, beyond MAX_DATABASES, or not
/// served for lack of workers -- does not count: PostgreSQL errors captured
/// there would wait in the queue, which frees space in order, for ever.)
pub fn extension_installed(db: u32) -> bool {
    available()
        && REGISTRY
            .share()
            .slots
            .iter()
            .any(|s| s.db_oid == db && s.installed && s.hold_reason != crate::worker::HOLD_NOT_INSTALLED)
}

/// Sets the latch of the process with this pid, if it is alive.
pub fn set_latch_of(pid: i32) {
    if pid == 0 {
        return;
    }
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&raw mut (*proc_).procLatch);
        }
    }
}

// ---------------------------------------------------------------------------
// Waking a process when the current transaction commits (never on abort):
// the launcher after CREATE EXTENSION, a database's worker after a capture
// queued a notification.
// ---------------------------------------------------------------------------

/// What to wake at commit.
#[derive(Clone, Copy)]
pub enum WakeAtCommit {
    /// the launcher, asking it to look for databases again
    Launcher,
    /// the worker of the current database: notifications were queued
    Worker,
    /// the worker of the current database: captures to fold soon
    Fold,
}

static mut WAKE_LAUNCHER: bool = false;
static mut WAKE_WORKER: bool = false;
static mut WAKE_FOLD: bool = false;
static mut XACT_CALLBACK_REGISTERED: bool = false;
/// Databases whose worker this backend stopped for a command (DROP DATABASE,
/// RENAME, ...): the hold ends with the command's transaction, whatever its
/// outcome, so a command that fails never keeps a worker away.
static mut HELD: Vec<u32> = Vec::new();

/// Ends the holds this backend placed (only those) and wakes the launcher
/// so that a database still there is served again at once. No rescan: that
/// would lift other databases' holds too.
fn release_holds() {
    let held = unsafe { std::mem::take(&mut *(&raw mut HELD)) };
    if held.is_empty() {
        return;
    }
    let launcher = {
        let mut reg = REGISTRY.exclusive();
        for s in reg.slots.iter_mut() {
            if held.contains(&s.db_oid) && s.hold_reason == crate::worker::HOLD_DROPPING {
                s.hold_until = 0;
                s.hold_reason = 0;
            }
        }
        reg.launcher_pid
    };
    set_latch_of(launcher);
}

/// Remembers that this backend holds the worker of `db_oid` off until the
/// end of its transaction.
pub fn hold_until_end_of_xact(db_oid: u32) {
    unsafe {
        register_xact_callback();
        let held = &mut *(&raw mut HELD);
        if !held.contains(&db_oid) {
            held.push(db_oid);
        }
    }
}

unsafe fn register_xact_callback() {
    unsafe {
        if !XACT_CALLBACK_REGISTERED {
            pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
            XACT_CALLBACK_REGISTERED = true;
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    unsafe {
        match event {
            pg_sys::XactEvent::XACT_EVENT_COMMIT => {
                release_holds();
                let (launcher, worker, fold) = (WAKE_LAUNCHER, WAKE_WORKER, WAKE_FOLD);
                WAKE_LAUNCHER = false;
                WAKE_WORKER = false;
                WAKE_FOLD = false;
                if !(launcher || worker || fold) {
                    return;
                }
                wake(pg_sys::MyDatabaseId.to_u32(), launcher, worker, fold);
            }
            pg_sys::XactEvent::XACT_EVENT_ABORT => {
                release_holds();
                WAKE_LAUNCHER = false;
                WAKE_WORKER = false;
                WAKE_FOLD = false;
            }
            _ => {}
        }
    }
}

/// Asks the launcher to look again (`launcher`) and the worker of database
/// `db` for deliveries (`worker`) or a fold (`fold`), setting their latches
/// unless a running worker has the same request pending already.
fn wake(db: u32, launcher: bool, worker: bool, fold: bool) {
    if !launcher {
        // a request not yet taken by a running worker: it will
        // serve this commit too (the cheap, shared path for a
        // busy database)
        let reg = REGISTRY.share();
        if reg.slots.iter().any(|s| {
            s.db_oid == db && s.pid != 0 && (s.wanted || !worker) && (s.fold_wanted || !fold)
        }) {
            return;
        }
    }
    let pids = {
        let mut reg = REGISTRY.exclusive();
        if launcher {
            reg.rescan = true;
            reg.installs = reg.installs.wrapping_add(1);
        }
        let launcher_pid = reg.launcher_pid;
        let slot = reg.slots.iter_mut().find(|s| s.db_oid == db);
        let worker_pid = slot.as_ref().map(|s| s.pid).unwrap_or(0);
        // Work is waiting. The worker clears these when it
        // serves them and does not exit while one is set; with
        // no worker, the launcher starts one.
        let need_launcher = (worker || fold) && worker_pid == 0;
        if let Some(s) = slot {
            s.wanted |= worker;
            s.fold_wanted |= fold;
        }
        [
            if launcher || need_launcher {
                launcher_pid
            } else {
                0
            },
            if worker || fold { worker_pid } else { 0 },
        ]
    };
    pids.into_iter().for_each(set_latch_of);
}

/// Wakes the current database's worker now, not at commit, for a fold (an
/// autonomous capture was queued: it must not wait for a transaction that
/// may roll back).
pub fn wake_fold_now() {
    if available() {
        wake(unsafe { pg_sys::MyDatabaseId.to_u32() }, false, false, true);
    }
}

/// Arranges for `what` to be woken when the current transaction commits.
/// Returns false when the library was not preloaded (no workers to wake).
pub fn wake_at_commit(what: WakeAtCommit) -> bool {
    if !available() {
        return false;
    }
    unsafe {
        register_xact_callback();
        match what {
            WakeAtCommit::Launcher => WAKE_LAUNCHER = true,
            WakeAtCommit::Worker => WAKE_WORKER = true,
            WakeAtCommit::Fold => WAKE_FOLD = true,
        }
    }
    true
}
