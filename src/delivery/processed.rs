//! The in-memory fall-back of the idempotency store, shared by the handles of one bus.
//!
//! Why it exists: when the medium's `processed` store cannot be reached, run-once
//! records are kept here (bounded, this process only) and written back when the store
//! answers again. The policy that uses it is in [`crate::idempotency`]; the state lives
//! with the bus, below it, so that the bus does not depend on the layers built on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::medium::records::LocalRecords;

/// How many records the in-memory fall-back keeps (the oldest go first).
pub const FALLBACK_CAPACITY: usize = 10_000;

/// The in-memory fall-back and its state, shared by the handles of one bus.
pub(crate) struct Fallback {
    pub(crate) records: LocalRecords,
    pub(crate) active: AtomicBool,
    /// When the store last failed; while on the fall-back it is tried again after
    /// [`PROBE_EVERY`], not on every call (each failing call can take the driver's
    /// server-selection time-out).
    failed_at: Mutex<Option<Instant>>,
    /// Times the bus fell back to memory.
    pub(crate) fallbacks: AtomicU64,
}

/// How often the store is tried again while on the fall-back.
const PROBE_EVERY: Duration = Duration::from_secs(2);

impl Fallback {
    pub(crate) fn new(retention: Duration) -> Self {
        Fallback {
            records: LocalRecords::new(FALLBACK_CAPACITY, retention),
            active: AtomicBool::new(false),
            failed_at: Mutex::new(None),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// On the fall-back and too early to try the store again.
    pub(crate) fn skip_store(&self) -> bool {
        let failed_at = *self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        self.active() && failed_at.is_some_and(|at| at.elapsed() < PROBE_EVERY)
    }

    pub(crate) fn fall_back(&self, error: &Error) {
        *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if !self.active.swap(true, Ordering::SeqCst) {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::FALLBACK, "kind" => "idempotency").increment(1);
            tracing::warn!(%error, "idempotency store unreachable: falling back to memory (this process only)");
        }
    }
}
