//! The group cache, in shared memory: fingerprint -> what a capture needs to
//! know about its group (id, resolved, resolved_at, severity). Shared by all
//! backends, so a new connection captures at full speed from its first call.
//!
//! Entries carry the epoch they were read in. A transaction that changes a
//! group's status or severity, deletes groups or changes notification rules
//! bumps the epoch when it commits (triggers call `invalidate`), which makes
//! every entry stale at once. An entry is always read from committed data
//! after the epoch was read, so it is never newer than its epoch says.
//! Groups this transaction created or changed are published only when it
//! commits (and forgotten if it, or a savepoint, rolls back): another
//! session must never see a group id that could still vanish.
use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::shmem::PgSharedMemoryInitialization;
use pgrx::PgAtomic;
use std::cell::UnsafeCell;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of the table (a power of two); 64 bytes each.
const SLOTS: usize = 32 * 1024;
/// A key is looked for in this many consecutive slots.
const PROBES: usize = 8;
/// Groups published at commit, at most (more are simply not cached).
const MAX_PENDING: usize = 65_536;

#[repr(C)]
#[derive(Clone, Copy)]
struct Entry {
    /// 0: empty
    epoch: u64,
    database: u32,
    /// the extension instance: tb_error_log's oid
    table: u32,
    key: [u8; 16],
    error_id: [u8; 16],
    resolved_at: i64,
    flags: u8,
    severity_rank: u8,
}

const RESOLVED: u8 = 1;
const HAS_RESOLVED_AT: u8 = 2;

/// What the capture fast path needs about a group.
#[derive(Clone, Copy)]
pub struct Group {
    pub error_id: [u8; 16],
    pub resolved: bool,
    /// PostgreSQL microseconds
    pub resolved_at: Option<i64>,
    pub severity_rank: u8,
}

pub static LOCK: PgLwLock<u64> = unsafe { PgLwLock::new(c"fraiseql_obs_group_cache") };
pub static EPOCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"fraiseql_obs_group_epoch") };
pub static TABLE: SlotTable = SlotTable(UnsafeCell::new(std::ptr::null_mut()));

/// The slots, zeroed at startup (too large to be built as a Rust value).
pub struct SlotTable(UnsafeCell<*mut Entry>);
unsafe impl Sync for SlotTable {}

impl PgSharedMemoryInitialization for SlotTable {
    type Value = u8;

    unsafe fn on_shmem_request(&'static self) {
        unsafe { pg_sys::RequestAddinShmemSpace(SLOTS * size_of::<Entry>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: u8) {
        unsafe {
            *self.0.get() =
                crate::shmem::zeroed_struct(c"fraiseql_obs_group_slots", SLOTS * size_of::<Entry>())
                    .cast::<Entry>();
        }
    }
}

fn slots() -> *mut Entry {
    unsafe { *TABLE.0.get() }
}

/// The current epoch; None when the library was not preloaded (no shared
/// memory: nothing is cached).
pub fn epoch() -> Option<u64> {
    crate::shmem::available().then(|| EPOCH.get().load(Ordering::SeqCst) + 1)
}

/// A 128-bit key for a fingerprint.
pub fn key(fingerprint: &str) -> [u8; 16] {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    fingerprint.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (0x9e37_79b9_7f4a_7c15u64, fingerprint).hash(&mut b);
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.finish().to_le_bytes());
    k[8..].copy_from_slice(&b.finish().to_le_bytes());
    k
}

fn start(key: &[u8; 16]) -> usize {
    u64::from_le_bytes(key[..8].try_into().unwrap()) as usize & (SLOTS - 1)
}

unsafe fn database() -> u32 {
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

pub fn lookup(table: pg_sys::Oid, key: &[u8; 16], epoch: u64) -> Option<Group> {
    if unsafe { BYPASS } {
        return None;
    }
    let db = unsafe { database() };
    let _guard = LOCK.share();
    let s = start(key);
    (0..PROBES)
        .map(|i| unsafe { *slots().add((s + i) & (SLOTS - 1)) })
        .find(|e| {
            e.epoch == epoch && e.database == db && e.table == table.to_u32() && e.key == *key
        })
        .map(|e| Group {
            error_id: e.error_id,
            resolved: e.flags & RESOLVED != 0,
            resolved_at: (e.flags & HAS_RESOLVED_AT != 0).then_some(e.resolved_at),
            severity_rank: e.severity_rank,
        })
}

fn store(db: u32, table: u32, key: [u8; 16], epoch: u64, g: Group) {
    let entry = Entry {
        epoch,
        database: db,
        table,
        key,
        error_id: g.error_id,
        resolved_at: g.resolved_at.unwrap_or(0),
        flags: if g.resolved { RESOLVED } else { 0 }
            | if g.resolved_at.is_some() {
                HAS_RESOLVED_AT
            } else {
                0
            },
        severity_rank: g.severity_rank,
    };
    let _guard = LOCK.exclusive();
    let current = EPOCH.get().load(Ordering::SeqCst) + 1;
    let s = start(&key);
    let slot = (0..PROBES)
        .map(|i| (s + i) & (SLOTS - 1))
        .find(|&i| unsafe {
            let e = &*slots().add(i);
            e.key == key && e.database == db && e.table == table
        })
        .or_else(|| {
            (0..PROBES)
                .map(|i| (s + i) & (SLOTS - 1))
                .find(|&i| unsafe { (*slots().add(i)).epoch != current })
        })
        // all taken and current: replace one, chosen by the key
        .unwrap_or((s + key[15] as usize % PROBES) & (SLOTS - 1));
    unsafe { *slots().add(slot) = entry };
}

/// Publish a group read from committed data.
pub fn publish(table: pg_sys::Oid, key: [u8; 16], epoch: u64, g: Group) {
    if unsafe { BYPASS } {
        return;
    }
    store(unsafe { database() }, table.to_u32(), key, epoch, g);
}

/// Publish a group this transaction created or changed, when it commits.
pub fn publish_at_commit(table: pg_sys::Oid, key: [u8; 16], epoch: u64, g: Group) {
    unsafe {
        register_callbacks();
        let pending = &mut *(&raw mut PENDING);
        if pending.len() < MAX_PENDING {
            pending.push((table.to_u32(), key, epoch, g));
        }
    }
}

/// Groups or rules changed in this transaction: this backend stops using the
/// cache until the transaction ends, every backend forgets it at commit.
pub fn invalidate() {
    if !crate::shmem::available() {
        return;
    }
    unsafe {
        register_callbacks();
        BYPASS = true;
        BUMP = true;
    }
}

/// Whether this transaction changed groups or rules (the cache is not used).
pub fn bypassed() -> bool {
    unsafe { BYPASS }
}

static mut PENDING: Vec<(u32, [u8; 16], u64, Group)> = Vec::new();
static mut BYPASS: bool = false;
static mut BUMP: bool = false;
static mut REGISTERED: bool = false;

unsafe fn register_callbacks() {
    unsafe {
        if !REGISTERED {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
            REGISTERED = true;
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    unsafe {
        match event {
            pg_sys::XactEvent::XACT_EVENT_COMMIT => {
                // Called after the commit is visible to others: a backend that
                // reads the new epoch also sees the change.
                if BUMP {
                    EPOCH.get().fetch_add(1, Ordering::SeqCst);
                }
                let pending = std::mem::take(&mut *(&raw mut PENDING));
                if !BUMP && !pending.is_empty() {
                    let db = database();
                    for (table, key, epoch, g) in pending {
                        store(db, table, key, epoch, g);
                    }
                }
                BYPASS = false;
                BUMP = false;
            }
            pg_sys::XactEvent::XACT_EVENT_ABORT => {
                (*(&raw mut PENDING)).clear();
                BYPASS = false;
                BUMP = false;
            }
            _ => {}
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    // a rolled-back savepoint may have created some of the pending groups
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        unsafe { (*(&raw mut PENDING)).clear() };
    }
}
