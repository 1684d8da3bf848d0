//! Poison-tolerant locking, and lowering a shared counter: one place for what every shared
//! structure of the crate does.
//!
//! A panic while a lock is held (a bug, never a client's input) must not take every later request
//! down with it: the data behind our locks stays consistent between statements, so the guard of a
//! poisoned mutex is used as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over the guard if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lowers `counter` by `n`, stopping at zero (a count that was estimated may be short).
pub(crate) fn sub_saturating(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        Some(c.saturating_sub(n))
    });
}
