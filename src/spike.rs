//! Spike protection. One error in a loop can capture thousands of times a
//! second; every occurrence is still counted exactly (it is a row the fold
//! counts), but beyond `fraiseql_obs.spike_threshold` occurrences of one
//! group in a minute only one in `SAMPLE_EVERY` is stored whole: the others
//! are stored without their heavy parts (no stack trace, no context, the
//! message cut to `LIGHT_MESSAGE_BYTES`) and marked `sampled_out`. The group
//! shows how many were not stored in full (`occurrences_not_stored`).
//!
//! The rate is kept per fingerprint in shared memory: a fixed table of
//! atomic counters, one word per slot (the minute and its count), no lock.
//! Two fingerprints may share a slot; they then reach the threshold sooner
//! together, which changes only what is stored in full, never a count. The
//! slot is a keyed hash of the group's id with a secret drawn at server
//! start: the id is public (fraiseql_error_id), and a sender who could
//! compute a group's slot could flood it with other fingerprints and have
//! that group's occurrences stored without their stack trace and context.
//! Without shared_preload_libraries there is no table and no sampling.
use crate::guc;
use pgrx::pg_sys;
use pgrx::shmem::PgSharedMemoryInitialization;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};

const SLOTS: usize = 16 * 1024;
/// Beyond the threshold, one occurrence in this many is stored whole.
pub const SAMPLE_EVERY: u64 = 100;
/// What is kept of the message of an occurrence not stored whole.
pub const LIGHT_MESSAGE_BYTES: usize = 256;

pub static RATES: RateTable = RateTable(UnsafeCell::new(std::ptr::null_mut()));

pub struct RateTable(UnsafeCell<*mut AtomicU64>);
unsafe impl Sync for RateTable {}

impl PgSharedMemoryInitialization for RateTable {
    type Value = u8;

    unsafe fn on_shmem_request(&'static self) {
        // (the first word is the secret)
        unsafe { pg_sys::RequestAddinShmemSpace((SLOTS + 1) * size_of::<AtomicU64>()) };
    }

    unsafe fn on_shmem_startup(&'static self, _value: u8) {
        unsafe {
            let table = crate::shmem::zeroed_struct(
                c"fraiseql_obs_spike_rates",
                (SLOTS + 1) * size_of::<AtomicU64>(),
            )
            .cast::<AtomicU64>();
            let mut secret = [0u8; 8];
            if !pg_sys::pg_strong_random(secret.as_mut_ptr().cast(), secret.len()) {
                secret = (pg_sys::GetCurrentTimestamp() as u64 ^ pg_sys::MyProcPid as u64).to_le_bytes();
            }
            let _ = (*table).compare_exchange(0, u64::from_le_bytes(secret) | 1, Ordering::Relaxed, Ordering::Relaxed);
            *self.0.get() = table;
        }
    }
}

/// The slot of a group: SipHash of the secret, the database and the id.
fn slot_of(secret: u64, db: u32, key: &[u8; 16]) -> usize {
    use std::hash::Hasher;
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(secret, secret.rotate_left(32) ^ 0x5eed);
    h.write_u32(db);
    h.write(key);
    h.finish() as usize & (SLOTS - 1)
}

/// The counter word after one more occurrence in `minute`: (minute, count).
fn bump(word: u64, minute: u32) -> u64 {
    let (m, n) = ((word >> 32) as u32, word as u32);
    if m == minute {
        ((minute as u64) << 32) | n.saturating_add(1) as u64
    } else {
        ((minute as u64) << 32) | 1
    }
}

/// Whether the occurrence beyond the threshold that makes `n` this minute is
/// stored whole.
fn stored_whole(n: u64, threshold: u64) -> bool {
    n <= threshold || (n - threshold) % SAMPLE_EVERY == 0
}

/// Counts one occurrence of the group with this key (its error_id, derived from the fingerprint)
/// and says whether it is to be stored without its heavy parts.
pub fn sampled_out(key: &[u8; 16]) -> bool {
    let threshold = guc::SPIKE_THRESHOLD.get();
    if threshold <= 0 || !crate::shmem::available() {
        return false;
    }
    let table = unsafe { *RATES.0.get() };
    if table.is_null() {
        return false;
    }
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    let secret = unsafe { &*table }.load(Ordering::Relaxed);
    let slot = unsafe { &*table.add(1 + slot_of(secret, db, key)) };
    let minute = (unsafe { pg_sys::GetCurrentTimestamp() } / 60_000_000) as u32;
    let mut word = slot.load(Ordering::Relaxed);
    loop {
        let next = bump(word, minute);
        match slot.compare_exchange_weak(word, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return !stored_whole(next as u32 as u64, threshold as u64),
            Err(w) => word = w,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_depend_on_the_secret() {
        let key = [7u8; 16];
        let a: Vec<usize> = (1..50u64).map(|s| slot_of(s, 1, &key)).collect();
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 40);
        assert_eq!(slot_of(5, 1, &key), slot_of(5, 1, &key));
        assert!(a.iter().all(|&s| s < SLOTS));
    }

    #[test]
    fn counts_per_minute() {
        let w = bump(0, 7);
        assert_eq!(w, (7 << 32) | 1);
        assert_eq!(bump(w, 7), (7 << 32) | 2);
        assert_eq!(bump(bump(w, 7), 8), (8 << 32) | 1);
        assert_eq!(
            bump((7 << 32) | u32::MAX as u64, 7),
            (7 << 32) | u32::MAX as u64
        );
    }

    #[test]
    fn samples_beyond_the_threshold() {
        let whole = (1..=10_000u64).filter(|&n| stored_whole(n, 1000)).count();
        assert_eq!(whole, 1000 + 9000 / SAMPLE_EVERY as usize);
        assert!(stored_whole(1000, 1000) && !stored_whole(1001, 1000) && stored_whole(1100, 1000));
    }
}
