//! The retry policy every internal retry loop uses: a pause that doubles from a first
//! delay up to a cap, with jitter, that starts again from the first delay after a
//! success, and a sleep that a stop signal cuts short.
//!
//! Jitter: the pause before retry `n` is drawn uniformly from `[c/2, c]`, where
//! `c = min(cap, first · 2ⁿ)` is the doubling ceiling ("equal jitter"). No pause is
//! longer than the plain doubling schedule would give, none shorter than half of it, and
//! processes that failed at the same moment (a failover) spread their retries over the
//! upper half of each step instead of retrying in step.
//!
//! The policies (first delay and cap) of every loop are the constants below, in one place.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A first delay and a cap: the settings of one kind of retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The ceiling of the first pause (and of the first after a reset).
    pub(crate) first: Duration,
    /// The longest pause.
    pub(crate) cap: Duration,
}

/// The outbox flusher while the medium is unreachable.
pub(crate) const OUTBOX: Policy = Policy::new(Duration::from_millis(200), Duration::from_secs(5));
/// The MQTT link reconnecting after a lost connection.
#[cfg(feature = "mqtt")]
pub(crate) const MQTT_LINK: Policy = Policy::new(Duration::from_millis(50), Duration::from_secs(2));
/// The MongoDB change stream hub reopening its stream.
pub(crate) const CHANGE_STREAM: Policy =
    Policy::new(Duration::from_millis(100), Duration::from_secs(5));
/// A MongoDB follower resuming from its saved position or scanning the collection.
pub(crate) const FOLLOWER: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(5));
/// `run_once` waiting while another instance holds the idempotency reservation.
pub(crate) const IDEMPOTENCY_WAIT: Policy =
    Policy::new(Duration::from_millis(20), Duration::from_millis(500));
/// A worker settling (or burying) held work while the medium is unavailable.
pub(crate) const SETTLE: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(2));

impl Policy {
    /// A policy; a cap below `first` is raised to it.
    pub(crate) const fn new(first: Duration, cap: Duration) -> Self {
        let cap = if cap.as_nanos() < first.as_nanos() {
            first
        } else {
            cap
        };
        Policy { first, cap }
    }

    /// The doubling ceiling after `retries` earlier retries: `min(cap, first · 2^retries)`.
    /// Deterministic (no jitter).
    pub(crate) fn ceiling(&self, retries: u32) -> Duration {
        self.first
            .saturating_mul(2u32.saturating_pow(retries.min(31)))
            .min(self.cap)
    }

    /// A back-off with this policy, seeded apart from every other.
    pub(crate) fn start(self) -> Backoff {
        Backoff::seeded(self, fresh_seed())
    }
}

/// One retry loop's state: which retry comes next and the pause drawn for it.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: Policy,
    retries: u32,
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn seeded(policy: Policy, seed: u64) -> Self {
        let mut backoff = Backoff {
            policy,
            retries: 0,
            next: Duration::ZERO,
            rng: seed,
        };
        backoff.next = backoff.draw();
        backoff
    }

    /// The pause the next retry waits (for a log line before [`Backoff::sleep`]).
    pub(crate) fn delay(&self) -> Duration {
        self.next
    }

    /// The next pause, taken: the one after it is drawn from the next (doubled) step.
    pub(crate) fn take(&mut self) -> Duration {
        let delay = self.next;
        self.retries = self.retries.saturating_add(1);
        self.next = self.draw();
        delay
    }

    /// After a success: the next failure waits a first pause again.
    pub(crate) fn reset(&mut self) {
        if self.retries != 0 {
            self.retries = 0;
            self.next = self.draw();
        }
    }

    /// Waits the next pause ([`Backoff::take`]), or less if `cancel` is cancelled
    /// (at once if it already is). True when the whole pause was waited.
    pub(crate) async fn sleep(&mut self, cancel: &CancellationToken) -> bool {
        if cancel.is_cancelled() {
            return false;
        }
        let pause = self.take();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    /// A pause from `[c/2, c]` for the current step's ceiling `c`.
    fn draw(&mut self) -> Duration {
        let ceiling = self.policy.ceiling(self.retries);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        let span = nanos - half;
        let offset = if span == 0 {
            0
        } else {
            self.random() % (span + 1)
        };
        Duration::from_nanos(half + offset)
    }

    /// splitmix64: small, fast, and good enough to spread retries.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A seed that differs between back-offs of one process (a counter) and between
/// processes (std's per-process random hash keys, and the clock).
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    const P: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(5));

    fn delays(backoff: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| backoff.take()).collect()
    }

    #[test]
    fn two_policies_with_the_same_settings_do_not_retry_in_step() {
        let a = delays(&mut P.start(), 12);
        let b = delays(&mut P.start(), 12);
        assert_ne!(a, b, "two back-offs drew the same pauses");
        // Not merely one pause apart: most steps differ.
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 3, "{same} equal pauses of 12: {a:?} / {b:?}");
    }

    #[test]
    fn each_pause_lies_in_the_upper_half_of_its_doubling_step() {
        let mut backoff = P.start();
        for retries in 0..12 {
            let ceiling = P.ceiling(retries);
            let pause = backoff.take();
            assert!(
                pause >= ceiling / 2 && pause <= ceiling,
                "retry {retries}: {pause:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
    }

    #[test]
    fn the_cap_holds() {
        let mut backoff = P.start();
        let pauses = delays(&mut backoff, 200);
        assert!(pauses.iter().all(|p| *p <= P.cap), "{pauses:?}");
        // And the pauses do reach the capped step (not stuck low).
        assert!(pauses[100..].iter().all(|p| *p >= P.cap / 2), "{pauses:?}");
        assert_eq!(P.ceiling(u32::MAX), P.cap);
    }

    #[test]
    fn reset_restores_the_first_delay() {
        let mut backoff = P.start();
        let _ = delays(&mut backoff, 10);
        assert!(backoff.delay() > P.first, "{:?}", backoff.delay());
        backoff.reset();
        let first = backoff.take();
        assert!(first >= P.first / 2 && first <= P.first, "{first:?}");
        let second = backoff.take();
        assert!(second >= P.first && second <= P.first * 2, "{second:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_pauses() {
        let a = delays(&mut Backoff::seeded(P, 7), 8);
        let b = delays(&mut Backoff::seeded(P, 7), 8);
        assert_eq!(a, b);
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_first_delay() {
        let p = Policy::new(Duration::from_secs(1), Duration::from_millis(1));
        assert_eq!(p.cap, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_cancelled_sleep_returns_at_once() {
        let long = Policy::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let mut backoff = long.start();
        let cancel = CancellationToken::new();
        cancel.cancel();
        // Ready at the first poll: no timer was waited on.
        assert_eq!(backoff.sleep(&cancel).now_or_never(), Some(false));
        // A pause already under way ends when the token is cancelled.
        let live = CancellationToken::new();
        let sleeping = {
            let live = live.clone();
            tokio::spawn(async move { long.start().sleep(&live).await })
        };
        tokio::task::yield_now().await;
        live.cancel();
        assert!(!sleeping.await.expect("the sleep task"));
    }

    #[tokio::test]
    async fn a_sleep_not_cancelled_waits_its_pause_out() {
        let short = Policy::new(Duration::from_millis(1), Duration::from_millis(1));
        assert!(short.start().sleep(&CancellationToken::new()).await);
    }
}
