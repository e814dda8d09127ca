//! Autonomous captures: `fraiseql_capture_error(..., autonomous => true)`
//! stores an occurrence that survives the caller's rollback (the usual
//! PL/pgSQL pattern captures in an EXCEPTION block, then re-raises).
//!
//! The capturing backend validates, clips and fingerprints as usual, then
//! copies the row into a bounded queue in shared memory instead of inserting
//! it, and wakes its database's worker at once (not at commit). The worker
//! takes its database's entries at the start of its next fold round, inserts
//! them in one transaction (the fold right after counts them and evaluates
//! the rules), and frees them once that transaction has committed; an entry
//! whose batch failed is tried again, and given up (counted as `failed`)
//! after MAX_ATTEMPTS. So an autonomous capture is lost only if the server
//! stops (crash, immediate shutdown) between the capture and that commit --
//! a fold gap, at most FOLD_GAP_MAX -- or if its database is dropped first
//! (the launcher then frees its entries, counted as dropped).
//!
//! A full queue never blocks the caller: the capture is counted as `dropped`
//! (`fraiseql_autonomous_stats()`) and the caller gets a WARNING. Without
//! shared_preload_libraries there is no queue: the capture is stored in the
//! caller's transaction, with a WARNING saying it is lost if that rolls back.
//!
//! The queue is shared by every database of the cluster, so no database may
//! take it from the others: one database's entries waiting to be stored hold
//! at most half of what their kind may use (PostgreSQL's own errors a
//! quarter, see push_within), and an entry stored or given up frees its space
//! at once, wherever it is: a database whose worker is slow, stuck or absent
//! keeps only its own entries waiting, never the others' space (when the
//! ring is full, the entries still waiting are moved together; see compact).
//!
//! The queue is a ring of entries (a 32-byte header, then the row), under
//! one LWLock of a named tranche; nothing that can raise an error runs while
//! it is held. Entries are named by a sequence number, not a place in the
//! ring (compaction moves them).
use crate::guc;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PgSharedMemoryInitialization;
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::ptr::null_mut;

const ENTRY_HEADER: usize = 32;
const ALIGN: u64 = 32;
const READY: u8 = 0;
const TAKEN: u8 = 1;
const DONE: u8 = 2;
/// Batches an entry may fail in before it is given up.
const MAX_ATTEMPTS: u8 = 3;
/// Entries one round takes at most.
pub const BATCH: usize = 5000;
const TRANCHE: &CStr = c"fraiseql_obs_autonomous";
/// Databases whose waiting entries are accounted for at once; a database
/// beyond (more than 64 with captures waiting at the same moment) is not
/// held to its share.
const DB_SLOTS: usize = 64;
const NO_SLOT: u8 = u8::MAX;

#[repr(C)]
struct Header {
    capacity: u64,
    /// where the next entry goes, and the oldest entry not yet done (both
    /// grow for ever; the ring offset is the value modulo capacity)
    head: u64,
    tail: u64,
    /// the sequence number of the next entry
    next_id: u64,
    queued: u64,
    stored: u64,
    dropped: u64,
    failed: u64,
    /// bytes of the entries not done, in all and per database slot
    live: u64,
    held: [u64; DB_SLOTS],
    held_db: [u32; DB_SLOTS],
}

pub struct Queue(UnsafeCell<(*mut Header, *mut u8, *mut pg_sys::LWLock)>);
unsafe impl Sync for Queue {}

pub static QUEUE: Queue = Queue(UnsafeCell::new((null_mut(), null_mut(), null_mut())));

fn capacity_bytes() -> usize {
    let kb = guc::AUTONOMOUS_QUEUE_KB.get().max(64) as usize;
    kb * 1024 / ALIGN as usize * ALIGN as usize
}

impl PgSharedMemoryInitialization for Queue {
    type Value = u8;

    unsafe fn on_shmem_request(&'static self) {
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<Header>() + capacity_bytes());
            pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _value: u8) {
        unsafe {
            let cap = capacity_bytes();
            let p = crate::shmem::zeroed_struct(
                c"fraiseql_obs_autonomous_queue",
                size_of::<Header>() + cap,
            );
            let h = p.cast::<Header>();
            if (*h).capacity == 0 {
                (*h).capacity = cap as u64;
            }
            let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
            *self.0.get() = (h, p.add(size_of::<Header>()), lock);
        }
    }
}

/// The ring: its header and entries (the logic, testable without
/// PostgreSQL).
struct Ring {
    h: *mut Header,
    buf: *mut u8,
    cap: u64,
}

/// The queue, locked; released when dropped.
struct Locked {
    ring: Ring,
    lock: *mut pg_sys::LWLock,
}

impl std::ops::Deref for Locked {
    type Target = Ring;
    fn deref(&self) -> &Ring {
        &self.ring
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.lock) }
    }
}

fn lock() -> Option<Locked> {
    let (h, buf, lock) = unsafe { *QUEUE.0.get() };
    if h.is_null() || !crate::shmem::available() {
        return None;
    }
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let cap = unsafe { (*h).capacity };
    Some(Locked {
        ring: Ring { h, buf, cap },
        lock,
    })
}

/// An entry's header: its length (header and padding included), database,
/// state, failed attempts, database slot, row length and sequence number.
struct At(*mut u8);

impl At {
    unsafe fn len(&self) -> u64 {
        unsafe { self.0.cast::<u32>().read() as u64 }
    }
    unsafe fn db(&self) -> u32 {
        unsafe { self.0.add(4).cast::<u32>().read() }
    }
    unsafe fn state(&self) -> *mut u8 {
        unsafe { self.0.add(8) }
    }
    unsafe fn attempts(&self) -> *mut u8 {
        unsafe { self.0.add(9) }
    }
    unsafe fn slot(&self) -> u8 {
        unsafe { *self.0.add(10) }
    }
    unsafe fn id(&self) -> u64 {
        unsafe { self.0.add(16).cast::<u64>().read() }
    }
    unsafe fn payload(&self) -> &[u8] {
        unsafe {
            let n = self.0.add(12).cast::<u32>().read() as usize;
            std::slice::from_raw_parts(self.0.add(ENTRY_HEADER), n)
        }
    }
    /// A filler up to the end of the ring (entries never wrap): done, of
    /// no database. Its length is a multiple of ALIGN, so its header fits.
    unsafe fn write_filler(&self, len: u64) {
        unsafe {
            self.0.cast::<u32>().write(len as u32);
            self.0.add(4).cast::<u32>().write(0);
            *self.state() = DONE;
            *self.0.add(10) = NO_SLOT;
            self.0.add(16).cast::<u64>().write(0);
        }
    }
    unsafe fn write(&self, len: u64, db: u32, slot: u8, id: u64, payload: &[u8]) {
        unsafe {
            self.0.cast::<u32>().write(len as u32);
            self.0.add(4).cast::<u32>().write(db);
            *self.state() = READY;
            *self.attempts() = 0;
            *self.0.add(10) = slot;
            self.0.add(12).cast::<u32>().write(payload.len() as u32);
            self.0.add(16).cast::<u64>().write(id);
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.0.add(ENTRY_HEADER),
                payload.len(),
            );
        }
    }
}

impl Ring {
    #[allow(clippy::mut_from_ref)]
    fn header(&self) -> &mut Header {
        unsafe { &mut *self.h }
    }
    fn at(&self, pos: u64) -> At {
        At(unsafe { self.buf.add((pos % self.cap) as usize) })
    }
    /// The positions of the entries in the ring (fillers and done ones
    /// included), oldest first.
    fn positions(&self) -> Vec<u64> {
        let h = self.header();
        let mut out = Vec::new();
        let mut pos = h.tail;
        while pos < h.head {
            let len = unsafe { self.at(pos).len() };
            if len == 0 {
                break; // (never: every entry has a length)
            }
            out.push(pos);
            pos += len;
        }
        out
    }
    /// An entry is stored or given up: its space counts no more (it is
    /// reused when the tail passes it, or by the next compaction).
    fn retire(&self, e: &At) {
        let h = self.header();
        unsafe {
            if *e.state() == DONE {
                return;
            }
            *e.state() = DONE;
            let len = e.len();
            h.live -= len.min(h.live);
            let slot = e.slot() as usize;
            if slot < DB_SLOTS {
                h.held[slot] -= len.min(h.held[slot]);
            }
        }
    }
    /// Frees the space of the done entries at the tail.
    fn advance_tail(&self) {
        let h = self.header();
        while h.tail < h.head {
            let e = self.at(h.tail);
            if unsafe { *e.state() } != DONE {
                break;
            }
            h.tail += unsafe { e.len() };
        }
    }
    /// The slot that accounts for database `db`'s waiting entries: its own,
    /// or a free one; None when all are held by other databases.
    fn slot_of(&self, db: u32) -> Option<usize> {
        let h = self.header();
        let mut free = None;
        for i in 0..DB_SLOTS {
            if h.held[i] > 0 && h.held_db[i] == db {
                return Some(i);
            }
            if h.held[i] == 0 && free.is_none() {
                free = Some(i);
            }
        }
        free
    }
    /// The filler the next entry of `len` bytes needs first (entries never
    /// wrap), if it does not fit before the end of the ring.
    fn filler_before(&self, len: u64) -> u64 {
        let room_to_end = self.cap - self.header().head % self.cap;
        if len > room_to_end {
            room_to_end
        } else {
            0
        }
    }
    fn fits(&self, len: u64, limit: u64) -> bool {
        let h = self.header();
        (h.head - h.tail) + self.filler_before(len) + len <= limit
    }
    /// Moves the entries not done towards the tail, in order, over the done
    /// ones: the space of entries stored or given up behind one still
    /// waiting (another database's, whose worker is slow) is reused. An
    /// entry moves only forward in memory within a lap of the ring, or to
    /// an earlier lap, over space already passed, so none is overwritten
    /// before it has been moved.
    fn compact(&self) {
        let h = self.header();
        let (mut w, mut p) = (h.tail, h.tail);
        while p < h.head {
            let e = self.at(p);
            let len = unsafe { e.len() };
            if unsafe { *e.state() } != DONE {
                let room_to_end = self.cap - w % self.cap;
                if len > room_to_end {
                    // w is then in an earlier lap than p: the filler ends
                    // at or before p
                    unsafe { self.at(w).write_filler(room_to_end) };
                    w += room_to_end;
                }
                if w != p {
                    unsafe {
                        std::ptr::copy(
                            self.buf.add((p % self.cap) as usize),
                            self.buf.add((w % self.cap) as usize),
                            len as usize,
                        )
                    };
                }
                w += len;
            }
            p += len;
        }
        h.head = w;
        self.advance_tail();
    }

    /// See push_within; false: dropped.
    fn push(&self, db: u32, payload: &[u8], share: f64) -> bool {
        let h = self.header();
        let cap = h.capacity;
        let limit = ((cap as f64 * share) as u64).min(cap);
        let len = (ENTRY_HEADER as u64 + payload.len() as u64).div_ceil(ALIGN) * ALIGN;
        let slot = self.slot_of(db);
        let over_share = slot.is_some_and(|s| h.held[s] + len > limit / 2);
        if len > cap / 2 || over_share || h.live + len > limit {
            h.dropped += 1;
            return false;
        }
        if !self.fits(len, limit) {
            self.compact();
            if !self.fits(len, limit) {
                h.dropped += 1;
                return false;
            }
        }
        let filler = self.filler_before(len);
        if filler > 0 {
            unsafe { self.at(h.head).write_filler(filler) };
            h.head += filler;
        }
        let slot = slot.map_or(NO_SLOT, |s| {
            h.held[s] += len;
            h.held_db[s] = db;
            s as u8
        });
        unsafe { self.at(h.head).write(len, db, slot, h.next_id, payload) };
        h.head += len;
        h.next_id += 1;
        h.live += len;
        h.queued += 1;
        true
    }

    fn take(&self, db: u32, max: usize) -> Taken {
        let mut t = Taken {
            ids: Vec::new(),
            rows: Vec::new(),
        };
        for pos in self.positions() {
            let e = self.at(pos);
            unsafe {
                if e.db() == db && *e.state() == READY {
                    // (under the lock, an allocation failure must not abort
                    // the process: the entry waits for the next round)
                    let mut row = Vec::new();
                    if row.try_reserve_exact(e.payload().len()).is_err()
                        || t.rows.try_reserve(1).is_err()
                        || t.ids.try_reserve(1).is_err()
                    {
                        break;
                    }
                    row.extend_from_slice(e.payload());
                    *e.state() = TAKEN;
                    t.ids.push(e.id());
                    t.rows.push(row);
                    if t.rows.len() >= max {
                        break;
                    }
                }
            }
        }
        t
    }

    fn finish(&self, taken: &Taken, stored: bool) {
        let h = self.header();
        // the ring is in sequence order, and so are the ids taken (one no
        // longer there, dropped meanwhile, is passed over)
        let mut ids = taken.ids.iter().peekable();
        for pos in self.positions() {
            let e = self.at(pos);
            let id = unsafe { e.id() };
            while ids.peek().is_some_and(|&&next| next < id) {
                ids.next();
            }
            let Some(&&next) = ids.peek() else { break };
            unsafe {
                if *e.state() != TAKEN || id != next {
                    continue;
                }
                ids.next();
                if stored {
                    self.retire(&e);
                    h.stored += 1;
                } else {
                    *e.attempts() += 1;
                    if *e.attempts() >= MAX_ATTEMPTS {
                        self.retire(&e);
                        h.failed += 1;
                    } else {
                        *e.state() = READY;
                    }
                }
            }
        }
        self.advance_tail();
    }
}

/// Queues one row for database `db`. None: there is no queue (not
/// preloaded); Some(false): it is full (the capture is counted as dropped).
pub fn push(db: u32, payload: &[u8]) -> Option<bool> {
    push_within(db, payload, 1.0)
}

/// As push, while the queue stays at most `share` full, and `db`'s waiting
/// entries at most half of that: PostgreSQL's own errors
/// (src/sql_errors.rs) may fill half of it, so that a flood of them leaves
/// room for the captures an application asked to be autonomous, and no
/// database takes more than half of what is left to the others.
pub fn push_within(db: u32, payload: &[u8], share: f64) -> Option<bool> {
    Some(lock()?.push(db, payload, share))
}

/// Counts a capture dropped before it reached the queue (over the
/// per-session rate of PostgreSQL error captures, src/sql_errors.rs).
pub fn count_dropped() {
    if let Some(q) = lock() {
        q.header().dropped += 1;
    }
}

/// Entries taken by a worker: their sequence numbers and rows.
pub struct Taken {
    pub ids: Vec<u64>,
    pub rows: Vec<Vec<u8>>,
}

/// Takes up to `max` entries of database `db` that wait to be stored.
pub fn take(db: u32, max: usize) -> Taken {
    match lock() {
        Some(q) => q.take(db, max),
        None => Taken {
            ids: Vec::new(),
            rows: Vec::new(),
        },
    }
}

/// After the transaction that stored `taken`: frees them (stored), or puts
/// them back for another try (given up after MAX_ATTEMPTS).
pub fn finish(taken: &Taken, stored: bool) {
    if let Some(q) = lock() {
        q.finish(taken, stored);
    }
}

/// At a worker's start: entries its predecessor took but did not finish
/// (it stopped mid-batch) are stored again.
pub fn retake(db: u32) {
    let Some(q) = lock() else { return };
    for pos in q.positions() {
        let e = q.at(pos);
        unsafe {
            if e.db() == db && *e.state() == TAKEN {
                *e.state() = READY;
            }
        }
    }
}

/// Entries of database `db` queued before `before` (a sequence number, see
/// next_id) that wait to be stored, when its worker found no extension
/// there: PostgreSQL errors captured by the emit_log_hook before the
/// launcher knew (an SQL capture needs the extension, so it was installed
/// before `before` was read and the worker would have seen it). Counted as
/// dropped, their space freed.
pub fn forget(db: u32, before: u64) {
    drop_queued_before(before, |entry_db, state| entry_db == db && state == READY);
}

/// Entries queued before `before` that `doomed(database, state)` says can
/// never be stored: counted as dropped, their space freed.
fn drop_queued_before(before: u64, doomed: impl Fn(u32, u8) -> bool) {
    let Some(q) = lock() else { return };
    let h = q.header();
    for pos in q.positions() {
        let e = q.at(pos);
        unsafe {
            if *e.state() == DONE {
                continue;
            }
            if e.id() >= before {
                break;
            }
            if doomed(e.db(), *e.state()) {
                q.retire(&e);
                h.dropped += 1;
            }
        }
    }
    q.advance_tail();
}

/// The sequence number the next entry will get (see keep_only, forget).
pub fn next_id() -> u64 {
    lock().map_or(0, |q| q.header().next_id)
}

/// Entries queued before `before` for a database not in `databases` (it
/// was dropped; the launcher's list) can never be stored: counted as
/// dropped, their space freed.
pub fn keep_only(databases: &[u32], before: u64) {
    // (taken ones too: no worker of a dropped database is left to finish them)
    drop_queued_before(before, |db, _| db != 0 && !databases.contains(&db));
}

// ---------------------------------------------------------------------------
// The row as queued: the occurrence's columns in the order of the capture's
// INSERT (capture_path::COLUMNS): error_id (16 bytes), occurred_at (i64),
// flags (1 byte: 1 = sampled_out, 2 = the context is JSON text), then each
// other column as a u32 length (u32::MAX: NULL) and its bytes (text as
// UTF-8, jsonb as its whole varlena or, with flag 2, as JSON text: a
// PostgreSQL error captured by the emit_log_hook cannot build a jsonb).
// ---------------------------------------------------------------------------

/// The occurrence, as the capture made it.
pub struct Row<'a> {
    pub error_id: [u8; 16],
    pub occurred_at: i64,
    pub sampled_out: bool,
    /// the context field is JSON text, not a jsonb varlena
    pub context_is_text: bool,
    /// fingerprint, error_type, message, stack_trace, context (jsonb
    /// varlena), severity, environment, release_version, trace_id, span_id
    pub fields: [Option<&'a [u8]>; 10],
}

pub const CONTEXT_FIELD: usize = 4;

pub fn encode(r: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + r
            .fields
            .iter()
            .map(|f| 4 + f.map_or(0, |b| b.len()))
            .sum::<usize>(),
    );
    out.extend_from_slice(&r.error_id);
    out.extend_from_slice(&r.occurred_at.to_le_bytes());
    out.push(r.sampled_out as u8 | (r.context_is_text as u8) << 1);
    for f in &r.fields {
        match f {
            Some(b) => {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
    out
}

pub fn decode(b: &[u8]) -> Option<Row<'_>> {
    let error_id: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let occurred_at = i64::from_le_bytes(b.get(16..24)?.try_into().ok()?);
    let flags = *b.get(24)?;
    let mut fields: [Option<&[u8]>; 10] = [None; 10];
    let mut at = 25;
    for f in fields.iter_mut() {
        let n = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if n != u32::MAX {
            *f = Some(b.get(at..at + n as usize)?);
            at += n as usize;
        }
    }
    Some(Row {
        error_id,
        occurred_at,
        sampled_out: flags & 1 != 0,
        context_is_text: flags & 2 != 0,
        fields,
    })
}

fn database_name() -> String {
    unsafe {
        let p = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Stores the taken rows in the current transaction (the worker's), with the
/// capture's own INSERT. Returns how many.
pub fn store(schema: &str, taken: &Taken) -> usize {
    let (sql, mut types) = crate::capture_path::insert_statement(schema);
    let sql = std::ffi::CString::new(sql).expect("no NUL in the INSERT");
    unsafe {
        pg_sys::SPI_connect();
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            error!("fraiseql_obs: cannot prepare the INSERT of autonomous captures");
        }
        let mut n = 0;
        for bytes in &taken.rows {
            let Some(r) = decode(bytes) else {
                warning!("fraiseql_obs: an autonomous capture could not be read back; skipped");
                continue;
            };
            let mut values: Vec<pg_sys::Datum> = Vec::with_capacity(13);
            let mut nulls: Vec<std::ffi::c_char> = Vec::with_capacity(13);
            let mut put = |d: Option<pg_sys::Datum>| {
                values.push(d.unwrap_or(pg_sys::Datum::from(0)));
                nulls.push(if d.is_some() { b' ' } else { b'n' } as std::ffi::c_char);
            };
            let text = |f: Option<&[u8]>| {
                f.map(|b| {
                    pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                        b.as_ptr().cast(),
                        b.len() as i32,
                    ))
                })
            };
            let varlena = |f: Option<&[u8]>| {
                f.map(|b| {
                    let p = pg_sys::palloc(b.len()).cast::<u8>();
                    std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len());
                    pg_sys::Datum::from(p)
                })
            };
            // the order of capture_path::COLUMNS
            put(Some(pg_sys::Datum::from(r.error_id.as_ptr())));
            put(text(r.fields[0]));
            put(Some(pg_sys::Datum::from(r.occurred_at)));
            for (i, f) in r.fields.iter().enumerate().skip(1) {
                put(if i == CONTEXT_FIELD && r.context_is_text {
                    // a PostgreSQL error (src/sql_errors.rs): the hook could
                    // not look up the database's name; the worker can
                    let mut json: Option<serde_json::Value> =
                        f.and_then(|b| serde_json::from_slice(b).ok());
                    if let Some(serde_json::Value::Object(m)) = json.as_mut() {
                        if m.get("source").and_then(|v| v.as_str()) == Some("postgres") {
                            m.insert("database".into(), database_name().into());
                        }
                    }
                    json.and_then(|j| pgrx::JsonB(j).into_datum())
                } else if i == CONTEXT_FIELD {
                    varlena(*f)
                } else {
                    text(*f)
                });
            }
            put(Some(pg_sys::Datum::from(r.sampled_out)));
            let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
            if rc != pg_sys::SPI_OK_INSERT as i32 {
                error!("fraiseql_obs: storing an autonomous capture failed (SPI code {rc})");
            }
            n += 1;
        }
        pg_sys::SPI_finish();
        n
    }
}

/// The autonomous capture queue (cluster-wide): its size, what waits in it,
/// and what became of the captures queued since the server started.
#[pg_extern(volatile, parallel_safe)]
fn fraiseql_autonomous_stats() -> TableIterator<
    'static,
    (
        name!(capacity_bytes, i64),
        name!(used_bytes, i64),
        name!(waiting, i64),
        name!(queued, i64),
        name!(stored, i64),
        name!(dropped, i64),
        name!(failed, i64),
    ),
> {
    let row = match lock() {
        None => (0, 0, 0, 0, 0, 0, 0),
        Some(q) => {
            let waiting = q
                .positions()
                .iter()
                .filter(|&&p| unsafe { *q.at(p).state() } != DONE)
                .count() as i64;
            let h = q.header();
            (
                h.capacity as i64,
                (h.head - h.tail) as i64,
                waiting,
                h.queued as i64,
                h.stored as i64,
                h.dropped as i64,
                h.failed as i64,
            )
        }
    };
    TableIterator::once(row)
}

#[cfg(test)]
mod unit {
    use super::*;

    /// A ring in ordinary memory, as on_shmem_startup makes it.
    struct Mem {
        _header: Box<Header>,
        _buf: Vec<u64>,
        ring: Ring,
    }

    fn ring(cap: u64) -> Mem {
        let mut header: Box<Header> = Box::new(unsafe { std::mem::zeroed() });
        header.capacity = cap;
        let mut buf = vec![0u64; cap as usize / 8];
        let ring = Ring {
            h: &mut *header,
            buf: buf.as_mut_ptr().cast(),
            cap,
        };
        Mem {
            _header: header,
            _buf: buf,
            ring,
        }
    }

    /// The entries not done, as (id, database, state, row), oldest first.
    fn waiting(r: &Ring) -> Vec<(u64, u32, u8, Vec<u8>)> {
        r.positions()
            .into_iter()
            .map(|p| r.at(p))
            .filter(|e| unsafe { *e.state() } != DONE)
            .map(|e| unsafe { (e.id(), e.db(), *e.state(), e.payload().to_vec()) })
            .collect()
    }

    #[test]
    fn a_stuck_entry_keeps_no_space_but_its_own() {
        let m = ring(64 * 1024);
        let r = &m.ring;
        // database 1's worker takes its entry and never finishes it
        assert!(r.push(1, &[1; 100], 1.0));
        let stuck = r.take(1, 10);
        assert_eq!(stuck.ids.len(), 1);
        // database 2 goes round the ring many times behind it
        for i in 0..5000u32 {
            let row = i.to_le_bytes().repeat(50 + (i % 300) as usize);
            assert!(r.push(2, &row, 1.0), "push {i}");
            let t = r.take(2, 10);
            assert_eq!(t.rows, vec![row]);
            r.finish(&t, true);
        }
        let w = waiting(r);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].1, w[0].2, &w[0].3[..]), (1, TAKEN, &[1u8; 100][..]));
        r.finish(&stuck, true);
        assert!(waiting(r).is_empty());
        assert_eq!(r.header().live, 0);
    }

    #[test]
    fn one_database_holds_at_most_half() {
        let m = ring(64 * 1024);
        let r = &m.ring;
        let row = [7u8; 1000];
        let mut n = 0;
        while r.push(1, &row, 1.0) {
            n += 1;
        }
        assert!(n > 0 && r.header().live <= 32 * 1024, "{n}");
        // the others still have the rest
        let mut others = 0;
        for db in 2..10 {
            if r.push(db, &row, 1.0) {
                others += 1;
            }
        }
        assert_eq!(others, 8);
        // PostgreSQL's own errors: a quarter per database
        let m = ring(64 * 1024);
        let r = &m.ring;
        while r.push(3, &row, 0.5) {}
        assert!(r.header().live <= 16 * 1024);
        assert!(r.push(3, &row, 1.0));
    }

    /// Random pushes, takes and finishes against a model of what must wait.
    #[test]
    fn matches_a_model_under_random_use() {
        let cap = 16 * 1024u64;
        let m = ring(cap);
        let r = &m.ring;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // (id, db, state, row, attempts)
        let mut model: Vec<(u64, u32, u8, Vec<u8>, u8)> = Vec::new();
        let mut taken: Vec<Taken> = Vec::new();
        let mut id = 0u64;
        let size = |n: usize| (ENTRY_HEADER + n).div_ceil(ALIGN as usize) as u64 * ALIGN;
        for step in 0..200_000 {
            match next() % 4 {
                0 | 1 => {
                    let db = (next() % 4 + 1) as u32;
                    let n = (next() % 3000) as usize;
                    let row: Vec<u8> = (0..n).map(|i| (i as u64 ^ id) as u8).collect();
                    let share = if next() % 3 == 0 { 0.5 } else { 1.0 };
                    let limit = (cap as f64 * share) as u64;
                    let live: u64 = model.iter().map(|e| size(e.3.len())).sum();
                    let held: u64 = model.iter().filter(|e| e.1 == db).map(|e| size(e.3.len())).sum();
                    let len = size(n);
                    let ok = r.push(db, &row, share);
                    if ok {
                        assert!(held + len <= limit / 2 && live + len <= limit, "step {step}");
                        model.push((id, db, READY, row, 0));
                        id += 1;
                    } else {
                        // refused only when over a share, or when even
                        // after compaction a filler could be in the way
                        assert!(
                            len > cap / 2 || held + len > limit / 2 || live + len + cap / 2 > limit,
                            "step {step}: refused {len} with {live} live, {held} held"
                        );
                    }
                }
                2 => {
                    let db = (next() % 4 + 1) as u32;
                    let t = r.take(db, (next() % 5 + 1) as usize);
                    for tid in &t.ids {
                        let e = model.iter_mut().find(|e| e.0 == *tid).unwrap();
                        assert_eq!((e.1, e.2), (db, READY));
                        e.2 = TAKEN;
                    }
                    taken.push(t);
                }
                _ => {
                    if taken.is_empty() {
                        continue;
                    }
                    let t = taken.swap_remove((next() % taken.len() as u64) as usize);
                    let stored = next() % 4 != 0;
                    r.finish(&t, stored);
                    for tid in &t.ids {
                        let i = model.iter().position(|e| e.0 == *tid).unwrap();
                        if stored || model[i].4 + 1 >= MAX_ATTEMPTS {
                            model.remove(i);
                        } else {
                            model[i].4 += 1;
                            model[i].2 = READY;
                        }
                    }
                }
            }
            let want: Vec<_> = model.iter().map(|e| (e.0, e.1, e.2, e.3.clone())).collect();
            assert_eq!(waiting(r), want, "step {step}");
            let h = r.header();
            assert!(h.head - h.tail <= cap);
            assert_eq!(h.live, model.iter().map(|e| size(e.3.len())).sum::<u64>());
        }
    }

    #[test]
    fn rows_read_back_as_written() {
        let r = Row {
            error_id: [7; 16],
            occurred_at: -42,
            sampled_out: true,
            context_is_text: true,
            fields: [
                Some(b"fp"),
                Some(b"unique_violation"),
                Some("m\u{e9}ssage".as_bytes()),
                None,
                Some(&[1, 2, 3, 4]),
                Some(b"error"),
                Some(b""),
                None,
                None,
                Some(b"span"),
            ],
        };
        let b = encode(&r);
        let d = decode(&b).unwrap();
        assert_eq!(
            (d.error_id, d.occurred_at, d.sampled_out, d.context_is_text),
            (r.error_id, r.occurred_at, r.sampled_out, r.context_is_text)
        );
        assert_eq!(d.fields, r.fields);
        // a cut row is refused, never read past its end
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_none(), "{n}");
        }
    }
}
